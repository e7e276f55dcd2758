//! Experiments on a Slurm cluster: `ulysses submit` (or [`submit`] from a notebook cell) writes
//! an `sbatch` script that runs `ulysses run` inside the allocation, submits it, and [`follow`]s
//! the job: its state, the progress lines of its ranks, and the results folder, which fills
//! exactly as for a local run (`ulysses report` and the notebooks read it the same way). Each
//! point's ranks are started by `srun` inside the allocation, one per GPU with NCCL. A job that
//! is cancelled or times out keeps every finished step; submitting again with `resume`
//! continues it.
//!
//! The folder holds the run's tables and a `slurm/` folder: the config as submitted, every
//! script submitted (`submit-N.sbatch`), each job's output (`<job id>.out`) and the latest job
//! (`job.toml`), so that a later process finds it without its id ([`SubmittedJob::load`]): a
//! notebook cell submits and returns, a later one (or one after a kernel restart) asks its
//! [`status`](SubmittedJob::status) and [`collect`](SubmittedJob::collect)s the results.

mod job;
mod mpi;

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::config::{Backend, ExperimentConfig};
use crate::{Error, Result};

pub use job::{
    cancel, final_state, follow, queue_state, submit, Backoff, Collected, JobOutcome, JobStatus, Polling,
    SubmittedJob,
};
pub use mpi::{choose_srun_mpi, srun_mpi, srun_mpi_listing, srun_mpi_plugins, srun_mpi_preference, MPI_ENV};

/// CPUs per GPU rank when neither the config nor Slurm's description of the nodes says: NCCL's
/// proxy thread, the rank's main thread, the collective watchdog, CUDA's and libtorch's own
/// threads each want a core, and one CPU per task (Slurm's default on many clusters) puts them
/// all on one. 8 fits the common GPU nodes (a DGX A100 or H100 has 112 to 128 cores, 224 to
/// 256 CPUs, for 8 GPUs; 4-GPU nodes usually have 32 cores or more).
pub const CPUS_PER_GPU_RANK: usize = 8;

/// `[slurm]`: what `ulysses submit` asks Slurm for. Every field is optional; the command's
/// options override them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SlurmSpec {
    /// Nodes (`--nodes`). Default: as few as hold the largest point at `tasks_per_node`.
    pub nodes: Option<usize>,
    /// GPUs per node (`--gpus-per-node`). Default with backend nccl: one per rank a node holds
    /// (`tasks_per_node`, else the largest point's ranks), at most 8; none otherwise.
    pub gpus_per_node: Option<usize>,
    /// Ranks per node (`--ntasks-per-node`). Default: `gpus_per_node` with NCCL (one rank per
    /// GPU), else the largest point's ranks spread over the nodes.
    pub tasks_per_node: Option<usize>,
    /// CPUs per rank (`--cpus-per-task`). Default with backend nccl: the node's CPUs over its
    /// GPUs when `sinfo` says (at submit), else [`CPUS_PER_GPU_RANK`]; with CPU ranks,
    /// `parallel.threads_per_rank` (the intra-op threads each rank runs).
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
    /// srun's MPI plugin for the ranks (`srun --mpi=`): "pmix", "pmix_v4", "pmi2", ... the one
    /// the cluster's OpenMPI was built for. Default: chosen inside the job from what
    /// `srun --mpi=list` offers there, pmix (any version), else pmi2. Checked against that list.
    pub mpi: Option<String>,
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
            mpi: other.mpi.clone().or_else(|| self.mpi.clone()),
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
        for (name, v) in [
            ("time", &self.time),
            ("partition", &self.partition),
            ("account", &self.account),
            ("mpi", &self.mpi),
        ] {
            if v.as_ref().is_some_and(|s| s.trim().is_empty() || s.contains(char::is_whitespace)) {
                return Err(format!("{name} {v:?} must be one word"));
            }
        }
        Ok(())
    }
}

/// A kind of node a job may land on, as Slurm describes it (`sinfo`): what the CPUs per rank
/// default from when it is known.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NodeShape {
    /// CPUs of a node (Slurm's count: hardware threads where they are enabled).
    pub cpus: usize,
    /// GPUs of a node (its `gpu` GRES); 0 when it has none.
    pub gpus: usize,
}

