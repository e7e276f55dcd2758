//! This process as one rank of an MPI or NCCL point: what `ulysses run-point` runs under mpirun
//! or srun, its reports written to stdout as JSON lines for the driver to read.

use std::path::Path;
use std::time::Duration;

use tch::Device;

use super::config::{Backend, ExperimentConfig};
use super::rank::{rank_main, RankSpec};
use super::run::{writer_gone, Report};
use crate::comm::RankCtx;
use crate::{Error, Result};

/// This process as one rank of an MPI job running point `index` of the run in `dir` (what
/// `ulysses run-point` does under mpirun or srun): reports go to stdout as JSON lines. With
/// NCCL the rank first binds its GPU from its launcher's variables (`bind_gpu`: made current
/// before any CUDA or NCCL call, two ranks on one GPU refused), then its world, and every
/// group split from it, becomes an NCCL communicator over the MPI world.
#[cfg(feature = "mpi")]
pub fn run_point_rank(dir: &Path, index: usize, base: &Path, from: Option<&Path>) -> Result<()> {
    use std::io::Write;
    let cfg = ExperimentConfig::load(&dir.join("config.toml"))?;
    let point = cfg.points()?.into_iter().nth(index).ok_or_else(|| Error::InvalidArgument {
        op: "experiment",
        group: dir.display().to_string(),
        msg: format!("the run has no point {index}"),
    })?;
    let gpt = cfg.gpt()?;
    let dataset = cfg.dataset.open(base)?;
    let timeout = Duration::from_secs(cfg.parallel.timeout_s);
    let send = |r: Report| -> Result<()> {
        let json =
            serde_json::to_string(&r).map_err(|e| Error::Backend { backend: "mpi", msg: e.to_string() })?;
        let mut out = std::io::stdout().lock();
        // One write per line, so that the launchers' rank tags stay whole; short lines
        // (`rows.rs`), which srun does not cut.
        for line in super::rows::lines(&json) {
            out.write_all(line.as_bytes()).map_err(|_| writer_gone())?;
        }
        out.flush().map_err(|_| writer_gone())
    };
    crate::comm::MpiLaunch::new().timeout(timeout).threads_per_rank(cfg.parallel.threads_per_rank).run(
        |ctx| {
            if cfg.parallel.backend != Backend::Nccl {
                let spec = RankSpec::new(&cfg, &point, &gpt, dataset.as_ref(), 1, Device::Cpu)?
                    .checkpoints(dir, from.map(Path::to_path_buf));
                return rank_main(ctx, &spec, &send);
            }
            let (world, device) = nccl_world(&ctx, timeout)?;
            let spec = RankSpec::new(&cfg, &point, &gpt, dataset.as_ref(), 1, device)?
                .checkpoints(dir, from.map(Path::to_path_buf));
            rank_main(RankCtx::new(world), &spec, &send)
        },
    )
}

/// This rank's GPU, made current, and the NCCL world over the MPI one.
#[cfg(all(feature = "mpi", feature = "nccl"))]
fn nccl_world(ctx: &RankCtx, timeout: Duration) -> Result<(crate::comm::Group, Device)> {
    use std::io::Write;
    let gpu = crate::comm::bind_gpu(ctx.world(), &crate::comm::LauncherEnv::from_process())?;
    let line = format!(
        "rank {}: host {}, cuda:{} (PCI {}), local rank {} of {} ({})\n",
        ctx.rank(),
        gpu.host,
        match gpu.device {
            Device::Cuda(i) => i,
            _ => 0,
        },
        gpu.pci_bus_id,
        gpu.local_rank,
        gpu.local_size,
        gpu.source
    );
    let _ = std::io::stdout().lock().write_all(line.as_bytes());
    Ok((crate::comm::nccl_group(ctx.world(), gpu.device, timeout)?, gpu.device))
}

#[cfg(all(feature = "mpi", not(feature = "nccl")))]
fn nccl_world(_ctx: &RankCtx, _timeout: Duration) -> Result<(crate::comm::Group, Device)> {
    Err(Error::Backend {
        backend: "nccl",
        msg: "this ulysses was built without the `nccl` feature: cargo build --release --features mpi,nccl"
            .into(),
    })
}
