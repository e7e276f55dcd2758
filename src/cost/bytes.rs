//! Bytes on the wire, per rank, exactly as the library's counters count them: one source of
//! truth for communication volume. The tests run every strategy and compare these numbers with
//! the counters bit for bit; the cost model prices exactly these.
//!
//! Definitions (docs/design.md §2.2): a rank *sends* the elements it hands to other ranks; the part
//! of a tensor that stays on the rank is never counted. For a tensor of global size M on P
//! ranks: all-to-all M(P-1)/P^2, all-gather and reduce-scatter M(P-1)/P, all-reduce 2M(P-1)/P.
//! The functions below give the exact per-rank counts, uneven shares included.

use crate::attention::{SeqLayout, StrategyConfig};
use crate::comm::OpKind;
use crate::train::Checkpointing;
use crate::Result;

use super::memory::params_on_rank;
pub use super::strategy_bytes::{closed_form, layer_bytes, layer_comm};
use super::Job;

/// (sent, received) elements of rank `r` in an all-to-all whose input on rank r has extent
/// `gather[r]` along the gathered dim and `scatter` chunks along the scattered one; `rest` is
/// the product of the other dims. Chunk j goes to rank j; chunk r stays.
pub fn all_to_all(rest: i64, scatter: &[i64], gather: &[i64], r: usize) -> (i64, i64) {
    let others = |v: &[i64]| v.iter().sum::<i64>() - v[r];
    (rest * gather[r] * others(scatter), rest * scatter[r] * others(gather))
}

/// All-gather of parts `sizes` (rank j contributes `sizes[j] x rest`): each rank sends its part
/// to the P-1 others and receives theirs.
pub fn all_gather(rest: i64, sizes: &[i64], r: usize) -> (i64, i64) {
    let others = sizes.iter().sum::<i64>() - sizes[r];
    (rest * sizes[r] * (sizes.len() as i64 - 1), rest * others)
}

/// Reduce-scatter into parts `split`: rank r sends every chunk but its own and receives its own
/// chunk from the P-1 others.
pub fn reduce_scatter(rest: i64, split: &[i64], r: usize) -> (i64, i64) {
    let (p, total) = (split.len() as i64, split.iter().sum::<i64>());
    (rest * (total - split[r]), rest * split[r] * (p - 1))
}

/// All-reduce of `n` elements on `p` ranks: a reduce-scatter into near-equal parts (the first
/// `n % p` one longer) then an all-gather of them.
pub fn all_reduce(n: i64, p: usize, r: usize) -> (i64, i64) {
    let pi = p as i64;
    let parts: Vec<i64> = (0..pi).map(|j| n / pi + i64::from(j < n % pi)).collect();
    let (rs, rr) = reduce_scatter(1, &parts, r);
    let (gs, gr) = all_gather(1, &parts, r);
    (rs + gs, rr + gr)
}

/// A ring shift of `m` elements: out and in, unless the data stays (P = 1).
pub fn shift(m: i64, p: usize) -> (i64, i64) {
    if p > 1 {
        (m, m)
    } else {
        (0, 0)
    }
}

/// Which group a collective runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum GroupRole {
    /// The sequence-parallel group (contiguous ranks).
    Sp,
    /// USP's Ulysses subgroup (contiguous ranks inside the SP group).
    Ulysses,
    /// USP's ring subgroup (stride U inside the SP group).
    Ring,
    /// The data-parallel group (stride SP).
    Dp,
    /// Every rank of the job (SP x DP): ZeRO and the gradient reduction.
    World,
}

impl GroupRole {
    /// The name the counters give the group (`Group::rank_stats_by_group`). With dp = 1 the
    /// SP x DP group is the SP group itself.
    pub fn counter_name(self, job: &Job) -> &'static str {
        match self {
            GroupRole::Sp => "sp",
            GroupRole::Ulysses => "ulysses",
            GroupRole::Ring => "ring",
            GroupRole::Dp => "dp",
            GroupRole::World if job.dp == 1 => "sp",
            GroupRole::World => "world",
        }
    }

    /// (size, stride in global ranks) of the group.
    pub fn shape(self, job: &Job) -> (usize, usize) {
        let (sp, dp) = (job.sp(), job.dp);
        let u = match job.strategy {
            StrategyConfig::Usp { ulysses, .. } => ulysses,
            _ => sp,
        };
        match self {
            GroupRole::Sp => (sp, 1),
            GroupRole::Ulysses => (u, 1),
            GroupRole::Ring => (sp / u, u),
            GroupRole::Dp => (dp, sp),
            GroupRole::World => (job.ranks, 1),
        }
    }
}

/// When a collective runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Phase {
    Forward,
    Backward,
    /// The forward again under full activation checkpointing.
    Recompute,
    /// Once per optimizer step (gradient reduction, ZeRO's parameter gathers).
    Step,
}

/// Calls of one kind by one rank in one micro-step (or step), with their bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommCall {
    pub what: &'static str,
    pub group: GroupRole,
    pub op: OpKind,
    pub phase: Phase,
    pub calls: u64,
    pub sent: u64,
    pub received: u64,
}

/// The layout `job`'s strategy spreads the sequence with over its SP group.
pub fn layout(job: &Job) -> Result<SeqLayout> {
    let (n, p) = (job.seq, job.sp());
    match job.strategy {
        StrategyConfig::Ring { zigzag: true } | StrategyConfig::AllGatherKv { zigzag: true } => {
            SeqLayout::zigzag(n, p)
        }
        StrategyConfig::Usp { ulysses, zigzag } => SeqLayout::nested(n, p / ulysses, ulysses, zigzag),
        StrategyConfig::UlyssesChunked { chunks } => SeqLayout::strided(n, p, chunks),
        _ => SeqLayout::contiguous(n, p),
    }
}

/// Rank `r`'s collectives in one micro-step of `job` (forward, backward, recompute) and, with
/// [`Phase::Step`], once per optimizer step. `r` is the global rank.
pub fn step_comm(job: &Job, r: usize) -> Result<Vec<CommCall>> {
    let mut out = layers_comm(job, r)?;
    if job.strategy != StrategyConfig::Single {
        // The loss: [labelled tokens, loss sum] in f64, summed over the SP group.
        let (s, rc) = all_reduce(2, job.sp(), r % job.sp());
        out.push(call("loss all-reduce", GroupRole::Sp, OpKind::AllReduce, Phase::Forward, 1, s * 8, rc * 8));
    }
    out.extend(super::zero::gradient_comm(job, r, &params_on_rank(job))?);
    Ok(out)
}

/// The strategy's collectives over all layers in one micro-step (forward, backward, and the
/// forward again under full checkpointing): [`step_comm`] without the loss and the gradients.
pub fn layers_comm(job: &Job, r: usize) -> Result<Vec<CommCall>> {
    let mut out = Vec::new();
    let l = job.model.n_layer as u64;
    let layer = layer_comm(job, r % job.sp())?;
    let recompute = job.checkpointing == Checkpointing::Full;
    for c in layer {
        let mut all = c.clone();
        all.calls *= l;
        all.sent *= l;
        all.received *= l;
        if recompute && c.phase == Phase::Forward {
            out.push(CommCall { phase: Phase::Recompute, ..all.clone() });
        }
        out.push(all);
    }
    Ok(out)
}

pub(super) fn call(
    what: &'static str,
    group: GroupRole,
    op: OpKind,
    phase: Phase,
    calls: u64,
    sent: i64,
    rec: i64,
) -> CommCall {
    CommCall { what, group, op, phase, calls, sent: sent as u64, received: rec as u64 }
}
