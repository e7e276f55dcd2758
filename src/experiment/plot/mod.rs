//! Charts as SVG (inline in notebooks) and PNG files (plotters), for `ulysses report`,
//! `ulysses predict` and the notebooks: one copy of the chart code for all of them.
//!
//! - [`Chart`]: lines (one per strategy, each in its strategy's colour and marker, see
//!   [`strategy_style`]) on linear or true log axes whose ticks read in the axis' unit
//!   ([`Unit`]: 8K tokens, 256 MiB, 12 ms), the legend beside the data, never over it;
//! - [`BarChart`]: grouped or stacked bars (memory per rank by ZeRO stage, where a step's time
//!   goes);
//! - [`Collective`]: what a collective moves, before and after side by side, every rank's
//!   column labelled and every element coloured by the rank it came from.

mod axis;
mod bars;
mod grid;
mod style;
mod ticks;
mod unit;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use crate::{Error, Result};

pub use axis::{Axis, Scale};
pub use bars::{BarChart, Bars, Whiskers};
pub use grid::Collective;
pub use style::{nth_marker, series_style, shade, strategy_of, strategy_style, Marker, Style};
pub use unit::Unit;

/// One line of a chart.
#[derive(Debug, Clone)]
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

/// A line chart: a title that names the setting, two axes, the lines, and a legend beside them.
#[derive(Debug, Clone)]
pub struct Chart {
    pub title: String,
    pub x: Axis,
    pub y: Axis,
    pub series: Vec<Series>,
    /// Curves that predict some of the series (a formula, a model), each matched to the series
    /// of the same name: the curve is drawn as that series' line, in its colour, and the series
    /// as its points alone (markers, no line of their own), so that points off the curve show.
    /// A curve with no series of its name is drawn as a line without markers. See
    /// [`Chart::with_formulas`].
    pub formulas: Vec<Series>,
    /// Horizontal reference lines across the plot (a published figure, a device's peak): name
    /// and value, each dashed in a colour of its own, named at its right end and in the legend.
    /// See [`Chart::with_references`].
    pub references: Vec<(String, f64)>,
    /// Vertical whiskers over points of a series (its spread over repeated measurements):
    /// (series name, x, low, high), in the series' colour. See [`Chart::with_ranges`].
    pub ranges: Vec<(String, f64, f64, f64)>,
    /// Points where a line stops because nothing beyond it fits or runs, each circled in black
    /// and explained once in the legend by `stops_note`. See [`Chart::with_stops`].
    pub stops: Vec<(f64, f64)>,
    pub stops_note: String,
    /// Short texts beside points, (x, y, text): what a point is (the winning strategy there).
    /// See [`Chart::with_labels`].
    pub labels: Vec<(f64, f64, String)>,
}

/// The colours of reference lines, in order: none of them is a strategy's.
const REFERENCE_COLORS: [RGBColor; 3] = [RGBColor(90, 90, 90), RGBColor(150, 40, 40), RGBColor(40, 90, 150)];

/// DejaVu Sans (Debian's fonts-dejavu-core, installed by scripts/setup.sh), registered once
/// for plotters' text; `false` if it is not on this machine.
pub fn font_ready() -> bool {
    static READY: OnceLock<bool> = OnceLock::new();
    *READY.get_or_init(|| {
        let candidates =
            ["/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf", "/usr/share/fonts/TTF/DejaVuSans.ttf"];
        candidates.iter().find_map(|p| std::fs::read(p).ok()).is_some_and(|bytes| {
            // plotters keeps registered fonts for the whole process.
            let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
            plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).is_ok()
        })
    })
}

pub(crate) fn plot_error(what: &str, e: impl std::fmt::Display) -> Error {
    Error::InvalidArgument { op: "plot", group: what.to_string(), msg: e.to_string() }
}

/// Something drawn: a chart, bars, a collective. Draws on any plotters area, and as SVG text
/// or SVG and PNG files.
pub trait Figure {
    fn title(&self) -> &str;

    /// Draws the figure on a plotters area (a file, or a notebook's SVG).
    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Result<()>
    where
        DB::ErrorType: 'static;

    /// The figure as SVG text, shown inline by notebooks (see [`Svg`]).
    fn svg(&self, (width, height): (u32, u32)) -> Result<Svg> {
        check_font(self.title())?;
        let mut text = String::new();
        self.draw(&SVGBackend::with_string(&mut text, (width, height)).into_drawing_area())?;
        Ok(Svg(text))
    }

