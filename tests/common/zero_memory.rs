//! Memory per rank by ZeRO stage, measured on MPI processes (one process per rank, so each
//! reading is that rank's own RSS) and by formula. Shared by the quick test (tests/mpi.rs) and
//! the benchmark (benches/zero_memory.rs), which runs more shapes and checkpointing.
//!
//! Each measurement is `mpirun -n 4 ulysses step --backend mpi` (Ulysses, SP 4, bf16 with f32
//! master weights, AdamW, b = 1) with glibc's mmap threshold fixed at 64 KiB, so that freed
//! buffers leave the RSS instead of staying in the heap (its default threshold grows with the
//! blocks freed).
//!
//! The formula: model states by stage (Rajbhandari et al. 2020; 2 + 2 + 12 bytes per parameter),
//! as the cost model computes them (`cost::zero::model_states`), plus what a step holds besides,
//! each term named:
//! - gradients of the units in flight (stages 2-3: the embedding/head unit's, held from the
//!   head's backward to the embedding's, and one block's) and, stage 3, those units' gathered
//!   parameters;
//! - the reduction's buffers in f32: stages 0-1 all-reduce with two buckets in flight (each
//!   its copy and the P slots of 1/P the ranks send it) and the reduced part of the one
//!   completing; stages 2-3 reduce-scatter buckets of 1/P (the bucket, up to P slots of it on
//!   the rank that owns it, the result);
//! - the optimizer's temporaries (five f32 chunks of 2^20 elements);
//! - activations (Korthikanti et al. 2022, §4: 34 s b h / P bytes per layer with 16-bit values
//!   and a flash kernel; full checkpointing keeps 2 s b h / P per layer plus one layer in
//!   recompute) and the logits (bf16, their f32 copy, the log-softmax and its gradient in f32).

use std::path::Path;

use anyhow::{bail, Context, Result};
use ulysses::attention::StrategyConfig;
use ulysses::comm::{mpirun_command, BUCKETS_IN_FLIGHT, DEFAULT_BUCKET_ELEMS};
use ulysses::cost::memory::params_on_rank;
use ulysses::cost::zero::model_states;
use ulysses::cost::Job;
use ulysses::model::GptConfig;
use ulysses::train::{Precision, ZeroStage};

pub const MIB: f64 = (1 << 20) as f64;
/// Ranks (MPI processes).
pub const W: f64 = 4.0;
const BUCKET: f64 = DEFAULT_BUCKET_ELEMS as f64;
const CHUNK: f64 = (1 << 20) as f64;

/// A GPT of `layers` blocks, hidden `h`, vocabulary `v` (tied), sequence `s`, b = 1.
#[derive(Clone, Copy, Debug)]
pub struct Shape {
    pub layers: f64,
    pub h: f64,
    pub v: f64,
    pub s: f64,
}

impl Shape {
    pub fn block(&self) -> f64 {
        12.0 * self.h * self.h + 13.0 * self.h
    }
    pub fn outer(&self) -> f64 {
        self.v * self.h + 2.0 * self.h
    }
    pub fn params(&self) -> f64 {
        self.layers * self.block() + self.outer()
    }
}

/// The model states of one rank by the cost model (`cost::zero::model_states`: 2 + 2 + 12 bytes
/// per parameter, split by stage over the W ranks, buffers padded to a multiple of W), in bytes:
/// (parameters, gradients, optimizer states).
pub fn states_bytes(shape: Shape, stage: u8) -> Result<(f64, f64, f64)> {
    let model = GptConfig {
        n_layer: shape.layers as i64,
        n_embd: shape.h as i64,
        n_head: 8,
        n_kv_head: 8,
        vocab_size: shape.v as i64,
        ..GptConfig::preset("125m")?
    };
    let job = Job {
        precision: Precision::Bf16,
        zero: ZeroStage::new(stage)?,
        backend: "mpi".into(),
        ..Job::new(model, StrategyConfig::Ulysses, W as usize, shape.s as i64)
    };
    Ok(model_states(&job, &params_on_rank(&job)))
}

/// (model states, everything else a step holds) in MiB per rank.
pub fn formula(shape: Shape, stage: u8, ckpt: &str) -> Result<(f64, f64)> {
    let psi = shape.params();
    // 16 Psi, 4 Psi + 12 Psi/W, 2 Psi + 14 Psi/W, 16 Psi/W.
    let (p, g, o) = states_bytes(shape, stage)?;
    let (outer, block) = (shape.outer(), shape.block());
    let in_flight = match stage {
        0 | 1 => 0.0,
        2 => 2.0 * (outer + block),
        _ => 4.0 * (outer + block),
    };
    let buckets = if stage < 2 {
        2.0 * psi.min(BUCKETS_IN_FLIGHT as f64 * BUCKET) + psi.min(BUCKET) / W
    } else {
        (1.0 + 2.0 / W) * BUCKET.min(W * outer.max(block))
    } * 4.0;
    let optimizer = 5.0 * CHUNK * 4.0;
    let sr = shape.s / W;
    let layer = 34.0 * sr * shape.h;
    let activations = match ckpt {
        "full" => shape.layers * 2.0 * sr * shape.h + layer,
        _ => shape.layers * layer,
    };
    let logits = sr * shape.v * (2.0 + 4.0 + 4.0 + 4.0);
    Ok(((p + g + o) / MIB, (in_flight + buckets + optimizer + activations + logits) / MIB))
}

/// One rank's memory, MiB above the RSS before the model existed (the largest rank's).
#[derive(Clone, Copy, Debug)]
pub struct Measured {
    /// After the model and the optimizer are built.
    pub built: f64,
    /// The peak over the steps.
    pub peak: f64,
    /// After the steps.
    pub after: f64,
}

/// Runs `ulysses step` (`program`) on 4 MPI processes and reads its summary.
pub fn measure(program: &Path, shape: Shape, stage: u8, ckpt: &str, steps: usize) -> Result<Measured> {
    let args: Vec<String> = [
        "step",
        "--backend",
        "mpi",
        "--ranks",
        "4",
        "--preset",
        "125m",
        "--dtype",
        "bf16",
        "--lr",
        "1e-4",
        "--n-head",
        "8",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([
        "--steps".into(),
        steps.to_string(),
        "--n-layer".into(),
        (shape.layers as i64).to_string(),
        "--n-embd".into(),
        (shape.h as i64).to_string(),
        "--vocab".into(),
        (shape.v as i64).to_string(),
        "--seq".into(),
        (shape.s as i64).to_string(),
        "--zero".into(),
        stage.to_string(),
        "--checkpointing".into(),
        ckpt.into(),
    ])
    .collect();
    let out = mpirun_command(W as usize, program, &args).env("MALLOC_MMAP_THRESHOLD_", "65536").output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let Some(line) = text.lines().find(|l| l.contains("summary:")) else {
        bail!("ulysses step failed: {text}{}", String::from_utf8_lossy(&out.stderr));
    };
    Ok(Measured {
        built: field(line, "built_mib_per_rank")?,
        peak: field(line, "peak_above_start_mib_per_rank")?,
        after: field(line, "after_steps_mib_per_rank")?,
    })
}

/// `key=value` from the summary line of `ulysses step`.
fn field(summary: &str, key: &str) -> Result<f64> {
    let value = summary
        .split_whitespace()
        .find_map(|kv| kv.strip_prefix(&format!("{key}=")))
        .with_context(|| format!("no {key} in {summary:?}"))?;
    Ok(value.parse()?)
}
