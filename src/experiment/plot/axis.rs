//! Axes: what a value means (its [`Unit`]), how it is spread (linear or log), where the ticks go
//! and how they read: tokens as 1K, 8K, 1M; bytes as KiB, MiB, GiB; times as ms or s.

use plotters::coord::ranged1d::{DefaultFormatting, KeyPointHint, Ranged};

/// What the values on an axis are, which decides how ticks read and where a log axis puts them
/// (powers of two for tokens, bytes and counts of ranks; 1-2-5 per decade otherwise).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    /// Any number: 0.5, 12, 1.5k, 3M.
    Number,
    /// Ranks, GPUs, steps, heads: integers; a log axis ticks at powers of two.
    Count,
    /// Tokens (a sequence length): 512, 2K, 256K, 1M (binary prefixes, as sequence lengths are
    /// written).
    Tokens,
    /// Bytes: 512 B, 4 KiB, 1.5 MiB, 64 GiB.
    Bytes,
    /// Mebibytes (the values are MiB, the ticks read like bytes).
    MiB,
    /// Gibibytes (the values are GiB, the ticks read like bytes).
    GiB,
    /// Seconds: 250 µs, 12 ms, 1.5 s.
    Seconds,
    /// Milliseconds (the values are ms, the ticks read like seconds).
    Millis,
    /// A fraction shown as a percentage: 0.25 reads 25%.
    Percent,
}

impl Unit {
    /// Bytes, seconds or the value itself: what the ticks are computed in.
    fn to_base(self, v: f64) -> f64 {
        match self {
            Unit::MiB => v * (1u64 << 20) as f64,
            Unit::GiB => v * (1u64 << 30) as f64,
            Unit::Millis => v / 1e3,
            _ => v,
        }
    }

    fn in_unit(self, v: f64) -> f64 {
        match self {
            Unit::MiB => v / (1u64 << 20) as f64,
            Unit::GiB => v / (1u64 << 30) as f64,
            Unit::Millis => v * 1e3,
            _ => v,
        }
    }

    /// Whether a log axis of this unit ticks at powers of two.
    fn binary(self) -> bool {
        matches!(self, Unit::Count | Unit::Tokens | Unit::Bytes | Unit::MiB | Unit::GiB)
    }

    /// One value as a tick label: `Tokens` 8192 reads "8K", `Bytes` 1.5 * 2^20 reads "1.5 MiB".
    pub fn format(self, v: f64) -> String {
        self.format_digits(v, 0)
    }

    /// [`format`](Unit::format) with `extra` more digits after the point (ticks closer together
    /// than the default precision tells apart).
    pub fn format_digits(self, v: f64, extra: usize) -> String {
        if !v.is_finite() {
            return format!("{v}");
        }
        let b = self.to_base(v);
        if b == 0.0 {
            return "0".into();
        }
        match self {
            Unit::Number => scaled(b, 1000.0, &["", "k", "M", "G", "T"], extra),
            Unit::Count => {
                if (b - b.round()).abs() < 1e-9 {
                    format!("{}", b.round() as i64)
                } else {
                    trim(b, 2 + extra)
                }
            }
            Unit::Tokens => scaled(b, 1024.0, &["", "K", "M", "G"], extra),
            Unit::Bytes | Unit::MiB | Unit::GiB => {
                scaled(b, 1024.0, &[" B", " KiB", " MiB", " GiB", " TiB", " PiB"], extra)
            }
            Unit::Seconds | Unit::Millis => {
                let a = b.abs();
                if a == 0.0 {
                    "0".into()
                } else if a < 1e-3 {
                    format!("{} µs", trim(b * 1e6, 3 + extra))
                } else if a < 1.0 {
                    format!("{} ms", trim(b * 1e3, 3 + extra))
                } else {
                    format!("{} s", trim(b, 3 + extra))
                }
            }
            Unit::Percent => format!("{}%", trim(b * 100.0, 3 + extra)),
        }
    }

