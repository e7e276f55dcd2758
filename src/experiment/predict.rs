//! `ulysses predict`: an experiment config turned into predicted results by the cost model
//! (`crate::cost`), with the tables, Parquet files and plots of a real run, every row flagged
//! as predicted and naming its hardware file. Predictions go to `<output>/predicted-<hardware>/`
//! (rewritten on every prediction: they are derived, never measured), so that `ulysses report`
//! on the run's folder shows measured and predicted side by side when both exist.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use polars::prelude::*;
use serde::{Deserialize, Serialize};

use super::config::{Backend, ExperimentConfig, Point};
use super::plot::{Axis, Chart, Series, Unit};
use crate::attention::StrategyConfig;
use crate::cost::{self, Band, Hardware, Job, MemoryReport, Prediction, SearchSpace, Software};
use crate::train::{Checkpointing, ZeroStage};
use crate::{Error, Result};

/// `[predict]`: how `ulysses predict` models this experiment, and the hardware whose memory
/// `ulysses run` and `ulysses submit` check every point against before starting. Every field is
/// optional.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PredictSpec {
    /// Hardware preset or file. `ulysses predict` defaults to "dgx-a100-40gb" for `backend =
    /// "nccl"` and otherwise to the CPU preset calibrated on this machine's CPU
    /// ([`cpu_preset_for_host`](crate::cost::hardware::cpu_preset_for_host): "cpu-2core" on the
    /// Intel Xeon, "cpu-2core-epyc" on the AMD EPYC, "cpu-2core" elsewhere, which then says so);
    /// `ulysses run` and `ulysses submit` check memory only when hardware is named, here or by
    /// `ulysses run --hardware` (`ExperimentConfig::check_memory`). Default none.
    pub hardware: Option<String>,
    /// ZeRO stage over all ranks (0-3), in place of the run's. Default: the point's
    /// `[train] zero`.
    pub zero: Option<u8>,
    /// Activation checkpointing (none, selective or full), in place of the run's. Default:
    /// `[train] checkpointing`.
    pub checkpointing: Option<Checkpointing>,
    /// Micro-steps per optimizer step, in place of the run's. Default: `[train] grad_accum`.
    pub grad_accum: Option<i64>,
    /// Overlap ZeRO/gradient communication and ring passes with compute. Default false.
    #[serde(default)]
    pub overlap: bool,
    /// Run each point at its best SP degree, micro-batch, ZeRO stage and checkpointing that
    /// fits (the paper ran each system "at its best"); `ulysses predict --write-config` writes
    /// what it finds as configs `ulysses run` runs. Default false.
    #[serde(default)]
    pub search: bool,
    /// With `search`: micro-batches to try (default 1, 2, 4, 8) and ZeRO stages (default all;
    /// stage 0 only without an optimizer, as the trainer needs one for stages 1-3).
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
    /// ZeRO-Offload: the optimizer's states in host memory and its update on the host's CPUs
    /// (`Job::optimizer_offload`; predicted only, the trainer does not offload its optimizer).
    /// Needs ZeRO stage 1 or more and a hardware file with the host memory's bandwidth. Default
    /// false.
    #[serde(default)]
    pub offload_optimizer: bool,
    /// The software the points run (a preset of `software/` or a file), in place of the
    /// hardware's default (`flash-attention-2` on a GPU preset, `measured` for a calibrated
    /// file). The paper configs name what the paper's release scripts ran.
    pub software: Option<String>,
    /// `free` (default): predict or search as the fields above say - what would be best with
    /// this toolkit today. `paper`: the paper's stated setup - the `[train]` ZeRO stage and
    /// checkpointing for this toolkit's strategies, each baseline of `baselines` with the
    /// settings its system offers, every point at its best sequence-parallel degree (at least 2)
    /// and micro-batch.
    #[serde(default)]
    pub mode: Mode,
    /// Baseline systems by strategy (as `[parallel] strategies` spells it), e.g. `megatron_sp =
    /// "megatron-lm-2023"`: the software profile those points run in place of `software`
    /// (its attention kernel; in paper mode also its ZeRO stages, checkpointing and group
    /// placement).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub baselines: BTreeMap<String, String>,
    /// What the paper reports for this experiment, printed beside the predictions.
    #[serde(default)]
    pub paper: String,
    /// Run points the cost model predicts not to fit `hardware` anyway: `ulysses run` and
    /// `ulysses submit` refuse such a config otherwise (`ulysses run --force` sets this; a point
    /// that does run out of memory stops the run there). Default false.
    #[serde(default, skip_serializing_if = "is_false")]
    pub force: bool,
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// How `ulysses predict` chooses each point's setting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// As `[predict]` says: one setting, or the search it configures.
    #[default]
    Free,
    /// The paper's stated setup (see [`PredictSpec::mode`]).
    Paper,
}

