//! Running an experiment: every sweep point as one launch of its ranks, every step measured
//! on every rank and written as soon as all ranks finish it.
//!
//! This file is the driver: it picks the run's folder and where each point starts, launches
//! each point's ranks (`spawn.rs`), writes every step once all ranks have reported it, and
//! summarises the point. What one rank does is in `rank.rs`; a rank as an MPI process, in
//! `mpi_rank.rs`; the run's `meta.toml`, in `meta.rs`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use polars::prelude::DataFrame;

use super::config::{Backend, ExperimentConfig, Point};
use super::meta::meta;
use super::progress::Progress;
use super::results::{complete_steps, CommRow, PointRow, Results, StepRow};
use super::spawn::{local_ranks, process_ranks};
use crate::data::Dataset;
use crate::model::GptConfig;
use crate::train::checkpoints;
use crate::{Error, Result};

/// How to run.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Continue the run already in the output folder (finished points are skipped).
    pub resume: bool,
    /// Directory that relative paths (output, dataset files) start from.
    pub base_dir: PathBuf,
    /// The `ulysses` binary whose processes are the ranks of MPI and NCCL points (started by
    /// mpirun or srun as `ulysses run-point`).
    pub program: Option<PathBuf>,
}

/// What a finished run returns.
pub struct RunSummary {
    pub dir: PathBuf,
    /// One row per point (the `points` table).
    pub points: DataFrame,
    pub elapsed: Duration,
}

/// Runs every point of `cfg` (skipping those an earlier run finished, with `resume`).
pub fn run(cfg: &ExperimentConfig, opts: &RunOptions) -> Result<RunSummary> {
    let started = Instant::now();
    cfg.validate()?;
    // Every point against the memory of the hardware the config names, before anything starts.
    cfg.check_memory()?;
    cfg.check_runnable(&opts.base_dir)?;
    if cfg.parallel.backend != Backend::Local && opts.program.is_none() {
        return Err(no_program());
    }
    let asked = opts.base_dir.join(cfg.output_dir());
    // A folder holding a run is never overwritten: resume continues it; otherwise the run goes
    // to the first free `<folder>-2`, `-3`, ... and says so.
    let dir = if opts.resume { asked.clone() } else { free_dir(&asked) };
    let points = cfg.points()?;
    // Where each point starts: when resuming, its newest checkpoint of a step whose rows are
    // all written (the ranks may have saved later ones than the results writer wrote when the
    // run was killed; the rows from that step on are dropped), else `train.resume_from`, else
    // the initialisation.
    let own: BTreeMap<u32, (u64, PathBuf)> = if opts.resume {
        let written = complete_steps(&dir)?;
        let usable = |p: &Point| {
            let done = u64::from(written.get(&(p.index as u32)).copied().unwrap_or(0));
            checkpoints(&checkpoints_dir(&dir, p)).into_iter().rfind(|(s, _)| *s <= done)
        };
        points.iter().filter_map(|p| Some((p.index as u32, usable(p)?))).collect()
    } else {
        BTreeMap::new()
    };
    let keep = own.iter().map(|(&p, (step, _))| (p, *step as u32)).collect();
    let mut results =
        Results::open_resuming(&dir, &cfg.to_toml()?, &meta(cfg, opts.resume)?, opts.resume, &keep)?;
    let per_point = (cfg.train.warmup + cfg.train.steps) as u64;
    let mut progress = Progress::new(per_point * points.len() as u64);
    let dataset = cfg.dataset.open(&opts.base_dir)?;
    if dir != asked {
        progress.say(&format!(
            "{} already holds a run (--resume continues it); this one goes to {}",
            asked.display(),
            dir.display()
        ));
    }
    progress.say(&format!(
        "{}: {} points, {} steps each (+{} warm-up), data: {}; results in {}",
        cfg.name,
        points.len(),
        cfg.train.steps,
        cfg.train.warmup,
        dataset.describe(),
        dir.display()
    ));
    for point in &points {
        if results.completed().contains(&(point.index as u32)) {
            progress.skip(per_point);
            progress.say(&format!(
                "point {}/{} {}: finished by the earlier run",
                point.index + 1,
                points.len(),
                point.describe()
            ));
            continue;
        }
        let start = match own.get(&(point.index as u32)) {
            Some((step, path)) => {
                progress.skip(*step);
                progress
                    .say(&format!("point {} continues from its checkpoint at step {step}", point.index + 1));
                Some(path.clone())
            }
            None => cfg.train.resume_from.as_ref().map(|p| opts.base_dir.join(p)),
        };
        progress.say(&format!("point {}/{} {}", point.index + 1, points.len(), point.describe()));
        run_point(cfg, point, dataset.as_ref(), opts, start, &mut results, &mut progress)?;
    }
    progress.finish();
    Ok(RunSummary { dir, points: results.points_frame().clone(), elapsed: started.elapsed() })
}

