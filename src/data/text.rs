//! Real text from files: plain text with a byte or character tokenizer, and token files in
//! nanoGPT's format (little-endian u16 or u32 ids, no header). A batch is `b` windows of `n`
//! consecutive tokens at positions drawn from (seed, step, replica). Plain text has documents
//! too, its paragraphs (runs of text between blank lines), for packing ([`Corpus`]).

use std::path::Path;

use serde::{Deserialize, Serialize};
use tch::Tensor;

use super::{to_tensor, Corpus, Dataset, Rng, TokenDtype};
use crate::{Error, Result};

/// How plain text becomes token ids.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Tokenizer {
    /// One token per byte of UTF-8: vocabulary 256, nothing to learn.
    Byte,
    /// One token per distinct character of the file, numbered in sorted order.
    Char,
}

/// A token stream held in memory, read from a plain-text file or a token file, and how to draw
/// windows from it.
pub struct TokenStream {
    tokens: Vec<i64>,
    /// Where each document (paragraph) starts; `[0]` for a token file.
    starts: Vec<usize>,
    vocab: i64,
    what: String,
}

fn read(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| Error::InvalidArgument {
        op: "dataset",
        group: "-".into(),
        msg: format!("cannot read {}: {e}", path.display()),
    })
}

impl TokenStream {
    /// A plain-text file, tokenized by `tokenizer`.
    pub fn from_text(path: &Path, tokenizer: Tokenizer) -> Result<TokenStream> {
        let bytes = read(path)?;
        let what = format!("{} ({tokenizer:?} tokens)", path.display());
        Ok(match tokenizer {
            Tokenizer::Byte => {
                let tokens: Vec<i64> = bytes.into_iter().map(i64::from).collect();
                TokenStream { starts: paragraphs(&tokens, i64::from(b'\n')), tokens, vocab: 256, what }
            }
            Tokenizer::Char => {
                let text = String::from_utf8_lossy(&bytes);
                let mut chars: Vec<char> = text.chars().collect();
                chars.sort_unstable();
                chars.dedup();
                let id = |c: char| chars.binary_search(&c).map_or(0, |i| i as i64);
                let tokens: Vec<i64> = text.chars().map(id).collect();
                let starts = match chars.binary_search(&'\n') {
                    Ok(nl) => paragraphs(&tokens, nl as i64),
                    Err(_) => vec![0],
                };
                TokenStream { tokens, starts, vocab: chars.len() as i64, what }
            }
        })
    }

    /// A file of token ids (nanoGPT's `train.bin`), each below `vocab`.
    pub fn from_token_file(path: &Path, dtype: TokenDtype, vocab: i64) -> Result<TokenStream> {
        let bytes = read(path)?;
        let width = match dtype {
            TokenDtype::U16 => 2,
            TokenDtype::U32 => 4,
        };
        let bad = |msg: String| Error::InvalidArgument { op: "dataset", group: "-".into(), msg };
        if bytes.len() % width != 0 {
            return Err(bad(format!(
                "{} has {} bytes, not a whole number of {dtype:?} ids",
                path.display(),
                bytes.len()
            )));
        }
        let tokens: Vec<i64> = bytes
            .chunks_exact(width)
            .map(|c| match dtype {
                TokenDtype::U16 => i64::from(u16::from_le_bytes([c[0], c[1]])),
                TokenDtype::U32 => i64::from(u32::from_le_bytes([c[0], c[1], c[2], c[3]])),
            })
            .collect();
        if let Some(max) = tokens.iter().copied().max().filter(|&m| m >= vocab) {
            return Err(bad(format!(
                "{} holds token id {max}, not below vocab_size {vocab}",
                path.display()
            )));
        }
        Ok(TokenStream {
            tokens,
            starts: vec![0],
            vocab,
            what: format!("{} ({dtype:?} ids)", path.display()),
        })
    }
}

/// Where paragraphs start: 0, and every token after a run of two or more newlines.
fn paragraphs(tokens: &[i64], newline: i64) -> Vec<usize> {
    let mut starts = vec![0];
    for i in 2..tokens.len() {
        if tokens[i] != newline && tokens[i - 1] == newline && tokens[i - 2] == newline {
            starts.push(i);
        }
    }
    starts
}

impl Dataset for TokenStream {
    fn corpus(&self) -> Option<Corpus<'_>> {
        Corpus::from_starts(&self.tokens, &self.starts).ok()
    }

    fn describe(&self) -> String {
        format!("{}, {} tokens, vocabulary {}", self.what, self.tokens.len(), self.vocab)
    }

    fn vocab_size(&self) -> i64 {
        self.vocab
    }

    fn batch(&self, seed: u64, step: u64, replica: u64, b: i64, n: i64) -> Result<Tensor> {
        let len = self.tokens.len() as i64;
        if len < n {
            return Err(Error::InvalidArgument {
                op: "dataset",
                group: "-".into(),
                msg: format!("{} holds {len} tokens, fewer than one sequence of {n}", self.what),
            });
        }
        let rows = (0..b)
            .map(|i| {
                let start = Rng::new(seed, step, replica, i as u64).below((len - n + 1) as u64) as usize;
                self.tokens[start..start + n as usize].to_vec()
            })
            .collect();
        to_tensor(rows, n)
    }
}
