//! One prediction: a [`Job`] on a [`Hardware`] -> step time with its breakdown, throughput in
//! both FLOP conventions, MFU, memory by component, fits or not.
//!
//! Step time of a rank = its compute (each term at the efficiency of its size; memory-bound
//! terms at the memory bandwidth) + its exposed communication (every collective of
//! [`super::bytes`], priced on the link its group uses). Communication is exposed unless the
//! job asks for overlap, and then only what the implementations can overlap (ZeRO's gathers
//! and reduce-scatters, the gradient reduction, ring attention's passes) hides behind compute;
//! Ulysses' all-to-alls and Megatron-SP's gathers sit on the critical path. The step is the
//! slowest rank's. Ranks sharing a CPU's cores (more ranks x threads than cores) run slower by
//! that ratio, communication included (copies are CPU work there); where the backend's waiting
//! ranks poll (MPI), the most loaded rank sets the node's pace, else the mean does.

use std::collections::BTreeMap;

use crate::comm::OpKind;
use crate::Result;

use super::bytes::{step_comm, GroupRole, Phase};
use super::flops::{megatron_flops, model_flops};
use super::hardware::{DeviceKind, Hardware};
use super::memory::{memory, MemoryReport};
use super::network::{price, LinkUse, Placement};
use super::software::{Band, Zero3Prefetch};
use super::work::{rank_work, OpClass};
use super::Job;
use crate::train::Checkpointing;

/// The time of one kind of collective in one step of the slowest rank.
#[derive(Debug, Clone, PartialEq)]
pub struct CommTime {
    pub what: &'static str,
    pub group: GroupRole,
    pub op: OpKind,
    pub phase: Phase,
    pub link: LinkUse,
    pub calls: u64,
    /// Bytes this rank sends in one optimizer step.
    pub bytes: f64,
    pub seconds: f64,
    /// Seconds not hidden behind compute.
    pub exposed: f64,
}

