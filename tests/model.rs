//! The GPT with Ulysses on P ranks against the same GPT on one device: the loss and the gradient
//! of every parameter, in f32; the one-device GPT against PyTorch's own modules, in f64. Also the
//! presets' parameter counts and bad configurations.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use anyhow::{ensure, Context, Result};
use common::{max_diff, tolerance};
use tch::{Device, Kind, Tensor};
use ulysses::attention::{AttentionConfig, Kernel, Mask, SingleDevice, StrategyConfig, UlyssesAttention};
use ulysses::autograd::Tape;
use ulysses::comm::{launch, OpKind};
use ulysses::cost::Job;
use ulysses::model::{shift_labels, ForwardOptions, Gpt, GptConfig, MlpKind, NormKind, Placement};
use ulysses::train::Precision;

/// Deterministic token ids `[b, n]` below `vocab`.
fn tokens(b: i64, n: i64, vocab: i64) -> Tensor {
    let i = Tensor::arange(b * n, (Kind::Int64, Device::Cpu));
    ((&i * 7919 + (&i * &i) * 31 + 17).remainder(vocab)).reshape([b, n])
}

fn attention() -> AttentionConfig {
    AttentionConfig::new(Kernel::Sdpa, Mask::Causal)
}

/// (loss, gradients by parameter) on one device, with plain autograd.
fn single_device(cfg: &GptConfig, b: i64, n: i64) -> Result<(f64, Vec<(String, Tensor)>)> {
    let strategy = SingleDevice::new(attention().build()?, n, cfg.n_head, cfg.n_kv_head)?;
    let model = Gpt::new(cfg, Box::new(strategy), Kind::Float, Device::Cpu)?;
    let toks = tokens(b, n, cfg.vocab_size);
    let loss = model.loss(&Tape::disabled(), &toks, &shift_labels(&toks)?)?;
    loss.local.backward();
    let grads = model.params().iter().map(|(name, p)| (name.to_string(), p.grad())).collect();
    Ok((loss.value, grads))
}

fn check_parity(cfg: &GptConfig, p: usize, b: i64, n: i64) -> Result<()> {
    check_strategy(cfg, StrategyConfig::Ulysses, p, b, n)
}

/// Loss and every parameter gradient of the GPT with `strategy` on `p` ranks against one
/// device. A sharded parameter's gradient is compared with its slices of the full gradient.
fn check_strategy(cfg: &GptConfig, strategy: StrategyConfig, p: usize, b: i64, n: i64) -> Result<()> {
    let (want_loss, want) = single_device(cfg, b, n)?;
    let per_rank = launch(p, |ctx| -> Result<(f64, Vec<(Tensor, Placement)>)> {
        let s = strategy.build(ctx.world(), attention(), n, cfg.n_head, cfg.n_kv_head)?;
        let layout = s.layout().clone();
        let model = Gpt::new(cfg, s, Kind::Float, Device::Cpu)?;
        let toks = tokens(b, n, cfg.vocab_size);
        let labels = shift_labels(&toks)?;
        let (toks, labels) = (layout.shard(&toks, 1, ctx.rank())?, layout.shard(&labels, 1, ctx.rank())?);
        let loss = model.forward_backward(&toks, &labels)?;
        let grads = model.params().all().iter().map(|p| (p.tensor.grad(), p.placement.clone())).collect();
        Ok((loss.value, grads))
    })?;
    let label = format!(
        "gpt {}x{} H={} H_kv={} {} P={p} b={b} N={n}",
        cfg.n_layer,
        cfg.n_embd,
        cfg.n_head,
        cfg.n_kv_head,
        strategy.label()
    );
    // Rounding in another order (tests/common/tolerance.rs): the loss and every gradient within
    // the bounds of the model's chain of sums, in f32.
    let bounds = tolerance::gpt(cfg, n, b * n, Kind::Float);
    for (r, (loss, grads)) in per_rank.iter().enumerate() {
        tolerance::check(
            &format!("{label} rank {r}: loss"),
            (loss - want_loss).abs(),
            bounds.loss * want_loss.abs(),
        )?;
        ensure!(grads.len() == want.len(), "{label}: {} parameters vs {}", grads.len(), want.len());
        for ((name, w), (g, placement)) in want.iter().zip(grads) {
            let w = match placement {
                Placement::Replicated => w.shallow_clone(),
                Placement::Sharded { dim, index } => w.index_select(*dim, &Tensor::from_slice(index)),
            };
            let scale = w.abs().max().double_value(&[]);
            tolerance::check(&format!("{label} rank {r}: d{name}"), max_diff(g, &w), bounds.grad * scale)?;
        }
    }
    Ok(())
}

