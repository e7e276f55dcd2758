//! FLOPs: the two conventions a report must name, and the attention work each rank does.
//!
//! - *Model FLOPs* ([`GptConfig::train_flops`]): `6 x matmul parameters x tokens + 12 x L x h x
//!   visible pairs`, what the GPT computes with an exact kernel (a causal mask halves attention,
//!   a sliding window or block-sparse mask counts only its visible pairs). MFU uses these.
//! - *The Megatron-DeepSpeed convention* ([`megatron_flops`]), which the paper's TFLOP/s use:
//!   full `s^2` attention whatever the mask, and the recomputation of activation checkpointing
//!   counted as work.
//!
//! [`GptConfig::train_flops`]: crate::model::GptConfig::train_flops

use crate::attention::{Documents, HeadPlan, Kernel, Mask, SeqLayout, StrategyConfig};
use crate::model::GptConfig;
use crate::train::Checkpointing;
use crate::Result;

use super::hardware::DeviceKind;
use super::Job;

/// FLOPs of one iteration in the convention of Megatron-DeepSpeed's `throughput_calculator`
/// (the one the Ulysses release reports, Jacobs et al. 2023, §4; Narayanan et al. 2021, §5.1):
///
/// `24 c B s L h^2 (1 + s / (6h) + V / (16 L h))`
///
/// with B the global batch (sequences), s the sequence, c = 4 with activation checkpointing,
/// full or selective (the calculator sets 4 for `--checkpoint-activations` and for either
/// `--recompute-granularity`), and 3 without. Attention is counted as full `s^2` (no causal
/// halving). For a model whose layer is not the paper's `12 h^2` (grouped-query attention, a
/// SwiGLU MLP of F), `12 h^2` is the layer's matrix parameters, as Megatron-LM's own later
/// count does; for the paper's GPTs the two are the same number.
pub fn megatron_flops(cfg: &GptConfig, batch: i64, seq: i64, checkpointing: Checkpointing) -> f64 {
    let c = if checkpointing == Checkpointing::None { 3.0 } else { 4.0 };
    let (s, l, h, v) = (seq as f64, cfg.n_layer as f64, cfg.n_embd as f64, cfg.vocab_size as f64);
    // Per layer, the matrices' parameters: 12 h^2 for the paper's GPTs (qkv 3h^2, output h^2,
    // MLP 8h^2), fewer kv rows with GQA, three F x h matrices with SwiGLU.
    let d = cfg.head_dim() as f64;
    let qkv = (cfg.n_head + 2 * cfg.n_kv_head) as f64 * d;
    let per_layer = h * qkv + h * h + h * cfg.mlp_in_width() as f64 + cfg.ffn() as f64 * h;
    // 24 c B s L h^2 (1 + s/(6h) + V/(16 L h)) with 12 h^2 written as the layer's parameters:
    // 2c per parameter and token, 4c s h per token and layer for attention, 1.5 c h V the head.
    c * batch as f64 * s * (2.0 * l * per_layer + 4.0 * l * s * h + 1.5 * h * v)
}

/// Model FLOPs of one optimizer step of `job` (every rank, every micro-step); packed documents
/// count the pairs inside each (the Megatron-DeepSpeed convention, [`megatron_flops`], counts
/// full `s^2` whatever the packing).
pub fn model_flops(job: &Job) -> f64 {
    let tokens = job.global_batch() * job.seq;
    match job.packed().ok().flatten() {
        Some(docs) => {
            let per_sequence = job.model.train_flops_packed(&docs, &job.attention.mask);
            per_sequence * job.global_batch() as f64
        }
        None => job.model.train_flops(tokens, job.seq, &job.attention.mask),
    }
}

/// How the local attention runs, which decides its time and whether it stores `s^2` scores.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttnImpl {
    /// Tiled (flash): visible pairs only, no score matrix kept (output and log-sum-exp instead).
    Flash,
    /// Every pair of the block computed through a mask; `stores_scores`: the softmax output is
    /// kept for the backward (libtorch's math kernel), otherwise a fused kernel (which keeps the
    /// additive mask and the log-sum-exp).
    Dense { stores_scores: bool },
    /// The blocked kernel: the visible key blocks of every query block, padded to the longest
    /// list, scores of the gathered blocks kept.
    Blocked,
}

/// The attention one rank computes in one layer, per sample.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AttnWork {
    pub implementation: AttnImpl,
    /// Query heads this rank computes.
    pub heads: i64,
    pub head_dim: i64,
    /// (query, key) pairs per head that the mask makes visible (model FLOPs count these).
    pub visible: f64,
    /// Of the visible pairs, those computed by causal kernel calls (diagonal blocks; the rest
    /// by calls on blocks every query sees whole).
    pub causal: f64,
    /// Pairs per head the kernel computes (the padded blocks, the masked dense block).
    pub computed: f64,
    /// Query rows and keys of one kernel call (for the efficiency curves and `s^2` memory).
    pub rows: f64,
    pub keys: f64,
    /// Kernel calls per layer and head group (ring steps that meet a visible block).
    pub calls: f64,
}

