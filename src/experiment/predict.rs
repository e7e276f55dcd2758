//! `ulysses predict`: an experiment config turned into predicted results by the cost model
//! (`crate::cost`), with the tables, Parquet files and plots of a real run, every row flagged
//! as predicted and naming its hardware file. Predictions go to `<output>/predicted-<hardware>/`
//! (rewritten on every prediction: they are derived, never measured), so that `ulysses report`
//! on the run's folder shows measured and predicted side by side when both exist.

use std::fs::File;
use std::path::{Path, PathBuf};

use polars::prelude::*;
use serde::{Deserialize, Serialize};

use super::config::{Backend, ExperimentConfig, Point};
use super::plot::{Chart, Series};
use crate::cost::{self, Hardware, Job, Prediction, SearchSpace};
use crate::train::{Checkpointing, Precision, ZeroStage};
use crate::{Error, Result};

/// `[predict]`: how `ulysses predict` models this experiment. Every field is optional.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PredictSpec {
    /// Hardware preset or file. Default: "dgx-a100-40gb" for `backend = "nccl"`, "cpu-2core"
    /// (this machine, calibrated) otherwise.
    pub hardware: Option<String>,
    /// ZeRO stage over all ranks (0-3). Default 0.
    pub zero: Option<u8>,
    /// Activation checkpointing: none, selective or full. Default none.
    pub checkpointing: Option<Checkpointing>,
    /// Micro-steps per optimizer step. Default 1.
    pub grad_accum: Option<i64>,
    /// Overlap ZeRO/gradient communication and ring passes with compute. Default false.
    #[serde(default)]
    pub overlap: bool,
    /// Run each point at its best SP degree, micro-batch, ZeRO stage and checkpointing that
    /// fits (the paper ran each system "at its best"). Default false.
    #[serde(default)]
    pub search: bool,
    /// With `search`: micro-batches to try (default 1, 2, 4, 8) and ZeRO stages (default all).
    pub micro_batches: Option<Vec<i64>>,
    pub zero_stages: Option<Vec<u8>>,
    /// With `search`: sequences per optimizer step, fixed (gradient accumulation fills it).
    pub global_batch: Option<i64>,
    /// Instead of the listed lengths, the longest sequence that fits per strategy and world
    /// size (the paper's §4.4).
    #[serde(default)]
    pub max_seq: bool,
    /// Whether steps update the weights with Adam (optimizer states in memory, the update in
    /// time). Default: whether `[train.adamw]` is set.
    pub optimizer: Option<bool>,
    /// What the paper reports for this experiment, printed beside the predictions.
    #[serde(default)]
    pub paper: String,
}

fn bad(field: &str, msg: String) -> Error {
    Error::InvalidArgument { op: "predict", group: field.to_string(), msg }
}

/// The hardware a config predicts on: `over` if given, else its `[predict] hardware`, else the
/// default for its backend.
pub fn hardware_for(cfg: &ExperimentConfig, over: Option<&str>) -> Result<Hardware> {
    let spec = cfg.predict.clone().unwrap_or_default();
    let default = if cfg.parallel.backend == Backend::Nccl { "dgx-a100-40gb" } else { "cpu-2core" };
    Hardware::load(over.or(spec.hardware.as_deref()).unwrap_or(default))
}

/// The cost model's job for one point of `cfg`.
pub fn job_for(cfg: &ExperimentConfig, point: &Point) -> Result<Job> {
    let spec = cfg.predict.clone().unwrap_or_default();
    let precision: Precision = cfg.train.dtype.parse().map_err(|e: String| bad("train.dtype", e))?;
    let backend = match cfg.parallel.backend {
        Backend::Local => "local",
        Backend::Mpi => "mpi",
        Backend::Nccl => "nccl",
    };
    Ok(Job {
        model: cfg.gpt()?,
        strategy: point.strategy,
        attention: cfg.attention()?,
        ranks: point.ranks,
        dp: cfg.parallel.dp,
        micro_batch: cfg.train.batch,
        grad_accum: spec.grad_accum.unwrap_or(1),
        seq: point.seq,
        precision,
        checkpointing: spec.checkpointing.unwrap_or_default(),
        zero: ZeroStage::new(spec.zero.unwrap_or(0)).map_err(|e| bad("predict.zero", e.to_string()))?,
        optimizer: spec.optimizer.unwrap_or(cfg.train.adamw.is_some()),
        backend: backend.into(),
        threads_per_rank: cfg.parallel.threads_per_rank,
        overlap: spec.overlap,
        bucket_elems: 25_000_000,
    })
}