#[test]
fn tiny_gpt_gradients_match_one_device() -> Result<()> {
    let cfg = GptConfig::tiny();
    for p in [1usize, 2, 3, 4] {
        for n in [24, 23] {
            check_parity(&cfg, p, 2, n)?;
        }
    }
    Ok(())
}

#[test]
fn gqa_untied_gpt_at_eight_ranks() -> Result<()> {
    let cfg = GptConfig {
        n_head: 8,
        n_kv_head: 2,
        n_embd: 64,
        tie_embeddings: false,
        bias: false,
        ..GptConfig::tiny()
    };
    for p in [2usize, 8] {
        check_parity(&cfg, p, 1, 32)?;
    }
    // MQA with uneven heads: 6 heads, 1 kv head, on 4 ranks.
    let cfg = GptConfig { n_head: 6, n_kv_head: 1, n_embd: 48, ..GptConfig::tiny() };
    check_parity(&cfg, 4, 2, 21)
}

#[test]
fn presets_have_the_published_sizes() -> Result<()> {
    // Parameter counts of our GPT (tied embeddings, biases, vocabulary 50304): the usual
    // rounded names of these models.
    for (name, low, high) in [
        ("125m", 120e6, 130e6),
        ("350m", 340e6, 360e6),
        ("1.3b", 1.25e9, 1.35e9),
        ("6.7b", 6.5e9, 6.9e9),
        ("30b", 29e9, 31e9),
        // Meta's published sizes: 8.03B and 70.6B (untied 128256-token embeddings, SwiGLU, GQA).
        ("llama3-8b", 8.02e9, 8.04e9),
        ("llama3-70b", 70.5e9, 70.6e9),
    ] {
        let cfg = GptConfig::preset(name)?;
        cfg.validate()?;
        let n = cfg.num_params() as f64;
        ensure!(n >= low && n <= high, "{name}: {n:.3e} parameters");
    }
    // The count is the one the model allocates.
    let cfg = GptConfig { tie_embeddings: false, n_kv_head: 2, ..GptConfig::tiny() };
    let model = Gpt::new(
        &cfg,
        Box::new(SingleDevice::new(attention().build()?, 8, 4, 2)?),
        Kind::Float,
        Device::Cpu,
    )?;
    ensure!(model.params().numel() == cfg.num_params(), "{} vs {}", model.params().numel(), cfg.num_params());
    // And for the Llama layout (RMSNorm weights only, SwiGLU's [2F, h] and [h, F], no biases).
    let cfg = GptConfig::llama_tiny();
    let model = Gpt::new(
        &cfg,
        Box::new(SingleDevice::new(attention().build()?, 8, cfg.n_head, cfg.n_kv_head)?),
        Kind::Float,
        Device::Cpu,
    )?;
    ensure!(model.params().numel() == cfg.num_params(), "{} vs {}", model.params().numel(), cfg.num_params());
    let fc = model.params().iter().find(|(n, _)| *n == "h.0.mlp.fc.weight").context("no h.0.mlp.fc")?.1;
    ensure!(fc.size() == [2 * cfg.ffn(), cfg.n_embd], "SwiGLU's gate and up: {:?}", fc.size());
    ensure!(model.params().iter().all(|(n, _)| !n.ends_with(".bias")), "the Llama has no biases");
    Ok(())
}

