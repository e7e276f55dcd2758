//! The GPU check (cargo feature `nccl`), for a machine with one NVIDIA GPU, its driver and
//! Python's CUDA torch 2.11, but no Rust toolchain and no OpenMPI: build it here, carry it (one
//! binary, about 10 MB), run `scripts/gpu-check.sh` there, which runs each step below as its own
//! process under its own time cap and keeps every result in a file as it goes.
//!
//! `ulysses-gpu STEP [--calibrate FILE]` runs one step and ends with one line, `ok   STEP: ...`
//! or `FAIL STEP: ...` (exit 0 or 1); `ulysses-gpu --steps` lists the steps (no GPU needed);
//! `ulysses-gpu` alone runs every step in one process and prints a table. The steps:
//!
//! 1. `preflight`: the driver, a CUDA torch of the version this was built against, the GPU, and
//!    the NCCL found (where, which version, against the floor);
//! 2. `nccl-world`: NCCL at world size 1 on a fresh thread (no CUDA call before: the primary
//!    context must be bound by the backend itself): the world communicator, an `ncclCommSplit`
//!    into a subgroup and one without this rank, and 128 MiB sent by this rank to itself
//!    (`ncclSend`/`ncclRecv` on the communicator's side stream, completion by events) while a
//!    matmul runs on libtorch's stream: bit-exact, into contiguous and strided destinations;
//! 3. `nccl-latency`: microseconds per batch over 2,000 small batches on NCCL (the host's cost
//!    of envelope checks, enqueue and events; how `ncclGroupEnd`'s background launch is waited
//!    for);
//! 4. `watchdog`: a batch held back behind seconds of work on libtorch's stream, past a short
//!    timeout: the watchdog's `Error::Timeout` names the rank and the communicators are
//!    aborted; then a new communicator on the same GPU works;
//! 5. `ulysses-parity`: the local backend with 2 and 4 thread ranks on the GPU (NCCL refuses two
//!    ranks of one communicator on one device, so thread ranks share it through the local
//!    backend with CUDA tensors), and Ulysses attention in bf16 at P = 2 and 4 against f64;
//! 6. `ring-parity`: ring attention's blocks on the flash kernel at P = 2 and 4: parity and time
//!    against SDPA on the whole sequence and against ring's own f32 math path;
//! 7. `stack-8k`: the bf16 matmul peak, and the 1.3B GPT's 24-layer stack at 8K tokens with
//!    Ulysses at P=1 on NCCL: tokens/s, MFU, the CUDA allocator's peak beside the cost model's
//!    predicted peak and the activation formula (`stack-32k`, 8 layers at 32K, is not in the
//!    script's plan);
//! 8. `calibrate` (with `--calibrate FILE`): the GPU measured for the cost model into a hardware
//!    file (`calibrate.rs`), and the model's time for the 8K stack with it.

mod attention;
mod calibrate;
mod perf;

#[path = "../../../tests/common/mod.rs"]
mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use tch::{Device, Kind, Tensor};
use ulysses::comm::{launch, nccl_group, Collective, LocalLaunch, OpKind, ReduceOp};
use ulysses::device::cuda_memory;

const GPU: Device = Device::Cuda(0);

/// Every step, in the order the script runs them, with what it shows.
const STEPS: &[(&str, &str)] = &[
    ("preflight", "driver, CUDA torch, GPU, NCCL found (where, version, floor)"),
    ("nccl-world", "world and split communicators, 128 MiB send/recv on the side stream beside a matmul"),
    ("nccl-latency", "microseconds per batch, 2,000 small batches on NCCL"),
    ("watchdog", "a forced timeout names the rank; a new communicator then works"),
    ("ulysses-parity", "local backend and Ulysses bf16 at P = 2, 4 thread ranks on the GPU"),
    ("ring-parity", "ring attention's flash blocks at P = 2, 4 against SDPA"),
    ("stack-8k", "1.3B stack at 8K: tokens/s, MFU, CUDA peak beside the cost model"),
    ("calibrate", "this GPU measured into a hardware file (--calibrate FILE)"),
    ("stack-32k", "1.3B, 8 layers at 32K (not in the script's plan)"),
];

