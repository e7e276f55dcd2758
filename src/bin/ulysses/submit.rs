//! `ulysses submit` and `ulysses follow`: experiments as Slurm jobs (`ulysses::experiment::slurm`).

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use ulysses::experiment::slurm::{self, JobStatus, SubmittedJob};
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
    /// CPUs per rank (default with NCCL: the node's CPUs over its GPUs when sinfo says, else 8;
    /// CPU ranks: parallel.threads_per_rank).
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
    /// srun's MPI plugin for the ranks (pmix, pmix_v4, pmi2, ...: the PMI the cluster's OpenMPI
    /// was built with). Default: chosen inside the job from `srun --mpi=list`, pmix, else pmi2.
    #[arg(long)]
    mpi: Option<String>,
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
    /// Check every point's predicted memory against this hardware (a preset or file) before
    /// submitting; sets the config's `[predict] hardware`, as `ulysses run --hardware`.
    #[arg(long)]
    hardware: Option<String>,
    /// Submit points the cost model predicts not to fit the hardware's memory (sets `[predict]
    /// force`, recorded in the job's config, so --resume needs it too).
    #[arg(long)]
    force: bool,
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
    let mut cfg = ExperimentConfig::load(&a.config)?;
    if a.hardware.is_some() || a.force {
        let spec = cfg.predict.get_or_insert_with(Default::default);
        spec.hardware = a.hardware.clone().or(spec.hardware.take());
        spec.force |= a.force;
    }
    // `submit` checks memory before it queues anything; this says what the check found.
    if let Some(check) = cfg.check_memory()? {
        println!("{check}");
    }
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
        mpi: a.mpi.clone(),
        setup: a.setup.clone(),
        sbatch: a.sbatch.clone(),
    };
    let spec = cfg.slurm.clone().unwrap_or_default().overridden_by(&options);
    let program = std::env::current_exe()?;
    let base = std::env::current_dir()?;
    if a.dry_run {
        let dir = base.join(cfg.output_dir());
        let paths = slurm::JobPaths { program, base, config: dir.join("slurm/config.toml"), dir };
        let nodes = slurm::query_node_shapes(spec.partition.as_deref());
        let alloc = slurm::allocation_on(&cfg, &spec, &nodes)?;
        print!("{}", slurm::sbatch_script_for(&cfg, &spec, &alloc, &paths, a.resume)?);
        return Ok(());
    }
    let job = slurm::submit(&cfg, &spec, &program, &base, a.resume)?;
    println!("submitted job {} ({}); results in {}", job.id, job.script.display(), job.paths.dir.display());
    if a.no_follow {
        println!(
            "look at it with: ulysses follow {0} --status; follow it with: ulysses follow {0}",
            job.paths.dir.display()
        );
        return Ok(());
    }
    finish(&job, &a.config)
}

/// `ulysses follow <dir>` (the folder's latest job, from its slurm/job.toml) or
/// `ulysses follow <job id> <dir>`: follows the job to its end, or with `status` looks once and
/// returns (printing the results once it is done).
pub fn follow(target: &str, dir: Option<&Path>, status: bool) -> Result<()> {
    let job = match dir {
        Some(dir) => SubmittedJob::at(target, dir)?,
        None => SubmittedJob::load(Path::new(target))?,
    };
    let config = job.paths.config.clone();
    if !status {
        return finish(&job, &config);
    }
    let now = job.status()?;
    println!("job {}: {now}; results in {}", job.id, job.paths.dir.display());
    let JobStatus::Done(outcome) = now else { return Ok(()) };
    // Every point finished counts as success where Slurm has forgotten the job (UNKNOWN).
    let all_finished = match job.collect() {
        Ok(c) => {
            let name =
                job.paths.dir.file_name().map_or_else(String::new, |n| n.to_string_lossy().into_owned());
            crate::screen::print(&name, &job.paths.dir, &c.points, Some(&c.report), None)?;
            if c.points.height() < c.expected_points {
                println!(
                    "{} of {} points finished: continue with ulysses submit {} --resume",
                    c.points.height(),
                    c.expected_points,
                    config.display()
                );
            }
            c.points.height() >= c.expected_points
        }
        Err(e) => {
            println!("{e}");
            false
        }
    };
    if outcome.state != "COMPLETED" && !(outcome.state == "UNKNOWN" && all_finished) {
        bail!("job {} ended {} (exit code {})", job.id, outcome.state, outcome.exit_code);
    }
    Ok(())
}

fn finish(job: &SubmittedJob, config: &Path) -> Result<()> {
    let outcome = job.follow(&mut |line| println!("{line}"))?;
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
