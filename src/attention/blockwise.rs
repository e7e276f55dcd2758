//! Attention of some queries over some keys at arbitrary global positions, returning the
//! log-sum-exp of every query's scores, and the rule that merges partial results.
//!
//! This is the arithmetic of ring attention (Liu et al. 2023; Li et al. 2021): a query block
//! meets the key blocks one at a time, and the partial outputs are merged by their log-sum-exps,
//! in f32 (f64 for f64 inputs) whatever the input dtype, so that the merge does not drift with
//! the number of blocks. Queries and keys come as segments of the layout (runs of consecutive
//! positions), and a pair of segments that the mask hides entirely is skipped: with the zigzag
//! layout this is what balances causal work over the ranks.
//!
//! Rows that see no key at all have lse = -inf and output 0, without NaN, so that they merge
//! correctly with the blocks where they do see keys.

use tch::{Kind, Tensor};

use super::{compute_kind, Documents, Mask};
use crate::error::TorchResultExt;
use crate::Result;

/// Segments (first position, length) with their offsets in the concatenated vector:
/// (offset, first position, length).
pub(crate) fn runs(segments: &[(i64, i64)]) -> Vec<(i64, i64, i64)> {
    let mut offset = 0;
    segments
        .iter()
        .map(|&(start, len)| {
            offset += len;
            (offset - len, start, len)
        })
        .collect()
}

/// Whether any query in `[q0, q0 + nq)` may see any key in `[k0, k0 + nk)`: the rule allows
/// some pair, and (packed) some query and key share a document. (Both may hold for different
/// pairs: a pair of runs that passes is computed and masked exactly; one that fails is empty.)
fn any_visible(mask: &Mask, docs: Option<&Documents>, (q0, nq): (i64, i64), (k0, nk): (i64, i64)) -> bool {
    if docs.is_some_and(|d| !d.runs_meet((q0, nq), (k0, nk))) {
        return false;
    }
    let (q1, k1) = (q0 + nq - 1, k0 + nk - 1);
    match *mask {
        Mask::None => true,
        Mask::Causal => k0 <= q1,
        Mask::SlidingWindow { window } => k0 <= q1 && k1 > q0 - window,
        Mask::BlockSparse(_) => (q0..=q1).any(|i| (k0..=k1).any(|j| mask.allows(i, j))),
    }
}

/// Attention work of one rank, per head and sample (per head, summed over the samples, for
/// packed documents, whose work differs from sample to sample).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Work {
    /// (query, key) score elements computed (pairs of runs the mask hides are skipped).
    pub computed: u64,
    /// (query, key) pairs the mask allows among them: the work of an exact causal kernel.
    pub visible: u64,
}

impl std::ops::AddAssign for Work {
    fn add_assign(&mut self, other: Work) {
        self.computed += other.computed;
        self.visible += other.visible;
    }
}

/// One attention over explicit positions.
pub(crate) struct Blockwise<'a> {
    pub mask: &'a Mask,
    /// Packed documents: a query sees keys of its own document only.
    pub docs: Option<&'a Documents>,
    /// 1/sqrt(d).
    pub scale: f64,
    /// Hand pairs of runs that are wholly visible, or plain causal on one run, to libtorch's
    /// fused flash kernels (forward and backward): the CPU one, or on CUDA the flash kernel
    /// for bf16/f16 blocks (`flash.rs`). Their log-sum-exp carries no gradient, so only
    /// callers that do not back-propagate through the merge may ask (ring attention, whose
    /// backward is written by hand).
    pub fused: bool,
}

