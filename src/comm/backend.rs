//! The one primitive a backend provides: a batch of point-to-point transfers within a group,
//! run to completion ([`Backend::exchange`]) or started and completed later
//! ([`Backend::exchange_start`], for overlapping communication with computation).

use std::fmt;
use std::sync::Arc;

#[cfg(any(feature = "mpi", feature = "nccl"))]
use tch::Device;
use tch::{Kind, Tensor};

use super::group::GroupInfo;
use super::{OpKind, ReduceOp};
#[cfg(any(feature = "mpi", feature = "nccl"))]
use crate::error::TorchResultExt;
use crate::Result;

/// What travels with every transfer, so that the receiver can check it is the one it expects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    pub op: OpKind,
    pub kind: Kind,
    pub shape: Vec<i64>,
}

impl Envelope {
    pub fn of(op: OpKind, t: &Tensor) -> Envelope {
        Envelope { op, kind: t.kind(), shape: t.size() }
    }

    /// The envelope the peer of this transfer must use (a `send` pairs with a `recv`).
    pub fn expected_from_peer(&self) -> Envelope {
        Envelope { op: self.op.peer_kind(), ..self.clone() }
    }
}

impl fmt::Display for Envelope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {:?}{:?}", self.op, self.kind, self.shape)
    }
}

/// A whole collective that a backend may run as one call of its own library (NCCL's
/// `ncclAllReduce`, `ncclReduceScatter`, `ncclAllGather`; MPI's `MPI_Iallreduce`,
/// `MPI_Ireduce_scatter_block`, `MPI_Iallgather`) instead of the transfers the group composes it
/// of. Every tensor is contiguous and on the backend's device; the parts of a reduce-scatter and
/// an all-gather are equal, an all-reduce's are the library's business.
///
/// The result is the library's: every rank gets the same values, but a reduction sums in the
/// library's order (NCCL's ring or tree, MPI's algorithm) and in the tensors' dtype, so it may
/// differ in the last bits from the group's own reduction (rank order, half precision in f32).
///
/// # Shapes
/// `AllReduce`: `buf` `[n]`, in place. `ReduceScatter`: `input` `[P*m]` -> `output` `[m]`.
/// `AllGather`: `input` `[m]` -> `output` `[P*m]` (`input` may be the view of `output` at this
/// rank's place).
pub enum Collective<'a> {
    AllReduce { buf: &'a Tensor, reduce: ReduceOp },
    ReduceScatter { input: &'a Tensor, output: &'a Tensor, reduce: ReduceOp },
    AllGather { input: &'a Tensor, output: &'a Tensor },
}

impl Collective<'_> {
    /// Every tensor the call reads or writes.
    pub fn tensors(&self) -> Vec<&Tensor> {
        match self {
            Collective::AllReduce { buf, .. } => vec![buf],
            Collective::ReduceScatter { input, output, .. } | Collective::AllGather { input, output } => {
                vec![input, output]
            }
        }
    }

    /// The reduction, for the reducing collectives.
    pub fn reduce(&self) -> Option<ReduceOp> {
        match self {
            Collective::AllReduce { reduce, .. } | Collective::ReduceScatter { reduce, .. } => Some(*reduce),
            Collective::AllGather { .. } => None,
        }
    }
}

/// The near-equal parts of `n` elements over `p` ranks that an all-reduce splits into (the first
/// `n mod p` ranks one more), as the group's own all-reduce and its byte count use them.
pub(crate) fn near_equal_parts(n: i64, p: i64) -> Vec<i64> {
    (0..p).map(|j| n / p + i64::from(j < n % p)).collect()
}

