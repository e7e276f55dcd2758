//! The rank-level conformance checks (tests/common/checks.rs) on the local backend, at
//! several world sizes; `tests/mpi.rs` runs the same checks on MPI processes.

mod common;

use anyhow::Result;
use ulysses::comm::launch;

#[test]
fn the_conformance_checks_pass_on_threads() -> Result<()> {
    for p in [1usize, 2, 3, 4] {
        let ran = launch(p, |ctx| {
            // Threads have no collectives of their own: every call takes the group's transfers.
            common::checks::native(ctx.world(), false)?;
            common::checks::all(ctx.world())
        })?;
        anyhow::ensure!(ran.iter().all(|&n| n == 13), "P={p}: {ran:?} checks ran");
    }
    Ok(())
}
