//! Reducing many tensors (a model's gradients) as one flat sequence, a fixed number of elements
//! at a time: the extra memory of the reduction is a few buckets, not a few copies of the model
//! (PyTorch DDP's and DeepSpeed's gradient buckets).

use tch::{Kind, Tensor};

use super::group::Group;
use super::{OpKind, ReduceOp};
use crate::error::TorchResultExt;
use crate::Result;

/// The default bucket: 2^22 elements (16 MiB in f32, as PyTorch DDP's 25 MB bucket): each
/// all-reduce still moves megabytes (bandwidth-bound), and a reduction holds about four buckets
/// (the pieces in f32, their concatenation, the reduction's slots and its result), 64 MiB,
/// whatever the model size. (DeepSpeed's GPU default, 5e8 elements, would hold a whole 125M
/// model's gradients several times over on a CPU rank.)
pub const DEFAULT_BUCKET_ELEMS: i64 = 1 << 22;

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
    /// every bucket; the extra memory is three buckets in the reduction dtype (the buffer, the
    /// reduction's P slots of 1/P, its result).
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
            // [len] views of the tensors -> one [end - begin] buffer in the reduction dtype
            let kind = reduction_kind(tensors[parts[0].index].kind());
            let flat = Tensor::f_empty([end - begin], (kind, tensors[0].device())).op(op.name())?;
            let mut offset = 0;
            for c in &parts {
                let src = tensors[c.index].f_view([-1]).and_then(|t| t.f_narrow(0, c.start, c.len));
                src.and_then(|s| flat.f_narrow(0, offset, c.len)?.f_copy_(&s)).op(op.name())?;
                offset += c.len;
            }
            let reduced = self.all_reduce(&flat, reduce)?;
            drop(flat);
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
