//! The checks of the notebooks' exercises (`ulysses::course`) accept the reference solutions of
//! notebooks/solutions/ and reject wrong ones, each with a message that names the mismatch: a
//! check that cannot fail would pass every learner.

use tch::Tensor;
use ulysses::comm::Group;
use ulysses::course::{
    attempt, check_a2a_time, check_checkpoint_bytes, check_hiding_length, check_megatron_sp_bytes,
    check_ring_reach, check_step_flops, check_ulysses_bytes, check_ulysses_reshard, check_zero_states,
    LinkSpeed, Outcome,
};
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

// --- 03: how far a packed ring's blocks travel ----------------------------------------------

/// The reference solution (notebooks/solutions/03_05_solutions.ipynb): a document that starts in
/// share `first` and ends in share `last` makes every block it touches travel to `last` (causal:
/// no rank before it attends to it).
fn reach(lengths: &[i64], n: i64, p: usize) -> Vec<usize> {
    let share = n / p as i64;
    let mut reach = vec![0; p];
    let mut start = 0;
    for &len in lengths {
        let (first, last) = ((start / share) as usize, ((start + len - 1) / share) as usize);
        for (j, r) in reach.iter_mut().enumerate().take(last + 1).skip(first) {
            *r = (*r).max(last - j);
        }
        start += len;
    }
    reach
}

#[test]
fn reach_check_accepts_the_solution() -> Result<()> {
    let verdict = check_ring_reach(reach)?;
    assert!(verdict.starts_with("correct"), "{verdict}");
    Ok(())
}

#[test]
fn reach_check_rejects_wrong_answers() {
    // The classic ring: every block the whole way round.
    let e = check_ring_reach(|_, _, p| vec![p - 1; p]).expect_err("classic ring").to_string();
    assert!(
        e.contains("documents [30, 18], N=48, P=2: your reach [1, 1] has rank 0 pass on 1 and receive 1 blocks; it passed on 1 and received 0"),
        "{e}"
    );
    // Each block as far as its document's last share lies from the document's first: too far
    // for the blocks after the first (here the last block of [30, 18], which no rank after it
    // reads).
    let too_far = |lengths: &[i64], n: i64, p: usize| {
        let share = n / p as i64;
        let mut reach = vec![0; p];
        let mut start = 0;
        for &len in lengths {
            let (first, last) = ((start / share) as usize, ((start + len - 1) / share) as usize);
            for r in reach.iter_mut().take(last + 1).skip(first) {
                *r = (*r).max(last - first);
            }
            start += len;
        }
        reach
    };
    let e = check_ring_reach(too_far).expect_err("too far").to_string();
    assert!(e.contains("documents [30, 18], N=48, P=2: your reach [1, 1]"), "{e}");
    // A wrong length is named.
    let e = check_ring_reach(|_, _, _| vec![0]).expect_err("length").to_string();
    assert!(e.contains("should hold P = 2 numbers from 0 to 1"), "{e}");
}

// --- 04: the FLOPs of a step -----------------------------------------------------------------

/// The reference solution: 6 FLOPs per matmul parameter and token (2 forward, 4 backward), and
/// 12 L h per (query, key) pair the mask leaves (QK^T and the weighted sum of V, 2 FLOPs a
/// multiply-add, times 3 with the backward): N (N + 1) / 2 pairs causal, N^2 unmasked.
fn step_flops(params: u64, layers: u64, h: u64, n: u64, b: u64, causal: bool) -> f64 {
    let pairs = if causal { n * (n + 1) / 2 } else { n * n } as f64;
    6.0 * params as f64 * (b * n) as f64 + 12.0 * (layers * h) as f64 * pairs * b as f64
}

#[test]
fn flops_check_accepts_the_solution() -> Result<()> {
    let verdict = check_step_flops(step_flops)?;
    assert!(verdict.starts_with("correct"), "{verdict}");
    Ok(())
}

