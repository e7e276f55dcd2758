//! The CUDA driver and NCCL as loaded libraries (cudarc, dynamic loading): every symbol this
//! backend calls is looked up once before the first call, since cudarc panics at a missing
//! symbol (an older driver or NCCL) instead of returning an error; then the GPU's PCI bus id,
//! a side stream, and events.
//!
//! Streams and events belong to the context current on the calling thread: callers make their
//! GPU current first (`crate::device::set_current`).

use std::ffi::{c_char, CStr};
use std::sync::OnceLock;

use cudarc::driver::sys as cu;
use cudarc::nccl::sys as nccl_sys;

use crate::{Error, Result};

/// Every driver function this backend calls (the names cudarc loads).
const DRIVER_SYMBOLS: [&str; 15] = [
    "cuInit",
    "cuDriverGetVersion",
    "cuGetErrorString",
    "cuDeviceGet",
    "cuDeviceGetPCIBusId",
    "cuCtxGetCurrent",
    "cuCtxSetCurrent",
    "cuStreamCreate",
    "cuStreamDestroy_v2",
    "cuStreamWaitEvent",
    "cuEventCreate",
    "cuEventRecord",
    "cuEventQuery",
    "cuEventDestroy_v2",
    "cuDeviceGetCount",
];

/// Every NCCL function this backend calls.
const NCCL_SYMBOLS: [&str; 13] = [
    "ncclGetVersion",
    "ncclGetErrorString",
    "ncclGetLastError",
    "ncclGetUniqueId",
    "ncclCommInitRankConfig",
    "ncclCommGetAsyncError",
    "ncclCommAbort",
    "ncclCommFinalize",
    "ncclCommDestroy",
    "ncclGroupStart",
    "ncclGroupEnd",
    "ncclSend",
    "ncclRecv",
];

/// The NCCL release whose API (`ncclConfig_t`) this build binds: cudarc's `nccl-02028`,
/// matching the NCCL 2.28 that torch 2.11 ships.
pub(super) const NCCL_BUILT: i32 = 22800;

pub(super) fn failure(msg: String) -> Error {
    Error::Backend { backend: "nccl", msg }
}

/// The driver and NCCL are loadable, complete and recent enough; checked once per process.
pub(super) fn libraries() -> Result<()> {
    static CHECKED: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    CHECKED.get_or_init(check_libraries).clone().map_err(failure)
}

fn check_libraries() -> std::result::Result<(), String> {
    // SAFETY: is_culib_present only tries to load the shared library and reports whether it could.
    if !unsafe { cu::is_culib_present() } {
        return Err("the NVIDIA driver (libcuda.so) cannot be loaded: NCCL needs a GPU machine".into());
    }
    // SAFETY: as above, for NCCL.
    if !unsafe { nccl_sys::is_culib_present() } {
        return Err("libnccl.so cannot be loaded: put a directory holding libnccl.so (a link to pip's \
                    nvidia/nccl/lib/libnccl.so.2 will do) on LD_LIBRARY_PATH"
            .into());
    }
    // SAFETY: both libraries load (checked above), so culib() returns them without panicking.
    let (driver, nccl) = unsafe { (cu::culib(), nccl_sys::culib()) };
    // SAFETY: `get` only looks a name up; the symbol is not called here.
    let lacking = absent(&DRIVER_SYMBOLS, |n| unsafe { driver.get::<*const ()>(n.as_bytes()) }.is_ok());
    if !lacking.is_empty() {
        return Err(format!(
            "the NVIDIA driver lacks {lacking:?}: it is older than this build needs; update it"
        ));
    }
    // SAFETY: as above.
    let lacking = absent(&NCCL_SYMBOLS, |n| unsafe { nccl.get::<*const ()>(n.as_bytes()) }.is_ok());
    if !lacking.is_empty() {
        return Err(format!("libnccl lacks {lacking:?}: use NCCL 2.28 or newer (pip's nvidia-nccl-cu13)"));
    }
    let mut version = 0;
    // SAFETY: the symbol exists (checked); `version` is a valid place for one int.
    let r = unsafe { nccl_sys::ncclGetVersion(&mut version) };
    if r != nccl_sys::ncclResult_t::ncclSuccess || version < NCCL_BUILT {
        return Err(format!(
            "libnccl reports version {version} ({r:?}); this build uses the API of NCCL 2.28 ({NCCL_BUILT}) or newer"
        ));
    }
    // SAFETY: the symbol exists; cuInit takes flags only.
    check("cuInit", unsafe { cu::cuInit(0) }).map_err(|e| e.to_string())
}

/// The names that `has` does not find.
fn absent<'a>(names: &[&'a str], has: impl Fn(&str) -> bool) -> Vec<&'a str> {
    names.iter().copied().filter(|n| !has(n)).collect()
}

/// The driver's message for a CUDA result.
fn describe(r: cu::CUresult) -> String {
    let mut text: *const c_char = std::ptr::null();
    // SAFETY: cuGetErrorString writes a pointer to a static NUL-terminated string (or fails).
    let ok = unsafe { cu::cuGetErrorString(r, &mut text) } == cu::CUresult::CUDA_SUCCESS;
    if ok && !text.is_null() {
        // SAFETY: a static C string from the driver.
        unsafe { CStr::from_ptr(text) }.to_string_lossy().into_owned()
    } else {
        format!("{r:?}")
    }
}

/// A CUDA result as a Result.
pub(super) fn check(what: &str, r: cu::CUresult) -> Result<()> {
    if r == cu::CUresult::CUDA_SUCCESS {
        Ok(())
    } else {
        Err(failure(format!("{what}: CUDA error {r:?}: {}", describe(r))))
    }
}

