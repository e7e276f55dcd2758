//! Training runs for the tests: a tiny GPT trained by [`Trainer`] on one rank of any world
//! group (threads or MPI), on deterministic data that depends on the step and the data-parallel
//! replica, with every plan option.
#![allow(dead_code)]

use anyhow::Result;
use tch::{Device, Kind, Tensor};
use ulysses::attention::{AttentionConfig, Kernel, Mask, StrategyConfig};
use ulysses::comm::{Group, Mesh, MeshShape, ReduceOp};
use ulysses::data::{shard, Shard};
use ulysses::model::{Gpt, GptConfig, Placement};
use ulysses::train::{AdamWConfig, Checkpointing, Precision, TrainConfig, TrainGroups, Trainer, ZeroStage};

/// One training run's set-up.
#[derive(Debug, Clone)]
pub struct Run {
    pub model: GptConfig,
    pub strategy: StrategyConfig,
    /// Data-parallel replicas (the SP degree is the world size / dp).
    pub dp: usize,
    pub plan: TrainConfig,
    /// Global sequence length and sequences per micro-batch.
    pub n: i64,
    pub b: i64,
    pub steps: usize,
}

impl Run {
    /// A 2-layer GPT (h = 32, 4 heads, vocabulary 64), N = 32, b = 2, AdamW, 3 steps.
    pub fn tiny(strategy: StrategyConfig, dp: usize, precision: Precision, zero: u8) -> Run {
        let model = GptConfig {
            vocab_size: 64,
            n_layer: 2,
            n_head: 4,
            n_kv_head: 4,
            n_embd: 32,
            ..GptConfig::tiny()
        };
        let plan = TrainConfig {
            precision,
            zero: ZeroStage::new(zero).expect("a stage"),
            adamw: Some(AdamWConfig { lr: 1e-2, ..AdamWConfig::default() }),
            ..TrainConfig::default()
        };
        Run { model, strategy, dp, plan, n: 32, b: 2, steps: 3 }
    }

    pub fn checkpointing(mut self, c: Checkpointing) -> Run {
        self.plan.checkpointing = c;
        self
    }

    /// The same run on one device: the data-parallel replicas become micro-batches.
    pub fn single(&self) -> Run {
        let mut one = self.clone();
        one.strategy = StrategyConfig::Single;
        one.dp = 1;
        one.plan.grad_accum = self.plan.grad_accum * self.dp;
        one.plan.zero = ZeroStage::NONE;
        one
    }
}

/// The global tokens of micro-batch `index` (= replica x grad_accum + micro-batch) of `step`.
///
/// # Shapes
/// `-> [b, n]` i64.
pub fn tokens(step: usize, index: usize, b: i64, n: i64, vocab: i64) -> Tensor {
    let i = Tensor::arange(b * n, (Kind::Int64, Device::Cpu));
    let mixed = &i * 7919 + 17 + (step as i64) * 131 + (index as i64) * 1009 + (&i * &i).remainder(13);
    mixed.remainder(vocab).reshape([b, n])
}

/// A trainer for `run` on this rank of `world`.
pub fn trainer(world: &Group, run: &Run) -> Result<Trainer> {
    let sp = world.size() / run.dp;
    let mesh = Mesh::new(world, MeshShape::dp_sp(run.dp, sp)?)?;
    let groups = TrainGroups::new(&mesh)?;
    let attention = AttentionConfig::new(Kernel::Sdpa, Mask::Causal);
    let strategy =
        run.strategy.build(mesh.group("sp")?, attention, run.n, run.model.n_head, run.model.n_kv_head)?;
    let model = Gpt::new(&run.model, strategy, run.plan.precision.kind(), Device::Cpu)?;
    Ok(Trainer::new(model, groups, run.plan.clone())?)
}

/// This rank's micro-batches of `step`.
pub fn batches(t: &Trainer, run: &Run, step: usize) -> Result<Vec<Shard>> {
    let layout = t.model().strategy().layout().clone();
    let (replica, k) = (t.groups().dp.rank(), run.plan.grad_accum);
    let sp_rank = t.model().strategy().rank();
    (0..k)
        .map(|m| {
            Ok(shard(&tokens(step, replica * k + m, run.b, run.n, run.model.vocab_size), &layout, sp_rank)?)
        })
        .collect()
}

/// Trains `run` from step `from` to `to` on `t`; returns the losses.
pub fn steps(t: &mut Trainer, run: &Run, from: usize, to: usize) -> Result<Vec<f64>> {
    (from..to).map(|s| Ok(t.step(&batches(t, run, s)?)?.loss)).collect()
}

/// Named parameters, as `Trainer::parameters` gives them.
pub type Named = Vec<(String, Tensor)>;

/// Trains `run` on this rank of `world`: the losses (averaged over the data-parallel
/// replicas), and the parameters at the end.
pub fn train(world: &Group, run: &Run) -> Result<(Vec<f64>, Named)> {
    let mut t = trainer(world, run)?;
    let losses = steps(&mut t, run, 0, run.steps)?;
    let mean = t.groups().dp.all_reduce(&Tensor::from_slice(&losses), ReduceOp::Avg)?;
    Ok((Vec::<f64>::try_from(mean)?, t.parameters()?))
}

/// This rank's part of a full parameter: all of it, or its tensor-parallel slice.
pub fn part_of(full: &Tensor, placement: &Placement) -> Tensor {
    match placement {
        Placement::Replicated => full.shallow_clone(),
        Placement::Sharded { dim, index } => full.index_select(*dim, &Tensor::from_slice(index)),
    }
}
