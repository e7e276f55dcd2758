//! Running an experiment: every sweep point as one launch of its ranks, every step measured
//! on every rank and written as soon as all ranks finish it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use polars::prelude::DataFrame;
use serde::Serialize;
use tch::{Device, Kind, Tensor};

use super::config::{Backend, ExperimentConfig, Point};
use super::launch::LaunchPlan;
use super::memory::MemoryProbe;
use super::progress::Progress;
use super::results::{complete_steps, CommRow, PointRow, Results, StepRow};
use super::rows::{Line, Reassembler};
use crate::attention::AttentionConfig;
use crate::comm::{LauncherEnv, LocalLaunch, Mesh, MeshShape, RankCtx, ReduceOp};
use crate::data::{shard, Dataset};
use crate::error::TorchResultExt;
use crate::model::{Gpt, GptConfig};
use crate::train::{checkpoints, TrainGroups, Trainer};
use crate::{Error, Result};

/// How to run.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Continue the run already in the output folder (finished points are skipped).
    pub resume: bool,
    /// Directory that relative paths (output, dataset files) start from.
    pub base_dir: PathBuf,
    /// The `ulysses` binary whose processes are the ranks of MPI and NCCL points (started by
    /// mpirun or srun as `ulysses run-point`).
    pub program: Option<PathBuf>,
}

/// What a finished run returns.
pub struct RunSummary {
    pub dir: PathBuf,
    /// One row per point (the `points` table).
    pub points: DataFrame,
    pub elapsed: Duration,
}

/// The machine and software a run used, written as `meta.toml`.
#[derive(Serialize)]
struct Meta {
    experiment: String,
    started_unix_s: u64,
    resumed: bool,
    command: Vec<String>,
    git_revision: String,
    git_dirty: bool,
    host: String,
    os: String,
    cpus: usize,
    memory_gib: f64,
    ulysses: &'static str,
    tch: &'static str,
    /// The libtorch this process loaded ("2.11.0+cu130"), or the one it was built for.
    libtorch: String,
    cuda_available: bool,
    /// CUDA devices this process sees.
    cuda_devices: usize,
}

fn git(args: &[&str]) -> Option<String> {
    let out = std::process::Command::new("git").args(args).output().ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn meta(cfg: &ExperimentConfig, resume: bool) -> Result<String> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_kb: f64 = meminfo
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    let m = Meta {
        experiment: cfg.name.clone(),
        started_unix_s: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        resumed: resume,
        command: std::env::args().collect(),
        git_revision: git(&["rev-parse", "HEAD"]).unwrap_or_else(|| "unknown".into()),
        git_dirty: git(&["status", "--porcelain", "--untracked-files=no"]).is_some_and(|s| !s.is_empty()),
        host: std::fs::read_to_string("/etc/hostname")
            .map_or_else(|_| "unknown".into(), |h| h.trim().to_string()),
        os: format!("{} {}", std::env::consts::OS, std::env::consts::ARCH),
        cpus: std::thread::available_parallelism().map_or(0, |n| n.get()),
        memory_gib: mem_kb / (1024.0 * 1024.0),
        ulysses: env!("CARGO_PKG_VERSION"),
        tch: "0.24.0",
        libtorch: crate::device::loaded_libtorch()
            .map_or_else(|| crate::device::BUILT_LIBTORCH.to_string(), |t| t.version),
        cuda_available: tch::Cuda::is_available(),
        cuda_devices: crate::device::cuda_device_count(),
    };
    toml::to_string_pretty(&m).map_err(|e| Error::InvalidArgument {
        op: "results",
        group: "meta".into(),
        msg: e.to_string(),
    })
}

