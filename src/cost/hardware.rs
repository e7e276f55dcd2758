//! Hardware as data: one TOML file per machine (`hardware/*.toml`), every value with its public
//! source in a comment, or measured by `ulysses calibrate` with its provenance.
//!
//! A file describes one *device* (a GPU, or one CPU core for ranks as threads), the *node* that
//! holds several, how fast kernels run as a function of their size (*efficiency curves*), and
//! one *network* per communication backend (`nccl`, `local`, `mpi`), each with an intra-node
//! link and, for clusters, an inter-node link. Nothing here is fitted to the paper's results.
//! Bad files are refused with the field and the number: a missing field, a negative or zero
//! value, an efficiency above 1, a curve whose sizes do not increase.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::comm::OpKind;
use crate::train::Precision;
use crate::{Error, Result};

use super::software::{Band, Software, DEFAULT_GPU};

/// The presets shipped in `hardware/` (compiled in, so they work from any directory).
const PRESETS: [(&str, &str); 6] = [
    ("dgx-a100-40gb", include_str!("../../hardware/dgx-a100-40gb.toml")),
    ("dgx-a100-80gb", include_str!("../../hardware/dgx-a100-80gb.toml")),
    ("dgx-h100", include_str!("../../hardware/dgx-h100.toml")),
    ("h200", include_str!("../../hardware/h200.toml")),
    ("cpu-2core", include_str!("../../hardware/cpu-2core.toml")),
    ("cpu-2core-epyc", include_str!("../../hardware/cpu-2core-epyc.toml")),
];

/// The CPU preset predictions on this machine default to: the measured preset whose provenance
/// names this machine's CPU model and core count, else "cpu-2core" (whose
/// [`Hardware::measured_elsewhere`] then says that it describes another machine).
pub fn cpu_preset_for_host() -> &'static str {
    let (cpu, cores) = (host_cpu(), host_cores());
    PRESETS
        .iter()
        .filter_map(|(name, _)| Hardware::load(name).ok().map(|hw| (*name, hw)))
        .find(|(_, hw)| {
            hw.device.kind == DeviceKind::Cpu
                && hw.provenance.is_some()
                && hw.differs_from(&cpu, cores).is_none()
        })
        .map_or("cpu-2core", |(name, _)| name)
}

/// A machine: devices, nodes, kernel efficiencies, networks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Hardware {
    /// Short name, used in result files ("dgx-a100-40gb").
    pub name: String,
    #[serde(default)]
    pub description: String,
    pub device: Device,
    pub node: Node,
    pub efficiency: Efficiency,
    /// Networks by backend name: "nccl" for GPUs, "local" (threads) and "mpi" on CPUs.
    pub network: BTreeMap<String, Network>,
    /// The host a device offloads to (pinned host memory over its PCIe link); absent where no
    /// figure is given (then offload's transfers are not timed and its capacity not checked).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<Host>,
    /// The range of each assumed input: multipliers at the pessimistic and optimistic ends.
    #[serde(default, skip_serializing_if = "Bands::is_unit")]
    pub bands: Bands,
    /// How a measured file was made (date, command, host); absent in datasheet presets.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provenance: Option<BTreeMap<String, String>>,
    /// The software running on it and the band predictions take ([`Hardware::with_software`]).
    #[serde(skip)]
    pub applied: Applied,
}

/// The software applied to a machine and the band its lookups take.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Applied {
    pub software: Option<Software>,
    /// The software's attention curves for this device (empty: the file's own).
    pub attention: Vec<AttentionCurve>,
    pub band: Band,
}

/// The host side of a device: its link to host memory and the host memory of a node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Host {
    /// The device's link to host memory, GB/s (1e9 bytes) in each direction.
    pub link_gbs: f64,
    /// The fraction of `link_gbs` copies between pinned host memory and the device reach.
    pub link_efficiency: f64,
    /// Host memory of one node (GiB), which the node's devices' offloaded tensors share.
    pub memory_gib: f64,
    /// The host memory's bandwidth of one node, GB/s, all sockets together: what an optimizer
    /// step on the host's CPUs (ZeRO-Offload) streams its states through. Absent: optimizer
    /// offload is not priced on this machine.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_gbs: Option<f64>,
    /// The fraction of `memory_gbs` the CPU optimizer's update reaches.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adam_efficiency: Option<f64>,
}

