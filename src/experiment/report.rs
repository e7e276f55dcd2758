//! `ulysses report`: the summary table of a run and its plots.
//!
//! Reads the Parquet tables of an output folder (so it works on a run that is still going or
//! was interrupted), prints one row per finished point, writes `summary.csv`, and draws what
//! the sweep varies: throughput against sequence length per strategy, bytes and memory per rank
//! against the number of ranks, and the loss curves. Plots go to `plots/` as SVG and PNG.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use polars::prelude::*;

use super::plot::{Axis, Chart, Series, Unit};
use super::results::read_table;
use crate::{Error, Result};

/// A DataFrame that a Jupyter notebook on the evcxr kernel shows as an HTML table (evcxr calls
/// `evcxr_display` on the value a cell ends with; it also needs `Debug`).
#[derive(Debug, Clone)]
pub struct HtmlTable(pub DataFrame);

impl HtmlTable {
    /// The table as HTML: a header of column names, a row per row, numbers in the formats of
    /// [`format`](super::format) (the unit each column's name announces).
    pub fn html(&self) -> String {
        super::format::html_table(&self.0)
    }

    pub fn evcxr_display(&self) {
        println!("EVCXR_BEGIN_CONTENT text/html\n{}\nEVCXR_END_CONTENT", self.html());
    }
}

/// A report: the summary table and the files written.
pub struct Report {
    pub summary: DataFrame,
    pub files: Vec<PathBuf>,
    /// Measured against predicted, per hardware file, when predictions sit beside the run.
    pub comparisons: Vec<(String, DataFrame)>,
}

fn polars_error(what: &str, e: PolarsError) -> Error {
    Error::InvalidArgument { op: "report", group: what.to_string(), msg: e.to_string() }
}

/// A numeric column as f64.
fn f64s(df: &DataFrame, name: &str) -> Result<Vec<f64>> {
    let col = df.column(name).map_err(|e| polars_error(name, e))?;
    let col = col.cast(&DataType::Float64).map_err(|e| polars_error(name, e))?;
    let values = col.f64().map_err(|e| polars_error(name, e))?;
    Ok(values.iter().map(|v| v.unwrap_or(f64::NAN)).collect())
}

/// A string column.
fn strs(df: &DataFrame, name: &str) -> Result<Vec<String>> {
    let col = df.column(name).map_err(|e| polars_error(name, e))?;
    let values = col.str().map_err(|e| polars_error(name, e))?;
    Ok(values.iter().map(|v| v.unwrap_or("").to_string()).collect())
}

/// A line's key: strategy, then numbers in order (so that P=8 comes before P=16).
type Key = (String, i64, i64);

/// Series of (x, y) keyed by strategy and numbers, in key order, each sorted by x and named
/// by `name`.
fn series(map: BTreeMap<Key, Vec<(f64, f64)>>, name: impl Fn(&Key) -> String) -> Vec<Series> {
    map.into_iter()
        .filter(|(_, pts)| pts.len() >= 2)
        .map(|(key, mut points)| {
            points.sort_by(|a, b| a.0.total_cmp(&b.0));
            Series { name: name(&key), points }
        })
        .collect()
}

