//! Packed variable-length sequences through every strategy: documents of random lengths in each
//! sample (length 1, documents crossing rank boundaries, one longer than a rank's share, all
//! equal), forward, backward and log-sum-exp against single-device f64 attention whose mask is
//! written out here from the offsets, pair by pair; the visible-pair counts against the same
//! mask; the load balance of the layouts on packed batches; and the refusals of bad offsets.

mod common;

use anyhow::{ensure, Result};
use common::parity::{allclose, strategies_for, tol, Grad, Spec};
use common::{max_diff, reference_attention, tolerance};
use proptest::prelude::*;
use tch::{Device, Kind, Tensor};
use ulysses::attention::{
    imbalance, AttentionConfig, BlockSparse, Documents, Kernel, Mask, RingAttention, SeqLayout,
    SequenceParallel, SingleDevice, StrategyConfig,
};
use ulysses::autograd::Tape;
use ulysses::comm::launch;
use ulysses::model::{shift_labels, shift_labels_packed, Gpt, GptConfig, Placement, IGNORE};

/// The document of every position of one sample, from its lengths (and the document's first
/// position).
fn doc_index(lengths: &[i64]) -> Vec<(usize, i64)> {
    // (document, its first position) per position
    let mut out = Vec::new();
    let mut start = 0;
    for (d, &l) in lengths.iter().enumerate() {
        for _ in 0..l {
            out.push((d, start));
        }
        start += l;
    }
    out
}

/// The reference mask, written out pair by pair: query i sees key j when both lie in one
/// document and the rule allows them at their positions within it. `[b, 1, N, N]`.
fn allowed(lengths: &[Vec<i64>], mask: Mask) -> Tensor {
    let n: i64 = lengths[0].iter().sum();
    let mut flags = Vec::new();
    for sample in lengths {
        let at = doc_index(sample);
        for i in 0..n as usize {
            for j in 0..n as usize {
                let ((di, si), (dj, _)) = (at[i], at[j]);
                flags.push(di == dj && mask.allows(i as i64 - si, j as i64 - si));
            }
        }
    }
    Tensor::from_slice(&flags).reshape([lengths.len() as i64, 1, n, n])
}

/// The f64 reference: [out, dq, dk, dv, lse].
fn reference(spec: &Spec, lengths: &[Vec<i64>], mask: Mask) -> [Tensor; 5] {
    let [q, k, v, w] = spec.tensors();
    let allowed = allowed(lengths, mask);
    let [out, dq, dk, dv] = reference_attention(&allowed, &q, &k, &v, &w);
    let map = Tensor::arange(spec.heads, (Kind::Int64, Device::Cpu))
        .floor_divide_scalar(spec.heads / spec.kv_heads);
    // [b, N, H, d] -> [b, H, N, d]; [b, H, N, N] -> logsumexp -> [b, H, N] -> [b, N, H]
    let qd = q.to_kind(Kind::Double).transpose(1, 2);
    let kd = k.to_kind(Kind::Double).index_select(2, &map).transpose(1, 2);
    let scores = qd.matmul(&kd.transpose(-2, -1)) / (spec.d as f64).sqrt();
    let lse =
        scores.masked_fill(&allowed.logical_not(), f64::NEG_INFINITY).logsumexp([-1i64].as_slice(), false);
    [out, dq, dk, dv, lse.transpose(1, 2)]
}

/// `strategy` on `p` thread ranks over the packed batch: forward, tape backward of
/// `sum(out * grad_out)`, and the lse pass, put back together.
fn run(
    strategy: StrategyConfig,
    kernel: Kernel,
    p: usize,
    spec: &Spec,
    mask: Mask,
    docs: &Documents,
) -> ulysses::Result<[Tensor; 5]> {
    common::parity::run_packed(strategy, kernel, p, spec, mask, Some(docs))
}

/// `run` against `reference`, every tensor within the dtype's bound (tests/common/parity.rs:
/// the worst case of rounding in any order for N keys, which bounds the shorter sums of a
/// document too). A strategy that cannot take the shapes at all (Megatron-SP with heads that
/// do not split, ring with N not splitting) must be refused by its own check, packed or not.
fn check(
    strategy: StrategyConfig,
    kernel: Kernel,
    p: usize,
    spec: &Spec,
    mask: Mask,
    lengths: &[Vec<i64>],
) -> Result<bool> {
    if strategy.check(spec.n, p, spec.heads, spec.kv_heads).is_err() {
        return Ok(false);
    }
    let docs = Documents::from_lengths(spec.n, lengths)?;
    let got = run(strategy, kernel, p, spec, mask, &docs)?;
    let want = reference(spec, lengths, mask);
    for (i, name) in ["out", "dq", "dk", "dv", "lse"].iter().enumerate() {
        let label = format!(
            "{} {kernel:?} P={p} {:?} {mask:?} documents {lengths:?} {name}",
            strategy.label(),
            spec.kind
        );
        allclose(&label, &got[i], &want[i], tol(spec, p))?;
    }
    Ok(true)
}

/// Documents of a batch of 2 samples of N = 48, each case something a packer produces: one
/// document per sample (nothing packed), length-1 documents, documents that cross every rank
/// boundary, one longer than a rank's share (24 > 48/4), all equal.
fn cases() -> Vec<Vec<Vec<i64>>> {
    vec![
        vec![vec![48], vec![48]],
        vec![vec![1, 47], vec![1, 1, 1, 45]],
        vec![vec![5, 7, 12, 24], vec![13, 1, 29, 5]],
        vec![vec![16, 16, 16], vec![6, 6, 6, 6, 6, 6, 6, 6]],
        vec![vec![30, 18], vec![2, 40, 6]],
    ]
}

fn masks() -> Vec<Mask> {
    vec![Mask::None, Mask::Causal, Mask::SlidingWindow { window: 5 }, Mask::SlidingWindow { window: 1 }]
}

