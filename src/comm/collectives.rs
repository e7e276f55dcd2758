//! The collectives, each a batch of transfers ([`Group::transfer`]) plus local tensor work.
//!
//! Written once for every backend. Inputs may be non-contiguous (chunks are strided views that
//! the backend reads in place); outputs are fresh tensors on the input's device. Every collective
//! checks its arguments before it communicates, and its transfers carry envelopes, so ranks that
//! disagree get an error rather than a wrong answer.
//!
//! Volumes per rank, for a tensor of global size M on P ranks (what the counters record; the
//! direct exchange below moves exactly what a ring would): all-to-all M(P-1)/P^2, all-gather and
//! reduce-scatter M(P-1)/P, all-reduce 2M(P-1)/P (a reduce-scatter then an all-gather).

use tch::{Kind, Tensor};

use super::group::Group;
use super::{OpKind, ReduceOp};
use crate::error::TorchResultExt;
use crate::Result;

/// One all-to-all, described once: the dim scattered, the dim gathered, and the partition of
/// each over the ranks (identical on every rank; see [`Group::all_to_all_v`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllToAll {
    pub scatter_dim: i64,
    pub gather_dim: i64,
    pub scatter_split: Vec<i64>,
    pub gather_split: Vec<i64>,
}

impl AllToAll {
    pub fn new(
        scatter_dim: i64,
        gather_dim: i64,
        scatter_split: Vec<i64>,
        gather_split: Vec<i64>,
    ) -> AllToAll {
        AllToAll { scatter_dim, gather_dim, scatter_split, gather_split }
    }

    /// The inverse, which is also the adjoint: dims and splits swapped.
    pub fn inverse(&self) -> AllToAll {
        AllToAll {
            scatter_dim: self.gather_dim,
            gather_dim: self.scatter_dim,
            scatter_split: self.gather_split.clone(),
            gather_split: self.scatter_split.clone(),
        }
    }
}

impl Group {
    /// [`all_to_all_v`](Group::all_to_all_v) as described by `spec`.
    pub fn all_to_all_spec(&self, x: &Tensor, spec: &AllToAll) -> Result<Tensor> {
        self.all_to_all_v(x, spec.scatter_dim, spec.gather_dim, &spec.scatter_split, &spec.gather_split)
    }

    /// All-to-all: splits `x` into P equal chunks along `scatter_dim`, sends chunk j to rank j,
    /// and concatenates the chunks received along `gather_dim`, in rank order
    /// (DeepSpeed-Ulysses' re-sharding, paper §3.1). Its inverse and adjoint is the all-to-all
    /// with the two dims swapped.
    ///
    /// # Shapes
    /// `x`: `[.., S, .., G, ..]` (S at `scatter_dim`, G at `gather_dim`) -> `[.., S/P, .., G*P, ..]`;
    /// for Ulysses `[b, N/P, H, d]` with scatter 2, gather 1 -> `[b, N, H/P, d]`.
    pub fn all_to_all(&self, x: &Tensor, scatter_dim: i64, gather_dim: i64) -> Result<Tensor> {
        let op = OpKind::AllToAll;
        let (sd, gd) = (self.dim(op, x, scatter_dim)?, self.dim(op, x, gather_dim)?);
        let shape = x.size();
        if sd == gd {
            return Err(
                self.invalid(op, format!("scatter_dim and gather_dim are both {sd}; they must differ"))
            );
        }
        let scatter_split = self.even_split(op, shape[sd], sd)?;
        let gather_split = vec![shape[gd]; self.size()];
        self.all_to_all_v(x, scatter_dim, gather_dim, &scatter_split, &gather_split)
    }

