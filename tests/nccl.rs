//! The NCCL backend (cargo feature `nccl`): on a GPU machine a world of one forms; elsewhere
//! asking for it gives an error that says what is missing, never a panic. Multi-rank NCCL and
//! the GPU numbers come from `scripts/gpu-check.sh` (the `ulysses-gpu` binary).
#![cfg(feature = "nccl")]

use std::time::Duration;

use anyhow::{ensure, Result};
use tch::Device;
use ulysses::comm::{launch, nccl_available, nccl_group};

#[test]
fn nccl_works_with_a_gpu_and_says_what_is_missing_without() -> Result<()> {
    let gpu = ulysses::device::load_cuda();
    let made = launch(1, |ctx| -> Result<Option<String>> {
        Ok(nccl_group(ctx.world(), Device::Cuda(0), Duration::from_secs(5)).err().map(|e| e.to_string()))
    })?;
    if gpu {
        // A GPU machine: the driver and NCCL load (at or above the floor) and a world of one
        // forms on a fresh thread (launch's), which no CUDA call has bound a context to.
        nccl_available()?;
        let lib = ulysses::device::nccl_library()?;
        ensure!(lib.version >= ulysses::device::NCCL_FLOOR, "{lib:?}");
        ensure!(made[0].is_none(), "NCCL failed on a GPU machine: {:?}", made[0]);
    } else {
        let err = nccl_available().err().map(|e| e.to_string()).unwrap_or_default();
        ensure!(err.contains("libcuda.so") || err.contains("libnccl.so"), "{err}");
        let made = made[0].clone().unwrap_or_default();
        ensure!(made.contains("nccl backend") && made.contains("cannot be loaded"), "{made}");
    }
    Ok(())
}

/// Two ranks (threads) of one host bind a GPU each: without a GPU they say there is none; on a
/// one-GPU machine both land on it and are refused naming the GPU; with two or more they get
/// distinct ones.
#[test]
fn two_ranks_bind_two_gpus_or_are_refused() -> Result<()> {
    use ulysses::comm::{bind_gpu, LauncherEnv};
    let got = launch(2, |ctx| -> Result<std::result::Result<Device, String>> {
        Ok(bind_gpu(ctx.world(), &LauncherEnv::from_pairs(&[])).map(|b| b.device).map_err(|e| e.to_string()))
    })?;
    let gpus = ulysses::device::cuda_device_count();
    for r in &got {
        match (gpus, r) {
            (0, Err(e)) => ensure!(e.contains("no CUDA device is visible"), "{e}"),
            (_, Err(e)) if nccl_available().is_err() => ensure!(e.contains("cannot be loaded"), "{e}"),
            (1, Err(e)) => ensure!(e.contains("ranks 0 and 1 both drive the GPU at PCI"), "{e}"),
            (n, Ok(_)) if n >= 2 => {}
            (n, other) => anyhow::bail!("{n} GPUs: {other:?}"),
        }
    }
    if gpus >= 2 {
        ensure!(got[0] != got[1], "two ranks bound the same device: {got:?}");
    }
    Ok(())
}
