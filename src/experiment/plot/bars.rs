//! Bar charts: grouped (memory per rank by ZeRO stage, measured beside the formula) or stacked
//! (where a step's time goes, per strategy).

use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, VPos};

use super::{
    draw_legend, plot_error, series_style, text, titled_with_legend, Axis, Figure, Swatch, AXIS_PX, LABEL_PX,
};
use crate::Result;

/// One set of bars: a value per category of the chart.
#[derive(Debug, Clone)]
pub struct Bars {
    pub name: String,
    pub values: Vec<f64>,
}

/// Bars per category, side by side (grouped) or on top of each other (stacked); the value axis
/// is linear from zero, the legend beside the bars.
#[derive(Debug, Clone)]
pub struct BarChart {
    pub title: String,
    /// What the categories are ("ZeRO stage", "strategy").
    pub x_label: String,
    pub categories: Vec<String>,
    pub y: Axis,
    pub bars: Vec<Bars>,
    pub stacked: bool,
    /// Whiskers over the bars of one set (grouped charts). See [`BarChart::with_ranges`].
    pub ranges: Option<Whiskers>,
}

/// Whiskers over the bars of one set: a (low, high) per category.
#[derive(Debug, Clone)]
pub struct Whiskers {
    /// The name of the set of bars they stand on.
    pub bars: String,
    pub ranges: Vec<(f64, f64)>,
    /// What they mean, for the legend.
    pub note: String,
}

super::inherent_figure!(BarChart);

impl BarChart {
    pub fn grouped(
        title: &str,
        x_label: &str,
        categories: Vec<String>,
        y: Axis,
        bars: Vec<Bars>,
    ) -> BarChart {
        BarChart {
            title: title.into(),
            x_label: x_label.into(),
            categories,
            y,
            bars,
            stacked: false,
            ranges: None,
        }
    }

    pub fn stacked(
        title: &str,
        x_label: &str,
        categories: Vec<String>,
        y: Axis,
        bars: Vec<Bars>,
    ) -> BarChart {
        BarChart {
            title: title.into(),
            x_label: x_label.into(),
            categories,
            y,
            bars,
            stacked: true,
            ranges: None,
        }
    }

    /// This chart with whiskers over the bars named `bars`, one (low, high) per category (a
    /// spread, or a band of tolerance around a measurement), `note` naming them in the legend.
    pub fn with_ranges(mut self, bars: &str, ranges: Vec<(f64, f64)>, note: &str) -> BarChart {
        self.ranges = Some(Whiskers { bars: bars.into(), ranges, note: note.into() });
        self
    }

    /// The top of each category's bars: the largest bar (or whisker), or the stack's total.
    fn tops(&self) -> Vec<f64> {
        (0..self.categories.len())
            .map(|c| {
                let vals = self
                    .bars
                    .iter()
                    .map(|b| b.values.get(c).copied().unwrap_or(0.0))
                    .filter(|v| v.is_finite());
                let whisker = self.ranges.as_ref().and_then(|w| w.ranges.get(c)).map_or(0.0, |r| r.1);
                if self.stacked {
                    vals.filter(|v| *v > 0.0).sum()
                } else {
                    vals.fold(0.0, f64::max).max(if whisker.is_finite() { whisker } else { 0.0 })
                }
            })
            .collect()
    }
}

