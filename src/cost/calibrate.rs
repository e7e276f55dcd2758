//! Measuring a machine into a [`Hardware`] file: GEMMs and the fused attention kernel at the
//! sizes the models use, the bandwidth of an elementwise op, and the collectives of a backend.
//! `ulysses calibrate` runs these on the CPU (threads and MPI processes); the GPU check binary
//! runs the kernel parts on a CUDA device. Medians of repeated runs; the first run of each
//! size is a discarded warm-up.

use std::time::Instant;

use tch::{Device, Kind, Tensor};

pub use super::calibrate_host::{
    live_bytes, measure_first_step_pages, measure_layer_overhead, measure_layer_overhead_on,
    measure_memory_bound_ops, measure_step_memory, LivePeak, OpShapes,
};
use crate::comm::{Group, OpKind, ReduceOp};
use crate::error::TorchResultExt;
use crate::{Error, Result};

/// Median seconds of `f` over `runs` runs after one warm-up, `sync` after each (CUDA).
pub fn time_median<E>(
    runs: usize,
    sync: &dyn Fn(),
    mut f: impl FnMut() -> std::result::Result<(), E>,
) -> std::result::Result<f64, E> {
    f()?;
    sync();
    let mut t = Vec::with_capacity(runs);
    for _ in 0..runs.max(1) {
        let t0 = Instant::now();
        f()?;
        sync();
        t.push(t0.elapsed().as_secs_f64());
    }
    t.sort_by(f64::total_cmp);
    Ok(t[t.len() / 2])
}

/// One timed kernel: its size (FLOPs, or keys for attention), model FLOPs, seconds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct KernelSample {
    pub size: f64,
    pub flops: f64,
    pub seconds: f64,
}

/// GEMMs `[m, k] x [k, n]` in `kind` on `device`.
pub fn measure_matmul(
    device: Device,
    kind: Kind,
    shapes: &[(i64, i64, i64)],
    runs: usize,
    sync: &dyn Fn(),
) -> Result<Vec<KernelSample>> {
    shapes
        .iter()
        .map(|&(m, k, n)| {
            let a = Tensor::f_randn([m, k], (kind, device)).op("calibrate")?;
            let b = Tensor::f_randn([k, n], (kind, device)).op("calibrate")?;
            let s = time_median(runs, sync, || a.f_matmul(&b).map(drop).op("calibrate"))?;
            let flops = 2.0 * (m * k * n) as f64;
            Ok(KernelSample { size: flops, flops, seconds: s })
        })
        .collect()
}

/// libtorch's scaled-dot-product attention, causal or not, forward and backward,
/// `[1, heads, n, d]`, at each of `seqs`: model FLOPs `12 d x visible pairs x heads` (the
/// convention of the efficiency curves).
pub fn measure_attention(
    device: Device,
    kind: Kind,
    (heads, d): (i64, i64),
    causal: bool,
    seqs: &[i64],
    runs: usize,
    sync: &dyn Fn(),
) -> Result<Vec<KernelSample>> {
    seqs.iter()
        .map(|&n| {
            let mk = || {
                Tensor::f_randn([1, heads, n, d], (kind, device))
                    .map(|t| t.set_requires_grad(true))
                    .op("calibrate")
            };
            let (q, k, v) = (mk()?, mk()?, mk()?);
            let s = time_median(runs, sync, || {
                let o = Tensor::f_scaled_dot_product_attention(
                    &q,
                    &k,
                    &v,
                    None::<&Tensor>,
                    0.0,
                    causal,
                    None,
                    false,
                )
                .op("calibrate")?;
                o.f_sum(Kind::Float).and_then(|l| l.f_backward()).op("calibrate")
            })?;
            let pairs = if causal { (n * (n + 1) / 2) as f64 } else { (n * n) as f64 };
            Ok(KernelSample { size: n as f64, flops: 12.0 * d as f64 * pairs * heads as f64, seconds: s })
        })
        .collect()
}

