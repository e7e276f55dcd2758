//! The `ulysses` command line: thin wrappers that parse arguments and call the library.

mod args;
mod bench_a2a;
mod calibrate;
mod demo;
mod layer;
mod predict;
mod ranks;
mod screen;
mod step;
mod submit;

use std::path::{Path, PathBuf};

use anyhow::Result;
use clap::{Parser, Subcommand};
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
        /// Ranks (threads; with --backend mpi, the job's processes).
        #[arg(long, default_value_t = 4)]
        ranks: usize,
        /// local: ranks as threads; mpi: this process is one rank (start with `ulysses launch`).
        #[arg(long, value_enum, default_value = "local")]
        backend: ranks::BackendArg,
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
    /// Run one attention layer of any strategy on P ranks (threads) on the q, k, v of a
    /// safetensors file and write the output and the input gradients (and the log-sum-exp) to
    /// another, to compare with any other implementation (a PyTorch script:
    /// scripts/compare_layer.py).
    ///
    /// Input tensors: `q` [b, N, H, d]; `k`, `v` [b, N, H_kv, d]; optionally `grad_out`
    /// [b, N, H, d], the gradient of the output (default: ones, the gradient of out.sum()).
    /// Output tensors, in q's dtype and the inputs' layout: `out` [b, N, H, d], `grad_q`,
    /// `grad_k`, `grad_v`; with --lse, `lse` [b, N, H] in f32 (f64 for f64 inputs).
    Layer(layer::LayerArgs),
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
        /// The output folder (instead of the config's `output`, or results/<name>).
        #[arg(long)]
        output: Option<PathBuf>,
        /// Check every point's predicted memory against this hardware (a preset or file) before
        /// starting; sets the config's `[predict] hardware`, which is checked when named.
        #[arg(long)]
        hardware: Option<String>,
        /// Run points the cost model predicts not to fit the hardware's memory (sets `[predict]
        /// force`; like --hardware, recorded in the run's config.toml, so --resume needs it too).
        #[arg(long)]
        force: bool,
    },
    /// Run an experiment config as a Slurm job: write an sbatch script into its results folder,
    /// submit it and follow the job (its state, its ranks' progress, the results folder).
    Submit(submit::SubmitArgs),
    /// Follow a submitted job until it ends: its state (asked of Slurm every few seconds, backing
    /// off to 30 s) and its output (the ranks' progress); or with --status, look once and return.
    Follow {
        /// The results folder (its slurm/job.toml names its latest job); or the job id sbatch
        /// gave, followed by the folder.
        target: String,
        /// The results folder, after a job id (its output is in slurm/<job>.out there).
        dir: Option<PathBuf>,
        /// Look once: print the job's state (and its results once it is done) and return.
        #[arg(long)]
        status: bool,
    },
    /// Predict an experiment config with the cost model (tables, Parquet and plots beside the
    /// run's, in <output>/predicted-<hardware>/), or one job given by flags with its breakdown.
    Predict(predict::PredictArgs),
    /// Measure this machine (GEMMs, fused attention, memory bandwidth, the local and MPI
    /// backends' collectives) into a hardware file for the cost model. About a minute.
    Calibrate(calibrate::CalibrateArgs),
    /// One rank of calibrate's MPI measurement (what `ulysses calibrate` starts under mpirun).
    #[command(hide = true)]
    CalibrateComm,
    /// Calibrate's fresh process for the library code a first step pages in (prints its bytes).
    #[command(hide = true)]
    CalibratePages,
    /// Summarise a run's output folder: a table per point, summary.csv and plots (SVG, PNG);
    /// measured against predicted when predictions sit beside it.
    Report {
        /// The output folder of a run.
        dir: PathBuf,
    },
    /// One sweep point of an MPI run, as this process's rank (what `ulysses run` starts under
    /// mpirun for configs with `backend = "mpi"`); reports go to stdout as JSON lines.
    #[command(hide = true)]
    RunPoint {
        /// The run's output folder (its config.toml).
        #[arg(long)]
        dir: PathBuf,
        /// The point's index in the sweep.
        #[arg(long)]
        point: usize,
        /// Where relative dataset paths start.
        #[arg(long)]
        base: PathBuf,
        /// The checkpoint the point starts from.
        #[arg(long)]
        from: Option<PathBuf>,
    },
    /// Time the all-to-all of a backend (threads or MPI processes) for sizes per rank, medians.
    BenchA2a {
        /// Ranks (threads; with --backend mpi, the job's processes).
        #[arg(long, default_value_t = 4)]
        ranks: usize,
        /// local or mpi.
        #[arg(long, value_enum, default_value = "local")]
        backend: ranks::BackendArg,
        /// MiB per rank, comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "1,16")]
        mib: Vec<i64>,
        /// Timed runs per size (after two untimed).
        #[arg(long, default_value_t = 21)]
        runs: usize,
        /// cpu, or cuda: one GPU per MPI process, NCCL (needs --backend mpi and the nccl feature).
        #[arg(long, value_enum, default_value = "cpu")]
        device: bench_a2a::DeviceArg,
        /// ulysses: `[1, rows, 32, 128]`, the heads scattered (each peer's chunk strided, packed
        /// before it is sent); rows: `[P, n]`, row j to rank j (contiguous chunks, as `ulysses
        /// calibrate` times the link).
        #[arg(long, value_enum, default_value = "ulysses")]
        layout: bench_a2a::LayoutArg,
    },
    /// Start P processes with mpirun (the flags this machine needs: root, oversubscription),
    /// each running this ulysses (or --program) with the arguments after `--`, and stream
    /// their output prefixed by rank: `ulysses launch -n 4 -- step --backend mpi --ranks 4`.
    Launch {
        /// Processes (ranks).
        #[arg(short = 'n', long = "ranks")]
        ranks: usize,
        /// The program to start (default: this ulysses binary).
        #[arg(long)]
        program: Option<PathBuf>,
        /// Its arguments.
        #[arg(last = true)]
        args: Vec<String>,
    },
}

