//! GPT benchmarks, each a ratio against a baseline measured in the same run.
//!
//! 1. Step time (forward + backward) of the GPT with Ulysses at P=1 (tape, all-to-alls as local
//!    copies) against the plain single-device model (no tape, plain autograd), interleaved in
//!    one process: tiny and 125M.
//! 2. Memory per rank at P = 1, 2, 4 for one global sequence: each P runs in its own process
//!    (`ulysses step`), which reports its peak RSS above the RSS after the models were built.
//!
//! Run: `cargo bench --bench model` (add `-- --quick` for fewer repetitions).

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use common::field;
use tch::{Device, Kind, Tensor};
use ulysses::attention::{AttentionConfig, SingleDevice, UlyssesAttention};
use ulysses::autograd::Tape;
use ulysses::comm::launch;
use ulysses::model::{shift_labels, Gpt, GptConfig};

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn step_time(preset: &str, b: i64, n: i64, runs: usize) -> Result<()> {
    let cfg = GptConfig::preset(preset)?;
    let attention = AttentionConfig::default(); // SDPA, causal
    let out = launch(1, |ctx| -> Result<[Duration; 3]> {
        let single = || -> Result<Gpt> {
            let strategy = SingleDevice::new(attention.build()?, n, cfg.n_head, cfg.n_kv_head)?;
            Ok(Gpt::new(&cfg, Box::new(strategy), Kind::Float, Device::Cpu)?)
        };
        let (plain, cut) = (single()?, single()?);
        let strategy =
            UlyssesAttention::new(ctx.world().clone(), attention.build()?, n, cfg.n_head, cfg.n_kv_head)?;
        let ulysses = Gpt::new(&cfg, Box::new(strategy), Kind::Float, Device::Cpu)?;
        let i = Tensor::arange(b * n, (Kind::Int64, Device::Cpu));
        let tokens = (&i * 7919 + 17).remainder(cfg.vocab_size).reshape([b, n]);
        let labels = shift_labels(&tokens)?;
        let mut times: [Vec<Duration>; 3] = Default::default();
        for i in 0..runs + 1 {
            // Interleaved, so that drift on a noisy machine hits all three alike.
            for (v, t) in times.iter_mut().enumerate() {
                let t0 = Instant::now();
                match v {
                    // Plain autograd: one loss.backward() over the whole graph.
                    0 => plain.forward_backward(&tokens, &labels).map(drop)?,
                    // The same single-device model through a recording tape (cuts only).
                    1 => {
                        let tape = Tape::new();
                        let loss = cut.loss(&tape, &tokens, &labels)?;
                        tape.backward(&loss.local)?;
                    }
                    _ => ulysses.forward_backward(&tokens, &labels).map(drop)?,
                }
                if i > 0 {
                    t.push(t0.elapsed());
                }
            }
            for m in [&plain, &cut, &ulysses] {
                m.zero_grad();
            }
        }
        Ok(times.map(median))
    })?;
    let [plain, cut, ulysses] = out[0];
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!(
        "{preset:>6} {b:>3} {n:>6} {runs:>5} {:>10.1} {:>10.1} {:>11.1} {:>14.3}x {:>12.3}x",
        ms(plain),
        ms(cut),
        ms(ulysses),
        ulysses.as_secs_f64() / plain.as_secs_f64(),
        ulysses.as_secs_f64() / cut.as_secs_f64()
    );
    Ok(())
}

fn memory_per_rank(preset: &str, n: i64) -> Result<()> {
    println!(
        "\n== memory per rank, {preset}, one global sequence N={n}, f32, Ulysses on P ranks (threads) =="
    );
    println!("{:>4} {:>16} {:>16} {:>14}", "P", "step peak MiB", "vs P=1", "median s/step");
    let mut first = None;
    for p in [1usize, 2, 4] {
        let out = Command::new(env!("CARGO_BIN_EXE_ulysses"))
            .args([
                "step",
                "--preset",
                preset,
                "--seq",
                &n.to_string(),
                "--ranks",
                &p.to_string(),
                "--steps",
                "1",
            ])
            .output()?;
        let text = String::from_utf8_lossy(&out.stdout);
        let Some(summary) = text.lines().find(|l| l.starts_with("summary:")) else {
            bail!("ulysses step failed: {}{}", text, String::from_utf8_lossy(&out.stderr));
        };
        let mib = field(summary, "step_peak_mib_per_rank")?;
        let base = *first.get_or_insert(mib);
        println!(
            "{p:>4} {mib:>16.1} {:>15.2}x {:>14.2}",
            mib / base,
            field(summary, "median_step_ms")? / 1e3
        );
    }
    println!("(peak RSS of the process during the steps above its RSS after the models were built,");
    println!(" divided by P: activations, gradients and buffers of one rank; 1/P scaling is 0.50x, 0.25x)");
    Ok(())
}

fn main() -> Result<()> {
    let quick = std::env::args().any(|a| a == "--quick");
    println!("== GPT step (forward + backward), f32, one thread: plain single device vs Ulysses at P=1 ==");
    println!(
        "{:>6} {:>3} {:>6} {:>5} {:>10} {:>10} {:>11} {:>15} {:>13}",
        "model", "b", "N", "runs", "plain ms", "cuts ms", "ulysses ms", "ulysses/plain", "ulysses/cuts"
    );
    step_time("tiny", 4, 1024, if quick { 3 } else { 21 })?;
    step_time("125m", 1, 256, if quick { 1 } else { 5 })?;
    println!("(medians; plain: single device, one loss.backward(); cuts: single device through a recording");
    println!(" tape, which splits the backward at every block; ulysses: P=1, the tape, all-to-alls as local copies)");
    memory_per_rank("tiny", if quick { 4096 } else { 16384 })?;
    Ok(())
}
