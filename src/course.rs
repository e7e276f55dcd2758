//! Checks for the exercises of the notebooks (notebooks/README.md, "Exercises").
//!
//! Each exercise asks the learner for one function; its check here runs that function on
//! several world sizes and shapes against a reference computed another way, and returns a
//! one-line verdict, or an error naming the first mismatch (the exercise, the case, the rank,
//! what came back and what was expected). The notebooks and their reference solutions
//! (notebooks/solutions/) call the same checks, and tests/course.rs makes sure that every check
//! accepts the reference solution and rejects wrong ones.
//!
//! [`attempt`] runs a check in a notebook cell: a stub that still panics with its `todo!()`
//! gives [`Outcome::NotAttempted`] instead of a failing cell.

use std::fmt;
use std::panic::{catch_unwind, AssertUnwindSafe};

use tch::{Device, Kind, Tensor};

use crate::attention::{AttentionConfig, SequenceParallel, UlyssesAttention};
use crate::autograd::Tape;
use crate::comm::{launch, Group, OpKind};
use crate::{Error, Result, TorchResultExt};

/// What a check said about the learner's function.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The function still panics with its `todo!()`.
    NotAttempted(String),
    /// The check passed: its verdict.
    Passed(String),
    /// The check failed: the first mismatch, or the learner's own error or panic.
    Failed(String),
}

impl Outcome {
    /// Whether the check passed.
    pub fn passed(&self) -> bool {
        matches!(self, Outcome::Passed(_))
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Outcome::NotAttempted(what) => write!(f, "not attempted yet: {what}"),
            Outcome::Passed(verdict) => write!(f, "{verdict}"),
            Outcome::Failed(mismatch) => write!(f, "not yet right: {mismatch}"),
        }
    }
}

/// The text `todo!()` panics with.
const TODO: &str = "not yet implemented";

/// Runs `check` (one of this module's checks on the learner's function) with panics caught and
/// their message kept off stderr: a `todo!()` still in the function (on any rank) gives
/// [`Outcome::NotAttempted`], any other panic or error [`Outcome::Failed`] with its message.
pub fn attempt(check: impl FnOnce() -> Result<String>) -> Outcome {
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let result = catch_unwind(AssertUnwindSafe(check));
    std::panic::set_hook(hook);
    let message = match result {
        Ok(Ok(verdict)) => return Outcome::Passed(verdict),
        Ok(Err(e)) => e.to_string(),
        Err(panic) => panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "a panic with a non-string payload".into()),
    };
    if message.contains(TODO) {
        Outcome::NotAttempted(format!("the function still has its todo!() ({message})"))
    } else {
        Outcome::Failed(message)
    }
}

fn mismatch(op: &'static str, msg: String) -> Error {
    Error::InvalidArgument { op, group: "world".into(), msg }
}

/// (P, b, N, H, d) of the re-sharding check: P = 1 to 4, P dividing N and H.
const RESHARD_CASES: [(usize, i64, i64, i64, i64); 5] =
    [(1, 1, 4, 2, 1), (2, 1, 8, 4, 2), (3, 1, 6, 6, 1), (4, 2, 8, 4, 3), (4, 1, 16, 8, 2)];

