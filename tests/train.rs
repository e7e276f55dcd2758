//! The trainer on thread ranks: ZeRO 1-3 against ZeRO 0 and one device, activation
//! checkpointing against none (every strategy), the ZeRO collectives' bytes against the cost
//! model's, the tiled loss, clipping, non-finite gradients and f16 loss scaling.

mod common;

use anyhow::{ensure, Result};
use common::max_diff;
use common::tolerance;
use common::training::{self, Run};
use tch::{Kind, Tensor};
use ulysses::attention::{AttentionConfig, Kernel, Mask, StrategyConfig};
use ulysses::comm::{launch, OpKind, DEFAULT_BUCKET_ELEMS};
use ulysses::cost::bytes::{step_comm, GroupRole};
use ulysses::cost::Job;
use ulysses::train::{AdamWConfig, Checkpointing, Precision};

/// (world size, dp) layouts: P = 1, 2 and 4, the last as DP 2 x SP 2.
const LAYOUTS: [(usize, usize); 4] = [(1, 1), (2, 1), (4, 1), (4, 2)];

/// Losses and parameters of rank 0.
fn rank0(p: usize, run: &Run) -> Result<(Vec<f64>, training::Named)> {
    let mut out = launch(p, |ctx| training::train(ctx.world(), run))?;
    Ok(out.swap_remove(0))
}

/// The same parameters, bit for bit.
fn identical(label: &str, got: &[(String, Tensor)], want: &[(String, Tensor)]) -> Result<()> {
    ensure!(got.len() == want.len(), "{label}: {} vs {} parameters", got.len(), want.len());
    for ((name, g), (_, w)) in got.iter().zip(want) {
        ensure!(g.equal(w), "{label}: {name} differs by {:.3e} (want bit-identical)", max_diff(g, w));
    }
    Ok(())
}

#[test]
fn zero_stages_give_the_parameters_of_zero_0_bit_for_bit() -> Result<()> {
    // The stages reduce the same values in the same order (in f32 for bf16, rounded to bf16
    // once) and update elementwise, so the parameters after 3 AdamW steps are identical, not
    // just close. Also with buckets (and so optimizer chunks) of 997 elements, a prime: the tiny
    // model's ~30K parameters then take many buckets, which straddle parameters, blocks and
    // partitions (with the default 2^22 every run here is one bucket and one chunk); each
    // element is still summed over the ranks in rank order, so the bits do not change.
    for precision in [Precision::F64, Precision::F32, Precision::Bf16] {
        for (p, dp) in LAYOUTS {
            let (loss0, want) = rank0(p, &Run::tiny(StrategyConfig::Ulysses, dp, precision, 0))?;
            for stage in 0..=3 {
                for bucket in [DEFAULT_BUCKET_ELEMS, 997] {
                    if stage == 0 && bucket == DEFAULT_BUCKET_ELEMS {
                        continue;
                    }
                    let mut run = Run::tiny(StrategyConfig::Ulysses, dp, precision, stage);
                    run.plan.bucket_elems = bucket;
                    let (loss, got) = rank0(p, &run)?;
                    let label = format!("{precision:?} P={p} dp={dp} ZeRO-{stage} buckets of {bucket}");
                    ensure!(loss == loss0, "{label}: losses {loss:?} vs {loss0:?}");
                    identical(&label, &got, &want)?;
                }
            }
        }
    }
    Ok(())
}

/// AdamW with an eps (1) far above every gradient element, for comparisons across reduction
/// orders. Its update `lr m / (sqrt(v) + eps)` then moves with the gradient by at most about
/// `lr` times the gradient's own change, so rounding noise stays noise. With the default eps
/// (1e-8) an element whose gradient is rounding noise (the key bias's, zero in exact arithmetic)
/// moves by a whole `lr` either way, whatever the noise's size: parameters after default AdamW
/// can only be compared between runs that round alike (the bit-for-bit tests above).
fn steady(mut run: Run) -> Run {
    run.plan.adamw = Some(AdamWConfig { lr: 1e-2, eps: 1.0, ..AdamWConfig::default() });
    run
}

/// The same run without an optimizer (the gradients of its first step).
fn no_update(run: &Run) -> Run {
    let mut run = run.clone();
    run.plan.adamw = None;
    run
}

