//! An experiment as data: a TOML file whose every field is documented here, checked in full
//! before anything runs. What the fields stand for (the model, the points of the sweep) is in
//! `sweep.rs`, their checks in `validate.rs`.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::launch::Launcher;
use super::predict::PredictSpec;
use super::slurm::SlurmSpec;
use crate::attention::StrategyConfig;
use crate::data::DatasetConfig;
use crate::train::{AdamWConfig, Checkpointing, LossScaleConfig, Precision, Schedule, ZeroStage};
use crate::{Error, Result};

/// A whole experiment: a model, the parallel set-ups and sequence lengths to sweep, how long to
/// run each, on what data, and where the results go.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExperimentConfig {
    /// Short name, used in the default output folder.
    pub name: String,
    /// What the experiment shows (free text). Default empty.
    #[serde(default)]
    pub description: String,
    /// Output folder, relative to the directory `ulysses run` starts in. Default
    /// `results/<name>`.
    #[serde(default)]
    pub output: Option<PathBuf>,
    pub model: ModelSpec,
    pub parallel: ParallelSpec,
    #[serde(default)]
    pub attention: AttentionSpec,
    pub train: TrainSpec,
    #[serde(default)]
    pub dataset: DatasetConfig,
    /// `[slurm]`: the job `ulysses submit` asks Slurm for (nodes, GPUs, time, partition, ...).
    /// Default none (`ulysses submit` options then say it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slurm: Option<SlurmSpec>,
    /// How `ulysses predict` models this experiment (cost model); see [`PredictSpec`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub predict: Option<PredictSpec>,
}

/// `[model]`: a preset, and any field of [`GptConfig`](crate::model::GptConfig) to override in it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    /// tiny, 125m, 350m, 1.3b, 6.7b, 30b (GPTs), llama-tiny, llama3-8b or llama3-70b.
    pub preset: String,
    pub vocab_size: Option<i64>,
    pub n_layer: Option<i64>,
    pub n_head: Option<i64>,
    pub n_kv_head: Option<i64>,
    pub n_embd: Option<i64>,
    pub mlp_ratio: Option<i64>,
    pub ffn_hidden: Option<i64>,
    /// gelu or swiglu.
    pub mlp: Option<crate::model::MlpKind>,
    /// layernorm or rmsnorm.
    pub norm: Option<crate::model::NormKind>,
    pub rope_theta: Option<f64>,
    pub tie_embeddings: Option<bool>,
    pub bias: Option<bool>,
    pub seed: Option<u64>,
}

/// Where ranks run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Backend {
    /// Ranks as threads of one process (the embedded default).
    #[default]
    Local,
    /// One process per rank under mpirun / srun.
    Mpi,
    /// One process per GPU, NCCL collectives.
    Nccl,
}

/// `[parallel]`: the parallel set-ups to sweep.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ParallelSpec {
    /// World sizes to sweep (ranks = dp x sp).
    pub ranks: Vec<usize>,
    /// Data-parallel degree; the sequence-parallel degree is ranks / dp. Default 1.
    #[serde(default = "one")]
    pub dp: usize,
    /// Strategies to sweep: single, ulysses, megatron_sp, ring, ring_zigzag, allgather_kv,
    /// allgather_kv_zigzag, usp:U, usp_zigzag:U, ulysses_chunked:U.
    pub strategies: Vec<String>,
    /// local, mpi or nccl. Default local.
    #[serde(default)]
    pub backend: Backend,
    /// cpu or cuda. Default cpu.
    #[serde(default = "cpu")]
    pub device: String,
    /// libtorch intra-op threads per rank. Default 1.
    #[serde(default = "one")]
    pub threads_per_rank: usize,
    /// Seconds a rank waits for a peer inside one collective. Default 300.
    #[serde(default = "timeout")]
    pub timeout_s: u64,
    /// Let communication overlap computation: ring's next K/V shift while a block computes,
    /// Ulysses' k and v all-to-alls while q's is consumed (`Group::with_overlap`). Default
    /// true; false runs them in turn, for comparison (same results and bytes).
    #[serde(default = "yes", skip_serializing_if = "is_true")]
    pub overlap: bool,
    /// What starts an mpi or nccl point's processes: auto (srun inside a Slurm allocation,
    /// mpirun elsewhere), mpirun or srun. Default auto.
    #[serde(default, skip_serializing_if = "is_auto")]
    pub launcher: Launcher,
    /// Ranks per node of an mpi or nccl point. Default: every rank on this node with mpirun,
    /// spread evenly over the nodes of a Slurm allocation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ranks_per_node: Option<usize>,
    /// A hostfile for mpirun, to run on several nodes without Slurm. Default none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostfile: Option<PathBuf>,
    /// Also run the single-device reference, first: one rank that sees the same global batch
    /// (the data-parallel replicas' sequences as micro-batches), ZeRO 0. Default false.
    #[serde(default)]
    pub reference: bool,
}

