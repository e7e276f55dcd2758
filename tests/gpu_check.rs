//! The GPU check's plan, checked without a GPU: `scripts/gpu-check.sh --dry-run` against the
//! `ulysses-gpu` built with this test (its caps fit 8 minutes, and every step it plans is one
//! the binary knows), and the binary's own step list.
#![cfg(feature = "nccl")]

use std::path::Path;
use std::process::Command;

use anyhow::{ensure, Context, Result};

const STEPS: [&str; 8] = [
    "preflight",
    "nccl-world",
    "nccl-latency",
    "watchdog",
    "ulysses-parity",
    "ring-parity",
    "stack-8k",
    "calibrate",
];

#[test]
fn the_gpu_check_plan_fits_eight_minutes_and_names_known_steps() -> Result<()> {
    let gpu = Path::new(env!("CARGO_BIN_EXE_ulysses-gpu"));
    let bin_dir = gpu.parent().context("the binary has no folder")?;
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/gpu-check.sh");
    let out = Command::new("bash").arg(&script).arg(bin_dir).arg("--dry-run").output()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    ensure!(out.status.success(), "{} --dry-run failed:\n{text}", script.display());
    ensure!(
        text.contains("every step is one that"),
        "the steps were not checked against the binary:\n{text}"
    );
    // The caps as the script prints them: every step has one, and they sum within the budget.
    let mut total = 0;
    for step in std::iter::once("env").chain(STEPS) {
        let line = text
            .lines()
            .find(|l| l.split_whitespace().next() == Some(step))
            .with_context(|| format!("no cap for {step}:\n{text}"))?;
        let cap: u32 = line.split_whitespace().nth(1).context("no number")?.parse()?;
        ensure!(cap > 0 && cap <= 120, "{step}: cap {cap} s");
        total += cap;
    }
    ensure!(total + 5 <= 480, "caps {total} s + 5 s grace exceed 8 minutes:\n{text}");
    ensure!(text.contains(&format!("total {total} s of caps")), "{text}");
    Ok(())
}

#[test]
fn ulysses_gpu_lists_its_steps_without_a_gpu() -> Result<()> {
    let out = Command::new(env!("CARGO_BIN_EXE_ulysses-gpu")).arg("--steps").output()?;
    ensure!(out.status.success(), "ulysses-gpu --steps: {out:?}");
    let text = String::from_utf8(out.stdout)?;
    let names: Vec<&str> = text.lines().filter_map(|l| l.split('\t').next()).collect();
    for step in STEPS {
        ensure!(names.contains(&step), "{step} missing from:\n{text}");
    }
    Ok(())
}

/// Without a usable CUDA (this machine in CI), a step ends with one FAIL line saying so.
#[test]
fn a_step_without_cuda_fails_in_one_line() -> Result<()> {
    if ulysses::device::load_cuda() {
        return Ok(()); // a GPU machine: scripts/gpu-check.sh runs the steps for real
    }
    let out = Command::new(env!("CARGO_BIN_EXE_ulysses-gpu")).arg("preflight").output()?;
    let text = String::from_utf8(out.stdout)?;
    ensure!(!out.status.success(), "preflight passed without CUDA: {text}");
    ensure!(
        text.lines().count() == 1 && text.starts_with("FAIL preflight: no CUDA device is usable"),
        "{text}"
    );
    Ok(())
}

#[test]
fn the_set_up_picks_the_cuda_build_a_driver_runs() -> Result<()> {
    // `scripts/setup.sh --cuda-plan DRIVER` (what `--cuda` decides from nvidia-smi): CUDA 13.0
    // from 580.65.06, a CUDA 12.x build from 525.60.13, and an error naming both below that.
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/setup.sh");
    let plan = |driver: &str| -> Result<(bool, String)> {
        let out = Command::new("bash").arg(&script).args(["--cuda-plan", driver]).output()?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
        Ok((out.status.success(), text.trim().to_string()))
    };
    for (driver, want) in
        [("580.65.06", "cu130"), ("590.44.01", "cu130"), ("580.65.05", "cu128"), ("525.60.13", "cu128")]
    {
        let (ok, text) = plan(driver)?;
        ensure!(ok && text == want, "driver {driver}: {text}, expected {want}");
    }
    for driver in ["525.60.12", "470.239.06"] {
        let (ok, text) = plan(driver)?;
        ensure!(!ok && text.contains("525.60.13") && text.contains(driver), "driver {driver}: {text}");
    }
    let (ok, text) = plan("latest")?;
    ensure!(!ok && text.contains("not a version number"), "{text}");
    Ok(())
}
