//! How much of a GPU one fused attention kernel call keeps busy: the grid of thread blocks
//! (CTAs) a FlashAttention-class kernel launches, scheduled onto the streaming multiprocessors
//! (SMs).
//!
//! A flash kernel's forward launches one CTA per block of query rows and per (sample, head),
//! `ceil(rows / block_rows) x batch x heads`; its backward (parallel over the keys) one per block
//! of keys, `ceil(keys / block_keys) x batch x heads`. Ulysses splits the heads (paper §3.1):
//! after the all-to-all a rank attends `H/P` heads, one to four at the paper's degrees, so
//! at `N = 8K` on one head the forward's grid is 64 CTAs for an A100's 108 SMs. The published
//! efficiency of a kernel was measured on a grid of many waves (FlashAttention-2's benchmark:
//! 16K tokens of batch x sequence, hidden size 2048, so `2048 / d` heads); a call whose grid
//! leaves SMs idle, or ends in a ragged last wave, runs slower than that figure by the ratio of
//! the two grids' schedule efficiencies. That ratio is what [`occupancy`] returns.
//!
//! The schedule is modelled as the GPU's block scheduler runs it: CTAs in launch order (the
//! block index fastest, then sample and head), each to the first slot that frees. A CTA's work
//! is the number of (query block, key block) tiles it computes: every key block for an unmasked
//! call; under a causal mask the forward's query block `i` sees `i + 1` key blocks and the
//! backward's key block `j` is seen by the `n - j` query blocks from its own on. Each slot runs
//! at the same speed; a per-CTA fixed cost (loading the query block, writing the output) is not
//! counted.

use std::cell::RefCell;
use std::collections::{BinaryHeap, HashMap};

use serde::{Deserialize, Serialize};

/// The grid a kernel launches and the grid its published efficiency was measured on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KernelGrid {
    /// Query rows one CTA of the forward takes.
    pub block_rows: u32,
    /// Keys one CTA of the backward takes.
    pub block_keys: u32,
    /// CTAs one SM runs at once (each at that fraction of the SM's speed), forward and
    /// backward.
    pub ctas_per_sm: [u32; 2],
    /// The benchmark the efficiency curves come from: `reference_width / d` heads ...
    pub reference_width: f64,
    /// ... and a batch of `reference_tokens / N` sequences (at least one); absent: one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reference_tokens: Option<f64>,
}

impl KernelGrid {
    pub(crate) fn validate(&self) -> std::result::Result<(), String> {
        if self.block_rows < 1 || self.block_keys < 1 || self.ctas_per_sm.contains(&0) {
            return Err(format!(
                "attention_grid: block_rows = {}, block_keys = {}, ctas_per_sm = {:?} must all be at least 1",
                self.block_rows, self.block_keys, self.ctas_per_sm
            ));
        }
        let tokens_ok = self.reference_tokens.is_none_or(|t| t.is_finite() && t >= 1.0);
        if !(self.reference_width.is_finite() && self.reference_width >= 1.0 && tokens_ok) {
            return Err(format!(
                "attention_grid: reference_width = {} and reference_tokens = {:?} must be at least 1",
                self.reference_width, self.reference_tokens
            ));
        }
        Ok(())
    }
}

/// One kernel call: its query rows and keys, how many (sample, head) pairs it runs, whether
/// its mask is causal (a diagonal block: rows and keys the same span), and how many forwards it
/// runs per backward (2 when the block is recomputed).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Call {
    pub rows: f64,
    pub keys: f64,
    pub lanes: f64,
    pub causal: bool,
    pub forwards: f64,
}

/// A flash kernel's backward as FLOPs of its forward (FlashAttention-2, §3.1.2: the backward
/// runs 5 of the tile's products where the forward runs 2): the share of the call's time that
/// each pass's grid decides.
const BACKWARD_OVER_FORWARD: f64 = 2.5;

/// CTAs beyond which a causal grid is not simulated: with `C` CTAs of at most `w` tiles on `S`
/// slots, a greedy schedule ends within `S w` tile-times of perfect (Graham's bound), a loss
/// below 2% here; past this size the bound is used.
const SIMULATED_CTAS: u64 = 1 << 18;