/// The transfers `call` stands for, as the lists of (group rank, tensor) that go out and come
/// in (views: nothing is copied), so that its envelopes are checked as theirs would be. An
/// all-reduce stands for its reduce-scatter half (which fixes the size and dtype on every rank).
#[cfg(any(feature = "mpi", feature = "nccl"))]
#[allow(clippy::type_complexity)]
pub(crate) fn collective_lists(
    op: OpKind,
    call: &Collective<'_>,
    p: usize,
    me: usize,
) -> Result<(Vec<(usize, Tensor)>, Vec<(usize, Tensor)>)> {
    let others = || (0..p).filter(move |&j| j != me);
    let slice = |t: &Tensor, start: i64, len: i64| t.f_view([-1])?.f_narrow(0, start, len);
    let lists = || -> std::result::Result<_, tch::TchError> {
        let (mut out, mut inc) = (Vec::new(), Vec::new());
        match call {
            Collective::AllReduce { buf, .. } => {
                let parts = near_equal_parts(buf.numel() as i64, p as i64);
                let offset = |j: usize| parts[..j].iter().sum::<i64>();
                for j in others() {
                    out.push((j, slice(buf, offset(j), parts[j])?));
                    inc.push((j, slice(buf, offset(me), parts[me])?));
                }
            }
            Collective::ReduceScatter { input, output, .. } => {
                let m = output.numel() as i64;
                for j in others() {
                    out.push((j, slice(input, j as i64 * m, m)?));
                    inc.push((j, output.f_view([-1])?));
                }
            }
            Collective::AllGather { input, output } => {
                let m = input.numel() as i64;
                for j in others() {
                    out.push((j, input.f_view([-1])?));
                    inc.push((j, slice(output, j as i64 * m, m)?));
                }
            }
        }
        Ok((out, inc))
    };
    lists().op(op.name())
}

/// A transfer's envelope as fixed-size integers, for backends that must send it as a message:
/// op, dtype, number of dims, a hash of the shape, then up to four dims.
pub(crate) const HEADER_LEN: usize = 8;

const KINDS: [Kind; 10] = [
    Kind::Uint8,
    Kind::Int8,
    Kind::Int16,
    Kind::Int,
    Kind::Int64,
    Kind::Half,
    Kind::Float,
    Kind::Double,
    Kind::Bool,
    Kind::BFloat16,
];

/// The header of a transfer: everything the receiver must agree on.
#[cfg_attr(not(any(feature = "mpi", feature = "nccl")), allow(dead_code))]
pub(crate) fn header(e: &Envelope) -> [i64; HEADER_LEN] {
    let op = OpKind::ALL.iter().position(|k| *k == e.op).map_or(-1, |i| i as i64);
    let kind = KINDS.iter().position(|k| *k == e.kind).map_or(-1, |i| i as i64);
    let hash =
        e.shape.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &d| (h ^ d as u64).wrapping_mul(0x100_0000_01b3));
    let mut h = [op, kind, e.shape.len() as i64, hash as i64, -1, -1, -1, -1];
    for (slot, &d) in h[4..].iter_mut().zip(&e.shape) {
        *slot = d;
    }
    h
}

/// A received header as the envelope it stands for ("all_to_all Float[2, 3, 1, 4]").
#[cfg_attr(not(any(feature = "mpi", feature = "nccl")), allow(dead_code))]
pub(crate) fn describe(h: &[i64; HEADER_LEN]) -> String {
    let op =
        usize::try_from(h[0]).ok().and_then(|i| OpKind::ALL.get(i)).map_or("an unknown op", |k| k.name());
    let kind = usize::try_from(h[1])
        .ok()
        .and_then(|i| KINDS.get(i))
        .map_or("an unknown dtype".into(), |k| format!("{k:?}"));
    let ndim = h[2].max(0) as usize;
    if ndim <= 4 {
        format!("{op} {kind}{:?}", &h[4..4 + ndim])
    } else {
        format!("{op} {kind} of {ndim} dims (shape hash {:x})", h[3])
    }
}

