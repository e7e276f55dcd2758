//! Numbers for people: how every table a person reads shows its values (the CLI's tables,
//! `ulysses report`, the notebooks' [`HtmlTable`](super::HtmlTable)). One place, so the three
//! agree. Only the display is rounded: the CSV and Parquet files keep every digit.
//!
//! | column holds | shown as | example |
//! |---|---|---|
//! | a time in ms (`*_ms`) | two decimals below 100 ms, one above | `64.50`, `584.9`, `12,345.7` |
//! | a rate (`*_per_s`, `*/s`) | thousands separators, M and G above a million | `31,752`, `1.25 M` |
//! | TFLOP/s (`*tflop*`) | three significant digits | `0.0721`, `1.23`, `175` |
//! | bytes (`*bytes*`), MiB (`*mib*`) | B, KiB, MiB, GiB, three significant digits | `768 KiB`, `3.84 MiB` |
//! | a loss (`*loss*`) | four decimals | `5.5863` |
//! | any other number | integers with separators, floats to four significant digits | `8,192`, `3.20e-7` |
//!
//! The unit of a column comes from its name ([`Unit::of_column`]), so a DataFrame built in a
//! notebook gets the same formats as the results tables when its names say what they hold.

use polars::prelude::AnyValue;

mod table;
pub use table::{cells, html_table, text_table};

/// What a column holds, which decides how its numbers are shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    /// Milliseconds ([`ms`]).
    Ms,
    /// Seconds ([`seconds`]).
    Seconds,
    /// A rate such as tokens/s ([`rate`]).
    Rate,
    /// TFLOP/s ([`tflops`]).
    Tflops,
    /// A number of bytes ([`bytes`]).
    Bytes,
    /// A size in MiB (shown like [`bytes`]).
    Mib,
    /// A loss: four decimals.
    Loss,
    /// Anything else ([`plain`]).
    Plain,
}

impl Unit {
    /// The unit a column's name announces: `median_step_ms` is [`Unit::Ms`], `tokens_per_s`
    /// [`Unit::Rate`], `model_tflops` [`Unit::Tflops`], `bytes_sent_per_rank` [`Unit::Bytes`],
    /// `peak_mib_per_rank` [`Unit::Mib`], `final_loss` [`Unit::Loss`], `elapsed_s`
    /// [`Unit::Seconds`]; names are matched by their words (split at anything but letters and
    /// digits), case-insensitively.
    pub fn of_column(name: &str) -> Unit {
        let lower = name.to_lowercase();
        let words: Vec<&str> =
            lower.split(|c: char| !c.is_alphanumeric()).filter(|w| !w.is_empty()).collect();
        let has = |w: &str| words.contains(&w);
        if lower.contains("tflop") {
            Unit::Tflops
        } else if lower.contains("bytes") {
            Unit::Bytes
        } else if has("mib") {
            Unit::Mib
        } else if words.windows(2).any(|w| w == ["per", "s"]) || per_second(&lower) {
            Unit::Rate
        } else if has("ms") {
            Unit::Ms
        } else if words.last() == Some(&"s") || has("seconds") {
            Unit::Seconds
        } else if has("loss") {
            Unit::Loss
        } else {
            Unit::Plain
        }
    }

    /// `v` in this unit.
    pub fn format(self, v: f64) -> String {
        match self {
            Unit::Ms => ms(v),
            Unit::Seconds => seconds(v),
            Unit::Rate => rate(v),
            Unit::Tflops => tflops(v),
            Unit::Bytes => bytes(v),
            Unit::Mib => bytes(v * 1024.0 * 1024.0),
            Unit::Loss if v.is_finite() => format!("{v:.4}"),
            Unit::Loss | Unit::Plain => plain(v),
        }
    }
}

/// `/s` not followed by a letter or digit: `tok/s`, `TFLOP/s (model)`, but not `ms/step`.
fn per_second(name: &str) -> bool {
    name.match_indices("/s").any(|(i, _)| !name[i + 2..].starts_with(|c: char| c.is_alphanumeric()))
}