#[test]
fn every_strategy_on_packed_documents_matches_one_device_in_f64() -> Result<()> {
    let mut ran = 0;
    for p in [1usize, 2, 3, 4] {
        for strategy in strategies_for(p) {
            for lengths in cases() {
                for mask in masks() {
                    let spec = Spec::new(48, 4, 2);
                    ran += usize::from(check(strategy, Kernel::Sdpa, p, &spec, mask, &lengths)?);
                }
            }
        }
    }
    // Which strategies take N = 48, 4 heads over 2 kv heads: ring and zigzag need 48 to split
    // in P or 2P chunks (P = 3: yes, 48 = 6 x 8), Megatron-SP needs P to divide the kv heads
    // (P = 1, 2), chunked Ulysses in 2 chunks takes every P here (48/P even). Counted here so
    // that a refusal that should not happen fails.
    let expected_strategies = 8 + 7 + 6 + 8; // P = 1, 2, 3, 4
    ensure!(ran == expected_strategies * cases().len() * masks().len(), "{ran} cases ran");
    Ok(())
}

#[test]
fn packed_documents_in_f32_and_with_every_kernel() -> Result<()> {
    for kind in [Kind::Float, Kind::Double] {
        for kernel in [Kernel::Math, Kernel::Sdpa, Kernel::Blocked] {
            for strategy in strategies_for(4) {
                for lengths in [&cases()[2], &cases()[4]] {
                    for mask in [Mask::Causal, Mask::SlidingWindow { window: 5 }] {
                        if kernel == Kernel::Blocked && mask == Mask::Causal {
                            continue; // the blocked kernel is for sparse rules only (it refuses dense ones)
                        }
                        let spec = Spec { kind, logits: 3.0, grad: Grad::Random, ..Spec::new(48, 8, 4) };
                        check(strategy, kernel, 4, &spec, mask, lengths)?;
                    }
                }
            }
        }
    }
    Ok(())
}

#[test]
fn one_document_per_sample_is_the_unpacked_batch_bit_for_bit() -> Result<()> {
    // Documents::whole must take exactly the unpacked path: the same bits as forward().
    let spec = Spec { kind: Kind::Float, ..Spec::new(48, 8, 4) };
    for strategy in strategies_for(4) {
        let docs = Documents::whole(48, 2)?;
        let packed = run(strategy, Kernel::Sdpa, 4, &spec, Mask::Causal, &docs)?;
        let plain = common::parity::run(strategy, Kernel::Sdpa, 4, &spec, Mask::Causal)?;
        for (i, name) in ["out", "dq", "dk", "dv", "lse"].iter().enumerate() {
            ensure!(packed[i].equal(&plain[i]), "{}: {name} differs from the unpacked run", strategy.label());
        }
    }
    Ok(())
}

#[test]
fn visible_pairs_and_rank_work_count_the_mask_written_out() -> Result<()> {
    for lengths in cases() {
        let docs = Documents::from_lengths(48, &lengths)?;
        for mask in masks() {
            let dense = allowed(&lengths, mask); // [b, 1, N, N]
            let total = dense.sum(Kind::Int64).int64_value(&[]) as u64;
            ensure!(
                docs.visible_pairs(&mask) == total,
                "{lengths:?} {mask:?}: {} != {total}",
                docs.visible_pairs(&mask)
            );
            for layout in
                [SeqLayout::contiguous(48, 4)?, SeqLayout::zigzag(48, 4)?, SeqLayout::contiguous(48, 5)?]
            {
                let work = docs.work_per_rank(&mask, &layout);
                for (r, &w) in work.iter().enumerate() {
                    let rows = layout.positions(r, Device::Cpu)?;
                    // the rank's query rows of the written-out mask
                    let mine = dense.index_select(2, &rows).sum(Kind::Int64).int64_value(&[]) as u64;
                    ensure!(w == mine, "{lengths:?} {mask:?} {} rank {r}: {w} != {mine}", layout.name());
                }
                // and a block of queries against a block of keys
                let (q, k) = ((7, 9), (3, 20));
                let block =
                    dense.narrow(2, q.0, q.1).narrow(3, k.0, k.1).sum(Kind::Int64).int64_value(&[]) as u64;
                ensure!(docs.visible_in_block(&mask, q, k) == block, "{lengths:?} {mask:?} block");
            }
        }
    }
    Ok(())
}

#[test]
fn ring_attention_reports_the_packed_work_each_rank_did() -> Result<()> {
    // The ring's own count (what its blocks computed, visible pairs summed over the samples)
    // must be what the documents say each rank's queries see.
    let lengths = vec![vec![5, 7, 12, 24], vec![13, 1, 29, 5]];
    let docs = Documents::from_lengths(48, &lengths)?;
    for zigzag in [false, true] {
        let spec = Spec::new(48, 2, 2);
        let works = launch(4, |ctx| -> ulysses::Result<u64> {
            let ring = RingAttention::new(ctx.world().clone(), Mask::Causal, 48, 2, 2, zigzag)?;
            let [q, k, v, _] = spec.tensors();
            let mine = |t: &Tensor| ring.layout().shard(t, 1, ctx.rank());
            let _ = ring.forward_lse_docs(&mine(&q)?, &mine(&k)?, &mine(&v)?, Some(&docs))?;
            Ok(ring.last_forward_work().visible)
        })?;
        let layout = if zigzag { SeqLayout::zigzag(48, 4)? } else { SeqLayout::contiguous(48, 4)? };
        ensure!(works == docs.work_per_rank(&Mask::Causal, &layout), "zigzag {zigzag}: {works:?}");
    }
    // Documents that each fill one rank's share: a rank computes its own 12 x 12 block per
    // sample and skips every block of another document (what it computed, not only what it saw).
    let docs = Documents::from_lengths(48, &[vec![12; 4], vec![12; 4]])?;
    let spec = Spec::new(48, 2, 2);
    let works = launch(4, |ctx| -> ulysses::Result<ulysses::attention::Work> {
        let ring = RingAttention::new(ctx.world().clone(), Mask::Causal, 48, 2, 2, false)?;
        let [q, k, v, _] = spec.tensors();
        let mine = |t: &Tensor| ring.layout().shard(t, 1, ctx.rank());
        let _ = ring.forward_lse_docs(&mine(&q)?, &mine(&k)?, &mine(&v)?, Some(&docs))?;
        Ok(ring.last_forward_work())
    })?;
    for (r, w) in works.iter().enumerate() {
        ensure!(w.computed == 2 * 144 && w.visible == 2 * 78, "rank {r}: {w:?}");
    }
    Ok(())
}

