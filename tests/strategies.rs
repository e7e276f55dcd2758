//! The baselines behind the same trait as Ulysses, under the same parity suite: ring attention
//! (contiguous and zigzag), all-gather KV, Ulysses x ring, and (at the model level)
//! Megatron-SP. Outputs and gradients against single-device attention, bytes against each
//! strategy's formula, zigzag's balance, the fp32 merge.

mod common;

use anyhow::{ensure, Result};
use common::{det, max_diff, reference_attention};
use tch::{Device, Kind, Tensor};
use ulysses::attention::{
    AttentionConfig, BlockSparse, Kernel, Mask, RingAttention, SequenceParallel, StrategyConfig, Work,
};
use ulysses::autograd::Tape;
use ulysses::comm::launch;
use ulysses::cost::{bytes, Job};
use ulysses::model::GptConfig;
use ulysses::train::Precision;

/// Runs `strategy` on `p` ranks for `[b, n, heads, d]` inputs and returns the largest relative
/// difference from the reference over out, dq, dk, dv.
fn parity(
    strategy: StrategyConfig,
    p: usize,
    n: i64,
    (heads, kv_heads): (i64, i64),
    mask: Mask,
    kind: Kind,
) -> Result<f64> {
    let (b, d) = (2, 4);
    let global = || {
        (
            det(&[b, n, heads, d], 21, kind),
            det(&[b, n, kv_heads, d], 22, kind),
            det(&[b, n, kv_heads, d], 23, kind),
            det(&[b, n, heads, d], 24, kind),
        )
    };
    let (q, k, v, w) = global();
    let pos = Tensor::arange(n, (Kind::Int64, Device::Cpu));
    let want = reference_attention(&mask.dense(&pos, &pos)?, &q, &k, &v, &w);
    let attention = AttentionConfig::new(Kernel::Math, mask);
    let per_rank = launch(p, |ctx| -> Result<[Tensor; 4]> {
        let r = ctx.rank();
        let s = strategy.build(ctx.world(), attention, n, heads, kv_heads)?;
        let (q, k, v, w) = global();
        let layout = s.layout().clone();
        let mine =
            |t: &Tensor| -> Result<Tensor> { Ok(layout.shard(t, 1, r)?.copy().set_requires_grad(true)) };
        let (q, k, v) = (mine(&q)?, mine(&k)?, mine(&v)?);
        let tape = Tape::new();
        let o = s.forward(&tape, &q, &k, &v)?;
        tape.backward(&(&o * layout.shard(&w, 1, r)?).sum(o.kind()))?;
        Ok([o.detach(), q.grad(), k.grad(), v.grad()])
    })?;
    let layout = strategy.build_layout(n, p)?;
    let mut worst = 0.0f64;
    for (i, want) in want.iter().enumerate() {
        let parts: Vec<Tensor> = per_rank.iter().map(|t| t[i].shallow_clone()).collect();
        let got = layout.unshard(&parts, 1)?;
        ensure!(got.size() == want.size(), "{strategy:?}: shape {:?} vs {:?}", got.size(), want.size());
        let scale = want.abs().max().double_value(&[]).max(1e-3);
        worst = worst.max(max_diff(&got, want) / scale);
    }
    Ok(worst)
}

/// The layout a strategy uses, built without a group (for reassembling the ranks' outputs).
trait LayoutOf {
    fn build_layout(&self, n: i64, p: usize) -> ulysses::Result<ulysses::attention::SeqLayout>;
}

impl LayoutOf for StrategyConfig {
    fn build_layout(&self, n: i64, p: usize) -> ulysses::Result<ulysses::attention::SeqLayout> {
        use ulysses::attention::SeqLayout;
        match *self {
            StrategyConfig::Ring { zigzag: true } | StrategyConfig::AllGatherKv { zigzag: true } => {
                SeqLayout::zigzag(n, p)
            }
            StrategyConfig::Usp { ulysses, zigzag } => SeqLayout::nested(n, p / ulysses, ulysses, zigzag),
            _ => SeqLayout::contiguous(n, p),
        }
    }
}

