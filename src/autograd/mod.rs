//! Differentiable communication: an explicit tape (docs/design.md §3.2).
//!
//! tch has no custom autograd functions, so a collective cannot sit inside libtorch's graph.
//! Instead each rank keeps a [`Tape`] for one training step:
//!
//! - A taped op runs its forward outside autograd and returns fresh leaf tensors that require
//!   grad; the tape records (inputs, outputs, adjoint).
//! - [`Tape::backward`] runs autograd from the loss, then walks the records in reverse. For each
//!   it takes the gradients accumulated on the outputs, applies the adjoint (the all-to-all with
//!   dims swapped, all-gather for reduce-scatter, ...), and continues autograd from the inputs with
//!   those gradients (libtorch's autograd engine from the inputs' gradient edges, through a small
//!   C++ shim, csrc/backward.cpp, since tch only starts autograd from a scalar).
//!
//! What a record keeps (Korthikanti et al. 2022 count activations the same way): the graph of
//! its inputs (their gradient edges, not the tensors: an input's values stay alive only if the
//! graph itself saved them), its outputs (which the graph downstream holds anyway, through
//! their gradient accumulators), and what its adjoint captured (nothing for a collective; the
//! blocks and log-sum-exp for ring attention; the local shard for Megatron-SP's gathered
//! linear). Holding the input tensors instead kept Ulysses' post-RoPE q and k and, through the
//! `v` view, the whole fused qkv buffer of every layer alive until the backward.
//!
//! Why it is correct: record i's outputs are consumed only by the loss or by later records, and
//! those were all back-propagated before record i is reached, so its output gradients are
//! complete when read. Every rank records the same ops in the same order (SPMD code), so the
//! adjoint collectives match across ranks; a taped op is therefore recorded whether or not its
//! inputs require grad.
//!
//! Why it stays cheap (the quadratic trap): each autograd pass runs from one record's inputs down
//! to the leaves it reaches. A non-leaf tensor that feeds two records (or a record and the loss)
//! would be traversed by both passes; along a residual stream that is every earlier layer,
//! again and again. [`Tape::cut`] puts a leaf on the stream (an identity op, no copy) at each
//! block boundary, so every piece of the graph lies between two records and is traversed once,
//! and libtorch frees each piece after its pass. Without the cuts the second pass fails with
//! "backward through the graph a second time", reported as [`Error::Tape`] with this advice.
//!
//! A [`Tape::disabled`] tape records nothing. Its collectives still run, but their outputs carry
//! a grad_fn that fails: a plain `loss.backward()` that reaches one stops with an error naming
//! the collective, instead of silently dropping every gradient upstream of it.

mod collectives;
mod ffi;
mod gathered;

pub(crate) use ffi::{clear_grad, resize_storage, storage_nbytes};

use std::cell::{Cell, RefCell};

use tch::Tensor;

use self::ffi::GradEdge;
use crate::error::TorchResultExt;
use crate::{Error, Result};

/// Maps the gradients of a record's outputs to the gradients of its inputs, communicating as
/// needed. Runs on the rank's own thread during [`Tape::backward`].
pub type Adjoint = Box<dyn FnOnce(&[Tensor]) -> Result<Vec<Tensor>>>;

/// What a record keeps of one input: its shape and dtype (to check the adjoint's gradient) and,
/// if it requires grad, its gradient edge (where autograd continues), not its values.
struct Input {
    size: Vec<i64>,
    kind: tch::Kind,
    edge: Option<GradEdge>,
}

impl Input {
    fn of(op: &'static str, x: &Tensor) -> Result<Input> {
        let edge = if x.requires_grad() {
            Some(GradEdge::of(x).map_err(|msg| Error::Tape { op, msg })?)
        } else {
            None
        };
        Ok(Input { size: x.size(), kind: x.kind(), edge })
    }
}

struct Record {
    op: &'static str,
    inputs: Vec<Input>,
    outputs: Vec<Tensor>,
    adjoint: Adjoint,
}

/// One rank's record of the differentiable communication of one step.
pub struct Tape {
    records: RefCell<Vec<Record>>,
    recording: Cell<bool>,
    /// Whether [`recomputable`](Tape::recomputable) ops keep only their inputs (selective
    /// activation recomputation).
    recompute: Cell<bool>,
    /// Whether a caller may back-propagate through the autograd graphs of the ops run on this
    /// tape (false only for [`forward_only`](Tape::forward_only)).
    graphs: bool,
}

