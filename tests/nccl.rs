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
        // A GPU machine: the driver and NCCL load and a world of one forms.
        nccl_available()?;
        ensure!(made[0].is_none(), "NCCL failed on a GPU machine: {:?}", made[0]);
    } else {
        let err = nccl_available().err().map(|e| e.to_string()).unwrap_or_default();
        ensure!(err.contains("libcuda.so") || err.contains("libnccl.so"), "{err}");
        let made = made[0].clone().unwrap_or_default();
        ensure!(made.contains("nccl backend") && made.contains("cannot be loaded"), "{made}");
    }
    Ok(())
}
