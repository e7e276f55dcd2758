//! The GPT, generic over the sequence-parallel strategy (Jacobs et al. 2023, §3.1: everything
//! but attention is token-local, so each rank runs it unchanged on its own tokens).

use tch::{Device, Kind, Reduction, Tensor};

use super::layers::{LayerNorm, Linear, Param, Params, Placement, Rope, Split};
use super::GptConfig;
use crate::attention::SequenceParallel;
use crate::autograd::Tape;
use crate::comm::{Group, ReduceOp};
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
    /// RoPE for the tokens the strategy attends over, at their global positions.
    rope: Rope,
    /// Query and kv heads this rank projects (all of them unless tensor-parallel).
    heads: (i64, i64),
}

/// How each linear layer of a block is split: whole, or Megatron-LM's tensor parallelism
/// (qkv and MLP-in column-parallel by heads and features, the two output projections
/// row-parallel).
struct Splits {
    qkv: Split,
    proj: Split,
    fc: Split,
    fc_out: Split,
    heads: (i64, i64),
}

impl Splits {
    /// `tp`: (rank, size) of the tensor-parallel group, if any.
    fn new(cfg: &GptConfig, tp: Option<(i64, i64)>) -> Result<Splits> {
        let (h, d, hq, hkv) = (cfg.n_embd, cfg.head_dim(), cfg.n_head, cfg.n_kv_head);
        let mlp = cfg.mlp_ratio * h;
        let Some((r, p)) = tp else {
            return Ok(Splits {
                qkv: Split::None,
                proj: Split::None,
                fc: Split::None,
                fc_out: Split::None,
                heads: (hq, hkv),
            });
        };
        if hq % p != 0 || hkv % p != 0 || mlp % p != 0 {
            return Err(Error::InvalidArgument {
                op: "gpt",
                group: format!("tensor parallel over {p} ranks"),
                msg: format!("n_head {hq}, n_kv_head {hkv} and the MLP width {mlp} must be divisible by {p}"),
            });
        }
        let (lq, lkv, lm) = (hq / p, hkv / p, mlp / p);
        let range = |start: i64, len: i64| (start..start + len).collect::<Vec<i64>>();
        // qkv rows: this rank's q heads, then its k heads, then its v heads.
        let mut qkv = range(r * lq * d, lq * d);
        qkv.extend(range(hq * d + r * lkv * d, lkv * d));
        qkv.extend(range((hq + hkv) * d + r * lkv * d, lkv * d));
        Ok(Splits {
            qkv: Split::Columns(qkv),
            proj: Split::Rows(range(r * lq * d, lq * d)),
            fc: Split::Columns(range(r * lm, lm)),
            fc_out: Split::Rows(range(r * lm, lm)),
            heads: (lq, lkv),
        })
    }
}