#[test]
fn zero_stages_match_one_device() -> Result<()> {
    // The parallel runs reduce over ranks and micro-batches in another order than one device,
    // and their GEMMs have other shapes, so they round differently (and differently on another
    // CPU). Compared in f32 with bounds from the chain of sums (tests/common/tolerance.rs):
    // the gradients of the first step, before any update; the losses of 3 steps of the steady
    // AdamW above; the parameters after them.
    for (p, dp) in LAYOUTS {
        let base = steady(Run::tiny(StrategyConfig::Ulysses, dp, Precision::F32, 0));
        let bounds = tolerance::gpt(&base.model, base.n, base.b * base.n * dp as i64, Kind::Float);
        // Gradients: ZeRO-0 holds them whole on every rank (stages 1-3 give its parameters bit
        // for bit: the test above). Both are sums over the dp micro-batches.
        let (_, _, want) = grads_after_one_step(1, &no_update(&base.single()))?;
        let (_, _, got) = grads_after_one_step(p, &no_update(&base))?;
        let names: Vec<String> = launch(1, |ctx| -> Result<Vec<String>> {
            let t = training::trainer(ctx.world(), &base.single())?;
            Ok(t.model().params().iter().map(|(n, _)| n.to_string()).collect())
        })?
        .swap_remove(0);
        let named = |g: Vec<Tensor>| names.iter().cloned().zip(g).collect::<Vec<_>>();
        let (want, got) = (named(want), named(got));
        tolerance::each_relative_to_max(
            &format!("F32 P={p} dp={dp} step-0 gradients"),
            &got,
            &want,
            bounds.grad,
        )?;
        // The mean gradient's largest element, per parameter: what an update moves with.
        let scale: Vec<f64> = want.iter().map(|(_, g)| g.abs().max().double_value(&[]) / dp as f64).collect();
        let largest = scale.iter().cloned().fold(0.0, f64::max);
        ensure!(largest <= 0.5, "a gradient element of {largest} is not far below eps = 1");
        for stage in 0..=3 {
            let run = steady(Run::tiny(StrategyConfig::Ulysses, dp, Precision::F32, stage));
            let label = format!("F32 P={p} dp={dp} ZeRO-{stage} vs one device");
            let (want_loss, want) = rank0(1, &run.single())?;
            let (loss, got) = rank0(p, &run)?;
            // Losses: the forward's rounding, plus the parameters' differences, which the bound
            // below keeps orders of magnitude smaller.
            for (step, (a, b)) in loss.iter().zip(&want_loss).enumerate() {
                tolerance::check(
                    &format!("{label}: loss of step {step}"),
                    (a - b).abs(),
                    bounds.loss * b.abs(),
                )?;
            }
            // Parameters: each update `lr m / (sqrt(v) + 1)` (bias-corrected moments) changes by
            // at most lr (1 + 1.01 |g|) times the gradient's change (m is a weighted mean of the
            // gradients; |m| <= 1.01 sqrt(v) for 3 steps of these betas, by Cauchy-Schwarz), so
            // by at most 2 lr with every |g| <= 0.5; the parameters' own differences feed the next
            // gradients only at second order (lr times the curvature is far below 1). T steps
            // move them apart by at most 2 T lr times the gradient bound (twice that here), plus
            // one rounding of each stored f32 parameter per step (2u |w|: the updates differ a
            // little, which may round w to a neighbouring value).
            let steps = run.steps as f64;
            let u = tolerance::unit_roundoff(Kind::Float);
            for (((name, g), (_, w)), s) in got.iter().zip(&want).zip(&scale) {
                let stored = w.abs().max().double_value(&[]);
                let bound = steps * (4.0 * 1e-2 * bounds.grad * s + 2.0 * u * stored);
                tolerance::check(&format!("{label}: {name} after {steps} steps"), max_diff(g, w), bound)?;
            }
        }
    }
    Ok(())
}

#[test]
fn bf16_losses_match_one_device() -> Result<()> {
    // bf16 parameters and activations with f32 master weights and reductions, the steady AdamW.
    // Each stage's output is rounded to bf16 (u = 2^-8) once; the two runs' f32 sums differ by
    // far less than a bf16 ulp, but can round to neighbouring values: up to 2u apart per stage,
    // over the L + 2 stages of the loss (tests/common/tolerance.rs). Parameters are not
    // compared: a master weight's tiny difference can flip its bf16 rounding, which is the
    // same 2u again.
    for (p, dp) in LAYOUTS {
        for stage in 0..=3 {
            let run = steady(Run::tiny(StrategyConfig::Ulysses, dp, Precision::Bf16, stage));
            let label = format!("Bf16 P={p} dp={dp} ZeRO-{stage} vs one device");
            let bound = (run.model.n_layer + 2) as f64 * 2.0 * tolerance::unit_roundoff(Kind::BFloat16);
            let (want_loss, _) = rank0(1, &run.single())?;
            let (loss, _) = rank0(p, &run)?;
            for (step, (a, b)) in loss.iter().zip(&want_loss).enumerate() {
                tolerance::check(&format!("{label}: loss of step {step}"), (a - b).abs(), bound * b.abs())?;
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
            identical(&label, &got, &want)?;
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
                    identical(&label, &got, &want)?;
                }
            }
        }
    }
    Ok(())
}