#[test]
fn bad_configs_and_inputs_are_refused() -> Result<()> {
    let texts: Vec<String> = [
        GptConfig { n_embd: 66, ..GptConfig::tiny() },
        GptConfig { n_head: 4, n_kv_head: 3, ..GptConfig::tiny() },
        GptConfig { n_embd: 12, n_head: 4, ..GptConfig::tiny() },
        GptConfig { n_layer: 0, ..GptConfig::tiny() },
    ]
    .iter()
    .map(|c| c.validate().expect_err("a bad config").to_string())
    .collect();
    ensure!(texts[0].contains("n_embd 66 is not a multiple of n_head 4"), "{}", texts[0]);
    ensure!(texts[1].contains("n_head 4 is not a multiple of n_kv_head 3"), "{}", texts[1]);
    ensure!(texts[2].contains("head size 3 must be even for RoPE"), "{}", texts[2]);
    ensure!(texts[3].contains("n_layer = 0 must be at least 1"), "{}", texts[3]);
    ensure!(GptConfig::preset("7b").unwrap_err().to_string().contains("presets: tiny"), "preset");

    // Tokens that do not match the rank's share of the sequence.
    let errs = launch(2, |ctx| -> Result<String> {
        let cfg = GptConfig::tiny();
        let strategy = UlyssesAttention::new(ctx.world().clone(), attention().build()?, 10, 4, 4)?;
        let model = Gpt::new(&cfg, Box::new(strategy), Kind::Float, Device::Cpu)?;
        let err = model.forward(&Tape::new(), &tokens(1, 4, 256)).expect_err("4 tokens for a share of 5");
        Ok(err.to_string())
    })?;
    ensure!(errs[0].contains("tokens must be i64 [b, 5]"), "{}", errs[0]);

    // Ulysses needs a head per rank, and a token per rank.
    let errs = launch(8, |ctx| -> Result<Vec<String>> {
        let a = UlyssesAttention::new(ctx.world().clone(), attention().build()?, 64, 4, 4)
            .err()
            .map(|e| e.to_string());
        let b = UlyssesAttention::new(ctx.world().clone(), attention().build()?, 5, 8, 8)
            .err()
            .map(|e| e.to_string());
        Ok(vec![a.unwrap_or_default(), b.unwrap_or_default()])
    })?;
    ensure!(errs[0][0].contains("H=4 < P=8"), "{}", errs[0][0]);
    ensure!(
        errs[0][1].contains("a sequence of 5 tokens cannot give each of 8 ranks a token"),
        "{}",
        errs[0][1]
    );
    Ok(())
}

#[test]
fn every_strategy_trains_the_gpt_like_one_device() -> Result<()> {
    // 8 heads (2 kv heads for the GQA run), N = 32: every strategy at P = 2 and 4, Megatron-SP
    // where the kv heads divide.
    let mha = GptConfig { n_head: 8, n_kv_head: 8, n_embd: 64, ..GptConfig::tiny() };
    let gqa = GptConfig { n_kv_head: 2, tie_embeddings: false, ..mha.clone() };
    for p in [2usize, 4] {
        for strategy in [
            StrategyConfig::MegatronSp,
            StrategyConfig::Ring { zigzag: false },
            StrategyConfig::Ring { zigzag: true },
            StrategyConfig::AllGatherKv { zigzag: true },
            StrategyConfig::Usp { ulysses: 2, zigzag: true },
            StrategyConfig::UlyssesChunked { chunks: 2 },
        ] {
            check_strategy(&mha, strategy, p, 2, 32)?;
            if strategy != StrategyConfig::MegatronSp || p == 2 {
                check_strategy(&gqa, strategy, p, 1, 32)?;
            }
        }
    }
    Ok(())
}