fn experiment(
    config: &std::path::Path,
    resume: bool,
    report: bool,
    output: Option<PathBuf>,
    hardware: Option<String>,
    force: bool,
) -> Result<()> {
    let mut cfg = ExperimentConfig::load(config)?;
    if output.is_some() {
        cfg.output = output;
    }
    if hardware.is_some() || force {
        let spec = cfg.predict.get_or_insert_with(Default::default);
        spec.hardware = hardware.or(spec.hardware.take());
        spec.force |= force;
    }
    // `run` checks memory again before it starts; this says what the check found.
    if let Some(check) = cfg.check_memory()? {
        println!("{check}");
    }
    submit::check_build(&cfg, config)?;
    let opts =
        RunOptions { resume, base_dir: std::env::current_dir()?, program: Some(std::env::current_exe()?) };
    let summary = run(&cfg, &opts)?;
    let report = report.then(|| ulysses::experiment::report(&summary.dir)).transpose()?;
    screen::print(&cfg.name, &summary.dir, &summary.points, report.as_ref(), Some(summary.elapsed))
}

#[cfg(feature = "mpi")]
fn run_point(dir: &Path, point: usize, base: &Path, from: Option<&Path>) -> Result<()> {
    Ok(ulysses::experiment::run_point_rank(dir, point, base, from)?)
}

#[cfg(not(feature = "mpi"))]
fn run_point(_dir: &Path, _point: usize, _base: &Path, _from: Option<&Path>) -> Result<()> {
    anyhow::bail!("this ulysses was built without the `mpi` feature: cargo build --release --features mpi")
}

fn mpi_launch(ranks: usize, program: Option<PathBuf>, args: &[String]) -> Result<()> {
    use std::io::{BufRead, BufReader};
    use std::process::Stdio;
    anyhow::ensure!(ranks >= 1, "-n must be at least 1");
    let program = match program {
        Some(p) => p,
        None => std::env::current_exe()?,
    };
    let mut child = ulysses::comm::mpirun_command(ranks, &program, args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| anyhow::anyhow!("cannot start mpirun ({e}); install OpenMPI (scripts/setup.sh does)"))?;
    let (out, err) = (child.stdout.take(), child.stderr.take());
    // Both streams, line by line, as they come, with OpenMPI's rank tags made readable.
    let relay = |stream: Option<Box<dyn std::io::Read + Send>>, to_stderr: bool| {
        std::thread::spawn(move || {
            for line in stream.into_iter().flat_map(|s| BufReader::new(s).lines().map_while(Result::ok)) {
                let (_, line) = ulysses::comm::untag(&line);
                if to_stderr {
                    eprintln!("{line}");
                } else {
                    println!("{line}");
                }
            }
        })
    };
    let a = relay(out.map(|s| Box::new(s) as Box<dyn std::io::Read + Send>), false);
    let b = relay(err.map(|s| Box::new(s) as Box<dyn std::io::Read + Send>), true);
    let status = child.wait()?;
    let _ = (a.join(), b.join());
    anyhow::ensure!(status.success(), "mpirun ended with {status}");
    Ok(())
}

fn print_report(dir: &std::path::Path) -> Result<()> {
    let report = ulysses::experiment::report(dir)?;
    let points = ulysses::experiment::read_table(dir, "points")?;
    let name =
        dir.file_name().map_or_else(|| dir.display().to_string(), |n| n.to_string_lossy().into_owned());
    screen::print(&name, dir, &points, Some(&report), None)?;
    for (hardware, table) in &report.comparisons {
        println!("measured against {hardware}:\n{table}");
    }
    Ok(())
}

fn main() -> Result<()> {
    // CUDA, where this libtorch has it (harmless elsewhere).
    ulysses::device::load_cuda();
    match Cli::parse().command {
        Command::Demo { ranks, backend, seq, heads, head_dim, batch } => {
            demo::run(backend, ranks, seq, heads, head_dim, batch)
        }
        Command::Layer(args) => layer::run(&args),
        Command::Step(args) => step::run(&args),
        Command::Run { config, resume, report, output, hardware, force } => {
            experiment(&config, resume, report, output, hardware, force)
        }
        Command::Submit(args) => submit::run(&args),
        Command::Follow { target, dir, status } => submit::follow(&target, dir.as_deref(), status),
        Command::Report { dir } => print_report(&dir),
        Command::Predict(args) => predict::run(&args),
        Command::Calibrate(args) => calibrate::run(&args),
        Command::CalibrateComm => calibrate::comm_rank(),
        Command::CalibratePages => calibrate::pages_process(),
        Command::Launch { ranks, program, args } => mpi_launch(ranks, program, &args),
        Command::BenchA2a { ranks, backend, mib, runs, device, layout } => {
            bench_a2a::run(backend, device, layout, ranks, &mib, runs)
        }
        Command::RunPoint { dir, point, base, from } => run_point(&dir, point, &base, from.as_deref()),
    }
}