/// The kinds of node of `partition` (the default one, marked `*`, when `None`; every line when
/// none is marked), from the text of `sinfo -h -o "%P|%c|%G"`. Lines that cannot be read are
/// skipped.
pub fn node_shapes(sinfo: &str, partition: Option<&str>) -> Vec<NodeShape> {
    let rows: Vec<(&str, NodeShape)> = sinfo
        .lines()
        .filter_map(|line| {
            let mut fields = line.trim().split('|');
            let (part, cpus, gres) = (fields.next()?, fields.next()?, fields.next().unwrap_or(""));
            let cpus = cpus.trim().trim_end_matches('+').parse().ok().filter(|&c| c > 0)?;
            // "gpu:8", "gpu:a100:8(S:0-1)", "gpu:h100:4,nvme:1"; "(null)" without GRES.
            let gpus = gres
                .split(',')
                .filter(|g| g.trim().starts_with("gpu"))
                .filter_map(|g| g.split('(').next()?.rsplit(':').next()?.trim().parse::<usize>().ok())
                .sum();
            Some((part.trim(), NodeShape { cpus, gpus }))
        })
        .collect();
    let marked = rows.iter().any(|(q, _)| q.ends_with('*'));
    rows.into_iter()
        .filter(|(q, _)| match partition {
            Some(p) => q.trim_end_matches('*') == p,
            None => !marked || q.ends_with('*'),
        })
        .map(|(_, n)| n)
        .collect()
}

/// What `sinfo` on this machine says about the nodes of `partition`; empty when it cannot run
/// or says nothing readable.
pub fn query_node_shapes(partition: Option<&str>) -> Vec<NodeShape> {
    match std::process::Command::new("sinfo").args(["-h", "-o", "%P|%c|%G"]).output() {
        Ok(out) if out.status.success() => node_shapes(&String::from_utf8_lossy(&out.stdout), partition),
        _ => Vec::new(),
    }
}

/// The allocation a job asks for, every number decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allocation {
    pub nodes: usize,
    pub tasks_per_node: usize,
    /// 0 for CPU ranks.
    pub gpus_per_node: usize,
    /// CPUs per rank (`--cpus-per-task`).
    pub cpus_per_task: usize,
    /// Where `cpus_per_task` comes from, for the script's comment.
    pub cpus_reason: String,
    /// libtorch's intra-op threads per rank (`parallel.threads_per_rank`; ulysses sets them
    /// itself), which the script's `OMP_NUM_THREADS` matches.
    pub threads_per_rank: usize,
}

/// The allocation that runs every point of `cfg`, or why none does, where nothing is known of
/// the nodes: [`allocation_on`] without node shapes.
pub fn allocation(cfg: &ExperimentConfig, spec: &SlurmSpec) -> Result<Allocation> {
    allocation_on(cfg, spec, &[])
}

/// The allocation that runs every point of `cfg` on the kinds of node `nodes` (`sinfo`'s, where
/// known), or why none does. CPUs per rank: `spec`'s; else for GPU ranks, on the nodes with
/// the GPUs asked for, the fewest of their CPUs over their GPUs (and over the ranks a node
/// holds), so the job fits any of them; else [`CPUS_PER_GPU_RANK`]. CPU ranks get one CPU per
/// intra-op thread (`parallel.threads_per_rank`).
pub fn allocation_on(cfg: &ExperimentConfig, spec: &SlurmSpec, nodes: &[NodeShape]) -> Result<Allocation> {
    let bad = |msg: String| Error::InvalidArgument { op: "submit", group: cfg.name.clone(), msg };
    spec.validate().map_err(bad)?;
    let nccl = cfg.parallel.backend == Backend::Nccl;
    let most = cfg.parallel.ranks.iter().copied().max().unwrap_or(1);
    // One GPU per rank on a node, up to 8 a node: a 2-rank job asks for 2, not 8 with 6 idle.
    let gpus_per_node =
        spec.gpus_per_node.unwrap_or(if nccl { spec.tasks_per_node.unwrap_or(most).min(8) } else { 0 });
    if nccl && gpus_per_node == 0 {
        return Err(bad("backend nccl runs one rank per GPU: ask for GPUs (--gpus-per-node)".into()));
    }
    let tasks_per_node = match (spec.tasks_per_node, spec.nodes) {
        (Some(t), _) => t,
        (None, _) if nccl => gpus_per_node.min(most),
        (None, Some(n)) => most.div_ceil(n),
        (None, None) => most,
    };
    let node_count = spec.nodes.unwrap_or_else(|| most.div_ceil(tasks_per_node));
    if nccl && tasks_per_node > gpus_per_node {
        return Err(bad(format!(
            "{tasks_per_node} ranks per node on {gpus_per_node} GPUs per node: two ranks would share a GPU"
        )));
    }
    if node_count * tasks_per_node < most {
        return Err(bad(format!(
            "the largest point has {most} ranks, but {node_count} node(s) x {tasks_per_node} tasks hold {}",
            node_count * tasks_per_node
        )));
    }
    let threads = cfg.parallel.threads_per_rank.max(1);
    let fitting = nodes
        .iter()
        .filter(|n| n.gpus > 0 && n.gpus >= gpus_per_node)
        .map(|n| (((n.cpus / n.gpus).min(n.cpus / tasks_per_node)).max(1), n))
        .min_by_key(|(c, _)| *c);
    let (cpus_per_task, cpus_reason) = match (spec.cpus_per_task, fitting) {
        (Some(c), _) => (c, "as the config or command asked".to_string()),
        (None, _) if !nccl => {
            (threads, format!("one per intra-op thread (parallel.threads_per_rank = {threads})"))
        }
        (None, Some((c, n))) => (c, format!("a node's {} CPUs over its {} GPUs (sinfo)", n.cpus, n.gpus)),
        (None, None) => (
            CPUS_PER_GPU_RANK,
            format!("{CPUS_PER_GPU_RANK} per GPU rank by default (set [slurm] cpus_per_task to change it)"),
        ),
    };
    Ok(Allocation {
        nodes: node_count,
        tasks_per_node,
        gpus_per_node,
        cpus_per_task,
        cpus_reason,
        threads_per_rank: threads,
    })
}

