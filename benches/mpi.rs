//! The MPI backend on real processes, each number a ratio measured in one invocation:
//!
//! 1. its all-to-all against the local backend's, P=4, 1 and 16 MiB per rank: the same
//!    `ulysses bench-a2a` loop once as threads and once as MPI processes (mpirun), medians;
//! 2. communication/computation overlap: training steps of ring attention (and Ulysses) on 4 MPI
//!    processes with overlap on and off (`ulysses step --no-overlap`), alternated, medians of
//!    the per-run median step times;
//! 3. envelope comparisons: microseconds per small all-to-all on 2 and 4 MPI processes with the
//!    envelope of every transfer compared against the default (new envelopes and every 64th),
//!    runs alternated, medians.
//!
//! Run: `cargo bench --features mpi --bench mpi` (`-- --quick` for fewer runs).

mod common;

use std::process::Command;

use anyhow::{Context, Result};

/// median_ms for each size from `ulysses bench-a2a` output.
fn medians(out: &[u8]) -> Result<Vec<(i64, f64)>> {
    let text = String::from_utf8_lossy(out);
    text.lines()
        .filter(|l| l.contains("a2a backend="))
        .map(|l| {
            let get = |k: &str| l.split_whitespace().find_map(|kv| kv.strip_prefix(k)).context("field");
            Ok((get("mib=")?.parse()?, get("median_ms=")?.parse()?))
        })
        .collect()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Median step ms of one `ulysses step` on 4 MPI processes.
fn step_ms(exe: &str, strategy: &str, seq: &str, steps: &str, overlap: bool) -> Result<f64> {
    let mut args = vec!["launch", "-n", "4", "--", "step", "--backend", "mpi", "--ranks", "4"];
    args.extend(["--preset", "tiny", "--strategy", strategy, "--seq", seq, "--steps", steps]);
    if !overlap {
        args.push("--no-overlap");
    }
    let out = Command::new(exe).args(&args).output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let summary = text
        .lines()
        .find(|l| l.contains("summary:"))
        .with_context(|| format!("ulysses step failed:\n{text}{}", String::from_utf8_lossy(&out.stderr)))?;
    common::field(summary, "median_step_ms")
}

fn overlap(exe: &str, quick: bool) -> Result<()> {
    let (runs, steps) = if quick { (1, "2") } else { (5, "5") };
    println!();
    println!(
        "== overlap on MPI processes: P=4, tiny GPT, f32, causal; each run the median of {steps} steps, \
              on/off alternated, median of {runs} runs =="
    );
    println!(
        "{:<10} {:>7} {:>12} {:>12} {:>14}",
        "strategy", "N", "overlap ms", "no-overlap ms", "off/on time"
    );
    for (strategy, seq) in [("ring", "4096"), ("ring", "8192"), ("ulysses", "8192")] {
        let (mut on, mut off) = (Vec::new(), Vec::new());
        for _ in 0..runs {
            on.push(step_ms(exe, strategy, seq, steps, true)?);
            off.push(step_ms(exe, strategy, seq, steps, false)?);
        }
        let (on, off) = (median(on), median(off));
        println!("{strategy:<10} {seq:>7} {on:>12.1} {off:>12.1} {:>13.3}x", off / on);
    }
    println!(
        "(ring: the next K/V block, and backward the dK/dV accumulators, travel while a block computes; \
              Ulysses: k and v all-to-alls in flight while q's completes. Bytes are the same either way.)"
    );
    Ok(())
}

/// Median µs per small all-to-all of one `ulysses-checks latency` job (rank 0's).
fn latency_us(n: usize, checks: &str) -> Result<f64> {
    let exe = std::path::Path::new(env!("CARGO_BIN_EXE_ulysses-checks"));
    let out = ulysses::comm::mpirun_command(n, exe, &["latency".into(), checks.into()]).output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let line =
        text.lines().find(|l| l.contains("latency checks=") && l.contains("rank=0 ")).with_context(|| {
            format!("ulysses-checks latency failed:\n{text}{}", String::from_utf8_lossy(&out.stderr))
        })?;
    common::field(line, "median_us")
}

fn envelopes(quick: bool) -> Result<()> {
    let runs = if quick { 1 } else { 7 };
    println!();
    println!(
        "== envelope comparisons: µs per all-to-all of [2, 4, P, 4] f32 per rank, each run the median of 5 \
              rounds of 400 calls, every/default alternated, median of {runs} runs =="
    );
    println!("{:>6} {:>14} {:>14} {:>16}", "ranks", "every µs", "default µs", "every/default");
    for n in [2usize, 4] {
        let (mut every, mut new) = (Vec::new(), Vec::new());
        for _ in 0..runs {
            every.push(latency_us(n, "every")?);
            new.push(latency_us(n, "new")?);
        }
        let (e, d) = (median(every), median(new));
        println!("{n:>6} {e:>14.1} {d:>14.1} {:>15.2}x", e / d);
    }
    println!("(every: a header and its echo before each payload; default: only for envelopes new to a pair and every 64th)");
    Ok(())
}

fn main() -> Result<()> {
    let quick = std::env::args().any(|a| a == "--quick");
    let exe = env!("CARGO_BIN_EXE_ulysses");
    let args = ["bench-a2a", "--ranks", "4", "--mib", "1,16", "--runs", "31"];
    let local = Command::new(exe).args(args).arg("--backend").arg("local").output()?;
    let mpi =
        Command::new(exe).args(["launch", "-n", "4", "--"]).args(args).args(["--backend", "mpi"]).output()?;
    let (l, m) = (medians(&local.stdout)?, medians(&mpi.stdout)?);
    anyhow::ensure!(
        l.len() == 2 && m.len() == 2,
        "bench-a2a failed:\n{}{}",
        String::from_utf8_lossy(&mpi.stdout),
        String::from_utf8_lossy(&mpi.stderr)
    );
    println!("== all-to-all, P=4, f32 [1, N/P, 32, 128] -> [1, N, 8, 128], into a preallocated output, medians of 31 ==");
    println!("{:>10} {:>12} {:>12} {:>16}", "MiB/rank", "local ms", "mpi ms", "mpi/local time");
    for ((mib, lt), (_, mt)) in l.iter().zip(&m) {
        println!("{mib:>10} {lt:>12.3} {mt:>12.3} {:>15.2}x", mt / lt);
    }
    println!(
        "(local: 4 threads of one process; mpi: 4 OpenMPI processes on this machine's {} cores)",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    overlap(exe, quick)?;
    envelopes(quick)
}
