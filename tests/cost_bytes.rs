//! The cost model's bytes are the counters' bytes: every strategy's GPT step on P thread ranks,
//! counted per group and op kind, against `cost::bytes::step_comm` (one source of truth for
//! communication volume), bit for bit, for every rank, sent and received, and call counts.
//! Also the cost model's parameter counts against the parameters the GPT allocates.

mod common;

use std::collections::BTreeMap;

use anyhow::{ensure, Result};
use tch::{Device, Kind, Tensor};
use ulysses::attention::{AttentionConfig, Documents, Kernel, Mask, StrategyConfig};
use ulysses::comm::{launch, MeshShape};
use ulysses::cost::bytes::{layer_comm, step_comm, Phase};
use ulysses::cost::memory::params_on_rank;
use ulysses::cost::Job;
use ulysses::model::{shift_labels, shift_labels_packed, Gpt, GptConfig, Placement};
use ulysses::train::{Checkpointing, Precision, ZeroStage};

type Counts = BTreeMap<(String, String), (u64, u64, u64)>; // (group, op) -> (calls, sent, received)

fn job(cfg: &GptConfig, strategy: StrategyConfig, p: usize, b: i64, n: i64, precision: Precision) -> Job {
    Job {
        attention: AttentionConfig::new(Kernel::Sdpa, Mask::Causal),
        micro_batch: b,
        precision,
        checkpointing: Checkpointing::None,
        zero: ZeroStage::NONE,
        optimizer: false,
        backend: "local".into(),
        ..Job::new(cfg.clone(), strategy, p, n)
    }
}

/// What the model says rank r sends, by (group, op).
fn predicted(job: &Job, r: usize) -> Result<Counts> {
    let mut out = Counts::new();
    for c in step_comm(job, r)? {
        let e = out.entry((c.group.counter_name(job).to_string(), c.op.name().to_string())).or_default();
        e.0 += c.calls;
        e.1 += c.sent;
        e.2 += c.received;
    }
    Ok(out)
}

/// One forward_backward of the GPT on `p` ranks: each rank's counters, and its parameters split
/// (replicated, sharded).
fn counted(job: &Job) -> Result<Vec<(Counts, (i64, i64))>> {
    let (cfg, n, b) = (&job.model, job.seq, job.micro_batch);
    let kind = job.precision.kind();
    let vocab = cfg.vocab_size;
    Ok(launch(job.ranks, |ctx| -> Result<(Counts, (i64, i64))> {
        let toks =
            (Tensor::arange(b * n, (Kind::Int64, Device::Cpu)) * 7 + 3).remainder(vocab).reshape([b, n]);
        // Packed: every sample the job's documents.
        let docs = match &job.documents {
            Some(lengths) => Some(Documents::from_lengths(n, &vec![lengths.clone(); b as usize])?),
            None => None,
        };
        let labels = match &docs {
            Some(d) => shift_labels_packed(&toks, d)?,
            None => shift_labels(&toks)?,
        };
        // The groups as the experiment runner makes them (named "sp" and "dp").
        let mesh = ctx.mesh(MeshShape::dp_sp(job.dp, job.sp())?)?;
        let s = job.strategy.build(mesh.group("sp")?, job.attention, n, cfg.n_head, cfg.n_kv_head)?;
        let layout = s.layout().clone();
        let model = Gpt::new(cfg, s, kind, Device::Cpu)?;
        let (t, l) = (layout.shard(&toks, 1, ctx.rank())?, layout.shard(&labels, 1, ctx.rank())?);
        ctx.world().reset_rank_stats();
        model.forward_backward_packed(&t, &l, docs.as_ref())?;
        let mut counts = Counts::new();
        for (group, stats) in ctx.world().rank_stats_by_group() {
            for (op, c) in stats.iter() {
                if c.calls > 0 && op != ulysses::comm::OpKind::Barrier {
                    counts.insert(
                        (group.clone(), op.name().to_string()),
                        (c.calls, c.bytes_sent, c.bytes_received),
                    );
                }
            }
        }
        let count = |rep: bool| -> i64 {
            model
                .params()
                .all()
                .iter()
                .filter(|p| (p.placement == Placement::Replicated) == rep)
                .map(|p| p.tensor.numel() as i64)
                .sum()
        };
        Ok((counts, (count(true), count(false))))
    })?)
}

fn check(job: &Job) -> Result<()> {
    let label = format!(
        "{} P={} H={} H_kv={} {}",
        job.describe(),
        job.ranks,
        job.model.n_head,
        job.model.n_kv_head,
        job.precision.name()
    );
    for (r, (counts, (rep, sharded))) in counted(job)?.into_iter().enumerate() {
        let want = predicted(job, r)?;
        ensure!(counts == want, "{label} rank {r}:\n counted   {counts:?}\n predicted {want:?}");
        let params = params_on_rank(job);
        ensure!(
            params.replicated == rep as f64 && params.sharded == sharded as f64,
            "{label} rank {r}: parameters (replicated, sharded) = ({rep}, {sharded}), model says ({}, {})",
            params.replicated,
            params.sharded
        );
    }
    Ok(())
}

