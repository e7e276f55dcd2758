//! Training benchmarks, each a ratio against a baseline measured in the same run.
//!
//! 1. Step time of activation checkpointing (full, selective) against none, Ulysses at P = 4
//!    (threads), interleaved in one process: tiny and 125M; the ideal of full recomputation is
//!    one extra forward, (1 + 2 + 1) / (1 + 2) = 1.33x of forward + backward. Also the bytes the
//!    recomputed forward moves again, against the Ulysses forward formula.
//! 2. Peak memory of the gradient reduction: the flat reduction the GPT used before (every
//!    gradient concatenated into one f32 buffer, then the all-reduce's slots and result) against
//!    the bucketed one, for two model sizes; each measurement in a fresh child process.
//!
//! Run: `cargo bench --bench train` (add `-- --quick` for fewer repetitions, `-- --only
//! checkpointing` or `-- --only memory` for one part). The memory by
//! ZeRO stage, on MPI processes, is `cargo bench --features mpi --bench zero_memory`.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use common::field;
use tch::{Device, Kind, Tensor};
use ulysses::attention::{AttentionConfig, StrategyConfig};
use ulysses::autograd::Tape;
use ulysses::comm::{launch, MeshShape, ReduceOp};
use ulysses::data::shard;
use ulysses::experiment::rss::{reset_peak, status_mib};
use ulysses::model::{Gpt, GptConfig};
use ulysses::train::{Checkpointing, TrainConfig, TrainGroups, Trainer};

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// Step times (forward, backward, gradient reduction; no update) of the three modes, and the
/// bytes each sent per rank and step over the SP group.
fn checkpointing(preset: &str, b: i64, n: i64, runs: usize) -> Result<()> {
    let cfg = GptConfig::preset(preset)?;
    let modes = [Checkpointing::None, Checkpointing::Full, Checkpointing::Selective];
    let out = launch(4, |ctx| -> Result<Vec<(Duration, u64)>> {
        let mesh = ctx.mesh(MeshShape::dp_sp(1, 4)?)?;
        // One model, its mode switched between steps (the gradients do not depend on it).
        let strategy = StrategyConfig::Ulysses.build(
            mesh.group("sp")?,
            AttentionConfig::default(),
            n,
            cfg.n_head,
            cfg.n_kv_head,
        )?;
        let model = Gpt::new(&cfg, strategy, Kind::Float, Device::Cpu)?;
        let mut trainer = Trainer::new(model, TrainGroups::new(&mesh)?, TrainConfig::default())?;
        let i = Tensor::arange(b * n, (Kind::Int64, Device::Cpu));
        let tokens = (&i * 7919 + 17).remainder(cfg.vocab_size).reshape([b, n]);
        let batch = shard(&tokens, trainer.model().strategy().layout(), ctx.rank())?;
        let sp = mesh.group("sp")?;
        let mut times: Vec<Vec<Duration>> = vec![Vec::new(); modes.len()];
        let mut bytes = vec![0; modes.len()];
        for rep in 0..runs + 1 {
            // Interleaved, so that drift on a noisy machine hits every mode alike.
            for (m, &mode) in modes.iter().enumerate() {
                trainer.set_checkpointing(mode);
                ctx.world().barrier()?;
                sp.reset_stats();
                let t0 = Instant::now();
                trainer.step(std::slice::from_ref(&batch))?;
                ctx.world().barrier()?;
                if rep > 0 {
                    times[m].push(t0.elapsed());
                }
                bytes[m] = sp.stats().bytes_sent();
            }
        }
        Ok(times.into_iter().map(median).zip(bytes).collect())
    })?;
    let r = &out[0];
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    // Ulysses' forward per layer and rank: (2Nh + 2N H_kv d)(P-1)/P^2 elements x b, f32.
    let (h, kvd, p) = (cfg.n_embd, cfg.n_kv_head * cfg.head_dim(), 4i64);
    let forward = cfg.n_layer * b * (2 * n * h + 2 * n * kvd) * (p - 1) / (p * p) * 4;
    println!(
        "{preset:>6} {b:>3} {n:>6} {runs:>5} {:>9.1} {:>9.1} {:>10.1} {:>9.3}x {:>10.3}x {:>12} {:>12} {:>12}",
        ms(r[0].0),
        ms(r[1].0),
        ms(r[2].0),
        r[1].0.as_secs_f64() / r[0].0.as_secs_f64(),
        r[2].0.as_secs_f64() / r[0].0.as_secs_f64(),
        r[0].1,
        r[1].1 - r[0].1,
        forward
    );
    Ok(())
}

/// The reduction the GPT used before the buckets: every gradient in one f32 buffer, all-reduced
/// at once (the all-reduce adds its P slots and its result), copied back.
fn flat_reduce(model: &Gpt, group: &ulysses::comm::Group) -> Result<()> {
    let grads: Vec<Tensor> = model.params().iter().map(|(_, p)| p.grad()).collect();
    let flat: Vec<Tensor> = grads.iter().map(|g| g.to_kind(Kind::Float).reshape([-1])).collect();
    let reduced = group.all_reduce(&Tensor::cat(&flat, 0), ReduceOp::Sum)?;
    let _no_grad = tch::no_grad_guard();
    let mut offset = 0;
    for g in &grads {
        let n = g.numel() as i64;
        g.shallow_clone().copy_(&reduced.narrow(0, offset, n).reshape(g.size()));
        offset += n;
    }
    Ok(())
}

