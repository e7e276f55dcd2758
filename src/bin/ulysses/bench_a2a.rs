//! `ulysses bench-a2a`: all-to-all throughput of a backend, the same loop for threads and MPI
//! processes, so that `cargo bench --bench comm --features mpi` can compare them; with
//! `--device cuda` (MPI processes, the `nccl` feature) each rank binds its GPU and the
//! all-to-alls run on NCCL over CUDA tensors, as a GPU node's training does.

use std::time::Instant;

use anyhow::Result;
use tch::{Device, Kind, Tensor};
use ulysses::comm::{Group, RankCtx};

use crate::ranks::{on_ranks, BackendArg};

/// Where the all-to-all's tensors live.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DeviceArg {
    /// CPU tensors on the backend's own transport (threads, MPI).
    Cpu,
    /// CUDA tensors on NCCL, one GPU per MPI process.
    Cuda,
}

/// How the tensor is laid out, and so whether each peer's chunk is contiguous.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LayoutArg {
    /// `[1, rows, 32, 128]`, heads scattered and rows gathered: Ulysses' forward re-sharding,
    /// whose chunks are strided (packed into a contiguous buffer before they travel).
    Ulysses,
    /// `[P, n]`, row j to rank j, gathered along the columns: contiguous chunks (what `ulysses
    /// calibrate` times for the link's bandwidth).
    Rows,
}

/// Times `runs` all-to-alls of `mib` MiB of f32 per rank in `layout` for each size, into a
/// preallocated output, from barrier to barrier (on CUDA, with the device synchronised before
/// each barrier); prints `a2a mib=.. median_ms=..`, the slowest rank's median.
pub fn run(
    backend: BackendArg,
    device: DeviceArg,
    layout: LayoutArg,
    ranks: usize,
    mibs: &[i64],
    runs: usize,
) -> Result<()> {
    if device == DeviceArg::Cuda && backend != BackendArg::Mpi {
        anyhow::bail!(
            "--device cuda runs one MPI process per GPU: add --backend mpi (under ulysses launch or srun)"
        );
    }
    let (heads, d) = (32i64, 128i64);
    let per_rank = on_ranks(backend, ranks, 1, |ctx| -> Result<Vec<f64>> {
        let (g, dev) = group_for(&ctx, device)?;
        let p = g.size() as i64;
        let sync = || {
            if let Device::Cuda(i) = dev {
                tch::Cuda::synchronize(i as i64);
            }
        };
        let mut medians = Vec::new();
        for &mib in mibs {
            let elems = mib * 1024 * 1024 / 4;
            // (input, output, scatter dim, gather dim, scatter split, gather split)
            let (x, out, sd, gd, split, gather) = match layout {
                LayoutArg::Ulysses => {
                    let rows = elems / (heads * d);
                    // [1, rows, H, d] -> [1, rows P, H/P, d]
                    let x = Tensor::randn([1, rows, heads, d], (Kind::Float, dev));
                    let out = Tensor::empty([1, rows * p, heads / p, d], (Kind::Float, dev));
                    (x, out, 2, 1, vec![heads / p; p as usize], vec![rows; p as usize])
                }
                LayoutArg::Rows => {
                    let n = elems / p;
                    // [P, n] -> [1, P n]: row j to rank j, the rows received side by side
                    let x = Tensor::randn([p, n], (Kind::Float, dev));
                    let out = Tensor::empty([1, p * n], (Kind::Float, dev));
                    (x, out, 0, 1, vec![1; p as usize], vec![n; p as usize])
                }
            };
            let mut times = Vec::new();
            for i in 0..runs + 2 {
                sync();
                ctx.world().barrier()?;
                let t0 = Instant::now();
                g.all_to_all_v_into(&x, &out, sd, gd, &split, &gather)?;
                sync();
                ctx.world().barrier()?;
                if i >= 2 {
                    times.push(t0.elapsed().as_secs_f64() * 1e3);
                }
            }
            times.sort_by(f64::total_cmp);
            medians.push(times[times.len() / 2]);
        }
        Ok(medians)
    })?;
    if let Some(per_rank) = per_rank {
        for (i, mib) in mibs.iter().enumerate() {
            let slowest = per_rank.iter().map(|r| r[i]).fold(0.0, f64::max);
            println!(
                "a2a backend={backend:?} device={device:?} layout={layout:?} ranks={} mib={mib} runs={runs} median_ms={slowest:.4}",
                per_rank.len()
            );
        }
    }
    Ok(())
}

/// The group the all-to-alls run on, and the device of their tensors: the rank's own world on
/// the CPU, or NCCL over it on the GPU this process binds (its local rank's).
fn group_for(ctx: &RankCtx, device: DeviceArg) -> Result<(Group, Device)> {
    match device {
        DeviceArg::Cpu => Ok((ctx.world().clone(), Device::Cpu)),
        DeviceArg::Cuda => nccl(ctx),
    }
}

#[cfg(feature = "nccl")]
fn nccl(ctx: &RankCtx) -> Result<(Group, Device)> {
    let gpu = ulysses::comm::bind_gpu(ctx.world(), &ulysses::comm::LauncherEnv::from_process())?;
    let group = ulysses::comm::nccl_group(ctx.world(), gpu.device, std::time::Duration::from_secs(120))?;
    Ok((group, gpu.device))
}

#[cfg(not(feature = "nccl"))]
fn nccl(_ctx: &RankCtx) -> Result<(Group, Device)> {
    anyhow::bail!(
        "this ulysses was built without the `nccl` feature: cargo build --release --features mpi,nccl"
    )
}