/// One rank's step: seconds, which rank, its compute terms, its collectives, bytes it sent.
struct RankStep {
    step: f64,
    rank: usize,
    compute: Vec<(&'static str, OpClass, f64)>,
    comm: Vec<CommTime>,
    sent: f64,
    offload: Option<OffloadTime>,
    optimizer_offload: Option<OptimizerOffload>,
}

/// Offload's copies between the device and host memory in one optimizer step.
#[derive(Debug, Clone, PartialEq)]
pub struct OffloadTime {
    /// Bytes to the host (block inputs after their forward; chunked Ulysses' chunks).
    pub bytes: f64,
    /// Bytes back from the host (the same, and the key chunks chunked Ulysses reads again).
    pub bytes_back: f64,
    /// The copies' seconds, both ways, on the host link.
    pub seconds: f64,
    /// Seconds not hidden behind the blocks they run beside.
    pub exposed: f64,
}

/// Offload's copies for rank `r`'s micro-steps: each block's input (`[b, s_r, h]`) goes to the
/// host on a side stream while the next block runs forward, and comes back while the block
/// after it in the backward recomputes and runs backward (one block ahead). Chunked Ulysses'
/// offload moves each layer's chunks (q, K/V, output, log-sum-exp) out in the layer's forward and
/// back in its backward, and reads key chunks back in both (under full checkpointing all of it
/// beside the recomputation and backward, the forward that keeps them). A copy is hidden up to
/// the compute of the block beside it: under full checkpointing a block's forward is a quarter
/// of its compute, its recomputation and backward the other three quarters (the micro-step's
/// compute spread evenly over the blocks). Low band: nothing hidden; high band: everything.
/// `None` without offload or without a host link in the hardware file (the CPU files: offload
/// there goes to disk through a thread, not timed).
fn offload_time(job: &Job, r: usize, hw: &Hardware, micro_compute_s: f64) -> Result<Option<OffloadTime>> {
    let c = &job.model;
    let (l, accum) = (c.n_layer as f64, job.grad_accum as f64);
    let tok = job.micro_batch as f64 * super::bytes::layout(job)?.len(r % job.sp()) as f64;
    let full = job.checkpointing == crate::train::Checkpointing::Full;
    let input = if job.offload && full { tok * c.n_embd as f64 * job.element_bytes() } else { 0.0 };
    let chunks = super::memory::kv_offload_bytes_per_layer(job, r)?;
    let (reads_f, reads_b) = super::memory::kv_offload_read_bytes_per_layer(job, r)?;
    // Per block: bytes on the link beside its forward, and beside its (recomputation and) backward.
    let (beside_fwd, beside_back) = if full {
        (input, input + 2.0 * chunks + reads_f + reads_b)
    } else {
        (input + chunks + reads_f, input + chunks + reads_b)
    };
    let bw = match hw.host_link_bytes_per_s() {
        Some(bw) if beside_fwd + beside_back > 0.0 => bw,
        _ => return Ok(None),
    };
    let (t_fwd, t_back) = (beside_fwd / bw, beside_back / bw);
    let share = forward_share(job);
    let (fwd, back) = (share * micro_compute_s / l, (1.0 - share) * micro_compute_s / l);
    let exposed = match hw.band() {
        Band::Low => t_fwd + t_back,
        Band::High => 0.0,
        Band::Central => (t_fwd - fwd).max(0.0) + (t_back - back).max(0.0),
    };
    Ok(Some(OffloadTime {
        bytes: l * (input + chunks) * accum,
        bytes_back: l * (input + chunks + reads_f + reads_b) * accum,
        seconds: l * (t_fwd + t_back) * accum,
        exposed: l * exposed * accum,
    }))
}

/// The forward's share of a micro-step's compute: a quarter under full checkpointing (forward,
/// recomputation, a backward of two), a third without.
fn forward_share(job: &Job) -> f64 {
    if job.checkpointing == crate::train::Checkpointing::Full {
        0.25
    } else {
        1.0 / 3.0
    }
}

/// ZeRO-Offload's host side in one optimizer step (`Job::optimizer_offload`).
#[derive(Debug, Clone, PartialEq)]
pub struct OptimizerOffload {
    /// Parameters this rank's update on the host covers (its optimizer partition).
    pub params: f64,
    /// Seconds of the update on the host's CPUs, at the rank's share of the node's host
    /// memory bandwidth.
    pub update_s: f64,
    /// Seconds on the host link: the gradient partition out, the updated parameters back.
    pub copies_s: f64,
    /// Seconds not hidden: the update and the parameters' way back (they follow the last
    /// gradient), and the gradients' copies beyond the backward they run beside.
    pub exposed: f64,
}

/// ZeRO-Offload for rank `r`'s step, DeepSpeed's way: each reduced gradient bucket is copied to
/// the host as it completes, beside the backward (every micro-step from stage 2, which keeps no
/// gradient partition on the device; once a step below); after the last one the host's CPUs run
/// Adam over the rank's partition (reading the f32 gradient, parameter and two moments, writing
/// the three back and the 16-bit parameter to send: 30 bytes a parameter, 28 in f32 training),
/// and the parameters go back to the device. The gradients' copies hide behind the backward up to
/// its compute (low band: not at all; high band: entirely); the update and the way back are
/// exposed (no delayed update, DeepSpeed's default). The error names what the hardware file
/// lacks to price it.
fn optimizer_offload_time(
    job: &Job,
    hw: &Hardware,
    micro_compute_s: f64,
) -> Result<Option<OptimizerOffload>> {
    if !job.optimizer_offload {
        return Ok(None);
    }
    let missing = |what: &str| crate::Error::InvalidArgument {
        op: "cost",
        group: job.describe(),
        msg: format!("optimizer offload needs {what} in {}'s [host]", hw.name),
    };
    let adam =
        hw.host_adam_bytes_per_s(job.ranks).ok_or_else(|| missing("memory_gbs and adam_efficiency"))?;
    let link = hw.host_link_bytes_per_s().ok_or_else(|| missing("link_gbs"))?;
    // The rank's optimizer partition, as the memory counts it (padded to the ranks).
    let (_, _, states) = super::zero::model_states(job, &super::zero::params_on_rank(job));
    let (_, _, per_param) = super::zero::state_bytes(job.precision, job.optimizer);
    let params = states / per_param;
    let es = job.element_bytes();
    let per_param = if es < 4.0 { 30.0 } else { 28.0 };
    let update_s = params * per_param / adam;
    let copies = if job.zero.partitions_gradients() { job.grad_accum as f64 } else { 1.0 };
    let grads_s = copies * params * job.reduce_bytes() as f64 / link;
    let back_s = params * es / link;
    let backward = copies * (1.0 - forward_share(job)) * micro_compute_s;
    let hidden = match hw.band() {
        Band::Low => 0.0,
        Band::High => grads_s,
        Band::Central => grads_s.min(backward),
    };
    Ok(Some(OptimizerOffload {
        params,
        update_s,
        copies_s: grads_s + back_s,
        exposed: update_s + back_s + grads_s - hidden,
    }))
}

/// What the model predicts for one job.
#[derive(Debug, Clone, PartialEq)]
pub struct Prediction {
    pub job: Job,
    pub hardware: String,
    /// The software profile and the band of the inputs the prediction took.
    pub software: String,
    pub band: Band,
    /// One optimizer step (all micro-steps), seconds.
    pub step_s: f64,
    /// Compute seconds per step of the slowest rank, by term name.
    pub compute: Vec<(&'static str, OpClass, f64)>,
    pub comm: Vec<CommTime>,
    pub slowest_rank: usize,
    /// Tokens of the whole job per second.
    pub tokens_per_s: f64,
    /// Model FLOPs (visible pairs) and Megatron-DeepSpeed FLOPs of one step, whole job.
    pub model_flops: f64,
    pub megatron_flops: f64,
    /// TFLOP/s per device in each convention, and their fractions of the dtype's peak.
    pub model_tflops_per_gpu: f64,
    pub megatron_tflops_per_gpu: f64,
    pub mfu: f64,
    pub megatron_mfu: f64,
    /// The rank with the largest peak.
    pub memory: MemoryReport,
    /// Largest bytes sent by one rank in one step.
    pub bytes_sent_per_rank: f64,
    /// Offload's copies to and from host memory, where the hardware gives a host link.
    pub offload: Option<OffloadTime>,
    /// ZeRO-Offload's update on the host and its copies (`Job::optimizer_offload`).
    pub optimizer_offload: Option<OptimizerOffload>,
}

impl Prediction {
    pub fn compute_s(&self) -> f64 {
        self.compute.iter().map(|c| c.2).sum()
    }

