//! The step loop: micro-batches forward and backward, the gradient reduction of the ZeRO stage,
//! the global gradient norm (clipping, non-finite checks, loss scaling), the schedule and the
//! optimizer over this rank's partitions.
//!
//! The gradient the optimizer sees is `G / (DP k S)`, with G the sum over all SP x DP ranks
//! (replicated parameters) or over DP (tensor-parallel shards), k the micro-batches and S the
//! loss scale: summed over SP (each rank's loss term is its tokens' share of the token-weighted
//! mean), averaged over DP and micro-batches. Clipping multiplies it by
//! `min(1, clip / (norm + 1e-6))` (PyTorch's `clip_grad_norm_`).

use std::rc::Rc;

use tch::Tensor;

use super::config::{LossScaler, TrainConfig};
use super::update::{sources, state_kind, UnitState};
use super::zero::Zero;
use super::{Checkpointing, Precision};
use crate::autograd::Tape;
use crate::comm::{Group, Mesh, ReduceOp};
use crate::data::Shard;
use crate::error::TorchResultExt;
use crate::model::{BlockHooks, ForwardOptions, Gpt, Loss, Unit};
use crate::{Error, Result};

/// Elements the optimizer and the norm computation handle at a time: their temporaries (a few
/// f32 copies of a chunk) stay at a few MiB whatever the model size.
const OPTIMIZER_CHUNK: i64 = 1 << 20;

/// The groups a trainer reduces over: all SP x DP ranks (ZeRO), the DP replicas (the
/// tensor-parallel shards), and a group of the same ranks for the step's statistics (so that
/// the ZeRO group's byte counters hold ZeRO traffic only).
#[derive(Debug, Clone)]
pub struct TrainGroups {
    pub zero: Group,
    pub dp: Group,
    pub stats: Group,
}

impl TrainGroups {
    /// From a mesh with axes "dp" and "sp" (outermost first). Collective: every rank calls it.
    pub fn new(mesh: &Mesh) -> Result<TrainGroups> {
        let zero = mesh.subgroup(&["dp", "sp"])?;
        let dp = mesh.group("dp")?.clone();
        let stats = zero.split("stats", Some(0), zero.rank())?.ok_or_else(|| Error::InvalidArgument {
            op: "trainer",
            group: zero.info().to_string(),
            msg: "no statistics group".into(),
        })?;
        Ok(TrainGroups { zero, dp, stats })
    }
}

/// What one optimizer step did.
#[derive(Debug, Clone, PartialEq)]
pub struct StepReport {
    /// The step's index (from 0; skipped steps count).
    pub step: u64,
    /// The global mean loss of this rank's data-parallel replica, averaged over micro-batches.
    pub loss: f64,
    /// The global gradient norm before clipping.
    pub grad_norm: f64,
    /// The learning rate of the update (0 without an optimizer).
    pub lr: f64,
    /// The loss scale used (1 unless f16).
    pub loss_scale: f64,
    /// Why the step was skipped (f16 overflow), if it was.
    pub skipped: Option<String>,
}

/// A model with its ZeRO layout and optimizer, stepping on micro-batches.
pub struct Trainer {
    pub(super) model: Gpt,
    pub(super) cfg: TrainConfig,
    pub(super) zero: Rc<Zero>,
    pub(super) groups: TrainGroups,
    /// Per unit of `zero.units`, then the tensor-parallel unit if any.
    pub(super) states: Vec<UnitState>,
    /// Steps taken (skipped ones included): the next step's index.
    pub(super) step: u64,
    /// Updates applied (Adam's t and the schedule's step).
    pub(super) updates: u64,
    pub(super) scaler: Option<LossScaler>,
}

