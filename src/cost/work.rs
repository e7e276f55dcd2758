//! The compute of one rank in one micro-step, as named terms by op class: the GEMMs of every
//! layer (forward, the two backward products, and the forward again under full
//! checkpointing), the attention kernel, and the memory-bound ops of this toolkit's GPT
//! (norms, RoPE, residual adds, GELU, the loss, the gradient reduction's copies), counted in
//! passes over tensors: a pass reads or writes every element once.
//!
//! Pass counts follow the code (`model/gpt.rs`, `model/layers.rs`, `attention/*`) op by op;
//! they are this implementation's, not a fused GPU framework's (Megatron fuses bias, GELU and
//! dropout, which the model here does not credit).

use crate::attention::StrategyConfig;
use crate::model::MlpKind;
use crate::train::Checkpointing;
use crate::Result;

use super::flops::{attention_work, AttnImpl, Kernels};
use super::memory::params_on_rank;
use super::occupancy::Call;
use super::Job;

/// What limits a term's speed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum OpClass {
    /// Dense products: FLOPs at the matmul efficiency of their size.
    Matmul,
    /// The fused attention kernel: model FLOPs at the attention efficiency.
    Attention,
    /// Bytes at the memory bandwidth.
    MemoryBound,
    /// The framework's fixed time per layer pass (`size` layer passes, each at the hardware's
    /// `layer_overhead_us`).
    Overhead,
}

impl OpClass {
    pub fn name(self) -> &'static str {
        match self {
            OpClass::Matmul => "matmul",
            OpClass::Attention => "attention",
            OpClass::MemoryBound => "memory_bound",
            OpClass::Overhead => "overhead",
        }
    }
}

/// One named piece of a rank's compute.
#[derive(Debug, Clone, PartialEq)]
pub struct ComputeTerm {
    pub name: &'static str,
    pub class: OpClass,
    /// FLOPs (matmul, attention) of the term.
    pub flops: f64,
    /// Bytes moved (memory-bound terms).
    pub bytes: f64,
    /// Size that picks the efficiency: FLOPs per call (matmul), keys per call (attention).
    pub size: f64,
    pub head_dim: i64,
    /// The kind of memory-bound op (its efficiency may differ by kind, see [`passes`]);
    /// "copy" for plain copies and everything else.
    pub op: &'static str,
    /// Once per optimizer step rather than per micro-step (the update, the reduction).
    pub per_step: bool,
    /// The shape of one kernel call (fused attention), for how full its grid keeps a GPU.
    pub call: Option<Call>,
}

/// Passes over the elements of one op, forward and backward, as this toolkit runs it (a pass
/// reads or writes every element once). `ulysses calibrate` times each kind at the models'
/// sizes and turns the time into an efficiency with these same counts.
pub mod passes {
    /// One LayerNorm on `[t, h]`: forward reads x twice (statistics, normalize) and writes y;
    /// backward reads x, dy and writes dx.
    pub const LAYER_NORM: f64 = 7.0;
    /// RoPE on `[t, heads, d]` (rotate-half: four products, a sum, a difference, a cat), x2
    /// with its backward.
    pub const ROPE: f64 = 18.0;
    /// A residual add on `[t, h]`: 2 reads and a write forward, the gradient's sum backward.
    pub const ADD: f64 = 6.0;
    /// GELU (tanh) on `[t, 4h]`: 2 forward, 3 backward.
    pub const GELU: f64 = 5.0;
    /// SwiGLU on `[t, F]` (gate and up views of the `[t, 2F]` projection): forward silu 2 and
    /// the product 3; backward the product's 5 (gradient, both factors in; both gradients out)
    /// and silu's 3. Timed at GELU's rate (an element-wise activation as well).
    pub const SWIGLU: f64 = 13.0;
    /// Log-softmax and NLL over `[t, V]` in f32, forward and backward.
    pub const CROSS_ENTROPY: f64 = 8.0;
    /// One ring step on the rank's rows (f32): the log-sum-exp merge of the output, per output
    /// element ...
    pub const RING_OUT: f64 = 13.0;
    /// ... and per element of the K/V block: brought heads-first, dK/dV partials summed into
    /// their accumulators.
    pub const RING_KV: f64 = 28.0;
    /// An all-to-all's strided chunks packed into (or unpacked from) the contiguous buffers a
    /// process backend sends (MPI, NCCL): each byte read and written once.
    pub const PACK: f64 = 2.0;
}

fn gemm(name: &'static str, m: f64, k: f64, n: f64, passes: f64) -> ComputeTerm {
    let call = 2.0 * m * k * n;
    ComputeTerm {
        name,
        class: OpClass::Matmul,
        flops: call * passes,
        bytes: 0.0,
        size: call,
        head_dim: 0,
        op: "matmul",
        per_step: false,
        call: None,
    }
}

