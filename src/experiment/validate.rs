//! The checks of a config: every field and every point, before anything runs (`validate`, which
//! `parse` calls), and what only this build and machine can tell: the dataset, the backend and
//! the device (`check_runnable`). The `[train]` fields of the step loop are checked in `plan.rs`.

use std::path::Path;

use super::config::{field_error, Backend, ExperimentConfig};
use super::launch::Launcher;
use crate::Result;

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