impl Figure for BarChart {
    fn title(&self) -> &str {
        &self.title
    }

    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Result<()>
    where
        DB::ErrorType: 'static,
    {
        let e = |e: DrawingAreaErrorKind<DB::ErrorType>| plot_error(&self.title, e);
        let mut names: Vec<&str> = self.bars.iter().map(|b| b.name.as_str()).collect();
        if let Some(w) = &self.ranges {
            names.push(&w.note);
        }
        let (plot, legend) = titled_with_legend(root, &self.title, &names)?;
        let tops = self.tops();
        // Headroom for the value printed above each bar.
        let mut axis = self.y.clone();
        axis.scale = super::Scale::Linear;
        let top = tops.iter().copied().fold(0.0, f64::max);
        let yl = axis.layout(&[0.0, top * 1.08], true);
        let n = self.categories.len().max(1);
        let centers: Vec<f64> = (0..n).map(|i| i as f64).collect();
        let mut chart = ChartBuilder::on(&plot)
            .margin(10)
            .margin_right(16)
            .x_label_area_size(50)
            .y_label_area_size(80)
            .build_cartesian_2d(super::axis::Ticked::new((-0.5, n as f64 - 0.5), centers), yl.coord())
            .map_err(e)?;
        let fx = |t: &f64| {
            let i = t.round();
            if (t - i).abs() < 1e-6 && i >= 0.0 {
                self.categories.get(i as usize).cloned().unwrap_or_default()
            } else {
                String::new()
            }
        };
        let fy = |t: &f64| yl.label(*t);
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_desc(&self.x_label)
            .y_desc(self.y.title())
            .x_label_formatter(&fx)
            .y_label_formatter(&fy)
            .label_style(("sans-serif", LABEL_PX))
            .axis_desc_style(("sans-serif", AXIS_PX))
            .bold_line_style(BLACK.mix(0.12))
            .light_line_style(TRANSPARENT)
            .draw()
            .map_err(e)?;
        let k = self.bars.len().max(1);
        let group = 0.8;
        let colors: Vec<RGBColor> =
            self.bars.iter().enumerate().map(|(i, b)| series_style(&b.name, i).color).collect();
        let mut base = vec![0.0; n];
        for (bi, b) in self.bars.iter().enumerate() {
            let color = colors[bi];
            for (c, stack) in base.iter_mut().enumerate() {
                let v = b.values.get(c).copied().unwrap_or(0.0);
                if !v.is_finite() || v <= 0.0 {
                    continue;
                }
                let (x0, x1, y0, y1) = if self.stacked {
                    (c as f64 - group / 2.0, c as f64 + group / 2.0, *stack, *stack + v)
                } else {
                    let w = group / k as f64;
                    let x0 = c as f64 - group / 2.0 + bi as f64 * w;
                    (x0 + w * 0.06, x0 + w * 0.94, 0.0, v)
                };
                chart
                    .draw_series(std::iter::once(Rectangle::new([(x0, y0), (x1, y1)], color.filled())))
                    .map_err(e)?;
                if self.stacked {
                    *stack += v;
                } else {
                    // A whisker over this bar, if its set has one; the value above both.
                    let whisker = self
                        .ranges
                        .as_ref()
                        .filter(|w| w.bars == b.name)
                        .and_then(|w| w.ranges.get(c).copied())
                        .filter(|r| r.0.is_finite() && r.1.is_finite());
                    let mut above = y1;
                    if let Some((lo, hi)) = whisker {
                        let (xm, cap) = ((x0 + x1) / 2.0, (x1 - x0) / 4.0);
                        let line = BLACK.stroke_width(2);
                        let segments = [
                            vec![(xm, lo), (xm, hi)],
                            vec![(xm - cap, lo), (xm + cap, lo)],
                            vec![(xm - cap, hi), (xm + cap, hi)],
                        ];
                        chart
                            .draw_series(segments.into_iter().map(|p| PathElement::new(p, line)))
                            .map_err(e)?;
                        above = above.max(hi);
                    }
                    let label = self.y.unit.format(v);
                    let style = text(LABEL_PX - 2, HPos::Center, VPos::Bottom);
                    chart
                        .draw_series(std::iter::once(Text::new(label, ((x0 + x1) / 2.0, above), style)))
                        .map_err(e)?;
                }
            }
        }
        if self.stacked {
            for (c, total) in tops.iter().enumerate() {
                let style = text(LABEL_PX - 1, HPos::Center, VPos::Bottom);
                chart
                    .draw_series(std::iter::once(Text::new(
                        self.y.unit.format(*total),
                        (c as f64, *total),
                        style,
                    )))
                    .map_err(e)?;
            }
        }
        let mut entries: Vec<(String, Swatch)> =
            self.bars.iter().zip(&colors).map(|(b, c)| (b.name.clone(), Swatch::Block(*c))).collect();
        if let Some(w) = &self.ranges {
            entries.push((w.note.clone(), Swatch::Whisker));
        }
        draw_legend(&legend, &entries, 10)?;
        root.present().map_err(e)
    }
}
