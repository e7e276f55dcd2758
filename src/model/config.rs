//! The GPT configuration: every field documented, with presets from the paper's experiments.

use serde::{Deserialize, Serialize};

use crate::attention::Mask;
use crate::{Error, Result};

/// A decoder-only transformer: pre-norm blocks (norm, attention with RoPE, norm, MLP), a final
/// norm, and an output projection optionally tied to the token embedding.
///
/// Two families from the same fields: GPT (LayerNorm with a bias, tanh-GELU MLP of `mlp_ratio` h,
/// biases, tied embeddings; the paper's models) and Llama (RMSNorm, SwiGLU MLP of `ffn_hidden`,
/// grouped-query attention, no biases, untied embeddings, RoPE base 500000 for Llama 3): see
/// [`GptConfig::preset`]. Megatron-LM builds both the same way, from switches on one model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GptConfig {
    /// Vocabulary size V: token ids are `0..V`. Default 256 (bytes).
    pub vocab_size: i64,
    /// Transformer blocks L. Default 2.
    pub n_layer: i64,
    /// Attention (query) heads H. Default 4.
    pub n_head: i64,
    /// Key/value heads H_kv: H for multi-head attention, fewer for GQA, 1 for MQA. Default 4.
    pub n_kv_head: i64,
    /// Hidden size h = H * d. Default 64.
    pub n_embd: i64,
    /// MLP hidden size as a multiple of h, unless `ffn_hidden` is set. Default 4.
    pub mlp_ratio: i64,
    /// MLP hidden size F, when it is no multiple of h (Llama 3 8B: 14336 = 3.5 h). Default none:
    /// `mlp_ratio` h.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ffn_hidden: Option<i64>,
    /// The MLP: `gelu` (`proj(gelu_tanh(fc x))`, GPT-2) or `swiglu` (`proj(silu(gate x) * up x)`,
    /// Shazeer 2020; Llama). Default gelu.
    pub mlp: MlpKind,
    /// The norm before attention, before the MLP and at the end: `layernorm` (weight and bias)
    /// or `rmsnorm` (weight only, Zhang and Sennrich 2019; Llama). Default layernorm.
    pub norm: NormKind,
    /// RoPE base frequency. Default 10000.
    pub rope_theta: f64,
    /// The norms' epsilon. Default 1e-5.
    pub norm_eps: f64,
    /// Use the token embedding as the output projection (GPT-2). Default true.
    pub tie_embeddings: bool,
    /// Biases in the linear layers (GPT-2 style). Default true.
    pub bias: bool,
    /// Seed of the deterministic initialisation (the same parameters on every rank, every
    /// backend and every P). Default 1234.
    pub seed: u64,
}

/// The MLP of a block.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MlpKind {
    /// `h -> F -> h` with tanh GELU between (GPT-2, the paper's models).
    #[default]
    Gelu,
    /// `h -> 2F` (gate and up, one matrix: rows `0..F` the gate, `F..2F` the up), then
    /// `silu(gate) * up`, then `F -> h` (Llama).
    Swiglu,
}

/// The normalisation of a block.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NormKind {
    /// `(x - mean) / sqrt(var + eps) * w + b`.
    #[default]
    Layernorm,
    /// `x / sqrt(mean(x^2) + eps) * w`.
    Rmsnorm,
}

impl Default for GptConfig {
    fn default() -> Self {
        GptConfig::tiny()
    }
}

impl GptConfig {
    /// For tests and quick runs: 2 layers, h = 64, 4 heads, byte vocabulary (about 0.13M
    /// parameters).
    pub fn tiny() -> GptConfig {
        GptConfig {
            vocab_size: 256,
            n_layer: 2,
            n_head: 4,
            n_kv_head: 4,
            n_embd: 64,
            mlp_ratio: 4,
            ffn_hidden: None,
            mlp: MlpKind::Gelu,
            norm: NormKind::Layernorm,
            rope_theta: 10_000.0,
            norm_eps: 1e-5,
            tie_embeddings: true,
            bias: true,
            seed: 1234,
        }
    }

    /// A GPT of `n_layer` x `n_embd` with `n_head` heads and the GPT-2 vocabulary padded to a
    /// multiple of 64 (50304).
    fn gpt(n_layer: i64, n_embd: i64, n_head: i64) -> GptConfig {
        GptConfig { vocab_size: 50304, n_layer, n_head, n_kv_head: n_head, n_embd, ..GptConfig::tiny() }
    }

    /// GPT-3 Small: 12 layers, h = 768, 12 heads.
    pub fn gpt_125m() -> GptConfig {
        GptConfig::gpt(12, 768, 12)
    }

