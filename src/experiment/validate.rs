//! The checks of a config: every field and every point, before anything runs (`validate`, which
//! `parse` calls), what only this build and machine can tell: the dataset, the backend and the
//! device (`check_runnable`), and whether every point fits the memory of the hardware the config
//! names, by the cost model (`check_memory`). The `[train]` fields of the step loop are checked
//! in `plan.rs`.

use std::fmt;
use std::path::Path;

use super::config::{field_error, Backend, ExperimentConfig, Point};
use super::launch::Launcher;
use super::predict::{peak_memory, setting, what_fits};
use crate::attention::StrategyConfig;
use crate::cost::Hardware;
use crate::{Error, Result};

const GIB: f64 = (1u64 << 30) as f64;

/// One point's predicted memory, as `ulysses run` would run it.
#[derive(Debug, Clone, PartialEq)]
pub struct PointMemory {
    pub point: Point,
    /// The resident peak per GPU the cost model predicts (the largest over the ranks), bytes.
    pub peak_bytes: f64,
    /// What one GPU may use (the device's memory less the hardware file's reserve), bytes.
    pub capacity_bytes: f64,
}

impl PointMemory {
    /// Whether the predicted peak is within the capacity.
    pub fn fits(&self) -> bool {
        self.peak_bytes <= self.capacity_bytes
    }
}

/// What the memory check found: every point's predicted peak on the named hardware.
#[derive(Debug, Clone, PartialEq)]
pub struct MemoryCheck {
    /// The hardware as named (`[predict] hardware`: a preset or a file).
    pub hardware: String,
    /// Its device ("NVIDIA A100-SXM4-40GB").
    pub device: String,
    pub points: Vec<PointMemory>,
    /// Points predicted not to fit were let through (`[predict] force`, `--force`).
    pub forced: bool,
}

impl MemoryCheck {
    /// The points predicted not to fit.
    pub fn over(&self) -> Vec<&PointMemory> {
        self.points.iter().filter(|p| !p.fits()).collect()
    }
}

impl fmt::Display for MemoryCheck {
    /// One line: every point fits (with the largest peak), or which do not and were forced.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let cap = self.points.first().map_or(0.0, |p| p.capacity_bytes) / GIB;
        let head =
            format!("memory check on {} ({}, {cap:.2} GiB usable per GPU)", self.hardware, self.device);
        let over = self.over();
        if over.is_empty() {
            let top = self.points.iter().max_by(|a, b| a.peak_bytes.total_cmp(&b.peak_bytes));
            return match top {
                Some(p) => write!(
                    f,
                    "{head}: all {} points fit, the largest predicted peak {:.2} GiB per GPU (point {} {})",
                    self.points.len(),
                    p.peak_bytes / GIB,
                    p.point.index + 1,
                    p.point.describe()
                ),
                None => write!(f, "{head}: no points"),
            };
        }
        write!(
            f,
            "{head}: {} of {} points predicted not to fit, run anyway (forced):",
            over.len(),
            self.points.len()
        )?;
        for p in over {
            write!(
                f,
                " point {} {} peak {:.2} GiB;",
                p.point.index + 1,
                p.point.describe(),
                p.peak_bytes / GIB
            )?;
        }
        Ok(())
    }
}

