//! The GPT, generic over the sequence-parallel strategy (Jacobs et al. 2023, §3.1: everything
//! but attention is token-local, so each rank runs it unchanged on its own tokens).

use tch::{Device, Kind, Reduction, Tensor};

use super::layers::{LayerNorm, Linear, Params, Rope};
use super::GptConfig;
use crate::attention::SequenceParallel;
use crate::autograd::Tape;
use crate::comm::ReduceOp;
use crate::error::TorchResultExt;
use crate::{Error, Result};

/// Label of a token that has no target (the last token of a sequence, padding).
pub const IGNORE: i64 = -100;

/// One pre-norm transformer block.
struct Block {
    ln1: LayerNorm,
    qkv: Linear,
    proj: Linear,
    ln2: LayerNorm,
    fc: Linear,
    fc_out: Linear,
}

/// The loss of one forward pass, reduced over the sequence-parallel group.
pub struct Loss {
    /// This rank's term of the global mean: the sum of its tokens' losses divided by the
    /// number of labelled tokens in the whole group. The terms of all ranks add up to the
    /// global mean, so back-propagating each rank's term gives each its share of the gradient.
    pub local: Tensor,
    /// The global mean loss (every rank's terms, summed), as a number.
    pub value: f64,
    /// Labelled tokens in the group.
    pub tokens: i64,
}

/// A GPT whose attention runs through a [`SequenceParallel`] strategy.
pub struct Gpt {
    cfg: GptConfig,
    params: Params,
    wte: Tensor,
    blocks: Vec<Block>,
    ln_f: LayerNorm,
    lm_head: Option<Linear>,
    strategy: Box<dyn SequenceParallel>,
    /// RoPE for this rank's tokens, at their global positions.
    rope: Rope,
}

impl Gpt {
    /// Builds the model with parameters in `kind` on `device`, identical on every rank.
    pub fn new(
        cfg: &GptConfig,
        strategy: Box<dyn SequenceParallel>,
        kind: Kind,
        device: Device,
    ) -> Result<Gpt> {
        cfg.validate()?;
        let (h, l) = (cfg.n_embd, cfg.n_layer);
        let d = cfg.head_dim();
        let mut p = Params::new(cfg.seed, kind, device);
        // GPT-2 initialisation: N(0, 0.02), residual projections scaled by 1/sqrt(2L).
        let (std, resid_std) = (0.02, 0.02 / ((2 * l) as f64).sqrt());
        let wte = p.normal("wte", &[cfg.vocab_size, h], std)?;
        let mut blocks = Vec::new();
        for i in 0..l {
            let n = |part: &str| format!("h.{i}.{part}");
            let qkv_out = (cfg.n_head + 2 * cfg.n_kv_head) * d;
            let mlp = cfg.mlp_ratio * h;
            blocks.push(Block {
                ln1: LayerNorm::new(&mut p, &n("ln1"), h, cfg.norm_eps)?,
                qkv: Linear::new(&mut p, &n("attn.qkv"), h, qkv_out, cfg.bias, std)?,
                proj: Linear::new(&mut p, &n("attn.proj"), h, h, cfg.bias, resid_std)?,
                ln2: LayerNorm::new(&mut p, &n("ln2"), h, cfg.norm_eps)?,
                fc: Linear::new(&mut p, &n("mlp.fc"), h, mlp, cfg.bias, std)?,
                fc_out: Linear::new(&mut p, &n("mlp.proj"), mlp, h, cfg.bias, resid_std)?,
            });
        }
        let ln_f = LayerNorm::new(&mut p, "ln_f", h, cfg.norm_eps)?;
        let lm_head = if cfg.tie_embeddings {
            None
        } else {
            Some(Linear::new(&mut p, "lm_head", h, cfg.vocab_size, false, std)?)
        };
        let positions = strategy.layout().positions(strategy.rank(), device)?;
        let rope = Rope::new(&positions, d, cfg.rope_theta, kind)?;
        Ok(Gpt { cfg: cfg.clone(), params: p, wte, blocks, ln_f, lm_head, strategy, rope })
    }

    pub fn config(&self) -> &GptConfig {
        &self.cfg
    }

