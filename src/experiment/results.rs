//! Results on disk, written as they come: a run never loses more than the step in flight.
//!
//! An output folder holds `config.toml` (the config as run), `meta.toml` (revision, machine,
//! versions), and three tables, each as CSV (appended and flushed after every step) and Parquet
//! (rewritten to a temporary file and renamed over the old one after every step, so it is
//! always whole):
//!
//! - `steps`: one row per sweep point, step and rank: time, throughput, model TFLOP/s, loss,
//!   memory (with the name of its measure: host RSS or the CUDA allocator), bytes sent and
//!   received;
//! - `comm`: one row per point, step, rank, group and op kind: calls and bytes;
//! - `points`: one row per finished point: medians over its measured steps.
//!
//! A folder that already holds a run is never overwritten: `resume` continues it (finished
//! points are kept and skipped, the rows of an unfinished point dropped), anything else is an
//! error here (the runner then picks a fresh `<folder>-N`). A run holds an exclusive lock on
//! `<folder>/.lock` (`flock`, released when the process ends, however it ends), so a second
//! run into a folder in use is refused instead of interleaving its rows. A write that fails (a
//! full disk) leaves every file as it was after the last whole step: the CSV is cut back to its
//! last whole row and the Parquet file is only replaced once its new version is complete.

use std::collections::BTreeSet;
use std::fs::File;
use std::io::{Seek, Write};
use std::path::{Path, PathBuf};

use polars::prelude::*;

use crate::{Error, Result};

/// One step of one rank at one sweep point.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct StepRow {
    pub point: u32,
    pub strategy: String,
    pub ranks: u32,
    pub sp: u32,
    pub dp: u32,
    pub seq: i64,
    pub batch: i64,
    pub step: u32,
    /// A warm-up step: kept, but left out of summaries.
    pub warmup: bool,
    pub rank: u32,
    /// Wall time of the step on this rank (forward, backward, gradient sync, update).
    #[serde(deserialize_with = "f64_or_nan")]
    pub step_ms: f64,
    /// Tokens of the whole job (b x N x dp) per second of step time.
    #[serde(deserialize_with = "f64_or_nan")]
    pub tokens_per_s: f64,
    /// Model FLOPs of the step (`GptConfig::train_flops`) per second, whole job, in TFLOP/s.
    #[serde(deserialize_with = "f64_or_nan")]
    pub model_tflops: f64,
    /// Global mean loss.
    #[serde(deserialize_with = "f64_or_nan")]
    pub loss: f64,
    /// Peak memory per rank during the point, as `memory` names it: host RSS above the RSS
    /// after the models were built (CPU), or the CUDA allocator's peak allocated (GPU); divided
    /// by the ranks sharing the process or GPU.
    #[serde(deserialize_with = "f64_or_nan")]
    pub peak_mib_per_rank: f64,
    /// The CUDA allocator's peak reserved (cache included) per rank; NaN on the CPU.
    #[serde(deserialize_with = "f64_or_nan")]
    pub peak_reserved_mib_per_rank: f64,
    /// GPU memory in use outside the caching allocator at the step's end, per rank: the CUDA
    /// context, loaded kernels, NCCL's communicators and buffers (`CudaMemory::outside_allocator`);
    /// NaN on the CPU.
    #[serde(deserialize_with = "f64_or_nan")]
    pub outside_allocator_mib_per_rank: f64,
    /// Which measure `peak_mib_per_rank` holds: "host_rss_above_base" or "cuda_peak_allocated".
    pub memory: String,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    /// The global gradient norm before clipping (unscaled).
    pub grad_norm: f64,
    /// The learning rate of the update (0 without an optimizer).
    pub lr: f64,
    /// The loss scale (1 unless f16).
    pub loss_scale: f64,
    /// The step was skipped (f16 overflow).
    pub skipped: bool,
}

/// One group and op kind of one step of one rank.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct CommRow {
    pub point: u32,
    pub step: u32,
    pub rank: u32,
    pub group: String,
    pub op: String,
    pub calls: u64,
    pub bytes_sent: u64,
    pub bytes_received: u64,
}

/// The summary of one finished point, over its measured (not warm-up) steps.
#[derive(Debug, Clone, PartialEq)]
pub struct PointRow {
    pub point: u32,
    pub strategy: String,
    pub ranks: u32,
    pub sp: u32,
    pub dp: u32,
    pub seq: i64,
    pub batch: i64,
    pub steps: u32,
    /// Median over steps of the slowest rank's time.
    pub median_step_ms: f64,
    pub tokens_per_s: f64,
    pub model_tflops: f64,
    /// The largest peak over steps and ranks, in the measure `memory` names (see [`StepRow`]).
    pub peak_mib_per_rank: f64,
    pub peak_reserved_mib_per_rank: f64,
    /// The largest over steps and ranks of the GPU memory outside the allocator (see [`StepRow`]).
    pub outside_allocator_mib_per_rank: f64,
    pub memory: String,
    /// Median over steps of the largest per-rank volume.
    pub bytes_sent_per_rank: u64,
    pub bytes_received_per_rank: u64,
    pub final_loss: f64,
}

