//! Adjoint identities: for every differentiable collective A,
//! sum over ranks of <A x, y> equals sum over ranks of <x, A^T y>, where A^T y is what the tape's
//! backward delivers to x.grad when the loss is <A x, y>. f64, random rank-dependent data.

mod common;

use anyhow::{ensure, Result};
use common::{det, dot, head_split, WORLD_SIZES};
use tch::{Kind, Tensor};
use ulysses::autograd::Tape;
use ulysses::comm::{launch, Group};

/// One taped op: x (rank r's input) -> A x.
type Op = fn(&Tape, &Group, &Tensor) -> ulysses::Result<Tensor>;

/// Runs `op` on every rank with x and y depending on the rank, returns (sum <Ax, y>, sum <x, A^T y>).
fn sums(p: usize, x_shape: &[i64], op: Op) -> Result<(f64, f64)> {
    let per_rank = launch(p, |ctx| -> Result<(f64, f64)> {
        let r = ctx.rank() as u64;
        let tape = Tape::new();
        let x = det(x_shape, 100 + r, Kind::Double).set_requires_grad(true);
        let ax = op(&tape, ctx.world(), &x)?;
        let y = det(&ax.size(), 200 + r, Kind::Double);
        let loss = (&ax * &y).sum(Kind::Double);
        tape.backward(&loss)?;
        let grad = x.grad();
        let at_y = if grad.defined() { dot(&x, &grad) } else { 0.0 };
        Ok((loss.double_value(&[]), at_y))
    })?;
    Ok(per_rank.iter().fold((0.0, 0.0), |(a, b), (l, g)| (a + l, b + g)))
}

fn check(name: &str, p: usize, (lhs, rhs): (f64, f64)) -> Result<()> {
    let scale = lhs.abs().max(rhs.abs()).max(1.0);
    ensure!((lhs - rhs).abs() <= 1e-12 * scale, "{name} P={p}: <Ax,y> = {lhs}, <x,A^T y> = {rhs}");
    ensure!(lhs != 0.0, "{name} P={p}: degenerate test, <Ax,y> = 0");
    Ok(())
}

#[test]
fn every_collective_satisfies_the_adjoint_identity() -> Result<()> {
    for p in WORLD_SIZES {
        let pi = p as i64;
        check("all_to_all", p, sums(p, &[2, 3, 2 * pi, 4], |t, g, x| t.all_to_all(g, x, 2, 1))?)?;
        check("all_to_all reverse", p, sums(p, &[2, 3 * pi, 2, 4], |t, g, x| t.all_to_all(g, x, 1, 2))?)?;
        check("all_gather", p, sums(p, &[3, 5], |t, g, x| t.all_gather(g, x, 1))?)?;
        check("reduce_scatter", p, sums(p, &[3 * pi, 5], |t, g, x| t.reduce_scatter(g, x, 0))?)?;
        check("all_reduce", p, sums(p, &[7, 3], |t, g, x| t.all_reduce(g, x))?)?;
        check("shift +1", p, sums(p, &[4, 2], |t, g, x| t.shift(g, x, 1))?)?;
        check("shift -2", p, sums(p, &[4, 2], |t, g, x| t.shift(g, x, -2))?)?;
        check("broadcast from 0", p, sums(p, &[5], |t, g, x| t.broadcast(g, x, 0))?)?;
        check("broadcast from last", p, sums(p, &[5], |t, g, x| t.broadcast(g, x, g.size() - 1))?)?;
    }
    Ok(())
}

#[test]
fn uneven_collectives_satisfy_the_adjoint_identity() -> Result<()> {
    for p in WORLD_SIZES {
        // Ulysses with 7 heads: uneven head split, even sequence.
        let a2a: Op = |t, g, x| {
            let heads = head_split(7, g.size());
            t.all_to_all_v(g, x, 2, 1, &heads, &vec![3; g.size()])
        };
        check("all_to_all_v", p, sums(p, &[2, 3, 7, 2], a2a)?)?;
        // Rank j owns j % 2 + 1 rows; x must have this rank's size, so build it in the op.
        let gather: Op = |t, g, x| {
            let sizes: Vec<i64> = (0..g.size() as i64).map(|j| j % 2 + 1).collect();
            let mine = x.narrow(0, 0, sizes[g.rank()]);
            t.all_gather_v(g, &mine, 0, &sizes)
        };
        check("all_gather_v", p, sums(p, &[2, 3], gather)?)?;
        let scatter: Op = |t, g, x| {
            let split: Vec<i64> = (0..g.size() as i64).map(|j| (j + 1) % 3).collect();
            let total = split.iter().sum();
            t.reduce_scatter_v(g, &x.narrow(0, 0, total), 0, &split)
        };
        check("reduce_scatter_v", p, sums(p, &[2 * p as i64, 3], scatter)?)?;
    }
    Ok(())
}

#[test]
fn send_and_recv_are_adjoint() -> Result<()> {
    for p in [2usize, 3, 4, 8] {
        // Rank r sends to r + 1 and receives from r - 1 as separate send/recv calls (even ranks
        // send first, odd ranks receive first, so the synchronous sends cannot deadlock).
        let op: Op = |t, g, x| {
            let (r, p) = (g.rank(), g.size());
            let (next, prev) = ((r + 1) % p, (r + p - 1) % p);
            if r % 2 == 0 {
                t.send(g, x, next)?;
                t.recv(g, x, prev)
            } else {
                let got = t.recv(g, x, prev)?;
                t.send(g, x, next)?;
                Ok(got)
            }
        };
        check("send/recv", p, sums(p, &[3, 3], op)?)?;
    }
    Ok(())
}

#[test]
fn megatron_f_and_g_are_conjugate() -> Result<()> {
    for p in WORLD_SIZES {
        // f: identity forward, all-reduce backward. x is replicated (the same on every rank, so
        // counted once); sum_r <x, y_r> = <x, all_reduce(y)>.
        let per_rank = launch(p, |ctx| -> Result<(f64, f64)> {
            let tape = Tape::new();
            let x = det(&[4, 3], 1, Kind::Double).set_requires_grad(true);
            let y = det(&[4, 3], 50 + ctx.rank() as u64, Kind::Double);
            let loss = (tape.copy_to_parallel_region(ctx.world(), &x)? * &y).sum(Kind::Double);
            tape.backward(&loss)?;
            Ok((loss.double_value(&[]), dot(&x, &x.grad())))
        })?;
        let lhs: f64 = per_rank.iter().map(|(l, _)| l).sum();
        for (r, (_, rhs)) in per_rank.iter().enumerate() {
            check(&format!("f (rank {r})"), p, (lhs, *rhs))?;
        }
        // g: all-reduce forward, identity backward. y is replicated and the loss counted once:
        // <sum_r x_r, y> = sum_r <x_r, y>.
        let per_rank = launch(p, |ctx| -> Result<(f64, f64)> {
            let tape = Tape::new();
            let x = det(&[4, 3], 60 + ctx.rank() as u64, Kind::Double).set_requires_grad(true);
            let y = det(&[4, 3], 2, Kind::Double);
            let loss = (tape.reduce_from_parallel_region(ctx.world(), &x)? * &y).sum(Kind::Double);
            tape.backward(&loss)?;
            Ok((loss.double_value(&[]), dot(&x, &x.grad())))
        })?;
        let rhs: f64 = per_rank.iter().map(|(_, g)| g).sum();
        check("g", p, (per_rank[0].0, rhs))?;
    }
    Ok(())
}
