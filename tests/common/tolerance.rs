//! Float bounds that hold on any CPU, and the margin each comparison kept.
//!
//! Two runs of the same computation differ in the order of their sums: another world size
//! splits a reduction over ranks, and libtorch's kernels (ATen's vectorised loops, MKL's GEMM,
//! oneDNN) block their sums by the instruction set the CPU has, so the same test rounds
//! differently on another CPU model. A bound that only says what was seen on one machine can
//! fail on the next. The bounds here come from the worst-case analysis of rounding instead,
//! which does not depend on the order: a sum or dot product of `n` terms computed in any order
//! in a dtype of unit roundoff `u` is off by at most `gamma(n) = n u / (1 - n u)` times the sum
//! of the terms' absolute values (Higham, *Accuracy and Stability of Numerical Algorithms*, 2nd
//! ed., §3.1). Each test states the reductions its values go through and takes its bound from
//! them; what an optimizer does with rounding noise is dealt with by the test (see
//! tests/train.rs).
//!
//! [`check`] records how much of its bound each comparison used, as a `[margin]` line on
//! stderr (shown with `--nocapture`): `scripts/isa-check.sh` collects them from runs with
//! libtorch held to older instruction sets.
#![allow(dead_code)]

use anyhow::{ensure, Result};
use tch::Kind;

/// The unit roundoff of a floating dtype: half the distance from 1 to the next number.
pub fn unit_roundoff(kind: Kind) -> f64 {
    match kind {
        Kind::Double => 2f64.powi(-53),
        Kind::Float => 2f64.powi(-24),
        Kind::Half => 2f64.powi(-11),
        Kind::BFloat16 => 2f64.powi(-8),
        other => panic!("no unit roundoff for {other:?}"),
    }
}

/// `gamma(n) = n u / (1 - n u)`: the worst relative error, against the sum of absolute values,
/// of a sum or dot product of `n` terms in `kind`, in any order of summation.
pub fn gamma(n: usize, kind: Kind) -> f64 {
    let nu = n as f64 * unit_roundoff(kind);
    assert!(nu < 0.5, "gamma({n}) in {kind:?}: n u = {nu} is too large for the bound to mean anything");
    nu / (1.0 - nu)
}

/// `got <= bound`, or an error naming `label` and both numbers; prints the fraction of the
/// bound used as a `[margin]` line.
pub fn check(label: &str, got: f64, bound: f64) -> Result<()> {
    let used = if bound > 0.0 {
        got / bound
    } else if got == 0.0 {
        0.0
    } else {
        f64::INFINITY
    };
    eprintln!("[margin] {label}: {got:.3e} of {bound:.3e} ({:.1}%)", 100.0 * used);
    ensure!(got <= bound, "{label}: {got:.3e} > bound {bound:.3e}");
    Ok(())
}

/// How far a GPT's loss and gradients computed in f32 on P ranks may be from the same model on
/// one device (the same parameters and tokens), whatever the CPU.
///
/// Every value goes through a chain of sums, none longer than `longest` terms: the hidden size
/// and the MLP's widths F and, for SwiGLU, 2F (projections), N (attention over keys), V (the softmax of the
/// loss) and the tokens a weight's gradient sums over. The two runs order those sums
/// differently (another world size, other GEMM shapes, another CPU), and each stage of the chain
/// adds at most `gamma(longest)` of relative error to what it passes on:
/// - the loss goes through L blocks, the output projection and the mean over tokens:
///   `(L + 2) gamma`, relative to the loss (cross-entropy passes a logit's error on at most
///   once: its gradient `p - onehot` has a 1-norm of at most 2, against logits of order 1 and
///   a loss of order ln V);
/// - a gradient goes through the forward and back again, then the sum over tokens and ranks:
///   `(2L + 3) gamma`, relative to the tensor's largest gradient element (the sums' absolute
///   values are of that order: no tensor's gradient is all cancellation).
#[derive(Debug, Clone, Copy)]
pub struct GptBounds {
    /// Relative to the loss.
    pub loss: f64,
    /// Relative to the largest element of each parameter's gradient.
    pub grad: f64,
}

/// [`GptBounds`] of `cfg` on `tokens` tokens per gradient sum (micro-batch x N x micro-batches
/// summed), in `kind`.
pub fn gpt(cfg: &ulysses::model::GptConfig, n: i64, tokens: i64, kind: Kind) -> GptBounds {
    let longest = [cfg.mlp_in_width(), cfg.n_embd, n, cfg.vocab_size, tokens].into_iter().max().unwrap_or(1);
    let g = gamma(longest as usize, kind);
    GptBounds { loss: (cfg.n_layer + 2) as f64 * g, grad: (2 * cfg.n_layer + 3) as f64 * g }
}

/// Each named tensor of `got` against `want` within `bound` times the largest |element| of the
/// `want` tensor (a zero tensor must match exactly); records the margin per tensor.
pub fn each_relative_to_max(
    label: &str,
    got: &[(String, tch::Tensor)],
    want: &[(String, tch::Tensor)],
    bound: f64,
) -> Result<()> {
    ensure!(got.len() == want.len(), "{label}: {} vs {} tensors", got.len(), want.len());
    for ((name, g), (wname, w)) in got.iter().zip(want) {
        ensure!(name == wname, "{label}: {name} against {wname}");
        ensure!(g.size() == w.size(), "{label}: {name} of shape {:?} vs {:?}", g.size(), w.size());
        let scale = w.abs().max().to_kind(Kind::Double).double_value(&[]);
        let diff = super::max_diff(g, w);
        check(&format!("{label}: {name} (max |x| {scale:.2e})"), diff, bound * scale)?;
    }
    Ok(())
}
