//! Real text from files: plain text with a byte or character tokenizer, and token files in
//! nanoGPT's format (little-endian u16 or u32 ids, no header). A batch is `b` windows of `n`
//! consecutive tokens at positions drawn from (seed, step, replica).

use std::path::Path;

use serde::{Deserialize, Serialize};
use tch::Tensor;

use super::{to_tensor, Dataset, Rng, TokenDtype};
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
                TokenStream { tokens: bytes.into_iter().map(i64::from).collect(), vocab: 256, what }
            }
            Tokenizer::Char => {
                let text = String::from_utf8_lossy(&bytes);
                let mut chars: Vec<char> = text.chars().collect();
                chars.sort_unstable();
                chars.dedup();
                let id = |c: char| chars.binary_search(&c).map_or(0, |i| i as i64);
                let tokens = text.chars().map(id).collect();
                TokenStream { tokens, vocab: chars.len() as i64, what }
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
        Ok(TokenStream { tokens, vocab, what: format!("{} ({dtype:?} ids)", path.display()) })
    }
}

impl Dataset for TokenStream {
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
