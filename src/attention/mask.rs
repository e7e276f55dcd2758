//! Which keys a query may attend to, as a rule on global token positions.
//!
//! Every local attention takes one [`Mask`]. The rule is stated once, on positions (query i,
//! key j, both global, 0-based), and everything else is derived from it: the dense boolean mask
//! of the math reference, the key blocks that the blocked kernel visits, the flag SDPA takes.
//! Every rule lets a query see itself, so no softmax row is empty.

use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

/// The fixed block-sparse pattern of the Sparse Transformer (Child et al. 2019), as DeepSpeed's
/// `FixedSparsityConfig` builds it for the paper's sparse runs (Jacobs et al. 2023, §4.3): the
/// sequence is cut into blocks of `block` tokens and the blocks into windows of `local_blocks`;
/// a query block sees every block of its own window (local) and the last `global_blocks` blocks
/// of every window (global "summary" blocks).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockSparse {
    /// Tokens per block (DeepSpeed default 16; 64 or 128 on GPUs).
    pub block: i64,
    /// Blocks per local window (DeepSpeed default 4).
    pub local_blocks: i64,
    /// Blocks at the end of each window that every query attends to (DeepSpeed default 1).
    pub global_blocks: i64,
    /// Also apply the causal rule (DeepSpeed's "unidirectional").
    pub causal: bool,
}

impl BlockSparse {
    /// Whether query block `qb` sees key block `kb` (before the causal rule).
    pub fn blocks_connected(&self, qb: i64, kb: i64) -> bool {
        let same_window = qb / self.local_blocks == kb / self.local_blocks;
        let global = kb % self.local_blocks >= self.local_blocks - self.global_blocks;
        same_window || global
    }
}

impl BlockSparse {
    /// [`Mask::visible_in_rows`] for this pattern: per query block, the tokens of the key blocks
    /// it is connected to (its window, and the global blocks of every other window), the causal
    /// rule cutting the diagonal block to a triangle and dropping later blocks.
    fn visible_in_rows(&self, q0: i64, q1: i64, n: i64) -> u64 {
        let (bs, l, g) = (self.block, self.local_blocks, self.global_blocks);
        let nb = (n + bs - 1) / bs;
        // tokens of blocks [b0, b1), the last block possibly short
        let tokens = |b0: i64, b1: i64| ((b1 * bs).min(n) - (b0 * bs).min(n)).max(0);
        // global tokens of window w (its last g blocks)
        let global_in = |w: i64| tokens(w * l + l - g, w * l + l);
        let global_total: i64 = (0..(nb + l - 1) / l).map(global_in).sum();
        let mut pairs: u64 = 0;
        for qb in q0 / bs..=(q1 - 1) / bs {
            let (r0, r1) = ((qb * bs).max(q0), ((qb + 1) * bs).min(q1)); // rows of this block in range
            let rows = (r1 - r0) as u64;
            let w = qb / l;
            if self.causal {
                // connected blocks before qb: its window's earlier blocks and the global blocks of
                // earlier windows (all full); then the triangle of the diagonal block
                let before = (tokens(w * l, qb) + w * g * bs) as u64;
                let first = (r0 - qb * bs + 1) as u64; // keys of row r0 inside the diagonal block
                pairs += rows * before + rows * first + rows * (rows - 1) / 2;
            } else {
                let own = tokens(w * l, (w + 1) * l);
                let keys = own + global_total - global_in(w);
                pairs += rows * keys as u64;
            }
        }
        pairs
    }
}

/// The attention rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Mask {
    /// Every query sees every key (bidirectional).
    None,
    /// Query i sees keys j <= i.
    #[default]
    Causal,
    /// Causal with a window: query i sees keys i - window < j <= i.
    SlidingWindow { window: i64 },
    /// The fixed block-sparse pattern.
    BlockSparse(BlockSparse),
}

