//! The conformance checks (collectives against closed forms, round trips, adjoints, argument
//! errors, every strategy's parity, the GPT's parity) on an MPI job: start it with
//! `mpirun -n P ulysses-checks` (or `ulysses launch -n P --program ulysses-checks`) to check an
//! installation. `conformance-chunked` runs them with payloads cut into 61-byte messages (the
//! chunking of large payloads, at small sizes); `large` sends 2 GiB + 8 bytes from rank 0 to
//! rank 1 (over MPI's 32-bit count, so it needs the chunking; about 6 GiB of memory);
//! `conformance-every` compares every transfer's envelope (the default compares new ones and
//! every 64th); `conformance-native` runs them with MPI's own all-reduce, reduce-scatter and
//! all-gather (the path NCCL's collectives take on a GPU); `latency [every]` times small
//! all-to-alls. Modes for
//! the failure tests: `mismatch`, `mismatch-p2p` (a send and a recv that disagree: both ranks
//! must report it), `timeout`, `panic`, `exit` (rank 1's process ends in the middle of a step,
//! without a word, as a killed or crashed process does), `diverged` and `diverged-size` (two
//! ranks disagree on a transfer whose envelopes each had compared before).

#[path = "../../tests/common/mod.rs"]
mod common;

use std::time::Duration;

use anyhow::{bail, Result};
use tch::{Device, Kind, Tensor};
use ulysses::comm::{EnvelopeChecks, MpiLaunch};

fn main() -> Result<()> {
    let mode = std::env::args().nth(1).unwrap_or_else(|| "conformance".into());
    let timeout = match mode.as_str() {
        "timeout" => 1,
        "mismatch-p2p" => 5,
        _ => 120,
    };
    let mut launch = MpiLaunch::new().timeout(Duration::from_secs(timeout));
    match mode.as_str() {
        "conformance-chunked" => launch = launch.max_message_bytes(61),
        "conformance-every" => launch = launch.envelope_checks(EnvelopeChecks::Every),
        "conformance-native" => launch = launch.native_collectives(true),
        "diverged" | "diverged-size" => {
            launch = launch.envelope_checks(EnvelopeChecks::NewAndEvery { audit: 4 })
        }
        "latency" if std::env::args().nth(2).as_deref() == Some("every") => {
            launch = launch.envelope_checks(EnvelopeChecks::Every)
        }
        _ => {}
    }
    let ran = launch.run(|ctx| -> Result<String> {
        let (w, r) = (ctx.world(), ctx.rank());
        match mode.as_str() {
            "conformance" | "conformance-chunked" | "conformance-every" | "conformance-native" => {
                common::checks::native(w, mode == "conformance-native")?;
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
            "diverged" | "diverged-size" => {
                // Ranks 0 and 1 agree on two envelopes, then disagree on a transfer whose
                // envelopes each has seen before, so neither compares it: `diverged` sends the
                // same number of bytes in another shape (the next comparison, at most 4
                // transfers later, finds the histories differ), `diverged-size` fewer bytes than
                // the receiver expects (it says so at once).
                let x = |shape: &[i64]| Tensor::ones(shape, (Kind::Float, Device::Cpu));
                let p2p = |shape: &[i64]| -> ulysses::Result<()> {
                    match r {
                        0 => w.send(&x(shape), 1),
                        1 => w.recv(&x(shape), 0).map(drop),
                        _ => Ok(()),
                    }
                };
                let (a, b): (&[i64], &[i64]) =
                    if mode == "diverged" { (&[4], &[2, 2]) } else { (&[4], &[5]) };
                p2p(a)?;
                p2p(b)?;
                let third = match r {
                    0 => w.send(&x(a), 1),
                    1 => w.recv(&x(b), 0).map(drop),
                    _ => Ok(()),
                };
                let mut said = third.err().map(|e| format!("rank {r} caught: {e}"));
                // Then the same transfer again, until the next comparison (`diverged` only: after
                // `diverged-size` rank 1 has stopped receiving).
                for _ in 0..if mode == "diverged" { 4 } else { 0 } {
                    if said.is_some() {
                        break;
                    }
                    said = p2p(a).err().map(|e| format!("rank {r} caught: {e}"));
                }
                Ok(said.unwrap_or_else(|| format!("rank {r}: no error")))
            }
            "latency" => {
                // Microseconds per small all-to-all ([2, 4, P, 4] f32 per rank), median of 5 rounds
                // of 400 after 100 to warm up.
                let x = Tensor::ones([2, 4, w.size() as i64, 4], (Kind::Float, Device::Cpu));
                for _ in 0..100 {
                    let _ = w.all_to_all(&x, 2, 1)?;
                }
                let mut rounds = Vec::new();
                for _ in 0..5 {
                    let t = std::time::Instant::now();
                    for _ in 0..400 {
                        let _ = w.all_to_all(&x, 2, 1)?;
                    }
                    rounds.push(t.elapsed().as_secs_f64() * 1e6 / 400.0);
                }
                rounds.sort_by(f64::total_cmp);
                let checks = std::env::args().nth(2).unwrap_or_else(|| "new".into());
                Ok(format!("latency checks={checks} ranks={} rank={r} median_us={:.2}", w.size(), rounds[2]))
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
                "unknown mode {other:?}: conformance, conformance-chunked, conformance-every, conformance-native, large, \
                 mismatch, mismatch-p2p, diverged, diverged-size, latency [every], timeout, panic or exit"
            ),
        }
    })?;
    println!("{ran}");
    Ok(())
}
