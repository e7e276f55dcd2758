//! The crate's FFI into its C++ shims, for what tch 0.24 lacks: libtorch's autograd
//! (csrc/backward.cpp) and a storage resized in place (csrc/storage.cpp, for ZeRO-3):
//!
//! - [`GradEdge`]: where a tensor's gradient enters the graph (its grad_fn and input slot, or
//!   its gradient accumulator for a leaf), kept without the tensor itself, so that a record
//!   holds the graph of its inputs but not their storage;
//! - [`backward_from_edges`]: autograd from several such edges with given gradients (tch can
//!   only start from a scalar with an implicit gradient of one);
//! - [`fail_in_backward`]: a grad_fn whose backward fails with a message, for the outputs of
//!   collectives that ran without a recording tape;
//! - [`resize_storage`], [`storage_nbytes`], [`clear_grad`]: a storage freed and re-allocated in
//!   place, and a gradient dropped (ZeRO-3's per-block gather and free).

use std::ffi::{c_char, c_int, c_void, CStr, CString};

use tch::Tensor;
use torch_sys::C_tensor;

extern "C" {
    fn ulysses_gradient_edge(t: *const C_tensor, error: *mut *mut c_char) -> *mut c_void;
    fn ulysses_edge_free(edge: *mut c_void);
    fn ulysses_backward_edges(
        edges: *const *const c_void,
        grads: *const *const C_tensor,
        n: c_int,
    ) -> *mut c_char;
    fn ulysses_failing_grad_fn(out: *const C_tensor, msg: *const c_char) -> *mut c_char;
    fn ulysses_free_error(message: *mut c_char);
    fn ulysses_storage_resize(t: *const C_tensor, nbytes: usize) -> *mut c_char;
    fn ulysses_storage_nbytes(t: *const C_tensor) -> usize;
    fn ulysses_clear_grad(t: *const C_tensor) -> *mut c_char;
}

/// The shim's error message, if any, released after reading.
fn take_message(message: *mut c_char) -> Result<(), String> {
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

/// A gradient edge of a tensor that requires grad: an owned `torch::autograd::Edge`. It keeps
/// the tensor's graph alive (as the tensor would), but not the tensor's values.
pub(crate) struct GradEdge(*mut c_void);

impl GradEdge {
    /// The edge of `t`, which must require grad.
    pub fn of(t: &Tensor) -> Result<GradEdge, String> {
        let mut error: *mut c_char = std::ptr::null_mut();
        // SAFETY: `t.as_ptr()` is tch's handle of a live tensor borrowed for the call; the shim
        // only reads through it and writes `error` (a valid out-pointer) or returns an edge.
        let edge = unsafe { ulysses_gradient_edge(t.as_ptr(), &mut error) };
        take_message(error)?;
        if edge.is_null() {
            return Err("libtorch returned no gradient edge".into());
        }
        Ok(GradEdge(edge))
    }
}

impl Drop for GradEdge {
    fn drop(&mut self) {
        // SAFETY: the pointer came from ulysses_gradient_edge (a `new Edge`), is owned by this
        // value alone and is freed exactly once, here.
        unsafe { ulysses_edge_free(self.0) };
    }
}

/// Runs autograd from every `edges[i]` with gradient `grads[i]`, freeing the graph as it goes
/// (no keep_graph) and accumulating into the leaves' gradients. Returns libtorch's message on
/// failure.
pub(crate) fn backward_from_edges(edges: &[&GradEdge], grads: &[&Tensor]) -> Result<(), String> {
    if edges.len() != grads.len() {
        return Err(format!("{} edges but {} gradients", edges.len(), grads.len()));
    }
    let n = c_int::try_from(edges.len()).map_err(|_| format!("{} edges is too many", edges.len()))?;
    let e: Vec<*const c_void> = edges.iter().map(|e| e.0 as *const c_void).collect();
    let g: Vec<*const C_tensor> = grads.iter().map(|t| t.as_ptr()).collect();
    // SAFETY: each edge pointer is owned by a GradEdge borrowed for the whole call, each tensor
    // pointer is tch's handle of a Tensor borrowed for the call, and both arrays have length n.
    // The shim only reads through them and turns every C++ exception into a message.
    take_message(unsafe { ulysses_backward_edges(e.as_ptr(), g.as_ptr(), n) })
}

/// Gives `out` (a fresh tensor: no grad_fn, not requiring grad) a grad_fn whose backward fails
/// with `msg`, if grad mode is on; without grad mode it is left as it is.
pub(crate) fn fail_in_backward(out: &Tensor, msg: &str) -> Result<(), String> {
    let msg = CString::new(msg.replace('\0', " ")).map_err(|e| e.to_string())?;
    // SAFETY: `out.as_ptr()` is tch's handle of a live tensor borrowed for the call and `msg` a
    // NUL-terminated string that outlives it; the shim copies the message.
    take_message(unsafe { ulysses_failing_grad_fn(out.as_ptr(), msg.as_ptr()) })
}

/// Sets the byte size of `t`'s storage in place (csrc/storage.cpp): 0 frees the memory of `t`
/// and of every view of it; a size allocates that many uninitialised bytes, which the views see.
/// Reading the tensor while its storage is freed is undefined: callers (ZeRO-3) re-allocate and
/// fill it before any use.
pub(crate) fn resize_storage(t: &Tensor, nbytes: usize) -> Result<(), String> {
    // SAFETY: `t.as_ptr()` is tch's valid `torch::Tensor*`, borrowed for the call; the shim only
    // touches the tensor's StorageImpl and catches every C++ exception.
    take_message(unsafe { ulysses_storage_resize(t.as_ptr(), nbytes) })
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
    take_message(unsafe { ulysses_clear_grad(t.as_ptr()) })
}
