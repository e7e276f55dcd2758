//! Byte counters equal the formulas of docs/design.md §2.2 exactly: one all-to-all of a tensor of
//! global size M sends M(P-1)/P^2 per rank, an all-gather or reduce-scatter M(P-1)/P, an
//! all-reduce 2M(P-1)/P; data that stays on a rank is never counted. The formulas are the
//! library's own (`cost::bytes`), the ones the cost model prices: one source of truth.

mod common;

use anyhow::{ensure, Result};
use common::{data, WORLD_SIZES};
use tch::{Kind, Tensor};
use ulysses::autograd::Tape;
use ulysses::comm::{launch, CommStats, OpCount, OpKind, ReduceOp};
use ulysses::cost::bytes;

fn count(stats: &CommStats, op: OpKind) -> OpCount {
    stats.op(op)
}

#[test]
fn collective_bytes_follow_the_formulas() -> Result<()> {
    for p in WORLD_SIZES {
        let pu = p as u64;
        let pi = p as i64;
        for kind in [Kind::Float, Kind::BFloat16, Kind::Double] {
            let es = kind.elt_size_in_bytes() as u64;
            launch(p, |ctx| -> Result<()> {
                let (g, r) = (ctx.world(), ctx.rank());
                // all-to-all: per rank [b, N/P, H, d]; global M = b*N*H*d.
                let (b, n, h, d) = (2, 4 * pi, 2 * pi, 3);
                let m = (b * n * h * d) as u64;
                let _ = g.all_to_all(&data(r, &[b, n / pi, h, d], kind, true), 2, 1)?;
                let c = count(&g.stats(), OpKind::AllToAll);
                let (sent, received) = bytes::all_to_all(b * d, &vec![h / pi; p], &vec![n / pi; p], r);
                let want = m * (pu - 1) / (pu * pu) * es;
                ensure!(sent as u64 * es == want && received == sent, "the library's all-to-all formula");
                ensure!(
                    c.bytes_sent == want && c.bytes_received == want && c.calls == 1,
                    "a2a P={p} {kind:?}: {c:?}, want {want}"
                );

                // all-gather: each rank holds M/P.
                let _ = g.all_gather(&data(r, &[5, 3], kind, true), 0)?;
                let (sent, received) = bytes::all_gather(3, &vec![5; p], r);
                let c = count(&g.stats(), OpKind::AllGather);
                ensure!(
                    c.bytes_sent == sent as u64 * es && c.bytes_received == received as u64 * es,
                    "all_gather P={p}: {c:?}"
                );
                ensure!(sent as u64 == 15 * pu * (pu - 1) / pu, "M(P-1)/P");

                // reduce-scatter: each rank holds all M and keeps M/P.
                let _ = g.reduce_scatter(&data(r, &[2 * pi, 3], kind, true), 0, ReduceOp::Sum)?;
                let (sent, received) = bytes::reduce_scatter(3, &vec![2; p], r);
                let c = count(&g.stats(), OpKind::ReduceScatter);
                ensure!(
                    c.bytes_sent == sent as u64 * es && c.bytes_received == received as u64 * es,
                    "reduce_scatter P={p}: {c:?}"
                );
                ensure!(sent as u64 == 6 * pu * (pu - 1) / pu, "M(P-1)/P");

                // all-reduce of M = 8P elements: 2M(P-1)/P.
                let _ = g.all_reduce(&data(r, &[8 * pi], kind, true), ReduceOp::Sum)?;
                let m = 8 * pu;
                let (sent, _) = bytes::all_reduce(8 * pi, p, r);
                let c = count(&g.stats(), OpKind::AllReduce);
                ensure!(c.bytes_sent == sent as u64 * es && c.calls == 1, "all_reduce P={p}: {c:?}");
                ensure!(sent as u64 == 2 * m * (pu - 1) / pu, "2M(P-1)/P");

                // broadcast: the root sends M to each other rank; the others receive M.
                let _ = g.broadcast(&data(r, &[7], kind, true), 0)?;
                let c = count(&g.stats(), OpKind::Broadcast);
                let (sent, recv) = if r == 0 { (7 * (pu - 1), 0) } else { (0, 7) };
                ensure!(
                    c.bytes_sent == sent * es && c.bytes_received == recv * es,
                    "broadcast P={p} rank {r}: {c:?}"
                );

                // shift: M out, M in, unless the data stays (P = 1).
                let _ = g.shift(&data(r, &[4], kind, true), 1)?;
                let c = count(&g.stats(), OpKind::Shift);
                let (m, _) = bytes::shift(4, p);
                ensure!(
                    c.bytes_sent == m as u64 * es && c.bytes_received == m as u64 * es,
                    "shift P={p}: {c:?}"
                );

                g.barrier()?;
                ensure!(count(&g.stats(), OpKind::Barrier).bytes_sent == 0, "barrier moved bytes");
                ensure!(count(&g.stats(), OpKind::Barrier).calls == 1, "barrier calls");

                g.reset_stats();
                ensure!(g.stats() == CommStats::default(), "reset left {:?}", g.stats());
                Ok(())
            })?;
        }
    }
    Ok(())
}