    /// All-to-all with uneven chunks. `scatter_split[j]` is the extent of `scatter_dim` that goes
    /// to rank j; `gather_split[j]` is rank j's extent of `gather_dim`. Both are partitions that
    /// every rank passes identically. The inverse (and adjoint) swaps dims and splits.
    ///
    /// # Shapes
    /// `x`: `[.., sum(scatter_split), .., gather_split[r], ..]` ->
    /// `[.., scatter_split[r], .., sum(gather_split), ..]` on rank r.
    pub fn all_to_all_v(
        &self,
        x: &Tensor,
        scatter_dim: i64,
        gather_dim: i64,
        scatter_split: &[i64],
        gather_split: &[i64],
    ) -> Result<Tensor> {
        let op = OpKind::AllToAll;
        let shape = self.all_to_all_shape(x, scatter_dim, gather_dim, scatter_split, gather_split)?;
        let out = Tensor::f_empty(&shape, (x.kind(), x.device())).op(op.name())?;
        self.all_to_all_v_into(x, &out, scatter_dim, gather_dim, scatter_split, gather_split)?;
        Ok(out)
    }

    /// [`all_to_all_v`](Group::all_to_all_v) into a caller's `out` (as `all_to_all_single` in
    /// torch.distributed). Reusing `out` saves the allocation and, on CPU, the page faults of a
    /// fresh buffer, which cost more than the copy itself at tens of MiB.
    pub fn all_to_all_v_into(
        &self,
        x: &Tensor,
        out: &Tensor,
        scatter_dim: i64,
        gather_dim: i64,
        scatter_split: &[i64],
        gather_split: &[i64],
    ) -> Result<()> {
        let op = OpKind::AllToAll;
        let shape = self.all_to_all_shape(x, scatter_dim, gather_dim, scatter_split, gather_split)?;
        self.check_out(op, x, out, &shape)?;
        let (sd, gd) = (self.dim(op, x, scatter_dim)?, self.dim(op, x, gather_dim)?);
        let sends = chunks(x, sd, scatter_split).op(op.name())?;
        let recvs = chunks(out, gd, gather_split).op(op.name())?;
        self.transfer(op, sends, recvs)?;
        self.count_call(op);
        Ok(())
    }

    /// Checks an all-to-all's arguments and returns its output shape.
    pub(super) fn all_to_all_shape(
        &self,
        x: &Tensor,
        scatter_dim: i64,
        gather_dim: i64,
        scatter_split: &[i64],
        gather_split: &[i64],
    ) -> Result<Vec<i64>> {
        let op = OpKind::AllToAll;
        let (sd, gd) = (self.dim(op, x, scatter_dim)?, self.dim(op, x, gather_dim)?);
        if sd == gd {
            return Err(
                self.invalid(op, format!("scatter_dim and gather_dim are both {sd}; they must differ"))
            );
        }
        let mut shape = x.size();
        self.check_split(op, "scatter_split", scatter_split, shape[sd], sd)?;
        self.check_own_part(op, "gather_split", gather_split, &shape, gd)?;
        shape[sd] = scatter_split[self.rank()];
        shape[gd] = gather_split.iter().sum();
        Ok(shape)
    }

    /// All-gather: concatenates every rank's `x` along `dim`, in rank order. Adjoint:
    /// reduce-scatter (sum) along the same dim.
    ///
    /// # Shapes
    /// `[.., n, ..]` -> `[.., n*P, ..]`.
    pub fn all_gather(&self, x: &Tensor, dim: i64) -> Result<Tensor> {
        let sizes = self.equal_parts(OpKind::AllGather, x, dim)?;
        self.all_gather_v(x, dim, &sizes)
    }

    /// All-gather with uneven parts: rank j contributes `sizes[j]` along `dim`.
    ///
    /// # Shapes
    /// `[.., sizes[r], ..]` -> `[.., sum(sizes), ..]`.
    pub fn all_gather_v(&self, x: &Tensor, dim: i64, sizes: &[i64]) -> Result<Tensor> {
        let out = self.gather_parts(OpKind::AllGather, x, dim, sizes)?;
        self.count_call(OpKind::AllGather);
        Ok(out)
    }

