//! Rank-level checks of the trainer, run on threads (tests/conformance.rs) and on MPI processes
//! (tests/mpi.rs): ZeRO 1-3 against ZeRO 0, resuming from a checkpoint bit for bit, loading at
//! another layout, and bad checkpoints refused with the file named.

use std::path::{Path, PathBuf};

use anyhow::{ensure, Result};
use tch::Tensor;
use ulysses::attention::StrategyConfig;
use ulysses::comm::Group;
use ulysses::train::Precision;

use super::max_diff;
use super::training::{self, Run};

/// Data-parallel replicas at this world size: 2 where SP 2 x DP 2 or more fits.
fn dp_of(g: &Group) -> usize {
    if g.size() >= 4 && g.size().is_multiple_of(2) {
        2
    } else {
        1
    }
}

fn exact(label: &str, got: &[(String, Tensor)], want: &[(String, Tensor)]) -> Result<()> {
    for ((name, a), (_, b)) in got.iter().zip(want) {
        ensure!(a.equal(b), "{label}: {name} differs by {:.3e}", max_diff(a, b));
    }
    ensure!(got.len() == want.len(), "{label}: {} vs {} parameters", got.len(), want.len());
    Ok(())
}

/// A scratch folder every rank agrees on (rank 0's process id and clock, broadcast).
fn shared_dir(g: &Group, name: &str) -> Result<PathBuf> {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.subsec_nanos();
    let mine = Tensor::from_slice(&[i64::from(std::process::id()), i64::from(nanos)]);
    let id = Vec::<i64>::try_from(g.broadcast(&mine, 0)?)?;
    Ok(std::env::temp_dir().join(format!("ulysses-ckpt-{}-{}-{name}-p{}", id[0], id[1], g.size())))
}

/// Rank 0 removes a scratch folder once every rank is done with it.
fn remove(g: &Group, dir: &Path) -> Result<()> {
    g.barrier()?;
    if g.rank() == 0 {
        let _ = std::fs::remove_dir_all(dir);
    }
    Ok(())
}

/// ZeRO 1, 2 and 3 give the parameters and losses of ZeRO 0 after 3 AdamW steps, f64, bit for
/// bit (DP 2 x SP P/2 where it fits).
pub fn zero(g: &Group) -> Result<()> {
    let dp = dp_of(g);
    let (loss0, want) = training::train(g, &Run::tiny(StrategyConfig::Ulysses, dp, Precision::F64, 0))?;
    for stage in 1..=3 {
        let (loss, got) = training::train(g, &Run::tiny(StrategyConfig::Ulysses, dp, Precision::F64, stage))?;
        let label = format!("P={} dp={dp} ZeRO-{stage}", g.size());
        ensure!(loss == loss0, "{label}: losses {loss:?} vs {loss0:?}");
        exact(&label, &got, &want)?;
    }
    Ok(())
}

/// Full and selective activation checkpointing against none, f64, one step (ZeRO 0 and 3):
/// bit-identical parameters for Ulysses, and Megatron-SP and zigzag ring attention where P divides
/// the heads and the sequence.
pub fn checkpointing(g: &Group) -> Result<()> {
    // Ring attention and Megatron-SP (4 heads) where P divides N = 32 and the heads.
    let mut strategies = vec![StrategyConfig::Ulysses];
    if 4usize.is_multiple_of(g.size()) {
        strategies.extend([StrategyConfig::Ring { zigzag: true }, StrategyConfig::MegatronSp]);
    }
    for strategy in strategies {
        for stage in [0u8, 3] {
            let base = Run { steps: 1, ..Run::tiny(strategy, 1, Precision::F64, stage) };
            let (loss0, want) = training::train(g, &base)?;
            for mode in [ulysses::train::Checkpointing::Full, ulysses::train::Checkpointing::Selective] {
                let (loss, got) = training::train(g, &base.clone().checkpointing(mode))?;
                let label = format!("{} P={} ZeRO-{stage} {mode:?}", strategy.label(), g.size());
                ensure!(loss == loss0, "{label}: loss {loss:?} vs {loss0:?}");
                exact(&label, &got, &want)?;
            }
        }
    }
    Ok(())
}

