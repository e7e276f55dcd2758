//! The watchdog of one rank's NCCL communicators: collectives complete on the device, so the
//! host never waits for them, and something else must notice one that never completes. A
//! thread polls the completion event of every batch in flight and every communicator's
//! asynchronous error (every 2 ms, as PyTorch's NCCL watchdog does); a batch past its timeout,
//! or an error, aborts every communicator of the rank (which also releases kernels stuck
//! waiting for a peer, and so a host blocked in a device synchronisation) and is kept as the
//! rank's failure: every later collective, wait or flush on the rank returns it, naming this
//! rank, the op and the group.
//!
//! The watchdog never releases a communicator: it holds `Weak<Handle>`s (`comm.rs`), whose
//! drop frees nothing, so a communicator's finalize and destroy (`Comm`'s drop, which may wait
//! up to the timeout) always run on a rank's thread, never here under this thread's lock. This
//! thread takes a communicator's lock (a poll, an abort) while holding its own; no
//! communicator call takes the watchdog's lock, so the order is fixed and cannot deadlock.

use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use cudarc::driver::sys as cu;

use super::comm::{Comm, Handle, Who};
use super::cuda::{self, Event};
use crate::{Error, Result};

/// A batch in flight: its completion event and what to say if it never completes.
struct Watch {
    event: Arc<Event>,
    who: Who,
    since: Instant,
    timeout: Duration,
}

/// What ended the rank's communication, kept to be returned by every later call.
#[derive(Clone)]
enum Failure {
    Timeout { who: Who, waited: Duration, timeout: Duration },
    Error(String),
}

impl Failure {
    fn error(&self) -> Error {
        match self {
            Failure::Timeout { who, waited, timeout } => Error::Timeout {
                op: who.op,
                group: who.group.clone(),
                rank: who.rank,
                waited: *waited,
                timeout: *timeout,
                what: "waiting for the transfers to complete on the GPU; the rank's NCCL communicators were aborted"
                    .into(),
            },
            Failure::Error(msg) => Error::Backend { backend: "nccl", msg: msg.clone() },
        }
    }
}

#[derive(Default)]
struct State {
    watches: Vec<Watch>,
    comms: Vec<Weak<Handle>>,
    failure: Option<Failure>,
    stop: bool,
}

struct Shared {
    state: Mutex<State>,
    changed: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// One rank's watchdog; its thread stops when this is dropped.
pub(super) struct Watchdog {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl Watchdog {
    /// Starts the thread, which makes `ctx` (the GPU's primary context, retained for the
    /// process: `cuda::bind_primary_context`) current to query its events.
    pub(super) fn start(ctx: cu::CUcontext) -> Result<Watchdog> {
        let shared = Arc::new(Shared { state: Mutex::default(), changed: Condvar::new() });
        let theirs = Arc::clone(&shared);
        let ctx = ctx as usize; // a plain handle value, made current on the thread
        let thread = std::thread::Builder::new()
            .name("nccl-watchdog".into())
            .spawn(move || run(&theirs, ctx as cu::CUcontext))
            .map_err(|e| cuda::failure(format!("cannot start the NCCL watchdog thread: {e}")))?;
        Ok(Watchdog { shared, thread: Some(thread) })
    }

    /// Watches a communicator for asynchronous errors, and aborts it with the others on failure.
    /// Keeps only a weak reference to its handle: the watchdog never releases a communicator.
    pub(super) fn adopt(&self, comm: &Comm) {
        self.shared.lock().comms.push(Arc::downgrade(comm.handle()));
    }

    /// The rank's failure, if its communication has ended.
    pub(super) fn check(&self) -> Result<()> {
        match &self.shared.lock().failure {
            Some(f) => Err(f.error()),
            None => Ok(()),
        }
    }

    /// Watches a batch's completion event.
    pub(super) fn watch(&self, event: Arc<Event>, who: Who, timeout: Duration) {
        let mut st = self.shared.lock();
        st.watches.push(Watch { event, who, since: Instant::now(), timeout });
    }

    /// Waits until every watched batch has completed, or returns the failure that ended one.
    pub(super) fn flush(&self) -> Result<()> {
        let mut st = self.shared.lock();
        loop {
            if let Some(f) = &st.failure {
                return Err(f.error());
            }
            if st.watches.is_empty() {
                return Ok(());
            }
            // The thread decides timeouts; this only waits for it to say something changed.
            st = self
                .shared
                .changed
                .wait_timeout(st, Duration::from_millis(1))
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.shared.lock().stop = true;
        self.shared.changed.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The thread: every 2 ms, retire completed batches, fail on a late one or an NCCL error.
fn run(shared: &Shared, ctx: cu::CUcontext) {
    if let Err(e) = cuda::set_context(ctx) {
        shared.lock().failure = Some(Failure::Error(format!("the NCCL watchdog cannot use the GPU: {e}")));
        shared.changed.notify_all();
        return;
    }
    loop {
        let mut st = shared.lock();
        if st.stop {
            return;
        }
        if st.failure.is_none() {
            let failure = scan(&mut st);
            if let Some(f) = failure {
                // Abort every communicator of the rank: kernels waiting for a dead peer exit.
                // (An upgraded handle dropped here frees nothing: see the module doc.)
                for handle in st.comms.iter().filter_map(Weak::upgrade) {
                    handle.abort();
                }
                st.watches.clear();
                st.failure = Some(f);
            }
        }
        st.comms.retain(|c| c.strong_count() > 0);
        shared.changed.notify_all();
        drop(st);
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Retires completed batches; returns the first failure found.
fn scan(st: &mut State) -> Option<Failure> {
    let mut failure = None;
    st.watches.retain(|w| {
        if failure.is_some() {
            return true;
        }
        match w.event.done() {
            Ok(true) => false,
            Ok(false) if w.since.elapsed() > w.timeout => {
                failure = Some(Failure::Timeout {
                    who: w.who.clone(),
                    waited: w.since.elapsed(),
                    timeout: w.timeout,
                });
                true
            }
            Ok(false) => true,
            Err(e) => {
                failure = Some(Failure::Error(format!(
                    "{} on group {} (rank {}): {e}",
                    w.who.op, w.who.group, w.who.rank
                )));
                true
            }
        }
    });
    if failure.is_none() {
        for handle in st.comms.iter().filter_map(Weak::upgrade) {
            if let Some(msg) = handle.live_error() {
                failure = Some(Failure::Error(format!("NCCL reported an asynchronous error: {msg}")));
                break;
            }
        }
    }
    failure
}