    /// [`all_gather_v`](Group::all_gather_v) into a caller's `out`. `x` may be the view of `out`
    /// at this rank's place (ZeRO gathers a partition into the flat buffer that holds it).
    ///
    /// # Shapes
    /// `x`: `[.., sizes[r], ..]`, `out`: `[.., sum(sizes), ..]`.
    pub fn all_gather_into(&self, x: &Tensor, out: &Tensor, dim: i64, sizes: &[i64]) -> Result<()> {
        let op = OpKind::AllGather;
        let d = self.dim(op, x, dim)?;
        let mut shape = x.size();
        self.check_own_part(op, "sizes", sizes, &shape, d)?;
        shape[d] = sizes.iter().sum();
        self.check_out(op, x, out, &shape)?;
        self.gather_into(op, x, out, d, sizes)?;
        self.count_call(op);
        Ok(())
    }

    /// Reduce-scatter: reduces every rank's `x` elementwise and hands rank j the j-th of P equal
    /// chunks along `dim`. Half-precision inputs are reduced in f32. Adjoint (of the sum):
    /// all-gather along the same dim.
    ///
    /// # Shapes
    /// `[.., n*P, ..]` -> `[.., n, ..]`.
    pub fn reduce_scatter(&self, x: &Tensor, dim: i64, reduce: ReduceOp) -> Result<Tensor> {
        let split = self.even_chunks(OpKind::ReduceScatter, x, dim)?;
        self.reduce_scatter_v(x, dim, &split, reduce)
    }

    /// Reduce-scatter with uneven chunks: rank j receives `split[j]` along `dim`.
    ///
    /// # Shapes
    /// `[.., sum(split), ..]` -> `[.., split[r], ..]`.
    pub fn reduce_scatter_v(&self, x: &Tensor, dim: i64, split: &[i64], reduce: ReduceOp) -> Result<Tensor> {
        let out = self.scatter_reduced(OpKind::ReduceScatter, x, dim, split, reduce)?;
        self.count_call(OpKind::ReduceScatter);
        Ok(out)
    }

    /// All-reduce: every rank gets the elementwise reduction of all ranks' `x`, bit-identical on
    /// every rank. Runs as a reduce-scatter then an all-gather of the flattened tensor.
    /// Adjoint of the sum: the sum.
    ///
    /// # Shapes
    /// `[..]` -> `[..]`.
    pub fn all_reduce(&self, x: &Tensor, reduce: ReduceOp) -> Result<Tensor> {
        let op = OpKind::AllReduce;
        let n = x.numel() as i64;
        let p = self.size() as i64;
        let parts: Vec<i64> = (0..p).map(|j| n / p + i64::from(j < n % p)).collect();
        // [..] -> [n]: flat, so that any shape splits into P near-equal parts.
        let flat = x.f_reshape([n]).op(op.name())?;
        let mine = self.scatter_reduced(op, &flat, 0, &parts, reduce)?;
        let full = self.gather_parts(op, &mine, 0, &parts)?;
        self.count_call(op);
        // [n] -> [..]
        full.f_reshape(x.size()).op(op.name())
    }

    /// Broadcast: every rank gets the root's `x`. On the other ranks `x` only gives the shape
    /// and dtype to receive (as in `torch.distributed.broadcast`). On the root the result shares
    /// storage with `x`. Adjoint: [`reduce`](Group::reduce) to the root.
    pub fn broadcast(&self, x: &Tensor, root: usize) -> Result<Tensor> {
        let op = OpKind::Broadcast;
        self.check_rank(op, "root", root)?;
        let p = self.size();
        let (sends, recvs, out) = if self.rank() == root {
            let sends = (0..p).map(|j| (j != root).then(|| x.shallow_clone())).collect();
            (sends, none(p), x.shallow_clone())
        } else {
            let out = x.f_empty_like().op(op.name())?;
            let recvs = (0..p).map(|j| (j == root).then(|| out.shallow_clone())).collect();
            (none(p), recvs, out)
        };
        self.transfer(op, sends, recvs)?;
        self.count_call(op);
        Ok(out)
    }