/// Bytes per second of an elementwise add of `elements`-long tensors (two reads, one write).
pub fn measure_bandwidth(
    device: Device,
    kind: Kind,
    elements: i64,
    runs: usize,
    sync: &dyn Fn(),
) -> Result<f64> {
    let a = Tensor::f_randn([elements], (kind, device)).op("calibrate")?;
    let b = Tensor::f_randn([elements], (kind, device)).op("calibrate")?;
    let mut out = Tensor::f_empty([elements], (kind, device)).op("calibrate")?;
    let s = time_median(runs, sync, || out.f_add_out(&a, &b).map(drop).op("calibrate"))?;
    let _ = out.f_zero_().op("calibrate")?;
    Ok(3.0 * elements as f64 * kind.elt_size_in_bytes() as f64 / s)
}

/// Efficiency points from samples against `peak` FLOP/s: one point per factor-of-two bin of
/// size (the mean efficiency of its samples), sizes increasing, efficiencies capped at 1.
pub fn curve(samples: &[KernelSample], peak: f64) -> Vec<[f64; 2]> {
    let mut bins: std::collections::BTreeMap<i64, (f64, f64, usize)> = std::collections::BTreeMap::new();
    for s in samples.iter().filter(|s| s.seconds > 0.0 && s.size > 0.0) {
        let e = bins.entry(s.size.log2().round() as i64).or_insert((0.0, 0.0, 0));
        e.0 += s.size.ln();
        e.1 += (s.flops / s.seconds / peak).min(1.0);
        e.2 += 1;
    }
    bins.values().map(|&(ln, eff, n)| [(ln / n as f64).exp().round(), eff / n as f64]).collect()
}

/// One timed collective: bytes this rank sent, the group size, seconds.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct CommSample {
    pub op: String,
    pub ranks: usize,
    pub bytes_sent: f64,
    pub seconds: f64,
}

/// A collective to time, and the counter it shows up in.
type Timed<'a> = (OpKind, Box<dyn Fn() -> Result<()> + 'a>);

/// Times all-to-all, all-gather, reduce-scatter, all-reduce and shift of f32 tensors of each of
/// `sizes` bytes per rank on `group` (every rank calls it), from barrier to barrier.
pub fn measure_comm(group: &Group, sizes: &[i64], runs: usize) -> Result<Vec<CommSample>> {
    let p = group.size() as i64;
    let mut out = Vec::new();
    for &bytes in sizes {
        let rows = (bytes / 4 / p).max(1);
        let x = Tensor::f_randn([rows * p], (Kind::Float, Device::Cpu)).op("calibrate")?;
        let ops: [Timed<'_>; 5] = [
            // [P, rows]: row j to rank j, gathered along the columns
            (OpKind::AllToAll, Box::new(|| group.all_to_all(&x.view([p, rows]), 0, 1).map(drop))),
            (OpKind::AllGather, Box::new(|| group.all_gather(&x, 0).map(drop))),
            (OpKind::ReduceScatter, Box::new(|| group.reduce_scatter(&x, 0, ReduceOp::Sum).map(drop))),
            (OpKind::AllReduce, Box::new(|| group.all_reduce(&x, ReduceOp::Sum).map(drop))),
            (OpKind::Shift, Box::new(|| group.shift(&x, 1).map(drop))),
        ];
        for (op, f) in ops.iter() {
            group.reset_stats();
            f()?;
            let sent = group.stats().op(*op).bytes_sent as f64;
            let s = time_median(runs, &|| {}, || {
                group.barrier()?;
                f()
            })?;
            out.push(CommSample {
                op: op.name().to_string(),
                ranks: group.size(),
                bytes_sent: sent,
                seconds: s,
            });
        }
    }
    Ok(out)
}

