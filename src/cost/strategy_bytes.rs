//! Each strategy's collectives in one transformer layer, per rank, exactly as the counters
//! count them (docs/design.md §2.2): Ulysses' four all-to-alls, Megatron-SP's all-gathers and
//! reduce-scatters of the sequence, ring attention's K/V passes, all-gather KV, USP's two.

use crate::attention::{HeadPlan, RingPlan, StrategyConfig};
use crate::comm::OpKind;
use crate::Result;

use super::bytes::{all_gather, all_to_all, call, layout, reduce_scatter, shift, CommCall, GroupRole, Phase};
use super::Job;

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
        // Ulysses' all-to-alls on each chunk: a u-th of the tokens, u times.
        StrategyConfig::UlyssesChunked { chunks } => {
            let pieces = vec![job.seq / (p * chunks) as i64; p];
            let plan = HeadPlan::new(c.n_head, c.n_kv_head, p)?;
            let u = chunks as u64;
            let mut calls = ulysses_a2a(GroupRole::Sp, b * d, &plan, &pieces, r, es);
            for x in &mut calls {
                (x.calls, x.sent, x.received) = (x.calls * u, x.sent * u, x.received * u);
            }
            calls
        }
        StrategyConfig::MegatronSp => {
            // Around attention and MLP: all-gather [b, s_r, h] -> [b, N, h], reduce-scatter back;
            // the backward swaps them and re-gathers the two column-parallel linears' inputs.
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
                // As Megatron-LM: the column-parallel linears (qkv, fc1) keep their input's shard
                // and gather it again for their weight gradients.
                call(
                    "sequence re-gather",
                    GroupRole::Sp,
                    OpKind::AllGather,
                    bw,
                    2,
                    2 * ag * es,
                    2 * agr * es,
                ),
            ]
        }
        StrategyConfig::Ring { .. } => {
            let plan =
                RingPlan::new(&job.attention.mask, job.packed()?.as_ref(), &layout.grouped_segments(1));
            ring_shifts(GroupRole::Sp, b * lens[r] * c.n_kv_head * d, &plan, r, es)
        }
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
            let (u, ri) = (r % ulysses, r / ulysses);
            let plan = HeadPlan::new(c.n_head, c.n_kv_head, ulysses)?;
            // The Ulysses group of ring rank ri gathers its ring chunk: its ranks' shares.
            let chunk: Vec<i64> = (0..ulysses).map(|j| lens[ri * ulysses + j]).collect();
            let mut v = ulysses_a2a(GroupRole::Ulysses, b * d, &plan, &chunk, u, es);
            let chunk_len: i64 = chunk.iter().sum();
            // The ring's ranks hold their Ulysses groups' chunks, as USP builds them.
            let segments = layout.grouped_segments(ulysses);
            let hops = RingPlan::new(&job.attention.mask, job.packed()?.as_ref(), &segments);
            v.extend(ring_shifts(GroupRole::Ring, b * chunk_len * plan.kv_split()[u] * d, &hops, ri, es));
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

/// Ring attention's passes of blocks of `kv` elements (K or V) on ring rank `r`, as `plan` lets
/// them travel: forward, K and V passed on and received where the plan says (P-1 times each on
/// the classic ring); backward the same again, and the f32 dK, dV accumulators sent on or home
/// and received (P times each on the classic ring). A step with no transfer is no call.
fn ring_shifts(g: GroupRole, kv: i64, plan: &RingPlan, r: usize, es: i64) -> Vec<CommCall> {
    let p = plan.reach().len();
    let (s, _) = shift(kv, p);
    // (calls, sent, received) of the K/V passes, then of the accumulators.
    let (mut kv_moves, mut acc_moves) = ((0u64, 0i64, 0i64), (0u64, 0i64, 0i64));
    for t in 0..p {
        let (out, into) = (i64::from(plan.passes_on(r, t)), i64::from(plan.receives(r, t)));
        kv_moves = (kv_moves.0 + 2 * u64::from(out + into > 0), kv_moves.1 + out, kv_moves.2 + into);
        let out = i64::from(plan.accumulator_to(r, t).is_some());
        let into = into + i64::from(plan.home_from(r, t).is_some());
        acc_moves = (acc_moves.0 + 2 * u64::from(out + into > 0), acc_moves.1 + out, acc_moves.2 + into);
    }
    let block = 2 * s * es; // K and V
    let acc = 2 * s * 4; // dK and dV in f32
    vec![
        call(
            "K/V ring passes",
            g,
            OpKind::Shift,
            Phase::Forward,
            kv_moves.0,
            kv_moves.1 * block,
            kv_moves.2 * block,
        ),
        call(
            "K/V ring passes",
            g,
            OpKind::Shift,
            Phase::Backward,
            kv_moves.0 + acc_moves.0,
            kv_moves.1 * block + acc_moves.1 * acc,
            kv_moves.2 * block + acc_moves.2 * acc,
        ),
    ]
    .into_iter()
    .filter(|c| c.calls > 0)
    .collect()
}

/// Bytes rank `r` (SP rank) sends in one layer's (forward, backward) for one micro-batch.
pub fn layer_bytes(job: &Job, r: usize) -> Result<(u64, u64)> {
    let calls = layer_comm(job, r)?;
    let sum = |phase: Phase| calls.iter().filter(|c| c.phase == phase).map(|c| c.sent).sum::<u64>();
    Ok((sum(Phase::Forward), sum(Phase::Backward)))
}

/// docs/design.md §2.2's closed forms for even shares (P divides N and the heads): bytes one rank
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
        StrategyConfig::Ulysses | StrategyConfig::UlyssesChunked { .. } => {
            let f = (2.0 * n * h + 2.0 * n * kv) * (pf - 1.0) / (pf * pf) * es;
            (f, f)
        }
        // 2 all-gathers + 2 reduce-scatters of [N, h]: 4Nh(P-1)/P; the backward their adjoints
        // and the re-gather of the qkv and fc1 inputs: 6Nh(P-1)/P.
        StrategyConfig::MegatronSp => {
            let f = n * h * (pf - 1.0) / pf * es;
            (4.0 * f, 6.0 * f)
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
