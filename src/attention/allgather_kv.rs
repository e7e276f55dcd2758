//! All-gather KV (Llama 3's context parallelism, Dubey et al. 2024, §3.3.2): every rank
//! all-gathers K and V over the sequence, then attends its own queries to the whole sequence.
//! The backward of the all-gather is a reduce-scatter of dK and dV.
//!
//! ```text
//! k, v [b, s_r, H_kv, d]  --all-gather (sequence)-->  [b, N, H_kv, d]
//! q [b, s_r, H, d] attends to all N keys at their global positions  -->  o [b, s_r, H, d]
//! ```
//!
//! Communication per layer and rank: forward 2 b N H_kv d (P-1)/P elements (K and V); backward
//! the same again as the reduce-scatter of dK and dV. Works with the contiguous and the zigzag
//! layouts (the zigzag one balances causal work); the attention is libtorch's fused kernel with
//! an explicit mask of global positions (and, for packed documents, of same-document pairs:
//! `[b, 1, s_r, N]`).

use tch::{Kind, Tensor};

use super::documents::same_document;
use super::ring::check_local;
use super::{lse, Documents, Mask, SeqLayout, SequenceParallel};
use crate::autograd::Tape;
use crate::comm::{Group, ReduceOp};
use crate::error::TorchResultExt;
use crate::{Error, Result};

/// All-gather KV attention over a sequence-parallel group.
pub struct AllGatherKv {
    group: Group,
    layout: SeqLayout,
    mask: Mask,
    heads: i64,
    kv_heads: i64,
    /// Which gathered keys each of this rank's queries may see, `[s_r, N]` (keys in all-gather
    /// order, that is rank order); `None` when the mask hides nothing.
    visible: Option<Tensor>,
}

impl AllGatherKv {
    pub fn new(
        group: Group,
        mask: Mask,
        n: i64,
        heads: i64,
        kv_heads: i64,
        zigzag: bool,
    ) -> Result<AllGatherKv> {
        let p = group.size();
        if kv_heads < 1 || heads % kv_heads != 0 {
            return Err(Error::InvalidArgument {
                op: "allgather_kv",
                group: group.info().to_string(),
                msg: format!("{heads} query heads cannot be grouped over {kv_heads} key/value heads"),
            });
        }
        let layout = if zigzag { SeqLayout::zigzag(n, p)? } else { SeqLayout::contiguous(n, p)? };
        let visible = match mask {
            Mask::None => None,
            rule => {
                let qpos = layout.positions(group.rank(), tch::Device::Cpu)?;
                let keys: Vec<Tensor> =
                    (0..p).map(|r| layout.positions(r, tch::Device::Cpu)).collect::<Result<_>>()?;
                let kpos = Tensor::f_cat(&keys, 0).op("allgather_kv")?;
                Some(rule.dense(&qpos, &kpos).op("allgather_kv")?)
            }
        };
        Ok(AllGatherKv { group, layout, mask, heads, kv_heads, visible })
    }
}

