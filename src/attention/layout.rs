//! How a global sequence of N tokens is spread over the P ranks of a sequence-parallel group.
//!
//! Contiguous layout (Ulysses, paper §3.1): rank r holds tokens `[start_r, start_r + len_r)`, in
//! rank order. When P does not divide N the first `N % P` ranks hold one token more; the uneven
//! all-to-all then gathers exactly N tokens, so nothing is padded and nothing is masked. (The
//! reference implementation silently corrupts results in this case; we stay exact.)

use tch::{Device, Kind, Tensor};

use crate::error::TorchResultExt;
use crate::{Error, Result};

/// The shares of a sequence over the ranks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeqLayout {
    n: i64,
    lens: Vec<i64>,
}

impl SeqLayout {
    /// Contiguous shares of `n` tokens over `p` ranks, the first `n % p` one longer.
    pub fn contiguous(n: i64, p: usize) -> Result<SeqLayout> {
        let pi = p as i64;
        if p == 0 || n < pi {
            return Err(Error::InvalidArgument {
                op: "sequence_layout",
                group: format!("{p} ranks"),
                msg: format!("a sequence of {n} tokens cannot give each of {p} ranks a token"),
            });
        }
        Ok(SeqLayout { n, lens: (0..pi).map(|r| n / pi + i64::from(r < n % pi)).collect() })
    }

    /// Global sequence length N.
    pub fn global_len(&self) -> i64 {
        self.n
    }

    /// Number of ranks.
    pub fn ranks(&self) -> usize {
        self.lens.len()
    }

    /// Every rank's share, in rank order (the split the all-to-alls gather with).
    pub fn lens(&self) -> &[i64] {
        &self.lens
    }

    /// Rank `r`'s share.
    pub fn len(&self, r: usize) -> i64 {
        self.lens[r]
    }

    /// Whether the sequence is empty (never: a layout has at least one token per rank).
    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    /// Global position of rank `r`'s first token.
    pub fn start(&self, r: usize) -> i64 {
        self.lens[..r].iter().sum()
    }

    /// Global positions of rank `r`'s tokens, `[len_r]` i64.
    pub fn positions(&self, r: usize, device: Device) -> Result<Tensor> {
        let start = self.start(r);
        Tensor::f_arange_start(start, start + self.len(r), (Kind::Int64, device)).op("sequence_layout")
    }

    /// Rank `r`'s share of a global tensor whose dim `dim` is the sequence (a view).
    ///
    /// # Shapes
    /// `[.., N, ..]` -> `[.., len_r, ..]`.
    pub fn shard(&self, x: &Tensor, dim: i64, r: usize) -> Result<Tensor> {
        let d = if dim < 0 { dim + x.dim() as i64 } else { dim };
        let size = x.size();
        if d < 0 || d as usize >= size.len() || size[d as usize] != self.n {
            return Err(Error::Shape {
                op: "sequence_layout",
                shapes: vec![size],
                msg: format!("dim {dim} should hold the {} tokens of the sequence", self.n),
            });
        }
        x.f_narrow(d, self.start(r), self.len(r)).op("sequence_layout")
    }
}
