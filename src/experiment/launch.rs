//! How a point's ranks start as processes, one per rank (one per GPU with NCCL): `mpirun`, or
//! `srun` inside a Slurm allocation, with how many ranks go on each node, and the checks of that
//! placement made before anything starts (ranks per node against the GPUs a node has, the
//! allocation's nodes and tasks). Multi-node runs follow from the same plan: Slurm's nodes, or
//! mpirun's hostfile. srun's MPI plugin is chosen where srun runs (the driver, inside the
//! allocation), from what `srun --mpi=list` offers there (`slurm::choose_srun_mpi`).

use std::path::{Path, PathBuf};
use std::process::Command;

use serde::{Deserialize, Serialize};

use crate::comm::LauncherEnv;
use crate::{Error, Result};

/// What starts the processes of a point.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Launcher {
    /// `srun` inside a Slurm allocation (a batch job, `salloc`), `mpirun` elsewhere.
    #[default]
    Auto,
    /// OpenMPI's `mpirun` (inside an allocation it places ranks on the allocation's nodes).
    Mpirun,
    /// Slurm's `srun --mpi=<plugin>`: pmix, else pmi2, as `srun --mpi=list` offers, or the one
    /// asked for (`[slurm] mpi`).
    Srun,
}

/// The processes of one point: launcher, ranks, and their spread over nodes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LaunchPlan {
    /// `Mpirun` or `Srun` (never `Auto`).
    pub launcher: Launcher,
    pub ranks: usize,
    /// Ranks on each node (the last node may hold fewer); `None` when a hostfile decides.
    pub ranks_per_node: Option<usize>,
    /// The hostfile mpirun places ranks with.
    pub hostfile: Option<PathBuf>,
    /// Whether the plan runs inside a Slurm allocation.
    pub in_allocation: bool,
    /// srun's MPI plugin (`--mpi=`), for `Srun`; `None` leaves it to the cluster's `MpiDefault`.
    pub srun_mpi: Option<String>,
}

fn refuse(field: &str, msg: String) -> Error {
    Error::InvalidArgument { op: "experiment config", group: field.to_string(), msg }
}

impl LaunchPlan {
    /// The plan for `ranks` processes: [`placed`](LaunchPlan::placed), and for srun the MPI
    /// plugin this machine's srun offers (`srun --mpi=list`, run once per process) that OpenMPI
    /// can start with, or the one the environment asks for (`ULYSSES_SRUN_MPI`, written by the
    /// sbatch script from `[slurm] mpi`; else `SLURM_MPI_TYPE`), refused when srun lacks it.
    pub fn new(
        ranks: usize,
        launcher: Launcher,
        ranks_per_node: Option<usize>,
        hostfile: Option<&Path>,
        env: &LauncherEnv,
    ) -> Result<LaunchPlan> {
        let plan = LaunchPlan::placed(ranks, launcher, ranks_per_node, hostfile, env)?;
        match plan.launcher {
            Launcher::Srun => Ok(plan.with_srun_mpi(super::slurm::srun_mpi()?)),
            _ => Ok(plan),
        }
    }