    /// Reduce to a root: the root gets the reduction of every rank's `x` (`Some`), the others
    /// `None`. Half precision is reduced in f32. Adjoint of the sum: broadcast from the root.
    pub fn reduce(&self, x: &Tensor, root: usize, reduce: ReduceOp) -> Result<Option<Tensor>> {
        let op = OpKind::Reduce;
        self.check_rank(op, "root", root)?;
        self.check_reduce(op, x.kind(), reduce)?;
        let p = self.size();
        let out = if self.rank() == root {
            // [P, ..]: one slot per rank, reduced over dim 0.
            let mut shape = vec![p as i64];
            shape.extend(x.size());
            let stack = Tensor::f_empty(&shape, (x.kind(), x.device())).op(op.name())?;
            let recvs = (0..p).map(|j| Some(stack.select(0, j as i64))).collect();
            let mut sends = none(p);
            sends[root] = Some(x.shallow_clone());
            self.transfer(op, sends, recvs)?;
            Some(reduce_stack(&stack, reduce, p).op(op.name())?)
        } else {
            let sends = (0..p).map(|j| (j == root).then(|| x.shallow_clone())).collect();
            self.transfer(op, sends, none(p))?;
            None
        };
        self.count_call(op);
        Ok(out)
    }

    /// Sends `x` to rank `dst`; returns once `dst` has received it. Pairs with [`Group::recv`].
    pub fn send(&self, x: &Tensor, dst: usize) -> Result<()> {
        let op = OpKind::Send;
        self.check_peer(op, "dst", dst)?;
        let mut sends = none(self.size());
        sends[dst] = Some(x.shallow_clone());
        self.transfer(op, sends, none(self.size()))?;
        self.count_call(op);
        Ok(())
    }

    /// Receives from rank `src` a tensor of the shape and dtype of `like`, on `like`'s device.
    pub fn recv(&self, like: &Tensor, src: usize) -> Result<Tensor> {
        let op = OpKind::Recv;
        self.check_peer(op, "src", src)?;
        let out = like.f_empty_like().op(op.name())?;
        let mut recvs = none(self.size());
        recvs[src] = Some(out.shallow_clone());
        self.transfer(op, none(self.size()), recvs)?;
        self.count_call(op);
        Ok(out)
    }

    /// Ring shift: sends `x` to rank `(r + offset) mod P` and returns what rank
    /// `(r - offset) mod P` sent. Every rank passes the same shape. Adjoint: shift by `-offset`.
    pub fn shift(&self, x: &Tensor, offset: i64) -> Result<Tensor> {
        let op = OpKind::Shift;
        let p = self.size() as i64;
        let me = self.rank() as i64;
        let dst = (me + offset).rem_euclid(p) as usize;
        let src = (me - offset).rem_euclid(p) as usize;
        let out = x.f_empty_like().op(op.name())?;
        let mut sends = none(self.size());
        let mut recvs = none(self.size());
        sends[dst] = Some(x.shallow_clone());
        recvs[src] = Some(out.shallow_clone());
        self.transfer(op, sends, recvs)?;
        self.count_call(op);
        Ok(out)
    }

    /// Returns once every rank of the group has entered it.
    pub fn barrier(&self) -> Result<()> {
        let op = OpKind::Barrier;
        let token = || Tensor::empty([0], (Kind::Uint8, tch::Device::Cpu));
        let others = |me: usize| (0..self.size()).map(move |j| j != me);
        let sends = others(self.rank()).map(|o| o.then(token)).collect();
        let recvs = others(self.rank()).map(|o| o.then(token)).collect();
        self.transfer(op, sends, recvs)?;
        self.count_call(op);
        Ok(())
    }

    // ----- the two halves shared by all-gather, reduce-scatter and all-reduce -----

