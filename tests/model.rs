//! The GPT with Ulysses on P ranks against the same GPT on one device: the loss and the gradient
//! of every parameter, in f32. Also the presets' parameter counts and bad configurations.

mod common;

use anyhow::{ensure, Result};
use common::max_diff;
use tch::{Device, Kind, Tensor};
use ulysses::attention::{AttentionConfig, Kernel, Mask, SequenceParallel, SingleDevice, UlyssesAttention};
use ulysses::autograd::Tape;
use ulysses::comm::launch;
use ulysses::model::{shift_labels, Gpt, GptConfig};

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
    let (want_loss, want) = single_device(cfg, b, n)?;
    let per_rank = launch(p, |ctx| -> Result<(f64, Vec<Tensor>)> {
        let strategy =
            UlyssesAttention::new(ctx.world().clone(), attention().build()?, n, cfg.n_head, cfg.n_kv_head)?;
        let layout = strategy.layout().clone();
        let model = Gpt::new(cfg, Box::new(strategy), Kind::Float, Device::Cpu)?;
        let toks = tokens(b, n, cfg.vocab_size);
        let labels = shift_labels(&toks)?;
        let (toks, labels) = (layout.shard(&toks, 1, ctx.rank())?, layout.shard(&labels, 1, ctx.rank())?);
        let tape = Tape::new();
        let loss = model.loss(&tape, &toks, &labels)?;
        tape.backward(&loss.local)?;
        model.sync_gradients()?;
        Ok((loss.value, model.params().iter().map(|(_, p)| p.grad()).collect()))
    })?;
    let label = format!(
        "gpt {}x{} H={} H_kv={} P={p} b={b} N={n}",
        cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.n_kv_head
    );
    for (r, (loss, grads)) in per_rank.iter().enumerate() {
        ensure!(
            (loss - want_loss).abs() <= 1e-6 * want_loss.abs(),
            "{label} rank {r}: loss {loss} vs {want_loss}"
        );
        for ((name, w), g) in want.iter().zip(grads) {
            let scale = w.abs().max().double_value(&[]).max(1e-6);
            let d = max_diff(g, w) / scale;
            // f32; the differences seen are about 3e-7 (summation order).
            ensure!(d <= 1e-5, "{label} rank {r}: d{name} max relative diff {d:.2e} > 1e-5");
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
