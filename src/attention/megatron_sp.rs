//! Megatron-LM sequence parallelism (Korthikanti et al. 2022, §4.2.2), the paper's main
//! baseline: tensor parallelism of the attention heads and the MLP columns, with the regions
//! between them (LayerNorm, dropout, residual) sharded along the sequence.
//!
//! Per transformer block, on each of the P ranks of the tensor-parallel group (the model does
//! the communication, see [`Gpt`](crate::model::Gpt)):
//!
//! ```text
//! x [b, N/P, h]  --LayerNorm, all-gather (sequence)-->  [b, N, h]
//!   --column-parallel qkv: this rank's H/P heads-->  q [b, N, H/P, d], k, v [b, N, H_kv/P, d]
//!   --attention on the whole sequence (this strategy's forward)-->  [b, N, H/P, d]
//!   --row-parallel output projection: a partial sum-->  [b, N, h]
//!   --reduce-scatter (sequence)-->  [b, N/P, h]   (the same around the MLP)
//! ```
//!
//! Memory, as Megatron-LM: each all-gather feeds one column-parallel linear (qkv, MLP-in) as one
//! taped op ([`Tape::all_gather_linear`](crate::autograd::Tape::all_gather_linear)) that keeps
//! the LayerNorm output's shard `[b, N/P, h]` for the backward and gathers it again there for the
//! weight gradient, instead of keeping the gathered `[b, N, h]` (P times more, twice per layer).
//!
//! Communication per layer and rank: forward, 2 all-gathers and 2 reduce-scatters of
//! `[b, N, h]`, 4 b N h (P-1)/P elements; backward, their adjoints (the two swap) plus the two
//! re-gathers, 6 b N h (P-1)/P. It does not shrink with P, which is the paper's §3.2 point
//! against it (the paper counts 4 N h per pass). Parameters of the blocks are 1/P per rank.
//! Requires H and H_kv divisible by P (no kv head replication, as in Megatron-LM's default).

use std::sync::Arc;

use tch::{Device, Kind, Tensor};

use super::single::check_docs;
use super::{Documents, LocalAttention, SeqLayout, SequenceParallel, Sharding};
use crate::autograd::Tape;
use crate::comm::Group;
use crate::error::TorchResultExt;
use crate::{Error, Result};

/// The attention of Megatron-SP: local heads, whole sequence, no communication of its own.
pub struct MegatronSp {
    group: Group,
    local: Arc<dyn LocalAttention>,
    layout: SeqLayout,
    heads: i64,
    kv_heads: i64,
}

impl MegatronSp {
    /// Tensor parallelism over `group` for sequences of `n` tokens.
    pub fn new(
        group: Group,
        local: Box<dyn LocalAttention>,
        n: i64,
        heads: i64,
        kv_heads: i64,
    ) -> Result<MegatronSp> {
        let layout = MegatronSp::check(n, group.size(), heads, kv_heads)?;
        Ok(MegatronSp { group, local: Arc::from(local), layout, heads, kv_heads })
    }

    /// Whether Megatron-SP can run on `p` ranks: its layout if so.
    pub fn check(n: i64, p: usize, heads: i64, kv_heads: i64) -> Result<SeqLayout> {
        let pi = p as i64;
        if kv_heads < 1 || heads % pi != 0 || kv_heads % pi != 0 || heads % kv_heads != 0 {
            return Err(Error::InvalidArgument {
                op: "megatron_sp",
                group: format!("{p} ranks"),
                msg: format!(
                    "tensor parallelism over P={p} needs H={heads} and H_kv={kv_heads} divisible by P \
                     (and H by H_kv)"
                ),
            });
        }
        SeqLayout::contiguous(n, p)
    }

    /// Query and kv heads this rank computes.
    pub fn local_heads(&self) -> (i64, i64) {
        let p = self.group.size() as i64;
        (self.heads / p, self.kv_heads / p)
    }
}

impl SequenceParallel for MegatronSp {
    fn name(&self) -> &'static str {
        "megatron_sp"
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

    fn tensor_parallel(&self) -> Option<&Group> {
        Some(&self.group)
    }

    fn input_positions(&self, device: Device) -> Result<Tensor> {
        Tensor::f_arange(self.layout.global_len(), (Kind::Int64, device)).op("megatron_sp")
    }

    /// # Shapes
    /// `q`: `[b, N, H/P, d]`, `k`, `v`: `[b, N, H_kv/P, d]` -> `[b, N, H/P, d]`.
    fn forward_docs(
        &self,
        tape: &Tape,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        docs: Option<&Documents>,
    ) -> Result<Tensor> {
        let (k, v) = self.local_kv(q, k, v)?;
        check_docs("megatron_sp", docs, q, &self.layout, self.local.as_ref())?;
        // The attention core (each packed document on its own): recomputed in the backward
        // under selective recomputation.
        let (local, docs) = (Arc::clone(&self.local), docs.cloned());
        tape.recomputable("attention_core", &[q, &k, &v], move |x| {
            local.forward_docs(&x[0], &x[1], &x[2], docs.as_ref())
        })
    }

    /// # Shapes
    /// As `forward`; lse `[b, N, H/P]`.
    fn forward_lse_docs(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        docs: Option<&Documents>,
    ) -> Result<(Tensor, Tensor)> {
        let (k, v) = self.local_kv(q, k, v)?;
        check_docs("megatron_sp", docs, q, &self.layout, self.local.as_ref())?;
        self.local.forward_lse_docs(q, &k, &v, docs)
    }

    fn sharding(&self) -> Sharding {
        Sharding::Heads { ranks: self.group.size() }
    }
}

impl MegatronSp {
    /// Checks this rank's q, k, v and expands k, v to one kv head per local query head.
    ///
    /// # Shapes
    /// `q`: `[b, N, H/P, d]`, `k`, `v`: `[b, N, H_kv/P, d]` -> k, v `[b, N, H/P, d]`.
    fn local_kv(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let (hq, hkv) = self.local_heads();
        let n = self.layout.global_len();
        let (qs, ks) = (q.size(), k.size());
        if qs.len() != 4
            || qs[1] != n
            || qs[2] != hq
            || ks.len() != 4
            || ks[1] != n
            || ks[2] != hkv
            || v.size() != ks
        {
            return Err(Error::Shape {
                op: "megatron_sp",
                shapes: vec![qs, ks, v.size()],
                msg: format!(
                    "expects q [b, {n}, {hq}, d] and k, v [b, {n}, {hkv}, d]: all tokens, this rank's heads"
                ),
            });
        }
        super::check_finite("megatron_sp", &[("q", q), ("k", k), ("v", v)])?;
        // [b, N, H_kv/P, d] -> [b, N, H/P, d]: local query head i uses local kv head i / G
        let g = hq / hkv;
        if g == 1 {
            return Ok((k.shallow_clone(), v.shallow_clone()));
        }
        let map = Tensor::f_arange(hq, (Kind::Int64, q.device()))
            .and_then(|h| h.f_floor_divide_scalar(g))
            .op("megatron_sp")?;
        Ok((k.f_index_select(2, &map).op("megatron_sp")?, v.f_index_select(2, &map).op("megatron_sp")?))
    }
}
