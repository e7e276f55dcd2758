//! Predictions beside measurements: the side-by-side table `ulysses report` prints when a
//! run's folder holds predictions (`predicted-<hardware>/`), and the report of a predictions
//! folder itself.

use std::fs::File;
use std::path::{Path, PathBuf};

use polars::prelude::*;

use super::results::read_table;
use crate::{Error, Result};

fn bad(field: &str, msg: String) -> Error {
    Error::InvalidArgument { op: "predict", group: field.to_string(), msg }
}

/// Whether `dir` holds predictions (a `predicted-*` folder).
pub fn is_prediction(dir: &Path) -> bool {
    dir.join("hardware.toml").is_file() && dir.join("points.parquet").is_file()
}

/// For a run folder with measured points and predictions beside them: one table per hardware,
/// measured against predicted step time and memory per rank (peak above the built model).
pub fn side_by_side(dir: &Path) -> Result<Vec<(String, DataFrame)>> {
    let Ok(measured) = read_table(dir, "points") else { return Ok(Vec::new()) };
    let mut out = Vec::new();
    let entries = std::fs::read_dir(dir).map_err(|e| bad(&dir.display().to_string(), e.to_string()))?;
    let mut folders: Vec<PathBuf> =
        entries.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| is_prediction(p)).collect();
    folders.sort();
    for f in folders {
        let predicted = read_table(&f, "points")?;
        let key = |df: &DataFrame, c: &str| -> Result<Vec<String>> {
            let col =
                df.column(c).and_then(|c| c.cast(&DataType::String)).map_err(|e| bad(c, e.to_string()))?;
            Ok(col
                .str()
                .map_err(|e| bad(c, e.to_string()))?
                .iter()
                .map(|v| v.unwrap_or("").to_string())
                .collect())
        };
        let f64s = |df: &DataFrame, c: &str| -> Result<Vec<Option<f64>>> {
            let col =
                df.column(c).and_then(|c| c.cast(&DataType::Float64)).map_err(|e| bad(c, e.to_string()))?;
            Ok(col.f64().map_err(|e| bad(c, e.to_string()))?.iter().collect())
        };
        let ids = |df: &DataFrame| -> Result<Vec<String>> {
            let (s, r, n) = (key(df, "strategy")?, key(df, "ranks")?, key(df, "seq")?);
            Ok((0..s.len()).map(|i| format!("{} {} {}", s[i], r[i], n[i])).collect())
        };
        let (mid, pid) = (ids(&measured)?, ids(&predicted)?);
        let (mt, mm) = (f64s(&measured, "median_step_ms")?, f64s(&measured, "peak_mib_per_rank")?);
        let (pt, pm) = (f64s(&predicted, "median_step_ms")?, f64s(&predicted, "peak_mib_per_rank")?);
        let (mut s, mut r, mut n, mut a, mut b, mut c, mut d) =
            (vec![], vec![], vec![], vec![], vec![], vec![], vec![]);
        for (i, id) in mid.iter().enumerate() {
            let Some(j) = pid.iter().position(|p| p == id) else { continue };
            let parts: Vec<&str> = id.split(' ').collect();
            s.push(parts[0].to_string());
            r.push(parts[1].parse::<u32>().unwrap_or(0));
            n.push(parts[2].parse::<i64>().unwrap_or(0));
            a.push(mt[i]);
            b.push(pt[j]);
            c.push(mm[i]);
            d.push(pm[j]);
        }
        let ratio = |x: &[Option<f64>], y: &[Option<f64>]| -> Vec<Option<f64>> {
            x.iter()
                .zip(y)
                .map(|(m, p)| match (m, p) {
                    (Some(m), Some(p)) if *m > 0.0 => Some(p / m),
                    _ => None,
                })
                .collect()
        };
        let (tr, mr) = (ratio(&a, &b), ratio(&c, &d));
        let df = df!(
            "strategy" => s, "ranks" => r, "seq" => n,
            "measured_ms" => a, "predicted_ms" => b, "time_pred/meas" => tr,
            "measured_mib" => c, "predicted_mib" => d, "memory_pred/meas" => mr,
        )
        .map_err(|e| bad("side by side", e.to_string()))?;
        let name = f.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        out.push((name, df));
    }
    Ok(out)
}

/// The columns `ulysses predict` and `ulysses report` print (every column is in the files).
pub const SUMMARY_COLUMNS: [&str; 15] = [
    "strategy",
    "ranks",
    "sp",
    "dp",
    "seq",
    "batch",
    "zero",
    "checkpointing",
    "median_step_ms",
    "tokens_per_s",
    "megatron_tflops_per_gpu",
    "mfu",
    "peak_gib",
    "fits",
    "status",
];

/// The report of a predictions folder: its points table (saved as summary.csv) and its plots.
pub fn report(dir: &Path) -> Result<super::Report> {
    let points = read_table(dir, "points")?;
    let mut summary = points.select(SUMMARY_COLUMNS).map_err(|e| bad("points", e.to_string()))?;
    let csv = dir.join("summary.csv");
    let file = File::create(&csv).map_err(|e| bad("summary.csv", e.to_string()))?;
    CsvWriter::new(file).finish(&mut summary).map_err(|e| bad("summary.csv", e.to_string()))?;
    let mut files = vec![csv];
    if let Ok(entries) = std::fs::read_dir(dir.join("plots")) {
        let mut plots: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
        plots.sort();
        files.extend(plots);
    }
    Ok(super::Report { summary, files, comparisons: Vec::new() })
}
