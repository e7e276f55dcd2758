//! Megatron-LM's sequence-parallel column linear as one taped op (Korthikanti et al. 2022,
//! §4.2.2 and its Fig. 5 "g"; Megatron-LM's `LinearWithGradAccumulationAndAsyncCommunication`
//! with `sequence_parallel`): all-gather the sequence, multiply by this rank's columns, and keep
//! only this rank's shard of the input for the backward, which gathers it again for the weight
//! gradient.
//!
//! ```text
//! forward:  x [b, s_r, in] --all-gather (sequence)--> [b, N, in] --x W^T + bias--> y [b, N, out]
//! backward: dx = reduce-scatter(dy W)    [b, N, out] x [out, in] -> [b, N, in] -> [b, s_r, in]
//!           dW = dy^T all-gather(x)      [out, b N] x [b N, in] -> [out, in]   (the re-gather)
//!           dbias = dy summed over b and N
//! ```
//!
//! Memory: the graph keeps the shard `[b, s_r, in]`, not the gathered `[b, N, in]` that an
//! all-gather followed by an ordinary linear would leave to autograd (P times more).
//! Communication: one more all-gather of `[b, N, in]` in the backward, `b N in (P-1)/P`
//! elements sent per rank, which Megatron-LM overlaps with the dx matmul.

use std::cell::Cell;
use std::rc::Rc;

use tch::Tensor;

use super::{single, Tape};
use crate::comm::{Group, ReduceOp};
use crate::error::TorchResultExt;
use crate::{Error, Result};

impl Tape {
    /// `all_gather_v(x, dim, sizes)` then `x W^T + bias`, re-gathering `x` in the backward
    /// instead of keeping the gathered input (see the module doc). `weight` is `[out, in]`,
    /// `bias` `[out]`; their gradients accumulate in their `.grad()` as with autograd.
    ///
    /// # Shapes
    /// `x`: `[.., sizes[r], .., in]` (the gathered dim is `dim`) -> `[.., sum(sizes), .., out]`.
    pub fn all_gather_linear(
        &self,
        group: &Group,
        x: &Tensor,
        dim: i64,
        sizes: &[i64],
        weight: &Tensor,
        bias: Option<&Tensor>,
    ) -> Result<Tensor> {
        const OP: &str = "all_gather_linear";
        let mut inputs = vec![x, weight];
        inputs.extend(bias);
        let (g, s, has_bias) = (group.clone(), sizes.to_vec(), bias.is_some());
        let saved: Rc<Cell<Option<(Tensor, Tensor)>>> = Rc::default();
        let for_backward = Rc::clone(&saved);
        let out = self.record(
            OP,
            &inputs,
            |xs| {
                // [.., s_r, .., in] -> [.., N, .., in] -> [.., N, .., out]
                let full = group.all_gather_v(&xs[0], dim, sizes)?;
                let y = full.f_linear(&xs[1], xs.get(2)).op(OP)?;
                // The shard and the weight, not `full`: it is gathered again in the backward.
                saved.set(Some((xs[0].shallow_clone(), xs[1].shallow_clone())));
                Ok(vec![y])
            },
            move |gs| {
                let (x, w) = for_backward.take().ok_or_else(|| Error::Tape {
                    op: OP,
                    msg: "the forward saved nothing for the backward".into(),
                })?;
                let _no_grad = tch::no_grad_guard();
                let dy = &gs[0];
                // dy [.., N, .., out] x [out, in] -> [.., N, .., in] -> [.., s_r, .., in]
                let dx_full = dy.f_matmul(&w).op(OP)?;
                let dx = g.reduce_scatter_v(&dx_full, dim, &s, ReduceOp::Sum)?;
                drop(dx_full);
                let full = g.all_gather_v(&x, dim, &s)?; // the re-gather
                let (out_f, in_f) = (w.size()[0], w.size()[1]);
                // [out, b N] x [b N, in] -> [out, in]
                let dw = dy
                    .f_reshape([-1, out_f])
                    .and_then(|d| d.f_transpose(0, 1))
                    .and_then(|d| d.f_mm(&full.f_reshape([-1, in_f])?))
                    .op(OP)?;
                let mut grads = vec![dx, dw];
                if has_bias {
                    // [.., out] -> [out]
                    let db = dy.f_reshape([-1, out_f]).and_then(|d| d.f_sum_dim_intlist(0, false, dy.kind()));
                    grads.push(db.op(OP)?);
                }
                Ok(grads)
            },
        )?;
        single(OP, out)
    }
}
