//! The MPI backend's started exchanges ([`Backend::exchange_start`]): communication that
//! overlaps computation, as non-blocking MPI requests.
//!
//! The envelopes are exchanged and checked at once, through the blocking exchange (as small
//! CPU tensors: a mismatch is an error before a byte of payload moves, as in every exchange).
//! The payloads are then posted as `MPI_Isend`/`MPI_Irecv` straight from and into the tensors'
//! memory, under a tag of their own so that they never pair with a blocking exchange's messages
//! (MPI pairs messages of one tag between two ranks in the order they were posted, and every
//! rank starts its exchanges in the same order). [`Pending::wait`] tests the requests until all
//! complete; like every MPI wait it gives up after the timeout by reporting and aborting the job
//! (MPI cannot take back a posted request). Payloads go in pieces of at most the
//! endpoint's `max_message` bytes, as blocking exchanges do (an MPI count is a 32-bit int).
//!
//! How much overlaps depends on MPI's progress: OpenMPI moves large messages when either side
//! calls into MPI, so the transfer advances during other collectives and the final wait.

use mpi::request::{Request, StaticScope};
use mpi::topology::{Communicator, SimpleCommunicator};
use mpi::traits::*;
use tch::{Device, Tensor};

use super::backend::{batch_lists, check_envelopes, receive_buffer, Pending};
use super::group::GroupInfo;
use super::mpi::{pieces, pieces_mut, report, MpiEndpoint};
use super::OpKind;
use crate::{Error, Result};

/// The tag of started payloads (blocking exchanges use 1 and 2).
const ASYNC: i32 = 3;

/// A contiguous CPU tensor's bytes, for a request that outlives this call.
///
/// # Safety
/// `t` must be contiguous and on the CPU, and the caller must keep `t` (its storage) alive and
/// unwritten until every request reading the slice has completed.
unsafe fn bytes_static(t: &Tensor) -> &'static [u8] {
    let len = t.numel() * t.kind().elt_size_in_bytes();
    if len == 0 {
        return &[];
    }
    // SAFETY: per the contract above, `len` bytes of live storage start at data_ptr.
    unsafe { std::slice::from_raw_parts(t.data_ptr() as *const u8, len) }
}

/// The same, writable, for a receive.
///
/// # Safety
/// As [`bytes_static`], and nothing else reads or writes the bytes until the request completes.
#[allow(clippy::mut_from_ref)]
unsafe fn bytes_static_mut(t: &Tensor) -> &'static mut [u8] {
    let len = t.numel() * t.kind().elt_size_in_bytes();
    if len == 0 {
        return &mut [];
    }
    // SAFETY: per the contract above, this is the only reference to these bytes meanwhile.
    unsafe { std::slice::from_raw_parts_mut(t.data_ptr() as *mut u8, len) }
}

/// Starts one batch: envelopes checked now, payloads posted as non-blocking requests.
pub(super) fn start(
    ep: &MpiEndpoint,
    group: &GroupInfo,
    op: OpKind,
    sends: Vec<Option<Tensor>>,
    recvs: Vec<Option<Tensor>>,
) -> Result<Box<dyn Pending>> {
    ep.check_thread(op, group)?;
    let me = group.ranks[ep.comm.rank() as usize];
    let on_cpu = sends.iter().chain(&recvs).flatten().all(|t| t.device() == Device::Cpu);
    if !on_cpu {
        return Err(Error::Backend {
            backend: "mpi",
            msg: format!("{op} on group {group}: the mpi backend moves CPU tensors; use nccl for CUDA"),
        });
    }
    let (out, inc) = batch_lists(op, sends, recvs)?;

    // 1. Envelopes through the blocking exchange, compared before any payload is posted.
    check_envelopes(ep, group, op, &out, &inc, me)?;

    // 2. Payloads, posted; the pending batch keeps every tensor they touch.
    let mut pending = MpiPending {
        op,
        group: group.to_string(),
        me,
        timeout: ep.timeout,
        requests: Vec::new(),
        short: None,
        keep: Vec::new(),
        copies: Vec::new(),
    };
    for (j, t) in out {
        // SAFETY: `t` is contiguous on the CPU and moves into `pending.keep` below, which holds it
        // (unwritten: a fresh contiguous copy or the caller's input, which the caller must not
        // write until waiting) until every request is complete.
        let data = unsafe { bytes_static(&t) };
        for piece in pieces(data, ep.max_message) {
            let to = ep.comm.process_at_rank(j as i32);
            pending.requests.push((j, None, to.immediate_send_with_tag(StaticScope, piece, ASYNC)));
        }
        pending.keep.push(t);
    }
    for (j, dst) in inc {
        let buf = receive_buffer(op, &dst)?;
        // SAFETY: `buf` is contiguous on the CPU, owned by `pending` until the requests complete,
        // and only MPI writes it meanwhile (the caller does not read a started receive).
        let data = unsafe { bytes_static_mut(&buf) };
        for piece in pieces_mut(data, ep.max_message) {
            let from = ep.comm.process_at_rank(j as i32);
            let want = piece.len();
            pending.requests.push((
                j,
                Some(want),
                from.immediate_receive_into_with_tag(StaticScope, piece, ASYNC),
            ));
        }
        if !dst.is_contiguous() {
            pending.copies.push((dst, buf.shallow_clone()));
        }
        pending.keep.push(buf);
    }
    Ok(Box::new(pending))
}