fn sync() {
    tch::Cuda::synchronize(0);
}

/// Median seconds of `f` over `runs` runs after one warm-up, synchronising the GPU.
fn time(runs: usize, f: impl FnMut() -> Result<()>) -> Result<f64> {
    ulysses::cost::calibrate::time_median(runs, &sync, f)
}

/// The driver, the CUDA torch this binary loaded (its version against the build's), the GPU,
/// and where NCCL was found.
fn preflight() -> Result<String> {
    let torch =
        ulysses::device::check_libtorch()?.context("cannot tell which libtorch this process loaded")?;
    ensure!(
        ulysses::device::load_cuda(),
        "torch {} at {} has no usable CUDA (libtorch_cuda.so not loaded, or no GPU visible)",
        torch.version,
        torch.dir.display()
    );
    let gpus = ulysses::device::cuda_device_count();
    let driver = ulysses::comm::driver_version()?;
    ulysses::comm::nccl_available()?;
    let nccl = ulysses::device::nccl_library()?;
    let pci = ulysses::comm::pci_bus_id(0)?;
    Ok(format!(
        "driver runs CUDA up to {}.{}; torch {} (CUDA {}) at {}; {gpus} GPU(s), cuda:0 at PCI {pci}; NCCL {} at {} \
         (found as: {}; floor {})",
        driver / 1000,
        driver % 1000 / 10,
        torch.version,
        torch.cuda.as_deref().unwrap_or("none"),
        torch.dir.display(),
        nccl.version_string(),
        nccl.path.display(),
        nccl.found_by,
        ulysses::device::nccl_version_string(ulysses::device::NCCL_FLOOR)
    ))
}

/// NCCL communicators at world size 1 (the world, a split, a split without this rank),
/// collectives through them, and a transfer to itself through the backend while a matmul runs.
/// On a fresh thread (LocalLaunch's), where nothing has bound a CUDA context yet.
fn nccl_world_of_one() -> Result<String> {
    let out = LocalLaunch::new(1).run(|ctx| -> Result<String> {
        let outside = || -> Result<f64> { Ok(cuda_memory(0)?.outside_allocator() as f64 / 1048576.0) };
        let before = outside()?;
        let g = nccl_group(ctx.world(), GPU, Duration::from_secs(60))?;
        let x = Tensor::randn([2, 8, 4, 16], (Kind::BFloat16, GPU));
        ensure!(g.all_to_all(&x, 2, 1)?.equal(&x), "all_to_all at P=1 is not the identity");
        ensure!(
            g.runs_natively(&Collective::AllReduce { buf: &x, reduce: ReduceOp::Sum }),
            "NCCL does not take a contiguous bf16 CUDA all-reduce as its own"
        );
        // NCCL's own collectives: ncclAllReduce, ncclReduceScatter, ncclAllGather (in place).
        ensure!(g.all_reduce(&x, ReduceOp::Sum)?.equal(&x), "all_reduce at P=1 is not the identity");
        ensure!(g.reduce_scatter(&x, 0, ReduceOp::Sum)?.equal(&x), "ncclReduceScatter at P=1 is not the identity");
        let flat = Tensor::zeros([4096], (Kind::Float, GPU));
        let mine = flat.narrow(0, 0, 4096);
        g.all_gather_into(&mine, &flat, 0, &[4096])?;
        ensure!(flat.equal(&mine), "ncclAllGather in place at P=1");
        let sub = g.split("sub", Some(0), 0)?.context("ncclCommSplit gave no subgroup")?;
        ensure!(sub.all_gather(&x, 1)?.equal(&x), "split communicator");
        ensure!(g.split("none", None, 0)?.is_none(), "a split without a color gave a group");
        // 128 MiB to itself through NCCL on the side stream, a matmul in flight meanwhile; and
        // the same through the split communicator (its own side stream) at once.
        let (backend, sub_backend) = (g.backend_handle(), sub.backend_handle());
        let big = Tensor::randn([64, 1024, 1024], (Kind::BFloat16, GPU));
        let (got, got_sub) = (big.zeros_like(), big.zeros_like());
        let a = Tensor::randn([8192, 8192], (Kind::BFloat16, GPU));
        sync();
        let t0 = Instant::now();
        let pending = backend.exchange_start(
            g.info(),
            OpKind::Shift,
            vec![Some(big.shallow_clone())],
            vec![Some(got.shallow_clone())],
        )?;
        let pending_sub = sub_backend.exchange_start(
            sub.info(),
            OpKind::Shift,
            vec![Some(big.shallow_clone())],
            vec![Some(got_sub.shallow_clone())],
        )?;
        let _busy = a.matmul(&a);
        pending.wait()?;
        pending_sub.wait()?;
        g.synchronize()?;
        sync();
        let took = t0.elapsed().as_secs_f64() * 1e3;
        ensure!(got.equal(&big), "NCCL self transfer: the data differs");
        ensure!(got_sub.equal(&big), "NCCL self transfer on the split communicator: the data differs");
        // A strided destination ([1024, 64, 1024] seen as [64, 1024, 1024]).
        let strided = Tensor::zeros([1024, 64, 1024], (Kind::BFloat16, GPU)).transpose(0, 1);
        backend.exchange(
            g.info(),
            OpKind::Shift,
            vec![Some(big.shallow_clone())],
            vec![Some(strided.shallow_clone())],
        )?;
        ensure!(strided.equal(&big), "NCCL self transfer into a strided tensor: the data differs");
        let nccl_mib = outside()? - before;
        Ok(format!(
            "world and ncclCommSplit communicators on a fresh thread, backend {}; 2 x 128 MiB to itself \
             bit-exact on two side streams with an 8192^3 matmul in flight in {took:.2} ms; strided destination \
             bit-exact; GPU memory outside the caching allocator grew {nccl_mib:.0} MiB with the two \
             communicators and their use (NCCL's buffers, the kernels loaded meanwhile)",
            g.backend_name()
        ))
    })?;
    Ok(out[0].clone())
}

