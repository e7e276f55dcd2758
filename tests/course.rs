//! The checks of the notebooks' exercises (`ulysses::course`) accept the reference solutions of
//! notebooks/solutions/ and reject wrong ones, each with a message that names the mismatch: a
//! check that cannot fail would pass every learner.

use tch::Tensor;
use ulysses::comm::Group;
use ulysses::course::{attempt, check_ulysses_bytes, check_ulysses_reshard, Outcome};
use ulysses::Result;

// --- 01: the forward re-sharding -------------------------------------------------------------

/// The reference solution (notebooks/solutions/01_02_solutions.ipynb): scatter the heads (dim 2),
/// gather the sequence (dim 1).
fn reshard(g: &Group, x: &Tensor) -> Result<Tensor> {
    g.all_to_all(x, 2, 1)
}

/// The dims swapped: scatters the sequence and gathers the heads.
fn reshard_swapped(g: &Group, x: &Tensor) -> Result<Tensor> {
    g.all_to_all(x, 1, 2)
}

/// Gathers the whole sequence, then keeps every P-th head from the rank's index (a transposed
/// reshape: `[H/P, P]` where `[P, H/P]` is meant): the right shape, the wrong heads.
fn reshard_strided_heads(g: &Group, x: &Tensor) -> Result<Tensor> {
    let full = g.all_gather(x, 1)?;
    let s = full.size();
    let p = g.size() as i64;
    Ok(full.reshape([s[0], s[1], s[2] / p, p, s[3]]).select(3, g.rank() as i64))
}

fn reshard_todo(_g: &Group, _x: &Tensor) -> Result<Tensor> {
    todo!("your code here")
}

#[test]
fn reshard_check_accepts_the_solution() -> Result<()> {
    let verdict = check_ulysses_reshard(reshard)?;
    assert!(verdict.starts_with("correct"), "{verdict}");
    assert!(attempt(|| check_ulysses_reshard(reshard)).passed());
    Ok(())
}

#[test]
fn reshard_check_rejects_swapped_dims() {
    let e = check_ulysses_reshard(reshard_swapped).expect_err("swapped dims passed").to_string();
    assert!(e.contains("P=2") && e.contains("returned [1, 2, 8, 2], expected [1, 8, 2, 2]"), "{e}");
}

#[test]
fn reshard_check_rejects_strided_heads() {
    let e = check_ulysses_reshard(reshard_strided_heads).expect_err("strided heads passed").to_string();
    assert!(
        e.contains("P=2")
            && e.contains("rank 0 returned the right shape")
            && e.contains("is 4 (token 0, head 2) where 2 (token 0, head 1) was expected"),
        "{e}"
    );
}

#[test]
fn a_stub_is_not_attempted_and_other_panics_fail() {
    let o = attempt(|| check_ulysses_reshard(reshard_todo));
    assert!(matches!(&o, Outcome::NotAttempted(m) if m.contains("your code here")), "{o}");
    assert!(o.to_string().starts_with("not attempted yet"), "{o}");
    let o = attempt(|| check_ulysses_reshard(|_: &Group, _: &Tensor| -> Result<Tensor> { panic!("oops") }));
    assert!(matches!(&o, Outcome::Failed(m) if m.contains("oops")), "{o}");
    let o = attempt(|| check_ulysses_reshard(reshard_swapped));
    assert!(o.to_string().starts_with("not yet right: check_ulysses_reshard"), "{o}");
}

// --- 02: the bytes of one layer --------------------------------------------------------------

/// The reference solution: four all-to-alls forward (q, k, v, the output), each keeping 1/P of
/// the rank's N/P tokens and sending the rest, (2 N H d + 2 N H_kv d)(P-1)/P^2 elements; the
/// backward sends as much again; 4 bytes an element.
fn layer_bytes(n: u64, p: u64, heads: u64, kv_heads: u64, d: u64) -> u64 {
    2 * (2 * n * heads * d + 2 * n * kv_heads * d) * (p - 1) / (p * p) * 4
}

#[test]
fn bytes_check_accepts_the_solution() -> Result<()> {
    let verdict = check_ulysses_bytes(layer_bytes)?;
    assert!(verdict.starts_with("correct"), "{verdict}");
    Ok(())
}

#[test]
fn bytes_check_rejects_wrong_formulas() {
    // The forward only.
    let e = check_ulysses_bytes(|n, p, h, kv, d| layer_bytes(n, p, h, kv, d) / 2).expect_err("forward only");
    assert!(e.to_string().contains("P=2, N=16, H=4, H_kv=4, d=4: your formula gives 1024 B, rank 0 sent 2048 B (1024 B forward + 1024 B backward)"), "{e}");
    // Off by one: P where P-1 belongs.
    let e = check_ulysses_bytes(|n, p, h, kv, d| 2 * (2 * n * h * d + 2 * n * kv * d) * p / (p * p) * 4)
        .expect_err("off by one");
    assert!(e.to_string().contains("your formula gives 4096 B, rank 0 sent 2048 B"), "{e}");
    // H for H_kv: right until the first GQA case.
    let e = check_ulysses_bytes(|n, p, h, _kv, d| layer_bytes(n, p, h, h, d)).expect_err("H for H_kv");
    assert!(e.to_string().contains("P=2, N=32, H=8, H_kv=2"), "{e}");
    let o = attempt(|| check_ulysses_bytes(|_, _, _, _, _| todo!("your formula here")));
    assert!(matches!(o, Outcome::NotAttempted(_)), "{o}");
}