/// Exercise of notebook 01: Ulysses' forward re-sharding. `f(group, x)` gets rank r's
/// `[b, N/P, H, d]` (tokens `r N/P ..`, every head) and must return `[b, N, H/P, d]` (every
/// token, heads `r H/P ..`), in sequence and head order. The reference slices one global tensor
/// whose every element is distinct: by tokens for the input, by heads for the expected output.
pub fn check_ulysses_reshard<F>(f: F) -> Result<String>
where
    F: Fn(&Group, &Tensor) -> Result<Tensor> + Sync,
{
    const OP: &str = "check_ulysses_reshard";
    for (p, b, n, h, d) in RESHARD_CASES {
        let pi = p as i64;
        let case = format!("P={p}, global [b={b}, N={n}, H={h}, d={d}]");
        let found = launch(p, |ctx| -> Result<Option<String>> {
            let r = ctx.rank() as i64;
            // Every rank builds the same global tensor (a Tensor cannot be shared by the threads).
            let global = Tensor::arange(b * n * h * d, (Kind::Double, Device::Cpu)).reshape([b, n, h, d]);
            let x = global.f_narrow(1, r * n / pi, n / pi).op(OP)?.copy();
            let want = global.f_narrow(2, r * h / pi, h / pi).op(OP)?;
            let got = f(ctx.world(), &x)?;
            let (gs, ws) = (got.size(), want.size());
            if gs != ws {
                return Ok(Some(format!(
                    "rank {r} was given {:?} and returned {gs:?}, expected {ws:?}",
                    x.size()
                )));
            }
            let got = got.f_to_kind(Kind::Double).op(OP)?;
            let wrong = got.f_ne_tensor(&want).op(OP)?.f_nonzero().op(OP)?;
            if wrong.size()[0] == 0 {
                return Ok(None);
            }
            let at = Vec::<i64>::try_from(wrong.get(0)).op(OP)?;
            // Element ((b' N + t) H + head) d + d' of the global tensor is token t, head `head`.
            let input = |v: f64| {
                let i = v as i64;
                if v == i as f64 && (0..b * n * h * d).contains(&i) {
                    format!("{v} (token {}, head {})", i / (h * d) % n, i / d % h)
                } else {
                    format!("{v} (not an input element)")
                }
            };
            Ok(Some(format!(
                "rank {r} returned the right shape {gs:?} but element {at:?} is {} where {} was expected",
                input(got.double_value(&at)),
                input(want.double_value(&at)),
            )))
        })?;
        if let Some(msg) = found.into_iter().flatten().next() {
            return Err(mismatch(OP, format!("{case}: {msg}")));
        }
    }
    Ok(format!(
        "correct: [b, N/P, H, d] -> [b, N, H/P, d] on every rank for {} cases (P = 1 to 4)",
        RESHARD_CASES.len()
    ))
}

/// (P, N, H, H_kv) of the bytes check: P divides N, H and H_kv (the closed form's even case).
const BYTES_CASES: [(usize, i64, i64, i64); 6] =
    [(2, 16, 4, 4), (2, 32, 8, 2), (4, 32, 8, 8), (4, 32, 8, 4), (3, 24, 6, 3), (8, 64, 16, 8)];

/// Exercise of notebook 02: `f(n, p, heads, kv_heads, d)` must give the bytes one rank sends in
/// the all-to-alls of one Ulysses attention layer, forward and backward, for one sequence
/// (b = 1) of f32. The reference is what the library counts: [`UlyssesAttention`] runs forward
/// and backward on P thread ranks and every rank's all-to-all bytes are compared.
pub fn check_ulysses_bytes<F>(f: F) -> Result<String>
where
    F: Fn(u64, u64, u64, u64, u64) -> u64,
{
    const OP: &str = "check_ulysses_bytes";
    let d = 4i64;
    for (p, n, heads, kv_heads) in BYTES_CASES {
        let yours = f(n as u64, p as u64, heads as u64, kv_heads as u64, d as u64);
        let counted = launch(p, |ctx| -> Result<(u64, u64)> {
            let g = ctx.world();
            let attn =
                UlyssesAttention::new(g.clone(), AttentionConfig::default().build()?, n, heads, kv_heads)?;
            let s = attn.layout().len(ctx.rank());
            let seed = ctx.rank() as f64;
            let input = |kv: i64, shift: f64| {
                let len = s * kv * d;
                (Tensor::arange(len, (Kind::Float, Device::Cpu)) * 0.1 + seed + shift)
                    .sin()
                    .reshape([1, s, kv, d])
                    .set_requires_grad(true)
            };
            let (q, k, v) = (input(heads, 0.0), input(kv_heads, 1.0), input(kv_heads, 2.0));
            let tape = Tape::new();
            let o = attn.forward(&tape, &q, &k, &v)?;
            let forward = g.stats().op(OpKind::AllToAll).bytes_sent;
            tape.backward(&o.sum(Kind::Float))?;
            Ok((forward, g.stats().op(OpKind::AllToAll).bytes_sent))
        })?;
        for (r, (forward, both)) in counted.into_iter().enumerate() {
            if yours != both {
                return Err(mismatch(
                    OP,
                    format!(
                        "P={p}, N={n}, H={heads}, H_kv={kv_heads}, d={d}: your formula gives {yours} B, \
                         rank {r} sent {both} B ({forward} B forward + {} B backward)",
                        both - forward
                    ),
                ));
            }
        }
    }
    Ok(format!(
        "correct: the bytes of every rank in {} layers (P = 2 to 8, H_kv from H down to H/4)",
        BYTES_CASES.len()
    ))
}