/// A time in milliseconds: two decimals below 100 ms, one above (`64.50`, `584.9`, `12,345.7`).
pub fn ms(v: f64) -> String {
    if !v.is_finite() {
        return non_finite(v);
    }
    fixed(v, if v.abs() < 100.0 { 2 } else { 1 })
}

/// A time in seconds: like [`ms`] below a minute, then minutes and seconds (`11.25`, `2m 05s`).
pub fn seconds(v: f64) -> String {
    if !v.is_finite() || v.abs() < 60.0 {
        return ms(v);
    }
    let s = v.round() as i64;
    if s.abs() < 3600 {
        format!("{}m {:02}s", s / 60, (s % 60).abs())
    } else {
        format!("{}h {:02}m", s / 3600, (s % 3600 / 60).abs())
    }
}

/// A rate (tokens/s, steps/s): three significant digits below 1,000, whole numbers with thousands
/// separators below a million, then M and G (`5.32`, `31,752`, `1.25 M`).
pub fn rate(v: f64) -> String {
    let a = v.abs();
    if !v.is_finite() || a < 1e3 {
        significant(v, 3)
    } else if a < 1e6 {
        fixed(v, 0)
    } else if a < 1e9 {
        format!("{} M", significant(v / 1e6, 3))
    } else {
        format!("{} G", significant(v / 1e9, 3))
    }
}

/// TFLOP/s to three significant digits (`0.0721`, `1.23`, `175`).
pub fn tflops(v: f64) -> String {
    significant(v, 3)
}

/// A number of bytes in binary units to three significant digits (`512 B`, `768 KiB`,
/// `3.84 MiB`, `1.00 GiB`).
pub fn bytes(v: f64) -> String {
    if !v.is_finite() {
        return non_finite(v);
    }
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if v.abs() < 1024.0 {
        return format!("{v:.0} B");
    }
    let mut scaled = v / 1024.0;
    let mut unit = 0;
    while scaled.abs() >= 1024.0 && unit + 1 < UNITS.len() {
        scaled /= 1024.0;
        unit += 1;
    }
    format!("{} {}", significant(scaled, 3), UNITS[unit])
}

/// Any other number: whole numbers with thousands separators (`8,192`), others to four
/// significant digits (`5.586`, `1,235`), in scientific notation below 0.001 (`3.20e-7`).
pub fn plain(v: f64) -> String {
    if !v.is_finite() {
        non_finite(v)
    } else if v == v.trunc() && v.abs() < 1e15 {
        fixed(v, 0)
    } else if v.abs() < 1e-3 {
        format!("{v:.2e}")
    } else {
        significant(v, 4)
    }
}

/// `v` to `digits` significant digits, thousands separators in the integer part
/// (`significant(0.072134, 3)` is `0.0721`).
pub fn significant(v: f64, digits: usize) -> String {
    if !v.is_finite() {
        return non_finite(v);
    }
    if v == 0.0 {
        return "0".into();
    }
    let magnitude = v.abs().log10().floor() as i64;
    let mut decimals = (digits as i64 - 1 - magnitude).max(0) as usize;
    // 9.996 to three digits rounds up to 10.0: one decimal fewer keeps three digits.
    let rounded = format!("{:.*}", decimals, v.abs()).parse::<f64>().unwrap_or(v.abs());
    if decimals > 0 && rounded >= 10f64.powi(magnitude as i32 + 1) {
        decimals -= 1;
    }
    fixed(v, decimals)
}

