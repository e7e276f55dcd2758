//! # ulysses
//!
//! A research toolkit for sequence-parallel transformer training, centred on DeepSpeed-Ulysses
//! (Jacobs et al., 2023, arXiv 2309.14509): attention heads and the sequence are re-sharded with
//! all-to-all so that each rank attends over the whole sequence for a slice of the heads.
//!
//! Layers, top to bottom (each uses only those above it):
//! - [`comm`]: process groups, the mesh, collectives with byte accounting, backends;
//! - [`autograd`]: differentiable collectives on an explicit per-step tape;
//! - [`attention`]: kernels on whole sequences and the sequence-parallel strategies (Ulysses and
//!   the baselines);
//! - [`model`]: the GPT, generic over the strategy;
//! - [`data`]: synthetic and file datasets, global label shift and sharding;
//! - [`train`]: the step loop ([`train::Trainer`]): mixed precision, ZeRO 0-3 over all SP x DP
//!   ranks, activation checkpointing, accumulation, clipping, schedule, checkpoints;
//! - [`cost`]: the analytical model of step time and memory per strategy, on hardware files;
//! - [`experiment`]: configs, the runner, results as DataFrames, reports and plots;
//! - [`course`]: the checks of the notebooks' exercises (a learner's function against a reference);
//! - [`device`]: loading libtorch's CUDA half where there is one.

pub mod attention;
pub mod autograd;
pub mod comm;
pub mod cost;
pub mod course;
pub mod data;
pub mod device;
mod error;
pub mod experiment;
pub mod model;
pub mod train;

pub use error::{Error, Result, TorchResultExt};

// The crates notebooks need with the exact features the library was built with, so that a
// notebook never recompiles them with other features: `use ulysses::polars::prelude::*`.
pub use plotters;
pub use polars;
pub use tch;