    /// GPT-3 Medium: 24 layers, h = 1024, 16 heads.
    pub fn gpt_350m() -> GptConfig {
        GptConfig::gpt(24, 1024, 16)
    }

    /// The paper's 1.2B/1.3B model (GPT-3 XL): 24 layers, h = 2048, 16 heads.
    pub fn gpt_1_3b() -> GptConfig {
        GptConfig::gpt(24, 2048, 16)
    }

    /// The paper's 7B model (GPT-3 6.7B): 32 layers, h = 4096, 32 heads.
    pub fn gpt_6_7b() -> GptConfig {
        GptConfig::gpt(32, 4096, 32)
    }

    /// The paper's 30B model: 64 layers, h = 6144, 64 heads.
    pub fn gpt_30b() -> GptConfig {
        GptConfig::gpt(64, 6144, 64)
    }

    /// A Llama: RMSNorm, SwiGLU, grouped-query attention, no biases, untied embeddings.
    fn llama(n_layer: i64, n_embd: i64, n_head: i64, n_kv_head: i64, ffn: i64) -> GptConfig {
        GptConfig {
            vocab_size: 128_256,
            n_layer,
            n_head,
            n_kv_head,
            n_embd,
            ffn_hidden: Some(ffn),
            mlp: MlpKind::Swiglu,
            norm: NormKind::Rmsnorm,
            rope_theta: 500_000.0,
            norm_eps: 1e-5,
            tie_embeddings: false,
            bias: false,
            ..GptConfig::tiny()
        }
    }

    /// A Llama-style model for tests and CPU runs: 2 layers, h = 64, 4 query heads over 2 kv
    /// heads, F = 176 (about 8/3 h, as Llama sizes its MLP), byte vocabulary (about 0.13M
    /// parameters).
    pub fn llama_tiny() -> GptConfig {
        GptConfig { vocab_size: 256, rope_theta: 10_000.0, ..GptConfig::llama(2, 64, 4, 2, 176) }
    }

    /// Llama 3 8B (Meta's published configuration): 32 layers, h = 4096, 32 query heads over 8
    /// kv heads, F = 14336, vocabulary 128256, RoPE base 500000.
    pub fn llama3_8b() -> GptConfig {
        GptConfig::llama(32, 4096, 32, 8, 14_336)
    }

    /// Llama 3 70B: 80 layers, h = 8192, 64 query heads over 8 kv heads, F = 28672.
    pub fn llama3_70b() -> GptConfig {
        GptConfig::llama(80, 8192, 64, 8, 28_672)
    }

