//! `ulysses demo`: P ranks, one all-to-all there and back, shapes and bytes per rank.

use anyhow::{ensure, Context, Result};
use tch::{Device, Kind, Tensor};
use ulysses::comm::OpKind;
use ulysses::experiment::format::plain;

use crate::ranks::{on_ranks, BackendArg};

pub fn run(backend: BackendArg, p: usize, n: i64, h: i64, d: i64, b: i64) -> Result<()> {
    let reports = on_ranks(backend, p, 1, |ctx| -> Result<Vec<f64>> {
        let (world, ranks) = (ctx.world(), ctx.world_size());
        ensure!(n % ranks as i64 == 0, "--seq {n} must be divisible by the {ranks} ranks");
        let r = ctx.rank() as f64;
        // This rank's slice of the sequence, with values that say which rank made them.
        let x = Tensor::rand([b, n / ranks as i64, h, d], (Kind::Float, Device::Cpu)) + r;
        // [b, N/P, H, d] -> [b, N, H/P, d]: scatter heads (dim 2), gather sequence (dim 1).
        let y = world.all_to_all_v(&x, 2, 1, &split(h, ranks), &vec![n / ranks as i64; ranks])?;
        let forward = world.stats().op(OpKind::AllToAll);
        // [b, N, H/P, d] -> [b, N/P, H, d]: the inverse.
        let back = world.all_to_all_v(&y, 1, 2, &vec![n / ranks as i64; ranks], &split(h, ranks))?;
        let mut out: Vec<f64> = x.size().into_iter().chain(y.size()).map(|v| v as f64).collect();
        out.extend([
            forward.bytes_sent as f64,
            forward.bytes_received as f64,
            f64::from(u8::from(back.equal(&x))),
        ]);
        Ok(out)
    })
    .context("the demo's ranks failed")?;
    let Some(reports) = reports else { return Ok(()) };
    let ranks = reports.len();
    let how = if backend == BackendArg::Mpi { "MPI processes" } else { "threads" };
    println!("DeepSpeed-Ulysses all-to-all on {ranks} ranks ({how}), f32, b={b} N={n} H={h} d={d}");
    println!(
        "{:>4}  {:<18} {:<18} {:>12} {:>12}  round trip",
        "rank", "input", "after a2a", "sent B", "recv B"
    );
    let shape = |v: &[f64]| format!("{:?}", v.iter().map(|x| *x as i64).collect::<Vec<_>>());
    for (rank, v) in reports.iter().enumerate() {
        let exact = v[10] == 1.0;
        println!(
            "{rank:>4}  {:<18} {:<18} {:>12} {:>12}  {}",
            shape(&v[0..4]),
            shape(&v[4..8]),
            plain(v[8]),
            plain(v[9]),
            if exact { "bit-exact" } else { "DIFFERS" }
        );
    }
    // docs/design.md §2.2: one all-to-all of a tensor of M elements sends M(P-1)/P^2 per rank.
    let (m, pp) = (b * n * h * d, ranks as i64);
    println!(
        "formula for even heads: M(P-1)/P^2 x 4 B = {} B per rank (M = b*N*H*d = {})",
        plain((m * (pp - 1) / (pp * pp) * 4) as f64),
        plain(m as f64)
    );
    ensure!(reports.iter().all(|v| v[10] == 1.0), "an all-to-all round trip was not exact");
    Ok(())
}

/// H heads over P ranks: ranks below H % P get one more.
fn split(h: i64, p: usize) -> Vec<i64> {
    let p = p as i64;
    (0..p).map(|r| h / p + i64::from(r < h % p)).collect()
}