/// Runs every point of `cfg` (skipping those an earlier run finished, with `resume`).
pub fn run(cfg: &ExperimentConfig, opts: &RunOptions) -> Result<RunSummary> {
    let started = Instant::now();
    cfg.validate()?;
    cfg.check_runnable(&opts.base_dir)?;
    if cfg.parallel.backend != Backend::Local && opts.program.is_none() {
        return Err(no_program());
    }
    let asked = opts.base_dir.join(cfg.output_dir());
    // A folder holding a run is never overwritten: resume continues it; otherwise the run goes
    // to the first free `<folder>-2`, `-3`, ... and says so.
    let dir = if opts.resume { asked.clone() } else { free_dir(&asked) };
    let points = cfg.points()?;
    // Where each point starts: when resuming, its newest checkpoint of a step whose rows are
    // all written (the ranks may have saved later ones than the results writer wrote when the
    // run was killed; the rows from that step on are dropped), else `train.resume_from`, else
    // the initialisation.
    let own: BTreeMap<u32, (u64, PathBuf)> = if opts.resume {
        let written = complete_steps(&dir)?;
        let usable = |p: &Point| {
            let done = u64::from(written.get(&(p.index as u32)).copied().unwrap_or(0));
            checkpoints(&checkpoints_dir(&dir, p)).into_iter().rfind(|(s, _)| *s <= done)
        };
        points.iter().filter_map(|p| Some((p.index as u32, usable(p)?))).collect()
    } else {
        BTreeMap::new()
    };
    let keep = own.iter().map(|(&p, (step, _))| (p, *step as u32)).collect();
    let mut results =
        Results::open_resuming(&dir, &cfg.to_toml()?, &meta(cfg, opts.resume)?, opts.resume, &keep)?;
    let per_point = (cfg.train.warmup + cfg.train.steps) as u64;
    let mut progress = Progress::new(per_point * points.len() as u64);
    let dataset = cfg.dataset.open(&opts.base_dir)?;
    if dir != asked {
        progress.say(&format!(
            "{} already holds a run (--resume continues it); this one goes to {}",
            asked.display(),
            dir.display()
        ));
    }
    progress.say(&format!(
        "{}: {} points, {} steps each (+{} warm-up), data: {}; results in {}",
        cfg.name,
        points.len(),
        cfg.train.steps,
        cfg.train.warmup,
        dataset.describe(),
        dir.display()
    ));
    for point in &points {
        if results.completed().contains(&(point.index as u32)) {
            progress.skip(per_point);
            progress.say(&format!(
                "point {}/{} {}: finished by the earlier run",
                point.index + 1,
                points.len(),
                point.describe()
            ));
            continue;
        }
        let start = match own.get(&(point.index as u32)) {
            Some((step, path)) => {
                progress.skip(*step);
                progress
                    .say(&format!("point {} continues from its checkpoint at step {step}", point.index + 1));
                Some(path.clone())
            }
            None => cfg.train.resume_from.as_ref().map(|p| opts.base_dir.join(p)),
        };
        progress.say(&format!("point {}/{} {}", point.index + 1, points.len(), point.describe()));
        run_point(cfg, point, dataset.as_ref(), opts, start, &mut results, &mut progress)?;
    }
    progress.finish();
    Ok(RunSummary { dir, points: results.points_frame().clone(), elapsed: started.elapsed() })
}

/// The checkpoints of `point` in a run's folder `dir`.
fn checkpoints_dir(dir: &Path, point: &Point) -> PathBuf {
    dir.join("checkpoints").join(format!("point-{}", point.index))
}

/// `dir` if it holds no run, else the first `<dir>-N` (N = 2, 3, ...) that holds none.
pub(crate) fn free_dir(dir: &Path) -> PathBuf {
    let holds_run = |d: &Path| d.join("config.toml").exists();
    if !holds_run(dir) {
        return dir.to_path_buf();
    }
    let name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    (2..)
        .map(|i| dir.with_file_name(format!("{name}-{i}")))
        .find(|d| !holds_run(d))
        .unwrap_or_else(|| dir.to_path_buf())
}

/// What one rank reports after each step.
type Report = (StepRow, Vec<CommRow>);

/// What the ranks of a point send to the writer: reports, and (MPI) other lines they print.
enum Event {
    Report(Box<Report>),
    Line(String),
}

