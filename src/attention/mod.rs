//! Attention: kernels that attend over whole sequences for some heads ([`LocalAttention`]), and
//! the sequence-parallel strategies that feed them ([`SequenceParallel`]).
//!
//! A strategy receives each rank's slice of the sequence, moves data so that some kernel can see
//! whole sequences, and returns the rank's slice of the output. Ulysses
//! ([`UlyssesAttention`]) re-shards heads and sequence with all-to-alls around any kernel; the
//! single-device strategy ([`SingleDevice`]) is the reference it is checked against.

mod allgather_kv;
mod blocked;
mod blockwise;
mod chunked;
mod documents;
mod flash;
mod heads;
mod layout;
mod lse;
mod mask;
mod math;
mod megatron_sp;
mod ring;
mod sdpa;
mod single;
mod strategy;
mod ulysses;
mod usp;

pub use allgather_kv::AllGatherKv;
pub use blocked::BlockedAttention;
pub use blockwise::Work;

/// Pairs of two runs of positions the mask allows (what a blockwise kernel must compute of
/// them).
pub fn visible_in_block(mask: &Mask, q: (i64, i64), k: (i64, i64)) -> u64 {
    blockwise::visible_pairs(mask, q, k)
}
pub use chunked::ChunkedUlysses;
pub use documents::{imbalance, Documents};
pub use heads::HeadPlan;
pub use layout::{SeqLayout, Sharding};
pub use mask::{BlockSparse, Mask};
pub use math::MathAttention;
pub use megatron_sp::MegatronSp;
pub use ring::{RingAttention, RingPlan};
pub use sdpa::SdpaAttention;
pub use single::SingleDevice;
pub use strategy::StrategyConfig;
pub use ulysses::UlyssesAttention;
pub use usp::UspAttention;

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use crate::autograd::Tape;
use crate::comm::Group;
use crate::error::TorchResultExt;
use crate::{Error, Result};

/// Attention over whole sequences, one key/value head per query head.
pub trait LocalAttention: Send + Sync {
    /// A short name for tables and messages ("math", "sdpa", "blocked").
    fn name(&self) -> &'static str;

    /// The rule this kernel applies, on global positions `0..N`.
    fn mask(&self) -> Mask;

    /// # Shapes
    /// `q`, `k`, `v`: `[b, N, h, d]` -> `[b, N, h, d]`.
    fn forward(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor>;

    /// The output and the log-sum-exp of every row under this kernel's mask, without autograd
    /// (computed blockwise in the accumulation dtype, whatever the kernel; see `lse.rs`).
    ///
    /// # Shapes
    /// `q`, `k`, `v`: `[b, N, h, d]` -> out `[b, N, h, d]`, lse `[b, N, h]` (f32, f64 for f64).
    fn forward_lse(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        check_qkv("attention_lse", q, k, v)?;
        let n = q.size()[1];
        lse::attention_lse(&self.mask(), None, q, k, v, &[(0, n)], &[(0, n)])
    }

    /// [`forward`](LocalAttention::forward) over packed documents: each document of each
    /// sample on its own (see [`Documents`]); `None` is the plain forward.
    ///
    /// # Shapes
    /// `q`, `k`, `v`: `[b, N, h, d]` -> `[b, N, h, d]`; `docs` of b samples of N tokens.
    fn forward_docs(&self, q: &Tensor, k: &Tensor, v: &Tensor, docs: Option<&Documents>) -> Result<Tensor> {
        check_qkv("attention", q, k, v)?;
        match docs {
            Some(d) => {
                d.check("attention", q.size()[0], q.size()[1], &self.mask())?;
                if d.is_whole() {
                    return self.forward(q, k, v);
                }
                documents::per_document(d, q, k, v, |q, k, v| self.forward(q, k, v), documents::cat)
            }
            None => self.forward(q, k, v),
        }
    }

    /// [`forward_lse`](LocalAttention::forward_lse) over packed documents.
    ///
    /// # Shapes
    /// As [`forward_docs`](LocalAttention::forward_docs); lse `[b, N, h]`.
    fn forward_lse_docs(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        docs: Option<&Documents>,
    ) -> Result<(Tensor, Tensor)> {
        check_qkv("attention_lse", q, k, v)?;
        match docs {
            Some(d) => {
                d.check("attention_lse", q.size()[0], q.size()[1], &self.mask())?;
                if d.is_whole() {
                    return self.forward_lse(q, k, v);
                }
                documents::per_document(d, q, k, v, |q, k, v| self.forward_lse(q, k, v), documents::cat_pairs)
            }
            None => self.forward_lse(q, k, v),
        }
    }
}

/// Which kernel computes the local attention.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Kernel {
    /// [`MathAttention`]: dense, explicit mask; the reference.
    Math,
    /// [`SdpaAttention`]: libtorch's fused kernels.
    #[default]
    Sdpa,
    /// [`BlockedAttention`]: only the visible key blocks (sliding window, block-sparse).
    Blocked,
}

