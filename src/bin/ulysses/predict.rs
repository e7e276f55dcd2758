//! `ulysses predict`: the cost model on an experiment config (predicted tables, Parquet and
//! plots next to the run's), or on one job given by flags (its full breakdown).

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use ulysses::attention::{AttentionConfig, Kernel, Mask, StrategyConfig};
use ulysses::cost::{best, every_strategy, max_seq, predict, Hardware, Job, SearchSpace};
use ulysses::experiment::{hardware_for, predict_experiment, ExperimentConfig, SUMMARY_COLUMNS};
use ulysses::model::GptConfig;
use ulysses::train::{Checkpointing, Precision, ZeroStage};

#[derive(clap::Args)]
pub struct PredictArgs {
    /// An experiment config (experiments/*.toml); without it, one job from the flags below.
    config: Option<PathBuf>,
    /// Hardware preset (dgx-a100-40gb, dgx-a100-80gb, dgx-h100, h200, cpu-2core) or a file.
    #[arg(long)]
    hardware: Option<String>,
    /// Multiply every kernel efficiency of the hardware by this (sensitivity of the assumptions).
    #[arg(long, default_value_t = 1.0)]
    efficiency_scale: f64,
    /// Model preset: tiny, 125m, 350m, 1.3b, 6.7b, 30b.
    #[arg(long, default_value = "1.3b")]
    model: String,
    /// Strategy: ulysses, megatron_sp, ring, ring_zigzag, allgather_kv(_zigzag), usp:U, single.
    #[arg(long, default_value = "ulysses")]
    strategy: StrategyConfig,
    /// Devices (world size).
    #[arg(long, default_value_t = 8)]
    ranks: usize,
    /// Data-parallel degree (SP = ranks / dp).
    #[arg(long, default_value_t = 1)]
    dp: usize,
    /// Global sequence length.
    #[arg(long, default_value_t = 32768)]
    seq: i64,
    /// Micro-batch per data-parallel replica.
    #[arg(long, default_value_t = 1)]
    batch: i64,
    /// Gradient accumulation steps.
    #[arg(long, default_value_t = 1)]
    grad_accum: i64,
    /// ZeRO stage 0-3.
    #[arg(long, default_value_t = 0)]
    zero: u8,
    /// Activation checkpointing: none, selective, full.
    #[arg(long, default_value = "full")]
    checkpointing: Checkpointing,
    /// f32, bf16, f16, f64.
    #[arg(long, default_value = "bf16")]
    dtype: Precision,
    /// Attention kernel: math, sdpa (flash), blocked.
    #[arg(long, default_value = "sdpa")]
    kernel: Kernel,
    /// Mask: none, causal, window:W, sparse:B,L,G, sparse-causal:B,L,G.
    #[arg(long, default_value = "causal")]
    mask: Mask,
    /// The network of the hardware file: nccl, local, mpi.
    #[arg(long, default_value = "nccl")]
    backend: String,
    /// Overlap ZeRO and gradient communication and ring passes with compute.
    #[arg(long)]
    overlap: bool,
    /// Search the fastest SP degree, micro-batch, ZeRO stage and checkpointing that fits.
    #[arg(long)]
    search: bool,
    /// Search the longest sequence that fits.
    #[arg(long)]
    max_seq: bool,
    /// With --search or --max-seq: try every strategy too, not only --strategy.
    #[arg(long)]
    any_strategy: bool,
}

pub fn run(args: &PredictArgs) -> Result<()> {
    if let Some(path) = &args.config {
        let cfg = ExperimentConfig::load(path)?;
        let hw =
            hardware_for(&cfg, args.hardware.as_deref())?.with_efficiency_scale(args.efficiency_scale)?;
        let (dir, table) = predict_experiment(&cfg, &hw, &std::env::current_dir()?)?;
        println!("{}", table.select(SUMMARY_COLUMNS)?);
        if let Some(paper) = cfg.predict.as_ref().map(|p| p.paper.trim()).filter(|p| !p.is_empty()) {
            println!("the paper: {paper}");
        }
        println!("predicted on {}: {} (breakdown.txt has every term)", hw.name, dir.display());
        return Ok(());
    }
    let hw = Hardware::load(args.hardware.as_deref().unwrap_or("dgx-a100-40gb"))?
        .with_efficiency_scale(args.efficiency_scale)?;
    let job = Job {
        model: GptConfig::preset(&args.model)?,
        strategy: args.strategy,
        attention: AttentionConfig::new(args.kernel, args.mask),
        ranks: args.ranks,
        dp: args.dp,
        micro_batch: args.batch,
        grad_accum: args.grad_accum,
        seq: args.seq,
        precision: args.dtype,
        checkpointing: args.checkpointing,
        zero: ZeroStage::new(args.zero)?,
        optimizer: true,
        backend: args.backend.clone(),
        threads_per_rank: 1,
        overlap: args.overlap,
        bucket_elems: 25_000_000,
    };
    let strategies = if args.any_strategy { every_strategy() } else { Vec::new() };
    let space = SearchSpace { strategies, ..SearchSpace::everything() };
    let p = match (args.search, args.max_seq) {
        (_, true) => max_seq(&job, &hw, &SearchSpace { micro_batch: vec![1], ..space }),
        (true, false) => best(&job, &hw, &space),
        (false, false) => predict(&job, &hw),
    }
    .with_context(|| format!("predicting {}", job.describe()))?;
    print!("{p}");
    if !p.memory.fits && !args.search && !args.max_seq {
        bail!("{} does not fit on {}: try --search", job.describe(), hw.name);
    }
    Ok(())
}
