//! Which CPU kernels libtorch runs in this process. Results that depend on rounding (two sums
//! of the same numbers in another order) depend on them: ATen's vectorised kernels are built for
//! several instruction sets and one is chosen when the process starts (the CPU's best, or the
//! one `ATEN_CPU_CAPABILITY` names), and the BLAS (MKL) and oneDNN choose theirs in the same way
//! (`MKL_ENABLE_INSTRUCTIONS`, `DNNL_MAX_CPU_ISA`). A measurement or a test failure that names
//! them can be reproduced on another machine.

use std::ffi::{c_char, CStr};

extern "C" {
    fn ulysses_cpu_capability() -> *mut c_char;
    fn ulysses_cpu_config() -> *mut c_char;
    fn ulysses_cpu_free(text: *mut c_char);
}

/// Takes a string the shim malloc'ed (null on failure) and frees it.
fn owned(text: *mut c_char) -> Option<String> {
    if text.is_null() {
        return None;
    }
    // SAFETY: a non-null result is a NUL-terminated string from strdup in the shim, read once
    // here and then released exactly once with the shim's matching free.
    let out = unsafe { CStr::from_ptr(text) }.to_string_lossy().into_owned();
    // SAFETY: see above; `text` is not used after this.
    unsafe { ulysses_cpu_free(text) };
    Some(out)
}

/// ATen's CPU capability in this process: `"DEFAULT"`, `"AVX2"` or `"AVX512"` on x86 (the
/// CPU's best unless `ATEN_CPU_CAPABILITY` asked for less when the process started).
pub fn cpu_capability() -> String {
    // SAFETY: takes nothing; exceptions become a null result.
    owned(unsafe { ulysses_cpu_capability() }).unwrap_or_else(|| "unknown".into())
}

/// libtorch's own account of its build (`torch.__config__.show()`): compiler, BLAS and its
/// version, oneDNN's version, OpenMP, and the CPU capability in use.
pub fn libtorch_config() -> String {
    // SAFETY: takes nothing; exceptions become a null result.
    owned(unsafe { ulysses_cpu_config() }).unwrap_or_default()
}
