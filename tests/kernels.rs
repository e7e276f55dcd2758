//! Which CPU kernels libtorch runs here. `scripts/isa-check.sh` runs the float-comparing tests
//! again with libtorch, MKL and oneDNN held to older instruction sets, and runs this first to
//! show that the settings took: ATen's capability is read back, and a GEMM in f32 (MKL) and in
//! bf16 (oneDNN) runs so that `MKL_VERBOSE` and `DNNL_VERBOSE` print the instruction set each
//! library chose.

use anyhow::{ensure, Result};
use tch::{Device, Kind, Tensor};

#[test]
fn libtorch_reports_its_cpu_kernels() -> Result<()> {
    let capability = ulysses::device::cpu_capability();
    let config = ulysses::device::libtorch_config();
    println!("ATen CPU capability: {capability}");
    println!("{config}");
    ensure!(["DEFAULT", "AVX2", "AVX512"].contains(&capability.as_str()), "capability {capability:?}");
    ensure!(config.contains(&format!("CPU capability usage: {capability}")), "{config}");
    // The capability ATEN_CPU_CAPABILITY asked for, when the caller says what it asked
    // (scripts/isa-check.sh): the setting must have taken.
    if let Ok(want) = std::env::var("ULYSSES_EXPECT_CPU_CAPABILITY") {
        ensure!(capability == want, "ATen runs {capability} kernels, {want} was asked for");
    }
    for kind in [Kind::Float, Kind::BFloat16] {
        let a = Tensor::ones([64, 64], (kind, Device::Cpu));
        let c = a.matmul(&a);
        ensure!(c.double_value(&[0, 0]) == 64.0, "{kind:?} GEMM of ones: {}", c.double_value(&[0, 0]));
    }
    // An f32 convolution runs through oneDNN on every x86 CPU, so that its verbose mode names
    // its instruction set even where libtorch keeps bf16 GEMMs away from it (no bf16 support
    // below AVX-512).
    let x = Tensor::ones([4, 32, 32, 32], (Kind::Float, Device::Cpu));
    let w = Tensor::ones([32, 32, 3, 3], (Kind::Float, Device::Cpu));
    let y = x.conv2d(&w, None::<Tensor>, [1, 1], [1, 1], [1, 1], 1);
    ensure!(
        y.double_value(&[0, 0, 4, 4]) == 288.0,
        "f32 convolution of ones: {}",
        y.double_value(&[0, 0, 4, 4])
    );
    Ok(())
}