/// In a child process: the peak RSS increase (MiB per rank) during one gradient reduction of a
/// GPT of `layers` blocks (h = 512, V = 8192, f32) at P = 2 (threads), `how` = flat or bucketed.
fn sync_child(how: &str, layers: i64) -> Result<()> {
    let cfg = GptConfig {
        n_layer: layers,
        n_embd: 512,
        n_head: 8,
        n_kv_head: 8,
        vocab_size: 8192,
        ..GptConfig::tiny()
    };
    let (b, n) = (1, 256);
    let peaks = launch(2, |ctx| -> Result<f64> {
        let strategy = StrategyConfig::Ulysses.build(ctx.world(), AttentionConfig::default(), n, 8, 8)?;
        let model = Gpt::new(&cfg, strategy, Kind::Float, Device::Cpu)?;
        let i = Tensor::arange(b * n, (Kind::Int64, Device::Cpu));
        let tokens = (&i * 7919 + 17).remainder(cfg.vocab_size).reshape([b, n]);
        let s = shard(&tokens, model.strategy().layout(), ctx.rank())?;
        let tape = Tape::new();
        let loss = model.loss(&tape, &s.tokens, &s.labels)?;
        model.backward(&tape, &loss)?;
        ctx.world().barrier()?;
        if ctx.rank() == 0 {
            reset_peak();
        }
        ctx.world().barrier()?;
        let base = status_mib("VmRSS:").unwrap_or(f64::NAN);
        match how {
            "flat" => flat_reduce(&model, ctx.world())?,
            _ => model.sync_gradients()?,
        }
        ctx.world().barrier()?;
        Ok(status_mib("VmHWM:").unwrap_or(f64::NAN) - base)
    })?;
    println!("peak_mib_per_rank={:.1} params={}", peaks[0] / 2.0, cfg.num_params());
    Ok(())
}

fn gradient_sync_memory() -> Result<()> {
    println!("\n== gradient reduction: peak RSS above the gradients, per rank (P=2 threads, f32, h=512, V=8192) ==");
    println!(
        "{:>7} {:>12} {:>14} {:>14} {:>10}",
        "layers", "params (M)", "flat MiB", "bucketed MiB", "grads MiB"
    );
    for layers in [4i64, 8, 16] {
        let mut row = Vec::new();
        let mut params = 0.0;
        for how in ["flat", "bucketed"] {
            let out = Command::new(std::env::current_exe()?)
                .args(["--sync-child", how, &layers.to_string()])
                .env("MALLOC_MMAP_THRESHOLD_", "65536")
                .output()?;
            let text = String::from_utf8_lossy(&out.stdout);
            let Some(line) = text.lines().find(|l| l.starts_with("peak_mib_per_rank=")) else {
                bail!("child failed: {text}{}", String::from_utf8_lossy(&out.stderr));
            };
            row.push(field(line, "peak_mib_per_rank")?);
            params = field(line, "params")?;
        }
        println!(
            "{layers:>7} {:>12.1} {:>14.1} {:>14.1} {:>10.1}",
            params / 1e6,
            row[0],
            row[1],
            params * 4.0 / (1 << 20) as f64
        );
    }
    println!(
        "(VmHWM during the reduction minus VmRSS before it, halved for the two thread ranks; glibc's mmap"
    );
    println!(" threshold fixed at 64 KiB so that freed buffers leave the RSS; bucket: 2^22 elements)");
    Ok(())
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--sync-child") {
        let how = args.get(i + 1).context("--sync-child flat|bucketed LAYERS")?;
        return sync_child(how, args.get(i + 2).context("layers")?.parse()?);
    }
    let quick = args.iter().any(|a| a == "--quick");
    // `-- --only checkpointing` or `-- --only memory` runs one part.
    let only = args.iter().position(|a| a == "--only").and_then(|i| args.get(i + 1)).map(String::as_str);
    if only == Some("memory") {
        return gradient_sync_memory();
    }
    println!("== activation checkpointing: step (forward, backward, gradient reduction), Ulysses P=4 threads, f32 ==");
    println!(
        "{:>6} {:>3} {:>6} {:>5} {:>9} {:>9} {:>10} {:>10} {:>11} {:>12} {:>12} {:>12}",
        "model",
        "b",
        "N",
        "runs",
        "none ms",
        "full ms",
        "select. ms",
        "full/none",
        "select/none",
        "sp B/step",
        "full extra B",
        "fwd formula"
    );
    checkpointing("tiny", 4, 4096, if quick { 3 } else { 9 })?;
    checkpointing("125m", 1, 256, if quick { 1 } else { 5 })?;
    println!("(medians; ideal full/none = 1.33: one more forward; 'full extra B' = bytes the recomputed forward sends");
    println!(" again per rank, against L b (2Nh + 2N H_kv d)(P-1)/P^2 x 4 B; selective reruns the attention cores only)");
    if only == Some("checkpointing") {
        return Ok(());
    }
    gradient_sync_memory()
}