    /// Writes `<stem>.svg` and `<stem>.png` at 900 x 560 pixels; returns the files written.
    fn write(&self, stem: &Path) -> Result<Vec<PathBuf>> {
        self.write_sized(stem, (900, 560))
    }

    /// Writes `<stem>.svg` and `<stem>.png` at `size`; returns the files written.
    fn write_sized(&self, stem: &Path, size: (u32, u32)) -> Result<Vec<PathBuf>> {
        check_font(self.title())?;
        let (svg, png) = (stem.with_extension("svg"), stem.with_extension("png"));
        self.draw(&SVGBackend::new(&svg, size).into_drawing_area())?;
        self.draw(&BitMapBackend::new(&png, size).into_drawing_area())?;
        Ok(vec![svg, png])
    }
}

fn check_font(title: &str) -> Result<()> {
    if font_ready() {
        Ok(())
    } else {
        Err(plot_error(
            title,
            "no TrueType font for the chart's text: install fonts-dejavu-core (scripts/setup.sh does)",
        ))
    }
}

/// The `svg` and `write` of [`Figure`] as inherent methods, so that a notebook needs no `use`
/// of the trait.
macro_rules! inherent_figure {
    ($t:ty) => {
        impl $t {
            /// The figure as SVG text, shown inline by notebooks.
            pub fn svg(&self, size: (u32, u32)) -> $crate::Result<$crate::experiment::Svg> {
                $crate::experiment::Figure::svg(self, size)
            }

            /// Writes `<stem>.svg` and `<stem>.png` (900 x 560); returns the files written.
            pub fn write(&self, stem: &std::path::Path) -> $crate::Result<Vec<std::path::PathBuf>> {
                $crate::experiment::Figure::write(self, stem)
            }
        }
    };
}
pub(crate) use inherent_figure;

inherent_figure!(Chart);

/// Text sizes, in pixels: readable at the width a code host shows a notebook.
pub(crate) const TITLE_PX: u32 = 20;
pub(crate) const LABEL_PX: u32 = 14;
pub(crate) const AXIS_PX: u32 = 15;

/// Text of `px` pixels anchored at (h, v).
pub(crate) fn text(px: u32, h: HPos, v: VPos) -> TextStyle<'static> {
    TextStyle::from(("sans-serif", px).into_font()).pos(Pos::new(h, v))
}

/// A legend entry: the name and how its swatch is drawn.
pub(crate) enum Swatch {
    /// A line with its marker.
    Line(Style),
    /// A line without a marker.
    Stroke(RGBColor),
    Block(RGBColor),
    /// A black ring (where a line stops).
    Ring,
    /// A black whisker (a range drawn over bars or points).
    Whisker,
}

/// The legend's width for these names: the longest name plus the swatch.
fn legend_width(names: &[&str], total: u32) -> u32 {
    let chars = names.iter().map(|n| n.chars().count()).max().unwrap_or(0) as u32;
    (chars * 8 + 48).clamp(90, total / 3)
}

/// A white figure with `title` on top: the area under the title.
pub(crate) fn titled<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    title: &str,
) -> Result<DrawingArea<DB, Shift>>
where
    DB::ErrorType: 'static,
{
    let e = |e: DrawingAreaErrorKind<DB::ErrorType>| plot_error(title, e);
    root.fill(&WHITE).map_err(e)?;
    root.titled(title, ("sans-serif", TITLE_PX)).map_err(e)
}

/// The data's area and the legend's, side by side.
pub(crate) type Split<DB> = (DrawingArea<DB, Shift>, DrawingArea<DB, Shift>);

/// A titled figure split into the data's area and, on its right, a legend wide enough for
/// `names`.
pub(crate) fn titled_with_legend<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    title: &str,
    names: &[&str],
) -> Result<Split<DB>>
where
    DB::ErrorType: 'static,
{
    let area = titled(root, title)?;
    let (w, _) = area.dim_in_pixel();
    Ok(area.split_horizontally(w - legend_width(names, w)))
}