    /// Every parameter, named, in a fixed order.
    pub fn params(&self) -> &Params {
        &self.params
    }

    pub fn strategy(&self) -> &dyn SequenceParallel {
        self.strategy.as_ref()
    }

    /// Logits for this rank's tokens.
    ///
    /// # Shapes
    /// `tokens`: `[b, s_r]` (i64, this rank's share of the sequence) -> `[b, s_r, V]`.
    pub fn forward(&self, tape: &Tape, tokens: &Tensor) -> Result<Tensor> {
        let s = self.strategy.layout().len(self.strategy.rank());
        let size = tokens.size();
        if size.len() != 2 || size[1] != s || tokens.kind() != Kind::Int64 {
            return Err(Error::Shape {
                op: "gpt",
                shapes: vec![size],
                msg: format!(
                    "tokens must be i64 [b, {s}] (this rank's share of the sequence), got {:?}",
                    tokens.kind()
                ),
            });
        }
        let (b, h, d) = (size[0], self.cfg.n_embd, self.cfg.head_dim());
        let (hq, hkv) = (self.cfg.n_head, self.cfg.n_kv_head);
        // [b, s] -> [b, s, h]
        let mut x = Tensor::f_embedding(&self.wte, tokens, -1, false, false).op("gpt")?;
        for block in &self.blocks {
            // A cut on the residual stream: the backward visits each block once.
            x = tape.cut(&x)?;
            let qkv = block.qkv.forward(&block.ln1.forward(&x)?)?; // [b, s, (H + 2 H_kv) d]
            let part = |start: i64, heads: i64| -> Result<Tensor> {
                // [b, s, (H + 2 H_kv) d] -> [b, s, heads, d]
                qkv.f_narrow(2, start * d, heads * d).and_then(|t| t.f_reshape([b, s, heads, d])).op("gpt")
            };
            let q = self.rope.forward(&part(0, hq)?)?;
            let k = self.rope.forward(&part(hq, hkv)?)?;
            let v = part(hq + hkv, hkv)?;
            // [b, s, H, d] -> [b, s, h]
            let o = self.strategy.forward(tape, &q, &k, &v)?.f_reshape([b, s, h]).op("gpt")?;
            x = x.f_add(&block.proj.forward(&o)?).op("gpt")?;
            let m = block.fc.forward(&block.ln2.forward(&x)?)?.f_gelu("tanh").op("gpt")?;
            x = x.f_add(&block.fc_out.forward(&m)?).op("gpt")?;
        }
        let x = self.ln_f.forward(&x)?;
        // [b, s, h] -> [b, s, V]
        match &self.lm_head {
            Some(head) => head.forward(&x),
            None => x.f_linear::<Tensor>(&self.wte, None).op("gpt"),
        }
    }

    /// Cross-entropy of this rank's tokens against `labels` (already shifted over the *global*
    /// sequence, [`IGNORE`] where there is no target), as a token-weighted mean over the group.
    ///
    /// # Shapes
    /// `tokens`, `labels`: `[b, s_r]` i64.
    pub fn loss(&self, tape: &Tape, tokens: &Tensor, labels: &Tensor) -> Result<Loss> {
        if labels.size() != tokens.size() {
            return Err(Error::Shape {
                op: "gpt_loss",
                shapes: vec![tokens.size(), labels.size()],
                msg: "tokens and labels must have one shape".into(),
            });
        }
        let logits = self.forward(tape, tokens)?;
        let v = self.cfg.vocab_size;
        let f = || -> Result<(Tensor, Tensor), tch::TchError> {
            // [b, s, V] -> [b*s, V], in f32 so that half precision does not round the loss
            let flat = logits.f_reshape([-1, v])?.f_to_kind(Kind::Float)?;
            let sum = flat.f_cross_entropy_loss::<Tensor>(
                &labels.f_reshape([-1])?,
                None,
                Reduction::Sum,
                IGNORE,
                0.0,
            )?;
            let counted = labels.f_ne(IGNORE)?.f_sum(Kind::Double)?;
            Ok((sum, counted))
        };
        let (sum, counted) = f().op("gpt_loss")?;
        // [tokens, loss sum] of this rank, then of the group.
        let mine = Tensor::f_stack(&[counted, sum.detach().f_to_kind(Kind::Double).op("gpt_loss")?], 0)
            .op("gpt_loss")?;
        let totals = match self.strategy.group() {
            Some(g) => g.all_reduce(&mine, ReduceOp::Sum)?,
            None => mine,
        };
        let totals = Vec::<f64>::try_from(&totals).op("gpt_loss")?;
        let (tokens_total, sum_total) = (totals[0], totals[1]);
        if tokens_total < 1.0 {
            return Err(Error::Shape {
                op: "gpt_loss",
                shapes: vec![labels.size()],
                msg: "no labelled token in the whole group".into(),
            });
        }
        let local = sum.f_div_scalar(tokens_total).op("gpt_loss")?;
        Ok(Loss { local, value: sum_total / tokens_total, tokens: tokens_total as i64 })
    }

