//! The log-sum-exp of every attention row next to the output, for checking a strategy from
//! outside (`ulysses layer --lse`, [`SequenceParallel::forward_lse`]): flash-attention kernels
//! and ring attention return it, and a test suite that compares it catches a wrong softmax scale
//! or a missing key block that the output alone can hide (a row's output is a weighted mean; its
//! lse also says over which keys).
//!
//! `lse[b, i, h] = log sum_j exp(q_i . k_j / sqrt(d))` over the keys query i may see, in the
//! accumulation dtype (f32 for half types, f64 for f64), -inf for a row that sees nothing.
//!
//! [`SequenceParallel::forward_lse`]: super::SequenceParallel::forward_lse

use tch::Tensor;

use super::blockwise::{heads_first, Blockwise};
use super::{Documents, Mask};
use crate::error::TorchResultExt;
use crate::Result;

/// Queries and keys are cut into runs of at most this many tokens, so that one pair of runs
/// holds a `[b, h, 512, 512]` score block, whatever N.
const RUN: i64 = 512;

/// `segments` with every run cut into pieces of at most [`RUN`] tokens.
fn pieces(segments: &[(i64, i64)]) -> Vec<(i64, i64)> {
    segments
        .iter()
        .flat_map(|&(start, len)| (0..len).step_by(RUN as usize).map(move |o| (start + o, RUN.min(len - o))))
        .collect()
}

/// Attention of `q` over `k`, `v` whose rows hold the global positions of `qseg` and `kseg`
/// (segments: first position, length), with its log-sum-exp; packed `docs` keep each query to
/// its document. Forward only.
///
/// # Shapes
/// `q`: `[b, s_q, h, d]`, `k`, `v`: `[b, s_k, h, d]` -> out `[b, s_q, h, d]` (q's dtype), lse
/// `[b, s_q, h]` (the accumulation dtype).
pub(crate) fn attention_lse(
    mask: &Mask,
    docs: Option<&Documents>,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    qseg: &[(i64, i64)],
    kseg: &[(i64, i64)],
) -> Result<(Tensor, Tensor)> {
    let _no_grad = tch::no_grad_guard();
    let scale = 1.0 / (q.size()[3] as f64).sqrt();
    let attn = Blockwise { mask, docs, scale, fused: true };
    // [b, s, h, d] -> [b, h, s, d]
    let (qh, kh, vh) = (heads_first(q)?, heads_first(k)?, heads_first(v)?);
    let (out, lse, _) = attn.forward(&qh, &kh, &vh, &pieces(qseg), &pieces(kseg))?;
    // [b, h, s, d] -> [b, s, h, d]; [b, h, s] -> [b, s, h]
    let out = out.f_transpose(1, 2).and_then(|o| o.f_to_kind(q.kind())).op("attention_lse")?;
    Ok((out, lse.f_transpose(1, 2).op("attention_lse")?))
}