/// Microseconds per batch over 2,000 small batches (512 bytes to itself) on NCCL: the host's
/// time per call, and the time until the GPU finished them.
fn nccl_latency() -> Result<String> {
    const CALLS: u32 = 2000;
    let out = LocalLaunch::new(1).run(|ctx| -> Result<String> {
        let g = nccl_group(ctx.world(), GPU, Duration::from_secs(60))?;
        let backend = g.backend_handle();
        let x = Tensor::randn([256], (Kind::BFloat16, GPU));
        let y = x.zeros_like();
        let call = || {
            backend.exchange(g.info(), OpKind::Shift, vec![Some(x.shallow_clone())], vec![Some(y.shallow_clone())])
        };
        for _ in 0..200 {
            call()?;
        }
        g.synchronize()?;
        sync();
        let t0 = Instant::now();
        for _ in 0..CALLS {
            call()?;
        }
        let host = t0.elapsed().as_secs_f64() * 1e6 / f64::from(CALLS);
        g.synchronize()?;
        sync();
        let total = t0.elapsed().as_secs_f64() * 1e6 / f64::from(CALLS);
        ensure!(y.equal(&x), "the last small transfer's data differs");
        ensure!(host < 1000.0, "{host:.1} µs of host time per batch: something sleeps on the data path");
        // The same count of small all-reduces (256 f32) through ncclAllReduce.
        let v = Tensor::randn([256], (Kind::Float, GPU));
        for _ in 0..200 {
            let _ = g.all_reduce(&v, ReduceOp::Sum)?;
        }
        g.synchronize()?;
        sync();
        let t1 = Instant::now();
        for _ in 0..CALLS {
            let _ = g.all_reduce(&v, ReduceOp::Sum)?;
        }
        let reduce_host = t1.elapsed().as_secs_f64() * 1e6 / f64::from(CALLS);
        g.synchronize()?;
        sync();
        let nccl = ulysses::device::nccl_library()?;
        Ok(format!(
            "{CALLS} batches of 512 B: {host:.1} µs per batch on the host, {total:.1} µs per batch until the GPU \
             finished; {CALLS} ncclAllReduce of 1 KiB: {reduce_host:.1} µs each on the host (NCCL {})",
            nccl.version_string()
        ))
    })?;
    Ok(out[0].clone())
}

