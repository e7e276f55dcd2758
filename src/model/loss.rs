//! The loss: token-weighted cross-entropy over the sequence-parallel group (Jacobs et al. 2023,
//! §3.1: each rank computes the loss of its own tokens), whole or in tiles (ALST, Bekman et al.
//! 2025, "tiled loss computation"), and the backward through the tape with the hooks around it.

use tch::{Kind, Reduction, Tensor};

use super::recompute::Unit;
use super::{Gpt, IGNORE};
use crate::autograd::{single, Tape};
use crate::comm::{reduction_kind, ReduceOp};
use crate::error::TorchResultExt;
use crate::{Error, Result};

/// The loss of one forward pass, reduced over the sequence-parallel group.
pub struct Loss {
    /// This rank's term of the global mean: the sum of its tokens' losses divided by the
    /// number of labelled tokens in the whole group. The terms of all ranks add up to the
    /// global mean, so back-propagating each rank's term gives each its share of the gradient.
    pub local: Tensor,
    /// The global mean loss (every rank's terms, summed), as a number.
    pub value: f64,
    /// Labelled tokens in the group.
    pub tokens: i64,
}

impl Gpt {
    /// Cross-entropy of this rank's tokens against `labels` (already shifted over the *global*
    /// sequence, [`IGNORE`] where there is no target), as a token-weighted mean over the group.
    /// With [`ForwardOptions::loss_tile`](super::ForwardOptions) the logits are computed a tile
    /// of tokens at a time.
    ///
    /// # Shapes
    /// `tokens`, `labels`: `[b, s_r]` i64.
    pub fn loss(&self, tape: &Tape, tokens: &Tensor, labels: &Tensor) -> Result<Loss> {
        self.loss_packed(tape, tokens, labels, None)
    }

    /// [`loss`](Gpt::loss) over packed documents (labels from
    /// [`shift_labels_packed`](super::shift_labels_packed), so that none crosses a document).
    ///
    /// # Shapes
    /// `tokens`, `labels`: `[b, s_r]` i64; `docs` of b samples of the global N.
    pub fn loss_packed(
        &self,
        tape: &Tape,
        tokens: &Tensor,
        labels: &Tensor,
        docs: Option<&crate::attention::Documents>,
    ) -> Result<Loss> {
        if labels.size() != tokens.size() {
            return Err(Error::Shape {
                op: "gpt_loss",
                shapes: vec![tokens.size(), labels.size()],
                msg: "tokens and labels must have one shape".into(),
            });
        }
        let x = self.hidden(tape, tokens, docs)?;
        let sum = match self.options.loss_tile {
            Some(tile) => tiled_cross_entropy(tape, &x, self.head_weight(), labels, tile)?,
            None => {
                // [b, s, h] -> [b, s, V] -> [b*s, V], in f32 for half precision so that it does
                // not round the loss
                let logits = x.f_linear::<Tensor>(self.head_weight(), None).op("gpt")?;
                let v = self.cfg.vocab_size;
                let flat = logits
                    .f_reshape([-1, v])
                    .and_then(|l| l.f_to_kind(reduction_kind(l.kind())))
                    .op("gpt_loss")?;
                cross_entropy_sum(&flat, labels)?
            }
        };
        self.hook(|h| h.after_forward(Unit::Outer))?;
        let counted = labels.f_ne(IGNORE).and_then(|m| m.f_sum(Kind::Double)).op("gpt_loss")?;
        // [tokens, loss sum] of this rank, then of the group.
        let mine = Tensor::f_stack(&[counted, sum.detach().f_to_kind(Kind::Double).op("gpt_loss")?], 0)
            .op("gpt_loss")?;
        let totals = match self.strategy().group() {
            Some(g) => g.all_reduce(&mine, ReduceOp::Sum)?,
            None => mine,
        };
        let totals = Vec::<f64>::try_from(&totals).op("gpt_loss")?;
        let (tokens_total, sum_total) = (totals[0], totals[1]);
        if tokens_total < 1.0 {
            return Err(Error::Shape {
                op: "gpt_loss",
                shapes: vec![labels.size()],
                msg: "no labelled token in the whole group".into(),
            });
        }
        let local = sum.f_div_scalar(tokens_total).op("gpt_loss")?;
        Ok(Loss { local, value: sum_total / tokens_total, tokens: tokens_total as i64 })
    }

    /// Back-propagates this rank's term of `loss` through `tape`, calling the hooks of the outer
    /// unit (embedding, final norm, head) around it. Every rank must call it.
    pub fn backward(&self, tape: &Tape, loss: &Loss) -> Result<()> {
        self.hook(|h| h.before_backward(Unit::Outer))?;
        tape.backward(&loss.local)?;
        self.hook(|h| h.after_backward(Unit::Outer))
    }

    /// One forward and backward pass of the loss, gradients summed over the sequence-parallel
    /// group (no optimizer update). A strategy that communicates, or a model that recomputes or
    /// has hooks, runs through a [`Tape`]; the plain single device runs plain autograd (its
    /// tape records nothing).
    pub fn forward_backward(&self, tokens: &Tensor, labels: &Tensor) -> Result<Loss> {
        self.forward_backward_packed(tokens, labels, None)
    }

