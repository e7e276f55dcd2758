//! The GPT model: configuration with presets, deterministic initialisation, layers, and the
//! sequence-parallel forward with its loss.

mod config;
mod gpt;
pub mod init;
mod layers;

pub use config::GptConfig;
pub use gpt::{shift_labels, Gpt, Loss, IGNORE};
pub use layers::{LayerNorm, Linear, Param, Params, Placement, Rope, Split};
