//! Which attention heads each rank computes after Ulysses' all-to-all, uneven splits and
//! grouped-query attention included.
//!
//! Query heads: rank r computes heads `[qs_r, qs_r + H_r)`, with `H_r = H/P`, one more on the
//! first `H % P` ranks (uneven heads, which the reference implementation supports only in part).
//!
//! Key/value heads (GQA/MQA, H_kv heads, G = H / H_kv query heads per kv head): rank r needs kv
//! heads `[qs_r / G, (qs_r + H_r - 1) / G]`. When these ranges partition `0..H_kv` (H_kv a
//! multiple of P with even splits, for instance) k and v travel as they are. Otherwise (MQA, or
//! H_kv < P, or uneven splits cutting through a group) the needed heads are gathered first, so
//! a kv head is sent to every rank that needs it; autograd sums the replicas' gradients back
//! through that gather. After the all-to-all each rank expands its kv heads to one per query head.

use tch::Tensor;

use crate::error::TorchResultExt;
use crate::{Error, Result};

/// The head assignment for H query heads and H_kv key/value heads over P ranks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeadPlan {
    heads: i64,
    kv_heads: i64,
    q_split: Vec<i64>,
    /// First kv head and number of kv heads each rank needs.
    kv_ranges: Vec<(i64, i64)>,
    /// Whether the kv ranges overlap, so that kv heads must be replicated before sending.
    replicate: bool,
}

impl HeadPlan {
    pub fn new(heads: i64, kv_heads: i64, p: usize) -> Result<HeadPlan> {
        let bad = |msg: String| Error::InvalidArgument { op: "head_plan", group: format!("{p} ranks"), msg };
        let pi = p as i64;
        if kv_heads < 1 || heads % kv_heads != 0 {
            return Err(bad(format!(
                "{heads} query heads cannot be grouped over {kv_heads} key/value heads"
            )));
        }
        if heads < pi {
            return Err(bad(format!(
                "Ulysses needs a head per rank: H={heads} < P={p}; lower the SP degree or use the \
                 Ulysses x ring hybrid"
            )));
        }
        let group = heads / kv_heads;
        let q_split: Vec<i64> = (0..pi).map(|r| heads / pi + i64::from(r < heads % pi)).collect();
        let mut start = 0;
        let kv_ranges: Vec<(i64, i64)> = q_split
            .iter()
            .map(|&len| {
                let (first, last) = (start / group, (start + len - 1) / group);
                start += len;
                (first, last - first + 1)
            })
            .collect();
        let partition = kv_ranges.windows(2).all(|w| w[0].0 + w[0].1 == w[1].0);
        Ok(HeadPlan { heads, kv_heads, q_split, kv_ranges, replicate: !partition })
    }

    /// Query heads H.
    pub fn heads(&self) -> i64 {
        self.heads
    }

    /// Key/value heads H_kv.
    pub fn kv_heads(&self) -> i64 {
        self.kv_heads
    }

    /// Query heads of each rank.
    pub fn q_split(&self) -> &[i64] {
        &self.q_split
    }

    /// Key/value heads each rank receives (replicas counted).
    pub fn kv_split(&self) -> Vec<i64> {
        self.kv_ranges.iter().map(|&(_, len)| len).collect()
    }

    /// Whether kv heads are replicated before the all-to-all.
    pub fn replicates_kv(&self) -> bool {
        self.replicate
    }

    /// The kv heads every rank needs, in rank order (the input of the all-to-all).
    ///
    /// # Shapes
    /// `[b, s, H_kv, d]` -> `[b, s, sum(kv_split), d]` (the same tensor when nothing is replicated).
    pub fn replicate_kv(&self, kv: &Tensor) -> Result<Tensor> {
        if !self.replicate {
            return Ok(kv.shallow_clone());
        }
        let index: Vec<i64> = self.kv_ranges.iter().flat_map(|&(first, len)| first..first + len).collect();
        let index = Tensor::from_slice(&index).f_to(kv.device()).op("head_plan")?;
        kv.f_index_select(2, &index).op("head_plan")
    }

    /// Rank `r`'s kv heads, one per query head it computes.
    ///
    /// # Shapes
    /// `[b, N, kv_split[r], d]` -> `[b, N, q_split[r], d]` (the same tensor for plain MHA).
    pub fn expand_kv(&self, r: usize, kv: &Tensor) -> Result<Tensor> {
        let Some(map) = self.expand_map(r) else { return Ok(kv.shallow_clone()) };
        let map = Tensor::from_slice(&map).f_to(kv.device()).op("head_plan")?;
        kv.f_index_select(2, &map).op("head_plan")
    }

    /// For each query head rank `r` computes, the index of its kv head among the kv heads the
    /// rank receives; `None` for plain multi-head attention (one kv head per query head).
    pub fn expand_map(&self, r: usize) -> Option<Vec<i64>> {
        let group = self.heads / self.kv_heads;
        if group == 1 {
            return None;
        }
        let q_start: i64 = self.q_split[..r].iter().sum();
        let first_kv = self.kv_ranges[r].0;
        Some((q_start..q_start + self.q_split[r]).map(|h| h / group - first_kv).collect())
    }
}
