//! A submitted job: `sbatch`, then following it (`squeue`, its output file, `scontrol`), and
//! `scancel`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use super::{sbatch_script, JobPaths, SlurmSpec};
use crate::experiment::ExperimentConfig;
use crate::{Error, Result};

/// A submitted job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubmittedJob {
    pub id: String,
    pub paths: JobPaths,
    pub script: PathBuf,
    /// The job's output (the driver's progress lines and every rank's).
    pub log: PathBuf,
}

fn slurm_error(msg: String) -> Error {
    Error::Backend { backend: "slurm", msg }
}

fn io(path: &Path, e: std::io::Error) -> Error {
    slurm_error(format!("{}: {e}", path.display()))
}

/// Runs a Slurm command and returns its stdout, or an error with its stderr.
fn slurm(program: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(|e| slurm_error(format!("cannot run {program} ({e}): is this a Slurm login node?")))?;
    if !out.status.success() {
        return Err(slurm_error(format!(
            "{program} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Writes the script for `cfg` into its results folder (a fresh one, or with `resume` the run
/// to continue) and submits it with `sbatch`. `program` is the `ulysses` binary the job runs;
/// `base` is where relative paths start.
pub fn submit(
    cfg: &ExperimentConfig,
    spec: &SlurmSpec,
    program: &Path,
    base: &Path,
    resume: bool,
) -> Result<SubmittedJob> {
    cfg.validate()?;
    cfg.dataset.open(base)?;
    let asked = base.join(cfg.output_dir());
    let dir = if resume { asked } else { crate::experiment::run::free_dir(&asked) };
    let slurm_dir = dir.join("slurm");
    std::fs::create_dir_all(&slurm_dir).map_err(|e| io(&slurm_dir, e))?;
    let config = slurm_dir.join("config.toml");
    std::fs::write(&config, cfg.to_toml()?).map_err(|e| io(&config, e))?;
    let program = std::fs::canonicalize(program).map_err(|e| io(program, e))?;
    let base = std::fs::canonicalize(base).map_err(|e| io(base, e))?;
    let paths =
        JobPaths { program, base, dir: std::fs::canonicalize(&dir).map_err(|e| io(&dir, e))?, config };
    let text = sbatch_script(cfg, spec, &paths, resume)?;
    let n = (1..).find(|i| !slurm_dir.join(format!("submit-{i}.sbatch")).exists()).unwrap_or(1);
    let script = slurm_dir.join(format!("submit-{n}.sbatch"));
    std::fs::write(&script, text).map_err(|e| io(&script, e))?;
    let out = slurm("sbatch", &["--parsable", &script.display().to_string()])?;
    let id = out.split(';').next().unwrap_or("").trim().to_string();
    if id.is_empty() || !id.chars().all(|c| c.is_ascii_digit()) {
        return Err(slurm_error(format!("sbatch answered {out:?}, not a job id")));
    }
    let log = paths.dir.join("slurm").join(format!("{id}.out"));
    Ok(SubmittedJob { id, paths, script, log })
}

/// The job's state while Slurm queues or runs it ("PENDING", "RUNNING", ...); `None` once it
/// has left the queue.
pub fn queue_state(id: &str) -> Result<Option<String>> {
    let out = Command::new("squeue")
        .args(["-j", id, "-h", "-o", "%T"])
        .output()
        .map_err(|e| slurm_error(format!("squeue: {e}")))?;
    let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
    // squeue refuses an id it no longer knows: the job has left the queue.
    Ok((out.status.success() && !text.is_empty()).then_some(text))
}

/// How a job ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobOutcome {
    /// Slurm's final state: COMPLETED, FAILED, CANCELLED, TIMEOUT, ... ("UNKNOWN" when Slurm
    /// no longer remembers the job).
    pub state: String,
    /// "exit code:signal", as Slurm reports it.
    pub exit_code: String,
}

/// A finished job's state and exit code from `scontrol show job`.
pub fn final_state(id: &str) -> JobOutcome {
    let text = slurm("scontrol", &["show", "job", id, "-o"]).unwrap_or_default();
    let field = |name: &str| {
        text.split_whitespace()
            .find_map(|kv| kv.strip_prefix(name).and_then(|v| v.strip_prefix('=')))
            .map(str::to_string)
    };
    JobOutcome {
        state: field("JobState").unwrap_or_else(|| "UNKNOWN".into()),
        exit_code: field("ExitCode").unwrap_or_else(|| "?".into()),
    }
}

/// Cancels a job (`scancel`).
pub fn cancel(id: &str) -> Result<()> {
    slurm("scancel", &[id]).map(|_| ())
}

/// Follows a job until it leaves the queue: every state change and every new line of its
/// output go to `say`, as they come (polling every `poll`). Returns how it ended.
pub fn follow(job: &SubmittedJob, poll: Duration, say: &mut dyn FnMut(&str)) -> Result<JobOutcome> {
    let started = Instant::now();
    let mut last_state = String::new();
    let mut read = 0usize;
    let mut tail = |say: &mut dyn FnMut(&str), all: bool| {
        let text = std::fs::read(&job.log).unwrap_or_default();
        let end = if all { text.len() } else { text.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1) };
        if end > read {
            for line in String::from_utf8_lossy(&text[read..end]).lines() {
                say(line);
            }
            read = end;
        }
    };
    loop {
        let state = queue_state(&job.id)?;
        if let Some(s) = &state {
            if *s != last_state {
                say(&format!("job {}: {s} ({:.0} s)", job.id, started.elapsed().as_secs_f64()));
                last_state = s.clone();
            }
        }
        tail(say, false);
        if state.is_none() {
            break;
        }
        std::thread::sleep(poll);
    }
    tail(say, true);
    let outcome = final_state(&job.id);
    say(&format!(
        "job {}: {} (exit code {}) after {:.0} s; results in {}",
        job.id,
        outcome.state,
        outcome.exit_code,
        started.elapsed().as_secs_f64(),
        job.paths.dir.display()
    ));
    Ok(outcome)
}