impl Gpt {
    /// Builds the model with parameters in `kind` on `device`, the same values on every rank
    /// (for a tensor-parallel strategy, each rank keeps its slices of the same full model).
    pub fn new(
        cfg: &GptConfig,
        strategy: Box<dyn SequenceParallel>,
        kind: Kind,
        device: Device,
    ) -> Result<Gpt> {
        cfg.validate()?;
        let (h, l) = (cfg.n_embd, cfg.n_layer);
        let mut p = Params::new(cfg.seed, kind, device);
        let splits =
            Splits::new(cfg, strategy.tensor_parallel().map(|g| (g.rank() as i64, g.size() as i64)))?;
        // GPT-2 initialisation: N(0, 0.02), residual projections scaled by 1/sqrt(2L).
        let (std, resid_std) = (0.02, 0.02 / ((2 * l) as f64).sqrt());
        let wte = p.normal("wte", &[cfg.vocab_size, h], std, Placement::Replicated)?;
        let mut blocks = Vec::new();
        for i in 0..l {
            let n = |part: &str| format!("h.{i}.{part}");
            let (qkv_out, mlp) = ((cfg.n_head + 2 * cfg.n_kv_head) * cfg.head_dim(), cfg.mlp_ratio * h);
            blocks.push(Block {
                ln1: LayerNorm::new(&mut p, &n("ln1"), h, cfg.norm_eps)?,
                qkv: Linear::new(&mut p, &n("attn.qkv"), (h, qkv_out), cfg.bias, std, splits.qkv.clone())?,
                proj: Linear::new(&mut p, &n("attn.proj"), (h, h), cfg.bias, resid_std, splits.proj.clone())?,
                ln2: LayerNorm::new(&mut p, &n("ln2"), h, cfg.norm_eps)?,
                fc: Linear::new(&mut p, &n("mlp.fc"), (h, mlp), cfg.bias, std, splits.fc.clone())?,
                fc_out: Linear::new(
                    &mut p,
                    &n("mlp.proj"),
                    (mlp, h),
                    cfg.bias,
                    resid_std,
                    splits.fc_out.clone(),
                )?,
            });
        }
        let ln_f = LayerNorm::new(&mut p, "ln_f", h, cfg.norm_eps)?;
        let lm_head = if cfg.tie_embeddings {
            None
        } else {
            Some(Linear::new(&mut p, "lm_head", (h, cfg.vocab_size), false, std, Split::None)?)
        };
        let rope = Rope::new(&strategy.input_positions(device)?, cfg.head_dim(), cfg.rope_theta, kind)?;
        Ok(Gpt {
            cfg: cfg.clone(),
            params: p,
            wte,
            blocks,
            ln_f,
            lm_head,
            strategy,
            rope,
            heads: splits.heads,
        })
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

    /// Logits for this rank's tokens: the embedding, every block
    /// ([`block_forward`](Gpt::block_forward)), the final LayerNorm and the output projection.
    ///
    /// # Shapes
    /// `tokens`: `[b, s_r]` (i64, this rank's share of the sequence) -> `[b, s_r, V]`.
    pub fn forward(&self, tape: &Tape, tokens: &Tensor) -> Result<Tensor> {
        let layout = self.strategy.layout();
        let s = layout.len(self.strategy.rank());
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
        // [b, s] -> [b, s, h]
        let mut x = Tensor::f_embedding(&self.wte, tokens, -1, false, false).op("gpt")?;
        for block in &self.blocks {
            // A cut on the residual stream: the backward visits each block once.
            x = tape.cut(&x)?;
            x = self.block_forward(tape, block, &x)?;
        }
        let x = self.ln_f.forward(&x)?;
        // [b, s, h] -> [b, s, V]
        match &self.lm_head {
            Some(head) => head.forward(&x),
            None => x.f_linear::<Tensor>(&self.wte, None).op("gpt"),
        }
    }

    /// One pre-norm block on the residual stream: `x + attn(ln1(x))`, then `x + mlp(ln2(x))`.
    ///
    /// With a tensor-parallel strategy (Megatron-SP) the block is wrapped as in Korthikanti et
    /// al. 2022, Fig. 5: all-gather the sequence after each LayerNorm, column-parallel then
    /// row-parallel linears, reduce-scatter the sequence before each residual add.
    ///
    /// # Shapes
    /// `x`: `[b, s_r, h]` -> `[b, s_r, h]`.
    fn block_forward(&self, tape: &Tape, block: &Block, x: &Tensor) -> Result<Tensor> {
        let layout = self.strategy.layout();
        let (b, d) = (x.size()[0], self.cfg.head_dim());
        let (hq, hkv) = self.heads; // this rank's heads
        let tp = self.strategy.tensor_parallel();
        // Megatron-SP's all-gather and reduce-scatter of the sequence; identities otherwise.
        // [b, s_r, h] -> [b, N, h]
        let gather = |x: Tensor| match tp {
            Some(g) => tape.all_gather_v(g, &x, 1, layout.lens()),
            None => Ok(x),
        };
        // [b, N, h] partial sums -> [b, s_r, h] summed
        let scatter = |y: Tensor| match tp {
            Some(g) => tape.reduce_scatter_v(g, &y, 1, layout.lens()),
            None => Ok(y),
        };
        let a = gather(block.ln1.forward(x)?)?; // [b, t, h], t = s_r or N
        let t = a.size()[1];
        let qkv = block.qkv.forward(&a)?; // [b, t, (hq + 2 hkv) d]
        let part = |start: i64, heads: i64| -> Result<Tensor> {
            // [b, t, (hq + 2 hkv) d] -> [b, t, heads, d]
            qkv.f_narrow(2, start * d, heads * d).and_then(|t_| t_.f_reshape([b, t, heads, d])).op("gpt")
        };
        let q = self.rope.forward(&part(0, hq)?)?;
        let k = self.rope.forward(&part(hq, hkv)?)?;
        let v = part(hq + hkv, hkv)?;
        // [b, t, hq, d] -> [b, t, hq d]
        let o = self.strategy.forward(tape, &q, &k, &v)?.f_reshape([b, t, hq * d]).op("gpt")?;
        let x = x.f_add(&block.proj.forward_reduced(&o, scatter)?).op("gpt")?;
        let m = gather(block.ln2.forward(&x)?)?;
        let m = block.fc.forward(&m)?.f_gelu("tanh").op("gpt")?;
        x.f_add(&block.fc_out.forward_reduced(&m, scatter)?).op("gpt")
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
    /// Sharded parameters already hold their whole gradient (computed on the whole sequence
    /// after the all-gather) and are left alone.
    pub fn sync_gradients(&self) -> Result<()> {
        match self.strategy.group() {
            Some(group) if group.size() > 1 => {
                self.reduce_gradients(group, ReduceOp::Sum, |p| p.placement == Placement::Replicated)
            }
            _ => Ok(()),
        }
    }

    /// Averages every gradient over a data-parallel group (replicas that saw different data),
    /// in f32, in one all-reduce.
    pub fn average_gradients(&self, dp: &Group) -> Result<()> {
        if dp.size() == 1 {
            return Ok(());
        }
        self.reduce_gradients(dp, ReduceOp::Avg, |_| true)
    }

    /// All-reduces the gradients of the parameters `which` selects as one flat f32 buffer.
    fn reduce_gradients(&self, group: &Group, op: ReduceOp, which: impl Fn(&Param) -> bool) -> Result<()> {
        let mut grads = Vec::with_capacity(self.params.len());
        for p in self.params.all().iter().filter(|p| which(p)) {
            let g = p.tensor.grad();
            if !g.defined() {
                return Err(Error::Tape {
                    op: "sync_gradients",
                    msg: format!("parameter {} has no gradient", p.name),
                });
            }
            grads.push(g);
        }
        let flat: Vec<Tensor> = grads
            .iter()
            .map(|g| g.f_to_kind(Kind::Float).and_then(|g| g.f_reshape([-1])))
            .collect::<Result<_, _>>()
            .op("sync_gradients")?;
        let reduced = group.all_reduce(&Tensor::f_cat(&flat, 0).op("sync_gradients")?, op)?;
        let _no_grad = tch::no_grad_guard();
        let mut offset = 0;
        for g in &mut grads {
            let n = g.numel() as i64;
            let part =
                reduced.f_narrow(0, offset, n).and_then(|t| t.f_reshape(g.size())).op("sync_gradients")?;
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
