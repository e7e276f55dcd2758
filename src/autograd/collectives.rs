//! Every collective paired with its adjoint, as taped ops.
//!
//! | forward                      | adjoint (backward)                 |
//! |------------------------------|------------------------------------|
//! | all-to-all (scatter s, gather g) | all-to-all (scatter g, gather s) |
//! | all-gather (dim)             | reduce-scatter, sum (dim)          |
//! | reduce-scatter, sum (dim)    | all-gather (dim)                   |
//! | all-reduce, sum              | all-reduce, sum                    |
//! | broadcast (root)             | reduce to root, sum                |
//! | send to dst / recv from src  | recv from dst / send to src        |
//! | shift by k                   | shift by -k                        |
//! | Megatron f: identity         | all-reduce, sum                    |
//! | Megatron g: all-reduce, sum  | identity                           |
//!
//! The two Megatron-LM operators (Shoeybi et al. 2019, §3, "f" and "g") are conjugate under the
//! tensor-parallel convention that a replicated tensor's gradient is the same on every rank (the
//! loss is computed once, redundantly): `f` enters a parallel region, `g` leaves it.

use tch::Tensor;

use super::{single, Tape};
use crate::comm::{AllToAll, Group, OpKind, ReduceOp};
use crate::error::TorchResultExt;
use crate::Result;

impl Tape {
    /// Differentiable [`Group::all_to_all`]; backward is the all-to-all with dims swapped.
    ///
    /// # Shapes
    /// `[.., S, .., G, ..]` -> `[.., S/P, .., G*P, ..]` (scatter S, gather G).
    pub fn all_to_all(&self, group: &Group, x: &Tensor, scatter_dim: i64, gather_dim: i64) -> Result<Tensor> {
        let g = group.clone();
        let out = self.record(
            "all_to_all",
            &[x],
            |xs| Ok(vec![group.all_to_all(&xs[0], scatter_dim, gather_dim)?]),
            move |gs| Ok(vec![g.all_to_all(&gs[0], gather_dim, scatter_dim)?]),
        )?;
        single("all_to_all", out)
    }

    /// Differentiable [`Group::all_to_all_v`]; backward swaps dims and splits.
    pub fn all_to_all_v(
        &self,
        group: &Group,
        x: &Tensor,
        scatter_dim: i64,
        gather_dim: i64,
        scatter_split: &[i64],
        gather_split: &[i64],
    ) -> Result<Tensor> {
        let spec = AllToAll::new(scatter_dim, gather_dim, scatter_split.to_vec(), gather_split.to_vec());
        single("all_to_all", self.all_to_all_many(group, &[(x, &spec)])?)
    }

    /// Several all-to-alls as one record (Ulysses' q, k and v): one backward pass then serves
    /// all of them, which matters when they come from one graph (a fused qkv projection), since
    /// a piece of graph must not feed two records (see [`Tape::cut`]). Forward and backward run
    /// them as [`Group::all_to_all_many`]: with the group's overlap on, the later ones are in
    /// flight while the first is consumed.
    pub fn all_to_all_many(&self, group: &Group, inputs: &[(&Tensor, &AllToAll)]) -> Result<Vec<Tensor>> {
        let xs: Vec<&Tensor> = inputs.iter().map(|(x, _)| *x).collect();
        let inverses: Vec<AllToAll> = inputs.iter().map(|(_, s)| s.inverse()).collect();
        let g = group.clone();
        self.record(
            "all_to_all",
            &xs,
            |xs| group.all_to_all_many(&xs.iter().zip(inputs).map(|(x, (_, s))| (x, *s)).collect::<Vec<_>>()),
            move |gs| g.all_to_all_many(&gs.iter().zip(&inverses).collect::<Vec<_>>()),
        )
    }

    /// Differentiable [`Group::all_gather_v`] (pass equal sizes for the even case); backward is
    /// the reduce-scatter (sum) with the same sizes.
    ///
    /// # Shapes
    /// `[.., sizes[r], ..]` -> `[.., sum(sizes), ..]`.
    pub fn all_gather_v(&self, group: &Group, x: &Tensor, dim: i64, sizes: &[i64]) -> Result<Tensor> {
        let (g, s) = (group.clone(), sizes.to_vec());
        let out = self.record(
            "all_gather",
            &[x],
            |xs| Ok(vec![group.all_gather_v(&xs[0], dim, sizes)?]),
            move |gs| Ok(vec![g.reduce_scatter_v(&gs[0], dim, &s, ReduceOp::Sum)?]),
        )?;
        single("all_gather", out)
    }

    /// Differentiable [`Group::all_gather`]: equal parts.
    pub fn all_gather(&self, group: &Group, x: &Tensor, dim: i64) -> Result<Tensor> {
        let sizes = group.equal_parts(OpKind::AllGather, x, dim)?;
        self.all_gather_v(group, x, dim, &sizes)
    }