    /// One forward and backward pass of the loss, gradients synced over the group (no
    /// optimizer update). A strategy that communicates runs through a [`Tape`]; the single
    /// device runs plain autograd (its tape records nothing).
    pub fn forward_backward(&self, tokens: &Tensor, labels: &Tensor) -> Result<Loss> {
        if self.strategy.group().is_none() {
            let loss = self.loss(&Tape::disabled(), tokens, labels)?;
            loss.local.f_backward().op("gpt_backward")?;
            return Ok(loss);
        }
        let tape = Tape::new();
        let loss = self.loss(&tape, tokens, labels)?;
        tape.backward(&loss.local)?;
        self.sync_gradients()?;
        Ok(loss)
    }

    /// Sums every parameter's gradient over the sequence-parallel group, in f32, in one
    /// all-reduce (each rank's gradient of a replicated parameter is only its tokens' share).
    pub fn sync_gradients(&self) -> Result<()> {
        let Some(group) = self.strategy.group() else {
            return Ok(());
        };
        if group.size() == 1 {
            return Ok(());
        }
        let mut grads = Vec::with_capacity(self.params.len());
        for (name, p) in self.params.iter() {
            let g = p.grad();
            if !g.defined() {
                return Err(Error::Tape {
                    op: "sync_gradients",
                    msg: format!("parameter {name} has no gradient"),
                });
            }
            grads.push(g);
        }
        let flat: Vec<Tensor> = grads
            .iter()
            .map(|g| g.f_to_kind(Kind::Float).and_then(|g| g.f_reshape([-1])))
            .collect::<Result<_, _>>()
            .op("sync_gradients")?;
        let summed = group.all_reduce(&Tensor::f_cat(&flat, 0).op("sync_gradients")?, ReduceOp::Sum)?;
        let _no_grad = tch::no_grad_guard();
        let mut offset = 0;
        for g in &mut grads {
            let n = g.numel() as i64;
            let part =
                summed.f_narrow(0, offset, n).and_then(|t| t.f_reshape(g.size())).op("sync_gradients")?;
            g.f_copy_(&part).op("sync_gradients")?;
            offset += n;
        }
        Ok(())
    }

    /// Sets every gradient to zero.
    pub fn zero_grad(&self) {
        for (_, p) in self.params.iter() {
            let mut g = p.grad();
            if g.defined() {
                let _ = g.zero_();
            }
        }
    }
}

/// Labels for next-token prediction over the *global* sequence, before sharding: the label of
/// token t is token t + 1, and the last token has none. Shifting before sharding keeps the label
/// of every shard's last token (it is the first token of the next shard).
///
/// # Shapes
/// `[b, N]` -> `[b, N]`.
pub fn shift_labels(tokens: &Tensor) -> Result<Tensor> {
    let f = || -> Result<Tensor, tch::TchError> {
        let n = tokens.size()[1];
        let next = tokens.f_narrow(1, 1, n - 1)?;
        let none = Tensor::f_full([tokens.size()[0], 1], IGNORE, (Kind::Int64, tokens.device()))?;
        Tensor::f_cat(&[next, none], 1)
    };
    if tokens.dim() != 2 || tokens.size()[1] < 1 {
        return Err(Error::Shape {
            op: "shift_labels",
            shapes: vec![tokens.size()],
            msg: "tokens must be [b, N], N >= 1".into(),
        });
    }
    f().op("shift_labels")
}
