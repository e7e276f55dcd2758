//! 1. Writes libtorch's library folder into the rpath of every binary, test and bench of this
//!    package, so they run without LD_LIBRARY_PATH (tch's own build gives them none).
//! 2. Compiles csrc/backward.cpp (the tape's autograd from gradient edges with given gradients),
//!    csrc/cuda.cpp (current device and stream, allocator statistics, through libtorch's
//!    accelerator API), csrc/cpu.cpp (which CPU kernels libtorch chose) and csrc/storage.cpp
//!    (freeing and re-allocating a storage in place, dropping a gradient, for ZeRO-3) against
//!    the same libtorch headers and ABI as torch-sys.
//! 3. Records the version of the libtorch it built against (ULYSSES_LIBTORCH_VERSION), which a
//!    process compares with the libtorch it loads (`ulysses::device::check_libtorch`).

use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-changed=csrc/backward.cpp");
    println!("cargo:rerun-if-changed=csrc/cuda.cpp");
    println!("cargo:rerun-if-changed=csrc/cpu.cpp");
    println!("cargo:rerun-if-changed=csrc/storage.cpp");
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    println!("cargo:rerun-if-env-changed=LIBTORCH_CXX11_ABI");
    // torch-sys declares `links = "tch"` and prints `cargo:libtorch_lib=...`, which cargo hands
    // to direct dependents as DEP_TCH_LIBTORCH_LIB.
    let lib = PathBuf::from(
        std::env::var("DEP_TCH_LIBTORCH_LIB").expect("torch-sys did not report libtorch's lib dir"),
    );
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());

    let include = lib.parent().expect("libtorch's lib dir has a parent").join("include");
    println!("cargo:rustc-env=ULYSSES_LIBTORCH_VERSION={}", torch_version(&include));
    let abi = std::env::var("LIBTORCH_CXX11_ABI").unwrap_or_else(|_| "1".into());
    cc::Build::new()
        .cpp(true)
        .pic(true)
        .warnings(false)
        .include(&include)
        .include(include.join("torch/csrc/api/include"))
        .flag("-std=c++17")
        .flag(format!("-D_GLIBCXX_USE_CXX11_ABI={abi}"))
        .file("csrc/backward.cpp")
        .file("csrc/cuda.cpp")
        .file("csrc/cpu.cpp")
        .file("csrc/storage.cpp")
        .compile("ulysses_backward");
}

/// "2.11.0" from libtorch's `torch/headeronly/version.h` ("unknown" if it cannot be read).
fn torch_version(include: &std::path::Path) -> String {
    let text = std::fs::read_to_string(include.join("torch/headeronly/version.h")).unwrap_or_default();
    let part = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("#define TORCH_VERSION_{name} ")))
            .map(|v| v.trim().to_string())
    };
    match (part("MAJOR"), part("MINOR"), part("PATCH")) {
        (Some(a), Some(b), Some(c)) => format!("{a}.{b}.{c}"),
        _ => "unknown".into(),
    }
}
