//! The crate's FFI calls into its C++ shims: `torch::autograd::backward(roots, grads)`
//! (csrc/backward.cpp), and a storage resized in place and a gradient dropped (csrc/storage.cpp,
//! for ZeRO-3).
//!
//! tch 0.24 can start autograd only from a scalar with an implicit gradient of one. The tape
//! needs to start it from a record's inputs with the gradients its adjoint computed; without this
//! call it would back-propagate `dot(input, grad)`, one extra elementwise pass per record.

use std::ffi::{c_char, c_int, CStr};

use tch::Tensor;
use torch_sys::C_tensor;

extern "C" {
    fn ulysses_backward(
        roots: *const *const C_tensor,
        grads: *const *const C_tensor,
        n: c_int,
    ) -> *mut c_char;
    fn ulysses_free_error(message: *mut c_char);
}

/// Runs autograd from every `roots[i]` with gradient `grads[i]`, freeing the graph as it goes
/// (no `retain_graph`). Returns libtorch's message on failure.
pub(crate) fn backward_with_grads(roots: &[&Tensor], grads: &[&Tensor]) -> Result<(), String> {
    if roots.len() != grads.len() {
        return Err(format!("{} roots but {} gradients", roots.len(), grads.len()));
    }
    let n = c_int::try_from(roots.len()).map_err(|_| format!("{} roots is too many", roots.len()))?;
    let r: Vec<*const C_tensor> = roots.iter().map(|t| t.as_ptr()).collect();
    let g: Vec<*const C_tensor> = grads.iter().map(|t| t.as_ptr()).collect();
    // SAFETY: each pointer is tch's handle (a `torch::Tensor*`, torch_api.h) of a Tensor borrowed
    // for the whole call, so it is valid and outlives the call, as do the two arrays of length
    // n. The shim only reads through the pointers and turns every C++ exception into a message.
    let message = unsafe { ulysses_backward(r.as_ptr(), g.as_ptr(), n) };
    shim_result(message)
}

extern "C" {
    fn ulysses_storage_resize(t: *const C_tensor, nbytes: usize) -> *mut c_char;
    fn ulysses_storage_nbytes(t: *const C_tensor) -> usize;
    fn ulysses_clear_grad(t: *const C_tensor) -> *mut c_char;
}

/// Takes the shim's error message (null: success) and frees it.
fn shim_result(message: *mut c_char) -> Result<(), String> {
    if message.is_null() {
        return Ok(());
    }
    // SAFETY: a non-null result is a NUL-terminated string from strdup in the shim, read here
    // once and then released exactly once with the shim's matching free.
    let text = unsafe { CStr::from_ptr(message) }.to_string_lossy().into_owned();
    // SAFETY: see above; `message` is not used after this.
    unsafe { ulysses_free_error(message) };
    Err(text)
}

/// Sets the byte size of `t`'s storage in place (csrc/storage.cpp): 0 frees the memory of `t`
/// and of every view of it; a size allocates that many uninitialised bytes, which the views see.
/// Reading the tensor while its storage is freed is undefined: callers (ZeRO-3) re-allocate and
/// fill it before any use.
pub(crate) fn resize_storage(t: &Tensor, nbytes: usize) -> Result<(), String> {
    // SAFETY: `t.as_ptr()` is tch's valid `torch::Tensor*`, borrowed for the call; the shim only
    // touches the tensor's StorageImpl and catches every C++ exception.
    shim_result(unsafe { ulysses_storage_resize(t.as_ptr(), nbytes) })
}

/// Bytes held by `t`'s storage (0 once freed by [`resize_storage`]).
pub(crate) fn storage_nbytes(t: &Tensor) -> usize {
    // SAFETY: a read of the storage's size through tch's valid handle, borrowed for the call.
    unsafe { ulysses_storage_nbytes(t.as_ptr()) }
}

/// Drops `t`'s gradient (`t.grad = None`), freeing it if nothing else holds it.
pub(crate) fn clear_grad(t: &Tensor) -> Result<(), String> {
    // SAFETY: tch's valid handle, borrowed for the call; the shim resets the gradient slot of
    // the tensor's autograd metadata and catches every C++ exception.
    shim_result(unsafe { ulysses_clear_grad(t.as_ptr()) })
}
