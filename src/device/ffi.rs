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
