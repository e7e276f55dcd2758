//! Memory per rank: model states by ZeRO stage, the activations this toolkit's GPT keeps for the
//! backward under each strategy, the loss, the buffers, as named terms.
//!
//! Activations follow Korthikanti et al. 2022 (§4: per layer `sbh(34 + 5as/h)` in 16-bit with
//! dropout; sequence-parallel regions `/t`), written for what this code actually keeps: every
//! tensor an autograd node or a tape record holds, in the activation dtype (statistics and
//! log-sum-exps in f32), no dropout masks. Sequence-sharded parts hold `s/P` tokens; after
//! Ulysses' all-to-all, `N` tokens for `H/P` heads (the same count); Megatron-SP here keeps its
//! gathered `[N, h]` tensors and the reduce-scatter inputs on the tape, which Megatron-LM
//! re-gathers instead. A flash kernel keeps no `s^2` term (its output and log-sum-exp instead);
//! full checkpointing keeps only each block's input, and one block's activations come back
//! during its recomputation. Peak = states + the larger of (activations + one backward's working
//! set) and (the end-of-step reduction's buffers).

use crate::attention::{HeadPlan, StrategyConfig};
use crate::model::{MlpKind, NormKind};
use crate::train::Checkpointing;
use crate::Result;

use super::flops::{attention_work, AttnImpl, Kernels};
use super::hardware::Hardware;
pub use super::zero::{params_on_rank, ParamCount};
use super::Job;

/// One named amount of memory.
#[derive(Debug, Clone, PartialEq)]
pub struct Term {
    pub name: &'static str,
    pub bytes: f64,
}

/// Memory of one rank at its peak, by component.
#[derive(Debug, Clone, PartialEq)]
pub struct MemoryReport {
    /// Parameters, gradients, optimizer states (by ZeRO stage).
    pub states: Vec<Term>,
    /// What the forward keeps for the backward, all layers (under checkpointing: block inputs).
    pub activations: Vec<Term>,
    /// The transient on top at the peak: the loss, one block's recomputation, one backward's
    /// working set, ZeRO-3's gathered block, or the end-of-step reduction; and the kernel
    /// libraries' workspace.
    pub transient: Vec<Term>,
    /// Resident memory of the rank's process that is no tensor, counted once (not times the
    /// allocator's slack): the library code a fresh process pages in over its first step, for CPU
    /// ranks that are processes of their own. Empty on a GPU and for thread ranks.
    pub process: Vec<Term>,
    /// Bytes of live tensors at the peak (as a device allocator's peak counts them).
    pub peak_bytes: f64,
    /// Resident memory at the peak: the parameters, everything allocated after them times the
    /// allocator's slack, and the process's own pages. What must fit, and what a host's peak RSS
    /// measures.
    pub resident_bytes: f64,
    /// What one rank may use: the device's memory less what the framework reserves (shared by
    /// the node's ranks on a CPU).
    pub capacity_bytes: f64,
    /// What the rank keeps in host memory at the peak (offload's block inputs), and what one
    /// device may keep there (the node's host memory over its devices; `None` where the
    /// hardware file gives no host). Fitting needs both.
    pub host_bytes: f64,
    pub host_capacity_bytes: Option<f64>,
    pub fits: bool,
}

impl MemoryReport {
    fn sum(terms: &[Term]) -> f64 {
        terms.iter().map(|t| t.bytes).sum()
    }

    /// The resident peak above the parameters: what a run measures as its step's memory once
    /// the model is built (peak RSS above the RSS after the build).
    pub fn above_parameters(&self) -> f64 {
        self.resident_bytes - self.states.first().map_or(0.0, |t| t.bytes)
    }

    /// Every term, for tables.
    pub fn all_terms(&self) -> Vec<&Term> {
        self.states.iter().chain(&self.activations).chain(&self.transient).chain(&self.process).collect()
    }
}

fn t(name: &'static str, elements: f64, bytes_per: f64) -> Term {
    Term { name, bytes: elements * bytes_per }
}

