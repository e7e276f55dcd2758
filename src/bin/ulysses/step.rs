//! `ulysses step`: timed training steps of the GPT on P ranks (forward, backward, gradient
//! reduction, and with `--lr` or ZeRO an AdamW update), with the trainer's plan: precision,
//! ZeRO stage, activation checkpointing, accumulation, tiled loss.

use std::time::Instant;

use anyhow::{ensure, Result};
use tch::{Device, Kind, Tensor};
use ulysses::comm::{Mesh, MeshShape};
use ulysses::data::shard;
use ulysses::train::{
    AdamWConfig, Checkpointing, MemoryTimeline, Precision, Timeline, TrainConfig, TrainGroups, Trainer,
    ZeroStage,
};

use crate::args::{AttentionArgs, MemoryArgs};
use crate::ranks::{on_ranks, BackendArg};
use ulysses::cost::calibrate::LivePeak;
use ulysses::experiment::rss::{reset_peak, status_mib};
use ulysses::model::{Gpt, GptConfig};

#[derive(clap::Args)]
pub struct StepArgs {
    /// Model preset: tiny, 125m, 350m, 1.3b, 6.7b, 30b, llama-tiny, llama3-8b, llama3-70b.
    #[arg(long, default_value = "tiny")]
    preset: String,
    /// Override the preset's blocks.
    #[arg(long)]
    n_layer: Option<i64>,
    /// Override the preset's hidden size.
    #[arg(long)]
    n_embd: Option<i64>,
    /// Override the preset's heads (query and kv).
    #[arg(long)]
    n_head: Option<i64>,
    /// Override the preset's vocabulary.
    #[arg(long)]
    vocab: Option<i64>,
    /// Global sequence length N.
    #[arg(long, default_value_t = 256)]
    seq: i64,
    /// Micro-batch b.
    #[arg(long, default_value_t = 1)]
    batch: i64,
    /// Sequence-parallel ranks (threads).
    #[arg(long, default_value_t = 1)]
    ranks: usize,
    #[command(flatten)]
    attention: AttentionArgs,
    /// Timed steps, after one untimed warm-up step.
    #[arg(long, default_value_t = 3)]
    steps: usize,
    /// Precision: f32, bf16 or f16 (f32 master weights), f64.
    #[arg(long, default_value = "f32")]
    dtype: Precision,
    /// Data-parallel replicas (the SP degree is ranks / dp).
    #[arg(long, default_value_t = 1)]
    dp: usize,
    /// ZeRO stage over all ranks (1-3 imply an optimizer).
    #[arg(long, default_value_t = 0)]
    zero: u8,
    /// Activation checkpointing: none, full or selective.
    #[arg(long, default_value = "none")]
    checkpointing: Checkpointing,
    /// Update with AdamW at this learning rate (default: no update, or 1e-4 with ZeRO 1-3).
    #[arg(long)]
    lr: Option<f64>,
    /// Micro-batches per step.
    #[arg(long, default_value_t = 1)]
    grad_accum: usize,
    #[command(flatten)]
    memory: MemoryArgs,
    /// libtorch intra-op threads per rank.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// local: ranks as threads; mpi: this process is one rank (start with `ulysses launch`).
    #[arg(long, value_enum, default_value = "local")]
    backend: BackendArg,
    /// Run every transfer to completion before computing on (no communication/computation
    /// overlap), for comparison.
    #[arg(long)]
    no_overlap: bool,
    /// Write a memory timeline of the steps (warm-up included) to this CSV file: the allocator's
    /// live bytes above the built model every 200 us, each sample labelled with rank 0's phase
    /// (the forward or backward of a block, of the head and loss, the reductions and update),
    /// and print where the peak lies.
    #[arg(long)]
    memory_timeline: Option<std::path::PathBuf>,
}

/// The median of `v`.
fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