impl Default for Tape {
    fn default() -> Self {
        Tape::new()
    }
}

impl Tape {
    fn with(recording: bool, graphs: bool) -> Tape {
        Tape {
            records: RefCell::new(Vec::new()),
            recording: Cell::new(recording),
            recompute: Cell::new(false),
            graphs,
        }
    }

    /// A tape that records (for training steps).
    pub fn new() -> Tape {
        Tape::with(true, true)
    }

    /// A tape that records nothing, for evaluation and for single-device code trained with an
    /// ordinary `loss.backward()`: cuts are plain identities that keep the graph, taped
    /// collectives run, and their outputs fail in the backward (a `loss.backward()` that reaches
    /// one is an error naming the op, not a gradient silently missing upstream of it);
    /// [`backward`](Tape::backward) is an error.
    pub fn disabled() -> Tape {
        Tape::with(false, true)
    }

    /// A tape for a forward whose results no backward will use, neither through a tape nor
    /// through autograd: the first pass of a checkpointed block, run in grad mode so that it
    /// picks the kernels its recomputation will, and detached at its end. It records nothing, as
    /// [`disabled`](Tape::disabled), and ops that can may drop their autograd graphs as they go
    /// (the tiled MLP drops each tile's), which a disabled tape's ops must keep for a
    /// `loss.backward()`.
    pub fn forward_only() -> Tape {
        Tape::with(false, false)
    }

    /// Whether the autograd graphs of ops run on this tape may be back-propagated through (and
    /// must be kept): false only for [`forward_only`](Tape::forward_only).
    pub fn keeps_graphs(&self) -> bool {
        self.graphs
    }

    /// Whether ops are recorded.
    pub fn is_recording(&self) -> bool {
        self.recording.get()
    }

    /// Number of records so far.
    pub fn len(&self) -> usize {
        self.records.borrow().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Names of the recorded ops, in order.
    pub fn ops(&self) -> Vec<&'static str> {
        self.records.borrow().iter().map(|r| r.op).collect()
    }

    /// Drops every record (and the activations they keep alive) without a backward.
    pub fn clear(&self) {
        self.records.borrow_mut().clear();
    }

    /// Runs `forward` on detached copies of `inputs` (outside autograd) and records its outputs
    /// as leaves that require grad, with `adjoint` as their backward. The general form of every
    /// taped op; composite ops with a hand-written backward (ring attention) use it directly.
    pub fn record(
        &self,
        op: &'static str,
        inputs: &[&Tensor],
        forward: impl FnOnce(&[Tensor]) -> Result<Vec<Tensor>>,
        adjoint: impl FnOnce(&[Tensor]) -> Result<Vec<Tensor>> + 'static,
    ) -> Result<Vec<Tensor>> {
        let detached: Vec<Tensor> = inputs.iter().map(|x| x.detach()).collect();
        if !self.recording.get() {
            // Every output, whether or not this rank's inputs require grad: a gradient that
            // would cross the collective may belong to another rank's inputs.
            let outputs = tch::no_grad(|| forward(&detached))?;
            return outputs.iter().map(|y| not_differentiable(op, y)).collect();
        }
        let recorded: Vec<Input> = inputs.iter().map(|x| Input::of(op, x)).collect::<Result<_>>()?;
        let outputs = tch::no_grad(|| forward(&detached))?;
        drop(detached);
        let leaves: Vec<Tensor> = outputs.iter().map(|y| y.detach().set_requires_grad(true)).collect();
        self.records.borrow_mut().push(Record {
            op,
            inputs: recorded,
            outputs: leaves.iter().map(Tensor::shallow_clone).collect(),
            adjoint: Box::new(adjoint),
        });
        Ok(leaves)
    }

    /// A cut on the residual stream: identity forward (no copy) and identity backward. Put one at
    /// every block boundary so that the backward traverses each block once. On a disabled tape,
    /// a plain identity that keeps the graph.
    pub fn cut(&self, x: &Tensor) -> Result<Tensor> {
        if !self.recording.get() {
            return Ok(x.shallow_clone());
        }
        let out = self.record(
            "cut",
            &[x],
            |xs| Ok(vec![xs[0].shallow_clone()]),
            |gs| Ok(gs.iter().map(Tensor::shallow_clone).collect()),
        )?;
        single("cut", out)
    }

