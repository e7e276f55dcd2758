//! How a global sequence of N tokens is spread over the P ranks of a sequence-parallel group.
//!
//! Each rank holds one or more *segments* (runs of consecutive global positions), in a fixed
//! order; its tokens are those segments concatenated. Three layouts:
//!
//! - **contiguous** (Ulysses, paper §3.1; ring and all-gather KV): rank r holds one run, in rank
//!   order. When P does not divide N the first `N % P` ranks hold one token more; the uneven
//!   all-to-all then gathers exactly N tokens, so nothing is padded and nothing is masked. (The
//!   reference implementation silently corrupts results in this case; we stay exact.)
//! - **zigzag** (ring attention with a causal mask): the sequence is cut into 2P equal chunks and
//!   rank r holds chunks r and 2P-1-r, so that every rank has as many visible (query, key) pairs.
//! - **nested** (Ulysses x ring): the sequence is first laid out over R ring ranks (contiguous or
//!   zigzag), then each ring chunk is cut contiguously over U Ulysses ranks; rank = ring * U +
//!   ulysses, so a Ulysses group's all-to-all gathers exactly its ring chunk.

use tch::{Device, Kind, Tensor};

use crate::error::TorchResultExt;
use crate::{Error, Result};

/// The shares of a sequence over the ranks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeqLayout {
    n: i64,
    /// Per rank, its segments (first position, length), in the order the rank holds them.
    segments: Vec<Vec<(i64, i64)>>,
    lens: Vec<i64>,
    name: &'static str,
}

impl SeqLayout {
    pub(crate) fn from_segments(n: i64, segments: Vec<Vec<(i64, i64)>>, name: &'static str) -> SeqLayout {
        let lens = segments.iter().map(|s| s.iter().map(|&(_, len)| len).sum()).collect();
        SeqLayout { n, segments, lens, name }
    }

    fn error(p: usize, msg: String) -> Error {
        Error::InvalidArgument { op: "sequence_layout", group: format!("{p} ranks"), msg }
    }

    /// Contiguous shares of `n` tokens over `p` ranks, the first `n % p` one longer.
    pub fn contiguous(n: i64, p: usize) -> Result<SeqLayout> {
        let pi = p as i64;
        if p == 0 || n < pi {
            return Err(Self::error(
                p,
                format!("a sequence of {n} tokens cannot give each of {p} ranks a token"),
            ));
        }
        let mut start = 0;
        let segments = (0..pi)
            .map(|r| {
                let len = n / pi + i64::from(r < n % pi);
                start += len;
                vec![(start - len, len)]
            })
            .collect();
        Ok(SeqLayout::from_segments(n, segments, "contiguous"))
    }

    /// Rank r holds chunks r and 2P-1-r of 2P equal chunks.
    pub fn zigzag(n: i64, p: usize) -> Result<SeqLayout> {
        let pi = p as i64;
        if p == 0 || n % (2 * pi) != 0 {
            return Err(Self::error(
                p,
                format!(
                    "zigzag needs N divisible by 2P: N={n}, 2P={}; pad the sequence or use contiguous",
                    2 * pi
                ),
            ));
        }
        let c = n / (2 * pi);
        let segments = (0..pi).map(|r| vec![(r * c, c), ((2 * pi - 1 - r) * c, c)]).collect();
        Ok(SeqLayout::from_segments(n, segments, "zigzag"))
    }

    /// Ring chunks over `ring` ranks (zigzag or contiguous), each cut into `ulysses` equal runs;
    /// rank `i * ulysses + j` holds run j of ring chunk i.
    pub fn nested(n: i64, ring: usize, ulysses: usize, zigzag: bool) -> Result<SeqLayout> {
        let outer = if zigzag { SeqLayout::zigzag(n, ring)? } else { SeqLayout::contiguous(n, ring)? };
        let u = ulysses as i64;
        let p = ring * ulysses;
        if ulysses == 0 || outer.lens.iter().any(|len| len % u != 0) {
            return Err(Self::error(
                p,
                format!("the ring chunks {:?} must split evenly over {ulysses} Ulysses ranks", outer.lens),
            ));
        }
        let mut segments = Vec::with_capacity(p);
        for (chunk, len) in outer.segments.iter().zip(&outer.lens) {
            let part = len / u;
            for j in 0..u {
                segments.push(cut(chunk, j * part, part));
            }
        }
        Ok(SeqLayout::from_segments(n, segments, if zigzag { "nested zigzag" } else { "nested contiguous" }))
    }

