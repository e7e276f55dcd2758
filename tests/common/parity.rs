//! Parity of any strategy with single-device attention: inputs of a chosen sharpness, the f64
//! reference (output, dq, dk, dv and the log-sum-exp), one run of the strategy on P thread
//! ranks, and a per-element comparison with tolerances labelled per dtype.
#![allow(dead_code)]

use anyhow::{ensure, Result};
use tch::{Device, Kind, Tensor};
use ulysses::attention::{AttentionConfig, Kernel, Mask, StrategyConfig};
use ulysses::autograd::Tape;
use ulysses::comm::launch;

use super::{det, reference_attention};

/// Per-element tolerance, as `torch.testing.assert_close`: `|got - want| <= atol s + rtol |want|`,
/// where s = max(1, RMS of `want`): `atol` is for tensors of values of order 1, and a tensor
/// whose typical value is larger (the gradients of sharp attention) gets a proportionally larger
/// absolute tolerance. Every element is checked, so an error in a small entry is not hidden
/// behind the tensor's largest value.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Tol {
    pub atol: f64,
    pub rtol: f64,
}

/// The tolerance of results computed from inputs in `kind` against the f64 reference computed
/// from the same (rounded) inputs, for the inputs of [`Spec`] (values of order 1, logits of
/// standard deviation 0.5 to 10, head sizes up to 128). Measured on the strategies suite and
/// the property tests (worst element, as a fraction of the bound):
/// - f64: the same arithmetic in another order: 1e-10 (seen: 1e-4 of it).
/// - f32: accumulation in f32 over N keys and d: 3e-5 (seen: 0.25 of it, sharp logits, d = 128).
/// - bf16 and f16: 5e-2 absolute, 3e-2 relative. Outputs and gradients are rounded to 8 (11)
///   significant bits and libtorch's half kernels round intermediate sums: the single-device
///   SDPA in bf16 is itself 0.038 off the f64 reference in dK (RMS 0.86) with sharp logits and 12
///   query heads per kv head, at an element where the sum cancels to 4e-4. torch.testing uses
///   1.6e-2 relative for one bf16 op; these are sums over N keys and a group's query heads.
pub fn tol(kind: Kind) -> Tol {
    match kind {
        Kind::Double => Tol { atol: 1e-10, rtol: 1e-10 },
        Kind::Float => Tol { atol: 3e-5, rtol: 3e-5 },
        _ => Tol { atol: 5e-2, rtol: 3e-2 },
    }
}

/// Checks every element of `got` against `want` (any dtypes, compared in f64) within `tol`. NaN
/// never passes; equal infinities do. The message names the worst element, its index and
/// values, how many elements fail and the tolerance.
pub fn allclose(label: &str, got: &Tensor, want: &Tensor, tol: Tol) -> Result<()> {
    ensure!(got.size() == want.size(), "{label}: shape {:?}, expected {:?}", got.size(), want.size());
    if want.numel() == 0 {
        return Ok(());
    }
    let (g, w) = (got.to_kind(Kind::Double), want.to_kind(Kind::Double));
    let finite = w.isfinite();
    let rms = w.where_self(&finite, &w.zeros_like()).square().mean(Kind::Double).sqrt().double_value(&[]);
    let scale = rms.max(1.0);
    let diff = (&g - &w).abs();
    let bound = w.abs() * tol.rtol + tol.atol * scale;
    // `<=` is false for NaN, so NaN fails; equal infinities give NaN differences but pass.
    let ok = diff.le_tensor(&bound).logical_or(&g.eq_tensor(&w));
    let failing = ok.logical_not().sum(Kind::Int64).int64_value(&[]);
    if failing == 0 {
        return Ok(());
    }
    // The worst element: the largest diff / bound (NaN counts as the worst).
    let ratio = (&diff / &bound)
        .nan_to_num(f64::INFINITY, None, None)
        .where_self(&ok.logical_not(), &diff.zeros_like());
    let flat = ratio.reshape([-1]).argmax(0, false).int64_value(&[]);
    let mut index = Vec::new();
    let mut rest = flat;
    for &s in want.size().iter().rev() {
        index.push(rest % s);
        rest /= s;
    }
    index.reverse();
    anyhow::bail!(
        "{label}: {failing} of {} elements differ beyond atol {:.0e} x {scale:.2} + rtol {:.0e}: worst at \
         {index:?}: got {}, expected {} (diff {:.3e})",
        want.numel(),
        tol.atol,
        tol.rtol,
        g.double_value(&index),
        w.double_value(&index),
        diff.double_value(&index)
    )
}

/// The gradient flowing into the output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Grad {
    /// Ones: the gradient of `out.sum()`.
    Ones,
    /// Values in [-1, 1).
    Random,
}

/// One attention problem on global tensors.
#[derive(Debug, Clone, Copy)]
pub struct Spec {
    pub b: i64,
    pub n: i64,
    pub heads: i64,
    pub kv_heads: i64,
    pub d: i64,
    pub kind: Kind,
    /// Standard deviation of the attention logits q.k/sqrt(d): about 1 is flat, 10 is sharp
    /// (nearly one key per row: a wrong scale or a missing key shows).
    pub logits: f64,
    pub grad: Grad,
    pub seed: u64,
}

