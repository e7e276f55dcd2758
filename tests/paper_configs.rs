//! The paper-scale configs carry the paper's training setting (ZeRO-3 over all GPUs for Ulysses
//! on 7B and 30B, the release scripts' ZeRO-1 and checkpointing for the 1.3B, bf16, AdamW), and
//! fit the paper's 40 GB A100s where the paper ran them; `ulysses run` and `ulysses submit` check
//! every point against the named hardware's memory before anything starts and refuse a point
//! predicted not to fit, with its numbers and what would fit, unless forced; a toy config on CPU
//! is not checked; `ulysses predict --write-config` writes the search's best setting as configs
//! that run unchanged and predict the same.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{ensure, Context, Result};
use ulysses::attention::{Kernel, StrategyConfig};
use ulysses::cost::{best, Band, Hardware, Prediction, SearchSpace};
use ulysses::experiment::{hardware_for, job_for, predict_points, run, ExperimentConfig, Mode, RunOptions};
use ulysses::train::{Checkpointing, ZeroStage};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ulysses-paper-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("a scratch folder");
    dir
}

fn paper(name: &str) -> Result<ExperimentConfig> {
    let path = repo().join(format!("experiments/{name}.toml"));
    ExperimentConfig::load(&path).with_context(|| path.display().to_string())
}

fn stages(cfg: &ExperimentConfig) -> Vec<u8> {
    cfg.train.zero.iter().map(|z| z.stage()).collect()
}

#[test]
fn paper_configs_carry_the_papers_training_setting() -> Result<()> {
    let mut n = 0;
    for entry in std::fs::read_dir(repo().join("experiments"))? {
        let path = entry?.path();
        let name = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
        if !name.ends_with("_paper") {
            continue;
        }
        n += 1;
        let cfg = paper(&name)?;
        let t = &cfg.train;
        ensure!(t.dtype == "bf16", "{name}: dtype {}", t.dtype);
        ensure!(t.checkpointing == Checkpointing::Full, "{name}: checkpointing {:?}", t.checkpointing);
        ensure!(t.adamw.is_some(), "{name}: no [train.adamw]: ZeRO 1-3 need it, and the paper trained");
        let hw = cfg.predict.as_ref().and_then(|p| p.hardware.clone());
        ensure!(hw.as_deref() == Some("dgx-a100-40gb"), "{name}: [predict] hardware {hw:?}");
        let gpt = cfg.gpt()?;
        match gpt.n_embd {
            // 7B and 30B: "ZeRO-3 ... degree 32 for 7B and 64 for 30B" (over all the GPUs).
            4096 | 6144 => ensure!(stages(&cfg) == [3], "{name}: ZeRO {:?}", stages(&cfg)),
            // 1.3B: the release script's numbers and zero_stage=1 (E5 compares ZeRO 1, 2, 3).
            2048 => {
                ensure!((gpt.n_layer, gpt.n_head) == (24, 16), "{name}: {gpt:?}");
                let want: &[u8] = if name.starts_with("e5") { &[1, 2, 3] } else { &[1] };
                ensure!(stages(&cfg) == want, "{name}: ZeRO {:?}", stages(&cfg));
            }
            other => anyhow::bail!("{name}: unexpected width {other}"),
        }
    }
    ensure!(n == 7, "{n} paper configs");
    // E5: SP 4 on 8 GPUs (DP 2), one sequence per replica.
    let e5 = paper("e5_convergence_paper")?;
    ensure!(e5.parallel.ranks == [8] && e5.parallel.dp == 2 && e5.train.batch == 1);
    // E7: global batch 8.
    let e7 = paper("e7_scaling_paper")?;
    ensure!(e7.train.batch as usize * e7.parallel.dp * e7.train.grad_accum == 8);
    Ok(())
}

#[test]
fn paper_configs_fit_the_paper_gpus_where_the_paper_ran_them() -> Result<()> {
    // Every point of E2 (7B, 30B), E5 and E7 fits a 40 GB A100 at the paper's setting.
    for name in ["e2_dense_7b_paper", "e2_dense_30b_paper", "e5_convergence_paper", "e7_scaling_paper"] {
        let cfg = paper(name)?;
        let check = cfg.check_memory()?.context("a config that names hardware is checked")?;
        println!("{name}: {check}");
        ensure!(check.over().is_empty() && !check.forced, "{name}: {check}");
        ensure!(check.points.len() == cfg.points()?.len());
    }
    // E1 crosses every GPU count with every length: 64K tokens per GPU (8 GPUs at 512K and 1M,
    // 16 at 1M) does not fit, and the check refuses exactly those, before anything starts.
    let e1 = paper("e1_throughput_paper")?;
    let err = e1.check_memory().expect_err("E1 holds points that do not fit").to_string();
    println!("{err}");
    ensure!(err.contains("3 of the 32 points"), "{err}");
    for point in ["P=8 N=524288", "P=8 N=1048576", "P=16 N=1048576"] {
        let point = format!("usp_u8_zigzag_zero1 {point} (SP");
        ensure!(err.contains(&point), "{point} not refused: {err}");
    }
    ensure!(!err.contains("P=32 N="), "{err}");
    Ok(())
}