/// The checkpoints of `point` in a run's folder `dir`.
pub(super) fn checkpoints_dir(dir: &Path, point: &Point) -> PathBuf {
    dir.join("checkpoints").join(format!("point-{}", point.index))
}

/// `dir` if it holds no run, else the first `<dir>-N` (N = 2, 3, ...) that holds none.
pub(crate) fn free_dir(dir: &Path) -> PathBuf {
    let holds_run = |d: &Path| d.join("config.toml").exists();
    if !holds_run(dir) {
        return dir.to_path_buf();
    }
    let name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    (2..)
        .map(|i| dir.with_file_name(format!("{name}-{i}")))
        .find(|d| !holds_run(d))
        .unwrap_or_else(|| dir.to_path_buf())
}

/// What one rank reports after each step.
pub(super) type Report = (StepRow, Vec<CommRow>);

/// What the ranks of a point send to the writer: reports, and (MPI) other lines they print.
pub(super) enum Event {
    Report(Box<Report>),
    Line(String),
}

fn run_point(
    cfg: &ExperimentConfig,
    point: &Point,
    dataset: &dyn Dataset,
    opts: &RunOptions,
    start: Option<PathBuf>,
    results: &mut Results,
    progress: &mut Progress,
) -> Result<()> {
    let gpt = cfg.gpt()?;
    let total = cfg.train.warmup + cfg.train.steps;
    let (tx, rx) = mpsc::channel::<Event>();
    let dir = results.dir().to_path_buf();
    let mut rows: Vec<StepRow> = Vec::new();
    let outcome = std::thread::scope(|s| -> Result<()> {
        let gpt = &gpt;
        let ranks = s.spawn(move || match cfg.parallel.backend {
            Backend::Local => local_ranks(cfg, point, gpt, dataset, (&dir, start), &tx),
            Backend::Mpi | Backend::Nccl => process_ranks(cfg, point, &dir, opts, start, &tx),
        });
        // Every rank reports each step; a step is written once all have.
        let mut pending: BTreeMap<u32, Vec<Report>> = BTreeMap::new();
        let mut written = Ok(());
        for event in rx {
            let report = match event {
                Event::Report(r) => *r,
                Event::Line(line) => {
                    progress.say(&line);
                    continue;
                }
            };
            let step = report.0.step;
            let entry = pending.entry(step).or_default();
            entry.push(report);
            if entry.len() == point.ranks && written.is_ok() {
                let mut reports = pending.remove(&step).unwrap_or_default();
                reports.sort_by_key(|(r, _)| r.rank);
                let steps: Vec<StepRow> = reports.iter().map(|(r, _)| r.clone()).collect();
                let comm: Vec<CommRow> = reports.into_iter().flat_map(|(_, c)| c).collect();
                let slowest = steps.iter().map(|r| r.step_ms).fold(0.0, f64::max);
                progress.step(
                    &point.describe(),
                    step as usize,
                    total,
                    slowest,
                    steps[0].tokens_per_s,
                    steps[0].loss,
                );
                written = results.step(&steps, &comm);
                rows.extend(steps);
            }
        }
        let launched = ranks.join().map_err(|_| Error::Aborted {
            op: "experiment",
            group: "-".into(),
            rank: 0,
            cause: "the launch thread panicked".into(),
        })?;
        launched?;
        written
    });
    outcome?;
    results.point(summarize(point, cfg, &gpt, &rows)?)
}

