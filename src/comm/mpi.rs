//! The MPI backend (cargo feature `mpi`): one process per rank, started by `mpirun` or Slurm's
//! `srun` (or `ulysses launch`), collectives on CPU tensors through OpenMPI (rsmpi).
//!
//! A transfer of a batch is a header exchange, then the payload, on the group's own
//! communicator (made with `MPI_Comm_split` when the group is split). The sender sends its
//! header (op, dtype, shape) and the receiver sends back the header it expects, in the same
//! round, so both sides compare the two and a disagreement is `Error::Mismatch` on both, naming
//! both sides, before a byte of payload moves (a one-way check left the sender waiting for a
//! payload receive that never came, and reporting a timeout). By default only transfers whose
//! envelope the two ranks have not compared before, and every 64th, exchange headers (with the
//! history in between: `comm::envelopes`); the others go straight to their payload, whose size
//! the receiver checks. The payload is sent from and
//! received into the tensors' memory directly when they are contiguous (a strided source is
//! packed into, and a strided destination received into, a staging buffer the endpoint keeps
//! per peer: `comm::staging`), in messages of at most
//! [`MpiLaunch::max_message_bytes`] (1 GiB by default: MPI counts are 32-bit, so one message
//! cannot carry 2 GiB; MPI keeps messages between two ranks with one tag in order, so the
//! chunks arrive in order). Waiting polls the requests against the launch's timeout; a request
//! that cannot complete cannot be taken back in MPI, so a timeout prints its error and aborts
//! the job (`MPI_Abort`), as does any rank whose function fails: never a silent hang.
//!
//! MPI is initialised for a single thread: every call must come from the thread that started
//! it. A group used from another thread returns an error before calling MPI.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;
use std::thread::ThreadId;
use std::time::{Duration, Instant};

use mpi::point_to_point::Status;
use mpi::request::{scope, Request, Scope};
use mpi::topology::{Color, Communicator, SimpleCommunicator};
use mpi::traits::*;
use tch::{Device, Tensor};

use super::backend::{header, Backend, Collective, Envelope, EnvelopeLedger, HEADER_LEN};
use super::envelopes::{disagreement, Direction, EnvelopeChecks, PROOF_LEN};
use super::group::{Group, GroupInfo};
use super::launch::{error_chain, panic_message, RankCtx, DEFAULT_TIMEOUT};
use super::OpKind;
use crate::error::TorchResultExt;
use crate::{Error, Result};

/// Message tags: a header, the header its receiver expects (sent back), then the payload. (3 is
/// kept for the payloads of started, non-blocking exchanges.)
const HEADER: i32 = 1;
const PAYLOAD: i32 = 2;
const EXPECTED: i32 = 4;

/// The largest payload message by default: 1 GiB, below MPI's 32-bit count limit (2 GiB - 1).
pub const MAX_MESSAGE_BYTES: usize = 1 << 30;

/// One rank's connection through one MPI communicator.
pub(super) struct MpiEndpoint {
    pub(super) comm: SimpleCommunicator,
    pub(super) timeout: Duration,
    /// Payloads travel in messages of at most this many bytes.
    pub(super) max_message: usize,
    /// The thread that initialised MPI; no other may call it.
    owner: ThreadId,
    /// Which transfers compare their envelopes (module docs), and this endpoint's history.
    checks: EnvelopeChecks,
    pub(super) ledger: EnvelopeLedger,
    /// Whether whole collectives run as MPI's own (`comm::mpi_native`).
    pub(super) native: bool,
    /// Contiguous buffers for strided chunks, kept between blocking exchanges (`comm::staging`).
    staging: super::staging::Staging,
}

// SAFETY: an MpiEndpoint holds an MPI communicator handle, a plain value that may be moved or
// shared between threads. MPI itself is initialised for a single thread, so every method that
// calls MPI first checks that it runs on `owner` (the thread that initialised MPI) and returns an
// error otherwise: no MPI call is ever made from two threads.
unsafe impl Send for MpiEndpoint {}
// SAFETY: see Send above: calls from any thread but `owner` stop before reaching MPI.
unsafe impl Sync for MpiEndpoint {}

