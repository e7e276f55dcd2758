//! Command-line options that several subcommands share, declared once and flattened into each
//! (`#[command(flatten)]`), so that their names, defaults and help cannot drift apart.

use ulysses::attention::{AttentionConfig, Kernel, Mask, StrategyConfig};

/// The attention options of `ulysses layer` and `ulysses step`.
#[derive(clap::Args)]
pub struct AttentionArgs {
    /// single (one device, plain autograd), ulysses, megatron_sp, ring, ring_zigzag,
    /// allgather_kv, allgather_kv_zigzag, usp:U or usp_zigzag:U (U = Ulysses degree),
    /// ulysses_chunked:U (U = chunks per rank: FPDT).
    #[arg(long, default_value = "ulysses")]
    pub strategy: StrategyConfig,
    /// Attention kernel of ulysses, megatron_sp and single: math, sdpa or blocked (the others
    /// compute attention blockwise with the mask).
    #[arg(long, default_value = "sdpa")]
    pub kernel: Kernel,
    /// Mask: none, causal, window:W, sparse:B,L,G or sparse-causal:B,L,G.
    #[arg(long, default_value = "causal")]
    pub mask: Mask,
}

impl AttentionArgs {
    /// The local attention these options name (kernel and mask).
    pub fn config(&self) -> AttentionConfig {
        AttentionConfig::new(self.kernel, self.mask)
    }
}
