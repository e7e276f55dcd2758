//! Chunked Ulysses (FPDT; src/attention/chunked.rs): the same attention as one device in f64
//! for every mask, world size, chunk count and head layout; the same bytes as Ulysses in u times
//! the all-to-alls; what it refuses.

mod common;

use anyhow::{ensure, Context, Result};
use common::parity::{allclose, reference, tol, Spec};
use tch::Tensor;
use ulysses::attention::{
    AttentionConfig, BlockSparse, ChunkedUlysses, Mask, SequenceParallel, StrategyConfig,
};
use ulysses::autograd::Tape;
use ulysses::comm::{launch, OpKind};
use ulysses::device::{Offload, OffloadTarget};

/// [out, dq, dk, dv, lse] put back together over `p` ranks, and rank 0's all-to-all calls and
/// bytes sent.
fn run(p: usize, chunks: usize, spec: &Spec, mask: Mask) -> ulysses::Result<([Tensor; 5], (u64, u64))> {
    run_with(p, chunks, spec, mask, None)
}

/// [`run`], each chunk's K/V offloaded to files under `offload` between the forward and the
/// backward when given.
fn run_with(
    p: usize,
    chunks: usize,
    spec: &Spec,
    mask: Mask,
    offload: Option<&std::path::Path>,
) -> ulysses::Result<([Tensor; 5], (u64, u64))> {
    let per_rank = launch(p, |ctx| -> ulysses::Result<(Vec<Tensor>, (u64, u64))> {
        let r = ctx.rank();
        let mut s =
            ChunkedUlysses::new(ctx.world().clone(), mask, spec.n, spec.heads, spec.kv_heads, chunks)?;
        if let Some(dir) = offload {
            s = s.with_offload(Offload::new(OffloadTarget::Disk(dir.to_path_buf()), tch::Device::Cpu)?);
        }
        let sharding = s.sharding();
        let [q, k, v, w] = spec.tensors();
        let mine = |t: &Tensor| -> ulysses::Result<Tensor> {
            Ok(sharding.shard(t, r)?.copy().set_requires_grad(true))
        };
        let (q, k, v) = (mine(&q)?, mine(&k)?, mine(&v)?);
        ctx.world().reset_rank_stats();
        let tape = Tape::new();
        let o = s.forward(&tape, &q, &k, &v)?;
        tape.backward(&(&o * sharding.shard(&w, r)?).sum(o.kind()))?;
        let a2a = ctx.world().rank_stats().op(OpKind::AllToAll);
        if let Some(store) = s.offload() {
            // Each chunk's q, K/V, output and log-sum-exp went out in the forward and came back
            // once in the backward; a key chunk is read back (and kept) for every other use: in
            // the forward by each query chunk attended after it arrived, in the backward by each
            // query chunk before its last.
            let (st, u) = (store.stats(), chunks as u64);
            // The count the cost model takes, and by hand for the causal and the full mask.
            let (fwd, back) = ChunkedUlysses::offload_reads(&mask, spec.n, p, chunks)?;
            let reads = match mask {
                Mask::Causal => u * (u - 1) / 2 + u * (u - 1) / 2,
                Mask::None => u * (u - 1) + (u - 1) * u,
                _ => (fwd + back) as u64,
            };
            if (fwd + back) as u64 != reads {
                return Err(ulysses::Error::Tape {
                    op: "test",
                    msg: format!("offload_reads {fwd} + {back}"),
                });
            }
            if st.put != 4 * u || st.taken != 4 * u || st.held_bytes != 0 || st.read != reads {
                return Err(ulysses::Error::Tape {
                    op: "test",
                    msg: format!("offload stats {st:?}, expected {} put and taken, {reads} read", 4 * u),
                });
            }
        }
        let (_, lse) = s.forward_lse(&q.detach(), &k.detach(), &v.detach())?;
        Ok((vec![o.detach(), q.grad(), k.grad(), v.grad(), lse], (a2a.calls, a2a.bytes_sent)))
    })?;
    let sharding =
        ulysses::attention::Sharding::Sequence(ulysses::attention::SeqLayout::strided(spec.n, p, chunks)?);
    let part =
        |i: usize| sharding.unshard(&per_rank.iter().map(|(t, _)| t[i].shallow_clone()).collect::<Vec<_>>());
    Ok(([part(0)?, part(1)?, part(2)?, part(3)?, part(4)?], per_rank[0].1))
}

fn masks() -> Vec<Mask> {
    vec![
        Mask::None,
        Mask::Causal,
        Mask::SlidingWindow { window: 5 },
        Mask::BlockSparse(BlockSparse { block: 4, local_blocks: 2, global_blocks: 1, causal: true }),
    ]
}

