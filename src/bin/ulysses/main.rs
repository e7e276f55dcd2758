//! The `ulysses` command line: thin wrappers that parse arguments and call the library.

mod demo;
mod layer;
mod step;

use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, Subcommand};
use ulysses::attention::{Kernel, Mask};
use ulysses::experiment::{run, ExperimentConfig, RunOptions};

#[derive(Parser)]
#[command(
    name = "ulysses",
    version,
    about = "Sequence-parallel transformer training toolkit (DeepSpeed-Ulysses)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Launch P ranks as threads, all-to-all a [b, N/P, H, d] tensor into [b, N, H/P, d] and back,
    /// and print each rank's shapes and the bytes it moved.
    Demo {
        /// Ranks (threads).
        #[arg(long, default_value_t = 4)]
        ranks: usize,
        /// Global sequence length N.
        #[arg(long, default_value_t = 1024)]
        seq: i64,
        /// Attention heads H.
        #[arg(long, default_value_t = 8)]
        heads: i64,
        /// Head size d.
        #[arg(long, default_value_t = 64)]
        head_dim: i64,
        /// Micro-batch b.
        #[arg(long, default_value_t = 2)]
        batch: i64,
    },
    /// Run one Ulysses attention layer on P ranks (threads) on the q, k, v of a safetensors file
    /// and write the output and the input gradients to another, to compare with any other
    /// implementation (a PyTorch script: scripts/compare_layer.py).
    ///
    /// Input tensors: `q` [b, N, H, d]; `k`, `v` [b, N, H_kv, d]; optionally `grad_out`
    /// [b, N, H, d], the gradient of the output (default: ones, the gradient of out.sum()).
    /// Output tensors, in q's dtype and the inputs' layout: `out` [b, N, H, d], `grad_q`,
    /// `grad_k`, `grad_v`.
    Layer {
        /// The safetensors file with q, k, v (and grad_out).
        #[arg(long)]
        input: PathBuf,
        /// Where to write out, grad_q, grad_k, grad_v.
        #[arg(long)]
        output: PathBuf,
        /// Sequence-parallel ranks (threads).
        #[arg(long, default_value_t = 4)]
        ranks: usize,
        /// Attention kernel: math, sdpa or blocked.
        #[arg(long, default_value = "sdpa")]
        kernel: Kernel,
        /// Mask: none, causal, window:W, sparse:B,L,G or sparse-causal:B,L,G.
        #[arg(long, default_value = "causal")]
        mask: Mask,
    },
    /// Time forward + backward (+ gradient sync) steps of the GPT on P ranks (threads), and
    /// report the step time, tokens/s and the process's memory.
    Step(step::StepArgs),
    /// Run an experiment config (experiments/*.toml): every sweep point, results written as
    /// they come (CSV and Parquet) into its output folder, then its summary table.
    Run {
        /// The experiment's TOML file.
        config: PathBuf,
        /// Continue the run already in the output folder; its finished points are kept.
        #[arg(long)]
        resume: bool,
        /// Also write the report (tables and plots) at the end.
        #[arg(long)]
        report: bool,
    },
    /// Summarise a run's output folder: a table per point, summary.csv and plots (SVG, PNG).
    Report {
        /// The output folder of a run.
        dir: PathBuf,
    },
}

fn experiment(config: &std::path::Path, resume: bool, report: bool) -> Result<()> {
    let cfg = ExperimentConfig::load(config)?;
    let opts = RunOptions { resume, base_dir: std::env::current_dir()? };
    let summary = run(&cfg, &opts)?;
    println!("{}", summary.points);
    println!("{} in {:.1} s: {}", cfg.name, summary.elapsed.as_secs_f64(), summary.dir.display());
    if report {
        print_report(&summary.dir)?;
    }
    Ok(())
}

fn print_report(dir: &std::path::Path) -> Result<()> {
    let r = ulysses::experiment::report(dir)?;
    println!("{}", r.summary);
    for f in &r.files {
        println!("wrote {}", f.display());
    }
    Ok(())
}

fn main() -> Result<()> {
    // Show every column of the result tables (polars reads these once, at first display).
    std::env::set_var("POLARS_FMT_MAX_COLS", "24");
    std::env::set_var("POLARS_TABLE_WIDTH", "220");
    match Cli::parse().command {
        Command::Demo { ranks, seq, heads, head_dim, batch } => demo::run(ranks, seq, heads, head_dim, batch),
        Command::Layer { input, output, ranks, kernel, mask } => {
            layer::run(&input, &output, ranks, kernel, mask)
        }
        Command::Step(args) => step::run(&args),
        Command::Run { config, resume, report } => experiment(&config, resume, report),
        Command::Report { dir } => print_report(&dir),
    }
}