/// `[attention]`: the local kernel and the mask.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AttentionSpec {
    /// math, sdpa or blocked. Default sdpa.
    #[serde(default = "sdpa")]
    pub kernel: String,
    /// none, causal, window:W, sparse:B,L,G, sparse-causal:B,L,G. Default causal.
    #[serde(default = "causal")]
    pub mask: String,
}

impl Default for AttentionSpec {
    fn default() -> Self {
        AttentionSpec { kernel: sdpa(), mask: causal() }
    }
}

/// `[train]`: what one sweep point runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainSpec {
    /// f32, bf16, f16 or f64. bf16 and f16 keep f32 master weights and Adam moments and
    /// reduce gradients in f32; f16 scales the loss (`loss_scale`). Default f32.
    #[serde(default = "f32")]
    pub dtype: String,
    /// Sequences per data-parallel replica and step. Default 1.
    #[serde(default = "one_i64")]
    pub batch: i64,
    /// Global sequence lengths to sweep.
    pub seq: Vec<i64>,
    /// Measured steps per sweep point.
    pub steps: usize,
    /// Steps before them, run but left out of summaries. Default 1.
    #[serde(default = "one")]
    pub warmup: usize,
    /// Seed of the data (the model's is `model.seed`). Default 1234.
    #[serde(default = "seed")]
    pub seed: u64,
    /// Update the weights with AdamW after each step (convergence runs); without it, steps are
    /// forward, backward and the gradient reduction only (throughput runs). Default none.
    #[serde(default)]
    pub adamw: Option<AdamWConfig>,
    /// ZeRO stage over all SP x DP ranks (0-3), or a list of stages to sweep. Stages 1-3 need
    /// `adamw`. Default 0.
    #[serde(default = "stage_0", deserialize_with = "super::plan::stages")]
    pub zero: Vec<ZeroStage>,
    /// Activation checkpointing per block: none, full or selective. Default none.
    #[serde(default)]
    pub checkpointing: Checkpointing,
    /// Micro-batches per optimizer step (each of `batch` sequences per replica). Default 1.
    #[serde(default = "one")]
    pub grad_accum: usize,
    /// Clip the global gradient norm to this. Default none.
    #[serde(default)]
    pub clip: Option<f64>,
    /// Learning-rate schedule: `warmup` steps, then `decay` (constant, cosine or linear) to
    /// `min_lr_ratio` of `adamw.lr` at step `total` (default: warmup + steps of the point).
    /// Default constant.
    #[serde(default)]
    pub schedule: Schedule,
    /// Save the model state every this many steps (and after the last) under
    /// `<output>/checkpoints/point-<i>/step-<s>`; `ulysses run --resume` continues an unfinished
    /// point from its newest one. Default none.
    #[serde(default)]
    pub checkpoint_every: Option<usize>,
    /// Start every point from this checkpoint (a `step-*` folder, relative to the directory
    /// `ulysses run` starts in), at its step. Default none.
    #[serde(default)]
    pub resume_from: Option<PathBuf>,
    /// Compute the loss this many tokens at a time (tiled loss). Default none.
    #[serde(default)]
    pub loss_tile: Option<i64>,
    /// Run each block's MLP this many tokens at a time, recomputing each tile in the backward
    /// (ALST's tiled MLP; not with megatron_sp). At most the tokens a rank holds. Default none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mlp_tile: Option<i64>,
    /// Move each block's input off the device between its forward and its backward (with
    /// `checkpointing = "full"`): "host" (pinned host memory, a GPU run) or "disk" (files under
    /// `offload_dir`). Default none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offload: Option<String>,
    /// The folder "disk" offload writes under (each rank in a folder of its own, removed after
    /// the run), relative to the directory `ulysses run` starts in. Default: the system's
    /// temporary folder.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offload_dir: Option<PathBuf>,
    /// Keep chunked Ulysses' K/V off the device between each layer's forward and backward
    /// (FPDT): "host" (pinned host memory, a GPU run) or "disk" (files under `offload_dir`), for
    /// the points whose strategy is `ulysses_chunked:U` (at least one must be). Default none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offload_kv: Option<String>,
    /// The dtype gradients are reduced in across ranks ("f32", "bf16", ...). Default: f32 for
    /// bf16/f16 gradients, else their own dtype; "bf16" halves the reduction's bytes.
    #[serde(default)]
    pub reduce_dtype: Option<Precision>,
    /// Dynamic loss scaling for f16. Default: initial scale 2^16, halved on overflow, doubled
    /// after 1000 good steps.
    #[serde(default)]
    pub loss_scale: LossScaleConfig,
    /// How rows are filled from a dataset with documents (a text file's paragraphs), or a list
    /// to sweep: "none" (windows of the token stream, documents ignored), "packed" (documents
    /// end to end, attention and labels inside each) or "padded" (one document per row, the
    /// rest padding without labels). Default none.
    #[serde(default = "no_packing", deserialize_with = "super::plan::packings")]
    pub packing: Vec<Packing>,
    /// With packing, give ring attention each batch's own layout, balanced from its documents
    /// (`Documents::balanced_layout`, [`BALANCE_CHUNKS`] chunks per rank) instead of its
    /// contiguous or zigzag shares; the other strategies are balanced by construction (Ulysses,
    /// Megatron-SP) or keep their layout. Default false.
    #[serde(default)]
    pub balance: bool,
}