#[test]
fn every_mask_chunk_count_and_head_layout_matches_one_device() -> Result<()> {
    // f64, the reference's own bound (tests/common/parity.rs): merges of blocks in another order.
    for p in [2usize, 4] {
        for chunks in [1usize, 2, 3] {
            for (heads, kv_heads) in [(4, 4), (4, 2), (4, 1)] {
                let n = (chunks * p * 3) as i64; // pieces of 3 tokens
                let spec = Spec::new(n, heads, kv_heads);
                for mask in masks() {
                    let (got, _) = run(p, chunks, &spec, mask)?;
                    let want = reference(&spec, mask)?;
                    for (i, name) in ["out", "dq", "dk", "dv", "lse"].iter().enumerate() {
                        let label = format!(
                            "chunked u={chunks} P={p} H={heads} H_kv={kv_heads} N={n} {mask:?} {name}"
                        );
                        allclose(&label, &got[i], &want[i], tol(&spec, p))?;
                    }
                }
            }
        }
    }
    Ok(())
}

#[test]
fn the_bytes_are_ulysses_in_u_times_the_all_to_alls() -> Result<()> {
    // Per rank and step (forward and backward): Ulysses' all-to-all bytes exactly, in u times
    // the calls (q, k, v in one call per chunk, o in another; twice with the backward).
    let (p, heads, kv_heads) = (4usize, 8, 2);
    let spec = Spec::new(48, heads, kv_heads);
    let ulysses_bytes = launch(p, |ctx| -> ulysses::Result<(u64, u64)> {
        let s = StrategyConfig::Ulysses.build(
            ctx.world(),
            AttentionConfig::default(),
            spec.n,
            heads,
            kv_heads,
        )?;
        let sharding = s.sharding();
        let [q, k, v, _] = spec.tensors();
        let mine = |t: &Tensor| -> ulysses::Result<Tensor> {
            Ok(sharding.shard(t, ctx.rank())?.copy().set_requires_grad(true))
        };
        let (q, k, v) = (mine(&q)?, mine(&k)?, mine(&v)?);
        ctx.world().reset_rank_stats();
        let tape = Tape::new();
        let o = s.forward(&tape, &q, &k, &v)?;
        tape.backward(&o.sum(o.kind()))?;
        let a = ctx.world().rank_stats().op(OpKind::AllToAll);
        Ok((a.calls, a.bytes_sent))
    })?[0];
    for chunks in [1usize, 2, 4] {
        let (_, (calls, bytes)) = run(p, chunks, &spec, Mask::Causal)?;
        ensure!(bytes == ulysses_bytes.1, "u={chunks}: {bytes} bytes sent, Ulysses {}", ulysses_bytes.1);
        ensure!(
            calls == chunks as u64 * ulysses_bytes.0,
            "u={chunks}: {calls} all-to-alls, Ulysses {}",
            ulysses_bytes.0
        );
    }
    Ok(())
}

#[test]
fn chunk_counts_that_do_not_split_the_local_sequence_are_refused() -> Result<()> {
    let errs = launch(4, |ctx| -> ulysses::Result<Vec<String>> {
        let e = |n: i64, u: usize| {
            ChunkedUlysses::new(ctx.world().clone(), Mask::Causal, n, 4, 4, u)
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default()
        };
        Ok(vec![e(40, 3), e(42, 2), e(40, 0)])
    })?;
    let e = errs.first().context("rank 0")?;
    ensure!(
        e[0].contains("3 chunk(s) per rank: the local sequence N/P = 10 must split into 3 equal chunks"),
        "{}",
        e[0]
    );
    ensure!(e[1].contains("N = 42 (not a multiple of P = 4)"), "{}", e[1]);
    ensure!(e[2].contains("0 chunk(s)"), "{}", e[2]);
    Ok(())
}

#[test]
fn offloaded_chunks_give_the_same_attention_bit_for_bit() -> Result<()> {
    // Each chunk's q, K/V, output and log-sum-exp through a file and back, the key chunks read
    // again as often as the schedule says: the same numbers, and every chunk was moved.
    let dir = std::env::temp_dir().join(format!("ulysses-chunked-offload-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    for (p, chunks, heads, kv_heads) in [(2usize, 3usize, 4, 2), (4, 2, 4, 1)] {
        let spec = Spec::new((chunks * p * 3) as i64, heads, kv_heads);
        for mask in masks() {
            let (kept, _) = run(p, chunks, &spec, mask)?;
            let (moved, _) = run_with(p, chunks, &spec, mask, Some(&dir))?;
            for (i, name) in ["out", "dq", "dk", "dv", "lse"].iter().enumerate() {
                ensure!(kept[i].equal(&moved[i]), "u={chunks} P={p} {mask:?} {name}: offload changed it");
            }
        }
    }
    let left: Vec<_> = std::fs::read_dir(&dir)?.collect();
    ensure!(left.is_empty(), "left behind: {left:?}");
    std::fs::remove_dir(&dir)?;
    Ok(())
}