/// Four steps without a break against two steps, a checkpoint, a fresh trainer loading it and
/// two more steps: the same losses and parameters, bit for bit, for ZeRO 0-3 in f32 and bf16.
pub fn resume(g: &Group) -> Result<()> {
    let root = shared_dir(g, "resume")?;
    let dp = dp_of(g);
    for precision in [Precision::F32, Precision::Bf16] {
        for stage in 0..=3 {
            let run = Run { steps: 4, ..Run::tiny(StrategyConfig::Ulysses, dp, precision, stage) };
            let label = format!("P={} dp={dp} {precision:?} ZeRO-{stage}", g.size());
            let mut whole = training::trainer(g, &run)?;
            let want = training::steps(&mut whole, &run, 0, 4)?;
            let want_params = whole.parameters()?;
            drop(whole);
            let mut first = training::trainer(g, &run)?;
            let mut got = training::steps(&mut first, &run, 0, 2)?;
            let dir = first.save(&root.join(&label), serde_json::json!({ "next_step": 2 }))?;
            drop(first);
            let mut second = training::trainer(g, &run)?;
            let m = second.load(&dir)?;
            ensure!(m.step == 2 && second.steps_taken() == 2, "{label}: resumed at step {}", m.step);
            got.extend(training::steps(&mut second, &run, 2, 4)?);
            ensure!(got == want, "{label}: resumed losses {got:?}, uninterrupted {want:?}");
            exact(&format!("{label} resumed"), &second.parameters()?, &want_params)?;
        }
    }
    remove(g, &root)
}

/// A checkpoint of Ulysses with ZeRO-1 loaded by another stage, another DP x SP split and
/// Megatron-SP: the same parameters (each rank's share of them); at the same DP the next step
/// continues the run (bit for bit under another ZeRO stage, to rounding under another strategy).
pub fn reshard(g: &Group) -> Result<()> {
    let root = shared_dir(g, "reshard")?;
    let base = Run { steps: 3, ..Run::tiny(StrategyConfig::Ulysses, 1, Precision::F32, 1) };
    let mut t = training::trainer(g, &base)?;
    training::steps(&mut t, &base, 0, 2)?;
    let saved = t.parameters()?;
    let dir = t.save(&root, serde_json::json!({ "next_step": 2 }))?;
    let next = training::steps(&mut t, &base, 2, 3)?[0];
    drop(t);
    let mut targets = vec![(3u8, 1usize, StrategyConfig::Ulysses), (2, dp_of(g), StrategyConfig::Ulysses)];
    if 4usize.is_multiple_of(g.size()) {
        targets.push((0, 1, StrategyConfig::MegatronSp)); // 4 heads over P ranks
    }
    for (stage, dp, strategy) in targets {
        let run = Run { dp, ..Run::tiny(strategy, dp, Precision::F32, stage) };
        let label = format!("P={} -> {} dp={dp} ZeRO-{stage}", g.size(), strategy.label());
        let mut t = training::trainer(g, &run)?;
        t.load(&dir)?;
        for ((name, got), (_, full)) in t.parameters()?.iter().zip(&saved) {
            let (_, p) = t
                .model()
                .params()
                .all()
                .iter()
                .map(|p| (&p.name, &p.placement))
                .find(|(n, _)| *n == name)
                .expect("param");
            let want = training::part_of(full, p);
            ensure!(
                got.equal(&want),
                "{label}: {name} differs after loading by {:.3e}",
                max_diff(got, &want)
            );
        }
        if dp == 1 {
            let loss = training::steps(&mut t, &run, 2, 3)?[0];
            if strategy == StrategyConfig::Ulysses {
                ensure!(loss == next, "{label}: next loss {loss} vs {next}");
            } else {
                // The same parameters through another strategy: the forward's rounding only.
                let bound = super::tolerance::gpt(&run.model, run.n, run.b * run.n, tch::Kind::Float).loss;
                super::tolerance::check(&format!("{label}: next loss"), (loss - next).abs(), bound * next)?;
            }
        }
    }
    remove(g, &root)
}