/// A kernel and its rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct AttentionConfig {
    pub kernel: Kernel,
    pub mask: Mask,
}

impl AttentionConfig {
    pub fn new(kernel: Kernel, mask: Mask) -> AttentionConfig {
        AttentionConfig { kernel, mask }
    }

    /// The kernel, ready to run.
    pub fn build(&self) -> Result<Box<dyn LocalAttention>> {
        self.mask.validate().map_err(|msg| Error::InvalidArgument {
            op: "attention",
            group: "-".into(),
            msg,
        })?;
        Ok(match self.kernel {
            Kernel::Math => Box::new(MathAttention::new(self.mask)),
            Kernel::Sdpa => Box::new(SdpaAttention::new(self.mask)),
            Kernel::Blocked => Box::new(BlockedAttention::new(self.mask)?),
        })
    }
}

/// A way to run attention when each rank holds a slice of the sequence.
///
/// Every rank of the strategy's group calls [`forward`](SequenceParallel::forward) with its own
/// tokens, in the layout given by [`layout`](SequenceParallel::layout); positional encodings
/// are applied by the caller with the global positions of those tokens.
pub trait SequenceParallel {
    /// "single", "ulysses", ...
    fn name(&self) -> &'static str;

    /// How the global sequence is spread over the ranks.
    fn layout(&self) -> &SeqLayout;

    /// This rank's index in the sequence-parallel group.
    fn rank(&self) -> usize;

    /// The sequence-parallel group (`None` on a single device). The loss and the gradients of
    /// replicated parameters are reduced over it.
    fn group(&self) -> Option<&Group>;

    /// The tensor-parallel group for strategies that shard the projections (Megatron-SP): the
    /// model then all-gathers the sequence before each attention and MLP block and
    /// reduce-scatters after it, and its q, k, v hold the whole sequence and this rank's heads.
    /// `None` (the default) for strategies whose parameters are replicated.
    fn tensor_parallel(&self) -> Option<&Group> {
        None
    }

    /// Global positions of the tokens [`forward`](SequenceParallel::forward) receives (for RoPE):
    /// this rank's share of the layout, or the whole sequence for a tensor-parallel strategy.
    fn input_positions(&self, device: tch::Device) -> Result<Tensor> {
        self.layout().positions(self.rank(), device)
    }

    /// # Shapes
    /// `q`: `[b, s_r, H, d]`, `k`, `v`: `[b, s_r, H_kv, d]` -> `[b, s_r, H, d]`, where `s_r` is
    /// this rank's share of the sequence (whole sequence and local heads when tensor-parallel).
    fn forward(&self, tape: &Tape, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
        self.forward_docs(tape, q, k, v, None)
    }

    /// [`forward`](SequenceParallel::forward) over packed documents (`None`: one document per
    /// sample): a query sees only keys of its own document, under the kernel's rule applied
    /// within it. Every rank passes the same documents, those of the whole batch.
    ///
    /// # Shapes
    /// As `forward`; `docs` of b samples of N tokens (the global length).
    fn forward_docs(
        &self,
        tape: &Tape,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        docs: Option<&Documents>,
    ) -> Result<Tensor>;