impl Blockwise<'_> {
    /// Attention of `q` over `k`, `v`, all `[b, h, s, d]` in the accumulation dtype, whose rows
    /// hold the positions of the segments `qseg` and `kseg` (first position, length) in order.
    /// Returns (out `[b, h, s_q, d]`, lse `[b, h, s_q]`) and the [`Work`] done; fully hidden
    /// pairs of runs are skipped.
    /// Differentiable (all-gather KV back-propagates through it).
    pub fn forward(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        qseg: &[(i64, i64)],
        kseg: &[(i64, i64)],
    ) -> Result<(Tensor, Tensor, Work)> {
        self.try_forward(q, k, v, qseg, kseg).op("blockwise_attention")
    }

    fn try_forward(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        qseg: &[(i64, i64)],
        kseg: &[(i64, i64)],
    ) -> Result<(Tensor, Tensor, Work), tch::TchError> {
        let (qruns, kruns) = (runs(qseg), runs(kseg));
        let mut outs = Vec::with_capacity(qruns.len());
        let mut lses = Vec::with_capacity(qruns.len());
        let mut work = Work::default();
        for &(qoff, q0, nq) in &qruns {
            let qs = q.f_narrow(2, qoff, nq)?;
            let mut acc: Option<(Tensor, Tensor)> = None;
            for &(koff, k0, nk) in &kruns {
                if !any_visible(self.mask, self.docs, (q0, nq), (k0, nk)) {
                    continue;
                }
                let (kb, vb) = (k.f_narrow(2, koff, nk)?, v.f_narrow(2, koff, nk)?);
                let part = match self.docs {
                    Some(d) if !d.within_one((q0, nq), (k0, nk)) => {
                        let (part, w) = self.run_pair_docs(d, &qs, &kb, &vb, (q0, nq), (k0, nk))?;
                        work += w;
                        part
                    }
                    Some(d) => {
                        work.computed += (d.samples() as i64 * nq * nk) as u64;
                        work.visible += d.visible_in_block(self.mask, (q0, nq), (k0, nk));
                        self.run_pair(&qs, &kb, &vb, (q0, nq), (k0, nk))?
                    }
                    None => {
                        work.computed += (nq * nk) as u64;
                        work.visible += visible_pairs(self.mask, (q0, nq), (k0, nk));
                        self.run_pair(&qs, &kb, &vb, (q0, nq), (k0, nk))?
                    }
                };
                acc = Some(match acc {
                    None => part,
                    Some(prev) => merge(&prev, &part)?,
                });
            }
            let (o, lse) = match acc {
                Some(x) => x,
                None => empty_rows(&qs)?,
            };
            outs.push(o);
            lses.push(lse);
        }
        Ok((Tensor::f_cat(&outs, 2)?, Tensor::f_cat(&lses, 2)?, work))
    }

    /// A pair of runs that spans several documents, one sample at a time: each run cut at the
    /// sample's document boundaries, and only the pieces of one document computed (each whole
    /// in the rule, so the fused kernel takes the wholly visible and diagonal ones); pieces of
    /// different documents are skipped, rows that meet no key of their document here are empty.
    /// Returns (out, lse) of the whole pair and the work done (summed over the samples).
    ///
    /// # Shapes
    /// `q`: `[b, h, nq, d]`, `k`, `v`: `[b, h, nk, d]` -> `[b, h, nq, d]`, `[b, h, nq]`.
    fn run_pair_docs(
        &self,
        docs: &Documents,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        (q0, nq): (i64, i64),
        (k0, nk): (i64, i64),
    ) -> Result<((Tensor, Tensor), Work), tch::TchError> {
        let inner = Blockwise { mask: self.mask, docs: None, scale: self.scale, fused: self.fused };
        let mut work = Work::default();
        let (mut outs, mut lses) = (Vec::new(), Vec::new());
        for s in 0..docs.samples() {
            let (qs, ks, vs) =
                (q.f_narrow(0, s as i64, 1)?, k.f_narrow(0, s as i64, 1)?, v.f_narrow(0, s as i64, 1)?);
            let kpieces = docs.pieces(s, k0, nk);
            let (mut row_outs, mut row_lses) = (Vec::new(), Vec::new());
            for (doc, a, la) in docs.pieces(s, q0, nq) {
                let qp = qs.f_narrow(2, a - q0, la)?;
                let mut acc: Option<(Tensor, Tensor)> = None;
                for &(_, c, lc) in kpieces.iter().filter(|p| p.0 == doc) {
                    if !any_visible(self.mask, None, (a, la), (c, lc)) {
                        continue;
                    }
                    work.computed += (la * lc) as u64;
                    work.visible += visible_pairs(self.mask, (a, la), (c, lc));
                    let part = inner.run_pair(
                        &qp,
                        &ks.f_narrow(2, c - k0, lc)?,
                        &vs.f_narrow(2, c - k0, lc)?,
                        (a, la),
                        (c, lc),
                    )?;
                    // the fused kernel answers in q's dtype, the math path in the accumulation one
                    let part = (part.0.f_to_kind(compute_kind(q.kind()))?, part.1);
                    acc = Some(match acc {
                        None => part,
                        Some(prev) => merge(&prev, &part)?,
                    });
                }
                let (o, l) = match acc {
                    Some(x) => x,
                    None => empty_rows(&qp)?,
                };
                row_outs.push(o);
                row_lses.push(l);
            }
            outs.push(Tensor::f_cat(&row_outs, 2)?);
            lses.push(Tensor::f_cat(&row_lses, 2)?);
        }
        Ok(((Tensor::f_cat(&outs, 0)?, Tensor::f_cat(&lses, 0)?), work))
    }

    /// The backward of [`run_pair_docs`](Blockwise::run_pair_docs): the same pieces, each
    /// through [`backward_pair`](Blockwise::backward_pair), their gradients added into the
    /// pair's (in the accumulation dtype).
    #[allow(clippy::too_many_arguments)]
    fn backward_pair_docs(
        &self,
        docs: &Documents,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        (dout, out, lse, delta): (&Tensor, &Tensor, &Tensor, &Tensor),
        (q0, nq): (i64, i64),
        (k0, nk): (i64, i64),
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let inner = Blockwise { mask: self.mask, docs: None, scale: self.scale, fused: self.fused };
        let f = |e: tch::TchError| crate::Error::Torch { op: "blockwise_attention", source: e };
        let zeros = |t: &Tensor| Tensor::f_zeros(t.size(), (compute_kind(t.kind()), t.device())).map_err(f);
        let (dq, dk, dv) = (zeros(q)?, zeros(k)?, zeros(v)?);
        for s in 0..docs.samples() {
            let si = s as i64;
            let kpieces = docs.pieces(s, k0, nk);
            for (doc, a, la) in docs.pieces(s, q0, nq) {
                let rows =
                    |t: &Tensor| t.f_narrow(0, si, 1).and_then(|t| t.f_narrow(2, a - q0, la)).map_err(f);
                for &(_, c, lc) in kpieces.iter().filter(|p| p.0 == doc) {
                    if !any_visible(self.mask, None, (a, la), (c, lc)) {
                        continue;
                    }
                    let keys =
                        |t: &Tensor| t.f_narrow(0, si, 1).and_then(|t| t.f_narrow(2, c - k0, lc)).map_err(f);
                    let (gq, gk, gv) = inner.backward_pair(
                        &rows(q)?,
                        &keys(k)?,
                        &keys(v)?,
                        (&rows(dout)?, &rows(out)?, &rows(lse)?, &rows(delta)?),
                        (a, la),
                        (c, lc),
                    )?;
                    let _ = rows(&dq)?.f_add_(&gq).map_err(f)?;
                    let _ = keys(&dk)?.f_add_(&gk).map_err(f)?;
                    let _ = keys(&dv)?.f_add_(&gv).map_err(f)?;
                }
            }
        }
        Ok((dq, dk, dv))
    }

    /// One pair of runs: scores, mask, a softmax that tolerates empty rows.
    /// `Some(is_causal)` when a pair of runs can go to the fused kernel: everything visible, or
    /// the causal rule on one and the same run (the kernel's top-left causal alignment).
    fn fused_kernel(&self, q: &Tensor, (q0, nq): (i64, i64), (k0, nk): (i64, i64)) -> Option<bool> {
        if !self.fused || !(q.device() == tch::Device::Cpu || super::flash::usable(q)) {
            return None;
        }
        match *self.mask {
            Mask::None => Some(false),
            Mask::Causal if q0 == k0 && nq == nk => Some(true),
            Mask::Causal if k0 + nk <= q0 => Some(false),
            _ => None,
        }
    }

    fn run_pair(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        (q0, nq): (i64, i64),
        (k0, nk): (i64, i64),
    ) -> Result<(Tensor, Tensor), tch::TchError> {
        if let Some(causal) = self.fused_kernel(q, (q0, nq), (k0, nk)) {
            if q.device() != tch::Device::Cpu {
                return super::flash::forward(q, k, v, causal, self.scale);
            }
            return Tensor::f_internal_scaled_dot_product_flash_attention_for_cpu::<Tensor>(
                q, k, v, 0.0, causal, None, self.scale,
            );
        }
        let (q, k, v) = (upcast(q)?, upcast(k)?, upcast(v)?);
        let scores = self.masked_scores(&q, &k, (q0, nq), (k0, nk))?;
        softmax_with_lse(&scores, &v)
    }

    /// Scaled scores of queries `q0..q0+nq` against keys `k0..k0+nk` (global positions), -inf
    /// where the mask hides a pair. With packed documents every pair of runs that reaches here
    /// (and [`fused_kernel`](Blockwise::fused_kernel)) lies in one document: the others are cut
    /// into such pieces first ([`run_pair_docs`](Blockwise::run_pair_docs)), so the rule alone
    /// decides.
    ///
    /// # Shapes
    /// `[b, h, nq, d]` x `[b, h, nk, d]` -> `[b, h, nq, nk]`.
    fn masked_scores(
        &self,
        q: &Tensor,
        k: &Tensor,
        (q0, nq): (i64, i64),
        (k0, nk): (i64, i64),
    ) -> Result<Tensor, tch::TchError> {
        // [b, h, nq, d] x [b, h, d, nk] -> [b, h, nq, nk]
        let scores = q.f_matmul(&k.f_transpose(-2, -1)?)?.f_mul_scalar(self.scale)?;
        if *self.mask == Mask::None {
            return Ok(scores);
        }
        let opts = (Kind::Int64, q.device());
        let i = Tensor::f_arange_start(q0, q0 + nq, opts)?.f_unsqueeze(1)?;
        let j = Tensor::f_arange_start(k0, k0 + nk, opts)?.f_unsqueeze(0)?;
        let hidden = self.mask.allowed(&i, &j)?.f_logical_not()?;
        scores.f_masked_fill(&hidden, f64::NEG_INFINITY)
    }

    /// The gradients of one pair of runs, given the output gradient `dout`, the final output
    /// `out` and lse of the queries and `delta = rowsum(dout * out)` (the standard attention
    /// backward, with the probabilities recomputed from the final lse). Returns (dq, dk, dv).
    #[allow(clippy::too_many_arguments)]
    pub fn backward_pair(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        (dout, out, lse, delta): (&Tensor, &Tensor, &Tensor, &Tensor),
        (q0, nq): (i64, i64),
        (k0, nk): (i64, i64),
    ) -> Result<(Tensor, Tensor, Tensor)> {
        if let Some(d) = self.docs.filter(|d| !d.within_one((q0, nq), (k0, nk))) {
            return self.backward_pair_docs(d, q, k, v, (dout, out, lse, delta), (q0, nq), (k0, nk));
        }
        if let Some(causal) = self.fused_kernel(q, (q0, nq), (k0, nk)) {
            if q.device() != tch::Device::Cpu {
                return super::flash::backward(dout, q, k, v, out, lse, causal, self.scale)
                    .op("blockwise_attention");
            }
            return Tensor::f_internal_scaled_dot_product_flash_attention_for_cpu_backward::<Tensor>(
                dout, q, k, v, out, lse, 0.0, causal, None, self.scale,
            )
            .op("blockwise_attention");
        }
        let f = || -> Result<(Tensor, Tensor, Tensor), tch::TchError> {
            let (q, k, v) = (&upcast(q)?, &upcast(k)?, &upcast(v)?);
            let scores = self.masked_scores(q, k, (q0, nq), (k0, nk))?;
            // p = exp(scores - lse): the final probabilities (hidden entries give 0). A row that
            // saw no key at all has lse -inf and no probability: +inf there keeps -inf - (-inf)
            // (NaN) out of it.
            let lse = lse.f_where_scalarother(&lse.f_isfinite()?, f64::INFINITY)?;
            let p = scores.f_sub(&lse.f_unsqueeze(-1)?)?.f_exp()?;
            let dv = p.f_transpose(-2, -1)?.f_matmul(dout)?; // [b, h, nk, d]
            let dp = dout.f_matmul(&v.f_transpose(-2, -1)?)?; // [b, h, nq, nk]
            let ds = p.f_mul(&dp.f_sub(&delta.f_unsqueeze(-1)?)?)?.f_mul_scalar(self.scale)?;
            let dq = ds.f_matmul(k)?; // [b, h, nq, d]
            let dk = ds.f_transpose(-2, -1)?.f_matmul(q)?; // [b, h, nk, d]
            Ok((dq, dk, dv))
        };
        f().op("blockwise_attention")
    }
}