/// A string as one single-quoted shell word.
fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// The sbatch script that runs `config` (the copy in the results folder) into `dir`, from
/// `base` (where relative dataset paths start), with the `ulysses` binary `program`, asking
/// for [`allocation`]`(cfg, spec)`.
pub fn sbatch_script(
    cfg: &ExperimentConfig,
    spec: &SlurmSpec,
    paths: &JobPaths,
    resume: bool,
) -> Result<String> {
    sbatch_script_for(cfg, spec, &allocation(cfg, spec)?, paths, resume)
}

/// The sbatch script of [`sbatch_script`], asking for the allocation `a` (from
/// [`allocation_on`], where the nodes are known).
pub fn sbatch_script_for(
    cfg: &ExperimentConfig,
    spec: &SlurmSpec,
    a: &Allocation,
    paths: &JobPaths,
    resume: bool,
) -> Result<String> {
    let nccl = cfg.parallel.backend == Backend::Nccl;
    let mut s = String::from("#!/bin/bash\n");
    s += &format!(
        "# Written by `ulysses submit` for the experiment {:?}: every point runs inside this allocation,\n\
         # its ranks started by srun ({}); results in {}.\n\
         # {} CPUs per rank: {}.\n",
        cfg.name,
        if nccl { "one per GPU, NCCL" } else { "one per task, MPI" },
        paths.dir.display(),
        a.cpus_per_task,
        a.cpus_reason,
    );
    if nccl {
        s += &format!(
            "# Beside libtorch's {} intra-op thread(s), a GPU rank runs its main thread, NCCL's proxy thread,\n\
             # the collective watchdog and CUDA's threads: on one CPU (Slurm's usual default) they take turns.\n",
            a.threads_per_rank
        );
    }
    let mut opt = |o: String| s += &format!("#SBATCH {o}\n");
    opt(format!("--job-name=ulysses-{}", cfg.name));
    opt(format!("--nodes={}", a.nodes));
    opt(format!("--ntasks-per-node={}", a.tasks_per_node));
    if a.gpus_per_node > 0 {
        opt(format!("--gpus-per-node={}", a.gpus_per_node));
    }
    opt(format!("--cpus-per-task={}", a.cpus_per_task));
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
    // Slurm 22.05 to 23.02 do not pass the job's --cpus-per-task on to srun; this does.
    s += &format!("export SRUN_CPUS_PER_TASK={}\n", a.cpus_per_task);
    // ulysses sets libtorch's intra-op threads to parallel.threads_per_rank; OpenMP pools that
    // start before it (and other libraries') get the same number.
    s += &format!("export OMP_NUM_THREADS={}\n", a.threads_per_rank);
    if let Some(mpi) = &spec.mpi {
        s += &format!("export {}={}\n", MPI_ENV, quote(mpi));
    }
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
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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
