//! Packing documents into fixed-length sequences, and the padded batches it replaces.
//!
//! A packed row is documents laid end to end from a drawn starting document, the last one cut
//! where the row ends (concatenate-and-cut, as Megatron-LM's and most pre-training pipelines
//! pack; a document longer than the row is cut to it). Its [`Documents`] keep attention and
//! labels inside each document. A padded row is one document followed by padding, the padding
//! its own "document" (so that no real token attends to it under any rule) with no labels: what
//! packing saves is the padding's compute.

use tch::Tensor;

use super::{to_tensor, Rng};
use crate::attention::Documents;
use crate::model::{shift_labels_packed, IGNORE};
use crate::{Error, Result};

/// Documents as token lists.
pub struct Corpus<'a> {
    /// Every document's tokens, in order.
    pub documents: Vec<&'a [i64]>,
}

impl<'a> Corpus<'a> {
    /// The documents of `tokens` that start at `starts` (ascending, the first 0), each running to
    /// the next start.
    pub fn from_starts(tokens: &'a [i64], starts: &[usize]) -> Result<Corpus<'a>> {
        let bad = |msg: String| Error::InvalidArgument { op: "packing", group: "-".into(), msg };
        if starts.first() != Some(&0) || starts.windows(2).any(|w| w[1] <= w[0]) {
            return Err(bad(format!(
                "document starts must begin at 0 and increase; got {} of them",
                starts.len()
            )));
        }
        if starts.last().is_some_and(|&s| s >= tokens.len()) {
            return Err(bad(format!("a document starts at or after the {} tokens end", tokens.len())));
        }
        let ends = starts.iter().skip(1).copied().chain(std::iter::once(tokens.len()));
        Ok(Corpus { documents: starts.iter().zip(ends).map(|(&a, e)| &tokens[a..e]).collect() })
    }

    /// The longest document's length.
    pub fn longest(&self) -> usize {
        self.documents.iter().map(|d| d.len()).max().unwrap_or(0)
    }

    /// Row `row` of a packed batch: documents from a drawn one on, the last cut at `n`.
    /// Returns its tokens and lengths.
    fn packed_row(&self, rng: &mut Rng, n: usize) -> (Vec<i64>, Vec<i64>) {
        let mut d = rng.below(self.documents.len() as u64) as usize;
        let (mut tokens, mut lengths) = (Vec::with_capacity(n), Vec::new());
        while tokens.len() < n {
            let doc = self.documents[d];
            let take = doc.len().min(n - tokens.len());
            tokens.extend_from_slice(&doc[..take]);
            lengths.push(take as i64);
            d = (d + 1) % self.documents.len();
        }
        (tokens, lengths)
    }

    /// A batch of `b` packed rows of `n` tokens for (seed, step, replica): the tokens `[b, n]`
    /// and their documents.
    pub fn packed(&self, seed: u64, step: u64, replica: u64, b: i64, n: i64) -> Result<(Tensor, Documents)> {
        self.check(b, n)?;
        let (rows, lengths): (Vec<Vec<i64>>, Vec<Vec<i64>>) =
            (0..b).map(|i| self.packed_row(&mut Rng::new(seed, step, replica, i as u64), n as usize)).unzip();
        Ok((to_tensor(rows, n)?, Documents::from_lengths(n, &lengths)?))
    }

    /// A batch of `b` padded rows of `n` tokens: one drawn document each (cut at `n`), then
    /// `pad` tokens. Returns the tokens `[b, n]`, the documents (the document, then the padding
    /// as a second one) and the labels `[b, n]` (none on the padding or the document's last
    /// token).
    pub fn padded(
        &self,
        seed: u64,
        step: u64,
        replica: u64,
        b: i64,
        n: i64,
        pad: i64,
    ) -> Result<(Tensor, Documents, Tensor)> {
        self.check(b, n)?;
        let mut rows = Vec::new();
        let mut lengths = Vec::new();
        for i in 0..b {
            let mut rng = Rng::new(seed, step, replica, i as u64);
            let doc = self.documents[rng.below(self.documents.len() as u64) as usize];
            let take = doc.len().min(n as usize);
            let mut row = doc[..take].to_vec();
            row.resize(n as usize, pad);
            rows.push(row);
            lengths.push(if take < n as usize { vec![take as i64, n - take as i64] } else { vec![n] });
        }
        let tokens = to_tensor(rows, n)?;
        let docs = Documents::from_lengths(n, &lengths)?;
        let labels = shift_labels_packed(&tokens, &docs)?;
        // no label on the padding
        for (s, ls) in lengths.iter().enumerate() {
            if ls.len() == 2 {
                let _ = labels
                    .f_get(s as i64)
                    .and_then(|row| row.f_narrow(0, ls[0], ls[1])?.f_fill_(IGNORE))
                    .map_err(|source| Error::Torch { op: "packing", source })?;
            }
        }
        Ok((tokens, docs, labels))
    }

    fn check(&self, b: i64, n: i64) -> Result<()> {
        if self.documents.is_empty() || b < 1 || n < 1 {
            return Err(Error::InvalidArgument {
                op: "packing",
                group: "-".into(),
                msg: format!("{} documents cannot fill {b} rows of {n} tokens", self.documents.len()),
            });
        }
        Ok(())
    }
}