/// (P, N, the documents' lengths) of the ring-reach check: one sample, causal, contiguous
/// shares. Each case has at least two documents (a batch of one document per sample is run as
/// the classic ring, every block the whole way round).
const REACH_CASES: [(usize, i64, &[i64]); 6] = [
    (2, 48, &[30, 18]),
    (3, 48, &[5, 19, 24]),
    (4, 48, &[40, 8]),
    (4, 48, &[12, 12, 12, 12]),
    (4, 48, &[5, 19, 24]),
    (6, 48, &[3, 20, 1, 24]),
];

/// Exercise of notebook 03: `f(lengths, n, p)` must give, for a packed causal sequence of
/// documents of `lengths` tokens on a ring of `p` ranks with contiguous shares of `n / p`, each
/// block's *reach*: how many ring steps rank j's K/V block travels, which is how far the
/// furthest rank that attends to one of its keys lies ahead of j (0: no other rank attends to
/// it). The reference is what the library sends: [`RingAttention`](crate::attention::RingAttention)
/// runs its forward on P thread ranks over the packed sequence, and every rank's K/V bytes
/// passed on and received are compared with what your reach implies.
pub fn check_ring_reach<F>(f: F) -> Result<String>
where
    F: Fn(&[i64], i64, usize) -> Vec<usize>,
{
    use crate::attention::{Documents, Mask, RingAttention};
    const OP: &str = "check_ring_reach";
    let (heads, d) = (2i64, 4i64);
    for (p, n, lengths) in REACH_CASES {
        let reach = f(lengths, n, p);
        let case = format!("documents {lengths:?}, N={n}, P={p}");
        if reach.len() != p || reach.iter().any(|&t| t >= p) {
            return Err(mismatch(
                OP,
                format!("{case}: your reach {reach:?} should hold P = {p} numbers from 0 to {}", p - 1),
            ));
        }
        let docs = Documents::from_lengths(n, &[lengths.to_vec()])?;
        let counted = launch(p, |ctx| -> Result<(u64, u64)> {
            let g = ctx.world();
            let ring = RingAttention::new(g.clone(), Mask::Causal, n, heads, heads, false)?;
            let s = ring.layout().len(ctx.rank());
            let x = |shift: f64| {
                (Tensor::arange(s * heads * d, (Kind::Float, Device::Cpu)) * 0.1 + shift + ctx.rank() as f64)
                    .sin()
                    .reshape([1, s, heads, d])
            };
            let _ = ring.forward_lse_docs(&x(0.0), &x(1.0), &x(2.0), Some(&docs))?;
            let shifts = g.stats().op(OpKind::Shift);
            Ok((shifts.bytes_sent, shifts.bytes_received))
        })?;
        // K and V, [1, N/P, H, d] in f32, per block passed on.
        let block = 2 * (n / p as i64 * heads * d * 4) as u64;
        for (r, (sent, received)) in counted.into_iter().enumerate() {
            // At step t rank r holds block (r - t) mod P and passes it on if it has further to go.
            let src = |t: usize| (r + p - t) % p;
            let passes: u64 = (0..p).filter(|&t| t < reach[src(t)]).count() as u64;
            let receives: u64 = (0..p - 1).filter(|&t| t < reach[src(t + 1)]).count() as u64;
            if (passes * block, receives * block) != (sent, received) {
                return Err(mismatch(
                    OP,
                    format!(
                        "{case}: your reach {reach:?} has rank {r} pass on {passes} and receive {receives} \
                         blocks; it passed on {} and received {} ({} B a block, K and V)",
                        sent / block,
                        received / block,
                        block
                    ),
                ));
            }
        }
    }
    Ok(format!(
        "correct: every rank's K/V bytes in {} packed rings (P = 2 to 6, documents crossing shares or not)",
        REACH_CASES.len()
    ))
}

