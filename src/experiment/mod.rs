//! Experiments: a declarative config (TOML), a runner that sweeps it and writes results as it
//! goes (CSV and Parquet through polars), progress on a terminal or as plain lines, and a report
//! with tables and plots (plotters).

mod config;
mod plan;
mod plot;
mod progress;
mod report;
mod results;
mod run;

pub use config::{AttentionSpec, Backend, ExperimentConfig, ModelSpec, ParallelSpec, Point, TrainSpec};
pub use plot::{font_ready, Chart, Series, Svg};
pub use progress::Progress;
pub use report::{report, HtmlTable, Report};
pub use results::{complete_steps, read_table, CommRow, PointRow, Results, StepRow};
#[cfg(feature = "mpi")]
pub use run::run_point_rank;
pub use run::{memory, run, RunOptions, RunSummary};