/// Bytes (sent, received) of rank `r` on the ZeRO group (all SP x DP ranks) per op, as the cost
/// model's `cost::bytes::step_comm` gives them: the one source of truth for these formulas.
fn zero_bytes_of_the_cost_model(run: &Run, p: usize, r: usize) -> Result<[(u64, u64); 3]> {
    let job = Job {
        attention: AttentionConfig::new(Kernel::Sdpa, Mask::Causal),
        dp: run.dp,
        micro_batch: run.b,
        precision: run.plan.precision,
        checkpointing: run.plan.checkpointing,
        zero: run.plan.zero,
        optimizer: run.plan.adamw.is_some(),
        backend: "local".into(),
        bucket_elems: run.plan.bucket_elems,
        reduce_dtype: run.plan.reduce_dtype,
        documents: None,
        ..Job::new(run.model.clone(), run.strategy, p, run.n)
    };
    let mut out = [(0, 0); 3];
    for c in step_comm(&job, r)?.into_iter().filter(|c| c.group == GroupRole::World) {
        let i = [OpKind::AllReduce, OpKind::AllGather, OpKind::ReduceScatter]
            .iter()
            .position(|&k| k == c.op)
            .ok_or_else(|| anyhow::anyhow!("{c:?} on the ZeRO group"))?;
        out[i] = (out[i].0 + c.sent, out[i].1 + c.received);
    }
    Ok(out)
}

#[test]
fn zero_bytes_equal_the_cost_models() -> Result<()> {
    // Counted on the ZeRO group over one step, per rank, sent and received, against the cost
    // model: bf16 parameters (2 B), gradients reduced in f32 (4 B), every buffer padded to a
    // multiple of W (P = 3 pads: 12704 elements per block). Megatron-SP's shards stay out.
    let cases = [
        (StrategyConfig::Ulysses, 2usize, 1usize),
        (StrategyConfig::Ulysses, 3, 1),
        (StrategyConfig::Ulysses, 4, 1),
        (StrategyConfig::Ulysses, 4, 2),
        (StrategyConfig::MegatronSp, 2, 1),
        (StrategyConfig::MegatronSp, 4, 2),
    ];
    // Gradients reduced in bf16 (`reduce_dtype`): half the reduction's bytes, on a few cases.
    let bf16_reduction = [(StrategyConfig::Ulysses, 3usize, 1usize), (StrategyConfig::MegatronSp, 4, 2)];
    let all =
        cases.iter().map(|&c| (c, None)).chain(bf16_reduction.iter().map(|&c| (c, Some(Precision::Bf16))));
    for ((strategy, p, dp), reduce_dtype) in all {
        for stage in 0..=3u8 {
            for mode in [Checkpointing::None, Checkpointing::Full] {
                let mut run =
                    Run { steps: 1, ..Run::tiny(strategy, dp, Precision::Bf16, stage) }.checkpointing(mode);
                run.plan.reduce_dtype = reduce_dtype;
                let counted = launch(p, |ctx| -> Result<[(u64, u64); 3]> {
                    let mut t = training::trainer(ctx.world(), &run)?;
                    t.groups().zero.reset_stats();
                    training::steps(&mut t, &run, 0, 1)?;
                    let s = t.groups().zero.stats();
                    Ok([OpKind::AllReduce, OpKind::AllGather, OpKind::ReduceScatter]
                        .map(|k| (s.op(k).bytes_sent, s.op(k).bytes_received)))
                })?;
                for (r, got) in counted.iter().enumerate() {
                    let want = zero_bytes_of_the_cost_model(&run, p, r)?;
                    ensure!(
                        *got == want,
                        "{} P={p} dp={dp} ZeRO-{stage} {mode:?} reduce {reduce_dtype:?} rank {r}: (sent, \
                         received) of [all-reduce, all-gather, reduce-scatter] {got:?}, cost model {want:?}",
                        strategy.label()
                    );
                }
            }
        }
    }
    Ok(())
}

/// Every parameter's gradient after one step without an optimizer (reduced, unscaled sums).
fn grads_after_one_step(p: usize, run: &Run) -> Result<(f64, f64, Vec<Tensor>)> {
    let mut out = launch(p, |ctx| -> Result<(f64, f64, Vec<Tensor>)> {
        let mut t = training::trainer(ctx.world(), run)?;
        let report = t.step(&training::batches(&t, run, 0)?)?;
        let grads = t.model().params().iter().map(|(_, p)| p.grad().copy()).collect();
        Ok((report.loss, report.grad_norm, grads))
    })?;
    Ok(out.swap_remove(0))
}

#[test]
fn the_tiled_loss_equals_the_whole_loss() -> Result<()> {
    // f64, Ulysses at P = 2 (16 tokens per rank): tiles of 1, 5, 16 and 64 tokens against the
    // logits all at once; tied and untied output projections.
    for tie in [true, false] {
        let mut run = Run { steps: 1, ..Run::tiny(StrategyConfig::Ulysses, 1, Precision::F64, 0) };
        run.plan.adamw = None;
        run.model.tie_embeddings = tie;
        let (loss0, norm0, want) = grads_after_one_step(2, &run)?;
        for tile in [1, 5, 16, 64] {
            let mut tiled = run.clone();
            tiled.plan.loss_tile = Some(tile);
            let (loss, norm, got) = grads_after_one_step(2, &tiled)?;
            let label = format!("tie={tie} tile={tile}");
            ensure!((loss - loss0).abs() <= 1e-12 * loss0, "{label}: loss {loss} vs {loss0}");
            ensure!((norm - norm0).abs() <= 1e-12 * norm0, "{label}: norm {norm} vs {norm0}");
            for (g, w) in got.iter().zip(&want) {
                ensure!(max_diff(g, w) <= 1e-12, "{label}: gradient differs by {:.3e}", max_diff(g, w));
            }
        }
    }
    Ok(())
}

