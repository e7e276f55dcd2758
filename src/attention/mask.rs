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
