//! What the values on an axis are (their [`Unit`]) and how they read: tokens as 1K, 8K, 1M;
//! bytes as KiB, MiB, GiB; times as ms or s.

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
    pub(super) fn to_base(self, v: f64) -> f64 {
        match self {
            Unit::MiB => v * (1u64 << 20) as f64,
            Unit::GiB => v * (1u64 << 30) as f64,
            Unit::Millis => v / 1e3,
            _ => v,
        }
    }

    pub(super) fn in_unit(self, v: f64) -> f64 {
        match self {
            Unit::MiB => v / (1u64 << 20) as f64,
            Unit::GiB => v / (1u64 << 30) as f64,
            Unit::Millis => v * 1e3,
            _ => v,
        }
    }

    /// Whether a log axis of this unit ticks at powers of two.
    pub(super) fn binary(self) -> bool {
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
            // Below a thousandth, as a power of ten (a difference of 3e-7 would read "0").
            Unit::Number if b.abs() < 1e-3 => {
                let e = b.abs().log10().floor() as i32;
                let m = b / 10f64.powi(e);
                // Rounding can carry the mantissa to 10 (9.999e-8 -> 10e-8): one power up.
                let (m, e) = if trim(m, 2 + extra).trim_start_matches('-') == "10" {
                    (m / 10.0, e + 1)
                } else {
                    (m, e)
                };
                format!("{}e{e}", trim(m, 2 + extra))
            }
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

pub(super) fn round_sig(v: f64, digits: i32) -> f64 {
    if v == 0.0 {
        return 0.0;
    }
    let m = 10f64.powi(digits - 1 - v.abs().log10().floor() as i32);
    (v * m).round() / m
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
        assert_eq!(Unit::Number.format(3e-7), "3e-7");
        assert_eq!(Unit::Number.format(2.5e-8), "2.5e-8");
        assert_eq!(Unit::Number.format(-4e-5), "-4e-5");
        assert_eq!(Unit::Number.format(9.999e-8), "1e-7");
        assert_eq!(Unit::Number.format(0.002), "0.002");
    }
}