    /// The names [`preset`](GptConfig::preset) takes.
    pub const PRESETS: [&'static str; 9] =
        ["tiny", "125m", "350m", "1.3b", "6.7b", "30b", "llama-tiny", "llama3-8b", "llama3-70b"];

    /// A preset by name: one of [`PRESETS`](GptConfig::PRESETS).
    pub fn preset(name: &str) -> Result<GptConfig> {
        Ok(match name {
            "tiny" => GptConfig::tiny(),
            "125m" => GptConfig::gpt_125m(),
            "350m" => GptConfig::gpt_350m(),
            "1.3b" => GptConfig::gpt_1_3b(),
            "6.7b" => GptConfig::gpt_6_7b(),
            "30b" => GptConfig::gpt_30b(),
            "llama-tiny" => GptConfig::llama_tiny(),
            "llama3-8b" => GptConfig::llama3_8b(),
            "llama3-70b" => GptConfig::llama3_70b(),
            other => {
                return Err(Error::InvalidArgument {
                    op: "gpt_config",
                    group: "-".into(),
                    msg: format!("no preset {other:?}; presets: {}", GptConfig::PRESETS.join(", ")),
                })
            }
        })
    }

    /// The MLP's hidden size F.
    pub fn ffn(&self) -> i64 {
        self.ffn_hidden.unwrap_or(self.mlp_ratio * self.n_embd)
    }

    /// Output features of the MLP's first matrix: F, or 2F for SwiGLU's gate and up.
    pub fn mlp_in_width(&self) -> i64 {
        match self.mlp {
            MlpKind::Gelu => self.ffn(),
            MlpKind::Swiglu => 2 * self.ffn(),
        }
    }

    /// Parameters of one norm: weight and bias, or weight only.
    pub fn norm_params(&self) -> i64 {
        match self.norm {
            NormKind::Layernorm => 2 * self.n_embd,
            NormKind::Rmsnorm => self.n_embd,
        }
    }

    /// Head size d = h / H.
    pub fn head_dim(&self) -> i64 {
        self.n_embd / self.n_head
    }

    /// Checks that the numbers fit together.
    pub fn validate(&self) -> Result<()> {
        let bad = |msg: String| Err(Error::InvalidArgument { op: "gpt_config", group: "-".into(), msg });
        let positive = [
            ("vocab_size", self.vocab_size),
            ("n_layer", self.n_layer),
            ("n_head", self.n_head),
            ("n_kv_head", self.n_kv_head),
            ("n_embd", self.n_embd),
            ("mlp_ratio", self.mlp_ratio),
            ("ffn_hidden", self.ffn_hidden.unwrap_or(1)),
        ];
        if let Some((name, v)) = positive.iter().find(|(_, v)| *v < 1) {
            return bad(format!("{name} = {v} must be at least 1"));
        }
        if self.n_embd % self.n_head != 0 {
            return bad(format!("n_embd {} is not a multiple of n_head {}", self.n_embd, self.n_head));
        }
        if self.head_dim() % 2 != 0 {
            return bad(format!("head size {} must be even for RoPE", self.head_dim()));
        }
        if self.n_head % self.n_kv_head != 0 {
            return bad(format!("n_head {} is not a multiple of n_kv_head {}", self.n_head, self.n_kv_head));
        }
        Ok(())
    }

    /// Parameters of the model, exactly as [`Gpt`](super::Gpt) allocates them.
    pub fn num_params(&self) -> i64 {
        let (h, d, v, l) = (self.n_embd, self.head_dim(), self.vocab_size, self.n_layer);
        let bias = i64::from(self.bias);
        let qkv_out = (self.n_head + 2 * self.n_kv_head) * d;
        let (f, f_in) = (self.ffn(), self.mlp_in_width());
        let block = 2 * self.norm_params() // two norms
            + h * qkv_out + bias * qkv_out // fused q, k, v projection
            + h * h + bias * h // attention output projection
            + h * f_in + bias * f_in // MLP in (SwiGLU: gate and up)
            + f * h + bias * h; // MLP out
        let head = if self.tie_embeddings { 0 } else { v * h };
        v * h + l * block + self.norm_params() + head
    }

    /// Parameters that take part in matrix products (the token embedding's lookup is free
    /// unless it is tied to the output projection).
    pub fn matmul_params(&self) -> i64 {
        let lookup = if self.tie_embeddings { 0 } else { self.vocab_size * self.n_embd };
        self.num_params() - lookup
    }

    /// Model FLOPs of one training step (forward and backward) over `tokens` tokens in
    /// sequences of `seq` under `mask`: the standard count (Kaplan et al. 2020; Chowdhery et al.
    /// 2022, appendix B)
    ///
    /// `6 x matmul parameters x tokens + 12 x L x h x visible pairs per sequence x sequences`
    ///
    /// where 6 = 2 (forward multiply-add) + 4 (backward: two products per parameter), and the
    /// attention term counts QK^T and the weighted sum of V over the (query, key) pairs the mask
    /// makes visible (2 x 2 x h per pair and layer forward, x3 with the backward):
    /// [`Mask::visible_pairs`], `seq^2` without a mask, `seq(seq+1)/2` causal, about
    /// `seq x window` for a sliding window, the connected blocks for block-sparse. This is what an
    /// exact kernel must compute; the Megatron-DeepSpeed convention the paper reports (full
    /// `seq^2` attention, recomputation counted) is [`cost::megatron_flops`].
    ///
    /// [`cost::megatron_flops`]: crate::cost::megatron_flops
    pub fn train_flops(&self, tokens: i64, seq: i64, mask: &Mask) -> f64 {
        let dense = 6.0 * self.matmul_params() as f64 * tokens as f64;
        let sequences = tokens as f64 / seq as f64;
        let pairs = mask.visible_pairs(seq) as f64;
        dense + 12.0 * (self.n_layer * self.n_embd) as f64 * pairs * sequences
    }

    /// [`train_flops`](GptConfig::train_flops) of one batch of packed documents: the dense
    /// part for every token, attention for the pairs that lie inside one document.
    pub fn train_flops_packed(&self, docs: &crate::attention::Documents, mask: &Mask) -> f64 {
        let tokens = docs.samples() as f64 * docs.global_len() as f64;
        let dense = 6.0 * self.matmul_params() as f64 * tokens;
        dense + 12.0 * (self.n_layer * self.n_embd) as f64 * docs.visible_pairs(mask) as f64
    }
}
