//! Devices: making libtorch's CUDA half available to tch.
//!
//! tch links libtorch_cpu and never loads libtorch_cuda by itself, so on a GPU machine CUDA stays
//! unavailable unless something loads it. [`load_cuda`] does, once; on a CPU-only libtorch (or a
//! machine without the CUDA libraries) the load fails harmlessly and CUDA stays unavailable, so
//! one binary serves both.

use std::sync::OnceLock;

use tch::Device;

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