    /// Differentiable [`Group::reduce_scatter_v`] with a sum (pass equal splits for the even
    /// case); backward is the all-gather with the same sizes.
    ///
    /// # Shapes
    /// `[.., sum(split), ..]` -> `[.., split[r], ..]`.
    pub fn reduce_scatter_v(&self, group: &Group, x: &Tensor, dim: i64, split: &[i64]) -> Result<Tensor> {
        let (g, s) = (group.clone(), split.to_vec());
        let out = self.record(
            "reduce_scatter",
            &[x],
            |xs| Ok(vec![group.reduce_scatter_v(&xs[0], dim, split, ReduceOp::Sum)?]),
            move |gs| Ok(vec![g.all_gather_v(&gs[0], dim, &s)?]),
        )?;
        single("reduce_scatter", out)
    }

    /// Differentiable [`Group::reduce_scatter`] with a sum: equal chunks.
    pub fn reduce_scatter(&self, group: &Group, x: &Tensor, dim: i64) -> Result<Tensor> {
        let split = group.even_chunks(OpKind::ReduceScatter, x, dim)?;
        self.reduce_scatter_v(group, x, dim, &split)
    }

    /// Differentiable [`Group::all_reduce`] with a sum; backward is the same all-reduce.
    pub fn all_reduce(&self, group: &Group, x: &Tensor) -> Result<Tensor> {
        let g = group.clone();
        let out = self.record(
            "all_reduce",
            &[x],
            |xs| Ok(vec![group.all_reduce(&xs[0], ReduceOp::Sum)?]),
            move |gs| Ok(vec![g.all_reduce(&gs[0], ReduceOp::Sum)?]),
        )?;
        single("all_reduce", out)
    }

    /// Differentiable [`Group::broadcast`]; backward sums the gradients at the root (the other
    /// ranks' inputs only gave the shape, so their gradient is zero).
    pub fn broadcast(&self, group: &Group, x: &Tensor, root: usize) -> Result<Tensor> {
        let g = group.clone();
        let out = self.record(
            "broadcast",
            &[x],
            |xs| Ok(vec![group.broadcast(&xs[0], root)?]),
            move |gs| {
                let summed = g.reduce(&gs[0], root, ReduceOp::Sum)?;
                Ok(vec![match summed {
                    Some(s) => s,
                    None => gs[0].f_zeros_like().op("broadcast")?,
                }])
            },
        )?;
        single("broadcast", out)
    }

    /// Differentiable [`Group::send`]; backward receives the gradient of `x` from `dst`.
    pub fn send(&self, group: &Group, x: &Tensor, dst: usize) -> Result<()> {
        let (g, like) = (group.clone(), x.detach());
        self.record(
            "send",
            &[x],
            |xs| group.send(&xs[0], dst).map(|()| Vec::new()),
            move |_| Ok(vec![g.recv(&like, dst)?]),
        )?;
        Ok(())
    }

    /// Differentiable [`Group::recv`]; backward sends the gradient back to `src`.
    pub fn recv(&self, group: &Group, like: &Tensor, src: usize) -> Result<Tensor> {
        let g = group.clone();
        let out = self.record(
            "recv",
            &[],
            |_| Ok(vec![group.recv(like, src)?]),
            move |gs| g.send(&gs[0], src).map(|()| Vec::new()),
        )?;
        single("recv", out)
    }

    /// Differentiable [`Group::shift`]; backward shifts the gradient the other way.
    pub fn shift(&self, group: &Group, x: &Tensor, offset: i64) -> Result<Tensor> {
        let g = group.clone();
        let out = self.record(
            "shift",
            &[x],
            |xs| Ok(vec![group.shift(&xs[0], offset)?]),
            move |gs| Ok(vec![g.shift(&gs[0], -offset)?]),
        )?;
        single("shift", out)
    }

    /// Megatron-LM's `f`: identity forward, all-reduce (sum) backward. Enters a tensor-parallel
    /// region with a replicated input.
    pub fn copy_to_parallel_region(&self, group: &Group, x: &Tensor) -> Result<Tensor> {
        let g = group.clone();
        let out = self.record(
            "tp_f",
            &[x],
            |xs| Ok(vec![xs[0].shallow_clone()]),
            move |gs| Ok(vec![g.all_reduce(&gs[0], ReduceOp::Sum)?]),
        )?;
        single("tp_f", out)
    }

    /// Megatron-LM's `g`: all-reduce (sum) forward, identity backward. Leaves a tensor-parallel
    /// region, summing the partial results into a replicated output.
    pub fn reduce_from_parallel_region(&self, group: &Group, x: &Tensor) -> Result<Tensor> {
        let out = self.record(
            "tp_g",
            &[x],
            |xs| Ok(vec![group.all_reduce(&xs[0], ReduceOp::Sum)?]),
            |gs| Ok(gs.iter().map(Tensor::shallow_clone).collect()),
        )?;
        single("tp_g", out)
    }
}
