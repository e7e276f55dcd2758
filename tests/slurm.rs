//! Experiments as Slurm jobs, for real: a small CPU experiment (`backend = "mpi"`, ranks as
//! processes started by srun inside the allocation) is submitted, followed, collected and
//! reported; a job cancelled mid-run keeps its finished steps, and resubmitting it with resume
//! finishes it. Needs a Slurm cluster: `scripts/slurm.sh start` makes a single-node one on this
//! machine, and `scripts/test.sh` starts it and runs these with `--ignored`.
#![cfg(feature = "mpi")]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use ulysses::experiment::slurm::{cancel, follow, queue_state, submit, SubmittedJob};
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