#[test]
fn every_strategy_trains_the_llama_like_one_device() -> Result<()> {
    // RMSNorm, SwiGLU (F = 176, no multiple of h = 64), 4 query heads over 2 kv heads, untied,
    // no biases: every strategy at P = 2 and 4 (Megatron-SP at 2, where the kv heads divide;
    // its column split must pair each rank's gate features with the same up features).
    let cfg = GptConfig::llama_tiny();
    for p in [2usize, 4] {
        for strategy in [
            StrategyConfig::Ulysses,
            StrategyConfig::UlyssesChunked { chunks: 3 },
            StrategyConfig::MegatronSp,
            StrategyConfig::Ring { zigzag: false },
            StrategyConfig::Ring { zigzag: true },
            StrategyConfig::AllGatherKv { zigzag: true },
            StrategyConfig::Usp { ulysses: 2, zigzag: true },
        ] {
            if strategy != StrategyConfig::MegatronSp || p == 2 {
                check_strategy(&cfg, strategy, p, 2, 24)?;
            }
        }
    }
    Ok(())
}

#[test]
fn megatron_sp_keeps_a_pth_of_the_blocks_and_its_volume_does_not_shrink() -> Result<()> {
    // Per-rank bytes of one layer's forward and backward for a fixed N: Ulysses' fall as P
    // grows, Megatron-SP's do not (Jacobs et al. 2023, §3.2), counted, not computed.
    let cfg = GptConfig { n_layer: 1, n_head: 8, n_kv_head: 8, n_embd: 64, ..GptConfig::tiny() };
    let (b, n) = (1, 64);
    let (h, es) = (cfg.n_embd as u64, 4u64);
    let mut volumes = Vec::new();
    for p in [2usize, 4, 8] {
        let sent = launch(p, |ctx| -> Result<(u64, u64, i64)> {
            let mut out = (0, 0, 0);
            for strategy in [StrategyConfig::Ulysses, StrategyConfig::MegatronSp] {
                let s = strategy.build(ctx.world(), attention(), n, cfg.n_head, cfg.n_kv_head)?;
                let layout = s.layout().clone();
                let model = Gpt::new(&cfg, s, Kind::Float, Device::Cpu)?;
                let toks = layout.shard(&tokens(b, n, cfg.vocab_size), 1, ctx.rank())?;
                let labels = layout.shard(&shift_labels(&tokens(b, n, cfg.vocab_size))?, 1, ctx.rank())?;
                ctx.world().reset_stats();
                model.forward_backward(&toks, &labels)?;
                let st = ctx.world().stats();
                if strategy == StrategyConfig::Ulysses {
                    out.0 = st.op(OpKind::AllToAll).bytes_sent;
                } else {
                    out.1 = st.op(OpKind::AllGather).bytes_sent + st.op(OpKind::ReduceScatter).bytes_sent;
                    out.2 = model.params().numel();
                }
            }
            Ok(out)
        })?;
        // The library's formulas (what the cost model prices), per layer, forward + backward:
        // Megatron-SP 2 all-gathers + 2 reduce-scatters of [b, N, h] forward; backward their
        // adjoints and, as Megatron-LM, the re-gather of the two column-parallel linears' inputs;
        // Ulysses 2 x (2Nh + 2N H_kv d)(P-1)/P^2.
        let per_layer = |strategy| -> Result<u64> {
            let job =
                Job { micro_batch: b, precision: Precision::F32, ..Job::new(cfg.clone(), strategy, p, n) };
            let (f, w) = ulysses::cost::bytes::layer_bytes(&job, 0)?;
            Ok((f + w) * cfg.n_layer as u64)
        };
        let (megatron, ulysses) =
            (per_layer(StrategyConfig::MegatronSp)?, per_layer(StrategyConfig::Ulysses)?);
        let per = b as u64 * n as u64 * h * (p as u64 - 1) / p as u64 * es * cfg.n_layer as u64;
        ensure!(
            megatron == (4 + 6) * per,
            "Megatron-SP P={p}: {megatron} B, the closed form (4 + 6)bNh(P-1)/P"
        );
        ensure!(sent.iter().all(|s| s.1 == megatron), "Megatron-SP P={p}: {:?}, expected {megatron}", sent);
        ensure!(sent.iter().all(|s| s.0 == ulysses), "Ulysses P={p}: {:?}, expected {ulysses}", sent);
        // The blocks' weights are 1/P per rank (embedding, norms and output biases replicated).
        let replicated = cfg.vocab_size * h as i64 + 8 * h as i64; // + 3 LayerNorms and 2 output biases
        let blocks = cfg.num_params() - replicated;
        ensure!(sent[0].2 == replicated + blocks / p as i64, "Megatron-SP P={p}: {} parameters", sent[0].2);
        volumes.push((sent[0].0, sent[0].1));
    }
    ensure!(
        volumes.windows(2).all(|w| w[1].0 < w[0].0),
        "Ulysses per-rank bytes do not fall with P: {volumes:?}"
    );
    ensure!(
        volumes.windows(2).all(|w| w[1].1 >= w[0].1),
        "Megatron-SP per-rank bytes fall with P: {volumes:?}"
    );
    Ok(())
}

