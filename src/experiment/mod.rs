//! Experiments: a declarative config (TOML), a runner that sweeps it and writes results as it
//! goes (CSV and Parquet through polars), each point's ranks as threads or as processes (mpirun,
//! srun; one per GPU with NCCL), Slurm jobs (`slurm`), progress on a terminal or as plain lines,
//! and a report with tables and plots (plotters); and the same tables predicted by the cost model
//! (`ulysses predict`), side by side with the measured ones when both exist.

mod compare;
mod config;
pub mod format;
mod launch;
mod memory;
mod meta;
#[cfg(feature = "mpi")]
mod mpi_rank;
mod plan;
mod plot;
mod predict;
mod progress;
mod rank;
mod report;
mod results;
mod rows;
mod run;
pub mod slurm;
mod spawn;
mod sweep;
mod validate;

pub use compare::{side_by_side, SUMMARY_COLUMNS};
pub use config::{
    AttentionSpec, Backend, ExperimentConfig, ModelSpec, Packing, ParallelSpec, Point, TrainSpec,
};
pub use launch::{LaunchPlan, Launcher};
pub use memory::{rss, CUDA_PEAK, HOST_RSS};
#[cfg(feature = "mpi")]
pub use mpi_rank::run_point_rank;
pub use plot::{
    font_ready, series_style, strategy_of, strategy_style, Axis, BarChart, Bars, Chart, Collective, Figure,
    Marker, Scale, Series, Style, Svg, Unit, Whiskers,
};
pub use predict::{hardware_for, job_for, predict_experiment, predict_points, Mode, PredictSpec, Predicted};
pub use progress::Progress;
pub use report::{report, HtmlTable, Report};
pub use results::{complete_steps, read_table, CommRow, PointRow, Results, StepRow};
pub use run::{run, RunOptions, RunSummary};
pub use slurm::SlurmSpec;