    /// The sequence in `chunks x p` equal pieces, rank r holding pieces `c p + r` for each chunk
    /// c, in chunk order: chunk c of every rank, gathered in rank order, is the contiguous
    /// segment c of the sequence (chunked Ulysses, FPDT). `n` must split evenly.
    pub fn strided(n: i64, p: usize, chunks: usize) -> Result<SeqLayout> {
        let (pi, u) = (p as i64, chunks as i64);
        if p == 0 || chunks == 0 || n % (pi * u) != 0 {
            return Err(Self::error(
                p,
                format!("{chunks} chunk(s) over {p} ranks need N divisible by {}: N = {n}", pi * u),
            ));
        }
        let piece = n / (pi * u);
        let segments = (0..pi).map(|r| (0..u).map(|c| ((c * pi + r) * piece, piece)).collect()).collect();
        Ok(SeqLayout::from_segments(n, segments, "strided"))
    }

    /// "contiguous", "zigzag", "nested zigzag", ...
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// Global sequence length N.
    pub fn global_len(&self) -> i64 {
        self.n
    }

    /// Number of ranks.
    pub fn ranks(&self) -> usize {
        self.lens.len()
    }

    /// Every rank's number of tokens, in rank order (the split all-to-alls gather with).
    pub fn lens(&self) -> &[i64] {
        &self.lens
    }

    /// Rank `r`'s number of tokens.
    pub fn len(&self, r: usize) -> i64 {
        self.lens[r]
    }

    /// Whether the sequence is empty (never: a layout gives every rank at least one token).
    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    /// Rank `r`'s segments (first position, length), in the order it holds them.
    pub fn segments(&self, r: usize) -> &[(i64, i64)] {
        &self.segments[r]
    }

    /// The segments of groups of `group` consecutive ranks, each group's in rank order: what the
    /// ranks of a ring hold when each ring rank stands for a group (USP's Ulysses groups; 1: the
    /// ranks themselves).
    pub fn grouped_segments(&self, group: usize) -> Vec<Vec<(i64, i64)>> {
        let group = group.max(1);
        (0..self.ranks() / group)
            .map(|i| (0..group).flat_map(|j| self.segments(i * group + j).iter().copied()).collect())
            .collect()
    }

    /// Whether every rank holds one run and the runs follow rank order (what an all-to-all over
    /// the whole group needs to gather the sequence in order).
    pub fn is_contiguous(&self) -> bool {
        let mut next = 0;
        for s in &self.segments {
            if s.len() != 1 || s[0].0 != next {
                return false;
            }
            next += s[0].1;
        }
        true
    }

    /// Global positions of rank `r`'s tokens, `[len_r]` i64.
    pub fn positions(&self, r: usize, device: Device) -> Result<Tensor> {
        let runs: Vec<Tensor> = self.segments[r]
            .iter()
            .map(|&(start, len)| Tensor::f_arange_start(start, start + len, (Kind::Int64, device)))
            .collect::<Result<_, _>>()
            .op("sequence_layout")?;
        Tensor::f_cat(&runs, 0).op("sequence_layout")
    }

    /// Rank `r`'s share of a global tensor whose dim `dim` is the sequence (a view for one
    /// segment, a copy for several).
    ///
    /// # Shapes
    /// `[.., N, ..]` -> `[.., len_r, ..]`.
    pub fn shard(&self, x: &Tensor, dim: i64, r: usize) -> Result<Tensor> {
        let d = self.seq_dim(x, dim)?;
        let mut runs: Vec<Tensor> = self.segments[r]
            .iter()
            .map(|&(start, len)| x.f_narrow(d, start, len))
            .collect::<Result<_, _>>()
            .op("sequence_layout")?;
        if runs.len() == 1 {
            return Ok(runs.swap_remove(0));
        }
        Tensor::f_cat(&runs, d).op("sequence_layout")
    }