/// The 7B config as the issue found it: the run defaults (ZeRO 0, no checkpointing).
fn e2_7b_at_the_run_defaults() -> Result<ExperimentConfig> {
    let mut cfg = paper("e2_dense_7b_paper")?;
    cfg.train.zero = vec![ZeroStage::NONE];
    cfg.train.checkpointing = Checkpointing::None;
    cfg.validate()?;
    Ok(cfg)
}

#[test]
fn a_point_predicted_not_to_fit_is_refused_with_its_numbers_before_anything_starts() -> Result<()> {
    let dir = scratch("refused");
    let mut cfg = e2_7b_at_the_run_defaults()?;
    cfg.output = Some(dir.join("out"));
    let opts = RunOptions { resume: false, base_dir: dir.clone(), program: None };
    let err = run(&cfg, &opts).err().context("a 7B at ZeRO 0 on 40 GB GPUs is refused")?.to_string();
    println!("{err}");
    ensure!(err.starts_with("memory check on group dgx-a100-40gb"), "{err}");
    // Ulysses and ring attention hold the whole model's states on every GPU; Megatron-SP's
    // tensor-parallel shards fit up to 128K.
    ensure!(err.contains("13 of the 18 points of e2_dense_7b_paper"), "{err}");
    ensure!(err.contains("NVIDIA A100-SXM4-40GB (37.49 GiB usable per GPU)"), "{err}");
    // Each point: its setting, its predicted peak, the capacity, and what would fit.
    let first = err.lines().find(|l| l.contains("point 1 ulysses P=32 N=8192")).context("point 1")?;
    ensure!(first.contains("SP 32 x DP 1, micro-batch 1, 1 micro-step per step, ZeRO 0, checkpointing none"));
    let peak: f64 =
        first.split("predicted peak ").nth(1).and_then(|s| s.split(' ').next()).context("a peak")?.parse()?;
    // 6.7B parameters x 16 bytes (bf16 weights and gradients, f32 master and Adam moments).
    ensure!(peak > 100.0, "{first}");
    ensure!(first.contains("capacity 37.49 GiB; fits as"), "{first}");
    ensure!(err.contains("--force"), "{err}");
    // Nothing started: no output folder.
    ensure!(!dir.join("out").exists(), "the refused run wrote its folder");

    // E4 is there to run out of memory: its long points are refused, naming the longest length
    // that fits.
    let e4 = paper("e4_memory_paper")?;
    let err = e4.check_memory().expect_err("E4's 1M tokens on 4 GPUs").to_string();
    let line = err.lines().find(|l| l.contains("ulysses_zero1 P=4 N=1048576")).context("E4 P=4 1M")?;
    ensure!(line.contains("no setting fits N = 1048576; the longest sequence that fits is N = "), "{line}");
    Ok(())
}

#[test]
fn forced_points_pass_the_check() -> Result<()> {
    let mut cfg = e2_7b_at_the_run_defaults()?;
    cfg.predict.as_mut().context("[predict]")?.force = true;
    let check = cfg.check_memory()?.context("checked")?;
    ensure!(check.forced && check.over().len() == 13, "{check}");
    let said = check.to_string();
    ensure!(said.contains("13 of 18 points predicted not to fit, run anyway (forced)"), "{said}");
    // The run goes past the check (and stops at what this machine or these options lack: no
    // NCCL or GPU here, or no ulysses binary to start ranks with; nothing is launched).
    let dir = scratch("forced");
    cfg.output = Some(dir.join("out"));
    let err = run(&cfg, &RunOptions { resume: false, base_dir: dir.clone(), program: None })
        .err()
        .context("no 7B run starts in a test")?
        .to_string();
    ensure!(!err.contains("memory check"), "{err}");
    ensure!(!dir.join("out").exists());
    // The field round-trips, so a submitted job's copy of the config is forced too.
    let again = ExperimentConfig::parse(&cfg.to_toml()?, "forced")?;
    ensure!(again.predict.as_ref().is_some_and(|p| p.force));
    // And is not written when false (configs recorded before it keep their text).
    ensure!(!paper("e2_dense_7b_paper")?.to_toml()?.contains("force"));
    Ok(())
}

