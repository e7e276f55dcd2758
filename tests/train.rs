//! The trainer on thread ranks: ZeRO 1-3 against ZeRO 0 and one device, activation
//! checkpointing against none (every strategy), the ZeRO collectives' bytes against their
//! formulas, the tiled loss, clipping, non-finite gradients and f16 loss scaling.

mod common;

use anyhow::{ensure, Result};
use common::max_diff;
use common::training::{self, Run};
use tch::Tensor;
use ulysses::attention::StrategyConfig;
use ulysses::comm::{launch, OpKind};
use ulysses::model::GptConfig;
use ulysses::train::{Checkpointing, Precision};

/// (world size, dp) layouts: P = 1, 2 and 4, the last as DP 2 x SP 2.
const LAYOUTS: [(usize, usize); 4] = [(1, 1), (2, 1), (4, 1), (4, 2)];

/// Losses and parameters of rank 0.
fn rank0(p: usize, run: &Run) -> Result<(Vec<f64>, Vec<(String, Tensor)>)> {
    let mut out = launch(p, |ctx| training::train(ctx.world(), run))?;
    Ok(out.swap_remove(0))
}

fn compare(label: &str, got: &[(String, Tensor)], want: &[(String, Tensor)], tol: f64) -> Result<()> {
    ensure!(got.len() == want.len(), "{label}: {} vs {} parameters", got.len(), want.len());
    for ((name, g), (_, w)) in got.iter().zip(want) {
        if tol == 0.0 {
            ensure!(g.equal(w), "{label}: {name} differs by {:.3e} (want bit-identical)", max_diff(g, w));
        } else {
            // Absolute: Adam normalises each gradient element, so an element whose gradient is
            // rounding noise (the key bias, whose gradient is zero in exact arithmetic) moves by
            // up to lr per step whatever its size; relative errors of such tiny weights say
            // nothing.
            let d = max_diff(g, w);
            ensure!(d <= tol, "{label}: {name} max abs diff {d:.3e} > {tol:.1e}");
        }
    }
    Ok(())
}

#[test]
fn zero_stages_give_the_parameters_of_zero_0_bit_for_bit() -> Result<()> {
    // The stages reduce the same values in the same order (in f32 for bf16, rounded to bf16
    // once) and update elementwise, so the parameters after 3 AdamW steps are identical, not
    // just close.
    for precision in [Precision::F64, Precision::F32, Precision::Bf16] {
        for (p, dp) in LAYOUTS {
            let (loss0, want) = rank0(p, &Run::tiny(StrategyConfig::Ulysses, dp, precision, 0))?;
            for stage in 1..=3 {
                let (loss, got) = rank0(p, &Run::tiny(StrategyConfig::Ulysses, dp, precision, stage))?;
                let label = format!("{precision:?} P={p} dp={dp} ZeRO-{stage}");
                ensure!(loss == loss0, "{label}: losses {loss:?} vs {loss0:?}");
                compare(&label, &got, &want, 0.0)?;
            }
        }
    }
    Ok(())
}

#[test]
fn zero_stages_match_one_device() -> Result<()> {
    // Different reductions (over ranks, over micro-batches): equal to rounding. f32: the
    // parameters after 3 AdamW steps (lr 1e-2) within 1e-5 absolute and the losses within 1e-6
    // relative. bf16 with f32 master weights: the losses within 1e-2 relative (Adam turns the
    // bf16 rounding noise of near-zero gradients into whole steps, so parameters are compared
    // in f32 only).
    for precision in [Precision::F32, Precision::Bf16] {
        for (p, dp) in LAYOUTS {
            for stage in 0..=3 {
                let run = Run::tiny(StrategyConfig::Ulysses, dp, precision, stage);
                let label = format!("{precision:?} P={p} dp={dp} ZeRO-{stage} vs one device");
                let (want_loss, want) = rank0(1, &run.single())?;
                let (loss, got) = rank0(p, &run)?;
                let tol = if precision == Precision::F32 { 1e-6 } else { 1e-2 };
                for (a, b) in loss.iter().zip(&want_loss) {
                    ensure!((a - b).abs() <= tol * b.abs(), "{label}: losses {loss:?} vs {want_loss:?}");
                }
                if precision == Precision::F32 {
                    compare(&label, &got, &want, 1e-5)?;
                }
            }
        }
    }
    Ok(())
}