/// Draws the legend into its own area, beside the data: one entry per row from the top.
pub(crate) fn draw_legend<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    entries: &[(String, Swatch)],
    top: i32,
) -> Result<()>
where
    DB::ErrorType: 'static,
{
    let e = |e: DrawingAreaErrorKind<DB::ErrorType>| plot_error("legend", e);
    let font = ("sans-serif", LABEL_PX).into_font();
    for (i, (name, swatch)) in entries.iter().enumerate() {
        let y = top + 12 + i as i32 * 22;
        match swatch {
            Swatch::Line(s) => {
                let c = s.color.stroke_width(2);
                area.draw(&PathElement::new(vec![(6, y), (34, y)], c)).map_err(e)?;
                draw_marker(area, s.marker, (20, y), s.color).map_err(e)?;
            }
            Swatch::Stroke(c) => {
                area.draw(&PathElement::new(vec![(6, y), (34, y)], c.stroke_width(2))).map_err(e)?;
            }
            Swatch::Block(c) => {
                area.draw(&Rectangle::new([(10, y - 7), (30, y + 7)], c.filled())).map_err(e)?;
            }
            Swatch::Ring => {
                area.draw(&Circle::new((20, y), 8, BLACK.stroke_width(2))).map_err(e)?;
            }
            Swatch::Whisker => {
                let s = BLACK.stroke_width(2);
                area.draw(&PathElement::new(vec![(20, y - 8), (20, y + 8)], s)).map_err(e)?;
                area.draw(&PathElement::new(vec![(15, y - 8), (25, y - 8)], s)).map_err(e)?;
                area.draw(&PathElement::new(vec![(15, y + 8), (25, y + 8)], s)).map_err(e)?;
            }
        }
        area.draw(&Text::new(name.clone(), (40, y - 8), font.clone())).map_err(e)?;
    }
    Ok(())
}

/// One marker at a pixel position of `area`.
pub(crate) fn draw_marker<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    marker: Marker,
    (x, y): (i32, i32),
    color: RGBColor,
) -> std::result::Result<(), DrawingAreaErrorKind<DB::ErrorType>> {
    let r = 5;
    let fill = color.filled();
    match marker {
        Marker::Circle => area.draw(&Circle::new((x, y), r, fill)),
        Marker::Square => area.draw(&Rectangle::new([(x - r + 1, y - r + 1), (x + r - 1, y + r - 1)], fill)),
        Marker::Triangle => {
            area.draw(&Polygon::new(vec![(x, y - r - 1), (x + r, y + r - 1), (x - r, y + r - 1)], fill))
        }
        Marker::Diamond => {
            area.draw(&Polygon::new(vec![(x, y - r - 1), (x + r, y), (x, y + r + 1), (x - r, y)], fill))
        }
        Marker::Cross => {
            let s = color.stroke_width(3);
            area.draw(&PathElement::new(vec![(x - r, y - r), (x + r, y + r)], s))?;
            area.draw(&PathElement::new(vec![(x - r, y + r), (x + r, y - r)], s))
        }
    }
}

impl Chart {
    pub fn new(title: &str, x: Axis, y: Axis, series: Vec<Series>) -> Chart {
        Chart {
            title: title.into(),
            x,
            y,
            series,
            formulas: Vec::new(),
            references: Vec::new(),
            ranges: Vec::new(),
            stops: Vec::new(),
            stops_note: String::new(),
            labels: Vec::new(),
        }
    }

    /// This chart with horizontal reference lines, (name, value): a published figure or a
    /// device's peak beside the predicted or measured lines.
    pub fn with_references(mut self, references: Vec<(String, f64)>) -> Chart {
        self.references = references;
        self
    }

    /// This chart with whiskers, (series name, x, low, high): the spread of the measurements
    /// behind a series' points (fastest to slowest, or a quantile range).
    pub fn with_ranges(mut self, ranges: Vec<(String, f64, f64, f64)>) -> Chart {
        self.ranges = ranges;
        self
    }

    /// This chart with the points where lines stop circled, and `note` saying why (nothing
    /// longer fits in memory, say).
    pub fn with_stops(mut self, stops: Vec<(f64, f64)>, note: &str) -> Chart {
        self.stops = stops;
        self.stops_note = note.into();
        self
    }

    /// This chart with a short text beside each of these points, (x, y, text).
    pub fn with_labels(mut self, labels: Vec<(f64, f64, String)>) -> Chart {
        self.labels = labels;
        self
    }

    /// This chart with `formulas`: curves drawn as lines, each beside the points of the series
    /// of the same name (counted or measured values against the formula that predicts them).
    pub fn with_formulas(mut self, formulas: Vec<Series>) -> Chart {
        self.formulas = formulas;
        self
    }

