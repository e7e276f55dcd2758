//! A process group: one rank's handle on a set of ranks that communicate together.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use tch::{Device, Kind, Tensor};

use super::backend::{near_equal_parts, Backend, Collective, Done, Pending};
use super::stats::CommStats;
use super::OpKind;
use crate::error::TorchResultExt;
use crate::{Error, Result};

/// Who is in a group: its world-unique id, a name for messages, and its members' global ranks in
/// group order (group rank i is global rank `ranks[i]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupInfo {
    pub id: String,
    pub name: String,
    pub ranks: Vec<usize>,
}

impl fmt::Display for GroupInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{:?}", self.name, self.ranks)
    }
}

/// One rank's handle on a process group. Cheap to clone; clones share the byte counters.
///
/// Groups are values: strategies and models take the groups they communicate over as
/// constructor arguments, never from a global.
#[derive(Clone)]
pub struct Group {
    info: Arc<GroupInfo>,
    rank: usize,
    backend: Arc<dyn Backend>,
    stats: Arc<Mutex<CommStats>>,
    /// This rank's counters, by group name, over this group's root and every group split from it.
    rank_totals: Arc<Mutex<BTreeMap<String, CommStats>>>,
    /// How many splits this rank made of this group; all ranks split in the same order, so it
    /// numbers subgroups identically everywhere.
    splits: Arc<AtomicUsize>,
    /// Whether `_start` collectives may leave their transfers in flight (see
    /// [`with_overlap`](Group::with_overlap)); inherited by splits.
    overlap: bool,
}

impl fmt::Debug for Group {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Group({}, rank {}, {})", self.info, self.rank, self.backend.name())
    }
}

impl Group {
    /// A group over `info.ranks` in which this process is group rank `rank`.
    pub fn new(info: GroupInfo, rank: usize, backend: Arc<dyn Backend>) -> Result<Group> {
        if rank >= info.ranks.len() {
            return Err(Error::InvalidArgument {
                op: "new_group",
                group: info.to_string(),
                msg: format!("rank {rank} is not below the group size {}", info.ranks.len()),
            });
        }
        Ok(Group {
            info: Arc::new(info),
            rank,
            backend,
            stats: Arc::default(),
            rank_totals: Arc::default(),
            splits: Arc::default(),
            overlap: true,
        })
    }

    /// This handle with communication/computation overlap on or off (on by default). With it
    /// on, the `_start` collectives (`shift_start`, `all_to_all_spec_start`) leave their
    /// transfers in flight until waited for: ring attention's next K/V shift proceeds while the
    /// current block computes, Ulysses' k and v all-to-alls while q's is consumed (non-blocking
    /// requests on MPI, a side stream with events on NCCL; threads complete at once). With it
    /// off they complete before returning, for comparison. Results and counted bytes are the
    /// same either way. Groups split from this one inherit the setting.
    pub fn with_overlap(mut self, on: bool) -> Group {
        self.overlap = on;
        self
    }

    /// Whether communication may overlap computation on this group.
    pub fn overlap(&self) -> bool {
        self.overlap
    }

    /// Waits until every transfer this rank started on this group's backend has completed (on a
    /// GPU: is done on the device), or returns the error that ended one (a timeout names this
    /// rank). Free on backends whose transfers complete when they return. A step timer calls
    /// it before reading the clock.
    pub fn synchronize(&self) -> Result<()> {
        self.backend.flush(&self.info)
    }

    /// This rank's index in the group.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// Number of ranks in the group.
    pub fn size(&self) -> usize {
        self.info.ranks.len()
    }

    /// This rank's global rank (its rank in the world group).
    pub fn global_rank(&self) -> usize {
        self.info.ranks[self.rank]
    }

    pub fn info(&self) -> &GroupInfo {
        &self.info
    }

    /// This rank's backend, for backends layered on another (NCCL on its control group) and
    /// for checking a backend directly (its transfers, outside any collective, uncounted).
    /// Programs communicate through the collectives.
    pub fn backend_handle(&self) -> Arc<dyn Backend> {
        Arc::clone(&self.backend)
    }

