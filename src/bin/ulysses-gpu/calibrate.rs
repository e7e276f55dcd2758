//! `ulysses-gpu --calibrate FILE`: this GPU measured for the cost model (bf16 GEMMs of the 1.3B
//! model's shapes and squares, flash attention forward + backward at head sizes 64 and 128 from
//! 1K to 32K tokens, HBM bandwidth, the host's time to launch a layer) into a hardware file: the h200 preset's datasheet peaks and
//! links, the measured efficiencies, its provenance. And the cost model's step time and peak
//! memory for the layer stacks [`crate::perf::gpt_stack`] measures, to print beside the
//! measurement.

use std::path::Path;

use anyhow::Result;
use tch::Kind;
use ulysses::attention::{AttentionConfig, Kernel, Mask, StrategyConfig};
use ulysses::cost::calibrate::{
    curve, measure_attention, measure_bandwidth, measure_layer_overhead_on, measure_matmul,
};
use ulysses::cost::hardware::AttentionCurve;
use ulysses::cost::{predict, Hardware, Job};
use ulysses::model::GptConfig;
use ulysses::train::{Checkpointing, Precision, ZeroStage};

use crate::{sync, GPU};

/// Measures this GPU into `out` (see the module doc) and returns the hardware it wrote.
pub fn calibrate(out: &Path) -> Result<Hardware> {
    let synced = || sync();
    let mut hw = Hardware::load("h200")?;
    let devices = tch::Cuda::device_count();
    let peak = hw.peak_flops(Precision::Bf16)?;
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
                device: None,
                head_dim: d,
                causal,
                points: curve(&samples, peak),
            });
        }
    }
    let bw = measure_bandwidth(GPU, Kind::BFloat16, 1 << 30, 10, &synced)?;
    hw.efficiency.memory_bound = (bw / (hw.device.memory_bandwidth_gbs * 1e9)).min(1.0);
    // The host's time to launch a layer's kernels (the tiny GPT at 8 tokens: microsecond kernels).
    hw.efficiency.layer_overhead_us = measure_layer_overhead_on(GPU, Kind::BFloat16, &synced, 31)? * 1e6;
    hw.name = "h200-measured".into();
    hw.description =
        "One H200 measured by ulysses-gpu --calibrate (datasheet peaks and links from h200.toml)".into();
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    hw.provenance = Some(
        [
            ("unix_time", secs.to_string()),
            ("command", std::env::args().collect::<Vec<_>>().join(" ")),
            ("cuda_devices", devices.to_string()),
            (
                "measured",
                "matmul, attention and memory_bound efficiencies, layer_overhead_us; the rest is h200.toml"
                    .into(),
            ),
            ("libtorch", "2.11.0".into()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect(),
    );
    let text = Hardware::parse(&hw.to_toml()?, "calibration")?.to_toml()?;
    std::fs::write(
        out,
        format!("# Written by ulysses-gpu --calibrate: efficiencies measured on this GPU.\n{text}"),
    )?;
    Ok(hw)
}

/// What the cost model predicts for one forward + backward of a layer stack.
pub struct Predicted {
    pub seconds: f64,
    /// The peak bytes of live tensors (as the CUDA allocator's peak counts them), in MiB.
    pub peak_mib: f64,
}

/// The cost model's time and peak memory for one forward + backward of the 1.3B layer stack
/// that [`crate::perf::gpt_stack`] measures (one device, bf16, flash attention, no
/// checkpointing, no optimizer).
pub fn predicted_stack(hw: &Hardware, layers: i64, n: i64) -> Result<Predicted> {
    let cfg = GptConfig { n_layer: layers, ..GptConfig::gpt_1_3b() };
    let job = Job {
        attention: AttentionConfig::new(Kernel::Sdpa, Mask::Causal),
        checkpointing: Checkpointing::None,
        zero: ZeroStage::NONE,
        optimizer: false,
        ..Job::new(cfg, StrategyConfig::Single, 1, n)
    };
    let p = predict(&job, hw)?;
    Ok(Predicted { seconds: p.step_s, peak_mib: p.memory.peak_bytes / (1024.0 * 1024.0) })
}
