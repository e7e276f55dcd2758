//! Data: token sequences for training and benchmarks, with the global label shift and the
//! sharding each strategy's layout asks for.
//!
//! Nothing is downloaded. A [`Dataset`] is either generated (deterministic synthetic tasks that
//! need long context) or read from a file in the repository or the user's disk (plain text with a
//! byte or character tokenizer, or nanoGPT-style token files). Every batch is a pure function of
//! (dataset, seed, step, data-parallel rank), so every rank of a sequence-parallel group draws the
//! same global batch and keeps its own share, and a resumed run sees the same data.

mod packing;
mod synthetic;
mod text;

pub use packing::Corpus;
pub use synthetic::{Synthetic, Task};
pub use text::{TokenStream, Tokenizer};

use serde::{Deserialize, Serialize};
use tch::Tensor;

use crate::attention::{Documents, SeqLayout};
use crate::model::init::splitmix64;
use crate::model::{shift_labels, shift_labels_packed};
use crate::{Error, Result};

/// A source of token sequences.
pub trait Dataset: Send + Sync {
    /// A short description for logs and metadata.
    fn describe(&self) -> String;

    /// Token ids are below this.
    fn vocab_size(&self) -> i64;

    /// The global batch of training step `step` for data-parallel replica `replica`, drawn with
    /// `seed`.
    ///
    /// # Shapes
    /// `-> [b, n]` i64.
    fn batch(&self, seed: u64, step: u64, replica: u64, b: i64, n: i64) -> Result<Tensor>;

    /// Its documents, for packing ([`Corpus`]); `None` for a source without document
    /// boundaries (a synthetic task, a token file).
    fn corpus(&self) -> Option<Corpus<'_>> {
        None
    }
}

/// Where the data of an experiment comes from (the `[dataset]` table of a config).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum DatasetConfig {
    /// A synthetic long-context task.
    Synthetic { task: Task },
    /// A plain-text file, tokenized by bytes (vocabulary 256) or by characters.
    Text { path: std::path::PathBuf, tokenizer: Tokenizer },
    /// A file of little-endian token ids (nanoGPT's `train.bin`: u16), vocabulary given.
    Tokens { path: std::path::PathBuf, dtype: TokenDtype, vocab_size: i64 },
}

/// Width of the ids in a token file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TokenDtype {
    U16,
    U32,
}

impl Default for DatasetConfig {
    fn default() -> Self {
        DatasetConfig::Synthetic { task: Task::AssociativeRecall }
    }
}

impl DatasetConfig {
    /// Opens (or generates) the dataset; file paths are relative to `base`.
    pub fn open(&self, base: &std::path::Path) -> Result<Box<dyn Dataset>> {
        Ok(match self {
            DatasetConfig::Synthetic { task } => Box::new(Synthetic::new(*task)),
            DatasetConfig::Text { path, tokenizer } => {
                Box::new(TokenStream::from_text(&base.join(path), *tokenizer)?)
            }
            DatasetConfig::Tokens { path, dtype, vocab_size } => {
                Box::new(TokenStream::from_token_file(&base.join(path), *dtype, *vocab_size)?)
            }
        })
    }
}

/// One step's data on one rank: its share of the global tokens and of the globally shifted
/// labels, and the batch's packed documents if it has several per sample.
pub struct Shard {
    pub tokens: Tensor,
    pub labels: Tensor,
    /// Every rank holds the whole batch's documents (a few offsets per sample).
    pub docs: Option<Documents>,
}

/// Shifts the labels over the global batch, then keeps rank `r`'s share of both.
///
/// # Shapes
/// `global`: `[b, N]` -> tokens, labels `[b, len_r]`.
pub fn shard(global: &Tensor, layout: &SeqLayout, r: usize) -> Result<Shard> {
    let labels = shift_labels(global)?;
    Ok(Shard { tokens: layout.shard(global, 1, r)?, labels: layout.shard(&labels, 1, r)?, docs: None })
}

/// [`shard`] for a batch of packed documents: no label crosses a document
/// ([`shift_labels_packed`]), and the shard carries the documents for attention and RoPE.
///
/// # Shapes
/// `global`: `[b, N]` -> tokens, labels `[b, len_r]`.
pub fn shard_packed(global: &Tensor, docs: &Documents, layout: &SeqLayout, r: usize) -> Result<Shard> {
    let labels = shift_labels_packed(global, docs)?;
    Ok(Shard {
        tokens: layout.shard(global, 1, r)?,
        labels: layout.shard(&labels, 1, r)?,
        docs: Some(docs.clone()),
    })
}

/// A small deterministic generator: a counter through SplitMix64.
pub(crate) struct Rng(u64);

impl Rng {
    pub fn new(seed: u64, step: u64, replica: u64, row: u64) -> Rng {
        Rng(splitmix64(seed ^ splitmix64(step ^ splitmix64(replica ^ splitmix64(row)))))
    }

    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(1);
        splitmix64(self.0)
    }

    /// Uniform in `0..n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// Rows of tokens `[b, n]` as a tensor.
pub(crate) fn to_tensor(rows: Vec<Vec<i64>>, n: i64) -> Result<Tensor> {
    let b = rows.len() as i64;
    let flat: Vec<i64> = rows.into_iter().flatten().collect();
    Tensor::from_slice(&flat).f_reshape([b, n]).map_err(|source| Error::Torch { op: "dataset", source })
}
