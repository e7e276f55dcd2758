//! What a training step does besides the model: precision, ZeRO stage, activation
//! checkpointing, gradient accumulation and clipping, the learning-rate schedule, loss scaling.

use serde::{Deserialize, Serialize};

use super::{AdamWConfig, Checkpointing, Precision, ZeroStage};
use crate::comm::DEFAULT_BUCKET_ELEMS;
use crate::{Error, Result};

/// A training run's plan. Every field has a default; `adamw: None` runs forward, backward and
/// the gradient reduction only (throughput runs).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    /// Parameter, activation and gradient dtype; bf16 and f16 keep f32 master weights.
    /// Default f32.
    pub precision: Precision,
    /// ZeRO stage over all SP x DP ranks. Default 0.
    pub zero: ZeroStage,
    /// Activation checkpointing per block. Default none.
    pub checkpointing: Checkpointing,
    /// Micro-batches per optimizer step. Default 1.
    pub grad_accum: usize,
    /// Largest global gradient norm (L2 over every parameter, each counted once); gradients
    /// are scaled down to it. Default none.
    pub clip: Option<f64>,
    /// The optimizer; `None`: no update. Default none.
    pub adamw: Option<AdamWConfig>,
    /// Learning rate over the steps (multiplies `adamw.lr`). Default constant.
    pub schedule: Schedule,
    /// Dynamic loss scaling (f16 only). Default: DeepSpeed's.
    pub loss_scale: LossScaleConfig,
    /// Elements per gradient-reduction bucket. Default 2^22 (16 MiB in f32).
    pub bucket_elems: i64,
    /// The dtype gradients are reduced in across ranks (what travels and what is summed).
    /// Default none: f32 for half-precision gradients (converted first, as DeepSpeed reduces
    /// them under sequence parallelism), else the gradients' own dtype. `bf16` halves the bytes
    /// of a mixed-precision run's reduction at the cost of bf16 rounding in the sum; on NCCL
    /// the sum then runs in bf16 too.
    pub reduce_dtype: Option<Precision>,
    /// Compute the loss this many tokens at a time (tiled loss). Default none (all at once).
    pub loss_tile: Option<i64>,
    /// Run each block's MLP this many tokens at a time (tiled MLP). Default none.
    pub mlp_tile: Option<i64>,
    /// Move each block's input (what full checkpointing keeps) off the device between its
    /// forward and its backward: to pinned host memory (a GPU run) or to files. Needs full
    /// checkpointing. Default none.
    pub offload: Option<crate::model::OffloadTarget>,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            precision: Precision::F32,
            zero: ZeroStage::NONE,
            checkpointing: Checkpointing::None,
            grad_accum: 1,
            clip: None,
            adamw: None,
            schedule: Schedule::default(),
            loss_scale: LossScaleConfig::default(),
            bucket_elems: DEFAULT_BUCKET_ELEMS,
            reduce_dtype: None,
            loss_tile: None,
            mlp_tile: None,
            offload: None,
        }
    }
}

fn invalid(msg: String) -> Error {
    Error::InvalidArgument { op: "train config", group: "-".into(), msg }
}

impl TrainConfig {
    /// Checks that the numbers fit together, naming the field.
    pub fn validate(&self) -> Result<()> {
        if self.grad_accum == 0 {
            return Err(invalid("grad_accum must be at least 1".into()));
        }
        if let Some(c) = self.clip {
            if !(c > 0.0 && c.is_finite()) {
                return Err(invalid(format!("clip {c} must be a positive number")));
            }
        }
        if self.zero.partitions_optimizer() && self.adamw.is_none() {
            return Err(invalid(format!(
                "ZeRO stage {} partitions the optimizer: it needs an optimizer (adamw)",
                self.zero.stage()
            )));
        }
        if self.bucket_elems < 1 {
            return Err(invalid(format!("bucket_elems {} must be at least 1", self.bucket_elems)));
        }
        if let Some(t) = self.loss_tile {
            if t < 1 {
                return Err(invalid(format!("loss_tile {t} must be at least 1")));
            }
        }
        if self.offload.is_some() && self.checkpointing != Checkpointing::Full {
            return Err(invalid(format!(
                "offload moves the block inputs that full checkpointing keeps; checkpointing is {:?}",
                self.checkpointing
            )));
        }
        if let Some(t) = self.mlp_tile {
            if t < 1 {
                return Err(invalid(format!("mlp_tile {t} must be at least 1")));
            }
        }
        if let Some(a) = &self.adamw {
            super::optim::check(a)?;
        }
        self.schedule.validate()?;
        self.loss_scale.validate()
    }
}