fn bad(field: &str, msg: String) -> Error {
    Error::InvalidArgument { op: "predict", group: field.to_string(), msg }
}

impl ExperimentConfig {
    /// Where `ulysses predict` loads this config's hardware from: `over` if given, else
    /// `[predict] hardware`, else the default for its backend (a preset name or a file).
    pub fn hardware_source(&self, over: Option<&str>) -> String {
        let named = self.predict.as_ref().and_then(|p| p.hardware.as_deref());
        // The CPU default reads the presets and /proc/cpuinfo: only when nothing is named.
        let default = || match self.parallel.backend {
            Backend::Nccl => "dgx-a100-40gb",
            _ => crate::cost::hardware::cpu_preset_for_host(),
        };
        over.or(named).unwrap_or_else(default).to_string()
    }
}

/// The hardware a config predicts on: `over` if given, else its `[predict] hardware`, else the
/// default for its backend; running `[predict] software` where the config names one.
pub fn hardware_for(cfg: &ExperimentConfig, over: Option<&str>) -> Result<Hardware> {
    let hw = Hardware::load(&cfg.hardware_source(over))?;
    match cfg.predict.as_ref().and_then(|p| p.software.as_deref()) {
        Some(name) => hw.with_software(&Software::load(name)?, Band::Central),
        None => Ok(hw),
    }
}

impl ExperimentConfig {
    /// Whether `[predict] baselines` models `strategy` as another system.
    pub fn is_baseline(&self, strategy: StrategyConfig) -> Result<bool> {
        let spec = self.predict.clone().unwrap_or_default();
        Ok(baseline_for(&spec, strategy)?.is_some())
    }
}

/// The baseline software `[predict] baselines` names for `strategy`, if any.
fn baseline_for(spec: &PredictSpec, strategy: StrategyConfig) -> Result<Option<Software>> {
    for (spelled, name) in &spec.baselines {
        let s: StrategyConfig = spelled.parse().map_err(|e: String| bad("predict.baselines", e))?;
        if s == strategy {
            return Software::load(name).map(Some);
        }
    }
    Ok(None)
}

/// Divisors of `n`.
fn divisors(n: usize) -> Vec<usize> {
    (1..=n).filter(|d| n.is_multiple_of(*d)).collect()
}

/// The paper-setup search around `job` on `hw`: this toolkit's strategies keep the job's ZeRO
/// stage and checkpointing; a baseline keeps to the stages, checkpointing, kernel and group
/// placement its system offers. Every sequence-parallel strategy at a degree of at least 2 (a
/// "ring" of one rank is no ring), micro-batches from `[predict] micro_batches` (default 1, 2,
/// 4, 8). Returns the job (with the baseline's kernel) and the space.
fn paper_space(
    spec: &PredictSpec,
    mut job: Job,
    hw: &Hardware,
    baseline: Option<&Software>,
) -> Result<(Job, SearchSpace)> {
    let mut s = space(spec, &job)?;
    let mut sp: Vec<usize> = divisors(job.ranks);
    if job.strategy != StrategyConfig::Single && job.ranks > 1 {
        sp.retain(|&d| d >= 2);
    }
    match baseline.and_then(|b| b.baseline.as_ref()) {
        Some(b) => {
            job.attention.kernel = b.kernel;
            s.zero = b.zero_stages()?;
            s.checkpointing = b.checkpointing.clone();
            if b.group_within_node {
                sp.retain(|&d| d <= hw.node.devices_per_node);
            }
        }
        None => {
            s.zero = vec![job.zero];
            s.checkpointing = vec![job.checkpointing];
        }
    }
    if !job.optimizer {
        s.zero.retain(|z| !z.partitions_optimizer());
        if s.zero.is_empty() {
            s.zero.push(crate::train::ZeroStage::NONE);
        }
    }
    s.sp = sp;
    Ok((job, s))
}

fn backend_name(backend: Backend) -> &'static str {
    match backend {
        Backend::Local => "local",
        Backend::Mpi => "mpi",
        Backend::Nccl => "nccl",
    }
}

