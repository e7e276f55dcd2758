//! `ulysses bench-a2a`: all-to-all throughput of a backend, the same loop for threads and MPI
//! processes, so that `cargo bench --bench comm --features mpi` can compare them.

use std::time::Instant;

use anyhow::Result;
use tch::{Device, Kind, Tensor};

use crate::ranks::{on_ranks, BackendArg};

/// Times `runs` all-to-alls of `[1, rows, 32, 128]` f32 per rank (Ulysses' direction) for each
/// size, into a preallocated output, from barrier to barrier; prints `a2a mib=.. median_ms=..`.
pub fn run(backend: BackendArg, ranks: usize, mibs: &[i64], runs: usize) -> Result<()> {
    let (heads, d) = (32i64, 128i64);
    let per_rank = on_ranks(backend, ranks, 1, |ctx| -> Result<Vec<f64>> {
        let (g, p) = (ctx.world(), ctx.world_size() as i64);
        let mut medians = Vec::new();
        for &mib in mibs {
            let rows = mib * 1024 * 1024 / 4 / (heads * d);
            let x = Tensor::randn([1, rows, heads, d], (Kind::Float, Device::Cpu));
            let out = Tensor::empty([1, rows * p, heads / p, d], (Kind::Float, Device::Cpu));
            let (split, gather) = (vec![heads / p; p as usize], vec![rows; p as usize]);
            let mut times = Vec::new();
            for i in 0..runs + 2 {
                g.barrier()?;
                let t0 = Instant::now();
                g.all_to_all_v_into(&x, &out, 2, 1, &split, &gather)?;
                g.barrier()?;
                if i >= 2 {
                    times.push(t0.elapsed().as_secs_f64() * 1e3);
                }
            }
            times.sort_by(f64::total_cmp);
            medians.push(times[times.len() / 2]);
        }
        Ok(medians)
    })?;
    if let Some(per_rank) = per_rank {
        for (i, mib) in mibs.iter().enumerate() {
            println!(
                "a2a backend={backend:?} ranks={} mib={mib} runs={runs} median_ms={:.4}",
                per_rank.len(),
                per_rank[0][i]
            );
        }
    }
    Ok(())
}
