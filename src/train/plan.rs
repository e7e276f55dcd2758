//! The training plan's vocabulary, shared by the step loop (this layer) and the cost model
//! (`cost`): how activations are kept, how model states are partitioned, which precision.

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// Activation checkpointing per transformer block (Chen et al. 2016; Korthikanti et al. 2022,
/// §5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Checkpointing {
    /// Keep every activation the backward needs.
    #[default]
    None,
    /// Keep only each block's input; recompute the whole block (its collectives included) in
    /// the backward.
    Full,
    /// Recompute only the attention core (the part whose activations grow with s²).
    Selective,
}

impl Checkpointing {
    pub fn name(self) -> &'static str {
        match self {
            Checkpointing::None => "none",
            Checkpointing::Full => "full",
            Checkpointing::Selective => "selective",
        }
    }
}

impl std::str::FromStr for Checkpointing {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Checkpointing, String> {
        match s {
            "none" => Ok(Checkpointing::None),
            "full" => Ok(Checkpointing::Full),
            "selective" => Ok(Checkpointing::Selective),
            other => Err(format!("{other:?} is not a checkpointing mode; use none, full or selective")),
        }
    }
}

/// A ZeRO stage (Rajbhandari et al. 2020) over the sequence-data-parallel ranks (SP x DP, as
/// DeepSpeed's `seq_data_parallel_group`): 0 replicates everything, 1 partitions the optimizer
/// states, 2 also the gradients, 3 also the parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Default)]
#[serde(try_from = "u8", into = "u8")]
pub struct ZeroStage(u8);

impl ZeroStage {
    pub const NONE: ZeroStage = ZeroStage(0);

    /// Stage `stage`, 0 to 3.
    pub fn new(stage: u8) -> Result<ZeroStage> {
        if stage <= 3 {
            Ok(ZeroStage(stage))
        } else {
            Err(Error::InvalidArgument {
                op: "zero",
                group: "-".into(),
                msg: format!("ZeRO stage {stage} does not exist; use 0, 1, 2 or 3"),
            })
        }
    }

    pub fn stage(self) -> u8 {
        self.0
    }

    /// Optimizer states are partitioned (stages 1-3).
    pub fn partitions_optimizer(self) -> bool {
        self.0 >= 1
    }

    /// Gradients are reduce-scattered and kept partitioned (stages 2-3).
    pub fn partitions_gradients(self) -> bool {
        self.0 >= 2
    }

    /// Parameters are partitioned and gathered per block when used (stage 3).
    pub fn partitions_parameters(self) -> bool {
        self.0 >= 3
    }
}

impl TryFrom<u8> for ZeroStage {
    type Error = String;

    fn try_from(stage: u8) -> std::result::Result<ZeroStage, String> {
        ZeroStage::new(stage).map_err(|e| e.to_string())
    }
}

impl From<ZeroStage> for u8 {
    fn from(z: ZeroStage) -> u8 {
        z.0
    }
}

/// Numeric precision of a training run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Precision {
    /// Parameters, activations, gradients and optimizer states in f32.
    #[default]
    F32,
    /// f64 throughout (exactness tests).
    F64,
    /// Mixed precision: bf16 parameters, activations and gradients; f32 master weights and
    /// Adam moments; gradients reduced in f32.
    Bf16,
    /// As `Bf16` with f16, plus dynamic loss scaling (steps with inf/NaN gradients skipped).
    F16,
}

impl Precision {
    /// "f32", "f64", "bf16", "f16": the names configs use.
    pub fn name(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::F64 => "f64",
            Precision::Bf16 => "bf16",
            Precision::F16 => "f16",
        }
    }

    /// The dtype of parameters and activations as the model holds them.
    pub fn kind(self) -> tch::Kind {
        match self {
            Precision::F32 => tch::Kind::Float,
            Precision::F64 => tch::Kind::Double,
            Precision::Bf16 => tch::Kind::BFloat16,
            Precision::F16 => tch::Kind::Half,
        }
    }

    /// Whether f32 master weights are kept beside 16-bit parameters.
    pub fn is_mixed(self) -> bool {
        matches!(self, Precision::Bf16 | Precision::F16)
    }
}

impl std::str::FromStr for Precision {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Precision, String> {
        match s {
            "f32" => Ok(Precision::F32),
            "f64" => Ok(Precision::F64),
            "bf16" => Ok(Precision::Bf16),
            "f16" => Ok(Precision::F16),
            other => Err(format!("{other:?} is not a dtype; use f32, bf16, f16 or f64")),
        }
    }
}