fn run_point(
    cfg: &ExperimentConfig,
    point: &Point,
    dataset: &dyn Dataset,
    opts: &RunOptions,
    start: Option<PathBuf>,
    results: &mut Results,
    progress: &mut Progress,
) -> Result<()> {
    let gpt = cfg.gpt()?;
    let total = cfg.train.warmup + cfg.train.steps;
    let (tx, rx) = mpsc::channel::<Event>();
    let dir = results.dir().to_path_buf();
    let mut rows: Vec<StepRow> = Vec::new();
    let outcome = std::thread::scope(|s| -> Result<()> {
        let gpt = &gpt;
        let ranks = s.spawn(move || match cfg.parallel.backend {
            Backend::Local => local_ranks(cfg, point, gpt, dataset, (&dir, start), &tx),
            Backend::Mpi | Backend::Nccl => process_ranks(cfg, point, &dir, opts, start, &tx),
        });
        // Every rank reports each step; a step is written once all have.
        let mut pending: BTreeMap<u32, Vec<Report>> = BTreeMap::new();
        let mut written = Ok(());
        for event in rx {
            let report = match event {
                Event::Report(r) => *r,
                Event::Line(line) => {
                    progress.say(&line);
                    continue;
                }
            };
            let step = report.0.step;
            let entry = pending.entry(step).or_default();
            entry.push(report);
            if entry.len() == point.ranks && written.is_ok() {
                let mut reports = pending.remove(&step).unwrap_or_default();
                reports.sort_by_key(|(r, _)| r.rank);
                let steps: Vec<StepRow> = reports.iter().map(|(r, _)| r.clone()).collect();
                let comm: Vec<CommRow> = reports.into_iter().flat_map(|(_, c)| c).collect();
                let slowest = steps.iter().map(|r| r.step_ms).fold(0.0, f64::max);
                progress.step(
                    &point.describe(),
                    step as usize,
                    total,
                    slowest,
                    steps[0].tokens_per_s,
                    steps[0].loss,
                );
                written = results.step(&steps, &comm);
                rows.extend(steps);
            }
        }
        let launched = ranks.join().map_err(|_| Error::Aborted {
            op: "experiment",
            group: "-".into(),
            rank: 0,
            cause: "the launch thread panicked".into(),
        })?;
        launched?;
        written
    });
    outcome?;
    results.point(summarize(point, cfg, &gpt, &rows)?)
}