/// The CUDA version the driver supports (12040 for 12.4).
pub fn driver_version() -> Result<i32> {
    libraries()?;
    let mut v = 0;
    // SAFETY: the symbol exists (libraries()); `v` is a valid place for one int.
    check("cuDriverGetVersion", unsafe { cu::cuDriverGetVersion(&mut v) })?;
    Ok(v)
}

/// The PCI bus id of CUDA device `index` as this process numbers it ("0000:3B:00.0"): what
/// tells two processes whether they drive the same GPU. Creates no context.
pub fn pci_bus_id(index: usize) -> Result<String> {
    libraries()?;
    let mut dev: cu::CUdevice = 0;
    // SAFETY: the symbol exists; `dev` is a valid place for the handle.
    check("cuDeviceGet", unsafe { cu::cuDeviceGet(&mut dev, index as i32) })?;
    let mut buf = [0 as c_char; 32];
    // SAFETY: `buf` has the 32 bytes passed as its length; the driver writes a NUL-terminated id.
    check("cuDeviceGetPCIBusId", unsafe { cu::cuDeviceGetPCIBusId(buf.as_mut_ptr(), 32, dev) })?;
    // SAFETY: NUL-terminated within the buffer (the driver's contract for len >= 13).
    Ok(unsafe { CStr::from_ptr(buf.as_ptr()) }.to_string_lossy().into_owned())
}

/// The calling thread's current context (its GPU's primary context once libtorch made the GPU
/// current), to make current on another thread that queries this GPU's events.
pub(super) fn current_context() -> Result<cu::CUcontext> {
    let mut ctx = std::ptr::null_mut();
    // SAFETY: `ctx` is a valid place for the handle.
    check("cuCtxGetCurrent", unsafe { cu::cuCtxGetCurrent(&mut ctx) })?;
    if ctx.is_null() {
        return Err(failure("no CUDA context is current: make the GPU current first".into()));
    }
    Ok(ctx)
}

/// Makes `ctx` current on the calling thread.
pub(super) fn set_context(ctx: cu::CUcontext) -> Result<()> {
    // SAFETY: `ctx` is a live primary context (libtorch never releases it while the process runs).
    check("cuCtxSetCurrent", unsafe { cu::cuCtxSetCurrent(ctx) })
}

/// A stream that does not synchronise with the legacy default stream (libtorch's), so that
/// collectives on it overlap kernels there; destroyed on drop.
pub(super) struct Stream(cu::CUstream);

// SAFETY: a CUDA stream handle may be used from any thread; the driver synchronises access.
unsafe impl Send for Stream {}
// SAFETY: see Send.
unsafe impl Sync for Stream {}

impl Stream {
    pub(super) fn non_blocking() -> Result<Stream> {
        let mut s = std::ptr::null_mut();
        let flags = cu::CUstream_flags::CU_STREAM_NON_BLOCKING as u32;
        // SAFETY: `s` is a valid place for the handle; the current context owns the stream.
        check("cuStreamCreate", unsafe { cu::cuStreamCreate(&mut s, flags) })?;
        Ok(Stream(s))
    }

    pub(super) fn raw(&self) -> cu::CUstream {
        self.0
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        // SAFETY: the handle came from cuStreamCreate and is destroyed once, here; work still
        // queued on it completes first (the driver defers the release).
        let _ = unsafe { cu::cuStreamDestroy_v2(self.0) };
    }
}

/// An event without timing, destroyed on drop.
pub(super) struct Event(cu::CUevent);

// SAFETY: a CUDA event handle may be recorded, queried and waited on from any thread.
unsafe impl Send for Event {}
// SAFETY: see Send.
unsafe impl Sync for Event {}

impl Event {
    /// A new event recorded on `stream` now: it completes when the work queued so far does.
    pub(super) fn record(stream: cu::CUstream) -> Result<Event> {
        let mut e = std::ptr::null_mut();
        let flags = cu::CUevent_flags::CU_EVENT_DISABLE_TIMING as u32;
        // SAFETY: `e` is a valid place for the handle.
        check("cuEventCreate", unsafe { cu::cuEventCreate(&mut e, flags) })?;
        let event = Event(e);
        // SAFETY: a live event and a live stream of the current context.
        check("cuEventRecord", unsafe { cu::cuEventRecord(event.0, stream) })?;
        Ok(event)
    }

    /// Whether the work before the event has completed.
    pub(super) fn done(&self) -> Result<bool> {
        // SAFETY: a live event; the query only reads its state.
        match unsafe { cu::cuEventQuery(self.0) } {
            cu::CUresult::CUDA_SUCCESS => Ok(true),
            cu::CUresult::CUDA_ERROR_NOT_READY => Ok(false),
            other => check("cuEventQuery", other).map(|()| false),
        }
    }

    /// Makes `stream` wait (on the device, not the host) until the event has completed.
    pub(super) fn wait_on(&self, stream: cu::CUstream) -> Result<()> {
        // SAFETY: a live stream and a live event; flags must be 0.
        check("cuStreamWaitEvent", unsafe { cu::cuStreamWaitEvent(stream, self.0, 0) })
    }
}

impl Drop for Event {
    fn drop(&mut self) {
        // SAFETY: the handle came from cuEventCreate and is destroyed once, here; an event still
        // pending is released by the driver when it completes.
        let _ = unsafe { cu::cuEventDestroy_v2(self.0) };
    }
}