/// A corrupted, truncated or missing shard, a missing manifest, another model and another
/// precision: refused on every rank (no hang), each error naming the file or what differs.
pub fn bad_checkpoints(g: &Group) -> Result<()> {
    let root = shared_dir(g, "bad")?;
    let run = Run { steps: 1, ..Run::tiny(StrategyConfig::Ulysses, 1, Precision::F32, 2) };
    let last = g.size() - 1;
    let shard = format!("rank-{last:05}.safetensors");
    type Damage = fn(&Path, &str) -> std::io::Result<()>;
    let cases: [(&str, Damage, &str); 4] = [
        (
            "corrupted",
            |d, s| {
                let p = d.join(s);
                let mut bytes = std::fs::read(&p)?;
                let i = bytes.len() - 3;
                bytes[i] ^= 0x55;
                std::fs::write(p, bytes)
            },
            "corrupted: CRC-32",
        ),
        (
            "truncated",
            |d, s| {
                let p = d.join(s);
                let bytes = std::fs::read(&p)?;
                std::fs::write(p, &bytes[..bytes.len() / 2])
            },
            "truncated or resized",
        ),
        ("missing", |d, s| std::fs::remove_file(d.join(s)), "missing or unreadable"),
        ("no manifest", |d, _| std::fs::remove_file(d.join("manifest.json")), "cannot read the manifest"),
    ];
    for (name, damage, says) in cases {
        let mut t = training::trainer(g, &run)?;
        training::steps(&mut t, &run, 0, 1)?;
        let dir = t.save(&root.join(name.replace(' ', "_")), serde_json::json!({}))?;
        if g.rank() == 0 {
            damage(&dir, &shard)?;
        }
        g.barrier()?;
        let err = t.load(&dir).err().map(|e| e.to_string()).unwrap_or_default();
        // The rank that reads the file says what is wrong with it; the others name it.
        let own = g.rank() == last || name == "no manifest";
        let want = if own { says } else { shard.as_str() };
        ensure!(
            err.contains(want) && (name == "no manifest" || err.contains(&shard)),
            "{name}: rank {}: {err}",
            g.rank()
        );
        g.barrier()?;
    }
    // Another model, another precision.
    let mut t = training::trainer(g, &run)?;
    training::steps(&mut t, &run, 0, 1)?;
    let dir = t.save(&root.join("good"), serde_json::json!({}))?;
    let mut deeper = run.clone();
    deeper.model.n_layer = 3;
    let err = training::trainer(g, &deeper)?.load(&dir).err().map(|e| e.to_string()).unwrap_or_default();
    ensure!(err.contains("saved from another model (n_layer: saved 2, now 3)"), "{err}");
    let mut half = run.clone();
    half.plan.precision = Precision::Bf16;
    let err = training::trainer(g, &half)?.load(&dir).err().map(|e| e.to_string()).unwrap_or_default();
    ensure!(err.contains("saved in f32, this run is bf16"), "{err}");
    remove(g, &root)
}

/// Stages 0-1: with overlap each gradient bucket's reduction starts as soon as the backward has
/// finished the model units it holds, the last blocks' first; the parameters after 2 AdamW steps
/// equal those of the blocking reduction (overlap off) bit for bit. 4 blocks and buckets of 997
/// elements (a prime: they straddle parameters and units), so that many start in the backward;
/// the bucket holding the embedding (first in the flat order, final only when the backward
/// ends) starts last.
pub fn gradient_buckets(g: &Group) -> Result<()> {
    for stage in [0u8, 1] {
        let mut run = Run { steps: 2, ..Run::tiny(StrategyConfig::Ulysses, 1, Precision::F32, stage) };
        run.model.n_layer = 4;
        run.plan.bucket_elems = 997;
        let label = format!("P={} ZeRO-{stage}", g.size());
        let mut on = training::trainer(g, &run)?;
        let losses = training::steps(&mut on, &run, 0, run.steps)?;
        let early = on.zero().started_in_backward.borrow().clone();
        let w = g.size() as i64;
        let bucket = if 997 >= w { 997 - 997 % w } else { 997 };
        let total = (on.zero().units[0].padded + bucket - 1) / bucket;
        let blocking = g.clone().with_overlap(false);
        let mut off = training::trainer(&blocking, &run)?;
        let want = training::steps(&mut off, &run, 0, run.steps)?;
        ensure!(losses == want, "{label}: losses {losses:?} with overlap, {want:?} without");
        exact(&label, &on.parameters()?, &off.parameters()?)?;
        ensure!(
            off.zero().started_in_backward.borrow().is_empty(),
            "{label}: buckets started in the backward without overlap"
        );
        // Most buckets start in the backward; those of the blocks in the order the blocks
        // finish (the last first). The first bucket (the embedding's) and the last (the final
        // norm's, with the padding) are final only when the backward ends.
        ensure!(
            early.len() as i64 > total / 2 && early.len() as i64 <= total,
            "{label}: {} of {total} buckets started in the backward",
            early.len()
        );
        let blocks: Vec<usize> = early.iter().copied().filter(|&i| i != 0 && i as i64 != total - 1).collect();
        ensure!(blocks.windows(2).all(|p| p[0] > p[1]), "{label}: buckets started in the order {early:?}");
    }
    Ok(())
}
