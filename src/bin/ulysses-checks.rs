//! The conformance checks (collectives against closed forms, round trips, adjoints, argument
//! errors, every strategy's parity, the GPT's parity) on an MPI job: start it with
//! `mpirun -n P ulysses-checks` (or `ulysses launch -n P --program ulysses-checks`) to check an
//! installation. `conformance-chunked` runs them with payloads cut into 61-byte messages (the
//! chunking of large payloads, at small sizes); `large` sends 2 GiB + 8 bytes from rank 0 to
//! rank 1 (over MPI's 32-bit count, so it needs the chunking; about 6 GiB of memory). Modes for
//! the failure tests: `mismatch`, `mismatch-p2p` (a send and a recv that disagree: both ranks
//! must report it), `timeout`, `panic`, `exit` (rank 1's process ends in the middle of a step,
//! without a word, as a killed or crashed process does).

#[path = "../../tests/common/mod.rs"]
mod common;

use std::time::Duration;

use anyhow::{bail, Result};
use tch::{Device, Kind, Tensor};
use ulysses::comm::MpiLaunch;

fn main() -> Result<()> {
    let mode = std::env::args().nth(1).unwrap_or_else(|| "conformance".into());
    let timeout = match mode.as_str() {
        "timeout" => 1,
        "mismatch-p2p" => 5,
        _ => 120,
    };
    let mut launch = MpiLaunch::new().timeout(Duration::from_secs(timeout));
    if mode == "conformance-chunked" {
        launch = launch.max_message_bytes(61);
    }
    let ran = launch.run(|ctx| -> Result<String> {
        let (w, r) = (ctx.world(), ctx.rank());
        match mode.as_str() {
            "conformance" | "conformance-chunked" => {
                Ok(format!("{} checks passed on {} ranks (mpi)", common::checks::all(w)?, w.size()))
            }
            "large" => {
                // 2 GiB + 8 bytes: a pattern of 251 bytes, repeated.
                let n = (1i64 << 31) + 8;
                let pattern = || {
                    let unit = Tensor::arange(251, (Kind::Int64, Device::Cpu)).to_kind(Kind::Uint8);
                    unit.repeat([n / 251 + 1]).narrow(0, 0, n)
                };
                match r {
                    0 => w.send(&pattern(), 1)?,
                    1 => {
                        let got = w.recv(&Tensor::zeros([n], (Kind::Uint8, Device::Cpu)), 0)?;
                        anyhow::ensure!(got.equal(&pattern()), "the 2 GiB payload arrived altered");
                    }
                    _ => {}
                }
                w.barrier()?;
                Ok(format!("rank {r}: {n} bytes sent and checked"))
            }
            "mismatch-p2p" => {
                // Rank 0 sends 4 elements, rank 1 expects 5: each catches its own error.
                let x = |len: i64| Tensor::ones([len], (Kind::Float, Device::Cpu));
                let result = match r {
                    0 => w.send(&x(4), 1),
                    1 => w.recv(&x(5), 0).map(drop),
                    _ => Ok(()),
                };
                let said = match result {
                    Err(e) => format!("rank {r} caught: {e}"),
                    Ok(()) => format!("rank {r}: no error"),
                };
                // Nothing is left in flight: the group still works.
                w.barrier()?;
                Ok(said)
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
            "exit" => {
                // One all-to-all, then rank 1's process vanishes while the others wait in the next.
                let x = Tensor::ones([2, 4, w.size() as i64, 4], (Kind::Float, Device::Cpu));
                let _ = w.all_to_all(&x, 2, 1)?;
                if r == 1 {
                    std::process::exit(9);
                }
                let _ = w.all_to_all(&x, 2, 1)?;
                Ok("no exit".into())
            }
            "panic" => {
                if r == 1 {
                    panic!("rank one is broken");
                }
                w.barrier()?;
                Ok("no panic".into())
            }
            other => bail!(
                "unknown mode {other:?}: conformance, conformance-chunked, large, mismatch, mismatch-p2p, \
                 timeout, panic or exit"
            ),
        }
    })?;
    println!("{ran}");
    Ok(())
}
