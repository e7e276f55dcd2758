//! The longest sequence that fits a memory budget per rank, found on real runs, one technique
//! switched on after another, beside the cost model's answer to the same question.
//!
//! Each probe is one training step (after a warm-up step) of `ulysses step` in a process of its
//! own: a Llama (the `llama-tiny` preset with 4 layers and a 2048-token vocabulary, so that the
//! vocabulary is 32 times the width, as Llama-3-8B's is), Ulysses or chunked Ulysses on 4
//! thread ranks, f32, no optimizer. Memory is the allocator's live bytes (glibc's counters,
//! sampled every 200 us: the host's counterpart of a GPU allocator's peak of allocated bytes)
//! above those once the models are built, per rank: what the step adds to the parameters. Host
//! RSS is printed beside it but not used: glibc keeps freed memory in its arenas, so the
//! resident peak falls far less than the bytes a technique frees.
//!
//! The search doubles N from 2048 until a step no longer fits, then bisects to 1024 tokens. The
//! cost model answers the same question with the same granule from this machine's CPU preset:
//! the live peak it predicts (`MemoryReport::peak_bytes` less the parameters) against the
//! budget; and predicts the live peak and the step time at the measured longest N.
//!
//! Run: `cargo bench --bench max_seq` (`-- --budget-mib M` for another budget, `-- --quick` for
//! the first two rungs only, `-- --only TEXT` for the rungs whose name contains TEXT,
//! `-- --predicted-at N` for the model's side alone: each rung's longest N predicted and its
//! predicted live bytes at N, no runs). Writes `results/max_seq/summary.csv`.

mod common;

use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::Command;

use anyhow::{bail, Result};
use common::field;
use ulysses::attention::StrategyConfig;
use ulysses::cost::{predict, Hardware, Job};
use ulysses::model::GptConfig;
use ulysses::train::{Checkpointing, Precision};

const RANKS: usize = 4;
const GRANULE: i64 = 1024;
const TILE: i64 = 256;

/// One rung of the ladder: its name, `ulysses step` flags, and the job the cost model prices.
struct Rung {
    name: &'static str,
    flags: Vec<&'static str>,
    strategy: &'static str,
    checkpointing: Checkpointing,
    loss_tile: bool,
    mlp_tile: bool,
    offload: bool,
    /// Chunked Ulysses' own offload (FPDT: each chunk's q, K/V, output and log-sum-exp).
    offload_kv: bool,
}

fn ladder() -> Vec<Rung> {
    let rung = |name, strategy, checkpointing, loss_tile, mlp_tile, offload, offload_kv| {
        let mut flags = vec!["--strategy", strategy];
        if checkpointing == Checkpointing::Full {
            flags.extend(["--checkpointing", "full"]);
        }
        if loss_tile {
            flags.extend(["--loss-tile", "256"]);
        }
        if mlp_tile {
            flags.extend(["--mlp-tile", "256"]);
        }
        if offload {
            flags.extend(["--offload", "disk"]);
        }
        if offload_kv {
            flags.extend(["--offload-kv", "disk"]);
        }
        Rung { name, flags, strategy, checkpointing, loss_tile, mlp_tile, offload, offload_kv }
    };
    let (none, full) = (Checkpointing::None, Checkpointing::Full);
    vec![
        rung("Ulysses", "ulysses", none, false, false, false, false),
        rung("+ full checkpointing", "ulysses", full, false, false, false, false),
        rung("+ tiled loss", "ulysses", full, true, false, false, false),
        rung("+ tiled MLP", "ulysses", full, true, true, false, false),
        rung("+ offload (disk)", "ulysses", full, true, true, true, false),
        rung("chunked Ulysses u = 4, all of the above", "ulysses_chunked:4", full, true, true, true, false),
        rung("+ its chunks offloaded (FPDT, disk)", "ulysses_chunked:4", full, true, true, true, true),
    ]
}

fn model() -> Result<GptConfig> {
    let mut cfg = GptConfig::preset("llama-tiny")?;
    cfg.n_layer = 4;
    cfg.vocab_size = 2048;
    Ok(cfg)
}

/// (live MiB per rank, RSS MiB per rank, step ms) of one step at `n`.
fn measure(rung: &Rung, n: i64) -> Result<(f64, f64, f64)> {
    let n_arg = n.to_string();
    let ranks = RANKS.to_string();
    let mut args = vec![
        "step",
        "--preset",
        "llama-tiny",
        "--n-layer",
        "4",
        "--vocab",
        "2048",
        "--ranks",
        &ranks,
        "--seq",
        &n_arg,
        "--steps",
        "1",
    ];
    args.extend(rung.flags.iter().copied());
    let out = Command::new(env!("CARGO_BIN_EXE_ulysses")).args(&args).output()?;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let Some(summary) = text.lines().find(|l| l.starts_with("summary:")) else {
        bail!("ulysses {} failed: {}{}", args.join(" "), text, String::from_utf8_lossy(&out.stderr));
    };
    Ok((
        field(summary, "live_peak_mib_per_rank")?,
        field(summary, "step_peak_mib_per_rank")?,
        field(summary, "median_step_ms")?,
    ))
}

fn job(rung: &Rung, n: i64) -> Result<Job> {
    Ok(Job {
        precision: Precision::F32,
        checkpointing: rung.checkpointing,
        optimizer: false,
        backend: "local".into(),
        loss_tile: rung.loss_tile.then_some(TILE),
        mlp_tile: rung.mlp_tile.then_some(TILE),
        offload: rung.offload,
        kv_offload: rung.offload_kv,
        ..Job::new(model()?, rung.strategy.parse::<StrategyConfig>().map_err(anyhow::Error::msg)?, RANKS, n)
    })
}

