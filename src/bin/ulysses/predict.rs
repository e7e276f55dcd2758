//! `ulysses predict`: the cost model on an experiment config (predicted tables, Parquet and
//! plots next to the run's), or on one job given by flags (its full breakdown).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use ulysses::attention::StrategyConfig;
use ulysses::cost::{best, every_strategy, max_seq, predict, Hardware, Prediction, SearchSpace};
use ulysses::experiment::{
    hardware_for, job_for, predict_experiment, predict_points, ExperimentConfig, Predicted, SUMMARY_COLUMNS,
};
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
    strategy: String,
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
    grad_accum: usize,
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
    kernel: String,
    /// Mask: none, causal, window:W, sparse:B,L,G, sparse-causal:B,L,G.
    #[arg(long, default_value = "causal")]
    mask: String,
    /// The network of the hardware file: nccl, local, mpi.
    #[arg(long, default_value = "nccl")]
    backend: String,
    /// Overlap ZeRO and gradient communication and ring passes with compute.
    #[arg(long)]
    overlap: bool,
    /// Search the fastest SP degree, micro-batch, ZeRO stage and checkpointing that fits (with a
    /// config: as its `[predict] search = true`).
    #[arg(long)]
    search: bool,
    /// Search the longest sequence that fits (with a config: as its `[predict] max_seq = true`).
    #[arg(long)]
    max_seq: bool,
    /// With --search or --max-seq: try every strategy too, not only --strategy.
    #[arg(long)]
    any_strategy: bool,
    /// Write the setting each point was predicted at (the search's best with --search) as an
    /// experiment config that `ulysses run` and `ulysses submit` accept unchanged; points found
    /// at different settings go to PATH's stem with -1, -2, ... (a config has one setting).
    #[arg(long, value_name = "PATH")]
    write_config: Option<PathBuf>,
}

/// Writes the configs and says what went where.
fn write(cfg: &ExperimentConfig, rows: &[Predicted], hardware: &str, path: &Path) -> Result<()> {
    for file in cfg.write_settings(rows, hardware, path)? {
        let written = ExperimentConfig::load(&file)?;
        let n = written.points()?.len();
        println!(
            "wrote {} ({n} point{}: {} at {} ranks, N = {:?})",
            file.display(),
            if n == 1 { "" } else { "s" },
            written.parallel.strategies.join(", "),
            written.parallel.ranks.iter().map(|r| r.to_string()).collect::<Vec<_>>().join(", "),
            written.train.seq
        );
    }
    for r in rows.iter().filter(|r| r.outcome.is_err()) {
        println!("left out: point {} {} (nothing fits)", r.point.index + 1, r.point.describe());
    }
    Ok(())
}

/// The job the flags describe, as a one-point experiment config (what --write-config starts
/// from; Adam states always counted, as every flag prediction does).
fn flags_config(args: &PredictArgs, hardware: &str) -> Result<ExperimentConfig> {
    let strategy: StrategyConfig = args.strategy.parse().map_err(anyhow::Error::msg)?;
    let device = if args.backend == "nccl" { "cuda" } else { "cpu" };
    let text = format!(
        "name = {name:?}\n\
         [model]\npreset = {model:?}\n\
         [parallel]\nranks = [{ranks}]\ndp = {dp}\nstrategies = [{strategy:?}]\nbackend = {backend:?}\n\
         device = {device:?}\n\
         [attention]\nkernel = {kernel:?}\nmask = {mask:?}\n\
         [train]\ndtype = {dtype:?}\nbatch = {batch}\nseq = [{seq}]\nsteps = 10\nwarmup = 2\n\
         zero = {zero}\ncheckpointing = {ckpt:?}\ngrad_accum = {accum}\n\
         [train.adamw]\n\
         [predict]\nhardware = {hardware:?}\noptimizer = true\noverlap = {overlap}\n",
        name = format!("predicted_{}_{}", args.model, strategy.label()),
        model = args.model,
        ranks = args.ranks,
        dp = args.dp,
        strategy = args.strategy,
        backend = args.backend,
        kernel = args.kernel,
        mask = args.mask,
        dtype = args.dtype.name(),
        batch = args.batch,
        seq = args.seq,
        zero = ZeroStage::new(args.zero)?.stage(),
        ckpt = args.checkpointing.name(),
        accum = args.grad_accum,
        overlap = args.overlap,
    );
    Ok(ExperimentConfig::parse(&text, "the flags")?)
}

pub fn run(args: &PredictArgs) -> Result<()> {
    if let Some(path) = &args.config {
        let mut cfg = ExperimentConfig::load(path)?;
        if args.search || args.max_seq {
            let spec = cfg.predict.get_or_insert_with(Default::default);
            spec.search |= args.search;
            spec.max_seq |= args.max_seq;
        }
        let source = cfg.hardware_source(args.hardware.as_deref());
        let hw =
            hardware_for(&cfg, args.hardware.as_deref())?.with_efficiency_scale(args.efficiency_scale)?;
        let (dir, table) = predict_experiment(&cfg, &hw, &std::env::current_dir()?)?;
        println!("{}", table.select(SUMMARY_COLUMNS)?);
        if let Some(paper) = cfg.predict.as_ref().map(|p| p.paper.trim()).filter(|p| !p.is_empty()) {
            println!("the paper: {paper}");
        }
        println!("predicted on {}: {} (breakdown.txt has every term)", hw.name, dir.display());
        if let Some(out) = &args.write_config {
            write(&cfg, &predict_points(&cfg, &hw)?, &source, out)?;
        }
        return Ok(());
    }
    let source = args.hardware.clone().unwrap_or_else(|| "dgx-a100-40gb".into());
    let hw = Hardware::load(&source)?.with_efficiency_scale(args.efficiency_scale)?;
    let cfg = flags_config(args, &source)?;
    let point = cfg.points()?.remove(0);
    let job = job_for(&cfg, &point)?;
    let strategies = if args.any_strategy { every_strategy() } else { Vec::new() };
    let space = SearchSpace { strategies, ..SearchSpace::everything() };
    let p: Prediction = match (args.search, args.max_seq) {
        (_, true) => max_seq(&job, &hw, &SearchSpace { micro_batch: vec![1], ..space }),
        (true, false) => best(&job, &hw, &space),
        (false, false) => predict(&job, &hw),
    }
    .with_context(|| format!("predicting {}", job.describe()))?;
    print!("{p}");
    if !p.memory.fits && !args.search && !args.max_seq {
        bail!("{} does not fit on {}: try --search", job.describe(), hw.name);
    }
    if let Some(out) = &args.write_config {
        write(&cfg, &[Predicted { point, outcome: Ok(p) }], &source, out)?;
    }
    Ok(())
}
