//! Bytes on the wire, per rank, exactly as the library's counters count them: one source of
//! truth for communication volume. The tests run every strategy and compare these numbers with
//! the counters bit for bit; the cost model prices exactly these.
//!
//! Definitions (DESIGN.md §2.2): a rank *sends* the elements it hands to other ranks; the part
//! of a tensor that stays on the rank is never counted. For a tensor of global size M on P
//! ranks: all-to-all M(P-1)/P^2, all-gather and reduce-scatter M(P-1)/P, all-reduce 2M(P-1)/P.
//! The functions below give the exact per-rank counts, uneven shares included.

use crate::attention::{HeadPlan, SeqLayout, StrategyConfig};
use crate::comm::OpKind;
use crate::train::Checkpointing;
use crate::Result;

use super::memory::params_on_rank;
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
        _ => SeqLayout::contiguous(n, p),
    }
}

/// Rank `r`'s collectives in one micro-step of `job` (forward, backward, recompute) and, with
/// [`Phase::Step`], once per optimizer step. `r` is the global rank.
pub fn step_comm(job: &Job, r: usize) -> Result<Vec<CommCall>> {
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
    if job.strategy != StrategyConfig::Single {
        // The loss: [labelled tokens, loss sum] in f64, summed over the SP group.
        let (s, rc) = all_reduce(2, job.sp(), r % job.sp());
        out.push(call("loss all-reduce", GroupRole::Sp, OpKind::AllReduce, Phase::Forward, 1, s * 8, rc * 8));
    }
    out.extend(super::zero::gradient_comm(job, r, &params_on_rank(job))?);
    Ok(out)
}