/// Activations one layer keeps on rank `r` (SP rank) for one micro-batch, without checkpointing.
pub fn layer_activations(job: &Job, r: usize, device: impl Into<Kernels>) -> Result<Vec<Term>> {
    let device: Kernels = device.into();
    let c = &job.model;
    let es = job.element_bytes();
    let (b, n, p) = (job.micro_batch as f64, job.seq as f64, job.sp() as f64);
    let (h, d) = (c.n_embd as f64, c.head_dim() as f64);
    let (hq, hkv) = (c.n_head as f64, c.n_kv_head as f64);
    let kvd = hkv * d;
    // What the MLP keeps per token: GELU its input and output (2F); SwiGLU the [2F] projection
    // (gate and up are views of it), silu(gate) and the product (4F).
    let (mlp_kept, mlp_name) = match c.mlp {
        MlpKind::Gelu => (2.0 * c.ffn() as f64, "MLP in and GELU outputs"),
        MlpKind::Swiglu => (4.0 * c.ffn() as f64, "MLP in (gate and up), silu(gate), product"),
    };
    // Tiled (not with Megatron-SP, which refuses it): only the MLP's [t, h] output, which the
    // tape holds as a taped op's output; its input is the norm's output, kept either way.
    let (mlp_kept, mlp_name) = if job.mlp_tile.is_some() {
        (h, "tiled MLP output (held by the tape)")
    } else {
        (mlp_kept, mlp_name)
    };
    let tok = b * super::bytes::layout(job)?.len(r) as f64; // this rank's tokens
    let big = b * n; // every token
    let a = attention_work(job, r, device)?;
    let scores = |heads: f64| match a.implementation {
        AttnImpl::Dense { stores_scores: true } => {
            t("attention probabilities (s^2)", heads * b * a.rows * a.keys, 4.0f64.max(es))
        }
        AttnImpl::Blocked => {
            t("attention probabilities of the visible blocks", heads * b * a.computed, 4.0f64.max(es))
        }
        // libtorch's fused kernels take a boolean mask as an additive one in the activation dtype,
        // [rows, keys] shared by the batch and the heads, and keep it for the backward.
        AttnImpl::Dense { stores_scores: false } => t("additive mask [rows, keys]", a.rows * a.keys, es),
        _ => t("attention log-sum-exp", heads * b * a.rows, 4.0),
    };
    let selective = job.checkpointing == Checkpointing::Selective;
    let scores = |heads: f64| {
        if selective && a.implementation != AttnImpl::Flash {
            t("attention log-sum-exp", 0.0, 4.0)
        } else {
            scores(heads)
        }
    };
    let mut v =
        vec![t("block input (residual stream)", tok * h, es), t("layer norm statistics", 4.0 * tok, 4.0)];
    v.extend(rms_norm_terms(c, 2.0 * tok, es));
    let tp = job.strategy == StrategyConfig::MegatronSp;
    if tp {
        // Korthikanti's layout with t = P: the column-parallel linears keep their input's shard
        // and gather it again in the backward (as Megatron-LM); the tape keeps no collective's
        // input, so neither the gathered [N, h] inputs nor the reduce-scatters' partial sums stay.
        v.extend([
            t("layer norm outputs (all-gather inputs, re-gathered in the backward)", 2.0 * tok * h, es),
            t("qkv projection output", big * (h + 2.0 * kvd) / p, es),
            t("RoPE'd q and k", big * (h + kvd) / p, es),
            t("attention output and its reshaped copy", 2.0 * big * h / p, es),
            scores(hq / p),
            t("reduce-scatter outputs", 2.0 * tok * h, es),
            t("residual after attention", tok * h, es),
            t(mlp_name, big * mlp_kept / p, es),
        ]);
        if hq != hkv {
            v.push(t("k, v expanded to the query heads", 2.0 * big * h / p, es));
        }
        return Ok(v);
    }
    v.extend([
        t("layer norm 1 and 2 outputs", 2.0 * tok * h, es),
        t("residual after attention", tok * h, es),
        t(mlp_name, tok * mlp_kept, es),
        t("attention output (projection input)", tok * h, es),
    ]);
    // q, k, v before the strategy. A kernel that keeps its inputs (one device) keeps the RoPE'd
    // q and k and, through v (a view of it), the fused projection. The tape keeps no collective's
    // input (gradient edges only): behind an all-to-all only its outputs stay, kept by the
    // kernel; ring attention keeps q, k and a compact copy of v.
    let projected =
        vec![t("qkv projection output", tok * (h + 2.0 * kvd), es), t("RoPE'd q and k", tok * (h + kvd), es)];
    let heads = a.heads as f64;
    match job.strategy {
        StrategyConfig::Single => {
            v.extend(projected);
            v.push(t("attention output", big * h, es));
            v.push(scores(hq));
            if hq != hkv {
                v.push(t("k, v expanded to the query heads", 2.0 * big * h, es));
            }
        }
        StrategyConfig::Ulysses => {
            let plan = HeadPlan::new(c.n_head, c.n_kv_head, job.sp())?;
            let kv_r = plan.kv_split()[r] as f64;
            v.push(t("q, k, v after the all-to-all", big * (heads + 2.0 * kv_r) * d, es));
            v.push(t("attention output (before the all-to-all)", big * heads * d, es));
            v.push(scores(heads));
            if hq != hkv {
                v.push(t("k, v expanded to the query heads", 2.0 * big * heads * d, es));
            }
        }
        StrategyConfig::UlyssesChunked { .. } => {
            // What the chunked op keeps of every chunk for its backward: q and K/V as their
            // all-to-all delivered them (the rank's own kv heads, not expanded), the output and
            // log-sum-exp in the accumulation dtype. Its output, the chunks sent back, is the
            // projection's input (counted above). With K/V offload all of it waits in host
            // memory instead.
            if !job.kv_offload {
                let kv_r = HeadPlan::new(c.n_head, c.n_kv_head, job.sp())?.kv_split()[r] as f64;
                v.push(t("q, k, v after the all-to-all", big * (heads + 2.0 * kv_r) * d, es));
                v.push(t("chunk outputs (f32)", big * heads * d, 4.0f64.max(es)));
                v.push(t("chunk log-sum-exp", big * heads, 4.0));
            }
        }
        StrategyConfig::Ring { .. } | StrategyConfig::Usp { .. } => {
            // Ring tokens: the rank's share (ring) or its ring chunk after the all-to-all (USP).
            let ring_tok = b * n / a.calls;
            if let StrategyConfig::Usp { ulysses, .. } = job.strategy {
                let plan = HeadPlan::new(c.n_head, c.n_kv_head, ulysses)?;
                let kv_u = plan.kv_split()[r % ulysses] as f64;
                v.push(t("q, k, v after the all-to-all", ring_tok * (heads + 2.0 * kv_u) * d, es));
            } else {
                v.push(t("RoPE'd q and k, a compact copy of v", tok * (h + 2.0 * kvd), es));
            }
            if matches!(a.implementation, AttnImpl::Dense { .. }) {
                // A ring that materialises its scores (ColossalAI's, a baseline): the rank's rows
                // against every key, kept for the backward, and its output.
                v.push(scores(heads));
                v.push(t("attention output", ring_tok * heads * d, es));
            } else {
                v.push(t("ring output accumulator (f32)", ring_tok * heads * d, 4.0));
                v.push(t("attention log-sum-exp", ring_tok * heads, 4.0));
                if es < 4.0 {
                    v.push(t("ring output in the activation dtype", ring_tok * heads * d, es));
                }
            }
        }
        StrategyConfig::AllGatherKv { .. } => {
            v.push(t("RoPE'd q", tok * h, es));
            v.push(t("K, V gathered [N]", 2.0 * big * kvd, es));
            if hq != hkv {
                v.push(t("k, v expanded to the query heads", 2.0 * big * h, es));
            }
            if matches!(a.implementation, AttnImpl::Dense { stores_scores: true }) {
                // libtorch's math path keeps q and k scaled, the probabilities and v
                v.push(t("scaled q and k", tok * h + big * h, es));
            }
            v.push(t("attention output", tok * h, es));
            v.push(scores(hq));
        }
        StrategyConfig::MegatronSp => unreachable!("handled above"),
    }
    Ok(v)
}

