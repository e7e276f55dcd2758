//! The collectives, each a batch of transfers ([`Group::transfer`]) plus local tensor work: here
//! those that split a tensor along a dim (all-to-all, all-gather, reduce-scatter, all-reduce) and
//! the helpers that list their transfers; the collectives on whole tensors are in `whole.rs`, the
//! argument checks in `checks.rs`.
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

use super::backend::{near_equal_parts, Collective};
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
        let parts = near_equal_parts(n, self.size() as i64);
        // [..] -> [n]: flat, so that any shape splits into P near-equal parts.
        let flat = x.f_reshape([n]).op(op.name())?;
        self.check_reduce(op, x.kind(), reduce)?;
        if self.runs_natively(&Collective::AllReduce { buf: &flat, reduce }) {
            // The backend's own all-reduce, in place on a copy.
            let buf = Tensor::f_empty([n], (x.kind(), x.device())).op(op.name())?;
            buf.shallow_clone().f_copy_(&flat).op(op.name())?;
            let moved = self.all_reduce_bytes(n, x.kind().elt_size_in_bytes());
            self.native_start(op, Collective::AllReduce { buf: &buf, reduce }, moved)?.wait()?;
            self.count_call(op);
            // [n] -> [..]
            return buf.f_reshape(x.size()).op(op.name());
        }
        let mine = self.scatter_reduced(op, &flat, 0, &parts, reduce)?;
        let full = self.gather_parts(op, &mine, 0, &parts)?;
        self.count_call(op);
        // [n] -> [..]
        full.f_reshape(x.size()).op(op.name())
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

    /// The second half of a bucketed all-reduce under `op`: this rank's reduced `mine` into its
    /// place in the flat `out`, every other rank's into theirs (sizes `parts`). Not counted as
    /// a call.
    ///
    /// # Shapes
    /// `mine`: `[parts[r]]`, `out`: `[sum(parts)]`.
    pub(crate) fn gather_into_flat(
        &self,
        op: OpKind,
        mine: &Tensor,
        out: &Tensor,
        parts: &[i64],
    ) -> Result<()> {
        self.check_own_part(op, "sizes", parts, &mine.size(), 0)?;
        self.gather_into(op, mine, out, 0, parts)
    }

    /// Sends `x` to every rank and receives rank j's part into its place in `out` (checked):
    /// as the backend's own all-gather where it has one for these tensors (equal parts that
    /// are contiguous slabs of `out`).
    fn gather_into(&self, op: OpKind, x: &Tensor, out: &Tensor, d: usize, sizes: &[i64]) -> Result<()> {
        if slabs(out, d, sizes) && x.is_contiguous() {
            let call = Collective::AllGather { input: x, output: out };
            if self.runs_natively(&call) {
                let parts: Vec<i64> = sizes.iter().map(|&n| n * inner(out, d)).collect();
                let (sent, received) = self.scatter_bytes(&parts, x.kind().elt_size_in_bytes());
                return self.native_start(op, call, (received, sent))?.wait();
            }
        }
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
        if slabs(x, d, split) {
            // The backend's own reduce-scatter, where it has one for these tensors.
            let mut shape = x.size();
            shape[d] = split[self.rank()];
            let out = Tensor::f_empty(&shape, (x.kind(), x.device())).op(op.name())?;
            let call = Collective::ReduceScatter { input: x, output: &out, reduce };
            if self.runs_natively(&call) {
                let parts: Vec<i64> = split.iter().map(|&n| n * inner(x, d)).collect();
                let moved = self.scatter_bytes(&parts, x.kind().elt_size_in_bytes());
                self.native_start(op, call, moved)?.wait()?;
                return Ok(out);
            }
        }
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
}

/// Whether the parts `sizes` along `d` are equal, contiguous slabs of `t` (every dim before `d`
/// of size 1), as a library's reduce-scatter and all-gather take them.
fn slabs(t: &Tensor, d: usize, sizes: &[i64]) -> bool {
    t.is_contiguous() && t.size()[..d].iter().all(|&n| n == 1) && sizes.windows(2).all(|w| w[0] == w[1])
}

/// The elements of `t` per index of dim `d` (the product of the dims after it).
fn inner(t: &Tensor, d: usize) -> i64 {
    t.size()[d + 1..].iter().product()
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
pub(crate) fn reduce_stack(stack: &Tensor, reduce: ReduceOp, p: usize) -> Result<Tensor, tch::TchError> {
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