/// How many (query, key) pairs of two runs the mask allows, in O(queries x blocks).
pub(crate) fn visible_pairs(mask: &Mask, (q0, nq): (i64, i64), (k0, nk): (i64, i64)) -> u64 {
    let k1 = k0 + nk - 1;
    // Keys in [lo, hi] that lie in the run.
    let span = |lo: i64, hi: i64| (hi.min(k1) - lo.max(k0) + 1).max(0) as u64;
    (q0..q0 + nq)
        .map(|i| match *mask {
            Mask::None => nk as u64,
            Mask::Causal => span(k0, i),
            Mask::SlidingWindow { window } => span(i - window + 1, i),
            Mask::BlockSparse(b) => {
                let hi = if b.causal { i.min(k1) } else { k1 };
                (k0 / b.block..=hi.max(k0) / b.block)
                    .filter(|&kb| b.blocks_connected(i / b.block, kb))
                    .map(|kb| span(kb * b.block, (kb * b.block + b.block - 1).min(hi)))
                    .sum()
            }
        })
        .sum()
}

/// Whether a pair of runs has a visible entry (the backward skips what the forward skipped).
pub(crate) fn pair_visible(mask: &Mask, docs: Option<&Documents>, q: (i64, i64), k: (i64, i64)) -> bool {
    any_visible(mask, docs, q, k)
}

