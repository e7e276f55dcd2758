//! One NCCL communicator's life, made so that no NCCL call can hang the host and the handle is
//! released exactly once:
//!
//! - it is *non-blocking* (`ncclConfig_t.blocking = 0`): initialisation and `ncclGroupEnd`
//!   return at once (`ncclInProgress`), and [`Comm::settle`] polls `ncclCommGetAsyncError`
//!   against the timeout, aborting the communicator when a peer never comes;
//! - its state (live or aborted) sits behind a mutex that every call takes, so the watchdog
//!   thread's `ncclCommAbort` never races an enqueue, `abort` runs at most once, and `Drop`
//!   destroys (`ncclCommFinalize` + `ncclCommDestroy`) only a communicator that was not
//!   aborted: never both on one handle;
//! - every `ncclGroupStart` is closed by `ncclGroupEnd`, on error paths too ([`Comm::grouped`]).

use std::ffi::CStr;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use cudarc::nccl::sys as nccl_sys;
use nccl_sys::ncclResult_t as R;

use super::cuda::{failure, NCCL_BUILT};
use crate::{Error, Result};

/// NCCL's message for a result, and the communicator's last error when there is one.
pub(super) fn nccl_message(r: R, comm: Option<nccl_sys::ncclComm_t>) -> String {
    // SAFETY: ncclGetErrorString returns a static NUL-terminated string for any result.
    let text = unsafe { CStr::from_ptr(nccl_sys::ncclGetErrorString(r)) }.to_string_lossy().into_owned();
    // SAFETY: ncclGetLastError takes a live communicator (or null) and returns a NUL-terminated
    // string owned by NCCL.
    let last =
        comm.map(|c| unsafe { CStr::from_ptr(nccl_sys::ncclGetLastError(c)) }.to_string_lossy().into_owned());
    match last.filter(|l| !l.is_empty()) {
        Some(l) => format!("{r:?} ({text}): {l}"),
        None => format!("{r:?} ({text})"),
    }
}

/// Where a communicator is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Live,
    /// `ncclCommAbort` ran; the handle is gone.
    Aborted,
}

/// What a timeout or failure names: this rank (global), the op and the group.
#[derive(Debug, Clone)]
pub(super) struct Who {
    pub op: &'static str,
    pub group: String,
    pub rank: usize,
}

/// A non-blocking NCCL communicator.
pub(super) struct Comm {
    raw: nccl_sys::ncclComm_t,
    state: Mutex<State>,
    timeout: Duration,
}

// SAFETY: the handle is only used under `state`'s mutex, which serialises every NCCL call on
// it (the owner's enqueues, the watchdog's error polls and abort); NCCL allows a communicator
// to be used from any thread as long as calls do not overlap.
unsafe impl Send for Comm {}
// SAFETY: see Send.
unsafe impl Sync for Comm {}

/// NCCL_CONFIG_INITIALIZER with `blocking = 0`.
fn nonblocking_config() -> nccl_sys::ncclConfig_t {
    const UNDEF: i32 = i32::MIN;
    nccl_sys::ncclConfig_t {
        size: std::mem::size_of::<nccl_sys::ncclConfig_t>(),
        magic: 0xcafe_beef,
        version: NCCL_BUILT as u32,
        blocking: 0,
        cgaClusterSize: UNDEF,
        minCTAs: UNDEF,
        maxCTAs: UNDEF,
        netName: std::ptr::null(),
        splitShare: UNDEF,
        trafficClass: UNDEF,
        commName: std::ptr::null(),
        collnetEnable: UNDEF,
        CTAPolicy: UNDEF,
        shrinkShare: UNDEF,
        nvlsCTAs: UNDEF,
        nChannelsPerNetPeer: UNDEF,
        nvlinkCentricSched: UNDEF,
    }
}

