//! `ulysses predict`: the cost model on an experiment config (predicted tables, Parquet and
//! plots next to the run's), or on one job given by flags (its full breakdown).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use ulysses::attention::StrategyConfig;
use ulysses::cost::{
    best, every_strategy, max_seq, predict, Band, Hardware, Prediction, SearchSpace, Software,
};
use ulysses::experiment::{
    hardware_for, job_for, predict_experiment, predict_points, ExperimentConfig, Mode, Packing, Predicted,
    SUMMARY_COLUMNS,
};
use ulysses::train::{Checkpointing, Precision, ZeroStage};

#[derive(clap::Args)]
pub struct PredictArgs {
    /// An experiment config (experiments/*.toml); without it, one job from the flags below.
    config: Option<PathBuf>,
    /// Hardware preset (dgx-a100-40gb, dgx-a100-80gb, dgx-h100, h200, cpu-2core) or a file.
    #[arg(long)]
    hardware: Option<String>,
    /// Software profile (flash-attention-2, megatron-deepspeed-2023, megatron-lm-2023,
    /// flash-attention-3, measured) or a file; with a config, in place of `[predict] software`.
    #[arg(long)]
    software: Option<String>,
    /// With a config: the paper's stated setup (as `[predict] mode = "paper"`).
    #[arg(long, conflicts_with = "free")]
    paper: bool,
    /// With a config: the free search over this toolkit's strategies as they are (`[predict]
    /// mode = "free"`, no baseline systems): with `--software flash-attention-2`, what this
    /// toolkit would do today.
    #[arg(long)]
    free: bool,
    /// Multiply every kernel efficiency of the hardware by this (sensitivity of the assumptions).
    #[arg(long, default_value_t = 1.0)]
    efficiency_scale: f64,
    /// Model preset: tiny, 125m, 350m, 1.3b, 6.7b, 30b, llama-tiny, llama3-8b, llama3-70b.
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
    /// ZeRO-Offload: the optimizer's states in host memory, its update on the host's CPUs
    /// (needs --zero 1 or more and a hardware file with the host memory's bandwidth; predicted
    /// only: `ulysses run` does not offload its optimizer).
    #[arg(long)]
    offload_optimizer: bool,
    /// Search the fastest SP degree, micro-batch, ZeRO stage and checkpointing that fits (with a
    /// config: as its `[predict] search = true`).
    #[arg(long)]
    search: bool,
    /// Search the longest sequence that fits (with a config: as its `[predict] max_seq = true`).
    #[arg(long)]
    max_seq: bool,
    #[command(flatten)]
    memory: crate::args::MemoryArgs,
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
    for r in rows {
        match &r.outcome {
            Err(_) => println!("left out: point {} {} (nothing fits)", r.point.index + 1, r.point.describe()),
            Ok(p) if cfg.is_baseline(p.job.strategy)? => println!(
                "left out: point {} {} (the baseline system {}: not this toolkit's to run)",
                r.point.index + 1,
                r.point.describe(),
                p.software
            ),
            Ok(_) => {}
        }
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
         zero = {zero}\ncheckpointing = {ckpt:?}\ngrad_accum = {accum}\n{memory}\
         [train.adamw]\n\
         [predict]\nhardware = {hardware:?}\noptimizer = true\noverlap = {overlap}\n\
         offload_optimizer = {offload_optimizer}\n",
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
        offload_optimizer = args.offload_optimizer,
        memory = [
            args.memory.loss_tile.map(|t| format!("loss_tile = {t}\n")),
            args.memory.mlp_tile.map(|t| format!("mlp_tile = {t}\n")),
            args.memory.offload.as_ref().map(|o| format!("offload = {o:?}\n")),
            args.memory.offload_kv.as_ref().map(|o| format!("offload_kv = {o:?}\n")),
            args.memory
                .offload_dir
                .as_ref()
                .map(|d| format!("offload_dir = {:?}\n", d.display().to_string())),
        ]
        .into_iter()
        .flatten()
        .collect::<String>(),
    );
    Ok(ExperimentConfig::parse(&text, "the flags")?)
}