/// Several rounds of [`measure_comm`] as one set of samples: per op and size, the median of
/// the rounds' medians. Rounds run one after another over every size, so that a slow spell of
/// the machine (a neighbour's burst, a descheduled rank) lands in one round of each size rather
/// than in every call of one size.
pub fn median_of_rounds(rounds: &[Vec<CommSample>]) -> Vec<CommSample> {
    let Some(first) = rounds.first() else { return Vec::new() };
    first
        .iter()
        .map(|s| {
            let mut t: Vec<f64> = rounds
                .iter()
                .filter_map(|r| r.iter().find(|o| o.op == s.op && o.bytes_sent == s.bytes_sent))
                .map(|o| o.seconds)
                .collect();
            t.sort_by(f64::total_cmp);
            let m = t.len() / 2;
            let seconds = if t.len() % 2 == 1 { t[m] } else { 0.5 * (t[m - 1] + t[m]) };
            CommSample { seconds, ..s.clone() }
        })
        .collect()
}

/// Least-squares fit of `seconds = a + bytes / bandwidth` over one op's samples, each weighted
/// by 1 / seconds² so that the fit minimises relative errors: every size counts alike, rather
/// than the largest deciding the slope alone (the model prices collectives across the whole
/// range, and a millisecond's noise on the largest size would otherwise move the bandwidth by
/// tens of percent). Returns (latency per algorithm step in seconds, bandwidth in bytes/s).
/// Errors if the time does not grow with the bytes (too few or too noisy samples).
pub fn fit_alpha_beta(samples: &[CommSample], steps: f64) -> Result<(f64, f64)> {
    let w = |s: &CommSample| 1.0 / s.seconds.max(1e-12).powi(2);
    let sw: f64 = samples.iter().map(w).sum();
    let (sx, sy) =
        samples.iter().fold((0.0, 0.0), |a, s| (a.0 + w(s) * s.bytes_sent, a.1 + w(s) * s.seconds));
    let (mx, my) = (sx / sw, sy / sw);
    let (mut sxy, mut sxx) = (0.0, 0.0);
    for s in samples {
        sxy += w(s) * (s.bytes_sent - mx) * (s.seconds - my);
        sxx += w(s) * (s.bytes_sent - mx).powi(2);
    }
    let slope = sxy / sxx;
    if samples.len() < 2 || !(slope.is_finite() && slope > 0.0) {
        let op = samples.first().map_or("?", |s| s.op.as_str());
        return Err(Error::InvalidArgument {
            op: "calibrate",
            group: op.to_string(),
            msg: format!(
                "time does not grow with size over {} samples ({samples:?}); measure larger sizes",
                samples.len()
            ),
        });
    }
    let intercept = (my - slope * mx).max(0.0);
    Ok((intercept / steps.max(1.0), 1.0 / slope))
}

/// A link from one backend's samples: each op's alpha-beta fit; the link's bandwidth is the
/// fastest op's, every op's efficiency its bandwidth relative to that, the latency the
/// all-to-all's per step.
pub fn link_from_samples(samples: &[CommSample]) -> Result<super::hardware::Link> {
    let ops = [OpKind::AllToAll, OpKind::AllGather, OpKind::ReduceScatter, OpKind::AllReduce, OpKind::Shift];
    let mut fits = Vec::new();
    for op in ops {
        let mine: Vec<CommSample> = samples.iter().filter(|s| s.op == op.name()).cloned().collect();
        let p = mine.first().map_or(2, |s| s.ranks) as f64;
        let steps = match op {
            OpKind::AllReduce => 2.0 * (p - 1.0),
            OpKind::Shift => 1.0,
            _ => p - 1.0,
        };
        fits.push((op, fit_alpha_beta(&mine, steps)?));
    }
    let fastest = fits.iter().map(|(_, (_, bw))| *bw).fold(0.0, f64::max);
    let latency = fits.iter().find(|(op, _)| *op == OpKind::AllToAll).map_or(0.0, |(_, (a, _))| *a);
    Ok(super::hardware::Link {
        bandwidth_gbs: fastest / 1e9,
        latency_us: latency * 1e6,
        efficiency: fits
            .iter()
            .map(|(op, (_, bw))| (op.name().to_string(), (bw / fastest).min(1.0)))
            .collect(),
    })
}