    /// The inverse of [`shard`](SeqLayout::shard): every rank's share put back at its
    /// positions.
    ///
    /// # Shapes
    /// `parts[r]`: `[.., len_r, ..]` -> `[.., N, ..]`.
    pub fn unshard(&self, parts: &[Tensor], dim: i64) -> Result<Tensor> {
        if parts.len() != self.ranks() {
            return Err(Self::error(self.ranks(), format!("unshard got {} parts", parts.len())));
        }
        let d = if dim < 0 { dim + parts[0].dim() as i64 } else { dim };
        let mut pieces: Vec<(i64, Tensor)> = Vec::new();
        for (r, part) in parts.iter().enumerate() {
            let mut offset = 0;
            for &(start, len) in &self.segments[r] {
                pieces.push((start, part.f_narrow(d, offset, len).op("sequence_layout")?));
                offset += len;
            }
        }
        pieces.sort_by_key(|(start, _)| *start);
        let ordered: Vec<Tensor> = pieces.into_iter().map(|(_, t)| t).collect();
        Tensor::f_cat(&ordered, d).op("sequence_layout")
    }

    fn seq_dim(&self, x: &Tensor, dim: i64) -> Result<i64> {
        let d = if dim < 0 { dim + x.dim() as i64 } else { dim };
        let size = x.size();
        if d < 0 || d as usize >= size.len() || size[d as usize] != self.n {
            return Err(Error::Shape {
                op: "sequence_layout",
                shapes: vec![size],
                msg: format!("dim {dim} should hold the {} tokens of the sequence", self.n),
            });
        }
        Ok(d)
    }
}

/// The part `[offset, offset + len)` of the concatenation of `segments`, as segments.
fn cut(segments: &[(i64, i64)], offset: i64, len: i64) -> Vec<(i64, i64)> {
    let (mut out, mut skip, mut want) = (Vec::new(), offset, len);
    for &(start, n) in segments {
        if want == 0 {
            break;
        }
        if skip >= n {
            skip -= n;
            continue;
        }
        let take = (n - skip).min(want);
        out.push((start + skip, take));
        want -= take;
        skip = 0;
    }
    out
}

/// Which part of a global tensor `[b, N, heads, ..]` (q, k, v, the output, the log-sum-exp)
/// each rank of a strategy holds: some tokens and every head (sequence parallelism), or every
/// token and some heads (tensor parallelism: Megatron-SP's attention).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sharding {
    /// Rank r holds its tokens of the layout (dim 1), every head.
    Sequence(SeqLayout),
    /// Rank r of P holds heads `[r heads/P, (r+1) heads/P)` (dim 2) of every token.
    Heads { ranks: usize },
}

impl Sharding {
    /// Rank `r`'s share of a global tensor whose dim 1 is the sequence and dim 2 the heads.
    ///
    /// # Shapes
    /// `[b, N, heads, ..]` -> `[b, len_r, heads, ..]` or `[b, N, heads/P, ..]`.
    pub fn shard(&self, x: &Tensor, r: usize) -> Result<Tensor> {
        match self {
            Sharding::Sequence(layout) => layout.shard(x, 1, r),
            Sharding::Heads { ranks } => {
                let (p, heads) = (*ranks as i64, x.size().get(2).copied().unwrap_or(0));
                if x.dim() < 3 || heads % p != 0 {
                    return Err(Error::Shape {
                        op: "sharding",
                        shapes: vec![x.size()],
                        msg: format!("dim 2 should hold heads divisible by the {p} ranks"),
                    });
                }
                x.f_narrow(2, r as i64 * heads / p, heads / p).op("sharding")
            }
        }
    }

    /// The inverse of [`shard`](Sharding::shard): every rank's share, in rank order, put back.
    ///
    /// # Shapes
    /// `parts[r]`: `[b, len_r, heads, ..]` or `[b, N, heads/P, ..]` -> `[b, N, heads, ..]`.
    pub fn unshard(&self, parts: &[Tensor]) -> Result<Tensor> {
        match self {
            Sharding::Sequence(layout) => layout.unshard(parts, 1),
            Sharding::Heads { .. } => Tensor::f_cat(parts, 2).op("sharding"),
        }
    }
}