#[test]
fn flops_check_rejects_wrong_counts() {
    // The forward only.
    let e =
        check_step_flops(|p, l, h, n, b, c| step_flops(p, l, h, n, b, c) / 3.0).expect_err("forward only");
    assert!(e.to_string().contains("the tiny GPT") && e.to_string().contains("(-66.667%)"), "{e}");
    // Causal pairs as N^2 / 2: the diagonal forgotten.
    let half = |p: u64, l: u64, h: u64, n: u64, b: u64, c: bool| {
        let pairs = if c { (n * n / 2) as f64 } else { (n * n) as f64 };
        6.0 * p as f64 * (b * n) as f64 + 12.0 * (l * h) as f64 * pairs * b as f64
    };
    let e = check_step_flops(half).expect_err("no diagonal").to_string();
    assert!(e.contains("4 x 1024 tokens, causal"), "{e}");
}

// --- 05: what a rank holds under ZeRO --------------------------------------------------------

/// The reference solution: bytes per parameter (parameters, gradients, optimizer states) of
/// 4 + 4 + 8 in f32 and 2 + 2 + 12 in bf16 mixed precision (f32 master weights and Adam's two
/// moments); stage 1 partitions the optimizer states over W, stage 2 the gradients too, stage 3
/// the parameters too.
fn zero_states(psi: u64, w: u64, stage: u8, mixed: bool) -> f64 {
    let (p, g, o) = if mixed { (2.0, 2.0, 12.0) } else { (4.0, 4.0, 8.0) };
    let (psi, w) = (psi as f64, w as f64);
    let share = |partitioned: bool| if partitioned { psi / w } else { psi };
    p * share(stage >= 3) + g * share(stage >= 2) + o * share(stage >= 1)
}

#[test]
fn zero_check_accepts_the_solution() -> Result<()> {
    let verdict = check_zero_states(zero_states)?;
    assert!(verdict.starts_with("correct"), "{verdict}");
    Ok(())
}

#[test]
fn zero_check_rejects_wrong_formulas() {
    // Stage 2 partitioning the parameters as well (that is stage 3).
    let e = check_zero_states(|psi, w, stage, mixed| {
        zero_states(psi, w, if stage == 2 { 3 } else { stage }, mixed)
    })
    .expect_err("stage 2 as 3")
    .to_string();
    assert!(e.contains("W = 2, ZeRO-2, f32"), "{e}");
    // Mixed precision without the f32 master weights (2 + 2 + 8).
    let no_master = |psi: u64, w: u64, stage: u8, mixed: bool| {
        let full = zero_states(psi, w, stage, mixed);
        if mixed {
            full - 4.0 * psi as f64 / if stage >= 1 { w as f64 } else { 1.0 }
        } else {
            full
        }
    };
    let e = check_zero_states(no_master).expect_err("no master weights").to_string();
    assert!(e.contains("W = 1, ZeRO-0, bf16 mixed precision"), "{e}");
}

// --- 06: where the all-to-alls hide behind attention ------------------------------------------

/// The reference solution: forward all-to-alls send 4 N h (P-1)/P^2 elements per rank (q, k, v
/// and the output, each keeping 1/P); causal attention on H/P heads costs 4 h / P FLOPs per
/// visible pair, N^2 / 2 pairs; equal when N = 2 (P-1) es F / (P B).
fn hiding_length(p: u64, es: u64, flops: f64, bandwidth: f64) -> f64 {
    2.0 * (p - 1) as f64 * es as f64 * flops / (p as f64 * bandwidth)
}

#[test]
fn hiding_check_accepts_the_solution() -> Result<()> {
    let verdict = check_hiding_length(hiding_length)?;
    assert!(verdict.starts_with("correct"), "{verdict}");
    Ok(())
}