impl SequenceParallel for AllGatherKv {
    fn name(&self) -> &'static str {
        "allgather_kv"
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
        check_local("allgather_kv", &self.layout, self.rank(), self.heads, self.kv_heads, q, k, v)?;
        if let Some(d) = docs {
            d.refuse_layout("allgather_kv")?;
        }
        let visible = self.visible_for(q, docs)?;
        // K and V in one all-gather: [b, s_r, H_kv, d] x 2 -> [2, b, s_r, H_kv, d] -> [2, b, N, H_kv, d].
        // q passes through the same taped record unchanged: q, k and v come from one projection,
        // and a piece of graph must feed only one record (see Tape::cut).
        let kv = Tensor::f_stack(&[k, v], 0).op("allgather_kv")?;
        let (g, lens) = (self.group.clone(), self.layout.lens().to_vec());
        let out = tape.record(
            "allgather_kv",
            &[q, &kv],
            |xs| Ok(vec![xs[0].shallow_clone(), self.group.all_gather_v(&xs[1], 2, self.layout.lens())?]),
            move |gs| Ok(vec![gs[0].shallow_clone(), g.reduce_scatter_v(&gs[1], 2, &lens, ReduceOp::Sum)?]),
        )?;
        let (q, kv) = (&out[0], &out[1]);
        let (k, v) = (kv.f_select(0, 0).op("allgather_kv")?, kv.f_select(0, 1).op("allgather_kv")?);
        // [b, N, H_kv, d] -> [b, H, N, d]: one kv head per query head
        let g = self.heads / self.kv_heads;
        let map = Tensor::f_arange(self.heads, (Kind::Int64, q.device()))
            .and_then(|h| h.f_floor_divide_scalar(g))
            .op("allgather_kv")?;
        // [b, N, H_kv, d] -> [b, H, N, d]: one kv head per query head; q [b, s_r, H, d] -> [b, H, s_r, d]
        let expand =
            |t: &Tensor| t.f_index_select(2, &map).and_then(|t| t.f_transpose(1, 2)).op("allgather_kv");
        // libtorch's fused attention with the mask of global positions (autograd through it);
        // the attention core, recomputed in the backward under selective recomputation.
        let sdpa = move |x: &[Tensor]| {
            Tensor::f_scaled_dot_product_attention(
                &x[0],
                &x[1],
                &x[2],
                visible.as_ref(),
                0.0,
                false,
                None,
                false,
            )
            .op("allgather_kv")
        };
        let o = tape.recomputable(
            "attention_core",
            &[&q.f_transpose(1, 2).op("allgather_kv")?, &expand(&k)?, &expand(&v)?],
            sdpa,
        )?;
        // [b, H, s_r, d] -> [b, s_r, H, d]
        o.f_transpose(1, 2).and_then(|o| o.f_to_kind(q.kind())).op("allgather_kv")
    }

    fn forward_lse_docs(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        docs: Option<&Documents>,
    ) -> Result<(Tensor, Tensor)> {
        check_local("allgather_kv", &self.layout, self.rank(), self.heads, self.kv_heads, q, k, v)?;
        if let Some(d) = docs {
            d.refuse_layout("allgather_kv")?;
            d.check("allgather_kv", q.size()[0], self.layout.global_len(), &self.mask)?;
        }
        let _no_grad = tch::no_grad_guard();
        let lens = self.layout.lens();
        // [b, s_r, H_kv, d] -> [b, N, H_kv, d] (rank order) -> [b, N, H, d]
        let map = Tensor::f_arange(self.heads, (Kind::Int64, q.device()))
            .and_then(|h| h.f_floor_divide_scalar(self.heads / self.kv_heads))
            .op("allgather_kv")?;
        let gather =
            |t: &Tensor| self.group.all_gather_v(t, 1, lens)?.f_index_select(2, &map).op("allgather_kv");
        let (k, v) = (gather(k)?, gather(v)?);
        let keys: Vec<(i64, i64)> =
            (0..self.group.size()).flat_map(|r| self.layout.segments(r).to_vec()).collect();
        lse::attention_lse(&self.mask, docs, q, &k, &v, self.layout.segments(self.rank()), &keys)
    }
}

impl AllGatherKv {
    /// The mask of gathered keys this rank's queries see, on q's device: the rule's `[s_r, N]`,
    /// and with packed documents `[b, 1, s_r, N]` (the rule and the same document); `None` when
    /// nothing is hidden.
    fn visible_for(&self, q: &Tensor, docs: Option<&Documents>) -> Result<Option<Tensor>> {
        let rule = self.visible.as_ref().map(|m| m.f_to(q.device())).transpose().op("allgather_kv")?;
        let Some(d) = docs.filter(|d| !d.is_whole()) else {
            if let Some(d) = docs {
                d.check("allgather_kv", q.size()[0], self.layout.global_len(), &self.mask)?;
            }
            return Ok(rule);
        };
        d.check("allgather_kv", q.size()[0], self.layout.global_len(), &self.mask)?;
        let keys: Vec<(i64, i64)> =
            (0..self.group.size()).flat_map(|r| self.layout.segments(r).to_vec()).collect();
        // [b, 1, s_r, N]
        let same =
            same_document(d, self.layout.segments(self.rank()), &keys, q.device()).op("allgather_kv")?;
        Ok(Some(match rule {
            Some(rule) => same.f_logical_and(&rule).op("allgather_kv")?,
            None => same,
        }))
    }
}
