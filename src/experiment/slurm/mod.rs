//! Experiments on a Slurm cluster: `ulysses submit` (or [`submit`] from a notebook cell) writes
//! an `sbatch` script that runs `ulysses run` inside the allocation, submits it, and [`follow`]s
//! the job: its state, the progress lines of its ranks, and the results folder, which fills
//! exactly as for a local run (`ulysses report` and the notebooks read it the same way). Each
//! point's ranks are started by `srun` inside the allocation, one per GPU with NCCL. A job that
//! is cancelled or times out keeps every finished step; submitting again with `resume`
//! continues it.
//!
//! The folder holds the run's tables and a `slurm/` folder: the config as submitted, every
//! script submitted (`submit-N.sbatch`) and each job's output (`<job id>.out`).

mod job;

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::config::{Backend, ExperimentConfig};
use crate::{Error, Result};

pub use job::{cancel, final_state, follow, queue_state, submit, JobOutcome, SubmittedJob};

/// `[slurm]`: what `ulysses submit` asks Slurm for. Every field is optional; the command's
/// options override them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SlurmSpec {
    /// Nodes (`--nodes`). Default: as few as hold the largest point at `tasks_per_node`.
    pub nodes: Option<usize>,
    /// GPUs per node (`--gpus-per-node`). Default 8 with backend nccl, none otherwise.
    pub gpus_per_node: Option<usize>,
    /// Ranks per node (`--ntasks-per-node`). Default: `gpus_per_node` with NCCL (one rank per
    /// GPU), else the largest point's ranks spread over the nodes.
    pub tasks_per_node: Option<usize>,
    /// CPUs per rank (`--cpus-per-task`). Default: Slurm's.
    pub cpus_per_task: Option<usize>,
    /// Time limit (`--time`, e.g. "04:00:00"). Default: the partition's.
    pub time: Option<String>,
    /// Partition (`--partition`). Default: the cluster's.
    pub partition: Option<String>,
    /// Account to charge (`--account`). Default: the user's.
    pub account: Option<String>,
    /// Let ranks outnumber the CPUs (`--overcommit`), for CPU ranks on a small node.
    #[serde(default)]
    pub overcommit: bool,
    /// Shell lines the job runs before ulysses (`module load cuda`, `source venv/bin/activate`).
    #[serde(default)]
    pub setup: Vec<String>,
    /// More sbatch options, each as written on the command line (`--qos=high`).
    #[serde(default)]
    pub sbatch: Vec<String>,
}

impl SlurmSpec {
    /// This spec with every field `other` sets taken from `other` (command-line options over
    /// the config's `[slurm]`).
    pub fn overridden_by(&self, other: &SlurmSpec) -> SlurmSpec {
        SlurmSpec {
            nodes: other.nodes.or(self.nodes),
            gpus_per_node: other.gpus_per_node.or(self.gpus_per_node),
            tasks_per_node: other.tasks_per_node.or(self.tasks_per_node),
            cpus_per_task: other.cpus_per_task.or(self.cpus_per_task),
            time: other.time.clone().or_else(|| self.time.clone()),
            partition: other.partition.clone().or_else(|| self.partition.clone()),
            account: other.account.clone().or_else(|| self.account.clone()),
            overcommit: other.overcommit || self.overcommit,
            setup: [self.setup.clone(), other.setup.clone()].concat(),
            sbatch: [self.sbatch.clone(), other.sbatch.clone()].concat(),
        }
    }

    /// Fields that cannot mean anything (a zero count, an empty name).
    pub fn validate(&self) -> std::result::Result<(), String> {
        for (name, v) in [
            ("nodes", self.nodes),
            ("tasks_per_node", self.tasks_per_node),
            ("cpus_per_task", self.cpus_per_task),
        ] {
            if v == Some(0) {
                return Err(format!("{name} must be at least 1"));
            }
        }
        for (name, v) in [("time", &self.time), ("partition", &self.partition), ("account", &self.account)] {
            if v.as_ref().is_some_and(|s| s.trim().is_empty() || s.contains(char::is_whitespace)) {
                return Err(format!("{name} {v:?} must be one word"));
            }
        }
        Ok(())
    }
}

/// The allocation a job asks for, every number decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allocation {
    pub nodes: usize,
    pub tasks_per_node: usize,
    /// 0 for CPU ranks.
    pub gpus_per_node: usize,
}

