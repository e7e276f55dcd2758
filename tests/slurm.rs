//! Experiments as Slurm jobs, for real: a small CPU experiment (`backend = "mpi"`, ranks as
//! processes started by srun inside the allocation) is submitted, followed, collected and
//! reported; a job cancelled mid-run keeps its finished steps, and resubmitting it with resume
//! finishes it; a job submitted without following is found again from its folder alone, looked
//! at until done and collected; srun's MPI plugins as this Slurm lists them, the choice among
//! them, and a plugin asked for reaching srun inside the job. Needs a Slurm cluster: `scripts/slurm.sh start` makes a single-node one on this
//! machine, and `scripts/test.sh` starts it and runs these with `--ignored`.
#![cfg(feature = "mpi")]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use ulysses::experiment::slurm::{
    cancel, choose_srun_mpi, follow, queue_state, srun_mpi_listing, srun_mpi_plugins, submit, JobStatus,
    SubmittedJob,
};
use ulysses::experiment::{read_table, report, ExperimentConfig, SlurmSpec};

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ulysses-slurm-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("a scratch folder");
    dir
}

fn config(name: &str, seq: i64, steps: usize) -> Result<ExperimentConfig> {
    let text = format!(
        "name = \"{name}\"\n[model]\npreset = \"tiny\"\nn_layer = 1\n[parallel]\nranks = [2]\n\
         strategies = [\"ulysses\", \"ring\"]\nbackend = \"mpi\"\n[train]\nseq = [{seq}]\nsteps = {steps}\n\
         [slurm]\novercommit = true\ntime = \"00:10:00\"\n"
    );
    Ok(ExperimentConfig::parse(&text, name)?)
}

fn program() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_ulysses"))
}

/// Follows a job to its end, printing and keeping its lines.
fn follow_to_end(job: &SubmittedJob) -> Result<(String, Vec<String>)> {
    let mut lines = Vec::new();
    let outcome = follow(job, Duration::from_millis(200), &mut |l| {
        println!("[job {}] {l}", job.id);
        lines.push(l.to_string());
    })?;
    Ok((outcome.state, lines))
}

fn csv_rows(dir: &Path) -> usize {
    std::fs::read_to_string(dir.join("steps.csv")).map_or(0, |t| t.lines().count().saturating_sub(1))
}

#[test]
#[ignore = "needs a running Slurm cluster (scripts/slurm.sh start); scripts/test.sh starts one and runs it"]
fn an_mpi_experiment_runs_as_a_slurm_job_and_reports() -> Result<()> {
    let base = scratch("small");
    let cfg = config("slurm_small", 128, 2)?;
    let job = submit(&cfg, &cfg.slurm.clone().unwrap_or_default(), program(), &base, false)?;
    ensure!(job.paths.dir == std::fs::canonicalize(base.join("results/slurm_small"))?, "{:?}", job.paths);
    let script = std::fs::read_to_string(&job.script)?;
    ensure!(script.contains("#SBATCH --ntasks-per-node=2") && script.contains("--overcommit"), "{script}");
    let (state, lines) = follow_to_end(&job)?;
    ensure!(state == "COMPLETED", "job {} ended {state}:\n{}", job.id, lines.join("\n"));
    // The job's own output came through: the driver's progress and the points.
    ensure!(lines.iter().any(|l| l.contains("point 2/2 ring P=2 N=128")), "{lines:#?}");
    ensure!(lines.iter().any(|l| l.contains("RUNNING")), "no RUNNING state seen: {lines:#?}");
    // The folder holds what a local run writes: 3 steps x 2 ranks x 2 points, and reports.
    let dir = &job.paths.dir;
    let steps = read_table(dir, "steps")?;
    ensure!(steps.height() == 12, "{} step rows", steps.height());
    let measure = steps.column("memory")?.str()?.get(0).unwrap_or("").to_string();
    ensure!(measure == "host_rss_above_base", "memory measure {measure:?}");
    ensure!(read_table(dir, "points")?.height() == 2, "points");
    let r = report(dir)?;
    ensure!(r.summary.height() == 2 && r.summary.column("memory").is_ok(), "{}", r.summary);
    ensure!(dir.join("slurm").join(format!("{}.out", job.id)).is_file(), "the job's output is kept");
    let _ = std::fs::remove_dir_all(&base);
    Ok(())
}