#[test]
fn a_toy_config_on_cpu_is_not_checked() -> Result<()> {
    let quick = ExperimentConfig::load(&repo().join("experiments/quickstart.toml"))?;
    ensure!(quick.check_memory()?.is_none(), "no hardware named: no check");
    // Naming this machine's hardware checks it; the toy fits.
    let mut named = quick.clone();
    named.predict =
        Some(ulysses::experiment::PredictSpec { hardware: Some("cpu-2core".into()), ..Default::default() });
    let check = named.check_memory()?.context("named")?;
    ensure!(check.over().is_empty(), "{check}");
    Ok(())
}

/// Every point of `written` predicts what `found` predicted for the same strategy, GPUs and length.
fn same_predictions(written: &Path, found: &[Prediction], hw: &Hardware) -> Result<usize> {
    let cfg = ExperimentConfig::load(written)?;
    // Runnable as it is: it validates (load), names its hardware and fits it.
    let check = cfg.check_memory()?.context("the written config names its hardware")?;
    ensure!(check.over().is_empty(), "{}: {check}", written.display());
    let mut n = 0;
    for row in predict_points(&cfg, hw)? {
        let p = row.outcome.map_err(anyhow::Error::msg)?;
        let f = found
            .iter()
            .find(|f| f.job == p.job)
            .with_context(|| format!("{}: {} was not found", written.display(), p.job.describe()))?;
        ensure!(f.step_s == p.step_s && f.memory.resident_bytes == p.memory.resident_bytes);
        ensure!(job_for(&cfg, &row.point)? == p.job);
        n += 1;
    }
    Ok(n)
}

#[test]
fn predict_search_writes_configs_that_run_unchanged_and_predict_the_same() -> Result<()> {
    let dir = scratch("write");
    let hw = Hardware::load("dgx-a100-40gb")?;
    for name in ["e2_dense_7b_paper", "e4_memory_paper", "e7_scaling_paper"] {
        let cfg = paper(name)?;
        let rows = predict_points(&cfg, &hw)?;
        // The baseline systems' settings (Megatron-LM's, ColossalAI's) are not this toolkit's to
        // run: written configs leave them out.
        let found: Vec<Prediction> = rows
            .iter()
            .filter_map(|r| r.outcome.as_ref().ok().cloned())
            .filter(|p| !cfg.is_baseline(p.job.strategy).unwrap_or(true))
            .collect();
        let files = cfg.write_settings(&rows, "dgx-a100-40gb", &dir.join(format!("{name}.toml")))?;
        ensure!(!files.is_empty());
        let mut n = 0;
        for f in &files {
            n += same_predictions(f, &found, &hw)?;
        }
        ensure!(n == found.len(), "{name}: {n} written points of {} found", found.len());
        println!("{name}: {} points in {} configs", n, files.len());
    }

    // The command line, one job by flags: the search's best, written and predicted again.
    let out = dir.join("flags.toml");
    let status = Command::new(env!("CARGO_BIN_EXE_ulysses"))
        .args(["predict", "--model", "6.7b", "--ranks", "32", "--seq", "65536", "--search", "--write-config"])
        .arg(&out)
        .current_dir(&dir)
        .output()?;
    ensure!(status.status.success(), "{}", String::from_utf8_lossy(&status.stderr));
    let cfg = ExperimentConfig::load(&out)?;
    let job = job_for(&cfg, &cfg.points()?[0])?;
    let mut flags_job = job.clone();
    (flags_job.dp, flags_job.micro_batch, flags_job.grad_accum) = (1, 1, 1);
    (flags_job.zero, flags_job.checkpointing) = (ZeroStage::NONE, Checkpointing::Full);
    let found = best(&flags_job, &hw, &SearchSpace::everything())?;
    ensure!(found.job == job, "{} vs {}", found.job.describe(), job.describe());
    ensure!(same_predictions(&out, &[found], &hw)? == 1);
    Ok(())
}

#[test]
fn ulysses_run_refuses_what_does_not_fit_and_says_so() -> Result<()> {
    let dir = scratch("cli");
    let out = Command::new(env!("CARGO_BIN_EXE_ulysses"))
        .arg("run")
        .arg(repo().join("experiments/e4_memory_paper.toml"))
        .args(["--output", "e4"])
        .current_dir(&dir)
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(!out.status.success(), "{stderr}");
    ensure!(
        stderr.contains("memory check on group dgx-a100-40gb") && stderr.contains("predicted peak"),
        "{stderr}"
    );
    ensure!(!dir.join("e4").exists(), "the refused run wrote its folder");
    Ok(())
}

