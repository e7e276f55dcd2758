//! The `[train]` fields that configure the step loop: from a config and a point to the
//! trainer's [`TrainConfig`], and their checks.

use serde::{de::Error as _, Deserialize, Deserializer};

use super::config::{ExperimentConfig, Point};
use crate::train::{TrainConfig, ZeroStage};
use crate::{Error, Result};

fn field_error(field: &str, msg: String) -> Error {
    Error::InvalidArgument { op: "experiment config", group: field.to_string(), msg }
}

/// `zero = 1` or `zero = [1, 2, 3]`.
pub(super) fn stages<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<Vec<ZeroStage>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(u8),
        Many(Vec<u8>),
    }
    let list = match OneOrMany::deserialize(d)? {
        OneOrMany::One(s) => vec![s],
        OneOrMany::Many(v) => v,
    };
    list.into_iter().map(|s| ZeroStage::new(s).map_err(|e| D::Error::custom(e.to_string()))).collect()
}

/// `packing = "packed"` or `packing = ["padded", "packed"]`.
pub(super) fn packings<'de, D: Deserializer<'de>>(
    d: D,
) -> std::result::Result<Vec<crate::experiment::config::Packing>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(crate::experiment::config::Packing),
        Many(Vec<crate::experiment::config::Packing>),
    }
    Ok(match OneOrMany::deserialize(d)? {
        OneOrMany::One(p) => vec![p],
        OneOrMany::Many(v) => v,
    })
}

impl ExperimentConfig {
    /// `[train] offload`, parsed: none, host memory, or files under `offload_dir`.
    pub fn offload(&self) -> Result<Option<crate::model::OffloadTarget>> {
        self.offload_target("train.offload", self.train.offload.as_deref())
    }

    /// `[train] offload_kv`, parsed as `offload` is (the same `offload_dir`).
    pub fn offload_kv(&self) -> Result<Option<crate::model::OffloadTarget>> {
        self.offload_target("train.offload_kv", self.train.offload_kv.as_deref())
    }

    fn offload_target(
        &self,
        field: &'static str,
        value: Option<&str>,
    ) -> Result<Option<crate::model::OffloadTarget>> {
        use crate::model::OffloadTarget;
        match value {
            None | Some("none") => Ok(None),
            Some("host") => Ok(Some(OffloadTarget::Host)),
            Some("disk") => Ok(Some(OffloadTarget::Disk(
                self.train.offload_dir.clone().unwrap_or_else(std::env::temp_dir),
            ))),
            Some(other) => Err(field_error(field, format!("{other:?}: it must be none, host or disk"))),
        }
    }

    /// The store chunked Ulysses keeps `point`'s K/V in, for a model on `device`: one per rank,
    /// for the points whose strategy is chunked Ulysses, when `[train] offload_kv` asks.
    pub fn kv_store(&self, point: &Point, device: tch::Device) -> Result<Option<crate::model::Offload>> {
        match (self.offload_kv()?, point.strategy) {
            (Some(target), crate::attention::StrategyConfig::UlyssesChunked { .. }) => {
                Ok(Some(crate::model::Offload::new(target, device)?))
            }
            _ => Ok(None),
        }
    }

    /// The trainer's plan for `point`.
    pub fn train_config(&self, point: &Point) -> Result<TrainConfig> {
        let t = &self.train;
        let mut schedule = t.schedule;
        schedule.total = schedule.total.or(Some((t.warmup + t.steps) as u64));
        let cfg = TrainConfig {
            precision: self.precision()?,
            zero: point.zero,
            checkpointing: t.checkpointing,
            grad_accum: point.grad_accum,
            clip: t.clip,
            adamw: t.adamw,
            schedule,
            loss_scale: t.loss_scale,
            loss_tile: t.loss_tile,
            mlp_tile: t.mlp_tile,
            offload: self.offload()?,
            reduce_dtype: t.reduce_dtype,
            ..TrainConfig::default()
        };
        cfg.validate().map_err(|e| field_error("train", e.to_string()))?;
        Ok(cfg)
    }