impl Mask {
    /// Checks the mask's own numbers.
    pub fn validate(&self) -> Result<(), String> {
        match *self {
            Mask::SlidingWindow { window } if window < 1 => {
                Err(format!("sliding window {window} must be at least 1"))
            }
            Mask::BlockSparse(b) if b.block < 1 || b.local_blocks < 1 => Err(format!(
                "block-sparse block {} and local_blocks {} must be at least 1",
                b.block, b.local_blocks
            )),
            Mask::BlockSparse(b) if b.global_blocks < 0 || b.global_blocks > b.local_blocks => Err(format!(
                "block-sparse global_blocks {} must lie in 0..={}",
                b.global_blocks, b.local_blocks
            )),
            _ => Ok(()),
        }
    }

    /// Whether query position `i` may see key position `j`.
    pub fn allows(&self, i: i64, j: i64) -> bool {
        match *self {
            Mask::None => true,
            Mask::Causal => j <= i,
            Mask::SlidingWindow { window } => j <= i && j > i - window,
            Mask::BlockSparse(b) => (!b.causal || j <= i) && b.blocks_connected(i / b.block, j / b.block),
        }
    }

    /// The rule for every (query, key) pair of `queries` x `keys` (positions, i64 vectors), as a
    /// boolean tensor `[len(queries), len(keys)]`, true where attention is allowed.
    pub fn dense(&self, queries: &Tensor, keys: &Tensor) -> Result<Tensor, tch::TchError> {
        self.allowed(&queries.f_unsqueeze(1)?, &keys.f_unsqueeze(0)?)
    }

    /// The rule applied elementwise to query positions `i` and key positions `j` (i64 tensors
    /// that broadcast together), true where attention is allowed.
    pub fn allowed(&self, i: &Tensor, j: &Tensor) -> Result<Tensor, tch::TchError> {
        let causal = || j.f_le_tensor(i);
        match *self {
            Mask::None => i.f_ge_tensor(j)?.f_logical_or(&i.f_lt_tensor(j)?),
            Mask::Causal => causal(),
            Mask::SlidingWindow { window } => {
                causal()?.f_logical_and(&j.f_gt_tensor(&i.f_sub_scalar(window)?)?)
            }
            Mask::BlockSparse(b) => {
                let (qb, kb) = (i.f_floor_divide_scalar(b.block)?, j.f_floor_divide_scalar(b.block)?);
                let same_window = qb
                    .f_floor_divide_scalar(b.local_blocks)?
                    .f_eq_tensor(&kb.f_floor_divide_scalar(b.local_blocks)?)?;
                let global = kb.f_remainder(b.local_blocks)?.f_ge(b.local_blocks - b.global_blocks)?;
                let connected = same_window.f_logical_or(&global)?;
                if b.causal {
                    connected.f_logical_and(&causal()?)
                } else {
                    Ok(connected)
                }
            }
        }
    }

    /// For each query block of `block` tokens over a sequence of `n`, the key blocks that hold
    /// at least one allowed key, ascending.
    pub fn key_blocks(&self, n: i64, block: i64) -> Vec<Vec<i64>> {
        let nb = (n + block - 1) / block;
        let last = |qb: i64| ((qb + 1) * block).min(n) - 1; // last query position of the block
        (0..nb)
            .map(|qb| {
                let (q0, q1) = (qb * block, last(qb));
                (0..nb)
                    .filter(|&kb| {
                        let (k0, k1) = (kb * block, ((kb + 1) * block).min(n) - 1);
                        match *self {
                            Mask::None => true,
                            Mask::Causal => k0 <= q1,
                            Mask::SlidingWindow { window } => k0 <= q1 && k1 > q0 - window,
                            Mask::BlockSparse(b) if b.block == block => {
                                (!b.causal || kb <= qb) && b.blocks_connected(qb, kb)
                            }
                            // Blocks other than the pattern's own: test positions.
                            Mask::BlockSparse(_) => (q0..=q1).any(|i| (k0..=k1).any(|j| self.allows(i, j))),
                        }
                    })
                    .collect()
            })
            .collect()
    }

    /// Pairs (i, j) the rule allows in a whole sequence of `n` tokens: the (query, key) work of
    /// an exact kernel, per head and sample (`n^2` without a mask, `n(n+1)/2` causal, about
    /// `n x window` for a sliding window). What model FLOPs count ([`GptConfig::train_flops`]).
    ///
    /// [`GptConfig::train_flops`]: crate::model::GptConfig::train_flops
    pub fn visible_pairs(&self, n: i64) -> u64 {
        self.visible_in_rows(0, n, n)
    }