pub fn run(args: &PredictArgs) -> Result<()> {
    if let Some(path) = &args.config {
        let mut cfg = ExperimentConfig::load(path)?;
        if args.search || args.max_seq || args.paper || args.free || args.software.is_some() {
            let spec = cfg.predict.get_or_insert_with(Default::default);
            spec.search |= args.search;
            spec.max_seq |= args.max_seq;
            if args.paper {
                spec.mode = Mode::Paper;
            }
            if args.free {
                spec.mode = Mode::Free;
                spec.search = !spec.max_seq;
                spec.baselines.clear();
            }
            if let Some(sw) = &args.software {
                spec.software = Some(sw.clone());
            }
        }
        let source = cfg.hardware_source(args.hardware.as_deref());
        let hw =
            hardware_for(&cfg, args.hardware.as_deref())?.with_efficiency_scale(args.efficiency_scale)?;
        if let Some(note) = hw.measured_elsewhere() {
            eprintln!("note: {note}");
        }
        let (dir, table) = predict_experiment(&cfg, &hw, &std::env::current_dir()?)?;
        let mut columns: Vec<&str> = SUMMARY_COLUMNS.to_vec();
        columns.extend(["megatron_tflops_per_gpu_low", "megatron_tflops_per_gpu_high", "software"]);
        println!("{}", table.select(columns)?);
        println!(
            "low / high: every input at the pessimistic / optimistic end of its source's range (hardware [bands], the software's attention_band)"
        );
        if let Some(paper) = cfg.predict.as_ref().map(|p| p.paper.trim()).filter(|p| !p.is_empty()) {
            println!("the paper: {paper}");
        }
        println!("predicted on {}: {} (breakdown.txt has every term)", hw.name, dir.display());
        let packed = cfg.points()?.iter().filter(|p| p.packing != Packing::None).count();
        if packed > 0 {
            println!(
                "left out: {packed} packed or padded point(s); their documents come from the data, which the \
                 config does not hold (the cost model takes them as Job::documents, docs/packed.md)"
            );
        }
        if let Some(out) = &args.write_config {
            write(&cfg, &predict_points(&cfg, &hw)?, &source, out)?;
        }
        return Ok(());
    }
    let source = args.hardware.clone().unwrap_or_else(|| "dgx-a100-40gb".into());
    let mut hw = Hardware::load(&source)?.with_efficiency_scale(args.efficiency_scale)?;
    if let Some(sw) = &args.software {
        hw = hw.with_software(&Software::load(sw)?, Band::Central)?;
    }
    if let Some(note) = hw.measured_elsewhere() {
        eprintln!("note: {note}");
    }
    let cfg = flags_config(args, &source)?;
    let point = cfg.points()?.remove(0);
    let job = job_for(&cfg, &point)?;
    let strategies = if args.any_strategy { every_strategy() } else { Vec::new() };
    let space = SearchSpace { strategies, ..SearchSpace::everything() };
    let at = |band: Band| -> Result<Prediction> {
        let hw = hw.at_band(band);
        match (args.search, args.max_seq) {
            (_, true) => max_seq(&job, &hw, &SearchSpace { micro_batch: vec![1], ..space.clone() }),
            (true, false) => best(&job, &hw, &space),
            (false, false) => predict(&job, &hw),
        }
        .with_context(|| format!("predicting {} at the {} band", job.describe(), band.name()))
    };
    let p = at(Band::Central)?;
    print!("{p}");
    let show = |band: Band| match at(band) {
        Ok(q) => format!(
            "{:.0} TFLOP/s per GPU (Megatron-DeepSpeed), {:.0} tokens/s, peak {:.2} GiB{}",
            q.megatron_tflops_per_gpu,
            q.tokens_per_s,
            q.memory.resident_bytes / (1u64 << 30) as f64,
            if q.memory.fits { "" } else { " (does not fit)" }
        ),
        Err(e) => format!("{e:#}"),
    };
    println!("band, every input at the pessimistic end of its range: {}", show(Band::Low));
    println!("band, every input at the optimistic end of its range:  {}", show(Band::High));
    println!("software: {}", hw.software_name());
    if !p.memory.fits && !args.search && !args.max_seq {
        bail!("{} does not fit on {}: try --search", job.describe(), hw.name);
    }
    if let Some(out) = &args.write_config {
        write(
            &cfg,
            &[Predicted { point, outcome: Ok(p), low: Err("-".into()), high: Err("-".into()) }],
            &source,
            out,
        )?;
    }
    Ok(())
}