#[test]
fn uneven_all_to_all_counts_what_leaves_the_rank() -> Result<()> {
    for p in WORLD_SIZES {
        let results = launch(p, |ctx| -> Result<(u64, u64)> {
            let (g, r) = (ctx.world(), ctx.rank());
            let scatter: Vec<i64> = (0..p as i64).map(|j| j + 1).collect();
            let rows: i64 = scatter.iter().sum();
            let _ = g.all_to_all_v(&data(r, &[rows, 2], Kind::Float, true), 0, 1, &scatter, &vec![2; p])?;
            let c = g.stats().op(OpKind::AllToAll);
            // Sent: every row not addressed to this rank; received: scatter[r] rows from each
            // other rank; 2 floats a row.
            let (sent, received) = bytes::all_to_all(1, &scatter, &vec![2; p], r);
            let (want_sent, want_recv) = (sent as u64 * 4, received as u64 * 4);
            ensure!(want_sent == ((rows - scatter[r]) * 2 * 4) as u64, "rows not addressed to this rank");
            ensure!(c.bytes_sent == want_sent && c.bytes_received == want_recv, "P={p} rank {r}: {c:?}");
            Ok((c.bytes_sent, c.bytes_received))
        })?;
        let (sent, recv) = results.iter().fold((0, 0), |(a, b), (s, r)| (a + s, b + r));
        ensure!(sent == recv, "P={p}: the group sent {sent} but received {recv}");
    }
    Ok(())
}

#[test]
fn taped_forward_and_backward_are_counted_per_group() -> Result<()> {
    // A 2 x 2 mesh: an all-to-all on the sp groups, an all-reduce on the dp groups; the tape's
    // backward runs the adjoints on the same groups, so each group's volume doubles.
    launch(4, |ctx| -> Result<()> {
        let mesh = ctx.mesh(ulysses::comm::MeshShape::dp_sp(2, 2)?)?;
        let (sp, dp) = (mesh.group("sp")?, mesh.group("dp")?);
        let tape = Tape::new();
        let x = Tensor::ones([2, 8, 4, 3], (Kind::Float, tch::Device::Cpu)).set_requires_grad(true);
        let y = tape.all_to_all(sp, &x, 2, 1)?;
        let z = tape.all_reduce(dp, &y)?;
        let forward = (sp.stats().op(OpKind::AllToAll), dp.stats().op(OpKind::AllReduce));
        ensure!(ctx.world().stats().bytes_sent() == 0, "world counted the subgroups' bytes");
        let total = ctx.world().rank_stats().bytes_sent();
        ensure!(total == forward.0.bytes_sent + forward.1.bytes_sent, "rank total {total} B");
        tape.backward(&z.sum(Kind::Float))?;
        let both = (sp.stats().op(OpKind::AllToAll), dp.stats().op(OpKind::AllReduce));
        // a2a: global M = 2 ranks x 192 floats, M(P-1)/P^2 = 96 floats sent. all-reduce of
        // M = 192 floats: 2M(P-1)/P = 192 floats sent.
        let a2a = bytes::all_to_all(2 * 3, &[2, 2], &[8, 8], sp.rank()).0 as u64;
        let ar = bytes::all_reduce(192, 2, dp.rank()).0 as u64;
        ensure!(a2a == 96 && ar == 192, "the library's formulas: {a2a} {ar}");
        ensure!(forward.0.bytes_sent == a2a * 4 && forward.1.bytes_sent == ar * 4, "forward {forward:?}");
        ensure!(both.0.bytes_sent == 2 * forward.0.bytes_sent && both.0.calls == 2, "sp {both:?}");
        ensure!(both.1.bytes_sent == 2 * forward.1.bytes_sent && both.1.calls == 2, "dp {both:?}");
        Ok(())
    })?;
    Ok(())
}
