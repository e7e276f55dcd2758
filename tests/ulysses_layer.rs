//! Ulysses attention against single-device attention: output, dq, dk, dv and lse, for
//! P in {1, 2, 3, 4, 8}, causal and not, MHA / GQA / MQA, uneven heads, N not divisible by P,
//! b in {1, 2}, every kernel and mask, f64 / f32 / bf16.

mod common;

use anyhow::{ensure, Result};
use common::det;
use common::parity::{check, Spec};
use tch::Kind;
use ulysses::attention::{
    AttentionConfig, BlockSparse, Kernel, Mask, SequenceParallel, StrategyConfig, UlyssesAttention,
};
use ulysses::autograd::Tape;
use ulysses::comm::launch;
use ulysses::cost::{bytes, Job};
use ulysses::model::GptConfig;
use ulysses::train::Precision;

#[derive(Debug, Clone, Copy)]
struct Case {
    p: usize,
    b: i64,
    n: i64,
    heads: i64,
    kv_heads: i64,
    d: i64,
    kind: Kind,
    attention: AttentionConfig,
}

/// Output, dq, dk, dv and the log-sum-exp against single-device f64 attention, element by
/// element within the dtype's tolerance (tests/common/parity.rs).
fn run(c: Case) -> Result<()> {
    let spec = Spec { b: c.b, d: c.d, kind: c.kind, ..Spec::new(c.n, c.heads, c.kv_heads) };
    check(StrategyConfig::Ulysses, c.attention.kernel, c.p, &spec, c.attention.mask)
}

fn case(
    p: usize,
    b: i64,
    n: i64,
    (heads, kv_heads): (i64, i64),
    kind: Kind,
    kernel: Kernel,
    mask: Mask,
) -> Case {
    Case { p, b, n, heads, kv_heads, d: 4, kind, attention: AttentionConfig::new(kernel, mask) }
}

#[test]
fn uneven_shares_follow_the_layout() -> Result<()> {
    // N = 19 on 4 ranks: the first N % P ranks hold one token more.
    let lens = launch(4, |ctx| -> Result<Vec<i64>> {
        let attn = UlyssesAttention::new(ctx.world().clone(), AttentionConfig::default().build()?, 19, 8, 8)?;
        Ok(attn.layout().lens().to_vec())
    })?;
    ensure!(lens.iter().all(|l| l == &[5, 5, 5, 4]), "{lens:?}");
    Ok(())
}

#[test]
fn mha_gqa_mqa_causal_and_not_at_every_world_size() -> Result<()> {
    for p in [1usize, 2, 3, 4, 8] {
        for (heads, kv_heads) in [(8, 8), (8, 2), (8, 1), (16, 4)] {
            for mask in [Mask::Causal, Mask::None] {
                for b in [1, 2] {
                    // N = 24 divides every P; N = 19 divides none but 1.
                    for n in [24, 19] {
                        run(case(p, b, n, (heads, kv_heads), Kind::Double, Kernel::Math, mask))?;
                    }
                }
            }
        }
    }
    Ok(())
}

#[test]
fn uneven_heads_and_uneven_gqa_groups() -> Result<()> {
    // H % P != 0: 6 heads on 4 ranks, 12 heads (4 kv) on 8 ranks, 5 heads on 3 ranks.
    for (p, heads, kv_heads) in [(4usize, 6, 6), (4, 6, 3), (8, 12, 4), (8, 12, 1), (3, 5, 5), (3, 8, 2)] {
        for n in [16, 13] {
            run(case(p, 2, n, (heads, kv_heads), Kind::Double, Kernel::Math, Mask::Causal))?;
        }
    }
    Ok(())
}

