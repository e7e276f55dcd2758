//! Every kind of chart the report and the notebooks draw, written as SVG and PNG into a folder
//! (default `results/charts`), to look at after changing the chart code:
//!
//!     cargo run --release --example charts [folder]
//!
//! The data are made up (shapes like the real ones); the real charts come from `ulysses report`,
//! `ulysses predict` and the notebooks.

use std::path::PathBuf;

use ulysses::experiment::{Axis, BarChart, Bars, Chart, Collective, Series, Unit};

fn main() -> anyhow::Result<()> {
    let dir = PathBuf::from(std::env::args().nth(1).unwrap_or_else(|| "results/charts".into()));
    std::fs::create_dir_all(&dir)?;
    let mut files = Vec::new();

    // Lines on log-log axes: bytes per rank against ranks, one line per strategy.
    let ps = [2.0, 4.0, 8.0, 16.0];
    let line = |name: &str, f: &dyn Fn(f64) -> f64| Series {
        name: name.into(),
        points: ps.iter().map(|&p| (p, f(p))).collect(),
    };
    let h = 4096.0 * 2.0;
    let n = 65536.0;
    let bytes = Chart::new(
        "Made-up data: bytes per rank, one layer, N = 64K, h = 4096 (bf16)",
        Axis::log("ranks P", Unit::Count),
        Axis::log("sent per rank", Unit::Bytes),
        vec![
            line("ulysses", &|p| 8.0 * n * h * (p - 1.0) / (p * p)),
            line("megatron_sp", &|p| 10.0 * n * h * (p - 1.0) / p),
            line("ring", &|p| 6.0 * n * h * (p - 1.0) / p),
            line("allgather_kv", &|p| 4.0 * n * h * (p - 1.0) / p),
        ],
    );
    files.extend(bytes.write(&dir.join("lines_log_log"))?);

    // Throughput against the sequence length on a log x axis (tokens), linear y from zero.
    let seqs = [8192.0, 32768.0, 131072.0, 262144.0, 524288.0, 1048576.0];
    let tput = |name: &str, top: f64, fall: f64| Series {
        name: name.into(),
        points: seqs.iter().map(|&s| (s, top / (1.0 + s / fall))).collect(),
    };
    let throughput = Chart::new(
        "Made-up data: TFLOP/s per GPU against N",
        Axis::log("sequence length N", Unit::Tokens),
        Axis::linear("TFLOP/s per GPU", Unit::Number).from_zero(),
        vec![tput("ulysses", 190.0, 4e6), tput("megatron_sp", 150.0, 3e5), tput("ring_zigzag", 120.0, 1e6)],
    );
    files.extend(throughput.write(&dir.join("lines_log_x"))?);

    // Loss curves, linear axes; two lines of one strategy are shades of its colour.
    let steps: Vec<f64> = (0..40).map(f64::from).collect();
    let loss = |name: &str, a: f64| Series {
        name: name.into(),
        points: steps.iter().map(|&s| (s, 5.5 * (-s / a).exp() + 2.0)).collect(),
    };
    let curves = Chart::new(
        "Made-up data: loss",
        Axis::linear("step", Unit::Count),
        Axis::linear("loss (nats per token)", Unit::Number),
        vec![
            loss("one device", 20.0),
            loss("ulysses zero0", 20.0),
            loss("ulysses zero3", 21.0),
            loss("megatron_sp", 22.0),
        ],
    );
    files.extend(curves.write(&dir.join("lines_linear"))?);

    // Grouped bars: memory per rank by ZeRO stage, measured beside the formula.
    let mib = |v: f64| v * 1048576.0;
    let grouped = BarChart::grouped(
        "Made-up data: model states per rank by ZeRO stage",
        "ZeRO stage",
        ["0", "1", "2", "3"].map(String::from).to_vec(),
        Axis::linear("per rank", Unit::Bytes),
        vec![
            Bars { name: "formula".into(), values: vec![mib(16.0), mib(7.0), mib(5.5), mib(4.0)] },
            Bars { name: "measured".into(), values: vec![mib(16.4), mib(7.2), mib(5.6), mib(4.3)] },
        ],
    );
    files.extend(grouped.write(&dir.join("bars_grouped"))?);

    // Stacked bars: where a step's time goes, per strategy.
    let stacked = BarChart::stacked(
        "Made-up data: where a step's time goes",
        "strategy",
        ["ulysses", "megatron_sp", "ring_zigzag"].map(String::from).to_vec(),
        Axis::linear("time per step", Unit::Seconds),
        vec![
            Bars { name: "compute".into(), values: vec![18.9, 19.5, 21.0] },
            Bars { name: "all-to-all".into(), values: vec![1.1, 0.0, 0.0] },
            Bars { name: "all-gather".into(), values: vec![0.0, 6.0, 3.0] },
            Bars { name: "ZeRO".into(), values: vec![2.6, 0.4, 2.6] },
            Bars { name: "gradient reduction".into(), values: vec![0.0, 1.2, 0.0] },
        ],
    );
    files.extend(stacked.write(&dir.join("bars_stacked"))?);

    // A collective: the all-to-all of 4 ranks, before and after.
    let before: Vec<Vec<f64>> = (0..4).map(|r| (0..8).map(|i| (100 * r + i) as f64).collect()).collect();
    let after: Vec<Vec<f64>> = (0..4)
        .map(|h| (0..4).flat_map(|s| (0..2).map(move |t| (100 * s + 4 * t + h) as f64)).collect())
        .collect();
    let mut a2a = Collective::new(
        "All-to-all on 4 ranks: value = 100 x rank + position",
        "all-to-all",
        before,
        after,
        |v| Some((v / 100.0) as usize),
    );
    a2a.before_caption = "before: 2 tokens x 4 heads per rank".into();
    a2a.after_caption = "after: 8 tokens x 1 head per rank".into();
    files.extend(ulysses::experiment::Figure::write_sized(&a2a, &dir.join("collective"), (900, 330))?);

    for f in files.iter().filter(|f| f.extension().is_some_and(|e| e == "png")) {
        println!("{}", f.display());
    }
    Ok(())
}