/// `v` with `decimals` decimals and thousands separators (`12345.67` to one: `12,345.7`).
fn fixed(v: f64, decimals: usize) -> String {
    let text = format!("{:.*}", decimals, v.abs());
    let (int, frac) = text.split_once('.').map_or((text.as_str(), ""), |(i, f)| (i, f));
    let mut out = String::new();
    for (i, c) in int.chars().enumerate() {
        if i > 0 && (int.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    if !frac.is_empty() {
        out.push('.');
        out.push_str(frac);
    }
    let zero = text.chars().all(|c| c == '0' || c == '.');
    if v < 0.0 && !zero {
        out.insert(0, '-');
    }
    out
}

fn non_finite(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v > 0.0 {
        "inf".into()
    } else {
        "-inf".into()
    }
}

/// One cell of a column of unit `unit` (null: empty; text and booleans as they are).
pub fn cell(value: &AnyValue, unit: Unit) -> String {
    let number = match value {
        AnyValue::Null => return String::new(),
        AnyValue::String(s) => return s.to_string(),
        AnyValue::StringOwned(s) => return s.to_string(),
        AnyValue::Boolean(b) => return b.to_string(),
        AnyValue::Float64(f) => *f,
        AnyValue::Float32(f) => f64::from(*f),
        AnyValue::Int8(v) => f64::from(*v),
        AnyValue::Int16(v) => f64::from(*v),
        AnyValue::Int32(v) => f64::from(*v),
        AnyValue::Int64(v) => *v as f64,
        AnyValue::UInt8(v) => f64::from(*v),
        AnyValue::UInt16(v) => f64::from(*v),
        AnyValue::UInt32(v) => f64::from(*v),
        AnyValue::UInt64(v) => *v as f64,
        other => return other.to_string(),
    };
    unit.format(number)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_in_the_formats_of_the_issue() {
        // The two numbers the issue quotes, and their neighbours.
        assert_eq!(ms(180.010365), "180.0");
        assert_eq!(ms(64.4989), "64.50");
        assert_eq!(ms(12345.67), "12,345.7");
        assert_eq!(ms(0.004), "0.00");
        assert_eq!(rate(11377.122645), "11,377");
        assert_eq!(rate(1_254_000.0), "1.25 M");
        assert_eq!(rate(3.2e9), "3.20 G");
        assert_eq!(rate(5.321), "5.32");
        assert_eq!(tflops(0.072134), "0.0721");
        assert_eq!(tflops(175.49), "175");
        assert_eq!(tflops(1.2345), "1.23");
        assert_eq!(tflops(9.996), "10.0");
        assert_eq!(tflops(0.0), "0");
        assert_eq!(bytes(512.0), "512 B");
        assert_eq!(bytes(786_432.0), "768 KiB");
        assert_eq!(bytes(6_990_368.0), "6.67 MiB");
        assert_eq!(bytes(25_269_536.0), "24.1 MiB");
        assert_eq!(bytes(1024.0 * 1024.0 * 1024.0), "1.00 GiB");
        assert_eq!(Unit::Mib.format(22.472656), "22.5 MiB");
        assert_eq!(Unit::Loss.format(5.586293), "5.5863");
        assert_eq!(plain(8192.0), "8,192");
        assert_eq!(plain(-1234567.0), "-1,234,567");
        assert_eq!(plain(3.2e-7), "3.20e-7");
        assert_eq!(plain(0.0), "0");
        assert_eq!(plain(5.586293), "5.586");
        assert_eq!(seconds(11.25), "11.25");
        assert_eq!(seconds(125.0), "2m 05s");
        assert_eq!(seconds(3725.0), "1h 02m");
        assert_eq!(fixed(-0.004, 2), "0.00", "no negative zero");
        for v in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
            for unit in [Unit::Ms, Unit::Rate, Unit::Tflops, Unit::Bytes, Unit::Plain, Unit::Loss] {
                assert!(["NaN", "inf", "-inf"].contains(&unit.format(v).as_str()), "{unit:?} {v}");
            }
        }
    }

    #[test]
    fn units_come_from_column_names() {
        let cases = [
            ("median_step_ms", Unit::Ms),
            ("step ms", Unit::Ms),
            ("elapsed_s", Unit::Seconds),
            ("tokens_per_s", Unit::Rate),
            ("tok/s", Unit::Rate),
            ("ms/step", Unit::Ms),
            ("model_tflops", Unit::Tflops),
            ("TFLOP/s (model)", Unit::Tflops),
            ("bytes_sent_per_rank", Unit::Bytes),
            ("counted bytes/rank", Unit::Bytes),
            ("peak_mib_per_rank", Unit::Mib),
            ("final_loss", Unit::Loss),
            ("seq", Unit::Plain),
            ("steps", Unit::Plain),
            ("max |difference|", Unit::Plain),
        ];
        for (name, unit) in cases {
            assert_eq!(Unit::of_column(name), unit, "{name}");
        }
    }
}