#[test]
fn the_tiny_gpt_matches_pytorchs_own_modules_loss_and_every_gradient() -> Result<()> {
    // scripts/gpt_reference.py built the same GPT from torch.nn modules (nn.Embedding,
    // nn.LayerNorm, nn.Linear, F.scaled_dot_product_attention with GQA, tanh GELU, tied head,
    // F.cross_entropy over the labelled tokens) with non-trivial weights, and stored them, the
    // tokens and targets, its loss and every parameter's gradient, all in f64, and the config in
    // the metadata. Every other test of the model compares it with itself on one device: this
    // one says the one-device model computes what its definition says.
    matches_pytorch("tests/data/gpt_reference.safetensors").map(|_| ())
}

#[test]
fn the_tiny_llama_matches_pytorchs_own_modules_loss_and_every_gradient() -> Result<()> {
    // The same with `--model llama`: nn.RMSNorm (weight only), Llama's SwiGLU as three
    // nn.Linear (gate_proj, up_proj, down_proj; gate and up stored stacked as this model keeps
    // them), no biases, an untied head, RoPE base 500000, GQA, F = 40 no multiple of h = 16.
    let cfg = matches_pytorch("tests/data/llama_reference.safetensors")?;
    ensure!(
        cfg.mlp == MlpKind::Swiglu
            && cfg.norm == NormKind::Rmsnorm
            && cfg.ffn() % cfg.n_embd != 0
            && !cfg.bias
            && !cfg.tie_embeddings
            && cfg.n_kv_head < cfg.n_head,
        "the reference is not the Llama variant: {cfg:?}"
    );
    Ok(())
}