/// Chunks per rank of a balanced layout (`[train] balance`): N must split into P x this.
pub const BALANCE_CHUNKS: usize = 4;

/// How a row of training data is filled (see [`TrainSpec::packing`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Packing {
    /// Windows of the token stream, across documents.
    #[default]
    None,
    /// Documents end to end; attention, labels and positions inside each.
    Packed,
    /// One document per row, then padding that has no label and that no token attends to.
    Padded,
}

fn no_packing() -> Vec<Packing> {
    vec![Packing::None]
}

fn stage_0() -> Vec<ZeroStage> {
    vec![ZeroStage::NONE]
}

fn one() -> usize {
    1
}
fn yes() -> bool {
    true
}
fn is_true(b: &bool) -> bool {
    *b
}
fn is_auto(l: &Launcher) -> bool {
    *l == Launcher::Auto
}
fn one_i64() -> i64 {
    1
}
fn cpu() -> String {
    "cpu".into()
}
fn timeout() -> u64 {
    300
}
fn sdpa() -> String {
    "sdpa".into()
}
fn causal() -> String {
    "causal".into()
}
fn f32() -> String {
    "f32".into()
}
fn seed() -> u64 {
    1234
}

/// One point of the sweep.
#[derive(Debug, Clone, PartialEq)]
pub struct Point {
    /// Position in the sweep, from 0.
    pub index: usize,
    pub strategy: StrategyConfig,
    /// World size.
    pub ranks: usize,
    pub seq: i64,
    /// Data-parallel replicas (the SP degree is ranks / dp).
    pub dp: usize,
    pub zero: ZeroStage,
    /// Micro-batches per step.
    pub grad_accum: usize,
    /// How rows are filled.
    pub packing: Packing,
    /// A ring on each packed batch's balanced layout (`[train] balance`).
    pub balanced: bool,
}

impl Point {
    /// "ulysses P=4 N=2048", "ulysses_zero3 P=4 N=2048".
    pub fn describe(&self) -> String {
        format!("{} P={} N={}", self.label(), self.ranks, self.seq)
    }

    /// The strategy's label, with the ZeRO stage when there is one: what result tables call
    /// the point's strategy.
    pub fn label(&self) -> String {
        let base = match self.zero.stage() {
            0 => self.strategy.label(),
            z => format!("{}_zero{z}", self.strategy.label()),
        };
        let packed = match self.packing {
            Packing::None => base,
            Packing::Packed => format!("{base}_packed"),
            Packing::Padded => format!("{base}_padded"),
        };
        if self.balanced {
            format!("{packed}_balanced")
        } else {
            packed
        }
    }
}

/// An error about one field of the config, saying how to fix it.
pub(super) fn field_error(field: &str, msg: String) -> Error {
    Error::InvalidArgument { op: "experiment config", group: field.to_string(), msg }
}

impl ExperimentConfig {
    /// Parses and checks a config (TOML text); `source` names it in messages.
    pub fn parse(text: &str, source: &str) -> Result<ExperimentConfig> {
        let cfg: ExperimentConfig = toml::from_str(text).map_err(|e| Error::InvalidArgument {
            op: "experiment config",
            group: source.to_string(),
            msg: e.to_string().trim_end().to_string(),
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Reads, parses and checks a config file.
    pub fn load(path: &Path) -> Result<ExperimentConfig> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| field_error("-", format!("cannot read {}: {e}", path.display())))?;
        ExperimentConfig::parse(&text, &path.display().to_string())
    }

    /// The config as TOML (what a run records next to its results).
    pub fn to_toml(&self) -> Result<String> {
        toml::to_string_pretty(self).map_err(|e| field_error("-", format!("cannot write the config: {e}")))
    }
}
