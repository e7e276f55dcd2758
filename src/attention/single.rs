//! The single-device strategy: the whole sequence on one rank, no communication. The reference
//! every sequence-parallel strategy is checked against, and the plain model's attention.

use std::sync::Arc;

use tch::Tensor;

use super::{Documents, HeadPlan, LocalAttention, SeqLayout, SequenceParallel};
use crate::autograd::Tape;
use crate::comm::Group;
use crate::{Error, Result};

/// Attention on one device: GQA expansion, then the kernel.
pub struct SingleDevice {
    local: Arc<dyn LocalAttention>,
    layout: SeqLayout,
    heads: HeadPlan,
}

impl SingleDevice {
    /// For sequences of `n` tokens, `heads` query heads and `kv_heads` key/value heads.
    pub fn new(local: Box<dyn LocalAttention>, n: i64, heads: i64, kv_heads: i64) -> Result<SingleDevice> {
        Ok(SingleDevice {
            local: Arc::from(local),
            layout: SeqLayout::contiguous(n, 1)?,
            heads: HeadPlan::new(heads, kv_heads, 1)?,
        })
    }
}

impl SequenceParallel for SingleDevice {
    fn name(&self) -> &'static str {
        "single"
    }

    fn layout(&self) -> &SeqLayout {
        &self.layout
    }

    fn rank(&self) -> usize {
        0
    }

    fn group(&self) -> Option<&Group> {
        None
    }

    /// # Shapes
    /// `q`: `[b, N, H, d]`, `k`, `v`: `[b, N, H_kv, d]` -> `[b, N, H, d]`.
    fn forward_docs(
        &self,
        tape: &Tape,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        docs: Option<&Documents>,
    ) -> Result<Tensor> {
        check_shapes("single", &self.layout, &self.heads, 0, q, k, v)?;
        check_docs("single", docs, q, &self.layout, self.local.as_ref())?;
        // [b, N, H_kv, d] -> [b, N, H, d]
        let (k, v) = (self.heads.expand_kv(0, k)?, self.heads.expand_kv(0, v)?);
        // The attention core: recomputed in the backward under selective recomputation.
        let (local, docs) = (Arc::clone(&self.local), docs.cloned());
        tape.recomputable("attention_core", &[q, &k, &v], move |x| {
            local.forward_docs(&x[0], &x[1], &x[2], docs.as_ref())
        })
    }

    fn forward_lse_docs(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        docs: Option<&Documents>,
    ) -> Result<(Tensor, Tensor)> {
        check_shapes("single", &self.layout, &self.heads, 0, q, k, v)?;
        check_docs("single", docs, q, &self.layout, self.local.as_ref())?;
        let (k, v) = (self.heads.expand_kv(0, k)?, self.heads.expand_kv(0, v)?);
        self.local.forward_lse_docs(q, &k, &v, docs)
    }
}

/// Packed documents, if any, must describe b samples of the layout's N tokens, under a rule
/// that restarts with each document: checked before anything is communicated.
pub(crate) fn check_docs(
    op: &'static str,
    docs: Option<&Documents>,
    q: &Tensor,
    layout: &SeqLayout,
    local: &dyn LocalAttention,
) -> Result<()> {
    match docs {
        Some(d) => {
            d.refuse_layout(op)?;
            d.check(op, q.size()[0], layout.global_len(), &local.mask())
        }
        None => Ok(()),
    }
}

/// Checks a rank's q, k, v against the layout and the head plan.
pub(crate) fn check_shapes(
    op: &'static str,
    layout: &SeqLayout,
    heads: &HeadPlan,
    rank: usize,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
) -> Result<()> {
    let (qs, ks, vs) = (q.size(), k.size(), v.size());
    let s = layout.len(rank);
    let ok = qs.len() == 4
        && ks.len() == 4
        && ks == vs
        && qs[0] == ks[0]
        && qs[1] == s
        && ks[1] == s
        && qs[2] == heads.heads()
        && ks[2] == heads.kv_heads()
        && qs[3] == ks[3];
    if !ok {
        return Err(Error::Shape {
            op,
            shapes: vec![qs, ks, vs],
            msg: format!(
                "rank {rank} expects q [b, {s}, {}, d] and k, v [b, {s}, {}, d] (its {s} of {} tokens)",
                heads.heads(),
                heads.kv_heads(),
                layout.global_len()
            ),
        });
    }
    if q.kind() != k.kind() || k.kind() != v.kind() {
        let msg = format!("dtypes differ: q {:?}, k {:?}, v {:?}", q.kind(), k.kind(), v.kind());
        return Err(Error::Shape { op, shapes: vec![qs, ks, vs], msg });
    }
    super::check_finite(op, &[("q", q), ("k", k), ("v", v)])
}