/// The time factor (at most about 1) of `call` on `sms` SMs against the reference grid at
/// the same length: the reference's schedule efficiency over the call's, forward and backward
/// weighted by their share of the time.
///
/// # Shapes
/// Grids `[ceil(rows / block_rows), lanes]` forward and `[ceil(keys / block_keys), lanes]`
/// backward; the reference's `[ceil(N / block), (reference_tokens / N).max(1) x width / d]`.
pub fn occupancy(grid: &KernelGrid, call: Call, head_dim: i64, sms: u32) -> f64 {
    if sms == 0 || call.lanes < 1.0 || call.rows < 1.0 || call.keys < 1.0 {
        return 1.0;
    }
    let slots = |pass: usize| u64::from(sms) * u64::from(grid.ctas_per_sm[pass]);
    let batch = grid.reference_tokens.map_or(1.0, |t| (t / call.keys).floor().max(1.0));
    let heads = (grid.reference_width / head_dim.max(1) as f64).round().max(1.0);
    let reference = Call { rows: call.keys, keys: call.keys, lanes: batch * heads, ..call };
    let time = |c: Call| {
        let fwd = pass_efficiency(c, grid.block_rows, true, slots(0));
        let bwd = pass_efficiency(c, grid.block_keys, false, slots(1));
        c.forwards / fwd + BACKWARD_OVER_FORWARD / bwd
    };
    time(reference) / time(call)
}

/// The schedule efficiency of one pass (busy slot-time over all slot-time to its end).
fn pass_efficiency(call: Call, block: u32, forward: bool, slots: u64) -> f64 {
    let b = f64::from(block.max(1));
    let along = if forward { call.rows } else { call.keys };
    let blocks = (along / b).ceil() as u64;
    // Tiles of the other side: key blocks a forward CTA meets, query blocks a backward CTA meets.
    let other = (if forward { call.keys } else { call.rows } / b).ceil() as u64;
    schedule_efficiency(blocks, other, call.causal, forward, call.lanes as u64, slots)
}

/// The tiles of causal CTA `i` of `blocks`, as [`occupancy`]'s module doc counts them (an
/// unmasked CTA computes `other`).
fn causal_cta_work(i: u64, blocks: u64, other: u64, forward: bool) -> u64 {
    if forward {
        (i + 1).min(other)
    } else {
        blocks.saturating_sub(i).min(other)
    }
}

/// A simulated causal schedule: blocks, the other side's blocks, forward, lanes, slots.
type ScheduleKey = (u64, u64, bool, u64, u64);

thread_local! {
    /// Schedules already simulated (a search asks for the same few grids many times).
    static MEMO: RefCell<HashMap<ScheduleKey, f64>> = RefCell::new(HashMap::new());
}

