//! Parity of any strategy with single-device attention: inputs of a chosen sharpness, the f64
//! reference (output, dq, dk, dv and the log-sum-exp), one run of the strategy on P thread
//! ranks, and a per-element comparison with tolerances labelled per dtype.
#![allow(dead_code)]

use anyhow::{ensure, Result};
use tch::{Device, Kind, Tensor};
use ulysses::attention::{AttentionConfig, Documents, Kernel, Mask, StrategyConfig};
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

/// The tolerance of results computed from `spec`'s inputs (rounded to its dtype) against the
/// f64 reference computed from the same rounded inputs, on any CPU.
///
/// f32 and f64, from the worst case of rounding in any order (tests/common/tolerance.rs): a
/// score `q.k / sqrt(d)` is a sum of d products, off by at most `gamma(d) S`, where S is the
/// largest `sum |q_i k_i| / sqrt(d)` of the inputs (computed from them here). The softmax turns
/// an absolute error e of the scores into relative errors of at most 2e of the weights; the
/// output sums N weighted values (`gamma(N)`), the backward again the scores' error through
/// `dS = P (dP - D)` and sums over N keys or N G queries (G query heads per kv head), and ring
/// strategies merge up to 2P partial results; `exp` and `log` add a few ulps. Together at most
/// `4 (gamma(d) S + gamma(N G + 2P) + 2u)` of the values' scale, and twice that in f64, where
/// the reference rounds as much as the run. Sharp logits (large S) and long head sizes are ill
/// conditioned: the bound grows with them, as the error can.
///
/// bf16 and f16: 5e-2 absolute, 3e-2 relative. The outputs and gradients are rounded to 8
/// (11) significant bits, and libtorch's half kernels round intermediate results too, each a
/// relative error of up to u = 2^-8 (2^-11) of sums whose absolute terms reach several times the
/// result where they cancel: the single-device SDPA in bf16 is itself 0.038 off the f64
/// reference in dK (RMS 0.86) with sharp logits and 12 query heads per kv head. torch.testing
/// uses 1.6e-2 relative for one bf16 op. These roundings are of values, not of the order of
/// sums, so they are the same on any CPU up to the f32 accumulations inside, which are far
/// smaller: `scripts/isa_check.py` sees the same worst share of this bound (36-38%) with
/// AVX-512, AVX2 and SSE4.2 kernels.
pub fn tol(spec: &Spec, p: usize) -> Tol {
    match spec.kind {
        Kind::Float | Kind::Double => {
            let group = spec.heads / spec.kv_heads.max(1);
            let e = attention_bound(spec.kind, spec.n, spec.d, group, p, spec.largest_score_terms());
            Tol { atol: e, rtol: e }
        }
        _ => Tol { atol: 5e-2, rtol: 3e-2 },
    }
}

/// The f32 / f64 bound of [`tol`] for N keys, head size d, G query heads per kv head, P ranks,
/// and S the largest `sum |q_i k_i| / sqrt(d)` of the inputs.
pub fn attention_bound(kind: Kind, n: i64, d: i64, group: i64, p: usize, s: f64) -> f64 {
    use super::tolerance::{gamma, unit_roundoff};
    let terms = (n * group.max(1)) as usize + 2 * p;
    let e = 4.0 * (gamma(d as usize, kind) * s + gamma(terms, kind) + 2.0 * unit_roundoff(kind));
    if kind == Kind::Double {
        2.0 * e
    } else {
        e
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
        // The margin kept (tests/common/tolerance.rs): the worst element's share of its bound.
        let used = (&diff / &bound).where_self(&g.eq_tensor(&w).logical_not(), &diff.zeros_like());
        let used = used.max().double_value(&[]);
        eprintln!("[margin] {label}: worst element {:.1}% of its bound", 100.0 * used);
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

    /// The largest `sum_i |q_i k_i| / sqrt(d)` over every query, key and head of the inputs:
    /// what bounds a score's rounding error (see [`tol`]).
    pub fn largest_score_terms(&self) -> f64 {
        let [q, k, _, _] = self.tensors();
        let map = Tensor::arange(self.heads, (Kind::Int64, Device::Cpu))
            .floor_divide_scalar(self.heads / self.kv_heads.max(1));
        // [b, N, H, d] -> [b, H, N, d]; k's kv heads expanded to the query heads
        let q = q.to_kind(Kind::Double).abs().transpose(1, 2);
        let k = k.to_kind(Kind::Double).abs().index_select(2, &map).transpose(1, 2);
        // [b, H, N, d] x [b, H, d, N] -> [b, H, N, N]
        let terms = q.matmul(&k.transpose(-2, -1)) / (self.d as f64).sqrt();
        if terms.numel() == 0 {
            return 0.0;
        }
        terms.max().double_value(&[])
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

/// Every strategy that runs on `p` ranks (Megatron-SP and the single device included; USP at
/// each Ulysses degree of 2 or 4 below P; chunked Ulysses in 2 chunks).
pub fn strategies_for(p: usize) -> Vec<StrategyConfig> {
    let mut v = vec![
        StrategyConfig::Ulysses,
        StrategyConfig::UlyssesChunked { chunks: 2 },
        StrategyConfig::MegatronSp,
        StrategyConfig::Ring { zigzag: false },
        StrategyConfig::Ring { zigzag: true },
        StrategyConfig::AllGatherKv { zigzag: false },
        StrategyConfig::AllGatherKv { zigzag: true },
    ];
    for u in [2, 4] {
        if p.is_multiple_of(u) && p > u {
            v.push(StrategyConfig::Usp { ulysses: u, zigzag: false });
            v.push(StrategyConfig::Usp { ulysses: u, zigzag: true });
        }
    }
    if p == 1 {
        v.push(StrategyConfig::Single);
    }
    v
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
    run_packed(strategy, kernel, p, spec, mask, None)
}

/// [`run`] over packed documents (`None`: one per sample).
pub fn run_packed(
    strategy: StrategyConfig,
    kernel: Kernel,
    p: usize,
    spec: &Spec,
    mask: Mask,
    docs: Option<&Documents>,
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
        let o = s.forward_docs(&tape, &q, &k, &v, docs)?;
        tape.backward(&(&o * sharding.shard(&w, r)?).sum(o.kind()))?;
        let (_, lse) = s.forward_lse_docs(&q.detach(), &k.detach(), &v.detach(), docs)?;
        Ok((vec![o.detach(), q.grad(), k.grad(), v.grad(), lse], sharding))
    })?;
    let sharding = &per_rank[0].1;
    let part =
        |i: usize| sharding.unshard(&per_rank.iter().map(|(t, _)| t[i].shallow_clone()).collect::<Vec<_>>());
    Ok([part(0)?, part(1)?, part(2)?, part(3)?, part(4)?])
}

/// [`run`] against [`reference`], every tensor within [`tol`].
pub fn check(strategy: StrategyConfig, kernel: Kernel, p: usize, spec: &Spec, mask: Mask) -> Result<()> {
    let got = run(strategy, kernel, p, spec, mask)?;
    let want = reference(spec, mask)?;
    for (i, name) in ["out", "dq", "dk", "dv", "lse"].iter().enumerate() {
        let label = format!("{} P={p} {spec:?} {mask:?} {name}", strategy.label());
        allclose(&label, &got[i], &want[i], tol(spec, p))?;
    }
    Ok(())
}