    /// What an axis title adds after its label: " (tokens)", " (bytes)" ...
    pub fn suffix(self) -> &'static str {
        match self {
            Unit::Number | Unit::Count | Unit::Percent => "",
            Unit::Tokens => " (tokens)",
            Unit::Bytes | Unit::MiB | Unit::GiB => " (bytes)",
            Unit::Seconds | Unit::Millis => "",
        }
    }
}

/// `v` with at most `digits` significant digits after the point and no trailing zeros.
fn trim(v: f64, digits: usize) -> String {
    let a = v.abs();
    let decimals = if a >= 100.0 {
        0
    } else if a >= 10.0 {
        digits.saturating_sub(2)
    } else if a >= 1.0 {
        digits.saturating_sub(1)
    } else {
        digits + 1
    };
    let s = format!("{v:.decimals$}");
    let s = if s.contains('.') { s.trim_end_matches('0').trim_end_matches('.').to_string() } else { s };
    if s == "-0" {
        "0".into()
    } else {
        s
    }
}

/// `v` divided by `step` as often as it stays at least 1, with that prefix: 8192 with 1024 and
/// ["", "K"] reads "8K"; `extra` more digits after the point.
fn scaled(v: f64, step: f64, prefixes: &[&str], extra: usize) -> String {
    let mut x = v;
    let mut i = 0;
    while x.abs() >= step * (1.0 - 1e-9) && i + 1 < prefixes.len() {
        x /= step;
        i += 1;
    }
    format!("{}{}", trim(x, 2 + extra), prefixes[i])
}

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

fn round_sig(v: f64, digits: i32) -> f64 {
    if v == 0.0 {
        return 0.0;
    }
    let m = 10f64.powi(digits - 1 - v.abs().log10().floor() as i32);
    (v * m).round() / m
}

/// A log axis: ticks at powers of two (binary units, every k-th so that at most 8 show) or at
/// 1, 2, 5 x 10^k (fewer per decade as the span grows).
fn log_layout(unit: Unit, lo: f64, hi: f64) -> Layout {
    let (blo, bhi) = (unit.to_base(lo), unit.to_base(hi));
    if unit.binary() {
        let (a, b) = (blo.log2().floor() as i64, bhi.log2().ceil() as i64);
        let span = (b - a).max(1);
        // Ticks at multiples of `every` in the exponent, which divides 10 so that 1K, 1M, 1G
        // (and 1 KiB, 1 MiB, 1 GiB) are among them when in range: 1K, 4K, 16K, 64K, 256K, 1M.
        let every = [1, 2, 5, 10, 20, 50].into_iter().find(|e| span / e <= 7).unwrap_or(50);
        let first = a.div_euclid(every) * every;
        let ticks: Vec<f64> = (0..)
            .map(|i| first + i * every)
            .take_while(|&e| e <= b)
            .filter(|&e| e >= a)
            .map(|e| unit.in_unit(2f64.powi(e as i32)).log2())
            .collect();
        let (t0, t1) = (lo.log2(), hi.log2());
        let pad = ((t1 - t0) * 0.06).max(0.15);
        let mut range = (t0 - pad, t1 + pad);
        if span <= 3 {
            // A short span: reach the powers of two around the data, so that ticks frame it.
            let edge = |e: i64| unit.in_unit(2f64.powi(e as i32)).log2();
            range = (range.0.min(edge(a)), range.1.max(edge(b)));
        }
        return Layout { log: true, base: 2.0, range, ticks, unit, extra_digits: 0 };
    }
    let (a, b) = (blo.log10().floor() as i32, bhi.log10().ceil() as i32);
    let decades = (b - a).max(1);
    let mults: &[f64] = match decades {
        1 => &[1.0, 2.0, 5.0],
        2 | 3 => &[1.0, 3.0],
        _ => &[1.0],
    };
    let every = ((decades as f64) / 7.0).ceil().max(1.0) as i32;
    let mut ticks = Vec::new();
    for e in (a..=b).filter(|e| (e - a) % every == 0) {
        for &m in mults {
            let v = m * 10f64.powi(e);
            if v >= blo * 0.999 && v <= bhi * 1.001 {
                ticks.push(unit.in_unit(v).log10());
            }
        }
    }
    if ticks.len() < 2 {
        // A span inside one 1-2-5 step: ticks at both ends.
        ticks = vec![lo.log10(), hi.log10()];
    }
    let (t0, t1) = (lo.log10(), hi.log10());
    let pad = ((t1 - t0) * 0.06).max(0.05);
    Layout { log: true, base: 10.0, range: (t0 - pad, t1 + pad), ticks, unit, extra_digits: 0 }
}