/// Exercise of notebook 04: `f(matmul_params, layers, h, n, b, causal)` must give the model
/// FLOPs of one training step (forward and backward) of a GPT with `matmul_params` parameters
/// in its matrix products, `layers` layers of width `h`, over `b` sequences of `n` tokens with
/// a causal mask or none. The reference is the library's count,
/// [`GptConfig::train_flops`](crate::model::GptConfig::train_flops), on five models from 2
/// layers to 32. Both sum a few products exactly representable below 2^53, so they must agree
/// to a relative 1e-12 (rounding of the last additions only).
pub fn check_step_flops<F>(f: F) -> Result<String>
where
    F: Fn(u64, u64, u64, u64, u64, bool) -> f64,
{
    use crate::attention::Mask;
    use crate::model::GptConfig;
    const OP: &str = "check_step_flops";
    let models = [
        ("tiny", GptConfig::tiny()),
        ("llama-tiny", GptConfig::llama_tiny()),
        ("125M", GptConfig::gpt_125m()),
        ("1.3B", GptConfig::gpt_1_3b()),
        ("6.7B", GptConfig::gpt_6_7b()),
    ];
    let mut cases = 0;
    for (name, cfg) in &models {
        for (n, b) in [(1024i64, 4i64), (2048, 1), (131072, 2)] {
            for causal in [true, false] {
                let mask = if causal { Mask::Causal } else { Mask::None };
                let want = cfg.train_flops(b * n, n, &mask);
                let yours = f(
                    cfg.matmul_params() as u64,
                    cfg.n_layer as u64,
                    cfg.n_embd as u64,
                    n as u64,
                    b as u64,
                    causal,
                );
                // NaN fails too.
                let close = (yours - want).abs() <= 1e-12 * want;
                if !close {
                    return Err(mismatch(
                        OP,
                        format!(
                            "the {name} GPT ({} matmul parameters, {} layers, h = {}), {b} x {n} tokens, \
                             {}: your count is {yours:.6e}, the library's {want:.6e} ({:+.3}%)",
                            cfg.matmul_params(),
                            cfg.n_layer,
                            cfg.n_embd,
                            if causal { "causal" } else { "no mask" },
                            100.0 * (yours / want - 1.0)
                        ),
                    ));
                }
                cases += 1;
            }
        }
    }
    Ok(format!("correct: {cases} cases, 5 models, 1K to 128K tokens, causal and unmasked"))
}