#[test]
fn paper_mode_runs_the_papers_setting_and_each_baseline_its_own() -> Result<()> {
    for name in ["e2_dense_7b_paper", "e2_dense_30b_paper", "e4_memory_paper"] {
        let cfg = paper(name)?;
        let spec = cfg.predict.clone().unwrap_or_default();
        ensure!(
            spec.mode == Mode::Paper && spec.software.as_deref() == Some("megatron-deepspeed-2023"),
            "{name}"
        );
        let hw = hardware_for(&cfg, None)?;
        ensure!(hw.software_name() == "megatron-deepspeed-2023", "{name}: {}", hw.software_name());
        let (mut ours, mut baseline) = (0, 0);
        for r in predict_points(&cfg, &hw)? {
            let Ok(p) = &r.outcome else { continue };
            let j = &p.job;
            ensure!(j.sp() >= 2, "{name}: {} at SP {}", j.describe(), j.sp());
            if j.strategy == StrategyConfig::MegatronSp {
                // Megatron-LM as of 2023: its math attention, TP inside a node, ZeRO 0-1.
                ensure!(
                    p.software == "megatron-lm-2023" && j.attention.kernel == Kernel::Math,
                    "{}",
                    j.describe()
                );
                ensure!(j.sp() <= hw.node.devices_per_node && j.zero.stage() <= 1, "{}", j.describe());
                baseline += 1;
            } else if cfg.is_baseline(j.strategy)? {
                // ColossalAI's 2021 ring self-attention: its scores materialised, kept for the
                // backward.
                ensure!(
                    p.software == "colossalai-2021" && j.attention.kernel == Kernel::Math,
                    "{}",
                    j.describe()
                );
                // At least one layer's f32 probabilities: every head, the rank's N/P rows, N keys.
                let rows = (j.seq / j.sp() as i64) as f64;
                let scores = j.micro_batch as f64 * j.model.n_head as f64 * rows * j.seq as f64 * 4.0;
                ensure!(
                    p.memory.peak_bytes >= scores,
                    "{}: peak {} B < scores {scores} B",
                    j.describe(),
                    p.memory.peak_bytes
                );
                baseline += 1;
            } else {
                // The paper's setting, as [train] states it.
                ensure!(p.software == "megatron-deepspeed-2023", "{}", j.describe());
                ensure!(
                    cfg.train.zero.contains(&j.zero) && j.checkpointing == cfg.train.checkpointing,
                    "{}",
                    j.describe()
                );
                ours += 1;
            }
            // Each band searched on its own; where both ends fit, they bound the centre.
            if let (Ok(lo), Ok(hi)) = (&r.low, &r.high) {
                ensure!(lo.band == Band::Low && hi.band == Band::High);
                if !cfg.predict.as_ref().is_some_and(|p| p.max_seq) {
                    ensure!(
                        lo.tokens_per_s <= p.tokens_per_s && p.tokens_per_s <= hi.tokens_per_s,
                        "{}",
                        j.describe()
                    );
                } else {
                    ensure!(lo.job.seq <= j.seq && j.seq <= hi.job.seq, "{}", j.describe());
                }
            }
        }
        ensure!(ours > 0 && baseline > 0, "{name}: {ours} points of ours, {baseline} of the baseline");
    }
    // E1 no longer fixes one sequence per step: at 8K on 64 GPUs each GPU holds more than the
    // 128 tokens a global batch of 1 left it.
    let e1 = paper("e1_throughput_paper")?;
    ensure!(e1.predict.as_ref().is_some_and(|p| p.global_batch.is_none()));
    let hw = hardware_for(&e1, None)?;
    for r in predict_points(&e1, &hw)? {
        let Ok(p) = &r.outcome else { continue };
        let per_gpu = p.job.global_batch() * p.job.seq / p.job.ranks as i64;
        ensure!(per_gpu >= 1024, "{}: {per_gpu} tokens per GPU", p.job.describe());
    }
    Ok(())
}

#[test]
fn bad_software_and_baselines_are_refused_naming_the_field() -> Result<()> {
    let path = repo().join("experiments/e2_dense_7b_paper.toml");
    let good = std::fs::read_to_string(&path)?;
    ExperimentConfig::parse(&good, "e2.toml")?;
    let cases = [
        (
            good.replace("software = \"megatron-deepspeed-2023\"", "software = \"flash-attention-9\""),
            "predict.software",
            "no such software preset",
        ),
        (
            good.replace("megatron_sp = \"megatron-lm-2023\"", "allgather_kv = \"megatron-lm-2023\""),
            "predict.baselines.allgather_kv",
            "not among [parallel] strategies",
        ),
        (
            good.replace("megatron_sp = \"megatron-lm-2023\"", "megatron_sp = \"flash-attention-2\""),
            "predict.baselines.megatron_sp",
            "has no [baseline] section",
        ),
        (good.replace("mode = \"paper\"", "mode = \"best\""), "", "unknown variant `best`"),
    ];
    for (text, field, want) in cases {
        ensure!(text != good, "the case did not change the config: {want}");
        let err = ExperimentConfig::parse(&text, "e2.toml").err().map(|e| e.to_string()).unwrap_or_default();
        ensure!(err.contains(field) && err.contains(want), "{err:?} lacks {field:?} / {want:?}");
    }
    Ok(())
}
