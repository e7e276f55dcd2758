//! Software as data: what runs on the hardware (`software/*.toml`), every value with its public
//! source in a comment, and the range that source gives.
//!
//! A kernel's speed belongs to the software that runs it, not to the GPU: the paper's release
//! scripts ran Megatron-DeepSpeed with the Triton FlashAttention of flash-attn 1.0.4, where this
//! toolkit runs PyTorch's SDPA (FlashAttention-2 class) - the same A100 reaches about twice the
//! attention FLOP/s with the second (docs/design.md §5.1). A profile gives:
//!
//! - the attention kernel's efficiency curves per device family (matched against the hardware
//!   file's `device.model`), in model FLOPs like the hardware's own curves; a profile without
//!   curves keeps the hardware file's (measured by `ulysses calibrate`);
//! - the band of those curves: multipliers giving the pessimistic and optimistic ends of the
//!   range the source states;
//! - the attention kernel's grid (its thread blocks, and the grid its curves were measured on):
//!   how full a call with few heads keeps a GPU's SMs ([`super::occupancy`]);
//! - how the framework overlaps ZeRO-3's parameter gathers with compute (DeepSpeed's prefetch);
//! - for a baseline system (Megatron-LM as of 2023): what it runs differently from this
//!   toolkit's strategy of the same name (its attention kernel, where its tensor parallelism
//!   may go, the ZeRO stages and checkpointing it offers) - the search of the paper-setup mode
//!   keeps to those.
//!
//! A [`Band`] picks one end of every range at once: `Low` is the prediction with every input
//! at its pessimistic end (slowest kernels and links, most memory reserved), `High` at its
//! optimistic end. Step time is monotone in each input, so the two bound the prediction over
//! the box of inputs; nothing here is fitted to a result.

use serde::{Deserialize, Serialize};

use crate::attention::Kernel;
use crate::train::{Checkpointing, ZeroStage};
use crate::{Error, Result};

use super::hardware::{preset_or_file, AttentionCurve};
use super::occupancy::KernelGrid;

/// The presets shipped in `software/` (compiled in, so they work from any directory).
const PRESETS: [(&str, &str); 6] = [
    ("flash-attention-2", include_str!("../../software/flash-attention-2.toml")),
    ("megatron-deepspeed-2023", include_str!("../../software/megatron-deepspeed-2023.toml")),
    ("megatron-lm-2023", include_str!("../../software/megatron-lm-2023.toml")),
    ("colossalai-2021", include_str!("../../software/colossalai-2021.toml")),
    ("flash-attention-3", include_str!("../../software/flash-attention-3.toml")),
    ("measured", include_str!("../../software/measured.toml")),
];

/// The profile a hardware file without attention curves of its own takes when no software is
/// named: PyTorch's SDPA, a FlashAttention-2-class kernel, what this toolkit runs on a GPU.
pub const DEFAULT_GPU: &str = "flash-attention-2";

/// Which end of every input's range a prediction takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Band {
    /// Every input at the pessimistic end of its range.
    Low,
    /// Every input at its central value.
    #[default]
    Central,
    /// Every input at the optimistic end of its range.
    High,
}

impl Band {
    pub const ALL: [Band; 3] = [Band::Low, Band::Central, Band::High];

    pub fn name(self) -> &'static str {
        match self {
            Band::Low => "low",
            Band::Central => "central",
            Band::High => "high",
        }
    }

    /// The multiplier of a `[pessimistic, optimistic]` pair at this band (1 at the centre).
    pub fn pick(self, range: [f64; 2]) -> f64 {
        match self {
            Band::Low => range[0],
            Band::Central => 1.0,
            Band::High => range[1],
        }
    }
}

