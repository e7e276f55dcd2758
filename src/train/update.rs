//! The optimizer over flat ZeRO partitions, with mixed precision (Micikevicius et al. 2018):
//! f32 master weights and Adam moments for the range a rank updates, the 16-bit parameters
//! rounded from the master after each update. Also the gradient statistics of a step (the
//! global norm, each element counted once over the ranks, and the first non-finite parameter).

use tch::{Kind, Tensor};

use super::flat::FlatUnit;
use super::optim::update;
use super::zero::Zero;
use super::{AdamWConfig, Precision};
use crate::error::TorchResultExt;
use crate::model::Params;
use crate::Result;

/// The optimizer state of one flat unit on this rank.
pub struct UnitState {
    /// The range `[start, end)` of the unit that this rank updates: the whole unit (stage 0,
    /// tensor-parallel shards) or its partition (stages 1-3).
    pub range: (i64, i64),
    /// f32 master weights of the range (mixed precision); otherwise the parameters themselves
    /// are the master.
    pub master: Option<Tensor>,
    /// Adam's first and second moments of the range (f32; f64 in f64 runs).
    pub m: Tensor,
    pub v: Tensor,
}

/// The dtype of master weights and moments.
pub fn state_kind(precision: Precision) -> Kind {
    if precision == Precision::F64 {
        Kind::Double
    } else {
        Kind::Float
    }
}

impl UnitState {
    /// Zeros for the moments; the master copied from the parameters (`store`, `[range]`).
    pub fn new(range: (i64, i64), store: &Tensor, precision: Precision) -> Result<UnitState> {
        let (kind, n) = (state_kind(precision), range.1 - range.0);
        let zeros = || Tensor::f_zeros([n], (kind, store.device())).op("adamw");
        let master =
            if precision.is_mixed() { Some(store.f_to_kind(Kind::Float).op("adamw")?) } else { None };
        Ok(UnitState { range, master, m: zeros()?, v: zeros()? })
    }
}

/// Where unit `k`'s values and gradients live on this rank.
pub struct Sources<'a> {
    pub unit: &'a FlatUnit,
    /// The parameters' storage for the range: the flat buffer (offset 0) or the stage-3 shard
    /// (offset at the range start).
    pub store: (Tensor, i64),
    /// The partition gradient (stages 2-3; offset at the range start), else the parameters'
    /// own gradients.
    pub grad: Option<(Tensor, i64)>,
}

impl Sources<'_> {
    /// The gradient of `len` elements at flat offset `o` of parameter piece `param`.
    fn grad(&self, params: &Params, param: usize, in_param: i64, o: i64, len: i64) -> Result<Tensor> {
        match &self.grad {
            Some((g, base)) => g.f_narrow(0, o - base, len).op("adamw"),
            None => {
                let g = params.all()[param].tensor.grad();
                if !g.defined() {
                    return Tensor::f_zeros([len], (self.unit.flat.kind(), self.unit.flat.device()))
                        .op("adamw");
                }
                g.f_reshape([-1]).and_then(|g| g.f_narrow(0, in_param, len)).op("adamw")
            }
        }
    }

    /// Every (parameter index, offset in it, flat offset, length) of `[a, b)`, in pieces of at
    /// most `chunk` elements.
    fn chunks(&self, (a, b): (i64, i64), chunk: i64) -> Vec<(usize, i64, i64, i64)> {
        let mut out = Vec::new();
        for p in self.unit.pieces(a, b) {
            let e = &self.unit.entries[p.index];
            let mut s = 0;
            while s < p.len {
                let len = chunk.min(p.len - s);
                out.push((p.index, p.start + s, e.offset + p.start + s, len));
                s += len;
            }
        }
        out
    }

    /// Sum of squares (f64) of the gradient over `[a, b)`, per parameter (model index).
    pub fn sum_squares(&self, params: &Params, range: (i64, i64), chunk: i64) -> Result<Vec<(usize, f64)>> {
        let mut out: Vec<(usize, f64)> = Vec::new();
        for (i, in_param, o, len) in self.chunks(range, chunk) {
            let param = self.unit.entries[i].param;
            let g = self.grad(params, param, in_param, o, len)?;
            let s = g.f_to_kind(Kind::Double).and_then(|g| g.f_square()).and_then(|g| g.f_sum(Kind::Double));
            let s = s.op("grad_norm")?.double_value(&[]);
            match out.last_mut() {
                Some(last) if last.0 == param => last.1 += s,
                _ => out.push((param, s)),
            }
        }
        Ok(out)
    }

    /// One AdamW step over the state's range: gradients times `factor`, learning rate `lr`.
    pub fn update(
        &self,
        params: &Params,
        state: &mut UnitState,
        cfg: &AdamWConfig,
        (t, lr, factor): (i32, f64, f64),
        chunk: i64,
    ) -> Result<()> {
        let _no_grad = tch::no_grad_guard();
        let kind = state.m.kind();
        let (store, store_base) = (&self.store.0, self.store.1);
        let start = state.range.0;
        for (i, in_param, o, len) in self.chunks(state.range, chunk) {
            let e = &self.unit.entries[i];
            let g = self.grad(params, e.param, in_param, o, len)?;
            let run = || -> Result<(), tch::TchError> {
                let g = g.f_to_kind(kind)?.f_mul_scalar(factor)?;
                let mut param = store.f_narrow(0, o - store_base, len)?;
                let (mut m, mut v) =
                    (state.m.f_narrow(0, o - start, len)?, state.v.f_narrow(0, o - start, len)?);
                let decay = e.shape.len() >= 2;
                match &state.master {
                    Some(master) => {
                        let mut w = master.f_narrow(0, o - start, len)?;
                        update(&mut w, &g, (&mut m, &mut v), cfg, (t, lr), decay)?;
                        param.f_copy_(&w)
                    }
                    None => update(&mut param, &g, (&mut m, &mut v), cfg, (t, lr), decay),
                }
            };
            run().op("adamw")?;
        }
        Ok(())
    }
}

/// The sources of unit `k` of `zero` (`None`: the tensor-parallel unit).
pub fn sources(zero: &Zero, k: Option<usize>) -> Result<Sources<'_>> {
    let r = zero.group.rank();
    Ok(match k {
        Some(k) => {
            let unit = &zero.units[k];
            let (start, _) = unit.part(r);
            let store = match &zero.shards[k] {
                Some(shard) => (shard.shallow_clone(), start),
                None => (unit.flat.shallow_clone(), 0),
            };
            let grad = zero.grads[k].as_ref().map(|g| (g.shallow_clone(), start));
            Sources { unit, store, grad }
        }
        None => {
            let unit = zero
                .tp
                .as_ref()
                .ok_or_else(|| crate::Error::Tape { op: "adamw", msg: "no tensor-parallel unit".into() })?;
            Sources { unit, store: (unit.flat.shallow_clone(), 0), grad: None }
        }
    })
}