impl Trainer {
    /// Lays `model` out for the plan's ZeRO stage over `groups` and builds the optimizer state.
    /// The model's parameters must already be in the plan's precision.
    pub fn new(mut model: Gpt, groups: TrainGroups, cfg: TrainConfig) -> Result<Trainer> {
        cfg.validate()?;
        let kind = model.params().all().first().map(|p| p.tensor.kind());
        if kind.is_some_and(|k| k != cfg.precision.kind()) {
            return Err(Error::InvalidArgument {
                op: "trainer",
                group: groups.zero.info().to_string(),
                msg: format!(
                    "the model's parameters are {kind:?} but the precision is {} ({:?}); build the \
                     model with Precision::kind()",
                    cfg.precision.name(),
                    cfg.precision.kind()
                ),
            });
        }
        model.set_options(ForwardOptions {
            recompute_blocks: cfg.checkpointing == Checkpointing::Full,
            recompute_attention: cfg.checkpointing == Checkpointing::Selective,
            loss_tile: cfg.loss_tile,
            mlp_tile: cfg.mlp_tile,
        });
        if let Some(target) = &cfg.offload {
            let device = model.params().all().first().map_or(tch::Device::Cpu, |p| p.tensor.device());
            model.set_offload(Some(crate::model::Offload::new(target.clone(), device)?));
        }
        let reduce = cfg.reduce_dtype.map(Precision::kind);
        let zero = Rc::new(Zero::new(&model, cfg.zero, &groups.zero, &groups.dp, cfg.bucket_elems, reduce)?);
        if zero.needs_hooks() {
            model.set_hooks(Some(Rc::clone(&zero) as Rc<dyn BlockHooks>));
        }
        let mut states = Vec::new();
        if cfg.adamw.is_some() {
            let r = groups.zero.rank();
            let unit_ids = (0..zero.units.len()).map(Some).chain(zero.tp.as_ref().map(|_| None));
            for k in unit_ids {
                let src = sources(&zero, k)?;
                let range = match k {
                    Some(_) if cfg.zero.partitions_optimizer() => src.unit.part(r),
                    _ => (0, src.unit.padded),
                };
                let store =
                    src.store.0.f_narrow(0, range.0 - src.store.1, range.1 - range.0).op("trainer")?;
                states.push(UnitState::new(range, &store, cfg.precision)?);
            }
        }
        let scaler = (cfg.precision == Precision::F16).then(|| LossScaler::new(&cfg.loss_scale));
        Ok(Trainer { model, cfg, zero, groups, states, step: 0, updates: 0, scaler })
    }

    /// Calls `observer` at every unit boundary of the steps to come, after ZeRO's hooks if it
    /// has any (a [`MemoryTimeline`](super::MemoryTimeline)'s [`PhaseMarker`](super::PhaseMarker),
    /// or any other [`BlockHooks`]). It sees the forward and backward of each block and of the
    /// outer unit; it changes no numbers and sends nothing.
    pub fn observe(&mut self, observer: Rc<dyn BlockHooks>) {
        let hooks: Rc<dyn BlockHooks> = if self.zero.needs_hooks() {
            Rc::new(Chained { first: Rc::clone(&self.zero) as Rc<dyn BlockHooks>, then: observer })
        } else {
            observer
        };
        self.model.set_hooks(Some(hooks));
    }

    pub fn model(&self) -> &Gpt {
        &self.model
    }

    pub fn config(&self) -> &TrainConfig {
        &self.cfg
    }

    pub fn groups(&self) -> &TrainGroups {
        &self.groups
    }

    /// The flat buffers and partitions.
    pub fn zero(&self) -> &Zero {
        &self.zero
    }

    /// Changes how activations are kept from the next step on.
    pub fn set_checkpointing(&mut self, checkpointing: Checkpointing) {
        self.cfg.checkpointing = checkpointing;
        let mut options = self.model.options();
        options.recompute_blocks = checkpointing == Checkpointing::Full;
        options.recompute_attention = checkpointing == Checkpointing::Selective;
        self.model.set_options(options);
    }

    /// The index of the next step (steps taken so far).
    pub fn steps_taken(&self) -> u64 {
        self.step
    }

