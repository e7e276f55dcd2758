//! A submitted job: `sbatch`, its record in the results folder (`slurm/job.toml`), one look at
//! its state (`scontrol`, then `sacct` once Slurm has forgotten it), following it (its state on
//! a backing-off schedule, its output file as it grows), collecting its results, and `scancel`.

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use polars::prelude::DataFrame;
use serde::{Deserialize, Serialize};

use super::{allocation_on, query_node_shapes, sbatch_script_for, JobPaths, SlurmSpec};
use crate::experiment::{read_table, report, ExperimentConfig, Report};
use crate::{Error, Result};

/// The file in a results folder that names its latest job.
const RECORD: &str = "slurm/job.toml";

/// A submitted job. [`submit`] writes it to `<results>/slurm/job.toml`; [`SubmittedJob::load`]
/// reads it back in another process (a later notebook cell, a restarted kernel, `ulysses
/// follow <results>`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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

fn io(path: &Path, e: impl std::fmt::Display) -> Error {
    slurm_error(format!("{}: {e}", path.display()))
}

/// Why a Slurm command gave no answer: it could not start (no Slurm here: asking again will
/// not help) or it failed (the controller may be busy: asking again may).
enum Failure {
    Missing(Error),
    Failed(Error),
}

impl From<Failure> for Error {
    fn from(f: Failure) -> Error {
        match f {
            Failure::Missing(e) | Failure::Failed(e) => e,
        }
    }
}

