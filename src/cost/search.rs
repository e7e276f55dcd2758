//! Searching settings: the fastest that fits (each system "at its best", as the paper ran
//! them), and the longest sequence that fits.

use crate::attention::StrategyConfig;
use crate::train::{Checkpointing, ZeroStage};
use crate::{Error, Result};

use super::hardware::Hardware;
use super::memory::memory;
use super::step::{predict, Prediction};
use super::Job;

/// What the search may vary. Empty lists keep the job's own value.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct SearchSpace {
    /// Strategies to try; empty: the job's own.
    pub strategies: Vec<StrategyConfig>,
    /// SP degrees (the DP degree is ranks / SP); empty: every divisor of the ranks.
    pub sp: Vec<usize>,
    pub micro_batch: Vec<i64>,
    pub zero: Vec<ZeroStage>,
    pub checkpointing: Vec<Checkpointing>,
    /// Fixed sequences per step: the gradient accumulation fills what DP x micro-batch leave.
    pub global_batch: Option<i64>,
}

impl SearchSpace {
    /// Every SP degree, micro-batches 1-8, every ZeRO stage and checkpointing mode.
    pub fn everything() -> SearchSpace {
        SearchSpace {
            strategies: Vec::new(),
            sp: Vec::new(),
            micro_batch: vec![1, 2, 4, 8],
            zero: (0..=3).filter_map(|s| ZeroStage::new(s).ok()).collect(),
            checkpointing: vec![Checkpointing::None, Checkpointing::Selective, Checkpointing::Full],
            global_batch: None,
        }
    }

    /// Every job of the space around `base` (invalid ones included; the caller skips them).
    fn jobs(&self, base: &Job) -> Vec<Job> {
        let or = |v: &[i64], x: i64| if v.is_empty() { vec![x] } else { v.to_vec() };
        let sps: Vec<usize> = if self.sp.is_empty() {
            (1..=base.ranks).filter(|d| base.ranks.is_multiple_of(*d)).collect()
        } else {
            self.sp.clone()
        };
        let mut zeros = if self.zero.is_empty() { vec![base.zero] } else { self.zero.clone() };
        if base.optimizer_offload {
            // ZeRO-Offload moves a partitioned optimizer: stages 1-3 only.
            zeros.retain(|z| z.partitions_optimizer());
        }
        let ckpts =
            if self.checkpointing.is_empty() { vec![base.checkpointing] } else { self.checkpointing.clone() };
        let mut out = Vec::new();
        let kinds = if self.strategies.is_empty() { vec![base.strategy] } else { self.strategies.clone() };
        for &sp in sps.iter().filter(|&&s| s >= 1 && base.ranks.is_multiple_of(s)) {
            for strategy in kinds.iter().flat_map(|&k| strategies_for(k, sp)) {
                for &b in &or(&self.micro_batch, base.micro_batch) {
                    let dp = base.ranks / sp;
                    let accum = match self.global_batch {
                        Some(g) if g % (b * dp as i64) != 0 => continue,
                        Some(g) => g / (b * dp as i64),
                        None => base.grad_accum,
                    };
                    for &zero in &zeros {
                        for &checkpointing in &ckpts {
                            out.push(Job {
                                strategy,
                                dp,
                                micro_batch: b,
                                grad_accum: accum,
                                zero,
                                checkpointing,
                                ..base.clone()
                            });
                        }
                    }
                }
            }
        }
        out
    }
}

/// Every strategy this toolkit has, for a search over strategies too (USP's Ulysses degree is
/// searched with it).
pub fn every_strategy() -> Vec<StrategyConfig> {
    vec![
        StrategyConfig::Ulysses,
        StrategyConfig::MegatronSp,
        StrategyConfig::Ring { zigzag: true },
        StrategyConfig::AllGatherKv { zigzag: true },
        StrategyConfig::Usp { ulysses: 1, zigzag: true },
    ]
}

