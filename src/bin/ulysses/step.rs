//! `ulysses step`: timed forward + backward (+ gradient sync) steps of the GPT on P ranks.

use std::time::Instant;

use anyhow::{bail, ensure, Result};
use tch::{Device, Kind, Tensor};
use ulysses::attention::{AttentionConfig, Kernel, Mask, StrategyConfig};

use crate::ranks::{on_ranks, BackendArg};
use ulysses::model::{shift_labels, Gpt, GptConfig};

#[derive(clap::Args)]
pub struct StepArgs {
    /// Model preset: tiny, 125m, 350m, 1.3b, 6.7b, 30b.
    #[arg(long, default_value = "tiny")]
    preset: String,
    /// Global sequence length N.
    #[arg(long, default_value_t = 256)]
    seq: i64,
    /// Micro-batch b.
    #[arg(long, default_value_t = 1)]
    batch: i64,
    /// Sequence-parallel ranks (threads).
    #[arg(long, default_value_t = 1)]
    ranks: usize,
    /// single (one device, plain autograd), ulysses, megatron_sp, ring, ring_zigzag,
    /// allgather_kv, allgather_kv_zigzag, usp:U or usp_zigzag:U (U = Ulysses degree).
    #[arg(long, default_value = "ulysses")]
    strategy: StrategyConfig,
    /// Attention kernel: math, sdpa or blocked.
    #[arg(long, default_value = "sdpa")]
    kernel: Kernel,
    /// Mask: none, causal, window:W, sparse:B,L,G or sparse-causal:B,L,G.
    #[arg(long, default_value = "causal")]
    mask: Mask,
    /// Timed steps, after one untimed warm-up step.
    #[arg(long, default_value_t = 3)]
    steps: usize,
    /// Parameter and activation dtype: f32, bf16 or f64.
    #[arg(long, default_value = "f32")]
    dtype: String,
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
}

/// A field of /proc/self/status in MiB (VmRSS, VmHWM), where Linux provides it.
fn status_mib(field: &str) -> Option<f64> {
    let text = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = text.lines().find(|l| l.starts_with(field))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

/// What each rank reports: its step times, the last loss, and (base, peak) RSS in MiB.
fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

pub fn run(a: &StepArgs) -> Result<()> {
    let cfg = GptConfig::preset(&a.preset)?;
    cfg.validate()?;
    let kind = match a.dtype.as_str() {
        "f32" => Kind::Float,
        "bf16" => Kind::BFloat16,
        "f64" => Kind::Double,
        other => bail!("--dtype {other:?}: use f32, bf16 or f64"),
    };
    ensure!(a.steps >= 1, "--steps must be at least 1");
    let attention = AttentionConfig::new(a.kernel, a.mask);
    let (n, b) = (a.seq, a.batch);
    println!(
        "{} ({:.1}M parameters), {} on {} rank(s) ({:?}), b={b} N={n}, {:?}, kernel {:?}, mask {:?}",
        a.preset,
        cfg.num_params() as f64 / 1e6,
        a.strategy.label(),
        a.ranks,
        a.backend,
        kind,
        a.kernel,
        a.mask
    );

    let per_rank = on_ranks(a.backend, a.ranks, a.threads, |ctx| -> Result<Vec<f64>> {
        let world = &ctx.world().clone().with_overlap(!a.no_overlap);
        let strategy = a.strategy.build(world, attention, n, cfg.n_head, cfg.n_kv_head)?;
        let layout = strategy.layout().clone();
        let model = Gpt::new(&cfg, strategy, kind, Device::Cpu)?;
        // Deterministic tokens, labels shifted over the global sequence, then this rank's share.
        let i = Tensor::arange(b * n, (Kind::Int64, Device::Cpu));
        let tokens = (&i * 7919 + 17).remainder(cfg.vocab_size).reshape([b, n]);
        let labels = shift_labels(&tokens)?;
        let (tokens, labels) = (layout.shard(&tokens, 1, ctx.rank())?, layout.shard(&labels, 1, ctx.rank())?);

        let step = || -> Result<f64> {
            model.zero_grad();
            Ok(model.forward_backward(&tokens, &labels)?.value)
        };
        // The process's memory once every rank has built its model: parameters and data.
        world.barrier()?;
        let base = status_mib("VmRSS:").unwrap_or(f64::NAN);
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
        let mut out = vec![loss, base, peak, sent as f64, model.params().numel() as f64];
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
    let steps: Vec<f64> = (0..a.steps).map(|s| max(5 + s)).collect();
    for (i, t) in steps.iter().enumerate() {
        println!("step {i}: {t:.1} ms");
    }
    let med = median(steps);
    let tokens_per_s = (b * n) as f64 / (med / 1e3);
    let param_mib = params * kind.elt_size_in_bytes() as f64 / (1 << 20) as f64;
    // Peak RSS above the RSS after the models were built: activations, gradients and buffers.
    // Threads share one process (divide by the ranks); an MPI rank is a process (take the max).
    let step_peak = match a.backend {
        BackendArg::Local => (peak - base) / ranks as f64,
        BackendArg::Mpi => per_rank.iter().map(|v| v[2] - v[1]).fold(f64::MIN, f64::max),
    };
    println!(
        "summary: strategy={} ranks={ranks} seq={n} batch={b} overlap={} median_step_ms={med:.3} tokens_per_s={tokens_per_s:.1} \
         loss={loss:.5} base_rss_mib={base:.1} peak_rss_mib={peak:.1} step_peak_mib_per_rank={step_peak:.1} \
         params_mib_per_rank={param_mib:.1} bytes_sent_per_rank={max_sent}",
        a.strategy.label(),
        !a.no_overlap,
    );
    Ok(())
}
