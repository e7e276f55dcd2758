//! The CUDA driver as a loaded library (cudarc, dynamic loading: `libcuda.so.1` is in cudarc's
//! list), with NCCL found by our own loader (`crate::device::nccl_library`: cudarc never tries
//! `libnccl.so.2`). Every driver symbol this backend calls is looked up once before the first
//! call, since cudarc panics at a missing symbol (an older driver) instead of returning an
//! error. Then the GPU's PCI bus id, its primary context, side streams and events.
//!
//! Streams and events belong to the context current on the calling thread: callers bind the
//! GPU's primary context first ([`bind_primary_context`]).

use std::ffi::{c_char, CStr};
use std::sync::{Mutex, OnceLock, PoisonError};

use cudarc::driver::sys as cu;

use crate::device::NcclLibrary;
use crate::{Error, Result};

/// Every driver function this backend calls (the names cudarc loads).
const DRIVER_SYMBOLS: [&str; 16] = [
    "cuInit",
    "cuDriverGetVersion",
    "cuGetErrorString",
    "cuDeviceGet",
    "cuDeviceGetPCIBusId",
    "cuDevicePrimaryCtxRetain",
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

pub(super) fn failure(msg: String) -> Error {
    Error::Backend { backend: "nccl", msg }
}

/// The driver loads, has every symbol of [`DRIVER_SYMBOLS`] and initialises; checked once per
/// process.
fn driver() -> Result<()> {
    static DRIVER: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    DRIVER.get_or_init(check_driver).clone().map_err(failure)
}

/// The driver (first: without it no NCCL can run, whatever its version), then NCCL: found,
/// complete, and at least `crate::device::NCCL_FLOOR`.
pub(super) fn libraries() -> Result<&'static NcclLibrary> {
    driver()?;
    crate::device::nccl_library()
}

fn check_driver() -> std::result::Result<(), String> {
    // SAFETY: is_culib_present only tries to load the shared library and reports whether it could.
    if !unsafe { cu::is_culib_present() } {
        return Err("the NVIDIA driver (libcuda.so) cannot be loaded: NCCL needs a GPU machine".into());
    }
    // SAFETY: the library loads (checked above), so culib() returns it without panicking.
    let driver = unsafe { cu::culib() };
    // SAFETY: `get` only looks a name up; the symbol is not called here.
    let lacking = absent(&DRIVER_SYMBOLS, |n| unsafe { driver.get::<*const ()>(n.as_bytes()) }.is_ok());
    if !lacking.is_empty() {
        return Err(format!(
            "the NVIDIA driver lacks {lacking:?}: it is older than this build needs; update it"
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
    driver()?;
    let mut v = 0;
    // SAFETY: the symbol exists (driver()); `v` is a valid place for one int.
    check("cuDriverGetVersion", unsafe { cu::cuDriverGetVersion(&mut v) })?;
    Ok(v)
}

/// The driver's handle of CUDA device `index` (as this process numbers them).
fn device(index: usize) -> Result<cu::CUdevice> {
    let ordinal = i32::try_from(index)
        .map_err(|_| failure(format!("CUDA device index {index} does not fit a C int")))?;
    let mut dev: cu::CUdevice = 0;
    // SAFETY: the symbol exists (driver()); `dev` is a valid place for the handle.
    check("cuDeviceGet", unsafe { cu::cuDeviceGet(&mut dev, ordinal) })
        .map_err(|e| failure(format!("cuda:{index}: {e}")))?;
    Ok(dev)
}

/// The PCI bus id of CUDA device `index` as this process numbers it ("0000:3B:00.0"): what
/// tells two processes whether they drive the same GPU. Creates no context.
pub fn pci_bus_id(index: usize) -> Result<String> {
    driver()?;
    let dev = device(index)?;
    let mut buf = [0 as c_char; 32];
    // SAFETY: `buf` has the 32 bytes passed as its length; the driver writes a NUL-terminated id.
    check("cuDeviceGetPCIBusId", unsafe { cu::cuDeviceGetPCIBusId(buf.as_mut_ptr(), 32, dev) })?;
    // SAFETY: NUL-terminated within the buffer (the driver's contract for len >= 13).
    Ok(unsafe { CStr::from_ptr(buf.as_ptr()) }.to_string_lossy().into_owned())
}

/// Retains CUDA device `index`'s primary context (once per process) and makes it current on the
/// calling thread; returns it, for other threads that use this GPU (the watchdog).
///
/// Needed because `crate::device::set_current` does not bind a context: libtorch's
/// `at::accelerator::setDeviceIndex` skips `cudaSetDevice` when the runtime already reports
/// that index (0 on a fresh thread), and the runtime binds its context lazily, so a driver call
/// (a stream, an event, NCCL's initialisation) on a thread that has run no CUDA kernel finds
/// none. The primary context is the one the CUDA runtime, and so libtorch and NCCL, use for the
/// device: one per device and process, shared by all of them.
///
/// The retain is kept for the process, never released: the runtime holds its own for the
/// process's life too, and a release of ours could only matter if it were the last one, which
/// would destroy the context under libtorch's tensors and under streams and events still in
/// flight. The driver tears the context down at process exit.
pub(super) fn bind_primary_context(index: usize) -> Result<cu::CUcontext> {
    static RETAINED: Mutex<Vec<(usize, usize)>> = Mutex::new(Vec::new());
    driver()?;
    let ctx = {
        let mut retained = RETAINED.lock().unwrap_or_else(PoisonError::into_inner);
        match retained.iter().find(|(i, _)| *i == index) {
            Some(&(_, ctx)) => ctx as cu::CUcontext,
            None => {
                let dev = device(index)?;
                let mut ctx = std::ptr::null_mut();
                // SAFETY: `dev` is a valid device handle and `ctx` a valid place for the context.
                check("cuDevicePrimaryCtxRetain", unsafe { cu::cuDevicePrimaryCtxRetain(&mut ctx, dev) })
                    .map_err(|e| failure(format!("cuda:{index}: {e}")))?;
                retained.push((index, ctx as usize));
                ctx
            }
        }
    };
    set_context(ctx)?;
    Ok(ctx)
}

/// Makes `ctx` current on the calling thread.
pub(super) fn set_context(ctx: cu::CUcontext) -> Result<()> {
    // SAFETY: `ctx` is a primary context retained for the process (bind_primary_context).
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