/// One line on stderr in a single write, so that mpirun's per-line rank tags stay whole.
pub(super) fn report(msg: &str) {
    use std::io::Write;
    let _ = std::io::stderr().write_all(format!("ulysses: {msg}\n").as_bytes());
}

/// A transfer this rank receives.
struct Incoming {
    peer: usize,
    header: [i64; HEADER_LEN],
    /// Contiguous memory the payload lands in (`dst` itself when contiguous).
    buf: Tensor,
    dst: Tensor,
}

/// A contiguous CPU tensor's bytes.
fn bytes(t: &Tensor) -> &[u8] {
    let len = t.numel() * t.kind().elt_size_in_bytes();
    if len == 0 {
        return &[];
    }
    // SAFETY: callers pass contiguous CPU tensors, whose `len` bytes start at data_ptr and are
    // owned by `t`, which outlives the returned slice; nothing writes them while it lives.
    unsafe { std::slice::from_raw_parts(t.data_ptr() as *const u8, len) }
}

/// The messages a payload travels in: pieces of at most `max` bytes, and one empty message for
/// an empty payload, so that every transfer is a message (a barrier's transfers are empty, and
/// must still make each rank wait for the others when no header goes before them).
pub(super) fn pieces(data: &[u8], max: usize) -> impl Iterator<Item = &[u8]> {
    let empty: &[u8] = &[];
    data.chunks(max).chain(data.is_empty().then_some(empty))
}

/// [`pieces`], to receive into.
pub(super) fn pieces_mut(data: &mut [u8], max: usize) -> Vec<&mut [u8]> {
    if data.is_empty() {
        return vec![data];
    }
    data.chunks_mut(max).collect()
}

/// A contiguous CPU tensor's bytes, to receive into.
#[allow(clippy::mut_from_ref)]
fn bytes_mut(t: &Tensor) -> &mut [u8] {
    let len = t.numel() * t.kind().elt_size_in_bytes();
    if len == 0 {
        return &mut [];
    }
    // SAFETY: callers pass contiguous CPU tensors that they own exclusively for the call (output
    // views no one else reads, or the endpoint's staging buffers, which only the one blocking
    // exchange running on the owner thread uses), so this is the only reference to these bytes.
    unsafe { std::slice::from_raw_parts_mut(t.data_ptr() as *mut u8, len) }
}

impl MpiEndpoint {
    pub(super) fn check_thread(&self, op: OpKind, group: &GroupInfo) -> Result<()> {
        if std::thread::current().id() != self.owner {
            return Err(Error::Backend {
                backend: "mpi",
                msg: format!(
                    "{op} on group {group}: MPI runs single-threaded; call it from the thread that launched"
                ),
            });
        }
        Ok(())
    }

