//! Training: the optimizer (more of this layer, ZeRO and mixed precision, comes later).

mod optim;

pub use optim::{AdamW, AdamWConfig};
