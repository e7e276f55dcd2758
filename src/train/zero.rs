//! ZeRO (Rajbhandari et al. 2020) over the sequence-data-parallel group: all SP x DP ranks, as
//! DeepSpeed's `seq_data_parallel_group` (Jacobs et al. 2023, §3.3). Gradients of replicated
//! parameters are summed over SP and averaged over DP, which is one sum over all W ranks (the
//! 1/DP is applied with the optimizer's other factors); Megatron-SP's tensor-parallel shards are
//! already whole per rank and are only summed over DP, outside ZeRO.
//!
//! | stage | replicated parameters | after the backward (f32 buckets) | after the update |
//! |---|---|---|---|
//! | 0 | one flat buffer, every rank updates all | all-reduce, 2 Mp (W-1)/W x 4 B | - |
//! | 1 | the same; rank r updates partition r | all-reduce | all-gather, Mp (W-1)/W x p B |
//! | 2 | the same; gradients kept for partition r only | reduce-scatter per block as its backward ends, Mp (W-1)/W x 4 B | all-gather |
//! | 3 | one buffer per block (and one for embedding, final norm and head), only partition r kept | per unit: all-gather before its forward and before its backward (2 Mu (W-1)/W x p B), reduce-scatter after its backward | - |
//!
//! (Mp: elements padded to a multiple of W; p: bytes of the parameter dtype.) Bytes are what the
//! group's counters record, padding included.

use std::cell::RefCell;
use std::collections::BTreeMap;

use tch::{Kind, Tensor};

use super::flat::FlatUnit;
use super::ZeroStage;
use crate::autograd::clear_grad;
use crate::comm::{BucketedAllReduce, Group, ReduceOp};
use crate::error::TorchResultExt;
use crate::model::{BlockHooks, Gpt, Placement, Unit};
use crate::{Error, Result};

/// Where a model unit's parameters lie: (index in `units`, start, end) of each range of flat
/// buffer, and the parameters' indices.
type UnitRanges = (Vec<(usize, i64, i64)>, Vec<usize>);

/// The flat buffers of a model and how they are reduced and partitioned.
pub struct Zero {
    pub stage: ZeroStage,
    /// All SP x DP ranks.
    pub group: Group,
    /// The data-parallel group (for the tensor-parallel shards).
    pub dp: Group,
    /// Buffers of replicated parameters, partitioned over `group`: one ("all") for stages 0-2,
    /// one per model unit for stage 3.
    pub units: Vec<FlatUnit>,
    /// The tensor-parallel shards (Megatron-SP), not partitioned.
    pub tp: Option<FlatUnit>,
    /// Per model unit: (index in `units`, range) of its parameters, and the parameters.
    ranges: BTreeMap<Unit, UnitRanges>,
    /// Stages 2-3: this rank's partition of each unit's gradient, in the parameter dtype.
    pub grads: Vec<Option<Tensor>>,
    /// Stage 3: this rank's partition of each unit's parameters (the buffers are freed).
    pub shards: Vec<Option<Tensor>>,
    /// Every parameter (shallow clones), for their gradients.
    params: crate::model::Params,
    bucket: i64,
    /// The dtype gradients are reduced in (`None`: `comm::reduction_kind` of theirs).
    reduce: Option<Kind>,
    /// Stages 0-1 with overlap, during a step's last micro-batch: the reduction of the
    /// replicated gradients, each bucket started as soon as the backward has finished every
    /// unit it holds ([`Zero::start_overlap`]).
    pending: RefCell<Option<BucketedAllReduce>>,
    /// The buckets of the last overlapped reduction that started during the backward, in the
    /// order they started (the rest start in [`Zero::all_reduce`]).
    pub started_in_backward: RefCell<Vec<usize>>,
}

