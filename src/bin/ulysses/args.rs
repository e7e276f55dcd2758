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

/// The long-sequence memory options of `ulysses step` and `ulysses predict`.
#[derive(clap::Args)]
pub struct MemoryArgs {
    /// Compute the loss this many tokens at a time (tiled loss).
    #[arg(long)]
    pub loss_tile: Option<i64>,
    /// Run each block's MLP this many tokens at a time (tiled MLP).
    #[arg(long)]
    pub mlp_tile: Option<i64>,
    /// Move each block's input off the device between its forward and backward (with
    /// --checkpointing full): host (pinned host memory, a GPU) or disk (files).
    #[arg(long, value_parser = ["host", "disk"])]
    pub offload: Option<String>,
    /// Keep chunked Ulysses' K/V off the device between each layer's forward and backward
    /// (FPDT; with --strategy ulysses_chunked:U): host (pinned host memory, a GPU) or disk.
    #[arg(long, value_parser = ["host", "disk"])]
    pub offload_kv: Option<String>,
    /// Folder for --offload disk and --offload-kv disk. Default: the system's temporary folder.
    #[arg(long)]
    pub offload_dir: Option<std::path::PathBuf>,
}

impl MemoryArgs {
    /// `--offload` as the trainer takes it.
    pub fn offload_target(&self) -> Option<ulysses::model::OffloadTarget> {
        self.target(self.offload.as_deref())
    }

    /// `--offload-kv`, where chunked Ulysses keeps its K/V.
    pub fn kv_offload_target(&self) -> Option<ulysses::model::OffloadTarget> {
        self.target(self.offload_kv.as_deref())
    }

    fn target(&self, flag: Option<&str>) -> Option<ulysses::model::OffloadTarget> {
        use ulysses::model::OffloadTarget;
        match flag {
            Some("host") => Some(OffloadTarget::Host),
            Some(_) => Some(OffloadTarget::Disk(self.offload_dir.clone().unwrap_or_else(std::env::temp_dir))),
            None => None,
        }
    }
}