    /// Polls `requests` until all complete; past the deadline, reports and aborts the job.
    /// Returns each request's status, in the order given.
    pub(super) fn wait_all<'a, D: ?Sized, S: Scope<'a>>(
        &self,
        requests: Vec<(usize, Request<'a, D, S>)>,
        deadline: Instant,
        what: &dyn Fn(&[usize]) -> Error,
    ) -> Vec<Status> {
        let mut done: Vec<Option<Status>> = requests.iter().map(|_| None).collect();
        let mut pending: Vec<(usize, usize, Request<'a, D, S>)> =
            requests.into_iter().enumerate().map(|(i, (peer, r))| (i, peer, r)).collect();
        while !pending.is_empty() {
            let mut left = Vec::with_capacity(pending.len());
            for (i, peer, r) in pending {
                match r.test() {
                    Ok(status) => done[i] = Some(status),
                    Err(r) => left.push((i, peer, r)),
                }
            }
            pending = left;
            if pending.is_empty() {
                break;
            }
            if Instant::now() > deadline {
                let mut peers: Vec<usize> = pending.iter().map(|(_, p, _)| *p).collect();
                peers.sort_unstable();
                peers.dedup();
                report(&format!("rank {}: {}; aborting the MPI job", self.comm.rank(), what(&peers)));
                self.comm.abort(3);
            }
            std::thread::yield_now();
        }
        done.into_iter().flatten().collect()
    }
}

impl Backend for MpiEndpoint {
    fn name(&self) -> &'static str {
        "mpi"
    }

    fn envelope_ledger(&self) -> Option<&EnvelopeLedger> {
        Some(&self.ledger)
    }

    fn runs_natively(&self, call: &Collective<'_>) -> bool {
        super::mpi_native::runs_natively(self, call)
    }

    fn collective_start(
        &self,
        group: &GroupInfo,
        op: OpKind,
        call: Collective<'_>,
    ) -> Result<Box<dyn super::Pending>> {
        super::mpi_native::start(self, group, op, call)
    }

    fn exchange(
        &self,
        group: &GroupInfo,
        op: OpKind,
        sends: Vec<Option<Tensor>>,
        recvs: Vec<Option<Tensor>>,
    ) -> Result<()> {
        self.check_thread(op, group)?;
        let start = Instant::now();
        let deadline = start + self.timeout;
        let me = group.ranks[self.comm.rank() as usize];
        let cpu = |t: &Tensor| -> Result<()> {
            if t.device() != Device::Cpu {
                return Err(Error::Backend {
                    backend: "mpi",
                    msg: format!(
                        "{op} on group {group}: the mpi backend moves CPU tensors; use nccl for CUDA"
                    ),
                });
            }
            Ok(())
        };
        // What goes out: a strided tensor packed into this peer's staging buffer (row-major).
        let mut out = Vec::new();
        for (j, t) in sends.into_iter().enumerate() {
            if let Some(t) = t {
                cpu(&t)?;
                let packed = if t.is_contiguous() {
                    t.shallow_clone()
                } else {
                    let mut buf = self.staging.buffer(op.name(), Direction::Out, j, &t)?;
                    buf.f_copy_(&t).op(op.name())?;
                    buf
                };
                out.push((j, header(&Envelope::of(op, &t)), packed));
            }
        }
        // What comes in: the destination itself when contiguous, else this peer's staging
        // buffer (row-major, as the sender's bytes are), copied into place at the end.
        let mut inc = Vec::new();
        for (j, t) in recvs.into_iter().enumerate() {
            if let Some(dst) = t {
                cpu(&dst)?;
                let expected = header(&Envelope::of(op.peer_kind(), &dst));
                let buf = if dst.is_contiguous() {
                    dst.shallow_clone()
                } else {
                    self.staging.buffer(op.name(), Direction::In, j, &dst)?
                };
                inc.push(Incoming { peer: j, header: expected, buf, dst });
            }
        }
        let timeout = |what: &'static str| {
            move |peers: &[usize]| Error::Timeout {
                op: op.name(),
                group: group.to_string(),
                rank: me,
                waited: start.elapsed(),
                timeout: self.timeout,
                what: format!("waiting for {what} with group ranks {peers:?}"),
            }
        };

        // 1. Envelopes of the transfers the ledger compares now (all of them with
        // `EnvelopeChecks::Every`): each sender's proof to its receiver, each receiver's own
        // back, so that both sides compare both and report the same disagreement.
        let ledger = &self.ledger.0;
        let out_entries: Vec<_> = out.iter().map(|(j, h, _)| ledger.entry(*j, Direction::Out, h)).collect();
        let inc_entries: Vec<_> =
            inc.iter().map(|x| ledger.entry(x.peer, Direction::In, &x.header)).collect();
        let mut back = vec![[0i64; PROOF_LEN]; out.len()];
        let mut got = vec![[0i64; PROOF_LEN]; inc.len()];
        scope(|sc| {
            let mut reqs = Vec::new();
            for (((j, _, _), e), back) in out.iter().zip(&out_entries).zip(back.iter_mut()) {
                if e.compare {
                    let peer = self.comm.process_at_rank(*j as i32);
                    reqs.push((*j, peer.immediate_send_with_tag(sc, &e.proof[..], HEADER)));
                    reqs.push((*j, peer.immediate_receive_into_with_tag(sc, &mut back[..], EXPECTED)));
                }
            }
            for ((x, e), got) in inc.iter().zip(&inc_entries).zip(got.iter_mut()) {
                if e.compare {
                    let p = self.comm.process_at_rank(x.peer as i32);
                    reqs.push((x.peer, p.immediate_receive_into_with_tag(sc, &mut got[..], HEADER)));
                    reqs.push((x.peer, p.immediate_send_with_tag(sc, &e.proof[..], EXPECTED)));
                }
            }
            self.wait_all(reqs, deadline, &timeout("headers"));
        });
        let mismatch = |detail: String| Error::Mismatch { op: op.name(), group: group.to_string(), detail };
        for ((x, e), got) in inc.iter().zip(&inc_entries).zip(&got) {
            if let Some(d) = e.compare.then(|| disagreement(got, &e.proof, group.ranks[x.peer], me)).flatten()
            {
                return Err(mismatch(d));
            }
        }
        for (((j, _, _), e), back) in out.iter().zip(&out_entries).zip(&back) {
            if let Some(d) = e.compare.then(|| disagreement(&e.proof, back, me, group.ranks[*j])).flatten() {
                return Err(mismatch(d));
            }
        }
        for ((j, h, _), e) in out.iter().zip(&out_entries) {
            ledger.commit(*j, Direction::Out, h, e.compare);
        }
        for (x, e) in inc.iter().zip(&inc_entries) {
            ledger.commit(x.peer, Direction::In, &x.header, e.compare);
        }

        // 2. Payloads, straight from and into tensor memory, in messages of at most
        // `max_message` bytes (in order: one source, one tag). Every message received must be
        // the size expected: a transfer whose envelope was not compared this time is checked by
        // its size now, and by its history at the next comparison.
        let mut short = None;
        scope(|sc| {
            let mut reqs = Vec::new();
            let mut sizes = Vec::new();
            for (j, _, t) in &out {
                let peer = self.comm.process_at_rank(*j as i32);
                for chunk in pieces(bytes(t), self.max_message) {
                    reqs.push((*j, peer.immediate_send_with_tag(sc, chunk, PAYLOAD)));
                    sizes.push(None);
                }
            }
            for x in &inc {
                let peer = self.comm.process_at_rank(x.peer as i32);
                for chunk in pieces_mut(bytes_mut(&x.buf), self.max_message) {
                    sizes.push(Some((x.peer, chunk.len())));
                    reqs.push((x.peer, peer.immediate_receive_into_with_tag(sc, chunk, PAYLOAD)));
                }
            }
            let statuses = self.wait_all(reqs, deadline, &timeout("data"));
            short = statuses.iter().zip(&sizes).find_map(|(status, size)| {
                let (peer, want) = (*size)?;
                let got = status.count(u8::equivalent_datatype()) as usize;
                (got != want).then_some((peer, got, want))
            });
        });
        if let Some((peer, got, want)) = short {
            return Err(mismatch(format!(
                "rank {me} received {got} bytes from rank {} where it expected {want}",
                group.ranks[peer]
            )));
        }
        for mut x in inc {
            if !x.dst.is_contiguous() {
                x.dst.f_copy_(&x.buf).op(op.name())?;
            }
        }
        Ok(())
    }

