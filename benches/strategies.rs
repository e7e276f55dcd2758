//! Every strategy against Ulysses on the local backend, P=4, one global batch: step time,
//! peak memory per rank and bytes sent per rank, as one table, also written as CSV
//! (`results/baselines_p4.csv`) for the experiments to reuse.
//!
//! Each strategy runs in its own process (`ulysses step`), so that memory readings do not mix.
//! Ulysses and Megatron-SP run libtorch's SDPA kernel; ring, all-gather KV and USP the
//! blockwise math kernel (with log-sum-exp merging), which skips the blocks the causal mask
//! hides. Run: `cargo bench --bench strategies` (`-- --quick` for a shorter sequence).

mod common;

use std::fmt::Write as _;
use std::process::Command;

use anyhow::{bail, Result};
use common::field;

fn main() -> Result<()> {
    let quick = std::env::args().any(|a| a == "--quick");
    let (preset, seq, ranks, steps) = ("tiny", if quick { 1024 } else { 4096 }, 4, if quick { 1 } else { 3 });
    let strategies = [
        "ulysses",
        "megatron_sp",
        "ring",
        "ring_zigzag",
        "allgather_kv",
        "allgather_kv_zigzag",
        "usp_zigzag:2",
    ];
    println!("== strategies at P={ranks} (threads), {preset}, N={seq}, b=1, f32, causal; medians of {steps} steps ==");
    println!(
        "{:<22} {:>10} {:>8} {:>16} {:>8} {:>16} {:>8} {:>12}",
        "strategy", "step ms", "vs U", "peak MiB/rank", "vs U", "sent B/rank", "vs U", "params MiB"
    );
    let mut csv = String::from(
        "strategy,preset,ranks,seq,batch,median_step_ms,step_vs_ulysses,tokens_per_s,step_peak_mib_per_rank,\
         memory_vs_ulysses,bytes_sent_per_rank,bytes_vs_ulysses,params_mib_per_rank,loss\n",
    );
    let mut base: Option<(f64, f64, f64)> = None;
    for strategy in strategies {
        let out = Command::new(env!("CARGO_BIN_EXE_ulysses"))
            .args(["step", "--preset", preset, "--seq", &seq.to_string(), "--ranks", &ranks.to_string()])
            .args(["--steps", &steps.to_string(), "--strategy", strategy])
            .output()?;
        let text = String::from_utf8_lossy(&out.stdout);
        let Some(summary) = text.lines().find(|l| l.starts_with("summary:")) else {
            bail!("{strategy}: {}{}", text, String::from_utf8_lossy(&out.stderr));
        };
        let (ms, mib, sent) = (
            field(summary, "median_step_ms")?,
            field(summary, "step_peak_mib_per_rank")?,
            field(summary, "bytes_sent_per_rank")?,
        );
        let (bms, bmib, bsent) = *base.get_or_insert((ms, mib, sent));
        let label =
            summary.split_whitespace().find_map(|kv| kv.strip_prefix("strategy=")).unwrap_or(strategy);
        println!(
            "{label:<22} {ms:>10.1} {:>7.2}x {mib:>16.1} {:>7.2}x {sent:>16.0} {:>7.2}x {:>12.2}",
            ms / bms,
            mib / bmib,
            sent / bsent,
            field(summary, "params_mib_per_rank")?
        );
        writeln!(
            csv,
            "{label},{preset},{ranks},{seq},1,{ms:.3},{:.4},{:.1},{mib:.2},{:.4},{sent:.0},{:.4},{:.3},{:.6}",
            ms / bms,
            field(summary, "tokens_per_s")?,
            mib / bmib,
            sent / bsent,
            field(summary, "params_mib_per_rank")?,
            field(summary, "loss")?
        )?;
    }
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("results");
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("baselines_p4.csv");
    std::fs::write(&path, csv)?;
    println!("(bytes: everything a rank sends per step, forward, backward and gradient sync; peak: process");
    println!(" peak RSS above the post-build RSS, divided by P) -> {}", path.display());
    Ok(())
}
