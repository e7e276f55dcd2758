//! The library's one error type.
//!
//! Every variant names the operation that failed and, where there is one, the process group
//! (`name[global ranks]`) and the numbers involved, so that a failure in a run on P ranks can be
//! traced from its message alone.

use std::time::Duration;

/// Result alias used throughout the library.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in the library.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Arguments that cannot work, caught before anything is communicated.
    #[error("{op} on group {group}: {msg}")]
    InvalidArgument { op: &'static str, group: String, msg: String },

    /// Ranks called collectives that do not match (different op, dtype or shape).
    #[error("{op} on group {group}: ranks disagree: {detail}")]
    Mismatch { op: &'static str, group: String, detail: String },

    /// A rank waited for a peer longer than the group's timeout.
    #[error(
        "{op} on group {group}: rank {rank} timed out after {waited:.3?} \
         (timeout {timeout:.3?}) {what}"
    )]
    Timeout {
        op: &'static str,
        group: String,
        rank: usize,
        waited: Duration,
        timeout: Duration,
        /// Which peers were missing, and for what.
        what: String,
    },

    /// A rank stopped waiting because another rank failed or exited first.
    #[error("{op} on group {group}: rank {rank} gave up: {cause}")]
    Aborted { op: &'static str, group: String, rank: usize, cause: String },

    /// A rank of a launch returned an error or panicked; the other ranks were released.
    #[error("rank {rank} failed: {message}{}", others_note(.others))]
    RankFailed {
        rank: usize,
        message: String,
        /// Ranks that failed after it (usually because of it).
        others: Vec<usize>,
    },

    /// Tensor shapes that an operation cannot take.
    #[error("{op}: shapes {shapes:?}: {msg}")]
    Shape { op: &'static str, shapes: Vec<Vec<i64>>, msg: String },

    /// The differentiable-communication tape was used in a way it cannot serve.
    #[error("tape {op}: {msg}")]
    Tape { op: &'static str, msg: String },

    /// A backend that is not available on this machine or build.
    #[error("{backend} backend: {msg}")]
    Backend { backend: &'static str, msg: String },

    /// libtorch reported an error inside an operation.
    #[error("{op}: libtorch: {}", libtorch_message(&source.to_string()))]
    Torch {
        op: &'static str,
        #[source]
        source: tch::TchError,
    },
}

/// libtorch's message without the C++ stack trace that follows it.
pub(crate) fn libtorch_message(text: &str) -> &str {
    text.split("\nException raised from").next().unwrap_or(text).trim_end()
}

fn others_note(others: &[usize]) -> String {
    if others.is_empty() {
        String::new()
    } else {
        format!(" (then ranks {others:?} failed too)")
    }
}

/// Attaches the operation's name to a libtorch error: `x.f_narrow(0, 0, 1).op("all_to_all")?`.
pub trait TorchResultExt<T> {
    fn op(self, op: &'static str) -> Result<T>;
}

impl<T> TorchResultExt<T> for std::result::Result<T, tch::TchError> {
    fn op(self, op: &'static str) -> Result<T> {
        self.map_err(|source| Error::Torch { op, source })
    }
}