/// Ranges of the assumed inputs of a hardware file: `[pessimistic, optimistic]` multipliers of
/// the central values (the file's own), and the reserved memory's range in GiB. Every range
/// comes from the source named beside it in the file; absent ranges are [1, 1].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Bands {
    #[serde(default = "unit")]
    pub matmul: [f64; 2],
    #[serde(default = "unit")]
    pub memory_bound: [f64; 2],
    /// Every link's collective efficiencies.
    #[serde(default = "unit")]
    pub network: [f64; 2],
    /// Every link's latency (the pessimistic end is the larger).
    #[serde(default = "unit")]
    pub latency: [f64; 2],
    /// `device.reserved_gib` at the pessimistic (larger) and optimistic ends, GiB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reserved_gib: Option<[f64; 2]>,
    /// The host link's efficiency.
    #[serde(default = "unit")]
    pub host_link: [f64; 2],
    /// The CPU optimizer's share of the host memory's bandwidth.
    #[serde(default = "unit")]
    pub host_adam: [f64; 2],
}

impl Default for Bands {
    fn default() -> Bands {
        Bands {
            matmul: unit(),
            memory_bound: unit(),
            network: unit(),
            latency: unit(),
            reserved_gib: None,
            host_link: unit(),
            host_adam: unit(),
        }
    }
}

impl Bands {
    fn is_unit(&self) -> bool {
        *self == Bands::default()
    }
}

fn unit() -> [f64; 2] {
    [1.0, 1.0]
}

/// Whether a device is a GPU or a CPU core (ranks as threads or processes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeviceKind {
    Gpu,
    Cpu,
}

/// One device: what one rank runs on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Device {
    pub kind: DeviceKind,
    /// "NVIDIA A100-SXM4-40GB", "x86-64 core".
    pub model: String,
    /// Peak dense TFLOP/s per dtype (a dtype the device cannot run is left out).
    pub peak_tflops: BTreeMap<String, f64>,
    /// Memory one device has (GiB, 2^30 bytes).
    pub memory_gib: f64,
    /// Memory held before the model exists (CUDA context, communicator buffers).
    pub reserved_gib: f64,
    /// Memory the kernel libraries allocate on a rank's first step and keep (cuBLAS workspace;
    /// MKL's GEMM buffers on a CPU), GiB per rank.
    pub workspace_gib: f64,
    /// Library code a fresh process pages in over its first step, GiB per process (CPU: a host's
    /// RSS counts the kernels' pages mapped from libtorch's shared objects once they run; 0 for
    /// a GPU, whose allocator does not see them). Measured by `ulysses calibrate`; counted for
    /// ranks that are processes of their own (MPI), not for thread ranks of a running process.
    #[serde(default)]
    pub code_pages_gib: f64,
    /// Resident memory per byte of live tensors at the peak: the allocator's slack (glibc's
    /// arenas on a CPU; 1 where a caching allocator's slack is counted in `reserved_gib`).
    pub allocator_slack: f64,
    /// Memory bandwidth (GB/s, 1e9 bytes).
    pub memory_bandwidth_gbs: f64,
    /// Streaming multiprocessors (a GPU): how many of a fused attention kernel's thread blocks
    /// run at once ([`super::occupancy`]); 0 for a CPU (no such factor).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub sm_count: u32,
}

/// A node: devices sharing a fast intra-node link.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Node {
    pub devices_per_node: usize,
    /// Ranks (of one thread each) that compute at full speed at once: the devices of a GPU
    /// node, the cores of a CPU. More ranks than slots share them.
    pub compute_slots: usize,
    /// Whether the devices share one memory (a CPU's RAM): then the node's ranks together must
    /// fit in `memory_gib`.
    #[serde(default)]
    pub shared_memory: bool,
}

