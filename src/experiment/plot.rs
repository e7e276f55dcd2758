//! Line charts as SVG and PNG files (plotters), for `ulysses report` and the notebooks.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use plotters::coord::Shift;
use plotters::prelude::*;

use crate::{Error, Result};

/// One line of a chart.
#[derive(Debug, Clone)]
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

/// A line chart with a legend.
#[derive(Debug, Clone)]
pub struct Chart {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub series: Vec<Series>,
}

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

fn plot_error(what: &str, e: impl std::fmt::Display) -> Error {
    Error::InvalidArgument { op: "plot", group: what.to_string(), msg: e.to_string() }
}

impl Chart {
    /// Draws the chart on any plotters area (a file, or a notebook's SVG).
    pub fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Result<()>
    where
        DB::ErrorType: 'static,
    {
        let e = |e: DrawingAreaErrorKind<DB::ErrorType>| plot_error(&self.title, e);
        root.fill(&WHITE).map_err(e)?;
        let all: Vec<(f64, f64)> = self.series.iter().flat_map(|s| s.points.iter().copied()).collect();
        let (x0, x1) = bounds(all.iter().map(|p| p.0), false);
        let (y0, y1) = bounds(all.iter().map(|p| p.1), true);
        let mut chart = ChartBuilder::on(root)
            .caption(&self.title, ("sans-serif", 22))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(80)
            .build_cartesian_2d(x0..x1, y0..y1)
            .map_err(e)?;
        chart
            .configure_mesh()
            .x_desc(&self.x_label)
            .y_desc(&self.y_label)
            .label_style(("sans-serif", 14))
            .draw()
            .map_err(e)?;
        for (i, s) in self.series.iter().enumerate() {
            let color = COLORS[i % COLORS.len()].to_rgba();
            chart
                .draw_series(LineSeries::new(s.points.iter().copied(), color.stroke_width(2)))
                .map_err(e)?
                .label(&s.name)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2)));
            chart.draw_series(s.points.iter().map(|&p| Circle::new(p, 3, color.filled()))).map_err(e)?;
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .label_font(("sans-serif", 14))
            .draw()
            .map_err(e)?;
        root.present().map_err(e)
    }

    /// The chart as SVG text, shown inline by notebooks (see [`Svg`]).
    pub fn svg(&self, (width, height): (u32, u32)) -> Result<Svg> {
        if !font_ready() {
            return Err(plot_error(
                &self.title,
                "no TrueType font for the chart's text: install fonts-dejavu-core",
            ));
        }
        let mut text = String::new();
        self.draw(&SVGBackend::with_string(&mut text, (width, height)).into_drawing_area())?;
        Ok(Svg(text))
    }

    /// Writes `<stem>.svg` and `<stem>.png` (the PNG only where a font is available); returns
    /// the files written.
    pub fn write(&self, stem: &Path) -> Result<Vec<PathBuf>> {
        if !font_ready() {
            return Err(plot_error(
                &self.title,
                "no TrueType font found for the plot's text: install fonts-dejavu-core (scripts/setup.sh does)",
            ));
        }
        let (svg, png) = (stem.with_extension("svg"), stem.with_extension("png"));
        self.draw(&SVGBackend::new(&svg, (900, 560)).into_drawing_area())?;
        self.draw(&BitMapBackend::new(&png, (900, 560)).into_drawing_area())?;
        Ok(vec![svg, png])
    }
}

/// An SVG picture that a Jupyter notebook on the evcxr kernel shows inline (evcxr calls
/// `evcxr_display` on the value a cell ends with).
#[derive(Debug, Clone)]
pub struct Svg(pub String);

impl Svg {
    pub fn evcxr_display(&self) {
        println!("EVCXR_BEGIN_CONTENT text/html\n<div>{}</div>\nEVCXR_END_CONTENT", self.0);
    }
}

/// Ten distinct colours (matplotlib's tab10), readable on white.
const COLORS: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

/// A padded range over values (from zero when `from_zero` and all values are positive).
fn bounds(values: impl Iterator<Item = f64>, from_zero: bool) -> (f64, f64) {
    let (mut lo, mut hi) =
        values.filter(|v| v.is_finite()).fold((f64::MAX, f64::MIN), |(a, b), v| (a.min(v), b.max(v)));
    if lo > hi {
        return (0.0, 1.0);
    }
    if from_zero && lo > 0.0 {
        lo = 0.0;
    }
    if hi - lo < 1e-12 {
        hi = lo + 1.0;
    }
    let pad = (hi - lo) * 0.05;
    (lo - if from_zero && lo == 0.0 { 0.0 } else { pad }, hi + pad)
}
