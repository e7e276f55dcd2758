//! DataFrames as tables a person reads: aligned text for a terminal, HTML for a notebook, every
//! cell in the format of its column's unit ([`Unit::of_column`]).

use polars::prelude::DataFrame;

use super::{cell, Unit};

/// A DataFrame as columns of text: its names, then every column's cells through [`cell`] with
/// the unit its name announces.
pub fn cells(df: &DataFrame) -> (Vec<String>, Vec<Vec<String>>) {
    let names: Vec<String> = df.get_column_names().iter().map(|n| n.to_string()).collect();
    let columns = df
        .columns()
        .iter()
        .map(|c| {
            let unit = Unit::of_column(c.name());
            (0..c.len()).map(|i| c.get(i).map_or_else(|_| String::new(), |v| cell(&v, unit))).collect()
        })
        .collect();
    (names, columns)
}

/// A DataFrame as an aligned text table for a terminal: a header, a rule, a row per row; text
/// left-aligned, numbers right-aligned.
pub fn text_table(df: &DataFrame) -> String {
    let (names, columns) = cells(df);
    let numeric: Vec<bool> = df.columns().iter().map(|c| c.dtype().is_primitive_numeric()).collect();
    let width = |j: usize| columns[j].iter().chain([&names[j]]).map(|s| s.chars().count()).max().unwrap_or(0);
    let widths: Vec<usize> = (0..names.len()).map(width).collect();
    let line = |texts: Vec<&str>| {
        let padded: Vec<String> = texts
            .iter()
            .enumerate()
            .map(|(j, t)| match numeric[j] {
                true => format!("{t:>w$}", w = widths[j]),
                false => format!("{t:<w$}", w = widths[j]),
            })
            .collect();
        padded.join("  ").trim_end().to_string()
    };
    let rule: Vec<String> = widths.iter().map(|&w| "-".repeat(w)).collect();
    let mut lines = vec![
        line(names.iter().map(String::as_str).collect()),
        line(rule.iter().map(String::as_str).collect()),
    ];
    lines.extend((0..df.height()).map(|i| line(columns.iter().map(|c| c[i].as_str()).collect())));
    lines.join("\n")
}

/// A DataFrame as an HTML table (what [`HtmlTable`](super::HtmlTable) shows in a notebook).
pub fn html_table(df: &DataFrame) -> String {
    let (names, columns) = cells(df);
    let mut html = String::from("<table>\n<thead><tr>");
    for name in &names {
        html.push_str(&format!("<th>{}</th>", escape(name)));
    }
    html.push_str("</tr></thead>\n<tbody>\n");
    for i in 0..df.height() {
        html.push_str("<tr>");
        for col in &columns {
            html.push_str(&format!("<td>{}</td>", escape(&col[i])));
        }
        html.push_str("</tr>\n");
    }
    html.push_str("</tbody>\n</table>");
    html
}

/// Text as HTML: `&`, `<` and `>` escaped.
fn escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;
    use polars::prelude::*;

    #[test]
    fn tables_align_and_format_every_cell() -> PolarsResult<()> {
        let df = df!(
            "strategy" => ["ulysses", "megatron_sp"],
            "seq" => [2048i64, 16384],
            "median_step_ms" => [64.4989f64, 589.750481],
            "tokens_per_s" => [31752.4795f64, 13890.620294],
            "bytes_sent_per_rank" => [Some(2271776u64), None],
        )?;
        let text = text_table(&df);
        let expected = "\
strategy        seq  median_step_ms  tokens_per_s  bytes_sent_per_rank
-----------  ------  --------------  ------------  -------------------
ulysses       2,048           64.50        31,752             2.17 MiB
megatron_sp  16,384           589.8        13,891";
        assert_eq!(text, expected);
        let html = html_table(&df);
        assert!(html.contains("<td>ulysses</td><td>2,048</td><td>64.50</td><td>31,752</td><td>2.17 MiB</td>"));
        assert!(html.contains("<td>13,891</td><td></td></tr>"), "a null is an empty cell: {html}");
        Ok(())
    }
}
