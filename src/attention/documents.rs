//! Packed sequences: several documents in each sample's sequence of N tokens, attention kept
//! inside each document.
//!
//! Long-context training packs documents of very different lengths into fixed-length sequences
//! instead of padding each to the longest. A token may then attend only to tokens of its own
//! document, under the kernel's rule (causal, a window, or none) applied to positions *within*
//! the document; positions for RoPE restart at every document.
//!
//! The layout is the one varlen kernels take (FlashAttention's `cu_seqlens`, TransformerEngine's
//! THD format): per sample, the cumulative offsets `[0, l_0, l_0 + l_1, .., N]` of its documents.
//! Every rank receives the whole batch's offsets (a few integers per document); each works out
//! which documents its own tokens, and the keys that reach it, belong to.
//!
//! What each strategy does with it (one parity suite, `tests/packed.rs`):
//! - kernels on whole sequences (one device, Ulysses after its all-to-all, Megatron-SP): the
//!   sequence is cut at the offsets and the kernel runs on each document on its own, since the
//!   rules above depend only on distances (`Mask::is_shift_invariant`); the all-to-alls are
//!   unchanged;
//! - blockwise attention over global positions (ring, zigzag, Ulysses x ring): a pair of runs
//!   that shares no document is skipped, one that spans several is cut at their boundaries and
//!   only same-document pieces are computed; all-gather KV masks its one SDPA call with a
//!   same-document mask.
//!
//! Load balance: [`Documents::work_per_rank`] counts each rank's visible pairs for a layout,
//! [`Documents::balanced_layout`] builds one that evens them out for this batch, and
//! [`Documents::with_layout`] hands it to ring attention.
//!
//! # Shapes
//! Offsets per sample: `b` vectors of `D_s + 1` increasing i64 from 0 to N. Document ids and
//! positions within documents: `[b, len]` i64 for any list of global positions.

use tch::{Device, Tensor};

use super::{Mask, SeqLayout};
use crate::error::TorchResultExt;
use crate::{Error, Result};

/// The documents packed into each sample of a batch: `cu_seqlens` per sample.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Documents {
    n: i64,
    /// Per sample, `[0, l_0, l_0 + l_1, .., n]`.
    offsets: Vec<Vec<i64>>,
    /// This batch's own layout over the ranks, for ring attention (see
    /// [`with_layout`](Documents::with_layout)); `None`: the strategy's.
    layout: Option<SeqLayout>,
}

impl Documents {
    fn error(msg: String) -> Error {
        Error::InvalidArgument { op: "documents", group: "-".into(), msg }
    }

    /// Documents of a batch from their cumulative offsets, one vector per sample; each must
    /// start at 0, increase strictly (no document of length 0) and end at `n`.
    pub fn new(n: i64, offsets: Vec<Vec<i64>>) -> Result<Documents> {
        if n < 1 {
            return Err(Self::error(format!("a sequence of {n} tokens holds no document")));
        }
        if offsets.is_empty() {
            return Err(Self::error("no sample: give the offsets of at least one".into()));
        }
        for (s, cu) in offsets.iter().enumerate() {
            let shown = show(cu);
            if cu.len() < 2 {
                return Err(Self::error(format!(
                    "sample {s}: offsets {shown} need at least [0, {n}] (one document)"
                )));
            }
            if cu[0] != 0 {
                return Err(Self::error(format!(
                    "sample {s}: offsets {shown} must start at 0, not {}",
                    cu[0]
                )));
            }
            if let Some(i) = (1..cu.len()).find(|&i| cu[i] <= cu[i - 1]) {
                let what = if cu[i] == cu[i - 1] { "a document of length 0" } else { "offsets going back" };
                return Err(Self::error(format!(
                    "sample {s}: offsets {shown} must increase: {what} at index {i} ({} then {})",
                    cu[i - 1],
                    cu[i]
                )));
            }
            let last = cu[cu.len() - 1];
            if last != n {
                return Err(Self::error(format!(
                    "sample {s}: offsets {shown} must end at the sequence length {n}, not {last}"
                )));
            }
        }
        Ok(Documents { n, offsets, layout: None })
    }

    /// Documents from their lengths, one vector per sample; each must sum to `n`.
    pub fn from_lengths(n: i64, lengths: &[Vec<i64>]) -> Result<Documents> {
        let offsets = lengths
            .iter()
            .map(|ls| {
                let mut cu = vec![0];
                let mut end = 0;
                for &l in ls {
                    end += l;
                    cu.push(end);
                }
                cu
            })
            .collect();
        Documents::new(n, offsets)
    }