/// The search space `[predict]` allows.
fn space(spec: &PredictSpec) -> Result<SearchSpace> {
    let mut s = SearchSpace::everything();
    if let Some(b) = &spec.micro_batches {
        s.micro_batch = b.clone();
    }
    if let Some(z) = &spec.zero_stages {
        s.zero = z.iter().map(|&z| ZeroStage::new(z)).collect::<Result<_>>()?;
    }
    s.global_batch = spec.global_batch;
    Ok(s)
}

/// One predicted point, or why there is none.
pub struct Predicted {
    pub point: Point,
    pub outcome: std::result::Result<Prediction, String>,
}

/// Predicts every point of `cfg` on `hw` (with `[predict] max_seq`: one per strategy and world
/// size, at the longest sequence that fits). A point that cannot run keeps its reason.
pub fn predict_points(cfg: &ExperimentConfig, hw: &Hardware) -> Result<Vec<Predicted>> {
    let spec = cfg.predict.clone().unwrap_or_default();
    let space = space(&spec)?;
    let mut out = Vec::new();
    for point in cfg.points()? {
        if spec.max_seq
            && out
                .iter()
                .any(|p: &Predicted| p.point.strategy == point.strategy && p.point.ranks == point.ranks)
        {
            continue;
        }
        let job = job_for(cfg, &point)?;
        let outcome = if spec.max_seq {
            let fixed = SearchSpace { micro_batch: vec![1], ..space.clone() };
            cost::max_seq(&job, hw, &fixed)
        } else if spec.search {
            cost::best(&job, hw, &space)
        } else {
            cost::predict(&job, hw)
        };
        out.push(Predicted { point, outcome: outcome.map_err(|e| e.to_string()) });
    }
    Ok(out)
}

/// The predicted points as the `points` table of a run, plus the model's own columns.
pub fn frame(rows: &[Predicted], hw: &Hardware) -> Result<DataFrame> {
    let ok = |f: &dyn Fn(&Prediction) -> f64| -> Vec<Option<f64>> {
        rows.iter().map(|r| r.outcome.as_ref().ok().map(f)).collect()
    };
    let ok_i = |f: &dyn Fn(&Prediction) -> i64| -> Vec<Option<i64>> {
        rows.iter().map(|r| r.outcome.as_ref().ok().map(f)).collect()
    };
    let mib = (1u64 << 20) as f64;
    let df = df!(
        "point" => rows.iter().map(|r| r.point.index as u32).collect::<Vec<_>>(),
        "strategy" => rows.iter().map(|r| r.outcome.as_ref().map_or(r.point.strategy.label(), |p| p.job.strategy.label())).collect::<Vec<_>>(),
        "ranks" => rows.iter().map(|r| r.point.ranks as u32).collect::<Vec<_>>(),
        "sp" => ok_i(&|p| p.job.sp() as i64),
        "dp" => ok_i(&|p| p.job.dp as i64),
        "seq" => rows.iter().map(|r| r.outcome.as_ref().map_or(r.point.seq, |p| p.job.seq)).collect::<Vec<_>>(),
        "batch" => ok_i(&|p| p.job.micro_batch),
        "grad_accum" => ok_i(&|p| p.job.grad_accum),
        "zero" => ok_i(&|p| p.job.zero.stage() as i64),
        "checkpointing" => rows.iter().map(|r| r.outcome.as_ref().map_or("-", |p| p.job.checkpointing.name())).collect::<Vec<_>>(),
        "median_step_ms" => ok(&|p| p.step_s * 1e3),
        "tokens_per_s" => ok(&|p| p.tokens_per_s),
        "model_tflops" => ok(&|p| p.model_tflops_per_gpu * p.job.ranks as f64),
        "model_tflops_per_gpu" => ok(&|p| p.model_tflops_per_gpu),
        "megatron_tflops_per_gpu" => ok(&|p| p.megatron_tflops_per_gpu),
        "mfu" => ok(&|p| p.mfu),
        "megatron_mfu" => ok(&|p| p.megatron_mfu),
        "compute_ms" => ok(&|p| p.compute_s() * 1e3),
        "comm_exposed_ms" => ok(&|p| p.comm_exposed_s() * 1e3),
        "peak_gib" => ok(&|p| p.memory.resident_bytes / (mib * 1024.0)),
        "live_peak_gib" => ok(&|p| p.memory.peak_bytes / (mib * 1024.0)),
        "peak_mib_per_rank" => ok(&|p| p.memory.above_parameters() / mib),
        "bytes_sent_per_rank" => ok(&|p| p.bytes_sent_per_rank),
        "fits" => rows.iter().map(|r| r.outcome.as_ref().ok().map(|p| p.memory.fits)).collect::<Vec<_>>(),
        "predicted" => vec![true; rows.len()],
        "hardware" => vec![hw.name.clone(); rows.len()],
        "status" => rows.iter().map(|r| r.outcome.as_ref().err().cloned().unwrap_or_else(|| "ok".into())).collect::<Vec<_>>(),
    );
    df.map_err(|e| bad("points", e.to_string()))
}