    /// Checks the step-loop fields of `[train]`, naming the field.
    pub(super) fn validate_training(&self) -> Result<()> {
        let t = &self.train;
        if t.zero.is_empty() {
            return Err(field_error("train.zero", "list at least one ZeRO stage, e.g. [1, 2, 3]".into()));
        }
        if let Some(z) = t.zero.iter().find(|z| z.partitions_optimizer()) {
            if t.adamw.is_none() {
                return Err(field_error(
                    "train.zero",
                    format!(
                        "ZeRO stage {} partitions the optimizer states; it needs [train.adamw]",
                        z.stage()
                    ),
                ));
            }
        }
        if t.grad_accum == 0 {
            return Err(field_error("train.grad_accum", "must be at least 1".into()));
        }
        if t.balance && t.packing.iter().all(|p| *p == super::config::Packing::None) {
            return Err(field_error(
                "train.balance",
                "balances packed documents over a ring's ranks; set train.packing to packed or padded".into(),
            ));
        }
        if t.checkpoint_every == Some(0) {
            return Err(field_error("train.checkpoint_every", "must be at least 1 (or left out)".into()));
        }
        if let Some(c) = t.clip {
            if !(c > 0.0 && c.is_finite()) {
                return Err(field_error("train.clip", format!("{c} must be a positive number")));
            }
        }
        if let Some(tile) = t.loss_tile {
            if tile < 1 {
                return Err(field_error("train.loss_tile", format!("{tile} must be at least 1")));
            }
        }
        if let Some(tile) = t.mlp_tile {
            if tile < 1 {
                return Err(field_error(
                    "train.mlp_tile",
                    format!("an MLP tile of {tile} tokens: it must be at least 1"),
                ));
            }
        }
        use crate::model::OffloadTarget;
        let targets = [
            ("train.offload", "the activations", self.offload()?),
            ("train.offload_kv", "the K/V", self.offload_kv()?),
        ];
        // The folder both write under (`offload_dir`): a store made and dropped, so that it is
        // there and takes a folder of ours, now, before any point runs.
        if let Some(dir) = targets.iter().find_map(|(_, _, t)| match t {
            Some(OffloadTarget::Disk(dir)) => Some(dir.clone()),
            _ => None,
        }) {
            crate::model::Offload::new(OffloadTarget::Disk(dir), tch::Device::Cpu)
                .map_err(|e| field_error("train.offload_dir", e.to_string()))?;
        }
        for (field, what, target) in &targets {
            if *target == Some(OffloadTarget::Host) && self.parallel.device != "cuda" {
                return Err(field_error(
                    field,
                    format!(
                        "\"host\" on device {:?}: {what} are in host memory already (\"disk\" moves them to files)",
                        self.parallel.device
                    ),
                ));
            }
        }
        let chunked =
            |p: &Point| matches!(p.strategy, crate::attention::StrategyConfig::UlyssesChunked { .. });
        if targets[1].2.is_some() && !self.points()?.iter().any(chunked) {
            return Err(field_error(
                "train.offload_kv",
                "keeps chunked Ulysses' K/V off the device, and no point runs ulysses_chunked:U".into(),
            ));
        }
        for point in self.points()? {
            self.train_config(&point)?;
            if let Some(tile) = t.mlp_tile {
                let sp = point.ranks / point.dp;
                if point.strategy == crate::attention::StrategyConfig::MegatronSp {
                    return Err(field_error(
                        "train.mlp_tile",
                        format!(
                            "point {} ({}): a tiled MLP with megatron_sp, whose MLP runs on the \
                             all-gathered sequence between two collectives",
                            point.index,
                            point.label()
                        ),
                    ));
                }
                crate::model::check_mlp_tile(tile, point.seq / sp as i64).map_err(|e| {
                    field_error("train.mlp_tile", format!("point {} ({}): {e}", point.index, point.label()))
                })?;
            }
        }
        Ok(())
    }
}