/// A batch that cannot complete within a short timeout (its side stream waits for seconds of
/// matmuls queued on libtorch's stream): the watchdog's error names the rank; then a new
/// communicator on the same GPU moves data bit-exact.
fn watchdog_timeout() -> Result<String> {
    let out = LocalLaunch::new(1).run(|ctx| -> Result<String> {
        let timeout = Duration::from_millis(1500);
        let g = nccl_group(ctx.world(), GPU, timeout)?;
        let backend = g.backend_handle();
        let x = Tensor::randn([1 << 19], (Kind::BFloat16, GPU));
        let y = x.zeros_like();
        let a = Tensor::randn([16384, 16384], (Kind::BFloat16, GPU));
        let one = time(2, || {
            let _ = a.matmul(&a);
            Ok(())
        })?;
        let n = ((4.0 / one).ceil() as usize).clamp(1, 800); // about 4 s of work
        for _ in 0..n {
            let _ = a.matmul(&a);
        }
        let t0 = Instant::now();
        let pending =
            backend.exchange_start(g.info(), OpKind::Shift, vec![Some(x.shallow_clone())], vec![Some(y.shallow_clone())])?;
        let waited = pending.wait().and_then(|()| g.synchronize());
        let after = t0.elapsed();
        let err = match waited {
            Ok(()) => bail!("a batch behind {n} matmuls ({:.1} s) completed within {timeout:?}", n as f64 * one),
            Err(e) => e.to_string(),
        };
        ensure!(err.contains("rank 0") && err.contains("timed out"), "the timeout does not name the rank: {err}");
        let again = backend
            .exchange(g.info(), OpKind::Shift, vec![Some(x.shallow_clone())], vec![Some(y.shallow_clone())])
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        ensure!(again.contains("rank 0"), "a batch after the timeout did not fail with it: {again:?}");
        drop(g);
        sync();
        let fresh = nccl_group(ctx.world(), GPU, Duration::from_secs(60))?;
        let z = x.zeros_like();
        fresh.backend_handle().exchange(
            fresh.info(),
            OpKind::Shift,
            vec![Some(x.shallow_clone())],
            vec![Some(z.shallow_clone())],
        )?;
        fresh.synchronize()?;
        ensure!(z.equal(&x), "the new communicator's transfer differs");
        Ok(format!(
            "after {:.2} s: \"{err}\"; later batches fail with it; a new communicator then moved 1 MiB bit-exact",
            after.as_secs_f64()
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
    Ok(format!("P={p}: all_to_all and all_reduce exact (f32, bf16)"))
}

fn ulysses_parity() -> Result<String> {
    let mut parts = Vec::new();
    for p in [2, 4] {
        parts.push(local_on_gpu(p).with_context(|| format!("local backend, {p} ranks on the GPU"))?);
    }
    for p in [2, 4] {
        parts.push(format!(
            "P={p}: {}",
            attention::ulysses_bf16(p).with_context(|| format!("Ulysses P={p}"))?
        ));
    }
    Ok(parts.join("; "))
}

fn ring_parity() -> Result<String> {
    let mut parts = Vec::new();
    for p in [2, 4] {
        parts.push(attention::ring_flash(p, 8192).with_context(|| format!("ring P={p}"))?);
    }
    Ok(parts.join("; "))
}

/// The matmul peak and one layer stack, with the cost model's time and memory (the h200 preset,
/// or the calibrated file when given and already written).
fn stack(layers: i64, n: i64, calibrated: Option<&PathBuf>) -> Result<String> {
    let peak = perf::matmul_peak()?;
    let (hw, source) = match calibrated.filter(|p| p.exists()) {
        Some(path) => {
            (ulysses::cost::Hardware::load(&path.display().to_string())?, path.display().to_string())
        }
        None => (ulysses::cost::Hardware::load("h200")?, "the h200 preset".to_string()),
    };
    let s = perf::gpt_stack(layers, n)?;
    let model = calibrate::predicted_stack(&hw, layers, n)?;
    Ok(format!(
        "bf16 matmul 8192^3 {peak:.1} TFLOP/s; {layers} layers, N={n}: {}; cost model ({source}): {:.1} ms vs measured \
         {:.1} ms, peak {:.0} MiB vs CUDA peak allocated {:.0} MiB (measured/predicted {:.2})",
        s.describe(Some(peak)),
        model.seconds * 1e3,
        s.seconds * 1e3,
        model.peak_mib,
        s.peak_mib,
        s.peak_mib / model.peak_mib
    ))
}

fn calibrate_step(path: Option<&PathBuf>) -> Result<String> {
    let path = path.context("the calibrate step needs --calibrate FILE")?;
    let hw = calibrate::calibrate(path)?;
    let model = calibrate::predicted_stack(&hw, 24, 8192)?;
    Ok(format!(
        "wrote {} ({}); the cost model with it: 1.3B 24 layers at 8K {:.1} ms per forward + backward (stack-8k \
         measured it)",
        path.display(),
        hw.name,
        model.seconds * 1e3
    ))
}

/// Runs one step by name.
fn run_step(name: &str, calibrated: Option<&PathBuf>) -> Result<String> {
    match name {
        "preflight" => preflight(),
        "nccl-world" => nccl_world_of_one(),
        "nccl-latency" => nccl_latency(),
        "watchdog" => watchdog_timeout(),
        "ulysses-parity" => ulysses_parity(),
        "ring-parity" => ring_parity(),
        "stack-8k" => stack(24, 8192, calibrated),
        "stack-32k" => stack(8, 32768, calibrated),
        "calibrate" => calibrate_step(calibrated),
        other => bail!(
            "no step {other:?}; the steps: {}",
            STEPS.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", ")
        ),
    }
}

/// Prints the step's one result line; whether it passed.
fn report(name: &str, r: Result<String>, started: Instant) -> bool {
    let secs = started.elapsed().as_secs_f64();
    match r {
        Ok(text) => {
            println!("ok   {name} ({secs:.1} s): {text}");
            true
        }
        Err(e) => {
            println!("FAIL {name} ({secs:.1} s): {}", format!("{e:#}").replace('\n', " "));
            false
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--steps") {
        for (name, what) in STEPS {
            println!("{name}\t{what}");
        }
        return;
    }
    let calibrated =
        args.iter().position(|a| a == "--calibrate").and_then(|i| args.get(i + 1)).map(PathBuf::from);
    let step = args.first().filter(|a| !a.starts_with("--")).cloned();
    if !ulysses::device::load_cuda() {
        println!(
            "FAIL {}: no CUDA device is usable (is the lib folder of a CUDA torch on LD_LIBRARY_PATH?)",
            step.as_deref().unwrap_or("ulysses-gpu")
        );
        std::process::exit(1);
    }
    if let Some(name) = step {
        let ok = report(&name, run_step(&name, calibrated.as_ref()), Instant::now());
        std::process::exit(if ok { 0 } else { 1 });
    }
    // Every step in this process, then a table.
    let started = Instant::now();
    let mut rows = Vec::new();
    for (name, _) in STEPS.iter().filter(|(n, _)| *n != "stack-32k") {
        if *name == "calibrate" && calibrated.is_none() {
            continue;
        }
        let t0 = Instant::now();
        let ok = report(name, run_step(name, calibrated.as_ref()), t0);
        rows.push((*name, ok, t0.elapsed().as_secs_f64()));
    }
    println!("\n{:<16} {:<5} seconds", "step", "");
    for (name, ok, secs) in &rows {
        println!("{name:<16} {:<5} {secs:.1}", if *ok { "ok" } else { "FAIL" });
    }
    println!("({} on {GPU:?}, {:.0} s)", env!("CARGO_PKG_NAME"), started.elapsed().as_secs_f64());
    if rows.iter().any(|(_, ok, _)| !ok) {
        std::process::exit(1);
    }
}