#[test]
fn every_strategy_at_several_world_sizes() -> Result<()> {
    let mha = GptConfig { n_layer: 2, n_head: 8, n_kv_head: 8, n_embd: 64, ..GptConfig::tiny() };
    let gqa = GptConfig { n_kv_head: 2, ..mha.clone() };
    // The Llama layout: its parameters (RMSNorm weights, SwiGLU's three matrices) and bytes.
    let llama = GptConfig { n_head: 8, ..GptConfig::llama_tiny() };
    for cfg in [&mha, &gqa, &llama] {
        for p in [2usize, 4] {
            for s in [
                "ulysses",
                "megatron_sp",
                "ring",
                "ring_zigzag",
                "allgather_kv",
                "allgather_kv_zigzag",
                "usp_zigzag:2",
                "usp:2",
                "ulysses_chunked:2",
            ] {
                let strategy: StrategyConfig = s.parse().map_err(anyhow::Error::msg)?;
                if strategy == StrategyConfig::MegatronSp && cfg.n_kv_head % p as i64 != 0 {
                    continue; // Megatron-SP needs H_kv divisible by P
                }
                check(&job(cfg, strategy, p, 2, 64, Precision::F32))?;
            }
        }
    }
    Ok(())
}

#[test]
fn uneven_shares_heads_and_kv_replication() -> Result<()> {
    // N % P != 0, H % P != 0, MQA (kv heads replicated for the all-to-all), an untied head,
    // no biases.
    let cfg = GptConfig {
        n_layer: 1,
        n_head: 6,
        n_kv_head: 1,
        n_embd: 48,
        tie_embeddings: false,
        bias: false,
        ..GptConfig::tiny()
    };
    for (p, n) in [(3usize, 50i64), (4, 30), (6, 64)] {
        check(&job(&cfg, StrategyConfig::Ulysses, p, 1, n, Precision::F32))?;
    }
    check(&job(&cfg, StrategyConfig::Usp { ulysses: 2, zigzag: false }, 4, 1, 32, Precision::F32))?;
    Ok(())
}

#[test]
fn bf16_activations_and_the_world_of_one() -> Result<()> {
    let cfg = GptConfig { n_layer: 1, ..GptConfig::tiny() };
    for s in [StrategyConfig::Ulysses, StrategyConfig::MegatronSp, StrategyConfig::Ring { zigzag: true }] {
        check(&job(&cfg, s, 2, 1, 32, Precision::Bf16))?;
        check(&job(&cfg, s, 1, 1, 32, Precision::F32))?;
    }
    check(&job(&cfg, StrategyConfig::Ring { zigzag: false }, 8, 1, 64, Precision::F32))?;
    Ok(())
}

#[test]
fn a_packed_ring_sends_only_what_a_rank_attends_to() -> Result<()> {
    let cfg = GptConfig { n_layer: 1, n_head: 4, n_kv_head: 2, n_embd: 32, ..GptConfig::tiny() };
    let packed = |s: &str, lengths: &[i64]| -> Result<Job> {
        let strategy: StrategyConfig = s.parse().map_err(anyhow::Error::msg)?;
        Ok(Job { documents: Some(lengths.to_vec()), ..job(&cfg, strategy, 4, 2, 64, Precision::F32) })
    };
    // Counted against predicted, every rank, for the strategies with a ring and two without.
    for s in ["ring", "ring_zigzag", "usp:2", "usp_zigzag:2", "ulysses", "allgather_kv"] {
        for lengths in [&[40, 24][..], &[16; 4], &[7, 1, 30, 2, 24], &[64]] {
            check(&packed(s, lengths)?)?;
        }
    }
    // Written out: N = 64 on 4 ranks of 16 tokens, documents of 40 and 24. Block 0 is attended
    // by ranks 1 and 2 (document 0 spans 0-39), block 1 by rank 2, block 2 by rank 3 (document 1
    // spans 40-63), block 3 by no later rank (causal). So the forward passes on 1, 2, 1, 0 blocks
    // (K and V) per rank and receives 0, 1, 2, 1, where the classic ring passes 3 each.
    let block = 2 * 16 * 2 * 8 * 4; // b x s_r x H_kv x d x 4 bytes (f32)
    let forward = |job: &Job, r: usize| -> Result<(u64, u64)> {
        let calls = layer_comm(job, r)?;
        let shifts = calls.iter().filter(|c| c.phase == Phase::Forward && c.what == "K/V ring passes");
        Ok(shifts.fold((0, 0), |a, c| (a.0 + c.sent, a.1 + c.received)))
    };
    let job = packed("ring", &[40, 24])?;
    for (r, (sends, receives)) in [(1u64, 0u64), (2, 1), (1, 2), (0, 1)].into_iter().enumerate() {
        let got = forward(&job, r)?;
        ensure!(got == (2 * sends * block, 2 * receives * block), "rank {r}: {got:?}");
    }
    // Documents that each stay in one rank's share: nothing travels at all.
    let job = packed("ring", &[16; 4])?;
    for r in 0..4 {
        ensure!(layer_comm(&job, r)?.iter().all(|c| c.what != "K/V ring passes"), "rank {r} sends");
    }
    // One document: the classic ring, 3 blocks each way per rank.
    let job = packed("ring", &[64])?;
    for r in 0..4 {
        ensure!(forward(&job, r)? == (6 * block, 6 * block), "rank {r}: {:?}", forward(&job, r)?);
    }
    Ok(())
}
