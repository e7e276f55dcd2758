//! The cost model: step time and memory per GPU for every strategy, from the model's shapes
//! and a hardware description (docs/design.md §5.1).
//!
//! No multi-GPU machine is available to this project, so paper-scale numbers come from an
//! analytical model whose inputs are either measured here (`ulysses calibrate`) or public
//! hardware figures (`hardware/*.toml`), and which is checked against every run that can be
//! measured. Each part is a small pure function of plain structs, named after what it counts:
//!
//! - [`flops`]: FLOPs in two conventions (model FLOPs over the visible pairs; the
//!   Megatron-DeepSpeed count the paper reports), and each rank's work by op class;
//! - [`bytes`]: the bytes every collective of a step sends, per rank, exactly as the library's
//!   counters count them (the tests compare the two) - one source of truth for volumes;
//! - [`memory`]: model states by ZeRO stage, activations per strategy, buffers, logits;
//! - [`network`]: where each group sits (inside a node or across nodes) and the alpha-beta
//!   price of each collective on its links;
//! - [`step`]: a [`Prediction`] for one [`Job`]: time with its breakdown, throughput in both
//!   conventions, MFU, memory by component, fits or not;
//! - [`search`]: the best setting that fits (the paper ran each system "at its best"), and the
//!   longest sequence that fits;
//! - [`occupancy`]: how full a fused attention kernel's grid keeps a GPU's SMs;
//! - [`hardware`]: machines as data, checked field by field;
//! - [`calibrate`]: measuring this machine's kernels and links into a hardware file.
//!
//! What the model leaves out is listed in docs/cost-model.md ("The paper at paper scale").

pub mod bytes;
pub mod calibrate;
mod calibrate_host;
mod display;
pub mod flops;
pub mod hardware;
mod hardware_check;
pub mod memory;
pub mod network;
pub mod occupancy;
pub mod search;
pub mod software;
pub mod step;
mod strategy_bytes;
pub mod work;
pub mod zero;

pub use bytes::{CommCall, GroupRole, Phase};
pub use flops::megatron_flops;
pub use hardware::Hardware;
pub use memory::{MemoryReport, Term};
pub use search::{best, every_strategy, max_seq, SearchSpace};
pub use software::{Band, Software};
pub use step::{predict, Prediction};

use serde::{Deserialize, Serialize};

use crate::attention::{AttentionConfig, StrategyConfig};
use crate::model::GptConfig;
use crate::train::{Checkpointing, Precision, ZeroStage};
use crate::{Error, Result};

/// One training job to predict: a model, a strategy on `ranks` devices, the batch, the
/// sequence, the training plan, and which network of the hardware file carries it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Job {
    pub model: GptConfig,
    pub strategy: StrategyConfig,
    /// Kernel and mask of the local attention.
    pub attention: AttentionConfig,
    /// Devices (world size), `dp x sp`.
    pub ranks: usize,
    /// Data-parallel degree; the sequence-parallel degree is `ranks / dp`.
    pub dp: usize,
    /// Sequences per data-parallel replica per micro-step.
    pub micro_batch: i64,
    /// Micro-steps per optimizer step (gradient accumulation). Default 1.
    pub grad_accum: i64,
    /// Global sequence length N.
    pub seq: i64,
    pub precision: Precision,
    pub checkpointing: Checkpointing,
    /// ZeRO stage over all `ranks` (SP x DP, DeepSpeed's `seq_data_parallel_group`).
    pub zero: ZeroStage,
    /// Whether the step updates the weights (AdamW); throughput runs without it do not keep
    /// optimizer states.
    pub optimizer: bool,
    /// The hardware file's network this job communicates on: "nccl", "local", "mpi".
    pub backend: String,
    /// libtorch intra-op threads per rank (CPU).
    pub threads_per_rank: usize,
    /// Overlap ZeRO's gathers and reduce-scatters, the gradient reduction and ring attention's
    /// K/V passes with compute. Never assumed: off unless asked for.
    pub overlap: bool,
    /// Elements per gradient-reduction bucket (ZeRO stages 0-3), which bounds the extra memory
    /// of the reduction. Default the trainer's, 2^22 (16 MiB in f32).
    pub bucket_elems: i64,
    /// The dtype gradients are reduced in (the trainer's `reduce_dtype`); `None`: f32.
    pub reduce_dtype: Option<Precision>,
    /// Packed documents: the lengths of the documents in each sequence (summing to `seq`), as
    /// the attention work counts them (pairs inside one document, each document a kernel call
    /// for the kernels on whole sequences, each rank's share for a ring); `None`: one document.
    #[serde(default)]
    pub documents: Option<Vec<i64>>,
    /// The MLP run this many tokens at a time (the trainer's `mlp_tile`): its intermediates
    /// kept for one tile only, its forward run once more in the backward; `None`: untiled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mlp_tile: Option<i64>,
    /// Full checkpointing's block inputs offloaded between the forward and the backward (the
    /// trainer's `offload`): two of them on the device at a time (the one in use and the one
    /// coming back), the others in host memory; their copies timed on the hardware's host link
    /// where it gives one (`step::OffloadTime`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub offload: bool,
    /// The loss computed this many tokens at a time (the trainer's `loss_tile`): no `[t, V]`
    /// log-softmax kept, the logits of one tile at a time; `None`: whole.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss_tile: Option<i64>,
    /// Chunked Ulysses' K/V kept off the device between a layer's forward and its backward
    /// (FPDT's offload): every chunk's K/V goes out after the layer's forward, and two chunks'
    /// come back at a time in its backward. Chunked Ulysses only.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub kv_offload: bool,
    /// ZeRO-Offload (Ren et al. 2021, DeepSpeed's `offload_optimizer`): the optimizer's states
    /// and the f32 gradient partition in host memory, the update on the host's CPUs, each
    /// step's gradients out and parameters back over the host link. Predicted only: the
    /// trainer keeps its optimizer on the device. Needs ZeRO stage 1 or more and a hardware
    /// file whose `[host]` gives the host memory's bandwidth.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub optimizer_offload: bool,
}

