//! The GPT, generic over the sequence-parallel strategy (Jacobs et al. 2023, §3.1: everything
//! but attention is token-local, so each rank runs it unchanged on its own tokens).

use std::rc::Rc;

use tch::{Device, Kind, Tensor};

use super::layers::{Linear, Norm, Params, Placement, Rope, Split};
use super::recompute::{BlockHooks, ForwardOptions, Unit};
use super::tiled_mlp::{tiled_mlp, Mlp};
use super::{GptConfig, MlpKind};
use crate::attention::{Documents, SequenceParallel};
use crate::autograd::Tape;
use crate::error::TorchResultExt;
use crate::{Error, Result};

/// Label of a token that has no target (the last token of a sequence, padding).
pub const IGNORE: i64 = -100;

/// One pre-norm transformer block.
pub(super) struct Block {
    ln1: Norm,
    qkv: Linear,
    proj: Linear,
    ln2: Norm,
    fc: Linear,
    fc_out: Linear,
}

/// A GPT whose attention runs through a [`SequenceParallel`] strategy.
pub struct Gpt {
    pub(super) cfg: GptConfig,
    pub(super) params: Params,
    /// The ZeRO unit of each parameter, in the order of `params`.
    pub(super) units: Vec<Unit>,
    pub(super) wte: Tensor,
    pub(super) blocks: Vec<Rc<Block>>,
    pub(super) ln_f: Norm,
    pub(super) lm_head: Option<Linear>,
    /// What every block shares (shared with the records that recompute blocks).
    pub(super) core: Rc<Core>,
    pub(super) options: ForwardOptions,
    pub(super) hooks: Option<Rc<dyn BlockHooks>>,
    /// Where full checkpointing's block inputs go between the forward and the backward.
    pub(super) offload: Option<Rc<super::Offload>>,
}

