//! Running a subcommand's work on every rank, as threads of this process or as this process
//! being one rank of an MPI job (started by `ulysses launch` or mpirun/srun), and bringing each
//! rank's numbers to the process that prints.

use std::time::Duration;

use anyhow::Result;
use ulysses::comm::{LocalLaunch, RankCtx};

/// Where the ranks run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BackendArg {
    /// Ranks as threads of this process.
    Local,
    /// This process is one rank of an MPI job (start it with `ulysses launch -n P -- ...`).
    Mpi,
}

/// Runs `f` on every rank; returns every rank's numbers, in rank order, where they are printed
/// (the only process with threads; rank 0 with MPI, `None` elsewhere).
pub fn on_ranks<F>(backend: BackendArg, ranks: usize, threads: usize, f: F) -> Result<Option<Vec<Vec<f64>>>>
where
    F: Fn(RankCtx) -> Result<Vec<f64>> + Sync,
{
    let timeout = Duration::from_secs(300);
    match backend {
        BackendArg::Local => {
            Ok(Some(LocalLaunch::new(ranks).timeout(timeout).threads_per_rank(threads).run(f)?))
        }
        BackendArg::Mpi => mpi(threads, timeout, f),
    }
}

#[cfg(feature = "mpi")]
fn mpi<F>(threads: usize, timeout: Duration, f: F) -> Result<Option<Vec<Vec<f64>>>>
where
    F: Fn(RankCtx) -> Result<Vec<f64>> + Sync,
{
    let launch = ulysses::comm::MpiLaunch::new().timeout(timeout).threads_per_rank(threads);
    let out = launch.run(|ctx| -> Result<Option<Vec<Vec<f64>>>> {
        let (rank, world) = (ctx.rank(), ctx.world().clone());
        let mine = f(ctx)?;
        // Every rank reports as many numbers: gather them as one f64 tensor.
        let all = world.all_gather(&tch::Tensor::from_slice(&mine).to_kind(tch::Kind::Double), 0)?;
        let flat = Vec::<f64>::try_from(&all)?;
        Ok((rank == 0).then(|| flat.chunks(mine.len().max(1)).map(<[f64]>::to_vec).collect()))
    })?;
    Ok(out)
}

#[cfg(not(feature = "mpi"))]
fn mpi<F>(_threads: usize, _timeout: Duration, _f: F) -> Result<Option<Vec<Vec<f64>>>>
where
    F: Fn(RankCtx) -> Result<Vec<f64>> + Sync,
{
    anyhow::bail!("this ulysses was built without the `mpi` feature: cargo build --release --features mpi")
}
