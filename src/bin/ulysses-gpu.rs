//! The GPU check (cargo feature `nccl`), for a machine with one NVIDIA GPU, CUDA and PyTorch but
//! no Rust toolchain: build it here, carry it, run `scripts/gpu-check.sh` there. In one go:
//!
//! 1. NCCL at world size 1 (communicators for the world and a split), and the local backend with
//!    2 and 4 ranks as threads sharing the GPU: collectives against CPU-computed expectations;
//! 2. Ulysses attention in bf16 on CUDA, 2 and 4 ranks, against f64 attention on the CPU;
//! 3. the bf16 matmul peak (8192^3), and a forward + backward of the 1.3B GPT's layer stack at
//!    8K and 32K tokens with SDPA (flash): tokens/s, model TFLOP/s and MFU against that peak;
//! 4. one summary table. Exits non-zero if a check fails.
//!
//! With `--calibrate FILE` it also measures the GPU for the cost model (bf16 GEMMs of the 1.3B
//! model's shapes and squares, flash attention forward + backward at head sizes 64 and 128 from
//! 1K to 32K tokens, HBM bandwidth), writes a hardware file (the h200 preset's datasheet peaks and
//! links, the measured efficiencies, its provenance), and prints the cost model's prediction of
//! each measured layer stack beside the measurement.

#[path = "../../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use anyhow::{ensure, Result};
use tch::{Device, Kind, Tensor};
use ulysses::attention::{AttentionConfig, Kernel, Mask, SequenceParallel, SingleDevice, UlyssesAttention};
use ulysses::autograd::Tape;
use ulysses::comm::{launch, nccl_group, LocalLaunch, ReduceOp};
use ulysses::model::{shift_labels, Gpt, GptConfig};

const GPU: Device = Device::Cuda(0);

fn sync() {
    tch::Cuda::synchronize(0);
}