fn call(
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

/// One transformer layer's collectives on SP rank `r`, forward and backward, for one micro-batch.
pub fn layer_comm(job: &Job, r: usize) -> Result<Vec<CommCall>> {
    let c = &job.model;
    let (b, d, h) = (job.micro_batch, c.head_dim(), c.n_embd);
    let es = job.element_bytes() as i64;
    let p = job.sp();
    let layout = layout(job)?;
    let lens = layout.lens();
    let (f, bw) = (Phase::Forward, Phase::Backward);
    Ok(match job.strategy {
        StrategyConfig::Single => Vec::new(),
        StrategyConfig::Ulysses => {
            ulysses_a2a(GroupRole::Sp, b * d, &HeadPlan::new(c.n_head, c.n_kv_head, p)?, lens, r, es)
        }
        StrategyConfig::MegatronSp => {
            // Around attention and MLP: all-gather [b, s_r, h] -> [b, N, h], reduce-scatter back;
            // the backward swaps them.
            let (ag, agr) = all_gather(b * h, lens, r);
            let (rs, rsr) = reduce_scatter(b * h, lens, r);
            vec![
                call(
                    "sequence all-gather",
                    GroupRole::Sp,
                    OpKind::AllGather,
                    f,
                    2,
                    2 * ag * es,
                    2 * agr * es,
                ),
                call(
                    "sequence reduce-scatter",
                    GroupRole::Sp,
                    OpKind::ReduceScatter,
                    f,
                    2,
                    2 * rs * es,
                    2 * rsr * es,
                ),
                call(
                    "sequence all-gather",
                    GroupRole::Sp,
                    OpKind::ReduceScatter,
                    bw,
                    2,
                    2 * rs * es,
                    2 * rsr * es,
                ),
                call(
                    "sequence reduce-scatter",
                    GroupRole::Sp,
                    OpKind::AllGather,
                    bw,
                    2,
                    2 * ag * es,
                    2 * agr * es,
                ),
            ]
        }
        StrategyConfig::Ring { .. } => ring_shifts(GroupRole::Sp, b * lens[r] * c.n_kv_head * d, p, es),
        StrategyConfig::AllGatherKv { .. } => {
            // K and V stacked, gathered over the sequence; dK, dV reduce-scattered back.
            let (s, rc) = all_gather(2 * b * c.n_kv_head * d, lens, r);
            let (bs, brc) = reduce_scatter(2 * b * c.n_kv_head * d, lens, r);
            vec![
                call("K/V all-gather", GroupRole::Sp, OpKind::AllGather, f, 1, s * es, rc * es),
                call("K/V all-gather", GroupRole::Sp, OpKind::ReduceScatter, bw, 1, bs * es, brc * es),
            ]
        }
        StrategyConfig::Usp { ulysses, .. } => {
            let (ring, (u, ri)) = (p / ulysses, (r % ulysses, r / ulysses));
            let plan = HeadPlan::new(c.n_head, c.n_kv_head, ulysses)?;
            // The Ulysses group of ring rank ri gathers its ring chunk: its ranks' shares.
            let chunk: Vec<i64> = (0..ulysses).map(|j| lens[ri * ulysses + j]).collect();
            let mut v = ulysses_a2a(GroupRole::Ulysses, b * d, &plan, &chunk, u, es);
            let chunk_len: i64 = chunk.iter().sum();
            v.extend(ring_shifts(GroupRole::Ring, b * chunk_len * plan.kv_split()[u] * d, ring, es));
            v
        }
    })
}

/// Ulysses' four all-to-alls (q, k, v forward, then the output), and their inverses backward.
fn ulysses_a2a(g: GroupRole, rest: i64, plan: &HeadPlan, lens: &[i64], r: usize, es: i64) -> Vec<CommCall> {
    let (q, kv) = (plan.q_split().to_vec(), plan.kv_split());
    // forward: q, k, v [b, s_r, heads, d] scatter heads, gather sequence; o the other way
    let qf = all_to_all(rest, &q, lens, r);
    let kvf = all_to_all(rest, &kv, lens, r);
    let of = all_to_all(rest, lens, &q, r);
    // backward: the inverses (dims and splits swapped)
    let qb = all_to_all(rest, lens, &q, r);
    let kvb = all_to_all(rest, lens, &kv, r);
    let ob = all_to_all(rest, &q, lens, r);
    let sum = |xs: &[(i64, i64)]| xs.iter().fold((0, 0), |a, x| (a.0 + x.0, a.1 + x.1));
    let (fs, fr) = sum(&[qf, kvf, kvf, of]);
    let (bs, br) = sum(&[qb, kvb, kvb, ob]);
    vec![
        call("q, k, v, out all-to-all", g, OpKind::AllToAll, Phase::Forward, 4, fs * es, fr * es),
        call("q, k, v, out all-to-all", g, OpKind::AllToAll, Phase::Backward, 4, bs * es, br * es),
    ]
}

/// Ring attention's passes of blocks of `kv` elements (K or V) on a ring of `p`: forward K and
/// V shift P-1 times; backward K and V shift P-1 times again and the f32 dK, dV accumulators
/// P times (they arrive home).
fn ring_shifts(g: GroupRole, kv: i64, p: usize, es: i64) -> Vec<CommCall> {
    let (s, _) = shift(kv, p);
    let pi = p as i64;
    let fwd = 2 * (pi - 1) * s * es;
    let bwd = 2 * (pi - 1) * s * es + 2 * pi * s * 4;
    vec![
        call("K/V ring passes", g, OpKind::Shift, Phase::Forward, 2 * (p as u64 - 1), fwd, fwd),
        call(
            "K/V ring passes",
            g,
            OpKind::Shift,
            Phase::Backward,
            2 * (p as u64 - 1) + 2 * p as u64,
            bwd,
            bwd,
        ),
    ]
}

/// Bytes rank `r` (SP rank) sends in one layer's (forward, backward) for one micro-batch.
pub fn layer_bytes(job: &Job, r: usize) -> Result<(u64, u64)> {
    let calls = layer_comm(job, r)?;
    let sum = |phase: Phase| calls.iter().filter(|c| c.phase == phase).map(|c| c.sent).sum::<u64>();
    Ok((sum(Phase::Forward), sum(Phase::Backward)))
}

/// DESIGN.md §2.2's closed forms for even shares (P divides N and the heads): bytes one rank
/// sends per layer and sample, (forward, backward), with `es` bytes per element and the ring's
/// dK/dV accumulators in f32. `None` for strategies without one (USP, one device). The exact
/// counts above equal these whenever the shares are even (the tests check it).
pub fn closed_form(
    strategy: StrategyConfig,
    n: i64,
    h: i64,
    kv_d: i64,
    p: usize,
    es: i64,
) -> Option<(f64, f64)> {
    let (n, h, kv, pf, es) = (n as f64, h as f64, kv_d as f64, p as f64, es as f64);
    Some(match strategy {
        // q, k, v and out each cross one all-to-all: (2Nh + 2N H_kv d)(P-1)/P^2; twice with the backward.
        StrategyConfig::Ulysses => {
            let f = (2.0 * n * h + 2.0 * n * kv) * (pf - 1.0) / (pf * pf) * es;
            (f, f)
        }
        // 2 all-gathers + 2 reduce-scatters of [N, h]: 4Nh(P-1)/P, the same backward.
        StrategyConfig::MegatronSp => {
            let f = 4.0 * n * h * (pf - 1.0) / pf * es;
            (f, f)
        }
        // K, V all-gathered: 2N H_kv d (P-1)/P; dK, dV reduce-scattered back.
        StrategyConfig::AllGatherKv { .. } => {
            let f = 2.0 * n * kv * (pf - 1.0) / pf * es;
            (f, f)
        }
        // K, V pass P-1 times; backward again, plus the f32 dK, dV P times.
        StrategyConfig::Ring { .. } => {
            let block = 2.0 * n / pf * kv;
            (block * (pf - 1.0) * es, block * ((pf - 1.0) * es + pf * 4.0))
        }
        StrategyConfig::Usp { .. } | StrategyConfig::Single => return None,
    })
}
