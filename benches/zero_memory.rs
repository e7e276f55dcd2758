//! Peak memory per rank by ZeRO stage and activation checkpointing, measured on MPI processes
//! (one process per rank, so each reading is that rank's own RSS), against the formulas of
//! tests/common/zero_memory.rs (which says what each term is). The test command runs the quick
//! form (ZeRO 0-3 without checkpointing: tests/mpi.rs); this runs every stage with and without
//! checkpointing and the long sequence's checkpointing modes.
//!
//! Run: `cargo bench --features mpi --bench zero_memory`.

#[allow(dead_code)]
#[path = "../tests/common/zero_memory.rs"]
mod zero_memory;

use std::path::Path;

use anyhow::Result;
use zero_memory::{formula, measure, Shape};

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
        let measured = measure(program, shape, stage, ckpt, 1)?.peak;
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
