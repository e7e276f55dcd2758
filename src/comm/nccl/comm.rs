//! One NCCL communicator's life, made so that no NCCL call can hang the host and the handle is
//! released exactly once, by the right thread:
//!
//! - it is *non-blocking* (`ncclConfig_t.blocking = 0`): initialisation, split and
//!   `ncclGroupEnd` may return at once (`ncclInProgress`) while NCCL works in the background,
//!   and [`Comm::settle`] polls `ncclCommGetAsyncError` against the timeout, aborting the
//!   communicator when a peer never comes;
//! - the raw handle lives in a [`Handle`] whose state (live, closing, closed, aborted) sits
//!   behind a mutex that every call takes, so the watchdog thread's `ncclCommAbort` never races
//!   an enqueue, `abort` runs at most once, and a communicator is never both aborted and
//!   destroyed;
//! - every `ncclGroupStart` is closed by `ncclGroupEnd`, on error paths too ([`Comm::grouped`]).
//!
//! **Who may release a communicator.** Only `Comm`'s `Drop` finalizes and destroys, and a
//! `Comm` is owned by the rank's endpoints and pending batches, so that runs on a rank's
//! thread. The watchdog holds only `Weak<Handle>`; a `Handle` frees nothing when dropped (it is
//! a pointer and a state), so the watchdog, which upgrades those under its own lock, can never
//! be the one that finalizes, never waits for a finalize while holding its lock, and never
//! blocks the rank's thread behind it. The watchdog takes a communicator's lock only for a
//! poll or an abort, never the other way round (no communicator call takes the watchdog's
//! lock), so the two locks cannot deadlock.
//!
//! **Waiting on the host.** Creation and split take milliseconds to seconds (connections to
//! every peer); a data-path `ncclGroupEnd` takes microseconds. NCCL 2.18-2.22 launch a group
//! synchronously once its connections exist (`ncclGroupEnd` returns `ncclSuccess`: nothing to
//! wait for); from 2.23 every `ncclGroupEnd` on a non-blocking communicator hands the launch to
//! a fresh thread and returns `ncclInProgress` (NCCL's src/group.cc). The enqueue cannot be
//! left to finish in the background: NCCL forbids touching the stream (recording the batch's
//! completion event, which the watchdog and libtorch's stream wait on) or calling the
//! communicator again before its state leaves `ncclInProgress`. So [`Comm::settle`] waits, but
//! does not sleep first: it polls with `std::thread::yield_now()` between polls for up to
//! [`SPIN`] (a yield, not a bare spin, so that NCCL's launch thread gets the core when the rank
//! has only one), then sleeps in growing steps (50 µs up to 1 ms) until the timeout. A launch
//! that takes tens of microseconds costs tens of microseconds, not a 50 µs sleep and the
//! timer's slack on every collective; the timeout guarantee is unchanged (checked on every
//! round).