    /// Documents from one flat `cu_seqlens` over the `b x n` tokens of the batch in order (the
    /// convention of FlashAttention's varlen functions): `[0, .., b n]`, every sample boundary
    /// `s n` among the offsets (a document does not run on into the next sample).
    pub fn from_flat(n: i64, b: i64, cu_seqlens: &[i64]) -> Result<Documents> {
        if n < 1 || b < 1 {
            return Err(Self::error(format!("a batch of {b} sample(s) of {n} tokens holds no document")));
        }
        let shown = show(cu_seqlens);
        if cu_seqlens.first() != Some(&0) || cu_seqlens.last() != Some(&(b * n)) {
            return Err(Self::error(format!(
                "cu_seqlens {shown} must run from 0 to the batch's {b} x {n} = {} tokens",
                b * n
            )));
        }
        let mut offsets = vec![Vec::new(); b as usize];
        for s in 0..b {
            let (lo, hi) = (s * n, (s + 1) * n);
            if !cu_seqlens.contains(&lo) || !cu_seqlens.contains(&hi) {
                return Err(Self::error(format!(
                    "cu_seqlens {shown} must hold every sample boundary: {} is missing (sample {s} is tokens \
                     {lo}..{hi}), so a document would run on into the next sample",
                    if cu_seqlens.contains(&lo) { hi } else { lo }
                )));
            }
            offsets[s as usize] =
                cu_seqlens.iter().filter(|&&o| o >= lo && o <= hi).map(|&o| o - lo).collect();
        }
        // The per-sample checks (increasing, no empty document) name the sample.
        if let Some(i) = (1..cu_seqlens.len()).find(|&i| cu_seqlens[i] <= cu_seqlens[i - 1]) {
            return Err(Self::error(format!(
                "cu_seqlens {shown} must increase: index {i} holds {} after {}",
                cu_seqlens[i],
                cu_seqlens[i - 1]
            )));
        }
        Documents::new(n, offsets)
    }

    /// The flat `cu_seqlens` of [`from_flat`](Documents::from_flat).
    pub fn flat(&self) -> Vec<i64> {
        let mut out = vec![0];
        for (s, cu) in self.offsets.iter().enumerate() {
            out.extend(cu[1..].iter().map(|o| o + s as i64 * self.n));
        }
        out
    }

    /// One document per sample: the plain (unpacked) batch of `b` sequences.
    pub fn whole(n: i64, b: usize) -> Result<Documents> {
        Documents::new(n, vec![vec![0, n]; b])
    }

    /// These documents with a layout of their own over the ranks (e.g.
    /// [`balanced_layout`](Documents::balanced_layout)): ring attention then gives each rank the
    /// layout's tokens for this batch instead of its fixed contiguous or zigzag shares, and the
    /// data must be sharded by it ([`layout`](Documents::layout)). Every rank must hold as many
    /// tokens as the strategy's own layout gives it; the strategies that need their own layout
    /// (the all-to-alls of Ulysses and USP, Megatron-SP) refuse such a batch.
    pub fn with_layout(mut self, layout: SeqLayout) -> Result<Documents> {
        if layout.global_len() != self.n {
            return Err(Self::error(format!(
                "the {} layout covers {} tokens, the documents {}",
                layout.name(),
                layout.global_len(),
                self.n
            )));
        }
        self.layout = Some(layout);
        Ok(self)
    }

    /// The batch's own layout, if [`with_layout`](Documents::with_layout) gave one.
    pub fn layout(&self) -> Option<&SeqLayout> {
        self.layout.as_ref()
    }

    /// Refuses a batch layout for a strategy that cannot take one (`op` names the strategy).
    pub(crate) fn refuse_layout(&self, op: &'static str) -> Result<()> {
        match &self.layout {
            Some(l) => Err(Error::InvalidArgument {
                op,
                group: "-".into(),
                msg: format!(
                    "a batch with its own ({}) layout is for ring attention; {op} shards by its own layout",
                    l.name()
                ),
            }),
            None => Ok(()),
        }
    }

    /// Whether every sample is one document (nothing packed).
    pub fn is_whole(&self) -> bool {
        self.offsets.iter().all(|cu| cu.len() == 2)
    }

    /// The sequence length N every sample's documents fill.
    pub fn global_len(&self) -> i64 {
        self.n
    }

    /// Number of samples (the batch size b).
    pub fn samples(&self) -> usize {
        self.offsets.len()
    }

    /// Sample `s`'s offsets `[0, .., N]`.
    pub fn offsets(&self, s: usize) -> &[i64] {
        &self.offsets[s]
    }

