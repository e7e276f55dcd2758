//! The GPU check (cargo feature `nccl`), for a machine with one NVIDIA GPU, CUDA and PyTorch but
//! no Rust toolchain: build it here, carry it, run `scripts/gpu-check.sh` there (which also runs
//! `ulysses run` on NCCL processes). In one go:
//!
//! 1. NCCL at world size 1: communicators for the world and a split (non-blocking
//!    initialisation, the watchdog, finalize on drop), and 128 MiB sent by this rank to itself
//!    through the backend (envelopes on the control group, NCCL on the side stream, completion
//!    by events) while a matmul runs on libtorch's stream: bit-exact, into contiguous and strided
//!    destinations (one GPU cannot hold two ranks of one communicator);
//! 2. the local backend with 2 and 4 ranks as threads sharing the GPU;
//! 3. Ulysses attention in bf16 on CUDA, 2 and 4 ranks, against f64 attention on the CPU;
//! 4. ring attention's blocks on the flash kernel: parity and time against SDPA on the whole
//!    sequence and against ring's own f32 math path;
//! 5. the bf16 matmul peak, and the 1.3B GPT's layer stack at 8K and 32K tokens with Ulysses at
//!    P=1 on NCCL: tokens/s, model TFLOP/s, MFU, and the CUDA allocator's peak against the
//!    activation formula;
//! 6. one summary table. Exits non-zero if a check fails.
//!
//! With `--calibrate FILE` it also measures the GPU for the cost model into a hardware file
//! (`calibrate.rs`) and prints the model's prediction of each measured layer stack beside the
//! measurement.

mod attention;
mod calibrate;
mod perf;

#[path = "../../../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use anyhow::{ensure, Result};
use tch::{Device, Kind, Tensor};
use ulysses::comm::{launch, nccl_group, LocalLaunch, OpKind, ReduceOp};

const GPU: Device = Device::Cuda(0);

fn sync() {
    tch::Cuda::synchronize(0);
}

/// Median seconds of `f` over `runs` runs after one warm-up, synchronising the GPU.
fn time(runs: usize, f: impl FnMut() -> Result<()>) -> Result<f64> {
    ulysses::cost::calibrate::time_median(runs, &sync, f)
}

/// NCCL communicators at world size 1 (the world and a split), collectives through them, and a
/// transfer to itself through the backend while a matmul runs.
fn nccl_world_of_one() -> Result<String> {
    let out = LocalLaunch::new(1).run(|ctx| -> Result<String> {
        let g = nccl_group(ctx.world(), GPU, Duration::from_secs(60))?;
        let x = Tensor::randn([2, 8, 4, 16], (Kind::BFloat16, GPU));
        ensure!(g.all_to_all(&x, 2, 1)?.equal(&x), "all_to_all at P=1 is not the identity");
        ensure!(g.all_reduce(&x, ReduceOp::Sum)?.equal(&x), "all_reduce at P=1 is not the identity");
        let sub = g.split("sub", Some(0), 0)?.ok_or_else(|| anyhow::anyhow!("no subgroup"))?;
        ensure!(sub.all_gather(&x, 1)?.equal(&x), "split communicator");
        // 128 MiB to itself through NCCL on the side stream, a matmul in flight meanwhile.
        let backend = g.backend_handle();
        let big = Tensor::randn([64, 1024, 1024], (Kind::BFloat16, GPU));
        let (got, a) = (big.zeros_like(), Tensor::randn([8192, 8192], (Kind::BFloat16, GPU)));
        sync();
        let t0 = Instant::now();
        let pending = backend.exchange_start(
            g.info(),
            OpKind::Shift,
            vec![Some(big.shallow_clone())],
            vec![Some(got.shallow_clone())],
        )?;
        let _busy = a.matmul(&a);
        pending.wait()?;
        g.synchronize()?;
        sync();
        let took = t0.elapsed().as_secs_f64() * 1e3;
        ensure!(got.equal(&big), "NCCL self transfer: the data differs");
        // A strided destination ([1024, 64, 1024] seen as [64, 1024, 1024]).
        let strided = Tensor::zeros([1024, 64, 1024], (Kind::BFloat16, GPU)).transpose(0, 1);
        backend.exchange(
            g.info(),
            OpKind::Shift,
            vec![Some(big.shallow_clone())],
            vec![Some(strided.shallow_clone())],
        )?;
        ensure!(strided.equal(&big), "NCCL self transfer into a strided tensor: the data differs");
        Ok(format!(
            "world and split communicators, backend {}; 128 MiB to itself bit-exact (contiguous, strided), \
             {took:.2} ms with an 8192^3 matmul in flight",
            g.backend_name()
        ))
    })?;
    Ok(out[0].clone())
}

