//! Peak memory of a rank during a point, measured where the memory is: the host's resident
//! set for CPU ranks, libtorch's CUDA caching allocator for GPU ranks. The results tables name
//! which measure a row holds (the `memory` column), since the two are not comparable.

use tch::Device;

use crate::Result;

/// Host RSS: the process's peak resident set (VmHWM) above its RSS once the model was built,
/// divided by the ranks the process holds (ranks as threads share one process).
pub const HOST_RSS: &str = "host_rss_above_base";
/// CUDA: the caching allocator's peak of bytes held by live tensors on the rank's GPU since the
/// point's model was built (so it includes the model, its gradients and every activation),
/// divided by the ranks sharing the GPU; the reserved peak (allocator cache included) goes in
/// its own column.
pub const CUDA_PEAK: &str = "cuda_peak_allocated";

/// Memory of this process from /proc (Linux); `None` elsewhere.
pub mod rss {
    /// A field of /proc/self/status (VmRSS, VmHWM) in MiB.
    pub fn status_mib(field: &str) -> Option<f64> {
        let text = std::fs::read_to_string("/proc/self/status").ok()?;
        let line = text.lines().find(|l| l.starts_with(field))?;
        let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kb / 1024.0)
    }

    /// Resets the peak RSS (VmHWM) to the current RSS (Linux 4.0+), after handing the heap
    /// memory freed by earlier points back to the OS, so that the RSS counts live memory only.
    pub fn reset_peak() -> bool {
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        // SAFETY: malloc_trim takes no pointer and only walks glibc's own arenas.
        unsafe {
            libc::malloc_trim(0);
        }
        std::fs::write("/proc/self/clear_refs", "5").is_ok()
    }
}

/// One rank's memory measurement over a point.
pub(crate) struct MemoryProbe {
    device: Device,
    base_rss: Option<f64>,
    ranks_sharing: f64,
}

/// A reading: (peak MiB per rank, reserved peak MiB per rank or NaN, the measure's name, MiB per
/// rank in use on the GPU outside the caching allocator now or NaN).
pub(crate) type Reading = (f64, f64, &'static str, f64);

impl MemoryProbe {
    /// Starts measuring after the model was built. `resets` says whether this rank resets the
    /// process's (or the GPU's) peak: one rank per process or GPU does, between barriers.
    pub fn reset(device: Device, resets: bool) -> Result<()> {
        match device {
            Device::Cuda(i) if resets => crate::device::reset_cuda_peak(i),
            Device::Cpu if resets => {
                rss::reset_peak();
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// The baseline, read once every rank has reset.
    pub fn new(device: Device, ranks_sharing: usize) -> MemoryProbe {
        let base_rss = if device == Device::Cpu { rss::status_mib("VmRSS:") } else { None };
        MemoryProbe { device, base_rss, ranks_sharing: ranks_sharing.max(1) as f64 }
    }

    /// The peaks so far.
    pub fn read(&self) -> Result<Reading> {
        match self.device {
            Device::Cuda(i) => {
                let m = crate::device::cuda_memory(i)?;
                let mib = |b: u64| b as f64 / (1024.0 * 1024.0) / self.ranks_sharing;
                Ok((mib(m.peak_allocated), mib(m.peak_reserved), CUDA_PEAK, mib(m.outside_allocator())))
            }
            _ => {
                let peak = match (self.base_rss, rss::status_mib("VmHWM:")) {
                    (Some(base), Some(peak)) => (peak - base).max(0.0) / self.ranks_sharing,
                    _ => f64::NAN,
                };
                Ok((peak, f64::NAN, HOST_RSS, f64::NAN))
            }
        }
    }
}
