//! libtorch's CUDA flash attention kernel (Dao 2023, FlashAttention-2) for the blocks of ring
//! attention and USP: bf16 or f16 q, k, v in, the block's output and its log-sum-exp (f32) out,
//! which the ring merges in f32 (`blockwise::merge`); the backward recomputes the block's
//! probabilities from the final (merged) log-sum-exp, as ring flash attention does (Liu et al.
//! 2023; zhuzilin/ring-flash-attention). So a GPU comparison of ring against Ulysses (whose
//! local kernel is SDPA, which picks the same flash kernel) compares like with like.
//!
//! tch 0.24 does not expose the CUDA flash forward (it returns SymInts), so both directions go
//! through `csrc/cuda.cpp`, which calls libtorch's dispatcher.

use std::ffi::{c_char, c_int, CStr};

use tch::{Device, Kind, TchError, Tensor};
use torch_sys::C_tensor;

use super::compute_kind;

extern "C" {
    fn ulysses_flash_forward(
        q: *const C_tensor,
        k: *const C_tensor,
        v: *const C_tensor,
        causal: c_int,
        scale: f64,
        out: *mut *mut C_tensor,
    ) -> *mut c_char;
    #[allow(clippy::too_many_arguments)]
    fn ulysses_flash_backward(
        dout: *const C_tensor,
        q: *const C_tensor,
        k: *const C_tensor,
        v: *const C_tensor,
        o: *const C_tensor,
        lse: *const C_tensor,
        causal: c_int,
        scale: f64,
        grads: *mut *mut C_tensor,
    ) -> *mut c_char;
    fn ulysses_cuda_free_error(message: *mut c_char);
}

/// Whether the flash kernel takes these blocks: CUDA, bf16 or f16, a head size it supports
/// (a multiple of 8, at most 256). Other blocks use the math path in f32.
pub(crate) fn usable(q: &Tensor) -> bool {
    let d = q.size().last().copied().unwrap_or(0);
    matches!(q.device(), Device::Cuda(_))
        && matches!(q.kind(), Kind::BFloat16 | Kind::Half)
        && d % 8 == 0
        && (8..=256).contains(&d)
}

/// `[b, s, h, d]` -> `[b, h, s, d]`, the layout of a block: kept in bf16/f16 on CUDA (the flash
/// kernel's input), in the accumulation dtype everywhere else (as `blockwise::heads_first`).
pub(crate) fn block_layout(x: &Tensor) -> crate::Result<Tensor> {
    let t = x.f_transpose(1, 2);
    let t = if usable(x) { t } else { t.and_then(|t| t.f_to_kind(compute_kind(x.kind()))) };
    crate::error::TorchResultExt::op(t, "blockwise_attention")
}

fn checked(message: *mut c_char) -> Result<(), TchError> {
    if message.is_null() {
        return Ok(());
    }
    // SAFETY: a non-null result is a NUL-terminated string from strdup in the shim, read here
    // once and then released exactly once with the shim's matching free.
    let text = unsafe { CStr::from_ptr(message) }.to_string_lossy().into_owned();
    // SAFETY: see above; `message` is not used after this.
    unsafe { ulysses_cuda_free_error(message) };
    Err(TchError::Torch(format!("flash attention: {text}")))
}

/// Takes ownership of tensors the shim created.
fn owned<const N: usize>(ptrs: [*mut C_tensor; N]) -> Result<[Tensor; N], TchError> {
    if ptrs.iter().any(|p| p.is_null()) {
        return Err(TchError::Torch("flash attention: the kernel returned no tensor".into()));
    }
    // SAFETY: each pointer is a `new at::Tensor` from the shim, owned by nobody else; tch's
    // Tensor takes ownership and frees it once on drop.
    Ok(ptrs.map(|p| unsafe { Tensor::from_ptr(p) }))
}

/// Attention of `q` over `k`, `v` (`[b, h, s, d]`, bf16 or f16, CUDA; [`usable`]) with
/// top-left causal alignment when `causal`: (out `[b, h, s_q, d]` in f32, lse `[b, h, s_q]`
/// in f32).
pub(crate) fn forward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    causal: bool,
    scale: f64,
) -> Result<(Tensor, Tensor), TchError> {
    let mut out = [std::ptr::null_mut(); 2];
    // SAFETY: q, k, v are live tch tensors borrowed for the call; `out` has room for the two
    // pointers the shim writes on success. The shim turns every C++ exception into a message.
    checked(unsafe {
        ulysses_flash_forward(q.as_ptr(), k.as_ptr(), v.as_ptr(), causal.into(), scale, out.as_mut_ptr())
    })?;
    let [o, lse] = owned(out)?;
    Ok((o.f_to_kind(compute_kind(q.kind()))?, lse))
}

/// The gradients (dq, dk, dv, in the inputs' dtype) of one block given the output gradient
/// `dout` and the final output `out` and log-sum-exp `lse` of these queries (any dtype; cast
/// here to what the kernel takes).
#[allow(clippy::too_many_arguments)]
pub(crate) fn backward(
    dout: &Tensor,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    out: &Tensor,
    lse: &Tensor,
    causal: bool,
    scale: f64,
) -> Result<(Tensor, Tensor, Tensor), TchError> {
    let (dout, out) = (dout.f_to_kind(q.kind())?.f_contiguous()?, out.f_to_kind(q.kind())?.f_contiguous()?);
    let lse = lse.f_to_kind(Kind::Float)?.f_contiguous()?;
    let mut grads = [std::ptr::null_mut(); 3];
    // SAFETY: every tensor is a live tch tensor borrowed for the call; `grads` has room for the
    // three pointers the shim writes on success; exceptions become the message.
    checked(unsafe {
        ulysses_flash_backward(
            dout.as_ptr(),
            q.as_ptr(),
            k.as_ptr(),
            v.as_ptr(),
            out.as_ptr(),
            lse.as_ptr(),
            causal.into(),
            scale,
            grads.as_mut_ptr(),
        )
    })?;
    let [dq, dk, dv] = owned(grads)?;
    Ok((dq, dk, dv))
}