use std::ffi::CStr;
use std::sync::atomic::{AtomicPtr, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use cudarc::nccl::sys as nccl_sys;

use super::cuda::failure;
use crate::device::{result_name, NcclApi, NcclCode, NCCL_FLOOR, NCCL_IN_PROGRESS, NCCL_SUCCESS};
use crate::{Error, Result};

/// How long [`Comm::settle`] polls between yields before it starts to sleep.
pub(super) const SPIN: Duration = Duration::from_millis(2);

/// Whether a code means "done or still going" (not an error).
pub(super) fn ok_or_pending(r: NcclCode) -> bool {
    r == NCCL_SUCCESS || r == NCCL_IN_PROGRESS
}

/// NCCL's message for a result, and the communicator's last error when there is one.
pub(super) fn nccl_message(api: &NcclApi, r: NcclCode, comm: Option<nccl_sys::ncclComm_t>) -> String {
    // SAFETY: ncclGetErrorString returns a static NUL-terminated string for any result.
    let text = unsafe { CStr::from_ptr((api.get_error_string)(r)) }.to_string_lossy().into_owned();
    // SAFETY: ncclGetLastError takes a live communicator (or null) and returns a NUL-terminated
    // string owned by NCCL.
    let last =
        comm.map(|c| unsafe { CStr::from_ptr((api.get_last_error)(c)) }.to_string_lossy().into_owned());
    match last.filter(|l| !l.is_empty()) {
        Some(l) => format!("{} ({text}): {l}", result_name(r)),
        None => format!("{} ({text})", result_name(r)),
    }
}

/// Where a communicator is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Live,
    /// `ncclCommFinalize` ran (the owner's drop is waiting for it).
    Closing,
    /// `ncclCommDestroy` ran; the handle is gone.
    Closed,
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

/// The raw communicator and its state: what the watchdog may hold (weakly). Dropping it frees
/// nothing; [`Comm`]'s drop releases the communicator.
pub(super) struct Handle {
    raw: nccl_sys::ncclComm_t,
    state: Mutex<State>,
    api: &'static NcclApi,
}

// SAFETY: the handle is only used under `state`'s mutex, which serialises every NCCL call on
// it (the owner's enqueues, the watchdog's error polls and abort, the owner's finalize); NCCL
// allows a communicator to be used from any thread as long as calls do not overlap.
unsafe impl Send for Handle {}
// SAFETY: see Send.
unsafe impl Sync for Handle {}

impl Handle {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether `ncclCommAbort` ran.
    pub(super) fn aborted(&self) -> bool {
        *self.lock() == State::Aborted
    }

    /// Aborts the communicator unless it is already gone; says whether this call did. A
    /// closing communicator (finalize pending) may be aborted: NCCL then releases it, and the
    /// owner's drop does not destroy it.
    pub(super) fn abort(&self) -> bool {
        let mut st = self.lock();
        if matches!(*st, State::Aborted | State::Closed) {
            return false;
        }
        // SAFETY: a handle not yet released, aborted exactly once (the state changes under the
        // same lock).
        let _ = unsafe { (self.api.comm_abort)(self.raw) };
        *st = State::Aborted;
        true
    }

    /// The asynchronous state of a live or closing communicator: Ok(true) done, Ok(false)
    /// still in progress, or the error NCCL reports. A released communicator is an error.
    pub(super) fn poll(&self) -> std::result::Result<bool, String> {
        let st = self.lock();
        match *st {
            State::Aborted => return Err("the NCCL communicator was aborted".into()),
            State::Closed => return Err("the NCCL communicator was destroyed".into()),
            State::Live | State::Closing => {}
        }
        let mut state = NCCL_SUCCESS;
        // SAFETY: a live handle (checked under the lock) and a valid place for the result.
        let r = unsafe { (self.api.comm_get_async_error)(self.raw, &mut state) };
        match (r, state) {
            (NCCL_SUCCESS, NCCL_SUCCESS) => Ok(true),
            (NCCL_SUCCESS, NCCL_IN_PROGRESS) => Ok(false),
            (NCCL_SUCCESS, e) | (e, _) => Err(nccl_message(self.api, e, Some(self.raw))),
        }
    }

    /// For the watchdog: the error of a *live* communicator, if NCCL reports one. Closing and
    /// released ones are not its business (their owner is releasing them).
    pub(super) fn live_error(&self) -> Option<String> {
        if *self.lock() != State::Live {
            return None;
        }
        // A release between the two locks makes poll report it, which is not an error here.
        match self.poll() {
            Err(msg) if *self.lock() == State::Live => Some(msg),
            _ => None,
        }
    }
}

/// A non-blocking NCCL communicator, owned by a rank's endpoints and batches; released
/// (finalize, destroy) when the last of them drops, on that thread.
pub(super) struct Comm {
    handle: Arc<Handle>,
    timeout: Duration,
}

/// `NCCL_CONFIG_INITIALIZER` with `blocking = 0`, filled up to the fields of NCCL 2.18 (the
/// floor) and saying so in `size` and `version`.
///
/// NCCL reads a config by its own `size` field and version (`parseCommConfig` in src/init.cc,
/// the same from 2.18 to 2.30): it copies `min(size, sizeof(its ncclConfig_t))` bytes over its
/// defaults and resets to default every field newer than `version`. Fields were only ever
/// appended. So a config that ends at 2.18's last field (`splitShare`) and says 2.18 is read
/// alike by every NCCL from the floor on; cudarc's struct (2.28's) is used for its layout, and
/// the fields after `splitShare` are neither counted in `size` nor read.
fn nonblocking_config() -> nccl_sys::ncclConfig_t {
    const UNDEF: i32 = i32::MIN;
    nccl_sys::ncclConfig_t {
        size: std::mem::offset_of!(nccl_sys::ncclConfig_t, trafficClass),
        magic: 0xcafe_beef,
        version: NCCL_FLOOR as u32,
        blocking: 0,
        cgaClusterSize: UNDEF,
        minCTAs: UNDEF,
        maxCTAs: UNDEF,
        netName: std::ptr::null(),
        splitShare: UNDEF,
        // Beyond `size`: never read by NCCL.
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

/// One host wait between polls: yields for the first [`SPIN`], then sleeps 50 µs, doubling up
/// to 1 ms.
fn pause(waited: Duration) {
    if waited < SPIN {
        std::thread::yield_now();
    } else {
        let steps = ((waited - SPIN).as_micros() / 200).min(5) as u32; // 50 µs .. 1.6 ms
        std::thread::sleep(Duration::from_micros(50 << steps).min(Duration::from_millis(1)));
    }
}

impl Comm {
    fn new(raw: nccl_sys::ncclComm_t, api: &'static NcclApi, timeout: Duration) -> Comm {
        Comm { handle: Arc::new(Handle { raw, state: Mutex::new(State::Live), api }), timeout }
    }

    fn api(&self) -> &'static NcclApi {
        self.handle.api
    }

    /// What the watchdog holds.
    pub(super) fn handle(&self) -> &Arc<Handle> {
        &self.handle
    }

    /// `ncclCommInitRankConfig` on the current device, waited for up to `timeout` (every rank
    /// of the group must call it with the same id).
    pub(super) fn init(
        api: &'static NcclApi,
        size: usize,
        id: nccl_sys::ncclUniqueId,
        rank: usize,
        timeout: Duration,
        who: &Who,
    ) -> Result<Comm> {
        let start = Instant::now();
        let mut raw = std::ptr::null_mut();
        let mut config = nonblocking_config();
        // SAFETY: `raw` is a valid place for the handle (NCCL sets it before returning) and
        // `config` a valid config (see nonblocking_config); size, id and rank are the same on
        // every rank of the group (the id was broadcast).
        let r = unsafe { (api.comm_init_rank_config)(&mut raw, size as i32, id, rank as i32, &mut config) };
        if !ok_or_pending(r) {
            if !raw.is_null() {
                // SAFETY: a handle NCCL returned with its error; aborted once, never used again.
                let _ = unsafe { (api.comm_abort)(raw) };
            }
            return Err(failure(format!(
                "ncclCommInitRankConfig for {} (rank {}): {}",
                who.group,
                who.rank,
                nccl_message(api, r, None)
            )));
        }
        let comm = Comm::new(raw, api, timeout);
        comm.settle(who, start, "the communicator's initialisation")?;
        Ok(comm)
    }

    /// `ncclCommSplit` of this communicator (collective over it: every rank calls it, in the
    /// same order): `color` (`NCCL_SPLIT_NOCOLOR`, -1, for a rank that takes no part) and `key`
    /// (the rank in the new communicator, by NCCL's order of keys), waited for up to the
    /// timeout. The new communicator is checked to have `size` ranks with this one at `key`.
    /// `None` for a rank without a color. On failure or timeout this (the parent)
    /// communicator is aborted: its split is stuck in NCCL and the group cannot go on.
    pub(super) fn split(&self, color: i32, key: i32, size: usize, who: &Who) -> Result<Option<Comm>> {
        let start = Instant::now();
        let api = self.api();
        let mut config = nonblocking_config();
        // NCCL writes the new handle from its background thread when the split completes, so
        // the slot lives on the heap; a split that never settles leaks it (8 bytes) rather than
        // leave NCCL a dangling pointer.
        let slot: *mut nccl_sys::ncclComm_t = Box::into_raw(Box::new(std::ptr::null_mut()));
        let r = {
            let st = self.handle.lock();
            if *st != State::Live {
                // SAFETY: the slot came from Box::into_raw above and NCCL never saw it.
                drop(unsafe { Box::from_raw(slot) });
                return Err(failure(format!(
                    "{} on group {}: the parent NCCL communicator was {}",
                    who.op,
                    who.group,
                    if *st == State::Aborted { "aborted earlier" } else { "released" }
                )));
            }
            // SAFETY: a live parent (under its lock), a valid slot and config; NCCL requires every
            // rank of the parent to call this, which the caller's collective contract gives.
            unsafe { (api.comm_split)(self.handle.raw, color, key, slot, &mut config) }
        };
        if !ok_or_pending(r) {
            // SAFETY: NCCL failed synchronously (it wrote NULL, and keeps no job writing it).
            drop(unsafe { Box::from_raw(slot) });
            self.handle.abort();
            return Err(failure(format!(
                "ncclCommSplit of group {} (rank {}, color {color}, key {key}): {}; the parent communicator \
                 was aborted",
                who.group,
                who.rank,
                nccl_message(api, r, Some(self.handle.raw))
            )));
        }
        // The split's job belongs to the parent: its state is in progress until the child exists.
        self.settle(who, start, "the communicator split (ncclCommSplit)")?;
        // SAFETY: NCCL's job stored the handle with release ordering before the parent's state
        // left ncclInProgress (observed above with acquire ordering inside NCCL); AtomicPtr has
        // the layout of a pointer, and the slot is valid and no longer written.
        let raw = unsafe { AtomicPtr::from_ptr(slot) }.load(Ordering::Acquire);
        // SAFETY: from Box::into_raw above; NCCL is done with it.
        drop(unsafe { Box::from_raw(slot) });
        if color == super::NCCL_SPLIT_NOCOLOR {
            return Ok(None);
        }
        if raw.is_null() {
            return Err(failure(format!(
                "ncclCommSplit of group {} (rank {}, color {color}, key {key}) completed without a communicator",
                who.group, who.rank
            )));
        }
        let child = Comm::new(raw, api, self.timeout);
        child.settle(who, start, "the split communicator's initialisation")?;
        let (mut count, mut me) = (0, 0);
        // SAFETY: a live, settled communicator and valid places for one int each.
        let (r1, r2) = unsafe { ((api.comm_count)(raw, &mut count), (api.comm_user_rank)(raw, &mut me)) };
        if r1 != NCCL_SUCCESS || r2 != NCCL_SUCCESS || count as usize != size || me != key {
            return Err(failure(format!(
                "ncclCommSplit of group {} (rank {}): the new communicator has {count} ranks with this one at \
                 {me} ({}, {}), but the group has {size} with this rank at {key}",
                who.group,
                who.rank,
                result_name(r1),
                result_name(r2)
            )));
        }
        Ok(Some(child))
    }

    /// Whether `ncclCommAbort` ran.
    pub(super) fn aborted(&self) -> bool {
        self.handle.aborted()
    }

    /// Waits until the communicator's pending host-side work is done (see the module doc: it
    /// yields, then sleeps); past the timeout, aborts it and returns `Error::Timeout` naming
    /// this rank. A failure NCCL reports aborts it too.
    pub(super) fn settle(&self, who: &Who, start: Instant, what: &str) -> Result<()> {
        loop {
            match self.handle.poll() {
                Ok(true) => return Ok(()),
                Ok(false) => {}
                Err(msg) => {
                    self.handle.abort();
                    return Err(failure(format!(
                        "{} on group {} (rank {}): {msg}",
                        who.op, who.group, who.rank
                    )));
                }
            }
            let waited = start.elapsed();
            if waited > self.timeout {
                self.handle.abort();
                return Err(Error::Timeout {
                    op: who.op,
                    group: who.group.clone(),
                    rank: who.rank,
                    waited,
                    timeout: self.timeout,
                    what: format!("waiting for {what}; the NCCL communicator was aborted"),
                });
            }
            pause(waited);
        }
    }

    /// Runs `body` (sends and receives on the raw handle) between `ncclGroupStart` and
    /// `ncclGroupEnd`, under the lock; the group is closed whatever `body` returns. Then, when
    /// NCCL hands the launch to its background thread (`ncclInProgress`), waits for the enqueue
    /// to settle (not for the transfers: those complete on the device), so that the caller may
    /// record an event on the stream and call the communicator again.
    pub(super) fn grouped(
        &self,
        who: &Who,
        body: impl FnOnce(&NcclApi, nccl_sys::ncclComm_t) -> std::result::Result<(), NcclCode>,
    ) -> Result<()> {
        let start = Instant::now();
        let api = self.api();
        let closed = {
            let st = self.handle.lock();
            if *st != State::Live {
                return Err(failure(format!(
                    "{} on group {}: the NCCL communicator was aborted earlier",
                    who.op, who.group
                )));
            }
            // SAFETY: opens a group on this thread; closed below on every path.
            let opened = unsafe { (api.group_start)() };
            if opened != NCCL_SUCCESS {
                return Err(failure(format!(
                    "ncclGroupStart: {}",
                    nccl_message(api, opened, Some(self.handle.raw))
                )));
            }
            let queued = body(api, self.handle.raw);
            // SAFETY: closes the group opened above, whether or not `body` succeeded.
            let closed = unsafe { (api.group_end)() };
            if let Err(e) = queued {
                return Err(failure(format!(
                    "{} on group {}: {}",
                    who.op,
                    who.group,
                    nccl_message(api, e, Some(self.handle.raw))
                )));
            }
            closed
        };
        match closed {
            NCCL_SUCCESS => Ok(()), // launched synchronously: nothing pending on the host
            NCCL_IN_PROGRESS => self.settle(who, start, "NCCL to enqueue the transfers"),
            e => Err(failure(format!(
                "{} on group {}: ncclGroupEnd: {}",
                who.op,
                who.group,
                nccl_message(api, e, Some(self.handle.raw))
            ))),
        }
    }
}

impl Drop for Comm {
    /// Finalize (flushes queued work), waited for within the timeout, then destroy; a
    /// communicator that cannot finalize (a dead peer) is aborted instead. Runs on the thread
    /// that drops the last `Comm` reference, never the watchdog's (see the module doc).
    fn drop(&mut self) {
        let h = &*self.handle;
        {
            let mut st = h.lock();
            if *st != State::Live {
                return; // aborted: ncclCommAbort released everything; destroying too would free it twice
            }
            // SAFETY: a live handle, finalized once (the state changes under the same lock).
            let r = unsafe { (h.api.comm_finalize)(h.raw) };
            if !ok_or_pending(r) {
                // SAFETY: a live handle whose finalize failed: aborted once, never used again.
                let _ = unsafe { (h.api.comm_abort)(h.raw) };
                *st = State::Aborted;
                return;
            }
            *st = State::Closing;
        }
        let start = Instant::now();
        let finalized = loop {
            match h.poll() {
                Ok(true) => break true,
                Ok(false) if start.elapsed() < self.timeout => pause(start.elapsed()),
                _ => break false,
            }
        };
        let mut st = h.lock();
        if *st != State::Closing {
            return; // the watchdog aborted it meanwhile
        }
        if finalized {
            // SAFETY: a finalized handle, destroyed exactly once (state Closing -> Closed under
            // the lock; it was not aborted).
            let _ = unsafe { (h.api.comm_destroy)(h.raw) };
            *st = State::Closed;
        } else {
            // SAFETY: a handle whose finalize did not complete: aborted once, never used again.
            let _ = unsafe { (h.api.comm_abort)(h.raw) };
            *st = State::Aborted;
        }
    }
}
