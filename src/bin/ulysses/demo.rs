//! `ulysses demo`: P ranks as threads, one all-to-all there and back, shapes and bytes per rank.

use anyhow::{ensure, Context, Result};
use tch::{Device, Kind, Tensor};
use ulysses::comm::{launch, OpKind};

struct RankReport {
    input: Vec<i64>,
    gathered: Vec<i64>,
    sent: u64,
    received: u64,
    round_trip_exact: bool,
}

pub fn run(p: usize, n: i64, h: i64, d: i64, b: i64) -> Result<()> {
    ensure!(p >= 1, "--ranks must be at least 1");
    ensure!(n % p as i64 == 0, "--seq {n} must be divisible by --ranks {p}");
    println!("DeepSpeed-Ulysses all-to-all on {p} ranks (threads), f32, b={b} N={n} H={h} d={d}");
    let reports = launch(p, |ctx| -> Result<RankReport> {
        let world = ctx.world();
        let r = ctx.rank() as f64;
        // This rank's slice of the sequence, with values that say which rank made them.
        let x = Tensor::rand([b, n / p as i64, h, d], (Kind::Float, Device::Cpu)) + r;
        // [b, N/P, H, d] -> [b, N, H/P, d]: scatter heads (dim 2), gather sequence (dim 1).
        let y = world.all_to_all_v(&x, 2, 1, &split(h, p), &vec![n / p as i64; p])?;
        let forward = world.stats().op(OpKind::AllToAll);
        // [b, N, H/P, d] -> [b, N/P, H, d]: the inverse.
        let back = world.all_to_all_v(&y, 1, 2, &vec![n / p as i64; p], &split(h, p))?;
        Ok(RankReport {
            input: x.size(),
            gathered: y.size(),
            sent: forward.bytes_sent,
            received: forward.bytes_received,
            round_trip_exact: back.equal(&x),
        })
    })
    .context("the demo's ranks failed")?;

    println!(
        "{:>4}  {:<18} {:<18} {:>12} {:>12}  round trip",
        "rank", "input", "after a2a", "sent B", "recv B"
    );
    for (rank, rep) in reports.iter().enumerate() {
        println!(
            "{rank:>4}  {:<18} {:<18} {:>12} {:>12}  {}",
            format!("{:?}", rep.input),
            format!("{:?}", rep.gathered),
            rep.sent,
            rep.received,
            if rep.round_trip_exact { "bit-exact" } else { "DIFFERS" }
        );
    }
    // DESIGN.md §2.2: one all-to-all of a tensor of M elements sends M(P-1)/P^2 per rank.
    let m = b * n * h * d;
    let pp = p as i64;
    println!(
        "formula for even heads: M(P-1)/P^2 x 4 B = {} B per rank (M = b*N*H*d = {m})",
        m * (pp - 1) / (pp * pp) * 4
    );
    ensure!(reports.iter().all(|r| r.round_trip_exact), "an all-to-all round trip was not exact");
    Ok(())
}

/// H heads over P ranks: ranks below H % P get one more.
fn split(h: i64, p: usize) -> Vec<i64> {
    let p = p as i64;
    (0..p).map(|r| h / p + i64::from(r < h % p)).collect()
}
