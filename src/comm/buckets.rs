//! Reducing many tensors (a model's gradients) as one flat sequence, a fixed number of elements
//! at a time: the extra memory of the reduction is a few buckets, not a few copies of the model
//! (PyTorch DDP's and DeepSpeed's gradient buckets).

use tch::{Kind, Tensor};

use super::backend::{near_equal_parts, Collective};
use super::collectives::reduce_stack;
use super::group::Group;
use super::{OpKind, ReduceOp};
use crate::error::TorchResultExt;
use crate::Result;

/// The default bucket: 2^22 elements (16 MiB in f32, as PyTorch DDP's 25 MB bucket): each
/// all-reduce still moves megabytes (bandwidth-bound), and a reduction holds about four buckets
/// (two in flight, each its buffer and the slots the ranks send it), 64 MiB, whatever the model
/// size. (DeepSpeed's GPU default, 5e8 elements, would hold a whole 125M
/// model's gradients several times over on a CPU rank.)
pub const DEFAULT_BUCKET_ELEMS: i64 = 1 << 22;

/// Buckets of one reduction in flight at a time: starting another first completes the oldest,
/// so that one bucket's transfer overlaps the completion of the one before, and a reduction
/// holds two buckets' buffers (each: its copy in the reduction dtype and the P slots of 1/P the
/// ranks send it), plus the part being reduced, whatever the model size.
pub const BUCKETS_IN_FLIGHT: usize = 2;

/// One piece of a bucket: elements `start..start + len` of tensor `index` (flattened).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Piece {
    pub index: usize,
    pub start: i64,
    pub len: i64,
}

/// The pieces of the flat range `begin..end` over tensors of `lens` elements laid end to end.
pub fn pieces(lens: &[i64], begin: i64, end: i64) -> Vec<Piece> {
    let mut out = Vec::new();
    let mut offset = 0;
    for (index, &n) in lens.iter().enumerate() {
        let (a, b) = (begin.max(offset), end.min(offset + n));
        if a < b {
            out.push(Piece { index, start: a - offset, len: b - a });
        }
        offset += n;
    }
    out
}

/// The dtype a reduction of `kind` runs in: f32 for half precision, else `kind` itself.
pub fn reduction_kind(kind: Kind) -> Kind {
    match kind {
        Kind::Half | Kind::BFloat16 => Kind::Float,
        k => k,
    }
}

impl Group {
    /// All-reduces `tensors` in place, as if they were one flat tensor, `bucket` elements at a
    /// time (rounded down to a multiple of the group size, so that every bucket but the last
    /// splits evenly over the ranks). Each bucket is copied into one buffer in f32 (half
    /// precision) or its own dtype, reduced, and copied back. Every rank passes tensors of the
    /// same sizes and dtypes, in the same order; each must be contiguous.
    ///
    /// Bytes per rank: those of one all-reduce of the total, 2 M (P-1)/P elements when P divides
    /// every bucket; the extra memory is 4 + 1/P buckets in the reduction dtype at most (two
    /// buckets in flight, [`BUCKETS_IN_FLIGHT`], each its buffer and the P slots of 1/P the ranks
    /// send it; the reduced part of the one completing).
    pub fn all_reduce_buckets(&self, tensors: &[Tensor], reduce: ReduceOp, bucket: i64) -> Result<()> {
        self.all_reduce_buckets_in(tensors, reduce, bucket, None)
    }

    /// [`all_reduce_buckets`](Group::all_reduce_buckets), reduced in `kind` (`None`: f32 for
    /// half precision, else the tensors' own dtype; bf16 halves a mixed-precision reduction's
    /// bytes).
    pub fn all_reduce_buckets_in(
        &self,
        tensors: &[Tensor],
        reduce: ReduceOp,
        bucket: i64,
        kind: Option<Kind>,
    ) -> Result<()> {
        if let Some(t) = tensors.iter().find(|t| !t.is_contiguous()) {
            let msg = format!("a bucketed tensor {:?} is not contiguous", t.size());
            return Err(self.invalid(OpKind::AllReduce, msg));
        }
        let lens: Vec<i64> = tensors.iter().map(|t| t.numel() as i64).collect();
        let kinds: Vec<Kind> = tensors.iter().map(Tensor::kind).collect();
        let get = |i: usize| Ok(tensors[i].shallow_clone());
        BucketedAllReduce::new(self, &lens, &kinds, reduce, bucket, kind)?.finish(&get)
    }
}

