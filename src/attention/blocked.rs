//! Block-sparse and sliding-window attention that computes only the key blocks each query block
//! can see, so its work grows with N x (visible keys), not N^2.
//!
//! The sequence is cut into blocks of B tokens. For query block i the rule gives the list of key
//! blocks holding at least one visible key; the lists are padded to the longest (M blocks) and
//! the visible blocks gathered, so one batched matmul computes `[nb, B, M*B]` scores instead of
//! `[N, N]`. Inside the gathered blocks the rule is applied per element, so the result is exactly
//! that of dense attention with the same mask (the tests check it against [`MathAttention`]).
//!
//! [`MathAttention`]: super::MathAttention

use tch::{Device, Kind, Tensor};

use super::{check_qkv, compute_kind, LocalAttention, Mask};
use crate::error::TorchResultExt;
use crate::{Error, Result};

/// Attention over the visible key blocks only (sliding window, block-sparse).
#[derive(Debug, Clone)]
pub struct BlockedAttention {
    mask: Mask,
    block: i64,
}

impl BlockedAttention {
    /// Blocks follow the rule: the pattern's own blocks for block-sparse, the window for a
    /// sliding window (each query block then sees two key blocks). Dense rules (none, causal)
    /// would gather every key block per query block: use SDPA for those.
    pub fn new(mask: Mask) -> Result<BlockedAttention> {
        let block = match mask {
            Mask::BlockSparse(b) => b.block,
            Mask::SlidingWindow { window } => window,
            Mask::None | Mask::Causal => {
                return Err(Error::InvalidArgument {
                    op: "blocked_attention",
                    group: "-".into(),
                    msg: format!("{mask:?} is dense; use the sdpa or math kernel for it"),
                })
            }
        };
        mask.validate().map_err(|msg| Error::InvalidArgument {
            op: "blocked_attention",
            group: "-".into(),
            msg,
        })?;
        Ok(BlockedAttention { mask, block })
    }

    /// Block size B in tokens.
    pub fn block(&self) -> i64 {
        self.block
    }

    /// The gather plan for a sequence of `n`: key block indices `[nb, M]` (padded with block 0)
    /// and the element mask `[nb, B, M*B]`, true where query may see key.
    fn plan(&self, n: i64, device: Device) -> Result<(Tensor, Tensor), tch::TchError> {
        let b = self.block;
        let lists = self.mask.key_blocks(n, b);
        let nb = lists.len() as i64;
        let m = lists.iter().map(Vec::len).max().unwrap_or(1) as i64;
        let mut idx = Vec::with_capacity((nb * m) as usize);
        let mut used = Vec::with_capacity((nb * m) as usize);
        for list in &lists {
            for slot in 0..m as usize {
                idx.push(list.get(slot).copied().unwrap_or(0));
                used.push(slot < list.len());
            }
        }
        let opts = (Kind::Int64, device);
        let idx = Tensor::from_slice(&idx).f_view([nb, m])?.f_to(device)?;
        let used = Tensor::from_slice(&used).f_view([nb, m, 1])?.f_to(device)?;
        // Query positions [nb, B, 1]; key positions [nb, 1, M*B].
        let qpos = Tensor::f_arange(nb * b, opts)?.f_view([nb, b, 1])?;
        let offs = Tensor::f_arange(b, opts)?.f_view([1, 1, b])?;
        let kpos = idx.f_unsqueeze(-1)?.f_mul_scalar(b)?.f_add(&offs)?; // [nb, M, B]
        let real_key = kpos.f_lt(n)?.f_logical_and(&used.f_expand([nb, m, b], false)?)?;
        let kpos = kpos.f_view([nb, 1, m * b])?;
        let real_key = real_key.f_view([nb, 1, m * b])?;
        let allowed = self.mask.allowed(&qpos, &kpos)?.f_logical_and(&real_key)?;
        // Padding queries (positions >= n) are dropped afterwards; give them their first slot so
        // that no softmax row is empty (an empty row would put NaN into the backward).
        let pad_query = qpos.f_ge(n)?;
        let first_slot = Tensor::f_arange(m * b, opts)?.f_eq(0)?.f_view([1, 1, m * b])?;
        let allowed = allowed.f_logical_or(&pad_query.f_logical_and(&first_slot)?)?;
        Ok((idx, allowed))
    }

    fn attend(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor, tch::TchError> {
        let (kind, acc) = (q.kind(), compute_kind(q.kind()));
        let [bsz, n, h, d] = [q.size()[0], q.size()[1], q.size()[2], q.size()[3]];
        let b = self.block;
        let nb = (n + b - 1) / b;
        let (idx, allowed) = self.plan(n, q.device())?;
        let m = idx.size()[1];
        let blocks = |t: &Tensor| -> Result<Tensor, tch::TchError> {
            // [b, N, h, d] -> [b, h, N, d] -> pad to nb*B -> [b, h, nb, B, d]
            let t = t.f_transpose(1, 2)?.f_to_kind(acc)?;
            let t = t.f_constant_pad_nd([0, 0, 0, nb * b - n])?;
            t.f_reshape([bsz, h, nb, b, d])
        };
        let (qb, kb, vb) = (blocks(q)?, blocks(k)?, blocks(v)?);
        // [b, h, nb, B, d] -> [b, h, nb*M, B, d] -> [b, h, nb, M*B, d]: each query block's keys
        let flat = idx.f_reshape([nb * m])?;
        let kg = kb.f_index_select(2, &flat)?.f_reshape([bsz, h, nb, m * b, d])?;
        let vg = vb.f_index_select(2, &flat)?.f_reshape([bsz, h, nb, m * b, d])?;
        let scale = 1.0 / (d as f64).sqrt();
        // [b, h, nb, B, d] x [b, h, nb, d, M*B] -> [b, h, nb, B, M*B]
        let scores = qb.f_matmul(&kg.f_transpose(-2, -1)?)?.f_mul_scalar(scale)?;
        let scores = scores.f_masked_fill(&allowed.f_logical_not()?, f64::NEG_INFINITY)?;
        let probs = scores.f_softmax(-1, acc)?;
        // [b, h, nb, B, M*B] x [b, h, nb, M*B, d] -> [b, h, nb, B, d] -> [b, h, N, d] -> [b, N, h, d]
        let out = probs.f_matmul(&vg)?.f_reshape([bsz, h, nb * b, d])?.f_narrow(2, 0, n)?;
        out.f_transpose(1, 2)?.f_to_kind(kind)
    }
}

impl LocalAttention for BlockedAttention {
    fn name(&self) -> &'static str {
        "blocked"
    }

    fn mask(&self) -> Mask {
        self.mask
    }

    fn forward(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
        check_qkv("blocked_attention", q, k, v)?;
        self.attend(q, k, v).op("blocked_attention")
    }
}
