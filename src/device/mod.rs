//! Devices: making libtorch's CUDA half available to tch, the calling thread's current GPU, the
//! CUDA caching allocator's statistics, device synchronisation, the libtorch this process
//! loaded against the one it was built for, and which CPU kernels it chose.
//!
//! tch links libtorch_cpu and never loads libtorch_cuda by itself, so on a GPU machine CUDA stays
//! unavailable unless something loads it. [`load_cuda`] does, once; on a CPU-only libtorch (or a
//! machine without the CUDA libraries) the load fails harmlessly and CUDA stays unavailable, so
//! one binary serves both. The rest goes through libtorch's device-generic accelerator API
//! (`csrc/cuda.cpp`), so nothing here needs a CUDA toolkit to build. With the `nccl` feature,
//! also which NCCL the process uses (`nccl_library`: found where users have it, loaded once).

mod cpu;
mod ffi;
mod libtorch;
#[cfg(feature = "nccl")]
mod nccl;
mod offload;

use std::sync::OnceLock;

use tch::Device;

pub use cpu::{cpu_capability, libtorch_config};
pub use libtorch::{
    check_libtorch, check_libtorch_info, loaded_libtorch, version_of_libtorch_dir, LibtorchInfo,
    BUILT_LIBTORCH,
};
#[cfg(feature = "nccl")]
pub use nccl::{
    find_nccl, nccl_candidates, nccl_homes_from_env, nccl_library, nccl_version_string, result_name, NcclApi,
    NcclCandidate, NcclCode, NcclLibrary, NCCL_FLOOR, NCCL_IN_PROGRESS, NCCL_SUCCESS, NCCL_SYMBOLS,
};

use crate::{Error, Result};

/// Loads libtorch's CUDA library if there is one (once per process) and says whether a CUDA
/// device is usable.
pub fn load_cuda() -> bool {
    static LOADED: OnceLock<bool> = OnceLock::new();
    *LOADED.get_or_init(|| {
        for name in [c"libtorch_cuda.so", c"libtorch_cuda.dylib"] {
            // SAFETY: dlopen gets a valid NUL-terminated name; the handle is deliberately never
            // closed, so the library stays loaded (and its CUDA hooks registered) for the process.
            let handle = unsafe { libc::dlopen(name.as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL) };
            if !handle.is_null() {
                break;
            }
        }
        tch::Cuda::is_available()
    })
}

/// `cuda:i` when CUDA is usable and asked for, the CPU otherwise.
pub fn pick(cuda: bool, index: usize) -> Device {
    if cuda && load_cuda() {
        Device::Cuda(index)
    } else {
        Device::Cpu
    }
}

/// CUDA devices this process sees (0 without CUDA). Creates no CUDA context.
pub fn cuda_device_count() -> usize {
    if load_cuda() {
        tch::Cuda::device_count().max(0) as usize
    } else {
        0
    }
}

fn cuda_index(op: &str, device: Device) -> Result<Option<i32>> {
    match device {
        Device::Cpu => Ok(None),
        Device::Cuda(i) => {
            if !load_cuda() {
                return Err(Error::Backend {
                    backend: "cuda",
                    msg: format!("{op} on cuda:{i}: no CUDA device is usable in this process"),
                });
            }
            Ok(Some(i as i32))
        }
        other => Err(Error::Backend { backend: "cuda", msg: format!("{op}: unsupported device {other:?}") }),
    }
}

/// Makes `device` the calling thread's current CUDA device for libtorch (its runtime's device
/// index), so that libtorch's kernels, allocations and streams on this thread go to it. A no-op
/// for the CPU.
///
/// This does not make a CUDA *context* current: the CUDA runtime binds the device's primary
/// context to a thread lazily, at its first call that needs one, and when the runtime already
/// reports this index (0 on a fresh thread) libtorch skips `cudaSetDevice` altogether. Code that
/// calls the driver API itself (the NCCL backend's communicators, streams and events) makes the
/// primary context current through the driver first (`comm::nccl`'s `bind_primary_context`).
pub fn set_current(device: Device) -> Result<()> {
    match cuda_index("set_current", device)? {
        Some(i) => ffi::set_device(i),
        None => Ok(()),
    }
}