    fn exchange_start(
        &self,
        group: &GroupInfo,
        op: OpKind,
        sends: Vec<Option<Tensor>>,
        recvs: Vec<Option<Tensor>>,
    ) -> Result<Box<dyn super::Pending>> {
        super::mpi_async::start(self, group, op, sends, recvs)
    }

    fn split(
        &self,
        parent: &GroupInfo,
        color: Option<usize>,
        key: usize,
        _sub: Option<&GroupInfo>,
    ) -> Result<Option<Arc<dyn Backend>>> {
        self.check_thread(OpKind::Split, parent)?;
        let color = match color {
            Some(c) => Color::with_value(c as i32),
            None => Color::undefined(),
        };
        let comm = self.comm.split_by_color_with_key(color, key as i32);
        Ok(comm.map(|comm| {
            Arc::new(MpiEndpoint {
                comm,
                timeout: self.timeout,
                max_message: self.max_message,
                owner: self.owner,
                checks: self.checks,
                ledger: EnvelopeLedger::new(self.checks),
                native: self.native,
                staging: Default::default(),
            }) as Arc<dyn Backend>
        }))
    }
}

/// This process as one rank of an MPI job, with its options.
#[derive(Debug, Clone)]
pub struct MpiLaunch {
    timeout: Duration,
    threads_per_rank: usize,
    max_message_bytes: usize,
    envelope_checks: EnvelopeChecks,
    native_collectives: bool,
}