impl Zero {
    /// Lays the model's parameters out for `stage` over `group` (all SP x DP ranks).
    /// `reduce`: the dtype gradients are reduced in (`None`: f32 for half precision, else their
    /// own; `TrainConfig::reduce_dtype`).
    pub fn new(
        model: &Gpt,
        stage: ZeroStage,
        group: &Group,
        dp: &Group,
        bucket: i64,
        reduce: Option<Kind>,
    ) -> Result<Zero> {
        let all = model.params().all();
        let w = group.size() as i64;
        let replicated: Vec<usize> =
            (0..all.len()).filter(|&i| all[i].placement == Placement::Replicated).collect();
        let sharded: Vec<usize> =
            (0..all.len()).filter(|&i| all[i].placement != Placement::Replicated).collect();
        let mut units = Vec::new();
        let mut ranges: BTreeMap<Unit, UnitRanges> = BTreeMap::new();
        if stage.partitions_parameters() {
            let mut by_unit: BTreeMap<Unit, Vec<usize>> = BTreeMap::new();
            for &i in &replicated {
                by_unit.entry(model.unit(i)).or_default().push(i);
            }
            for (unit, indices) in by_unit {
                let flat = FlatUnit::new(&unit.name(), model.params(), &indices, w)?;
                ranges.insert(unit, (vec![(units.len(), 0, flat.padded)], indices));
                units.push(flat);
            }
        } else {
            let flat = FlatUnit::new("all", model.params(), &replicated, w)?;
            // Consecutive parameters of one model unit form a range; the padding goes with the
            // last parameter's unit.
            for (k, e) in flat.entries.iter().enumerate() {
                let unit = model.unit(e.param);
                let end = if k + 1 == flat.entries.len() { flat.padded } else { e.offset + e.numel };
                let (spans, params) = ranges.entry(unit).or_default();
                params.push(e.param);
                match spans.last_mut() {
                    Some(last) if last.2 == e.offset => last.2 = end,
                    _ => spans.push((0, e.offset, end)),
                }
            }
            units.push(flat);
        }
        let tp =
            if sharded.is_empty() { None } else { Some(FlatUnit::new("tp", model.params(), &sharded, 1)?) };
        let r = group.rank();
        let mut zero = Zero {
            stage,
            group: group.clone(),
            dp: dp.clone(),
            grads: (0..units.len()).map(|_| None).collect(),
            shards: (0..units.len()).map(|_| None).collect(),
            units,
            tp,
            ranges,
            params: model.params().shallow(),
            bucket,
            reduce,
            pending: RefCell::new(None),
            started_in_backward: RefCell::new(Vec::new()),
        };
        for (k, u) in zero.units.iter().enumerate() {
            let (a, b) = u.part(r);
            if stage.partitions_gradients() {
                zero.grads[k] = Some(Tensor::f_zeros([b - a], (u.flat.kind(), u.flat.device())).op("zero")?);
            }
            if stage.partitions_parameters() {
                let mine = u.flat.f_narrow(0, a, b - a).op("zero")?;
                let mut shard = mine.f_empty_like().op("zero")?;
                shard.f_copy_(&mine).op("zero")?;
                zero.shards[k] = Some(shard);
                u.release()?;
            }
        }
        Ok(zero)
    }

    /// Whether the model needs hooks: stages 2-3 act at block boundaries, and stages 0-1 start
    /// their buckets there when the group overlaps communication.
    pub fn needs_hooks(&self) -> bool {
        self.stage.partitions_gradients() || self.group.overlap()
    }

    /// Stages 0-1 with overlap: the next backward is the step's last, so each bucket of the
    /// replicated gradients starts its reduction as soon as that backward has finished every
    /// model unit it holds (the last blocks' first); [`all_reduce`](Zero::all_reduce) completes
    /// them. Results and bytes are those of the blocking reduction, bit for bit.
    pub fn start_overlap(&self) -> Result<()> {
        if self.stage.partitions_gradients() || !self.group.overlap() {
            return Ok(());
        }
        let u = &self.units[0];
        let (lens, kinds) = self.layout_of(u);
        let b = BucketedAllReduce::new(&self.group, &lens, &kinds, ReduceOp::Sum, self.bucket, self.reduce)?;
        *self.pending.borrow_mut() = Some(b);
        Ok(())
    }

    /// The sizes and dtypes of a unit's gradients as [`grads_of`](Zero::grads_of) lists them.
    fn layout_of(&self, u: &FlatUnit) -> (Vec<i64>, Vec<Kind>) {
        let mut lens: Vec<i64> = u.entries.iter().map(|e| e.numel).collect();
        let mut kinds = vec![u.flat.kind(); lens.len()];
        if u.padded > u.numel {
            lens.push(u.padded - u.numel);
            kinds.push(u.flat.kind());
        }
        (lens, kinds)
    }

    /// The `i`-th tensor of a unit's gradients as [`grads_of`](Zero::grads_of) lists them.
    fn grad_of(&self, u: &FlatUnit, i: usize) -> Result<Tensor> {
        match u.entries.get(i) {
            Some(e) => {
                let g = self.params.all()[e.param].tensor.grad();
                if !g.defined() {
                    return Err(Error::Tape {
                        op: "zero",
                        msg: format!("parameter {} has no gradient", e.name),
                    });
                }
                Ok(g)
            }
            None => Tensor::f_zeros([u.padded - u.numel], (u.flat.kind(), u.flat.device())).op("zero"),
        }
    }

    /// Stage 3: allocates unit `k`'s buffer and all-gathers the partitions into it.
    pub fn gather(&self, k: usize) -> Result<()> {
        let (u, shard) = (&self.units[k], self.shards[k].as_ref());
        let Some(shard) = shard else { return Ok(()) };
        u.allocate()?;
        let sizes = vec![u.part_len(); u.parts as usize];
        self.group.all_gather_into(shard, &u.flat, 0, &sizes)
    }

    /// Stages 1-2: all-gathers every rank's updated partition into the buffers.
    pub fn gather_updated(&self) -> Result<()> {
        for u in &self.units {
            let (a, b) = u.part(self.group.rank());
            let mine = u.flat.f_narrow(0, a, b - a).op("zero")?;
            self.group.all_gather_into(&mine, &u.flat, 0, &vec![u.part_len(); u.parts as usize])?;
        }
        Ok(())
    }

