//! Ulysses x ring (USP, Fang and Zhao 2024; "2D attention"): P = R x U ranks, laid out as the
//! mesh `[("ring", R), ("ulysses", U)]` (Ulysses groups are contiguous ranks). The sequence is
//! first spread over the R rings (contiguous or zigzag chunks), then each ring chunk over its U
//! Ulysses ranks. Per layer:
//!
//! ```text
//! q [b, N/P, H, d]   --all-to-all in the Ulysses group (scatter heads, gather the ring chunk)-->
//! q [b, N/R, H/U, d] --ring attention across the R rings (K/V travel)-->  o [b, N/R, H/U, d]
//!                    --all-to-all back-->  o [b, N/P, H, d]
//! ```
//!
//! It lifts Ulysses' limit P <= H: only U must not exceed H. Communication per layer and rank is
//! the Ulysses all-to-alls over U ranks of a sequence of N/R tokens, plus the ring's K/V shifts
//! over R ranks of blocks of N/P tokens with the rank's kv heads.

use tch::Tensor;

use super::ring::RingCore;
use super::single::check_shapes;
use super::{Documents, HeadPlan, Mask, SeqLayout, SequenceParallel, StrategyConfig};
use crate::autograd::Tape;
use crate::comm::{AllToAll, Group, Mesh, MeshShape};
use crate::Result;

/// Ulysses inside groups of `ulysses` ranks, ring attention across them.
pub struct UspAttention {
    sp: Group,
    ulysses: Group,
    ring: RingCore,
    layout: SeqLayout,
    heads: HeadPlan,
    q_a2a: AllToAll,
    kv_a2a: AllToAll,
    /// Token counts of the Ulysses group's ranks (the split of the ring chunk).
    chunk_split: Vec<i64>,
}

impl UspAttention {
    /// USP over the sequence-parallel group `sp` with Ulysses degree `ulysses` (the ring degree
    /// is P / ulysses). Every rank of `sp` must call it (it creates the subgroups).
    pub fn new(
        sp: &Group,
        mask: Mask,
        n: i64,
        heads: i64,
        kv_heads: i64,
        ulysses: usize,
        zigzag: bool,
    ) -> Result<UspAttention> {
        let p = sp.size();
        StrategyConfig::Usp { ulysses, zigzag }.check(n, p, heads, kv_heads)?;
        let ring_degree = p / ulysses;
        let mesh = Mesh::new(sp, MeshShape::new(&[("ring", ring_degree), ("ulysses", ulysses)])?)?;
        let (ring_group, ulysses_group) = (mesh.group("ring")?.clone(), mesh.group("ulysses")?.clone());
        let layout = SeqLayout::nested(n, ring_degree, ulysses, zigzag)?;
        let plan = HeadPlan::new(heads, kv_heads, ulysses)?;
        let (ring_idx, u_idx) = (mesh.coord("ring")?, mesh.coord("ulysses")?);
        // The ring chunk of ring rank i is what its Ulysses group gathers: its ranks in order.
        let segments = layout.grouped_segments(ulysses);
        let chunk_split: Vec<i64> = (0..ulysses).map(|j| layout.len(ring_idx * ulysses + j)).collect();
        let q_a2a = AllToAll::new(2, 1, plan.q_split().to_vec(), chunk_split.clone());
        let kv_a2a = AllToAll::new(2, 1, plan.kv_split(), chunk_split.clone());
        let ring = RingCore::new(ring_group, mask, segments, plan.expand_map(u_idx))?;
        Ok(UspAttention {
            sp: sp.clone(),
            ulysses: ulysses_group,
            ring,
            layout,
            heads: plan,
            q_a2a,
            kv_a2a,
            chunk_split,
        })
    }

    /// Attention work this rank did in the last forward's ring (per head and sample).
    pub fn last_forward_work(&self) -> super::Work {
        self.ring.last_forward_work()
    }
}

impl SequenceParallel for UspAttention {
    fn name(&self) -> &'static str {
        "usp"
    }

    fn layout(&self) -> &SeqLayout {
        &self.layout
    }

    fn rank(&self) -> usize {
        self.sp.rank()
    }

    fn group(&self) -> Option<&Group> {
        Some(&self.sp)
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
        let plan_all = HeadPlan::new(self.heads.heads(), self.heads.kv_heads(), 1)?;
        check_shapes("usp", &self.layout, &plan_all, self.rank(), q, k, v)?;
        if let Some(d) = docs {
            d.refuse_layout("usp")?;
        }
        // [b, s_r, H_kv, d] -> [b, s_r, sum(KV_u), d]: kv heads once per Ulysses rank that needs them
        let (k, v) = (self.heads.replicate_kv(k)?, self.heads.replicate_kv(v)?);
        // [b, s_r, H, d] -> [b, N/R, H_u, d]; [b, s_r, sum(KV_u), d] -> [b, N/R, KV_u, d]
        let full =
            tape.all_to_all_many(&self.ulysses, &[(q, &self.q_a2a), (&k, &self.kv_a2a), (&v, &self.kv_a2a)])?;
        let o = self.ring.forward(tape, &full[0], &full[1], &full[2], docs)?;
        // [b, N/R, H_u, d] -> [b, s_r, H, d]
        tape.all_to_all_v(&self.ulysses, &o, 1, 2, &self.chunk_split, self.heads.q_split())
    }

    /// # Shapes
    /// As `forward`; lse `[b, N/R, H_u]` -> `[b, s_r, H]` by the output's all-to-all.
    fn forward_lse_docs(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        docs: Option<&Documents>,
    ) -> Result<(Tensor, Tensor)> {
        let plan_all = HeadPlan::new(self.heads.heads(), self.heads.kv_heads(), 1)?;
        check_shapes("usp", &self.layout, &plan_all, self.rank(), q, k, v)?;
        if let Some(d) = docs {
            d.refuse_layout("usp")?;
        }
        let _no_grad = tch::no_grad_guard();
        let (k, v) = (self.heads.replicate_kv(k)?, self.heads.replicate_kv(v)?);
        let u = &self.ulysses;
        // [b, s_r, H, d] -> [b, N/R, H_u, d]; [b, s_r, sum(KV_u), d] -> [b, N/R, KV_u, d]
        let (q, k, v) = (
            u.all_to_all_spec(q, &self.q_a2a)?,
            u.all_to_all_spec(&k, &self.kv_a2a)?,
            u.all_to_all_spec(&v, &self.kv_a2a)?,
        );
        let (o, lse) = self.ring.forward_lse(&q, &k, &v, docs)?;
        // [b, N/R, H_u, ..] -> [b, s_r, H, ..]
        let back = |t: &Tensor| u.all_to_all_v(t, 1, 2, &self.chunk_split, self.heads.q_split());
        Ok((back(&o)?, back(&lse)?))
    }
}
