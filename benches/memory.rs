//! Memory per rank of one GPT training step, each strategy on P=4 thread ranks: what the forward
//! leaves alive for the backward (activations, the tape's records) and the peak of the whole
//! step. The measurement behind the tape's "keep only what the adjoint needs" and Megatron-SP's
//! re-gather in the backward (docs/strategies.md, "Memory").
//!
//! Convention: host RSS of the process (Linux /proc/self/status), divided by the P ranks that
//! share it; each configuration runs in its own child process (this bench re-run with `--one`),
//! after a warm-up step, so that gradients and libtorch's caches already exist. glibc is told to
//! map every allocation of 128 KiB or more on its own (`M_MMAP_THRESHOLD`), so that freed
//! tensors leave the RSS at once and it follows live memory.
//!
//! - `fwd MiB/rank`: RSS after the forward (loss computed, tape recorded) minus the RSS before.
//! - `peak MiB/rank`: peak RSS during forward and backward minus the RSS before the forward.
//!
//! Run: `cargo bench --bench memory` (`-- --quick` for a shorter sequence).

use std::process::Command;

use anyhow::{bail, Context, Result};
use tch::{Device, Kind, Tensor};
use ulysses::attention::{AttentionConfig, StrategyConfig};
use ulysses::autograd::Tape;
use ulysses::comm::launch;
use ulysses::model::{shift_labels, Gpt, GptConfig};

/// The model: 4 layers, h = 256, 8 heads (wide enough that activations dominate).
fn config() -> GptConfig {
    GptConfig { n_layer: 4, n_embd: 256, n_head: 8, n_kv_head: 8, ..GptConfig::tiny() }
}

/// A field of /proc/self/status in MiB.
fn status_mib(field: &str) -> Result<f64> {
    let text = std::fs::read_to_string("/proc/self/status")?;
    let line = text.lines().find(|l| l.starts_with(field)).with_context(|| format!("no {field}"))?;
    let kb: f64 = line.split_whitespace().nth(1).context("no value")?.parse()?;
    Ok(kb / 1024.0)
}

/// Hands freed heap memory back and resets the peak RSS to the current RSS.
fn settle() -> Result<()> {
    // SAFETY: malloc_trim takes no pointer and only walks glibc's own arenas.
    unsafe {
        libc::malloc_trim(0);
    }
    std::fs::write("/proc/self/clear_refs", "5").context("cannot reset the peak RSS")?;
    Ok(())
}

/// One configuration, in this process: prints `result: fwd=<MiB> peak=<MiB>` per rank.
fn one(strategy: StrategyConfig, p: usize, n: i64) -> Result<()> {
    // SAFETY: mallopt only sets a glibc tuning parameter; no allocation is live across it that
    // depends on the old value.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024);
    }
    let cfg = config();
    let out = launch(p, |ctx| -> Result<(f64, f64)> {
        let w = ctx.world();
        let s = strategy.build(w, AttentionConfig::default(), n, cfg.n_head, cfg.n_kv_head)?;
        let layout = s.layout().clone();
        let model = Gpt::new(&cfg, s, Kind::Float, Device::Cpu)?;
        let i = Tensor::arange(n, (Kind::Int64, Device::Cpu));
        let tokens = (&i * 7919 + 17).remainder(cfg.vocab_size).reshape([1, n]);
        let labels = shift_labels(&tokens)?;
        let (tokens, labels) = (layout.shard(&tokens, 1, w.rank())?, layout.shard(&labels, 1, w.rank())?);
        let step = |measure: bool| -> Result<(f64, f64)> {
            model.zero_grad();
            w.barrier()?;
            if measure && w.rank() == 0 {
                settle()?;
            }
            w.barrier()?;
            let base = status_mib("VmRSS:")?;
            let tape = Tape::new();
            let loss = model.loss(&tape, &tokens, &labels)?;
            w.barrier()?;
            let fwd = status_mib("VmRSS:")? - base;
            w.barrier()?;
            tape.backward(&loss.local)?;
            model.sync_gradients()?;
            w.barrier()?;
            Ok((fwd, status_mib("VmHWM:")? - base))
        };
        step(false)?; // warm-up: gradients and caches
        step(true)
    })?;
    let (fwd, peak) = out[0];
    println!("result: fwd={:.2} peak={:.2}", fwd / p as f64, peak / p as f64);
    Ok(())
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--one") {
        let strategy: StrategyConfig = args[i + 1].parse().map_err(anyhow::Error::msg)?;
        return one(strategy, args[i + 2].parse()?, args[i + 3].parse()?);
    }
    let quick = args.iter().any(|a| a == "--quick");
    let n: i64 = if quick { 2048 } else { 8192 };
    let cfg = config();
    println!(
        "== memory per rank of one step: GPT L={} h={} H={}, N={n}, b=1, f32, causal, SDPA; host RSS / P ==",
        cfg.n_layer, cfg.n_embd, cfg.n_head
    );
    println!("{:<22} {:>3} {:>14} {:>15}", "strategy", "P", "fwd MiB/rank", "peak MiB/rank");
    let runs = [
        ("single", 1usize),
        ("ulysses", 4),
        ("megatron_sp", 4),
        ("ring_zigzag", 4),
        ("allgather_kv_zigzag", 4),
        ("usp_zigzag:2", 4),
    ];
    for (strategy, p) in runs {
        let out = Command::new(std::env::current_exe()?)
            .args(["--one", strategy, &p.to_string(), &n.to_string()])
            .output()?;
        let text = String::from_utf8_lossy(&out.stdout);
        let Some(line) = text.lines().find(|l| l.starts_with("result:")) else {
            bail!("{strategy}: {text}{}", String::from_utf8_lossy(&out.stderr));
        };
        let get = |key: &str| -> Result<f64> {
            let v = line.split_whitespace().find_map(|kv| kv.strip_prefix(key)).context("field")?;
            Ok(v.parse()?)
        };
        println!("{strategy:<22} {p:>3} {:>14.1} {:>15.1}", get("fwd=")?, get("peak=")?);
    }
    println!("(fwd: RSS after the forward minus before, what is kept for the backward; peak: during");
    println!(" forward and backward; both divided by the ranks sharing the process)");
    Ok(())
}