#[test]
fn packed_work_per_rank_by_layout_written_out_and_the_balanced_layout() -> Result<()> {
    // Eight documents of 64 tokens, then one of 512: 1024 tokens on P = 8, causal. Worked out by
    // hand: a 64-token document holds 64 x 65 / 2 = 2080 pairs, the 512-token one 512 x 513 / 2
    // = 131328, so the mean is (8 x 2080 + 131328) / 8 = 18496 pairs per rank.
    // - contiguous (128 tokens per rank): the last rank holds positions 384..512 of the long
    //   document, 385 + .. + 512 = 57408 pairs: 3.104 x the mean;
    // - zigzag (chunks of 64, rank r holds chunks r and 15 - r): chunk r is a short document
    //   (2080), chunk 15 - r is part 7 - r of the long one (4096 (7 - r) + 2080 pairs), so rank 0
    //   has 32832: 1.775 x the mean. Zigzag balances one causal sequence, not packed documents.
    let lengths = vec![vec![64; 8].into_iter().chain([512]).collect::<Vec<_>>()];
    let docs = Documents::from_lengths(1024, &lengths)?;
    let mean = 18_496.0;
    let contiguous = imbalance(&docs.work_per_rank(&Mask::Causal, &SeqLayout::contiguous(1024, 8)?));
    let zigzag = imbalance(&docs.work_per_rank(&Mask::Causal, &SeqLayout::zigzag(1024, 8)?));
    ensure!((contiguous - 57_408.0 / mean).abs() < 1e-12, "contiguous {contiguous}");
    ensure!((zigzag - 32_832.0 / mean).abs() < 1e-12, "zigzag {zigzag}");
    // The balanced layout: every rank as many tokens, the work within 5% of the mean.
    let layout = docs.balanced_layout(&Mask::Causal, 8, 8)?;
    let work = docs.work_per_rank(&Mask::Causal, &layout);
    let balanced = imbalance(&work);
    println!("max/mean causal work per rank, 8 x 64 + 512 tokens on 8 ranks: contiguous {contiguous:.3}, zigzag {zigzag:.3}, balanced {balanced:.3}");
    ensure!(layout.lens().iter().all(|&l| l == 128), "{:?}", layout.lens());
    ensure!(work.iter().sum::<u64>() == docs.visible_pairs(&Mask::Causal), "work lost: {work:?}");
    ensure!(balanced < 1.05, "balanced {balanced}: {work:?}");
    Ok(())
}

#[test]
fn ring_attention_on_the_balanced_layout_matches_one_device() -> Result<()> {
    // The ring takes any layout whose ranks hold as many tokens: the balanced one, cut per batch.
    for lengths in [cases()[2].clone(), cases()[4].clone()] {
        let docs = Documents::from_lengths(48, &lengths)?;
        for mask in masks() {
            let layout = docs.balanced_layout(&mask, 4, 3)?;
            let spec = Spec::new(48, 4, 2);
            let got = launch(4, |ctx| -> ulysses::Result<Vec<Tensor>> {
                let r = ctx.rank();
                let ring = RingAttention::with_layout(ctx.world().clone(), mask, layout.clone(), 4, 2)?;
                let [q, k, v, w] = spec.tensors();
                let mine = |t: &Tensor| -> ulysses::Result<Tensor> {
                    Ok(layout.shard(t, 1, r)?.copy().set_requires_grad(true))
                };
                let (q, k, v) = (mine(&q)?, mine(&k)?, mine(&v)?);
                let tape = Tape::new();
                let o = ring.forward_docs(&tape, &q, &k, &v, Some(&docs))?;
                tape.backward(&(&o * layout.shard(&w, 1, r)?).sum(o.kind()))?;
                Ok(vec![o.detach(), q.grad(), k.grad(), v.grad()])
            })?;
            let want = reference(&spec, &lengths, mask);
            for (i, name) in ["out", "dq", "dk", "dv"].iter().enumerate() {
                let parts: Vec<Tensor> = got.iter().map(|t| t[i].shallow_clone()).collect();
                let label = format!("ring on the balanced layout {lengths:?} {mask:?} {name}");
                allclose(&label, &layout.unshard(&parts, 1)?, &want[i], tol(&spec, 4))?;
            }
        }
    }
    Ok(())
}

