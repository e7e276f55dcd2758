//! DeepSpeed-Ulysses (Jacobs et al. 2023, §3.1, Figure 2): all-to-all re-sharding of heads and
//! sequence around any attention kernel.
//!
//! Each rank holds a contiguous slice of the sequence (`s_r` of N tokens). Per layer:
//!
//! ```text
//! q [b, s_r, H, d], k, v [b, s_r, H_kv, d]           this rank's tokens, every head
//!   | all-to-all: scatter heads (dim 2), gather sequence (dim 1)
//! q [b, N, H_r, d], k, v [b, N, KV_r, d]             every token, this rank's heads
//!   | expand kv to one per query head, then the local kernel (any: dense, flash, sparse)
//! o [b, N, H_r, d]
//!   | all-to-all: scatter sequence (dim 1), gather heads (dim 2)
//! o [b, s_r, H, d]
//! ```
//!
//! Communication per layer and rank, forward (paper §3.2; docs/design.md §2.2), for P dividing N and
//! the heads: q, k, v and o each cross one all-to-all, `(2Nh + 2N H_kv d)(P-1)/P^2` elements
//! times b; the backward runs the same four all-to-alls in reverse (the adjoint of an all-to-all
//! swaps its dims), so forward and backward move twice that. When kv heads must be replicated
//! (H_kv < P, MQA) each rank receives its `KV_r` kv heads, which is more than H_kv/P.
//!
//! Limits, and what happens instead: N not divisible by P is exact (uneven shares, see
//! [`SeqLayout`]); H not divisible by P is exact (uneven heads, see [`HeadPlan`]); H < P is an
//! error (every rank needs a head; the Ulysses x ring hybrid lifts this).

use std::sync::Arc;

use tch::Tensor;

use super::single::{check_docs, check_shapes};
use super::{Documents, HeadPlan, LocalAttention, SeqLayout, SequenceParallel};
use crate::autograd::Tape;
use crate::comm::{AllToAll, Group};
use crate::Result;

/// Ulysses attention over a sequence-parallel group.
pub struct UlyssesAttention {
    group: Group,
    local: Arc<dyn LocalAttention>,
    layout: SeqLayout,
    heads: HeadPlan,
    /// q: scatter heads, gather sequence.
    q_a2a: AllToAll,
    /// k, v: the same with kv head counts.
    kv_a2a: AllToAll,
}

impl UlyssesAttention {
    /// Ulysses over `group` for sequences of `n` tokens, `heads` query and `kv_heads` key/value
    /// heads, with `local` as the kernel on whole sequences.
    pub fn new(
        group: Group,
        local: Box<dyn LocalAttention>,
        n: i64,
        heads: i64,
        kv_heads: i64,
    ) -> Result<UlyssesAttention> {
        let p = group.size();
        let layout = SeqLayout::contiguous(n, p)?;
        let heads = HeadPlan::new(heads, kv_heads, p)?;
        let q_a2a = AllToAll::new(2, 1, heads.q_split().to_vec(), layout.lens().to_vec());
        let kv_a2a = AllToAll::new(2, 1, heads.kv_split(), layout.lens().to_vec());
        Ok(UlyssesAttention { group, local: Arc::from(local), layout, heads, q_a2a, kv_a2a })
    }

    /// The head assignment.
    pub fn heads(&self) -> &HeadPlan {
        &self.heads
    }

    /// The kernel that runs on whole sequences.
    pub fn local(&self) -> &dyn LocalAttention {
        self.local.as_ref()
    }
}

impl SequenceParallel for UlyssesAttention {
    fn name(&self) -> &'static str {
        "ulysses"
    }

    fn layout(&self) -> &SeqLayout {
        &self.layout
    }

    fn rank(&self) -> usize {
        self.group.rank()
    }

    fn group(&self) -> Option<&Group> {
        Some(&self.group)
    }

    /// # Shapes
    /// `q`: `[b, s_r, H, d]`, `k`, `v`: `[b, s_r, H_kv, d]` -> `[b, s_r, H, d]`.
    fn forward_docs(
        &self,
        tape: &Tape,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        docs: Option<&Documents>,
    ) -> Result<Tensor> {
        let r = self.group.rank();
        check_shapes("ulysses", &self.layout, &self.heads, r, q, k, v)?;
        check_docs("ulysses", docs, q, &self.layout, self.local.as_ref())?;
        // [b, s_r, H_kv, d] -> [b, s_r, sum(KV_r), d]: each kv head once per rank that needs it
        let (k, v) = (self.heads.replicate_kv(k)?, self.heads.replicate_kv(v)?);
        // [b, s_r, H, d] -> [b, N, H_r, d]; [b, s_r, sum(KV_r), d] -> [b, N, KV_r, d]
        // One record for the three: they usually come from one fused projection.
        let full =
            tape.all_to_all_many(&self.group, &[(q, &self.q_a2a), (&k, &self.kv_a2a), (&v, &self.kv_a2a)])?;
        let [q, k, v] = [&full[0], &full[1], &full[2]];
        // [b, N, KV_r, d] -> [b, N, H_r, d]
        let (k, v) = (self.heads.expand_kv(r, k)?, self.heads.expand_kv(r, v)?);
        // The attention core on whole sequences (each packed document on its own): recomputed
        // in the backward under selective recomputation.
        let (local, docs) = (Arc::clone(&self.local), docs.cloned());
        let o = tape.recomputable("attention_core", &[q, &k, &v], move |x| {
            local.forward_docs(&x[0], &x[1], &x[2], docs.as_ref())
        })?;
        // [b, N, H_r, d] -> [b, s_r, H, d]
        tape.all_to_all_v(&self.group, &o, 1, 2, self.layout.lens(), self.heads.q_split())
    }

    /// # Shapes
    /// As `forward`; lse `[b, N, H_r]` -> `[b, s_r, H]` by the same all-to-all as the output.
    fn forward_lse_docs(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        docs: Option<&Documents>,
    ) -> Result<(Tensor, Tensor)> {
        let r = self.group.rank();
        check_shapes("ulysses", &self.layout, &self.heads, r, q, k, v)?;
        check_docs("ulysses", docs, q, &self.layout, self.local.as_ref())?;
        let _no_grad = tch::no_grad_guard();
        let (k, v) = (self.heads.replicate_kv(k)?, self.heads.replicate_kv(v)?);
        let g = &self.group;
        // [b, s_r, H, d] -> [b, N, H_r, d]; [b, s_r, sum(KV_r), d] -> [b, N, KV_r, d] -> [b, N, H_r, d]
        let q = g.all_to_all_spec(q, &self.q_a2a)?;
        let k = self.heads.expand_kv(r, &g.all_to_all_spec(&k, &self.kv_a2a)?)?;
        let v = self.heads.expand_kv(r, &g.all_to_all_spec(&v, &self.kv_a2a)?)?;
        let (o, lse) = self.local.forward_lse_docs(&q, &k, &v, docs)?;
        // [b, N, H_r, ..] -> [b, s_r, H, ..]
        let back = |t: &Tensor| g.all_to_all_v(t, 1, 2, self.layout.lens(), self.heads.q_split());
        Ok((back(&o)?, back(&lse)?))
    }
}
