//! Reducing many tensors (a model's gradients) as one flat sequence, a fixed number of elements
//! at a time: the extra memory of the reduction is a few buckets, not a few copies of the model
//! (PyTorch DDP's and DeepSpeed's gradient buckets).

use tch::{Kind, Tensor};

use super::group::Group;
use super::{OpKind, ReduceOp};
use crate::error::TorchResultExt;
use crate::Result;

/// The default bucket: 25 M elements (100 MB in f32), as DeepSpeed's and Megatron-LM's gradient
/// buckets are sized (tens of MB): large enough that each all-reduce is bandwidth-bound, small
/// enough that its buffers are a small part of a large model.
pub const DEFAULT_BUCKET_ELEMS: i64 = 25_000_000;

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
    /// splits evenly over the ranks). Each bucket is copied out, reduced in f32 (half
    /// precision) or its own dtype, and copied back. Every rank passes tensors of the same sizes
    /// and dtypes, in the same order; each must be contiguous.
    ///
    /// Bytes per rank: those of one all-reduce of the total, 2 M (P-1)/P elements when P divides
    /// every bucket; the extra memory is about three buckets in the reduction dtype.
    pub fn all_reduce_buckets(&self, tensors: &[Tensor], reduce: ReduceOp, bucket: i64) -> Result<()> {
        let op = OpKind::AllReduce;
        if bucket < 1 {
            return Err(self.invalid(op, format!("bucket of {bucket} elements: it must be at least 1")));
        }
        if let Some(t) = tensors.iter().find(|t| !t.is_contiguous()) {
            return Err(self.invalid(op, format!("a bucketed tensor {:?} is not contiguous", t.size())));
        }
        let p = self.size() as i64;
        let bucket = if bucket >= p { bucket - bucket % p } else { bucket };
        let lens: Vec<i64> = tensors.iter().map(|t| t.numel() as i64).collect();
        let total: i64 = lens.iter().sum();
        let _no_grad = tch::no_grad_guard();
        let mut begin = 0;
        while begin < total {
            let end = (begin + bucket).min(total);
            let parts = pieces(&lens, begin, end);
            // [len] views of the tensors -> [end - begin] in the reduction dtype
            let flat: Vec<Tensor> = parts
                .iter()
                .map(|c| {
                    let t = &tensors[c.index];
                    t.f_view([-1])?.f_narrow(0, c.start, c.len)?.f_to_kind(reduction_kind(t.kind()))
                })
                .collect::<Result<_, _>>()
                .op(op.name())?;
            let reduced = self.all_reduce(&Tensor::f_cat(&flat, 0).op(op.name())?, reduce)?;
            let mut offset = 0;
            for c in &parts {
                let dst = tensors[c.index].f_view([-1]).and_then(|t| t.f_narrow(0, c.start, c.len));
                dst.and_then(|mut d| d.f_copy_(&reduced.f_narrow(0, offset, c.len)?)).op(op.name())?;
                offset += c.len;
            }
            begin = end;
        }
        Ok(())
    }
}
