//! `ulysses step`: timed forward + backward (+ gradient sync) steps of the GPT on P ranks.

use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Result};
use tch::{Device, Kind, Tensor};
use ulysses::attention::{AttentionConfig, Kernel, Mask, StrategyConfig};
use ulysses::comm::LocalLaunch;
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
}

/// A field of /proc/self/status in MiB (VmRSS, VmHWM), where Linux provides it.
fn status_mib(field: &str) -> Option<f64> {
    let text = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = text.lines().find(|l| l.starts_with(field))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

/// What each rank reports: its step times, the last loss, and (base, peak) RSS in MiB.
struct RankResult {
    times: Vec<Duration>,
    loss: f64,
    memory: Option<(f64, f64)>,
    /// Bytes sent per step (forward, backward, gradient sync), this rank, every group.
    sent: u64,
    /// Parameters held by this rank.
    params: i64,
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
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
        "{} ({:.1}M parameters), {} on {} rank(s), b={b} N={n}, {:?}, kernel {:?}, mask {:?}",
        a.preset,
        cfg.num_params() as f64 / 1e6,
        a.strategy.label(),
        a.ranks,
        kind,
        a.kernel,
        a.mask
    );

    let launch = LocalLaunch::new(a.ranks).threads_per_rank(a.threads);
    let times = launch.run(|ctx| -> Result<RankResult> {
        let world = ctx.world();
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
        let base = status_mib("VmRSS:");
        world.barrier()?;
        step()?; // warm-up
        world.reset_rank_stats();
        let mut times = Vec::new();
        let mut loss = 0.0;
        for _ in 0..a.steps {
            let t0 = Instant::now();
            loss = step()?;
            world.barrier()?;
            times.push(t0.elapsed());
        }
        // Bytes this rank sent per step over every group, before the closing barrier.
        let sent = world.rank_stats().bytes_sent() / a.steps as u64;
        world.barrier()?;
        let memory = base.zip(status_mib("VmHWM:"));
        Ok(RankResult { times, loss, memory, sent, params: model.params().numel() })
    })?;

    let RankResult { times: steps, loss, memory, .. } = &times[0];
    let max_sent = times.iter().map(|t| t.sent).max().unwrap_or(0);
    let params = times.iter().map(|t| t.params).max().unwrap_or(0);
    for (i, t) in steps.iter().enumerate() {
        println!("step {i}: {:.1} ms", t.as_secs_f64() * 1e3);
    }
    let med = median(steps.clone());
    let tokens_per_s = (b * n) as f64 / med.as_secs_f64();
    let param_mib = params as f64 * kind.elt_size_in_bytes() as f64 / (1 << 20) as f64;
    // Peak RSS of the whole process (every rank) above its RSS after the models were built:
    // activations, gradients and communication buffers of all ranks; divided by P per rank.
    let (base, peak) = memory.unwrap_or((f64::NAN, f64::NAN));
    println!(
        "summary: strategy={} ranks={} seq={n} batch={b} median_step_ms={:.3} tokens_per_s={tokens_per_s:.1} \
         loss={loss:.5} base_rss_mib={base:.1} peak_rss_mib={peak:.1} step_peak_mib_per_rank={:.1} \
         params_mib_per_rank={param_mib:.1} bytes_sent_per_rank={max_sent}",
        a.strategy.label(),
        a.ranks,
        med.as_secs_f64() * 1e3,
        (peak - base) / a.ranks as f64
    );
    Ok(())
}
