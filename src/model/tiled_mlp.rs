//! The tiled MLP of Arctic Long Sequence Training (ALST; Bekman et al. 2025, "TiledMLP"): the
//! block's MLP over tiles of the tokens, so that its `[t, F]` intermediates (`[t, 2F]` and two
//! `[t, F]` for SwiGLU) never exist for the whole sequence at once.
//!
//! Everything in the MLP is token-local, so each tile's output is exactly the untiled output's
//! rows. The forward computes the tiles one after the other and keeps only the MLP's input; the
//! backward runs each tile's MLP again on a nested [`Tape`] and back-propagates the tile's part of
//! the output gradient through it, so the parameters' gradients accumulate tile by tile and only
//! one tile's intermediates are alive at any moment. The cost: the MLP's forward once more (its
//! matrices' FLOPs x 4/3 without checkpointing), what ALST pays for sequences whose MLP
//! intermediates would not fit.
//!
//! With Megatron-SP the MLP's input is the all-gathered sequence and its output is
//! reduce-scattered; tiling that would tile the collectives too, which Megatron-LM does not do
//! and this module refuses by name.

use tch::Tensor;

use super::gpt::mlp_activation;
use super::layers::Linear;
use super::MlpKind;
use crate::autograd::{single, Tape};
use crate::error::TorchResultExt;
use crate::{Error, Result};

const OP: &str = "tiled_mlp";

/// The MLP's two matrices and its activation, as handles on the model's own parameters (the
/// gradients of the recomputed tiles land in the parameters' `grad`).
pub(super) struct Mlp {
    pub kind: MlpKind,
    pub fc: Linear,
    pub out: Linear,
}

impl Mlp {
    /// `out(act(fc(u)))`.
    ///
    /// # Shapes
    /// `[n, h]` -> `[n, h]` (through `[n, F]`, or `[n, 2F]` then `[n, F]` for SwiGLU).
    fn forward(&self, u: &Tensor) -> Result<Tensor> {
        let m = mlp_activation(self.kind, &self.fc.forward(u)?)?;
        self.out.forward(&m)
    }
}

/// The MLP of `u`, `tile` tokens at a time, as one taped op that keeps only `u`; on a tape that
/// does not record, the tiles go through autograd (the same values, none of the saving), and on
/// a [forward-only](Tape::forward_only) one each tile's graph is dropped once it is done.
///
/// # Shapes
/// `u`: `[b, s, h]` (the second norm's output) -> `[b, s, h]`.
pub(super) fn tiled_mlp(tape: &Tape, mlp: Mlp, u: &Tensor, tile: i64) -> Result<Tensor> {
    let size = u.size();
    let (b, s, h) = match size.as_slice() {
        [b, s, h] => (*b, *s, *h),
        _ => {
            return Err(Error::Shape {
                op: OP,
                shapes: vec![size],
                msg: "the MLP input must be [b, s, h]".into(),
            })
        }
    };
    check_tile(tile, s)?;
    // [b, s, h] -> [T, h], T = b s: tiles of `tile` tokens, the last one shorter
    let flat = u.f_reshape([b * s, h]).op(OP)?;
    let tiles: Vec<(i64, i64)> =
        (0..b * s).step_by(tile as usize).map(|a| (a, tile.min(b * s - a))).collect();
    if !tape.is_recording() {
        // A forward-only tape (a checkpointed block's first pass): each tile's graph dropped as
        // soon as it is done, or every tile's intermediates would live until the block's end.
        let graphs = tape.keeps_graphs();
        let parts = tiles
            .iter()
            .map(|&(a, n)| {
                let y = mlp.forward(&flat.f_narrow(0, a, n).op(OP)?)?;
                Ok(if graphs { y } else { y.detach() })
            })
            .collect::<Result<Vec<_>>>()?;
        return Tensor::f_cat(&parts, 0).and_then(|y| y.f_reshape([b, s, h])).op(OP);
    }
    let (saved, tiles_b) = (flat.detach(), tiles.clone());
    let first = Mlp { kind: mlp.kind, fc: mlp.fc.shallow(), out: mlp.out.shallow() };
    let out = tape.record(
        OP,
        &[&flat],
        // Each tile's graph is dropped as soon as its output is copied out (grad mode on, as in
        // the recomputation, so both forwards pick the same kernels).
        move |xs| {
            let parts = tiles
                .iter()
                .map(|&(a, n)| {
                    let y = tch::with_grad(|| first.forward(&xs[0].f_narrow(0, a, n).op(OP)?))?;
                    Ok(y.detach())
                })
                .collect::<Result<Vec<_>>>()?;
            Ok(vec![Tensor::f_cat(&parts, 0).op(OP)?])
        },
        move |gs| {
            let mut du = Vec::with_capacity(tiles_b.len());
            for &(a, n) in &tiles_b {
                // [n, h]: this tile's input, a leaf of its own graph
                let ut = saved.f_narrow(0, a, n).op(OP)?.detach().set_requires_grad(true);
                let inner = Tape::new();
                let y = tch::with_grad(|| mlp.forward(&ut))?;
                inner.backward_from(&[y], &[gs[0].f_narrow(0, a, n).op(OP)?])?;
                let g = ut.grad();
                du.push(if g.defined() { g } else { ut.f_zeros_like().op(OP)? });
            }
            Ok(vec![Tensor::f_cat(&du, 0).op(OP)?])
        },
    )?;
    // [T, h] -> [b, s, h]
    single(OP, out)?.f_reshape([b, s, h]).op(OP)
}

/// A tile of `tile` tokens for a rank holding `s` tokens per sample: at least 1, at most `s`.
pub fn check_tile(tile: i64, s: i64) -> Result<()> {
    if tile < 1 || tile > s {
        return Err(Error::InvalidArgument {
            op: OP,
            group: "-".into(),
            msg: format!(
                "an MLP tile of {tile} tokens for a rank holding {s} tokens per sample: it must be \
                 between 1 and {s}"
            ),
        });
    }
    Ok(())
}
