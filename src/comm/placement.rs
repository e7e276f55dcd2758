//! Where a process sits in a job, from its launcher's variables, and which GPU it drives.
//!
//! Launchers describe each process in environment variables, and not all of them can be
//! trusted in every setting. Under `srun` a rank sees `SLURM_PROCID`, `SLURM_LOCALID` and
//! `PMIX_RANK`; under `mpirun` it sees `OMPI_COMM_WORLD_*` and `PMIX_RANK`, and when mpirun runs
//! inside a Slurm job, the job's `SLURM_PROCID=0` and `SLURM_LOCALID=0` are inherited by *every*
//! rank. So the variables are read in this order: OpenMPI's, then PMIx's rank, then Slurm's (only
//! when no other launcher named the rank, or when Slurm's rank agrees with PMIx's), never Slurm's
//! first. This is the only place in the library that reads them ([`LauncherEnv::from_process`]).
//!
//! A rank then drives `cuda:<local rank>`; when each process sees a single GPU (Slurm's
//! `--gpus-per-task`, or a per-rank `CUDA_VISIBLE_DEVICES`) it drives that one. Two ranks that
//! end up on one GPU, or more ranks on a node than it has GPUs, are refused with the ranks, the
//! host and the GPU named (NCCL would refuse later with an opaque message).

use std::collections::BTreeMap;

use crate::{Error, Result};

/// The launcher variables this module reads.
const NAMES: [&str; 13] = [
    "OMPI_COMM_WORLD_RANK",
    "OMPI_COMM_WORLD_SIZE",
    "OMPI_COMM_WORLD_LOCAL_RANK",
    "OMPI_COMM_WORLD_LOCAL_SIZE",
    "PMIX_RANK",
    "SLURM_PROCID",
    "SLURM_NTASKS",
    "SLURM_LOCALID",
    "SLURM_NODEID",
    "SLURM_STEP_TASKS_PER_NODE",
    "SLURM_JOB_ID",
    "SLURM_JOB_NUM_NODES",
    "SLURM_NTASKS_PER_NODE",
];

/// A snapshot of the launcher variables of a process.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LauncherEnv {
    vars: BTreeMap<String, String>,
}

impl LauncherEnv {
    /// This process's launcher variables (the library's only read of the environment).
    pub fn from_process() -> LauncherEnv {
        let vars = NAMES.iter().filter_map(|n| std::env::var(n).ok().map(|v| (n.to_string(), v))).collect();
        LauncherEnv { vars }
    }

    /// Variables given explicitly (tests, notebooks, a description of another process).
    pub fn from_pairs(pairs: &[(&str, &str)]) -> LauncherEnv {
        LauncherEnv { vars: pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect() }
    }

    fn get(&self, name: &str) -> Option<&str> {
        self.vars.get(name).map(String::as_str)
    }

    fn number(&self, name: &str) -> Option<usize> {
        self.get(name).and_then(|v| v.trim().parse().ok())
    }

    /// Whether this process runs inside a Slurm allocation (a batch job or `salloc`).
    pub fn in_slurm_allocation(&self) -> bool {
        self.get("SLURM_JOB_ID").is_some()
    }

    /// Nodes of the Slurm allocation this process runs in.
    pub fn slurm_nodes(&self) -> Option<usize> {
        self.number("SLURM_JOB_NUM_NODES")
    }

    /// Tasks per node of the Slurm allocation, when it was asked for that way
    /// (`--ntasks-per-node`).
    pub fn slurm_tasks_per_node(&self) -> Option<usize> {
        self.number("SLURM_NTASKS_PER_NODE")
    }
}

/// This process's place in its job, as its launcher describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessPlace {
    /// Global rank.
    pub rank: usize,
    /// Its index among the job's processes on its node, when the launcher says so reliably.
    pub local_rank: Option<usize>,
    /// How many of the job's processes share its node, when the launcher says so.
    pub local_size: Option<usize>,
    /// Which variables said it ("OMPI_COMM_WORLD_*", "PMIX_RANK + SLURM_LOCALID", ...).
    pub source: &'static str,
}