    /// Drops the values of every recorded output that is `x` (the same storage and size),
    /// keeping its shape, dtype and gradient: a recorded output is kept only to meet its gradient,
    /// so once every consumer of `x` has kept what it needs (activation offload: a
    /// checkpointed block's input, moved off the device), its memory can go. Each such output
    /// then reads as a broadcast zero of one element. Returns how many were released.
    pub fn release_values(&self, x: &Tensor) -> Result<usize> {
        let (ptr, numel) = (x.data_ptr(), x.numel());
        let mut released = 0;
        for rec in self.records.borrow().iter() {
            for y in &rec.outputs {
                if y.numel() == numel && numel > 0 && y.data_ptr() == ptr {
                    let placeholder = Tensor::f_zeros([1], (y.kind(), y.device()))
                        .and_then(|z| z.f_expand(y.size(), false))
                        .map_err(|e| Error::Tape { op: rec.op, msg: format!("releasing a value: {e}") })?;
                    y.shallow_clone().set_data(&placeholder);
                    released += 1;
                }
            }
        }
        Ok(released)
    }

    /// Sets whether [`recomputable`](Tape::recomputable) ops (the attention cores of the
    /// strategies) keep only their inputs and run again in the backward: selective activation
    /// recomputation (Korthikanti et al. 2022, §5). Returns the previous setting.
    pub fn set_recompute(&self, on: bool) -> bool {
        self.recompute.replace(on)
    }

    /// Whether [`recomputable`](Tape::recomputable) ops are recomputed in the backward.
    pub fn recomputes(&self) -> bool {
        self.recompute.get()
    }

    /// `f(inputs)` as an ordinary differentiable computation, or, when the tape
    /// [recomputes](Tape::set_recompute), as a record that keeps only `inputs`: its forward
    /// runs `f` and drops the activations, its backward runs `f` again under autograd and
    /// back-propagates through it. `f` must be deterministic and must not communicate (the
    /// strategies' attention cores). Both runs have grad mode on, so they pick the same kernels
    /// and the recomputed output is the forward's, bit for bit.
    pub fn recomputable(
        &self,
        op: &'static str,
        inputs: &[&Tensor],
        f: impl Fn(&[Tensor]) -> Result<Tensor> + 'static,
    ) -> Result<Tensor> {
        if !self.recording.get() || !self.recompute.get() {
            let xs: Vec<Tensor> = inputs.iter().map(|x| x.shallow_clone()).collect();
            return f(&xs);
        }
        let f = std::rc::Rc::new(f);
        let (run, saved) = (std::rc::Rc::clone(&f), inputs.iter().map(|x| x.detach()).collect::<Vec<_>>());
        let out = self.record(
            op,
            inputs,
            |xs| Ok(vec![tch::with_grad(|| run(xs))?.detach()]),
            move |gs| {
                let xs: Vec<Tensor> = saved.iter().map(|x| x.set_requires_grad(true)).collect();
                let y = tch::with_grad(|| f(&xs))?;
                continue_from_tensors(op, &[y], gs)?;
                xs.iter().map(|x| grad_or_zeros(op, x)).collect()
            },
        )?;
        single(op, out)
    }

    /// Back-propagates `loss` through the graph and every record, in reverse order, then empties
    /// the tape. Parameter gradients accumulate in their `.grad()` as with `loss.backward()`.
    /// Every rank of every group used must call it (the adjoints communicate).
    pub fn backward(&self, loss: &Tensor) -> Result<()> {
        self.check_recording()?;
        let records = self.records.take();
        if loss.requires_grad() {
            loss.f_backward().map_err(|e| traversal_error("loss", e.to_string()))?;
        }
        walk(records)
    }

    /// As [`backward`](Tape::backward), starting from `outputs` with gradients `grads` instead
    /// of from a scalar loss (a recomputed block inside an outer tape's backward).
    pub fn backward_from(&self, outputs: &[Tensor], grads: &[Tensor]) -> Result<()> {
        self.check_recording()?;
        let records = self.records.take();
        continue_from_tensors("backward_from", outputs, grads)?;
        walk(records)
    }

