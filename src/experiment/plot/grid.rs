//! What a collective moves: every rank's elements before and after, side by side, one labelled
//! column per rank, every element coloured by the rank it came from.

use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, VPos};

use super::{plot_error, text, Figure, LABEL_PX};
use crate::Result;

/// A collective drawn: `before[r]` and `after[r]` are rank r's elements in order;
/// `*_from` the rank each element came from (`None`: several, e.g. a sum).
#[derive(Debug, Clone)]
pub struct Collective {
    pub title: String,
    /// The collective's name, drawn on the arrow ("all-to-all").
    pub op: String,
    pub before: Vec<Vec<f64>>,
    pub after: Vec<Vec<f64>>,
    pub before_from: Vec<Vec<Option<usize>>>,
    pub after_from: Vec<Vec<Option<usize>>>,
    /// What each side shows ("sequence slice, every head").
    pub before_caption: String,
    pub after_caption: String,
}

super::inherent_figure!(Collective);

impl Collective {
    /// A collective whose elements say where they came from: `origin(value)` is the rank (for
    /// values 100 x rank + position, `|v| Some((v / 100.0) as usize)`).
    pub fn new(
        title: &str,
        op: &str,
        before: Vec<Vec<f64>>,
        after: Vec<Vec<f64>>,
        origin: impl Fn(f64) -> Option<usize>,
    ) -> Collective {
        let from = |side: &Vec<Vec<f64>>| -> Vec<Vec<Option<usize>>> {
            side.iter().map(|col| col.iter().map(|&v| origin(v)).collect()).collect()
        };
        Collective {
            title: title.into(),
            op: op.into(),
            before_from: from(&before),
            after_from: from(&after),
            before,
            after,
            before_caption: "before".into(),
            after_caption: "after".into(),
        }
    }
}

/// Ranks' colours: dark enough for white text.
const RANKS: [RGBColor; 8] = [
    RGBColor(57, 106, 177),
    RGBColor(218, 124, 48),
    RGBColor(62, 150, 81),
    RGBColor(204, 37, 41),
    RGBColor(107, 76, 154),
    RGBColor(146, 36, 40),
    RGBColor(148, 139, 61),
    RGBColor(83, 81, 84),
];

/// The colour of an element from rank `r` (grey: from several ranks).
fn rank_color(r: Option<usize>) -> RGBColor {
    r.map_or(RGBColor(120, 120, 120), |r| RANKS[r % RANKS.len()])
}

/// One side: a column per rank with its label on top, the caption under it.
fn draw_side<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    caption: &str,
    columns: &[Vec<f64>],
    from: &[Vec<Option<usize>>],
) -> std::result::Result<(), DrawingAreaErrorKind<DB::ErrorType>> {
    let (w, h) = area.dim_in_pixel();
    let p = columns.len().max(1) as i32;
    let rows = columns.iter().map(Vec::len).max().unwrap_or(1).max(1) as i32;
    let (top, bottom) = (46, 10);
    let col_w = (w as i32 - 10) / p;
    let cell_h = ((h as i32 - top - bottom) / rows).clamp(8, 30);
    let centered = |px: u32| text(px, HPos::Center, VPos::Center);
    area.draw(&Text::new(caption.to_string(), (w as i32 / 2, 10), centered(LABEL_PX)))?;
    for (r, col) in columns.iter().enumerate() {
        let x0 = 5 + r as i32 * col_w;
        let color = rank_color(Some(r));
        let header = centered(LABEL_PX + 1).color(&color);
        area.draw(&Text::new(format!("rank {r}"), (x0 + col_w / 2, 32), header))?;
        for (i, &v) in col.iter().enumerate() {
            let y0 = top + i as i32 * cell_h;
            let c = rank_color(from.get(r).and_then(|f| f.get(i)).copied().flatten());
            area.draw(&Rectangle::new([(x0 + 4, y0 + 1), (x0 + col_w - 4, y0 + cell_h - 1)], c.filled()))?;
            if cell_h >= 14 {
                let text = if v.fract() == 0.0 { format!("{v:.0}") } else { format!("{v:.2}") };
                let style = centered((cell_h as u32 - 4).min(LABEL_PX)).color(&WHITE);
                area.draw(&Text::new(text, (x0 + col_w / 2, y0 + cell_h / 2), style))?;
            }
        }
    }
    Ok(())
}

impl Figure for Collective {
    fn title(&self) -> &str {
        &self.title
    }

    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Result<()>
    where
        DB::ErrorType: 'static,
    {
        let e = |e: DrawingAreaErrorKind<DB::ErrorType>| plot_error(&self.title, e);
        let area = super::titled(root, &self.title)?;
        let (w, _) = area.dim_in_pixel();
        let arrow_w = 110u32.min(w / 5);
        let side = (w - arrow_w) / 2;
        let (left, rest) = area.split_horizontally(side);
        let (middle, right) = rest.split_horizontally(arrow_w);
        draw_side(&left, &self.before_caption, &self.before, &self.before_from).map_err(e)?;
        draw_side(&right, &self.after_caption, &self.after, &self.after_from).map_err(e)?;
        let (mw, mh) = middle.dim_in_pixel();
        let (y, x0, x1) = (mh as i32 / 2, 8, mw as i32 - 8);
        let line = BLACK.stroke_width(3);
        middle.draw(&PathElement::new(vec![(x0, y), (x1, y)], line)).map_err(e)?;
        middle.draw(&PathElement::new(vec![(x1 - 12, y - 8), (x1, y), (x1 - 12, y + 8)], line)).map_err(e)?;
        let style = text(LABEL_PX, HPos::Center, VPos::Bottom);
        middle.draw(&Text::new(self.op.clone(), (mw as i32 / 2, y - 8), style)).map_err(e)?;
        root.present().map_err(e)
    }
}