impl Spec {
    /// b = 2, d = 4, f64, flat logits, random gradient: the small default that tests vary.
    pub fn new(n: i64, heads: i64, kv_heads: i64) -> Spec {
        Spec { b: 2, n, heads, kv_heads, d: 4, kind: Kind::Double, logits: 1.0, grad: Grad::Random, seed: 21 }
    }

    /// q, k, v, grad_out: `[b, N, H, d]`, `[b, N, H_kv, d]` x 2, `[b, N, H, d]`, in `kind`.
    /// q and k are uniform in [-s, s) with s^4 d / (9 d) = logits^2, so that q.k/sqrt(d) has
    /// the asked standard deviation (each product has variance s^4/9); v in [-1, 1).
    pub fn tensors(&self) -> [Tensor; 4] {
        let s = (3.0 * self.logits).sqrt();
        let (q_shape, kv_shape) =
            ([self.b, self.n, self.heads, self.d], [self.b, self.n, self.kv_heads, self.d]);
        let u = |shape: &[i64], seed: u64, scale: f64| {
            (det(shape, seed, Kind::Double) * (2.0 * scale)).to_kind(self.kind)
        };
        let grad = match self.grad {
            Grad::Ones => Tensor::ones(q_shape, (self.kind, Device::Cpu)),
            Grad::Random => u(&q_shape, self.seed + 3, 1.0),
        };
        [u(&q_shape, self.seed, s), u(&kv_shape, self.seed + 1, s), u(&kv_shape, self.seed + 2, 1.0), grad]
    }
}

/// The single-device f64 reference for `mask`: [out, dq, dk, dv, lse], lse `[b, N, H]`.
pub fn reference(spec: &Spec, mask: Mask) -> Result<[Tensor; 5]> {
    let [q, k, v, w] = spec.tensors();
    let pos = Tensor::arange(spec.n, (Kind::Int64, Device::Cpu));
    let allowed = mask.dense(&pos, &pos)?;
    let [out, dq, dk, dv] = reference_attention(&allowed, &q, &k, &v, &w);
    // [b, N, H, d] -> [b, H, N, d]; kv head of query head h is h / G
    let map = Tensor::arange(spec.heads, (Kind::Int64, Device::Cpu))
        .floor_divide_scalar(spec.heads / spec.kv_heads);
    let (qd, kd) = (
        q.to_kind(Kind::Double).transpose(1, 2),
        k.to_kind(Kind::Double).index_select(2, &map).transpose(1, 2),
    );
    // [b, H, N, d] x [b, H, d, N] -> [b, H, N, N] -> logsumexp -> [b, H, N] -> [b, N, H]
    let scores = qd.matmul(&kd.transpose(-2, -1)) / (spec.d as f64).sqrt();
    let lse =
        scores.masked_fill(&allowed.logical_not(), f64::NEG_INFINITY).logsumexp([-1i64].as_slice(), false);
    Ok([out, dq, dk, dv, lse.transpose(1, 2)])
}

/// Runs `strategy` (with `kernel` where it takes one) on `p` thread ranks over the global
/// tensors of `spec`: forward, tape backward of `sum(out * grad_out)`, and the lse pass.
/// Returns [out, dq, dk, dv, lse] put back together, or the strategy's refusal.
pub fn run(
    strategy: StrategyConfig,
    kernel: Kernel,
    p: usize,
    spec: &Spec,
    mask: Mask,
) -> ulysses::Result<[Tensor; 5]> {
    let attention = AttentionConfig::new(kernel, mask);
    let per_rank = launch(p, |ctx| -> ulysses::Result<(Vec<Tensor>, ulysses::attention::Sharding)> {
        let r = ctx.rank();
        let s = strategy.build(ctx.world(), attention, spec.n, spec.heads, spec.kv_heads)?;
        let sharding = s.sharding();
        let [q, k, v, w] = spec.tensors();
        let mine = |t: &Tensor| -> ulysses::Result<Tensor> {
            Ok(sharding.shard(t, r)?.copy().set_requires_grad(true))
        };
        let (q, k, v) = (mine(&q)?, mine(&k)?, mine(&v)?);
        let tape = Tape::new();
        let o = s.forward(&tape, &q, &k, &v)?;
        tape.backward(&(&o * sharding.shard(&w, r)?).sum(o.kind()))?;
        let (_, lse) = s.forward_lse(&q.detach(), &k.detach(), &v.detach())?;
        Ok((vec![o.detach(), q.grad(), k.grad(), v.grad(), lse], sharding))
    })?;
    let sharding = &per_rank[0].1;
    let part =
        |i: usize| sharding.unshard(&per_rank.iter().map(|(t, _)| t[i].shallow_clone()).collect::<Vec<_>>());
    Ok([part(0)?, part(1)?, part(2)?, part(3)?, part(4)?])
}

/// [`run`] against [`reference`], every tensor within [`tol`] of the inputs' dtype.
pub fn check(strategy: StrategyConfig, kernel: Kernel, p: usize, spec: &Spec, mask: Mask) -> Result<()> {
    let got = run(strategy, kernel, p, spec, mask)?;
    let want = reference(spec, mask)?;
    for (i, name) in ["out", "dq", "dk", "dv", "lse"].iter().enumerate() {
        let label = format!("{} P={p} {spec:?} {mask:?} {name}", strategy.label());
        allclose(&label, &got[i], &want[i], tol(spec.kind))?;
    }
    Ok(())
}