/// One software profile.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Software {
    /// Short name, used in result files ("megatron-deepspeed-2023").
    pub name: String,
    #[serde(default)]
    pub description: String,
    /// The attention kernel's curves per device family (each naming its `device`: a part of
    /// the hardware's `device.model`, "A100", "H100"); empty: the hardware file's own.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub attention: Vec<AttentionCurve>,
    /// Multipliers of every attention curve at the pessimistic and optimistic ends of the
    /// source's range. Default [1, 1] (a measured curve).
    #[serde(default = "unit")]
    pub attention_band: [f64; 2],
    /// The fused attention kernel's grid, and the grid its curves were measured on: how full a
    /// call with few heads keeps a GPU ([`super::occupancy`]); absent: no such factor (a
    /// CPU's kernels, a baseline on the math kernel).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attention_grid: Option<KernelGrid>,
    /// ZeRO-3 parameter prefetch as the framework runs it; absent: this toolkit's trainer
    /// (gathers on the critical path unless the job asks for overlap).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zero3: Option<Zero3Prefetch>,
    /// Whether its block-sparse kernel pads every query block to the longest list of key blocks
    /// (this toolkit's blocked kernel: one batched product) or computes only the layout's blocks
    /// (DeepSpeed's Triton sparse attention). Default true.
    #[serde(default = "yes")]
    pub sparse_padding: bool,
    /// What a baseline system runs differently; absent: this toolkit's strategies as they are.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub baseline: Option<Baseline>,
}

fn yes() -> bool {
    true
}

fn unit() -> [f64; 2] {
    [1.0, 1.0]
}

/// DeepSpeed's ZeRO-3 prefetch: while one block computes, the next block's parameters are
/// gathered (`overlap_comm`, `stage3_prefetch_bucket_size`), and each block's gradients are
/// reduce-scattered while the previous block's backward runs. Central: a pipeline of blocks
/// where a block's communication hides behind the compute of the block before it; the band's
/// pessimistic end hides nothing, its optimistic end everything up to the whole compute.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Zero3Prefetch {
    /// Parameters fetched ahead of use (elements): DeepSpeed's `stage3_prefetch_bucket_size`.
    pub prefetch_bucket_elems: f64,
    /// Extra all-gathers of every block under full checkpointing at the pessimistic end (the
    /// recomputed forward gathering again); the central value and the optimistic end count none,
    /// as DeepSpeed's `stage3_max_reuse_distance` keeps the recompute's parameters for the
    /// backward that follows it.
    #[serde(default)]
    pub recompute_gathers_low: u32,
}

/// What a baseline system runs that this toolkit's strategy of the same name does not.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Baseline {
    /// The attention kernel it ran ("math": scores materialised, as Megatron-LM's core
    /// attention without flash).
    pub kernel: Kernel,
    /// Whether its sequence/tensor-parallel group must fit inside one node.
    #[serde(default)]
    pub group_within_node: bool,
    /// ZeRO stages it offers (Megatron-LM's distributed optimizer is stage 1).
    pub zero: Vec<u8>,
    /// Checkpointing modes it offers.
    pub checkpointing: Vec<Checkpointing>,
    /// Whether its ZeRO-1 (a distributed optimizer) also shards the optimizer states of the
    /// tensor-parallel slices over the data-parallel ranks, as Megatron-LM's does; this
    /// toolkit's ZeRO partitions the replicated parameters only. Default false.
    #[serde(default)]
    pub distributed_optimizer: bool,
    /// Whether its ring materialises the `[rows, N]` scores of every head and keeps them for the
    /// backward (ColossalAI's 2021 ring self-attention), where this toolkit's ring runs flash
    /// blocks. Default false.
    #[serde(default)]
    pub ring_scores: bool,
}

impl Baseline {
    /// The stages as [`ZeroStage`]s.
    pub fn zero_stages(&self) -> Result<Vec<ZeroStage>> {
        self.zero.iter().map(|&z| ZeroStage::new(z)).collect()
    }
}