#[test]
fn the_gradient_norm_counts_each_element_once_and_clipping_scales_the_update() -> Result<()> {
    // The reported norm against the norm of one device's gradients (f64), at every layout and
    // stage; Megatron-SP's shards counted once over the tensor-parallel ranks.
    let mut single = Run { steps: 1, ..Run::tiny(StrategyConfig::Ulysses, 1, Precision::F64, 0) };
    single.plan.adamw = None;
    let (_, norm1, grads) = grads_after_one_step(1, &single)?;
    let direct =
        grads.iter().map(|g| g.square().sum(tch::Kind::Double).double_value(&[])).sum::<f64>().sqrt();
    ensure!((norm1 - direct).abs() <= 1e-12 * direct, "one device: reported {norm1} vs {direct}");
    for strategy in [StrategyConfig::Ulysses, StrategyConfig::MegatronSp] {
        for (p, dp) in [(2usize, 1usize), (4, 2)] {
            for stage in 0..=3 {
                let run = Run { steps: 1, ..Run::tiny(strategy, dp, Precision::F64, stage) };
                let mut one = run.single();
                one.plan.adamw = None;
                let (_, want, _) = grads_after_one_step(1, &one)?;
                let mut t = launch(p, |ctx| -> Result<f64> {
                    let mut t = training::trainer(ctx.world(), &run)?;
                    Ok(t.step(&training::batches(&t, &run, 0)?)?.grad_norm)
                })?;
                let got = t.swap_remove(0);
                ensure!(
                    (got - want).abs() <= 1e-10 * want,
                    "{} P={p} dp={dp} ZeRO-{stage}: norm {got} vs one device {want}",
                    strategy.label()
                );
            }
        }
    }
    // Clipping: with eps far above the gradients, AdamW's first step is -lr g / eps, so the
    // update shrinks by clip / norm exactly when the norm exceeds the clip.
    let mut run = Run { steps: 1, ..Run::tiny(StrategyConfig::Ulysses, 2, Precision::F64, 1) };
    run.plan.adamw =
        Some(ulysses::train::AdamWConfig { lr: 1e-3, eps: 1e3, weight_decay: 0.0, ..Default::default() });
    let initial = launch(1, |ctx| -> Result<Vec<Tensor>> {
        let t = training::trainer(ctx.world(), &Run { dp: 1, ..run.clone() })?;
        Ok(t.parameters()?.into_iter().map(|(_, p)| p).collect())
    })?
    .swap_remove(0);
    let (_, free) = rank0(4, &run)?;
    let clip = norm1 / 4.0;
    run.plan.clip = Some(clip);
    let (_, clipped) = rank0(4, &run)?;
    let (mut num, mut den) = (0.0, 0.0);
    for ((c, f), w0) in clipped.iter().zip(&free).zip(&initial) {
        let (dc, df) = (&c.1 - w0, &f.1 - w0);
        num += (&dc * &df).sum(tch::Kind::Double).double_value(&[]);
        den += (&df * &df).sum(tch::Kind::Double).double_value(&[]);
    }
    let ratio = num / den;
    let mut plain = run.clone();
    plain.plan = ulysses::train::TrainConfig {
        adamw: None,
        clip: None,
        zero: ulysses::train::ZeroStage::NONE,
        ..run.plan.clone()
    };
    let (_, norm4, _) = grads_after_one_step(4, &plain)?;
    let want = clip / norm4;
    ensure!(
        (ratio - want).abs() <= 1e-3 * want,
        "clipped update / free update {ratio}, want clip / norm = {want}"
    );
    Ok(())
}

#[test]
fn the_schedule_warms_up_then_decays() -> Result<()> {
    use ulysses::train::{Decay, Schedule};
    let cosine = Schedule { warmup: 4, decay: Decay::Cosine, total: Some(14), min_lr_ratio: 0.1 };
    let f: Vec<f64> = (0..16).map(|t| cosine.factor(t)).collect();
    ensure!(f[0] == 0.25 && f[3] == 1.0 && f[4] == 1.0, "warm-up {f:?}");
    ensure!((f[9] - 0.55).abs() < 1e-12 && (f[14] - 0.1).abs() < 1e-12 && f[15] == f[14], "cosine {f:?}");
    ensure!(f.windows(2).skip(4).all(|w| w[1] <= w[0]), "cosine does not decrease: {f:?}");
    let linear = Schedule { decay: Decay::Linear, ..cosine };
    ensure!((linear.factor(9) - 0.55).abs() < 1e-12 && (linear.factor(6) - 0.82).abs() < 1e-12, "linear");
    // The trainer's learning rate follows it.
    let mut run = Run { steps: 6, ..Run::tiny(StrategyConfig::Ulysses, 1, Precision::F32, 0) };
    run.plan.schedule = cosine;
    let lrs = launch(2, |ctx| -> Result<Vec<f64>> {
        let mut t = training::trainer(ctx.world(), &run)?;
        (0..6).map(|s| Ok(t.step(&training::batches(&t, &run, s)?)?.lr)).collect()
    })?;
    let want: Vec<f64> = (0..6).map(|t| 1e-2 * cosine.factor(t)).collect();
    ensure!(lrs[0] == want, "lr {:?} vs {want:?}", lrs[0]);
    Ok(())
}