/// What a block's forward needs besides its own parameters.
pub(super) struct Core {
    cfg: GptConfig,
    pub(super) strategy: Box<dyn SequenceParallel>,
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
        let (d, hq, hkv) = (cfg.head_dim(), cfg.n_head, cfg.n_kv_head);
        let (f, swiglu) = (cfg.ffn(), cfg.mlp == MlpKind::Swiglu);
        let Some((r, p)) = tp else {
            return Ok(Splits {
                qkv: Split::None,
                proj: Split::None,
                fc: Split::None,
                fc_out: Split::None,
                heads: (hq, hkv),
            });
        };
        if hq % p != 0 || hkv % p != 0 || f % p != 0 {
            return Err(Error::InvalidArgument {
                op: "gpt",
                group: format!("tensor parallel over {p} ranks"),
                msg: format!("n_head {hq}, n_kv_head {hkv} and the MLP width {f} must be divisible by {p}"),
            });
        }
        let (lq, lkv, lm) = (hq / p, hkv / p, f / p);
        let range = |start: i64, len: i64| (start..start + len).collect::<Vec<i64>>();
        // qkv rows: this rank's q heads, then its k heads, then its v heads.
        let mut qkv = range(r * lq * d, lq * d);
        qkv.extend(range(hq * d + r * lkv * d, lkv * d));
        qkv.extend(range((hq + hkv) * d + r * lkv * d, lkv * d));
        // MLP-in rows: this rank's features (SwiGLU: its gate features, then the same up features,
        // so that each rank's silu(gate) * up pairs the right columns).
        let mut fc = range(r * lm, lm);
        if swiglu {
            fc.extend(range(f + r * lm, lm));
        }
        Ok(Splits {
            qkv: Split::Columns(qkv),
            proj: Split::Rows(range(r * lq * d, lq * d)),
            fc: Split::Columns(fc),
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
        let mut units = vec![Unit::Outer; p.len()];
        let mut blocks = Vec::new();
        for i in 0..l {
            let n = |part: &str| format!("h.{i}.{part}");
            let qkv_out = (cfg.n_head + 2 * cfg.n_kv_head) * cfg.head_dim();
            let (f, f_in) = (cfg.ffn(), cfg.mlp_in_width());
            blocks.push(Rc::new(Block {
                ln1: Norm::new(&mut p, &n("ln1"), h, cfg.norm_eps, cfg.norm)?,
                qkv: Linear::new(&mut p, &n("attn.qkv"), (h, qkv_out), cfg.bias, std, splits.qkv.clone())?,
                proj: Linear::new(&mut p, &n("attn.proj"), (h, h), cfg.bias, resid_std, splits.proj.clone())?,
                ln2: Norm::new(&mut p, &n("ln2"), h, cfg.norm_eps, cfg.norm)?,
                fc: Linear::new(&mut p, &n("mlp.fc"), (h, f_in), cfg.bias, std, splits.fc.clone())?,
                fc_out: Linear::new(
                    &mut p,
                    &n("mlp.proj"),
                    (f, h),
                    cfg.bias,
                    resid_std,
                    splits.fc_out.clone(),
                )?,
            }));
            units.resize(p.len(), Unit::Block(i as usize));
        }
        let ln_f = Norm::new(&mut p, "ln_f", h, cfg.norm_eps, cfg.norm)?;
        let lm_head = if cfg.tie_embeddings {
            None
        } else {
            Some(Linear::new(&mut p, "lm_head", (h, cfg.vocab_size), false, std, Split::None)?)
        };
        units.resize(p.len(), Unit::Outer);
        let rope = Rope::new(&strategy.input_positions(device)?, cfg.head_dim(), cfg.rope_theta, kind)?;
        Ok(Gpt {
            cfg: cfg.clone(),
            params: p,
            units,
            wte,
            blocks,
            ln_f,
            lm_head,
            core: Rc::new(Core { cfg: cfg.clone(), strategy, rope, heads: splits.heads }),
            options: ForwardOptions::default(),
            hooks: None,
            offload: None,
        })
    }

    pub fn config(&self) -> &GptConfig {
        &self.cfg
    }

    /// Every parameter, named, in a fixed order.
    pub fn params(&self) -> &Params {
        &self.params
    }

    /// The unit (a block, or the embedding, final norm and head) that parameter `index` of
    /// [`params`](Gpt::params) belongs to: what ZeRO-3 gathers and frees together.
    pub fn unit(&self, index: usize) -> Unit {
        self.units[index]
    }

    pub fn strategy(&self) -> &dyn SequenceParallel {
        self.core.strategy.as_ref()
    }

    /// Logits for this rank's tokens: the embedding, every block
    /// ([`block_forward`](Core::block_forward)), the final norm and the output projection.
    ///
    /// # Shapes
    /// `tokens`: `[b, s_r]` (i64, this rank's share of the sequence) -> `[b, s_r, V]`.
    pub fn forward(&self, tape: &Tape, tokens: &Tensor) -> Result<Tensor> {
        self.forward_packed(tape, tokens, None)
    }

    /// [`forward`](Gpt::forward) over a batch of packed documents (`None`: one per sample):
    /// attention stays inside each document and RoPE positions restart at each.
    ///
    /// # Shapes
    /// `tokens`: `[b, s_r]` -> `[b, s_r, V]`; `docs` of b samples of the global N.
    pub fn forward_packed(&self, tape: &Tape, tokens: &Tensor, docs: Option<&Documents>) -> Result<Tensor> {
        let x = self.hidden(tape, tokens, docs)?;
        // [b, s, h] -> [b, s, V]
        let logits = x.f_linear::<Tensor>(self.head_weight(), None).op("gpt")?;
        self.hook(|h| h.after_forward(Unit::Outer))?;
        Ok(logits)
    }

    /// The output projection's weight `[V, h]` (the token embedding when tied).
    pub(super) fn head_weight(&self) -> &Tensor {
        self.lm_head.as_ref().map_or(&self.wte, |head| head.weight())
    }

    /// The final hidden states: embedding, blocks, final norm, with the activations kept
    /// or recomputed as the [`ForwardOptions`] say and the hooks called at block boundaries.
    ///
    /// # Shapes
    /// `tokens`: `[b, s_r]` -> `[b, s_r, h]`.
    pub(super) fn hidden(&self, tape: &Tape, tokens: &Tensor, docs: Option<&Documents>) -> Result<Tensor> {
        let layout = self.strategy().layout();
        let s = layout.len(self.strategy().rank());
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
        // Ids outside the embedding would fail deep in libtorch (on a GPU, as a device assert).
        if tokens.numel() > 0 {
            let (lo, hi) = (tokens.min().int64_value(&[]), tokens.max().int64_value(&[]));
            if lo < 0 || hi >= self.cfg.vocab_size {
                return Err(Error::Shape {
                    op: "gpt",
                    shapes: vec![size],
                    msg: format!(
                        "token ids must lie in 0..{} (vocab_size); got {lo}..={hi}",
                        self.cfg.vocab_size
                    ),
                });
            }
        }
        if self.hooks.is_some() && !tape.is_recording() {
            return Err(Error::Tape {
                op: "gpt",
                msg: "a model with block hooks (ZeRO-2/3) needs a recording tape: the hooks run in \
                      its backward"
                    .into(),
            });
        }
        // Packed documents: the rotation of this batch's positions within its documents. (RoPE
        // scores depend on i - j only, so inside a document this equals the global rotation in
        // exact arithmetic; restarting keeps angles small, as Megatron's reset_position_ids and
        // the peers' packed position ids do, and makes the rotation the same wherever a document
        // was packed.)
        let packed = match docs {
            Some(d) if !d.is_whole() => {
                let positions = self.strategy().input_positions_docs(d, tokens.device())?; // [b, s_r]
                let rope = Rope::new(&positions, self.cfg.head_dim(), self.cfg.rope_theta, self.wte.kind())?;
                Some(Rc::new(Packed { docs: d.clone(), rope }))
            }
            _ => None,
        };
        if self.offload.is_some() && !self.options.recompute_blocks {
            return Err(Error::InvalidArgument {
                op: "offload",
                group: "-".into(),
                msg: "activation offload moves the block inputs that full checkpointing keeps: \
                      it needs full checkpointing (recompute_blocks)"
                    .into(),
            });
        }
        let previous = tape.set_recompute(self.options.recompute_attention);
        let x = self.stack(tape, tokens, packed.as_ref());
        tape.set_recompute(previous);
        self.ln_f.forward(&x?)
    }

    /// Embedding and blocks.
    fn stack(&self, tape: &Tape, tokens: &Tensor, packed: Option<&Rc<Packed>>) -> Result<Tensor> {
        self.hook(|h| h.before_forward(Unit::Outer))?;
        // [b, s] -> [b, s, h]
        let mut x = Tensor::f_embedding(&self.wte, tokens, -1, false, false).op("gpt")?;
        let last = self.blocks.len().checked_sub(1);
        for (i, block) in self.blocks.iter().enumerate() {
            // A cut on the residual stream: the backward visits each block once. In the backward
            // it is where block i is finished and block i - 1 begins.
            x = self.boundary(tape, &x, Some(i), i.checked_sub(1))?;
            self.hook(|h| h.before_forward(Unit::Block(i)))?;
            x = if self.options.recompute_blocks {
                self.checkpointed_block(tape, i, &x, packed.cloned())?
            } else {
                self.core.block_forward(tape, block, &x, packed.map(Rc::as_ref), self.options.mlp_tile)?
            };
            self.hook(|h| h.after_forward(Unit::Block(i)))?;
        }
        if self.hooks.is_some() {
            x = self.boundary(tape, &x, None, last)?;
        }
        Ok(x)
    }

    /// Calls `f` on the hooks, if any.
    pub(super) fn hook(&self, f: impl FnOnce(&dyn BlockHooks) -> Result<()>) -> Result<()> {
        match &self.hooks {
            Some(h) => f(h.as_ref()),
            None => Ok(()),
        }
    }
}

impl Core {
    /// One pre-norm block on the residual stream: `x + attn(ln1(x))`, then `x + mlp(ln2(x))`.
    ///
    /// With a tensor-parallel strategy (Megatron-SP) the block is wrapped as in Korthikanti et
    /// al. 2022, Fig. 5: all-gather the sequence after each norm, column-parallel then
    /// row-parallel linears, reduce-scatter the sequence before each residual add.
    ///
    /// With packed documents (`packed`), RoPE rotates by positions within each document and
    /// attention stays inside each. With `mlp_tile`, the MLP runs that many tokens at a time
    /// ([`tiled_mlp`](super::tiled_mlp)).
    ///
    /// # Shapes
    /// `x`: `[b, s_r, h]` -> `[b, s_r, h]`.
    pub(super) fn block_forward(
        &self,
        tape: &Tape,
        block: &Block,
        x: &Tensor,
        packed: Option<&Packed>,
        mlp_tile: Option<i64>,
    ) -> Result<Tensor> {
        let layout = self.strategy.layout();
        let (b, d) = (x.size()[0], self.cfg.head_dim());
        let (hq, hkv) = self.heads; // this rank's heads
        let tp = self.strategy.tensor_parallel();
        // Megatron-SP's all-gather of the sequence into a column-parallel linear (the shard kept,
        // gathered again in the backward, as Megatron-LM does); a plain linear otherwise.
        // [b, s_r, h] -> [b, t, out], t = N or s_r
        let gathered = |linear: &Linear, x: Tensor| match tp {
            Some(g) => linear.forward_gathered(tape, g, &x, layout.lens()),
            None => linear.forward(&x),
        };
        // [b, N, h] partial sums -> [b, s_r, h] summed
        let scatter = |y: Tensor| match tp {
            Some(g) => tape.reduce_scatter_v(g, &y, 1, layout.lens()),
            None => Ok(y),
        };
        let qkv = gathered(&block.qkv, block.ln1.forward(x)?)?; // [b, t, (hq + 2 hkv) d]
        let t = qkv.size()[1];
        let part = |start: i64, heads: i64| -> Result<Tensor> {
            // [b, t, (hq + 2 hkv) d] -> [b, t, heads, d]
            qkv.f_narrow(2, start * d, heads * d).and_then(|t_| t_.f_reshape([b, t, heads, d])).op("gpt")
        };
        let rope = packed.map_or(&self.rope, |p| &p.rope);
        let q = rope.forward(&part(0, hq)?)?;
        let k = rope.forward(&part(hq, hkv)?)?;
        let v = part(hq + hkv, hkv)?;
        let docs = packed.map(|p| &p.docs);
        // [b, t, hq, d] -> [b, t, hq d]
        let o = self.strategy.forward_docs(tape, &q, &k, &v, docs)?.f_reshape([b, t, hq * d]).op("gpt")?;
        let x = x.f_add(&block.proj.forward_reduced(&o, scatter)?).op("gpt")?;
        // A tiled MLP is a taped op fed from the residual stream, which the residual add below
        // feeds as well: a cut there lets the tape's backward meet both at one tensor.
        let x = if mlp_tile.is_some() { tape.cut(&x)? } else { x };
        let u = block.ln2.forward(&x)?;
        let y = match (mlp_tile, tp) {
            (None, _) => {
                let m = mlp_activation(self.cfg.mlp, &gathered(&block.fc, u)?)?;
                block.fc_out.forward_reduced(&m, scatter)?
            }
            (Some(tile), None) => {
                let mlp = Mlp { kind: self.cfg.mlp, fc: block.fc.shallow(), out: block.fc_out.shallow() };
                tiled_mlp(tape, mlp, &u, tile)?
            }
            (Some(tile), Some(g)) => {
                return Err(Error::InvalidArgument {
                    op: "tiled_mlp",
                    group: g.info().to_string(),
                    msg: format!(
                        "an MLP tile of {tile} tokens with Megatron-SP: its MLP runs on the \
                         all-gathered sequence between two collectives, which tiling would split \
                         (use Ulysses, ring or USP with a tiled MLP)"
                    ),
                })
            }
        };
        x.f_add(&y).op("gpt")
    }
}

/// The MLP's activation on the output of its first matrix.
///
/// # Shapes
/// GELU: `[.., F]` -> `[.., F]`; SwiGLU: `[.., 2F]` (gate, then up) -> `[.., F]`.
pub(super) fn mlp_activation(kind: MlpKind, x: &Tensor) -> Result<Tensor> {
    match kind {
        MlpKind::Gelu => x.f_gelu("tanh").op("gpt"),
        MlpKind::Swiglu => {
            let f = x.size().last().copied().unwrap_or(0) / 2;
            // [.., 2F] -> [.., F] x [.., F]
            let (gate, up) = (x.f_narrow(-1, 0, f).op("gpt")?, x.f_narrow(-1, f, f).op("gpt")?);
            gate.f_silu().and_then(|g| g.f_mul(&up)).op("gpt")
        }
    }
}

/// A packed batch: its documents, and the rotation of its positions within them.
pub(super) struct Packed {
    pub docs: Documents,
    pub rope: Rope,
}

/// [`shift_labels`] for packed documents: the last token of every document has no label (its
/// next token starts another document), so no target crosses a document boundary.
///
/// # Shapes
/// `[b, N]` -> `[b, N]`.
pub fn shift_labels_packed(tokens: &Tensor, docs: &Documents) -> Result<Tensor> {
    let labels = shift_labels(tokens)?;
    let (b, n) = (tokens.size()[0], tokens.size()[1]);
    if b != docs.samples() as i64 || n != docs.global_len() {
        return Err(Error::Shape {
            op: "shift_labels",
            shapes: vec![tokens.size()],
            msg: format!(
                "the documents describe {} sample(s) of {} tokens",
                docs.samples(),
                docs.global_len()
            ),
        });
    }
    for s in 0..docs.samples() {
        for &end in &docs.offsets(s)[1..] {
            // the last token of the document ending at `end`
            let _ = labels
                .f_get(s as i64)
                .and_then(|row| row.f_get(end - 1)?.f_fill_(IGNORE))
                .op("shift_labels")?;
        }
    }
    Ok(labels)
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
