//! Calibrating the host: the memory-bound op kinds of [`super::work::passes`] timed at the
//! models' sizes, and the allocator on a reference training step (the libraries' first-step
//! workspace, resident over live bytes at the peak). Part of `ulysses calibrate`.

use tch::{Device, Kind, Tensor};

use super::calibrate::time_median;
use crate::error::TorchResultExt;
use crate::{Error, Result};

/// Bytes the allocator holds for live allocations (glibc: in-use arena bytes plus mmapped
/// chunks), the host's counterpart of a device allocator's allocated bytes.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub fn live_bytes() -> f64 {
    // SAFETY: mallinfo2 takes no pointer and only reads glibc's own counters.
    let m = unsafe { libc::mallinfo2() };
    (m.uordblks + m.hblkhd) as f64
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn live_bytes() -> f64 {
    f64::NAN
}

fn status_bytes(field: &str) -> Option<f64> {
    let text = std::fs::read_to_string("/proc/self/status").ok()?;
    let kib: f64 = text.lines().find(|l| l.starts_with(field))?.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024.0)
}

/// A reference training step's parts: the GPT of `cfg` on one device in f32, `n` tokens of one
/// sequence, and their labels.
fn reference_step(cfg: crate::model::GptConfig, n: i64) -> Result<(crate::model::Gpt, Tensor, Tensor)> {
    reference_step_on(cfg, n, Device::Cpu, Kind::Float)
}

/// [`reference_step`] on `device` in `kind`.
fn reference_step_on(
    cfg: crate::model::GptConfig,
    n: i64,
    device: Device,
    kind: Kind,
) -> Result<(crate::model::Gpt, Tensor, Tensor)> {
    use crate::attention::{AttentionConfig, SingleDevice};
    use crate::model::{shift_labels, Gpt};

    let attention = AttentionConfig::default();
    let model = Gpt::new(
        &cfg,
        Box::new(SingleDevice::new(attention.build()?, n, cfg.n_head, cfg.n_kv_head)?),
        kind,
        device,
    )?;
    let tokens = Tensor::f_arange(n, (Kind::Int64, device))
        .and_then(|t| t.f_remainder(cfg.vocab_size))
        .and_then(|t| t.f_reshape([1, n]))
        .op("calibrate")?;
    let labels = shift_labels(&tokens)?;
    Ok((model, tokens, labels))
}

/// The peak of [`live_bytes`] while it runs: a thread samples the allocator's counters every
/// `interval` (a kernel's brief scratch between two samples is missed; tensors that live for a
/// layer are not). The host's counterpart of a device allocator's peak of allocated bytes.
pub struct LivePeak {
    peak: std::sync::Arc<std::sync::atomic::AtomicU64>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    sampler: Option<std::thread::JoinHandle<()>>,
}

impl LivePeak {
    /// Starts sampling.
    pub fn start(interval: std::time::Duration) -> LivePeak {
        use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
        use std::sync::Arc;
        let (peak, stop) = (Arc::new(AtomicU64::new(live_bytes() as u64)), Arc::new(AtomicBool::new(false)));
        let sampler = {
            let (peak, stop) = (Arc::clone(&peak), Arc::clone(&stop));
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    peak.fetch_max(live_bytes() as u64, Ordering::Relaxed);
                    std::thread::sleep(interval);
                }
            })
        };
        LivePeak { peak, stop, sampler: Some(sampler) }
    }

    /// Forgets the peak so far: the next reading counts from the bytes live now.
    pub fn reset(&self) {
        self.peak.store(live_bytes() as u64, std::sync::atomic::Ordering::Relaxed);
    }

    /// The peak so far, in bytes (one last sample included).
    pub fn read(&self) -> f64 {
        use std::sync::atomic::Ordering;
        self.peak.fetch_max(live_bytes() as u64, Ordering::Relaxed);
        self.peak.load(Ordering::Relaxed) as f64
    }
}

impl Drop for LivePeak {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.sampler.take() {
            let _ = t.join();
        }
    }
}

/// The host allocator on a reference training step, one thread: a 2-layer GPT (h = 64, the tiny
/// preset) on one device, `n` tokens, f32, measured as a run measures a point's memory
/// ([`crate::experiment`]'s host RSS): the heap trimmed and the resident peak reset once the
/// model is built, then a first step and `steps - 1` later ones. Returns (workspace bytes the
/// first step allocates and keeps beyond the gradients, resident peak / live peak over the
/// steps, both above the built model). The live peak is sampled every 20 us by a second thread.
pub fn measure_step_memory(n: i64, steps: usize) -> Result<(f64, f64)> {
    use crate::model::GptConfig;

    let (model, tokens, labels) = reference_step(GptConfig::tiny(), n)?;
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim takes no pointer and only walks glibc's own arenas.
    unsafe {
        libc::malloc_trim(0);
    }
    let reset = std::fs::write("/proc/self/clear_refs", "5").is_ok();
    let peak = LivePeak::start(std::time::Duration::from_micros(20));
    let (live0, rss0) = (live_bytes(), status_bytes("VmRSS:").unwrap_or(f64::NAN));
    let mut workspace = 0.0;
    for step in 0..steps.max(1) {
        model.zero_grad();
        model.forward_backward(&tokens, &labels)?;
        if step == 0 {
            let grads = (model.params().numel() * 4) as f64;
            workspace = (live_bytes() - live0 - grads).max(0.0);
        }
    }
    let rss_peak = status_bytes("VmHWM:").unwrap_or(f64::NAN);
    let live_peak = peak.read() - live0;
    drop(peak);
    let slack = (rss_peak - rss0) / live_peak;
    if !(reset && slack.is_finite() && live_peak > 0.0) {
        return Err(Error::InvalidArgument {
            op: "calibrate",
            group: "memory".into(),
            msg: format!("cannot read the allocator's peaks here (live peak {live_peak} B, slack {slack}); needs Linux with glibc"),
        });
    }
    Ok((workspace, slack.max(1.0)))
}