#[test]
fn hiding_check_rejects_wrong_lengths() {
    // The (P-1)/P share that leaves each rank forgotten: twice too long at P = 2.
    let e = check_hiding_length(|_p, es, f, b| 2.0 * es as f64 * f / b).expect_err("no (P-1)/P").to_string();
    assert!(e.contains("P = 2, 2-byte elements, 156 TFLOP/s, 240 GB/s") && e.contains("+100.0%"), "{e}");
    // Unmasked attention (N^2 pairs): half the length.
    let e = check_hiding_length(|p, es, f, b| hiding_length(p, es, f, b) / 2.0)
        .expect_err("unmasked")
        .to_string();
    assert!(e.contains("-50.0%"), "{e}");
    let o = attempt(|| check_hiding_length(|_, _, _, _| todo!("your length here")));
    assert!(matches!(o, Outcome::NotAttempted(_)), "{o}");
}

// --- 07: Megatron-SP's bytes --------------------------------------------------------------------

/// The reference solution: the forward all-gathers before attention and the MLP and
/// reduce-scatters after them, each moving (P-1)/P of an `[N, h]` tensor per rank; the backward
/// runs their adjoints (4) and gathers the attention's and the MLP's inputs again for the weight
/// gradients (2).
fn megatron_sp_bytes(n: u64, h: u64, p: u64) -> (u64, u64) {
    let one = n * h * (p - 1) / p * 4;
    (4 * one, 6 * one)
}

#[test]
fn megatron_check_accepts_the_solution() -> Result<()> {
    let verdict = check_megatron_sp_bytes(megatron_sp_bytes)?;
    assert!(verdict.starts_with("correct"), "{verdict}");
    Ok(())
}

#[test]
fn megatron_check_rejects_wrong_formulas() {
    // The backward as the forward's adjoints only, without the re-gathered inputs.
    let e = check_megatron_sp_bytes(|n, h, p| {
        let (f, _) = megatron_sp_bytes(n, h, p);
        (f, f)
    })
    .expect_err("no re-gather")
    .to_string();
    assert!(e.contains("P = 2, N = 16, h = 48") && e.contains("6144 B backward"), "{e}");
    // The whole tensor sent, not the (P-1)/P that leaves the rank.
    let e = check_megatron_sp_bytes(|n, h, _p| (4 * n * h * 4, 6 * n * h * 4))
        .expect_err("no (P-1)/P")
        .to_string();
    assert!(e.contains("P = 2, N = 16"), "{e}");
    let o = attempt(|| check_megatron_sp_bytes(|_, _, _| todo!("your bytes here")));
    assert!(matches!(o, Outcome::NotAttempted(_)), "{o}");
}

// --- 08: what full checkpointing keeps ----------------------------------------------------------

/// The reference solution: one `[N/P, h]` input per block, or with offload at most two on the
/// device (the one in use, the one coming).
fn checkpoint_bytes(layers: u64, n: u64, p: u64, h: u64, es: u64, offload: bool) -> f64 {
    let blocks = if offload { layers.min(2) } else { layers };
    (blocks * (n / p) * h * es) as f64
}

#[test]
fn checkpoint_check_accepts_the_solution() -> Result<()> {
    let verdict = check_checkpoint_bytes(checkpoint_bytes)?;
    assert!(verdict.starts_with("correct"), "{verdict}");
    Ok(())
}

#[test]
fn checkpoint_check_rejects_wrong_formulas() {
    // Offload as if nothing stayed on the device.
    let e = check_checkpoint_bytes(
        |l, n, p, h, es, off| if off { 0.0 } else { checkpoint_bytes(l, n, p, h, es, off) },
    )
    .expect_err("offload keeps nothing")
    .to_string();
    assert!(
        e.contains("llama3-8b (L = 32, h = 4096), N = 1048576 on P = 8") && e.contains("offload true"),
        "{e}"
    );
    // The whole sequence on every rank.
    let e = check_checkpoint_bytes(|l, n, _p, h, es, off| checkpoint_bytes(l, n, 1, h, es, off))
        .expect_err("no /P")
        .to_string();
    assert!(e.contains("P = 8") && e.contains("offload false"), "{e}");
    // Two blocks on the device even when the model has one.
    let e = check_checkpoint_bytes(|l, n, p, h, es, off| {
        if off {
            (2 * (n / p) * h * es) as f64
        } else {
            checkpoint_bytes(l, n, p, h, es, off)
        }
    })
    .expect_err("two of one block")
    .to_string();
    assert!(e.contains("one-layer (L = 1"), "{e}");
}