fn strategies_for(p: usize) -> Vec<StrategyConfig> {
    let mut v = vec![
        StrategyConfig::Ulysses,
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
    v
}

#[test]
fn every_strategy_matches_one_device() -> Result<()> {
    // N = 48 splits into 2P chunks for every P here; heads 8 with MHA, GQA and MQA.
    for p in [1usize, 2, 3, 4, 8] {
        for strategy in strategies_for(p) {
            for heads in [(8, 8), (8, 2), (8, 1)] {
                for mask in [Mask::Causal, Mask::None] {
                    let diff = parity(strategy, p, 48, heads, mask, Kind::Double)?;
                    ensure!(
                        diff < 1e-10,
                        "{strategy:?} P={p} heads {heads:?} {mask:?}: max relative diff {diff:.3e}"
                    );
                }
            }
        }
    }
    Ok(())
}

#[test]
fn ring_strategies_follow_every_mask() -> Result<()> {
    let sparse = Mask::BlockSparse(BlockSparse { block: 4, local_blocks: 2, global_blocks: 1, causal: true });
    for p in [2usize, 4] {
        for strategy in [
            StrategyConfig::Ring { zigzag: true },
            StrategyConfig::AllGatherKv { zigzag: false },
            StrategyConfig::Usp { ulysses: 2, zigzag: true },
        ] {
            for mask in [Mask::SlidingWindow { window: 7 }, sparse] {
                let diff = parity(strategy, p, 32, (4, 2), mask, Kind::Double)?;
                ensure!(diff < 1e-10, "{strategy:?} P={p} {mask:?}: max relative diff {diff:.3e}");
            }
        }
    }
    Ok(())
}

#[test]
fn f32_and_bf16_with_an_fp32_merge() -> Result<()> {
    for strategy in strategies_for(4) {
        let diff = parity(strategy, 4, 64, (8, 4), Mask::Causal, Kind::Float)?;
        ensure!(diff < 1e-5, "{strategy:?} f32: {diff:.3e}");
        let diff = parity(strategy, 4, 64, (8, 4), Mask::Causal, Kind::BFloat16)?;
        ensure!(diff < 2e-2, "{strategy:?} bf16: {diff:.3e}");
    }
    // Ring in bf16: the merge is in f32, so more ranks (more merges) do not add error.
    let ring = StrategyConfig::Ring { zigzag: false };
    let (e2, e8) = (
        parity(ring, 2, 64, (8, 8), Mask::Causal, Kind::BFloat16)?,
        parity(ring, 8, 64, (8, 8), Mask::Causal, Kind::BFloat16)?,
    );
    ensure!(e8 <= e2 * 1.1, "ring bf16 error grows with the ring: P=2 {e2:.3e}, P=8 {e8:.3e}");
    Ok(())
}

#[test]
fn zigzag_balances_causal_work() -> Result<()> {
    for p in [4usize, 8] {
        for zigzag in [false, true] {
            let work = launch(p, |ctx| -> Result<Work> {
                let ring = RingAttention::new(ctx.world().clone(), Mask::Causal, 128, 2, 2, zigzag)?;
                let s = ring.layout().len(ctx.rank());
                let x = det(&[1, s, 2, 4], 1, Kind::Float);
                let _ = ring.forward(&Tape::disabled(), &x, &x, &x)?;
                Ok(ring.last_forward_work())
            })?;
            let visible: Vec<f64> = work.iter().map(|w| w.visible as f64).collect();
            let computed: Vec<f64> = work.iter().map(|w| w.computed as f64).collect();
            let spread = |v: &[f64]| {
                v.iter().cloned().fold(f64::MIN, f64::max) / v.iter().cloned().fold(f64::MAX, f64::min)
            };
            if zigzag {
                ensure!(spread(&visible) <= 1.1, "zigzag P={p}: visible pairs per rank {visible:?}");
                ensure!(spread(&computed) <= 1.1, "zigzag P={p}: computed elements per rank {computed:?}");
            } else {
                // Rank 0 sees half a block, rank P-1 P-1 blocks and a half: 2P-1 times as much.
                let ratio = visible[p - 1] / visible[0];
                let want = (2 * p - 1) as f64;
                ensure!(
                    (ratio - want).abs() < 0.1 * want,
                    "contiguous P={p}: last/first {ratio:.2}, expected about {want}"
                );
            }
        }
    }
    Ok(())
}

/// Bytes rank r sends in one attention layer, forward and backward, read from the counters.
fn layer_bytes(
    strategy: StrategyConfig,
    p: usize,
    n: i64,
    heads: (i64, i64),
    kind: Kind,
) -> Result<Vec<(u64, u64)>> {
    let attention = AttentionConfig::new(Kernel::Math, Mask::Causal);
    let sent = launch(p, |ctx| -> Result<(u64, u64)> {
        let s = strategy.build(ctx.world(), attention, n, heads.0, heads.1)?;
        let len = s.layout().len(ctx.rank());
        let q = det(&[2, len, heads.0, 4], 1, kind).set_requires_grad(true);
        let kv = det(&[2, len, heads.1, 4], 2, kind).set_requires_grad(true);
        let tape = Tape::new();
        let o = s.forward(&tape, &q, &kv, &kv)?;
        // Every group the strategy uses (USP works on subgroups of the world).
        let forward = ctx.world().rank_stats().bytes_sent();
        tape.backward(&o.sum(Kind::Float))?;
        Ok((forward, ctx.world().rank_stats().bytes_sent() - forward))
    })?;
    Ok(sent)
}

#[test]
fn bytes_follow_each_strategys_formula() -> Result<()> {
    // The library's byte formulas (`cost::bytes`, what the cost model prices) against the
    // counters, and, for even shares, against DESIGN.md §2.2's closed forms.
    let (b, d) = (2i64, 4i64);
    for p in [2usize, 4, 8] {
        let (n, hq, hkv) = (64i64, 8i64, 4i64);
        for kind in [Kind::Float, Kind::BFloat16] {
            let es = kind.elt_size_in_bytes() as i64;
            let mut strategies =
                vec![StrategyConfig::Ring { zigzag: true }, StrategyConfig::AllGatherKv { zigzag: false }];
            if p > 2 {
                strategies.push(StrategyConfig::Usp { ulysses: 2, zigzag: true });
            }
            for strategy in strategies {
                let model = GptConfig { n_head: hq, n_kv_head: hkv, n_embd: hq * d, ..GptConfig::tiny() };
                let precision = if kind == Kind::Float { Precision::F32 } else { Precision::Bf16 };
                let job = Job { micro_batch: b, precision, ..Job::new(model, strategy, p, n) };
                for (r, (fwd, bwd)) in layer_bytes(strategy, p, n, (hq, hkv), kind)?.iter().enumerate() {
                    let want = bytes::layer_bytes(&job, r)?;
                    ensure!(
                        (*fwd, *bwd) == want,
                        "{} P={p} {kind:?} rank {r}: counted {fwd} {bwd}, library {want:?}",
                        strategy.label()
                    );
                    if let Some((f, w)) = bytes::closed_form(strategy, n, hq * d, hkv * d, p, es) {
                        let (f, w) = ((f * b as f64) as u64, (w * b as f64) as u64);
                        ensure!((*fwd, *bwd) == (f, w), "{} P={p}: closed form {f} {w}", strategy.label());
                    }
                }
            }
        }
    }
    Ok(())
}

#[test]
fn strategies_parse_from_text_and_refuse_what_they_cannot_do() -> Result<()> {
    let parsed: StrategyConfig = "usp_zigzag:4".parse().map_err(anyhow::Error::msg)?;
    ensure!(parsed == StrategyConfig::Usp { ulysses: 4, zigzag: true }, "{parsed:?}");
    ensure!(
        "ring_zigzag".parse::<StrategyConfig>() == Ok(StrategyConfig::Ring { zigzag: true }),
        "ring_zigzag"
    );
    ensure!("tree".parse::<StrategyConfig>().unwrap_err().contains("unknown strategy"), "tree");
    let errs = launch(4, |ctx| -> Result<Vec<String>> {
        let a = AttentionConfig::default();
        let w = ctx.world();
        let e = |r: ulysses::Result<Box<dyn SequenceParallel>>| {
            r.err().map(|e| e.to_string()).unwrap_or_default()
        };
        Ok(vec![
            e(StrategyConfig::Ring { zigzag: true }.build(w, a, 20, 4, 4)),
            e(StrategyConfig::Ring { zigzag: false }.build(w, a, 18, 4, 4)),
            e(StrategyConfig::MegatronSp.build(w, a, 16, 6, 6)),
            e(StrategyConfig::Usp { ulysses: 3, zigzag: false }.build(w, a, 24, 4, 4)),
            e(StrategyConfig::Single.build(w, a, 24, 4, 4)),
        ])
    })?;
    let want = [
        "zigzag needs N divisible by 2P: N=20, 2P=8",
        "ring attention needs N divisible by P (N=18, P=4)",
        "needs H=6 and H_kv=6 divisible by P",
        "the Ulysses degree 3 must divide P=4",
        "the single-device strategy runs on 1 rank, not 4",
    ];
    for (got, want) in errs[0].iter().zip(want) {
        ensure!(got.contains(want), "{got:?} lacks {want:?}");
    }
    Ok(())
}
