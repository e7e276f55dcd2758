//! Where the ticks of an axis go: on a log axis at powers of two (tokens, bytes, counts) or at
//! 1, 2, 5 x 10^k; on a linear one at about six round steps of the unit the values read in.

use super::axis::Layout;
use super::unit::Unit;

/// A log axis: ticks at powers of two (binary units, every k-th so that at most 8 show) or at
/// 1, 2, 5 x 10^k (fewer per decade as the span grows).
pub(super) fn log_layout(unit: Unit, lo: f64, hi: f64) -> Layout {
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
pub(super) fn linear_layout(unit: Unit, lo: f64, hi: f64, from_zero: bool) -> Layout {
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
    use crate::experiment::Axis;

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
}
