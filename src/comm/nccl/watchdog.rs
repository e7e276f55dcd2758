//! The watchdog of one rank's NCCL communicators: collectives complete on the device, so the
//! host never waits for them, and something else must notice one that never completes. A
//! thread polls the completion event of every batch in flight and every communicator's
//! asynchronous error (every 2 ms, as PyTorch's NCCL watchdog does); a batch past its timeout,
//! or an error, aborts every communicator of the rank (which also releases kernels stuck
//! waiting for a peer, and so a host blocked in a device synchronisation) and is kept as the
//! rank's failure: every later collective, wait or flush on the rank returns it, naming this
//! rank, the op and the group.
//!
//! The watchdog never releases a communicator: it holds `Weak<dyn Abortable>`s, weak
//! references to `Handle`s (`comm.rs`), whose drop frees nothing, so a communicator's finalize
//! and destroy (`Comm`'s drop, which may wait up to the timeout) always run on a rank's
//! thread, never here under this thread's lock. This thread takes a communicator's lock (a
//! poll, an abort) while holding its own; no communicator call takes the watchdog's lock, so
//! the order is fixed and cannot deadlock.
//!
//! What it waits on sits behind two traits, [`Completion`] (a batch's CUDA event) and
//! [`Abortable`] (a communicator's `Handle`), and the thread's set-up (making the GPU's context
//! current) is a closure, so that its timeouts, aborts and error handling are tested without a
//! GPU (the tests at the end).

use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use cudarc::driver::sys as cu;

use super::comm::{Comm, Handle, Who};
use super::cuda::{self, Event};
use crate::{Error, Result};

/// How often the thread polls.
const POLL: Duration = Duration::from_millis(2);

/// What says whether a batch has completed: its CUDA event, recorded after its kernels.
pub(super) trait Completion: Send + Sync {
    /// Whether the batch has completed, or the error that ended it.
    fn done(&self) -> Result<bool>;
}

impl Completion for Event {
    fn done(&self) -> Result<bool> {
        Event::done(self)
    }
}

/// What the watchdog polls for asynchronous errors and aborts on failure: a communicator's
/// `Handle` (see its methods for what each does on a communicator already gone).
pub(super) trait Abortable: Send + Sync {
    /// Aborts the communicator unless it is already gone; says whether this call did.
    fn abort(&self) -> bool;
    /// The asynchronous error of a live communicator, if there is one.
    fn live_error(&self) -> Option<String>;
}

impl Abortable for Handle {
    fn abort(&self) -> bool {
        Handle::abort(self)
    }

    fn live_error(&self) -> Option<String> {
        Handle::live_error(self)
    }
}