/// Exercise of notebook 05: `f(psi, w, stage, mixed)` must give the model-state bytes one rank
/// holds (parameters, gradients, Adam's states) for `psi` parameters trained on `w` ranks
/// under ZeRO stage `stage` (0 to 3), in f32 (`mixed` false) or bf16 mixed precision with f32
/// master weights. The reference is the cost model's
/// [`model_states`](crate::cost::zero::model_states) (checked against the allocator in the
/// library's tests) for GPTs whose parameters the library counts. That count pads each
/// partition to a multiple of W (stage 3: each of the L + 1 units), so a formula with `psi / w`
/// may differ by up to 16 bytes x units x (W - 1) / W: the bound allowed.
pub fn check_zero_states<F>(f: F) -> Result<String>
where
    F: Fn(u64, u64, u8, bool) -> f64,
{
    use crate::attention::StrategyConfig;
    use crate::cost::zero::{model_states, params_on_rank};
    use crate::cost::Job;
    use crate::model::GptConfig;
    use crate::train::{Precision, ZeroStage};
    const OP: &str = "check_zero_states";
    let mut cases = 0;
    for cfg in [GptConfig::tiny(), GptConfig::gpt_125m(), GptConfig::gpt_1_3b()] {
        for w in [1usize, 2, 4, 8] {
            for stage in 0..=3u8 {
                for mixed in [false, true] {
                    let precision = if mixed { Precision::Bf16 } else { Precision::F32 };
                    let zero = ZeroStage::new(stage)?;
                    let job =
                        Job { precision, zero, ..Job::new(cfg.clone(), StrategyConfig::Ulysses, w, 1024) };
                    let params = params_on_rank(&job);
                    let (p, g, o) = model_states(&job, &params);
                    let want = p + g + o;
                    let psi = params.replicated as u64;
                    let units = if stage >= 3 { params.blocks.len() as f64 } else { 1.0 };
                    let bound = 16.0 * units * (w as f64 - 1.0) / w as f64;
                    let yours = f(psi, w as u64, stage, mixed);
                    let close = (yours - want).abs() <= bound; // NaN fails too
                    if !close {
                        return Err(mismatch(
                            OP,
                            format!(
                                "{psi} parameters on W = {w}, ZeRO-{stage}, {}: your formula gives {yours:.0} B, \
                                 the library holds {want:.0} B ({p:.0} parameters + {g:.0} gradients + {o:.0} \
                                 optimizer; padding allows {bound:.0} B)",
                                if mixed { "bf16 mixed precision" } else { "f32" }
                            ),
                        ));
                    }
                    cases += 1;
                }
            }
        }
    }
    Ok(format!("correct: {cases} cases, 3 models, W = 1 to 8, stages 0 to 3, f32 and mixed precision"))
}

/// (P, bytes per element, FLOP/s, bytes/s) of the hiding-length check: attention at half the
/// bf16 peak of an A100 and an H100, the all-to-all at 80% of NVLink (A100 300 GB/s, H100 450
/// GB/s) and of a 400 Gb/s InfiniBand port (50 GB/s); f32 once.
const HIDING_CASES: [(u64, u64, f64, f64); 6] = [
    (2, 2, 156e12, 240e9),
    (8, 2, 156e12, 240e9),
    (8, 4, 156e12, 240e9),
    (4, 2, 494.5e12, 360e9),
    (8, 2, 494.5e12, 360e9),
    (64, 2, 494.5e12, 40e9),
];

/// Exercise of notebook 06: `f(p, es, flops, bandwidth)` must give the sequence length N at
/// which one Ulysses attention layer's forward attention (causal, on the rank's H/P heads, at
/// `flops` FLOP/s) takes as long as its forward all-to-alls (q, k, v and the output, MHA, `es`
/// bytes an element, at `bandwidth` bytes/s per rank): beyond it the all-to-alls can hide behind
/// attention. The reference finds that length by bisection on the library's own counts: the
/// all-to-alls' bytes per rank from [`closed_form`](crate::cost::bytes::closed_form) (which the
/// tests check against the counters) and attention's forward FLOPs from
/// [`GptConfig::train_flops`](crate::model::GptConfig::train_flops) (a third of its attention
/// term), for h = 4096. The answer must be within 1%: the closed form without the diagonal's
/// `+1` (N² / 2 pairs for N (N + 1) / 2) differs by 1 / N, under 0.1% for these lengths.
pub fn check_hiding_length<F>(f: F) -> Result<String>
where
    F: Fn(u64, u64, f64, f64) -> f64,
{
    use crate::attention::{Mask, StrategyConfig};
    use crate::cost::bytes::closed_form;
    use crate::model::GptConfig;
    const OP: &str = "check_hiding_length";
    let cfg = GptConfig { n_layer: 1, n_head: 64, n_kv_head: 64, n_embd: 4096, ..GptConfig::tiny() };
    let h = cfg.n_embd;
    for (p, es, flops, bandwidth) in HIDING_CASES {
        // Attention's forward time on one rank, and the all-to-alls', at length n.
        let attention = |n: i64| {
            let total = cfg.train_flops(n, n, &Mask::Causal) - 6.0 * cfg.matmul_params() as f64 * n as f64;
            total / 3.0 / p as f64 / flops
        };
        let a2a = |n: i64| {
            closed_form(StrategyConfig::Ulysses, n, h, h, p as usize, es as i64)
                .map_or(f64::NAN, |(fwd, _)| fwd)
                / bandwidth
        };
        // The smallest n (a multiple of P) where attention takes at least as long: attention
        // grows as n^2, the all-to-alls as n, so the sign changes once.
        let (mut lo, mut hi) = (1i64, 1i64 << 22); // up to 4M x P tokens, far past every case
        if attention(hi * p as i64) < a2a(hi * p as i64) {
            return Err(mismatch(
                OP,
                format!("P = {p}: attention never catches up below {} tokens", hi * p as i64),
            ));
        }
        while hi - lo > 1 {
            let mid = (lo + hi) / 2;
            if attention(mid * p as i64) >= a2a(mid * p as i64) {
                hi = mid;
            } else {
                lo = mid;
            }
        }
        let want = (hi * p as i64) as f64;
        let yours = f(p, es, flops, bandwidth);
        let close = ((yours - want) / want).abs() <= 0.01; // NaN fails too
        if !close {
            return Err(mismatch(
                OP,
                format!(
                    "P = {p}, {es}-byte elements, {:.0} TFLOP/s, {:.0} GB/s: your length is {yours:.0}, \
                     attention catches up with the all-to-alls at N = {want:.0} ({:+.1}%)",
                    flops / 1e12,
                    bandwidth / 1e9,
                    100.0 * (yours / want - 1.0)
                ),
            ));
        }
    }
    Ok(format!(
        "correct: {} cases, NVLink and InfiniBand, P = 2 to 64, from a few thousand tokens to tens of thousands",
        HIDING_CASES.len()
    ))
}