fn traffic(name: &'static str, op: &'static str, bytes: f64) -> ComputeTerm {
    ComputeTerm {
        name,
        class: OpClass::MemoryBound,
        flops: 0.0,
        bytes,
        size: 0.0,
        head_dim: 0,
        op,
        per_step: false,
        call: None,
    }
}

/// Rank `r`'s compute for one micro-step of `job` (all layers), and the per-step terms.
pub fn rank_work(job: &Job, r: usize, device: impl Into<Kernels>) -> Result<Vec<ComputeTerm>> {
    let device: Kernels = device.into();
    let c = &job.model;
    let (b, l) = (job.micro_batch as f64, c.n_layer as f64);
    let (h, d, v) = (c.n_embd as f64, c.head_dim() as f64, c.vocab_size as f64);
    let (hq, hkv) = (c.n_head as f64, c.n_kv_head as f64);
    let (f, f_in) = (c.ffn() as f64, c.mlp_in_width() as f64);
    let p = job.sp() as f64;
    let es = job.element_bytes();
    let layout_len = super::bytes::layout(job)?.len(r % job.sp()) as f64;
    let t = b * layout_len; // tokens this rank holds
    let recompute = job.checkpointing == Checkpointing::Full;
    let block_passes = if recompute { 4.0 } else { 3.0 }; // forward, 2 backward, (forward again)
    let tp = job.strategy == StrategyConfig::MegatronSp;
    // A tiled MLP runs its forward once more, in the backward.
    let mlp_passes = block_passes + if job.mlp_tile.is_some() { 1.0 } else { 0.0 };
    // Megatron-SP runs the blocks on the gathered sequence with 1/P of the columns.
    let (tb, split) = if tp { (b * job.seq as f64, p) } else { (t, 1.0) };
    let qkv_out = (hq + 2.0 * hkv) * d;
    let mut terms = vec![
        gemm("qkv projection", tb, h, qkv_out / split, block_passes * l),
        gemm("attention output projection", tb, h / split, h, block_passes * l),
        gemm("MLP in", tb, h, f_in / split, mlp_passes * l),
        gemm("MLP out", tb, f / split, h, mlp_passes * l),
        gemm("output head", t, h, v, 3.0),
    ];

    // Attention: model FLOPs 4 d per visible pair forward, x3 with the backward, +1 forward
    // when the block is recomputed (or the kernel's scores, under selective recomputation).
    let a = attention_work(job, r % job.sp(), device)?;
    let heads = a.heads as f64 * b;
    let again =
        recompute || (job.checkpointing == Checkpointing::Selective && a.implementation != AttnImpl::Flash);
    let att_passes = if again { 4.0 } else { 3.0 };
    match a.implementation {
        AttnImpl::Flash => {
            // Causal calls (diagonal blocks) and unmasked ones run at their own efficiencies.
            for (name, pairs, causal) in [
                ("attention (causal blocks)", a.causal, true),
                ("attention (unmasked blocks)", a.visible - a.causal, false),
            ] {
                if pairs > 0.0 {
                    // A causal call is a diagonal block (rows and keys the same span).
                    let rows = if causal { a.keys.min(a.rows) } else { a.rows };
                    let keys = if causal { rows } else { a.keys };
                    terms.push(ComputeTerm {
                        name,
                        class: OpClass::Attention,
                        flops: 4.0 * d * pairs * heads * att_passes * l,
                        bytes: 0.0,
                        size: a.keys,
                        head_dim: a.head_dim,
                        op: if causal { "causal" } else { "unmasked" },
                        per_step: false,
                        call: Some(Call { rows, keys, lanes: heads, causal, forwards: att_passes - 2.0 }),
                    });
                }
            }
        }
        AttnImpl::Dense { .. } | AttnImpl::Blocked => {
            // Scores and the weighted sum as batched GEMMs over the computed pairs; the softmax,
            // mask and their backward as ~12 passes over the f32 scores.
            let per_call = 2.0 * d * a.rows * a.keys * a.heads as f64;
            terms.push(ComputeTerm {
                name: "attention (scores and weighted sum)",
                class: OpClass::Matmul,
                flops: 4.0 * d * a.computed * heads * att_passes * l,
                bytes: 0.0,
                size: per_call,
                head_dim: 0,
                op: "matmul",
                per_step: false,
                call: None,
            });
            terms.push(traffic("attention softmax and mask", "copy", 12.0 * a.computed * heads * 4.0 * l));
        }
    }

    // Memory-bound ops per layer (passes x elements x bytes).
    let (t_att, heads_loc) = if tp { (b * job.seq as f64, (hq + hkv) / p) } else { (t, hq + hkv) };
    let mut per_layer = vec![
        ("layer norms", "layer_norm", 2.0 * passes::LAYER_NORM * t * h * es),
        ("RoPE on q and k", "rope", passes::ROPE * t_att * heads_loc * d * es),
        ("residual adds", "add", 2.0 * passes::ADD * t * h * es),
        match c.mlp {
            MlpKind::Gelu => ("GELU", "gelu", passes::GELU * tb * f / split * es),
            MlpKind::Swiglu => ("SwiGLU", "gelu", passes::SWIGLU * tb * f / split * es),
        },
    ];
    match job.strategy {
        StrategyConfig::MegatronSp => {
            per_layer.push(("row-parallel bias adds", "add", if c.bias { 8.0 * t * h * es } else { 0.0 }));
            per_layer.push(("attention output copy", "copy", 4.0 * tb * h / split * es));
        }
        StrategyConfig::Single => per_layer.push(("attention output copy", "copy", 4.0 * t * h * es)),
        StrategyConfig::Ring { .. } | StrategyConfig::Usp { .. } | StrategyConfig::UlyssesChunked { .. } => {
            // Per ring step: the log-sum-exp merge of the output (f32), K/V brought heads-first,
            // and in the backward the dK/dV accumulators (f32) and the dQ sum. The rank's ring
            // tokens: its share (ring), or its whole ring chunk after the all-to-all (USP).
            let ring_tokens = b * (job.seq as f64) / a.calls;
            let kv_loc = (a.heads as f64 * hkv / hq).max(1.0);
            let per_step =
                (passes::RING_OUT * a.heads as f64 * d + passes::RING_KV * kv_loc * d) * ring_tokens * 4.0;
            per_layer.push(("ring merges and accumulators", "ring", per_step * a.calls));
            per_layer.push(("attention output copy", "copy", 4.0 * t * h * es));
        }
        StrategyConfig::AllGatherKv { .. } => {
            per_layer.push((
                "K/V stack and head expansion",
                "copy",
                (4.0 * t * hkv * d + 4.0 * b * job.seq as f64 * hq * d) * es,
            ));
            per_layer.push(("attention output copy", "copy", 4.0 * t * h * es));
        }
        StrategyConfig::Ulysses => {}
    }
    for (name, op, bytes) in per_layer {
        terms.push(traffic(name, op, bytes * l));
    }
    // A process backend (MPI, NCCL) sends and receives contiguous buffers: an all-to-all's
    // chunks strided along the heads (Ulysses' q, k, v going out, its output and the gradients
    // coming back) are packed before they travel or unpacked after, a copy of the bytes that
    // cross; with b > 1 the sequence side's chunks are strided too, a second copy. Thread ranks
    // copy each chunk straight into place, which the local link's price already holds.
    if job.backend != "local" {
        let crossing: u64 = super::bytes::layers_comm(job, r)?
            .iter()
            .filter(|c| c.op == crate::comm::OpKind::AllToAll)
            .map(|c| c.sent)
            .sum();
        let copies = if job.micro_batch > 1 { 2.0 } else { 1.0 };
        terms.push(traffic(
            "all-to-all pack and unpack copies",
            "a2a_pack",
            passes::PACK * copies * crossing as f64,
        ));
    }
    // The framework's dispatch, per layer: a forward and a backward, and the forward again
    // under full checkpointing (a third of the ops again).
    terms.push(ComputeTerm {
        name: "framework dispatch (per layer)",
        class: OpClass::Overhead,
        flops: 0.0,
        bytes: 0.0,
        size: l * if recompute { 4.0 / 3.0 } else { 1.0 },
        head_dim: 0,
        op: "dispatch",
        per_step: false,
        call: None,
    });
    // Once per micro-step: loss over the vocabulary (f32 log-softmax, its backward, the cast),
    // the embedding and its gradient, gradient accumulation into .grad.
    let cast = if es < 4.0 { 2.0 * t * v * (es + 4.0) } else { 0.0 };
    terms.push(traffic(
        "cross-entropy over the vocabulary",
        "cross_entropy",
        passes::CROSS_ENTROPY * t * v * 4.0 + cast,
    ));
    terms.push(traffic("embedding and its gradient", "copy", 4.0 * t * h * es + v * h * es));
    let local = params_on_rank(job);
    let grad_bytes = if job.precision.is_mixed() { es } else { 4.0f64.max(es) };
    terms.push(traffic(
        "gradient accumulation",
        "add",
        4.0 * (local.replicated + local.sharded) * grad_bytes,
    ));
    // Once per optimizer step: the reduction's flatten / reduce / copy back (f32), and the update
    // (this toolkit's AdamW: 41 passes over f32 per parameter it updates).
    let mut reduce = traffic("gradient reduction copies", "copy", 6.0 * local.replicated * 4.0);
    reduce.per_step = true;
    terms.push(reduce);
    // With ZeRO-Offload the update runs on the host (`step::OptimizerOffload`).
    if job.optimizer && !job.optimizer_offload {
        let updated = if job.zero.partitions_optimizer() {
            local.replicated / job.ranks as f64 + local.sharded
        } else {
            local.replicated + local.sharded
        };
        let mut update = traffic("optimizer update", "add", 41.0 * updated * 4.0);
        update.per_step = true;
        terms.push(update);
    }
    Ok(terms)
}
