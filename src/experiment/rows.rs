//! How a rank process's reports reach the runner: JSON on stdout, in lines short enough for
//! every launcher. `srun` forwards a rank's output in pieces of at most 1024 bytes and labels
//! each piece as a line of its own, which cut a long report in two; so a report is written as
//! lines of at most [`PIECE`] bytes, every one but the last marked as continued, and the
//! runner joins them per rank (both launchers tag every line with its rank).

use std::collections::HashMap;

/// The marker of the last (or only) line of a report.
pub(crate) const ROW: &str = "ULYSSES_ROW ";
/// The marker of a line that the next line of the same rank continues.
pub(crate) const ROW_CONTINUED: &str = "ULYSSES_ROW+ ";
/// Bytes of JSON per line: with a marker and srun's label, well under its 1024.
#[cfg_attr(not(feature = "mpi"), allow(dead_code))] // written by MPI ranks only
pub(crate) const PIECE: usize = 900;

/// The lines (each ending in a newline) that carry `json`.
#[cfg_attr(not(feature = "mpi"), allow(dead_code))] // written by MPI ranks only
pub(crate) fn lines(json: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = json;
    while rest.len() > PIECE {
        // Cut at a character boundary at most PIECE bytes in.
        let cut = (1..=PIECE).rev().find(|&i| rest.is_char_boundary(i)).unwrap_or(rest.len());
        let (head, tail) = rest.split_at(cut);
        out.push(format!("{ROW_CONTINUED}{head}\n"));
        rest = tail;
    }
    out.push(format!("{ROW}{rest}\n"));
    out
}

/// What one output line of a rank was.
#[derive(Debug, PartialEq)]
pub(crate) enum Line {
    /// A whole report, joined from its pieces.
    Report(String),
    /// A piece of a report whose end is still to come.
    Piece,
    /// Anything else the rank printed.
    Text,
}

/// Joins the pieces of each rank's reports, in the order that rank printed them.
#[derive(Default)]
pub(crate) struct Reassembler {
    partial: HashMap<Option<usize>, String>,
}

impl Reassembler {
    /// Takes one untagged line `body` of rank `rank` (`None` where the launcher did not say).
    pub(crate) fn push(&mut self, rank: Option<usize>, body: &str) -> Line {
        if let Some((_, piece)) = body.split_once(ROW_CONTINUED) {
            self.partial.entry(rank).or_default().push_str(piece);
            Line::Piece
        } else if let Some((_, last)) = body.split_once(ROW) {
            let mut json = self.partial.remove(&rank).unwrap_or_default();
            json.push_str(last);
            Line::Report(json)
        } else {
            Line::Text
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_reports_cross_in_short_lines_and_come_back_whole_per_rank() {
        // Non-ASCII text too, so that a cut could fall inside a character.
        let a: String = (0..2500).map(|i| if i % 7 == 0 { 'é' } else { 'a' }).collect();
        let b = "{\"short\":1}".to_string();
        let (la, lb) = (lines(&a), lines(&b));
        assert!(la.len() >= 3 && lb.len() == 1, "{} {}", la.len(), lb.len());
        assert!(la.iter().all(|l| l.len() <= PIECE + ROW_CONTINUED.len() + 1), "a line over the limit");
        // Rank 0's pieces interleaved with rank 1's report and other output.
        let mut r = Reassembler::default();
        let mut reports = Vec::new();
        for (i, l) in la.iter().enumerate() {
            let got = r.push(Some(0), l.trim_end_matches('\n'));
            if i + 1 < la.len() {
                assert_eq!(got, Line::Piece, "line {i}");
            } else {
                reports.push(got);
            }
            if i == 0 {
                reports.push(r.push(Some(1), lb[0].trim_end_matches('\n')));
                assert_eq!(r.push(Some(1), "step 3 of 10"), Line::Text);
            }
        }
        assert_eq!(reports, vec![Line::Report(b), Line::Report(a)]);
    }
}
