//! Activation checkpointing and the block boundaries where training code steps in.
//!
//! - **Full** recomputation (Chen et al. 2016; Korthikanti et al. 2022, §5): each block is one
//!   taped record that keeps only its input. Its forward runs the block and drops every
//!   activation; its backward runs the block again on a nested [`Tape`], so the block's
//!   collectives (Ulysses' all-to-alls, Megatron-SP's all-gathers, ring passes) run again and
//!   are back-propagated through that tape, then hands the input's gradient on.
//! - **Selective** recomputation keeps the block's activations except the attention core's,
//!   which the strategies rerun in the backward ([`Tape::recomputable`]). Ring attention and
//!   USP need nothing for it: their hand-written backward already keeps only q, k, v, the
//!   output and the log-sum-exp and recomputes each block of scores.
//! - **Hooks** ([`BlockHooks`]) are called before and after each unit's forward and backward:
//!   ZeRO-3 gathers a block's parameters before it runs and frees them after, and ZeRO-2/3
//!   reduce-scatter a block's gradients as soon as its backward is done. The backward calls come
//!   from the cuts between blocks, which the tape walks in reverse order.
//!
//! Both forwards of a recomputed block run with grad mode on, so they pick the same kernels and
//! produce the same values: gradients equal those of the run without recomputation.

use std::rc::Rc;

use tch::Tensor;

use super::Gpt;
use crate::autograd::{single, Tape};
use crate::Result;

/// A set of parameters that ZeRO-3 gathers and frees together: a transformer block, or the
/// embedding, final norm and head ("outer").
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Unit {
    Outer,
    Block(usize),
}

impl Unit {
    /// "outer", "block 3".
    pub fn name(self) -> String {
        match self {
            Unit::Outer => "outer".into(),
            Unit::Block(i) => format!("block {i}"),
        }
    }
}

/// What a training loop does at the boundaries of the units (ZeRO-2/3). `before_forward` and
/// `after_forward` run in the forward; `before_backward` and `after_backward` run in the tape's
/// backward (of the outer unit, in [`Gpt::backward`]).
pub trait BlockHooks {
    fn before_forward(&self, unit: Unit) -> Result<()>;
    fn after_forward(&self, unit: Unit) -> Result<()>;
    fn before_backward(&self, unit: Unit) -> Result<()>;
    fn after_backward(&self, unit: Unit) -> Result<()>;
}

/// How the forward keeps activations and computes the loss.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ForwardOptions {
    /// Keep only each block's input and run the block again in the backward (full).
    pub recompute_blocks: bool,
    /// Run the attention cores again in the backward (selective).
    pub recompute_attention: bool,
    /// Compute the logits and the cross-entropy this many tokens at a time, so that the whole
    /// `[s, V]` logits never exist at once (ALST's tiled loss). `None`: all at once.
    pub loss_tile: Option<i64>,
    /// Run each block's MLP this many tokens at a time, keeping only its input and recomputing
    /// each tile in the backward, so that its `[s, F]` intermediates never exist whole (ALST's
    /// tiled MLP). `None`: all at once.
    pub mlp_tile: Option<i64>,
}

impl Gpt {
    /// Sets how activations are kept and how the loss is computed.
    pub fn set_options(&mut self, options: ForwardOptions) {
        self.options = options;
    }

    pub fn options(&self) -> ForwardOptions {
        self.options
    }

    /// Moves each block's input off the device after its forward and back, one block ahead, for
    /// its backward (activation offload; with full checkpointing, on a recording tape). `None`:
    /// kept on the device.
    pub fn set_offload(&mut self, offload: Option<super::Offload>) {
        self.offload = offload.map(Rc::new);
    }

    /// The offload store, if any.
    pub fn offload(&self) -> Option<&super::Offload> {
        self.offload.as_deref()
    }

    /// Sets the hooks called at unit boundaries (`None`: no hooks). With hooks the model must
    /// run on a recording tape and back-propagate through [`Gpt::backward`].
    pub fn set_hooks(&mut self, hooks: Option<Rc<dyn BlockHooks>>) {
        self.hooks = hooks;
    }

    /// A cut on the residual stream whose backward first finishes block `after` and then
    /// begins block `before` (each hook only when hooks are set).
    pub(super) fn boundary(
        &self,
        tape: &Tape,
        x: &Tensor,
        after: Option<usize>,
        before: Option<usize>,
    ) -> Result<Tensor> {
        let Some(hooks) = &self.hooks else { return tape.cut(x) };
        let hooks = Rc::clone(hooks);
        let out = tape.record(
            "cut",
            &[x],
            |xs| Ok(vec![xs[0].shallow_clone()]),
            move |gs| {
                if let Some(i) = after {
                    hooks.after_backward(super::Unit::Block(i))?;
                }
                if let Some(i) = before {
                    hooks.before_backward(super::Unit::Block(i))?;
                }
                Ok(gs.iter().map(Tensor::shallow_clone).collect())
            },
        )?;
        single("cut", out)
    }

    /// Block `i` as one record that keeps only its input `x` (full recomputation); with offload,
    /// not even that: the input goes to the offload store once the block has run, the tape's
    /// own references to it are released, and the backward takes it back (and starts bringing
    /// block `i - 1`'s).
    ///
    /// # Shapes
    /// `x`: `[b, s_r, h]` -> `[b, s_r, h]`.
    pub(super) fn checkpointed_block(
        &self,
        tape: &Tape,
        i: usize,
        x: &Tensor,
        packed: Option<Rc<super::gpt::Packed>>,
    ) -> Result<Tensor> {
        let (core, block) = (Rc::clone(&self.core), Rc::clone(&self.blocks[i]));
        let offload = self.offload.clone().filter(|_| tape.is_recording());
        let first = (Rc::clone(&core), Rc::clone(&block));
        let saved = if offload.is_some() { None } else { Some(x.detach()) };
        let back = offload.clone();
        let first_packed = packed.clone();
        let tile = self.options.mlp_tile;
        let out = tape.record(
            "checkpoint",
            &[x],
            // The block without recording: its collectives run, its graph is dropped at once
            // (a tiled MLP's tile by tile: no backward goes through this pass).
            |xs| {
                Ok(vec![tch::with_grad(|| {
                    first.0.block_forward(
                        &Tape::forward_only(),
                        &first.1,
                        &xs[0],
                        first_packed.as_deref(),
                        tile,
                    )
                })?
                .detach()])
            },
            move |gs| {
                let x = match (saved, back) {
                    (Some(x), _) => x,
                    (None, Some(store)) => {
                        let x = store.take(i)?;
                        if let Some(before) = i.checked_sub(1) {
                            store.prefetch(before)?;
                        }
                        x
                    }
                    (None, None) => {
                        return Err(crate::Error::Tape {
                            op: "checkpoint",
                            msg: format!("block {i} kept no input and has no offload store"),
                        })
                    }
                };
                let x = x.set_requires_grad(true);
                let inner = Tape::new();
                let y = tch::with_grad(|| core.block_forward(&inner, &block, &x, packed.as_deref(), tile))?;
                inner.backward_from(&[y], gs)?;
                let g = x.grad();
                Ok(vec![if g.defined() { g } else { x.zeros_like() }])
            },
        )?;
        if let Some(store) = &offload {
            store.put(i, x)?;
            tape.release_values(x)?;
        }
        single("checkpoint", out)
    }
}
