//! The MPI backend's all-to-all against the local backend's, P=4, 1 and 16 MiB per rank: the
//! same `ulysses bench-a2a` loop once as threads and once as MPI processes (mpirun), medians,
//! as a ratio. Run: `cargo bench --features mpi --bench mpi`.

use std::process::Command;

use anyhow::{Context, Result};

/// median_ms for each size from `ulysses bench-a2a` output.
fn medians(out: &[u8]) -> Result<Vec<(i64, f64)>> {
    let text = String::from_utf8_lossy(out);
    text.lines()
        .filter(|l| l.contains("a2a backend="))
        .map(|l| {
            let get = |k: &str| l.split_whitespace().find_map(|kv| kv.strip_prefix(k)).context("field");
            Ok((get("mib=")?.parse()?, get("median_ms=")?.parse()?))
        })
        .collect()
}

fn main() -> Result<()> {
    let exe = env!("CARGO_BIN_EXE_ulysses");
    let args = ["bench-a2a", "--ranks", "4", "--mib", "1,16", "--runs", "31"];
    let local = Command::new(exe).args(args).arg("--backend").arg("local").output()?;
    let mpi =
        Command::new(exe).args(["launch", "-n", "4", "--"]).args(args).args(["--backend", "mpi"]).output()?;
    let (l, m) = (medians(&local.stdout)?, medians(&mpi.stdout)?);
    anyhow::ensure!(
        l.len() == 2 && m.len() == 2,
        "bench-a2a failed:\n{}{}",
        String::from_utf8_lossy(&mpi.stdout),
        String::from_utf8_lossy(&mpi.stderr)
    );
    println!("== all-to-all, P=4, f32 [1, N/P, 32, 128] -> [1, N, 8, 128], into a preallocated output, medians of 31 ==");
    println!("{:>10} {:>12} {:>12} {:>16}", "MiB/rank", "local ms", "mpi ms", "mpi/local time");
    for ((mib, lt), (_, mt)) in l.iter().zip(&m) {
        println!("{mib:>10} {lt:>12.3} {mt:>12.3} {:>15.2}x", mt / lt);
    }
    println!(
        "(local: 4 threads of one process; mpi: 4 OpenMPI processes on this machine's {} cores)",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    Ok(())
}
