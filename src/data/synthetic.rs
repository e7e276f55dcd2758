//! Synthetic tasks that need long context, as bytes (vocabulary 256), generated from a seed:
//! nothing to download, and the same data on every rank and every run.
//!
//! - **associative recall**: `k:v` pairs, then a query for a key seen far back: predicting its
//!   value needs the whole sequence (Ba et al. 2016; the Zoology/H3 benchmarks);
//! - **passkey retrieval**: a five-digit key hidden at a random depth in filler text, asked for
//!   at the end (Mohtashami and Jaggi 2023);
//! - **Dyck**: balanced brackets of four kinds; a closing bracket must match an opening one that
//!   may lie far back (a long-range-dependency grammar).

use serde::{Deserialize, Serialize};
use tch::Tensor;

use super::{to_tensor, Dataset, Rng};
use crate::Result;

/// Which synthetic task.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Task {
    AssociativeRecall,
    Passkey,
    Dyck,
}

/// A synthetic dataset.
pub struct Synthetic {
    task: Task,
}

impl Synthetic {
    pub fn new(task: Task) -> Synthetic {
        Synthetic { task }
    }

    /// One row of exactly `n` bytes.
    fn row(&self, rng: &mut Rng, n: usize) -> Vec<i64> {
        let bytes = match self.task {
            Task::AssociativeRecall => recall(rng, n),
            Task::Passkey => passkey(rng, n),
            Task::Dyck => dyck(rng, n),
        };
        bytes.into_iter().map(i64::from).collect()
    }
}

impl Dataset for Synthetic {
    fn describe(&self) -> String {
        format!("synthetic {:?}", self.task)
    }

    fn vocab_size(&self) -> i64 {
        256
    }

    fn batch(&self, seed: u64, step: u64, replica: u64, b: i64, n: i64) -> Result<Tensor> {
        let rows =
            (0..b).map(|i| self.row(&mut Rng::new(seed, step, replica, i as u64), n as usize)).collect();
        to_tensor(rows, n)
    }
}

/// `ab:3 qx:7 ... ?ab:3` — two-letter keys, one-digit values, the query at the very end asks
/// for the first key (the farthest back). Padded with spaces at the front to `n` bytes.
fn recall(rng: &mut Rng, n: usize) -> Vec<u8> {
    let key = |rng: &mut Rng| [b'a' + rng.below(26) as u8, b'a' + rng.below(26) as u8];
    let value = |rng: &mut Rng| b'0' + rng.below(10) as u8;
    let (first_key, first_value) = (key(rng), value(rng));
    let query = [b'?', first_key[0], first_key[1], b':', first_value];
    let mut body = vec![first_key[0], first_key[1], b':', first_value, b' '];
    while body.len() + 5 + query.len() <= n {
        let (k, v) = (key(rng), value(rng));
        if k != first_key {
            body.extend_from_slice(&[k[0], k[1], b':', v, b' ']);
        }
    }
    body.extend(query);
    if body.len() >= n {
        // Too short for even one pair besides the query: keep the end (the query).
        return body.split_off(body.len() - n);
    }
    let mut out = vec![b' '; n - body.len()];
    out.extend(body);
    out
}

/// Filler sentences with the pass key hidden at a random depth, and the question at the end.
fn passkey(rng: &mut Rng, n: usize) -> Vec<u8> {
    let key: String = (0..5).map(|_| char::from(b'0' + rng.below(10) as u8)).collect();
    let needle = format!("The pass key is {key}. Remember it. ");
    let question = format!("What is the pass key? The pass key is {key}.");
    let filler =
        b"The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. ";
    let room = n.saturating_sub(needle.len() + question.len());
    let depth = rng.below(room as u64 + 1) as usize;
    let mut out: Vec<u8> = filler.iter().cycle().take(depth).copied().collect();
    out.extend(needle.bytes());
    out.extend(filler.iter().cycle().take(room - depth));
    out.extend(question.bytes());
    // Sequences shorter than the needle and question keep their end (the answer).
    let start = out.len().saturating_sub(n);
    out.split_off(start)
}

/// A balanced sequence of four kinds of brackets, exactly `n` bytes (a space pads odd `n`).
fn dyck(rng: &mut Rng, n: usize) -> Vec<u8> {
    const OPEN: [u8; 4] = *b"([{<";
    const CLOSE: [u8; 4] = *b")]}>";
    let pairs = n / 2;
    let mut out = Vec::with_capacity(n);
    let mut stack: Vec<usize> = Vec::new();
    let mut opened = 0;
    while out.len() < 2 * pairs {
        // Open while pairs remain, with a bias towards deep nesting; close otherwise.
        let can_open = opened < pairs;
        if can_open && (stack.is_empty() || rng.below(100) < 55) {
            let kind = rng.below(4) as usize;
            stack.push(kind);
            out.push(OPEN[kind]);
            opened += 1;
        } else if let Some(kind) = stack.pop() {
            out.push(CLOSE[kind]);
        }
    }
    if n % 2 == 1 {
        out.push(b' ');
    }
    out
}