    /// One optimizer step over `batches`, one micro-batch per entry (`grad_accum` of them):
    /// this rank's tokens and globally shifted labels. Every rank calls it.
    pub fn step(&mut self, batches: &[Shard]) -> Result<StepReport> {
        if batches.len() != self.cfg.grad_accum {
            return Err(self.invalid(format!(
                "step {} got {} micro-batches; grad_accum is {}",
                self.step,
                batches.len(),
                self.cfg.grad_accum
            )));
        }
        self.zero_grads()?;
        let scale = self.scaler.map_or(1.0, |s| s.scale);
        let mut loss = 0.0;
        for (m, b) in batches.iter().enumerate() {
            let tape = Tape::new();
            let l = self.model.loss_packed(&tape, &b.tokens, &b.labels, b.docs.as_ref())?;
            loss += l.value / batches.len() as f64;
            let scaled =
                Loss { local: l.local.f_mul_scalar(scale).op("trainer")?, value: l.value, tokens: l.tokens };
            if m + 1 == batches.len() {
                // Stages 0-1 with overlap: this backward starts each gradient bucket's reduction
                // as soon as its gradients are final.
                self.zero.start_overlap()?;
            }
            self.model.backward(&tape, &scaled)?;
        }
        if self.cfg.zero.partitions_gradients() {
            self.zero.reduce_tp()?;
        } else {
            self.zero.all_reduce()?;
        }
        let denominator = (self.groups.dp.size() * self.cfg.grad_accum) as f64 * scale;
        let (sum_squares, bad) = self.gradient_stats()?;
        let norm = sum_squares.sqrt() / denominator;
        let mut report =
            StepReport { step: self.step, loss, grad_norm: norm, lr: 0.0, loss_scale: scale, skipped: None };
        if let Some((name, count)) = bad {
            let what = format!(
                "step {}: the gradient of {name} is not finite (NaN or Inf; {count} non-finite piece(s) over the ranks; \
                 loss {loss})",
                self.step
            );
            let Some(scaler) = self.scaler.as_mut() else { return Err(self.invalid(what)) };
            scaler.update(&self.cfg.loss_scale, true);
            report.skipped = Some(format!(
                "{what}: f16 overflow at loss scale {scale}, step skipped, scale now {}",
                scaler.scale
            ));
            self.step += 1;
            return Ok(report);
        }
        let clip = self.cfg.clip.map_or(1.0, |c| (c / (norm + 1e-6)).min(1.0));
        if let Some(adamw) = self.cfg.adamw {
            report.lr = adamw.lr * self.cfg.schedule.factor(self.updates);
            self.updates += 1;
            let t = i32::try_from(self.updates)
                .map_err(|_| self.invalid("too many steps for Adam's t".into()))?;
            let params = self.model.params().shallow();
            for (i, state) in self.states.iter_mut().enumerate() {
                let k = (i < self.zero.units.len()).then_some(i);
                sources(&self.zero, k)?.update(
                    &params,
                    state,
                    &adamw,
                    (t, report.lr, clip / denominator),
                    self.cfg.bucket_elems.min(OPTIMIZER_CHUNK),
                )?;
            }
            if self.cfg.zero.partitions_optimizer() && !self.cfg.zero.partitions_parameters() {
                self.zero.gather_updated()?;
            }
        }
        if let Some(scaler) = self.scaler.as_mut() {
            scaler.update(&self.cfg.loss_scale, false);
        }
        self.step += 1;
        Ok(report)
    }

    /// Gradients (and stage 2-3 partition gradients) back to zero.
    fn zero_grads(&self) -> Result<()> {
        self.model.zero_grad();
        for g in self.zero.grads.iter().flatten() {
            let _ = g.shallow_clone().f_zero_().op("trainer")?;
        }
        Ok(())
    }