/// A batch as two lists of (group rank, tensor): what goes out, made contiguous (a copy only
/// where strided), and the destinations of what comes in.
#[cfg(any(feature = "mpi", feature = "nccl"))]
#[allow(clippy::type_complexity)]
pub(crate) fn batch_lists(
    op: OpKind,
    sends: Vec<Option<Tensor>>,
    recvs: Vec<Option<Tensor>>,
) -> Result<(Vec<(usize, Tensor)>, Vec<(usize, Tensor)>)> {
    let out = sends
        .into_iter()
        .enumerate()
        .filter_map(|(j, t)| t.map(|t| (j, t)))
        .map(|(j, t)| Ok((j, t.f_contiguous()?)))
        .collect::<Result<_, tch::TchError>>()
        .op(op.name())?;
    let inc = recvs.into_iter().enumerate().filter_map(|(j, t)| t.map(|t| (j, t))).collect();
    Ok((out, inc))
}

/// The contiguous memory a payload for `dst` lands in: `dst` itself when contiguous, else a
/// fresh row-major tensor (as the sender's bytes are; `empty_like` would keep the strides).
#[cfg(any(feature = "mpi", feature = "nccl"))]
pub(crate) fn receive_buffer(op: OpKind, dst: &Tensor) -> Result<Tensor> {
    if dst.is_contiguous() {
        Ok(dst.shallow_clone())
    } else {
        Tensor::f_empty(dst.size(), (dst.kind(), dst.device())).op(op.name())
    }
}

