//! One colour and marker per strategy, the same in every chart of every notebook and report.

use plotters::style::RGBColor;

/// The mark drawn at each point of a line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Marker {
    Circle,
    Square,
    Triangle,
    Diamond,
    Cross,
}

/// How a line is drawn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Style {
    pub color: RGBColor,
    pub marker: Marker,
}

/// The strategies' styles: the name a series starts with (up to a space, '(' or ':') picks
/// one; "ulysses P=4" and "ulysses (predicted)" draw as Ulysses.
const STRATEGIES: [(&str, Style); 8] = [
    ("ulysses", Style { color: RGBColor(31, 119, 180), marker: Marker::Circle }),
    ("megatron_sp", Style { color: RGBColor(255, 127, 14), marker: Marker::Square }),
    ("ring", Style { color: RGBColor(44, 160, 44), marker: Marker::Triangle }),
    ("ring_zigzag", Style { color: RGBColor(23, 190, 207), marker: Marker::Triangle }),
    ("allgather_kv", Style { color: RGBColor(214, 39, 40), marker: Marker::Diamond }),
    ("allgather_kv_zigzag", Style { color: RGBColor(214, 39, 40), marker: Marker::Diamond }),
    ("usp", Style { color: RGBColor(148, 103, 189), marker: Marker::Cross }),
    ("usp_zigzag", Style { color: RGBColor(148, 103, 189), marker: Marker::Cross }),
];

/// Lines that are not strategies: one device, and whatever else a chart compares.
const OTHERS: [(&str, Style); 3] = [
    ("one_device", Style { color: RGBColor(60, 60, 60), marker: Marker::Circle }),
    ("one device", Style { color: RGBColor(60, 60, 60), marker: Marker::Circle }),
    ("reference", Style { color: RGBColor(60, 60, 60), marker: Marker::Circle }),
];

/// Colours for series that are not strategies (ZeRO stages, components of a step, ranks), in
/// order; none of them is a strategy's colour.
pub const PALETTE: [RGBColor; 8] = [
    RGBColor(102, 194, 165),
    RGBColor(252, 141, 98),
    RGBColor(141, 160, 203),
    RGBColor(231, 138, 195),
    RGBColor(166, 216, 84),
    RGBColor(229, 196, 148),
    RGBColor(255, 217, 47),
    RGBColor(179, 179, 179),
];

/// The strategy a series name starts with, if any ("megatron_sp P=4" -> "megatron_sp").
pub fn strategy_of(name: &str) -> Option<&'static str> {
    let lower = name.to_ascii_lowercase();
    if let Some((n, _)) = OTHERS.iter().find(|(n, _)| lower.starts_with(n)) {
        return Some(n);
    }
    let head = lower.split([' ', '(', ':', ',']).next().unwrap_or("").replace('-', "_");
    STRATEGIES.iter().map(|(n, _)| *n).find(|n| *n == head).or_else(|| {
        // "megatron" alone, as the paper writes it; ColossalAI's ring self-attention, the
        // paper's ring baseline, as the ring the paper configs price it as (`ring_zigzag =
        // "colossalai-2021"`); USP by its label ("usp_u8_zigzag").
        if head == "megatron" {
            Some("megatron_sp")
        } else if head.starts_with("colossalai") {
            Some("ring_zigzag")
        } else if head.starts_with("usp") {
            Some("usp")
        } else {
            None
        }
    })
}

/// The style of a strategy's lines and bars, or `None` for a name that is not a strategy.
pub fn strategy_style(name: &str) -> Option<Style> {
    let key = strategy_of(name)?;
    STRATEGIES.iter().chain(OTHERS.iter()).find(|(n, _)| *n == key).map(|(_, s)| *s)
}

/// The style of series `index` named `name`: its strategy's, else the palette's `index`-th
/// colour with a marker of its own.
pub fn series_style(name: &str, index: usize) -> Style {
    strategy_style(name).unwrap_or_else(|| Style {
        color: PALETTE[index % PALETTE.len()],
        marker: MARKERS[index % MARKERS.len()],
    })
}

/// The markers, in the order lines take them.
const MARKERS: [Marker; 5] =
    [Marker::Circle, Marker::Square, Marker::Triangle, Marker::Diamond, Marker::Cross];

/// The marker of a strategy's k-th line in a chart: its own for the first, then the next ones in
/// turn, so that lines of one strategy (one per GPU count, say) differ in shape as well as shade.
pub fn nth_marker(base: Marker, k: usize) -> Marker {
    let start = MARKERS.iter().position(|&m| m == base).unwrap_or(0);
    MARKERS[(start + k) % MARKERS.len()]
}

/// `color` darker (k odd) or lighter (k even), further with k: the k-th other line of one
/// strategy in a chart ("ulysses P=4", "ulysses P=8").
pub fn shade(color: RGBColor, k: usize) -> RGBColor {
    if k == 0 {
        return color;
    }
    let f = 0.3 * k.div_ceil(2) as f64;
    let mix = |c: u8| -> u8 {
        let c = c as f64;
        let v = if k % 2 == 1 { c * (1.0 - f).max(0.2) } else { c + (255.0 - c) * f.min(0.7) };
        v.round().clamp(0.0, 255.0) as u8
    };
    RGBColor(mix(color.0), mix(color.1), mix(color.2))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_strategy_looks_the_same_whatever_the_series_adds() {
        let u = strategy_style("ulysses").unwrap();
        assert_eq!(strategy_style("ulysses P=4"), Some(u));
        assert_eq!(strategy_style("ulysses (predicted)"), Some(u));
        assert_eq!(strategy_of("Megatron-SP"), Some("megatron_sp"));
        assert_eq!(strategy_style("zero 1"), None);
        assert_eq!(strategy_of("one device (P = 1)"), Some("one device"));
        assert_eq!(strategy_style("megatron_sp N=2048").map(|s| s.marker), Some(Marker::Square));
        assert_eq!(strategy_of("usp_zigzag:2"), Some("usp_zigzag"));
        assert_eq!(strategy_of("usp_u8_zigzag P=16"), Some("usp"));
        assert_eq!(strategy_of("ColossalAI's ring (2021) (low)"), Some("ring_zigzag"));
        assert_ne!(strategy_style("ring").unwrap().color, u.color);
        assert_eq!(series_style("ulysses", 5), u);
        assert_ne!(series_style("zero 1", 0).color, series_style("zero 2", 1).color);
    }
}