    /// The backend's name: "local", "mpi", "nccl".
    pub fn backend_name(&self) -> &'static str {
        self.backend.name()
    }

    /// A snapshot of this rank's byte counters for this group.
    pub fn stats(&self) -> CommStats {
        self.stats.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// Sets this rank's counters for this group back to zero.
    pub fn reset_stats(&self) {
        *self.stats.lock().unwrap_or_else(PoisonError::into_inner) = CommStats::default();
    }

    /// This rank's counters summed over this group's root (the world, for a launch) and every
    /// group split from it: everything the rank sent and received, whichever subgroup a
    /// strategy used.
    pub fn rank_stats(&self) -> CommStats {
        let totals = self.rank_totals.lock().unwrap_or_else(PoisonError::into_inner);
        totals.values().fold(CommStats::default(), |mut sum, s| {
            sum.merge(s);
            sum
        })
    }

    /// The same counters by group name ("world", "sp", "ring", ...); groups of one name on this
    /// rank (the rank is in one group per mesh axis) add up.
    pub fn rank_stats_by_group(&self) -> Vec<(String, CommStats)> {
        let totals = self.rank_totals.lock().unwrap_or_else(PoisonError::into_inner);
        totals.iter().map(|(name, s)| (name.clone(), s.clone())).collect()
    }

    /// Sets the counters of [`rank_stats`](Group::rank_stats) back to zero (not those of the
    /// individual groups).
    pub fn reset_rank_stats(&self) {
        self.rank_totals.lock().unwrap_or_else(PoisonError::into_inner).clear();
    }

    /// Splits the group as `MPI_Comm_split` does: ranks that pass the same `color` form a
    /// subgroup, ordered by `key` (then by rank); `None` takes no part. Every rank of this group
    /// must call it, in the same order as its other splits.
    pub fn split(&self, name: &str, color: Option<usize>, key: usize) -> Result<Option<Group>> {
        const OP: &str = "split";
        let p = self.size();
        let seq = self.splits.fetch_add(1, Ordering::SeqCst);
        let _no_grad = tch::no_grad_guard();
        // Everyone learns everyone's (color, key): color -1 stands for "no part".
        let mine = Tensor::from_slice(&[color.map_or(-1, |c| c as i64), key as i64]);
        let all = Tensor::zeros([p as i64, 2], (Kind::Int64, Device::Cpu));
        let sends = (0..p).map(|j| (j != self.rank).then(|| mine.shallow_clone())).collect();
        let recvs = (0..p).map(|j| (j != self.rank).then(|| all.select(0, j as i64))).collect();
        self.backend.exchange(&self.info, OpKind::Split, sends, recvs)?;
        all.select(0, self.rank as i64).f_copy_(&mine).op(OP)?;
        let table = Vec::<i64>::try_from(all.view([-1])).op(OP)?;

        let Some(c) = color else {
            self.backend.split(&self.info, None, key, None)?;
            return Ok(None);
        };
        let mut members: Vec<(i64, usize)> =
            (0..p).filter(|&j| table[2 * j] == c as i64).map(|j| (table[2 * j + 1], j)).collect();
        members.sort_unstable();
        let me = members.iter().position(|&(_, j)| j == self.rank).ok_or_else(|| Error::InvalidArgument {
            op: OP,
            group: self.info.to_string(),
            msg: format!("rank {} is missing from its own colour {c}", self.rank),
        })?;
        let info = GroupInfo {
            id: format!("{}/{seq}.{c}", self.info.id),
            name: name.to_string(),
            ranks: members.iter().map(|&(_, j)| self.info.ranks[j]).collect(),
        };
        let backend =
            self.backend.split(&self.info, Some(c), key, Some(&info))?.ok_or_else(|| Error::Backend {
                backend: self.backend.name(),
                msg: format!("split gave no group for colour {c}"),
            })?;
        let mut group = Group::new(info, me, backend)?;
        group.rank_totals = Arc::clone(&self.rank_totals);
        group.overlap = self.overlap;
        Ok(Some(group))
    }

    /// Runs one batch of transfers and counts its bytes under `op`. The entries for this rank
    /// itself are copied here, uncounted (docs/design.md §2.2: data that stays on a rank is not sent).
    pub(crate) fn transfer(
        &self,
        op: OpKind,
        sends: Vec<Option<Tensor>>,
        recvs: Vec<Option<Tensor>>,
    ) -> Result<()> {
        // Communication is not differentiable (the tape handles gradients): keep every copy out
        // of autograd, or a received tensor would carry a graph from another rank's thread.
        let _no_grad = tch::no_grad_guard();
        let (sends, recvs, bytes) = self.keep_own_part(op, sends, recvs)?;
        self.backend.exchange(&self.info, op, sends, recvs)?;
        self.count_bytes(op, bytes);
        Ok(())
    }

    /// [`transfer`](Group::transfer) started: with overlap on, the batch may still be in flight
    /// when this returns (the handle completes it); with it off, it is done. Bytes are counted
    /// when the batch starts, the same bytes as `transfer`.
    pub(crate) fn transfer_start(
        &self,
        op: OpKind,
        sends: Vec<Option<Tensor>>,
        recvs: Vec<Option<Tensor>>,
    ) -> Result<Box<dyn Pending>> {
        let _no_grad = tch::no_grad_guard();
        let (sends, recvs, bytes) = self.keep_own_part(op, sends, recvs)?;
        let pending = if self.overlap {
            self.backend.exchange_start(&self.info, op, sends, recvs)?
        } else {
            self.backend.exchange(&self.info, op, sends, recvs)?;
            Box::new(Done)
        };
        self.count_bytes(op, bytes);
        Ok(pending)
    }

    /// Whether the backend runs `call` as a collective of its own library
    /// ([`Backend::runs_natively`]: NCCL on GPU tensors, MPI when launched with
    /// `native_collectives`); the same answer on every rank. The group's all-reduce always
    /// asks; its reduce-scatter and all-gather ask when the parts are equal, contiguous slabs.
    pub fn runs_natively(&self, call: &Collective<'_>) -> bool {
        self.backend.runs_natively(call)
    }

    /// Starts `call` as the backend's own collective (the caller asked
    /// [`runs_natively`](Group::runs_natively)) and counts `moved` (sent, received): the bytes of
    /// the transfers it stands for, so that the counters are the same on every backend. With
    /// overlap off it is complete when this returns.
    pub(crate) fn native_start(
        &self,
        op: OpKind,
        call: Collective<'_>,
        moved: (u64, u64),
    ) -> Result<Box<dyn Pending>> {
        let _no_grad = tch::no_grad_guard();
        let pending = self.backend.collective_start(&self.info, op, call)?;
        let pending: Box<dyn Pending> = if self.overlap {
            pending
        } else {
            pending.wait()?;
            Box::new(Done)
        };
        self.count_bytes(op, moved);
        Ok(pending)
    }

    /// The bytes (sent, received) of a reduce-scatter's transfers for this rank, with `parts[j]`
    /// elements of `elem` bytes for rank j: every other rank's chunk out, this rank's from each
    /// other rank in (docs/design.md §2.2). An all-gather's are the same, reversed.
    pub(crate) fn scatter_bytes(&self, parts: &[i64], elem: usize) -> (u64, u64) {
        let me = self.rank;
        let others: i64 = parts.iter().enumerate().filter(|&(j, _)| j != me).map(|(_, &n)| n).sum();
        let mine = parts[me] * (parts.len() as i64 - 1);
        ((others as u64) * elem as u64, (mine as u64) * elem as u64)
    }

    /// The bytes (sent, received) of an all-reduce of `n` elements: its reduce-scatter and its
    /// all-gather over the near-equal parts.
    pub(crate) fn all_reduce_bytes(&self, n: i64, elem: usize) -> (u64, u64) {
        let (s, r) = self.scatter_bytes(&near_equal_parts(n, self.size() as i64), elem);
        (s + r, r + s)
    }

    /// Copies the part this rank sends to itself and takes it out of the batch; returns the rest
    /// and the bytes (sent, received) it moves between ranks.
    #[allow(clippy::type_complexity)]
    fn keep_own_part(
        &self,
        op: OpKind,
        mut sends: Vec<Option<Tensor>>,
        mut recvs: Vec<Option<Tensor>>,
    ) -> Result<(Vec<Option<Tensor>>, Vec<Option<Tensor>>, (u64, u64))> {
        let me = self.rank;
        match (sends[me].take(), recvs[me].take()) {
            (Some(src), Some(mut dst)) => {
                if src.size() != dst.size() || src.kind() != dst.kind() {
                    return Err(self.invalid(
                        op,
                        format!(
                            "the part rank {me} keeps is {:?}{:?} but its slot is {:?}{:?}",
                            src.kind(),
                            src.size(),
                            dst.kind(),
                            dst.size()
                        ),
                    ));
                }
                dst.f_copy_(&src).op(op.name())?;
            }
            (None, None) => {}
            _ => return Err(self.invalid(op, "a send to self needs a matching receive".into())),
        }
        let bytes = |ts: &[Option<Tensor>]| -> u64 {
            ts.iter().flatten().map(|t| (t.numel() * t.kind().elt_size_in_bytes()) as u64).sum()
        };
        let moved = (bytes(&sends), bytes(&recvs));
        Ok((sends, recvs, moved))
    }

    fn count_bytes(&self, op: OpKind, (sent, received): (u64, u64)) {
        if op != OpKind::Split {
            self.stats.lock().unwrap_or_else(PoisonError::into_inner).add_bytes(op, sent, received);
            let mut totals = self.rank_totals.lock().unwrap_or_else(PoisonError::into_inner);
            totals.entry(self.info.name.clone()).or_default().add_bytes(op, sent, received);
        }
    }

    /// Counts one call of a collective (a collective may run several transfers).
    pub(crate) fn count_call(&self, op: OpKind) {
        self.stats.lock().unwrap_or_else(PoisonError::into_inner).add_call(op);
        let mut totals = self.rank_totals.lock().unwrap_or_else(PoisonError::into_inner);
        totals.entry(self.info.name.clone()).or_default().add_call(op);
    }

    /// An `InvalidArgument` error for `op` on this group.
    pub(crate) fn invalid(&self, op: OpKind, msg: String) -> Error {
        Error::InvalidArgument { op: op.name(), group: self.info.to_string(), msg }
    }
}