/// (P, N, H) of the Megatron-SP bytes check: a GPT with two layers of width 48 (H heads of
/// 48/H), P dividing N and H.
const MEGATRON_CASES: [(usize, i64, i64); 4] = [(2, 16, 4), (3, 24, 6), (4, 32, 4), (4, 48, 8)];

/// Exercise of notebook 07: `f(n, h, p)` must give the bytes one rank sends, per layer, in the
/// all-gathers and reduce-scatters of Megatron-style sequence parallelism, (forward, backward),
/// for one sequence of `n` tokens of width `h` in f32 on `p` ranks. The reference is what the
/// library counts: a two-layer GPT with Megatron-SP runs a forward and a backward on P thread
/// ranks, and every rank's all-gather and reduce-scatter bytes (the collectives that move
/// activations; the all-reduce of the replicated norms' gradients is left out) are compared,
/// per layer, in each phase.
pub fn check_megatron_sp_bytes<F>(f: F) -> Result<String>
where
    F: Fn(u64, u64, u64) -> (u64, u64),
{
    use crate::attention::StrategyConfig;
    use crate::model::{shift_labels, Gpt, GptConfig};
    const OP: &str = "check_megatron_sp_bytes";
    let layers = 2i64;
    for (p, n, heads) in MEGATRON_CASES {
        let cfg =
            GptConfig { n_layer: layers, n_head: heads, n_kv_head: heads, n_embd: 48, ..GptConfig::tiny() };
        let yours = f(n as u64, cfg.n_embd as u64, p as u64);
        let counted = launch(p, |ctx| -> Result<(u64, u64)> {
            let g = ctx.world();
            let strategy =
                StrategyConfig::MegatronSp.build(g, AttentionConfig::default(), n, heads, heads)?;
            let layout = strategy.layout().clone();
            let model = Gpt::new(&cfg, strategy, Kind::Float, Device::Cpu)?;
            let toks = (Tensor::arange(n, (Kind::Int64, Device::Cpu)) * 7 + 3)
                .remainder(cfg.vocab_size)
                .reshape([1, n]);
            let labels = shift_labels(&toks)?;
            let (t, l) = (layout.shard(&toks, 1, ctx.rank())?, layout.shard(&labels, 1, ctx.rank())?);
            let moved = |g: &Group| {
                let s = g.stats();
                s.op(OpKind::AllGather).bytes_sent + s.op(OpKind::ReduceScatter).bytes_sent
            };
            g.reset_rank_stats();
            let tape = Tape::new();
            let loss = model.loss(&tape, &t, &l)?;
            let forward = moved(g);
            model.backward(&tape, &loss)?;
            Ok((forward, moved(g) - forward))
        })?;
        for (r, (forward, backward)) in counted.into_iter().enumerate() {
            let want = (forward / layers as u64, backward / layers as u64);
            if yours != want {
                return Err(mismatch(
                    OP,
                    format!(
                        "P = {p}, N = {n}, h = {}: your bytes per layer are {} B forward and {} B backward; \
                         rank {r} sent {} B and {} B",
                        cfg.n_embd, yours.0, yours.1, want.0, want.1
                    ),
                ));
            }
        }
    }
    Ok(format!("correct: every rank of {} two-layer GPTs, P = 2 to 4", MEGATRON_CASES.len()))
}