/// Where predictions on `hw` of the run in `dir` go.
pub fn predicted_dir(dir: &Path, hw: &Hardware) -> PathBuf {
    dir.join(format!("predicted-{}", hw.name))
}

/// Predicts `cfg` on `hw` and writes config, hardware, the points table (CSV and Parquet) and
/// plots under `predicted_dir(base/output, hw)`. Returns the folder and the table.
pub fn predict_experiment(
    cfg: &ExperimentConfig,
    hw: &Hardware,
    base: &Path,
) -> Result<(PathBuf, DataFrame)> {
    let rows = predict_points(cfg, hw)?;
    let mut df = frame(&rows, hw)?;
    let dir = predicted_dir(&base.join(cfg.output_dir()), hw);
    let io = |e: std::io::Error| bad(&dir.display().to_string(), e.to_string());
    std::fs::create_dir_all(dir.join("plots")).map_err(io)?;
    std::fs::write(dir.join("config.toml"), cfg.to_toml()?).map_err(io)?;
    std::fs::write(dir.join("hardware.toml"), hw.to_toml()?).map_err(io)?;
    let details: String = rows
        .iter()
        .map(|r| match &r.outcome {
            Ok(p) => format!("point {}:\n{p}\n", r.point.index),
            Err(e) => format!("point {} {}: {e}\n\n", r.point.index, r.point.describe()),
        })
        .collect();
    std::fs::write(dir.join("breakdown.txt"), details).map_err(io)?;
    CsvWriter::new(File::create(dir.join("points.csv")).map_err(io)?)
        .finish(&mut df)
        .map_err(|e| bad("points.csv", e.to_string()))?;
    ParquetWriter::new(File::create(dir.join("points.parquet")).map_err(io)?)
        .finish(&mut df)
        .map_err(|e| bad("points.parquet", e.to_string()))?;
    plots(&dir, &rows)?;
    Ok((dir, df))
}

/// One predicted point of a chart: the sequence and three y values.
struct PlotPoint {
    seq: f64,
    tokens_per_s: f64,
    tflops: f64,
    gib: f64,
}

/// Throughput, TFLOP/s per GPU and memory against the sequence, one line per strategy and
/// world size.
fn plots(dir: &Path, rows: &[Predicted]) -> Result<Vec<PathBuf>> {
    let mut lines: std::collections::BTreeMap<String, Vec<PlotPoint>> = Default::default();
    for r in rows {
        if let Ok(p) = &r.outcome {
            let key = format!("{} P={}", r.point.strategy.label(), r.point.ranks);
            lines.entry(key).or_default().push(PlotPoint {
                seq: p.job.seq as f64,
                tokens_per_s: p.tokens_per_s,
                tflops: p.megatron_tflops_per_gpu,
                gib: p.memory.resident_bytes / (1u64 << 30) as f64,
            });
        }
    }
    let series = |y: fn(&PlotPoint) -> f64| -> Vec<Series> {
        lines
            .iter()
            .filter(|(_, v)| v.len() >= 2)
            .map(|(name, v)| Series { name: name.clone(), points: v.iter().map(|p| (p.seq, y(p))).collect() })
            .collect()
    };
    let n = "sequence length N";
    let charts = [
        ("throughput_vs_seq", "Predicted throughput", n, "tokens/s", series(|p| p.tokens_per_s)),
        (
            "tflops_vs_seq",
            "Predicted TFLOP/s per GPU (Megatron-DeepSpeed convention)",
            n,
            "TFLOP/s",
            series(|p| p.tflops),
        ),
        ("memory_vs_seq", "Predicted peak memory per GPU", n, "GiB", series(|p| p.gib)),
    ];
    let mut files = Vec::new();
    for (stem, title, x, y, s) in charts {
        if !s.is_empty() {
            let chart = Chart { title: title.into(), x_label: x.into(), y_label: y.into(), series: s };
            files.extend(chart.write(&dir.join("plots").join(stem))?);
        }
    }
    Ok(files)
}
