//! ZeRO (Rajbhandari et al. 2020) as DeepSpeed runs it under sequence parallelism: model
//! states partitioned over every rank of the job (SP x DP, `seq_data_parallel_group`), and the
//! gradient reduction that goes with each stage. Bytes and model-state memory, per rank.
//!
//! The algorithm both the trainer and this model follow (the team's spec):
//! - only replicated parameters join ZeRO; Megatron-SP's tensor-parallel shards stay sharded,
//!   their gradients complete per rank and averaged over DP only;
//! - gradients of replicated parameters are summed over SP and averaged over DP in one
//!   reduction over all W ranks, in f32 (also when training in bf16/f16) unless the run names
//!   another `reduce_dtype` (bf16 halves these bytes);
//! - stage 0: all-reduce of the gradients; stage 1: the same all-reduce, each rank updates its
//!   partition, then all-gathers the parameters (parameter dtype); stage 2: reduce-scatter
//!   instead of the all-reduce; stage 3: each block's parameters all-gathered before its
//!   forward and again before its backward, gradients reduce-scattered as each block's backward
//!   ends, nothing gathered after the step. Embedding, final norm and head are a block of their
//!   own;
//! - partitions: a flat buffer of the replicated parameters padded to a multiple of W (stage 3:
//!   per block), rank r owning the r-th contiguous 1/W; padding travels like data;
//! - model states per rank with mixed precision and Adam (2 + 2 + 12 bytes per parameter):
//!   stage 0 16 Psi, stage 1 4 Psi + 12 Psi/W, stage 2 2 Psi + 14 Psi/W, stage 3 16 Psi/W (plus
//!   one gathered block and the buckets); in f32 the same with 4 + 4 + 8.
//!
//! Stage 0 all-reduces the trainer's flat buffer, padded like the other stages' (the trainer's
//! counters, `tests/train.rs`, match these bytes at P = 3 where padding shows). `Gpt::forward_backward`
//! without a trainer reduces the replicated gradients unpadded over the SP group: the same bytes
//! whenever W divides them (every model of `tests/cost_bytes.rs`).

use crate::attention::StrategyConfig;
use crate::comm::OpKind;
use crate::train::Precision;
use crate::Result;

use super::bytes::{all_gather, all_reduce, reduce_scatter, CommCall, GroupRole, Phase};
use super::Job;

/// Parameters (elements) on one rank.
#[derive(Debug, Clone, PartialEq)]
pub struct ParamCount {
    /// Replicated over the SP group: these join ZeRO and the gradient reduction.
    pub replicated: f64,
    /// Replicated elements per ZeRO-3 unit: each transformer block, then the rest (embedding,
    /// final norm, head).
    pub blocks: Vec<i64>,
    /// Megatron-SP's tensor-parallel slices on this rank.
    pub sharded: f64,
}

/// The parameters `Gpt::new` creates on one rank of `job` (tests compare with `Params`).
pub fn params_on_rank(job: &Job) -> ParamCount {
    let c = &job.model;
    let (h, v, bias) = (c.n_embd, c.vocab_size, i64::from(c.bias));
    let qkv = (c.n_head + 2 * c.n_kv_head) * c.head_dim();
    let (f, f_in) = (c.ffn(), c.mlp_in_width());
    let norms = 2 * c.norm_params();
    let matrices = h * qkv + bias * qkv + h * h + h * f_in + bias * f_in + f * h;
    let out_biases = 2 * bias * h; // attention and MLP output biases
    let rest = v * h + c.norm_params() + if c.tie_embeddings { 0 } else { v * h };
    let (block_rep, sharded) = if job.strategy == StrategyConfig::MegatronSp {
        (norms + out_biases, c.n_layer * matrices / job.sp() as i64)
    } else {
        (norms + out_biases + matrices, 0)
    };
    let mut blocks = vec![block_rep; c.n_layer as usize];
    blocks.push(rest);
    ParamCount { replicated: blocks.iter().sum::<i64>() as f64, blocks, sharded: sharded as f64 }
}

/// `n` rounded up to a multiple of `w` (ZeRO's padded partition buffer).
pub fn padded(n: i64, w: usize) -> i64 {
    let w = w as i64;
    (n + w - 1) / w * w
}

/// Bytes per parameter of (parameters, gradients, optimizer states) under `precision`: mixed
/// precision keeps bf16/f16 parameters and gradients and f32 master weights and Adam moments
/// (2 + 2 + 12); f32 keeps 4 + 4 + 8 (Adam's m and v, no master copy); f64 parameters with this
/// toolkit's AdamW keep f32 moments (8 + 8 + 8). Without an optimizer, no states.
pub fn state_bytes(precision: Precision, optimizer: bool) -> (f64, f64, f64) {
    let (p, g, o) = match precision {
        Precision::Bf16 | Precision::F16 => (2.0, 2.0, 12.0),
        Precision::F32 => (4.0, 4.0, 8.0),
        Precision::F64 => (8.0, 8.0, 8.0),
    };
    (p, g, if optimizer { o } else { 0.0 })
}