/// (model, P, N, bf16) of the checkpoint check: Llama-3-8B, the 1.3B GPT and a one-layer model.
const CHECKPOINT_CASES: [(&str, usize, i64, bool); 6] = [
    ("llama3-8b", 8, 1 << 20, true),
    ("llama3-8b", 32, 1 << 22, true),
    ("gpt-1.3b", 4, 65536, true),
    ("gpt-1.3b", 1, 8192, false),
    ("one-layer", 2, 4096, false),
    ("one-layer", 4, 16384, true),
];

/// Exercise of notebook 08: `f(layers, n, p, h, es, offload)` must give the bytes of the block
/// inputs one rank holds on its device under full activation checkpointing (what full
/// checkpointing keeps of each block between the forward and the backward), for one sequence of
/// `n` tokens split over `p` sequence-parallel ranks, `es` bytes an element; with `offload`,
/// the inputs wait in host memory and the device holds the one in use and the one coming. The
/// reference is the cost model's term for them ([`memory`](crate::cost::memory::memory)), which
/// tests/cost_memory.rs checks against the allocator; both are a product of small integers, so
/// they must agree exactly.
pub fn check_checkpoint_bytes<F>(f: F) -> Result<String>
where
    F: Fn(u64, u64, u64, u64, u64, bool) -> f64,
{
    use crate::attention::StrategyConfig;
    use crate::cost::{memory::memory, Hardware, Job};
    use crate::model::GptConfig;
    use crate::train::{Checkpointing, Precision};
    const OP: &str = "check_checkpoint_bytes";
    let hw = Hardware::load("dgx-h100")?;
    for (name, p, n, bf16) in CHECKPOINT_CASES {
        let model = match name {
            "llama3-8b" => GptConfig::llama3_8b(),
            "gpt-1.3b" => GptConfig::gpt_1_3b(),
            _ => GptConfig { n_layer: 1, ..GptConfig::gpt_1_3b() },
        };
        for offload in [false, true] {
            let job = Job {
                precision: if bf16 { Precision::Bf16 } else { Precision::F32 },
                checkpointing: Checkpointing::Full,
                offload,
                ..Job::new(model.clone(), StrategyConfig::Ulysses, p, n)
            };
            let want: f64 = memory(&job, 0, &hw)?
                .activations
                .iter()
                .filter(|t| t.name.starts_with("block inputs"))
                .map(|t| t.bytes)
                .sum();
            let es = job.element_bytes() as u64;
            let yours = f(model.n_layer as u64, n as u64, p as u64, model.n_embd as u64, es, offload);
            if yours != want {
                return Err(mismatch(
                    OP,
                    format!(
                        "{name} (L = {}, h = {}), N = {n} on P = {p}, {es}-byte elements, offload {offload}: \
                         your bytes are {yours:.0} ({:.3} GiB), the cost model's {want:.0} ({:.3} GiB)",
                        model.n_layer,
                        model.n_embd,
                        yours / (1u64 << 30) as f64,
                        want / (1u64 << 30) as f64
                    ),
                ));
            }
        }
    }
    Ok(format!(
        "correct: {} jobs with and without offload, one to 32 layers, P = 1 to 32, f32 and bf16",
        CHECKPOINT_CASES.len()
    ))
}