    /// The plan's placement alone, from `env` only (no command runs): `launcher` as asked
    /// (`Auto` resolved from `env`), `ranks_per_node` as asked or else all on this node (mpirun
    /// without a hostfile) or spread evenly over the allocation's nodes (Slurm). Refuses
    /// placements that cannot start. srun's plugin is left to the cluster until
    /// [`with_srun_mpi`](LaunchPlan::with_srun_mpi).
    pub fn placed(
        ranks: usize,
        launcher: Launcher,
        ranks_per_node: Option<usize>,
        hostfile: Option<&Path>,
        env: &LauncherEnv,
    ) -> Result<LaunchPlan> {
        let in_allocation = env.in_slurm_allocation();
        let launcher = match launcher {
            Launcher::Auto if in_allocation => Launcher::Srun,
            Launcher::Auto => Launcher::Mpirun,
            other => other,
        };
        if ranks_per_node == Some(0) {
            return Err(refuse("parallel.ranks_per_node", "must be at least 1".into()));
        }
        let nodes = if in_allocation { env.slurm_nodes() } else { None };
        let ranks_per_node = match (ranks_per_node, nodes, hostfile) {
            (Some(k), ..) => Some(k.min(ranks)),
            // Packed, as DeepSpeed and Megatron place ranks: consecutive ranks (an SP group)
            // share a node; the allocation's tasks per node, or an even spread.
            (None, Some(n), _) => {
                Some(env.slurm_tasks_per_node().map_or(ranks.div_ceil(n.max(1)), |t| t.min(ranks)))
            }
            (None, None, Some(_)) if launcher == Launcher::Mpirun => None,
            (None, None, _) => Some(ranks),
        };
        if launcher == Launcher::Mpirun
            && !in_allocation
            && hostfile.is_none()
            && ranks_per_node != Some(ranks)
        {
            return Err(refuse(
                "parallel.ranks_per_node",
                format!(
                    "{ranks} ranks at {} per node need several nodes: give mpirun a hostfile (parallel.hostfile) \
                     or run inside a Slurm allocation (ulysses submit)",
                    ranks_per_node.unwrap_or(0)
                ),
            ));
        }
        if let (Some(k), Some(n)) = (ranks_per_node, nodes) {
            let needed = ranks.div_ceil(k);
            if needed > n {
                return Err(refuse(
                    "parallel.ranks_per_node",
                    format!(
                        "{ranks} ranks at {k} per node need {needed} nodes; the Slurm allocation has {n}"
                    ),
                ));
            }
        }
        Ok(LaunchPlan {
            launcher,
            ranks,
            ranks_per_node,
            hostfile: hostfile.map(Path::to_path_buf),
            in_allocation,
            srun_mpi: None,
        })
    }

    /// This plan with srun's MPI plugin (`srun --mpi=<plugin>`), as `slurm::choose_srun_mpi`
    /// picks it.
    pub fn with_srun_mpi(self, plugin: String) -> LaunchPlan {
        LaunchPlan { srun_mpi: Some(plugin), ..self }
    }

    /// Nodes the plan occupies, when it knows.
    pub fn nodes(&self) -> Option<usize> {
        self.ranks_per_node.map(|k| self.ranks.div_ceil(k))
    }

    /// Refuses more ranks on a node than it has GPUs (`gpus_per_node`, as this node shows them):
    /// NCCL needs one GPU per rank.
    pub fn check_gpus(&self, gpus_per_node: usize) -> Result<()> {
        match self.ranks_per_node {
            Some(k) if k > gpus_per_node => Err(refuse(
                "parallel.ranks",
                format!(
                    "{} ranks at {k} per node need {k} GPUs per node, but this node has {gpus_per_node}: \
                     lower the ranks, set parallel.ranks_per_node, or use more nodes",
                    self.ranks
                ),
            )),
            _ => Ok(()),
        }
    }

    /// The command that starts `program args` as the plan's processes, every output line
    /// labelled with its rank (see [`untag`](LaunchPlan::untag)).
    pub fn command(&self, program: &Path, args: &[String]) -> Command {
        match self.launcher {
            Launcher::Srun => {
                let mut cmd = Command::new("srun");
                if let Some(mpi) = &self.srun_mpi {
                    cmd.arg(format!("--mpi={mpi}"));
                }
                cmd.args(["--label", "--kill-on-bad-exit=1", "-n", &self.ranks.to_string()]);
                if let Some(k) = self.ranks_per_node {
                    cmd.args(["--ntasks-per-node", &k.to_string()]);
                    cmd.args(["-N", &self.ranks.div_ceil(k).to_string()]);
                }
                cmd.arg(program).args(args);
                cmd
            }
            _ => {
                let mut extra = Vec::new();
                if let Some(h) = &self.hostfile {
                    extra.extend(["--hostfile".to_string(), h.display().to_string()]);
                }
                if let (Some(k), true) = (self.ranks_per_node, self.hostfile.is_some() || self.in_allocation)
                {
                    extra.extend(["--map-by".to_string(), format!("ppr:{k}:node")]);
                }
                crate::comm::mpirun_command_with(self.ranks, program, args, &extra)
            }
        }
    }