    /// Pairs (i, j) the rule allows with query `i` in `[q0, q1)` and key `j` in `[0, n)`: the
    /// work of the rank that holds those queries (ring attention's contiguous shares). Closed
    /// forms per rule, O(blocks) for block-sparse, so that million-token sequences count at once.
    pub fn visible_in_rows(&self, q0: i64, q1: i64, n: i64) -> u64 {
        let (q0, q1) = (q0.clamp(0, n), q1.clamp(0, n));
        if q1 <= q0 {
            return 0;
        }
        // sum over i in [0, k) of (i + 1)
        let tri = |k: i64| (k as u64) * (k as u64 + 1) / 2;
        match *self {
            Mask::None => ((q1 - q0) as u64) * n as u64,
            Mask::Causal => tri(q1) - tri(q0),
            Mask::SlidingWindow { window } => {
                // row i sees min(i + 1, window) keys
                let upto = |k: i64| {
                    if k <= window {
                        tri(k)
                    } else {
                        tri(window) + ((k - window) as u64) * window as u64
                    }
                };
                upto(q1) - upto(q0)
            }
            Mask::BlockSparse(b) => b.visible_in_rows(q0, q1, n),
        }
    }

    /// Whether the rule depends only on the distance `i - j` (none, causal, a window), so that
    /// it can restart at every packed document; block-sparse blocks are tied to positions.
    pub fn is_shift_invariant(&self) -> bool {
        !matches!(self, Mask::BlockSparse(_))
    }

    /// Whether the rule is the plain causal one (SDPA and flash kernels take it as a flag).
    pub fn is_causal(&self) -> bool {
        matches!(self, Mask::Causal)
    }

    /// Positions `0..n` on `device`.
    pub fn positions(n: i64, device: Device) -> Result<Tensor, tch::TchError> {
        Tensor::f_arange(n, (Kind::Int64, device))
    }
}

impl std::str::FromStr for Mask {
    type Err = String;

    /// `none`, `causal`, `window:W`, `sparse:B,L,G` (bidirectional) or `sparse-causal:B,L,G`
    /// (block B tokens, L blocks per local window, G global blocks per window).
    fn from_str(s: &str) -> Result<Mask, String> {
        let (kind, args) = s.split_once(':').unwrap_or((s, ""));
        let numbers = |want: usize| -> Result<Vec<i64>, String> {
            let v: Vec<i64> = args
                .split(',')
                .map(|a| a.trim().parse::<i64>().map_err(|e| format!("{s:?}: {a:?} is not an integer ({e})")))
                .collect::<Result<_, _>>()?;
            if v.len() != want {
                return Err(format!("{s:?}: expected {want} numbers after ':', got {}", v.len()));
            }
            Ok(v)
        };
        let mask = match kind {
            "none" => Mask::None,
            "causal" => Mask::Causal,
            "window" => Mask::SlidingWindow { window: numbers(1)?[0] },
            "sparse" | "sparse-causal" => {
                let v = numbers(3)?;
                let causal = kind == "sparse-causal";
                Mask::BlockSparse(BlockSparse {
                    block: v[0],
                    local_blocks: v[1],
                    global_blocks: v[2],
                    causal,
                })
            }
            other => {
                return Err(format!(
                    "unknown mask {other:?}: use none, causal, window:W, sparse:B,L,G or sparse-causal:B,L,G"
                ))
            }
        };
        mask.validate()?;
        Ok(mask)
    }
}

impl std::str::FromStr for super::Kernel {
    type Err = String;

    /// `math`, `sdpa` or `blocked`.
    fn from_str(s: &str) -> Result<super::Kernel, String> {
        match s {
            "math" => Ok(super::Kernel::Math),
            "sdpa" => Ok(super::Kernel::Sdpa),
            "blocked" => Ok(super::Kernel::Blocked),
            other => Err(format!("unknown kernel {other:?}: use math, sdpa or blocked")),
        }
    }
}