    fn check_recording(&self) -> Result<()> {
        if self.recording.get() {
            return Ok(());
        }
        Err(Error::Tape {
            op: "backward",
            msg: "this tape was made with Tape::disabled() and recorded nothing".into(),
        })
    }
}

/// Every record, last first: its adjoint, then autograd from its inputs.
fn walk(records: Vec<Record>) -> Result<()> {
    for rec in records.into_iter().rev() {
        // An output unused on this rank gets zeros: its adjoint must still run (it communicates).
        let grads: Vec<Tensor> =
            rec.outputs.iter().map(|y| grad_or_zeros(rec.op, y)).collect::<Result<_>>()?;
        let input_grads = (rec.adjoint)(&grads)?;
        continue_from(rec.op, &rec.inputs, &input_grads)?;
    }
    Ok(())
}

/// `x`'s accumulated gradient, or zeros where nothing reached it.
fn grad_or_zeros(op: &'static str, x: &Tensor) -> Result<Tensor> {
    let g = x.grad();
    if g.defined() {
        Ok(g)
    } else {
        x.f_zeros_like().op(op)
    }
}

/// As [`continue_from`], from tensors at hand (a recomputed output, a nested tape's outputs).
fn continue_from_tensors(op: &'static str, xs: &[Tensor], grads: &[Tensor]) -> Result<()> {
    let inputs: Vec<Input> = xs.iter().map(|x| Input::of(op, x)).collect::<Result<_>>()?;
    continue_from(op, &inputs, grads)
}

/// Continues autograd from `inputs` with the gradients `grads`, in one pass (libtorch's engine
/// from the inputs' gradient edges); inputs that do not require grad are skipped.
fn continue_from(op: &'static str, inputs: &[Input], grads: &[Tensor]) -> Result<()> {
    if inputs.len() != grads.len() {
        return Err(Error::Tape {
            op,
            msg: format!("the adjoint returned {} gradients for {} inputs", grads.len(), inputs.len()),
        });
    }
    let (mut roots, mut root_grads) = (Vec::new(), Vec::new());
    for (x, g) in inputs.iter().zip(grads) {
        let Some(edge) = &x.edge else { continue };
        if g.size() != x.size || g.kind() != x.kind {
            return Err(Error::Tape {
                op,
                msg: format!(
                    "adjoint gradient {:?}{:?} for an input {:?}{:?}",
                    g.kind(),
                    g.size(),
                    x.kind,
                    x.size
                ),
            });
        }
        roots.push(edge);
        root_grads.push(g);
    }
    if roots.is_empty() {
        return Ok(());
    }
    ffi::backward_from_edges(&roots, &root_grads).map_err(|msg| traversal_error(op, msg))
}

/// `y` (an output of a collective run without a recording tape) as a tensor whose backward
/// fails, naming `op`.
fn not_differentiable(op: &'static str, y: &Tensor) -> Result<Tensor> {
    let out = y.detach();
    if !out.is_floating_point() {
        return Ok(out); // integers carry no gradient
    }
    let msg = format!(
        "tape {op}: the backward reached {op}, which ran on a Tape::disabled() and recorded no \
         adjoint, so the gradients upstream of it would be lost; train with Tape::new() and \
         tape.backward(&loss), or evaluate under tch::no_grad"
    );
    ffi::fail_in_backward(&out, &msg).map_err(|msg| Error::Tape { op, msg })?;
    Ok(out)
}

fn traversal_error(op: &'static str, text: String) -> Error {
    let text = crate::error::libtorch_message(&text);
    let msg = if text.contains("second time") {
        format!(
            "a part of the graph feeds more than one taped op (or the loss and a taped op), so \
             backward reached it twice; put `tape.cut(x)` on the tensor that feeds several \
             (the residual stream at each block boundary). libtorch: {text}"
        )
    } else {
        format!("backward failed: {text}")
    };
    Error::Tape { op, msg }
}

/// The one output of a single-output record.
pub(crate) fn single(op: &'static str, mut outputs: Vec<Tensor>) -> Result<Tensor> {
    match (outputs.pop(), outputs.is_empty()) {
        (Some(y), true) => Ok(y),
        _ => Err(Error::Tape { op, msg: "expected exactly one output".into() }),
    }
}