    /// Stages 0-1: all-reduces the replicated gradients over every rank (and the shards'
    /// over DP), in buckets, into the parameters' gradients.
    pub fn all_reduce(&self) -> Result<()> {
        if let Some(b) = self.pending.borrow_mut().take() {
            // Stages 0-1 with overlap: one unit, some buckets already in flight.
            *self.started_in_backward.borrow_mut() = b.order().to_vec();
            let u = &self.units[0];
            let get = |i: usize| self.grad_of(u, i);
            b.finish(&get)?;
            return self.reduce_tp();
        }
        for u in &self.units {
            let grads = self.grads_of(u)?;
            self.group.all_reduce_buckets_in(&grads, ReduceOp::Sum, self.bucket, self.reduce)?;
        }
        self.reduce_tp()
    }

    /// The shards' gradients summed over DP (every stage).
    pub fn reduce_tp(&self) -> Result<()> {
        match &self.tp {
            Some(tp) if self.dp.size() > 1 => {
                self.dp.all_reduce_buckets_in(&self.grads_of(tp)?, ReduceOp::Sum, self.bucket, self.reduce)
            }
            _ => Ok(()),
        }
    }

    /// The gradients of a unit's parameters, and zeros for its padding.
    fn grads_of(&self, u: &FlatUnit) -> Result<Vec<Tensor>> {
        let count = u.entries.len() + usize::from(u.padded > u.numel);
        (0..count).map(|i| self.grad_of(u, i)).collect()
    }

    /// Stages 2-3: reduce-scatters the gradients of `[a, b)` of unit `k` in buckets of 1/W of
    /// the bucket size, adding this rank's part to its partition gradient. (A bucket can fall
    /// wholly in one rank's partition, and that rank receives W slots of it: 1/W keeps its
    /// buffers within one bucket.)
    fn reduce_scatter(&self, k: usize, a: i64, b: i64) -> Result<()> {
        let (u, me) = (&self.units[k], self.group.rank());
        let Some(acc) = &self.grads[k] else { return Ok(()) };
        let (start, _) = u.part(me);
        let step = (self.bucket / self.group.size() as i64).max(1);
        let mut x = a;
        while x < b {
            let y = (x + step).min(b);
            let split = u.split(x, y);
            let bucket = u.gradients(&self.params, x, y)?;
            let bucket = match self.reduce {
                Some(kind) if kind != bucket.kind() => bucket.f_to_kind(kind).op("zero")?,
                _ => bucket,
            };
            let mine = self.group.reduce_scatter_v(&bucket, 0, &split, ReduceOp::Sum)?;
            if split[me] > 0 {
                let at = x.max(start) - start;
                let _ = acc.f_narrow(0, at, split[me]).and_then(|mut d| d.f_add_(&mine)).op("zero")?;
            }
            x = y;
        }
        Ok(())
    }

    /// After a unit's backward (stages 2-3): its gradients reduce-scattered into the partitions
    /// and dropped; stage 3 frees its parameters again.
    fn finish_backward(&self, unit: Unit) -> Result<()> {
        let Some((spans, params)) = self.ranges.get(&unit) else { return Ok(()) };
        let _no_grad = tch::no_grad_guard();
        for &(k, a, b) in spans {
            self.reduce_scatter(k, a, b)?;
        }
        let all = self.params.all();
        for &i in params {
            clear_grad(&all[i].tensor).map_err(|msg| Error::Backend { backend: "storage", msg })?;
        }
        if self.stage.partitions_parameters() {
            for &(k, _, _) in spans {
                self.units[k].release()?;
            }
        }
        Ok(())
    }

    /// The units of `unit` (stage 3), gathered or released.
    fn each_unit(&self, unit: Unit, f: impl Fn(usize) -> Result<()>) -> Result<()> {
        if !self.stage.partitions_parameters() {
            return Ok(());
        }
        match self.ranges.get(&unit) {
            Some((spans, _)) => spans.iter().try_for_each(|&(k, _, _)| f(k)),
            None => Ok(()),
        }
    }
}

impl BlockHooks for Zero {
    fn before_forward(&self, unit: Unit) -> Result<()> {
        self.each_unit(unit, |k| self.gather(k))
    }

    fn after_forward(&self, unit: Unit) -> Result<()> {
        self.each_unit(unit, |k| self.units[k].release())
    }

    fn before_backward(&self, unit: Unit) -> Result<()> {
        self.each_unit(unit, |k| self.gather(k))
    }

    fn after_backward(&self, unit: Unit) -> Result<()> {
        if self.stage.partitions_gradients() {
            return self.finish_backward(unit);
        }
        // Stages 0-1: in the step's last backward, this unit's gradients are final.
        let mut pending = self.pending.borrow_mut();
        if let (Some(b), Some((spans, _))) = (pending.as_mut(), self.ranges.get(&unit)) {
            let u = &self.units[0];
            let get = |i: usize| self.grad_of(u, i);
            for &(_, a, end) in spans {
                b.ready(a, end, &get)?;
            }
        }
        Ok(())
    }
}