#[test]
fn megatron_sp_shards_stay_sharded_under_zero() -> Result<()> {
    // Only the replicated parameters join ZeRO; the tensor-parallel shards are reduced over DP.
    for (p, dp) in [(2, 1), (4, 1), (4, 2)] {
        let (loss0, want) = rank0(p, &Run::tiny(StrategyConfig::MegatronSp, dp, Precision::F64, 0))?;
        for stage in 1..=3 {
            let (loss, got) = rank0(p, &Run::tiny(StrategyConfig::MegatronSp, dp, Precision::F64, stage))?;
            let label = format!("megatron_sp P={p} dp={dp} ZeRO-{stage}");
            ensure!(loss == loss0, "{label}: losses differ");
            compare(&label, &got, &want, 0.0)?;
        }
    }
    Ok(())
}

#[test]
fn checkpointing_gives_the_gradients_of_no_checkpointing() -> Result<()> {
    // Full recomputation reruns each block (its collectives included) through a nested tape;
    // selective reruns the attention cores. f64, one step without clipping: bit-identical
    // parameters for every strategy, at P = 1, 2, 4, with ZeRO 0 and 3.
    let strategies = [
        StrategyConfig::Ulysses,
        StrategyConfig::MegatronSp,
        StrategyConfig::Ring { zigzag: true },
        StrategyConfig::AllGatherKv { zigzag: false },
        StrategyConfig::Usp { ulysses: 2, zigzag: true },
    ];
    for strategy in strategies {
        for p in [1usize, 2, 4] {
            if matches!(strategy, StrategyConfig::Usp { .. }) && p < 2 {
                continue; // USP needs P divisible by its Ulysses degree 2.
            }
            for stage in [0u8, 3] {
                let base = Run { steps: 1, ..Run::tiny(strategy, 1, Precision::F64, stage) };
                let (loss0, want) = rank0(p, &base)?;
                for mode in [Checkpointing::Full, Checkpointing::Selective] {
                    let (loss, got) = rank0(p, &base.clone().checkpointing(mode))?;
                    let label = format!("{} P={p} ZeRO-{stage} {mode:?}", strategy.label());
                    ensure!(loss == loss0, "{label}: loss {loss:?} vs {loss0:?}");
                    compare(&label, &got, &want, 0.0)?;
                }
            }
        }
    }
    Ok(())
}

/// Parameters of one block and of the outer unit (embedding, final norm; tied head).
fn unit_sizes(c: &GptConfig) -> (i64, i64) {
    let block = (c.num_params() - c.vocab_size * c.n_embd - 2 * c.n_embd) / c.n_layer;
    (block, c.vocab_size * c.n_embd + 2 * c.n_embd)
}

#[test]
fn zero_bytes_equal_their_formulas() -> Result<()> {
    // Counted on the ZeRO group (all SP x DP ranks) over one step, per rank, bf16 parameters
    // (p = 2 B), gradients reduced in f32 (4 B), M padded to a multiple of W.
    for (p, dp) in [(2usize, 1usize), (4, 1), (4, 2)] {
        for stage in 0..=3u8 {
            for mode in [Checkpointing::None, Checkpointing::Full] {
                let run = Run { steps: 1, ..Run::tiny(StrategyConfig::Ulysses, dp, Precision::Bf16, stage) }
                    .checkpointing(mode);
                let w = p as i64;
                let pad = |m: i64| (m + w - 1) / w * w;
                let frac = |m: i64| (pad(m) * (w - 1) / w) as u64;
                let psi = run.model.num_params();
                let (block, outer) = unit_sizes(&run.model);
                let (ar, ag, rs) = match stage {
                    0 => (2 * frac(psi) * 4, 0, 0),
                    1 => (2 * frac(psi) * 4, frac(psi) * 2, 0),
                    2 => (0, frac(psi) * 2, frac(psi) * 4),
                    _ => {
                        let units =
                            [outer].into_iter().chain(std::iter::repeat_n(block, run.model.n_layer as usize));
                        let (ag, rs) =
                            units.fold((0, 0), |(ag, rs), m| (ag + 2 * frac(m) * 2, rs + frac(m) * 4));
                        (0, ag, rs)
                    }
                };
                let counted = launch(p, |ctx| -> Result<[u64; 3]> {
                    let mut t = training::trainer(ctx.world(), &run)?;
                    t.groups().zero.reset_stats();
                    training::steps(&mut t, &run, 0, 1)?;
                    let s = t.groups().zero.stats();
                    Ok([OpKind::AllReduce, OpKind::AllGather, OpKind::ReduceScatter]
                        .map(|k| s.op(k).bytes_sent))
                })?;
                for (r, got) in counted.iter().enumerate() {
                    ensure!(
                        *got == [ar, ag, rs],
                        "P={p} dp={dp} ZeRO-{stage} {mode:?} rank {r}: [all-reduce, all-gather, reduce-scatter] \
                         {got:?}, formula {:?}",
                        [ar, ag, rs]
                    );
                }
            }
        }
    }
    Ok(())
}