/// Checks a batch's envelopes before any of its payload moves, through `control`'s blocking
/// exchange of small CPU tensors in the same group (op and size checked there, the envelope's
/// contents here): for payload paths that cannot check them themselves (started MPI payloads,
/// NCCL), and with no device round trip. `out` and `inc` list (group rank, tensor); `me` is
/// this rank's global rank, for the message.
///
/// With a peer it exchanges anything with, a rank sends both what it sends and what it expects
/// (each as a ledger proof: the envelope and the pair's history since the last comparison), so
/// both ranks of a transfer that disagree report it. Which peers it compares with is
/// `control`'s [`EnvelopeLedger`]'s decision (every batch without one): the same on both sides.
#[cfg(any(feature = "mpi", feature = "nccl"))]
pub(crate) fn check_envelopes(
    control: &dyn Backend,
    group: &GroupInfo,
    op: OpKind,
    out: &[(usize, Tensor)],
    inc: &[(usize, Tensor)],
    me: usize,
) -> Result<()> {
    use super::envelopes::{disagreement, Direction, Entry, PROOF_LEN};
    let every = EnvelopeLedger::new(super::EnvelopeChecks::Every);
    let ledger = control.envelope_ledger().unwrap_or(&every);
    let p = group.ranks.len();
    // Per peer: (what I send it, what I expect from it), each a header with its proof.
    type Side = Option<([i64; HEADER_LEN], Entry)>;
    let mut with: Vec<[Side; 2]> = vec![[None, None]; p];
    for (j, t) in out {
        let h = header(&Envelope::of(op, t));
        with[*j][0] = Some((h, ledger.0.entry(*j, Direction::Out, &h)));
    }
    for (j, t) in inc {
        let h = header(&Envelope::of(op.peer_kind(), t));
        with[*j][1] = Some((h, ledger.0.entry(*j, Direction::In, &h)));
    }
    let compare: Vec<bool> = with.iter().map(|w| w.iter().flatten().any(|(_, e)| e.compare)).collect();
    const ABSENT: [i64; PROOF_LEN] = [i64::MIN; PROOF_LEN];
    let mut sends: Vec<Option<Tensor>> = (0..p).map(|_| None).collect();
    let mut recvs: Vec<Option<Tensor>> = (0..p).map(|_| None).collect();
    for j in (0..p).filter(|&j| compare[j]) {
        let mut both = Vec::with_capacity(2 * PROOF_LEN);
        for slot in &with[j] {
            both.extend_from_slice(&slot.map_or(ABSENT, |(_, e)| e.proof));
        }
        sends[j] = Some(Tensor::from_slice(&both));
        recvs[j] = Some(Tensor::zeros([2 * PROOF_LEN as i64], (Kind::Int64, Device::Cpu)));
    }
    let got: Vec<Option<Tensor>> = recvs.iter().map(|t| t.as_ref().map(Tensor::shallow_clone)).collect();
    if compare.iter().any(|&c| c) {
        control.exchange(group, op, sends, recvs)?;
    }
    let mismatch =
        |detail: String| crate::Error::Mismatch { op: op.name(), group: group.to_string(), detail };
    for j in (0..p).filter(|&j| compare[j]) {
        let mut theirs = [0i64; 2 * PROOF_LEN];
        if let Some(t) = &got[j] {
            t.f_copy_data(&mut theirs, 2 * PROOF_LEN).op(op.name())?;
        }
        let slot = |i: usize| -> [i64; PROOF_LEN] {
            let mut a = [0; PROOF_LEN];
            a.copy_from_slice(&theirs[i * PROOF_LEN..(i + 1) * PROOF_LEN]);
            a
        };
        // Mine out against theirs in, mine in against theirs out.
        let (their_in, their_out) = (slot(1), slot(0));
        let peer = group.ranks[j];
        let mine_out = with[j][0].map_or(ABSENT, |(_, e)| e.proof);
        let mine_in = with[j][1].map_or(ABSENT, |(_, e)| e.proof);
        let one_sided = |what: &str| mismatch(format!("rank {me} {what} rank {peer}, which does not"));
        match (mine_out == ABSENT, their_in == ABSENT) {
            (false, true) => return Err(one_sided("sends to")),
            (true, false) => return Err(one_sided("receives nothing from")),
            _ => {}
        }
        match (mine_in == ABSENT, their_out == ABSENT) {
            (false, true) => return Err(one_sided("expects data from")),
            (true, false) => return Err(one_sided("expects nothing from")),
            _ => {}
        }
        if let Some(d) = (mine_out != ABSENT).then(|| disagreement(&mine_out, &their_in, me, peer)).flatten()
        {
            return Err(mismatch(d));
        }
        if let Some(d) = (mine_in != ABSENT).then(|| disagreement(&their_out, &mine_in, peer, me)).flatten() {
            return Err(mismatch(d));
        }
    }
    // Agreed: both directions of every compared peer count as compared, on both sides.
    for (j, slots) in with.iter().enumerate() {
        for (slot, dir) in slots.iter().zip([Direction::Out, Direction::In]) {
            if let Some((h, _)) = slot {
                ledger.0.commit(j, dir, h, compare[j]);
            }
        }
    }
    Ok(())
}

/// A rank's history of envelopes with the other ranks of one group, which decides which
/// transfers compare their envelopes (see [`EnvelopeChecks`](super::EnvelopeChecks)); kept by
/// backends for which a comparison costs a message.
#[cfg_attr(not(any(feature = "mpi", feature = "nccl")), allow(dead_code))]
pub struct EnvelopeLedger(pub(crate) super::envelopes::Ledger);

impl EnvelopeLedger {
    pub fn new(checks: super::EnvelopeChecks) -> EnvelopeLedger {
        EnvelopeLedger(super::envelopes::Ledger::new(checks))
    }
}

/// One rank's connection to the other ranks, as a backend provides it.
///
/// Implementations must give every backend the same semantics:
/// - [`exchange`](Backend::exchange) sends `sends[j]` to the group's rank `j` and writes what rank
///   `j` sends into `recvs[j]`, for every `j` whose entry is `Some`, and returns once all of them
///   are done (so the caller may reuse its inputs). Entries for the calling rank itself are copied
///   locally. Tensors may be strided views; each must be read or written in place.
/// - A transfer whose envelopes disagree (op, dtype or shape) fails on both ranks with
///   `Error::Mismatch`; a peer that does not arrive within the timeout gives `Error::Timeout`; a
///   peer that failed or exited gives `Error::Aborted`. None of them hangs.
pub trait Backend: Send + Sync {
    /// "local", "mpi", "nccl".
    fn name(&self) -> &'static str;

