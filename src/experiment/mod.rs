//! Experiments: a declarative config (TOML), a runner that sweeps it and writes results as it
//! goes (CSV and Parquet through polars), each point's ranks as threads or as processes (mpirun,
//! srun; one per GPU with NCCL), Slurm jobs (`slurm`), progress on a terminal or as plain lines,
//! and a report with tables and plots (plotters).

mod config;
pub mod format;
mod launch;
mod memory;
mod plot;
mod progress;
mod report;
mod results;
mod run;
pub mod slurm;

pub use config::{AttentionSpec, Backend, ExperimentConfig, ModelSpec, ParallelSpec, Point, TrainSpec};
pub use launch::{LaunchPlan, Launcher};
pub use memory::{CUDA_PEAK, HOST_RSS};
pub use plot::{font_ready, Chart, Series, Svg};
pub use progress::Progress;
pub use report::{report, HtmlTable, Report};
pub use results::{read_table, CommRow, PointRow, Results, StepRow};
#[cfg(feature = "mpi")]
pub use run::run_point_rank;
pub use run::{run, RunOptions, RunSummary};
pub use slurm::SlurmSpec;