    /// Sends `x` to every rank and places rank j's part at its offset along `dim`.
    fn gather_parts(&self, op: OpKind, x: &Tensor, dim: i64, sizes: &[i64]) -> Result<Tensor> {
        let d = self.dim(op, x, dim)?;
        let mut shape = x.size();
        self.check_own_part(op, "sizes", sizes, &shape, d)?;
        shape[d] = sizes.iter().sum();
        let out = Tensor::f_empty(&shape, (x.kind(), x.device())).op(op.name())?;
        self.gather_into(op, x, &out, d, sizes)?;
        Ok(out)
    }

    /// Sends `x` to every rank and receives rank j's part into its place in `out` (checked).
    fn gather_into(&self, op: OpKind, x: &Tensor, out: &Tensor, d: usize, sizes: &[i64]) -> Result<()> {
        let sends = (0..self.size()).map(|_| Some(x.shallow_clone())).collect();
        let recvs = chunks(out, d, sizes).op(op.name())?;
        self.transfer(op, sends, recvs)
    }

    /// Sends chunk j of `x` (along `dim`, sizes `split`) to rank j and reduces what arrives.
    fn scatter_reduced(
        &self,
        op: OpKind,
        x: &Tensor,
        dim: i64,
        split: &[i64],
        reduce: ReduceOp,
    ) -> Result<Tensor> {
        let d = self.dim(op, x, dim)?;
        self.check_split(op, "split", split, x.size()[d], d)?;
        self.check_reduce(op, x.kind(), reduce)?;
        let p = self.size();
        // [P, .., split[r], ..]: slot j holds rank j's chunk for this rank.
        let mut shape = vec![p as i64];
        shape.extend(x.size());
        shape[d + 1] = split[self.rank()];
        let stack = Tensor::f_empty(&shape, (x.kind(), x.device())).op(op.name())?;
        let sends = chunks(x, d, split).op(op.name())?;
        let recvs = (0..p).map(|j| Some(stack.select(0, j as i64))).collect();
        self.transfer(op, sends, recvs)?;
        reduce_stack(&stack, reduce, p).op(op.name())
    }

    // ----- argument checks -----

    /// `dim` as an index into `x`'s shape (negative counts from the end).
    pub(super) fn dim(&self, op: OpKind, x: &Tensor, dim: i64) -> Result<usize> {
        let n = x.dim() as i64;
        if dim < -n || dim >= n {
            return Err(
                self.invalid(op, format!("dim {dim} is out of range for a tensor of shape {:?}", x.size()))
            );
        }
        Ok(dim.rem_euclid(n.max(1)) as usize)
    }

    /// P chunks of `x`'s extent along `dim`, equal, or an error saying how to split unevenly.
    pub(crate) fn even_chunks(&self, op: OpKind, x: &Tensor, dim: i64) -> Result<Vec<i64>> {
        let d = self.dim(op, x, dim)?;
        self.even_split(op, x.size()[d], d)
    }

    /// `x`'s extent along `dim`, once per rank (every rank contributes as much as this one).
    pub(crate) fn equal_parts(&self, op: OpKind, x: &Tensor, dim: i64) -> Result<Vec<i64>> {
        let d = self.dim(op, x, dim)?;
        Ok(vec![x.size()[d]; self.size()])
    }

    /// The P equal parts of an extent, or an error saying how to split unevenly.
    fn even_split(&self, op: OpKind, extent: i64, dim: usize) -> Result<Vec<i64>> {
        let p = self.size() as i64;
        if extent % p != 0 {
            return Err(self.invalid(
                op,
                format!(
                    "dim {dim} has {extent} elements, not divisible by the group size {p}; \
                     use the `_v` variant with explicit uneven splits"
                ),
            ));
        }
        Ok(vec![extent / p; p as usize])
    }

    /// A split has one non-negative entry per rank and, unless `total` is -1, sums to `total`.
    fn check_split(&self, op: OpKind, what: &str, split: &[i64], total: i64, dim: usize) -> Result<()> {
        if split.len() != self.size() {
            return Err(self.invalid(
                op,
                format!("{what} has {} entries {split:?} for {} ranks", split.len(), self.size()),
            ));
        }
        if split.iter().any(|&s| s < 0) {
            return Err(self.invalid(op, format!("{what} {split:?} has a negative entry")));
        }
        let sum: i64 = split.iter().sum();
        if total >= 0 && sum != total {
            return Err(self
                .invalid(op, format!("{what} {split:?} sums to {sum} but dim {dim} has {total} elements")));
        }
        Ok(())
    }