    /// Sample `s`'s document lengths.
    pub fn lengths(&self, s: usize) -> Vec<i64> {
        self.offsets[s].windows(2).map(|w| w[1] - w[0]).collect()
    }

    /// Refuses a batch of `b` samples of `n` tokens these documents do not describe, and a rule
    /// that is not the same at every position (block-sparse: its blocks are fixed to global
    /// positions, so a document could not start afresh).
    pub fn check(&self, op: &'static str, b: i64, n: i64, mask: &Mask) -> Result<()> {
        if b != self.samples() as i64 || n != self.n {
            return Err(Error::InvalidArgument {
                op,
                group: "-".into(),
                msg: format!(
                    "the documents describe {} sample(s) of {} tokens, the batch has {b} of {n}",
                    self.samples(),
                    self.n
                ),
            });
        }
        if !self.is_whole() && !mask.is_shift_invariant() {
            return Err(Error::InvalidArgument {
                op,
                group: "-".into(),
                msg: format!(
                    "packed documents need a rule that restarts with each document (none, causal, \
                     window); {mask:?} is tied to global positions"
                ),
            });
        }
        Ok(())
    }

    /// Index of the document that holds position `p` of sample `s`.
    fn doc_of(&self, s: usize, p: i64) -> usize {
        // the last offset <= p
        self.offsets[s].partition_point(|&o| o <= p) - 1
    }

    /// `[start, end)` of the document that holds position `p` of sample `s`.
    fn span_of(&self, s: usize, p: i64) -> (i64, i64) {
        let d = self.doc_of(s, p);
        (self.offsets[s][d], self.offsets[s][d + 1])
    }

    /// For each sample, `f(sample, position)` over the positions of `segments` in order, as
    /// `[b, len]` i64.
    fn per_position(
        &self,
        segments: &[(i64, i64)],
        device: Device,
        f: impl Fn(usize, i64) -> i64,
    ) -> Result<Tensor, tch::TchError> {
        let len: i64 = segments.iter().map(|&(_, l)| l).sum();
        let values: Vec<i64> = (0..self.samples())
            .flat_map(|s| {
                segments.iter().flat_map(move |&(start, l)| (start..start + l).map(move |p| (s, p)))
            })
            .map(|(s, p)| f(s, p))
            .collect();
        Tensor::from_slice(&values).f_view([self.samples() as i64, len])?.f_to(device)
    }

    /// The document index of every position of `segments` (global positions, in order).
    ///
    /// # Shapes
    /// -> `[b, len]` i64.
    pub fn ids(&self, segments: &[(i64, i64)], device: Device) -> Result<Tensor> {
        self.per_position(segments, device, |s, p| self.doc_of(s, p) as i64).op("documents")
    }

    /// Positions within their documents (what RoPE rotates by) of the global positions `global`
    /// (`[len]` i64, e.g. a strategy's `input_positions`).
    ///
    /// # Shapes
    /// `[len]` -> `[b, len]` i64.
    pub fn local_positions(&self, global: &Tensor) -> Result<Tensor> {
        let device = global.device();
        let g: Vec<i64> = Vec::<i64>::try_from(global.f_to(Device::Cpu).op("documents")?).op("documents")?;
        if let Some(&bad) = g.iter().find(|&&p| p < 0 || p >= self.n) {
            return Err(Self::error(format!(
                "position {bad} lies outside the sequence of {} tokens",
                self.n
            )));
        }
        let segments: Vec<(i64, i64)> = g.iter().map(|&p| (p, 1)).collect();
        self.per_position(&segments, device, |s, p| p - self.span_of(s, p).0).op("documents")
    }

    /// The run `[start, start + len)` of sample `s` cut at its documents' boundaries:
    /// (document, first position, length) per piece, in order.
    pub fn pieces(&self, s: usize, start: i64, len: i64) -> Vec<(usize, i64, i64)> {
        let mut out = Vec::new();
        let (mut p, end) = (start, start + len);
        while p < end {
            let d = self.doc_of(s, p);
            let stop = self.offsets[s][d + 1].min(end);
            out.push((d, p, stop - p));
            p = stop;
        }
        out
    }

    /// Whether some query of `[q0, q0 + nq)` and some key of `[k0, k0 + nk)` lie in one
    /// document, in some sample.
    pub fn runs_meet(&self, (q0, nq): (i64, i64), (k0, nk): (i64, i64)) -> bool {
        (0..self.samples()).any(|s| {
            let (qa, qb) = (self.doc_of(s, q0), self.doc_of(s, q0 + nq - 1));
            let (ka, kb) = (self.doc_of(s, k0), self.doc_of(s, k0 + nk - 1));
            qa <= kb && ka <= qb
        })
    }