/// Model-state memory of one rank: (parameters, gradients, optimizer states) in bytes.
pub fn model_states(job: &Job, params: &ParamCount) -> (f64, f64, f64) {
    let (pb, gb, ob) = state_bytes(job.precision, job.optimizer);
    let w = job.ranks;
    let z = job.zero;
    let rep = params.replicated as i64;
    let rep_padded = if z.stage() >= 3 {
        params.blocks.iter().map(|&m| padded(m, w)).sum::<i64>()
    } else if z.stage() >= 1 {
        padded(rep, w)
    } else {
        rep
    } as f64;
    let share = |partitioned: bool| if partitioned { rep_padded / w as f64 } else { rep as f64 };
    let sharded = params.sharded;
    (
        pb * (share(z.partitions_parameters()) + sharded),
        gb * (share(z.partitions_gradients()) + sharded),
        ob * (share(z.partitions_optimizer()) + sharded),
    )
}

/// The gradient reduction and ZeRO's gathers of rank `r` (global) for one micro-step and step.
/// Stages 2-3 reduce every micro-step (only a partition of the gradients is kept); stages 0-1
/// once per optimizer step.
pub fn gradient_comm(job: &Job, r: usize, params: &ParamCount) -> Result<Vec<CommCall>> {
    let mut out = Vec::new();
    let w = job.ranks;
    let pb = job.element_bytes() as i64;
    let gb = job.reduce_bytes();
    let rep = params.replicated as i64;
    let mk = |what, group, op, phase, calls, (s, rc): (i64, i64), es: i64| CommCall {
        what,
        group,
        op,
        phase,
        calls,
        sent: (s * es) as u64,
        received: (rc * es) as u64,
    };
    let single = job.strategy == StrategyConfig::Single;
    match job.zero.stage() {
        _ if single && w == 1 => {}
        0 if w > 1 => out.push(mk(
            "gradient all-reduce",
            GroupRole::World,
            OpKind::AllReduce,
            Phase::Step,
            1,
            all_reduce(padded(rep, w), w, r),
            gb,
        )),
        1 => {
            let m = padded(rep, w);
            out.push(mk(
                "gradient all-reduce",
                GroupRole::World,
                OpKind::AllReduce,
                Phase::Step,
                1,
                all_reduce(m, w, r),
                gb,
            ));
            out.push(mk(
                "parameter all-gather",
                GroupRole::World,
                OpKind::AllGather,
                Phase::Step,
                1,
                all_gather(1, &vec![m / w as i64; w], r),
                pb,
            ));
        }
        2 => {
            let m = padded(rep, w);
            let parts = vec![m / w as i64; w];
            out.push(mk(
                "gradient reduce-scatter",
                GroupRole::World,
                OpKind::ReduceScatter,
                Phase::Backward,
                1,
                reduce_scatter(1, &parts, r),
                gb,
            ));
            out.push(mk(
                "parameter all-gather",
                GroupRole::World,
                OpKind::AllGather,
                Phase::Step,
                1,
                all_gather(1, &parts, r),
                pb,
            ));
        }
        3 => {
            for &block in &params.blocks {
                let m = padded(block, w);
                let parts = vec![m / w as i64; w];
                let ag = all_gather(1, &parts, r);
                out.push(mk(
                    "block parameter all-gather",
                    GroupRole::World,
                    OpKind::AllGather,
                    Phase::Forward,
                    1,
                    ag,
                    pb,
                ));
                out.push(mk(
                    "block parameter all-gather",
                    GroupRole::World,
                    OpKind::AllGather,
                    Phase::Backward,
                    1,
                    ag,
                    pb,
                ));
                out.push(mk(
                    "block gradient reduce-scatter",
                    GroupRole::World,
                    OpKind::ReduceScatter,
                    Phase::Backward,
                    1,
                    reduce_scatter(1, &parts, r),
                    gb,
                ));
            }
        }
        _ => {}
    }
    if job.dp > 1 && params.sharded > 0.0 {
        // Megatron-SP's shards: complete per rank, averaged over the data-parallel replicas.
        let dp_rank = r / job.sp();
        out.push(mk(
            "sharded gradient all-reduce",
            GroupRole::Dp,
            OpKind::AllReduce,
            Phase::Step,
            1,
            all_reduce(params.sharded as i64, job.dp, dp_rank),
            gb,
        ));
    }
    Ok(merge_calls(out))
}

/// Sums calls of the same (what, group, op, phase) into one entry.
fn merge_calls(calls: Vec<CommCall>) -> Vec<CommCall> {
    let mut out: Vec<CommCall> = Vec::new();
    for c in calls {
        match out
            .iter_mut()
            .find(|o| o.what == c.what && o.group == c.group && o.op == c.op && o.phase == c.phase)
        {
            Some(o) => {
                o.calls += c.calls;
                o.sent += c.sent;
                o.received += c.received;
            }
            None => out.push(c),
        }
    }
    out
}