    /// A line of the processes' output as `[rank r] ...`, with its rank: mpirun's
    /// `--tag-output` prefix, or srun's `--label` one (`3: ...`).
    pub fn untag(&self, line: &str) -> (Option<usize>, String) {
        if self.launcher != Launcher::Srun {
            return crate::comm::untag(line);
        }
        let trimmed = line.trim_start();
        let parsed = trimmed.split_once(": ").and_then(|(r, body)| Some((r.parse::<usize>().ok()?, body)));
        match parsed {
            Some((rank, body)) => (Some(rank), format!("[rank {rank}] {body}")),
            None => (None, line.to_string()),
        }
    }
}

/// What only this machine can tell about running `cfg`'s processes, checked before anything
/// starts: the launcher is installed, every point's placement fits the allocation, srun has an
/// MPI plugin OpenMPI can start with (or the one asked for), and for NCCL, that this process
/// loads the libtorch it was built for, with CUDA, a driver that runs it, and NCCL, and that no
/// node gets more ranks than it has GPUs.
pub(crate) fn check_runnable(cfg: &super::ExperimentConfig) -> Result<()> {
    use super::config::Backend;
    let p = &cfg.parallel;
    let env = LauncherEnv::from_process();
    let plans: Vec<LaunchPlan> = p
        .ranks
        .iter()
        .map(|&ranks| LaunchPlan::placed(ranks, p.launcher, p.ranks_per_node, p.hostfile.as_deref(), &env))
        .collect::<Result<_>>()?;
    let launcher = plans.first().map_or(Launcher::Mpirun, |plan| plan.launcher);
    let (program, hint) = match launcher {
        Launcher::Srun => ("srun", "Slurm's srun on PATH (a Slurm client)"),
        _ => ("mpirun", "OpenMPI's mpirun on PATH (scripts/setup.sh installs it)"),
    };
    let found = Command::new(program).arg("--version").output().is_ok_and(|o| o.status.success());
    if !found {
        return Err(refuse("parallel.backend", format!("{:?} needs {hint}", p.backend).to_lowercase()));
    }
    if launcher == Launcher::Srun {
        super::slurm::srun_mpi()?;
    }
    if p.backend != Backend::Nccl {
        return Ok(());
    }
    let gpu = |msg: String| refuse("parallel.backend", format!("nccl: {msg}"));
    crate::device::check_libtorch().map_err(|e| gpu(e.to_string()))?;
    nccl_ready().map_err(|e| gpu(e.to_string()))?;
    if !crate::device::load_cuda() {
        return Err(gpu(
            "libtorch's CUDA half (libtorch_cuda.so) cannot be loaded or sees no GPU: put the lib folder of \
             a CUDA build of torch on LD_LIBRARY_PATH (pip's torch wheel is one)"
                .into(),
        ));
    }
    let gpus = crate::device::cuda_device_count();
    plans.iter().try_for_each(|plan| plan.check_gpus(gpus))
}

/// NCCL and a driver that runs this libtorch's CUDA.
#[cfg(feature = "nccl")]
fn nccl_ready() -> Result<()> {
    crate::comm::nccl_available()?;
    let driver = crate::comm::driver_version()?;
    let needed = crate::device::loaded_libtorch().and_then(|t| t.cuda).and_then(|v| {
        let (major, minor) = v.split_once('.')?;
        Some((v.clone(), major.parse::<i32>().ok()? * 1000 + minor.parse::<i32>().ok()? * 10))
    });
    match needed {
        Some((v, n)) if driver < n => Err(Error::Backend {
            backend: "nccl",
            msg: format!(
                "the NVIDIA driver runs CUDA up to {}.{} but this libtorch needs CUDA {v}: update the driver, \
                 or use a torch built for an older CUDA",
                driver / 1000,
                driver % 1000 / 10
            ),
        }),
        _ => Ok(()),
    }
}

#[cfg(not(feature = "nccl"))]
fn nccl_ready() -> Result<()> {
    Err(Error::Backend {
        backend: "nccl",
        msg: "this ulysses was built without the `nccl` feature: cargo build --release --features mpi,nccl"
            .into(),
    })
}