impl ExperimentConfig {
    /// The cost model's job for `point` as `ulysses run` runs it: `[parallel]` and `[train]`
    /// only (micro-batch, accumulation, ZeRO stage, checkpointing, the optimizer if
    /// `[train.adamw]` is set, the trainer's reduction buckets), no overlap assumed. What the
    /// memory check predicts; `[predict]`'s overrides apply on top in [`job_for`].
    pub fn run_job(&self, point: &Point) -> Result<Job> {
        let train = self.train_config(point)?;
        Ok(Job {
            model: self.gpt()?,
            strategy: point.strategy,
            attention: self.attention()?,
            ranks: point.ranks,
            dp: point.dp,
            micro_batch: self.train.batch,
            grad_accum: point.grad_accum as i64,
            seq: point.seq,
            precision: train.precision,
            checkpointing: train.checkpointing,
            zero: point.zero,
            optimizer: train.adamw.is_some(),
            backend: backend_name(self.parallel.backend).into(),
            threads_per_rank: self.parallel.threads_per_rank,
            overlap: false,
            bucket_elems: train.bucket_elems,
            reduce_dtype: train.reduce_dtype,
            documents: None,
            mlp_tile: train.mlp_tile,
            offload: train.offload.is_some(),
            loss_tile: train.loss_tile,
            kv_offload: self.offload_kv()?.is_some()
                && matches!(point.strategy, crate::attention::StrategyConfig::UlyssesChunked { .. }),
            // A run keeps its optimizer on the device; `[predict] offload_optimizer` prices it away.
            optimizer_offload: false,
        })
    }
}

/// The cost model's job for one point of `cfg`: the run's ([`ExperimentConfig::run_job`]) with
/// `[predict]`'s `zero`, `checkpointing`, `grad_accum`, `optimizer` and `overlap` where given,
/// and the attention kernel of the point's baseline system where `[predict] baselines` names one.
pub fn job_for(cfg: &ExperimentConfig, point: &Point) -> Result<Job> {
    let spec = cfg.predict.clone().unwrap_or_default();
    let mut job = cfg.run_job(point)?;
    if let Some(z) = spec.zero {
        job.zero = ZeroStage::new(z).map_err(|e| bad("predict.zero", e.to_string()))?;
    }
    job.checkpointing = spec.checkpointing.unwrap_or(job.checkpointing);
    job.grad_accum = spec.grad_accum.unwrap_or(job.grad_accum);
    job.optimizer = spec.optimizer.unwrap_or(job.optimizer);
    job.optimizer_offload = spec.offload_optimizer;
    job.overlap = spec.overlap;
    if let Some(b) = baseline_for(&spec, point.strategy)?.and_then(|b| b.baseline) {
        job.attention.kernel = b.kernel;
    }
    Ok(job)
}

/// The search space `[predict]` allows around `job`. Without an optimizer only ZeRO stage 0:
/// stages 1-3 partition the optimizer's states, and the trainer runs them only with one.
fn space(spec: &PredictSpec, job: &Job) -> Result<SearchSpace> {
    let mut s = SearchSpace::everything();
    if let Some(b) = &spec.micro_batches {
        s.micro_batch = b.clone();
    }
    if let Some(z) = &spec.zero_stages {
        s.zero = z.iter().map(|&z| ZeroStage::new(z)).collect::<Result<_>>()?;
    }
    if !job.optimizer {
        s.zero.retain(|z| !z.partitions_optimizer());
        if s.zero.is_empty() {
            s.zero.push(ZeroStage::NONE);
        }
    }
    s.global_batch = spec.global_batch;
    Ok(s)
}

/// The memory of `job`'s rank with the largest resident peak (what a prediction reports).
pub(super) fn peak_memory(job: &Job, hw: &Hardware) -> Result<MemoryReport> {
    job.validate()?;
    let mut worst: Option<MemoryReport> = None;
    for r in cost::step::candidate_ranks(job) {
        let m = cost::memory::memory(job, r, hw)?;
        if worst.as_ref().is_none_or(|w| m.resident_bytes > w.resident_bytes) {
            worst = Some(m);
        }
    }
    worst.ok_or_else(|| bad("memory", format!("{}: no ranks", job.describe())))
}