/// A bucketed all-reduce ([`Group::all_reduce_buckets`]) whose buckets can start one by one as
/// their tensors become final, so that the reduction of the last layers' gradients overlaps the
/// backward of the first (PyTorch DDP's and DeepSpeed's gradient buckets): [`ready`] says which
/// flat elements are final and starts every bucket they complete (its reduce-scatter half in
/// flight: `Group::transfer_start`); [`finish`] starts the rest and completes every bucket in
/// order (reduce, all-gather, copy back). The values are those of the blocking all-reduce bit
/// for bit (each element summed over the ranks in rank order either way), and so are the
/// counted bytes. Every rank must make the same calls in the same order.
///
/// The tensors are fetched when used (`get(i)`: tensor `i`, contiguous, of the planned size):
/// autograd may replace a gradient tensor instead of adding into it while anyone else holds it,
/// so a gradient is read when its bucket starts and written back into whatever tensor holds it
/// at the end.
///
/// [`ready`]: BucketedAllReduce::ready
/// [`finish`]: BucketedAllReduce::finish
pub struct BucketedAllReduce {
    group: Group,
    lens: Vec<i64>,
    kinds: Vec<Kind>,
    reduce: ReduceOp,
    /// Reduction dtype of each bucket's buffer.
    kind: Option<Kind>,
    /// [begin, end) of each bucket in the flat sequence.
    ranges: Vec<(i64, i64)>,
    /// Per bucket: elements not yet final.
    waiting: Vec<i64>,
    started: Vec<Option<InFlight>>,
    /// Per bucket: completed (reduced and copied back).
    done: Vec<bool>,
    /// Buckets in the order they started (for tests and reports).
    order: Vec<usize>,
}

/// One bucket in flight, in its buffer.
enum InFlight {
    /// The reduce-scatter half of the group's own all-reduce: this rank's slots, one per rank
    /// (sizes `parts`).
    Halves { flat: Tensor, slots: super::Started<Tensor>, parts: Vec<i64> },
    /// The backend's own all-reduce ([`Backend::runs_natively`](super::Backend::runs_natively)),
    /// in place.
    Native { flat: Tensor, pending: Box<dyn super::Pending> },
}

impl BucketedAllReduce {
    /// Plans the buckets of `tensors` (see [`Group::all_reduce_buckets`]); `kind` the dtype to
    /// reduce in (`None`: f32 for half precision, else the tensors' own).
    pub fn new(
        group: &Group,
        lens: &[i64],
        kinds: &[Kind],
        reduce: ReduceOp,
        bucket: i64,
        kind: Option<Kind>,
    ) -> Result<BucketedAllReduce> {
        let op = OpKind::AllReduce;
        if bucket < 1 {
            return Err(group.invalid(op, format!("bucket of {bucket} elements: it must be at least 1")));
        }
        for k in kinds {
            group.check_reduce(op, kind.unwrap_or_else(|| reduction_kind(*k)), reduce)?;
        }
        let p = group.size() as i64;
        let bucket = if bucket >= p { bucket - bucket % p } else { bucket };
        let total: i64 = lens.iter().sum();
        let ranges: Vec<(i64, i64)> =
            (0..total).step_by(bucket as usize).map(|b| (b, (b + bucket).min(total))).collect();
        Ok(BucketedAllReduce {
            group: group.clone(),
            lens: lens.to_vec(),
            kinds: kinds.to_vec(),
            reduce,
            kind,
            waiting: ranges.iter().map(|(a, b)| b - a).collect(),
            started: ranges.iter().map(|_| None).collect(),
            done: vec![false; ranges.len()],
            ranges,
            order: Vec::new(),
        })
    }

    /// The buckets, as [begin, end) of the flat sequence.
    pub fn ranges(&self) -> &[(i64, i64)] {
        &self.ranges
    }

    /// The buckets in the order they started so far.
    pub fn order(&self) -> &[usize] {
        &self.order
    }

    /// Elements `[a, b)` of the flat sequence are final: every bucket this completes starts.
    /// Each element must be declared once at most.
    pub fn ready(&mut self, a: i64, b: i64, get: &dyn Fn(usize) -> Result<Tensor>) -> Result<()> {
        // The last buckets first: a backward finishes the model from its end.
        for i in (0..self.ranges.len()).rev() {
            let (x, y) = self.ranges[i];
            let overlap = b.min(y) - a.max(x);
            if overlap > 0 {
                if overlap > self.waiting[i] {
                    let msg = format!("elements [{a}, {b}) declared final twice (bucket {i}: [{x}, {y}))");
                    return Err(self.group.invalid(OpKind::AllReduce, msg));
                }
                self.waiting[i] -= overlap;
                if self.waiting[i] == 0 {
                    self.start(i, get)?;
                }
            }
        }
        Ok(())
    }