/// One payload message in flight.
type Payload = Request<'static, [u8], StaticScope>;

/// Payload requests in flight, with the tensors they read and write.
struct MpiPending {
    op: OpKind,
    group: String,
    me: usize,
    timeout: std::time::Duration,
    /// (group rank, bytes expected for a receive, request).
    requests: Vec<(usize, Option<usize>, Payload)>,
    /// A receive that brought another number of bytes than expected: (peer, got, expected).
    short: Option<(usize, usize, usize)>,
    /// Every tensor a request reads or writes, alive until the requests complete.
    keep: Vec<Tensor>,
    /// Strided destinations and the contiguous buffers they are received into.
    copies: Vec<(Tensor, Tensor)>,
}

impl MpiPending {
    /// Tests the requests until all complete; past the timeout, reports and aborts the job.
    fn complete(&mut self) {
        let deadline = std::time::Instant::now() + self.timeout;
        let start = std::time::Instant::now();
        while !self.requests.is_empty() {
            let mut left = Vec::with_capacity(self.requests.len());
            for (peer, want, r) in self.requests.drain(..) {
                match r.test() {
                    Ok(status) => {
                        let got = status.count(u8::equivalent_datatype()) as usize;
                        if want.is_some_and(|w| w != got) && self.short.is_none() {
                            self.short = want.map(|w| (peer, got, w));
                        }
                    }
                    Err(r) => left.push((peer, want, r)),
                }
            }
            self.requests = left;
            if self.requests.is_empty() {
                break;
            }
            if std::time::Instant::now() > deadline {
                let mut peers: Vec<usize> = self.requests.iter().map(|(p, _, _)| *p).collect();
                peers.dedup();
                let err = Error::Timeout {
                    op: self.op.name(),
                    group: self.group.clone(),
                    rank: self.me,
                    waited: start.elapsed(),
                    timeout: self.timeout,
                    what: format!("waiting for started data with group ranks {peers:?}"),
                };
                report(&format!("rank {}: {err}; aborting the MPI job", self.me));
                SimpleCommunicator::world().abort(3);
            }
            std::thread::yield_now();
        }
    }
}

impl Pending for MpiPending {
    fn wait(mut self: Box<Self>) -> Result<()> {
        self.complete();
        if let Some((peer, got, want)) = self.short {
            return Err(Error::Mismatch {
                op: self.op.name(),
                group: self.group.clone(),
                detail: format!(
                    "rank {} received {got} bytes from group rank {peer} where it expected {want}",
                    self.me
                ),
            });
        }
        for (mut dst, buf) in std::mem::take(&mut self.copies) {
            dst.f_copy_(&buf).map_err(|source| Error::Torch { op: self.op.name(), source })?;
        }
        Ok(())
    }
}

impl Drop for MpiPending {
    fn drop(&mut self) {
        // A request must complete before its buffers go (and rsmpi panics on an incomplete one).
        self.complete();
        self.keep.clear();
    }
}