    /// [`forward_backward`](Gpt::forward_backward) over packed documents.
    pub fn forward_backward_packed(
        &self,
        tokens: &Tensor,
        labels: &Tensor,
        docs: Option<&crate::attention::Documents>,
    ) -> Result<Loss> {
        let plain = self.options == super::ForwardOptions::default()
            && self.hooks.is_none()
            && self.offload.is_none();
        if self.strategy().group().is_none() && plain {
            let loss = self.loss_packed(&Tape::disabled(), tokens, labels, docs)?;
            loss.local.f_backward().op("gpt_backward")?;
            return Ok(loss);
        }
        let tape = Tape::new();
        let loss = self.loss_packed(&tape, tokens, labels, docs)?;
        self.backward(&tape, &loss)?;
        self.sync_gradients()?;
        Ok(loss)
    }
}

/// Summed cross-entropy of `logits` (f32 `[T, V]`) against `labels` (`[.., ..]`, T in all).
fn cross_entropy_sum(logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
    let labels = labels.f_reshape([-1]).op("gpt_loss")?;
    logits.f_cross_entropy_loss::<Tensor>(&labels, None, Reduction::Sum, IGNORE, 0.0).op("gpt_loss")
}

/// The summed cross-entropy of the logits `x W^T` against `labels`, `tile` tokens at a time, as
/// one taped op that keeps only `x` (and `W`): its forward and its hand-written backward each
/// hold the logits of one tile, never the whole `[T, V]`. The backward of a tile is
/// `dlogits = g (softmax(logits) - onehot(label))` (zero for ignored tokens), then `dx = dlogits
/// W` and `dW += dlogits^T x`, in f32 for half precision and in `x`'s dtype otherwise. On a
/// tape that does not record, the tiles go through autograd.
///
/// # Shapes
/// `x`: `[b, s, h]`, `weight`: `[V, h]`, `labels`: `[b, s]` -> `[]`.
pub fn tiled_cross_entropy(
    tape: &Tape,
    x: &Tensor,
    weight: &Tensor,
    labels: &Tensor,
    tile: i64,
) -> Result<Tensor> {
    const OP: &str = "tiled_loss";
    if tile < 1 {
        return Err(Error::InvalidArgument {
            op: OP,
            group: "-".into(),
            msg: format!("loss tile of {tile} tokens: it must be at least 1"),
        });
    }
    let h = x.size().last().copied().unwrap_or(0);
    // [b, s, h] -> [T, h]; [b, s] -> [T]
    let (flat, labels) = (x.f_reshape([-1, h]).op(OP)?, labels.f_reshape([-1]).op(OP)?);
    let (t, acc) = (flat.size()[0], reduction_kind(x.kind()));
    let tiles: Vec<(i64, i64)> = (0..t).step_by(tile as usize).map(|a| (a, tile.min(t - a))).collect();
    let forward = |xs: &Tensor, w: &Tensor| -> Result<Tensor> {
        let mut total = Tensor::f_zeros([], (acc, xs.device())).op(OP)?;
        for &(a, n) in &tiles {
            // [n, h] x [h, V] -> [n, V], in the accumulation dtype
            let logits = xs.f_narrow(0, a, n).and_then(|c| c.f_linear::<Tensor>(w, None)).op(OP)?;
            let part = cross_entropy_sum(&logits.f_to_kind(acc).op(OP)?, &labels.f_narrow(0, a, n).op(OP)?)?;
            total = total.f_add(&part).op(OP)?;
        }
        Ok(total)
    };
    if !tape.is_recording() {
        return forward(&flat, weight);
    }
    let (saved_x, saved_w, tiles_b, labels_b) =
        (flat.detach(), weight.detach(), tiles.clone(), labels.shallow_clone());
    let out = tape.record(
        OP,
        &[&flat, weight],
        |xs| Ok(vec![forward(&xs[0], &xs[1])?]),
        move |gs| {
            let g = gs[0].f_to_kind(acc).op(OP)?;
            let mut dx = Vec::with_capacity(tiles_b.len());
            let mut dw = saved_w.f_zeros_like().and_then(|z| z.f_to_kind(acc)).op(OP)?;
            for &(a, n) in &tiles_b {
                let mut step = || -> Result<(), tch::TchError> {
                    let xc = saved_x.f_narrow(0, a, n)?;
                    let lc = labels_b.f_narrow(0, a, n)?;
                    // [n, V]: softmax - onehot, rows of ignored tokens zero, times g
                    let p = xc.f_linear::<Tensor>(&saved_w, None)?.f_to_kind(acc)?.f_softmax(-1, acc)?;
                    let keep = lc.f_ne(IGNORE)?;
                    let target = lc.f_where_scalarother(&keep, 0)?.f_unsqueeze(1)?;
                    let p = p.f_scatter_add(1, &target, &keep.f_to_kind(acc)?.f_neg()?.f_unsqueeze(1)?)?;
                    let d = p.f_mul(&keep.f_to_kind(acc)?.f_unsqueeze(1)?)?.f_mul(&g)?;
                    let dk = d.f_to_kind(saved_w.kind())?;
                    dx.push(dk.f_matmul(&saved_w)?); // [n, V] x [V, h] -> [n, h]
                    dw = dw.f_add(&d.f_transpose(0, 1)?.f_matmul(&xc.f_to_kind(acc)?)?)?; // [V, h]
                    Ok(())
                };
                step().op(OP)?;
            }
            let dx = Tensor::f_cat(&dx, 0).op(OP)?;
            Ok(vec![dx, dw.f_to_kind(saved_w.kind()).op(OP)?])
        },
    )?;
    single(OP, out)
}