/// A linear axis: about six ticks at 1, 2, 2.5 or 5 x 10^k of the unit the largest value reads
/// in (MiB for a span in MiB), from zero when asked and every value is positive.
fn linear_layout(unit: Unit, lo: f64, hi: f64, from_zero: bool) -> Layout {
    let (mut lo, mut hi) = (lo, hi);
    if from_zero && lo > 0.0 {
        lo = 0.0;
    }
    if from_zero && hi < 0.0 {
        hi = 0.0;
    }
    if hi - lo < 1e-12 * hi.abs().max(1.0) {
        let d = if hi == 0.0 { 1.0 } else { hi.abs() * 0.1 };
        lo -= d;
        hi += d;
    }
    // The step, in base units, as a nice number of the display unit (binary units step in
    // KiB, MiB, ... so that ticks read 256 MiB, 512 MiB).
    let (blo, bhi) = (unit.to_base(lo), unit.to_base(hi));
    let scale = match unit {
        Unit::Bytes | Unit::MiB | Unit::GiB | Unit::Tokens => {
            let m = blo.abs().max(bhi.abs());
            let k = if m > 0.0 { (m.log2() / 10.0).floor().clamp(0.0, 5.0) } else { 0.0 };
            1024f64.powf(k)
        }
        _ => 1.0,
    };
    let raw = (bhi - blo) / scale / 6.0;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 2.5, 5.0, 10.0].iter().map(|m| m * mag).find(|s| *s >= raw).unwrap_or(10.0 * mag);
    let step = if unit == Unit::Count { step.max(1.0).round() } else { step } * scale;
    let first = (blo / step).ceil() as i64;
    let ticks: Vec<f64> = (first..)
        .map(|i| i as f64 * step)
        .take_while(|v| *v <= bhi * (1.0 + 1e-9) + 1e-12)
        .map(|v| unit.in_unit(v))
        .collect();
    let pad = (hi - lo) * 0.05;
    let low = if from_zero && lo == 0.0 { 0.0 } else { lo - pad };
    // From zero, the top reaches the next tick, so that the largest value has one above it.
    let mut ticks = ticks;
    let mut high = hi + pad;
    if from_zero && hi > 0.0 {
        let next = ((bhi / step).floor() + 1.0) * step;
        if next - bhi < step * 0.6 {
            ticks.push(unit.in_unit(next));
            high = unit.in_unit(next) + pad * 0.2;
        }
    }
    Layout { log: false, base: 10.0, range: (low, high), ticks, unit, extra_digits: 0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_read_in_units_people_use() {
        assert_eq!(Unit::Tokens.format(8192.0), "8K");
        assert_eq!(Unit::Tokens.format(1024.0 * 1024.0), "1M");
        assert_eq!(Unit::Tokens.format(262144.0), "256K");
        assert_eq!(Unit::Tokens.format(512.0), "512");
        assert_eq!(Unit::Tokens.format(1536.0), "1.5K");
        assert_eq!(Unit::Bytes.format(512.0), "512 B");
        assert_eq!(Unit::Bytes.format(1.5 * 1048576.0), "1.5 MiB");
        assert_eq!(Unit::MiB.format(2048.0), "2 GiB");
        assert_eq!(Unit::GiB.format(40.0), "40 GiB");
        assert_eq!(Unit::Millis.format(12.5), "12.5 ms");
        assert_eq!(Unit::Millis.format(1500.0), "1.5 s");
        assert_eq!(Unit::Seconds.format(0.00025), "250 µs");
        assert_eq!(Unit::Number.format(12000.0), "12k");
        assert_eq!(Unit::Number.format(175.0), "175");
        assert_eq!(Unit::Number.format(0.5), "0.5");
        assert_eq!(Unit::Count.format(8.0), "8");
        assert_eq!(Unit::Percent.format(0.25), "25%");
        assert_eq!(Unit::Number.format(0.0), "0");
    }

    #[test]
    fn a_log_axis_of_tokens_ticks_at_powers_of_two() {
        let layout = Axis::log("N", Unit::Tokens).layout(&[2048.0, 8192.0, 131072.0], false);
        assert!(layout.log && layout.base == 2.0);
        let labels: Vec<String> = layout.ticks.iter().map(|&t| layout.label(t)).collect();
        assert_eq!(labels, ["2K", "4K", "8K", "16K", "32K", "64K", "128K"]);
        // A span of 2^10 .. 2^30 keeps at most 8 ticks, every third power.
        let wide = Axis::log("N", Unit::Tokens).layout(&[1024.0, 1073741824.0], false);
        let labels: Vec<String> = wide.ticks.iter().map(|&t| wide.label(t)).collect();
        assert_eq!(labels, ["1K", "32K", "1M", "32M", "1G"]);
        // Drawn at log2 of the value: equal ratios, equal distances.
        assert!((layout.t(8192.0) - layout.t(2048.0) - 2.0).abs() < 1e-12);
        // A short span still shows the powers of two around it.
        let short = Axis::log("N", Unit::Tokens).layout(&[150_000.0, 900_000.0], false);
        let labels: Vec<String> = short
            .ticks
            .iter()
            .filter(|t| **t >= short.range.0 && **t <= short.range.1)
            .map(|&t| short.label(t))
            .collect();
        assert_eq!(labels, ["128K", "256K", "512K", "1M"]);
    }

    #[test]
    fn a_log_axis_of_numbers_ticks_at_one_two_five() {
        let layout = Axis::log("tokens/s", Unit::Number).layout(&[150.0, 900.0], false);
        let labels: Vec<String> = layout.ticks.iter().map(|&t| layout.label(t)).collect();
        assert_eq!(labels, ["200", "500"]);
        let decades = Axis::log("B", Unit::Number).layout(&[1.0, 1e6], false);
        let labels: Vec<String> = decades.ticks.iter().map(|&t| decades.label(t)).collect();
        assert_eq!(labels, ["1", "10", "100", "1k", "10k", "100k", "1M"]);
    }

    #[test]
    fn bytes_on_a_log_axis_read_kib_mib_gib() {
        let layout = Axis::log("sent", Unit::Bytes).layout(&[3e5, 2e9], false);
        let labels: Vec<String> = layout.ticks.iter().map(|&t| layout.label(t)).collect();
        assert!(
            labels.iter().any(|l| l.ends_with("MiB")) && labels.iter().any(|l| l.ends_with("GiB")),
            "{labels:?}"
        );
        assert!(labels.iter().all(|l| !l.contains('.')), "{labels:?}");
    }

    #[test]
    fn a_linear_axis_steps_nicely_in_the_unit_it_reads() {
        let layout = Axis::linear("memory", Unit::MiB).layout(&[0.0, 900.0], true);
        let labels: Vec<String> = layout.ticks.iter().map(|&t| layout.label(t)).collect();
        assert_eq!(labels, ["0", "200 MiB", "400 MiB", "600 MiB", "800 MiB", "1000 MiB"]);
        let gib = Axis::log("sent", Unit::MiB).layout(&[256.0, 1024.0], false);
        assert_eq!(gib.label(10.0), "1 GiB");
        let steps = Axis::linear("step", Unit::Count).layout(&[1.0, 5.0], false);
        assert!(steps.ticks.iter().all(|t| t.fract() == 0.0), "{:?}", steps.ticks);
    }

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