/// The point's ranks as threads of this process.
fn local_ranks(
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

fn writer_gone() -> Error {
    Error::Aborted {
        op: "experiment",
        group: "-".into(),
        rank: 0,
        cause: "the results writer stopped".into(),
    }
}

fn no_program() -> Error {
    Error::Backend {
        backend: "mpi",
        msg: "an MPI or NCCL run needs the path of a ulysses binary built with `--features mpi` \
              (and `nccl`) (RunOptions::program): its processes are the ranks"
            .into(),
    }
}

/// The point's ranks as processes (one per GPU with NCCL): `mpirun` or `srun` of
/// `ulysses run-point` (see [`LaunchPlan`]), whose reports come back as JSON lines on stdout.
fn process_ranks(
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

/// This process as one rank of an MPI job running point `index` of the run in `dir` (what
/// `ulysses run-point` does under mpirun or srun): reports go to stdout as JSON lines. With
/// NCCL the rank first binds its GPU from its launcher's variables (`bind_gpu`: made current
/// before any CUDA or NCCL call, two ranks on one GPU refused), then its world, and every
/// group split from it, becomes an NCCL communicator over the MPI world.
#[cfg(feature = "mpi")]
pub fn run_point_rank(dir: &Path, index: usize, base: &Path, from: Option<&Path>) -> Result<()> {
    use std::io::Write;
    let cfg = ExperimentConfig::load(&dir.join("config.toml"))?;
    let point = cfg.points()?.into_iter().nth(index).ok_or_else(|| Error::InvalidArgument {
        op: "experiment",
        group: dir.display().to_string(),
        msg: format!("the run has no point {index}"),
    })?;
    let gpt = cfg.gpt()?;
    let dataset = cfg.dataset.open(base)?;
    let timeout = Duration::from_secs(cfg.parallel.timeout_s);
    let send = |r: Report| -> Result<()> {
        let json =
            serde_json::to_string(&r).map_err(|e| Error::Backend { backend: "mpi", msg: e.to_string() })?;
        let mut out = std::io::stdout().lock();
        // One write per line, so that the launchers' rank tags stay whole; short lines
        // (`rows.rs`), which srun does not cut.
        for line in super::rows::lines(&json) {
            out.write_all(line.as_bytes()).map_err(|_| writer_gone())?;
        }
        out.flush().map_err(|_| writer_gone())
    };
    crate::comm::MpiLaunch::new().timeout(timeout).threads_per_rank(cfg.parallel.threads_per_rank).run(
        |ctx| {
            if cfg.parallel.backend != Backend::Nccl {
                let spec = RankSpec::new(&cfg, &point, &gpt, dataset.as_ref(), 1, Device::Cpu)?
                    .checkpoints(dir, from.map(Path::to_path_buf));
                return rank_main(ctx, &spec, &send);
            }
            let (world, device) = nccl_world(&ctx, timeout)?;
            let spec = RankSpec::new(&cfg, &point, &gpt, dataset.as_ref(), 1, device)?
                .checkpoints(dir, from.map(Path::to_path_buf));
            rank_main(RankCtx::new(world), &spec, &send)
        },
    )
}

/// This rank's GPU, made current, and the NCCL world over the MPI one.
#[cfg(all(feature = "mpi", feature = "nccl"))]
fn nccl_world(ctx: &RankCtx, timeout: Duration) -> Result<(crate::comm::Group, Device)> {
    use std::io::Write;
    let gpu = crate::comm::bind_gpu(ctx.world(), &LauncherEnv::from_process())?;
    let line = format!(
        "rank {}: host {}, cuda:{} (PCI {}), local rank {} of {} ({})\n",
        ctx.rank(),
        gpu.host,
        match gpu.device {
            Device::Cuda(i) => i,
            _ => 0,
        },
        gpu.pci_bus_id,
        gpu.local_rank,
        gpu.local_size,
        gpu.source
    );
    let _ = std::io::stdout().lock().write_all(line.as_bytes());
    Ok((crate::comm::nccl_group(ctx.world(), gpu.device, timeout)?, gpu.device))
}

#[cfg(all(feature = "mpi", not(feature = "nccl")))]
fn nccl_world(_ctx: &RankCtx, _timeout: Duration) -> Result<(crate::comm::Group, Device)> {
    Err(Error::Backend {
        backend: "nccl",
        msg: "this ulysses was built without the `nccl` feature: cargo build --release --features mpi,nccl"
            .into(),
    })
}

/// Everything a rank needs to run a point.
struct RankSpec<'a> {
    cfg: &'a ExperimentConfig,
    point: &'a Point,
    gpt: &'a GptConfig,
    attention: AttentionConfig,
    kind: Kind,
    dataset: &'a dyn Dataset,
    /// Ranks sharing this process (threads): memory readings are divided among them.
    ranks_in_process: usize,
    /// This rank's device (its own GPU with NCCL; threads share cuda:0).
    device: Device,
    /// Where the point's checkpoints go (with `train.checkpoint_every`).
    checkpoints: Option<PathBuf>,
    /// The checkpoint the point starts from.
    start: Option<PathBuf>,
}

impl<'a> RankSpec<'a> {
    fn new(
        cfg: &'a ExperimentConfig,
        point: &'a Point,
        gpt: &'a GptConfig,
        dataset: &'a dyn Dataset,
        ranks_in_process: usize,
        device: Device,
    ) -> Result<RankSpec<'a>> {
        Ok(RankSpec {
            cfg,
            point,
            gpt,
            attention: cfg.attention()?,
            kind: cfg.kind()?,
            dataset,
            ranks_in_process,
            device,
            checkpoints: None,
            start: None,
        })
    }

    /// Checkpoints under the run's folder `dir`, and the one to start from.
    fn checkpoints(mut self, dir: &Path, start: Option<PathBuf>) -> RankSpec<'a> {
        self.checkpoints = self.cfg.train.checkpoint_every.map(|_| checkpoints_dir(dir, self.point));
        self.start = start;
        self
    }
}