impl Comm {
    /// `ncclCommInitRankConfig` on the current device, waited for up to `timeout` (every rank
    /// of the group must call it with the same id).
    pub(super) fn init(
        size: usize,
        id: nccl_sys::ncclUniqueId,
        rank: usize,
        timeout: Duration,
        who: &Who,
    ) -> Result<Comm> {
        let mut raw = std::ptr::null_mut();
        let mut config = nonblocking_config();
        // SAFETY: `raw` is a valid place for the handle and `config` a valid NCCL 2.28 config;
        // size, id and rank are the same on every rank of the group (the id was broadcast).
        let r =
            unsafe { nccl_sys::ncclCommInitRankConfig(&mut raw, size as i32, id, rank as i32, &mut config) };
        if r != R::ncclSuccess && r != R::ncclInProgress {
            if !raw.is_null() {
                // SAFETY: a handle NCCL returned with its error; aborted once, never used again.
                let _ = unsafe { nccl_sys::ncclCommAbort(raw) };
            }
            return Err(failure(format!(
                "ncclCommInitRank for {} (rank {}): {}",
                who.group,
                who.rank,
                nccl_message(r, None)
            )));
        }
        let comm = Comm { raw, state: Mutex::new(State::Live), timeout };
        comm.settle(who, Instant::now(), "the communicator's initialisation")?;
        Ok(comm)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether `ncclCommAbort` ran.
    pub(super) fn aborted(&self) -> bool {
        *self.lock() == State::Aborted
    }

    /// Aborts the communicator unless it already was; says whether this call did.
    pub(super) fn abort(&self) -> bool {
        let mut st = self.lock();
        if *st == State::Aborted {
            return false;
        }
        // SAFETY: a live handle, aborted exactly once (the state changes under the same lock).
        let _ = unsafe { nccl_sys::ncclCommAbort(self.raw) };
        *st = State::Aborted;
        true
    }

    /// The communicator's asynchronous state: Ok(true) done, Ok(false) still in progress, or
    /// the error NCCL reports. An aborted communicator is an error.
    pub(super) fn poll(&self) -> std::result::Result<bool, String> {
        let st = self.lock();
        if *st == State::Aborted {
            return Err("the NCCL communicator was aborted".into());
        }
        let mut state = R::ncclSuccess;
        // SAFETY: a live handle (checked under the lock) and a valid place for the result.
        let r = unsafe { nccl_sys::ncclCommGetAsyncError(self.raw, &mut state) };
        match (r, state) {
            (R::ncclSuccess, R::ncclSuccess) => Ok(true),
            (R::ncclSuccess, R::ncclInProgress) => Ok(false),
            (R::ncclSuccess, e) | (e, _) => Err(nccl_message(e, Some(self.raw))),
        }
    }

    /// Waits until the communicator's pending host-side work is done; past the timeout, aborts
    /// it and returns `Error::Timeout` naming this rank.
    pub(super) fn settle(&self, who: &Who, start: Instant, what: &str) -> Result<()> {
        loop {
            match self.poll() {
                Ok(true) => return Ok(()),
                Ok(false) => {}
                Err(msg) => {
                    self.abort();
                    return Err(failure(format!(
                        "{} on group {} (rank {}): {msg}",
                        who.op, who.group, who.rank
                    )));
                }
            }
            if start.elapsed() > self.timeout {
                self.abort();
                return Err(Error::Timeout {
                    op: who.op,
                    group: who.group.clone(),
                    rank: who.rank,
                    waited: start.elapsed(),
                    timeout: self.timeout,
                    what: format!("waiting for {what}; the NCCL communicator was aborted"),
                });
            }
            std::thread::sleep(Duration::from_micros(50));
        }
    }

    /// Runs `body` (sends and receives on the raw handle) between `ncclGroupStart` and
    /// `ncclGroupEnd`, under the lock; the group is closed whatever `body` returns. Then waits
    /// for the enqueue to settle (not for the transfers: those complete on the device).
    pub(super) fn grouped(
        &self,
        who: &Who,
        body: impl FnOnce(nccl_sys::ncclComm_t) -> std::result::Result<(), R>,
    ) -> Result<()> {
        let start = Instant::now();
        {
            let st = self.lock();
            if *st == State::Aborted {
                return Err(failure(format!(
                    "{} on group {}: the NCCL communicator was aborted earlier",
                    who.op, who.group
                )));
            }
            // SAFETY: opens a group on this thread; closed below on every path.
            let opened = unsafe { nccl_sys::ncclGroupStart() };
            if opened != R::ncclSuccess {
                return Err(failure(format!("ncclGroupStart: {}", nccl_message(opened, Some(self.raw)))));
            }
            let queued = body(self.raw);
            // SAFETY: closes the group opened above, whether or not `body` succeeded.
            let closed = unsafe { nccl_sys::ncclGroupEnd() };
            if let Err(e) = queued {
                return Err(failure(format!(
                    "{} on group {}: {}",
                    who.op,
                    who.group,
                    nccl_message(e, Some(self.raw))
                )));
            }
            if closed != R::ncclSuccess && closed != R::ncclInProgress {
                return Err(failure(format!(
                    "{} on group {}: ncclGroupEnd: {}",
                    who.op,
                    who.group,
                    nccl_message(closed, Some(self.raw))
                )));
            }
        }
        self.settle(who, start, "NCCL to enqueue the transfers")
    }
}

impl Drop for Comm {
    fn drop(&mut self) {
        let st = self.lock();
        if *st == State::Aborted {
            return; // ncclCommAbort released everything; destroying too would free it twice
        }
        drop(st);
        // Finalize (flushes queued work), waited for within the timeout, then destroy; a
        // communicator that cannot finalize (a dead peer) is aborted instead.
        // SAFETY: a live handle; nothing else uses it now (Drop has `&mut self`).
        let r = unsafe { nccl_sys::ncclCommFinalize(self.raw) };
        let start = Instant::now();
        let finalized = (r == R::ncclSuccess || r == R::ncclInProgress)
            && loop {
                match self.poll() {
                    Ok(true) => break true,
                    Ok(false) if start.elapsed() < self.timeout => {
                        std::thread::sleep(Duration::from_micros(100))
                    }
                    _ => break false,
                }
            };
        if finalized {
            // SAFETY: a live, finalized handle, destroyed exactly once (it was not aborted).
            let _ = unsafe { nccl_sys::ncclCommDestroy(self.raw) };
        } else {
            self.abort();
        }
    }
}