#[test]
fn bad_offsets_are_refused_naming_the_sample_and_the_offsets() -> Result<()> {
    let err = |n: i64, cu: Vec<Vec<i64>>| match Documents::new(n, cu) {
        Ok(_) => "accepted".to_string(),
        Err(e) => e.to_string(),
    };
    let cases = [
        (err(8, vec![vec![0, 8], vec![1, 8]]), vec!["sample 1", "[1, 8]", "start at 0, not 1"]),
        (
            err(8, vec![vec![0, 5, 3, 8]]),
            vec!["sample 0", "[0, 5, 3, 8]", "offsets going back at index 2 (5 then 3)"],
        ),
        (err(8, vec![vec![0, 4, 4, 8]]), vec!["a document of length 0 at index 2 (4 then 4)"]),
        (
            err(8, vec![vec![0, 4, 8], vec![0, 4, 7]]),
            vec!["sample 1", "[0, 4, 7]", "end at the sequence length 8, not 7"],
        ),
        (err(8, vec![vec![0]]), vec!["sample 0", "need at least [0, 8]"]),
        (err(8, vec![]), vec!["no sample"]),
    ];
    for (got, wants) in cases {
        for want in wants {
            ensure!(got.contains(want), "{got:?} should say {want:?}");
        }
    }
    // A batch the documents do not describe, and a rule tied to global positions.
    let docs = Documents::from_lengths(48, &[vec![20, 28], vec![48]])?;
    let spec = Spec::new(48, 4, 2);
    let e = run(StrategyConfig::Ulysses, Kernel::Sdpa, 2, &Spec { b: 3, ..spec }, Mask::Causal, &docs)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    ensure!(e.contains("2 sample(s) of 48 tokens, the batch has 3 of 48"), "{e}");
    let sparse = Mask::BlockSparse(BlockSparse { block: 4, local_blocks: 2, global_blocks: 1, causal: true });
    for strategy in [
        StrategyConfig::Ulysses,
        StrategyConfig::Ring { zigzag: true },
        StrategyConfig::AllGatherKv { zigzag: false },
    ] {
        let e = run(strategy, Kernel::Sdpa, 2, &spec, sparse, &docs)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        ensure!(
            e.contains("packed documents need a rule that restarts with each document"),
            "{}: {e}",
            strategy.label()
        );
    }
    Ok(())
}

#[test]
fn positions_restart_at_every_document() -> Result<()> {
    let docs = Documents::from_lengths(10, &[vec![3, 7], vec![1, 1, 8]])?;
    let layout = SeqLayout::zigzag(10, 1)?;
    let global = layout.positions(0, Device::Cpu)?;
    let local = docs.local_positions(&global)?;
    let got: Vec<Vec<i64>> = (0..2).map(|s| Vec::<i64>::try_from(local.get(s)).unwrap_or_default()).collect();
    ensure!(got == vec![vec![0, 1, 2, 0, 1, 2, 3, 4, 5, 6], vec![0, 0, 0, 1, 2, 3, 4, 5, 6, 7]], "{got:?}");
    Ok(())
}

/// Document lengths summing to `n`: cut points drawn at random (length 1 included).
fn lengths(n: i64) -> impl Strategy<Value = Vec<i64>> {
    proptest::collection::btree_set(1..n, 0..(n as usize).min(12)).prop_map(move |cuts| {
        let mut points: Vec<i64> = std::iter::once(0).chain(cuts).chain(std::iter::once(n)).collect();
        points.dedup();
        points.windows(2).map(|w| w[1] - w[0]).collect()
    })
}

proptest! {
    // A fixed number of cases, each a few launches of a few milliseconds; the seed is random
    // unless PROPTEST_RNG_SEED fixes it.
    #![proptest_config(ProptestConfig { cases: 96, max_shrink_iters: 100, ..ProptestConfig::default() })]

    #[test]
    fn random_documents_match_one_device(
        p in prop::sample::select(vec![1usize, 2, 3, 4]),
        pick in 0usize..16,
        window in 1i64..12,
        mask_kind in 0usize..3,
        a in lengths(24),
        b in lengths(24),
        f32 in any::<bool>(),
    ) {
        let strategies = strategies_for(p);
        let strategy = strategies[pick % strategies.len()];
        let mask = [Mask::None, Mask::Causal, Mask::SlidingWindow { window }][mask_kind];
        let kind = if f32 { Kind::Float } else { Kind::Double };
        let spec = Spec { kind, ..Spec::new(24, 4, 2) };
        let r = check(strategy, Kernel::Sdpa, p, &spec, mask, &[a, b]);
        prop_assert!(r.is_ok(), "{:?}", r.err());
    }
}

