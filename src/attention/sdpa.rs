//! libtorch's `scaled_dot_product_attention`: flash or memory-efficient kernels on GPUs, the
//! CPU flash kernel on CPUs when the mask is plain causal or absent. Other masks go in as a
//! boolean `[N, N]` mask, which selects the kernels that take one.

use tch::Tensor;

use super::{check_qkv, LocalAttention, Mask};
use crate::error::TorchResultExt;
use crate::Result;

/// Attention through `torch.nn.functional.scaled_dot_product_attention`.
#[derive(Debug, Clone)]
pub struct SdpaAttention {
    mask: Mask,
}

impl SdpaAttention {
    pub fn new(mask: Mask) -> SdpaAttention {
        SdpaAttention { mask }
    }

    fn attend(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor, tch::TchError> {
        let n = q.size()[1];
        // [b, N, h, d] -> [b, h, N, d] (views)
        let (q, k, v) = (q.f_transpose(1, 2)?, k.f_transpose(1, 2)?, v.f_transpose(1, 2)?);
        let dense = match self.mask {
            Mask::None | Mask::Causal => None,
            rule => {
                let pos = Mask::positions(n, q.device())?;
                Some(rule.dense(&pos, &pos)?) // [N, N], true = attend
            }
        };
        let out = Tensor::f_scaled_dot_product_attention(
            &q,
            &k,
            &v,
            dense.as_ref(),
            0.0,
            self.mask.is_causal(),
            None,
            false,
        )?;
        // [b, h, N, d] -> [b, N, h, d]
        out.f_transpose(1, 2)
    }
}

impl LocalAttention for SdpaAttention {
    fn name(&self) -> &'static str {
        "sdpa"
    }

    fn mask(&self) -> Mask {
        self.mask
    }

    fn forward(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
        check_qkv("sdpa_attention", q, k, v)?;
        self.attend(q, k, v).op("sdpa_attention")
    }
}