/// The allocation that runs every point of `cfg`, or why none does.
pub fn allocation(cfg: &ExperimentConfig, spec: &SlurmSpec) -> Result<Allocation> {
    let bad = |msg: String| Error::InvalidArgument { op: "submit", group: cfg.name.clone(), msg };
    spec.validate().map_err(bad)?;
    let nccl = cfg.parallel.backend == Backend::Nccl;
    let most = cfg.parallel.ranks.iter().copied().max().unwrap_or(1);
    let gpus_per_node = spec.gpus_per_node.unwrap_or(if nccl { 8 } else { 0 });
    if nccl && gpus_per_node == 0 {
        return Err(bad("backend nccl runs one rank per GPU: ask for GPUs (--gpus-per-node)".into()));
    }
    let tasks_per_node = match (spec.tasks_per_node, spec.nodes) {
        (Some(t), _) => t,
        (None, _) if nccl => gpus_per_node.min(most),
        (None, Some(n)) => most.div_ceil(n),
        (None, None) => most,
    };
    let nodes = spec.nodes.unwrap_or_else(|| most.div_ceil(tasks_per_node));
    if nccl && tasks_per_node > gpus_per_node {
        return Err(bad(format!(
            "{tasks_per_node} ranks per node on {gpus_per_node} GPUs per node: two ranks would share a GPU"
        )));
    }
    if nodes * tasks_per_node < most {
        return Err(bad(format!(
            "the largest point has {most} ranks, but {nodes} node(s) x {tasks_per_node} tasks hold {}",
            nodes * tasks_per_node
        )));
    }
    Ok(Allocation { nodes, tasks_per_node, gpus_per_node })
}

/// A string as one single-quoted shell word.
fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// The sbatch script that runs `config` (the copy in the results folder) into `dir`, from
/// `base` (where relative dataset paths start), with the `ulysses` binary `program`.
pub fn sbatch_script(
    cfg: &ExperimentConfig,
    spec: &SlurmSpec,
    paths: &JobPaths,
    resume: bool,
) -> Result<String> {
    let a = allocation(cfg, spec)?;
    let mut s = String::from("#!/bin/bash\n");
    s += &format!(
        "# Written by `ulysses submit` for the experiment {:?}: every point runs inside this allocation,\n\
         # its ranks started by srun ({}); results in {}.\n",
        cfg.name,
        if cfg.parallel.backend == Backend::Nccl { "one per GPU, NCCL" } else { "one per task, MPI" },
        paths.dir.display()
    );
    let mut opt = |o: String| s += &format!("#SBATCH {o}\n");
    opt(format!("--job-name=ulysses-{}", cfg.name));
    opt(format!("--nodes={}", a.nodes));
    opt(format!("--ntasks-per-node={}", a.tasks_per_node));
    if a.gpus_per_node > 0 {
        opt(format!("--gpus-per-node={}", a.gpus_per_node));
    }
    if let Some(c) = spec.cpus_per_task {
        opt(format!("--cpus-per-task={c}"));
    }
    for (name, v) in [("time", &spec.time), ("partition", &spec.partition), ("account", &spec.account)] {
        if let Some(v) = v {
            opt(format!("--{name}={v}"));
        }
    }
    if spec.overcommit {
        opt("--overcommit".into());
    }
    opt(format!("--output={}", paths.dir.join("slurm").join("%j.out").display()));
    for o in &spec.sbatch {
        opt(o.clone());
    }
    s += "set -euo pipefail\n";
    s += &format!("cd {}\n", quote(&paths.base.display().to_string()));
    for line in &spec.setup {
        s += line;
        s += "\n";
    }
    s += &format!(
        "exec {} run {} --output {}{}\n",
        quote(&paths.program.display().to_string()),
        quote(&paths.config.display().to_string()),
        quote(&paths.dir.display().to_string()),
        if resume { " --resume" } else { "" }
    );
    Ok(s)
}

/// Where a submitted run lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobPaths {
    /// The `ulysses` binary the job runs (built with `--features mpi`, and `nccl` for GPUs).
    pub program: PathBuf,
    /// Where relative paths (datasets) start; the job runs there.
    pub base: PathBuf,
    /// The results folder.
    pub dir: PathBuf,
    /// The config as submitted (in `dir/slurm/`).
    pub config: PathBuf,
}