/// Where this process sits, from its launcher's variables in the order the module documents;
/// `None` for a process started alone (rank 0 of 1).
pub fn process_place(env: &LauncherEnv) -> Option<ProcessPlace> {
    if let Some(rank) = env.number("OMPI_COMM_WORLD_RANK") {
        return Some(ProcessPlace {
            rank,
            local_rank: env.number("OMPI_COMM_WORLD_LOCAL_RANK"),
            local_size: env.number("OMPI_COMM_WORLD_LOCAL_SIZE"),
            source: "OMPI_COMM_WORLD_*",
        });
    }
    let slurm = env.number("SLURM_PROCID");
    let slurm_local = || (env.number("SLURM_LOCALID"), slurm_local_size(env));
    if let Some(rank) = env.number("PMIX_RANK") {
        // srun with PMIx sets both, equal; a PMIx launcher inside a Slurm job inherits Slurm's
        // variables of the batch step, which then disagree (or agree only by chance on rank 0,
        // whose local rank 0 is right anyway).
        let (local_rank, local_size, source) = match slurm {
            Some(s) if s == rank => {
                let (l, n) = slurm_local();
                (l, n, "PMIX_RANK + SLURM_LOCALID")
            }
            _ => (None, None, "PMIX_RANK"),
        };
        return Some(ProcessPlace { rank, local_rank, local_size, source });
    }
    slurm.map(|rank| {
        let (local_rank, local_size) = slurm_local();
        ProcessPlace { rank, local_rank, local_size, source: "SLURM_PROCID + SLURM_LOCALID" }
    })
}

/// Tasks of this step on this node, from `SLURM_STEP_TASKS_PER_NODE` ("8(x4),4") and
/// `SLURM_NODEID`.
fn slurm_local_size(env: &LauncherEnv) -> Option<usize> {
    let node = env.number("SLURM_NODEID")?;
    let mut per_node: Vec<usize> = Vec::new();
    for part in env.get("SLURM_STEP_TASKS_PER_NODE")?.split(',') {
        let (tasks, times): (usize, usize) = match part.split_once("(x") {
            Some((t, r)) => (t.trim().parse().ok()?, r.trim_end_matches(')').parse().ok()?),
            None => (part.trim().parse().ok()?, 1usize),
        };
        per_node.extend(std::iter::repeat_n(tasks, times));
    }
    per_node.get(node).copied()
}

/// The index of the GPU a rank drives among the `visible` ones of its process, given its
/// local rank among the `local_size` ranks of its node on `host`.
pub fn choose_gpu(local_rank: usize, local_size: usize, visible: usize, host: &str) -> Result<usize> {
    let refuse = |msg: String| Error::InvalidArgument { op: "bind_gpu", group: format!("host {host}"), msg };
    if visible == 0 {
        return Err(refuse(
            "no CUDA device is visible to this process (CUDA_VISIBLE_DEVICES, the driver?)".into(),
        ));
    }
    if local_rank >= local_size {
        return Err(refuse(format!(
            "local rank {local_rank} is not below the {local_size} ranks of the node"
        )));
    }
    if local_size <= visible {
        return Ok(local_rank);
    }
    if visible == 1 {
        // One GPU per process (Slurm's --gpus-per-task, or CUDA_VISIBLE_DEVICES set per rank):
        // cuda:0 is this rank's own; `check_distinct_gpus` verifies it.
        return Ok(0);
    }
    Err(refuse(format!(
        "{local_size} ranks run on this node but it has {visible} GPUs: start at most {visible} ranks per node \
         (parallel.ranks_per_node, or more nodes)"
    )))
}

