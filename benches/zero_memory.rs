//! Peak memory per rank by ZeRO stage and activation checkpointing, measured on MPI processes
//! (one process per rank, so each reading is that rank's own RSS), against the formulas.
//!
//! Each row is `mpirun -n 4 ulysses step --backend mpi` (Ulysses, SP 4, bf16 with f32 master
//! weights, AdamW): the peak RSS during two steps (after the model is built; building holds
//! transient copies) above the RSS before the model existed. glibc's mmap threshold is fixed at
//! 64 KiB for these processes, so that freed buffers leave the RSS instead of staying in the
//! heap (its default threshold grows with the blocks freed).
//!
//! The formula: model states by stage (Rajbhandari et al. 2020; the paper's 2 + 2 + 12 bytes per
//! parameter), as the cost model computes them (`cost::zero::model_states`), plus what a step
//! holds besides, each term named:
//! - gradients of the units in flight (stages 2-3: the embedding/head unit's, held from the head's
//!   backward to the embedding's, and one block's) and, stage 3, those units' gathered
//!   parameters;
//! - the reduction's buffers in f32: for the all-reduce, the bucket, its P slots of 1/P and the
//!   result; for the reduce-scatter (buckets of 1/P), the bucket, the P slots of the rank that
//!   owns it and the result;
//! - the optimizer's temporaries (five f32 chunks of 2^20 elements);
//! - activations (Korthikanti et al. 2022, §4: 34 s b h / P bytes per layer with 16-bit values
//!   and a flash kernel; full checkpointing keeps 2 s b h / P per layer plus one layer in
//!   recompute) and the logits (bf16, their f32 copy, the log-softmax and its gradient in f32).
//!
//! Run: `cargo bench --features mpi --bench zero_memory`.

mod common;

use std::path::Path;

use anyhow::{bail, Result};
use common::field;
use ulysses::attention::StrategyConfig;
use ulysses::comm::mpirun_command;
use ulysses::cost::memory::params_on_rank;
use ulysses::cost::zero::model_states;
use ulysses::cost::Job;
use ulysses::model::GptConfig;
use ulysses::train::{Precision, ZeroStage};

const MIB: f64 = (1 << 20) as f64;
const W: f64 = 4.0;
const BUCKET: f64 = (1 << 22) as f64;
const CHUNK: f64 = (1 << 20) as f64;

/// A GPT of `layers` blocks, hidden `h`, vocabulary `v` (tied), sequence `s`, b = 1.
#[derive(Clone, Copy)]
struct Shape {
    layers: f64,
    h: f64,
    v: f64,
    s: f64,
}

impl Shape {
    fn block(&self) -> f64 {
        12.0 * self.h * self.h + 13.0 * self.h
    }
    fn outer(&self) -> f64 {
        self.v * self.h + 2.0 * self.h
    }
    fn params(&self) -> f64 {
        self.layers * self.block() + self.outer()
    }
}

/// The model states of one rank by the cost model (`cost::zero::model_states`: 2 + 2 + 12 bytes
/// per parameter, split by stage over the W ranks, buffers padded to a multiple of W), in bytes.
fn states_bytes(shape: Shape, stage: u8) -> Result<f64> {
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
    let (p, g, o) = model_states(&job, &params_on_rank(&job));
    Ok(p + g + o)
}

/// (model states, everything else) in MiB per rank.
fn formula(shape: Shape, stage: u8, ckpt: &str) -> Result<(f64, f64)> {
    let psi = shape.params();
    // 16 Psi, 4 Psi + 12 Psi/W, 2 Psi + 14 Psi/W, 16 Psi/W.
    let states = states_bytes(shape, stage)?;
    let (o, b) = (shape.outer(), shape.block());
    let in_flight = match stage {
        0 | 1 => 0.0,
        2 => 2.0 * (o + b),
        _ => 4.0 * (o + b),
    };
    // All-reduce (stages 0-1): the bucket, P slots of 1/P, the result. Reduce-scatter (stages
    // 2-3, buckets of 1/P): the bucket, up to P slots of it on the rank that owns it, the result.
    let buckets =
        if stage < 2 { 3.0 * BUCKET.min(psi) } else { (1.0 + 2.0 / W) * BUCKET.min(W * o.max(b)) } * 4.0;
    let optimizer = 5.0 * CHUNK * 4.0;
    let sr = shape.s / W;
    let layer = 34.0 * sr * shape.h;
    let activations = match ckpt {
        "full" => shape.layers * 2.0 * sr * shape.h + layer,
        _ => shape.layers * layer,
    };
    let logits = sr * shape.v * (2.0 + 4.0 + 4.0 + 4.0);
    Ok((states / MIB, (in_flight + buckets + optimizer + activations + logits) / MIB))
}