/// What runs the attention: the device, and whether a ring materialises its scores (ColossalAI's
/// 2021 ring self-attention, a baseline system: `[rows, N]` scores per head computed whole and
/// kept for the backward, where this toolkit's ring runs flash blocks merged by log-sum-exp).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Kernels {
    pub device: DeviceKind,
    pub ring_scores: bool,
    /// Whether the block-sparse kernel pads every query block to the longest key-block list
    /// (this toolkit's blocked kernel) or computes the layout's blocks only (DeepSpeed's).
    pub sparse_padding: bool,
}

impl From<DeviceKind> for Kernels {
    fn from(device: DeviceKind) -> Kernels {
        Kernels { device, ring_scores: false, sparse_padding: true }
    }
}

/// Which implementation `job`'s strategy and kernel give on `kernels`.
pub fn attention_impl(job: &Job, kernels: impl Into<Kernels>) -> AttnImpl {
    let k: Kernels = kernels.into();
    let dense_mask = !matches!(job.attention.mask, Mask::None | Mask::Causal);
    // libtorch 2.11's SDPA with an explicit mask runs a fused kernel on CPU (flash, the mask made
    // additive) and on CUDA (memory-efficient): every pair computed, no probabilities kept.
    let masked = AttnImpl::Dense { stores_scores: false };
    match job.strategy {
        // Blockwise with libtorch's fused kernel on the visible runs.
        StrategyConfig::Ring { .. } | StrategyConfig::Usp { .. } if k.ring_scores => {
            AttnImpl::Dense { stores_scores: true }
        }
        StrategyConfig::Ring { .. } | StrategyConfig::Usp { .. } => AttnImpl::Flash,
        StrategyConfig::AllGatherKv { .. } if job.attention.mask == Mask::None => AttnImpl::Flash,
        StrategyConfig::AllGatherKv { .. } => masked,
        _ => match job.attention.kernel {
            Kernel::Math => AttnImpl::Dense { stores_scores: true },
            Kernel::Blocked => AttnImpl::Blocked,
            Kernel::Sdpa if dense_mask => masked,
            Kernel::Sdpa => AttnImpl::Flash,
        },
    }
}

