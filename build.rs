//! Writes libtorch's library folder into the rpath of every binary, test and bench of this
//! package, so they run without LD_LIBRARY_PATH (tch's own build gives them none).

fn main() {
    // torch-sys declares `links = "tch"` and prints `cargo:libtorch_lib=...`, which cargo hands to
    // direct dependents as DEP_TCH_LIBTORCH_LIB.
    if let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
    }
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
}
