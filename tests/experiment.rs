//! Experiments end to end: every shipped config validates, bad configs are refused with the
//! field and the fix, a toy run writes the tables with the right schema and values, a run never
//! overwrites another, resumes, survives being killed mid-sweep, and reports with plots.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use polars::prelude::*;
use ulysses::cost::Job;
use ulysses::experiment::{
    font_ready, read_table, report, run, Axis, Chart, ExperimentConfig, HtmlTable, RunOptions, Series, Unit,
};
use ulysses::train::Precision;

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ulysses-exp-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("a scratch folder");
    dir
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A toy config: tiny GPT, `ranks` thread ranks, `steps` steps.
fn toy(name: &str, strategies: &str, ranks: &str, seq: &str, steps: usize) -> String {
    format!(
        r#"
name = "{name}"
[model]
preset = "tiny"
n_layer = 1
[parallel]
ranks = {ranks}
strategies = {strategies}
[train]
seq = {seq}
steps = {steps}
warmup = 1
"#
    )
}

#[test]
fn every_shipped_config_validates() -> Result<()> {
    let mut n = 0;
    for entry in std::fs::read_dir(repo().join("experiments"))? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "toml") {
            let cfg = ExperimentConfig::load(&path).with_context(|| path.display().to_string())?;
            ensure!(!cfg.points()?.is_empty(), "{}: no points", path.display());
            n += 1;
        }
    }
    ensure!(n >= 13, "only {n} configs in experiments/");
    // The toy ones can run here; the paper-scale ones name a cluster backend.
    let quick = ExperimentConfig::load(&repo().join("experiments/quickstart.toml"))?;
    quick.check_runnable(&repo())?;
    // (Without a GPU, the NCCL check names what is missing; tests/launch.rs checks the rest.)
    let paper = ExperimentConfig::load(&repo().join("experiments/e1_throughput_paper.toml"))?;
    if !ulysses::device::load_cuda() {
        let err = paper.check_runnable(&repo()).expect_err("nccl").to_string();
        ensure!(err.contains("parallel.backend") && err.contains("nccl"), "{err}");
    }
    Ok(())
}