#[test]
fn a_non_finite_gradient_stops_the_step_naming_it() -> Result<()> {
    for stage in [0u8, 2] {
        let run = Run::tiny(StrategyConfig::Ulysses, 1, Precision::F32, stage);
        let err = launch(2, |ctx| -> Result<()> {
            let mut t = training::trainer(ctx.world(), &run)?;
            // A NaN in one LayerNorm weight of block 1: the loss and every gradient are NaN.
            let (_, w) = t.model().params().iter().find(|(n, _)| *n == "h.1.ln2.weight").expect("ln2");
            let _ = w.detach().fill_(f64::NAN);
            t.step(&training::batches(&t, &run, 0)?)?;
            Ok(())
        })
        .expect_err("a NaN gradient must stop the step")
        .to_string();
        ensure!(
            err.contains("step 0: the gradient of wte (outer) is not finite") && err.contains("loss NaN"),
            "ZeRO-{stage}: {err}"
        );
    }
    Ok(())
}

#[test]
fn f16_skips_overflowing_steps_and_says_so() -> Result<()> {
    // A first scale of 2^40 overflows f16 gradients; the step is skipped, the scale backs off
    // by 2^-24 to 2^16, and the next steps train.
    let mut run = Run { steps: 4, ..Run::tiny(StrategyConfig::Ulysses, 1, Precision::F16, 2) };
    run.plan.loss_scale.init = 2f64.powi(40);
    run.plan.loss_scale.backoff = 2f64.powi(-24);
    let reports = launch(2, |ctx| -> Result<Vec<ulysses::train::StepReport>> {
        let mut t = training::trainer(ctx.world(), &run)?;
        (0..4).map(|s| Ok(t.step(&training::batches(&t, &run, s)?)?)).collect()
    })?;
    let r = &reports[0];
    let first = r[0].skipped.clone().unwrap_or_default();
    ensure!(
        first.contains("f16 overflow at loss scale 1099511627776") && first.contains("scale now 65536"),
        "{first}"
    );
    ensure!(r[1..].iter().all(|s| s.skipped.is_none() && s.loss_scale == 65536.0), "{r:?}");
    ensure!(r[1..].iter().all(|s| s.loss.is_finite() && s.grad_norm.is_finite()), "{r:?}");
    ensure!(r[3].loss < r[1].loss, "f16 does not train: {r:?}");
    Ok(())
}

#[test]
fn zero_3_keeps_only_its_partition_between_steps() -> Result<()> {
    // The buffers' own account of their storage; the process's memory says the same on MPI
    // processes (tests/mpi.rs: after the steps ZeRO-3 holds less than ZeRO-2 by the other ranks'
    // partitions of the parameters, measured as RSS).
    let run = Run::tiny(StrategyConfig::Ulysses, 1, Precision::Bf16, 3);
    let resident = launch(2, |ctx| -> Result<Vec<bool>> {
        let mut t = training::trainer(ctx.world(), &run)?;
        training::steps(&mut t, &run, 0, 2)?;
        Ok(t.zero().units.iter().map(|u| u.is_resident()).collect())
    })?;
    ensure!(resident.iter().flatten().all(|r| !r), "units still allocated after the step: {resident:?}");
    ensure!(resident[0].len() == 3, "outer + 2 blocks: {:?}", resident[0]);
    Ok(())
}