/// A job's setting in words: "SP 32 x DP 1, micro-batch 1, 1 micro-step per step, ZeRO 3,
/// checkpointing full, bf16".
pub(super) fn setting(job: &Job) -> String {
    format!(
        "SP {} x DP {}, micro-batch {}, {} micro-step{} per step, ZeRO {}, checkpointing {}, {}",
        job.sp(),
        job.dp,
        job.micro_batch,
        job.grad_accum,
        if job.grad_accum == 1 { "" } else { "s" },
        job.zero.stage(),
        job.checkpointing.name(),
        job.precision.name()
    )
}

/// What would fit of `job` (a point predicted not to): the fastest setting of `[predict]`'s
/// search space at the same sequence and global batch, else the longest sequence that fits at
/// some setting, in words.
pub(super) fn what_fits(cfg: &ExperimentConfig, job: &Job, hw: &Hardware) -> String {
    let gib = (1u64 << 30) as f64;
    let spec = cfg.predict.clone().unwrap_or_default();
    let space = match space(&spec, job) {
        Ok(s) => SearchSpace { global_batch: Some(job.global_batch()), ..s },
        Err(e) => return format!("no search: {e}"),
    };
    let strategy = |p: &Prediction| {
        if p.job.strategy == job.strategy {
            String::new()
        } else {
            format!("{} ", p.job.strategy.label())
        }
    };
    match cost::best(job, hw, &space) {
        Ok(p) => format!(
            "fits as {}{} (peak {:.2} GiB, {:.3} s per step)",
            strategy(&p),
            setting(&p.job),
            p.memory.resident_bytes / gib,
            p.step_s
        ),
        Err(_) => match cost::max_seq(job, hw, &SearchSpace { micro_batch: vec![1], ..space }) {
            Ok(p) => format!(
                "no setting fits N = {}; the longest sequence that fits is N = {} as {}{} (peak {:.2} GiB)",
                job.seq,
                p.job.seq,
                strategy(&p),
                setting(&p.job),
                p.memory.resident_bytes / gib
            ),
            Err(e) => format!("nothing fits: {e}"),
        },
    }
}

/// One predicted point, or why there is none: the central prediction, and the same at the
/// pessimistic (`low`) and optimistic (`high`) ends of every input's range (each band searched
/// on its own where the config searches: a setting that fits only at one end is found there).
pub struct Predicted {
    pub point: Point,
    pub outcome: std::result::Result<Prediction, String>,
    pub low: std::result::Result<Prediction, String>,
    pub high: std::result::Result<Prediction, String>,
}

impl Predicted {
    /// The prediction at `band`.
    pub fn at(&self, band: Band) -> &std::result::Result<Prediction, String> {
        match band {
            Band::Low => &self.low,
            Band::Central => &self.outcome,
            Band::High => &self.high,
        }
    }
}