/// How close kernels come to the peaks, as a function of their size.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Efficiency {
    /// GEMMs: (FLOPs per call, fraction of the dtype's peak).
    pub matmul: Vec<[f64; 2]>,
    /// Fused attention (flash), per head size: (sequence length seen by the kernel, fraction of
    /// the peak in model FLOPs: 12 d per visible pair and head for forward + backward), as
    /// measured on this machine by a calibration. Datasheet presets leave it out: the kernel's
    /// speed is the software's (`software/*.toml`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub attention: Vec<AttentionCurve>,
    /// Fraction of the memory bandwidth that memory-bound ops (norms, activations, softmax,
    /// casts, the optimizer) reach.
    pub memory_bound: f64,
    /// The same per kind of op where it differs (a CPU's LayerNorm and GELU are bound by their
    /// arithmetic, not by memory): keys layer_norm, rope, add, gelu, cross_entropy, ring, copy, a2a_pack (an all-to-all's strided chunks packed for a process backend).
    /// Kinds left out use `memory_bound`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub memory_bound_ops: BTreeMap<String, f64>,
    /// The framework's own time per transformer layer per forward + backward, whatever the
    /// size: dispatching the layer's hundred-odd ops (libtorch's dispatcher and autograd on a
    /// CPU), in microseconds. Measured by `ulysses calibrate` on a reference step at negligible
    /// size; on a GPU by `ulysses-gpu --calibrate` (the host's time to launch a layer's
    /// kernels, which overlaps them: it counts where it exceeds them); 0 where not measured.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub layer_overhead_us: f64,
}

/// A field left out of a written file when zero (its default).
fn is_zero<T: Default + PartialEq>(v: &T) -> bool {
    *v == T::default()
}

/// The attention curve of one head size, for causal kernel calls (a diagonal block) or for
/// unmasked ones (a block every query sees whole).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AttentionCurve {
    /// The device family a software profile's curve is for (a part of `device.model`); absent in
    /// a hardware file, whose curves are its own device's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    pub head_dim: i64,
    /// Whether the curve was measured with the causal mask. Default true.
    #[serde(default = "yes")]
    pub causal: bool,
    pub points: Vec<[f64; 2]>,
}

fn yes() -> bool {
    true
}

/// The links one backend uses.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Network {
    /// Between devices of one node.
    pub intra: Link,
    /// Between nodes, per device (a node's NIC bandwidth divided by its devices); absent for a
    /// single-node machine.
    #[serde(default)]
    pub inter: Option<Link>,
}

/// One kind of link, priced with the alpha-beta model: `latency x steps + bytes / (bandwidth x
/// efficiency of the collective)`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Link {
    /// Per device and direction (GB/s, 1e9 bytes).
    pub bandwidth_gbs: f64,
    /// Per algorithm step (microseconds).
    pub latency_us: f64,
    /// Fraction of `bandwidth_gbs` each collective reaches on large messages (bus bandwidth, as
    /// nccl-tests reports it): keys all_to_all, all_gather, reduce_scatter, all_reduce, shift.
    pub efficiency: BTreeMap<String, f64>,
}

impl Link {
    /// The efficiency of `op` on this link.
    pub fn efficiency_of(&self, op: OpKind) -> Result<f64> {
        self.efficiency.get(op.name()).copied().ok_or_else(|| Error::InvalidArgument {
            op: "hardware",
            group: "network".into(),
            msg: format!("link has no efficiency for {}; give efficiency.{}", op.name(), op.name()),
        })
    }
}

/// Log-linear interpolation of a curve of (size, value) points at `size`, clamped at the ends.
pub fn interpolate(points: &[[f64; 2]], size: f64) -> f64 {
    let Some(first) = points.first() else { return f64::NAN };
    if size <= first[0] {
        return first[1];
    }
    for w in points.windows(2) {
        let ([x0, y0], [x1, y1]) = (w[0], w[1]);
        if size <= x1 {
            let t = (size.ln() - x0.ln()) / (x1.ln() - x0.ln());
            return y0 + t * (y1 - y0);
        }
    }
    points[points.len() - 1][1]
}