    /// A caller's output must have the shape the op writes, and `x`'s dtype and device.
    fn check_out(&self, op: OpKind, x: &Tensor, out: &Tensor, shape: &[i64]) -> Result<()> {
        if out.size() == shape && out.kind() == x.kind() && out.device() == x.device() {
            return Ok(());
        }
        Err(self.invalid(
            op,
            format!(
                "out is {:?}{:?} on {:?}; this {op} writes {:?}{shape:?} on {:?}",
                out.kind(),
                out.size(),
                out.device(),
                x.kind(),
                x.device()
            ),
        ))
    }

    /// A split of a gathered dim: one entry per rank, this rank's entry its own extent.
    fn check_own_part(&self, op: OpKind, what: &str, split: &[i64], shape: &[i64], d: usize) -> Result<()> {
        self.check_split(op, what, split, -1, d)?;
        let r = self.rank();
        if split[r] != shape[d] {
            return Err(self.invalid(
                op,
                format!(
                    "{what}[{r}] = {} but this rank's input has {} along dim {d} (shape {shape:?})",
                    split[r], shape[d]
                ),
            ));
        }
        Ok(())
    }

    fn check_rank(&self, op: OpKind, what: &str, r: usize) -> Result<()> {
        if r >= self.size() {
            return Err(self.invalid(op, format!("{what} {r} is not a rank of a group of {}", self.size())));
        }
        Ok(())
    }

    fn check_peer(&self, op: OpKind, what: &str, r: usize) -> Result<()> {
        self.check_rank(op, what, r)?;
        if r == self.rank() {
            return Err(self.invalid(op, format!("{what} {r} is this rank itself")));
        }
        Ok(())
    }

    fn check_reduce(&self, op: OpKind, kind: Kind, reduce: ReduceOp) -> Result<()> {
        if reduce == ReduceOp::Avg && !is_float(kind) {
            return Err(self.invalid(op, format!("Avg needs a floating-point dtype, got {kind:?}")));
        }
        Ok(())
    }
}

/// Whether a dtype is a real floating-point type.
pub(crate) fn is_float(kind: Kind) -> bool {
    matches!(kind, Kind::Half | Kind::BFloat16 | Kind::Float | Kind::Double)
}

/// P empty slots: no transfer with any rank.
pub(super) fn none(p: usize) -> Vec<Option<Tensor>> {
    (0..p).map(|_| None).collect()
}

/// The views of `x` along `dim` with the given sizes, one per rank.
pub(super) fn chunks(x: &Tensor, dim: usize, sizes: &[i64]) -> Result<Vec<Option<Tensor>>, tch::TchError> {
    let mut start = 0;
    sizes
        .iter()
        .map(|&len| {
            let view = x.f_narrow(dim as i64, start, len)?;
            start += len;
            Ok(Some(view))
        })
        .collect()
}

/// Reduces `[P, ..]` over dim 0, accumulating half precision in f32, and returns `x`'s dtype.
fn reduce_stack(stack: &Tensor, reduce: ReduceOp, p: usize) -> Result<Tensor, tch::TchError> {
    let kind = stack.kind();
    let acc = match kind {
        Kind::Half | Kind::BFloat16 => Kind::Float,
        k => k,
    };
    let reduced = match reduce {
        ReduceOp::Max => stack.f_amax([0i64].as_slice(), false)?,
        ReduceOp::Sum => stack.f_sum_dim_intlist([0i64].as_slice(), false, acc)?,
        ReduceOp::Avg => stack.f_sum_dim_intlist([0i64].as_slice(), false, acc)?.f_div_scalar(p as f64)?,
    };
    reduced.f_to_kind(kind)
}