impl ExperimentConfig {
    /// Checks every field and every point, naming the field and the fix.
    pub fn validate(&self) -> Result<()> {
        if self.name.trim().is_empty() || self.name.contains(['/', '\\']) {
            return Err(field_error(
                "name",
                format!("{:?} must be a non-empty name without slashes", self.name),
            ));
        }
        let gpt = self.gpt()?;
        self.attention()?;
        self.kind()?;
        let p = &self.parallel;
        if p.ranks.is_empty() || p.ranks.contains(&0) {
            return Err(field_error(
                "parallel.ranks",
                format!("{:?} must list world sizes of at least 1", p.ranks),
            ));
        }
        if p.dp == 0 {
            return Err(field_error("parallel.dp", "must be at least 1".into()));
        }
        if let Some(&bad) = p.ranks.iter().find(|&&r| r % p.dp != 0) {
            return Err(field_error(
                "parallel.ranks",
                format!("{bad} ranks cannot hold dp = {} replicas; use a multiple of {}", p.dp, p.dp),
            ));
        }
        if p.strategies.is_empty() {
            return Err(field_error(
                "parallel.strategies",
                "list at least one strategy, e.g. [\"ulysses\"]".into(),
            ));
        }
        if !matches!(p.device.as_str(), "cpu" | "cuda") {
            return Err(field_error("parallel.device", format!("{:?}: use cpu or cuda", p.device)));
        }
        if p.threads_per_rank == 0 || p.timeout_s == 0 {
            return Err(field_error("parallel", "threads_per_rank and timeout_s must be at least 1".into()));
        }
        self.validate_processes()?;
        let t = &self.train;
        if t.seq.is_empty() || t.seq.iter().any(|&n| n < 2) {
            return Err(field_error(
                "train.seq",
                format!("{:?} must list sequence lengths of at least 2", t.seq),
            ));
        }
        if t.batch < 1 || t.steps < 1 {
            return Err(field_error(
                "train",
                format!("batch {} and steps {} must be at least 1", t.batch, t.steps),
            ));
        }
        if let Some(a) = &t.adamw {
            if !(a.lr > 0.0 && a.eps > 0.0 && (0.0..1.0).contains(&a.beta1) && (0.0..1.0).contains(&a.beta2))
            {
                return Err(field_error(
                    "train.adamw",
                    format!("lr and eps must be positive, betas in [0, 1): {a:?}"),
                ));
            }
        }
        self.validate_training()?;
        self.validate_software()?;
        for point in self.points()? {
            let sp = point.ranks / point.dp;
            point.strategy.check(point.seq, sp, gpt.n_head, gpt.n_kv_head).map_err(|e| {
                field_error(
                    "parallel.strategies",
                    format!("{} (SP degree {sp}) cannot run: {e}", point.describe()),
                )
            })?;
        }
        Ok(())
    }

    /// `[predict] software` and every baseline load; a baseline names a strategy the config
    /// sweeps.
    fn validate_software(&self) -> Result<()> {
        let Some(spec) = &self.predict else { return Ok(()) };
        if let Some(name) = &spec.software {
            crate::cost::Software::load(name).map_err(|e| field_error("predict.software", e.to_string()))?;
        }
        let swept: Vec<StrategyConfig> =
            self.parallel.strategies.iter().filter_map(|s| s.parse().ok()).collect();
        for (strategy, name) in &spec.baselines {
            let field = format!("predict.baselines.{strategy}");
            let s: StrategyConfig = strategy.parse().map_err(|e: String| field_error(&field, e))?;
            if !swept.contains(&s) {
                return Err(field_error(
                    &field,
                    format!("{strategy} is not among [parallel] strategies {:?}", self.parallel.strategies),
                ));
            }
            let sw = crate::cost::Software::load(name).map_err(|e| field_error(&field, e.to_string()))?;
            if sw.baseline.is_none() {
                return Err(field_error(
                    &field,
                    format!("software {name:?} has no [baseline] section: it describes no other system"),
                ));
            }
        }
        Ok(())
    }

    /// The backend, device and placement fields agree: CPU tensors on MPI, CUDA on NCCL,
    /// placement only where processes are launched.
    fn validate_processes(&self) -> Result<()> {
        let p = &self.parallel;
        match (p.backend, p.device.as_str()) {
            (Backend::Mpi, "cuda") => {
                return Err(field_error(
                    "parallel.device",
                    "cuda with backend = \"mpi\": the mpi backend moves CPU tensors; use backend = \"nccl\" \
                     for GPUs (one process per GPU)"
                        .into(),
                ))
            }
            (Backend::Nccl, "cpu") => {
                return Err(field_error(
                    "parallel.device",
                    "backend = \"nccl\" moves CUDA tensors: set device = \"cuda\" (or use backend = \"mpi\" on CPUs)"
                        .into(),
                ))
            }
            _ => {}
        }
        if p.backend == Backend::Local
            && (p.launcher != Launcher::Auto || p.ranks_per_node.is_some() || p.hostfile.is_some())
        {
            return Err(field_error(
                "parallel.launcher",
                "launcher, ranks_per_node and hostfile place processes: they need backend = \"mpi\" or \"nccl\"".into(),
            ));
        }
        if p.ranks_per_node == Some(0) {
            return Err(field_error("parallel.ranks_per_node", "must be at least 1".into()));
        }
        if let Some(s) = &self.slurm {
            s.validate().map_err(|e| field_error("slurm", e))?;
        }
        Ok(())
    }