/// How the learning rate decays after the warm-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Decay {
    /// Stay at the peak.
    #[default]
    Constant,
    /// Half a cosine from the peak down to `min_lr_ratio` of it (Loshchilov and Hutter 2017).
    Cosine,
    /// A straight line from the peak down to `min_lr_ratio` of it.
    Linear,
}

/// The learning-rate schedule as a multiple of the peak: a linear warm-up over `warmup`
/// steps, then `decay` until step `total`, then `min_lr_ratio`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Schedule {
    /// Warm-up steps (the factor rises as (t + 1) / warmup). Default 0.
    pub warmup: u64,
    /// The decay after the warm-up. Default constant.
    pub decay: Decay,
    /// Step at which the decay reaches its floor; `None`: the run's number of steps (filled
    /// in by the experiment runner). Default none.
    pub total: Option<u64>,
    /// The floor, as a fraction of the peak. Default 0.1.
    pub min_lr_ratio: f64,
}

impl Default for Schedule {
    fn default() -> Self {
        Schedule { warmup: 0, decay: Decay::Constant, total: None, min_lr_ratio: 0.1 }
    }
}

impl Schedule {
    /// The factor of the peak learning rate at optimizer step `t` (from 0).
    pub fn factor(&self, t: u64) -> f64 {
        if t < self.warmup {
            return (t + 1) as f64 / self.warmup as f64;
        }
        let total = self.total.unwrap_or(u64::MAX).max(self.warmup + 1);
        let progress = ((t - self.warmup) as f64 / (total - self.warmup) as f64).min(1.0);
        let floor = self.min_lr_ratio;
        match self.decay {
            Decay::Constant => 1.0,
            Decay::Cosine => floor + (1.0 - floor) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()),
            Decay::Linear => 1.0 - (1.0 - floor) * progress,
        }
    }

    fn validate(&self) -> Result<()> {
        if !(0.0..=1.0).contains(&self.min_lr_ratio) {
            return Err(invalid(format!("schedule.min_lr_ratio {} must be in [0, 1]", self.min_lr_ratio)));
        }
        if let Some(total) = self.total {
            if total <= self.warmup && self.decay != Decay::Constant {
                return Err(invalid(format!(
                    "schedule.total {total} must be above schedule.warmup {} for a decay",
                    self.warmup
                )));
            }
        }
        Ok(())
    }
}

/// Dynamic loss scaling for f16 (Micikevicius et al. 2018; DeepSpeed's defaults): the loss is
/// multiplied by `scale` before the backward; a step whose gradients overflow is skipped and the
/// scale multiplied by `backoff`; after `growth_interval` steps without overflow it is
/// multiplied by `growth`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LossScaleConfig {
    /// The first scale. Default 2^16.
    pub init: f64,
    /// Factor after an overflow. Default 0.5.
    pub backoff: f64,
    /// Factor after `growth_interval` good steps. Default 2.
    pub growth: f64,
    /// Good steps between growths. Default 1000.
    pub growth_interval: u64,
    /// The scale never goes below this. Default 1.
    pub min: f64,
}

impl Default for LossScaleConfig {
    fn default() -> Self {
        LossScaleConfig { init: 65536.0, backoff: 0.5, growth: 2.0, growth_interval: 1000, min: 1.0 }
    }
}

impl LossScaleConfig {
    fn validate(&self) -> Result<()> {
        let ok = self.init >= self.min
            && self.min > 0.0
            && self.backoff > 0.0
            && self.backoff < 1.0
            && self.growth >= 1.0
            && self.growth_interval >= 1;
        if ok {
            Ok(())
        } else {
            Err(invalid(format!(
                "loss_scale {self:?}: need init >= min > 0, backoff in (0, 1), growth >= 1, \
                 growth_interval >= 1"
            )))
        }
    }
}

/// The loss scale as it evolves (f16 runs); saved in checkpoints.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LossScaler {
    pub scale: f64,
    /// Steps without overflow since the last change.
    pub good_steps: u64,
    /// Steps skipped so far.
    pub skipped: u64,
}

impl LossScaler {
    pub fn new(cfg: &LossScaleConfig) -> LossScaler {
        LossScaler { scale: cfg.init, good_steps: 0, skipped: 0 }
    }

    /// After a step: back off on overflow, grow after enough good steps.
    pub fn update(&mut self, cfg: &LossScaleConfig, overflow: bool) {
        if overflow {
            self.scale = (self.scale * cfg.backoff).max(cfg.min);
            self.good_steps = 0;
            self.skipped += 1;
        } else {
            self.good_steps += 1;
            if self.good_steps >= cfg.growth_interval {
                self.scale *= cfg.growth;
                self.good_steps = 0;
            }
        }
    }
}
