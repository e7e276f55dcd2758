//! The machine and software a run used (host, CPUs, memory, git revision, libtorch, CUDA
//! devices), written next to its results as `meta.toml`.

use serde::Serialize;

use super::config::ExperimentConfig;
use crate::{Error, Result};

/// The machine and software a run used, written as `meta.toml`.
#[derive(Serialize)]
struct Meta {
    experiment: String,
    started_unix_s: u64,
    resumed: bool,
    command: Vec<String>,
    git_revision: String,
    git_dirty: bool,
    host: String,
    os: String,
    cpus: usize,
    memory_gib: f64,
    ulysses: &'static str,
    tch: &'static str,
    /// The libtorch this process loaded ("2.11.0+cu130"), or the one it was built for.
    libtorch: String,
    cuda_available: bool,
    /// CUDA devices this process sees.
    cuda_devices: usize,
}

fn git(args: &[&str]) -> Option<String> {
    let out = std::process::Command::new("git").args(args).output().ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

pub(super) fn meta(cfg: &ExperimentConfig, resume: bool) -> Result<String> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_kb: f64 = meminfo
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    let m = Meta {
        experiment: cfg.name.clone(),
        started_unix_s: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        resumed: resume,
        command: std::env::args().collect(),
        git_revision: git(&["rev-parse", "HEAD"]).unwrap_or_else(|| "unknown".into()),
        git_dirty: git(&["status", "--porcelain", "--untracked-files=no"]).is_some_and(|s| !s.is_empty()),
        host: std::fs::read_to_string("/etc/hostname")
            .map_or_else(|_| "unknown".into(), |h| h.trim().to_string()),
        os: format!("{} {}", std::env::consts::OS, std::env::consts::ARCH),
        cpus: std::thread::available_parallelism().map_or(0, |n| n.get()),
        memory_gib: mem_kb / (1024.0 * 1024.0),
        ulysses: env!("CARGO_PKG_VERSION"),
        tch: "0.24.0",
        libtorch: crate::device::loaded_libtorch()
            .map_or_else(|| crate::device::BUILT_LIBTORCH.to_string(), |t| t.version),
        cuda_available: tch::Cuda::is_available(),
        cuda_devices: crate::device::cuda_device_count(),
    };
    toml::to_string_pretty(&m).map_err(|e| Error::InvalidArgument {
        op: "results",
        group: "meta".into(),
        msg: e.to_string(),
    })
}