    /// Starts bucket `i`: its pieces copied into one buffer, the reduce-scatter half in flight.
    /// With [`BUCKETS_IN_FLIGHT`] buckets in flight already, the oldest completes first.
    fn start(&mut self, i: usize, get: &dyn Fn(usize) -> Result<Tensor>) -> Result<()> {
        if self.started[i].is_some() || self.done[i] {
            return Ok(());
        }
        while self.started.iter().filter(|s| s.is_some()).count() >= BUCKETS_IN_FLIGHT {
            let oldest = self.order.iter().copied().find(|&k| self.started[k].is_some());
            match oldest {
                Some(k) => self.complete(k, get)?,
                None => break,
            }
        }
        let op = OpKind::AllReduce;
        let _no_grad = tch::no_grad_guard();
        let (begin, end) = self.ranges[i];
        let parts = pieces(&self.lens, begin, end);
        // [len] views of the tensors -> one [end - begin] buffer in the reduction dtype
        let kind = self.kind.unwrap_or_else(|| reduction_kind(self.kinds[parts[0].index]));
        let mut flat = None;
        let mut offset = 0;
        for c in &parts {
            let t = self.fetch(c.index, get)?;
            let buf = match &flat {
                Some(f) => f,
                None => flat.insert(Tensor::f_empty([end - begin], (kind, t.device())).op(op.name())?),
            };
            let src = t.f_view([-1]).and_then(|t| t.f_narrow(0, c.start, c.len));
            src.and_then(|s| buf.f_narrow(0, offset, c.len)?.f_copy_(&s)).op(op.name())?;
            offset += c.len;
        }
        let flat = flat.ok_or_else(|| self.group.invalid(op, format!("bucket {i} holds no element")))?;
        let whole = Collective::AllReduce { buf: &flat, reduce: self.reduce };
        let in_flight = if self.group.runs_natively(&whole) {
            let moved = self.group.all_reduce_bytes(end - begin, kind.elt_size_in_bytes());
            let pending = self.group.native_start(op, whole, moved)?;
            InFlight::Native { flat, pending }
        } else {
            // P near-equal parts of the bucket, as `Group::all_reduce` splits a tensor.
            let split = near_equal_parts(end - begin, self.group.size() as i64);
            let slots = self.group.scatter_start(op, &flat, &split)?;
            InFlight::Halves { flat, slots, parts: split }
        };
        self.started[i] = Some(in_flight);
        self.order.push(i);
        Ok(())
    }

    /// Tensor `i` as `get` gives it, checked against the plan.
    fn fetch(&self, i: usize, get: &dyn Fn(usize) -> Result<Tensor>) -> Result<Tensor> {
        let t = get(i)?;
        if t.numel() as i64 != self.lens[i] || t.kind() != self.kinds[i] || !t.is_contiguous() {
            return Err(self.group.invalid(
                OpKind::AllReduce,
                format!(
                    "bucketed tensor {i} is {:?}{:?} (contiguous: {}), planned as {:?} of {} elements",
                    t.kind(),
                    t.size(),
                    t.is_contiguous(),
                    self.kinds[i],
                    self.lens[i]
                ),
            ));
        }
        Ok(t)
    }

    /// Starts the buckets not started yet and completes every bucket, in the order they
    /// started (at most [`BUCKETS_IN_FLIGHT`] in flight at a time).
    pub fn finish(mut self, get: &dyn Fn(usize) -> Result<Tensor>) -> Result<()> {
        for i in 0..self.ranges.len() {
            self.start(i, get)?;
        }
        let left: Vec<usize> = self.order.iter().copied().filter(|&k| self.started[k].is_some()).collect();
        for k in left {
            self.complete(k, get)?;
        }
        Ok(())
    }

    /// Completes bucket `i`, in flight: this rank's part reduced, all-gathered, copied back
    /// into the tensors (whichever tensors `get` gives now), the buffers freed.
    fn complete(&mut self, i: usize, get: &dyn Fn(usize) -> Result<Tensor>) -> Result<()> {
        let op = OpKind::AllReduce;
        let _no_grad = tch::no_grad_guard();
        let p = self.group.size();
        let flat = match self.started[i].take() {
            None => return Ok(()),
            Some(InFlight::Native { flat, pending }) => {
                pending.wait()?;
                flat
            }
            Some(InFlight::Halves { flat, slots, parts }) => {
                let stack = slots.wait()?;
                let mine = reduce_stack(&stack, self.reduce, p).op(op.name())?;
                drop(stack);
                self.group.gather_into_flat(op, &mine, &flat, &parts)?;
                flat
            }
        };
        self.done[i] = true;
        self.group.count_call(op);
        let mut offset = 0;
        for c in pieces(&self.lens, self.ranges[i].0, self.ranges[i].1) {
            let t = self.fetch(c.index, get)?;
            let dst = t.f_view([-1]).and_then(|t| t.f_narrow(0, c.start, c.len));
            dst.and_then(|mut d| d.f_copy_(&flat.f_narrow(0, offset, c.len)?)).op(op.name())?;
            offset += c.len;
        }
        Ok(())
    }
}