impl Hardware {
    /// Names of the compiled-in presets.
    pub fn presets() -> Vec<&'static str> {
        PRESETS.iter().map(|(name, _)| *name).collect()
    }

    /// A preset by name, or a file by path (anything ending in `.toml` or naming a file).
    pub fn load(name_or_path: &str) -> Result<Hardware> {
        match preset_or_file(&PRESETS, name_or_path).map_err(|msg| bad(name_or_path, msg))? {
            Some(text) => Hardware::parse(&text, name_or_path),
            None => Err(bad(
                name_or_path,
                format!("no such preset or file; presets: {}", Hardware::presets().join(", ")),
            )),
        }
    }

    /// Parses and checks a hardware file; `source` names it in messages. A file without
    /// attention curves of its own takes the default software ([`DEFAULT_GPU`]); a file with
    /// them keeps them (the `measured` profile).
    pub fn parse(text: &str, source: &str) -> Result<Hardware> {
        let hw: Hardware =
            toml::from_str(text).map_err(|e| bad(source, e.to_string().trim_end().to_string()))?;
        hw.validate().map_err(|msg| bad(source, msg))?;
        let default = if hw.efficiency.attention.is_empty() { DEFAULT_GPU } else { "measured" };
        hw.with_software(&Software::load(default)?, Band::Central)
    }

    /// This machine running `software`, its lookups at `band` of every range (the hardware's
    /// and the software's). A profile with attention curves replaces the file's for this
    /// device; one without keeps the file's, which must then exist.
    pub fn with_software(&self, software: &Software, band: Band) -> Result<Hardware> {
        let attention = match software.curves_for(&self.device.model)? {
            Some(curves) => curves,
            // A baseline on the math kernel never runs a fused attention kernel.
            None if self.efficiency.attention.is_empty()
                && !software
                    .baseline
                    .as_ref()
                    .is_some_and(|b| b.kernel == crate::attention::Kernel::Math) =>
            {
                return Err(bad(
                    &self.name,
                    format!(
                        "software {:?} keeps the hardware's attention curves, and this file has none \
                         (a datasheet preset); name a profile with curves for {:?}: {}",
                        software.name,
                        self.device.model,
                        Software::presets().join(", ")
                    ),
                ))
            }
            None => Vec::new(),
        };
        let mut hw = self.clone();
        hw.applied = Applied { software: Some(software.clone()), attention, band };
        Ok(hw)
    }

    /// The same machine and software with every lookup at `band`.
    pub fn at_band(&self, band: Band) -> Hardware {
        let mut hw = self.clone();
        hw.applied.band = band;
        hw
    }

    /// The software profile's name ("measured" for a file's own curves).
    pub fn software_name(&self) -> &str {
        self.applied.software.as_ref().map_or("measured", |s| s.name.as_str())
    }

    /// The baseline system the software describes, if any.
    pub fn baseline(&self) -> Option<&super::software::Baseline> {
        self.applied.software.as_ref().and_then(|s| s.baseline.as_ref())
    }

    /// What runs the attention here: the device, and whether the software's ring materialises
    /// its scores (a baseline).
    pub fn kernels(&self) -> super::flops::Kernels {
        let ring_scores = self.baseline().is_some_and(|b| b.ring_scores);
        let sparse_padding = self.applied.software.as_ref().is_none_or(|s| s.sparse_padding);
        super::flops::Kernels { device: self.device.kind, ring_scores, sparse_padding }
    }

    /// The band the lookups take.
    pub fn band(&self) -> Band {
        self.applied.band
    }

    /// Bytes per second one device moves to or from host memory at this band (`None`: the file
    /// gives no host link).
    pub fn host_link_bytes_per_s(&self) -> Option<f64> {
        let h = self.host.as_ref()?;
        let eff = (h.link_efficiency * self.applied.band.pick(self.bands.host_link)).min(1.0);
        Some(h.link_gbs * 1e9 * eff)
    }

    /// Bytes per second an optimizer update on the host's CPUs streams for one of `ranks` ranks
    /// sharing a node's host memory, at this band (`None`: the file gives no host memory
    /// bandwidth).
    pub fn host_adam_bytes_per_s(&self, ranks: usize) -> Option<f64> {
        let h = self.host.as_ref()?;
        let (bw, eff) = (h.memory_gbs?, h.adam_efficiency?);
        let eff = (eff * self.applied.band.pick(self.bands.host_adam)).min(1.0);
        let sharing = ranks.clamp(1, self.node.devices_per_node.max(1)) as f64;
        Some(bw * 1e9 * eff / sharing)
    }

    /// Memory held before the model exists at this band (GiB).
    pub fn reserved_gib(&self) -> f64 {
        match (self.bands.reserved_gib, self.applied.band) {
            (Some([lo, _]), Band::Low) => lo,
            (Some([_, hi]), Band::High) => hi,
            _ => self.device.reserved_gib,
        }
    }

    /// Efficiency of `op` on `link` at this band (capped at 1).
    pub fn link_efficiency(&self, link: &Link, op: OpKind) -> Result<f64> {
        Ok((link.efficiency_of(op)? * self.applied.band.pick(self.bands.network)).min(1.0))
    }

    /// Latency per algorithm step of `link` at this band (seconds).
    pub fn link_latency_s(&self, link: &Link) -> f64 {
        link.latency_us * 1e-6 * self.applied.band.pick(self.bands.latency)
    }

    /// For a file `ulysses calibrate` measured: what differs between the machine it was measured
    /// on and this one (the CPU model or the number of cores), as a sentence; its times then
    /// describe that machine, not this one. `None` for datasheet presets (no provenance), for a
    /// provenance without those fields, and for a match.
    pub fn measured_elsewhere(&self) -> Option<String> {
        self.differs_from(&host_cpu(), host_cores())
    }

    /// [`Hardware::measured_elsewhere`] for a machine with `here_cpu` and `here_cores`.
    fn differs_from(&self, here_cpu: &str, here_cores: usize) -> Option<String> {
        let prov = self.provenance.as_ref()?;
        let (cpu, cores) = (prov.get("cpu")?, prov.get("cores")?);
        if cpu == here_cpu && *cores == here_cores.to_string() {
            return None;
        }
        let date = prov.get("date_utc").map_or(String::new(), |d| format!(" on {d}"));
        Some(format!(
            "hardware {:?} was measured{date} on {cores} cores of {cpu:?}; this machine has {here_cores} of \
             {here_cpu:?}: its predictions describe that machine (`ulysses calibrate` measures this one)",
            self.name
        ))
    }

    /// The file as TOML.
    pub fn to_toml(&self) -> Result<String> {
        toml::to_string(self).map_err(|e| bad(&self.name, e.to_string()))
    }

    /// Peak dense FLOP/s of one device for `precision`'s matmul dtype.
    pub fn peak_flops(&self, precision: Precision) -> Result<f64> {
        let key = precision.name();
        self.device.peak_tflops.get(key).map(|t| t * 1e12).ok_or_else(|| {
            bad(&self.name, format!("device.peak_tflops has no {key}; this device cannot run that dtype"))
        })
    }

    /// Matmul efficiency for a GEMM of `flops` FLOPs (at the band, capped at 1).
    pub fn matmul_efficiency(&self, flops: f64) -> f64 {
        (interpolate(&self.efficiency.matmul, flops) * self.applied.band.pick(self.bands.matmul)).min(1.0)
    }

    /// Memory-bound efficiency of op kind `op` (see [`super::work::passes`]), at the band.
    pub fn memory_bound_efficiency(&self, op: &str) -> f64 {
        let e = self.efficiency.memory_bound_ops.get(op).copied().unwrap_or(self.efficiency.memory_bound);
        (e * self.applied.band.pick(self.bands.memory_bound)).min(1.0)
    }

    /// Fused-attention efficiency for head size `head_dim` over `seq` keys, causal or not: the
    /// curve of the nearest head size (in log distance) among those measured with that mask,
    /// or among all when there are none; the software's curves where it has them, else the
    /// file's; at the band of the software's range (capped at 1).
    pub fn attention_efficiency(&self, head_dim: i64, seq: f64, causal: bool) -> f64 {
        let scale = self.applied.software.as_ref().map_or(1.0, |s| self.applied.band.pick(s.attention_band));
        (self.attention_curve_value(head_dim, seq, causal) * scale).min(1.0)
    }

    /// The time factor of an attention kernel call's grid on this device's SMs against the grid
    /// its efficiency was measured on ([`super::occupancy::occupancy`]): the simulated schedule
    /// at the central and pessimistic ends; at the optimistic end no loss (an SM left with fewer
    /// thread blocks than its share may run them faster, up to the published rate). 1 without
    /// SMs, without a call, or where the software names no kernel grid.
    pub fn attention_occupancy(&self, call: Option<super::occupancy::Call>, head_dim: i64) -> f64 {
        let grid = self.applied.software.as_ref().and_then(|s| s.attention_grid.as_ref());
        let (Some(call), Some(grid)) = (call, grid) else {
            return 1.0;
        };
        let f = super::occupancy::occupancy(grid, call, head_dim, self.device.sm_count);
        match self.applied.band {
            Band::High => f.max(1.0),
            Band::Central | Band::Low => f,
        }
    }

    fn attention_curve_value(&self, head_dim: i64, seq: f64, causal: bool) -> f64 {
        let all = if self.applied.attention.is_empty() {
            &self.efficiency.attention
        } else {
            &self.applied.attention
        };
        let same: Vec<&AttentionCurve> = all.iter().filter(|c| c.causal == causal).collect();
        let pool: Vec<&AttentionCurve> = if same.is_empty() { all.iter().collect() } else { same };
        let curve = pool.into_iter().min_by(|a, b| {
            let da = ((a.head_dim as f64).ln() - (head_dim as f64).ln()).abs();
            let db = ((b.head_dim as f64).ln() - (head_dim as f64).ln()).abs();
            da.total_cmp(&db)
        });
        curve.map_or(f64::NAN, |c| interpolate(&c.points, seq))
    }

    /// The same machine with every kernel efficiency (matmul, attention, memory-bound) times
    /// `factor`, capped at 1: how predictions move when the assumed efficiencies are off.
    pub fn with_efficiency_scale(&self, factor: f64) -> Result<Hardware> {
        if !(factor.is_finite() && factor > 0.0) {
            return Err(bad(&self.name, format!("efficiency scale {factor} must be a positive number")));
        }
        let mut hw = self.clone();
        let scale =
            |points: &mut Vec<[f64; 2]>| points.iter_mut().for_each(|p| p[1] = (p[1] * factor).min(1.0));
        scale(&mut hw.efficiency.matmul);
        hw.efficiency.attention.iter_mut().for_each(|c| scale(&mut c.points));
        hw.applied.attention.iter_mut().for_each(|c| scale(&mut c.points));
        hw.efficiency.memory_bound = (hw.efficiency.memory_bound * factor).min(1.0);
        hw.efficiency.memory_bound_ops.values_mut().for_each(|v| *v = (*v * factor).min(1.0));
        if factor != 1.0 {
            hw.name = format!("{}@eff{factor}", self.name);
        }
        Ok(hw)
    }

    /// The network of `backend`.
    pub fn network(&self, backend: &str) -> Result<&Network> {
        self.network.get(backend).ok_or_else(|| {
            let have: Vec<&str> = self.network.keys().map(String::as_str).collect();
            bad(&self.name, format!("no network for backend {backend:?}; this file has {have:?}"))
        })
    }
}