    /// The forward without autograd, with the log-sum-exp of every attention row (over the
    /// keys its query sees, in the whole sequence): what flash-attention and ring-attention test
    /// suites compare besides the output. Communicates as [`forward`](SequenceParallel::forward)
    /// does; every rank of the group must call it.
    ///
    /// # Shapes
    /// As `forward`; lse `[b, s_r, H]` (local heads when tensor-parallel), f32 (f64 for f64).
    fn forward_lse(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        self.forward_lse_docs(q, k, v, None)
    }

    /// [`forward_lse`](SequenceParallel::forward_lse) over packed documents.
    fn forward_lse_docs(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        docs: Option<&Documents>,
    ) -> Result<(Tensor, Tensor)>;

    /// Positions within their documents of the tokens `forward` receives (what RoPE rotates
    /// packed sequences by): [`input_positions`](SequenceParallel::input_positions) restarted
    /// at every document.
    ///
    /// # Shapes
    /// -> `[b, s_r]` i64 (`[b, N]` when tensor-parallel).
    fn input_positions_docs(&self, docs: &Documents, device: tch::Device) -> Result<Tensor> {
        docs.local_positions(&self.input_positions(device)?)
    }

    /// Which part of the global `[b, N, heads, ..]` tensors each rank holds: its tokens, or (for
    /// a tensor-parallel strategy) its heads. For feeding a strategy global tensors and putting
    /// the ranks' outputs back together.
    fn sharding(&self) -> Sharding {
        Sharding::Sequence(self.layout().clone())
    }
}

/// The dtype attention accumulates in: f32 for half types, the input's own otherwise.
pub(crate) fn compute_kind(kind: Kind) -> Kind {
    match kind {
        Kind::Half | Kind::BFloat16 => Kind::Float,
        k => k,
    }
}

/// Refuses NaN and Inf in the floating-point tensors `named` (name, tensor), naming the tensor,
/// the index and value of its first bad element and how many there are: attention would spread
/// one bad input over whole rows of its output and every gradient.
///
/// Checks CPU tensors only: there it is one pass over memory, next to attention's O(N²) work; on
/// a GPU, reading the answer back would stall the stream at every layer (the training step's own
/// check of the loss and gradients catches non-finite values there).
pub fn check_finite(op: &'static str, named: &[(&str, &Tensor)]) -> Result<()> {
    for (name, t) in named {
        if t.device() != tch::Device::Cpu || !t.is_floating_point() || t.numel() == 0 {
            continue;
        }
        let f = || -> Result<Option<(Vec<i64>, f64, i64)>, tch::TchError> {
            let bad = t.f_isfinite()?.f_logical_not()?;
            if bad.f_any()?.f_int64_value(&[])? == 0 {
                return Ok(None);
            }
            let at = bad.f_nonzero()?; // [count, dims]
            let first = Vec::<i64>::try_from(at.f_get(0)?)?;
            let value = t.f_double_value(&first)?;
            Ok(Some((first, value, at.size()[0])))
        };
        if let Some((index, value, count)) = f().op(op)? {
            return Err(Error::Shape {
                op,
                shapes: vec![t.size()],
                msg: format!(
                    "{name} holds {count} non-finite value(s), the first {value} at {index:?}; \
                     attention would spread it over whole rows and every gradient"
                ),
            });
        }
    }
    Ok(())
}

/// q, k, v must be `[b, N, h, d]` of one shape and dtype.
pub(crate) fn check_qkv(op: &'static str, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<()> {
    let shapes = vec![q.size(), k.size(), v.size()];
    if q.dim() != 4 || shapes.iter().any(|s| *s != shapes[0]) {
        return Err(Error::Shape { op, shapes, msg: "q, k and v must all be [b, N, h, d]".into() });
    }
    if q.kind() != k.kind() || q.kind() != v.kind() {
        let msg = format!("dtypes differ: q {:?}, k {:?}, v {:?}", q.kind(), k.kind(), v.kind());
        return Err(Error::Shape { op, shapes, msg });
    }
    Ok(())
}