/// An f64 that JSON wrote as null (JSON has no NaN: serde_json writes NaN as null), read back
/// as NaN, so that a rank's report with an unmeasured value (memory on a platform without it)
/// crosses the process boundary.
fn f64_or_nan<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<f64, D::Error> {
    Ok(<Option<f64> as serde::Deserialize>::deserialize(d)?.unwrap_or(f64::NAN))
}

fn polars_error(what: &str, e: PolarsError) -> Error {
    Error::InvalidArgument { op: "results", group: what.to_string(), msg: e.to_string() }
}

fn io_error(path: &Path, e: std::io::Error) -> Error {
    Error::InvalidArgument { op: "results", group: path.display().to_string(), msg: e.to_string() }
}

/// Rows of one table as a DataFrame.
pub trait Row: Sized {
    const TABLE: &'static str;
    fn frame(rows: &[Self]) -> PolarsResult<DataFrame>;
}

macro_rules! col {
    ($rows:expr, $field:ident) => {
        $rows.iter().map(|r| r.$field.clone()).collect::<Vec<_>>()
    };
}

impl Row for StepRow {
    const TABLE: &'static str = "steps";
    fn frame(r: &[Self]) -> PolarsResult<DataFrame> {
        df!(
            "point" => col!(r, point), "strategy" => col!(r, strategy), "ranks" => col!(r, ranks),
            "sp" => col!(r, sp), "dp" => col!(r, dp), "seq" => col!(r, seq), "batch" => col!(r, batch),
            "step" => col!(r, step), "warmup" => col!(r, warmup), "rank" => col!(r, rank),
            "step_ms" => col!(r, step_ms), "tokens_per_s" => col!(r, tokens_per_s),
            "model_tflops" => col!(r, model_tflops), "loss" => col!(r, loss),
            "peak_mib_per_rank" => col!(r, peak_mib_per_rank),
            "peak_reserved_mib_per_rank" => col!(r, peak_reserved_mib_per_rank),
            "outside_allocator_mib_per_rank" => col!(r, outside_allocator_mib_per_rank), "memory" => col!(r, memory),
            "bytes_sent" => col!(r, bytes_sent),
            "bytes_received" => col!(r, bytes_received), "grad_norm" => col!(r, grad_norm), "lr" => col!(r, lr),
            "loss_scale" => col!(r, loss_scale), "skipped" => col!(r, skipped),
        )
    }
}

impl Row for CommRow {
    const TABLE: &'static str = "comm";
    fn frame(r: &[Self]) -> PolarsResult<DataFrame> {
        df!(
            "point" => col!(r, point), "step" => col!(r, step), "rank" => col!(r, rank), "group" => col!(r, group),
            "op" => col!(r, op), "calls" => col!(r, calls), "bytes_sent" => col!(r, bytes_sent),
            "bytes_received" => col!(r, bytes_received),
        )
    }
}

impl Row for PointRow {
    const TABLE: &'static str = "points";
    fn frame(r: &[Self]) -> PolarsResult<DataFrame> {
        df!(
            "point" => col!(r, point), "strategy" => col!(r, strategy), "ranks" => col!(r, ranks),
            "sp" => col!(r, sp), "dp" => col!(r, dp), "seq" => col!(r, seq), "batch" => col!(r, batch),
            "steps" => col!(r, steps), "median_step_ms" => col!(r, median_step_ms),
            "tokens_per_s" => col!(r, tokens_per_s), "model_tflops" => col!(r, model_tflops),
            "peak_mib_per_rank" => col!(r, peak_mib_per_rank),
            "peak_reserved_mib_per_rank" => col!(r, peak_reserved_mib_per_rank),
            "outside_allocator_mib_per_rank" => col!(r, outside_allocator_mib_per_rank), "memory" => col!(r, memory),
            "bytes_sent_per_rank" => col!(r, bytes_sent_per_rank),
            "bytes_received_per_rank" => col!(r, bytes_received_per_rank), "final_loss" => col!(r, final_loss),
        )
    }
}

/// One table: its rows so far, its CSV (appended) and its Parquet (rewritten).
struct Table {
    df: DataFrame,
    csv: File,
    parquet: PathBuf,
}