/// softmax(scores) @ v and the row log-sum-exp; rows with every score -inf give 0 and -inf.
fn softmax_with_lse(scores: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor), tch::TchError> {
    // The row maximum only stabilises the exponentials; out and lse do not depend on it, so it
    // is kept out of autograd.
    let max = scores.f_amax([-1i64].as_slice(), true)?.f_detach()?; // [b, h, nq, 1]
    let safe_max = max.f_where_scalarother(&max.f_isfinite()?, 0.0)?;
    let p = scores.f_sub(&safe_max)?.f_exp()?;
    let sum = p.f_sum_dim_intlist([-1i64].as_slice(), true, p.kind())?;
    let out = p.f_matmul(v)?.f_div(&nonzero(&sum)?)?;
    let lse = safe_max.f_add(&sum.f_log()?)?.f_squeeze_dim(-1)?;
    Ok((out, lse))
}

/// A softmax denominator with its empty rows (sum 0: every score -inf) replaced by 1, so that
/// they divide 0 by 1 instead of 0 by 0. A row that sees a key sums to at least 1 (its maximum
/// contributes e^0), so nothing else changes. (Clamping to `f64::MIN_POSITIVE` does not work:
/// it rounds to 0 in f32, and 0/0 is NaN.)
fn nonzero(sum: &Tensor) -> Result<Tensor, tch::TchError> {
    sum.f_where_scalarother(&sum.f_gt(0.0)?, 1.0)
}

