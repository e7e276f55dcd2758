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
//! layouts (the zigzag one balances causal work); the attention is the positional math kernel,
//! which skips pairs of runs the mask hides.

use tch::{Kind, Tensor};

use super::blockwise::{heads_first, Blockwise};
use super::ring::check_local;
use super::{Mask, SeqLayout, SequenceParallel};
use crate::autograd::Tape;
use crate::comm::{Group, ReduceOp};
use crate::error::TorchResultExt;
use crate::{Error, Result};

/// All-gather KV attention over a sequence-parallel group.
pub struct AllGatherKv {
    group: Group,
    mask: Mask,
    layout: SeqLayout,
    heads: i64,
    kv_heads: i64,
    /// This rank's query segments, and every rank's segments in all-gather order (the keys').
    qseg: Vec<(i64, i64)>,
    kseg: Vec<(i64, i64)>,
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
        let qseg = layout.segments(group.rank()).to_vec();
        let kseg = (0..p).flat_map(|r| layout.segments(r).to_vec()).collect();
        Ok(AllGatherKv { group, mask, layout, heads, kv_heads, qseg, kseg })
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
    fn forward(&self, tape: &Tape, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
        check_local("allgather_kv", &self.layout, self.rank(), self.heads, self.kv_heads, q, k, v)?;
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
        let expand = |t: &Tensor| heads_first(t).and_then(|t| t.f_index_select(1, &map).op("allgather_kv"));
        let attn = Blockwise { mask: &self.mask, scale: 1.0 / (q.size()[3] as f64).sqrt() };
        let (o, _, _) = attn.forward(&heads_first(q)?, &expand(&k)?, &expand(&v)?, &self.qseg, &self.kseg)?;
        // [b, H, s_r, d] -> [b, s_r, H, d]
        o.f_transpose(1, 2).and_then(|o| o.f_to_kind(q.kind())).op("allgather_kv")
    }
}
