//! Helpers shared by the integration tests: rank-dependent data and labelled comparisons, and
//! the rank-level conformance checks that run on every backend.
#![allow(dead_code)]

pub mod checks;
pub mod parity;
pub mod tolerance;
pub mod train_checks;
pub mod training;
pub mod zero_memory;

use tch::{Device, Kind, Tensor};

/// The world sizes every multi-rank test runs at.
pub const WORLD_SIZES: [usize; 5] = [1, 2, 3, 4, 8];

/// The dtypes every collective is checked with.
pub const KINDS: [Kind; 5] = [Kind::Float, Kind::Double, Kind::BFloat16, Kind::Half, Kind::Int64];

/// Rank `rank`'s data of `shape`: small integers in [-48, 48] that depend on the rank and the
/// position, exact in every dtype (so sums over 8 ranks stay exact in f32 accumulation).
/// With `contiguous = false` the result is a permuted (non-contiguous) view of the same values.
pub fn data(rank: usize, shape: &[i64], kind: Kind, contiguous: bool) -> Tensor {
    let n: i64 = shape.iter().product();
    let flat = (Tensor::arange(n, (Kind::Int64, Device::Cpu)) * 11 + rank as i64 * 37 + 5).remainder(97) - 48;
    let t = flat.reshape(shape).to_kind(kind);
    // Tensors with fewer than two dims of extent > 1 are contiguous in any layout.
    if contiguous || shape.iter().filter(|&&s| s > 1).count() < 2 {
        return t;
    }
    // Same values, stored transposed: reverse the dims, make that contiguous, reverse back.
    let rev: Vec<i64> = (0..shape.len() as i64).rev().collect();
    let stored = t.permute(&rev).contiguous();
    let view = stored.permute(&rev);
    assert!(!view.is_contiguous(), "wanted a non-contiguous view of {shape:?}");
    view
}

/// Largest absolute elementwise difference, in f64.
pub fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    if a.numel() == 0 {
        return 0.0;
    }
    (a.to_kind(Kind::Double) - b.to_kind(Kind::Double)).abs().max().double_value(&[])
}

/// Asserts equal shape, dtype and values, bit for bit.
pub fn assert_exact(label: &str, got: &Tensor, want: &Tensor) {
    assert_eq!(got.size(), want.size(), "{label}: shape");
    assert_eq!(got.kind(), want.kind(), "{label}: dtype");
    assert!(got.equal(want), "{label}: values differ, max diff {:.3e}", max_diff(got, want));
}

/// Asserts equal shapes and values within `tol` (absolute).
pub fn assert_close(label: &str, got: &Tensor, want: &Tensor, tol: f64) {
    assert_eq!(got.size(), want.size(), "{label}: shape");
    let d = max_diff(got, want);
    assert!(d <= tol, "{label}: max diff {d:.3e} > {tol:.3e}");
}

/// Deterministic pseudo-random values in [-0.5, 0.5) of `shape`, the same on every thread and
/// every run (a hash of the position and `seed`), in `kind`.
pub fn det(shape: &[i64], seed: u64, kind: Kind) -> Tensor {
    let n: i64 = shape.iter().product();
    let i = Tensor::arange(n, (Kind::Double, Device::Cpu));
    let h = ((i * 12.9898 + seed as f64 * 78.233).sin() * 43758.5453).frac();
    // frac of a negative number is negative: fold into [0, 1), then centre.
    let u = (h + 1.0).frac() - 0.5;
    u.reshape(shape).to_kind(kind)
}

/// Sum of elementwise products, in f64.
pub fn dot(a: &Tensor, b: &Tensor) -> f64 {
    (a.to_kind(Kind::Double) * b.to_kind(Kind::Double)).sum(Kind::Double).double_value(&[])
}

/// H heads over P ranks, ranks below H % P getting one more (the library's uneven rule).
pub fn head_split(h: i64, p: usize) -> Vec<i64> {
    let p = p as i64;
    (0..p).map(|r| h / p + i64::from(r < h % p)).collect()
}

/// The causal mask of `n` tokens as `[n, n]` booleans, true where query i may see key j <= i.
pub fn causal(n: i64) -> Tensor {
    Tensor::ones([n, n], (Kind::Bool, Device::Cpu)).tril(0)
}

/// The single-device ground truth every parity test compares with: plain math attention in f64
/// on the CPU, query head h reading kv head h / (H / H_kv), `allowed` ([N, N], true where query i
/// may see key j). Returns (out, dq, dk, dv) for the loss sum(out * w), in f64.
///
/// # Shapes
/// `q`, `w`: `[b, N, H, d]`; `k`, `v`: `[b, N, H_kv, d]` -> out `[b, N, H, d]`, grads as their inputs.
pub fn reference_attention(allowed: &Tensor, q: &Tensor, k: &Tensor, v: &Tensor, w: &Tensor) -> [Tensor; 4] {
    // Fresh f64 leaves: the callers' tensors are left as they are.
    let [q, k, v] = [q, k, v].map(|t| t.detach().to_kind(Kind::Double).copy().set_requires_grad(true));
    let (heads, kv_heads, d) = (q.size()[2], k.size()[2], q.size()[3]);
    let map = Tensor::arange(heads, (Kind::Int64, Device::Cpu)).floor_divide_scalar(heads / kv_heads);
    // [b, N, H_kv, d] -> [b, N, H, d] -> [b, H, N, d]
    let (ke, ve) = (k.index_select(2, &map).transpose(1, 2), v.index_select(2, &map).transpose(1, 2));
    // [b, N, H, d] -> [b, H, N, d] x [b, H, d, N] -> [b, H, N, N]
    let scores = q.transpose(1, 2).matmul(&ke.transpose(-2, -1)) / (d as f64).sqrt();
    // [b, H, N, N] x [b, H, N, d] -> [b, H, N, d] -> [b, N, H, d]
    let out = scores
        .masked_fill(&allowed.logical_not(), f64::NEG_INFINITY)
        .softmax(-1, Kind::Double)
        .matmul(&ve)
        .transpose(1, 2);
    (&out * w.to_kind(Kind::Double)).sum(Kind::Double).backward();
    [out.detach(), q.grad(), k.grad(), v.grad()]
}