impl Table {
    /// A table holding `df` (kept from an earlier run, or empty), both files rewritten from it.
    fn create(dir: &Path, name: &str, df: DataFrame) -> Result<Table> {
        let csv_path = dir.join(format!("{name}.csv"));
        let csv = File::create(&csv_path).map_err(|e| io_error(&csv_path, e))?;
        let mut table = Table { df: DataFrame::empty(), csv, parquet: dir.join(format!("{name}.parquet")) };
        if df.height() > 0 {
            table.append(df)?;
        }
        Ok(table)
    }

    fn append(&mut self, mut new: DataFrame) -> Result<()> {
        let header = self.df.height() == 0;
        let csv_path = self.parquet.with_extension("csv");
        // Both files are encoded in memory first, so that a failed write (a full disk) reports
        // the system's reason and can be undone: the CSV is cut back to its last whole row
        // (shrinking needs no space), and the Parquet file is replaced only by a whole new
        // version, renamed over the old one.
        let mut rows = Vec::new();
        CsvWriter::new(&mut rows)
            .include_header(header)
            .finish(&mut new)
            .map_err(|e| polars_error(&csv_path.display().to_string(), e))?;
        let mut all =
            if header { new } else { self.df.vstack(&new).map_err(|e| polars_error("append", e))? };
        let mut bytes = Vec::new();
        ParquetWriter::new(&mut bytes)
            .finish(&mut all)
            .map_err(|e| polars_error(&self.parquet.display().to_string(), e))?;
        // The step goes into both files or into neither.
        let whole = self.csv.metadata().map_err(|e| io_error(&csv_path, e))?.len();
        let tmp = self.parquet.with_extension("parquet.tmp");
        let written = self
            .csv
            .write_all(&rows)
            .and_then(|()| self.csv.flush())
            .map_err(|e| io_error(&csv_path, e))
            .and_then(|()| std::fs::write(&tmp, &bytes).map_err(|e| io_error(&tmp, e)))
            .and_then(|()| std::fs::rename(&tmp, &self.parquet).map_err(|e| io_error(&self.parquet, e)));
        if written.is_err() {
            let _ = std::fs::remove_file(&tmp);
            let _ = self.csv.set_len(whole);
            let _ = self.csv.seek(std::io::SeekFrom::Start(whole));
            return written;
        }
        self.df = all;
        Ok(())
    }
}

/// Per point, how many steps from step 0 on the `steps` table of `dir` holds whole (a row of
/// every rank); empty when there is no table.
pub fn complete_steps(dir: &Path) -> Result<std::collections::BTreeMap<u32, u32>> {
    let mut out = std::collections::BTreeMap::new();
    if !dir.join("steps.parquet").exists() {
        return Ok(out);
    }
    let df = read_table(dir, "steps")?;
    let column = |c: &str| df.column(c).and_then(|c| c.u32().cloned()).map_err(|e| polars_error("steps", e));
    let (points, steps, ranks) = (column("point")?, column("step")?, column("ranks")?);
    let mut rows: std::collections::BTreeMap<(u32, u32), (u32, u32)> = std::collections::BTreeMap::new();
    for ((p, s), r) in
        points.into_no_null_iter().zip(steps.into_no_null_iter()).zip(ranks.into_no_null_iter())
    {
        rows.entry((p, s)).or_insert((0, r)).0 += 1;
    }
    for (&(p, s), &(seen, ranks)) in &rows {
        let next = out.entry(p).or_insert(0);
        if s == *next && seen == ranks {
            *next += 1;
        }
    }
    Ok(out)
}

/// Takes the exclusive lock of the output folder `dir`, or says that another run holds it.
fn lock(dir: &Path) -> Result<File> {
    let path = dir.join(".lock");
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| io_error(&path, e))?;
    #[cfg(unix)]
    {
        use std::os::fd::AsRawFd;
        // SAFETY: flock takes the descriptor of `file`, which is open for the whole call, and
        // touches no memory.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let e = std::io::Error::last_os_error();
            let msg = if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
                "this folder is in use by another run (it holds .lock); wait for that run to end, or set \
                 another `output`"
                    .to_string()
            } else {
                format!("cannot lock {}: {e}", path.display())
            };
            return Err(Error::InvalidArgument { op: "results", group: dir.display().to_string(), msg });
        }
    }
    Ok(file)
}

/// Reads a Parquet table of an output folder.
pub fn read_table(dir: &Path, name: &str) -> Result<DataFrame> {
    let path = dir.join(format!("{name}.parquet"));
    let file = File::open(&path).map_err(|e| io_error(&path, e))?;
    ParquetReader::new(file).finish().map_err(|e| polars_error(&path.display().to_string(), e))
}

