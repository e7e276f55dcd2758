//! The GPT model: configuration with presets, deterministic initialisation, layers, and the
//! sequence-parallel forward with its loss.

mod config;
mod gpt;
mod grads;
pub mod init;
mod layers;
mod loss;
mod recompute;
mod tiled_mlp;

pub use crate::device::{Offload, OffloadStats, OffloadTarget};
pub use config::{GptConfig, MlpKind, NormKind};
pub use gpt::{shift_labels, shift_labels_packed, Gpt, IGNORE};
pub use layers::{Linear, Norm, Param, Params, Placement, Rope, Split};
pub use loss::{tiled_cross_entropy, Loss};
pub use recompute::{BlockHooks, ForwardOptions, Unit};
pub use tiled_mlp::check_tile as check_mlp_tile;