    /// The sum of squares of the whole gradient (each element counted on one rank: its ZeRO
    /// partition, the shards on DP rank 0), and the first parameter whose gradient is not
    /// finite with how many are not, all-reduced over every rank.
    fn gradient_stats(&self) -> Result<(f64, Option<(String, usize)>)> {
        let params = self.model.params().shallow();
        let chunk = self.cfg.bucket_elems.min(OPTIMIZER_CHUNK);
        let r = self.groups.zero.rank();
        let mut parts = Vec::new();
        for k in 0..self.zero.units.len() {
            let src = sources(&self.zero, Some(k))?;
            parts.extend(src.sum_squares(&params, src.unit.part(r), chunk)?);
        }
        if let (Some(tp), 0) = (&self.zero.tp, self.groups.dp.rank()) {
            parts.extend(sources(&self.zero, None)?.sum_squares(&params, (0, tp.padded), chunk)?);
        }
        let bad: Vec<usize> = parts.iter().filter(|(_, s)| !s.is_finite()).map(|(i, _)| *i).collect();
        let finite: f64 = parts.iter().filter(|(_, s)| s.is_finite()).map(|(_, s)| s).sum();
        let mine = Tensor::from_slice(&[finite, bad.len() as f64]);
        let all = Vec::<f64>::try_from(self.groups.stats.all_reduce(&mine, ReduceOp::Sum)?).op("trainer")?;
        if all[1] == 0.0 {
            return Ok((all[0], None));
        }
        // The first offending parameter over every rank: the largest of -index.
        let first = bad.iter().min().map_or(f64::MIN, |&i| -(i as f64));
        let first =
            self.groups.stats.all_reduce(&Tensor::from_slice(&[first]), ReduceOp::Max)?.double_value(&[0]);
        let index = (-first) as usize;
        let name = params.all().get(index).map_or_else(|| format!("parameter {index}"), |p| p.name.clone());
        let unit = self.model.unit(index).name();
        Ok((f64::INFINITY, Some((format!("{name} ({unit})"), all[1] as usize))))
    }

    /// Copies of every parameter's values, named, in the model's order (this rank's slices of
    /// tensor-parallel shards). Under ZeRO-3 each unit is gathered and freed again, so every
    /// rank must call it.
    pub fn parameters(&self) -> Result<Vec<(String, Tensor)>> {
        let _no_grad = tch::no_grad_guard();
        let stage3 = self.cfg.zero.partitions_parameters();
        let mut out: Vec<Option<Tensor>> = self.model.params().all().iter().map(|_| None).collect();
        let params = self.model.params().all();
        for (k, unit) in self.zero.units.iter().enumerate() {
            if stage3 {
                self.zero.gather(k)?;
            }
            for e in &unit.entries {
                out[e.param] = Some(params[e.param].tensor.f_detach_copy().op("parameters")?);
            }
            if stage3 {
                unit.release()?;
            }
        }
        params
            .iter()
            .zip(out)
            .map(|(p, t)| {
                Ok((
                    p.name.clone(),
                    match t {
                        Some(t) => t,
                        None => p.tensor.f_detach_copy().op("parameters")?,
                    },
                ))
            })
            .collect()
    }

    /// The loss of one batch without a backward or an update (evaluation). Every rank calls it.
    pub fn eval_loss(&self, batch: &Shard) -> Result<f64> {
        let _no_grad = tch::no_grad_guard();
        let tape = Tape::new();
        let loss = self.model.loss_packed(&tape, &batch.tokens, &batch.labels, batch.docs.as_ref())?;
        tape.clear();
        Ok(loss.value)
    }

    fn invalid(&self, msg: String) -> Error {
        Error::InvalidArgument { op: "train_step", group: self.groups.zero.info().to_string(), msg }
    }

    /// The dtype of master weights and moments.
    pub fn state_kind(&self) -> tch::Kind {
        state_kind(self.cfg.precision)
    }
}

/// Two sets of hooks called one after the other (ZeRO's, then an observer's).
struct Chained {
    first: Rc<dyn BlockHooks>,
    then: Rc<dyn BlockHooks>,
}

impl BlockHooks for Chained {
    fn before_forward(&self, unit: Unit) -> Result<()> {
        self.first.before_forward(unit)?;
        self.then.before_forward(unit)
    }

    fn after_forward(&self, unit: Unit) -> Result<()> {
        self.first.after_forward(unit)?;
        self.then.after_forward(unit)
    }

    fn before_backward(&self, unit: Unit) -> Result<()> {
        self.first.before_backward(unit)?;
        self.then.before_backward(unit)
    }

    fn after_backward(&self, unit: Unit) -> Result<()> {
        self.first.after_backward(unit)?;
        self.then.after_backward(unit)
    }
}
