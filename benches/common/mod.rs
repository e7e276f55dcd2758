//! Helpers shared by the benchmarks that drive the `ulysses` binary.

use anyhow::{Context, Result};

/// `key=value` from the summary line of `ulysses step`.
pub fn field(summary: &str, key: &str) -> Result<f64> {
    let value = summary
        .split_whitespace()
        .find_map(|kv| kv.strip_prefix(&format!("{key}=")))
        .with_context(|| format!("no {key} in {summary:?}"))?;
    Ok(value.parse()?)
}
