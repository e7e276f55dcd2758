//! A point's ranks, started: as threads of this process, or as processes under mpirun or srun
//! whose reports come back as JSON lines on stdout. Either way every report reaches the writer
//! (`run_point`, in `run.rs`) as an `Event` on its channel.

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

use tch::Device;

use super::config::{ExperimentConfig, Point};
use super::launch::LaunchPlan;
use super::rank::{rank_main, RankSpec};
use super::rows::{Line, Reassembler};
use super::run::{no_program, writer_gone, Event, Report, RunOptions};
use crate::comm::{LauncherEnv, LocalLaunch};
use crate::data::Dataset;
use crate::model::GptConfig;
use crate::{Error, Result};

/// The point's ranks as threads of this process.
pub(super) fn local_ranks(
    cfg: &ExperimentConfig,
    point: &Point,
    gpt: &GptConfig,
    dataset: &dyn Dataset,
    (dir, start): (&Path, Option<PathBuf>),
    tx: &mpsc::Sender<Event>,
) -> Result<()> {
    let device = if cfg.parallel.device == "cuda" { Device::Cuda(0) } else { Device::Cpu };
    let spec = RankSpec::new(cfg, point, gpt, dataset, point.ranks, device)?.checkpoints(dir, start);
    let send = |r: Report| tx.send(Event::Report(Box::new(r))).map_err(|_| writer_gone());
    LocalLaunch::new(point.ranks)
        .timeout(Duration::from_secs(cfg.parallel.timeout_s))
        .threads_per_rank(cfg.parallel.threads_per_rank)
        .run(|ctx| rank_main(ctx, &spec, &send))?;
    Ok(())
}

/// The point's ranks as processes (one per GPU with NCCL): `mpirun` or `srun` of
/// `ulysses run-point` (see [`LaunchPlan`]), whose reports come back as JSON lines on stdout.
pub(super) fn process_ranks(
    cfg: &ExperimentConfig,
    point: &Point,
    dir: &Path,
    opts: &RunOptions,
    start: Option<PathBuf>,
    tx: &mpsc::Sender<Event>,
) -> Result<()> {
    use std::io::{BufRead, BufReader, Read};
    let program = opts.program.clone().ok_or_else(no_program)?;
    let args: Vec<String> = ["run-point", "--dir"]
        .iter()
        .map(|a| a.to_string())
        .chain([dir.display().to_string(), "--point".into(), point.index.to_string()])
        .chain(["--base".into(), opts.base_dir.display().to_string()])
        .chain(start.into_iter().flat_map(|s| ["--from".to_string(), s.display().to_string()]))
        .collect();
    let p = &cfg.parallel;
    let env = LauncherEnv::from_process();
    let plan = LaunchPlan::new(point.ranks, p.launcher, p.ranks_per_node, p.hostfile.as_deref(), &env)?;
    let launcher = format!("{:?}", plan.launcher).to_lowercase();
    let mut child = plan
        .command(&program, &args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| Error::Backend { backend: "mpi", msg: format!("cannot start {launcher}: {e}") })?;
    let mut stderr = child.stderr.take();
    let errors = std::thread::spawn(move || {
        let mut text = String::new();
        if let Some(e) = stderr.as_mut() {
            let _ = e.read_to_string(&mut text);
        }
        text
    });
    let mut reports = Reassembler::default();
    for line in child.stdout.take().into_iter().flat_map(|s| BufReader::new(s).lines().map_while(|l| l.ok()))
    {
        let (rank, body) = plan.untag(&line);
        let event = match reports.push(rank, &body) {
            Line::Report(json) => {
                Event::Report(Box::new(serde_json::from_str(&json).map_err(|e| Error::Backend {
                    backend: "mpi",
                    msg: format!("a rank sent an unreadable report ({e}): {json}"),
                })?))
            }
            Line::Piece => continue,
            Line::Text => Event::Line(body),
        };
        tx.send(event).map_err(|_| writer_gone())?;
    }
    let status = child.wait().map_err(|e| Error::Backend { backend: "mpi", msg: e.to_string() })?;
    let errors = errors.join().unwrap_or_default();
    if !status.success() {
        let tail: Vec<&str> = errors.lines().filter(|l| !l.trim().is_empty()).rev().take(12).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        return Err(Error::Backend {
            backend: "mpi",
            msg: format!("{launcher} ended with {status}:\n{}", tail.join("\n")),
        });
    }
    Ok(())
}
