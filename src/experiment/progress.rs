//! Progress of a run: an indicatif bar on a terminal, plain lines elsewhere (notebooks, CI,
//! pipes), where a bar would draw nothing. The choice is made here, once, from whether stderr
//! is a terminal, so the same call works in both places.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

use super::format;

/// Reports sweep points and steps.
pub struct Progress {
    bar: Option<ProgressBar>,
    total_steps: u64,
    done: u64,
    started: Instant,
    last_line: Option<Instant>,
    /// Plain lines at most this often (plus one per finished point).
    every: Duration,
}

impl Progress {
    /// Progress over `total_steps` steps (all points), a bar if stderr is a terminal.
    pub fn new(total_steps: u64) -> Progress {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = ProgressBar::new(total_steps);
            let style = ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len} steps  {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> ");
            bar.set_style(style);
            bar
        });
        Progress {
            bar,
            total_steps,
            done: 0,
            started: Instant::now(),
            last_line: None,
            every: Duration::from_secs(2),
        }
    }

    /// A message above the bar, or a line.
    pub fn say(&self, msg: &str) {
        match &self.bar {
            Some(bar) => bar.println(msg),
            None => println!("{msg}"),
        }
    }

    /// One step of a point finished.
    pub fn step(&mut self, point: &str, step: usize, of: usize, ms: f64, tokens_per_s: f64, loss: f64) {
        self.done += 1;
        let (ms, rate) = (format::ms(ms), format::rate(tokens_per_s));
        let msg = format!("{point}: step {}/{of} {ms} ms {rate} tok/s loss {loss:.4}", step + 1);
        match &self.bar {
            Some(bar) => {
                bar.set_position(self.done);
                bar.set_message(msg);
            }
            None => {
                let due = self.last_line.is_none_or(|t| t.elapsed() >= self.every) || step + 1 == of;
                if due {
                    let elapsed = self.started.elapsed().as_secs_f64();
                    println!("[{elapsed:7.1}s] {}/{} steps  {msg}", self.done, self.total_steps);
                    self.last_line = Some(Instant::now());
                }
            }
        }
    }

    /// Steps skipped (finished by an earlier run that is being resumed).
    pub fn skip(&mut self, steps: u64) {
        self.done += steps;
        if let Some(bar) = &self.bar {
            bar.set_position(self.done);
        }
    }

    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}