    /// This rank's envelope history in the group, for backends that compare envelopes by
    /// message and so compare only some of them ([`EnvelopeChecks`](super::EnvelopeChecks));
    /// `None`: every transfer is compared.
    fn envelope_ledger(&self) -> Option<&EnvelopeLedger> {
        None
    }

    /// Runs one batch of transfers in `group` (indices are ranks of the group).
    fn exchange(
        &self,
        group: &GroupInfo,
        op: OpKind,
        sends: Vec<Option<Tensor>>,
        recvs: Vec<Option<Tensor>>,
    ) -> Result<()>;

    /// Starts the batch of [`exchange`](Backend::exchange) and returns a handle that completes
    /// it; the batch may progress while the caller computes. Until [`Pending::wait`] returns,
    /// the caller must not write the sent tensors nor read the received ones (the handle holds
    /// them). Every rank starts its batches in the same order; waits may come in any order.
    /// Envelopes are checked before this returns. Backends without asynchronous transfers
    /// complete the batch here (the default).
    fn exchange_start(
        &self,
        group: &GroupInfo,
        op: OpKind,
        sends: Vec<Option<Tensor>>,
        recvs: Vec<Option<Tensor>>,
    ) -> Result<Box<dyn Pending>> {
        self.exchange(group, op, sends, recvs)?;
        Ok(Box::new(Done))
    }

    /// Whether this backend runs `call` as one collective of its library ([`Collective`]);
    /// `false` (the default): the group composes it of transfers. The answer may depend on the
    /// tensors' device and dtype and the backend's settings, never on the rank, so that every
    /// rank of a group takes the same path.
    fn runs_natively(&self, _call: &Collective<'_>) -> bool {
        false
    }

    /// Starts `call`, which [`runs_natively`](Backend::runs_natively) accepted: envelopes
    /// checked first as for the transfers it stands for, the result in place once the handle
    /// is waited for (the handle holds the tensors, as [`exchange_start`](Backend::exchange_start)'s
    /// does). Every rank of the group makes the same call in the same order.
    fn collective_start(
        &self,
        group: &GroupInfo,
        op: OpKind,
        _call: Collective<'_>,
    ) -> Result<Box<dyn Pending>> {
        Err(crate::Error::Backend {
            backend: self.name(),
            msg: format!("{op} on group {group}: this backend has no collectives of its own"),
        })
    }

    /// Waits until everything this rank started on this backend (and the backends split from
    /// it) has completed, or returns the error that ended it (a timeout, an aborted peer).
    /// Backends whose transfers complete before `exchange` returns have nothing to wait for.
    fn flush(&self, _group: &GroupInfo) -> Result<()> {
        Ok(())
    }

    /// The backend of this rank's part of a split of `parent` (as `MPI_Comm_split`): every rank
    /// of `parent` calls it, in the same order, after all of them agreed on the subgroups;
    /// `sub` is this rank's subgroup (`None` for a rank that takes no part, which gets `None`).
    fn split(
        &self,
        parent: &GroupInfo,
        color: Option<usize>,
        key: usize,
        sub: Option<&GroupInfo>,
    ) -> Result<Option<Arc<dyn Backend>>>;
}

/// A batch of transfers started by [`Backend::exchange_start`] and not yet known complete.
/// Dropping it without [`wait`](Pending::wait) still completes (or aborts) the batch.
pub trait Pending {
    /// Returns once every transfer of the batch is done: received data in place (in stream
    /// order, on a GPU), sent tensors free to reuse.
    fn wait(self: Box<Self>) -> Result<()>;
}

/// A batch that completed when it started.
pub struct Done;

impl Pending for Done {
    fn wait(self: Box<Self>) -> Result<()> {
        Ok(())
    }
}