/// Runs a Slurm command and returns its stdout, or why not, with its stderr.
fn run_slurm(program: &str, args: &[&str]) -> std::result::Result<String, Failure> {
    let out = Command::new(program).args(args).output().map_err(|e| {
        Failure::Missing(slurm_error(format!("cannot run {program} ({e}): is this a Slurm login node?")))
    })?;
    if !out.status.success() {
        return Err(Failure::Failed(slurm_error(format!(
            "{program} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn slurm(program: &str, args: &[&str]) -> Result<String> {
    Ok(run_slurm(program, args)?)
}

/// Writes the script for `cfg` into its results folder (a fresh one, or with `resume` the run
/// to continue), submits it with `sbatch` and records the job in `slurm/job.toml`; returns at
/// once (see [`SubmittedJob::status`], [`follow`]). `program` is the `ulysses` binary the job
/// runs; `base` is where relative paths start. Asks `sinfo` for the partition's nodes (the
/// CPUs per rank default from them) and checks `spec.mpi` against this machine's
/// `srun --mpi=list` when it runs (the job chooses again where it runs).
pub fn submit(
    cfg: &ExperimentConfig,
    spec: &SlurmSpec,
    program: &Path,
    base: &Path,
    resume: bool,
) -> Result<SubmittedJob> {
    cfg.validate()?;
    // Each point against the cost model's memory for the named hardware, before anything is
    // queued (the job's own `ulysses run` checks again).
    cfg.check_memory()?;
    cfg.dataset.open(base)?;
    if let (Some(mpi), Ok(listing)) = (&spec.mpi, super::srun_mpi_listing()) {
        super::choose_srun_mpi(&listing, Some(mpi))?;
    }
    let alloc = allocation_on(cfg, spec, &query_node_shapes(spec.partition.as_deref()))?;
    let asked = base.join(cfg.output_dir());
    let dir = if resume { asked } else { crate::experiment::run::free_dir(&asked) };
    let slurm_dir = dir.join("slurm");
    std::fs::create_dir_all(&slurm_dir).map_err(|e| io(&slurm_dir, e))?;
    let config = slurm_dir.join("config.toml");
    std::fs::write(&config, cfg.to_toml()?).map_err(|e| io(&config, e))?;
    // Absolute, as the other paths: the job runs from `base`, where a path relative to the
    // caller's folder (a notebook's `..`) would point elsewhere.
    let config = std::fs::canonicalize(&config).map_err(|e| io(&config, e))?;
    let program = std::fs::canonicalize(program).map_err(|e| io(program, e))?;
    let base = std::fs::canonicalize(base).map_err(|e| io(base, e))?;
    let paths =
        JobPaths { program, base, dir: std::fs::canonicalize(&dir).map_err(|e| io(&dir, e))?, config };
    let text = sbatch_script_for(cfg, spec, &alloc, &paths, resume)?;
    let n = (1..).find(|i| !slurm_dir.join(format!("submit-{i}.sbatch")).exists()).unwrap_or(1);
    let script = slurm_dir.join(format!("submit-{n}.sbatch"));
    std::fs::write(&script, text).map_err(|e| io(&script, e))?;
    let out = slurm("sbatch", &["--parsable", &script.display().to_string()])?;
    let id = out.split(';').next().unwrap_or("").trim().to_string();
    if id.is_empty() || !id.chars().all(|c| c.is_ascii_digit()) {
        return Err(slurm_error(format!("sbatch answered {out:?}, not a job id")));
    }
    let log = paths.dir.join("slurm").join(format!("{id}.out"));
    let job = SubmittedJob { id, paths, script, log };
    job.save()?;
    Ok(job)
}

impl SubmittedJob {
    /// The job `id` writing into the results folder `dir` (for a job submitted before
    /// `slurm/job.toml` existed): its output is `dir/slurm/<id>.out`.
    pub fn at(id: &str, dir: &Path) -> Result<SubmittedJob> {
        let dir = std::fs::canonicalize(dir).map_err(|e| io(dir, e))?;
        Ok(SubmittedJob {
            id: id.to_string(),
            paths: JobPaths {
                program: PathBuf::new(),
                base: PathBuf::new(),
                config: dir.join("slurm/config.toml"),
                dir: dir.clone(),
            },
            script: PathBuf::new(),
            log: dir.join("slurm").join(format!("{id}.out")),
        })
    }

    /// Writes this job to `slurm/job.toml` in its results folder (replacing an earlier job's:
    /// the folder's latest job is the one to follow).
    pub fn save(&self) -> Result<()> {
        let path = self.paths.dir.join(RECORD);
        let text = toml::to_string(self).map_err(|e| io(&path, e))?;
        std::fs::write(&path, text).map_err(|e| io(&path, e))
    }

    /// The latest job submitted into the results folder `dir` (its `slurm/job.toml`). The
    /// folder's own files (output, config, script) are found in `dir` even when it was moved
    /// after submitting.
    pub fn load(dir: &Path) -> Result<SubmittedJob> {
        let path = dir.join(RECORD);
        let text = std::fs::read_to_string(&path).map_err(|e| {
            io(
                &path,
                format!(
                    "{e}: not a folder `ulysses submit` wrote (or one from before job.toml): give the job \
                     id too (ulysses follow <job id> {})",
                    dir.display()
                ),
            )
        })?;
        let job: SubmittedJob = toml::from_str(&text).map_err(|e| io(&path, e))?;
        let dir = std::fs::canonicalize(dir).map_err(|e| io(dir, e))?;
        let script = job.script.file_name().map_or_else(PathBuf::new, |f| dir.join("slurm").join(f));
        Ok(SubmittedJob {
            log: dir.join("slurm").join(format!("{}.out", job.id)),
            script,
            paths: JobPaths { config: dir.join("slurm/config.toml"), dir, ..job.paths },
            id: job.id,
        })
    }

    /// One look at the job, without waiting: queued, running, or done and how
    /// ([`JobStatus`]). Asks `scontrol`, then `sacct` once Slurm has forgotten the job (after
    /// `MinJobAge`, 5 minutes by default); "UNKNOWN" when neither knows it.
    pub fn status(&self) -> Result<JobStatus> {
        Ok(look(&self.id)?)
    }

    /// Follows the job until it ends, its state and output lines to `say` ([`follow`] with
    /// the default [`Polling`]).
    pub fn follow(&self, say: &mut dyn FnMut(&str)) -> Result<JobOutcome> {
        follow(self, Polling::default(), say)
    }

    /// The results of a job that is done: its outcome, the `points` table (one row per
    /// finished point), how many points the config has, and the report (`ulysses report`'s
    /// summary table and plots, written into the folder). Refused while the job is queued or
    /// running, and when it finished no point (with the end of its output).
    pub fn collect(&self) -> Result<Collected> {
        let outcome = match self.status()? {
            JobStatus::Done(outcome) => outcome,
            other => {
                return Err(Error::InvalidArgument {
                    op: "collect",
                    group: format!("job {}", self.id),
                    msg: format!("the job is {other}: collect it once it is done (status(), follow())"),
                })
            }
        };
        let dir = &self.paths.dir;
        let points = read_table(dir, "points").map_err(|e| {
            slurm_error(format!(
                "job {} ended {} (exit code {}) with no finished point in {} ({e}); the end of its output \
                 ({}):\n{}",
                self.id,
                outcome.state,
                outcome.exit_code,
                dir.display(),
                self.log.display(),
                self.log_tail(12)
            ))
        })?;
        let expected = ExperimentConfig::load(&self.paths.config)
            .and_then(|c| c.points())
            .map_or(points.height(), |p| p.len());
        let report = report(dir)?;
        Ok(Collected { outcome, points, expected_points: expected, report })
    }

    /// The last `n` lines of the job's output ("" when it has none yet), a Rust backtrace at
    /// its end (`RUST_BACKTRACE` set) left out: the error before it is what tells.
    pub fn log_tail(&self, n: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let mut end = lines.iter().rposition(|l| l.trim() == "Stack backtrace:").unwrap_or(lines.len());
        while end > 0 && lines[end - 1].trim().is_empty() {
            end -= 1;
        }
        lines[end.saturating_sub(n)..end].join("\n")
    }
}

/// What [`SubmittedJob::collect`] gives.
pub struct Collected {
    pub outcome: JobOutcome,
    /// One row per finished point (the run's `points` table).
    pub points: DataFrame,
    /// The points of the config: more than `points.height()` when the job stopped early
    /// (cancelled, timed out: `ulysses submit <config> --resume` continues it).
    pub expected_points: usize,
    /// `ulysses report`'s summary and plots.
    pub report: Report,
}

/// Where a job stands, from one look.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobStatus {
    /// Waiting for its nodes (PENDING, CONFIGURING, REQUEUED, ...), with Slurm's reason
    /// (Priority, Resources, ...).
    Queued { state: String, reason: String },
    /// Running (RUNNING, COMPLETING, SUSPENDED, ...).
    Running { state: String },
    /// Ended: how.
    Done(JobOutcome),
}

impl JobStatus {
    /// Whether the job has ended.
    pub fn is_done(&self) -> bool {
        matches!(self, JobStatus::Done(_))
    }

    /// Slurm's state (PENDING, RUNNING, COMPLETED, ...).
    pub fn state(&self) -> &str {
        match self {
            JobStatus::Queued { state, .. } | JobStatus::Running { state } => state,
            JobStatus::Done(o) => &o.state,
        }
    }

    /// The status of Slurm's state `state` (with its `reason` and `exit_code`, as `scontrol`
    /// and `sacct` write them).
    pub fn of_state(state: &str, reason: &str, exit_code: &str) -> JobStatus {
        // "CANCELLED by 1000" (sacct), "COMPLETING+" style suffixes.
        let state = state.split_whitespace().next().unwrap_or("UNKNOWN").trim_end_matches('+').to_string();
        const QUEUED: [&str; 7] = [
            "PENDING",
            "CONFIGURING",
            "REQUEUED",
            "REQUEUE_FED",
            "REQUEUE_HOLD",
            "RESV_DEL_HOLD",
            "SPECIAL_EXIT",
        ];
        const ENDED: [&str; 11] = [
            "BOOT_FAIL",
            "CANCELLED",
            "COMPLETED",
            "DEADLINE",
            "FAILED",
            "NODE_FAIL",
            "OUT_OF_MEMORY",
            "PREEMPTED",
            "TIMEOUT",
            "REVOKED",
            "UNKNOWN",
        ];
        if QUEUED.contains(&state.as_str()) {
            JobStatus::Queued { state, reason: reason.to_string() }
        } else if ENDED.contains(&state.as_str()) {
            JobStatus::Done(JobOutcome { state, exit_code: exit_code.to_string() })
        } else {
            JobStatus::Running { state }
        }
    }

    /// The status in the text of `scontrol show job <id> -o` (its first line, for an array or
    /// heterogeneous job's first part); `None` when it names no state.
    pub fn from_scontrol(text: &str) -> Option<JobStatus> {
        let line = text.lines().next()?;
        let field = |name: &str| {
            line.split_whitespace().find_map(|kv| kv.strip_prefix(name).and_then(|v| v.strip_prefix('=')))
        };
        Some(JobStatus::of_state(
            field("JobState")?,
            field("Reason").unwrap_or("None"),
            field("ExitCode").unwrap_or("?"),
        ))
    }

    /// The status in the text of `sacct -j <id> -X -n -P -o State,ExitCode`; `None` when it
    /// has no line.
    pub fn from_sacct(text: &str) -> Option<JobStatus> {
        let (state, exit) = text.lines().find(|l| !l.trim().is_empty())?.split_once('|')?;
        Some(JobStatus::of_state(state, "None", exit.trim()))
    }
}

impl std::fmt::Display for JobStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            JobStatus::Queued { state, reason } if reason != "None" => write!(f, "{state} ({reason})"),
            JobStatus::Queued { state, .. } | JobStatus::Running { state } => write!(f, "{state}"),
            JobStatus::Done(o) => write!(f, "{} (exit code {})", o.state, o.exit_code),
        }
    }
}

/// One look at job `id`: `scontrol`, else `sacct`, else UNKNOWN.
fn look(id: &str) -> std::result::Result<JobStatus, Failure> {
    match run_slurm("scontrol", &["show", "job", id, "-o"]) {
        Ok(text) => {
            if let Some(status) = JobStatus::from_scontrol(&text) {
                return Ok(status);
            }
        }
        // Slurm no longer holds the job; any other failure is the controller's.
        Err(Failure::Failed(e)) if !e.to_string().contains("Invalid job id") => {
            return Err(Failure::Failed(e))
        }
        Err(Failure::Missing(e)) => return Err(Failure::Missing(e)),
        Err(Failure::Failed(_)) => {}
    }
    let sacct = run_slurm("sacct", &["-j", id, "-X", "-n", "-P", "-o", "State,ExitCode"]).unwrap_or_default();
    Ok(JobStatus::from_sacct(&sacct)
        .unwrap_or_else(|| JobStatus::Done(JobOutcome { state: "UNKNOWN".into(), exit_code: "?".into() })))
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

/// A finished job's state and exit code (`scontrol`, else `sacct`), "UNKNOWN" when Slurm does
/// not know it (or the job has not ended).
pub fn final_state(id: &str) -> JobOutcome {
    match look(id) {
        Ok(JobStatus::Done(outcome)) => outcome,
        Ok(other) => JobOutcome { state: other.state().to_string(), exit_code: "?".into() },
        Err(_) => JobOutcome { state: "UNKNOWN".into(), exit_code: "?".into() },
    }
}

/// Cancels a job (`scancel`).
pub fn cancel(id: &str) -> Result<()> {
    slurm("scancel", &[id]).map(|_| ())
}

/// How often [`follow`] asks Slurm about a job, and reads its output: politely, as a job may
/// wait in the queue for hours and every question is work for the cluster's one controller.
/// The first question comes at once; then the waits grow by half (`first`, 1.5 x `first`, ...,
/// up to `max`) while the state stays the same, and start again at `first` when it changes.
/// The output file is read every `tail` (a file read, no work for Slurm).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Polling {
    pub first: Duration,
    pub max: Duration,
    pub tail: Duration,
}

impl Default for Polling {
    /// 2 s, growing to 30 s; the output every second.
    fn default() -> Polling {
        Polling { first: Duration::from_secs(2), max: Duration::from_secs(30), tail: Duration::from_secs(1) }
    }
}

impl From<Duration> for Polling {
    /// A first wait of `first` (the output read as often, up to every second), growing to 30 s.
    fn from(first: Duration) -> Polling {
        Polling { first, max: first.max(Duration::from_secs(30)), tail: first.min(Duration::from_secs(1)) }
    }
}

impl Polling {
    /// The wait before the next question after `unchanged` answers in a row that brought no
    /// change: `first` x 1.5^unchanged, at most `max` (and at least 100 ms).
    pub fn delay(&self, unchanged: u32) -> Duration {
        let first = self.first.max(Duration::from_millis(100));
        first.mul_f64(1.5f64.powi(unchanged.min(64) as i32)).min(self.max.max(first))
    }
}

/// The schedule of a [`Polling`] as it runs: after each answer, the wait before the next.
#[derive(Debug, Clone)]
pub struct Backoff {
    polling: Polling,
    unchanged: Option<u32>,
}

impl Backoff {
    pub fn new(polling: Polling) -> Backoff {
        Backoff { polling, unchanged: None }
    }

    /// The wait after an answer, `changed` when it differs from the one before (the first
    /// answer counts as a change).
    pub fn after(&mut self, changed: bool) -> Duration {
        let n = match self.unchanged {
            Some(n) if !changed => n + 1,
            _ => 0,
        };
        self.unchanged = Some(n);
        self.polling.delay(n)
    }
}

/// Reads the lines of a growing file from where it stopped.
struct Tail {
    path: PathBuf,
    read: u64,
}

impl Tail {
    /// The whole lines added since the last call (with `all`, also an unfinished last one).
    fn lines(&mut self, all: bool) -> Vec<String> {
        let Ok(mut file) = std::fs::File::open(&self.path) else { return Vec::new() };
        let len = file.metadata().map_or(0, |m| m.len());
        if len < self.read {
            self.read = 0; // the file was replaced
        }
        let mut bytes = Vec::new();
        if file.seek(SeekFrom::Start(self.read)).is_err() || file.read_to_end(&mut bytes).is_err() {
            return Vec::new();
        }
        let end =
            if all { bytes.len() } else { bytes.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1) };
        self.read += end as u64;
        String::from_utf8_lossy(&bytes[..end]).lines().map(str::to_string).collect()
    }
}