/// The one-device model against the PyTorch reference in `file` (written by
/// scripts/gpt_reference.py): the loss and every gradient, on two paths. Returns the config.
fn matches_pytorch(file: &str) -> Result<GptConfig> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(file);
    let bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes)?;
    let config = header.metadata().as_ref().and_then(|m| m.get("config")).context("no config metadata")?;
    let cfg: GptConfig = serde_json::from_str(config)?;
    let reference = file;
    let file: BTreeMap<String, Tensor> = Tensor::read_safetensors(&path)?.into_iter().collect();
    let get = |name: &str| file.get(name).with_context(|| format!("{reference} has no {name}"));
    let (toks, targets, want_loss) = (get("tokens")?, get("targets")?, get("loss")?.double_value(&[]));
    let (b, n) = (toks.size()[0], toks.size()[1]);
    // Ignored targets inside the sequences as well as at their ends: the mean is over the rest.
    let labelled = targets.ne(ulysses::model::IGNORE).sum(Kind::Int64).int64_value(&[]);
    ensure!(labelled < b * (n - 1), "the reference should have ignored targets inside the sequences");

    // Rounding only (tests/common/tolerance.rs): both sides compute in f64, in other orders
    // (another process, other kernels, another summation order in each GEMM, LayerNorm and
    // softmax, RoPE's frequencies through exp(ln) here and a power there); each value goes
    // through chains of sums no longer than max(F or 2F, h, N, V, b N) = 64 terms (80 for the
    // Llama: its SwiGLU projection has 2F outputs), so the
    // bounds of a model run twice in another order: (L + 2) gamma_64 of the loss, (2L + 3)
    // gamma_64 of each gradient's largest element, about 3e-14 and 5e-14. Any difference in
    // what is computed (an eps, a GELU variant, a bias, a head layout) is many orders larger.
    let bounds = tolerance::gpt(&cfg, n, b * n, Kind::Double);
    let runs = [
        ("sdpa, plain autograd", Kernel::Sdpa, ForwardOptions::default()),
        (
            "math, tiled loss and full recomputation on the tape",
            Kernel::Math,
            ForwardOptions {
                recompute_blocks: true,
                recompute_attention: false,
                loss_tile: Some(5),
                mlp_tile: Some(7),
            },
        ),
    ];
    for (label, kernel, options) in runs {
        let attention = AttentionConfig::new(kernel, Mask::Causal).build()?;
        let strategy = SingleDevice::new(attention, n, cfg.n_head, cfg.n_kv_head)?;
        let mut model = Gpt::new(&cfg, Box::new(strategy), Kind::Double, Device::Cpu)?;
        model.set_options(options);
        // Every parameter of the model is in the file, with its gradient, and nothing else is.
        let names: BTreeSet<&str> = model.params().iter().map(|(name, _)| name).collect();
        let stored: BTreeSet<&str> = file
            .keys()
            .map(|k| k.strip_prefix("grad.").unwrap_or(k))
            .filter(|k| !["tokens", "targets", "loss"].contains(k))
            .collect();
        ensure!(
            names == stored,
            "parameters of the model but not of the file: {:?}; of the file but not of the model: {:?}",
            names.difference(&stored).collect::<Vec<_>>(),
            stored.difference(&names).collect::<Vec<_>>()
        );
        tch::no_grad(|| -> Result<()> {
            for (name, p) in model.params().iter() {
                let w = get(name)?;
                ensure!(
                    w.size() == p.size(),
                    "{name}: shape {:?} in the file, {:?} here",
                    w.size(),
                    p.size()
                );
                ensure!(w.kind() == Kind::Double, "{name}: {:?} in the file", w.kind());
                p.shallow_clone().copy_(w);
            }
            Ok(())
        })?;

        let loss = model.forward_backward(toks, targets)?;
        ensure!(loss.tokens == labelled, "{label}: {} labelled tokens, the file has {labelled}", loss.tokens);
        // Every comparison of the run, then the ones out of bounds together.
        let mut failed = Vec::new();
        let got_local = loss.local.double_value(&[]);
        let check = tolerance::check(
            &format!("pytorch reference, {label}: loss {:.17} here, {want_loss:.17} in PyTorch", loss.value),
            (loss.value - want_loss).abs().max((got_local - want_loss).abs()),
            bounds.loss * want_loss.abs(),
        );
        failed.extend(check.err().map(|e| e.to_string()));
        for (name, p) in model.params().iter() {
            let (got, want) = (p.grad(), get(&format!("grad.{name}"))?);
            ensure!(got.defined(), "{label}: {name} has no gradient");
            ensure!(got.kind() == Kind::Double, "{label}: d{name} in {:?}", got.kind());
            ensure!(got.size() == want.size(), "{label}: d{name} {:?} vs {:?}", got.size(), want.size());
            let scale = want.abs().max().double_value(&[]);
            // Where the largest difference is, to say which element is off.
            let diff = (&got - want).abs();
            let at = diff.flatten(0, -1).argmax(0, false).int64_value(&[]);
            let (g, w) = (got.flatten(0, -1).double_value(&[at]), want.flatten(0, -1).double_value(&[at]));
            let check = tolerance::check(
                &format!(
                    "pytorch reference, {label}: d{name} {:?} (max |grad| {scale:.3e}; worst at flat \
                     index {at}: {g:.10e} here, {w:.10e} in PyTorch)",
                    want.size()
                ),
                diff.max().double_value(&[]),
                bounds.grad * scale,
            );
            failed.extend(check.err().map(|e| e.to_string()));
        }
        ensure!(
            failed.is_empty(),
            "{} of {} comparisons out of bounds:\n{}",
            failed.len(),
            names.len() + 1,
            failed.join("\n")
        );
    }
    Ok(cfg)
}
