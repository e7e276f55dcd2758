//! AdamW (Loshchilov and Hutter 2019): Adam with decoupled weight decay, the optimizer of GPT
//! training. Weight decay on matrices only (not biases, LayerNorms).

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use crate::error::TorchResultExt;
use crate::model::Params;
use crate::{Error, Result};

/// AdamW's hyper-parameters (defaults: GPT-3's, Brown et al. 2020).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdamWConfig {
    /// Learning rate. Default 3e-4.
    pub lr: f64,
    /// First-moment decay. Default 0.9.
    pub beta1: f64,
    /// Second-moment decay. Default 0.95.
    pub beta2: f64,
    /// Added to the square root of the second moment. Default 1e-8.
    pub eps: f64,
    /// Decoupled weight decay on matrices. Default 0.1.
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig { lr: 3e-4, beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1 }
    }
}

/// Checks AdamW's hyper-parameters.
pub(crate) fn check(cfg: &AdamWConfig) -> Result<()> {
    let positive = |x: f64| x > 0.0 && x.is_finite();
    let bad = |msg: String| Error::InvalidArgument { op: "adamw", group: "-".into(), msg };
    if !(positive(cfg.lr)
        && positive(cfg.eps)
        && (0.0..1.0).contains(&cfg.beta1)
        && (0.0..1.0).contains(&cfg.beta2))
    {
        return Err(bad(format!(
            "lr {} and eps {} must be positive and finite and the betas in [0, 1): {cfg:?}",
            cfg.lr, cfg.eps
        )));
    }
    if !(cfg.weight_decay >= 0.0 && cfg.weight_decay.is_finite()) {
        // A negative decay grows every matrix a little each step: a run that diverges slowly.
        return Err(bad(format!("weight_decay {} must be zero or positive and finite", cfg.weight_decay)));
    }
    Ok(())
}

/// One AdamW update of `w` in place from the gradient `g`, with moments `m` and `v` (all of one
/// dtype and shape), at step `t` (from 1) and learning rate `lr`:
///
/// `m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2;
///  w -= lr (m / (1 - b1^t) / (sqrt(v / (1 - b2^t)) + eps) + decay w)`
///
/// with `decay` the weight decay, or 0 for parameters without it. Elementwise, so an update of
/// a flat buffer in pieces gives the same bits as one of the whole.
pub(crate) fn update(
    w: &mut Tensor,
    g: &Tensor,
    (m, v): (&mut Tensor, &mut Tensor),
    c: &AdamWConfig,
    (t, lr): (i32, f64),
    decay: bool,
) -> Result<(), tch::TchError> {
    let (bias1, bias2) = (1.0 - c.beta1.powi(t), 1.0 - c.beta2.powi(t));
    let _ = m.f_mul_scalar_(c.beta1)?.f_add_(&g.f_mul_scalar(1.0 - c.beta1)?)?;
    let _ = v.f_mul_scalar_(c.beta2)?.f_add_(&g.f_square()?.f_mul_scalar(1.0 - c.beta2)?)?;
    let denom = v.f_div_scalar(bias2)?.f_sqrt()?.f_add_scalar(c.eps)?;
    let mut step = m.f_div_scalar(bias1)?.f_div(&denom)?;
    if decay && c.weight_decay > 0.0 {
        step = step.f_add(&w.f_mul_scalar(c.weight_decay)?)?;
    }
    let _ = w.f_sub_(&step.f_mul_scalar(lr)?)?;
    Ok(())
}

/// AdamW over a model's parameters, each rank updating the parameters it holds (the simple
/// per-parameter form; [`Trainer`](super::Trainer) updates flat ZeRO partitions with the same
/// [`update`]).
pub struct AdamW {
    cfg: AdamWConfig,
    step: i32,
    /// (first moment, second moment) per parameter, f32.
    moments: Vec<(Tensor, Tensor)>,
}

impl AdamW {
    pub fn new(params: &Params, cfg: AdamWConfig) -> Result<AdamW> {
        check(&cfg)?;
        let zeros = |t: &Tensor| t.f_zeros_like().and_then(|z| z.f_to_kind(Kind::Float)).op("adamw");
        let moments = params.iter().map(|(_, p)| Ok((zeros(p)?, zeros(p)?))).collect::<Result<_>>()?;
        Ok(AdamW { cfg, step: 0, moments })
    }

    /// One update from the parameters' current gradients (weight decay on matrices only).
    pub fn step(&mut self, params: &Params) -> Result<()> {
        let _no_grad = tch::no_grad_guard();
        self.step += 1;
        for ((name, p), (m, v)) in params.iter().zip(&mut self.moments) {
            let g = p.grad();
            if !g.defined() {
                return Err(Error::Tape { op: "adamw", msg: format!("parameter {name} has no gradient") });
            }
            let mut run = || -> Result<(), tch::TchError> {
                let mut w = p.f_to_kind(Kind::Float)?;
                update(
                    &mut w,
                    &g.f_to_kind(Kind::Float)?,
                    (m, v),
                    &self.cfg,
                    (self.step, self.cfg.lr),
                    p.dim() >= 2,
                )?;
                p.shallow_clone().f_copy_(&w)
            };
            run().op("adamw")?;
        }
        Ok(())
    }
}