/// (predicted live MiB per rank above the parameters, predicted step ms) at `n`.
fn predicted(rung: &Rung, n: i64, hw: &Hardware) -> Result<(f64, f64)> {
    let p = predict(&job(rung, n)?, hw)?;
    let params = p.memory.states.first().map_or(0.0, |t| t.bytes);
    Ok(((p.memory.peak_bytes - params) / (1u64 << 20) as f64, p.step_s * 1e3))
}

/// The longest N (a multiple of the granule) for which `fits(N)` holds: doubling from 2048,
/// then bisecting. `None` if 2048 does not fit.
fn longest(mut fits: impl FnMut(i64) -> Result<bool>) -> Result<Option<i64>> {
    let mut lo = 2048;
    if !fits(lo)? {
        return Ok(None);
    }
    let mut hi = lo * 2;
    while fits(hi)? {
        lo = hi;
        hi *= 2;
    }
    while hi - lo > GRANULE {
        let mid = (lo + hi) / 2 / GRANULE * GRANULE;
        if fits(mid)? {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    Ok(Some(lo))
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let budget: f64 = args
        .iter()
        .position(|a| a == "--budget-mib")
        .and_then(|i| args.get(i + 1))
        .map_or(Ok(64.0), |v| v.parse())?;
    let quick = args.iter().any(|a| a == "--quick");
    // `--only TEXT`: the rungs whose name contains TEXT.
    let only = args.iter().position(|a| a == "--only").and_then(|i| args.get(i + 1)).cloned();
    let hw_name = ulysses::cost::hardware::cpu_preset_for_host();
    let hw = Hardware::load(hw_name)?;
    println!(
        "== the longest N within {budget} MiB of live bytes per rank: llama-tiny, 4 layers, V = 2048, {RANKS} thread ranks, f32; predicted from {hw_name} =="
    );
    if let Some(note) = hw.measured_elsewhere() {
        println!("({note})");
    }
    let rungs = ladder();
    let picked = |r: &&Rung| only.as_ref().is_none_or(|o| r.name.contains(o.as_str()));
    let show = |n: Option<i64>| n.map_or("below 2048".to_string(), |n| n.to_string());
    // `--predicted-at N`: no runs; each rung's longest N predicted and its predicted live bytes
    // at N (the model's side of a measured table, in a second).
    let at = args.iter().position(|a| a == "--predicted-at").and_then(|i| args.get(i + 1));
    if let Some(n) = at.map(|v| v.parse::<i64>()).transpose()? {
        println!("| technique | longest N predicted | predicted live MiB/rank at N = {n} |");
        println!("|---|---|---|");
        for rung in rungs.iter().filter(picked) {
            let model_max = longest(|m| Ok(predicted(rung, m, &hw)?.0 <= budget))?;
            println!("| {} | {} | {:.1} |", rung.name, show(model_max), predicted(rung, n, &hw)?.0);
        }
        return Ok(());
    }
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let out_dir = repo.join("results/max_seq");
    std::fs::create_dir_all(&out_dir)?;
    let mut csv = String::from(
        "rung,measured_max_seq,live_mib,rss_mib,step_ms,predicted_max_seq,predicted_live_mib,predicted_step_ms\n",
    );
    println!("| technique | longest N measured | live MiB/rank there | RSS MiB/rank there | step s there | longest N predicted | predicted live MiB/rank at the measured N | predicted step s there |");
    println!("|---|---|---|---|---|---|---|---|");
    let chosen = rungs.iter().take(if quick { 2 } else { rungs.len() });
    for rung in chosen.filter(picked) {
        let mut seen = Vec::new();
        let measured = longest(|n| {
            let m = measure(rung, n)?;
            eprintln!("  {}: N = {n}: live {:.1} MiB, RSS {:.1} MiB, {:.0} ms", rung.name, m.0, m.1, m.2);
            seen.push((n, m));
            Ok(m.0 <= budget)
        })?;
        let model_max = longest(|n| Ok(predicted(rung, n, &hw)?.0 <= budget))?;
        match measured.and_then(|n| seen.iter().find(|s| s.0 == n).map(|s| (n, s.1))) {
            Some((n, (live, rss, ms))) => {
                let (p_live, p_ms) = predicted(rung, n, &hw)?;
                println!(
                    "| {} | {n} | {live:.1} | {rss:.1} | {:.2} | {} | {p_live:.1} ({:.2}x) | {:.2} ({:.2}x) |",
                    rung.name,
                    ms / 1e3,
                    show(model_max),
                    p_live / live,
                    p_ms / 1e3,
                    p_ms / ms
                );
                writeln!(
                    csv,
                    "{},{n},{live:.2},{rss:.2},{ms:.1},{},{p_live:.2},{p_ms:.1}",
                    rung.name,
                    model_max.unwrap_or(0),
                )?;
            }
            None => {
                println!("| {} | below 2048 | | | | {} | | |", rung.name, show(model_max));
                writeln!(csv, "{},0,,,,{},,", rung.name, model_max.unwrap_or(0))?;
            }
        }
    }
    std::fs::write(out_dir.join("summary.csv"), csv)?;
    println!("-> {}", out_dir.join("summary.csv").display());
    Ok(())
}
