//! A stack of L residual blocks with a sequence-mixing op between two all-to-alls: the shape of
//! a Ulysses transformer (token-local work, a2a to full sequences, mixing along the sequence, a2a
//! back), small enough for tests. Used by the tape tests and the tape benchmark.
#![allow(dead_code)]

use tch::{Kind, Tensor};
use ulysses::autograd::Tape;
use ulysses::comm::Group;

/// Weights of the stack; every rank builds identical copies.
pub struct Blocks {
    pub w1: Vec<Tensor>,
    pub w2: Vec<Tensor>,
    pub heads: i64,
    pub head_dim: i64,
}

impl Blocks {
    pub fn new(layers: usize, heads: i64, head_dim: i64, kind: Kind, seed: u64) -> Blocks {
        let h = heads * head_dim;
        let scale = 1.0 / (h as f64).sqrt();
        let w = |i: usize, which: u64| {
            (crate::common::det(&[h, h], seed * 1000 + 2 * i as u64 + which, kind) * scale)
                .set_requires_grad(true)
        };
        Blocks {
            w1: (0..layers).map(|i| w(i, 0)).collect(),
            w2: (0..layers).map(|i| w(i, 1)).collect(),
            heads,
            head_dim,
        }
    }

    pub fn params(&self) -> Vec<&Tensor> {
        self.w1.iter().chain(&self.w2).collect()
    }

    /// Mixing along the sequence (dim 0), which needs every token: a scaled causal cumsum.
    fn mix(u: &Tensor) -> Tensor {
        let n = u.size()[0] as f64;
        (u.cumsum(0, u.kind()) / n.sqrt()).tanh()
    }

    /// One device, the whole sequence: `[N, h] -> [N, h]`.
    pub fn forward_plain(&self, x: &Tensor) -> Tensor {
        let n = x.size()[0];
        let mut h = x.shallow_clone();
        for (w1, w2) in self.w1.iter().zip(&self.w2) {
            // [N, h] -> [N, H, d]
            let u = h.matmul(w1).view([n, self.heads, self.head_dim]);
            let u = Self::mix(&u).view([n, -1]);
            // Not `+=`: on tch tensors that is an in-place add, which autograd must not see here.
            h = &h + u.matmul(w2);
        }
        h
    }

    /// Sequence parallel on `group`: `[N/P, h] -> [N/P, h]`, heads split by `head_split`, the
    /// sequence by `seq_split`. With `cuts`, a tape cut at every block boundary.
    pub fn forward_sp(
        &self,
        tape: &Tape,
        group: &Group,
        x: &Tensor,
        head_split: &[i64],
        seq_split: &[i64],
        cuts: bool,
    ) -> ulysses::Result<Tensor> {
        let s = x.size()[0];
        let mut h = x.shallow_clone();
        for (w1, w2) in self.w1.iter().zip(&self.w2) {
            // [N/P, h] -> [N/P, H, d]
            let u = h.matmul(w1).view([s, self.heads, self.head_dim]);
            // [N/P, H, d] -> [N, H/P, d]
            let u = tape.all_to_all_v(group, &u, 1, 0, head_split, seq_split)?;
            let u = Self::mix(&u);
            // [N, H/P, d] -> [N/P, H, d] -> [N/P, h]
            let u = tape.all_to_all_v(group, &u, 0, 1, seq_split, head_split)?.view([s, -1]);
            // Not `+=`: on tch tensors that is an in-place add, which autograd must not see here.
            h = &h + u.matmul(w2);
            if cuts {
                h = tape.cut(&h)?;
            }
        }
        Ok(h)
    }
}