/// Busy slot-time over slot-time to the schedule's end, for `lanes` repeats of `blocks` CTAs
/// launched block index fastest onto `slots` slots, each CTA to the first slot that frees.
pub fn schedule_efficiency(
    blocks: u64,
    other: u64,
    causal: bool,
    forward: bool,
    lanes: u64,
    slots: u64,
) -> f64 {
    let ctas = blocks.saturating_mul(lanes);
    if ctas == 0 || slots == 0 {
        return 1.0;
    }
    if !causal {
        // Equal CTAs: full waves and one ragged last wave.
        let waves = ctas.div_ceil(slots);
        return ctas as f64 / (waves * slots) as f64;
    }
    let key = (blocks, other, forward, lanes, slots);
    if let Some(e) = MEMO.with(|m| m.borrow().get(&key).copied()) {
        return e;
    }
    let work = |i: u64| causal_cta_work(i, blocks, other, forward);
    let total: u64 = (0..blocks).map(work).sum::<u64>() * lanes;
    let end = if ctas > SIMULATED_CTAS {
        let longest = (0..blocks).map(work).max().unwrap_or(0);
        (total as f64 / slots as f64) + longest as f64
    } else {
        // Min-heap of the slots' finishing times.
        let mut free: BinaryHeap<std::cmp::Reverse<u64>> = BinaryHeap::with_capacity(slots as usize);
        let mut end = 0u64;
        for _ in 0..lanes {
            for i in 0..blocks {
                let start = if (free.len() as u64) < slots {
                    0
                } else {
                    free.pop().map_or(0, |std::cmp::Reverse(t)| t)
                };
                let done = start + work(i);
                end = end.max(done);
                free.push(std::cmp::Reverse(done));
            }
        }
        end as f64
    };
    let e = if end > 0.0 { total as f64 / (slots as f64 * end) } else { 1.0 };
    MEMO.with(|m| m.borrow_mut().insert(key, e));
    e
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grid() -> KernelGrid {
        KernelGrid {
            block_rows: 128,
            block_keys: 128,
            ctas_per_sm: [1, 1],
            reference_width: 2048.0,
            reference_tokens: Some(16384.0),
        }
    }

    #[test]
    fn a_causal_forward_launched_short_first_ends_on_its_longest_cta() {
        // Three CTAs of 1, 2, 3 tiles on two slots: 1 and 2 start at 0, the third starts when
        // the first frees (t = 1) and ends at 4: 6 tiles in 2 x 4 slot-time.
        assert_eq!(schedule_efficiency(3, 3, true, true, 1, 2), 6.0 / 8.0);
        // The backward launches them longest first (3, 2, 1): the 1 follows the 2, all end at 3.
        assert_eq!(schedule_efficiency(3, 3, true, false, 1, 2), 1.0);
    }

    #[test]
    fn equal_ctas_fill_whole_waves_and_one_ragged_one() {
        // 64 CTAs on 108 slots: one wave, 64 of 108 slots busy.
        assert_eq!(schedule_efficiency(64, 64, false, true, 1, 108), 64.0 / 108.0);
        // 2 x 64 = 128 CTAs: two waves, 128 of 216.
        assert_eq!(schedule_efficiency(64, 64, false, true, 2, 108), 128.0 / 216.0);
        // The greedy simulation agrees with the closed form for equal CTAs (lanes of one block).
        let simulated = {
            let mut free = BinaryHeap::new();
            let mut end = 0u64;
            for _ in 0..300u64 {
                let start = if free.len() < 108 { 0 } else { free.pop().map_or(0, |std::cmp::Reverse(t)| t) };
                end = end.max(start + 5);
                free.push(std::cmp::Reverse(start + 5));
            }
            300.0 * 5.0 / (108.0 * end as f64)
        };
        assert_eq!(schedule_efficiency(1, 5, false, true, 300, 108), simulated);
    }

    #[test]
    fn one_head_at_8k_runs_a_third_of_the_reference_grid() {
        // N = 8192, d = 128, one head, b = 1, A100 (108 SMs): forward 64 CTAs of 1..64 tiles, the
        // last one starting at 0 (64 < 108 slots) and ending at 64: 2080 / (108 x 64) = 0.301.
        let fwd = schedule_efficiency(64, 64, true, true, 1, 108);
        assert!((fwd - 2080.0 / (108.0 * 64.0)).abs() < 1e-12);
        // The reference grid, 2 x 16 lanes of 64 CTAs, keeps nearly every slot busy.
        let reference = schedule_efficiency(64, 64, true, true, 32, 108);
        assert!(reference > 0.9, "{reference}");
        let call = Call { rows: 8192.0, keys: 8192.0, lanes: 1.0, causal: true, forwards: 1.0 };
        let f = occupancy(&grid(), call, 128, 108);
        assert!(f > 0.25 && f < 0.40, "{f}");
        // Sixteen heads of the same call fill the GPU as the reference does.
        let full = occupancy(&grid(), Call { lanes: 16.0, ..call }, 128, 108);
        assert!(full > 0.95 && full <= 1.05, "{full}");
        // No SMs named (a CPU): no factor.
        assert_eq!(occupancy(&grid(), call, 128, 0), 1.0);
    }

    #[test]
    fn past_the_simulated_size_the_bound_is_within_two_percent() {
        // 2048 blocks x 129 lanes = 264,192 CTAs, just past the simulated size: the bound
        // against the simulation of 127 lanes (260,096 CTAs), the same grid to 1.6%.
        let bound = schedule_efficiency(2048, 2048, true, true, 129, 108);
        let simulated = schedule_efficiency(2048, 2048, true, true, 127, 108);
        assert!((bound - simulated).abs() < 0.02, "{bound} {simulated}");
    }
}