    /// Whether both runs lie inside one document in every sample (the document mask then hides
    /// nothing the rule does not).
    pub fn within_one(&self, (q0, nq): (i64, i64), (k0, nk): (i64, i64)) -> bool {
        (0..self.samples()).all(|s| {
            let d = self.doc_of(s, q0);
            [q0 + nq - 1, k0, k0 + nk - 1].iter().all(|&p| self.doc_of(s, p) == d)
        })
    }

    /// Pairs (i, j) with query i in `[q0, q0 + nq)`, key j in `[k0, k0 + nk)`, both in one
    /// document and allowed by `mask` on their positions within it, summed over the samples.
    /// O(b x nq).
    pub fn visible_in_block(&self, mask: &Mask, (q0, nq): (i64, i64), (k0, nk): (i64, i64)) -> u64 {
        let k1 = k0 + nk - 1;
        let span = |lo: i64, hi: i64| (hi.min(k1) - lo.max(k0) + 1).max(0) as u64;
        let mut pairs = 0;
        for s in 0..self.samples() {
            for i in q0..q0 + nq {
                let (a, e) = self.span_of(s, i);
                // keys of i's document that the rule allows, as global positions [lo, hi]
                let (lo, hi) = match *mask {
                    Mask::None => (a, e - 1),
                    Mask::SlidingWindow { window } => ((i - window + 1).max(a), i),
                    _ => (a, i),
                };
                pairs += span(lo, hi);
            }
        }
        pairs
    }

    /// Pairs the rule allows within documents for the queries `[q0, q1)` against every key,
    /// summed over the samples: the exact work of those rows. O(documents).
    pub fn visible_in_rows(&self, mask: &Mask, q0: i64, q1: i64) -> u64 {
        let mut pairs = 0;
        for cu in &self.offsets {
            for w in cu.windows(2) {
                let (a, e) = (w[0], w[1]);
                let (lo, hi) = (q0.max(a), q1.min(e));
                if lo < hi {
                    // the same rule on a sequence of e - a tokens, rows lo - a .. hi - a
                    pairs += mask.visible_in_rows(lo - a, hi - a, e - a);
                }
            }
        }
        pairs
    }

    /// Pairs the rule allows within documents in the whole batch (the work of an exact varlen
    /// kernel, per head): what model FLOPs count for a packed batch.
    pub fn visible_pairs(&self, mask: &Mask) -> u64 {
        self.visible_in_rows(mask, 0, self.n)
    }

    /// A layout of this batch over `p` ranks that evens out their attention work under `mask`:
    /// the sequence cut into `p x chunks_per_rank` equal chunks, the chunks dealt out heaviest
    /// first, each to the least loaded rank that still has room, so that every rank holds as
    /// many tokens (what ring attention needs) and about as many visible pairs. (Zigzag does this
    /// for one causal sequence; on packed documents it can leave a rank 1.8x the mean, see
    /// `tests/packed.rs`.) The layout depends on the batch: a strategy built on it serves
    /// batches of these documents.
    pub fn balanced_layout(&self, mask: &Mask, p: usize, chunks_per_rank: usize) -> Result<SeqLayout> {
        let m = (p * chunks_per_rank) as i64;
        if m == 0 || self.n % m != 0 {
            return Err(Self::error(format!(
                "a balanced layout cuts the {} tokens into {p} ranks x {chunks_per_rank} chunks = {m} equal \
                 chunks, which does not divide them",
                self.n
            )));
        }
        let size = self.n / m;
        let work: Vec<u64> = (0..m).map(|c| self.visible_in_rows(mask, c * size, (c + 1) * size)).collect();
        let mut order: Vec<usize> = (0..m as usize).collect();
        order.sort_by_key(|&c| (std::cmp::Reverse(work[c]), c));
        let (mut load, mut held) = (vec![0u64; p], vec![Vec::new(); p]);
        for c in order {
            let r = (0..p)
                .filter(|&r| held[r].len() < chunks_per_rank)
                .min_by_key(|&r| (load[r], r))
                .expect("m = p x chunks_per_rank chunks always leave room for the next one");
            load[r] += work[c];
            held[r].push(c as i64);
        }
        let segments = held
            .into_iter()
            .map(|mut chunks| {
                chunks.sort_unstable();
                // adjacent chunks as one run
                let mut runs: Vec<(i64, i64)> = Vec::new();
                for c in chunks {
                    match runs.last_mut() {
                        Some((start, len)) if *start + *len == c * size => *len += size,
                        _ => runs.push((c * size, size)),
                    }
                }
                runs
            })
            .collect();
        Ok(SeqLayout::from_segments(self.n, segments, "balanced"))
    }