/// A link as the all-to-all exercise sees it: the bandwidth one rank's bytes get on it (the
/// link's per-device bandwidth times the efficiency an all-to-all reaches), and the latency of
/// one algorithm step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LinkSpeed {
    pub bytes_per_s: f64,
    pub latency_s: f64,
}

impl LinkSpeed {
    /// `link` of `hw` as an all-to-all sees it, at the hardware's band.
    pub fn all_to_all(hw: &crate::cost::Hardware, link: &crate::cost::hardware::Link) -> Result<LinkSpeed> {
        Ok(LinkSpeed {
            bytes_per_s: link.bandwidth_gbs * 1e9 * hw.link_efficiency(link, OpKind::AllToAll)?,
            latency_s: hw.link_latency_s(link),
        })
    }
}

/// (preset, P, stride) of the all-to-all check: groups inside a node, contiguous groups over
/// several nodes, and groups whose stride spreads them (a data-parallel group strides the
/// sequence-parallel degree).
const A2A_CASES: [(&str, u64, u64); 10] = [
    ("dgx-a100-40gb", 4, 1),
    ("dgx-a100-40gb", 8, 1),
    ("dgx-a100-40gb", 16, 1),
    ("dgx-a100-40gb", 32, 1),
    ("dgx-a100-40gb", 4, 2),
    ("dgx-a100-40gb", 4, 4),
    ("dgx-a100-40gb", 8, 8),
    ("dgx-h100", 2, 1),
    ("dgx-h100", 64, 1),
    ("dgx-h100", 16, 4),
];

/// Exercise of notebook 09: `f(sent, p, stride, devices_per_node, intra, inter)` must give the
/// seconds of one all-to-all in which each of `p` ranks sends `sent` bytes (its (P-1)/P share of
/// the tensor) to the others, for a group whose members are `stride` ranks apart, ranks filling
/// nodes of `devices_per_node` in order. Inside a node the bytes go over `intra`; a group that
/// spans nodes sends each peer's share over the link that reaches it, both links at once, with
/// P-1 latency steps of the slower (inter-node) link. The reference is the cost model's
/// [`price`](crate::cost::network::price) on the NCCL networks of the DGX presets; both do the
/// same few operations in f64, so they must agree to a relative 1e-9.
pub fn check_a2a_time<F>(f: F) -> Result<String>
where
    F: Fn(f64, u64, u64, u64, LinkSpeed, LinkSpeed) -> f64,
{
    use crate::cost::network::{price, Placement};
    use crate::cost::Hardware;
    const OP: &str = "check_a2a_time";
    let tensor = 64.0 * (1u64 << 20) as f64; // 64 MiB a rank before the all-to-all
    for (preset, p, stride) in A2A_CASES {
        let hw = Hardware::load(preset)?;
        let net = hw.network("nccl")?;
        let inter_link =
            net.inter.as_ref().ok_or_else(|| mismatch(OP, format!("{preset} has no inter-node link")))?;
        let (intra, inter) =
            (LinkSpeed::all_to_all(&hw, &net.intra)?, LinkSpeed::all_to_all(&hw, inter_link)?);
        let dpn = hw.node.devices_per_node as u64;
        let sent = tensor * (p - 1) as f64 / p as f64;
        let at = Placement::new(p as usize, stride as usize, dpn as usize);
        let (want, _) = price(&hw, "nccl", OpKind::AllToAll, at, 1, sent)?;
        let yours = f(sent, p, stride, dpn, intra, inter);
        let close = ((yours - want) / want).abs() <= 1e-9; // NaN fails too
        if !close {
            return Err(mismatch(
                OP,
                format!(
                    "{preset} ({dpn} GPUs a node), P = {p}, stride {stride} ({} of the group on a node): \
                     your time is {:.3} ms, the cost model's {:.3} ms ({:+.1}%)",
                    at.per_node,
                    yours * 1e3,
                    want * 1e3,
                    100.0 * (yours / want - 1.0)
                ),
            ));
        }
    }
    Ok(format!(
        "correct: {} groups on A100 and H100 nodes, inside a node, over up to 8 nodes, and strided",
        A2A_CASES.len()
    ))
}
