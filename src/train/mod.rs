//! Training: the step loop ([`Trainer`]) with mixed precision, ZeRO stages 1-3 over all SP x DP
//! ranks, activation checkpointing, gradient accumulation and clipping, the learning-rate
//! schedule and loss scaling; the optimizer; checkpoints; and the plan types
//! ([`Checkpointing`], [`ZeroStage`], [`Precision`]) that the step loop and the cost model share.

mod checkpoint;
mod config;
mod flat;
mod manifest;
mod optim;
mod plan;
mod reshard;
mod timeline;
mod trainer;
mod update;
mod zero;

pub use checkpoint::{checkpoints, latest_checkpoint};
pub use config::{Decay, LossScaleConfig, LossScaler, Schedule, TrainConfig};
pub use flat::{Entry, FlatUnit};
pub use manifest::{EntryLayout, Manifest, ShardFile, UnitLayout, World, MANIFEST};
pub use optim::{AdamW, AdamWConfig};
pub use plan::{Checkpointing, Precision, ZeroStage};
pub use timeline::{MemoryTimeline, PhaseMarker, Sample, Timeline};
pub use trainer::{StepReport, TrainGroups, Trainer};
pub use zero::Zero;