    /// Each series' style: its strategy's (shaded for a strategy's second, third ... line), or
    /// the palette's.
    fn styles(&self) -> Vec<Style> {
        let mut seen: std::collections::HashMap<&str, usize> = Default::default();
        let mut others = 0;
        self.series
            .iter()
            .map(|s| match strategy_of(&s.name) {
                Some(key) => {
                    let k = seen.entry(key).or_insert(0);
                    let mut style = series_style(&s.name, 0);
                    style.color = shade(style.color, *k);
                    style.marker = nth_marker(style.marker, *k);
                    *k += 1;
                    style
                }
                None => {
                    others += 1;
                    series_style(&s.name, others - 1)
                }
            })
            .collect()
    }
}

impl Figure for Chart {
    fn title(&self) -> &str {
        &self.title
    }

    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Result<()>
    where
        DB::ErrorType: 'static,
    {
        let e = |e: DrawingAreaErrorKind<DB::ErrorType>| plot_error(&self.title, e);
        let mut names: Vec<&str> =
            self.series.iter().chain(&self.formulas).map(|s| s.name.as_str()).collect();
        names.extend(self.references.iter().map(|r| r.0.as_str()));
        if !self.stops.is_empty() {
            names.push(&self.stops_note);
        }
        let (plot, legend) = titled_with_legend(root, &self.title, &names)?;
        let keep = |a: &Axis, v: f64| v.is_finite() && (a.scale == Scale::Linear || v > 0.0);
        let all = || self.series.iter().chain(&self.formulas).flat_map(|s| s.points.iter());
        let xs: Vec<f64> = all().map(|p| p.0).collect();
        let mut ys: Vec<f64> = all().map(|p| p.1).collect();
        ys.extend(self.references.iter().map(|r| r.1));
        ys.extend(self.ranges.iter().flat_map(|r| [r.2, r.3]));
        let xl = self.x.layout(&xs, false);
        let yl = self.y.layout(&ys, self.y.zero);
        let mut chart = ChartBuilder::on(&plot)
            .margin(10)
            .margin_right(16)
            .x_label_area_size(50)
            .y_label_area_size(80)
            .build_cartesian_2d(xl.coord(), yl.coord())
            .map_err(e)?;
        let (fx, fy) = (|t: &f64| xl.label(*t), |t: &f64| yl.label(*t));
        chart
            .configure_mesh()
            .x_desc(self.x.title())
            .y_desc(self.y.title())
            .x_label_formatter(&fx)
            .y_label_formatter(&fy)
            .label_style(("sans-serif", LABEL_PX))
            .axis_desc_style(("sans-serif", AXIS_PX))
            .bold_line_style(BLACK.mix(0.12))
            .light_line_style(TRANSPARENT)
            .draw()
            .map_err(e)?;
        let styles = self.styles();
        let drawn = |s: &Series| -> Vec<(f64, f64)> {
            s.points
                .iter()
                .filter(|p| keep(&self.x, p.0) && keep(&self.y, p.1))
                .map(|&(x, y)| (xl.t(x), yl.t(y)))
                .collect()
        };
        let mut entries = Vec::new();
        for (s, style) in self.series.iter().zip(&styles) {
            let points = drawn(s);
            // The series' line: its formula's curve where it has one, else its own points joined.
            let formula = self.formulas.iter().find(|f| f.name == s.name);
            let line = formula.map_or_else(|| points.clone(), drawn);
            chart.draw_series(LineSeries::new(line, style.color.stroke_width(2))).map_err(e)?;
            let area = chart.plotting_area();
            // Markers on at most about 16 points of a long line (a loss curve); on every point
            // of a series drawn beside its formula.
            let every = if formula.is_some() { 1 } else { points.len().div_ceil(16).max(1) };
            for &p in points.iter().step_by(every) {
                let px = area.map_coordinate(&p);
                let (ox, oy) = area.get_base_pixel();
                let strip = area.strip_coord_spec();
                draw_marker(&strip, style.marker, (px.0 - ox, px.1 - oy), style.color).map_err(e)?;
            }
            entries.push((s.name.clone(), Swatch::Line(*style)));
        }
        // Curves without a series of their name: lines alone.
        let alone = self.formulas.iter().filter(|f| !self.series.iter().any(|s| s.name == f.name));
        for (i, f) in alone.enumerate() {
            let color = series_style(&f.name, styles.len() + i).color;
            chart.draw_series(LineSeries::new(drawn(f), color.stroke_width(2))).map_err(e)?;
            entries.push((f.name.clone(), Swatch::Stroke(color)));
        }
        // Whiskers, in their series' colour, with caps of a few pixels.
        let area = chart.plotting_area();
        let (ox, oy) = area.get_base_pixel();
        let strip = area.strip_coord_spec();
        for (name, x, lo, hi) in &self.ranges {
            let color = self
                .series
                .iter()
                .zip(&styles)
                .find(|(s, _)| &s.name == name)
                .map_or(BLACK, |(_, st)| st.color);
            if !(keep(&self.x, *x) && keep(&self.y, *lo) && keep(&self.y, *hi)) {
                continue;
            }
            let top = area.map_coordinate(&(xl.t(*x), yl.t(*hi)));
            let bottom = area.map_coordinate(&(xl.t(*x), yl.t(*lo)));
            let (tx, ty, by) = (top.0 - ox, top.1 - oy, bottom.1 - oy);
            let line = color.stroke_width(2);
            strip.draw(&PathElement::new(vec![(tx, ty), (tx, by)], line)).map_err(e)?;
            strip.draw(&PathElement::new(vec![(tx - 5, ty), (tx + 5, ty)], line)).map_err(e)?;
            strip.draw(&PathElement::new(vec![(tx - 5, by), (tx + 5, by)], line)).map_err(e)?;
        }
        // Where lines stop: a black ring around the last point.
        for p in self.stops.iter().filter(|p| keep(&self.x, p.0) && keep(&self.y, p.1)) {
            let px = area.map_coordinate(&(xl.t(p.0), yl.t(p.1)));
            strip.draw(&Circle::new((px.0 - ox, px.1 - oy), 9, BLACK.stroke_width(2))).map_err(e)?;
        }
        if !self.stops.is_empty() {
            entries.push((self.stops_note.clone(), Swatch::Ring));
        }
        // Texts beside points.
        for (x, y, label) in self.labels.iter().filter(|l| keep(&self.x, l.0) && keep(&self.y, l.1)) {
            let px = area.map_coordinate(&(xl.t(*x), yl.t(*y)));
            let style = text(LABEL_PX - 3, HPos::Left, VPos::Bottom).color(&RGBColor(60, 60, 60));
            strip.draw(&Text::new(label.clone(), (px.0 - ox + 6, px.1 - oy - 4), style)).map_err(e)?;
        }
        // Reference lines: dashed across the data's x range, named at the right end.
        let ts: Vec<f64> = xs.iter().filter(|&&x| keep(&self.x, x)).map(|&x| xl.t(x)).collect();
        let (t0, t1) = (
            ts.iter().copied().fold(f64::INFINITY, f64::min),
            ts.iter().copied().fold(f64::NEG_INFINITY, f64::max),
        );
        for (i, (name, v)) in self.references.iter().enumerate() {
            let spans = t0 < t1; // false without points, or with one x
            if !keep(&self.y, *v) || !spans {
                continue;
            }
            let color = REFERENCE_COLORS[i % REFERENCE_COLORS.len()];
            let y = yl.t(*v);
            let step = (t1 - t0) / 48.0;
            let dashes = (0..48).step_by(2).map(|j| {
                let a = t0 + j as f64 * step;
                PathElement::new(vec![(a, y), (a + step, y)], color.stroke_width(2))
            });
            chart.draw_series(dashes).map_err(e)?;
            let style = text(LABEL_PX - 2, HPos::Right, VPos::Bottom).color(&color);
            chart.draw_series(std::iter::once(Text::new(name.clone(), (t1, y), style))).map_err(e)?;
            entries.push((name.clone(), Swatch::Stroke(color)));
        }
        draw_legend(&legend, &entries, 10)?;
        root.present().map_err(e)
    }
}

/// An SVG picture that a Jupyter notebook on the evcxr kernel shows inline (evcxr calls
/// `evcxr_display` on the value a cell ends with).
#[derive(Debug, Clone)]
pub struct Svg(pub String);

impl Svg {
    /// Shows the picture as `image/svg+xml`, so that a notebook stores it as an image (kept by
    /// nbconvert's PDF and HTML exports), not as HTML around it.
    pub fn evcxr_display(&self) {
        println!("EVCXR_BEGIN_CONTENT image/svg+xml\n{}\nEVCXR_END_CONTENT", self.0);
    }
}
