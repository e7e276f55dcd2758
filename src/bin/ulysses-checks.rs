//! The conformance checks (collectives against closed forms, round trips, adjoints, argument
//! errors, every strategy's parity, the GPT's parity) on an MPI job: start it with
//! `mpirun -n P ulysses-checks` (or `ulysses launch -n P --program ulysses-checks`) to check an
//! installation. Modes for the failure tests: `mismatch`, `timeout`, `panic`.

#[path = "../../tests/common/mod.rs"]
mod common;

use std::time::Duration;

use anyhow::{bail, Result};
use tch::{Device, Kind, Tensor};
use ulysses::comm::MpiLaunch;

fn main() -> Result<()> {
    let mode = std::env::args().nth(1).unwrap_or_else(|| "conformance".into());
    let launch = MpiLaunch::new().timeout(Duration::from_secs(if mode == "timeout" { 1 } else { 120 }));
    let ran = launch.run(|ctx| -> Result<String> {
        let (w, r) = (ctx.world(), ctx.rank());
        match mode.as_str() {
            "conformance" => {
                Ok(format!("{} checks passed on {} ranks (mpi)", common::checks::all(w)?, w.size()))
            }
            "mismatch" => {
                // Rank 1 holds a longer slice than the others.
                let x =
                    Tensor::ones([2, 2 + i64::from(r == 1), w.size() as i64, 4], (Kind::Float, Device::Cpu));
                let _ = w.all_to_all(&x, 2, 1)?;
                Ok("no mismatch detected".into())
            }
            "timeout" => {
                if r == 1 {
                    std::thread::sleep(Duration::from_secs(20));
                }
                w.barrier()?;
                Ok("no timeout".into())
            }
            "panic" => {
                if r == 1 {
                    panic!("rank one is broken");
                }
                w.barrier()?;
                Ok("no panic".into())
            }
            other => bail!("unknown mode {other:?}: conformance, mismatch, timeout or panic"),
        }
    })?;
    println!("{ran}");
    Ok(())
}