/// What RMSNorms over `rows` token rows keep besides their input (measured on libtorch 2.11's
/// composite `rms_norm` with saved-tensor hooks): the normalised rows before the weight, in f32,
/// and for 16-bit inputs also the f32 copy of the input it computes from. LayerNorm keeps only
/// its statistics (counted apart).
fn rms_norm_terms(c: &crate::model::GptConfig, rows: f64, es: f64) -> Vec<Term> {
    let h = c.n_embd as f64;
    match c.norm {
        NormKind::Layernorm => vec![],
        NormKind::Rmsnorm if es < 4.0 => {
            vec![t("RMSNorm normalised rows (f32)", rows * h, 4.0), t("RMSNorm inputs in f32", rows * h, 4.0)]
        }
        NormKind::Rmsnorm => vec![t("RMSNorm normalised rows (f32)", rows * h, 4.0)],
    }
}

/// The largest net growth over the saved activations while one layer runs backward: autograd
/// frees each op's saved tensors right after the op, so the growth is about one gradient of the
/// widest tensor plus the residual stream's gradient (MLP: one `[t, 4h]`; Ulysses' attention:
/// the three q, k, v gradients before their all-to-all is inverted; Megatron-SP: the gathered
/// `[N, h]` gradient; ring attention: its f32 dQ, dK, dV).
fn backward_working_set(job: &Job, r: usize, device: impl Into<Kernels>) -> Result<f64> {
    let device: Kernels = device.into();
    let c = &job.model;
    let es = job.element_bytes();
    let (b, n, p) = (job.micro_batch as f64, job.seq as f64, job.sp() as f64);
    // the widest MLP tensor: the first projection's output (SwiGLU: gate and up)
    let (h, d, f) = (c.n_embd as f64, c.head_dim() as f64, c.mlp_in_width() as f64);
    let tok = b * super::bytes::layout(job)?.len(r) as f64;
    let a = attention_work(job, r, device)?;
    let core = b * a.rows.max(tok) * a.heads as f64 * d; // one of q, k, v as the kernel sees it
                                                         // The MLP's widest gradient; tiled, one tile's recomputed intermediates and their gradient.
    let mlp = job.mlp_tile.map_or(tok * f, |tile| (tile as f64).min(tok) * 2.0 * f);
    // Chunked Ulysses' backward takes one query chunk at a time: its output gradient, dq and
    // delta (f32), the key chunk in hand expanded to the query heads (and, offloaded, the chunk's
    // q, output and log-sum-exp taken back and two key chunks' compact K/V: the one in hand, the
    // one coming); dk and dv of every key chunk sum (f32, the rank's kv heads) until their last
    // query chunk; the gradients sent back fill the rank's [s_r] rows. By its end the query
    // chunks done have given up their q, output and log-sum-exp (each taken at its turn), which
    // the layer's activations count whole: there all but one chunk's of them come off, while the
    // gradients sent back are whole; the K/V stay to the last query chunk that sees them (the
    // last one, under a causal mask). The peak is the larger of its start (the sums counted
    // whole: an upper bound) and its end.
    Ok(match job.strategy {
        StrategyConfig::UlyssesChunked { chunks } => {
            let heads = a.heads as f64;
            let kv_r = HeadPlan::new(c.n_head, c.n_kv_head, job.sp())?.kv_split()[r] as f64;
            let chunk = b * n / chunks as f64;
            let query = chunk * heads * (2.0 * d * 4.0 + 4.0) + 2.0 * chunk * heads * d * es;
            let away = if job.kv_offload {
                chunk * heads * (d * (es + 4.0) + 4.0) + 2.0 * 2.0 * chunk * kv_r * d * es
            } else {
                0.0
            };
            let sums = 2.0 * b * n * kv_r * d * 4.0;
            let sent = tok * (h + 2.0 * c.n_kv_head as f64 * d) * es;
            // [b, N, H_r] q (es), output (f32) and log-sum-exp: counted whole in the activations
            // unless offloaded (then `away` holds the one chunk back on the device).
            let done = if job.kv_offload {
                0.0
            } else {
                (chunks as f64 - 1.0) / chunks as f64 * b * n * heads * (d * es + d * 4.0f64.max(es) + 4.0)
            };
            ((mlp + tok * h) * es).max(query + away + sums + (sent - done).max(0.0))
        }
        StrategyConfig::MegatronSp => (b * n * f / p + b * n * h) * es,
        // The gradient of a materialised score matrix while the softmax's backward runs.
        StrategyConfig::Ring { .. } if matches!(a.implementation, AttnImpl::Dense { .. }) => {
            (b * a.heads as f64 * a.rows * a.keys * 4.0f64.max(es)).max((mlp + tok * h) * es)
        }
        StrategyConfig::Ring { .. } => ((mlp + tok * h) * es).max(3.0 * tok * h * 4.0),
        _ => ((mlp + tok * h) * es).max(3.0 * core * es),
    })
}

