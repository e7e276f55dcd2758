//! What `ulysses run` and `ulysses report` leave on the screen: the summary table in readable
//! numbers (`ulysses::experiment::format`), what its columns are, what this run shows (bytes
//! and step time of each strategy against Ulysses, computed from the table), where the files
//! with every digit are, and what to try next.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Result;
use ulysses::experiment::format::{self, bytes, plain, seconds, text_table};
use ulysses::experiment::Report;
use ulysses::polars::prelude::*;

/// Columns of the points table left off the screen after a run without a report (which shows
/// its own summary): bookkeeping, and what the other columns imply. Every column stays in
/// points.csv and points.parquet.
const HIDDEN: [&str; 6] = ["point", "sp", "dp", "batch", "steps", "bytes_received_per_rank"];

/// `path` relative to the working folder when it lies below it (`results/quickstart`).
fn shown(path: &Path) -> PathBuf {
    let cwd = std::env::current_dir().unwrap_or_default();
    path.strip_prefix(&cwd).map_or_else(|_| path.to_path_buf(), Path::to_path_buf)
}

/// The screen after a run that took `elapsed`, or after a report, of the run in `dir` whose
/// `points` table is given: the report's summary table (else the points table but `HIDDEN`),
/// what it shows, the files, what to try next.
pub fn print(
    name: &str,
    dir: &Path,
    points: &DataFrame,
    report: Option<&Report>,
    elapsed: Option<Duration>,
) -> Result<()> {
    let dir = shown(dir);
    match elapsed {
        Some(t) => {
            let s = t.as_secs_f64();
            let took = if s < 60.0 { format!("{s:.1} s") } else { seconds(s) };
            println!("\n{name}: {} points in {took}, results in {}\n", points.height(), dir.display())
        }
        None => println!("{name}: {} points, results in {}\n", points.height(), dir.display()),
    }
    let table = match report {
        Some(r) => r.summary.clone(),
        None => points.drop_many(HIDDEN),
    };
    println!("{}\n", text_table(&table));
    println!(
        "One row per point, medians over its measured steps: the slowest rank's step time, tokens/s and \
         model TFLOP/s\n(6 x parameters x tokens + attention) of the whole job, peak memory and bytes sent per \
         rank and step,\nthe last loss."
    );
    for line in findings(points)? {
        println!("{line}");
    }
    println!("\nEvery digit: {}/{{points,steps,comm}}.{{csv,parquet}}", dir.display());
    let plots = report.map_or(&[][..], |r| &r.files[..]);
    let stems: Vec<String> = plots
        .iter()
        .filter(|p| p.extension().is_some_and(|e| e == "svg"))
        .filter_map(|p| p.file_stem().map(|s| s.to_string_lossy().into_owned()))
        .collect();
    if !stems.is_empty() {
        println!("Plots (SVG and PNG) in {}/plots: {}", dir.display(), stems.join(", "));
    }
    let report =
        if plots.is_empty() { "the plots (and this table)" } else { "this screen and the plots again" };
    println!("\nNext:");
    for (cmd, what) in [
        (format!("./scripts/ulysses report {}", dir.display()), report),
        match name {
            "e6_comm_volume" => (
                "./scripts/ulysses run experiments/e1_throughput_toy.toml --report".into(),
                "throughput as the sequence grows (§4.1)",
            ),
            _ => (
                "./scripts/ulysses run experiments/e6_comm_volume.toml --report".into(),
                "bytes per rank as P grows (§3.2)",
            ),
        },
        ("ls experiments/".into(), "the paper's experiments E1-E6, at toy and paper scale"),
        (
            "./scripts/notebooks.sh --lab".into(),
            "notebooks: a course from the primitives to a cluster (00_warmup is its map)",
        ),
    ] {
        println!("  {cmd:<66} {what}");
    }
    Ok(())
}

/// A column as f64 values.
fn f64s(df: &DataFrame, name: &str) -> Result<Vec<f64>> {
    let col = df.column(name)?.cast(&DataType::Float64)?;
    Ok(col.f64()?.iter().map(|v| v.unwrap_or(f64::NAN)).collect())
}

/// What the table shows, in a line or two: at the largest point that has Ulysses and others,
/// each strategy's bytes and step time against Ulysses'; and whether the strategies reached the
/// same loss at every point they share.
fn findings(points: &DataFrame) -> Result<Vec<String>> {
    let strategy: Vec<String> =
        points.column("strategy")?.str()?.iter().map(|s| s.unwrap_or("").to_string()).collect();
    let (ranks, dp, seq) = (f64s(points, "ranks")?, f64s(points, "dp")?, f64s(points, "seq")?);
    let (ms, sent, loss) =
        (f64s(points, "median_step_ms")?, f64s(points, "bytes_sent_per_rank")?, f64s(points, "final_loss")?);
    // Rows grouped by what they share: (ranks, dp, seq) as integers, largest last.
    let mut groups: BTreeMap<(u64, u64, u64), Vec<usize>> = BTreeMap::new();
    for i in 0..strategy.len() {
        groups.entry((ranks[i] as u64, dp[i] as u64, seq[i] as u64)).or_default().push(i);
    }
    let mut lines = Vec::new();
    let compared = groups.iter().rev().find(|(_, rows)| {
        rows.len() > 1 && rows.iter().any(|&i| strategy[i] == "ulysses") && sent[rows[0]].is_finite()
    });
    if let Some(((p, _, n), rows)) = compared {
        let Some(&u) = rows.iter().find(|&&i| strategy[i] == "ulysses") else { return Ok(lines) };
        let others: Vec<usize> = rows.iter().copied().filter(|&i| i != u).collect();
        let ratios = |v: &[f64], show: &dyn Fn(f64) -> String| {
            let list: Vec<String> = others
                .iter()
                .map(|&i| format!("{} {} ({:.2}x)", strategy[i], show(v[i]), v[i] / v[u]))
                .collect();
            list.join(", ")
        };
        lines.push(format!(
            "At seq {} on {p} ranks, per rank and step, ulysses sends {}; {}.",
            plain(*n as f64),
            bytes(sent[u]),
            ratios(&sent, &bytes)
        ));
        lines.push(format!(
            "Step time: ulysses {} ms; {}\n(times on this run's own links between ranks: `ulysses predict CONFIG --hardware \
             dgx-a100-40gb` weighs the same bytes on a GPU cluster's).",
            format::ms(ms[u]),
            ratios(&ms, &|v| format!("{} ms", format::ms(v)))
        ));
    }
    // The same loss at every shared point: the strategies compute the same model.
    let spread = groups
        .values()
        .filter(|rows| rows.len() > 1)
        .map(|rows| {
            let (lo, hi) =
                rows.iter().fold((f64::MAX, f64::MIN), |(lo, hi), &i| (lo.min(loss[i]), hi.max(loss[i])));
            (hi - lo) / hi.abs().max(f64::MIN_POSITIVE)
        })
        .fold(None, |acc: Option<f64>, s| Some(acc.map_or(s, |a| a.max(s))));
    if let Some(spread) = spread {
        lines.push(if spread == 0.0 {
            "The strategies reach the same loss at every shared point, bit for bit.".to_string()
        } else if spread <= 1e-4 {
            format!("The strategies reach the same loss at every shared point (largest relative difference {spread:.1e}).")
        } else {
            format!("The strategies' losses differ by up to {spread:.1e} (relative) at a shared point: compare them in the steps table.")
        });
    }
    Ok(lines)
}
