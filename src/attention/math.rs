//! The ground truth: softmax(q k^T / sqrt(d) + mask) v, written out with an explicit mask.
//! Holds the whole `[b, h, N, N]` score matrix: for tests and small sequences.

use tch::Tensor;

use super::{check_qkv, compute_kind, LocalAttention, Mask};
use crate::error::TorchResultExt;
use crate::Result;

/// Dense attention with an explicit boolean mask built from the rule.
#[derive(Debug, Clone)]
pub struct MathAttention {
    mask: Mask,
}

impl MathAttention {
    pub fn new(mask: Mask) -> MathAttention {
        MathAttention { mask }
    }

    fn attend(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor, tch::TchError> {
        let (kind, acc) = (q.kind(), compute_kind(q.kind()));
        let n = q.size()[1];
        let scale = 1.0 / (q.size()[3] as f64).sqrt();
        // [b, N, h, d] -> [b, h, N, d], in the accumulation dtype
        let [q, k, v] = [q, k, v].map(|t| t.f_transpose(1, 2).and_then(|t| t.f_to_kind(acc)));
        let (q, k, v) = (q?, k?, v?);
        // [b, h, N, d] x [b, h, d, N] -> [b, h, N, N]
        let mut scores = q.f_matmul(&k.f_transpose(-2, -1)?)?.f_mul_scalar(scale)?;
        if self.mask != Mask::None {
            let pos = Mask::positions(n, q.device())?;
            let allowed = self.mask.dense(&pos, &pos)?; // [N, N]
            scores = scores.f_masked_fill(&allowed.f_logical_not()?, f64::NEG_INFINITY)?;
        }
        let probs = scores.f_softmax(-1, acc)?;
        // [b, h, N, N] x [b, h, N, d] -> [b, h, N, d] -> [b, N, h, d]
        probs.f_matmul(&v)?.f_transpose(1, 2)?.f_to_kind(kind)
    }
}

impl LocalAttention for MathAttention {
    fn name(&self) -> &'static str {
        "math"
    }

    fn mask(&self) -> Mask {
        self.mask
    }

    fn forward(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
        check_qkv("math_attention", q, k, v)?;
        self.attend(q, k, v).op("math_attention")
    }
}
