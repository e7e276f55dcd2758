//! `ulysses submit` and `ulysses follow`: experiments as Slurm jobs (`ulysses::experiment::slurm`).

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Result};
use ulysses::experiment::slurm::{self, SubmittedJob};
use ulysses::experiment::{Backend, ExperimentConfig, SlurmSpec};

#[derive(clap::Args)]
pub struct SubmitArgs {
    /// The experiment's TOML file.
    config: PathBuf,
    /// Nodes (default: as few as hold the largest point).
    #[arg(long)]
    nodes: Option<usize>,
    /// GPUs per node (default 8 with backend nccl, none otherwise).
    #[arg(long)]
    gpus_per_node: Option<usize>,
    /// Ranks per node (default: one per GPU with NCCL).
    #[arg(long)]
    tasks_per_node: Option<usize>,
    /// CPUs per rank.
    #[arg(long)]
    cpus_per_task: Option<usize>,
    /// Time limit, e.g. 04:00:00.
    #[arg(long)]
    time: Option<String>,
    /// Partition.
    #[arg(long)]
    partition: Option<String>,
    /// Account to charge.
    #[arg(long)]
    account: Option<String>,
    /// Let ranks outnumber CPUs (CPU ranks on a small node).
    #[arg(long)]
    overcommit: bool,
    /// A shell line the job runs before ulysses (repeatable), e.g. "module load cuda".
    #[arg(long)]
    setup: Vec<String>,
    /// Another sbatch option (repeatable), e.g. --sbatch=--qos=high.
    #[arg(long)]
    sbatch: Vec<String>,
    /// Continue the run in the results folder (a cancelled or timed-out job's).
    #[arg(long)]
    resume: bool,
    /// Print the sbatch script and submit nothing.
    #[arg(long)]
    dry_run: bool,
    /// Submit and return; follow later with `ulysses follow`.
    #[arg(long)]
    no_follow: bool,
}

/// A config that starts processes needs this binary built with their features: the ranks are
/// its processes (`ulysses run-point`).
pub fn check_build(cfg: &ExperimentConfig, config: &Path) -> Result<()> {
    let (needs, has) = match cfg.parallel.backend {
        Backend::Local => return Ok(()),
        Backend::Mpi => ("mpi", cfg!(feature = "mpi")),
        Backend::Nccl => ("mpi,nccl", cfg!(all(feature = "mpi", feature = "nccl"))),
    };
    if !has {
        bail!(
            "{} asks for backend = {:?}, but this ulysses was built without the `{needs}` features: \
             cargo build --release --features {needs}",
            config.display(),
            format!("{:?}", cfg.parallel.backend).to_lowercase()
        );
    }
    Ok(())
}

pub fn run(a: &SubmitArgs) -> Result<()> {
    let cfg = ExperimentConfig::load(&a.config)?;
    check_build(&cfg, &a.config)?;
    let options = SlurmSpec {
        nodes: a.nodes,
        gpus_per_node: a.gpus_per_node,
        tasks_per_node: a.tasks_per_node,
        cpus_per_task: a.cpus_per_task,
        time: a.time.clone(),
        partition: a.partition.clone(),
        account: a.account.clone(),
        overcommit: a.overcommit,
        setup: a.setup.clone(),
        sbatch: a.sbatch.clone(),
    };
    let spec = cfg.slurm.clone().unwrap_or_default().overridden_by(&options);
    let program = std::env::current_exe()?;
    let base = std::env::current_dir()?;
    if a.dry_run {
        let dir = base.join(cfg.output_dir());
        let paths = slurm::JobPaths { program, base, config: dir.join("slurm/config.toml"), dir };
        print!("{}", slurm::sbatch_script(&cfg, &spec, &paths, a.resume)?);
        return Ok(());
    }
    let job = slurm::submit(&cfg, &spec, &program, &base, a.resume)?;
    println!("submitted job {} ({}); results in {}", job.id, job.script.display(), job.paths.dir.display());
    if a.no_follow {
        println!("follow it with: ulysses follow {} {}", job.id, job.paths.dir.display());
        return Ok(());
    }
    finish(&job, &a.config)
}

pub fn follow(id: &str, dir: &Path) -> Result<()> {
    let dir = std::fs::canonicalize(dir)?;
    let job = SubmittedJob {
        id: id.to_string(),
        paths: slurm::JobPaths {
            program: PathBuf::new(),
            base: PathBuf::new(),
            config: dir.join("slurm/config.toml"),
            dir: dir.clone(),
        },
        script: PathBuf::new(),
        log: dir.join("slurm").join(format!("{id}.out")),
    };
    finish(&job, &dir.join("slurm/config.toml"))
}

fn finish(job: &SubmittedJob, config: &Path) -> Result<()> {
    let outcome = slurm::follow(job, Duration::from_secs(1), &mut |line| println!("{line}"))?;
    if outcome.state != "COMPLETED" {
        bail!(
            "job {} ended {} (exit code {}); its finished steps are kept in {}: continue with \
             ulysses submit {} --resume",
            job.id,
            outcome.state,
            outcome.exit_code,
            job.paths.dir.display(),
            config.display()
        );
    }
    Ok(())
}
