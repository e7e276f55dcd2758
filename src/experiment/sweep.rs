//! What a config's fields stand for, parsed into the library's types (the model, strategies,
//! kernel and mask, precision, output folder), each error naming its field; and the points of the
//! sweep, in order.

use std::path::PathBuf;

use tch::Kind;

use super::config::{field_error, ExperimentConfig, Packing, Point};
use crate::attention::{AttentionConfig, Kernel, Mask, StrategyConfig};
use crate::model::GptConfig;
use crate::train::{Precision, ZeroStage};
use crate::Result;

impl ExperimentConfig {
    /// The model: the preset with the overrides applied.
    pub fn gpt(&self) -> Result<GptConfig> {
        let m = &self.model;
        let mut c = GptConfig::preset(&m.preset).map_err(|e| field_error("model.preset", e.to_string()))?;
        c.vocab_size = m.vocab_size.unwrap_or(c.vocab_size);
        c.n_layer = m.n_layer.unwrap_or(c.n_layer);
        c.n_head = m.n_head.unwrap_or(c.n_head);
        c.n_kv_head = m.n_kv_head.unwrap_or(c.n_kv_head);
        c.n_embd = m.n_embd.unwrap_or(c.n_embd);
        c.mlp_ratio = m.mlp_ratio.unwrap_or(c.mlp_ratio);
        c.ffn_hidden = m.ffn_hidden.or(c.ffn_hidden);
        c.mlp = m.mlp.unwrap_or(c.mlp);
        c.norm = m.norm.unwrap_or(c.norm);
        c.rope_theta = m.rope_theta.unwrap_or(c.rope_theta);
        c.tie_embeddings = m.tie_embeddings.unwrap_or(c.tie_embeddings);
        c.bias = m.bias.unwrap_or(c.bias);
        c.seed = m.seed.unwrap_or(c.seed);
        c.validate().map_err(|e| field_error("model", e.to_string()))?;
        Ok(c)
    }

    /// The strategies, parsed.
    pub fn strategies(&self) -> Result<Vec<StrategyConfig>> {
        self.parallel
            .strategies
            .iter()
            .enumerate()
            .map(|(i, s)| s.parse().map_err(|e: String| field_error(&format!("parallel.strategies[{i}]"), e)))
            .collect()
    }

    /// The kernel and mask.
    pub fn attention(&self) -> Result<AttentionConfig> {
        let kernel: Kernel = self.attention.kernel.parse().map_err(|e| field_error("attention.kernel", e))?;
        let mask: Mask = self.attention.mask.parse().map_err(|e| field_error("attention.mask", e))?;
        let cfg = AttentionConfig::new(kernel, mask);
        cfg.build().map_err(|e| field_error("attention", e.to_string()))?;
        Ok(cfg)
    }

    /// The dtype of parameters and activations.
    pub fn kind(&self) -> Result<Kind> {
        Ok(self.precision()?.kind())
    }

    /// The numeric precision (`train.dtype`).
    pub fn precision(&self) -> Result<Precision> {
        self.train.dtype.parse().map_err(|e| field_error("train.dtype", e))
    }

    /// Where results go.
    pub fn output_dir(&self) -> PathBuf {
        self.output.clone().unwrap_or_else(|| PathBuf::from("results").join(&self.name))
    }

    /// Every point of the sweep, in order: the single-device reference (if asked for), then
    /// world sizes, strategies, ZeRO stages and lengths.
    pub fn points(&self) -> Result<Vec<Point>> {
        let strategies = self.strategies()?;
        let (dp, k) = (self.parallel.dp, self.train.grad_accum);
        let mut points = Vec::new();
        if self.parallel.reference {
            for &seq in &self.train.seq {
                let (strategy, zero) = (StrategyConfig::Single, ZeroStage::NONE);
                for &packing in &self.train.packing {
                    points.push(Point {
                        index: points.len(),
                        strategy,
                        ranks: 1,
                        seq,
                        dp: 1,
                        zero,
                        grad_accum: dp * k,
                        packing,
                        balanced: false,
                    });
                }
            }
        }
        for &ranks in &self.parallel.ranks {
            for &strategy in &strategies {
                for &zero in &self.train.zero {
                    for &seq in &self.train.seq {
                        for &packing in &self.train.packing {
                            points.push(Point {
                                index: points.len(),
                                strategy,
                                ranks,
                                seq,
                                dp,
                                zero,
                                grad_accum: k,
                                packing,
                                balanced: self.train.balance
                                    && packing != Packing::None
                                    && matches!(strategy, StrategyConfig::Ring { .. }),
                            });
                        }
                    }
                }
            }
        }
        Ok(points)
    }
}