/// The library code a fresh process pages in over its first training step, in bytes: the growth
/// of the process's file-backed resident pages (`RssFile`: libtorch's, MKL's and oneDNN's kernels
/// are mapped from their shared objects and become resident as they first run) across the first
/// step of the reference GPT (the tiny preset, one device, `n` tokens, f32), measured after the
/// model is built, as a run measures its step's memory. A host's RSS counts these pages, once
/// per process; only a process that has not stepped before pays them. Call it first thing in a
/// process of its own (`ulysses calibrate` starts one).
pub fn measure_first_step_pages(n: i64) -> Result<f64> {
    use crate::model::GptConfig;

    let (model, tokens, labels) = reference_step(GptConfig::tiny(), n)?;
    let unreadable = || Error::InvalidArgument {
        op: "calibrate",
        group: "memory".into(),
        msg: "cannot read RssFile from /proc/self/status; needs Linux 4.5 or later".into(),
    };
    let before = status_bytes("RssFile:").ok_or_else(unreadable)?;
    model.forward_backward(&tokens, &labels)?;
    let after = status_bytes("RssFile:").ok_or_else(unreadable)?;
    Ok((after - before).max(0.0))
}

/// The framework's time per transformer layer per forward + backward at negligible size, one
/// thread: the tiny GPT (h = 64) on one device over 8 tokens, with 2 and with 6 layers, timed
/// in turn (a step of each per run, after a warm-up step of each, so that a burst of load from
/// elsewhere slows both of a pair), the median over `runs` pairs of the difference per layer, in
/// seconds. What it measures is dispatch (libtorch's dispatcher, autograd's graph), not
/// arithmetic: a layer at 8 tokens is some 0.2 MFLOP forward and backward.
pub fn measure_layer_overhead(runs: usize) -> Result<f64> {
    measure_layer_overhead_on(Device::Cpu, Kind::Float, &|| {}, runs)
}

/// [`measure_layer_overhead`] on `device` in `kind`, `sync` after each step (a CUDA device:
/// the step's kernels at 8 tokens take microseconds, so what the host needs to launch them is
/// what the time per layer measures).
pub fn measure_layer_overhead_on(device: Device, kind: Kind, sync: &dyn Fn(), runs: usize) -> Result<f64> {
    use crate::model::GptConfig;

    let n = 8;
    let build =
        |layers: i64| reference_step_on(GptConfig { n_layer: layers, ..GptConfig::tiny() }, n, device, kind);
    let (two, six) = (build(2)?, build(6)?);
    let step = |(model, tokens, labels): &(crate::model::Gpt, Tensor, Tensor)| -> Result<f64> {
        model.zero_grad();
        sync();
        let t = std::time::Instant::now();
        model.forward_backward(tokens, labels)?;
        sync();
        Ok(t.elapsed().as_secs_f64())
    };
    step(&two)?;
    step(&six)?;
    let mut per_layer = Vec::with_capacity(runs);
    let mut last = (0.0, 0.0);
    for _ in 0..runs.max(1) {
        last = (step(&two)?, step(&six)?);
        per_layer.push((last.1 - last.0) / 4.0);
    }
    per_layer.sort_by(f64::total_cmp);
    let median = per_layer[per_layer.len() / 2];
    if !(median.is_finite() && median > 0.0) {
        return Err(Error::InvalidArgument {
            op: "calibrate",
            group: "layer overhead".into(),
            msg: format!(
                "the median over {} pairs of steps of 6 layers less 2, per layer, is {median} s (the last \
                 pair: 6 layers {} s, 2 layers {} s): no time per layer to measure",
                per_layer.len(),
                last.1,
                last.0
            ),
        });
    }
    Ok(median)
}

/// Shapes the memory-bound ops are timed at: the toy models' (h = 128, 8 heads of 16, a byte
/// vocabulary) over `tokens` tokens, f32.
#[derive(Debug, Clone, Copy)]
pub struct OpShapes {
    pub tokens: i64,
    pub h: i64,
    pub heads: i64,
    pub vocab: i64,
}