/// Answers in a row that Slurm may fail (a busy controller) before [`follow`] gives up.
const SLURM_TRIES: u32 = 5;

/// Follows a job until it ends: its state as Slurm answers and every new line of its output go
/// to `say` as they come. Asks Slurm on `poll`'s backing-off schedule (a [`Polling`], or a
/// `Duration`: the first wait), and at once when output appears from a job last seen queued;
/// reads the output every `poll.tail`. A state shorter than the wait may go unseen. A failing
/// Slurm command is asked again, up to 5 times in a row. Returns how the job ended.
pub fn follow(job: &SubmittedJob, poll: impl Into<Polling>, say: &mut dyn FnMut(&str)) -> Result<JobOutcome> {
    let polling = poll.into();
    let started = Instant::now();
    let mut backoff = Backoff::new(polling);
    let mut tail = Tail { path: job.log.clone(), read: 0 };
    let mut last: Option<JobStatus> = None;
    let mut failures = 0u32;
    let mut next_look = Instant::now();
    let outcome = loop {
        let lines = tail.lines(false);
        // Output from a job last seen queued: it runs now; look at once rather than after the
        // queue's long wait.
        if !lines.is_empty() && matches!(last, Some(JobStatus::Queued { .. })) {
            next_look = Instant::now();
        }
        for line in lines {
            say(&line);
        }
        if Instant::now() >= next_look {
            match look(&job.id) {
                Ok(JobStatus::Done(outcome)) => break outcome,
                Ok(status) => {
                    failures = 0;
                    let changed = last.as_ref() != Some(&status);
                    if changed {
                        say(&format!("job {}: {status} ({:.0} s)", job.id, started.elapsed().as_secs_f64()));
                    }
                    last = Some(status);
                    next_look = Instant::now() + backoff.after(changed);
                }
                Err(Failure::Failed(e)) if failures + 1 < SLURM_TRIES => {
                    failures += 1;
                    let wait = backoff.after(false);
                    say(&format!(
                        "job {}: Slurm did not answer ({e}); asking again in {:.0} s",
                        job.id,
                        wait.as_secs_f64()
                    ));
                    next_look = Instant::now() + wait;
                }
                Err(f) => return Err(f.into()),
            }
        }
        let tail_every = polling.tail.max(Duration::from_millis(50));
        std::thread::sleep(tail_every.min(next_look.saturating_duration_since(Instant::now())));
    };
    for line in tail.lines(true) {
        say(&line);
    }
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