impl Job {
    /// A job with the defaults of a GPU run: bf16 mixed precision, full checkpointing, ZeRO 0,
    /// no overlap, micro-batch 1, NCCL.
    pub fn new(model: GptConfig, strategy: StrategyConfig, ranks: usize, seq: i64) -> Job {
        Job {
            model,
            strategy,
            attention: AttentionConfig::default(),
            ranks,
            dp: 1,
            micro_batch: 1,
            grad_accum: 1,
            seq,
            precision: Precision::Bf16,
            checkpointing: Checkpointing::Full,
            zero: ZeroStage::NONE,
            optimizer: true,
            backend: "nccl".into(),
            threads_per_rank: 1,
            overlap: false,
            bucket_elems: crate::comm::DEFAULT_BUCKET_ELEMS,
            reduce_dtype: None,
            documents: None,
            mlp_tile: None,
            offload: false,
            loss_tile: None,
            kv_offload: false,
            optimizer_offload: false,
        }
    }

    /// Bytes per element of the gradient reduction: 4 (f32) unless `reduce_dtype` names another.
    pub fn reduce_bytes(&self) -> i64 {
        self.reduce_dtype.map_or(4, |p| p.kind().elt_size_in_bytes() as i64)
    }

    /// The packed documents of each sequence (`documents`), checked: lengths of at least 1
    /// summing to `seq`, under a rule that restarts with each document.
    pub fn packed(&self) -> Result<Option<crate::attention::Documents>> {
        let Some(lengths) = &self.documents else {
            return Ok(None);
        };
        let docs = crate::attention::Documents::from_lengths(self.seq, std::slice::from_ref(lengths))?;
        docs.check("cost", 1, self.seq, &self.attention.mask)?;
        Ok(Some(docs))
    }

    /// The sequence-parallel degree.
    pub fn sp(&self) -> usize {
        self.ranks / self.dp.max(1)
    }

    /// Sequences per optimizer step over the whole job.
    pub fn global_batch(&self) -> i64 {
        self.micro_batch * self.dp as i64 * self.grad_accum
    }

    /// Bytes per element of parameters and activations.
    pub fn element_bytes(&self) -> f64 {
        self.precision.kind().elt_size_in_bytes() as f64
    }

    /// Checks that the job can run: numbers, divisibility, and what the strategy itself refuses
    /// (heads it cannot split, lengths it cannot shard), with the numbers in the message.
    pub fn validate(&self) -> Result<()> {
        let bad = |msg: String| Err(Error::InvalidArgument { op: "cost", group: self.describe(), msg });
        self.model.validate()?;
        if self.ranks == 0 || self.dp == 0 || !self.ranks.is_multiple_of(self.dp) {
            return bad(format!("ranks {} must be a positive multiple of dp {}", self.ranks, self.dp));
        }
        if self.micro_batch < 1 || self.grad_accum < 1 || self.seq < 2 {
            return bad(format!(
                "micro_batch {}, grad_accum {} must be at least 1 and seq {} at least 2",
                self.micro_batch, self.grad_accum, self.seq
            ));
        }
        if self.threads_per_rank == 0 || self.bucket_elems < 1 {
            return bad("threads_per_rank and bucket_elems must be at least 1".into());
        }
        if self.kv_offload && !matches!(self.strategy, StrategyConfig::UlyssesChunked { .. }) {
            return bad(format!(
                "K/V offload is chunked Ulysses' (ulysses_chunked:U); {} keeps no chunks' K/V",
                self.strategy.label()
            ));
        }
        if self.optimizer_offload && (!self.optimizer || self.zero.stage() == 0) {
            return bad(format!(
                "optimizer offload (ZeRO-Offload) moves a partitioned optimizer to the host: it needs \
                 an optimizer (optimizer = {}) and ZeRO stage 1 or more (stage {})",
                self.optimizer,
                self.zero.stage()
            ));
        }
        self.attention.build()?;
        let (h, kv) = (self.model.n_head, self.model.n_kv_head);
        self.strategy.check(self.seq, self.sp(), h, kv)
    }

    /// "ulysses P=32 dp=1 N=131072 b=1 zero3 full bf16".
    pub fn describe(&self) -> String {
        format!(
            "{} sp={} dp={} N={} b={} zero{} {} {}",
            self.strategy.label(),
            self.sp(),
            self.dp,
            self.seq,
            self.micro_batch,
            self.zero.stage(),
            self.checkpointing.name(),
            self.precision.name()
        )
    }
}