impl Default for MpiLaunch {
    fn default() -> Self {
        MpiLaunch {
            timeout: DEFAULT_TIMEOUT,
            threads_per_rank: 1,
            max_message_bytes: MAX_MESSAGE_BYTES,
            envelope_checks: EnvelopeChecks::default(),
            native_collectives: false,
        }
    }
}

impl MpiLaunch {
    pub fn new() -> MpiLaunch {
        MpiLaunch::default()
    }

    /// How long a rank waits for a peer inside one collective before the job aborts.
    pub fn timeout(mut self, timeout: Duration) -> MpiLaunch {
        self.timeout = timeout;
        self
    }

    /// libtorch intra-op threads of this rank.
    pub fn threads_per_rank(mut self, threads: usize) -> MpiLaunch {
        self.threads_per_rank = threads.max(1);
        self
    }

    /// The largest message a payload is cut into, in bytes: [`MAX_MESSAGE_BYTES`] (1 GiB) by
    /// default, clamped to 1 ..= 2^31 - 1 (MPI's count limit). Small values are for testing
    /// the chunking.
    pub fn max_message_bytes(mut self, bytes: usize) -> MpiLaunch {
        self.max_message_bytes = bytes.clamp(1, i32::MAX as usize);
        self
    }

    /// Which transfers compare their envelopes by message before their payload moves: by
    /// default those whose envelope the two ranks have not compared before and every 64th
    /// (`EnvelopeChecks::NewAndEvery { audit: 64 }`), `EnvelopeChecks::Every` to compare every
    /// one (a rank that diverges is then named at its first differing transfer).
    pub fn envelope_checks(mut self, checks: EnvelopeChecks) -> MpiLaunch {
        self.envelope_checks = checks;
        self
    }

    /// Whether all-reduce, reduce-scatter and all-gather (equal parts, f32/f64/i64/i32) run as
    /// MPI's own collectives (`MPI_Iallreduce`, ...) rather than the group's transfers: off by
    /// default, so that reductions sum in rank order and match a run on threads bit for bit;
    /// on, the path NCCL's collectives take on a GPU (module `comm::mpi_native`).
    pub fn native_collectives(mut self, on: bool) -> MpiLaunch {
        self.native_collectives = on;
        self
    }

    /// Initialises MPI (the rank and world size come from mpirun or srun; a process started
    /// alone is a world of one), runs `f` as this rank, and finalises MPI. If `f` fails or
    /// panics, prints the rank and the error and aborts the whole job. Once per process.
    pub fn run<T, E, F>(&self, f: F) -> Result<T>
    where
        F: FnOnce(RankCtx) -> std::result::Result<T, E>,
        E: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let universe = mpi::initialize().ok_or_else(|| Error::Backend {
            backend: "mpi",
            msg: "MPI is already initialised in this process (one MpiLaunch per process)".into(),
        })?;
        let comm = universe.world();
        let (rank, size) = (comm.rank() as usize, comm.size() as usize);
        tch::set_num_threads(self.threads_per_rank as i32);
        let info = GroupInfo { id: "world".into(), name: "world".into(), ranks: (0..size).collect() };
        let endpoint = MpiEndpoint {
            comm,
            timeout: self.timeout,
            max_message: self.max_message_bytes,
            owner: std::thread::current().id(),
            checks: self.envelope_checks,
            ledger: EnvelopeLedger::new(self.envelope_checks),
            native: self.native_collectives,
            staging: Default::default(),
        };
        let world = Group::new(info, rank, Arc::new(endpoint))?;
        let outcome =
            catch_unwind(AssertUnwindSafe(|| f(RankCtx::new(world)).map_err(|e| error_chain(&*e.into()))));
        let failure = match outcome {
            Ok(Ok(value)) => return Ok(value), // universe drops: MPI_Finalize
            Ok(Err(msg)) => msg,
            Err(panic) => panic_message(panic),
        };
        report(&format!("rank {rank} of {size} failed: {failure}; aborting the MPI job"));
        universe.world().abort(2)
    }
}