#[test]
fn a_checkpoint_loads_at_another_world_size_and_tensor_parallel_degree() -> Result<()> {
    // Saved by 4 ranks (Megatron-SP over 4, ZeRO-2), loaded by 2 (Megatron-SP over 2 with
    // ZeRO-3, and Ulysses with ZeRO-0) and by 1 (one device): every rank holds its share of the
    // saved full parameters, bit for bit, and the loaded runs continue like the saved one.
    let dir = std::env::temp_dir().join(format!("ulysses-reshard-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let saved_run = Run { steps: 3, ..Run::tiny(StrategyConfig::MegatronSp, 1, Precision::F32, 2) };
    let mut saved = launch(4, |ctx| -> Result<(std::path::PathBuf, f64)> {
        let mut t = training::trainer(ctx.world(), &saved_run)?;
        training::steps(&mut t, &saved_run, 0, 2)?;
        let path = t.save(&dir, serde_json::json!({ "next_step": 2 }))?;
        Ok((path, training::steps(&mut t, &saved_run, 2, 3)?[0]))
    })?;
    let (path, next) = saved.swap_remove(0);
    // The full parameters at the checkpoint, from one device loading it.
    let one = Run::tiny(StrategyConfig::Single, 1, Precision::F32, 0);
    let single = launch(1, |ctx| -> Result<f64> {
        let mut t = training::trainer(ctx.world(), &one)?;
        t.load(&path)?;
        Ok(training::steps(&mut t, &one, 2, 3)?[0])
    })?[0];
    // The same parameters through other strategies: the next loss differs by the forward's
    // rounding only (tests/common/tolerance.rs).
    let bound =
        tolerance::gpt(&saved_run.model, saved_run.n, saved_run.b * saved_run.n, Kind::Float).loss * next;
    tolerance::check("one device continues", (single - next).abs(), bound)?;
    for (strategy, stage) in [(StrategyConfig::MegatronSp, 3u8), (StrategyConfig::Ulysses, 0)] {
        let run = Run::tiny(strategy, 1, Precision::F32, stage);
        let out = launch(2, |ctx| -> Result<f64> {
            // This rank alone, as one device: the full parameters.
            let me = ctx.world().split("self", Some(ctx.rank()), 0)?.expect("a group of one");
            let mut whole = training::trainer(&me, &one)?;
            whole.load(&path)?;
            let full = whole.parameters()?;
            let mut t = training::trainer(ctx.world(), &run)?;
            t.load(&path)?;
            for ((name, got), p) in t.parameters()?.iter().zip(t.model().params().all()) {
                let (_, whole) = full.iter().find(|(n, _)| n == name).expect("a parameter");
                let want = training::part_of(whole, &p.placement);
                ensure!(
                    got.equal(&want),
                    "{} ZeRO-{stage}: {name} differs by {:.3e}",
                    strategy.label(),
                    max_diff(got, &want)
                );
            }
            Ok(training::steps(&mut t, &run, 2, 3)?[0])
        })?;
        tolerance::check(&format!("{} at P=2 continues", strategy.label()), (out[0] - next).abs(), bound)?;
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

#[test]
fn full_recomputation_sends_the_forward_again_and_nothing_else() -> Result<()> {
    // Ulysses, f32: the SP group's bytes per rank and step grow by the blocks' forward
    // all-to-alls, L b (2Nh + 2N H_kv d)(P-1)/P^2 x 4 B, exactly; selective recomputation sends
    // nothing more.
    for p in [2usize, 4] {
        let run = Run { steps: 1, ..Run::tiny(StrategyConfig::Ulysses, 1, Precision::F32, 0) };
        let c = &run.model;
        let (n, b, pi) = (run.n, run.b, p as i64);
        let forward = (c.n_layer * b * (2 * n * c.n_embd + 2 * n * c.n_kv_head * c.head_dim()) * (pi - 1)
            / (pi * pi)
            * 4) as u64;
        let mut sent = Vec::new();
        for mode in [Checkpointing::None, Checkpointing::Full, Checkpointing::Selective] {
            let run = run.clone().checkpointing(mode);
            let bytes = launch(p, |ctx| -> Result<u64> {
                let mut t = training::trainer(ctx.world(), &run)?;
                let sp = t.model().strategy().group().expect("sp").clone();
                sp.reset_stats();
                training::steps(&mut t, &run, 0, 1)?;
                Ok(sp.stats().op(OpKind::AllToAll).bytes_sent)
            })?;
            sent.push(bytes[0]);
        }
        ensure!(
            sent[1] - sent[0] == forward,
            "P={p}: full sends {} more, formula {forward}",
            sent[1] - sent[0]
        );
        ensure!(sent[2] == sent[0], "P={p}: selective sends {} vs {}", sent[2], sent[0]);
    }
    Ok(())
}

#[test]
fn a_save_that_crashed_leaves_the_previous_checkpoint_in_use() -> Result<()> {
    let dir = std::env::temp_dir().join(format!("ulysses-crash-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let run = Run { steps: 2, ..Run::tiny(StrategyConfig::Ulysses, 1, Precision::F32, 1) };
    launch(2, |ctx| -> Result<()> {
        let mut t = training::trainer(ctx.world(), &run)?;
        training::steps(&mut t, &run, 0, 1)?;
        t.save(&dir, serde_json::json!({}))?;
        Ok(())
    })?;
    // A later save that died after writing one shard: its temporary folder has no manifest.
    let tmp = dir.join(".tmp-step-00000002");
    std::fs::create_dir_all(&tmp)?;
    std::fs::copy(dir.join("step-00000001/rank-00000.safetensors"), tmp.join("rank-00000.safetensors"))?;
    let found = ulysses::train::checkpoints(&dir);
    ensure!(found.len() == 1 && found[0].0 == 1, "{found:?}");
    let steps = launch(2, |ctx| -> Result<u64> {
        let mut t = training::trainer(ctx.world(), &run)?;
        t.load(&found[0].1)?;
        Ok(t.steps_taken())
    })?;
    ensure!(steps == [1, 1], "{steps:?}");
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

#[test]
fn adamw_follows_its_formula_worked_by_hand() -> Result<()> {
    // AdamW (Loshchilov and Hutter 2019) as DeepSpeed and PyTorch run it, worked here in f64 per
    // element: m = b1 m + (1 - b1) g, v = b2 v + (1 - b2) g^2, both bias-corrected by
    // 1 - b^t, w -= lr (m^ / (sqrt(v^) + eps) + wd w), the decay on matrices only (not on
    // norms' and biases' vectors). Three steps of given gradients on a 2x2 matrix and a vector.
    // The optimizer computes in f32: each step rounds its dozen operations by at most u each,
    // relative to |w| + lr (the update is lr times a ratio of about 1), so 3 steps stay within
    // 3 x 16 u (|w| + lr).
    use ulysses::model::{Params, Placement};
    use ulysses::train::AdamW;
    let cfg = AdamWConfig { lr: 0.1, beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1 };
    let mut params = Params::new(0, Kind::Float, tch::Device::Cpu);
    let w = params.constant("w", &[2, 2], 0.5, Placement::Replicated)?;
    let b = params.constant("b", &[2], -0.25, Placement::Replicated)?;
    let gw = [[0.3, -1.2, 0.0, 2.5], [-0.1, -1.0, 0.4, 2.0], [0.2, 0.8, -0.4, -3.0]];
    let gb = [[1.0, -0.5], [0.5, 0.5], [-2.0, 0.25]];
    let mut opt = AdamW::new(&params, cfg)?;
    // By hand: (w, m, v) per element.
    let mut hand_w: Vec<(f64, f64, f64)> = vec![(0.5, 0.0, 0.0); 4];
    let mut hand_b: Vec<(f64, f64, f64)> = vec![(-0.25, 0.0, 0.0); 2];
    let by_hand = |s: &mut (f64, f64, f64), g: f64, t: i32, decay: bool| {
        let (w, m, v) = *s;
        let m = cfg.beta1 * m + (1.0 - cfg.beta1) * g;
        let v = cfg.beta2 * v + (1.0 - cfg.beta2) * g * g;
        let (mh, vh) = (m / (1.0 - cfg.beta1.powi(t)), v / (1.0 - cfg.beta2.powi(t)));
        let step = mh / (vh.sqrt() + cfg.eps) + if decay { cfg.weight_decay * w } else { 0.0 };
        *s = (w - cfg.lr * step, m, v);
    };
    for t in 0..3 {
        for (p, g) in [(&w, Tensor::from_slice(&gw[t]).reshape([2, 2])), (&b, Tensor::from_slice(&gb[t]))] {
            p.shallow_clone().zero_grad();
            (p * g.to_kind(Kind::Float)).sum(Kind::Float).backward();
        }
        opt.step(&params)?;
        for (s, &g) in hand_w.iter_mut().zip(&gw[t]) {
            by_hand(s, g, t as i32 + 1, true);
        }
        for (s, &g) in hand_b.iter_mut().zip(&gb[t]) {
            by_hand(s, g, t as i32 + 1, false);
        }
    }
    let u = f64::from(f32::EPSILON) / 2.0;
    for (name, p, hand) in [("w", &w, &hand_w), ("b", &b, &hand_b)] {
        let got = Vec::<f64>::try_from(p.to_kind(Kind::Double).reshape([-1]))?;
        for (i, (g, (want, _, _))) in got.iter().zip(hand.iter()).enumerate() {
            let bound = 3.0 * 16.0 * u * (want.abs() + cfg.lr);
            tolerance::check(&format!("AdamW {name}[{i}] after 3 steps"), (g - want).abs(), bound)?;
        }
    }
    Ok(())
}

#[test]
fn damaged_checkpoints_are_refused_naming_the_file_and_the_damage() -> Result<()> {
    // One good checkpoint of 2 ranks, then each damage on a copy of it; the load must fail on
    // every rank with a message naming what is wrong (never load something else, never hang).
    use ulysses::train::{Manifest, MANIFEST};
    let root = std::env::temp_dir().join(format!("ulysses-damaged-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let run = Run { steps: 1, ..Run::tiny(StrategyConfig::Ulysses, 1, Precision::F32, 1) };
    let plain = {
        let mut r = run.clone();
        r.plan.adamw = None;
        r.plan.zero = ulysses::train::ZeroStage::NONE;
        r
    };
    let save = |run: &Run, dir: &std::path::Path| -> Result<std::path::PathBuf> {
        let saved = launch(2, |ctx| -> Result<std::path::PathBuf> {
            let mut t = training::trainer(ctx.world(), run)?;
            training::steps(&mut t, run, 0, 1)?;
            Ok(t.save(dir, serde_json::json!({}))?)
        })?;
        Ok(saved[0].clone())
    };
    let good = save(&run, &root.join("good"))?;
    let without_optimizer = save(&plain, &root.join("plain"))?;
    let manifest = || -> Result<serde_json::Value> {
        Ok(serde_json::from_str(&std::fs::read_to_string(good.join(MANIFEST))?)?)
    };
    let shard1 = good.join("rank-00001.safetensors");
    let bytes1 = std::fs::read(&shard1)?;
    // A shard's bytes replaced, with the manifest's size and CRC made to match them.
    let replace_shard = |dir: &std::path::Path, bytes: &[u8]| -> Result<()> {
        std::fs::write(dir.join("rank-00001.safetensors"), bytes)?;
        let mut m = manifest()?;
        m["shards"][1]["bytes"] = serde_json::json!(bytes.len());
        m["shards"][1]["crc32"] = serde_json::json!(crc32fast::hash(bytes));
        std::fs::write(dir.join(MANIFEST), serde_json::to_string(&m)?)?;
        Ok(())
    };
    // The shard again without one of its tensors (a checkpoint of another layout).
    let fewer = {
        let st = safetensors::SafeTensors::deserialize(&bytes1)?;
        let mut named: Vec<(String, Tensor)> =
            st.tensors().into_iter().map(|(n, v)| Ok((n, Tensor::try_from(v)?))).collect::<Result<_>>()?;
        named.sort_by(|a, b| a.0.cmp(&b.0));
        let dropped = named.remove(0).0;
        let file = root.join("fewer.safetensors");
        Tensor::write_safetensors(&named, &file)?;
        (std::fs::read(&file)?, dropped)
    };
    type Damage<'a> = (&'a str, Box<dyn Fn(&std::path::Path) -> Result<()> + 'a>, String);
    let cases: Vec<Damage> = vec![
        (
            "not JSON",
            Box::new(|d| Ok(std::fs::write(d.join(MANIFEST), "{ step: 1")?)),
            "unreadable manifest".into(),
        ),
        (
            "another format",
            Box::new(|d| {
                let mut m = manifest()?;
                m["format"] = serde_json::json!(99);
                Ok(std::fs::write(d.join(MANIFEST), serde_json::to_string(&m)?)?)
            }),
            "format 99 (this library reads".into(),
        ),
        (
            "no shard listed for rank 1",
            Box::new(|d| {
                let mut m = manifest()?;
                if let Some(s) = m["shards"].as_array_mut() {
                    s.truncate(1);
                }
                Ok(std::fs::write(d.join(MANIFEST), serde_json::to_string(&m)?)?)
            }),
            "lists no shard for rank 1 (1 shards)".into(),
        ),
        (
            "truncated shard",
            Box::new(|d| Ok(std::fs::write(d.join("rank-00001.safetensors"), &bytes1[..bytes1.len() - 7])?)),
            format!("truncated or resized: {} bytes, the manifest says {}", bytes1.len() - 7, bytes1.len()),
        ),
        (
            "a flipped byte",
            Box::new(|d| {
                let mut b = bytes1.clone();
                let last = b.len() - 1;
                b[last] ^= 0x5a;
                Ok(std::fs::write(d.join("rank-00001.safetensors"), b)?)
            }),
            "corrupted: CRC-32".into(),
        ),
        (
            "not safetensors, valid CRC",
            Box::new(|d| replace_shard(d, &vec![7u8; bytes1.len()])),
            "not safetensors".into(),
        ),
        (
            "a damaged header, valid CRC",
            Box::new(|d| {
                let mut b = bytes1.clone();
                b[8] = b'#'; // the JSON header's first byte
                replace_shard(d, &b)
            }),
            "not safetensors".into(),
        ),
        ("a missing tensor", Box::new(|d| replace_shard(d, &fewer.0)), format!("has no tensor {}", fewer.1)),
    ];
    let copy = |from: &std::path::Path, to: &std::path::Path| -> Result<()> {
        std::fs::create_dir_all(to)?;
        for e in std::fs::read_dir(from)? {
            let e = e?;
            std::fs::copy(e.path(), to.join(e.file_name()))?;
        }
        Ok(())
    };
    // The good copy loads: the damages are what fails below.
    let steps = launch(2, |ctx| -> Result<u64> {
        let mut t = training::trainer(ctx.world(), &run)?;
        t.load(&good)?;
        Ok(t.steps_taken())
    })?;
    ensure!(steps == [1, 1], "{steps:?}");
    for (i, (what, damage, want)) in cases.iter().enumerate() {
        let dir = root.join(format!("case-{i}"));
        copy(&good, &dir)?;
        damage(&dir)?;
        let outcome = launch(2, |ctx| -> Result<()> {
            let mut t = training::trainer(ctx.world(), &run)?;
            t.load(&dir)?;
            Ok(())
        });
        let err = outcome.err().map(|e| e.to_string()).unwrap_or_default();
        ensure!(err.contains(want.as_str()), "{what}: {err:?} lacks {want:?}");
        ensure!(
            err.contains(&dir.display().to_string()),
            "{what}: {err:?} names no file in {}",
            dir.display()
        );
    }
    // Saved without an optimizer, loaded by a run that has one.
    let outcome = launch(2, |ctx| -> Result<()> {
        let mut t = training::trainer(ctx.world(), &run)?;
        t.load(&without_optimizer)?;
        Ok(())
    });
    let err = outcome.err().map(|e| e.to_string()).unwrap_or_default();
    ensure!(err.contains("saved without an optimizer, so it has no optimizer state"), "{err:?}");
    let _ = Manifest::read(&good)?;
    let _ = std::fs::remove_dir_all(&root);
    Ok(())
}