/// Refuses two ranks driving one GPU: `gpus[r]` is rank r's (host, PCI bus id).
pub fn check_distinct_gpus(gpus: &[(String, String)]) -> Result<()> {
    let mut seen: BTreeMap<&(String, String), usize> = BTreeMap::new();
    for (r, gpu) in gpus.iter().enumerate() {
        if let Some(&first) = seen.get(gpu) {
            let on_host = gpus.iter().filter(|(h, _)| *h == gpu.0).count();
            let distinct = gpus
                .iter()
                .filter(|(h, _)| *h == gpu.0)
                .map(|(_, b)| b)
                .collect::<std::collections::BTreeSet<_>>()
                .len();
            return Err(Error::InvalidArgument {
                op: "bind_gpu",
                group: format!("world[0..{}]", gpus.len()),
                msg: format!(
                    "ranks {first} and {r} both drive the GPU at PCI {} on host {}: NCCL needs one GPU per rank \
                     ({on_host} ranks on that host share {distinct} GPU(s); start fewer ranks per node, or give each its own GPU)",
                    gpu.1, gpu.0
                ),
            });
        }
        seen.insert(gpu, r);
    }
    Ok(())
}

/// What [`bind_gpu`] chose for this rank.
#[cfg(feature = "nccl")]
#[derive(Debug, Clone)]
pub struct GpuBinding {
    pub device: tch::Device,
    pub host: String,
    pub pci_bus_id: String,
    pub local_rank: usize,
    pub local_size: usize,
    /// Which variables gave the local rank ("ranks on the same host" when none did).
    pub source: &'static str,
}

/// Chooses this rank's GPU, makes it current (before any other CUDA or NCCL call), and checks
/// over `world` (a CPU group of every rank: MPI processes) that no two ranks drive one GPU.
/// The local rank comes from the launcher's variables, or else from the ranks that share this
/// host (gathered over `world`). Collective over `world`.
#[cfg(feature = "nccl")]
pub fn bind_gpu(world: &super::Group, env: &LauncherEnv) -> Result<GpuBinding> {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map_or_else(|_| "unknown".into(), |h| h.trim().to_string());
    let hosts = gather_strings(world, &host)?;
    let me = world.rank();
    let same: Vec<usize> = (0..hosts.len()).filter(|&r| hosts[r] == host).collect();
    let gathered = same.iter().position(|&r| r == me).unwrap_or(0);
    let place = process_place(env);
    let (local_rank, source) = match place.as_ref().and_then(|p| p.local_rank.map(|l| (l, p.source))) {
        Some(found) => found,
        None => (gathered, "ranks on the same host"),
    };
    let local_size = place.and_then(|p| p.local_size).unwrap_or(same.len()).max(same.len());
    let index = choose_gpu(local_rank, local_size, crate::device::cuda_device_count(), &host)?;
    let device = tch::Device::Cuda(index);
    crate::device::set_current(device)?;
    let pci_bus_id = super::pci_bus_id(index)?;
    let ids = gather_strings(world, &pci_bus_id)?;
    check_distinct_gpus(&hosts.into_iter().zip(ids).collect::<Vec<_>>())?;
    Ok(GpuBinding { device, host, pci_bus_id, local_rank, local_size, source })
}

/// Every rank's string (up to 64 bytes), over a CPU group.
#[cfg(feature = "nccl")]
fn gather_strings(world: &super::Group, s: &str) -> Result<Vec<String>> {
    let mut bytes = [0u8; 64];
    for (slot, b) in bytes.iter_mut().zip(s.bytes()) {
        *slot = b;
    }
    let all = world.all_gather(&tch::Tensor::from_slice(&bytes).view([1, 64]), 0)?;
    let flat =
        Vec::<u8>::try_from(&all.view([-1])).map_err(|source| Error::Torch { op: "bind_gpu", source })?;
    Ok(flat.chunks(64).map(|c| String::from_utf8_lossy(c).trim_end_matches('\0').to_string()).collect())
}