    /// Checks what validation cannot know in advance: the dataset, and that this build and
    /// machine can run the backend and device. `base` resolves dataset paths.
    pub fn check_runnable(&self, base: &Path) -> Result<()> {
        let dataset = self.dataset.open(base).map_err(|e| field_error("dataset", e.to_string()))?;
        let vocab = self.gpt()?.vocab_size;
        if dataset.vocab_size() > vocab {
            return Err(field_error(
                "dataset",
                format!(
                    "{} has a vocabulary of {}, more than model.vocab_size {vocab}",
                    dataset.describe(),
                    dataset.vocab_size()
                ),
            ));
        }
        // The data must fill one sequence of the longest length (an empty or short file).
        if let Some(&n) = self.train.seq.iter().max() {
            dataset
                .batch(self.train.seed, 0, 0, 1, n)
                .map(drop)
                .map_err(|e| field_error("dataset", e.to_string()))?;
        }
        // The driver only starts mpirun or srun; the ranks are processes of
        // `RunOptions::program`, which must be built with `--features mpi` (and `nccl`).
        if self.parallel.backend != Backend::Local {
            super::launch::check_runnable(self)?;
        }
        if self.parallel.device == "cuda" && !crate::device::load_cuda() {
            return Err(field_error(
                "parallel.device",
                "cuda was asked for but no CUDA device is available".into(),
            ));
        }
        Ok(())
    }
}

impl ExperimentConfig {
    /// Checks every point against the memory of the hardware the config names (`[predict]
    /// hardware`, which `ulysses run --hardware` sets), by the cost model, as `ulysses run` would
    /// run it (`run_job`: `[parallel]` and `[train]`, not `[predict]`'s overrides or search).
    /// `ulysses run` calls it before anything starts, and so must `ulysses submit`. A config that
    /// names no hardware is not checked (`Ok(None)`): runs on CPU thread ranks, and GPU runs
    /// whose hardware is unknown. A point predicted not to fit refuses the whole config, naming
    /// each such point's predicted peak per GPU, the capacity, and what would fit (the fastest
    /// setting the search finds at the same length and global batch, or else the longest
    /// sequence that fits), unless `[predict] force` is set (`--force`): then the check passes
    /// and says which points were forced.
    pub fn check_memory(&self) -> Result<Option<MemoryCheck>> {
        let Some(spec) = self.predict.as_ref().filter(|p| p.hardware.is_some()) else {
            return Ok(None);
        };
        let named = spec.hardware.clone().unwrap_or_default();
        let hw = Hardware::load(&named).map_err(|e| field_error("predict.hardware", e.to_string()))?;
        let mut points = Vec::new();
        for point in self.points()? {
            let m = peak_memory(&self.run_job(&point)?, &hw)?;
            points.push(PointMemory {
                point,
                peak_bytes: m.resident_bytes,
                capacity_bytes: m.capacity_bytes,
            });
        }
        let check =
            MemoryCheck { hardware: named, device: hw.device.model.clone(), points, forced: spec.force };
        if check.forced || check.over().is_empty() {
            return Ok(Some(check));
        }
        Err(self.refusal(&check, &hw)?)
    }

    /// The error of a check that found points predicted not to fit.
    fn refusal(&self, check: &MemoryCheck, hw: &Hardware) -> Result<Error> {
        let over = check.over();
        let cap = over.first().map_or(0.0, |p| p.capacity_bytes) / GIB;
        let mut msg = format!(
            "{} of the {} points of {} are predicted not to fit one {} ({cap:.2} GiB usable per GPU), \
             so nothing was started:",
            over.len(),
            check.points.len(),
            self.name,
            hw.device.model
        );
        for p in over {
            let job = self.run_job(&p.point)?;
            msg += &format!(
                "\n  point {} {} ({}): predicted peak {:.2} GiB per GPU, capacity {cap:.2} GiB; {}",
                p.point.index + 1,
                p.point.describe(),
                setting(&job),
                p.peak_bytes / GIB,
                what_fits(self, &job, hw)
            );
        }
        msg +=
            "\nSet what fits in [parallel] and [train] (`ulysses predict <config> --search --write-config \
                <file>` writes such configs), name the hardware it will run on ([predict] hardware, or \
                `ulysses run --hardware`), or run it anyway with --force ([predict] force = true): a point \
                that runs out of memory stops the run there.";
        Ok(Error::InvalidArgument { op: "memory check", group: check.hardware.clone(), msg })
    }
}