#[test]
#[ignore = "needs a running Slurm cluster (scripts/slurm.sh start); scripts/test.sh starts one and runs it"]
fn a_cancelled_job_keeps_its_finished_steps_and_resumes() -> Result<()> {
    let base = scratch("cancel");
    let steps = 150usize;
    let per_point = (steps + 1) * 2; // warm-up + steps, 2 ranks
    let cfg = config("slurm_cancel", 1024, steps)?;
    let spec: SlurmSpec = cfg.slurm.clone().unwrap_or_default();
    let job = submit(&cfg, &spec, program(), &base, false)?;
    let dir = job.paths.dir.clone();
    // Cancel once the first point is finished and the second has written some steps.
    let start = Instant::now();
    while csv_rows(&dir) < per_point + 10 {
        ensure!(start.elapsed() < Duration::from_secs(300), "no progress in 300 s ({} rows)", csv_rows(&dir));
        if queue_state(&job.id)?.is_none() && csv_rows(&dir) < per_point + 10 {
            let out = std::fs::read_to_string(dir.join(format!("slurm/{}.out", job.id))).unwrap_or_default();
            anyhow::bail!(
                "job {} left the queue after {} step rows; its output:\n{out}",
                job.id,
                csv_rows(&dir)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    cancel(&job.id)?;
    let (state, lines) = follow_to_end(&job)?;
    ensure!(state == "CANCELLED", "job {} ended {state}:\n{}", job.id, lines.join("\n"));
    // Every finished step is kept: the CSV (appended per step) and the Parquet table (renamed
    // into place after the CSV, so at most the last step behind), whole steps only.
    let kept = read_table(&dir, "steps")?.height();
    let rows = csv_rows(&dir);
    ensure!(rows >= per_point + 10 && rows < 2 * per_point, "{rows} step rows kept of {}", 2 * per_point);
    ensure!(rows == kept || rows == kept + 2, "csv {rows} rows, parquet {kept}");
    ensure!(kept % 2 == 0, "a step with one rank's row");
    ensure!(read_table(&dir, "points")?.height() == 1, "the first point is finished");

    // Resubmitted with resume: the finished point is kept, the cancelled one runs again.
    let again = submit(&cfg, &spec, program(), &base, true).context("resubmit")?;
    ensure!(again.paths.dir == dir && again.id != job.id, "{again:?}");
    let (state, lines) = follow_to_end(&again)?;
    ensure!(state == "COMPLETED", "job {} ended {state}:\n{}", again.id, lines.join("\n"));
    ensure!(lines.iter().any(|l| l.contains("finished by the earlier run")), "{lines:#?}");
    ensure!(read_table(&dir, "points")?.height() == 2, "points after resume");
    ensure!(read_table(&dir, "steps")?.height() == 2 * per_point, "steps after resume");
    let _ = std::fs::remove_dir_all(&base);
    Ok(())
}

/// Looks at a job every second (as a notebook cell run again and again would) until it is
/// done; every status seen, in order.
fn look_until_done(job: &SubmittedJob) -> Result<Vec<JobStatus>> {
    let start = Instant::now();
    let mut seen: Vec<JobStatus> = Vec::new();
    loop {
        let now = job.status()?;
        if seen.last() != Some(&now) {
            println!("[job {}] {now} ({:.0} s)", job.id, start.elapsed().as_secs_f64());
            seen.push(now.clone());
        }
        if now.is_done() {
            return Ok(seen);
        }
        ensure!(start.elapsed() < Duration::from_secs(300), "job {} not done in 300 s: {seen:?}", job.id);
        std::thread::sleep(Duration::from_secs(1));
    }
}

#[test]
#[ignore = "needs a running Slurm cluster (scripts/slurm.sh start); scripts/test.sh starts one and runs it"]
fn srun_lists_its_mpi_plugins_and_pmix_is_chosen() -> Result<()> {
    let listing = srun_mpi_listing()?;
    println!("srun --mpi=list:\n{listing}");
    let plugins = srun_mpi_plugins(&listing);
    ensure!(plugins.iter().any(|p| p == "pmix") && plugins.iter().any(|p| p == "pmi2"), "{plugins:?}");
    ensure!(choose_srun_mpi(&listing, None)? == "pmix", "pmix first");
    ensure!(choose_srun_mpi(&listing, Some("pmi2"))? == "pmi2", "pmi2 when asked");
    let err = choose_srun_mpi(&listing, Some("pmix_v1")).expect_err("not listed").to_string();
    ensure!(err.contains(&plugins.join(", ")), "{err}");
    // Refused at submit, before any folder is made or job submitted.
    let base = scratch("badmpi");
    let cfg = config("slurm_badmpi", 128, 1)?;
    let spec = SlurmSpec { mpi: Some("pmix_v1".into()), ..cfg.slurm.clone().unwrap_or_default() };
    let err = submit(&cfg, &spec, program(), &base, false).expect_err("pmix_v1").to_string();
    ensure!(err.contains("slurm.mpi") && err.contains("\"pmix_v1\" is not one this Slurm has"), "{err}");
    ensure!(!base.join("results").exists(), "a refused submit made a folder");
    let _ = std::fs::remove_dir_all(&base);
    Ok(())
}

#[test]
#[ignore = "needs a running Slurm cluster (scripts/slurm.sh start); scripts/test.sh starts one and runs it"]
fn a_job_submitted_without_following_is_looked_at_later_and_collected() -> Result<()> {
    let base = scratch("later");
    let cfg = config("slurm_later", 128, 1)?;
    // The PMIx plugin by its versioned name, asked for: the script hands it to the driver,
    // whose srun starts the ranks with it.
    let plugins = srun_mpi_plugins(&srun_mpi_listing()?);
    let pmix = plugins.into_iter().find(|p| p.starts_with("pmix_v")).unwrap_or_else(|| "pmix".into());
    let spec = SlurmSpec { mpi: Some(pmix.clone()), ..cfg.slurm.clone().unwrap_or_default() };
    let started = Instant::now();
    let job = submit(&cfg, &spec, program(), &base, false)?;
    ensure!(started.elapsed() < Duration::from_secs(10), "submit returns at once");
    let script = std::fs::read_to_string(&job.script)?;
    for line in [
        format!("export ULYSSES_SRUN_MPI='{pmix}'\n"),
        "#SBATCH --cpus-per-task=1\n".into(),
        "export OMP_NUM_THREADS=1\n".into(),
    ] {
        ensure!(script.contains(&line), "{line:?} missing from:\n{script}");
    }
    // A later cell, or a restarted kernel: the job from its folder alone.
    let later = SubmittedJob::load(&job.paths.dir)?;
    ensure!(later == job, "{later:?} != {job:?}");
    let first = later.status()?;
    if !first.is_done() {
        let err = later.collect().err().map(|e| e.to_string()).unwrap_or_default();
        ensure!(err.contains("collect it once it is done"), "collect while {first}: {err:?}");
    }
    let seen = look_until_done(&later)?;
    ensure!(seen.last().map(JobStatus::to_string) == Some("COMPLETED (exit code 0:0)".into()), "{seen:?}");
    let c = later.collect()?;
    ensure!(c.outcome.state == "COMPLETED", "{}", c.outcome.state);
    ensure!(
        c.points.height() == 2 && c.expected_points == 2,
        "{} of {} points",
        c.points.height(),
        c.expected_points
    );
    ensure!(c.report.summary.height() == 2, "{}", c.report.summary);
    let _ = std::fs::remove_dir_all(&base);
    Ok(())
}

#[test]
#[ignore = "needs a running Slurm cluster (scripts/slurm.sh start); scripts/test.sh starts one and runs it"]
fn a_plugin_asked_for_reaches_srun_inside_the_job() -> Result<()> {
    // Debian's OpenMPI has PMIx only: ranks started with srun --mpi=pmi2 fail in MPI_Init. The
    // job failing so shows that the plugin asked for is the one srun used.
    let base = scratch("pmi2");
    let cfg = config("slurm_pmi2", 128, 1)?;
    let spec = SlurmSpec { mpi: Some("pmi2".into()), ..cfg.slurm.clone().unwrap_or_default() };
    let job = submit(&cfg, &spec, program(), &base, false)?;
    let seen = look_until_done(&job)?;
    let log = std::fs::read_to_string(&job.log).unwrap_or_default();
    ensure!(
        seen.last().is_some_and(|s| s.state() == "FAILED") && log.contains("MPI_Init"),
        "with pmi2 the job should fail in MPI_Init on an OpenMPI without PMI-2 (Debian's): {seen:?}\n{log}"
    );
    // Nothing to collect: said with the end of the job's output.
    let err = job.collect().err().map(|e| e.to_string()).unwrap_or_default();
    ensure!(
        err.contains("ended FAILED") && err.contains("no finished point") && err.contains("srun"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&base);
    Ok(())
}
