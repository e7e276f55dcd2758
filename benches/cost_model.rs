//! The cost model against the project's own measured runs: the quickstart and the toy E1, E2
//! and E4, each on thread ranks (local backend) and on MPI processes, predicted from this
//! machine's hardware file (the preset `ulysses calibrate` wrote on this CPU: `cpu_preset_for_host`;
//! `-- --hardware FILE` for another).
//! For every point: measured / predicted step time (median over steps of the slowest rank)
//! and peak memory per rank (RSS above the built model, as the runs measure it), and whether
//! they land within the goals (time ±25%, memory ±15%). Accuracy is reported here, not
//! asserted in CI: a shared machine's noise would make it flaky.
//!
//! Run: `cargo bench --features mpi --bench cost_model` (`-- local` or `-- mpi` for one
//! backend, `-- --hardware FILE` for another file). Writes `results/cost_validation/`.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use ulysses::cost::Hardware;
use ulysses::experiment::{predict_experiment, run, side_by_side, Backend, ExperimentConfig, RunOptions};

const CONFIGS: [&str; 4] = ["quickstart", "e1_throughput_toy", "e2_dense_toy", "e4_memory_toy"];

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map_or("?".into(), |l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let hw_path = args
        .iter()
        .position(|a| a == "--hardware")
        .and_then(|i| args.get(i + 1).cloned())
        .unwrap_or_else(|| ulysses::cost::hardware::cpu_preset_for_host().to_string());
    let hw = Hardware::load(&hw_path)?;
    let backends: Vec<Backend> = match (args.iter().any(|a| a == "local"), args.iter().any(|a| a == "mpi")) {
        (true, false) => vec![Backend::Local],
        (false, true) => vec![Backend::Mpi],
        _ => vec![Backend::Local, Backend::Mpi],
    };
    let out = repo.join("results/cost_validation");
    std::fs::create_dir_all(&out)?;
    println!(
        "== cost model vs measured, {} ({}), load average before: {} ==",
        hw.name,
        hw_path,
        load_average()
    );
    let mut csv = String::from(
        "config,backend,strategy,ranks,seq,measured_ms,predicted_ms,time_ratio,measured_mib,predicted_mib,memory_ratio\n",
    );
    let mut rows = Vec::new();
    for backend in &backends {
        for name in CONFIGS {
            let mut cfg = ExperimentConfig::load(&repo.join(format!("experiments/{name}.toml")))?;
            let tag = if *backend == Backend::Mpi { "mpi" } else { "threads" };
            cfg.name = format!("{name}-{tag}");
            cfg.parallel.backend = *backend;
            let dir = out.join(&cfg.name);
            if dir.exists() {
                std::fs::remove_dir_all(&dir)?;
            }
            cfg.output = Some(dir.clone());
            let opts = RunOptions {
                resume: false,
                base_dir: repo.clone(),
                program: Some(PathBuf::from(env!("CARGO_BIN_EXE_ulysses"))),
            };
            run(&cfg, &opts).with_context(|| format!("running {}", cfg.name))?;
            predict_experiment(&cfg, &hw, Path::new("/"))?;
            for (_, table) in side_by_side(&dir)? {
                let s = |c: &str| -> Result<Vec<String>> {
                    let col = table.column(c)?.cast(&ulysses::polars::prelude::DataType::String)?;
                    Ok(col.str()?.iter().map(|v| v.unwrap_or("").to_string()).collect())
                };
                let f = |c: &str| -> Result<Vec<f64>> {
                    let col = table.column(c)?.cast(&ulysses::polars::prelude::DataType::Float64)?;
                    Ok(col.f64()?.iter().map(|v| v.unwrap_or(f64::NAN)).collect())
                };
                let (st, ra, sq) = (s("strategy")?, s("ranks")?, s("seq")?);
                let (mt, pt, mm, pm) =
                    (f("measured_ms")?, f("predicted_ms")?, f("measured_mib")?, f("predicted_mib")?);
                for i in 0..st.len() {
                    writeln!(
                        csv,
                        "{name},{tag},{},{},{},{:.2},{:.2},{:.3},{:.2},{:.2},{:.3}",
                        st[i],
                        ra[i],
                        sq[i],
                        mt[i],
                        pt[i],
                        pt[i] / mt[i],
                        mm[i],
                        pm[i],
                        pm[i] / mm[i]
                    )?;
                    rows.push((
                        name,
                        tag,
                        st[i].clone(),
                        ra[i].clone(),
                        sq[i].clone(),
                        mt[i],
                        pt[i],
                        mm[i],
                        pm[i],
                    ));
                }
            }
        }
    }
    println!("| config | backend | strategy | P | N | step ms measured | predicted | pred/meas | MiB/rank measured | predicted | pred/meas |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    let (mut time_ok, mut mem_ok) = (0, 0);
    for (c, b, s, p, n, mt, pt, mm, pm) in &rows {
        let (tr, mr) = (pt / mt, pm / mm);
        time_ok += usize::from((0.75..=1.25).contains(&tr));
        mem_ok += usize::from((0.85..=1.15).contains(&mr));
        println!(
            "| {c} | {b} | {s} | {p} | {n} | {mt:.1} | {pt:.1} | {tr:.2} | {mm:.1} | {pm:.1} | {mr:.2} |"
        );
    }
    println!(
        "step time within ±25%: {time_ok}/{n} points; memory within ±15%: {mem_ok}/{n} points (load average after: {})",
        load_average(),
        n = rows.len()
    );
    std::fs::write(out.join("summary.csv"), csv)?;
    println!("-> {}", out.join("summary.csv").display());
    Ok(())
}
