//! Communication: process groups, collectives on tch tensors, byte accounting, backends.
//!
//! The layer is built from one primitive. A backend ([`Backend`]) moves tensors between the ranks
//! of a group in a batch of point-to-point transfers, [`Backend::exchange`]: "send `sends[j]` to
//! rank j, receive `recvs[j]` from rank j". Every collective of [`Group`] is a batch of such
//! transfers plus local tensor work (slicing, summing), written once in `collectives.rs` and
//! `whole.rs` for every backend. That is what keeps the semantics, the accounting and the error
//! behaviour identical across backends:
//!
//! - each transfer carries an [`Envelope`] (op, dtype, shape), and the receiver checks it against
//!   what it expects, so ranks that disagree get [`Error::Mismatch`](crate::Error::Mismatch)
//!   naming both sides instead of a silent wrong answer;
//! - waiting is bounded by a timeout, and a failed or exited peer releases every waiting rank;
//! - bytes are counted where the transfers are listed: data that stays on a rank is never counted
//!   as sent (docs/design.md §2.2).
//!
//! Backends: [`local`] (P ranks as P threads of one process, the embedded default) and, with
//! the `mpi` cargo feature, MPI (one process per rank under mpirun or srun, `MpiLaunch`), and
//! with the `nccl` feature, NCCL for CUDA tensors on top of either (`nccl_group`).

mod backend;
mod buckets;
mod checks;
mod collectives;
mod envelopes;
mod group;
mod launch;
pub mod local;
mod mesh;
#[cfg(feature = "mpi")]
mod mpi;
#[cfg(feature = "mpi")]
mod mpi_async;
#[cfg(feature = "mpi")]
mod mpi_native;
mod mpirun;
#[cfg(feature = "nccl")]
mod nccl;
mod overlap;
mod placement;
#[cfg(feature = "mpi")]
mod staging;
mod stats;
mod whole;

pub use backend::{Backend, Collective, Done, Envelope, EnvelopeLedger, Pending};
pub use buckets::{
    pieces, reduction_kind, BucketedAllReduce, Piece, BUCKETS_IN_FLIGHT, DEFAULT_BUCKET_ELEMS,
};
pub use collectives::AllToAll;
pub use envelopes::EnvelopeChecks;
pub use group::{Group, GroupInfo};
pub use launch::{launch, LocalLaunch, RankCtx};
pub use mesh::{Mesh, MeshShape};
#[cfg(feature = "mpi")]
pub use mpi::{MpiLaunch, MAX_MESSAGE_BYTES};
pub use mpirun::{mpirun_command, mpirun_command_with, untag};
#[cfg(feature = "nccl")]
pub use nccl::{driver_version, nccl_available, nccl_group, pci_bus_id};
pub use overlap::Started;
#[cfg(feature = "nccl")]
pub use placement::{bind_gpu, GpuBinding};
pub use placement::{check_distinct_gpus, choose_gpu, process_place, LauncherEnv, ProcessPlace};
pub use stats::{CommStats, OpCount};

use std::fmt;

/// The kinds of communication the library counts, one counter each per group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum OpKind {
    AllToAll,
    AllGather,
    ReduceScatter,
    AllReduce,
    Broadcast,
    Reduce,
    Send,
    Recv,
    Shift,
    Barrier,
    /// Group creation traffic (colours and keys of a split); never counted.
    Split,
}

impl OpKind {
    /// Every counted kind, in display order.
    pub const ALL: [OpKind; 10] = [
        OpKind::AllToAll,
        OpKind::AllGather,
        OpKind::ReduceScatter,
        OpKind::AllReduce,
        OpKind::Broadcast,
        OpKind::Reduce,
        OpKind::Send,
        OpKind::Recv,
        OpKind::Shift,
        OpKind::Barrier,
    ];

    /// The snake_case name used in messages, counters and result files.
    pub fn name(self) -> &'static str {
        match self {
            OpKind::AllToAll => "all_to_all",
            OpKind::AllGather => "all_gather",
            OpKind::ReduceScatter => "reduce_scatter",
            OpKind::AllReduce => "all_reduce",
            OpKind::Broadcast => "broadcast",
            OpKind::Reduce => "reduce",
            OpKind::Send => "send",
            OpKind::Recv => "recv",
            OpKind::Shift => "shift",
            OpKind::Barrier => "barrier",
            OpKind::Split => "split",
        }
    }

    /// The op a receiver expects from a sender: a `send` is received by a `recv`.
    pub(crate) fn peer_kind(self) -> OpKind {
        match self {
            OpKind::Send => OpKind::Recv,
            OpKind::Recv => OpKind::Send,
            other => other,
        }
    }
}

impl fmt::Display for OpKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// How a reduction combines the ranks' values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReduceOp {
    Sum,
    /// Sum divided by the group size (floating-point dtypes only).
    Avg,
    Max,
}