/// Each memory-bound op kind of [`super::work::passes`] timed forward and backward (libtorch's
/// own ops, as the model calls them), turned into a fraction of `bandwidth` (bytes/s) with the
/// cost model's pass counts: `passes x elements x 4 B / seconds / bandwidth`, capped at 1.
pub fn measure_memory_bound_ops(
    shapes: OpShapes,
    bandwidth: f64,
    runs: usize,
) -> Result<std::collections::BTreeMap<String, f64>> {
    use super::work::passes;
    let OpShapes { tokens: t, h, heads, vocab } = shapes;
    let d = h / heads;
    let o = (Kind::Float, Device::Cpu);
    let leaf = |shape: &[i64]| Tensor::f_randn(shape, o).map(|x| x.set_requires_grad(true)).op("calibrate");
    let backward = |y: Tensor| y.f_sum(Kind::Float).and_then(|s| s.f_backward()).op("calibrate");
    let no_sync = || {};
    let mut out = std::collections::BTreeMap::new();
    let mut put = |op: &str, elements: f64, passes: f64, seconds: f64| {
        out.insert(op.to_string(), (passes * elements * 4.0 / seconds / bandwidth).min(1.0));
    };
    let (x, w, b) = (leaf(&[1, t, h])?, leaf(&[h])?, leaf(&[h])?);
    let s = time_median(runs, &no_sync, || {
        backward(x.f_layer_norm([h], Some(&w), Some(&b), 1e-5, true).op("calibrate")?)
    })?;
    put("layer_norm", (t * h) as f64, passes::LAYER_NORM, s);
    let rope = crate::model::Rope::new(
        &Tensor::f_arange(t, (Kind::Int64, Device::Cpu)).op("calibrate")?,
        d,
        1e4,
        Kind::Float,
    )?;
    let q = leaf(&[1, t, heads, d])?;
    let s = time_median(runs, &no_sync, || backward(rope.forward(&q)?))?;
    put("rope", (t * h) as f64, passes::ROPE, s);
    let y = leaf(&[1, t, h])?;
    let s = time_median(runs, &no_sync, || backward(x.f_add(&y).op("calibrate")?))?;
    put("add", (t * h) as f64, passes::ADD, s);
    let m = leaf(&[1, t, 4 * h])?;
    let s = time_median(runs, &no_sync, || backward(m.f_gelu("tanh").op("calibrate")?))?;
    put("gelu", (t * 4 * h) as f64, passes::GELU, s);
    let logits = leaf(&[t, vocab])?;
    let labels = Tensor::f_randint(vocab, [t], (Kind::Int64, Device::Cpu)).op("calibrate")?;
    let s = time_median(runs, &no_sync, || {
        let l = logits
            .f_cross_entropy_loss::<Tensor>(&labels, None, tch::Reduction::Sum, -100, 0.0)
            .op("calibrate")?;
        l.f_backward().op("calibrate")
    })?;
    put("cross_entropy", (t * vocab) as f64, passes::CROSS_ENTROPY, s);
    // One ring step's elementwise work on [1, heads, t, d] (f32): the log-sum-exp merge of two
    // partial outputs, then a dK/dV accumulator brought up to date.
    let (oa, ob) = (
        Tensor::f_randn([1, heads, t, d], o).op("calibrate")?,
        Tensor::f_randn([1, heads, t, d], o).op("calibrate")?,
    );
    let (la, lb) = (
        Tensor::f_randn([1, heads, t], o).op("calibrate")?,
        Tensor::f_randn([1, heads, t], o).op("calibrate")?,
    );
    let part = Tensor::f_randn([1, heads, t, d], o).op("calibrate")?;
    let s = time_median(runs, &no_sync, || {
        let f = || -> std::result::Result<(), tch::TchError> {
            let mx = la.f_maximum(&lb)?;
            let (wa, wb) = (la.f_sub(&mx)?.f_exp()?, lb.f_sub(&mx)?.f_exp()?);
            let sum = wa.f_add(&wb)?;
            let _out = oa
                .f_mul(&wa.f_unsqueeze(-1)?)?
                .f_add(&ob.f_mul(&wb.f_unsqueeze(-1)?)?)?
                .f_div(&sum.f_unsqueeze(-1)?)?;
            let _lse = mx.f_add(&sum.f_log()?)?;
            let mut acc = part.f_zeros_like()?;
            let _ = acc.f_add_(&part)?;
            let _ = part.f_add(&acc)?;
            Ok(())
        };
        f().op("calibrate")
    })?;
    put("ring", (t * heads * d) as f64, passes::RING_OUT + passes::RING_KV, s);
    // An all-to-all's pack on a backend that sends contiguous buffers (MPI): `[1, t, heads, d]`
    // split along the heads into 2 chunks, each made contiguous in a fresh tensor, as
    // `comm::backend::batch_lists` does with Ulysses' strided chunks.
    let x = Tensor::f_randn([1, t, heads, d], o).op("calibrate")?;
    let s = time_median(runs, &no_sync, || {
        for c in x.f_chunk(2, 2).op("calibrate")? {
            drop(c.f_contiguous().op("calibrate")?);
        }
        Ok::<(), Error>(())
    })?;
    put("a2a_pack", (t * heads * d) as f64, passes::PACK, s);
    Ok(out)
}
