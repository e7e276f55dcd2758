//! Axes: a title, a unit and how the values spread (linear or log); and an axis laid out for a
//! chart's values ([`Layout`]: its range and ticks), as a plotters coordinate. What the values
//! are and how they read is in `unit.rs`; where the ticks go, in `ticks.rs`.

use plotters::coord::ranged1d::{DefaultFormatting, KeyPointHint, Ranged};

use super::ticks::{linear_layout, log_layout};
use super::unit::{round_sig, Unit};

/// How an axis spreads its values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scale {
    Linear,
    Log,
    /// Log when every value is positive and the largest is at least 16 times the smallest (2
    /// times for tokens, bytes and counts), linear otherwise.
    Auto,
}

/// An axis: its title, unit and scale.
#[derive(Debug, Clone, PartialEq)]
pub struct Axis {
    pub label: String,
    pub unit: Unit,
    pub scale: Scale,
    /// A linear axis starts at zero (throughput, memory); a log axis ignores it.
    pub zero: bool,
}

impl Axis {
    pub fn linear(label: &str, unit: Unit) -> Axis {
        Axis { label: label.into(), unit, scale: Scale::Linear, zero: false }
    }

    pub fn log(label: &str, unit: Unit) -> Axis {
        Axis { label: label.into(), unit, scale: Scale::Log, zero: false }
    }

    pub fn auto(label: &str, unit: Unit) -> Axis {
        Axis { label: label.into(), unit, scale: Scale::Auto, zero: false }
    }

    /// This axis, starting at zero when linear.
    pub fn from_zero(mut self) -> Axis {
        self.zero = true;
        self
    }

    /// The title drawn beside the axis: the label and, when it names none, the unit.
    pub fn title(&self) -> String {
        if self.label.contains('(') {
            self.label.clone()
        } else {
            format!("{}{}", self.label, self.unit.suffix())
        }
    }

    /// The axis laid out for these values.
    pub fn layout(&self, values: &[f64], from_zero: bool) -> Layout {
        let finite: Vec<f64> = values.iter().copied().filter(|v| v.is_finite()).collect();
        let (lo, hi) = finite.iter().fold((f64::MAX, f64::MIN), |(a, b), &v| (a.min(v), b.max(v)));
        let log = match self.scale {
            Scale::Linear => false,
            Scale::Log => lo > 0.0,
            // Powers of two (sequence lengths, ranks, buffer sizes) read best on a log axis
            // from a ratio of 2; other values from 16.
            Scale::Auto => lo > 0.0 && hi / lo >= if self.unit.binary() { 2.0 } else { 16.0 },
        };
        if finite.is_empty() {
            return Layout {
                log: false,
                base: 10.0,
                range: (0.0, 1.0),
                ticks: vec![0.0, 1.0],
                unit: self.unit,
                extra_digits: 0,
            };
        }
        let layout =
            if log { log_layout(self.unit, lo, hi) } else { linear_layout(self.unit, lo, hi, from_zero) };
        layout.distinct()
    }
}

/// An axis laid out: drawn in `t` space (the value, or its log to `base`), with the ticks (in t
/// space) and the range (padded, in t space).
#[derive(Debug, Clone, PartialEq)]
pub struct Layout {
    pub log: bool,
    pub base: f64,
    pub range: (f64, f64),
    pub ticks: Vec<f64>,
    pub unit: Unit,
    /// Digits beyond the unit's default that tell the ticks apart (5.582, 5.584, not 5.6 twice).
    pub extra_digits: usize,
}

impl Layout {
    /// Where a value is drawn.
    pub fn t(&self, v: f64) -> f64 {
        if self.log {
            v.log(self.base)
        } else {
            v
        }
    }

    /// The value drawn at t.
    pub fn value(&self, t: f64) -> f64 {
        if self.log {
            self.base.powf(t)
        } else {
            t
        }
    }