/// Predicts every point of `cfg` on `hw` (with `[predict] max_seq`: one per strategy and world
/// size, at the longest sequence that fits). A point that cannot run keeps its reason.
pub fn predict_points(cfg: &ExperimentConfig, hw: &Hardware) -> Result<Vec<Predicted>> {
    let spec = cfg.predict.clone().unwrap_or_default();
    let mut out = Vec::new();
    for point in cfg.points()? {
        // Packed and padded rows: their documents come from the data, which a config does not
        // hold; the cost model takes them as `Job::documents` (tests/packed.rs), and these points
        // are left out of the prediction rather than predicted as if unpacked.
        if point.packing != super::config::Packing::None {
            continue;
        }
        if spec.max_seq
            && out
                .iter()
                .any(|p: &Predicted| p.point.strategy == point.strategy && p.point.ranks == point.ranks)
        {
            continue;
        }
        let job = job_for(cfg, &point)?;
        let baseline = baseline_for(&spec, point.strategy)?;
        let hw = match &baseline {
            Some(b) => hw.with_software(b, Band::Central)?,
            None => hw.clone(),
        };
        let (job, space) = match spec.mode {
            Mode::Free => {
                let space = space(&spec, &job)?;
                (job, space)
            }
            Mode::Paper => paper_space(&spec, job, &hw, baseline.as_ref())?,
        };
        let run = |band: Band| -> std::result::Result<Prediction, String> {
            let hw = hw.at_band(band);
            let outcome = if spec.max_seq {
                let fixed = SearchSpace { micro_batch: vec![1], ..space.clone() };
                cost::max_seq(&job, &hw, &fixed)
            } else if spec.search || spec.mode == Mode::Paper {
                cost::best(&job, &hw, &space)
            } else {
                cost::predict(&job, &hw)
            };
            outcome.map_err(|e| e.to_string())
        };
        out.push(Predicted {
            point,
            outcome: run(Band::Central),
            low: run(Band::Low),
            high: run(Band::High),
        });
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
    let band = |b: Band, f: &dyn Fn(&Prediction) -> f64| -> Vec<Option<f64>> {
        rows.iter().map(|r| r.at(b).as_ref().ok().map(f)).collect()
    };
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
        "software" => rows.iter().map(|r| r.outcome.as_ref().map_or("-".to_string(), |p| p.software.clone())).collect::<Vec<_>>(),
        "megatron_tflops_per_gpu_low" => band(Band::Low, &|p| p.megatron_tflops_per_gpu),
        "megatron_tflops_per_gpu_high" => band(Band::High, &|p| p.megatron_tflops_per_gpu),
        "tokens_per_s_low" => band(Band::Low, &|p| p.tokens_per_s),
        "tokens_per_s_high" => band(Band::High, &|p| p.tokens_per_s),
        "peak_gib_low" => band(Band::Low, &|p| p.memory.resident_bytes / (mib * 1024.0)),
        "peak_gib_high" => band(Band::High, &|p| p.memory.resident_bytes / (mib * 1024.0)),
        "seq_low" => rows.iter().map(|r| r.low.as_ref().ok().map(|p| p.job.seq)).collect::<Vec<_>>(),
        "seq_high" => rows.iter().map(|r| r.high.as_ref().ok().map(|p| p.job.seq)).collect::<Vec<_>>(),
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
    plots(&dir, &rows, &format!("{} on {}", cfg.name, hw.name))?;
    Ok((dir, df))
}

/// One predicted point of a chart: the sequence and three y values.
struct PlotPoint {
    seq: f64,
    tokens_per_s: f64,
    tflops: f64,
    bytes: f64,
}

/// Throughput, TFLOP/s per GPU and memory against the sequence, one line per strategy and
/// world size.
fn plots(dir: &Path, rows: &[Predicted], setting: &str) -> Result<Vec<PathBuf>> {
    // Keyed by strategy and world size, in that order (P=8 before P=16).
    let mut lines: std::collections::BTreeMap<(String, usize), Vec<PlotPoint>> = Default::default();
    for r in rows {
        if let Ok(p) = &r.outcome {
            let key = (r.point.strategy.label(), r.point.ranks);
            lines.entry(key).or_default().push(PlotPoint {
                seq: p.job.seq as f64,
                tokens_per_s: p.tokens_per_s,
                tflops: p.megatron_tflops_per_gpu,
                bytes: p.memory.resident_bytes,
            });
        }
    }
    let series = |y: fn(&PlotPoint) -> f64| -> Vec<Series> {
        lines
            .iter()
            .filter(|(_, v)| v.len() >= 2)
            .map(|((s, p), v)| Series {
                name: format!("{s} P={p}"),
                points: v.iter().map(|p| (p.seq, y(p))).collect(),
            })
            .collect()
    };
    let n = || Axis::auto("sequence length N", Unit::Tokens);
    let charts = [
        (
            "throughput_vs_seq",
            Chart::new(
                &format!("{setting}: throughput (predicted)"),
                n(),
                Axis::auto("tokens/s", Unit::Number).from_zero(),
                series(|p| p.tokens_per_s),
            ),
        ),
        (
            "tflops_vs_seq",
            Chart::new(
                &format!("{setting}: TFLOP/s per GPU (predicted)"),
                n(),
                Axis::linear("TFLOP/s per GPU (Megatron-DeepSpeed)", Unit::Number).from_zero(),
                series(|p| p.tflops),
            ),
        ),
        (
            "memory_vs_seq",
            Chart::new(
                &format!("{setting}: peak memory per GPU (predicted)"),
                n(),
                Axis::auto("resident per GPU", Unit::Bytes).from_zero(),
                series(|p| p.bytes),
            ),
        ),
    ];
    let mut files = Vec::new();
    for (stem, chart) in charts {
        if !chart.series.is_empty() {
            files.extend(chart.write(&dir.join("plots").join(stem))?);
        }
    }
    Ok(files)
}

/// How `[parallel] strategies` spells a strategy (`usp_zigzag:8`, where `label` says
/// `usp_u8_zigzag`).
fn spelled(s: StrategyConfig) -> String {
    match s {
        StrategyConfig::Usp { ulysses, zigzag: false } => format!("usp:{ulysses}"),
        StrategyConfig::Usp { ulysses, zigzag: true } => format!("usp_zigzag:{ulysses}"),
        other => other.label(),
    }
}

/// What one written config fixes: everything of a job but the strategy, the world size and the
/// sequence, which the config sweeps.
#[derive(Debug, Clone, PartialEq)]
struct Setting {
    dp: usize,
    micro_batch: i64,
    grad_accum: i64,
    zero: ZeroStage,
    checkpointing: Checkpointing,
    optimizer: bool,
    overlap: bool,
}

/// Points that one config can sweep: every strategy x world size x sequence at one setting.
#[derive(Debug, Clone, PartialEq)]
struct Sweep {
    strategies: Vec<StrategyConfig>,
    ranks: Vec<usize>,
    seqs: Vec<i64>,
    setting: Setting,
    /// The predictions it holds, for the header.
    found: Vec<Prediction>,
}

/// The predicted points grouped into sweeps a config can express: per strategy and world size
/// the lengths that share a setting, then strategies, then world sizes, merged where the rest
/// is equal.
fn sweeps(found: &[Prediction]) -> Vec<Sweep> {
    let mut out: Vec<Sweep> = Vec::new();
    for p in found {
        let j = &p.job;
        let setting = Setting {
            dp: j.dp,
            micro_batch: j.micro_batch,
            grad_accum: j.grad_accum,
            zero: j.zero,
            checkpointing: j.checkpointing,
            optimizer: j.optimizer,
            overlap: j.overlap,
        };
        let same =
            |s: &&mut Sweep| s.strategies == [j.strategy] && s.ranks == [j.ranks] && s.setting == setting;
        match out.iter_mut().find(|s| same(s)) {
            Some(s) if !s.seqs.contains(&j.seq) => {
                s.seqs.push(j.seq);
                s.found.push(p.clone());
            }
            Some(_) => {} // the same job twice (max_seq's lengths): one is enough
            None => out.push(Sweep {
                strategies: vec![j.strategy],
                ranks: vec![j.ranks],
                seqs: vec![j.seq],
                setting,
                found: vec![p.clone()],
            }),
        }
    }
    let merge = |list: Vec<Sweep>, by_strategy: bool| {
        let mut merged: Vec<Sweep> = Vec::new();
        for s in list {
            let fits = |m: &&mut Sweep| {
                m.setting == s.setting
                    && m.seqs == s.seqs
                    && if by_strategy { m.ranks == s.ranks } else { m.strategies == s.strategies }
            };
            match merged.iter_mut().find(|m| fits(m)) {
                Some(m) if by_strategy => {
                    m.strategies.extend(s.strategies);
                    m.found.extend(s.found);
                }
                Some(m) => {
                    m.ranks.extend(s.ranks);
                    m.found.extend(s.found);
                }
                None => merged.push(s),
            }
        }
        merged
    };
    merge(merge(out, true), false)
}

impl ExperimentConfig {
    /// This config with the sweep and setting of `sweep`: `[parallel]` and `[train]` set to it
    /// (AdamW at its defaults added where the setting has an optimizer and the config none, as
    /// the trainer needs one for ZeRO 1-3; removed where it has none), `[predict]` naming `hardware` and the optimizer and
    /// searching nothing, so that `ulysses predict` predicts every point as it was found.
    fn with_sweep(&self, name: String, sweep: &Sweep, hardware: &str) -> Result<ExperimentConfig> {
        let s = &sweep.setting;
        let mut c = self.clone();
        c.description = format!(
            "{}, at the setting ulysses predict found on {hardware}: {}",
            self.name,
            setting(&sweep.found[0].job)
        );
        c.name = name;
        c.output = None;
        c.parallel.ranks = sweep.ranks.clone();
        c.parallel.dp = s.dp;
        c.parallel.strategies = sweep.strategies.iter().map(|&x| spelled(x)).collect();
        c.parallel.reference = false;
        c.train.seq = sweep.seqs.clone();
        c.train.batch = s.micro_batch;
        c.train.grad_accum = s.grad_accum as usize;
        c.train.zero = vec![s.zero];
        c.train.checkpointing = s.checkpointing;
        // The run updates the weights exactly when the prediction counts Adam.
        if s.optimizer && c.train.adamw.is_none() {
            c.train.adamw = Some(Default::default());
        } else if !s.optimizer {
            c.train.adamw = None;
        }
        let paper = self.predict.as_ref().map(|p| p.paper.clone()).unwrap_or_default();
        let (software, mut baselines) =
            self.predict.as_ref().map(|p| (p.software.clone(), p.baselines.clone())).unwrap_or_default();
        baselines.retain(|k, _| k.parse::<StrategyConfig>().is_ok_and(|s| sweep.strategies.contains(&s)));
        c.predict = Some(PredictSpec {
            hardware: Some(hardware.to_string()),
            optimizer: Some(s.optimizer),
            overlap: s.overlap,
            software,
            baselines,
            paper,
            ..PredictSpec::default()
        });
        c.validate()?;
        Ok(c)
    }

    /// Writes the setting each point of `rows` was predicted at (with `[predict] search`: the
    /// best the search found; with `max_seq`: at the longest sequence) as configs that `ulysses
    /// run` and `ulysses submit` accept unchanged and `ulysses predict` predicts to the same
    /// numbers. A config fixes one DP degree, micro-batch, accumulation, ZeRO stage and
    /// checkpointing for all its points, so points found at different settings go to different
    /// configs: `path` if one config holds them all, else `<path stem>-1.toml`, `-2`, ... beside
    /// it. `hardware` is the preset or file they were predicted on; points without a prediction
    /// and points of a baseline system (`[predict] baselines`: its settings are another
    /// system's) are left out. Returns the files written, in order.
    pub fn write_settings(&self, rows: &[Predicted], hardware: &str, path: &Path) -> Result<Vec<PathBuf>> {
        // A baseline system's setting (Megatron-LM's) is not one this toolkit runs: left out.
        let mut found = Vec::new();
        for p in rows.iter().filter_map(|r| r.outcome.as_ref().ok()) {
            if !self.is_baseline(p.job.strategy)? {
                found.push(p.clone());
            }
        }
        if found.is_empty() {
            return Err(bad(
                &path.display().to_string(),
                format!("no point of {} has a setting that fits: nothing to write", self.name),
            ));
        }
        let sweeps = sweeps(&found);
        let many = sweeps.len() > 1;
        let stem = path.file_stem().map_or_else(|| "settings".into(), |s| s.to_string_lossy().into_owned());
        let gib = (1u64 << 30) as f64;
        let mut written = Vec::new();
        for (i, sweep) in sweeps.iter().enumerate() {
            let (name, file) = if many {
                (
                    format!("{}_best_{}", self.name, i + 1),
                    path.with_file_name(format!("{stem}-{}.toml", i + 1)),
                )
            } else {
                (format!("{}_best", self.name), path.to_path_buf())
            };
            let cfg = self.with_sweep(name, sweep, hardware)?;
            // The config must predict what was found, point for point.
            for point in cfg.points()? {
                let job = job_for(&cfg, &point)?;
                if !sweep.found.iter().any(|p| p.job == job) {
                    return Err(bad(
                        &file.display().to_string(),
                        format!("the written config would predict {} differently", job.describe()),
                    ));
                }
            }
            let found_at = setting(&sweep.found[0].job);
            let mut text = format!(
                "# Written by `ulysses predict --write-config` from {:?} on {hardware}.\n\
                 # The setting found for these points: {found_at}.\n\
                 # `ulysses run` and `ulysses submit` run it as it is; `ulysses predict` predicts the same:\n",
                self.name,
            );
            for p in &sweep.found {
                text += &format!(
                    "#   {} P={} N={}: {:.3} s per step, {:.0} tokens/s, peak {:.2} of {:.2} GiB per GPU\n",
                    p.job.strategy.label(),
                    p.job.ranks,
                    p.job.seq,
                    p.step_s,
                    p.tokens_per_s,
                    p.memory.resident_bytes / gib,
                    p.memory.capacity_bytes / gib
                );
            }
            text += &cfg.to_toml()?;
            ExperimentConfig::parse(&text, &file.display().to_string())?;
            if let Some(dir) = file.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir).map_err(|e| bad(&dir.display().to_string(), e.to_string()))?;
            }
            std::fs::write(&file, text).map_err(|e| bad(&file.display().to_string(), e.to_string()))?;
            written.push(file);
        }
        Ok(written)
    }
}