/// One rank of one point: build, then step, measuring and reporting each step.
fn rank_main(ctx: RankCtx, spec: &RankSpec<'_>, send: &(dyn Fn(Report) -> Result<()> + Sync)) -> Result<()> {
    let (cfg, point, gpt) = (spec.cfg, spec.point, spec.gpt);
    let (dp, k) = (point.dp, point.grad_accum);
    let sp = point.ranks / dp;
    let world = ctx.world().clone().with_overlap(cfg.parallel.overlap);
    let mesh = Mesh::new(&world, MeshShape::dp_sp(dp, sp)?)?;
    let (sp_group, dp_group) = (mesh.group("sp")?, mesh.group("dp")?);
    let device = spec.device;
    let strategy = point.strategy.build(sp_group, spec.attention, point.seq, gpt.n_head, gpt.n_kv_head)?;
    let layout = strategy.layout().clone();
    let model = Gpt::new(gpt, strategy, spec.kind, device)?;
    let mut trainer = Trainer::new(model, TrainGroups::new(&mesh)?, cfg.train_config(point)?)?;
    if let Some(from) = &spec.start {
        trainer.load(from)?;
    }
    let world = &world;

    // Memory once every rank has built its model, and its peak from then (one reset per
    // process or GPU).
    world.synchronize()?;
    crate::device::synchronize(device)?;
    world.barrier()?;
    MemoryProbe::reset(device, spec.ranks_in_process == 1 || ctx.rank() == 0)?;
    world.barrier()?;
    let memory = MemoryProbe::new(device, spec.ranks_in_process);
    world.barrier()?;

    let (b, n, total) = (cfg.train.batch, point.seq, cfg.train.warmup + cfg.train.steps);
    let tokens = (b * n) as f64 * (dp * k) as f64;
    let flops = gpt.train_flops(b * n * (dp * k) as i64, n, &spec.attention.mask);
    for step in trainer.steps_taken() as usize..total {
        // Micro-batch m of replica d draws the dataset's replica d k + m, so that one device
        // accumulating dp x k micro-batches sees the global batch of dp replicas.
        let replica = mesh.coord("dp")? * k;
        let micro = |m: usize| -> Result<crate::data::Shard> {
            let global = spec.dataset.batch(cfg.train.seed, step as u64, (replica + m) as u64, b, n)?;
            shard(&global.f_to(device).op("experiment")?, &layout, sp_group.rank())
        };
        let batches = (0..k).map(micro).collect::<Result<Vec<_>>>()?;
        // The clock reads a device with nothing queued (GPU-true step times).
        crate::device::synchronize(device)?;
        world.barrier()?;
        world.reset_rank_stats();
        let t0 = Instant::now();
        let report = trainer.step(&batches)?;
        world.synchronize()?;
        crate::device::synchronize(device)?;
        world.barrier()?;
        let seconds = t0.elapsed().as_secs_f64();
        let by_group = world.rank_stats_by_group();
        // The loss over data-parallel replicas, outside the timed step and its counters.
        let loss_value = if dp > 1 {
            dp_group.all_reduce(&Tensor::from_slice(&[report.loss]), ReduceOp::Avg)?.double_value(&[0])
        } else {
            report.loss
        };
        let (peak, reserved, measure) = memory.read()?;
        let sent: u64 = by_group.iter().map(|(_, s)| s.bytes_sent()).sum();
        let received: u64 = by_group.iter().map(|(_, s)| s.bytes_received()).sum();
        let row = StepRow {
            point: point.index as u32,
            strategy: point.label(),
            ranks: point.ranks as u32,
            sp: sp as u32,
            dp: dp as u32,
            seq: n,
            batch: b,
            step: step as u32,
            warmup: step < cfg.train.warmup,
            rank: ctx.rank() as u32,
            step_ms: seconds * 1e3,
            tokens_per_s: tokens / seconds,
            model_tflops: flops / seconds / 1e12,
            loss: loss_value,
            peak_mib_per_rank: peak,
            peak_reserved_mib_per_rank: reserved,
            memory: measure.to_string(),
            bytes_sent: sent,
            bytes_received: received,
            grad_norm: report.grad_norm,
            lr: report.lr,
            loss_scale: report.loss_scale,
            skipped: report.skipped.is_some(),
        };
        let comm = by_group
            .into_iter()
            .flat_map(|(group, stats)| {
                stats
                    .iter()
                    .map(|(op, c)| CommRow {
                        point: point.index as u32,
                        step: step as u32,
                        rank: ctx.rank() as u32,
                        group: group.clone(),
                        op: op.name().to_string(),
                        calls: c.calls,
                        bytes_sent: c.bytes_sent,
                        bytes_received: c.bytes_received,
                    })
                    .collect::<Vec<_>>()
            })
            .collect();
        send((row, comm))?;
        // The model state, after the step's measurements.
        if let (Some(dir), Some(every)) = (&spec.checkpoints, cfg.train.checkpoint_every) {
            if (step + 1) % every == 0 || step + 1 == total {
                let data = serde_json::json!({
                    "dataset": spec.dataset.describe(), "seed": cfg.train.seed, "next_step": step + 1,
                    "micro_batch": "the dataset's replica dp_rank x grad_accum + m of step next_step",
                });
                trainer.save(dir, data)?;
            }
        }
    }
    Ok(())
}

