//! Collectives that start now and complete later, so that communication overlaps computation:
//! ring attention shifts the next K/V block while it attends to the current one, and Ulysses
//! lets the all-to-alls of k and v proceed while q's is consumed (torchtitan and DeepSpeed do
//! the same on a side stream).
//!
//! A `_start` method checks its arguments, starts the transfers ([`Group::transfer_start`]) and
//! returns a [`Started`] handle; [`Started::wait`] completes them and returns the result. On
//! MPI the payloads are non-blocking requests; on NCCL they run on a side stream, and waiting
//! makes libtorch's stream wait for them on the device (the host does not block); threads
//! complete at once. [`Group::with_overlap`]`(false)` makes every `_start` complete before it
//! returns, for comparison: results and counted bytes are identical either way.
//!
//! Every rank must start the same collectives in the same order, as for blocking ones.

use tch::Tensor;

use super::backend::{Done, Pending};
use super::collectives::{chunks, none, AllToAll};
use super::group::Group;
use super::OpKind;
use crate::error::TorchResultExt;
use crate::Result;

/// A collective in flight: its result once [`wait`](Started::wait) returns. Dropping it still
/// completes (or aborts) the transfers, but the result is lost.
#[must_use = "a started collective must be waited for"]
pub struct Started<T> {
    group: Group,
    op: OpKind,
    pending: Box<dyn Pending>,
    value: T,
    /// Whether waiting counts a call of `op` (not for a part of a larger collective).
    counted: bool,
}

impl<T> Started<T> {
    /// Completes the transfers and returns the result.
    pub fn wait(self) -> Result<T> {
        self.pending.wait()?;
        if self.counted {
            self.group.count_call(self.op);
        }
        Ok(self.value)
    }
}

impl Group {
    /// The first half of a reduce-scatter under `op`, started: chunk j of the flat `x` (sizes
    /// `split`) goes to rank j, and this rank's `[P, split[r]]` slots, one per rank, are the
    /// result once waited for (reduce them with `reduce_stack`). Not counted as a call: the
    /// caller counts the collective it is part of.
    ///
    /// # Shapes
    /// `x`: `[sum(split)]` -> `[P, split[r]]`.
    pub(crate) fn scatter_start(&self, op: OpKind, x: &Tensor, split: &[i64]) -> Result<Started<Tensor>> {
        self.check_split(op, "split", split, x.numel() as i64, 0)?;
        let p = self.size();
        let stack = Tensor::f_empty([p as i64, split[self.rank()]], (x.kind(), x.device())).op(op.name())?;
        let sends = chunks(x, 0, split).op(op.name())?;
        let recvs = (0..p).map(|j| Some(stack.select(0, j as i64))).collect();
        let pending = self.transfer_start(op, sends, recvs)?;
        Ok(Started { group: self.clone(), op, pending, value: stack, counted: false })
    }

    /// [`all_to_all_spec`](Group::all_to_all_spec), started.
    ///
    /// # Shapes
    /// `[.., sum(scatter_split), .., gather_split[r], ..]` ->
    /// `[.., scatter_split[r], .., sum(gather_split), ..]` on rank r.
    pub fn all_to_all_spec_start(&self, x: &Tensor, spec: &AllToAll) -> Result<Started<Tensor>> {
        let op = OpKind::AllToAll;
        let (sd, gd) = (self.dim(op, x, spec.scatter_dim)?, self.dim(op, x, spec.gather_dim)?);
        let shape = self.all_to_all_shape(
            x,
            spec.scatter_dim,
            spec.gather_dim,
            &spec.scatter_split,
            &spec.gather_split,
        )?;
        let out = Tensor::f_empty(&shape, (x.kind(), x.device())).op(op.name())?;
        let sends = chunks(x, sd, &spec.scatter_split).op(op.name())?;
        let recvs = chunks(&out, gd, &spec.gather_split).op(op.name())?;
        let pending = self.transfer_start(op, sends, recvs)?;
        Ok(Started { group: self.clone(), op, pending, value: out, counted: true })
    }

    /// [`shift`](Group::shift), started: sends `x` to rank `(r + offset) mod P`; the result is
    /// what rank `(r - offset) mod P` sent.
    pub fn shift_start(&self, x: &Tensor, offset: i64) -> Result<Started<Tensor>> {
        let op = OpKind::Shift;
        let p = self.size() as i64;
        let me = self.rank() as i64;
        let (dst, src) = ((me + offset).rem_euclid(p) as usize, (me - offset).rem_euclid(p) as usize);
        let out = x.f_empty_like().op(op.name())?;
        let (mut sends, mut recvs) = (none(self.size()), none(self.size()));
        sends[dst] = Some(x.shallow_clone());
        recvs[src] = Some(out.shallow_clone());
        let pending = self.transfer_start(op, sends, recvs)?;
        Ok(Started { group: self.clone(), op, pending, value: out, counted: true })
    }

    /// Point-to-point transfers of one step, started, counted as one call of `op` when any
    /// happens: `sends` are (destination rank, tensor), `recvs` (source rank, a tensor of the
    /// shape and dtype expected); the result holds what arrived, in the order of `recvs`. A
    /// rank with nothing to send or receive calls nothing. Ring attention on a packed batch
    /// uses it to pass a block only as far as a rank attends to it, and to send a gradient
    /// accumulator straight home. Every pair of ranks must post its transfers in the same order.
    ///
    /// # Shapes
    /// Each received tensor has the shape of its `like`.
    pub fn peers_start(
        &self,
        op: OpKind,
        sends: Vec<(usize, Tensor)>,
        recvs: Vec<(usize, &Tensor)>,
    ) -> Result<Started<Vec<Tensor>>> {
        let p = self.size();
        let (mut send_slots, mut recv_slots) = (none(p), none(p));
        let mut out = Vec::with_capacity(recvs.len());
        for (dst, x) in sends {
            self.check_peer(op, "dst", dst)?;
            if send_slots[dst].replace(x).is_some() {
                return Err(self.invalid(op, format!("two sends to rank {dst} in one step")));
            }
        }
        for (src, like) in recvs {
            self.check_peer(op, "src", src)?;
            let t = like.f_empty_like().op(op.name())?;
            if recv_slots[src].replace(t.shallow_clone()).is_some() {
                return Err(self.invalid(op, format!("two receives from rank {src} in one step")));
            }
            out.push(t);
        }
        if send_slots.iter().chain(&recv_slots).all(Option::is_none) {
            return Ok(Started {
                group: self.clone(),
                op,
                pending: Box::new(Done),
                value: out,
                counted: false,
            });
        }
        let pending = self.transfer_start(op, send_slots, recv_slots)?;
        Ok(Started { group: self.clone(), op, pending, value: out, counted: true })
    }

    /// Several all-to-alls of one step (Ulysses' q, k, v): all but the first are started, the
    /// first runs to completion, then the others are waited for, so their transfers proceed
    /// while the first's is consumed. Without overlap they run one after the other. Results in
    /// the order given.
    pub fn all_to_all_many(&self, items: &[(&Tensor, &AllToAll)]) -> Result<Vec<Tensor>> {
        let Some(((first, spec), rest)) = items.split_first() else { return Ok(Vec::new()) };
        let started: Vec<Started<Tensor>> =
            rest.iter().map(|(x, s)| self.all_to_all_spec_start(x, s)).collect::<Result<_>>()?;
        let mut out = vec![self.all_to_all_spec(first, spec)?];
        for s in started {
            out.push(s.wait()?);
        }
        Ok(out)
    }
}