/// Medians over a point's measured steps (each step timed by its slowest rank).
fn summarize(point: &Point, cfg: &ExperimentConfig, gpt: &GptConfig, rows: &[StepRow]) -> Result<PointRow> {
    let measured: Vec<&StepRow> = rows.iter().filter(|r| !r.warmup).collect();
    let mut by_step: BTreeMap<u32, Vec<&StepRow>> = BTreeMap::new();
    for r in &measured {
        by_step.entry(r.step).or_default().push(r);
    }
    let median = |mut v: Vec<f64>| -> f64 {
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
    };
    let per_step = |f: &dyn Fn(&StepRow) -> f64| -> Vec<f64> {
        by_step.values().map(|rs| rs.iter().map(|r| f(r)).fold(f64::MIN, f64::max)).collect()
    };
    let step_ms = median(per_step(&|r| r.step_ms));
    let seconds = step_ms / 1e3;
    let (b, n, dp) = (cfg.train.batch, point.seq, (point.dp * point.grad_accum) as i64);
    let flops = gpt.train_flops(b * n * dp, n, &cfg.attention()?.mask);
    let (mut tokens_per_s, mut model_tflops) = ((b * n * dp) as f64 / seconds, flops / seconds / 1e12);
    if point.packing != super::config::Packing::None {
        // Packed and padded rows teach a different number of tokens each step (rank.rs): the
        // median over steps of each step's labelled tokens and FLOPs over its slowest rank's time.
        let per = |f: &dyn Fn(&StepRow) -> f64| {
            median(
                by_step
                    .values()
                    .map(|rs| {
                        let slowest = rs.iter().map(|r| r.step_ms).fold(f64::MIN, f64::max);
                        f(rs[0]) * rs[0].step_ms / slowest
                    })
                    .collect(),
            )
        };
        (tokens_per_s, model_tflops) = (per(&|r| r.tokens_per_s), per(&|r| r.model_tflops));
    }
    let last = measured.iter().filter(|r| r.rank == 0).max_by_key(|r| r.step);
    Ok(PointRow {
        point: point.index as u32,
        strategy: point.label(),
        ranks: point.ranks as u32,
        sp: (point.ranks / point.dp) as u32,
        dp: point.dp as u32,
        seq: n,
        batch: b,
        steps: by_step.len() as u32,
        median_step_ms: step_ms,
        tokens_per_s,
        model_tflops,
        peak_mib_per_rank: measured.iter().map(|r| r.peak_mib_per_rank).fold(f64::NAN, f64::max),
        peak_reserved_mib_per_rank: measured
            .iter()
            .map(|r| r.peak_reserved_mib_per_rank)
            .fold(f64::NAN, f64::max),
        outside_allocator_mib_per_rank: measured
            .iter()
            .map(|r| r.outside_allocator_mib_per_rank)
            .fold(f64::NAN, f64::max),
        memory: measured.first().map_or_else(|| super::memory::HOST_RSS.to_string(), |r| r.memory.clone()),
        bytes_sent_per_rank: median(per_step(&|r| r.bytes_sent as f64)) as u64,
        bytes_received_per_rank: median(per_step(&|r| r.bytes_received as f64)) as u64,
        final_loss: last.map_or(f64::NAN, |r| r.loss),
    })
}

pub(super) fn writer_gone() -> Error {
    Error::Aborted {
        op: "experiment",
        group: "-".into(),
        rank: 0,
        cause: "the results writer stopped".into(),
    }
}

pub(super) fn no_program() -> Error {
    Error::Backend {
        backend: "mpi",
        msg: "an MPI or NCCL run needs the path of a ulysses binary built with `--features mpi` \
              (and `nccl`) (RunOptions::program): its processes are the ranks"
            .into(),
    }
}