#[test]
fn ulysses_layer_takes_cu_seqlens_from_its_input_file() -> Result<()> {
    // FlashAttention's varlen convention: one flat list over the b x N tokens, i32.
    let dir = std::env::temp_dir().join(format!("ulysses-packed-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let (input, output) = (dir.join("in.safetensors"), dir.join("out.safetensors"));
    let lengths = vec![vec![5, 7, 12], vec![1, 22, 1]];
    let spec = Spec { kind: Kind::Float, logits: 3.0, ..Spec::new(24, 8, 4) };
    let flat = Documents::from_lengths(24, &lengths)?.flat();
    ensure!(flat == vec![0, 5, 12, 24, 25, 47, 48], "{flat:?}");
    let cu = Tensor::from_slice(&flat.iter().map(|&o| o as i32).collect::<Vec<_>>());
    let [q, k, v, go] = spec.tensors();
    Tensor::write_safetensors(
        &[("q", &q), ("k", &k), ("v", &v), ("grad_out", &go), ("cu_seqlens", &cu)],
        &input,
    )?;
    let want = reference(&spec, &lengths, Mask::SlidingWindow { window: 6 });
    for (strategy, ranks) in
        [("ulysses", "4"), ("ring_zigzag", "2"), ("usp_zigzag:2", "4"), ("megatron_sp", "4")]
    {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_ulysses"))
            .args([
                "layer",
                "--strategy",
                strategy,
                "--ranks",
                ranks,
                "--mask",
                "window:6",
                "--lse",
                "--input",
            ])
            .arg(&input)
            .arg("--output")
            .arg(&output)
            .output()?;
        let label = format!("ulysses layer {strategy} P={ranks}");
        ensure!(out.status.success(), "{label}: {}", String::from_utf8_lossy(&out.stderr));
        let stdout = String::from_utf8_lossy(&out.stdout);
        ensure!(stdout.contains("packed documents per sample [3, 3]"), "{label}: {stdout}");
        let got = Tensor::read_safetensors(&output)?;
        for (name, w) in ["out", "grad_q", "grad_k", "grad_v", "lse"].iter().zip(&want) {
            let t = &got.iter().find(|(n, _)| n == name).expect("every output tensor is written").1;
            allclose(&format!("{label} {name}"), t, w, tol(&spec, ranks.parse()?))?;
        }
    }
    // A document running on into the next sample: refused, naming the offsets and the boundary.
    let cu = Tensor::from_slice(&[0i64, 5, 30, 48]);
    Tensor::write_safetensors(&[("q", &q), ("k", &k), ("v", &v), ("cu_seqlens", &cu)], &input)?;
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ulysses"))
        .args(["layer", "--ranks", "2", "--input"])
        .arg(&input)
        .arg("--output")
        .arg(&output)
        .output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(!out.status.success(), "accepted a document across samples");
    ensure!(
        err.contains("cu_seqlens [0, 5, 30, 48] must hold every sample boundary: 24 is missing"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// Deterministic token ids `[b, n]` below `vocab`.
fn tokens(b: i64, n: i64, vocab: i64) -> Tensor {
    let i = Tensor::arange(b * n, (Kind::Int64, Device::Cpu));
    ((&i * 7919 + (&i * &i) * 31 + 17).remainder(vocab)).reshape([b, n])
}

fn gpt_attention() -> AttentionConfig {
    AttentionConfig::new(Kernel::Sdpa, Mask::Causal)
}

/// (loss, labelled tokens, gradient of every parameter) of the GPT on one device, plain
/// autograd, for `tokens` `[b, n]`, packed as `docs` if given.
fn one_device(
    cfg: &GptConfig,
    kind: Kind,
    toks: &Tensor,
    docs: Option<&Documents>,
) -> Result<(f64, i64, Vec<Tensor>)> {
    let n = toks.size()[1];
    let strategy = SingleDevice::new(gpt_attention().build()?, n, cfg.n_head, cfg.n_kv_head)?;
    let model = Gpt::new(cfg, Box::new(strategy), kind, Device::Cpu)?;
    let labels = match docs {
        Some(d) => shift_labels_packed(toks, d)?,
        None => shift_labels(toks)?,
    };
    let loss = model.loss_packed(&Tape::disabled(), toks, &labels, docs)?;
    loss.local.backward();
    Ok((loss.value, loss.tokens, model.params().iter().map(|(_, p)| p.grad()).collect()))
}

#[test]
fn a_packed_gpt_batch_is_its_documents_run_one_by_one() -> Result<()> {
    // The reference needs no document code at all: each document through the GPT as a sequence
    // of its own (its positions from 0, its last token without a label), the loss sums and the
    // gradients weighted by labelled tokens. In f64, so the bound is the model's chain of sums
    // in f64 (tests/common/tolerance.rs), whatever the CPU.
    let cfg = GptConfig { n_head: 4, n_kv_head: 2, n_embd: 32, ..GptConfig::tiny() };
    let lengths = vec![vec![5, 1, 12, 6], vec![24]];
    let (b, n) = (2i64, 24i64);
    let toks = tokens(b, n, cfg.vocab_size);
    let docs = Documents::from_lengths(n, &lengths)?;
    let (loss, counted, grads) = one_device(&cfg, Kind::Double, &toks, Some(&docs))?;
    ensure!(counted == 2 * 24 - 5, "labelled tokens {counted}: one per token but each document's last");
    let (mut sum, mut total) = (0.0, 0i64);
    let mut want: Vec<Tensor> = grads.iter().map(Tensor::zeros_like).collect();
    for (s, ls) in lengths.iter().enumerate() {
        let mut start = 0;
        for &l in ls {
            let piece = toks.narrow(0, s as i64, 1).narrow(1, start, l);
            start += l;
            if l == 1 {
                continue; // no label: nothing to learn from, and no gradient
            }
            let (value, t, g) = one_device(&cfg, Kind::Double, &piece, None)?;
            sum += value * t as f64;
            total += t;
            for (w, g) in want.iter_mut().zip(&g) {
                *w += g * t as f64;
            }
        }
    }
    ensure!(total == counted, "{total} labelled tokens in the documents, {counted} packed");
    let bounds = tolerance::gpt(&cfg, n, b * n, Kind::Double);
    tolerance::check(
        "packed loss against its documents",
        (loss - sum / total as f64).abs(),
        bounds.loss * loss.abs(),
    )?;
    for (i, (g, w)) in grads.iter().zip(&want).enumerate() {
        let w = w / total as f64;
        let scale = w.abs().max().double_value(&[]);
        tolerance::check(
            &format!("packed gradient {i} against its documents"),
            max_diff(g, &w),
            bounds.grad * scale,
        )?;
    }
    // The mutation the test must catch: the same tokens unpacked give another loss.
    let (unpacked, ..) = one_device(&cfg, Kind::Double, &toks, None)?;
    ensure!((unpacked - loss).abs() > 1e-6, "packing changed nothing: {unpacked} vs {loss}");
    Ok(())
}

#[test]
fn every_strategy_trains_a_packed_gpt_batch_like_one_device() -> Result<()> {
    let cfg = GptConfig { n_head: 4, n_kv_head: 2, n_embd: 32, ..GptConfig::tiny() };
    let lengths = vec![vec![3, 9, 1, 19], vec![13, 19]];
    let (b, n) = (2i64, 32i64);
    let toks = tokens(b, n, cfg.vocab_size);
    let docs = Documents::from_lengths(n, &lengths)?;
    let (want_loss, _, want) = one_device(&cfg, Kind::Float, &toks, Some(&docs))?;
    let labels = shift_labels_packed(&toks, &docs)?;
    ensure!(
        labels.get(0).int64_value(&[2]) == IGNORE && labels.get(1).int64_value(&[12]) == IGNORE,
        "labels"
    );
    for p in [2usize, 4] {
        for strategy in strategies_for(p) {
            if strategy.check(n, p, cfg.n_head, cfg.n_kv_head).is_err() {
                continue;
            }
            let per_rank = launch(p, |ctx| -> Result<(f64, Vec<(Tensor, Placement)>)> {
                let s = strategy.build(ctx.world(), gpt_attention(), n, cfg.n_head, cfg.n_kv_head)?;
                let layout = s.layout().clone();
                let model = Gpt::new(&cfg, s, Kind::Float, Device::Cpu)?;
                let toks = tokens(b, n, cfg.vocab_size);
                let labels = shift_labels_packed(&toks, &docs)?;
                let (t, l) = (layout.shard(&toks, 1, ctx.rank())?, layout.shard(&labels, 1, ctx.rank())?);
                let loss = model.forward_backward_packed(&t, &l, Some(&docs))?;
                Ok((
                    loss.value,
                    model.params().all().iter().map(|p| (p.tensor.grad(), p.placement.clone())).collect(),
                ))
            })?;
            // Rounding in another order: the model's chain of sums in f32 (tests/common/tolerance.rs).
            let bounds = tolerance::gpt(&cfg, n, b * n, Kind::Float);
            for (r, (loss, grads)) in per_rank.iter().enumerate() {
                let label = format!("packed gpt {} P={p} rank {r}", strategy.label());
                tolerance::check(
                    &format!("{label}: loss"),
                    (loss - want_loss).abs(),
                    bounds.loss * want_loss.abs(),
                )?;
                for (i, (w, (g, placement))) in want.iter().zip(grads).enumerate() {
                    let w = match placement {
                        Placement::Replicated => w.shallow_clone(),
                        Placement::Sharded { dim, index } => w.index_select(*dim, &Tensor::from_slice(index)),
                    };
                    let scale = w.abs().max().double_value(&[]);
                    tolerance::check(
                        &format!("{label}: gradient {i}"),
                        max_diff(g, &w),
                        bounds.grad * scale,
                    )?;
                }
            }
        }
    }
    Ok(())
}

#[test]
fn the_text_dataset_packs_its_paragraphs_and_pads_them() -> Result<()> {
    use ulysses::data::{Dataset, TokenStream, Tokenizer};
    let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read(repo.join("datasets/sequence_parallelism.txt"))?;
    let stream = TokenStream::from_text(&repo.join("datasets/sequence_parallelism.txt"), Tokenizer::Byte)?;
    let corpus = stream.corpus().ok_or_else(|| anyhow::anyhow!("plain text has paragraphs"))?;
    // The paragraphs, written out from the file: split at blank lines, each keeping the
    // newlines that end it.
    let paragraphs = String::from_utf8(text.clone())?.split("\n\n").filter(|p| !p.trim().is_empty()).count();
    ensure!(
        corpus.documents.len() == paragraphs,
        "{} documents, {paragraphs} paragraphs",
        corpus.documents.len()
    );
    ensure!(corpus.documents.iter().map(|d| d.len()).sum::<usize>() == text.len(), "tokens lost");
    let (b, n) = (3i64, 700i64);
    let (toks, docs) = corpus.packed(7, 2, 0, b, n)?;
    for s in 0..b as usize {
        let row = Vec::<i64>::try_from(toks.get(s as i64))?;
        let offsets = docs.offsets(s);
        // every document but the last is a whole paragraph; the last is a paragraph's start
        for (i, w) in offsets.windows(2).enumerate() {
            let piece = &row[w[0] as usize..w[1] as usize];
            let whole = corpus.documents.contains(&piece);
            let start = corpus.documents.iter().any(|d| d.starts_with(piece));
            ensure!(whole || (i == offsets.len() - 2 && start), "sample {s} document {i} is no paragraph");
        }
        // no label crosses a document; every other token's label is the next token
        let labels = Vec::<i64>::try_from(shift_labels_packed(&toks, &docs)?.get(s as i64))?;
        for t in 0..n as usize {
            let last = offsets.contains(&(t as i64 + 1));
            ensure!(labels[t] == if last { IGNORE } else { row[t + 1] }, "sample {s} token {t}");
        }
    }
    // Padded: one paragraph, then padding that no real token sees and that has no label.
    let (toks, docs, labels) = corpus.padded(7, 2, 0, b, n, 0)?;
    for s in 0..b as usize {
        let lens = docs.lengths(s);
        let real = lens[0] as usize;
        let row = Vec::<i64>::try_from(toks.get(s as i64))?;
        ensure!(corpus.documents.iter().any(|d| d[..real.min(d.len())] == row[..real]), "sample {s}");
        let labelled = labels.get(s as i64).ne(IGNORE).sum(Kind::Int64).int64_value(&[]);
        ensure!(labelled == real as i64 - 1, "sample {s}: {labelled} labels for a document of {real}");
    }
    Ok(())
}

#[test]
fn an_experiment_sweeps_packed_and_padded_rows_and_counts_labelled_tokens() -> Result<()> {
    use ulysses::experiment::{read_table, run, ExperimentConfig, RunOptions};
    let dir = std::env::temp_dir().join(format!("ulysses-packed-exp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let text = |dataset: &str| {
        format!(
            "name = \"packed\"\n[model]\npreset = \"tiny\"\nn_layer = 1\n[parallel]\nranks = [2]\n\
             strategies = [\"ulysses\", \"ring_zigzag\"]\n[train]\nseq = [784]\nsteps = 2\nwarmup = 1\n\
             batch = 2\npacking = [\"padded\", \"packed\"]\n{dataset}"
        )
    };
    let text_data =
        "[dataset]\nkind = \"text\"\npath = \"datasets/sequence_parallelism.txt\"\ntokenizer = \"byte\"\n";
    let cfg = ExperimentConfig::parse(&text(text_data), "packed")?;
    let opts = RunOptions {
        resume: false,
        base_dir: std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")),
        program: None,
    };
    let cfg = ExperimentConfig { output: Some(dir.join("out")), ..cfg };
    run(&cfg, &opts)?;
    let steps = read_table(&dir.join("out"), "steps")?;
    let col = |name: &str| -> Result<Vec<f64>> {
        Ok(steps
            .column(name)?
            .cast(&polars::prelude::DataType::Float64)?
            .f64()?
            .iter()
            .map(|v| v.unwrap_or(f64::NAN))
            .collect())
    };
    let labels: Vec<String> =
        steps.column("strategy")?.str()?.iter().map(|s| s.unwrap_or("").to_string()).collect();
    let (rate, ms) = (col("tokens_per_s")?, col("step_ms")?);
    // The tokens a step counted: labelled ones, written out from the corpus for padded rows
    // (a paragraph of L tokens teaches L - 1) and packed rows (N - documents per row).
    let stream = ulysses::data::TokenStream::from_text(
        &std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("datasets/sequence_parallelism.txt"),
        ulysses::data::Tokenizer::Byte,
    )?;
    use ulysses::data::Dataset;
    let corpus = stream.corpus().ok_or_else(|| anyhow::anyhow!("paragraphs"))?;
    let mut seen = std::collections::BTreeSet::new();
    for i in 0..labels.len() {
        let tokens = (rate[i] * ms[i] / 1e3).round() as i64;
        seen.insert(labels[i].clone());
        let step =
            steps.column("step")?.cast(&polars::prelude::DataType::Int64)?.i64()?.get(i).unwrap_or(-1) as u64;
        let want = if labels[i].ends_with("_padded") {
            let (_, docs, _) = corpus.padded(1234, step, 0, 2, 784, 0)?;
            (0..2).map(|s| docs.lengths(s)[0] - 1).sum::<i64>()
        } else {
            let (_, docs) = corpus.packed(1234, step, 0, 2, 784)?;
            2 * 784 - (docs.flat().len() as i64 - 1)
        };
        ensure!(tokens == want, "{} step {step}: {tokens} tokens counted, {want} labelled", labels[i]);
    }
    let want: std::collections::BTreeSet<String> =
        ["ulysses_padded", "ulysses_packed", "ring_zigzag_padded", "ring_zigzag_packed"]
            .iter()
            .map(|s| s.to_string())
            .collect();
    ensure!(seen == want, "{seen:?}");
    // A dataset without documents cannot be packed: refused, naming the packing and the dataset.
    let synthetic = "[dataset]\nkind = \"synthetic\"\ntask = \"associative_recall\"\n";
    let cfg = ExperimentConfig {
        output: Some(dir.join("bad")),
        ..ExperimentConfig::parse(&text(synthetic), "packed")?
    };
    let err = run(&cfg, &opts).err().map(|e| format!("{e:#}")).unwrap_or_default();
    ensure!(err.contains("packing Padded needs a dataset with documents"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

#[test]
fn the_cost_model_counts_the_pairs_of_packed_documents() -> Result<()> {
    use ulysses::cost::flops::{attention_work, model_flops};
    use ulysses::cost::hardware::DeviceKind;
    use ulysses::cost::Job;
    let cfg = GptConfig { n_head: 8, n_kv_head: 8, n_embd: 128, ..GptConfig::tiny() };
    let lengths = vec![64i64; 8].into_iter().chain([512]).collect::<Vec<_>>();
    let docs = Documents::from_lengths(1024, std::slice::from_ref(&lengths))?;
    let job = |strategy| Job { documents: Some(lengths.clone()), ..Job::new(cfg.clone(), strategy, 8, 1024) };
    // The kernels on whole sequences: every pair inside a document, one call per document.
    let a = attention_work(&job(StrategyConfig::Ulysses), 0, DeviceKind::Gpu)?;
    ensure!(a.visible == docs.visible_pairs(&Mask::Causal) as f64 && a.calls == 9.0, "{a:?}");
    // A ring: each rank's rows, as the documents say (contiguous leaves the last rank 3.1 x the mean).
    for zigzag in [false, true] {
        let layout = if zigzag { SeqLayout::zigzag(1024, 8)? } else { SeqLayout::contiguous(1024, 8)? };
        let want = docs.work_per_rank(&Mask::Causal, &layout);
        for (r, w) in want.iter().enumerate() {
            let a = attention_work(&job(StrategyConfig::Ring { zigzag }), r, DeviceKind::Gpu)?;
            ensure!(a.visible == *w as f64, "zigzag {zigzag} rank {r}: {} vs {w}", a.visible);
        }
    }
    // Model FLOPs of a packed step: the documents' pairs, per sequence of the global batch.
    let j = job(StrategyConfig::Ulysses);
    let want = cfg.train_flops_packed(&docs, &Mask::Causal) * j.global_batch() as f64;
    ensure!(model_flops(&j) == want, "{} vs {want}", model_flops(&j));
    let unpacked = Job { documents: None, ..j.clone() };
    ensure!(model_flops(&unpacked) > model_flops(&j), "packing must drop the cross-document pairs");
    // Documents that do not fill the sequence: refused, naming the numbers.
    let bad = Job { documents: Some(vec![100, 200]), ..j };
    let e = attention_work(&bad, 0, DeviceKind::Gpu).err().map(|e| e.to_string()).unwrap_or_default();
    ensure!(e.contains("must end at the sequence length 1024, not 300"), "{e}");
    Ok(())
}

#[test]
fn a_ring_trains_a_packed_batch_on_its_balanced_layout_like_one_device() -> Result<()> {
    // The batch's own layout (balanced from its documents) replaces the ring's for this batch:
    // the data sharded by it, RoPE positions and attention from it; the same loss and gradients
    // as one device. Strategies bound to their own layout refuse such a batch by name.
    let cfg = GptConfig { n_head: 4, n_kv_head: 2, n_embd: 32, ..GptConfig::tiny() };
    let lengths = vec![vec![3, 9, 1, 19], vec![2, 5, 25]];
    let (b, n, p) = (2i64, 32i64, 4usize);
    let toks = tokens(b, n, cfg.vocab_size);
    let plain = Documents::from_lengths(n, &lengths)?;
    let (want_loss, _, want) = one_device(&cfg, Kind::Float, &toks, Some(&plain))?;
    let layout = plain.balanced_layout(&Mask::Causal, p, 2)?;
    let docs = plain.clone().with_layout(layout.clone())?;
    let bounds = tolerance::gpt(&cfg, n, b * n, Kind::Float);
    for zigzag in [false, true] {
        let per_rank = launch(p, |ctx| -> Result<(f64, Vec<Tensor>)> {
            let ring =
                RingAttention::new(ctx.world().clone(), Mask::Causal, n, cfg.n_head, cfg.n_kv_head, zigzag)?;
            let model = Gpt::new(&cfg, Box::new(ring), Kind::Float, Device::Cpu)?;
            let toks = tokens(b, n, cfg.vocab_size);
            let shard = ulysses::data::shard_packed(&toks, &docs, &layout, ctx.rank())?;
            let loss = model.forward_backward_packed(&shard.tokens, &shard.labels, shard.docs.as_ref())?;
            Ok((loss.value, model.params().iter().map(|(_, p)| p.grad()).collect()))
        })?;
        for (r, (loss, grads)) in per_rank.iter().enumerate() {
            let label = format!("ring zigzag={zigzag} on the balanced layout, rank {r}");
            tolerance::check(
                &format!("{label}: loss"),
                (loss - want_loss).abs(),
                bounds.loss * want_loss.abs(),
            )?;
            for (i, (g, w)) in grads.iter().zip(&want).enumerate() {
                let scale = w.abs().max().double_value(&[]);
                tolerance::check(&format!("{label}: gradient {i}"), max_diff(g, w), bounds.grad * scale)?;
            }
        }
    }
    let spec = Spec::new(32, 4, 2);
    for strategy in [
        StrategyConfig::Ulysses,
        StrategyConfig::AllGatherKv { zigzag: false },
        StrategyConfig::Usp { ulysses: 2, zigzag: false },
    ] {
        let e = run(strategy, Kernel::Sdpa, p, &spec, Mask::Causal, &docs)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        ensure!(e.contains("layout is for ring attention"), "{}: {e}", strategy.label());
    }
    Ok(())
}

#[test]
fn an_experiment_balances_packed_rows_over_a_ring_and_computes_the_same_losses() -> Result<()> {
    use ulysses::experiment::{read_table, run, ExperimentConfig, RunOptions};
    let dir = std::env::temp_dir().join(format!("ulysses-packed-balance-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let text = |balance: bool, packing: &str| {
        format!(
            "name = \"balance\"\n[model]\npreset = \"tiny\"\nn_layer = 1\n[parallel]\nranks = [4]\n\
             strategies = [\"ring_zigzag\", \"ulysses\"]\n[train]\nseq = [784]\nsteps = 2\nwarmup = 1\n\
             packing = {packing}\nbalance = {balance}\n[dataset]\nkind = \"text\"\n\
             path = \"datasets/sequence_parallelism.txt\"\ntokenizer = \"byte\"\n"
        )
    };
    let opts = RunOptions {
        resume: false,
        base_dir: std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")),
        program: None,
    };
    let mut losses = std::collections::BTreeMap::new();
    for balance in [false, true] {
        let out = dir.join(format!("balance-{balance}"));
        let cfg = ExperimentConfig {
            output: Some(out.clone()),
            ..ExperimentConfig::parse(&text(balance, "\"packed\""), "balance")?
        };
        run(&cfg, &opts)?;
        let steps = read_table(&out, "steps")?;
        let names: Vec<String> =
            steps.column("strategy")?.str()?.iter().map(|s| s.unwrap_or("").to_string()).collect();
        let loss: Vec<f64> = steps.column("loss")?.f64()?.iter().map(|v| v.unwrap_or(f64::NAN)).collect();
        for (n, l) in names.iter().zip(loss) {
            losses.entry(n.clone()).or_insert_with(Vec::new).push(l);
        }
    }
    // Only the ring is balanced (Ulysses is by construction), and it is labelled so.
    let names: Vec<&String> = losses.keys().collect();
    ensure!(names == ["ring_zigzag_packed", "ring_zigzag_packed_balanced", "ulysses_packed"], "{names:?}");
    // The same model and rows on another layout: the same losses, within the rounding of the
    // model's sums in f32 (tests/common/tolerance.rs).
    let cfg = GptConfig { n_layer: 1, ..GptConfig::tiny() };
    let bound = tolerance::gpt(&cfg, 784, 784, Kind::Float).loss;
    let (plain, balanced) = (&losses["ring_zigzag_packed"], &losses["ring_zigzag_packed_balanced"]);
    ensure!(plain.len() == balanced.len() && !plain.is_empty(), "{plain:?} {balanced:?}");
    for (a, b) in plain.iter().zip(balanced) {
        tolerance::check("balanced ring loss", (a - b).abs(), bound * a.abs())?;
    }
    // Balance without packing is refused, naming the field.
    let e = match ExperimentConfig::parse(&text(true, "\"none\""), "balance") {
        Err(e) => format!("{e:#}"),
        Ok(cfg) => {
            let cfg = ExperimentConfig { output: Some(dir.join("bad")), ..cfg };
            run(&cfg, &opts).err().map(|e| format!("{e:#}")).unwrap_or_default()
        }
    };
    ensure!(e.contains("train.balance") && e.contains("set train.packing to packed or padded"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
