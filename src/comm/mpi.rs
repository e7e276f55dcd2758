//! The MPI backend (cargo feature `mpi`): one process per rank, started by `mpirun` or Slurm's
//! `srun` (or `ulysses launch`), collectives on CPU tensors through OpenMPI (rsmpi).
//!
//! Every transfer of a batch is a header exchange, then the payload, on the group's own
//! communicator (made with `MPI_Comm_split` when the group is split). The sender sends its
//! header (op, dtype, shape) and the receiver sends back the header it expects, in the same
//! round, so both sides compare the two and a disagreement is `Error::Mismatch` on both, naming
//! both sides, before a byte of payload moves (a one-way check left the sender waiting for a
//! payload receive that never came, and reporting a timeout). The payload is sent from and
//! received into the tensors' memory directly when they are contiguous (a strided destination
//! is received into a contiguous buffer and copied), in messages of at most
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

use mpi::request::{scope, Request, Scope};
use mpi::topology::{Color, Communicator, SimpleCommunicator};
use mpi::traits::*;
use tch::{Device, Tensor};

use super::backend::{describe, header, Backend, Envelope, HEADER_LEN};
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
    expected: Envelope,
    header: [i64; HEADER_LEN],
    got: [i64; HEADER_LEN],
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

/// A contiguous CPU tensor's bytes, to receive into.
#[allow(clippy::mut_from_ref)]
fn bytes_mut(t: &Tensor) -> &mut [u8] {
    let len = t.numel() * t.kind().elt_size_in_bytes();
    if len == 0 {
        return &mut [];
    }
    // SAFETY: callers pass contiguous CPU tensors that they own exclusively for the call (fresh
    // buffers or output views no one else reads), so this is the only reference to these bytes.
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
    fn wait_all<'a, D: ?Sized, S: Scope<'a>>(
        &self,
        mut requests: Vec<(usize, Request<'a, D, S>)>,
        deadline: Instant,
        what: &dyn Fn(&[usize]) -> Error,
    ) {
        while !requests.is_empty() {
            let mut pending = Vec::with_capacity(requests.len());
            for (peer, r) in requests {
                if let Err(r) = r.test() {
                    pending.push((peer, r));
                }
            }
            requests = pending;
            if requests.is_empty() {
                break;
            }
            if Instant::now() > deadline {
                let mut peers: Vec<usize> = requests.iter().map(|(p, _)| *p).collect();
                peers.sort_unstable();
                peers.dedup();
                report(&format!("rank {}: {}; aborting the MPI job", self.comm.rank(), what(&peers)));
                self.comm.abort(3);
            }
            std::thread::yield_now();
        }
    }
}

impl Backend for MpiEndpoint {
    fn name(&self) -> &'static str {
        "mpi"
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
        // What goes out: contiguous copies only where a tensor is strided.
        let mut out = Vec::new();
        for (j, t) in sends.into_iter().enumerate() {
            if let Some(t) = t {
                cpu(&t)?;
                out.push((j, header(&Envelope::of(op, &t)), t.f_contiguous().op(op.name())?));
            }
        }
        // What comes in: a contiguous buffer per peer (the destination itself when contiguous).
        let mut inc = Vec::new();
        for (j, t) in recvs.into_iter().enumerate() {
            if let Some(dst) = t {
                cpu(&dst)?;
                let expected = Envelope::of(op.peer_kind(), &dst);
                let buf = if dst.is_contiguous() {
                    dst.shallow_clone()
                } else {
                    // Row-major, as the sender's contiguous bytes are (empty_like would keep strides).
                    Tensor::f_empty(dst.size(), (dst.kind(), dst.device())).op(op.name())?
                };
                inc.push(Incoming {
                    peer: j,
                    header: header(&expected),
                    expected,
                    got: [0; HEADER_LEN],
                    buf,
                    dst,
                });
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

        // 1. Headers: each sender's to its receiver, each receiver's expected one back.
        let mut expected_by_peer = vec![[0i64; HEADER_LEN]; out.len()];
        scope(|sc| {
            let mut reqs = Vec::new();
            for ((j, h, _), back) in out.iter().zip(expected_by_peer.iter_mut()) {
                let peer = self.comm.process_at_rank(*j as i32);
                reqs.push((*j, peer.immediate_send_with_tag(sc, &h[..], HEADER)));
                reqs.push((*j, peer.immediate_receive_into_with_tag(sc, &mut back[..], EXPECTED)));
            }
            for Incoming { peer, header, got, .. } in inc.iter_mut() {
                let p = self.comm.process_at_rank(*peer as i32);
                reqs.push((*peer, p.immediate_receive_into_with_tag(sc, &mut got[..], HEADER)));
                reqs.push((*peer, p.immediate_send_with_tag(sc, &header[..], EXPECTED)));
            }
            self.wait_all(reqs, deadline, &timeout("headers"));
        });
        // Both sides of a transfer see both headers, so both report the same disagreement.
        let mismatch = |detail: String| Error::Mismatch { op: op.name(), group: group.to_string(), detail };
        if let Some(x) = inc.iter().find(|x| x.got != x.header) {
            let peer = group.ranks[x.peer];
            return Err(mismatch(format!(
                "rank {peer} sent {} but rank {me} expected {}",
                describe(&x.got),
                x.expected
            )));
        }
        if let Some(((j, h, _), back)) =
            out.iter().zip(&expected_by_peer).find(|((_, h, _), back)| h != *back)
        {
            let peer = group.ranks[*j];
            return Err(mismatch(format!(
                "rank {me} sent {} but rank {peer} expected {}",
                describe(h),
                describe(back)
            )));
        }

        // 2. Payloads, straight from and into tensor memory, in messages of at most
        // `max_message` bytes (in order: one source, one tag).
        scope(|sc| {
            let mut reqs = Vec::new();
            for (j, _, t) in &out {
                let peer = self.comm.process_at_rank(*j as i32);
                for chunk in bytes(t).chunks(self.max_message) {
                    reqs.push((*j, peer.immediate_send_with_tag(sc, chunk, PAYLOAD)));
                }
            }
            for x in &inc {
                let peer = self.comm.process_at_rank(x.peer as i32);
                for chunk in bytes_mut(&x.buf).chunks_mut(self.max_message) {
                    reqs.push((x.peer, peer.immediate_receive_into_with_tag(sc, chunk, PAYLOAD)));
                }
            }
            self.wait_all(reqs, deadline, &timeout("data"));
        });
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
}

impl Default for MpiLaunch {
    fn default() -> Self {
        MpiLaunch { timeout: DEFAULT_TIMEOUT, threads_per_rank: 1, max_message_bytes: MAX_MESSAGE_BYTES }
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