#[test]
fn every_kernel_and_mask() -> Result<()> {
    let sparse = Mask::BlockSparse(BlockSparse { block: 4, local_blocks: 2, global_blocks: 1, causal: true });
    let sparse_bi =
        Mask::BlockSparse(BlockSparse { block: 3, local_blocks: 3, global_blocks: 1, causal: false });
    let window = Mask::SlidingWindow { window: 5 };
    for p in [1usize, 2, 4] {
        for (kernel, mask) in [
            (Kernel::Sdpa, Mask::Causal),
            (Kernel::Sdpa, Mask::None),
            (Kernel::Sdpa, window),
            (Kernel::Math, window),
            (Kernel::Math, sparse),
            (Kernel::Blocked, window),
            (Kernel::Blocked, sparse),
            (Kernel::Blocked, sparse_bi),
        ] {
            for n in [32, 30] {
                run(case(p, 2, n, (8, 4), Kind::Double, kernel, mask))?;
            }
        }
    }
    Ok(())
}

#[test]
fn f32_and_bf16() -> Result<()> {
    for p in [1usize, 2, 4, 8] {
        for kind in [Kind::Float, Kind::BFloat16] {
            for kernel in [Kernel::Sdpa, Kernel::Math] {
                run(case(p, 2, 40, (8, 2), kind, kernel, Mask::Causal))?;
            }
        }
    }
    Ok(())
}

#[test]
fn bytes_per_layer_equal_the_formulas() -> Result<()> {
    use ulysses::comm::OpKind;
    // (P, H, H_kv, N): even cases follow docs/design.md §2.2 exactly; the others the general count.
    for (p, heads, kv_heads, n) in
        [(2usize, 8, 8, 32), (4, 8, 4, 32), (8, 16, 8, 64), (4, 8, 1, 32), (3, 7, 7, 20), (4, 12, 2, 30)]
    {
        let (b, d) = (2i64, 4i64);
        let h = heads * d;
        let sent = launch(p, |ctx| -> Result<(u64, u64, (u64, u64))> {
            let g = ctx.world();
            let attn =
                UlyssesAttention::new(g.clone(), AttentionConfig::default().build()?, n, heads, kv_heads)?;
            let s = attn.layout().len(ctx.rank());
            let q = det(&[b, s, heads, d], 1, Kind::Float).set_requires_grad(true);
            let k = det(&[b, s, kv_heads, d], 2, Kind::Float).set_requires_grad(true);
            let v = det(&[b, s, kv_heads, d], 3, Kind::Float).set_requires_grad(true);
            let tape = Tape::new();
            let o = attn.forward(&tape, &q, &k, &v)?;
            let forward = g.stats().op(OpKind::AllToAll);
            tape.backward(&o.sum(Kind::Float))?;
            let both = g.stats().op(OpKind::AllToAll);
            ensure!(forward.calls == 4 && both.calls == 8, "calls {forward:?} {both:?}");
            // The library's formula (what the cost model prices): the chunks each rank sends.
            let model = GptConfig { n_head: heads, n_kv_head: kv_heads, n_embd: h, ..GptConfig::tiny() };
            let job = Job {
                micro_batch: b,
                precision: Precision::F32,
                ..Job::new(model, StrategyConfig::Ulysses, p, n)
            };
            let want = bytes::layer_bytes(&job, ctx.rank())?;
            Ok((forward.bytes_sent, both.bytes_sent, want))
        })?;
        for (r, (fwd, both, (want_fwd, want_bwd))) in sent.iter().enumerate() {
            let label = format!("P={p} H={heads} H_kv={kv_heads} N={n} rank {r}");
            ensure!(fwd == want_fwd, "{label}: forward sent {fwd} B, expected {want_fwd} B");
            ensure!(
                *both == fwd + want_bwd,
                "{label}: forward+backward {both} B, expected {} B",
                fwd + want_bwd
            );
            let pi = p as i64;
            if heads % pi == 0 && kv_heads % pi == 0 && n % pi == 0 {
                // docs/design.md §2.2: (2Nh + 2N H_kv d)(P-1)/P^2 elements per sample.
                let paper = bytes::closed_form(StrategyConfig::Ulysses, n, h, kv_heads * d, p, 4);
                let formula = paper.map_or(0, |(f, _)| (f * b as f64) as u64);
                ensure!(*fwd == formula, "{label}: {fwd} B vs the paper's formula {formula} B");
                ensure!(*both == 2 * formula, "{label}: forward+backward {both} B vs twice the formula");
            }
        }
    }
    Ok(())
}