/// The summary and plots of the run in `dir`.
pub fn report(dir: &Path) -> Result<Report> {
    if super::compare::is_prediction(dir) {
        return super::compare::report(dir);
    }
    let points = read_table(dir, "points")?;
    // Memory rows say which measure they hold (host RSS or the CUDA allocator); runs made before
    // that column existed hold host RSS.
    let has_measure = points.column("memory").is_ok();
    let columns = [
        "strategy",
        "ranks",
        "seq",
        "median_step_ms",
        "tokens_per_s",
        "model_tflops",
        "peak_mib_per_rank",
        "memory",
        "bytes_sent_per_rank",
        "final_loss",
    ];
    let summary = points
        .select(columns.into_iter().filter(|c| has_measure || *c != "memory"))
        .map_err(|e| polars_error("points", e))?;
    let mut files = Vec::new();
    let csv = dir.join("summary.csv");
    let mut out = summary.clone();
    let file = File::create(&csv)
        .map_err(|e| polars_error("summary.csv", PolarsError::IO { error: e.into(), msg: None }))?;
    CsvWriter::new(file).finish(&mut out).map_err(|e| polars_error("summary.csv", e))?;
    files.push(csv);

    let plots = dir.join("plots");
    std::fs::create_dir_all(&plots)
        .map_err(|e| polars_error("plots", PolarsError::IO { error: e.into(), msg: None }))?;
    let (strategy, ranks, seq) = (strs(&points, "strategy")?, f64s(&points, "ranks")?, f64s(&points, "seq")?);
    let (tps, mem, sent) = (
        f64s(&points, "tokens_per_s")?,
        f64s(&points, "peak_mib_per_rank")?,
        f64s(&points, "bytes_sent_per_rank")?,
    );
    let measure = if has_measure { strs(&points, "memory")?.first().cloned() } else { None };
    let memory_title =
        format!("peak memory per rank ({})", measure.as_deref().unwrap_or("host_rss_above_base"));
    let mut charts = Vec::new();

    // Throughput against sequence length: one line per strategy and world size.
    let mut by_seq: BTreeMap<Key, Vec<(f64, f64)>> = BTreeMap::new();
    for i in 0..strategy.len() {
        by_seq.entry((strategy[i].clone(), ranks[i] as i64, 0)).or_default().push((seq[i], tps[i]));
    }
    let name = dir.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
    charts.push(Chart::new(
        &format!("{name}: throughput against sequence length"),
        Axis::auto("sequence length N", Unit::Tokens),
        Axis::auto("throughput (tokens/s)", Unit::Number).from_zero(),
        series(by_seq, |k| format!("{} P={}", k.0, k.1)),
    ));

    // Bytes and memory per rank against the number of ranks: one line per strategy and length.
    let mut bytes: BTreeMap<Key, Vec<(f64, f64)>> = BTreeMap::new();
    let mut memory: BTreeMap<Key, Vec<(f64, f64)>> = BTreeMap::new();
    let by_n = |k: &Key| format!("{} N={}", k.0, Unit::Tokens.format(k.1 as f64));
    for i in 0..strategy.len() {
        let key = (strategy[i].clone(), seq[i] as i64, 0);
        bytes.entry(key.clone()).or_default().push((ranks[i], sent[i]));
        memory.entry(key).or_default().push((ranks[i], mem[i]));
    }
    charts.push(Chart::new(
        &format!("{name}: bytes sent per rank and step"),
        Axis::auto("ranks P", Unit::Count),
        Axis::auto("sent per rank and step", Unit::Bytes).from_zero(),
        series(bytes, by_n),
    ));
    charts.push(Chart::new(
        &format!("{name}: {memory_title}"),
        Axis::auto("ranks P", Unit::Count),
        Axis::auto("peak per rank", Unit::MiB).from_zero(),
        series(memory, by_n),
    ));

    // Loss curves: rank 0 of every point, every step.
    let steps = read_table(dir, "steps")?;
    let (s_point, s_step, s_rank, s_loss) =
        (f64s(&steps, "point")?, f64s(&steps, "step")?, f64s(&steps, "rank")?, f64s(&steps, "loss")?);
    let s_strategy = strs(&steps, "strategy")?;
    let s_seq = f64s(&steps, "seq")?;
    let mut loss: BTreeMap<Key, Vec<(f64, f64)>> = BTreeMap::new();
    for i in (0..s_point.len()).filter(|&i| s_rank[i] == 0.0) {
        let key = (s_strategy[i].clone(), s_seq[i] as i64, s_point[i] as i64);
        loss.entry(key).or_default().push((s_step[i], s_loss[i]));
    }
    charts.push(Chart::new(
        &format!("{name}: loss (rank 0)"),
        Axis::linear("step", Unit::Count),
        // From zero: a few steps of a short run move the loss in its third decimal, which an
        // axis fitted to the data would draw as large swings.
        Axis::linear("loss (nats per token)", Unit::Number).from_zero(),
        series(loss, |k| format!("{} N={} (point {})", k.0, Unit::Tokens.format(k.1 as f64), k.2)),
    ));

    for (stem, chart) in
        ["throughput_vs_seq", "bytes_vs_ranks", "memory_vs_ranks", "loss"].into_iter().zip(charts)
    {
        if chart.series.is_empty() {
            continue; // the sweep does not vary this
        }
        files.extend(chart.write(&plots.join(stem))?);
    }
    Ok(Report { summary, files, comparisons: super::compare::side_by_side(dir)? })
}
