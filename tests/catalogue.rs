//! The bad-input catalogue (docs/bad-input.md): the rows that no other test file
//! covers, each asserting the error text a user sees. No hang, no panic, no silent wrong
//! number, no lost result.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, ensure, Result};
use common::det;
use tch::{Device, Kind, Tensor};
use ulysses::attention::{AttentionConfig, Kernel, Mask, StrategyConfig};
use ulysses::autograd::Tape;
use ulysses::comm::{launch, LocalLaunch};
use ulysses::experiment::{read_table, run, ExperimentConfig, Results, RunOptions};
use ulysses::model::{shift_labels, Gpt, GptConfig};
use ulysses::train::{AdamWConfig, Decay, LossScaleConfig, Schedule, TrainConfig, ZeroStage};

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ulysses-catalogue-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("a scratch folder");
    dir
}

fn ulysses(args: &[&str], dir: &Path) -> Result<Output> {
    Ok(Command::new(env!("CARGO_BIN_EXE_ulysses")).args(args).current_dir(dir).output()?)
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A toy experiment on 2 thread ranks.
fn toy(name: &str, steps: usize, extra: &str) -> String {
    format!(
        "name = \"{name}\"\n[model]\npreset = \"tiny\"\nn_layer = 1\n[parallel]\nranks = [2]\n\
         strategies = [\"ulysses\", \"ring\"]\n[train]\nseq = [64, 128]\nsteps = {steps}\n{extra}"
    )
}

#[test]
fn nan_or_inf_in_a_strategys_inputs_is_refused_naming_the_element() -> Result<()> {
    for (strategy, name, value) in [
        (StrategyConfig::Ulysses, "q", f64::NAN),
        (StrategyConfig::Ring { zigzag: true }, "v", f64::INFINITY),
    ] {
        let err = launch(2, |ctx| -> ulysses::Result<()> {
            let s = strategy.build(ctx.world(), AttentionConfig::default(), 16, 4, 4)?;
            let [q, k, v] = [1, 2, 3].map(|seed| det(&[1, 8, 4, 8], seed, Kind::Float));
            if ctx.rank() == 1 {
                let bad = if name == "q" { &q } else { &v };
                let _ = bad.get(0).get(5).get(2).get(1).fill_(value);
            }
            s.forward(&Tape::new(), &q, &k, &v).map(drop)
        })
        .expect_err("a non-finite input")
        .to_string();
        let first = if value.is_nan() { "NaN" } else { "inf" };
        let want = format!("{name} holds 1 non-finite value(s), the first {first} at [0, 5, 2, 1]");
        ensure!(err.contains("rank 1 failed") && err.contains(&want), "{err}");
    }
    Ok(())
}

#[test]
fn a_rank_that_dies_mid_step_releases_the_others() -> Result<()> {
    let cfg = GptConfig::tiny();
    let start = Instant::now();
    let err = LocalLaunch::new(4)
        .timeout(Duration::from_secs(60))
        .run(|ctx| -> Result<()> {
            let s = StrategyConfig::Ulysses.build(ctx.world(), AttentionConfig::default(), 64, 4, 4)?;
            let layout = s.layout().clone();
            let model = Gpt::new(&cfg, s, Kind::Float, Device::Cpu)?;
            let toks = (Tensor::arange(64, (Kind::Int64, Device::Cpu)) * 7).remainder(256).reshape([1, 64]);
            let labels = layout.shard(&shift_labels(&toks)?, 1, ctx.rank())?;
            let tape = Tape::new();
            let loss = model.loss(&tape, &layout.shard(&toks, 1, ctx.rank())?, &labels)?;
            if ctx.rank() == 2 {
                panic!("rank 2 lost its device between forward and backward");
            }
            tape.backward(&loss.local)?;
            Ok(())
        })
        .expect_err("a rank died")
        .to_string();
    ensure!(err.contains("rank 2 failed") && err.contains("lost its device"), "{err}");
    // The others were waiting in the backward's all-to-alls: released at once, not at 60 s.
    ensure!(start.elapsed() < Duration::from_secs(20), "took {:?}", start.elapsed());
    Ok(())
}

#[test]
fn token_ids_outside_the_vocabulary_are_an_error() -> Result<()> {
    let err = launch(1, |ctx| -> Result<()> {
        let s = StrategyConfig::Single.build(ctx.world(), AttentionConfig::default(), 8, 4, 4)?;
        let model = Gpt::new(&GptConfig::tiny(), s, Kind::Float, Device::Cpu)?;
        let toks = Tensor::from_slice(&[1i64, 2, 3, 300, 4, 5, 6, 7]).reshape([1, 8]);
        model.forward(&Tape::disabled(), &toks).map(drop)?;
        Ok(())
    })
    .expect_err("token 300 with a vocabulary of 256")
    .to_string();
    ensure!(
        err.contains("gpt: shapes [[1, 8]]: token ids must lie in 0..256 (vocab_size); got 1..=300"),
        "{err}"
    );
    Ok(())
}

/// Writes one bad input file.
type Writer<'a> = Box<dyn Fn() -> Result<()> + 'a>;

#[test]
fn bad_layer_files_are_refused_and_nothing_is_written() -> Result<()> {
    let dir = scratch("layer");
    let (input, output) = (dir.join("in.safetensors"), dir.join("out.safetensors"));
    let q = det(&[1, 8, 4, 8], 1, Kind::Float);
    let kv = det(&[1, 8, 2, 8], 2, Kind::Float);
    let run_layer = |extra: &[&str]| -> Result<String> {
        let _ = std::fs::remove_file(&output);
        let (i, o) = (input.to_string_lossy().into_owned(), output.to_string_lossy().into_owned());
        let mut args = vec!["layer", "--input", &i, "--output", &o];
        args.extend(extra);
        if !extra.contains(&"--ranks") {
            args.extend(["--ranks", "2"]);
        }
        let out = ulysses(&args, &dir)?;
        ensure!(!out.status.success() && !output.exists(), "accepted, or wrote {}", output.display());
        Ok(stderr(&out))
    };
    let cases: Vec<(Writer, &[&str], &str)> = vec![
        (
            Box::new(|| {
                Tensor::write_safetensors(&[("q", &q), ("k", &kv), ("v", &kv)], &input)?;
                let bytes = std::fs::read(&input)?;
                std::fs::write(&input, &bytes[..bytes.len() - 100])?; // truncated
                Ok(())
            }),
            &[],
            "is truncated: its tensors need 2048 bytes after the header, the file holds 1948",
        ),
        (
            Box::new(|| {
                let nan = q.copy();
                let _ = nan.get(0).get(3).get(1).get(2).fill_(f64::NAN);
                Ok(Tensor::write_safetensors(&[("q", &nan), ("k", &kv), ("v", &kv)], &input)?)
            }),
            &[],
            "q holds 1 non-finite value(s), the first NaN at [0, 3, 1, 2]",
        ),
        (
            Box::new(|| {
                let long = det(&[1, 9, 2, 8], 2, Kind::Float);
                Ok(Tensor::write_safetensors(&[("q", &q), ("k", &long), ("v", &long)], &input)?)
            }),
            &[],
            "q [1, 8, 4, 8] and k [1, 9, 2, 8] must agree on b, N and d",
        ),
        (
            Box::new(|| {
                let f64_k = kv.to_kind(Kind::Double);
                Ok(Tensor::write_safetensors(&[("q", &q), ("k", &f64_k), ("v", &kv)], &input)?)
            }),
            &[],
            "k is Double: q, k, v and grad_out must share one floating-point dtype (q is Float)",
        ),
        (
            Box::new(|| Ok(Tensor::write_safetensors(&[("q", &q), ("k", &kv), ("v", &kv)], &input)?)),
            &["--strategy", "megatron_sp", "--ranks", "4"],
            "tensor parallelism over P=4 needs H=4 and H_kv=2 divisible by P",
        ),
        (
            Box::new(|| Ok(Tensor::write_safetensors(&[("q", &q), ("k", &kv), ("v", &kv)], &input)?)),
            &["--kernel", "blocked", "--mask", "causal"],
            "Causal is dense; use the sdpa or math kernel",
        ),
        (Box::new(|| Ok(std::fs::remove_file(&input)?)), &[], "No such file or directory"),
    ];
    for (make, extra, says) in &cases {
        make()?;
        let err = run_layer(extra)?;
        ensure!(err.contains(says) && !err.contains("panicked"), "expected {says:?} in: {err}");
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

#[test]
fn an_empty_or_too_small_dataset_is_refused_before_anything_runs() -> Result<()> {
    let dir = scratch("dataset");
    for (content, says) in
        [("", "holds 0 tokens"), ("abcdefgh", "holds 8 tokens, fewer than one sequence of 128")]
    {
        std::fs::write(dir.join("data.txt"), content)?;
        let text = toy("small", 1, "[dataset]\nkind = \"text\"\npath = \"data.txt\"\ntokenizer = \"byte\"\n");
        let cfg = ExperimentConfig::parse(&text, "small.toml")?;
        let opts = RunOptions { resume: false, base_dir: dir.clone(), program: None };
        let err = run(&cfg, &opts).err().map(|e| e.to_string()).unwrap_or_default();
        ensure!(err.contains("dataset") && err.contains(says), "{err}");
        ensure!(!dir.join("results").exists(), "a refused run made a folder");
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

#[test]
fn an_output_folder_without_write_permission_is_an_error_naming_it() -> Result<()> {
    let dir = scratch("readonly");
    // root writes anywhere on an ordinary file system: a folder under /sys (where even root may
    // not create one) stands in for a folder without write permission.
    let root = is_root();
    let target = if root {
        PathBuf::from("/sys/ulysses-results")
    } else {
        let ro = dir.join("ro");
        std::fs::create_dir_all(&ro)?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o555))?;
        ro.join("out")
    };
    let text = toy("ro", 1, "").replace("name = \"ro\"", &format!("name = \"ro\"\noutput = {:?}", target));
    let cfg = ExperimentConfig::parse(&text, "ro.toml")?;
    let err = run(&cfg, &RunOptions { resume: false, base_dir: dir.clone(), program: None })
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    ensure!(
        err.contains(&target.display().to_string())
            && (err.contains("Permission denied") || err.contains("Operation not permitted")),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// Whether this process runs as root (permission bits do not bind it).
fn is_root() -> bool {
    // SAFETY: geteuid takes no argument and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

#[test]
fn a_full_disk_during_result_writing_loses_nothing_written_before() -> Result<()> {
    // The disk fills up in the middle of a run: each of the child's files may grow to 6000
    // bytes (RLIMIT_FSIZE, with SIGXFSZ ignored: writes beyond fail as on a full disk, with
    // EFBIG instead of ENOSPC). A whole run writes files of up to 7.4 KB, so it fails about
    // half-way, after some points have finished.
    let dir = scratch("full");
    std::fs::write(dir.join("full.toml"), toy("full", 6, ""))?;
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ulysses"));
    cmd.args(["run", "full.toml"]).current_dir(&dir);
    {
        use std::os::unix::process::CommandExt;
        // SAFETY: between fork and exec the closure only calls setrlimit and signal, both
        // async-signal-safe, on values it owns.
        unsafe {
            cmd.pre_exec(|| {
                let limit = libc::rlimit { rlim_cur: 6000, rlim_max: 6000 };
                libc::setrlimit(libc::RLIMIT_FSIZE, &limit);
                libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
                Ok(())
            });
        }
    }
    let out = cmd.output()?;
    let err = stderr(&out);
    ensure!(!out.status.success() && err.contains("File too large") && !err.contains("panicked"), "{err}");
    ensure!(err.contains(&dir.join("results/full").display().to_string()), "the error names no file: {err}");
    // Every table is whole: its CSV ends with a whole row and its Parquet file reads, and the
    // two hold the same rows.
    let folder = dir.join("results/full");
    for table in ["steps", "comm", "points"] {
        let csv = std::fs::read_to_string(folder.join(format!("{table}.csv")))?;
        ensure!(csv.is_empty() || csv.ends_with('\n'), "{table}.csv ends with half a row");
        ensure!(
            !folder.join(format!("{table}.parquet.tmp")).exists(),
            "a partial {table}.parquet.tmp is left"
        );
        if folder.join(format!("{table}.parquet")).exists() {
            let rows = read_table(&folder, table)?.height();
            let lines = csv.lines().count().saturating_sub(1);
            ensure!(rows == lines, "{table}: {rows} Parquet rows, {lines} CSV rows");
        }
    }
    // With space again, --resume finishes the run: every point, every step.
    let out = ulysses(&["run", "full.toml", "--resume"], &dir)?;
    ensure!(out.status.success(), "resume failed: {}", stderr(&out));
    let points = read_table(&folder, "points")?;
    ensure!(points.height() == 4, "{} points after resuming", points.height());
    ensure!(read_table(&folder, "steps")?.height() == 4 * 7 * 2, "steps after resuming");
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

#[test]
fn a_second_run_into_a_folder_in_use_is_refused() -> Result<()> {
    let dir = scratch("busy");
    let out = dir.join("results/busy");
    let first = Results::open(&out, "a = 1\n", "", false)?;
    for resume in [false, true] {
        let err = Results::open(&out, "a = 1\n", "", resume).err().map(|e| e.to_string()).unwrap_or_default();
        ensure!(err.contains("in use by another run"), "resume={resume}: {err}");
    }
    drop(first); // the lock goes with the run
    ensure!(Results::open(&out, "a = 1\n", "", true).is_ok(), "the folder stayed locked");
    // Two `ulysses run` processes at once into one output: the second never writes into the
    // first's folder (it takes `<folder>-2`, or is refused while the first starts).
    std::fs::write(dir.join("two.toml"), toy("two", 2, ""))?;
    let children: Vec<std::process::Child> = (0..2)
        .map(|_| {
            Command::new(env!("CARGO_BIN_EXE_ulysses"))
                .args(["run", "two.toml"])
                .current_dir(&dir)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
        })
        .collect::<Result<_, _>>()?;
    let codes: Vec<bool> = children
        .into_iter()
        .map(|c| c.wait_with_output().map(|o| o.status.success()))
        .collect::<Result<_, _>>()?;
    let folders: Vec<bool> = ["two", "two-2"]
        .iter()
        .map(|f| read_table(&dir.join("results").join(f), "points").is_ok_and(|p| p.height() == 4))
        .collect();
    let complete = folders.iter().filter(|&&f| f).count();
    ensure!(
        complete == codes.iter().filter(|&&c| c).count() && complete >= 1,
        "runs succeeded {codes:?}, complete folders {folders:?}"
    );
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

#[test]
fn kernels_and_masks_that_do_not_fit_are_refused() -> Result<()> {
    let err = AttentionConfig::new(Kernel::Blocked, Mask::None).build().err().map(|e| e.to_string());
    ensure!(err.is_some_and(|e| e.contains("None is dense; use the sdpa or math kernel")), "blocked + none");
    let err = "window:-3".parse::<Mask>().map(drop).map_err(|e| anyhow!(e)).expect_err("negative window");
    ensure!(err.to_string().contains("sliding window -3 must be at least 1"), "{err}");
    Ok(())
}

#[test]
fn training_plans_that_cannot_run_are_refused_naming_the_field_and_the_number() -> Result<()> {
    let base = TrainConfig { adamw: Some(AdamWConfig::default()), ..TrainConfig::default() };
    base.validate()?;
    let adamw = |a: AdamWConfig| TrainConfig { adamw: Some(a), ..base.clone() };
    let schedule = |s: Schedule| TrainConfig { schedule: s, ..base.clone() };
    let scale = |l: LossScaleConfig| TrainConfig { loss_scale: l, ..base.clone() };
    let cases = [
        (TrainConfig { grad_accum: 0, ..base.clone() }, "grad_accum must be at least 1"),
        (TrainConfig { clip: Some(0.0), ..base.clone() }, "clip 0 must be a positive number"),
        (TrainConfig { clip: Some(f64::NAN), ..base.clone() }, "clip NaN must be a positive number"),
        (
            TrainConfig { zero: ZeroStage::new(2)?, adamw: None, ..base.clone() },
            "ZeRO stage 2 partitions the optimizer: it needs an optimizer",
        ),
        (TrainConfig { bucket_elems: 0, ..base.clone() }, "bucket_elems 0 must be at least 1"),
        (TrainConfig { loss_tile: Some(0), ..base.clone() }, "loss_tile 0 must be at least 1"),
        (
            adamw(AdamWConfig { lr: -1e-3, ..AdamWConfig::default() }),
            "lr -0.001 and eps 0.00000001 must be positive",
        ),
        (adamw(AdamWConfig { lr: f64::INFINITY, ..AdamWConfig::default() }), "lr inf and eps"),
        (adamw(AdamWConfig { beta2: 1.0, ..AdamWConfig::default() }), "the betas in [0, 1)"),
        (
            adamw(AdamWConfig { weight_decay: -0.1, ..AdamWConfig::default() }),
            "weight_decay -0.1 must be zero or positive",
        ),
        (
            schedule(Schedule { min_lr_ratio: 1.5, ..Schedule::default() }),
            "schedule.min_lr_ratio 1.5 must be in [0, 1]",
        ),
        (
            schedule(Schedule { warmup: 10, total: Some(10), decay: Decay::Cosine, ..Schedule::default() }),
            "schedule.total 10 must be above schedule.warmup 10 for a decay",
        ),
        (scale(LossScaleConfig { backoff: 1.0, ..LossScaleConfig::default() }), "backoff: 1.0"),
        (
            scale(LossScaleConfig { min: 0.0, init: 0.0, ..LossScaleConfig::default() }),
            "need init >= min > 0",
        ),
        (scale(LossScaleConfig { growth_interval: 0, ..LossScaleConfig::default() }), "growth_interval: 0"),
    ];
    for (cfg, want) in cases {
        let err = cfg.validate().err().ok_or_else(|| anyhow!("accepted: {cfg:?}"))?.to_string();
        ensure!(err.contains(want), "expected {want:?} in: {err}");
    }
    // The same rule through a config file: refused before any point runs, nothing written.
    let dir = scratch("bad-train");
    std::fs::write(dir.join("bad.toml"), toy("bad", 2, "grad_accum = 0\n"))?;
    let out = ulysses(&["run", "bad.toml", "--output", "results"], &dir)?;
    ensure!(!out.status.success(), "a plan with grad_accum = 0 ran");
    let said = stderr(&out);
    ensure!(said.contains("train.grad_accum") && said.contains("must be at least 1"), "{said}");
    ensure!(!dir.join("results").exists(), "results written for a refused plan");
    Ok(())
}

#[test]
fn long_sequence_memory_settings_that_cannot_work_are_refused_before_a_step() -> Result<()> {
    // Tiled MLP and activation offload, through a config (2 ranks, N = 64 and 128: 32 tokens a
    // rank at least): each refused at parse time naming the field and the numbers.
    let dir = scratch("memory-settings");
    let file = dir.join("a-file");
    std::fs::write(&file, "not a folder")?;
    let cases = [
        ("mlp_tile = 0\n", vec!["train.mlp_tile", "an MLP tile of 0 tokens", "at least 1"]),
        ("mlp_tile = 33\n", vec!["train.mlp_tile", "an MLP tile of 33 tokens for a rank holding 32 tokens"]),
        (
            "offload = \"disk\"\n",
            vec!["train", "offload moves the block inputs that full checkpointing keeps"],
        ),
        (
            "offload = \"host\"\ncheckpointing = \"full\"\n",
            vec!["train.offload", "\"host\" on device \"cpu\""],
        ),
        ("offload = \"nvme\"\n", vec!["train.offload", "\"nvme\": it must be none, host or disk"]),
        (
            &format!(
                "offload = \"disk\"\ncheckpointing = \"full\"\noffload_dir = {:?}\n",
                file.display().to_string()
            ),
            vec!["train.offload_dir", "cannot make"],
        ),
        // Chunked Ulysses' K/V offload: a target it knows, and a point that runs chunked Ulysses.
        ("offload_kv = \"nvme\"\n", vec!["train.offload_kv", "\"nvme\": it must be none, host or disk"]),
        ("offload_kv = \"disk\"\n", vec!["train.offload_kv", "no point runs ulysses_chunked:U"]),
        ("offload_kv = \"host\"\n", vec!["train.offload_kv", "\"host\" on device \"cpu\""]),
    ];
    for (extra, wants) in cases {
        let err = ExperimentConfig::parse(&toy("bad", 1, extra), "bad.toml")
            .err()
            .ok_or_else(|| anyhow!("accepted: {extra}"))?
            .to_string();
        for want in wants {
            ensure!(err.contains(want), "{extra:?}: {err}");
        }
    }
    // Megatron-SP with a tiled MLP.
    let text = toy("bad", 1, "mlp_tile = 8\n").replace("[\"ulysses\", \"ring\"]", "[\"megatron_sp\"]");
    let err =
        ExperimentConfig::parse(&text, "bad.toml").err().ok_or_else(|| anyhow!("accepted"))?.to_string();
    ensure!(err.contains("train.mlp_tile") && err.contains("megatron_sp"), "{err}");
    // Nothing of ours left in the folder that was probed.
    let probe = ExperimentConfig::parse(
        &toy(
            "ok",
            1,
            &format!(
                "offload = \"disk\"\ncheckpointing = \"full\"\noffload_dir = {:?}\n",
                dir.display().to_string()
            ),
        ),
        "ok.toml",
    )?;
    ensure!(probe.offload()?.is_some(), "offload parsed");
    let left: Vec<_> = std::fs::read_dir(&dir)?.flatten().map(|e| e.file_name()).collect();
    ensure!(left == vec![std::ffi::OsString::from("a-file")], "left in the folder: {left:?}");
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}