/// USP may also vary its Ulysses degree over the divisors of the SP degree.
fn strategies_for(s: StrategyConfig, sp: usize) -> Vec<StrategyConfig> {
    match s {
        StrategyConfig::Usp { zigzag, .. } => (1..=sp)
            .filter(|u| sp.is_multiple_of(*u))
            .map(|ulysses| StrategyConfig::Usp { ulysses, zigzag })
            .collect(),
        other => vec![other],
    }
}

fn no_fit(
    base: &Job,
    hw: &Hardware,
    smallest: Option<(f64, f64, String)>,
    first_error: Option<Error>,
) -> Error {
    let gib = (1u64 << 30) as f64;
    let msg = match (smallest, first_error) {
        (Some((peak, cap, how)), _) => format!(
            "no setting fits {} on {} x {}: the smallest peak is {:.1} GiB per device ({how}) against {:.1} GiB",
            base.describe(),
            base.ranks,
            hw.device.model,
            peak / gib,
            cap / gib
        ),
        (None, Some(e)) => format!("no setting of the search can run: {e}"),
        (None, None) => "the search space is empty".into(),
    };
    Error::InvalidArgument { op: "cost search", group: hw.name.clone(), msg }
}

/// The fastest job of `space` around `base` that fits `hw` (highest tokens/s).
pub fn best(base: &Job, hw: &Hardware, space: &SearchSpace) -> Result<Prediction> {
    let mut best: Option<Prediction> = None;
    let mut smallest: Option<(f64, f64, String)> = None;
    let mut first_error = None;
    for job in space.jobs(base) {
        let p = match predict(&job, hw) {
            Ok(p) => p,
            Err(e) => {
                first_error.get_or_insert(e);
                continue;
            }
        };
        if !p.memory.fits {
            if smallest.as_ref().is_none_or(|s| p.memory.resident_bytes < s.0) {
                smallest = Some((p.memory.resident_bytes, p.memory.capacity_bytes, job.describe()));
            }
            continue;
        }
        if best.as_ref().is_none_or(|b| p.tokens_per_s > b.tokens_per_s) {
            best = Some(p);
        }
    }
    best.ok_or_else(|| no_fit(base, hw, smallest, first_error))
}

/// Whether `job` fits `hw` on every rank (memory only, no timing).
pub fn fits(job: &Job, hw: &Hardware) -> Result<bool> {
    job.validate()?;
    for r in super::step::candidate_ranks(job) {
        if !memory(job, r, hw)?.fits {
            return Ok(false);
        }
    }
    Ok(true)
}

/// The longest sequence (a multiple of `lcm(1024, 2 x ranks)`) that fits `hw` at some setting
/// of `space`, with the prediction of the fastest setting at that length.
pub fn max_seq(base: &Job, hw: &Hardware, space: &SearchSpace) -> Result<Prediction> {
    let q = lcm(1024, 2 * base.ranks as i64);
    let limit = 1i64 << 27; // 134M tokens: far beyond any device here
    let mut longest = 0i64;
    let mut first_error = None;
    for job in space.jobs(base) {
        let at = |k: i64| Job { seq: k * q, ..job.clone() };
        match fits(&at(1), hw) {
            Ok(true) => {}
            Ok(false) => continue,
            Err(e) => {
                first_error.get_or_insert(e);
                continue;
            }
        }
        // Memory grows with the sequence: double, then bisect.
        let (mut lo, mut hi) = (1i64, 2i64);
        while hi * q <= limit && fits(&at(hi), hw)? {
            lo = hi;
            hi *= 2;
        }
        while hi - lo > 1 {
            let mid = (lo + hi) / 2;
            if fits(&at(mid), hw)? {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        longest = longest.max(lo * q);
    }
    if longest == 0 {
        let e = no_fit(base, hw, None, first_error);
        return Err(Error::InvalidArgument {
            op: "cost max_seq",
            group: hw.name.clone(),
            msg: format!("not even {q} tokens fit at any setting ({e})"),
        });
    }
    best(&Job { seq: longest, ..base.clone() }, hw, space)
}

fn lcm(a: i64, b: i64) -> i64 {
    let gcd = |mut x: i64, mut y: i64| {
        while y != 0 {
            (x, y) = (y, x % y);
        }
        x
    };
    a / gcd(a, b) * b
}
