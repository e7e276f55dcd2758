//! `ulysses layer`: q, k, v from a safetensors file through any strategy on P ranks, the output,
//! the gradients and the log-sum-exp back to a file, checked against a single-device
//! computation.

mod common;

use std::path::PathBuf;
use std::process::Command;

use anyhow::{ensure, Result};
use common::parity::attention_bound;
use common::{causal, det, max_diff, reference_attention, tolerance};
use tch::{Kind, Tensor};

fn temp(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("ulysses-interop-{}-{name}", std::process::id()))
}

#[test]
fn a_layer_runs_from_and_to_safetensors() -> Result<()> {
    let (b, n, heads, kv_heads, d) = (2, 22, 6, 2, 8);
    let (input, output) = (temp("in.safetensors"), temp("out.safetensors"));
    // Each dtype to the rounding bound of attention in it (tests/common/parity.rs): values in
    // [-0.5, 0.5), so every result is of order at most 1 and a score's absolute terms sum to at
    // most d / 4 / sqrt(d). f64 comes back to about 1e-13: it catches any f32 step on the way.
    for kind in [Kind::Float, Kind::Double] {
        let s = d as f64 / 4.0 / (d as f64).sqrt();
        let q = det(&[b, n, heads, d], 1, kind);
        let k = det(&[b, n, kv_heads, d], 2, kind);
        let v = det(&[b, n, kv_heads, d], 3, kind);
        let go = det(&[b, n, heads, d], 4, kind);
        Tensor::write_safetensors(&[("q", &q), ("k", &k), ("v", &v), ("grad_out", &go)], &input)?;
        let want = reference_attention(&causal(n), &q, &k, &v, &go);
        for ranks in ["1", "3", "4"] {
            let status = Command::new(env!("CARGO_BIN_EXE_ulysses"))
                .args(["layer", "--ranks", ranks, "--kernel", "sdpa", "--mask", "causal", "--input"])
                .arg(&input)
                .arg("--output")
                .arg(&output)
                .output()?;
            ensure!(
                status.status.success(),
                "ulysses layer failed: {}",
                String::from_utf8_lossy(&status.stderr)
            );
            let got = Tensor::read_safetensors(&output)?;
            for (name, w) in ["out", "grad_q", "grad_k", "grad_v"].iter().zip(&want) {
                let t = &got.iter().find(|(n, _)| n == name).expect("every output tensor is written").1;
                ensure!(t.kind() == kind && t.size() == w.size(), "{name}: {:?} {:?}", t.kind(), t.size());
                let bound = attention_bound(kind, n, d, heads / kv_heads, ranks.parse()?, s);
                let label = format!("{kind:?} P={ranks} {name} against f64 attention: max diff");
                tolerance::check(&label, max_diff(t, w), bound)?;
            }
        }
    }
    let q = det(&[b, n, heads, d], 1, Kind::Float);
    let v = det(&[b, n, kv_heads, d], 3, Kind::Float);

    // A file without k is refused with the names it does hold.
    Tensor::write_safetensors(&[("q", &q), ("v", &v)], &input)?;
    let out = Command::new(env!("CARGO_BIN_EXE_ulysses"))
        .arg("layer")
        .arg("--input")
        .arg(&input)
        .arg("--output")
        .arg(&output)
        .output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(!out.status.success() && err.contains("must hold tensors q, k and v"), "{err}");
    let _ = std::fs::remove_file(&input);
    let _ = std::fs::remove_file(&output);
    Ok(())
}

#[test]
fn every_strategy_and_mask_runs_through_files_with_the_lse() -> Result<()> {
    use common::parity::{allclose, reference, tol, Spec};
    let (input, output) = (temp("all-in.safetensors"), temp("all-out.safetensors"));
    // N = 24 splits into 2P chunks at P = 4; 8 heads, 4 kv heads (Megatron-SP needs both / P).
    // Every strategy once (the masks in turn, f32), and two in bf16: the library's own tests
    // cover every combination; this checks the plumbing (options, sharding, files, lse).
    let runs = [
        ("single", "1", "causal", Kind::Float),
        ("ulysses", "4", "window:5", Kind::Float),
        ("megatron_sp", "4", "sparse:4,2,1", Kind::Float),
        ("ring", "4", "window:5", Kind::Float),
        ("ring_zigzag", "4", "causal", Kind::Float),
        ("allgather_kv_zigzag", "4", "sparse:4,2,1", Kind::Float),
        ("usp_zigzag:2", "4", "window:5", Kind::Float),
        ("ulysses", "3", "causal", Kind::BFloat16),
        ("usp:2", "4", "none", Kind::BFloat16),
    ];
    for (strategy, ranks, mask, kind) in runs {
        let spec = Spec { kind, logits: 3.0, ..Spec::new(24, 8, 4) };
        let [q, k, v, go] = spec.tensors();
        Tensor::write_safetensors(&[("q", &q), ("k", &k), ("v", &v), ("grad_out", &go)], &input)?;
        let want = reference(&spec, mask.parse().map_err(anyhow::Error::msg)?)?;
        let out = Command::new(env!("CARGO_BIN_EXE_ulysses"))
            .args(["layer", "--strategy", strategy, "--ranks", ranks, "--mask", mask, "--lse", "--input"])
            .arg(&input)
            .arg("--output")
            .arg(&output)
            .output()?;
        let label = format!("{strategy} P={ranks} {mask} {kind:?}");
        ensure!(out.status.success(), "{label}: {}", String::from_utf8_lossy(&out.stderr));
        let got = Tensor::read_safetensors(&output)?;
        for (name, w) in ["out", "grad_q", "grad_k", "grad_v", "lse"].iter().zip(&want) {
            let t = &got.iter().find(|(n, _)| n == name).expect("every output tensor is written").1;
            let lse_kind = if *name == "lse" { Kind::Float } else { kind };
            ensure!(t.kind() == lse_kind, "{label} {name}: {:?}", t.kind());
            allclose(&format!("{label} {name}"), t, w, tol(&spec, ranks.parse()?))?;
        }
    }
    let _ = std::fs::remove_file(&input);
    let _ = std::fs::remove_file(&output);
    Ok(())
}
