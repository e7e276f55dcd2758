//! Flat parameter buffers and their partitions over the ranks (Rajbhandari et al. 2020, §5).
//!
//! The parameters of a unit are laid end to end in creation order in one buffer `[M]`, padded
//! with zeros to `Mp = ceil(M / W) W`, and each parameter becomes a view of its place in it
//! (`set_data`), so that the buffer *is* the parameters: an update of a partition in place, an
//! all-gather into the buffer, or freeing the buffer's storage acts on the model directly. Rank
//! r owns the r-th contiguous `Mp / W` elements.

use tch::{Kind, Tensor};

use crate::autograd::{resize_storage, storage_nbytes};
use crate::comm::{pieces, reduction_kind, Piece};
use crate::error::TorchResultExt;
use crate::model::Params;
use crate::{Error, Result};

/// One parameter's place in a flat buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Index in the model's parameters.
    pub param: usize,
    pub name: String,
    pub shape: Vec<i64>,
    /// Offset and length in the buffer.
    pub offset: i64,
    pub numel: i64,
}

/// A flat buffer of parameters, partitioned over `parts` ranks.
pub struct FlatUnit {
    /// "all", "outer", "block 3", "tp".
    pub name: String,
    pub entries: Vec<Entry>,
    /// Elements of the parameters, M.
    pub numel: i64,
    /// M padded to a multiple of `parts`.
    pub padded: i64,
    pub parts: i64,
    /// `[padded]`, in the parameters' dtype; the parameters are views of it.
    pub flat: Tensor,
}

impl FlatUnit {
    /// Makes parameters `indices` of `params` views of one new flat buffer padded to a
    /// multiple of `parts`.
    pub fn new(name: &str, params: &Params, indices: &[usize], parts: i64) -> Result<FlatUnit> {
        const OP: &str = "flat_params";
        let all = params.all();
        let first = indices.first().map(|&i| &all[i].tensor);
        let (kind, device) = first.map_or((Kind::Float, tch::Device::Cpu), |t| (t.kind(), t.device()));
        let mut entries = Vec::with_capacity(indices.len());
        let mut offset = 0;
        for &i in indices {
            let p = &all[i];
            if p.tensor.kind() != kind {
                return Err(Error::InvalidArgument {
                    op: OP,
                    group: name.into(),
                    msg: format!("{} is {:?}, the unit's first parameter {kind:?}", p.name, p.tensor.kind()),
                });
            }
            let numel = p.tensor.numel() as i64;
            entries.push(Entry { param: i, name: p.name.clone(), shape: p.tensor.size(), offset, numel });
            offset += numel;
        }
        let parts = parts.max(1);
        let padded = (offset + parts - 1) / parts * parts;
        let flat = Tensor::f_zeros([padded], (kind, device)).op(OP)?;
        let _no_grad = tch::no_grad_guard();
        for e in &entries {
            let place = flat.f_narrow(0, e.offset, e.numel).op(OP)?;
            let mut p = all[e.param].tensor.shallow_clone();
            place.shallow_clone().f_copy_(&p.f_reshape([-1]).op(OP)?).op(OP)?;
            // The parameter's data becomes its place in the buffer ([numel] -> its shape).
            p.f_set_data(&place.f_view(e.shape.as_slice()).op(OP)?).op(OP)?;
        }
        Ok(FlatUnit { name: name.into(), entries, numel: offset, padded, parts, flat })
    }

    /// Elements per partition, `Mp / parts`.
    pub fn part_len(&self) -> i64 {
        self.padded / self.parts
    }

    /// Rank `r`'s partition `[start, end)`.
    pub fn part(&self, r: usize) -> (i64, i64) {
        let n = self.part_len();
        (r as i64 * n, (r as i64 + 1) * n)
    }

    /// For every rank, how many elements of `[a, b)` fall in its partition.
    pub fn split(&self, a: i64, b: i64) -> Vec<i64> {
        (0..self.parts as usize)
            .map(|r| {
                let (s, e) = self.part(r);
                (b.min(e) - a.max(s)).max(0)
            })
            .collect()
    }

    /// The parameters' pieces of `[a, b)` (padding excluded).
    pub fn pieces(&self, a: i64, b: i64) -> Vec<Piece> {
        let lens: Vec<i64> = self.entries.iter().map(|e| e.numel).collect();
        pieces(&lens, a, b)
    }

    /// The gradients of `[a, b)` as one tensor in the reduction dtype (f32 for half precision):
    /// each parameter's gradient (zeros where it has none), zeros for the padding.
    pub fn gradients(&self, params: &Params, a: i64, b: i64) -> Result<Tensor> {
        const OP: &str = "flat_grads";
        let kind = reduction_kind(self.flat.kind());
        let all = params.all();
        // Zeros where a parameter has no gradient and for the padding.
        let out = Tensor::f_zeros([b - a], (kind, self.flat.device())).op(OP)?;
        let mut offset = 0;
        for c in self.pieces(a, b) {
            let g = all[self.entries[c.index].param].tensor.grad();
            if g.defined() {
                let src = g.f_reshape([-1]).and_then(|g| g.f_narrow(0, c.start, c.len));
                src.and_then(|s| out.f_narrow(0, offset, c.len)?.f_copy_(&s)).op(OP)?;
            }
            offset += c.len;
        }
        Ok(out)
    }

    /// Whether the buffer's memory is allocated (ZeRO-3 frees it between uses).
    pub fn is_resident(&self) -> bool {
        storage_nbytes(&self.flat) > 0 || self.padded == 0
    }

    /// Allocates the buffer's memory again (its values are undefined until filled).
    pub fn allocate(&self) -> Result<()> {
        let bytes = self.padded as usize * self.flat.kind().elt_size_in_bytes();
        resize_storage(&self.flat, bytes).map_err(|msg| self.storage_error(msg))
    }

    /// Frees the buffer's memory; the parameters keep their shapes but hold no data until
    /// [`allocate`](FlatUnit::allocate) and a fill.
    pub fn release(&self) -> Result<()> {
        resize_storage(&self.flat, 0).map_err(|msg| self.storage_error(msg))
    }

    fn storage_error(&self, msg: String) -> Error {
        Error::Backend { backend: "storage", msg: format!("unit {}: {msg}", self.name) }
    }
}