/// What chunked Ulysses' offload keeps in host memory per layer: every chunk's q and K/V (the
/// rank's own kv heads) in the activation dtype, its output and log-sum-exp in the accumulation
/// dtype.
pub fn kv_offload_bytes_per_layer(job: &Job, r: usize) -> Result<f64> {
    if !(job.kv_offload && matches!(job.strategy, StrategyConfig::UlyssesChunked { .. })) {
        return Ok(0.0);
    }
    let c = &job.model;
    let plan = HeadPlan::new(c.n_head, c.n_kv_head, job.sp())?;
    let (heads, kv_r) = (plan.q_split()[r % job.sp()] as f64, plan.kv_split()[r % job.sp()] as f64);
    let (big, d, es) = (job.micro_batch as f64 * job.seq as f64, c.head_dim() as f64, job.element_bytes());
    Ok(big * ((heads + 2.0 * kv_r) * d * es + heads * d * 4.0f64.max(es) + heads * 4.0))
}

/// The key chunks chunked Ulysses' offload reads back (the store keeping them) per layer: in the
/// forward each query chunk reads the key chunks it sees that arrived before it, in the backward
/// each query chunk reads those it is not the last to see (`ChunkedUlysses::offload_reads`).
/// Bytes of the rank's compact K/V: (forward, backward).
pub fn kv_offload_read_bytes_per_layer(job: &Job, r: usize) -> Result<(f64, f64)> {
    let StrategyConfig::UlyssesChunked { chunks } = job.strategy else { return Ok((0.0, 0.0)) };
    if !job.kv_offload {
        return Ok((0.0, 0.0));
    }
    let c = &job.model;
    let kv_r = HeadPlan::new(c.n_head, c.n_kv_head, job.sp())?.kv_split()[r % job.sp()] as f64;
    let (b, d, es) = (job.micro_batch as f64, c.head_dim() as f64, job.element_bytes());
    let chunk_kv = 2.0 * b * job.seq as f64 / chunks as f64 * kv_r * d * es;
    let (fwd, back) =
        crate::attention::ChunkedUlysses::offload_reads(&job.attention.mask, job.seq, job.sp(), chunks)?;
    Ok((fwd as f64 * chunk_kv, back as f64 * chunk_kv))
}