/// The merge of two partial attentions of the same queries over disjoint keys:
/// `lse = log(e^a + e^b)`, `out = (e^a out_a + e^b out_b) / e^lse`; empty parts weigh nothing.
pub(crate) fn merge(
    (oa, la): &(Tensor, Tensor),
    (ob, lb): &(Tensor, Tensor),
) -> Result<(Tensor, Tensor), tch::TchError> {
    let m = la.f_maximum(lb)?;
    let m = m.f_where_scalarother(&m.f_isfinite()?, 0.0)?;
    let (wa, wb) = (la.f_sub(&m)?.f_exp()?, lb.f_sub(&m)?.f_exp()?);
    let s = wa.f_add(&wb)?;
    let out = oa
        .f_mul(&wa.f_unsqueeze(-1)?)?
        .f_add(&ob.f_mul(&wb.f_unsqueeze(-1)?)?)?
        .f_div(&nonzero(&s)?.f_unsqueeze(-1)?)?;
    Ok((out, m.f_add(&s.f_log()?)?))
}

/// Output 0 and lse -inf for queries that see nothing, in the accumulation dtype.
fn empty_rows(q: &Tensor) -> Result<(Tensor, Tensor), tch::TchError> {
    let s = q.size();
    let opts = (compute_kind(q.kind()), q.device());
    let lse = Tensor::f_full([s[0], s[1], s[2]], f64::NEG_INFINITY, opts)?;
    Ok((Tensor::f_zeros(&s, opts)?, lse))
}

/// A block in the accumulation dtype (the math path computes in f32 whatever a fused kernel
/// would have taken); no copy when it already is.
fn upcast(x: &Tensor) -> Result<Tensor, tch::TchError> {
    x.f_to_kind(compute_kind(x.kind()))
}

/// `[b, s, h, d]` -> `[b, h, s, d]` in the accumulation dtype.
pub(crate) fn heads_first(x: &Tensor) -> Result<Tensor> {
    x.f_transpose(1, 2).and_then(|t| t.f_to_kind(compute_kind(x.kind()))).op("blockwise_attention")
}