fn bad(source: &str, msg: String) -> Error {
    Error::InvalidArgument { op: "hardware", group: source.to_string(), msg }
}

/// The text of the compiled-in preset `name_or_path` of `presets`, else of the file it names
/// (anything ending in `.toml` or naming a file); `None` when it is neither, the error's
/// message when the file cannot be read.
pub(super) fn preset_or_file(
    presets: &[(&str, &str)],
    name_or_path: &str,
) -> std::result::Result<Option<String>, String> {
    if let Some((_, text)) = presets.iter().find(|(name, _)| *name == name_or_path) {
        return Ok(Some(text.to_string()));
    }
    let path = Path::new(name_or_path);
    if path.is_file() || name_or_path.ends_with(".toml") {
        return std::fs::read_to_string(path).map(Some).map_err(|e| format!("cannot read: {e}"));
    }
    Ok(None)
}

/// This machine's CPU model, as `ulysses calibrate` records it: the first `model name` of
/// /proc/cpuinfo ("unknown CPU" where there is none).
pub fn host_cpu() -> String {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    info.lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map_or("unknown CPU".into(), |(_, m)| m.trim().to_string())
}

/// The cores this process may run on, as `ulysses calibrate` records them (0 if unknown).
pub fn host_cores() -> usize {
    std::thread::available_parallelism().map_or(0, |c| c.get())
}