impl Software {
    /// Names of the compiled-in presets.
    pub fn presets() -> Vec<&'static str> {
        PRESETS.iter().map(|(name, _)| *name).collect()
    }

    /// A preset by name, or a file by path.
    pub fn load(name_or_path: &str) -> Result<Software> {
        if let Some(text) = preset_or_file(&PRESETS, name_or_path).map_err(|msg| bad(name_or_path, msg))? {
            return Software::parse(&text, name_or_path);
        }
        Err(bad(
            name_or_path,
            format!("no such software preset or file; presets: {}", Software::presets().join(", ")),
        ))
    }

    /// Parses and checks a software file; `source` names it in messages.
    pub fn parse(text: &str, source: &str) -> Result<Software> {
        let sw: Software =
            toml::from_str(text).map_err(|e| bad(source, e.to_string().trim_end().to_string()))?;
        sw.validate().map_err(|msg| bad(source, msg))?;
        Ok(sw)
    }

    fn validate(&self) -> std::result::Result<(), String> {
        let [lo, hi] = self.attention_band;
        if !(lo.is_finite() && hi.is_finite() && lo > 0.0 && lo <= 1.0 && hi >= 1.0) {
            return Err(format!(
                "attention_band = [{lo}, {hi}] must be [pessimistic <= 1, optimistic >= 1], both positive"
            ));
        }
        for c in &self.attention {
            let device = c.device.as_deref().unwrap_or("");
            let field = format!("attention ({device} head_dim {})", c.head_dim);
            if device.trim().is_empty() || c.head_dim < 1 {
                return Err(format!("{field}: device must be named and head_dim at least 1"));
            }
            for (i, [size, eff]) in c.points.iter().enumerate() {
                if !(size.is_finite() && *size > 0.0 && eff.is_finite() && *eff > 0.0 && *eff <= 1.0) {
                    return Err(format!(
                        "{field}[{i}] = [{size}, {eff}]: size positive, efficiency in (0, 1]"
                    ));
                }
                if i > 0 && *size <= c.points[i - 1][0] {
                    return Err(format!("{field}: sizes must increase ({} then {size})", c.points[i - 1][0]));
                }
            }
            if c.points.is_empty() {
                return Err(format!("{field} needs at least one point"));
            }
        }
        if let Some(g) = &self.attention_grid {
            g.validate()?;
        }
        if let Some(z) = &self.zero3 {
            if !(z.prefetch_bucket_elems.is_finite() && z.prefetch_bucket_elems >= 0.0) {
                return Err(format!(
                    "zero3.prefetch_bucket_elems = {} must be zero or positive",
                    z.prefetch_bucket_elems
                ));
            }
        }
        if let Some(b) = &self.baseline {
            if let Some(z) = b.zero.iter().find(|&&z| z > 3) {
                return Err(format!("baseline.zero has stage {z}; stages are 0-3"));
            }
            if b.zero.is_empty() || b.checkpointing.is_empty() {
                return Err("baseline.zero and baseline.checkpointing must list at least one choice".into());
            }
        }
        Ok(())
    }

    /// This profile's attention curves for a device whose model name is `model`, as the
    /// hardware's own curves are written; `None` when the profile has none at all (it keeps the
    /// hardware's), an error when it has curves but none for this device.
    pub fn curves_for(&self, model: &str) -> Result<Option<Vec<AttentionCurve>>> {
        if self.attention.is_empty() {
            return Ok(None);
        }
        let mine: Vec<AttentionCurve> = self
            .attention
            .iter()
            .filter(|c| c.device.as_deref().is_some_and(|d| model.contains(d)))
            .cloned()
            .collect();
        if mine.is_empty() {
            let mut have: Vec<&str> = self.attention.iter().filter_map(|c| c.device.as_deref()).collect();
            have.dedup();
            return Err(bad(
                &self.name,
                format!("has attention curves for {} but none for the device {model:?}", have.join(", ")),
            ));
        }
        Ok(Some(mine))
    }
}

fn bad(source: &str, msg: String) -> Error {
    Error::InvalidArgument { op: "software", group: source.to_string(), msg }
}