/// Medians over a point's measured steps (each step timed by its slowest rank).
fn summarize(point: &Point, cfg: &ExperimentConfig, gpt: &GptConfig, rows: &[StepRow]) -> Result<PointRow> {
    let measured: Vec<&StepRow> = rows.iter().filter(|r| !r.warmup).collect();
    let mut by_step: BTreeMap<u32, Vec<&StepRow>> = BTreeMap::new();
    for r in &measured {
        by_step.entry(r.step).or_default().push(r);
    }
    let median = |mut v: Vec<f64>| -> f64 {
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
    };
    let per_step = |f: &dyn Fn(&StepRow) -> f64| -> Vec<f64> {
        by_step.values().map(|rs| rs.iter().map(|r| f(r)).fold(f64::MIN, f64::max)).collect()
    };
    let step_ms = median(per_step(&|r| r.step_ms));
    let seconds = step_ms / 1e3;
    let (b, n, dp) = (cfg.train.batch, point.seq, (point.dp * point.grad_accum) as i64);
    let flops = gpt.train_flops(b * n * dp, n, &cfg.attention()?.mask);
    let last = measured.iter().filter(|r| r.rank == 0).max_by_key(|r| r.step);
    Ok(PointRow {
        point: point.index as u32,
        strategy: point.label(),
        ranks: point.ranks as u32,
        sp: (point.ranks / point.dp) as u32,
        dp: point.dp as u32,
        seq: n,
        batch: b,
        steps: by_step.len() as u32,
        median_step_ms: step_ms,
        tokens_per_s: (b * n * dp) as f64 / seconds,
        model_tflops: flops / seconds / 1e12,
        peak_mib_per_rank: measured.iter().map(|r| r.peak_mib_per_rank).fold(f64::NAN, f64::max),
        peak_reserved_mib_per_rank: measured
            .iter()
            .map(|r| r.peak_reserved_mib_per_rank)
            .fold(f64::NAN, f64::max),
        memory: measured.first().map_or_else(|| super::memory::HOST_RSS.to_string(), |r| r.memory.clone()),
        bytes_sent_per_rank: median(per_step(&|r| r.bytes_sent as f64)) as u64,
        bytes_received_per_rank: median(per_step(&|r| r.bytes_received as f64)) as u64,
        final_loss: last.map_or(f64::NAN, |r| r.loss),
    })
}