/// The attention work of rank `r` in one layer (per sample).
pub fn attention_work(job: &Job, r: usize, device: impl Into<Kernels>) -> Result<AttnWork> {
    let (m, n) = (&job.attention.mask, job.seq);
    let (h, kv, d, p) = (job.model.n_head, job.model.n_kv_head, job.model.head_dim(), job.sp());
    let k: Kernels = device.into();
    let implementation = attention_impl(job, k);
    if let Some(docs) = job.packed()? {
        return packed_work(job, &docs, r, implementation);
    }
    // Whole sequences for `heads` heads: (Ulysses, Megatron-SP, one device).
    let whole = |heads: i64| -> AttnWork {
        let visible = m.visible_pairs(n) as f64;
        let nf = n as f64;
        let computed = match implementation {
            AttnImpl::Flash => visible,
            AttnImpl::Dense { .. } => nf * nf,
            AttnImpl::Blocked if k.sparse_padding => padded_block_pairs(m, n),
            AttnImpl::Blocked => visible_block_pairs(m, n),
        };
        let causal = if m.is_causal() { visible } else { 0.0 };
        AttnWork {
            implementation,
            heads,
            head_dim: d,
            visible,
            causal,
            computed,
            rows: nf,
            keys: nf,
            calls: 1.0,
        }
    };
    // Rank `r`'s rows of a layout against the keys: run by run around a ring (`ring`), or in
    // one call against the whole gathered sequence (all-gather KV).
    let rows_of = |layout: &SeqLayout, r: usize, heads: i64, ring: bool| -> AttnWork {
        let segs = layout.segments(r);
        let visible: f64 = segs.iter().map(|&(s0, len)| m.visible_in_rows(s0, s0 + len, n) as f64).sum();
        let rows: f64 = segs.iter().map(|&(_, len)| len as f64).sum();
        let run = segs.first().map_or(0.0, |&(_, len)| len as f64);
        let dense = implementation != AttnImpl::Flash;
        // A ring meets its own runs with the causal kernel: each run's triangle.
        let causal = if ring && m.is_causal() {
            segs.iter().map(|&(_, len)| (len * (len + 1) / 2) as f64).sum()
        } else {
            0.0
        };
        let (computed, rows, keys, calls) = match (ring, dense) {
            (true, false) => (visible, run, run, layout.ranks() as f64),
            // A ring that materialises its scores: every key of the sequence against the rank's
            // rows, masked after.
            (true, true) => (rows * n as f64, rows, n as f64, layout.ranks() as f64),
            (false, true) => (rows * n as f64, rows, n as f64, 1.0),
            (false, false) => (visible, rows, n as f64, 1.0),
        };
        AttnWork { implementation, heads, head_dim: d, visible, causal, computed, rows, keys, calls }
    };
    Ok(match job.strategy {
        StrategyConfig::Single => whole(h),
        StrategyConfig::Ulysses => whole(HeadPlan::new(h, kv, p)?.q_split()[r]),
        StrategyConfig::MegatronSp => whole(h / p as i64),
        StrategyConfig::Ring { zigzag } => {
            let layout = if zigzag { SeqLayout::zigzag(n, p)? } else { SeqLayout::contiguous(n, p)? };
            rows_of(&layout, r, h, true)
        }
        StrategyConfig::AllGatherKv { zigzag } => {
            let layout = if zigzag { SeqLayout::zigzag(n, p)? } else { SeqLayout::contiguous(n, p)? };
            rows_of(&layout, r, h, false)
        }
        StrategyConfig::Usp { ulysses, zigzag } => {
            // After the Ulysses all-to-all the rank holds its ring chunk for H_u heads; the ring
            // runs over the R ring chunks.
            let ring = p / ulysses;
            let layout = if zigzag { SeqLayout::zigzag(n, ring)? } else { SeqLayout::contiguous(n, ring)? };
            rows_of(&layout, r / ulysses, HeadPlan::new(h, kv, ulysses)?.q_split()[r % ulysses], true)
        }
        StrategyConfig::UlyssesChunked { chunks } => {
            // Every token for the rank's heads, as Ulysses, attended chunk pair by chunk pair:
            // the pairs with a visible entry, each a call on [N/u] x [N/u] (the diagonal ones
            // causal); a dense path computes every entry of those pairs.
            let len = n / chunks as i64;
            let seg = |c: usize| (c as i64 * len, len);
            let pairs: Vec<u64> = (0..chunks)
                .flat_map(|c| (0..chunks).map(move |c2| (c, c2)))
                .map(|(c, c2)| crate::attention::visible_in_block(m, seg(c), seg(c2)))
                .filter(|&v| v > 0)
                .collect();
            let visible: f64 = pairs.iter().map(|&v| v as f64).sum();
            let calls = pairs.len() as f64;
            let computed =
                if implementation == AttnImpl::Flash { visible } else { calls * (len * len) as f64 };
            let causal = if m.is_causal() { (chunks as i64 * len * (len + 1) / 2) as f64 } else { 0.0 };
            AttnWork {
                implementation,
                heads: HeadPlan::new(h, kv, p)?.q_split()[r],
                head_dim: d,
                visible,
                causal,
                computed,
                rows: len as f64,
                keys: len as f64,
                calls,
            }
        }
    })
}

/// [`attention_work`] of a sequence of packed documents (per sample): the kernels on whole
/// sequences run each document on its own (a call per document, its pairs only, a dense kernel
/// materialising each document's `L^2`); a ring or all-gather KV computes, of its rows, the
/// pairs inside one document (blocks of different documents skipped). The efficiency curves
/// take the pair-weighted mean document length as a call's size.
fn packed_work(job: &Job, docs: &Documents, r: usize, implementation: AttnImpl) -> Result<AttnWork> {
    let (m, n) = (&job.attention.mask, job.seq);
    let (h, kv, d, p) = (job.model.n_head, job.model.n_kv_head, job.model.head_dim(), job.sp());
    let lengths = docs.lengths(0);
    let squares: f64 = lengths.iter().map(|&l| (l * l) as f64).sum();
    let typical = squares / n as f64; // sum L^2 / sum L
    let causal = |visible: f64| if m.is_causal() { visible } else { 0.0 };
    let whole = |heads: i64| -> AttnWork {
        let visible = docs.visible_pairs(m) as f64;
        let computed = match implementation {
            AttnImpl::Dense { .. } => squares,
            AttnImpl::Blocked => lengths.iter().map(|&l| visible_block_pairs(m, l)).sum(),
            AttnImpl::Flash => visible,
        };
        AttnWork {
            implementation,
            heads,
            head_dim: d,
            visible,
            causal: causal(visible),
            computed,
            rows: typical,
            keys: typical,
            calls: lengths.len() as f64,
        }
    };
    let rows_of = |layout: &SeqLayout, r: usize, heads: i64, ring: bool| -> AttnWork {
        let visible = docs.work_per_rank(m, layout)[r] as f64;
        let rows: f64 = layout.segments(r).iter().map(|&(_, len)| len as f64).sum();
        let computed = if implementation == AttnImpl::Flash { visible } else { rows * n as f64 };
        let calls = if ring { layout.ranks() as f64 } else { 1.0 };
        AttnWork {
            implementation,
            heads,
            head_dim: d,
            visible,
            causal: causal(visible),
            computed,
            rows: typical.min(rows),
            keys: typical,
            calls,
        }
    };
    let contiguous_or = |zigzag: bool, ranks: usize| {
        if zigzag {
            SeqLayout::zigzag(n, ranks)
        } else {
            SeqLayout::contiguous(n, ranks)
        }
    };
    Ok(match job.strategy {
        StrategyConfig::Single => whole(h),
        StrategyConfig::Ulysses => whole(HeadPlan::new(h, kv, p)?.q_split()[r]),
        StrategyConfig::MegatronSp => whole(h / p as i64),
        StrategyConfig::Ring { zigzag } => rows_of(&contiguous_or(zigzag, p)?, r, h, true),
        StrategyConfig::AllGatherKv { zigzag } => rows_of(&contiguous_or(zigzag, p)?, r, h, false),
        StrategyConfig::Usp { ulysses, zigzag } => {
            let layout = contiguous_or(zigzag, p / ulysses)?;
            rows_of(&layout, r / ulysses, HeadPlan::new(h, kv, ulysses)?.q_split()[r % ulysses], true)
        }
        // Counted as Ulysses' kernels on each document (the chunk pairs cut them further).
        StrategyConfig::UlyssesChunked { .. } => whole(HeadPlan::new(h, kv, p)?.q_split()[r]),
    })
}

