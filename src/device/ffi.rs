//! The FFI calls into `csrc/cuda.cpp`: libtorch's accelerator API for CUDA.

use std::ffi::{c_char, c_int, c_void, CStr};

use crate::{Error, Result};

extern "C" {
    fn ulysses_cuda_set_device(index: c_int) -> *mut c_char;
    fn ulysses_cuda_current_stream(index: c_int, out: *mut *mut c_void) -> *mut c_char;
    fn ulysses_cuda_memory(index: c_int, out: *mut i64) -> *mut c_char;
    fn ulysses_cuda_reset_peak(index: c_int) -> *mut c_char;
    fn ulysses_cuda_synchronize(index: c_int) -> *mut c_char;
    fn ulysses_cuda_free_error(message: *mut c_char);
    fn ulysses_copy_on_side_stream(
        dst: *mut torch_sys::C_tensor,
        src: *const torch_sys::C_tensor,
        index: c_int,
        event: *mut *mut c_void,
    ) -> *mut c_char;
    fn ulysses_event_block(event: *mut c_void, index: c_int) -> *mut c_char;
    fn ulysses_event_wait(event: *mut c_void) -> *mut c_char;
    fn ulysses_event_free(event: *mut c_void);
}

/// Turns the shim's error string (null on success) into a Result.
fn checked(op: &str, index: c_int, message: *mut c_char) -> Result<()> {
    if message.is_null() {
        return Ok(());
    }
    // SAFETY: a non-null result is a NUL-terminated string from strdup in the shim, read here
    // once and then released exactly once with the shim's matching free.
    let text = unsafe { CStr::from_ptr(message) }.to_string_lossy().into_owned();
    // SAFETY: see above; `message` is not used after this.
    unsafe { ulysses_cuda_free_error(message) };
    let text = crate::error::libtorch_message(&text).to_string();
    Err(Error::Backend { backend: "cuda", msg: format!("{op} on cuda:{index}: {text}") })
}

pub(super) fn set_device(index: c_int) -> Result<()> {
    // SAFETY: takes a plain integer; every C++ exception becomes the returned message.
    checked("set_device", index, unsafe { ulysses_cuda_set_device(index) })
}

pub(super) fn current_stream(index: c_int) -> Result<*mut c_void> {
    let mut stream = std::ptr::null_mut();
    // SAFETY: `stream` is a valid place for one pointer, written only on success.
    checked("current_stream", index, unsafe { ulysses_cuda_current_stream(index, &mut stream) })?;
    Ok(stream)
}

pub(super) fn memory(index: c_int) -> Result<[u64; 6]> {
    let mut out = [0i64; 6];
    // SAFETY: `out` holds the six i64 the shim writes.
    checked("memory_stats", index, unsafe { ulysses_cuda_memory(index, out.as_mut_ptr()) })?;
    Ok(out.map(|b| b.max(0) as u64))
}

pub(super) fn reset_peak(index: c_int) -> Result<()> {
    // SAFETY: takes a plain integer; exceptions become the message.
    checked("reset_peak_memory_stats", index, unsafe { ulysses_cuda_reset_peak(index) })
}

pub(super) fn synchronize(index: c_int) -> Result<()> {
    // SAFETY: takes a plain integer; exceptions become the message.
    checked("synchronize", index, unsafe { ulysses_cuda_synchronize(index) })
}

/// A copy queued on a side stream of `cuda:index` (`csrc/cuda.cpp`), and the event recorded
/// after it; the event is released on drop.
pub struct SideCopy {
    event: *mut c_void,
    index: c_int,
}

/// Queues `dst.copy_(src)` (one on `cuda:index`, the other pinned host memory) on a side stream
/// after the current stream's work so far.
pub(super) fn copy_on_side_stream(
    dst: &mut tch::Tensor,
    src: &tch::Tensor,
    index: c_int,
) -> Result<SideCopy> {
    let mut event = std::ptr::null_mut();
    // SAFETY: dst and src are live tch tensors borrowed for the call (dst mutably: the shim
    // writes into its storage); `event` is a valid place for one pointer, written on success.
    checked("copy_on_side_stream", index, unsafe {
        ulysses_copy_on_side_stream(dst.as_mut_ptr(), src.as_ptr(), index, &mut event)
    })?;
    Ok(SideCopy { event, index })
}

impl SideCopy {
    /// The current stream waits (on the GPU) for the copy before its next kernels.
    pub fn block(&self) -> Result<()> {
        // SAFETY: `event` is the live c10::Event this SideCopy owns.
        checked("event_block", self.index, unsafe { ulysses_event_block(self.event, self.index) })
    }

    /// The host waits for the copy.
    pub fn wait(&self) -> Result<()> {
        // SAFETY: as in `block`.
        checked("event_wait", self.index, unsafe { ulysses_event_wait(self.event) })
    }
}

impl Drop for SideCopy {
    fn drop(&mut self) {
        // SAFETY: `event` came from the shim's `new c10::Event`, is owned by this SideCopy
        // alone, and is freed exactly once, here.
        unsafe { ulysses_event_free(self.event) }
    }
}