pub fn run(a: &StepArgs) -> Result<()> {
    let mut cfg = GptConfig::preset(&a.preset)?;
    cfg.n_layer = a.n_layer.unwrap_or(cfg.n_layer);
    cfg.n_embd = a.n_embd.unwrap_or(cfg.n_embd);
    cfg.vocab_size = a.vocab.unwrap_or(cfg.vocab_size);
    if let Some(h) = a.n_head {
        (cfg.n_head, cfg.n_kv_head) = (h, h);
    }
    cfg.validate()?;
    let kind = a.dtype.kind();
    ensure!(a.steps >= 1, "--steps must be at least 1");
    ensure!(a.dp >= 1 && a.ranks.is_multiple_of(a.dp), "--dp {} must divide --ranks {}", a.dp, a.ranks);
    let zero = ZeroStage::new(a.zero)?;
    let lr = a.lr.or(zero.partitions_optimizer().then_some(1e-4));
    let plan = TrainConfig {
        precision: a.dtype,
        zero,
        checkpointing: a.checkpointing,
        grad_accum: a.grad_accum,
        adamw: lr.map(|lr| AdamWConfig { lr, ..AdamWConfig::default() }),
        loss_tile: a.memory.loss_tile,
        mlp_tile: a.memory.mlp_tile,
        offload: a.memory.offload_target(),
        ..TrainConfig::default()
    };
    plan.validate()?;
    let attention = a.attention.config();
    let (n, b) = (a.seq, a.batch);
    println!(
        "{} ({:.1}M parameters), {} on {} rank(s) ({:?}, dp {}), b={b} N={n}, {} ZeRO-{} checkpointing {}, \
         AdamW {}, kernel {:?}, mask {:?}",
        a.preset,
        cfg.num_params() as f64 / 1e6,
        a.attention.strategy.label(),
        a.ranks,
        a.backend,
        a.dp,
        a.dtype.name(),
        a.zero,
        a.checkpointing.name(),
        lr.map_or("off".into(), |lr| format!("lr {lr}")),
        a.attention.kernel,
        a.attention.mask
    );

    let per_rank = on_ranks(a.backend, a.ranks, a.threads, |ctx| -> Result<Vec<f64>> {
        let world = &ctx.world().clone().with_overlap(!a.no_overlap);
        // The process's memory before any rank builds its model.
        world.barrier()?;
        let start = status_mib("VmRSS:").unwrap_or(f64::NAN);
        world.barrier()?;
        let mesh = Mesh::new(world, MeshShape::dp_sp(a.dp, a.ranks / a.dp)?)?;
        let kv_store = match a.memory.kv_offload_target() {
            Some(target) => Some(ulysses::model::Offload::new(target, Device::Cpu)?),
            None => None,
        };
        let strategy = a.attention.strategy.build_with_kv_store(
            mesh.group("sp")?,
            attention,
            n,
            cfg.n_head,
            cfg.n_kv_head,
            kv_store,
        )?;
        let layout = strategy.layout().clone();
        let model = Gpt::new(&cfg, strategy, kind, Device::Cpu)?;
        let mut trainer = Trainer::new(model, TrainGroups::new(&mesh)?, plan.clone())?;
        // Deterministic tokens (rank-dependent over replicas and micro-batches), labels shifted
        // over the global sequence, then this rank's share.
        let sp_rank = mesh.coord("sp")?;
        let batches = (0..a.grad_accum)
            .map(|m| {
                let index = (mesh.coord("dp")? * a.grad_accum + m) as i64;
                let i = Tensor::arange(b * n, (Kind::Int64, Device::Cpu));
                let tokens = (&i * 7919 + 17 + index * 1009).remainder(cfg.vocab_size).reshape([b, n]);
                Ok(shard(&tokens, &layout, sp_rank)?)
            })
            .collect::<Result<Vec<_>>>()?;
        // The timeline samples the process (every rank, as threads) with rank 0's phases.
        let timeline = (a.memory_timeline.is_some() && ctx.rank() == 0).then(|| {
            let t = MemoryTimeline::start(std::time::Duration::from_micros(200));
            trainer.observe(std::rc::Rc::new(t.marker()));
            t
        });
        let mut step = || -> Result<f64> { Ok(trainer.step(&batches)?.loss) };
        // The process's memory once every rank has built its model: parameters, optimizer
        // state and data; the peak counts from here (building holds transient copies).
        world.barrier()?;
        if a.backend == BackendArg::Mpi || ctx.rank() == 0 {
            reset_peak();
        }
        world.barrier()?;
        let base = status_mib("VmRSS:").unwrap_or(f64::NAN);
        // The allocator's live bytes too (the host's counterpart of a GPU allocator's peak): one
        // sampler per process, from here to the end of the steps (the timeline's, where it runs).
        let live = (a.backend == BackendArg::Mpi || ctx.rank() == 0).then(|| {
            let sampler = timeline.is_none().then(|| LivePeak::start(std::time::Duration::from_micros(200)));
            (sampler, ulysses::cost::calibrate::live_bytes())
        });
        world.barrier()?;
        step()?; // warm-up
        world.reset_rank_stats();
        let mut times = Vec::new();
        let mut loss = 0.0;
        for _ in 0..a.steps {
            let t0 = Instant::now();
            loss = step()?;
            world.barrier()?;
            times.push(t0.elapsed().as_secs_f64() * 1e3);
        }
        // Bytes this rank sent per step over every group, before the closing barrier.
        let sent = world.rank_stats().bytes_sent() / a.steps as u64;
        world.barrier()?;
        let peak = status_mib("VmHWM:").unwrap_or(f64::NAN);
        // What stays between steps (ZeRO-3: the partitions only, every gathered unit freed).
        let after = status_mib("VmRSS:").unwrap_or(f64::NAN);
        let params = trainer.model().params().numel() as f64;
        // The most bytes offload held off the device at once (0 without offload).
        let held = trainer.model().offload().map_or(0, |o| o.stats().peak_held_bytes) as f64;
        let live_peak_bytes = match (timeline, &live) {
            (Some(t), Some((_, base))) => {
                let t = t.finish();
                if let Some(path) = &a.memory_timeline {
                    report_timeline(&t, *base, path)?;
                }
                t.peak().map_or(f64::NAN, |(s, _)| s.live_bytes)
            }
            (_, Some((Some(sampler), _))) => sampler.read(),
            _ => f64::NAN,
        };
        let live_peak = live.map_or(f64::NAN, |(_, base)| (live_peak_bytes - base) / (1 << 20) as f64);
        let mut out = vec![loss, base, peak, sent as f64, params, start, after, held, live_peak];
        out.extend(times);
        Ok(out)
    })?;
    let Some(per_rank) = per_rank else { return Ok(()) };
    let ranks = per_rank.len();
    let r0 = &per_rank[0];
    let (loss, base, peak) = (r0[0], r0[1], r0[2]);
    let max = |i: usize| per_rank.iter().map(|v| v[i]).fold(f64::MIN, f64::max);
    let (max_sent, params) = (max(3) as u64, max(4));
    // The step time is the slowest rank's.
    let steps: Vec<f64> = (0..a.steps).map(|s| max(9 + s)).collect();
    for (i, t) in steps.iter().enumerate() {
        println!("step {i}: {t:.1} ms");
    }
    let med = median(steps);
    let tokens_per_s = (b * n) as f64 / (med / 1e3);
    let param_mib = params * kind.elt_size_in_bytes() as f64 / (1 << 20) as f64;
    // Peak RSS above the RSS after the models were built: activations, gradients and buffers;
    // and above the RSS before: the model states too. Threads share one process (divide by the
    // ranks); an MPI rank is a process (take the max over ranks).
    let per = |f: &dyn Fn(&Vec<f64>) -> f64| match a.backend {
        BackendArg::Local => f(r0) / ranks as f64,
        BackendArg::Mpi => per_rank.iter().map(f).fold(f64::MIN, f64::max),
    };
    let step_peak = per(&|v| v[2] - v[1]);
    let total_peak = per(&|v| v[2] - v[5]);
    let states = per(&|v| v[1] - v[5]);
    let after = per(&|v| v[6] - v[5]);
    // Live bytes (glibc's counters, sampled every 200 us) above those once the models were built.
    let live_peak = per(&|v| v[8]);
    println!(
        "summary: strategy={} ranks={ranks} seq={n} batch={b} overlap={} median_step_ms={med:.3} tokens_per_s={tokens_per_s:.1} \
         loss={loss:.5} base_rss_mib={base:.1} peak_rss_mib={peak:.1} step_peak_mib_per_rank={step_peak:.1} \
         built_mib_per_rank={states:.1} peak_above_start_mib_per_rank={total_peak:.1} \
         after_steps_mib_per_rank={after:.1} live_peak_mib_per_rank={live_peak:.1} \
         params_mib_per_rank={param_mib:.1} offloaded_mib_per_rank={:.1} bytes_sent_per_rank={max_sent}",
        a.attention.strategy.label(),
        !a.no_overlap,
        max(7) / (1 << 20) as f64,
    );
    Ok(())
}

/// Writes the timeline's CSV and prints its peak and the phases with the most live bytes (MiB
/// above `base`, the live bytes once the models were built).
fn report_timeline(t: &Timeline, base: f64, path: &std::path::Path) -> Result<()> {
    use anyhow::Context;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(path, t.to_csv(base)).with_context(|| format!("cannot write {}", path.display()))?;
    let mib = |b: f64| (b - base) / (1 << 20) as f64;
    if let Some((s, phase)) = t.peak() {
        println!(
            "memory timeline: {} samples -> {}; peak {:.1} MiB live above the built model (the process) at {:.0} ms, in {phase}",
            t.samples.len(),
            path.display(),
            mib(s.live_bytes),
            s.t_ms
        );
    }
    let mut phases = t.by_phase();
    phases.sort_by(|x, y| y.1.total_cmp(&x.1));
    for (name, most, n) in phases.iter().take(6) {
        println!("  {:>8.1} MiB at most in {name} ({n} samples)", mib(*most));
    }
    Ok(())
}