/// The MPI backend's staging buffers (`comm::staging`), kept from the first step on: one per
/// peer and direction, as large as the largest strided chunk that peer's slot carried. In a
/// Ulysses all-to-all of the rank's `tok` tokens (a chunk's, for chunked Ulysses) over a group of
/// `g`, the largest is q's (and the output's) `H/g` heads: packed going out, received coming
/// back, for each of the `g - 1` peers. Other strategies send contiguous slabs.
fn staging_bytes(job: &Job, tok: f64) -> f64 {
    let c = &job.model;
    let (hq, d, es) = (c.n_head as f64, c.head_dim() as f64, job.element_bytes());
    let (g, tokens) = match job.strategy {
        StrategyConfig::Ulysses => (job.sp(), tok),
        StrategyConfig::UlyssesChunked { chunks } => (job.sp(), tok / chunks as f64),
        StrategyConfig::Usp { ulysses, .. } => (ulysses, tok),
        _ => return 0.0,
    };
    let g = g as f64;
    // 2 directions x (g - 1) peers x [tokens, H/g, d]
    2.0 * (g - 1.0) * tokens * (hq / g).ceil() * d * es
}

/// The memory report of global rank `r`.
pub fn memory(job: &Job, r: usize, hw: &Hardware) -> Result<MemoryReport> {
    let c = &job.model;
    let es = job.element_bytes();
    let sp_rank = r % job.sp();
    let tok = job.micro_batch as f64 * super::bytes::layout(job)?.len(sp_rank) as f64;
    let (h, v, l) = (c.n_embd as f64, c.vocab_size as f64, c.n_layer as f64);
    let params = params_on_rank(job);
    let (pb, mut gb, mut ob) = super::zero::model_states(job, &params);
    // A baseline whose optimizer shards its tensor-parallel slices' states over the data-parallel
    // ranks too (Megatron-LM's distributed optimizer), where this toolkit keeps them whole.
    let distributed = hw.baseline().is_some_and(|b| b.distributed_optimizer);
    if distributed && job.zero.partitions_optimizer() && job.dp > 1 {
        let (_, _, per_param) = super::zero::state_bytes(job.precision, job.optimizer);
        ob -= per_param * params.sharded * (1.0 - 1.0 / job.dp as f64);
    }
    // ZeRO-Offload: the optimizer's states and an f32 copy of the gradient partition wait in host
    // memory; from stage 2 the device keeps no gradient partition (each reduced bucket goes to
    // the host as it completes, its buffers counted with the reduction's).
    let offloaded_optimizer = if job.optimizer_offload {
        let (_, _, per_param) = super::zero::state_bytes(job.precision, job.optimizer);
        let partition = if per_param > 0.0 { ob / per_param } else { 0.0 };
        let host = ob + 4.0 * partition;
        if job.zero.partitions_gradients() {
            gb = 0.0;
        }
        ob = 0.0;
        host
    } else {
        0.0
    };
    let states = vec![
        Term { name: "parameters", bytes: pb },
        Term { name: "gradients", bytes: gb },
        Term { name: "optimizer states", bytes: ob },
    ];

    let layer = layer_activations(job, sp_rank, hw.kernels())?;
    let layer_bytes: f64 = layer.iter().map(|t| t.bytes).sum();
    let full = job.checkpointing == Checkpointing::Full;
    let mut activations: Vec<Term> = if full && job.offload {
        vec![t(
            "block inputs on the device (offload: the one in use, the one coming)",
            l.min(2.0) * tok * h,
            es,
        )]
    } else if full {
        vec![t("block inputs (checkpoints)", l * tok * h, es)]
    } else {
        layer.iter().map(|x| Term { name: x.name, bytes: x.bytes * l }).collect()
    };
    activations.push(t("final layer norm input and output", 2.0 * tok * h, es));
    activations.extend(rms_norm_terms(c, tok, es));
    if job.loss_tile.is_none() {
        activations.push(t("log-softmax output (f32)", tok * v, 4.0));
    }

    // The transient at the activation peak: the loss's logits and gradients, or one block's
    // recomputed activations plus its backward's working set.
    // The loss's tokens at once: all of them, or one tile (the tiled loss's forward and its
    // hand-written backward each hold one tile's logits and their f32 copy or gradient).
    let lt = job.loss_tile.map_or(tok, |tile| (tile as f64).min(tok));
    let cast = if es < 4.0 { lt * v * 4.0 } else { 0.0 };
    let loss = (lt * v * es + cast).max(2.0 * lt * v * 4.0 + if es < 4.0 { lt * v * es } else { 0.0 });
    let block = if full { layer_bytes } else { 0.0 } + backward_working_set(job, sp_rank, hw.kernels())?;
    let mut transient = vec![if loss >= block {
        Term { name: "logits and loss gradients", bytes: loss }
    } else {
        Term {
            name: if full {
                "one block recomputed + its backward"
            } else {
                "one block's backward working set"
            },
            bytes: block,
        }
    }];
    if job.zero.partitions_parameters() {
        // The trainer gathers each block in turn, but the embedding/head unit (the last) stays
        // gathered, with its gradients, from the head's backward to the embedding's.
        let (rest, blocks) = params.blocks.split_last().map_or((0, &[][..]), |(r, b)| (*r, b));
        let biggest = blocks.iter().copied().max().unwrap_or(0) as f64;
        transient.push(Term {
            name: "gathered parameters and gradients: embedding/head and one block (ZeRO-3)",
            bytes: 2.0 * (rest as f64 + biggest) * es,
        });
    }
    // End of the step, activations freed: the reduction's buffers, bucketed. Stages 0-1
    // all-reduce with two buckets in flight (each its copy in the reduction dtype and the slots
    // the ranks send it) and the reduced part of the one completing; stages 2-3 reduce-scatter
    // one bucket of 1/W at a time (its copy, the slots, this rank's part).
    let w = job.ranks as f64;
    let (r, bucket) = (params.replicated, job.bucket_elems as f64);
    let elems = if job.zero.partitions_gradients() {
        (2.0 + 1.0 / w) * r.min((bucket / w).max(1.0))
    } else {
        2.0 * r.min(crate::comm::BUCKETS_IN_FLIGHT as f64 * bucket) + r.min(bucket) / w
    };
    let reduction = if job.ranks > 1 { elems * job.reduce_bytes() as f64 } else { 0.0 };
    let act_peak = MemoryReport::sum(&activations) + MemoryReport::sum(&transient);
    if reduction > act_peak {
        activations.clear();
        transient = vec![Term { name: "gradient reduction buffers", bytes: reduction }];
    }
    let gib = (1u64 << 30) as f64;
    if hw.device.kind == super::hardware::DeviceKind::Cpu && job.backend == "mpi" {
        transient.push(Term {
            name: "MPI staging buffers (strided all-to-all chunks)",
            bytes: staging_bytes(job, tok),
        });
    }
    transient.push(Term { name: "kernel library workspace", bytes: hw.device.workspace_gib * gib });
    let peak_bytes =
        MemoryReport::sum(&states) + MemoryReport::sum(&activations) + MemoryReport::sum(&transient);
    // A rank in a process of its own (MPI) starts in a fresh process, whose first step pages in
    // the kernels' code; thread ranks share a process that has stepped before (a run's points
    // run one after another in it).
    let own_process = hw.device.kind == super::hardware::DeviceKind::Cpu && job.backend != "local";
    let process = if own_process && hw.device.code_pages_gib > 0.0 {
        vec![Term { name: "library code a fresh process pages in", bytes: hw.device.code_pages_gib * gib }]
    } else {
        Vec::new()
    };
    let resident_bytes = pb + (peak_bytes - pb) * hw.device.allocator_slack + MemoryReport::sum(&process);
    let mut capacity_bytes = (hw.device.memory_gib - hw.reserved_gib()) * gib;
    if hw.node.shared_memory {
        capacity_bytes /= job.ranks.min(hw.node.devices_per_node) as f64;
    }
    // Offload keeps every block's input in host memory after the forward: the node's devices
    // share its host memory.
    // Chunked Ulysses' K/V: every layer's after the forward, or under full checkpointing one
    // layer's (it goes out in the block's recomputation and comes back in its backward).
    let kv_layers = if full { 1.0 } else { l };
    let host_bytes = if full && job.offload { l * tok * h * es } else { 0.0 }
        + kv_layers * kv_offload_bytes_per_layer(job, sp_rank)?
        + offloaded_optimizer;
    let host_capacity_bytes = hw
        .host
        .as_ref()
        .map(|host| host.memory_gib * gib / job.ranks.clamp(1, hw.node.devices_per_node.max(1)) as f64);
    let host_fits = host_capacity_bytes.is_none_or(|cap| host_bytes <= cap);
    Ok(MemoryReport {
        states,
        activations,
        transient,
        process,
        peak_bytes,
        resident_bytes,
        capacity_bytes,
        host_bytes,
        host_capacity_bytes,
        fits: resident_bytes <= capacity_bytes && host_fits,
    })
}