    /// The tick label at t.
    pub fn label(&self, t: f64) -> String {
        let v = self.value(t);
        // Powers of two and 1-2-5 steps come back from powf a hair off.
        let v = if self.log { round_sig(v, 12) } else { v };
        self.unit.format_digits(v, self.extra_digits)
    }

    /// This layout with the fewest extra digits that give every tick its own label.
    fn distinct(mut self) -> Layout {
        for extra in 0..6 {
            self.extra_digits = extra;
            let labels: Vec<String> = self.ticks.iter().map(|&t| self.label(t)).collect();
            if labels.windows(2).all(|w| w[0] != w[1]) {
                break;
            }
        }
        self
    }
}

/// A plotters coordinate over `range` (t space) whose ticks are exactly the layout's.
pub(crate) struct Ticked {
    lo: f64,
    hi: f64,
    ticks: Vec<f64>,
}

impl Ticked {
    pub(crate) fn new((lo, hi): (f64, f64), ticks: Vec<f64>) -> Ticked {
        Ticked { lo, hi, ticks }
    }
}

impl Layout {
    /// The plotters coordinate of this axis.
    pub(crate) fn coord(&self) -> Ticked {
        Ticked::new(self.range, self.ticks.clone())
    }
}

impl Ranged for Ticked {
    type FormatOption = DefaultFormatting;
    type ValueType = f64;

    fn map(&self, v: &f64, limit: (i32, i32)) -> i32 {
        let f = if self.hi > self.lo { (v - self.lo) / (self.hi - self.lo) } else { 0.5 };
        limit.0 + ((limit.1 - limit.0) as f64 * f).round() as i32
    }

    fn key_points<H: KeyPointHint>(&self, hint: H) -> Vec<f64> {
        if hint.weight().allow_light_points() {
            Vec::new()
        } else {
            self.ticks.iter().copied().filter(|t| *t >= self.lo && *t <= self.hi).collect()
        }
    }

    fn range(&self) -> std::ops::Range<f64> {
        self.lo..self.hi
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn close_ticks_get_the_digits_that_tell_them_apart() {
        let layout = Axis::linear("loss", Unit::Number).layout(&[5.578, 5.586], false);
        let labels: Vec<String> = layout.ticks.iter().map(|&t| layout.label(t)).collect();
        assert!(labels.windows(2).all(|w| w[0] != w[1]), "{labels:?}");
        assert!(labels.contains(&"5.58".to_string()), "{labels:?}");
        let k = Axis::linear("tokens/s", Unit::Number).layout(&[12_000.0, 12_900.0], false);
        let labels: Vec<String> = k.ticks.iter().map(|&t| k.label(t)).collect();
        assert!(labels.windows(2).all(|w| w[0] != w[1]) && labels[0].ends_with('k'), "{labels:?}");
    }

    #[test]
    fn auto_is_log_only_over_a_wide_positive_span() {
        assert!(Axis::auto("N", Unit::Tokens).layout(&[1024.0, 65536.0], false).log);
        assert!(Axis::auto("N", Unit::Tokens).layout(&[2048.0, 8192.0], false).log);
        assert!(!Axis::auto("N", Unit::Tokens).layout(&[2048.0, 3072.0], false).log);
        assert!(!Axis::auto("tokens/s", Unit::Number).layout(&[2048.0, 8192.0], false).log);
        // Linear tokens step in K.
        let lin = Axis::linear("N", Unit::Tokens).layout(&[2048.0, 8192.0], false);
        let labels: Vec<String> = lin.ticks.iter().map(|&t| lin.label(t)).collect();
        assert_eq!(labels, ["2K", "3K", "4K", "5K", "6K", "7K", "8K"]);
        assert!(!Axis::auto("loss", Unit::Number).layout(&[-1.0, 100.0], false).log);
        assert_eq!(Axis::auto("N", Unit::Tokens).title(), "N (tokens)");
        assert_eq!(Axis::auto("step time (ms)", Unit::Millis).title(), "step time (ms)");
    }
}