    /// Per rank of `layout`, the pairs its queries see (its attention work, per head, summed
    /// over the samples): what decides how long the slowest rank of ring attention computes.
    pub fn work_per_rank(&self, mask: &Mask, layout: &SeqLayout) -> Vec<u64> {
        (0..layout.ranks())
            .map(|r| {
                layout
                    .segments(r)
                    .iter()
                    .map(|&(start, len)| self.visible_in_rows(mask, start, start + len))
                    .sum()
            })
            .collect()
    }
}

/// The most loaded rank's work over the mean (1 when balanced); 1 for no work at all.
pub fn imbalance(work: &[u64]) -> f64 {
    let total: u64 = work.iter().sum();
    if total == 0 || work.is_empty() {
        return 1.0;
    }
    let max = *work.iter().max().unwrap_or(&0) as f64;
    max * work.len() as f64 / total as f64
}

/// Offsets written for a message: all of them when short, else the first and last few.
fn show(cu: &[i64]) -> String {
    if cu.len() <= 12 {
        return format!("{cu:?}");
    }
    let head: Vec<String> = cu[..5].iter().map(i64::to_string).collect();
    let tail: Vec<String> = cu[cu.len() - 3..].iter().map(i64::to_string).collect();
    format!("[{}, .. ({} more) .., {}]", head.join(", "), cu.len() - 8, tail.join(", "))
}

/// Attention of a kernel on each document on its own: every sample's sequence cut at its
/// offsets, `attend` run on each `[1, len, h, d]` piece, the pieces put back in order. Exact
/// for a rule that depends only on distances.
///
/// # Shapes
/// `q`, `k`, `v`: `[b, N, h, d]` -> what `attend` returns per piece, concatenated along dim 1
/// (then dim 0).
pub(crate) fn per_document<T>(
    docs: &Documents,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    attend: impl Fn(&Tensor, &Tensor, &Tensor) -> Result<T>,
    join: impl Fn(Vec<T>, i64) -> Result<T>,
) -> Result<T> {
    let mut samples = Vec::with_capacity(docs.samples());
    for s in 0..docs.samples() {
        let sample = |t: &Tensor| t.f_narrow(0, s as i64, 1).op("documents");
        let (qs, ks, vs) = (sample(q)?, sample(k)?, sample(v)?);
        let mut pieces = Vec::with_capacity(docs.offsets[s].len() - 1);
        for w in docs.offsets[s].windows(2) {
            let cut = |t: &Tensor| t.f_narrow(1, w[0], w[1] - w[0]).op("documents");
            // [1, N, h, d] -> [1, len, h, d]
            pieces.push(attend(&cut(&qs)?, &cut(&ks)?, &cut(&vs)?)?);
        }
        samples.push(join(pieces, 1)?);
    }
    join(samples, 0)
}

/// `Tensor::cat` as a `join` for [`per_document`].
pub(crate) fn cat(parts: Vec<Tensor>, dim: i64) -> Result<Tensor> {
    Tensor::f_cat(&parts, dim).op("documents")
}

/// The same for (out, lse) pairs.
pub(crate) fn cat_pairs(parts: Vec<(Tensor, Tensor)>, dim: i64) -> Result<(Tensor, Tensor)> {
    let (outs, lses): (Vec<Tensor>, Vec<Tensor>) = parts.into_iter().unzip();
    Ok((cat(outs, dim)?, cat(lses, dim)?))
}

/// A boolean `[b, 1, nq, nk]` mask, true where query and key lie in one document.
pub(crate) fn same_document(
    docs: &Documents,
    qseg: &[(i64, i64)],
    kseg: &[(i64, i64)],
    device: Device,
) -> Result<Tensor, tch::TchError> {
    let id = |seg: &[(i64, i64)]| docs.per_position(seg, device, |s, p| docs.doc_of(s, p) as i64);
    let (qi, ki) = (id(qseg)?, id(kseg)?);
    // [b, nq] -> [b, 1, nq, 1]; [b, nk] -> [b, 1, 1, nk]
    qi.f_view([qi.size()[0], 1, -1, 1])?.f_eq_tensor(&ki.f_view([ki.size()[0], 1, 1, -1])?)
}
