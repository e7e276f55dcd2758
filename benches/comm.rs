//! Communication benchmarks, each a ratio against a baseline measured in the same run.
//!
//! 1. Local all-to-all at P=4 (ranks as threads) for 1, 16 and 128 MiB per rank, against every
//!    rank copying the same number of bytes with a plain tensor copy (memcpy) in the same launch.
//! 2. Backward of an L-block residual stack through the tape (P=1, with cuts) against the plain
//!    single-device autograd backward of the same blocks, L = 2 and 8.
//!
//! Run: `cargo bench --bench comm` (add `-- --quick` for fewer repetitions).

#[path = "../tests/common/mod.rs"]
mod common;

#[path = "../tests/common/blocks.rs"]
mod blocks;

use std::time::{Duration, Instant};

use anyhow::Result;
use blocks::Blocks;
use tch::{Device, Kind, Tensor};
use ulysses::autograd::Tape;
use ulysses::comm::{launch, Group};

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Wall time of `op` on all ranks: from a barrier to the barrier after it, as rank 0 sees it.
fn timed(g: &Group, op: impl FnOnce() -> ulysses::Result<()>) -> ulysses::Result<Duration> {
    g.barrier()?;
    let t0 = Instant::now();
    op()?;
    g.barrier()?;
    Ok(t0.elapsed())
}

fn all_to_all_vs_memcpy(quick: bool) -> Result<()> {
    let p = 4usize;
    let (heads, d) = (32i64, 128i64);
    println!("\n== local all-to-all vs memcpy: P={p} ranks as threads, f32, [1, N/P, {heads}, {d}] -> [1, N, {}, {d}] ==", heads / p as i64);
    println!(
        "{:>10} {:>6} {:>12} {:>12} {:>10} {:>12} {:>12} {:>12} {:>12}",
        "MiB/rank", "runs", "into: copy", "a2a ms", "a2a GB/s", "ratio", "alloc: copy", "a2a ms", "ratio"
    );
    for mib in [1i64, 16, 128] {
        let runs = match (quick, mib) {
            (true, _) => 3,
            (false, 128) => 9,
            (false, 16) => 31,
            _ => 101,
        };
        let rows = mib * 1024 * 1024 / 4 / (heads * d);
        let times = launch(p, |ctx| -> Result<[Duration; 4]> {
            let g = ctx.world();
            let x = Tensor::randn([1, rows, heads, d], (Kind::Float, Device::Cpu));
            let mut y = x.empty_like();
            let out = Tensor::empty([1, rows * p as i64, heads / p as i64, d], (Kind::Float, Device::Cpu));
            let split = vec![heads / p as i64; p];
            let gather = vec![rows; p];
            let mut t: [Vec<Duration>; 4] = Default::default();
            for i in 0..runs + 2 {
                // Interleaved, so that drift on a noisy machine hits all four alike.
                let once = [
                    timed(g, || {
                        y.copy_(&x);
                        Ok(())
                    })?,
                    timed(g, || g.all_to_all_v_into(&x, &out, 2, 1, &split, &gather))?,
                    timed(g, || {
                        drop(x.copy());
                        Ok(())
                    })?,
                    timed(g, || g.all_to_all(&x, 2, 1).map(drop))?,
                ];
                if i >= 2 {
                    for (v, d) in t.iter_mut().zip(once) {
                        v.push(d);
                    }
                }
            }
            Ok(t.map(median))
        })?;
        let [copy, a2a, copy_alloc, a2a_alloc] = times[0];
        let bytes = (mib * 1024 * 1024) as f64 * p as f64;
        let ratio = |base: Duration, a: Duration| base.as_secs_f64() / a.as_secs_f64();
        println!(
            "{mib:>10} {runs:>6} {:>12.3} {:>12.3} {:>10.2} {:>11.2}x {:>12.3} {:>12.3} {:>11.2}x",
            ms(copy),
            ms(a2a),
            bytes / a2a.as_secs_f64() / 1e9,
            ratio(copy, a2a),
            ms(copy_alloc),
            ms(a2a_alloc),
            ratio(copy_alloc, a2a_alloc),
        );
    }
    println!("(ratio = memcpy time / all-to-all time for the same bytes per rank, medians; 'into': both");
    println!(
        " write a preallocated buffer; 'alloc': both allocate their output, as x.copy() and all_to_all do)"
    );
    Ok(())
}

fn tape_backward_vs_plain(quick: bool) -> Result<()> {
    let (n, heads, d) = (1024i64, 8i64, 32i64);
    let h = heads * d;
    let runs = if quick { 3 } else { 15 };
    println!("\n== backward through the tape vs plain autograd: P=1, f32, N={n}, h={h}, one thread ==");
    println!("{:>4} {:>6} {:>12} {:>12} {:>12}", "L", "runs", "plain ms", "tape ms", "tape/plain");
    for layers in [2usize, 8] {
        let out = launch(1, |ctx| -> Result<(Duration, Duration)> {
            let g = ctx.world();
            let stack = Blocks::new(layers, heads, d, Kind::Float, 3);
            let x = common::det(&[n, h], 1, Kind::Float).set_requires_grad(true);
            let m = common::det(&[n, h], 2, Kind::Float);
            let (mut plain, mut taped) = (Vec::new(), Vec::new());
            for i in 0..runs + 1 {
                let loss = (stack.forward_plain(&x) * &m).sum(Kind::Float);
                let t0 = Instant::now();
                loss.backward();
                let p_time = t0.elapsed();

                let tape = Tape::new();
                let out = stack.forward_sp(&tape, g, &x, &[heads], &[n], true)?;
                let loss = (out * &m).sum(Kind::Float);
                let t0 = Instant::now();
                tape.backward(&loss)?;
                let t_time = t0.elapsed();
                if i >= 1 {
                    plain.push(p_time);
                    taped.push(t_time);
                }
                for w in stack.params() {
                    let _ = w.grad().zero_();
                }
            }
            Ok((median(plain), median(taped)))
        })?;
        let (plain, taped) = out[0];
        println!(
            "{layers:>4} {runs:>6} {:>12.3} {:>12.3} {:>11.3}x",
            ms(plain),
            ms(taped),
            taped.as_secs_f64() / plain.as_secs_f64()
        );
    }
    println!("(P=1: the tape's all-to-alls are local copies; the ratio is the tape's overhead; medians)");
    Ok(())
}

fn main() -> Result<()> {
    let quick = std::env::args().any(|a| a == "--quick");
    println!(
        "ulysses communication benchmarks ({} cores, libtorch {} threads per rank)",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        1
    );
    all_to_all_vs_memcpy(quick)?;
    tape_backward_vs_plain(quick)?;
    Ok(())
}
