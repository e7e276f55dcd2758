//! The one primitive a backend provides: a batch of point-to-point transfers within a group.

use std::fmt;
use std::sync::Arc;

use tch::{Kind, Tensor};

use super::group::GroupInfo;
use super::OpKind;
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

    /// Runs one batch of transfers in `group` (indices are ranks of the group).
    fn exchange(
        &self,
        group: &GroupInfo,
        op: OpKind,
        sends: Vec<Option<Tensor>>,
        recvs: Vec<Option<Tensor>>,
    ) -> Result<()>;

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
