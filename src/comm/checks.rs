//! The argument checks of the collectives, made before anything is sent: dims in range, splits
//! with one entry per rank that add up, a caller's output of the right shape, dtype and device,
//! ranks of the group, and reductions the dtype allows. Each failure is an
//! [`InvalidArgument`](crate::Error::InvalidArgument) naming the op, the group and what is wrong.

use tch::{Kind, Tensor};

use super::group::Group;
use super::{OpKind, ReduceOp};
use crate::Result;

impl Group {
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
    pub(super) fn even_split(&self, op: OpKind, extent: i64, dim: usize) -> Result<Vec<i64>> {
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
    pub(super) fn check_split(
        &self,
        op: OpKind,
        what: &str,
        split: &[i64],
        total: i64,
        dim: usize,
    ) -> Result<()> {
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
    pub(super) fn check_out(&self, op: OpKind, x: &Tensor, out: &Tensor, shape: &[i64]) -> Result<()> {
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
    pub(super) fn check_own_part(
        &self,
        op: OpKind,
        what: &str,
        split: &[i64],
        shape: &[i64],
        d: usize,
    ) -> Result<()> {
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

    pub(super) fn check_rank(&self, op: OpKind, what: &str, r: usize) -> Result<()> {
        if r >= self.size() {
            return Err(self.invalid(op, format!("{what} {r} is not a rank of a group of {}", self.size())));
        }
        Ok(())
    }

    pub(super) fn check_peer(&self, op: OpKind, what: &str, r: usize) -> Result<()> {
        self.check_rank(op, what, r)?;
        if r == self.rank() {
            return Err(self.invalid(op, format!("{what} {r} is this rank itself")));
        }
        Ok(())
    }

    pub(super) fn check_reduce(&self, op: OpKind, kind: Kind, reduce: ReduceOp) -> Result<()> {
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