#[test]
fn bad_configs_name_the_field_and_the_fix() -> Result<()> {
    let base = toy("bad", r#"["ulysses"]"#, "[2]", "[64]", 1);
    let cases: Vec<(String, &str)> = vec![
        (base.replace("steps = 1", "steps = 1\nlearning_rate = 3"), "unknown field `learning_rate`"),
        (
            base.replace(r#"["ulysses"]"#, r#"["ulysses", "tree"]"#),
            "parallel.strategies[1]: unknown strategy \"tree\"",
        ),
        (
            base.replace(r#"preset = "tiny""#, r#"preset = "7b""#),
            "model.preset: gpt_config on group -: no preset \"7b\"",
        ),
        (
            base.replace("ranks = [2]", "ranks = [3]\ndp = 2"),
            "parallel.ranks: 3 ranks cannot hold dp = 2 replicas",
        ),
        (base.replace("ranks = [2]", "ranks = [8]"), "ulysses P=8 N=64 (SP degree 8) cannot run: head_plan"),
        (
            base.replace(r#"["ulysses"]"#, r#"["ring"]"#).replace("[64]", "[63]"),
            "ring attention needs N divisible by P (N=63, P=2)",
        ),
        (base.replace("steps = 1", "steps = 1\ndtype = \"f8\""), "train.dtype: \"f8\" is not a dtype"),
        (
            base.replace("steps = 1", "steps = 1\nzero = [0, 2]"),
            "train.zero: ZeRO stage 2 partitions the optimizer states; it needs [train.adamw]",
        ),
        (base.replace("steps = 1", "steps = 1\nzero = 5"), "ZeRO stage 5 does not exist; use 0, 1, 2 or 3"),
        (base.replace("steps = 1", "steps = 1\ncheckpointing = \"half\""), "unknown variant `half`"),
        (base.replace("seq = [64]", "seq = []"), "train.seq: [] must list sequence lengths"),
        (format!("{base}[attention]\nmask = \"diagonal\"\n"), "attention.mask: unknown mask \"diagonal\""),
        (
            format!("{base}[attention]\nkernel = \"blocked\"\n"),
            "Causal is dense; use the sdpa or math kernel",
        ),
        (format!("{base}[train.adamw]\nlr = -1.0\n"), "train.adamw: lr and eps must be positive"),
        (
            base.replace("ranks = [2]", "ranks = [2]\ndevice = \"tpu\""),
            "parallel.device: \"tpu\": use cpu or cuda",
        ),
        (
            base.replace("name = \"bad\"", "name = \"a/b\""),
            "name: \"a/b\" must be a non-empty name without slashes",
        ),
    ];
    for (text, says) in &cases {
        let err = ExperimentConfig::parse(text, "test.toml").expect_err(says).to_string();
        ensure!(err.contains(says), "expected {says:?} in: {err}");
    }
    // What only running can find out: the dataset file and the backend.
    let missing = ExperimentConfig::parse(
        &format!("{base}[dataset]\nkind = \"text\"\npath = \"no/such.txt\"\ntokenizer = \"byte\"\n"),
        "test.toml",
    )?;
    let err = missing.check_runnable(&repo()).expect_err("missing file").to_string();
    ensure!(err.contains("dataset") && err.contains("cannot read") && err.contains("no/such.txt"), "{err}");
    let nccl = ExperimentConfig::parse(
        &base.replace("ranks = [2]", "ranks = [2]\nbackend = \"nccl\"\ndevice = \"cuda\""),
        "test.toml",
    )?;
    if !ulysses::device::load_cuda() {
        let err = nccl.check_runnable(&repo()).expect_err("nccl").to_string();
        ensure!(
            err.contains("parallel.backend")
                && (err.contains("libcuda.so") || err.contains("`nccl` feature")),
            "{err}"
        );
    }
    let mpi =
        ExperimentConfig::parse(&base.replace("ranks = [2]", "ranks = [2]\nbackend = \"mpi\""), "test.toml")?;
    // The driver of an MPI run only needs mpirun (its ranks are processes of
    // RunOptions::program); without a program it stops before making any folder.
    let has_mpirun = Command::new("mpirun").arg("--version").output().is_ok_and(|o| o.status.success());
    match mpi.check_runnable(&repo()) {
        Ok(()) => ensure!(has_mpirun, "mpi accepted without mpirun on PATH"),
        Err(e) => ensure!(!has_mpirun && e.to_string().contains("mpirun"), "{e}"),
    }
    if has_mpirun {
        let base_dir = scratch("mpi-no-program");
        let opts = RunOptions { resume: false, base_dir: base_dir.clone(), program: None };
        let err = run(&mpi, &opts).err().map(|e| e.to_string()).unwrap_or_default();
        ensure!(err.contains("RunOptions::program") && err.contains("--features mpi"), "{err}");
        ensure!(std::fs::read_dir(&base_dir)?.next().is_none(), "a refused run made a folder");
    }
    Ok(())
}

fn column_u64(df: &DataFrame, name: &str) -> Result<Vec<u64>> {
    Ok(df.column(name)?.cast(&DataType::UInt64)?.u64()?.into_no_null_iter().collect())
}

fn column_str(df: &DataFrame, name: &str) -> Result<Vec<String>> {
    Ok(df.column(name)?.str()?.iter().map(|s| s.unwrap_or("").to_string()).collect())
}

#[test]
fn a_toy_run_writes_every_table_and_counts_bytes_exactly() -> Result<()> {
    let dir = scratch("toy");
    let text = toy("toy", r#"["ulysses", "megatron_sp"]"#, "[2]", "[64, 128]", 2);
    let cfg = ExperimentConfig::parse(&text, "toy")?;
    let opts = RunOptions { resume: false, base_dir: dir.clone(), program: None };
    let summary = run(&cfg, &opts)?;
    let out = dir.join("results/toy");
    ensure!(summary.dir == out, "{}", summary.dir.display());
    for f in [
        "config.toml",
        "meta.toml",
        "steps.csv",
        "steps.parquet",
        "comm.csv",
        "comm.parquet",
        "points.csv",
        "points.parquet",
    ] {
        ensure!(out.join(f).is_file(), "{f} missing");
    }
    let meta = std::fs::read_to_string(out.join("meta.toml"))?;
    ensure!(
        meta.contains("git_revision") && meta.contains("libtorch = \"2.11.0") && meta.contains("cpus"),
        "{meta}"
    );

    // steps: (warm-up + steps) x ranks x points rows, finite losses, warm-up flagged.
    let steps = read_table(&out, "steps")?;
    ensure!(steps.height() == 3 * 2 * 4, "{} step rows", steps.height());
    for c in [
        "point",
        "strategy",
        "ranks",
        "seq",
        "step",
        "warmup",
        "rank",
        "step_ms",
        "tokens_per_s",
        "model_tflops",
        "loss",
        "peak_mib_per_rank",
        "bytes_sent",
        "bytes_received",
    ] {
        ensure!(steps.column(c).is_ok(), "steps lacks {c}");
    }
    let losses = steps.column("loss")?.f64()?.clone();
    ensure!(losses.into_no_null_iter().all(f64::is_finite), "a loss is not finite");
    let warm = steps.column("warmup")?.bool()?.clone();
    ensure!(warm.iter().filter(|w| *w == Some(true)).count() == 2 * 4, "warm-up rows");

    // comm: the Ulysses all-to-alls of the sp group are the library's formula exactly (what the
    // cost model prices): per layer forward and backward 2 x b (2Nh + 2N H_kv d)(P-1)/P^2 x 4 B
    // (h = 64, H_kv d = 64, P = 2).
    let comm = read_table(&out, "comm")?;
    let gpt = cfg.gpt()?;
    let (points, groups, ops, sent) = (
        column_u64(&comm, "point")?,
        column_str(&comm, "group")?,
        column_str(&comm, "op")?,
        column_u64(&comm, "bytes_sent")?,
    );
    for (point, n) in [(0u64, 64u64), (1, 128)] {
        let pt = cfg.points()?.into_iter().find(|p| p.index as u64 == point).context("point")?;
        let job = Job { precision: Precision::F32, ..Job::new(gpt.clone(), pt.strategy, 2, n as i64) };
        let (f, b) = ulysses::cost::bytes::layer_bytes(&job, 0)?;
        let want = f + b;
        ensure!(want == 2 * (2 * n * 64 + 2 * n * 64) / 4 * 4, "the closed form");
        let got: Vec<u64> = (0..points.len())
            .filter(|&i| points[i] == point && groups[i] == "sp" && ops[i] == "all_to_all")
            .map(|i| sent[i])
            .collect();
        ensure!(
            got.len() == 3 * 2 && got.iter().all(|&b| b == want),
            "point {point}: a2a bytes {got:?}, want {want}"
        );
    }
    // points: one per (strategy, N), the same losses across strategies (same model and data).
    let points = read_table(&out, "points")?;
    ensure!(points.height() == 4, "{} points", points.height());
    let final_loss = points.column("final_loss")?.f64()?.clone();
    let l: Vec<f64> = final_loss.into_no_null_iter().collect();
    // No optimizer: the same parameters through two strategies, which differ by the forward's
    // rounding only (tests/common/tolerance.rs; the longer N = 128 sets the bound).
    let model = ulysses::model::GptConfig { n_layer: 1, ..ulysses::model::GptConfig::tiny() };
    let bound = common::tolerance::gpt(&model, 128, 128, tch::Kind::Float).loss;
    for (a, b) in [(l[0], l[2]), (l[1], l[3])] {
        common::tolerance::check("ulysses vs megatron_sp final loss", (a - b).abs(), bound * b.abs())?;
    }

    // Never overwrite: a second run goes to a fresh folder, the first is untouched, the library
    // refuses to open a folder holding a run unless resuming; resume skips the finished points.
    let before = std::fs::read(out.join("steps.csv"))?;
    let second = run(&cfg, &opts)?;
    ensure!(second.dir == dir.join("results/toy-2"), "second run went to {}", second.dir.display());
    ensure!(std::fs::read(out.join("steps.csv"))? == before, "the first run's results changed");
    let err =
        ulysses::experiment::Results::open(&out, &cfg.to_toml()?, "", false).err().map(|e| e.to_string());
    ensure!(
        err.unwrap_or_default().contains("already holds a run"),
        "the library opened a folder holding a run"
    );
    let again = run(&cfg, &RunOptions { resume: true, base_dir: dir.clone(), program: None })?;
    ensure!(
        again.points.height() == 4 && read_table(&out, "steps")?.height() == 24,
        "resume changed the tables"
    );
    let other = ExperimentConfig::parse(&text.replace("steps = 2", "steps = 3"), "toy")?;
    let err = run(&other, &RunOptions { resume: true, base_dir: dir.clone(), program: None })
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    ensure!(err.contains("used another config"), "{err}");

    // The report: a table per point, summary.csv and plots as SVG and PNG.
    let r = report(&out)?;
    ensure!(r.summary.height() == 4, "summary rows");
    for stem in ["throughput_vs_seq", "loss"] {
        for ext in ["svg", "png"] {
            let f = out.join("plots").join(format!("{stem}.{ext}"));
            ensure!(f.is_file() && std::fs::metadata(&f)?.len() > 1000, "{} missing or empty", f.display());
        }
    }
    ensure!(out.join("summary.csv").is_file(), "summary.csv");
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

fn lines(path: &Path) -> usize {
    std::fs::read_to_string(path).map_or(0, |t| t.lines().count())
}

#[test]
fn a_killed_run_keeps_every_finished_step_and_resumes() -> Result<()> {
    let dir = scratch("kill");
    // Enough steps that the kill lands mid-sweep.
    let text = toy("killed", r#"["ulysses", "ring"]"#, "[2]", "[256, 512]", 30);
    std::fs::write(dir.join("killed.toml"), &text)?;
    let mut child = Command::new(env!("CARGO_BIN_EXE_ulysses"))
        .args(["run", "killed.toml"])
        .current_dir(&dir)
        .stdout(std::process::Stdio::null())
        .spawn()?;
    let csv = dir.join("results/killed/steps.csv");
    let start = Instant::now();
    // Wait for some steps (1 header line + 2 rows per step), then kill -9.
    while lines(&csv) < 1 + 2 * 40 && start.elapsed() < Duration::from_secs(120) {
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill()?;
    child.wait()?;
    let out = dir.join("results/killed");
    let steps = read_table(&out, "steps")?;
    let rows = lines(&csv) - 1;
    ensure!((80..4 * 31 * 2).contains(&rows), "{rows} CSV rows: the kill did not land mid-sweep");
    // The Parquet table (renamed into place after each step) holds every step the CSV holds,
    // or the CSV one more (killed between the two writes); whole steps only (both ranks).
    ensure!(
        steps.height() == rows || steps.height() + 2 == rows,
        "parquet {} rows, csv {rows}",
        steps.height()
    );
    ensure!(steps.height() % 2 == 0, "a step with one rank's row");
    let text_csv = std::fs::read_to_string(&csv)?;
    let width = text_csv.lines().next().map_or(0, |h| h.split(',').count());
    ensure!(text_csv.lines().all(|l| l.split(',').count() == width), "a torn CSV line");

    // Resume finishes the sweep and keeps the finished points.
    let cfg = ExperimentConfig::parse(&text, "killed")?;
    let before = read_table(&out, "points").map(|p| p.height()).unwrap_or(0);
    let done = run(&cfg, &RunOptions { resume: true, base_dir: dir.clone(), program: None })?;
    ensure!(done.points.height() == 4, "{} points after resume ({} before)", done.points.height(), before);
    ensure!(read_table(&out, "steps")?.height() == 4 * 31 * 2, "steps after resume");
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// What notebooks show: a DataFrame as an HTML table (every name and value, in order) and a
/// chart as inline SVG.
#[test]
fn notebook_displays_render_tables_and_charts() -> Result<()> {
    let df = df!("strategy" => ["ulysses", "a<b&c"], "P" => [4u32, 8], "ms" => [1.5f64, 0.25])?;
    let html = HtmlTable(df).html();
    for cell in ["<th>strategy</th>", "<th>P</th>", "<th>ms</th>", "<td>ulysses</td>", "<td>8</td>"] {
        ensure!(html.contains(cell), "{cell} missing from {html}");
    }
    // Numbers in the formats of experiment::format: a column named `ms` holds milliseconds.
    ensure!(html.contains("<td>1.50</td>") && html.contains("<td>0.25</td>"), "{html}");
    ensure!(html.contains("<td>a&lt;b&amp;c</td>"), "not escaped: {html}");
    ensure!(html.find("ulysses") < html.find("a&lt;"), "rows out of order: {html}");
    ensure!(html.matches("<tr>").count() == 3, "a header and two rows: {html}");
    let chart = Chart::new(
        "bytes",
        Axis::log("P", Unit::Count),
        Axis::log("sent", Unit::Bytes),
        vec![Series { name: "ulysses".into(), points: vec![(2.0, 3.0 * 1048576.0), (8.0, 1048576.0)] }],
    );
    if font_ready() {
        let svg = chart.svg((320, 200))?.0;
        ensure!(svg.starts_with("<svg") && svg.contains("ulysses") && svg.contains("bytes"), "{svg}");
        // True log axes with ticks in the unit: 2, 4, 8 ranks; MiB, not log2 of bytes.
        let texts: Vec<&str> = svg
            .split("<text")
            .skip(1)
            .filter_map(|t| t.split('>').nth(1))
            .map(|t| t.split('<').next().unwrap_or("").trim())
            .collect();
        for tick in ["1 MiB", "2 MiB", "2", "4", "8"] {
            ensure!(texts.contains(&tick), "no tick {tick} in {texts:?}");
        }
    } else {
        let err = chart.svg((320, 200)).err().map(|e| e.to_string()).unwrap_or_default();
        ensure!(err.contains("fonts-dejavu-core"), "{err}");
    }
    Ok(())
}

/// What the notebooks' charts add to their lines: reference lines named and drawn within the
/// axis (the axis grows to include them), whiskers, the points where a line stops circled with
/// the reason in the legend, texts beside points, two lines of one strategy in different
/// markers, and whiskers over one set of bars.
#[test]
fn charts_draw_references_ranges_stops_and_labels() -> Result<()> {
    use ulysses::experiment::{BarChart, Bars};
    if !font_ready() {
        return Err(anyhow::anyhow!("fonts-dejavu-core is not installed: scripts/setup.sh installs it"));
    }
    let texts = |svg: &str| -> Vec<String> {
        svg.split("<text")
            .skip(1)
            .filter_map(|t| t.split('>').nth(1))
            .map(|t| t.split('<').next().unwrap_or("").trim().to_string())
            .collect()
    };
    let line = |name: &str, pts: &[(f64, f64)]| Series { name: name.into(), points: pts.to_vec() };
    let plain = Chart::new(
        "tflops",
        Axis::log("N", Unit::Tokens),
        Axis::linear("TFLOP/s", Unit::Number).from_zero(),
        vec![
            line("usp, 8 GPUs", &[(1024.0, 100.0), (4096.0, 120.0)]),
            line("usp, 16 GPUs", &[(1024.0, 90.0), (4096.0, 110.0)]),
        ],
    );
    let base = plain.svg((600, 360))?.0;
    let chart = plain
        .clone()
        .with_references(vec![("the paper: 175".into(), 175.0), ("peak: 312".into(), 312.0)])
        .with_ranges(vec![("usp, 8 GPUs".into(), 1024.0, 95.0, 105.0)])
        .with_stops(vec![(4096.0, 110.0)], "nothing longer fits")
        .with_labels(vec![(1024.0, 100.0, "U".into())]);
    let svg = chart.svg((600, 360))?.0;
    let t = texts(&svg);
    for want in ["the paper: 175", "peak: 312", "nothing longer fits", "U"] {
        ensure!(t.iter().filter(|x| x.as_str() == want).count() >= 1, "no text {want:?} in {t:?}");
    }
    // The peak lies above every point: the axis must reach it (a tick at 300 or above).
    let ticks: Vec<f64> = t.iter().filter_map(|x| x.parse::<f64>().ok()).collect();
    ensure!(ticks.iter().any(|&v| v >= 300.0), "the y axis stops below the reference: {ticks:?}");
    // One ring for the stop (and its legend swatch), more paths for dashes and whiskers.
    let circles = |s: &str| s.matches("<circle").count();
    ensure!(circles(&svg) >= circles(&base) + 2, "{} circles against {}", circles(&svg), circles(&base));
    ensure!(svg.matches("<polyline").count() > base.matches("<polyline").count() + 20, "no dashes drawn");
    // Two lines of one strategy (USP draws crosses): the second in circles, not crosses again.
    ensure!(circles(&base) >= 2, "one marker for both lines: {} circles", circles(&base));
    let bars = BarChart::grouped(
        "time",
        "point",
        vec!["a".into(), "b".into()],
        Axis::linear("ms", Unit::Millis),
        vec![
            Bars { name: "measured".into(), values: vec![10.0, 20.0] },
            Bars { name: "predicted".into(), values: vec![12.0, 30.0] },
        ],
    );
    let plain_bars = bars.svg((500, 300))?.0;
    let with =
        bars.with_ranges("measured", vec![(7.5, 12.5), (15.0, 25.0)], "measured ±25%").svg((500, 300))?.0;
    ensure!(texts(&with).iter().any(|x| x == "measured ±25%"), "no whisker legend");
    ensure!(
        with.matches("<polyline").count() >= plain_bars.matches("<polyline").count() + 6,
        "no whiskers drawn"
    );
    Ok(())
}

/// Rank 0's loss curve of each point.
type Curves = std::collections::BTreeMap<u64, Vec<f64>>;

/// Losses by (point, step) of rank 0, and the points' strategy labels.
fn curves(dir: &Path) -> Result<(Curves, Vec<String>)> {
    let steps = read_table(dir, "steps")?;
    let (point, rank, loss) =
        (column_u64(&steps, "point")?, column_u64(&steps, "rank")?, steps.column("loss")?.f64()?.clone());
    let mut by_point: std::collections::BTreeMap<u64, Vec<f64>> = std::collections::BTreeMap::new();
    for (i, l) in loss.into_no_null_iter().enumerate() {
        if rank[i] == 0 {
            by_point.entry(point[i]).or_default().push(l);
        }
    }
    let labels = column_str(&read_table(dir, "points")?, "strategy")?;
    Ok((by_point, labels))
}

#[test]
fn e5_curves_of_zero_1_2_3_and_megatron_sp_overlap_one_device() -> Result<()> {
    // The shipped toy config, 40 steps instead of 300: bf16 with f32 master weights, DP 2 x SP 2,
    // every point within 2% of the one-device reference at every step.
    let dir = scratch("e5");
    let text = std::fs::read_to_string(repo().join("experiments/e5_convergence_toy.toml"))?
        .replace("steps = 300", "steps = 40")
        .replace("path = \"datasets/", &format!("path = \"{}/datasets/", repo().display()));
    let cfg = ExperimentConfig::parse(&text, "e5")?;
    run(&cfg, &RunOptions { resume: false, base_dir: dir.clone(), program: None })?;
    let (by_point, labels) = curves(&dir.join("results/e5_convergence_toy"))?;
    ensure!(labels.len() == 7 && labels[0] == "single", "points {labels:?}");
    let reference = &by_point[&0];
    ensure!(
        reference.len() == 40 && reference[39] < reference[0] - 0.5,
        "one device does not learn: {reference:?}"
    );
    // The paper's claim, not a rounding bound: the curves overlap, here within 2% of one
    // device at every step. No bound can be derived: bf16 rounds differently at another world
    // size (and on another CPU), and AdamW turns the noise of gradients near zero into whole
    // steps, which the next 40 steps carry on. Seen at most 0.46% here on AVX-512 kernels;
    // scripts/isa_check.py does not run it (bf16 below AVX-512 takes minutes).
    for (p, curve) in by_point.iter().skip(1) {
        let worst = curve.iter().zip(reference).map(|(a, b)| (a - b).abs() / b).fold(0.0, f64::max);
        common::tolerance::check(&format!("{}: largest gap to one device", labels[*p as usize]), worst, 2e-2)
            .with_context(|| format!("{curve:?} vs {reference:?}"))?;
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

#[test]
fn a_killed_training_run_resumes_from_its_checkpoint_and_continues_its_loss_curve() -> Result<()> {
    let dir = scratch("ckpt-kill");
    let text = |name: &str| {
        format!(
            "name = \"{name}\"\n[model]\npreset = \"tiny\"\nn_layer = 1\n[parallel]\nranks = [2]\n\
             strategies = [\"ulysses\"]\n[train]\nseq = [128]\nsteps = 60\nwarmup = 0\nzero = 2\ndtype = \"bf16\"\n\
             checkpoint_every = 5\n[train.adamw]\nlr = 1e-3\n[dataset]\nkind = \"text\"\n\
             path = \"{}/datasets/sequence_parallelism.txt\"\ntokenizer = \"byte\"\n",
            repo().display()
        )
    };
    // Uninterrupted.
    let whole = ExperimentConfig::parse(&text("whole"), "whole")?;
    run(&whole, &RunOptions { resume: false, base_dir: dir.clone(), program: None })?;
    // Killed (-9) once a few checkpoints exist, then resumed.
    std::fs::write(dir.join("killed.toml"), text("killed"))?;
    let mut child = Command::new(env!("CARGO_BIN_EXE_ulysses"))
        .args(["run", "killed.toml"])
        .current_dir(&dir)
        .stdout(std::process::Stdio::null())
        .spawn()?;
    let (out, start) = (dir.join("results/killed"), Instant::now());
    while lines(&out.join("steps.csv")) < 1 + 2 * 23 && start.elapsed() < Duration::from_secs(120) {
        std::thread::sleep(Duration::from_millis(10));
    }
    child.kill()?;
    child.wait()?;
    // The ranks may have saved checkpoints of steps the results writer had not written yet:
    // the run continues from the newest checkpoint of a step whose rows are all on disk.
    let written = u64::from(ulysses::experiment::complete_steps(&out)?.get(&0).copied().unwrap_or(0));
    let (saved, _) = ulysses::train::checkpoints(&out.join("checkpoints/point-0"))
        .into_iter()
        .rfind(|(s, _)| *s <= written)
        .context("no usable checkpoint")?;
    let before = read_table(&out, "steps")?;
    ensure!(
        saved >= 15 && (before.height() as u64) < 2 * 60,
        "killed at {} rows, checkpoint {saved}",
        before.height()
    );
    let status = Command::new(env!("CARGO_BIN_EXE_ulysses"))
        .args(["run", "killed.toml", "--resume"])
        .current_dir(&dir)
        .output()?;
    ensure!(status.status.success(), "{}", String::from_utf8_lossy(&status.stderr));
    // The same losses at every step and rank, bit for bit; the steps before the checkpoint
    // are the killed run's own rows (kept, not rerun).
    let (got, want) = (read_table(&out, "steps")?, read_table(&dir.join("results/whole"), "steps")?);
    ensure!(got.height() == 2 * 60, "{} rows after resume", got.height());
    let losses =
        |df: &DataFrame| -> Result<Vec<f64>> { Ok(df.column("loss")?.f64()?.into_no_null_iter().collect()) };
    ensure!(
        losses(&got)? == losses(&want)?,
        "the resumed curve differs:\n{:?}\n{:?}",
        losses(&got)?,
        losses(&want)?
    );
    let ms = |df: &DataFrame| -> Result<Vec<f64>> {
        Ok(df.column("step_ms")?.f64()?.into_no_null_iter().collect())
    };
    let kept = 2 * saved as usize;
    ensure!(ms(&got)?[..kept] == ms(&before)?[..kept], "the rows before the checkpoint were not kept");
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// What `ulysses run --report` leaves on the screen: the table in readable numbers (no
/// full-precision floats), a finding computed from it, where the files are and what to try next;
/// the files keep every digit.
#[test]
fn the_screen_after_a_run_reads_well_and_says_what_next() -> Result<()> {
    let dir = scratch("screen");
    std::fs::write(
        dir.join("screen.toml"),
        toy("screen", r#"["ulysses", "megatron_sp"]"#, "[2]", "[256]", 2),
    )?;
    let out = Command::new(env!("CARGO_BIN_EXE_ulysses"))
        .args(["run", "screen.toml", "--report"])
        .current_dir(&dir)
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    ensure!(out.status.success(), "{text}\n{}", String::from_utf8_lossy(&out.stderr));
    for says in [
        "screen: 2 points in",
        "median_step_ms",
        "ulysses sends",
        "megatron_sp",
        "x)",
        "same loss",
        "results/screen/{points,steps,comm}.{csv,parquet}",
        "Plots (SVG and PNG) in results/screen/plots",
        "Next:",
        "./scripts/ulysses report results/screen",
        "notebooks.sh",
    ] {
        ensure!(text.contains(says), "{says:?} missing from:\n{text}");
    }
    // No number with more than four significant decimals on the screen (the issue's
    // `180.010365`; TFLOP/s such as `0.00631` have three).
    let long = text.split(|c: char| !(c.is_ascii_digit() || c == '.')).find(|w| {
        w.split_once('.').is_some_and(|(i, f)| {
            !i.is_empty() && f.chars().all(|c| c.is_ascii_digit()) && f.trim_start_matches('0').len() > 4
        })
    });
    ensure!(long.is_none(), "{long:?} on the screen:\n{text}");
    // The CSV keeps full precision: some step time there has more than four decimals.
    let csv = std::fs::read_to_string(dir.join("results/screen/points.csv"))?;
    ensure!(csv.split([',', '\n']).any(|w| w.split_once('.').is_some_and(|(_, f)| f.len() > 4)), "{csv}");
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
