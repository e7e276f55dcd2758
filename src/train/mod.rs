//! Training: the optimizer, and the plan types ([`Checkpointing`], [`ZeroStage`], [`Precision`])
//! that the step loop and the cost model share.

mod optim;
mod plan;

pub use optim::{AdamW, AdamWConfig};
pub use plan::{Checkpointing, Precision, ZeroStage};