    pub fn compute_by_class(&self) -> BTreeMap<OpClass, f64> {
        let mut m = BTreeMap::new();
        for (_, class, s) in &self.compute {
            *m.entry(*class).or_insert(0.0) += s;
        }
        m
    }

    pub fn comm_exposed_s(&self) -> f64 {
        self.comm.iter().map(|c| c.exposed).sum()
    }
}

/// How much slower a collective runs when a CPU node's ranks (of `threads` threads each) are
/// more than its cores: a shared-memory transport's copies run on the cores the ranks take
/// turns on. 1 on a GPU, whose links move the bytes.
pub fn comm_slowdown(hw: &Hardware, ranks: usize, threads: usize) -> f64 {
    let on_node = ranks.min(hw.node.devices_per_node) as f64;
    match hw.device.kind {
        DeviceKind::Cpu => (on_node * threads as f64 / hw.node.compute_slots as f64).max(1.0),
        DeviceKind::Gpu => 1.0,
    }
}

/// One all-to-all on `p` ranks of one node, one thread each, as [`predict`] prices it: the
/// link's seconds for the `sent` bytes a rank sends (stretched when the ranks outnumber a CPU's
/// cores), and the pack and unpack copies a process backend makes of chunks strided along the
/// heads (Ulysses' layout; `strided = false` for contiguous rows, and none on threads).
pub fn one_all_to_all(
    hw: &Hardware,
    backend: &str,
    p: usize,
    sent: f64,
    strided: bool,
) -> Result<(f64, f64)> {
    let at = Placement::new(p, 1, hw.node.devices_per_node);
    let slowdown = comm_slowdown(hw, p, 1);
    let (link, _) = price(hw, backend, OpKind::AllToAll, at, 1, sent)?;
    let pack = if strided && backend != "local" {
        let bw = hw.device.memory_bandwidth_gbs * 1e9 * hw.memory_bound_efficiency("a2a_pack");
        super::work::passes::PACK * sent / bw * slowdown
    } else {
        0.0
    };
    Ok((link * slowdown, pack))
}

/// Predicts `job` on `hw`.
pub fn predict(job: &Job, hw: &Hardware) -> Result<Prediction> {
    job.validate()?;
    let peak = hw.peak_flops(job.precision)?;
    let bw = hw.device.memory_bandwidth_gbs * 1e9;
    let on_node = job.ranks.min(hw.node.devices_per_node) as f64;
    let slots = hw.node.compute_slots as f64;
    let threads = job.threads_per_rank as f64;
    let cpu = hw.device.kind == DeviceKind::Cpu;
    let comm_slowdown = comm_slowdown(hw, job.ranks, job.threads_per_rank);
    let accum = job.grad_accum as f64;

    // Each candidate rank's compute at one thread's full speed.
    let ranks = candidate_ranks(job);
    let mut per_rank = Vec::with_capacity(ranks.len());
    for &r in &ranks {
        let mut compute = Vec::new();
        let mut step_terms = 0.0;
        for term in rank_work(job, r, hw.kernels())? {
            let s = match term.class {
                OpClass::Matmul => term.flops / (peak * hw.matmul_efficiency(term.size)),
                OpClass::Attention => {
                    term.flops
                        / (peak
                            * hw.attention_efficiency(term.head_dim, term.size, term.op == "causal")
                            * hw.attention_occupancy(term.call, term.head_dim))
                }
                OpClass::MemoryBound => term.bytes / (bw * hw.memory_bound_efficiency(term.op)),
                OpClass::Overhead => term.size * hw.efficiency.layer_overhead_us * 1e-6,
            };
            if term.per_step {
                step_terms += s;
            }
            compute.push((term.name, term.class, if term.per_step { s } else { s * accum }));
        }
        // A GPU runs its kernels while the host launches the next ones (asynchronously): the
        // framework's dispatch shows only where it takes longer than the kernels it launches.
        if !cpu {
            let kernels: f64 = compute.iter().filter(|c| c.1 != OpClass::Overhead).map(|c| c.2).sum();
            for c in compute.iter_mut().filter(|c| c.1 == OpClass::Overhead) {
                c.2 = (c.2 - kernels).max(0.0);
            }
        }
        per_rank.push((compute, step_terms));
    }
    // Ranks sharing a node's compute slots: a rank runs at most `threads` slots fast, and the
    // node runs at most `slots` slots of work at once. With ranks waiting on one another (a
    // contiguous ring's idle ranks) the busy ones get the freed slots.
    let total = |c: &Vec<(&'static str, OpClass, f64)>| c.iter().map(|x| x.2).sum::<f64>();
    let totals: Vec<f64> = per_rank.iter().map(|(c, _)| total(c)).collect();
    let mean = totals.iter().sum::<f64>() / totals.len().max(1) as f64;
    // This toolkit's MPI backend waits by polling (MPI_Test and a yield, src/comm/mpi.rs and
    // mpi_async.rs): a waiting rank stays runnable and keeps its share of the cores, so the node
    // finishes when the most loaded rank has had its share for all of its work. The local
    // backend sleeps on a condition variable: its waiting ranks free their cores.
    let polls = cpu && job.backend == "mpi";
    let most = totals.iter().cloned().fold(0.0, f64::max);
    let node_bound = if polls { most } else { mean } * on_node / slots;

    let mut best: Option<RankStep> = None;
    for (&r, (compute, step_terms)) in ranks.iter().zip(per_rank) {
        let own = total(&compute) / threads;
        let stretch = if own > 0.0 { own.max(node_bound) / total(&compute) } else { 1.0 };
        let compute: Vec<(&'static str, OpClass, f64)> =
            compute.into_iter().map(|(n, c, s)| (n, c, s * stretch)).collect();
        let compute_s: f64 = compute.iter().map(|c| c.2).sum();
        let mut comm = Vec::new();
        let mut sent = 0.0;
        for c in step_comm(job, r)? {
            let times = if c.phase == Phase::Step { 1.0 } else { accum };
            let (size, stride) = c.group.shape(job);
            let at = Placement::new(size, stride, hw.node.devices_per_node);
            let bytes = c.sent as f64 * times;
            let (s, link) = price(hw, &job.backend, c.op, at, c.calls * times as u64, bytes)?;
            sent += bytes;
            comm.push(CommTime {
                what: c.what,
                group: c.group,
                op: c.op,
                phase: c.phase,
                link,
                calls: c.calls * times as u64,
                bytes,
                seconds: s * comm_slowdown,
                exposed: s * comm_slowdown,
            });
        }
        let prefetch = hw.applied.software.as_ref().and_then(|s| s.zero3.as_ref());
        if let Some(z) = prefetch.filter(|_| job.zero.stage() == 3 && !job.overlap) {
            // Every micro-step's compute, without the once-per-step update.
            let micro_s = compute_s - step_terms * stretch;
            zero3_prefetch(&mut comm, micro_s, job, z, hw.band());
        }
        if job.overlap {
            // What can overlap hides behind compute, first come first served.
            let mut budget = compute_s;
            for c in comm.iter_mut().filter(|c| overlappable(c)) {
                let hidden = c.seconds.min(budget);
                c.exposed = c.seconds - hidden;
                budget -= hidden;
            }
        }
        let micro_s = (compute_s - step_terms * stretch) / accum;
        let offload = offload_time(job, r, hw, micro_s)?;
        let optimizer_offload = optimizer_offload_time(job, hw, micro_s)?;
        let step = compute_s
            + comm.iter().map(|c| c.exposed).sum::<f64>()
            + offload.as_ref().map_or(0.0, |o| o.exposed)
            + optimizer_offload.as_ref().map_or(0.0, |o| o.exposed);
        if best.as_ref().is_none_or(|b| step > b.step) {
            best = Some(RankStep { step, rank: r, compute, comm, sent, offload, optimizer_offload });
        }
    }
    let RankStep {
        step: step_s,
        rank: slowest_rank,
        compute,
        comm,
        sent: bytes_sent_per_rank,
        offload,
        optimizer_offload,
    } = best.ok_or_else(|| crate::Error::InvalidArgument {
        op: "cost",
        group: job.describe(),
        msg: "no ranks".into(),
    })?;
    let mut worst: Option<MemoryReport> = None;
    for r in candidate_ranks(job) {
        let m = memory(job, r, hw)?;
        if worst.as_ref().is_none_or(|w| m.resident_bytes > w.resident_bytes) {
            worst = Some(m);
        }
    }
    let memory = worst.ok_or_else(|| crate::Error::InvalidArgument {
        op: "cost",
        group: job.describe(),
        msg: "no ranks".into(),
    })?;
    let tokens = (job.global_batch() * job.seq) as f64;
    let (mf, meg) =
        (model_flops(job), megatron_flops(&job.model, job.global_batch(), job.seq, job.checkpointing));
    let per_gpu = |flops: f64| flops / step_s / job.ranks as f64;
    Ok(Prediction {
        job: job.clone(),
        hardware: hw.name.clone(),
        software: hw.software_name().to_string(),
        band: hw.band(),
        step_s,
        compute,
        comm,
        slowest_rank,
        tokens_per_s: tokens / step_s,
        model_flops: mf,
        megatron_flops: meg,
        model_tflops_per_gpu: per_gpu(mf) / 1e12,
        megatron_tflops_per_gpu: per_gpu(meg) / 1e12,
        mfu: per_gpu(mf) / peak,
        megatron_mfu: per_gpu(meg) / peak,
        memory,
        bytes_sent_per_rank,
        offload,
        optimizer_offload,
    })
}

/// The SP ranks whose time and memory are evaluated: every rank of small groups, else the first
/// two, the middle and the last (the extremes of every layout here: the first ranks hold the
/// extra token and head of uneven shares, the last the most causal work of a contiguous ring).
pub fn candidate_ranks(job: &Job) -> Vec<usize> {
    let p = job.sp();
    if p <= 8 {
        return (0..p).collect();
    }
    vec![0, 1, p / 2, p - 1]
}

/// Collectives the implementations can run behind compute when overlap is on.
fn overlappable(c: &CommTime) -> bool {
    matches!(c.group, GroupRole::World | GroupRole::Dp | GroupRole::Ring)
        || (c.op == OpKind::Shift && c.group == GroupRole::Sp)
        || c.what.contains("gradient")
}

/// ZeRO-3's parameter gathers and gradient reduce-scatters as DeepSpeed overlaps them
/// (`overlap_comm`, a prefetch of `prefetch_bucket_elems` parameters ahead of use), on the
/// slowest rank whose micro-steps compute `micro_s` seconds in all.
///
/// Central: a pipeline of ZeRO units (each block, and the embedding/head unit): while one unit
/// computes, the next unit's parameters are gathered (forward), or the next unit's gathered and
/// the previous one's gradients reduce-scattered (backward, sharing the link). The first
/// gather of each pass waits in full; after it, a unit's communication waits only for what
/// exceeds the compute of the unit before it. With `U` equal units, communication `g` and
/// compute `c` per pass: exposed = g/U + (U-1)/U x max(0, g - c). The forward pass's share of
/// a block's compute is 1/4 under full checkpointing (forward; recomputed forward and the
/// two backward products) and 1/3 without. The model pipelines whole units; DeepSpeed's finer
/// granularity (submodules within the prefetch window) is not modelled.
///
/// Low (pessimistic): nothing hidden, and under full checkpointing `recompute_gathers_low`
/// more gathers of every unit (the recomputed forward gathering again). High: everything hidden
/// up to the whole compute. A prefetch of 0 elements hides nothing at every band.
fn zero3_prefetch(comm: &mut Vec<CommTime>, micro_s: f64, job: &Job, z: &Zero3Prefetch, band: Band) {
    let zero3 = |c: &CommTime| c.what.starts_with("block parameter") || c.what.starts_with("block gradient");
    let full = job.checkpointing == Checkpointing::Full;
    match band {
        Band::Low => {
            if full && z.recompute_gathers_low > 0 {
                let extra: Vec<CommTime> = comm
                    .iter()
                    .filter(|c| c.what == "block parameter all-gather" && c.phase == Phase::Forward)
                    .map(|c| {
                        let k = z.recompute_gathers_low as f64;
                        CommTime {
                            what: "block parameter all-gather (recomputed forward)",
                            phase: Phase::Recompute,
                            calls: c.calls * z.recompute_gathers_low as u64,
                            bytes: c.bytes * k,
                            seconds: c.seconds * k,
                            exposed: c.seconds * k,
                            ..c.clone()
                        }
                    })
                    .collect();
                comm.extend(extra);
            }
        }
        _ if z.prefetch_bucket_elems <= 0.0 => {}
        Band::High => {
            let mut budget = micro_s;
            for c in comm.iter_mut().filter(|c| zero3(c)) {
                let hidden = c.seconds.min(budget);
                c.exposed = c.seconds - hidden;
                budget -= hidden;
            }
        }
        Band::Central => {
            let units = (job.model.n_layer + 1) as f64;
            let forward_share = if full { 0.25 } else { 1.0 / 3.0 };
            for (forward, c_pass) in
                [(true, micro_s * forward_share), (false, micro_s * (1.0 - forward_share))]
            {
                let in_pass = |c: &CommTime| zero3(c) && (c.phase == Phase::Forward) == forward;
                let g: f64 = comm.iter().filter(|c| in_pass(c)).map(|c| c.seconds).sum();
                if g <= 0.0 {
                    continue;
                }
                let exposed = g / units + (units - 1.0) / units * (g - c_pass).max(0.0);
                // Shared out in proportion to each collective's time.
                for c in comm.iter_mut().filter(|c| in_pass(c)) {
                    c.exposed = c.seconds * exposed / g;
                }
            }
        }
    }
}