/// Peak MiB per rank above the start, measured.
fn measure(program: &Path, shape: Shape, stage: u8, ckpt: &str) -> Result<f64> {
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
        "--steps",
        "1",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([
        "--n-layer".into(),
        (shape.layers as i64).to_string(),
        "--n-embd".into(),
        (shape.h as i64).to_string(),
        "--n-head".into(),
        "8".into(),
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
    let out = mpirun_command(4, program, &args).env("MALLOC_MMAP_THRESHOLD_", "65536").output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let Some(line) = text.lines().find(|l| l.contains("summary:")) else {
        bail!("ulysses step failed: {text}{}", String::from_utf8_lossy(&out.stderr));
    };
    field(line, "peak_above_start_mib_per_rank")
}

fn main() -> Result<()> {
    let program = Path::new(env!("CARGO_BIN_EXE_ulysses"));
    let short = Shape { layers: 8.0, h: 512.0, v: 8192.0, s: 256.0 };
    let long = Shape { s: 4096.0, ..short };
    println!(
        "== peak memory per rank, MPI processes, Ulysses SP 4, bf16 + f32 masters, AdamW, {:.1}M parameters ==",
        short.params() / 1e6
    );
    println!(
        "{:>6} {:>5} {:>10} {:>10} {:>11} {:>12} {:>9} {:>12} {:>12} {:>6}",
        "N",
        "ZeRO",
        "ckpt",
        "states MiB",
        "others MiB",
        "formula MiB",
        "measured",
        "formula/base",
        "measured/base",
        "ok"
    );
    let rows: Vec<(Shape, u8, &str)> = [0u8, 1, 2, 3]
        .iter()
        .flat_map(|&z| [(short, z, "none"), (short, z, "full")])
        .chain([(long, 3, "none"), (long, 3, "selective"), (long, 3, "full")])
        .collect();
    // (N, checkpointing) -> (formula, measured) of ZeRO 0, the ratios' base.
    let mut base: Vec<((f64, String), (f64, f64))> = Vec::new();
    let mut long_none = None;
    for (shape, stage, ckpt) in rows {
        let (states, others) = formula(shape, stage, ckpt)?;
        let measured = measure(program, shape, stage, ckpt)?;
        let total = states + others;
        let key = (shape.s, ckpt.to_string());
        if stage == 0 {
            base.push((key.clone(), (total, measured)));
        }
        let cells = match base.iter().find(|(k, _)| *k == key) {
            Some((_, (f0, m0))) => {
                let (fr, mr) = (total / f0, measured / m0);
                let ok = if (mr / fr - 1.0).abs() <= 0.15 { "yes" } else { "NO" };
                format!("{fr:>11.3}x {mr:>11.3}x {ok:>6}")
            }
            None => {
                // Checkpointing at one stage: what the step holds besides the model states.
                let (f, m) = (others, measured - states);
                let (f0, m0) = *long_none.get_or_insert((f, m));
                format!("{:>11.3}x {:>11.3}x {:>6}", f / f0, m / m0, "-")
            }
        };
        println!(
            "{:>6} {stage:>5} {ckpt:>10} {states:>10.1} {others:>11.1} {total:>12.1} {measured:>9.1} {cells}",
            shape.s
        );
    }
    println!("(measured: peak RSS over the steps above the RSS before the model, the largest rank's. N=256: ratios");
    println!(
        " against ZeRO 0 with the same checkpointing; ok: the measured ratio within 15% of the formula's."
    );
    println!(
        " N=4096, ZeRO 3: what the step holds besides the model states (measured minus the states formula)"
    );
    println!(" against no checkpointing: activations and logits dominate it)");
    Ok(())
}