/// The output folder of a run.
pub struct Results {
    dir: PathBuf,
    /// The folder's lock, held while this value lives (see the module doc).
    _lock: File,
    steps: Table,
    comm: Table,
    points: Table,
    completed: BTreeSet<u32>,
}

impl Results {
    /// Opens `dir` for a run of the config `config_toml`: a new folder (or one without a run),
    /// or, with `resume`, the same config's earlier run, keeping its finished points.
    pub fn open(dir: &Path, config_toml: &str, meta_toml: &str, resume: bool) -> Result<Results> {
        Results::open_resuming(dir, config_toml, meta_toml, resume, &std::collections::BTreeMap::new())
    }

    /// As [`open`](Results::open), also keeping the rows of unfinished points `p` with steps
    /// below `partial[p]` (points that continue from a checkpoint of that step).
    pub fn open_resuming(
        dir: &Path,
        config_toml: &str,
        meta_toml: &str,
        resume: bool,
        partial: &std::collections::BTreeMap<u32, u32>,
    ) -> Result<Results> {
        std::fs::create_dir_all(dir).map_err(|e| io_error(dir, e))?;
        let lock = lock(dir)?;
        let config_path = dir.join("config.toml");
        let mut completed = BTreeSet::new();
        let mut kept: [DataFrame; 3] = [DataFrame::empty(), DataFrame::empty(), DataFrame::empty()];
        if config_path.exists() {
            let bad =
                |msg: String| Error::InvalidArgument { op: "results", group: dir.display().to_string(), msg };
            if !resume {
                return Err(bad(
                    "this folder already holds a run: pass --resume to continue it, or set another `output`"
                        .into(),
                ));
            }
            let old = std::fs::read_to_string(&config_path).map_err(|e| io_error(&config_path, e))?;
            if old != config_toml {
                return Err(bad(
                    "the run in this folder used another config; resume needs the same one".into()
                ));
            }
            if dir.join("points.parquet").exists() {
                let points = read_table(dir, "points")?;
                let ids = points
                    .column("point")
                    .and_then(|c| c.u32().cloned())
                    .map_err(|e| polars_error("points", e))?;
                completed = ids.into_no_null_iter().collect();
                kept[2] = points;
            }
            for (i, name) in ["steps", "comm"].iter().enumerate() {
                if dir.join(format!("{name}.parquet")).exists() {
                    let df = read_table(dir, name)?;
                    let column = |c: &str| {
                        df.column(c).and_then(|c| c.u32().cloned()).map_err(|e| polars_error(name, e))
                    };
                    let (ids, steps) = (column("point")?, column("step")?);
                    let mask: BooleanChunked = ids
                        .iter()
                        .zip(steps.iter())
                        .map(|(p, s)| match (p, s) {
                            (Some(p), Some(s)) => {
                                completed.contains(&p) || partial.get(&p).is_some_and(|&k| s < k)
                            }
                            _ => false,
                        })
                        .collect();
                    kept[i] = df.filter(&mask).map_err(|e| polars_error(name, e))?;
                }
            }
        } else {
            std::fs::write(&config_path, config_toml).map_err(|e| io_error(&config_path, e))?;
        }
        let meta = dir.join("meta.toml");
        std::fs::write(&meta, meta_toml).map_err(|e| io_error(&meta, e))?;
        let [steps, comm, points] = kept;
        Ok(Results {
            dir: dir.to_path_buf(),
            _lock: lock,
            steps: Table::create(dir, StepRow::TABLE, steps)?,
            comm: Table::create(dir, CommRow::TABLE, comm)?,
            points: Table::create(dir, PointRow::TABLE, points)?,
            completed,
        })
    }

    /// The folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Points finished by an earlier run (skipped on resume).
    pub fn completed(&self) -> &BTreeSet<u32> {
        &self.completed
    }

    /// Appends one step (every rank's rows) to the steps and comm tables.
    pub fn step(&mut self, steps: &[StepRow], comm: &[CommRow]) -> Result<()> {
        self.steps.append(StepRow::frame(steps).map_err(|e| polars_error("steps", e))?)?;
        self.comm.append(CommRow::frame(comm).map_err(|e| polars_error("comm", e))?)
    }

    /// Appends a finished point's summary.
    pub fn point(&mut self, row: PointRow) -> Result<()> {
        self.completed.insert(row.point);
        self.points.append(PointRow::frame(&[row]).map_err(|e| polars_error("points", e))?)
    }

    /// The summaries so far.
    pub fn points_frame(&self) -> &DataFrame {
        &self.points.df
    }
}