/// The local backend with P ranks as threads on the one GPU, against the same ops on the CPU.
fn local_on_gpu(p: usize) -> Result<String> {
    launch(p, |ctx| -> Result<()> {
        let (g, r) = (ctx.world(), ctx.rank());
        let pi = p as i64;
        for kind in [Kind::Float, Kind::BFloat16] {
            let shape = [2, 3 * pi, 2 * pi, 5];
            let x = common::data(r, &shape, kind, false);
            let y = g.all_to_all(&x.to(GPU), 2, 1)?.to(Device::Cpu);
            let parts: Vec<Tensor> =
                (0..p).map(|j| common::data(j, &shape, kind, true).narrow(2, 2 * r as i64, 2)).collect();
            ensure!(y.equal(&Tensor::cat(&parts, 1)), "all_to_all {kind:?} on the GPU");
            let s = g.all_reduce(&x.to(GPU), ReduceOp::Sum)?.to(Device::Cpu);
            let cpu = g.all_reduce(&x, ReduceOp::Sum)?;
            ensure!(s.equal(&cpu), "all_reduce {kind:?}: GPU and CPU differ");
        }
        Ok(())
    })?;
    Ok("all_to_all and all_reduce exact (f32, bf16)".into())
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let calibrate_to = args
        .iter()
        .position(|a| a == "--calibrate")
        .and_then(|i| args.get(i + 1))
        .map(std::path::PathBuf::from);
    if !ulysses::device::load_cuda() {
        eprintln!("ulysses-gpu: no CUDA device is usable (is libtorch_cuda on LD_LIBRARY_PATH?)");
        std::process::exit(2);
    }
    let started = Instant::now();
    let mut rows: Vec<(String, bool, String)> = Vec::new();
    let mut check = |name: &str, r: Result<String>| {
        let (ok, text) = match r {
            Ok(t) => (true, t),
            Err(e) => (false, format!("{e:#}")),
        };
        println!("{} {name}: {text}", if ok { "ok  " } else { "FAIL" });
        rows.push((name.to_string(), ok, text));
    };
    check("nccl, world size 1", nccl_world_of_one());
    for p in [2, 4] {
        check(&format!("local backend, {p} ranks on the GPU"), local_on_gpu(p));
    }
    for p in [2, 4] {
        check(&format!("ulysses bf16 parity, P={p}"), attention::ulysses_bf16(p));
    }
    check("ring, flash blocks vs SDPA, N=8192", attention::ring_flash(2, 8192));
    let peak = perf::matmul_peak();
    let peak_value = peak.as_ref().ok().copied();
    check("bf16 matmul 8192^3", peak.map(|t| format!("{t:.1} TFLOP/s (the peak below)")));
    let hw = calibrate_to.as_ref().and_then(|path| {
        let r = calibrate::calibrate(path);
        let hw = r.as_ref().ok().cloned();
        check("cost-model calibration", r.map(|h| format!("wrote {} ({})", path.display(), h.name)));
        hw
    });
    for (layers, n) in [(24i64, 8192i64), (8, 32768)] {
        let name = format!("1.3B GPT, {layers} layers, N={n}, Ulysses P=1 on NCCL, fwd+bwd");
        let r = perf::gpt_stack(layers, n).and_then(|s| {
            let predicted = match &hw {
                Some(hw) => {
                    let p = calibrate::predicted_stack(hw, layers, n)?;
                    format!("; cost model {:.1} ms vs measured {:.1} ms", p * 1e3, s.seconds * 1e3)
                }
                None => String::new(),
            };
            Ok(format!("{}{predicted}", s.describe(peak_value)))
        });
        check(&name, r);
    }
    println!("\n{:<60} {:<5} result", "check", "");
    for (name, ok, text) in &rows {
        println!("{name:<60} {:<5} {text}", if *ok { "ok" } else { "FAIL" });
    }
    println!("({} on {:?}, {:.0} s)", env!("CARGO_PKG_NAME"), GPU, started.elapsed().as_secs_f64());
    if rows.iter().any(|(_, ok, _)| !ok) {
        std::process::exit(1);
    }
    Ok(())
}