/// NCCL communicators at world size 1 (the world and a split), collectives through them.
fn nccl_world_of_one() -> Result<String> {
    let out = LocalLaunch::new(1).run(|ctx| -> Result<String> {
        let g = nccl_group(ctx.world(), GPU, Duration::from_secs(60))?;
        let x = Tensor::randn([2, 8, 4, 16], (Kind::BFloat16, GPU));
        ensure!(g.all_to_all(&x, 2, 1)?.equal(&x), "all_to_all at P=1 is not the identity");
        ensure!(g.all_reduce(&x, ReduceOp::Sum)?.equal(&x), "all_reduce at P=1 is not the identity");
        let sub = g.split("sub", Some(0), 0)?.ok_or_else(|| anyhow::anyhow!("no subgroup"))?;
        ensure!(sub.all_gather(&x, 1)?.equal(&x), "split communicator");
        Ok(format!("world and split communicators made, backend {}", g.backend_name()))
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

/// Ulysses on P thread ranks on the GPU in bf16 against f64 attention on the CPU.
fn ulysses_bf16(p: usize) -> Result<String> {
    let (b, n, h, hkv, d) = (2i64, 512i64, 8i64, 2i64, 64i64);
    let inputs = || {
        (
            common::det(&[b, n, h, d], 1, Kind::BFloat16),
            common::det(&[b, n, hkv, d], 2, Kind::BFloat16),
            common::det(&[b, n, hkv, d], 3, Kind::BFloat16),
            common::det(&[b, n, h, d], 4, Kind::BFloat16),
        )
    };
    let (q, k, v, w) = inputs();
    // The reference, f64 on the CPU.
    let want = common::reference_attention(&common::causal(n), &q, &k, &v, &w);
    let per_rank = launch(p, |ctx| -> Result<[Tensor; 4]> {
        let r = ctx.rank();
        let (q, k, v, w) = inputs();
        let attn = UlyssesAttention::new(
            ctx.world().clone(),
            AttentionConfig::new(Kernel::Sdpa, Mask::Causal).build()?,
            n,
            h,
            hkv,
        )?;
        let layout = attn.layout().clone();
        let mine =
            |t: &Tensor| -> Result<Tensor> { Ok(layout.shard(t, 1, r)?.to(GPU).set_requires_grad(true)) };
        let (qs, ks, vs) = (mine(&q)?, mine(&k)?, mine(&v)?);
        let tape = Tape::new();
        let o = attn.forward(&tape, &qs, &ks, &vs)?;
        tape.backward(
            &(o.to_kind(Kind::Float) * layout.shard(&w, 1, r)?.to(GPU).to_kind(Kind::Float)).sum(Kind::Float),
        )?;
        Ok([
            o.detach().to(Device::Cpu),
            qs.grad().to(Device::Cpu),
            ks.grad().to(Device::Cpu),
            vs.grad().to(Device::Cpu),
        ])
    })?;
    let mut worst = 0.0f64;
    for (i, full) in want.iter().enumerate() {
        let got = Tensor::cat(&per_rank.iter().map(|t| t[i].shallow_clone()).collect::<Vec<_>>(), 1);
        let rel = common::max_diff(&got, full) / full.abs().max().double_value(&[]).max(1e-6);
        worst = worst.max(rel);
    }
    ensure!(worst < 2e-2, "P={p}: max relative difference {worst:.3e} > 2e-2");
    Ok(format!("out, dq, dk, dv within {worst:.2e} (relative) of f64, causal, GQA 8/2, N={n}"))
}

/// Median seconds of `f` over `runs` runs after one warm-up, synchronising the GPU.
fn time(runs: usize, f: impl FnMut() -> Result<()>) -> Result<f64> {
    ulysses::cost::calibrate::time_median(runs, &sync, f)
}

/// bf16 matmul TFLOP/s at 8192^3: the peak MFU is measured against.
fn matmul_peak() -> Result<f64> {
    let n = 8192i64;
    let (a, b) = (Tensor::randn([n, n], (Kind::BFloat16, GPU)), Tensor::randn([n, n], (Kind::BFloat16, GPU)));
    let s = time(20, || {
        let _ = a.matmul(&b);
        Ok(())
    })?;
    Ok(2.0 * (n * n * n) as f64 / s / 1e12)
}

/// Forward + backward of the 1.3B GPT with `layers` layers at `n` tokens, bf16, SDPA (flash):
/// (tokens/s, model TFLOP/s) with the FLOPs of `GptConfig::train_flops`.
fn gpt_stack(layers: i64, n: i64) -> Result<(f64, f64)> {
    let cfg = GptConfig { n_layer: layers, ..GptConfig::gpt_1_3b() };
    let attn = AttentionConfig::new(Kernel::Sdpa, Mask::Causal);
    let model = Gpt::new(
        &cfg,
        Box::new(SingleDevice::new(attn.build()?, n, cfg.n_head, cfg.n_kv_head)?),
        Kind::BFloat16,
        GPU,
    )?;
    let tokens = Tensor::randint(cfg.vocab_size, [1, n], (Kind::Int64, GPU));
    let labels = shift_labels(&tokens)?;
    let s = time(3, || {
        model.zero_grad();
        model.forward_backward(&tokens, &labels)?;
        Ok(())
    })?;
    Ok((n as f64 / s, cfg.train_flops(n, n, &Mask::Causal) / s / 1e12))
}

/// Measures this GPU into a hardware file (see the module doc) and returns it.
fn calibrate(out: &std::path::Path) -> Result<ulysses::cost::Hardware> {
    use ulysses::cost::calibrate::{curve, measure_attention, measure_bandwidth, measure_matmul};
    use ulysses::cost::hardware::AttentionCurve;
    let synced = || sync();
    let mut hw = ulysses::cost::Hardware::load("h200")?;
    let devices = tch::Cuda::device_count();
    let peak = hw.peak_flops(ulysses::train::Precision::Bf16)?;
    let mut shapes = vec![(1024, 1024, 1024), (2048, 2048, 2048), (4096, 4096, 4096), (8192, 8192, 8192)];
    for m in [2048, 8192, 32768] {
        for (k, n) in [(2048, 6144), (2048, 2048), (2048, 8192), (8192, 2048), (2048, 50304)] {
            shapes.push((m, k, n));
        }
    }
    let gemms = measure_matmul(GPU, Kind::BFloat16, &shapes, 10, &synced)?;
    hw.efficiency.matmul = curve(&gemms, peak);
    hw.efficiency.attention.clear();
    for causal in [true, false] {
        for (d, heads) in [(64, 32), (128, 16)] {
            let seqs = [1024, 2048, 4096, 8192, 16384, 32768];
            let samples = measure_attention(GPU, Kind::BFloat16, (heads, d), causal, &seqs, 5, &synced)?;
            hw.efficiency.attention.push(AttentionCurve {
                head_dim: d,
                causal,
                points: curve(&samples, peak),
            });
        }
    }
    let bw = measure_bandwidth(GPU, Kind::BFloat16, 1 << 30, 10, &synced)?;
    hw.efficiency.memory_bound = (bw / (hw.device.memory_bandwidth_gbs * 1e9)).min(1.0);
    hw.name = "h200-measured".into();
    hw.description =
        "One H200 measured by ulysses-gpu --calibrate (datasheet peaks and links from h200.toml)".into();
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    hw.provenance = Some(
        [
            ("unix_time", secs.to_string()),
            ("command", std::env::args().collect::<Vec<_>>().join(" ")),
            ("cuda_devices", devices.to_string()),
            ("measured", "matmul, attention and memory_bound efficiencies; the rest is h200.toml".into()),
            ("libtorch", "2.11.0".into()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect(),
    );
    let text = ulysses::cost::Hardware::parse(&hw.to_toml()?, "calibration")?.to_toml()?;
    std::fs::write(
        out,
        format!("# Written by ulysses-gpu --calibrate: efficiencies measured on this GPU.\n{text}"),
    )?;
    Ok(hw)
}

/// The cost model's step time for one forward + backward of the 1.3B layer stack measured by
/// [`gpt_stack`] (one device, bf16, flash attention, no checkpointing, no optimizer).
fn predicted_stack(hw: &ulysses::cost::Hardware, layers: i64, n: i64) -> Result<f64> {
    use ulysses::cost::{predict, Job};
    use ulysses::train::{Checkpointing, ZeroStage};
    let cfg = GptConfig { n_layer: layers, ..GptConfig::gpt_1_3b() };
    let job = Job {
        attention: AttentionConfig::new(Kernel::Sdpa, Mask::Causal),
        checkpointing: Checkpointing::None,
        zero: ZeroStage::NONE,
        optimizer: false,
        ..Job::new(cfg, ulysses::attention::StrategyConfig::Single, 1, n)
    };
    Ok(predict(&job, hw)?.step_s)
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
        check(&format!("ulysses bf16 parity, P={p}"), ulysses_bf16(p));
    }
    let peak = matmul_peak();
    let peak_value = peak.as_ref().ok().copied();
    check("bf16 matmul 8192^3", peak.map(|t| format!("{t:.1} TFLOP/s (the peak below)")));
    let hw = match &calibrate_to {
        Some(path) => {
            let r = calibrate(path);
            let hw = r.as_ref().ok().cloned();
            check("cost-model calibration", r.map(|h| format!("wrote {} ({})", path.display(), h.name)));
            hw
        }
        None => None,
    };
    for (layers, n) in [(24i64, 8192i64), (8, 32768)] {
        let name = format!("1.3B GPT, {layers} layers, N={n}, fwd+bwd");
        let r = gpt_stack(layers, n).and_then(|(tps, tf)| {
            let mfu = peak_value.map_or(String::from("n/a"), |p| format!("{:.1}%", 100.0 * tf / p));
            let predicted = match &hw {
                Some(hw) => {
                    let s = predicted_stack(hw, layers, n)?;
                    format!(", cost model {:.1} ms vs measured {:.1} ms", s * 1e3, n as f64 / tps * 1e3)
                }
                None => String::new(),
            };
            Ok(format!("{tps:.0} tokens/s, {tf:.1} model TFLOP/s, MFU {mfu}{predicted}"))
        });
        check(&name, r);
    }
    println!("\n{:<44} {:<5} result", "check", "");
    for (name, ok, text) in &rows {
        println!("{name:<44} {:<5} {text}", if *ok { "ok" } else { "FAIL" });
    }
    println!("({} on {:?}, {:.0} s)", env!("CARGO_PKG_NAME"), GPU, started.elapsed().as_secs_f64());
    if rows.iter().any(|(_, ok, _)| !ok) {
        std::process::exit(1);
    }
    Ok(())
}