/// The block size of a blocked rule (block-sparse: its blocks; a sliding window: its length);
/// `None` for the dense rules, whose every pair a kernel computes.
fn block_of(mask: &Mask) -> Option<i64> {
    match *mask {
        Mask::BlockSparse(b) => Some(b.block),
        Mask::SlidingWindow { window } => Some(window),
        Mask::None | Mask::Causal => None,
    }
}

/// Pairs the blocked kernel computes per head over `n` tokens: every query block times the
/// longest list of visible key blocks (the lists are padded to one length), in block units.
pub fn padded_block_pairs(mask: &Mask, n: i64) -> f64 {
    let Some(block) = block_of(mask) else { return (n as f64) * (n as f64) };
    let nb = (n + block - 1) / block;
    let longest = max_key_blocks(mask, nb);
    (nb * block) as f64 * (longest * block) as f64
}

/// Pairs a block-sparse kernel that computes only the layout's blocks (DeepSpeed's Triton sparse
/// attention) computes per head over `n` tokens: every query block times its own list of
/// visible key blocks, in block units.
pub fn visible_block_pairs(mask: &Mask, n: i64) -> f64 {
    let Some(block) = block_of(mask) else { return (n as f64) * (n as f64) };
    let nb = (n + block - 1) / block;
    let blocks: i64 = (0..nb).map(|qb| key_blocks(mask, nb, qb)).sum();
    blocks as f64 * (block * block) as f64
}

/// The key blocks query block `qb` of `nb` sees: its window's blocks (up to `qb` when causal)
/// and the global blocks of the other windows (earlier ones only when causal); a sliding window
/// of one block's length, its own block and the one before.
fn key_blocks(mask: &Mask, nb: i64, qb: i64) -> i64 {
    match *mask {
        Mask::SlidingWindow { .. } => (qb + 1).min(2),
        Mask::BlockSparse(b) => {
            let (l, g) = (b.local_blocks, b.global_blocks);
            let windows = (nb + l - 1) / l;
            let w = qb / l;
            let own_end = ((w + 1) * l).min(nb);
            if b.causal {
                (qb - w * l + 1) + w * g
            } else {
                let globals_total: i64 =
                    (0..windows).map(|v| ((v + 1) * l).min(nb) - (v * l + l - g).min(nb)).sum();
                let own_globals = own_end - (w * l + l - g).min(own_end);
                (own_end - w * l) + globals_total - own_globals
            }
        }
        Mask::None | Mask::Causal => nb,
    }
}

/// The longest list of key blocks any query block of `nb` blocks sees (the blocked kernel's M):
/// the last block of some window.
fn max_key_blocks(mask: &Mask, nb: i64) -> i64 {
    match *mask {
        Mask::SlidingWindow { .. } => nb.min(2),
        Mask::BlockSparse(b) => {
            let l = b.local_blocks;
            let windows = (nb + l - 1) / l;
            (0..windows).map(|w| key_blocks(mask, nb, ((w + 1) * l).min(nb) - 1)).max().unwrap_or(1)
        }
        Mask::None | Mask::Causal => nb,
    }
}