/// Waits until everything queued on `device` has run (a no-op for the CPU): what a timer must
/// do before it reads the clock.
pub fn synchronize(device: Device) -> Result<()> {
    match cuda_index("synchronize", device)? {
        Some(i) => ffi::synchronize(i),
        None => Ok(()),
    }
}

/// The handle (`cudaStream_t`) of libtorch's current stream on `cuda:index`.
#[cfg_attr(not(feature = "nccl"), allow(dead_code))]
pub(crate) fn current_stream(index: usize) -> Result<*mut std::ffi::c_void> {
    cuda_index("current_stream", Device::Cuda(index))?;
    ffi::current_stream(index as i32)
}

pub use ffi::SideCopy;
pub use offload::{Offload, OffloadStats, OffloadTarget};

/// Queues `dst.copy_(src)` on a side stream of the GPU one of them is on (the other must be
/// pinned host memory), after everything queued on the current stream so far, without the host
/// waiting: see [`SideCopy`] for waiting on it.
pub fn copy_on_side_stream(dst: &mut tch::Tensor, src: &tch::Tensor) -> Result<SideCopy> {
    let device = if src.device().is_cuda() { src.device() } else { dst.device() };
    let Some(index) = cuda_index("copy_on_side_stream", device)? else {
        return Err(Error::InvalidArgument {
            op: "copy_on_side_stream",
            group: "-".into(),
            msg: format!(
                "a side-stream copy needs a GPU tensor; got {:?} and {:?}",
                src.device(),
                dst.device()
            ),
        });
    };
    ffi::copy_on_side_stream(dst, src, index)
}

/// The CUDA caching allocator's bytes on one device (libtorch's `memory_stats`, all pools).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CudaMemory {
    /// Bytes held by live tensors now.
    pub allocated: u64,
    /// The most bytes held by live tensors since the last [`reset_cuda_peak`].
    pub peak_allocated: u64,
    /// Bytes the allocator holds from the driver now (live tensors and its cache).
    pub reserved: u64,
    /// The most bytes reserved since the last [`reset_cuda_peak`].
    pub peak_reserved: u64,
    /// The device's free bytes, as the driver sees them (`cudaMemGetInfo`).
    pub device_free: u64,
    /// The device's total bytes.
    pub device_total: u64,
}

impl CudaMemory {
    /// Bytes in use on the device that the caching allocator does not hold: the CUDA context,
    /// kernels loaded so far, NCCL's communicators and their buffers (which NCCL allocates
    /// itself), and every other process's memory on the same GPU.
    pub fn outside_allocator(&self) -> u64 {
        (self.device_total.saturating_sub(self.device_free)).saturating_sub(self.reserved)
    }
}

/// The caching allocator's statistics on `cuda:index`.
pub fn cuda_memory(index: usize) -> Result<CudaMemory> {
    cuda_index("cuda_memory", Device::Cuda(index))?;
    let [allocated, peak_allocated, reserved, peak_reserved, device_free, device_total] =
        ffi::memory(index as i32)?;
    Ok(CudaMemory { allocated, peak_allocated, reserved, peak_reserved, device_free, device_total })
}

/// Sets the allocator's peaks on `cuda:index` back to its current values.
pub fn reset_cuda_peak(index: usize) -> Result<()> {
    cuda_index("reset_cuda_peak", Device::Cuda(index))?;
    ffi::reset_peak(index as i32)
}

#[cfg(test)]
mod tests {
    use super::CudaMemory;

    #[test]
    fn memory_outside_the_allocator_is_what_the_driver_counts_less_what_the_allocator_holds() {
        let gib = 1u64 << 30;
        let m = CudaMemory {
            allocated: 3 * gib,
            peak_allocated: 5 * gib,
            reserved: 4 * gib,
            peak_reserved: 6 * gib,
            device_free: 70 * gib,
            device_total: 80 * gib,
        };
        // 10 GiB in use, 4 of them the allocator's: 6 GiB outside it.
        assert_eq!(m.outside_allocator(), 6 * gib);
        // A reading taken between the two calls may see the allocator hold more than the
        // driver counted in use: none outside, never a wrapped-around count.
        let racing = CudaMemory { reserved: 12 * gib, ..m };
        assert_eq!(racing.outside_allocator(), 0);
    }
}