/// A batch in flight: its completion event and what to say if it never completes.
struct Watch {
    event: Arc<dyn Completion>,
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
    comms: Vec<Weak<dyn Abortable>>,
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
        let ctx = ctx as usize; // a plain handle value, made current on the thread
        Watchdog::start_with(move || {
            cuda::set_context(ctx as cu::CUcontext).map_err(|e| format!("cannot use the GPU: {e}"))
        })
    }

    /// Starts the thread, which first runs `init`, its set-up (for [`Watchdog::start`], making
    /// the GPU's context current): if that fails, its message is the rank's failure and the
    /// thread ends.
    fn start_with(
        init: impl FnOnce() -> std::result::Result<(), String> + Send + 'static,
    ) -> Result<Watchdog> {
        let shared = Arc::new(Shared { state: Mutex::default(), changed: Condvar::new() });
        let theirs = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("nccl-watchdog".into())
            .spawn(move || run(&theirs, init))
            .map_err(|e| cuda::failure(format!("cannot start the NCCL watchdog thread: {e}")))?;
        Ok(Watchdog { shared, thread: Some(thread) })
    }

    /// Watches a communicator for asynchronous errors, and aborts it with the others on failure.
    /// Keeps only a weak reference to its handle: the watchdog never releases a communicator.
    pub(super) fn adopt(&self, comm: &Comm) {
        self.adopt_handle(comm.handle());
    }

    /// [`Watchdog::adopt`] of a communicator's handle (or of anything [`Abortable`]).
    fn adopt_handle<A: Abortable + 'static>(&self, handle: &Arc<A>) {
        self.shared.lock().comms.push(Arc::<A>::downgrade(handle));
    }

    /// The rank's failure, if its communication has ended.
    pub(super) fn check(&self) -> Result<()> {
        match &self.shared.lock().failure {
            Some(f) => Err(f.error()),
            None => Ok(()),
        }
    }

    /// Watches a batch's completion event.
    pub(super) fn watch(&self, event: Arc<impl Completion + 'static>, who: Who, timeout: Duration) {
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

/// The thread: after its set-up, every [`POLL`] (2 ms), retire completed batches, fail on a late
/// one or an NCCL error.
fn run(shared: &Shared, init: impl FnOnce() -> std::result::Result<(), String>) {
    if let Err(e) = init() {
        shared.lock().failure = Some(Failure::Error(format!("the NCCL watchdog's set-up failed: {e}")));
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
        std::thread::sleep(POLL);
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

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
    use std::sync::mpsc::{self, RecvTimeoutError};

    use super::*;

    /// A batch's timeout: tens of polls, so that the tests are quick.
    const TIMEOUT: Duration = Duration::from_millis(50);
    /// What a wait may take beyond what it waits for (a loaded machine's scheduling).
    const SLACK: Duration = Duration::from_millis(500);
    /// A timeout no test reaches: a batch under it fails for another reason or not at all.
    const NEVER: Duration = Duration::from_secs(3600);

    /// A batch's completion: done once `done` is set, or failing with `error`.
    #[derive(Default)]
    struct FakeEvent {
        done: AtomicBool,
        error: Option<String>,
    }

    impl FakeEvent {
        fn pending() -> Arc<FakeEvent> {
            Arc::new(FakeEvent::default())
        }

        fn failing(msg: &str) -> Arc<FakeEvent> {
            Arc::new(FakeEvent { error: Some(msg.into()), ..FakeEvent::default() })
        }
    }

    impl Completion for FakeEvent {
        fn done(&self) -> Result<bool> {
            match &self.error {
                Some(msg) => Err(cuda::failure(msg.clone())),
                None => Ok(self.done.load(SeqCst)),
            }
        }
    }

    /// A communicator that counts its aborts (in a counter that outlives it) and may report an
    /// asynchronous error (which it keeps reporting, aborted or not).
    struct FakeComm {
        aborts: Arc<AtomicUsize>,
        error: Option<String>,
    }

    impl FakeComm {
        fn healthy() -> Arc<FakeComm> {
            Arc::new(FakeComm { aborts: Arc::default(), error: None })
        }

        fn broken(msg: &str) -> Arc<FakeComm> {
            Arc::new(FakeComm { aborts: Arc::default(), error: Some(msg.into()) })
        }

        fn aborts(&self) -> usize {
            self.aborts.load(SeqCst)
        }
    }

    impl Abortable for FakeComm {
        fn abort(&self) -> bool {
            self.aborts.fetch_add(1, SeqCst) == 0
        }

        fn live_error(&self) -> Option<String> {
            self.error.clone()
        }
    }

    fn who() -> Who {
        Who { op: "all_to_all", group: "sp[4, 5]".into(), rank: 5 }
    }

    /// `f`'s result, computed on another thread, if it comes within `bound`: a wrong watchdog
    /// may make `f` wait forever, and the test then fails instead of hanging.
    fn within<T: Send + 'static>(bound: Duration, what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(f());
        });
        match rx.recv_timeout(bound) {
            Ok(t) => t,
            Err(RecvTimeoutError::Timeout) => panic!("{what} did not return within {bound:?}"),
            Err(RecvTimeoutError::Disconnected) => panic!("{what} panicked"),
        }
    }

    fn flush_within(wd: &Arc<Watchdog>, bound: Duration) -> Result<()> {
        let wd = Arc::clone(wd);
        within(bound, "flush", move || wd.flush())
    }

    /// Polls `cond` until it holds, failing the test after `bound`.
    fn wait_until(bound: Duration, what: &str, cond: impl Fn() -> bool) {
        let deadline = Instant::now() + bound;
        while !cond() {
            assert!(Instant::now() < deadline, "not {what} within {bound:?}");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// A watchdog whose drop, which joins its thread, is bounded too (a test's last wait).
    struct Dog(Option<Arc<Watchdog>>);

    impl Dog {
        fn new(wd: Watchdog) -> Dog {
            Dog(Some(Arc::new(wd)))
        }
    }

    impl std::ops::Deref for Dog {
        type Target = Arc<Watchdog>;

        fn deref(&self) -> &Arc<Watchdog> {
            self.0.as_ref().expect("a watchdog until dropped")
        }
    }

    impl Drop for Dog {
        fn drop(&mut self) {
            let wd = self.0.take().expect("dropped once");
            if std::thread::panicking() {
                std::thread::spawn(move || drop(wd)); // the test has failed already: no wait
            } else {
                within(SLACK, "dropping the watchdog", move || drop(wd));
            }
        }
    }

    fn start() -> Dog {
        Dog::new(Watchdog::start_with(|| Ok(())).expect("the watchdog thread did not start"))
    }

    /// A batch that completes is retired: flush waits for it and returns Ok, the watchdog lets
    /// go of its event, and no communicator is aborted.
    #[test]
    fn a_completed_batch_is_retired() {
        let wd = start();
        let comms = [FakeComm::healthy(), FakeComm::healthy()];
        comms.iter().for_each(|c| wd.adopt_handle(c));
        let event = FakeEvent::pending();
        let timeout = Duration::from_secs(1); // far beyond the 20 ms the batch takes
        wd.watch(Arc::clone(&event), who(), timeout);
        let completes = {
            let event = Arc::clone(&event);
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(20));
                event.done.store(true, SeqCst);
            })
        };
        flush_within(&wd, timeout + SLACK).expect("a batch that completed failed the flush");
        assert!(event.done.load(SeqCst), "flush returned before the batch completed");
        completes.join().unwrap();
        assert_eq!(Arc::strong_count(&event), 1, "the watchdog still holds a completed batch's event");
        std::thread::sleep(10 * POLL);
        wd.check().expect("a completed batch failed the rank later");
        assert_eq!(comms.map(|c| c.aborts()), [0, 0], "a completed batch aborted communicators");
    }

    /// A batch that never completes fails the rank with a timeout naming the op, the group and
    /// the rank, once its timeout has passed and not long after; every communicator is aborted
    /// once; the failure stays, whatever is watched afterwards.
    #[test]
    fn a_late_batch_times_out_and_aborts_every_communicator() {
        let wd = start();
        let comms = [FakeComm::healthy(), FakeComm::healthy(), FakeComm::healthy()];
        comms.iter().for_each(|c| wd.adopt_handle(c));
        let t0 = Instant::now();
        wd.watch(FakeEvent::pending(), who(), TIMEOUT);
        let err = flush_within(&wd, TIMEOUT + SLACK).expect_err("a batch that never completed was retired");
        let took = t0.elapsed();
        assert!(took >= TIMEOUT, "flush failed after {took:?}, before the timeout {TIMEOUT:?}: {err}");
        assert!(took <= TIMEOUT + SLACK, "flush failed after {took:?}, long after the timeout {TIMEOUT:?}");
        match &err {
            Error::Timeout { op, group, rank, waited, timeout, what } => {
                assert_eq!((*op, group.as_str(), *rank), ("all_to_all", "sp[4, 5]", 5), "{err}");
                assert!(*waited >= TIMEOUT, "waited {waited:?}, less than the timeout {TIMEOUT:?}");
                assert_eq!(*timeout, TIMEOUT);
                assert!(what.contains("aborted"), "{err}");
            }
            other => panic!("expected a timeout, got {other:?}"),
        }
        assert_eq!(comms.each_ref().map(|c| c.aborts()), [1; 3], "each communicator aborted once");
        std::thread::sleep(10 * POLL);
        assert_eq!(comms.each_ref().map(|c| c.aborts()), [1; 3], "communicators aborted again later");
        let text = err.to_string();
        assert_eq!(wd.check().expect_err("check forgot the failure").to_string(), text);
        assert_eq!(flush_within(&wd, SLACK).expect_err("flush forgot the failure").to_string(), text);
        // A batch watched after the failure, even one that completes, does not clear it.
        let done = FakeEvent::pending();
        done.done.store(true, SeqCst);
        wd.watch(done, Who { op: "all_gather", ..who() }, NEVER);
        std::thread::sleep(10 * POLL);
        assert_eq!(wd.check().expect_err("a later batch cleared the failure").to_string(), text);
        assert_eq!(
            flush_within(&wd, SLACK).expect_err("a later batch cleared the failure").to_string(),
            text
        );
        assert_eq!(comms.map(|c| c.aborts()), [1; 3], "communicators aborted again later");
    }

    /// An event that reports an error fails the rank at once (long before the timeout), naming
    /// the batch and the event's message, and aborts every communicator.
    #[test]
    fn an_event_error_fails_the_rank_naming_the_batch() {
        let wd = start();
        let comms = [FakeComm::healthy(), FakeComm::healthy()];
        comms.iter().for_each(|c| wd.adopt_handle(c));
        wd.watch(FakeEvent::failing("cuEventQuery: an illegal memory access was encountered"), who(), NEVER);
        let err = flush_within(&wd, SLACK).expect_err("a batch whose event failed was retired");
        match &err {
            Error::Backend { backend: "nccl", msg } => {
                assert!(msg.contains("all_to_all on group sp[4, 5] (rank 5)"), "{err}");
                assert!(msg.contains("an illegal memory access was encountered"), "{err}");
            }
            other => panic!("expected an NCCL backend error, got {other:?}"),
        }
        assert_eq!(comms.each_ref().map(|c| c.aborts()), [1, 1], "each communicator aborted once");
        assert_eq!(wd.check().expect_err("check forgot the failure").to_string(), err.to_string());
    }

    /// A communicator's asynchronous error fails the rank with its message, the batch in flight
    /// too, and aborts every communicator, the healthy ones included, once.
    #[test]
    fn an_asynchronous_error_aborts_every_communicator() {
        let wd = start();
        let comms = [FakeComm::healthy(), FakeComm::broken("remote process exited"), FakeComm::healthy()];
        comms.iter().for_each(|c| wd.adopt_handle(c));
        wd.watch(FakeEvent::pending(), who(), NEVER);
        let err =
            flush_within(&wd, SLACK).expect_err("an asynchronous error did not fail the batch in flight");
        match &err {
            Error::Backend { backend: "nccl", msg } => {
                assert!(msg.contains("asynchronous error: remote process exited"), "{err}");
            }
            other => panic!("expected an NCCL backend error, got {other:?}"),
        }
        std::thread::sleep(10 * POLL);
        assert_eq!(comms.each_ref().map(|c| c.aborts()), [1; 3], "each communicator aborted once");
        assert_eq!(wd.check().expect_err("check forgot the failure").to_string(), err.to_string());
    }

    /// A communicator whose last owner drops it is forgotten and never aborted, and the watchdog
    /// never keeps it alive.
    #[test]
    fn a_dropped_communicator_is_forgotten_not_aborted_nor_kept() {
        let wd = start();
        let kept = FakeComm::healthy();
        let gone = FakeComm::healthy();
        wd.adopt_handle(&kept);
        wd.adopt_handle(&gone);
        let (weak, gone_aborts) = (Arc::downgrade(&gone), Arc::clone(&gone.aborts));
        drop(gone);
        // The thread may hold it for the length of a poll, never longer.
        wait_until(SLACK, "released", || weak.strong_count() == 0);
        wait_until(SLACK, "forgotten", || wd.shared.lock().comms.len() == 1);
        wd.watch(FakeEvent::pending(), who(), TIMEOUT);
        let err = flush_within(&wd, TIMEOUT + SLACK).expect_err("a batch that never completed was retired");
        assert!(matches!(err, Error::Timeout { .. }), "{err}");
        assert_eq!(kept.aborts(), 1, "the live communicator was not aborted once");
        assert_eq!(gone_aborts.load(SeqCst), 0, "a dropped communicator was aborted");
        assert_eq!(weak.strong_count(), 0, "the watchdog revived a dropped communicator");
    }

    /// A set-up that fails (no GPU context) fails the rank with its message.
    #[test]
    fn a_failed_set_up_fails_the_rank() {
        let wd = Dog::new(
            Watchdog::start_with(|| Err("cannot use the GPU: no CUDA device".into()))
                .expect("the watchdog thread did not start"),
        );
        wait_until(SLACK, "failed", || wd.check().is_err());
        let err = wd.check().unwrap_err();
        match &err {
            Error::Backend { backend: "nccl", msg } => {
                assert!(msg.contains("set-up failed: cannot use the GPU: no CUDA device"), "{err}");
            }
            other => panic!("expected an NCCL backend error, got {other:?}"),
        }
        wd.watch(FakeEvent::pending(), who(), NEVER);
        assert_eq!(
            flush_within(&wd, SLACK).expect_err("flush ignored the failure").to_string(),
            err.to_string()
        );
    }

    /// The set-up runs on the watchdog's own thread, and dropping the watchdog stops that thread
    /// promptly, letting go of what it watched, aborting nothing.
    #[test]
    fn dropping_the_watchdog_stops_its_thread() {
        let (tx, rx) = mpsc::channel();
        let wd = Watchdog::start_with(move || {
            tx.send(std::thread::current().name().map(str::to_owned)).map_err(|e| e.to_string())
        })
        .expect("the watchdog thread did not start");
        let thread = rx.recv_timeout(SLACK).expect("the set-up did not run");
        assert_eq!(thread.as_deref(), Some("nccl-watchdog"), "the set-up ran on another thread");
        let comm = FakeComm::healthy();
        wd.adopt_handle(&comm);
        let event = FakeEvent::pending();
        wd.watch(Arc::clone(&event), who(), NEVER);
        std::thread::sleep(10 * POLL);
        within(SLACK, "dropping the watchdog", move || drop(wd));
        assert_eq!(Arc::strong_count(&event), 1, "the watchdog's thread outlived its drop");
        assert_eq!(comm.aborts(), 0, "dropping the watchdog aborted a communicator");
    }
}