// --- 09: an all-to-all over nodes -------------------------------------------------------------

/// Members of a group of `p` ranks, `stride` apart, on one node of `dpn` devices.
fn on_one_node(p: u64, stride: u64, dpn: u64) -> u64 {
    if p * stride <= dpn {
        p
    } else if stride < dpn {
        (dpn / stride).clamp(1, p)
    } else {
        1
    }
}

/// The reference solution (notebooks/solutions/07_09_solutions.ipynb, as the others of 07-09): inside a node, P-1
/// latency steps and the bytes at the intra-node speed; over nodes, each peer's share on the link
/// that reaches it, both at once (the slower sets the time), with the inter-node latency.
fn a2a_time(sent: f64, p: u64, stride: u64, dpn: u64, intra: LinkSpeed, inter: LinkSpeed) -> f64 {
    let g = on_one_node(p, stride, dpn);
    let steps = (p - 1) as f64;
    if g == p {
        return steps * intra.latency_s + sent / intra.bytes_per_s;
    }
    let inside = sent * (g - 1) as f64 / steps;
    let outside = sent * (p - g) as f64 / steps;
    steps * inter.latency_s + (inside / intra.bytes_per_s).max(outside / inter.bytes_per_s)
}

#[test]
fn a2a_check_accepts_the_solution() -> Result<()> {
    let verdict = check_a2a_time(a2a_time)?;
    assert!(verdict.starts_with("correct"), "{verdict}");
    Ok(())
}

#[test]
fn a2a_check_rejects_wrong_times() {
    // Every byte over the inter-node link once the group leaves the node.
    let all_inter = |sent: f64, p: u64, stride: u64, dpn: u64, intra: LinkSpeed, inter: LinkSpeed| {
        if on_one_node(p, stride, dpn) == p {
            a2a_time(sent, p, stride, dpn, intra, inter)
        } else {
            (p - 1) as f64 * inter.latency_s + sent / inter.bytes_per_s
        }
    };
    let e = check_a2a_time(all_inter).expect_err("all inter-node").to_string();
    assert!(e.contains("P = 16, stride 1 (8 of the group on a node)"), "{e}");
    // The stride ignored: a strided group placed as if contiguous.
    let e = check_a2a_time(|sent, p, _stride, dpn, intra, inter| a2a_time(sent, p, 1, dpn, intra, inter))
        .expect_err("stride ignored")
        .to_string();
    assert!(e.contains("P = 4, stride 4 (2 of the group on a node)"), "{e}");
    // The two links one after the other instead of at once.
    let summed = |sent: f64, p: u64, stride: u64, dpn: u64, intra: LinkSpeed, inter: LinkSpeed| {
        let g = on_one_node(p, stride, dpn);
        if g == p {
            return a2a_time(sent, p, stride, dpn, intra, inter);
        }
        let steps = (p - 1) as f64;
        steps * inter.latency_s
            + sent * (g - 1) as f64 / steps / intra.bytes_per_s
            + sent * (p - g) as f64 / steps / inter.bytes_per_s
    };
    let e = check_a2a_time(summed).expect_err("links summed").to_string();
    assert!(e.contains("P = 16, stride 1"), "{e}");
    let o = attempt(|| check_a2a_time(|_, _, _, _, _, _| todo!("your time here")));
    assert!(matches!(o, Outcome::NotAttempted(_)), "{o}");
}
