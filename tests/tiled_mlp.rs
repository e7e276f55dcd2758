//! ALST's tiled MLP (src/model/tiled_mlp.rs): the same loss and gradients as the untiled MLP on
//! one device and through the strategies, and the inputs it refuses. The bytes it saves, read
//! from the allocator, are checked in tests/cost_memory.rs (a file whose tests allocate little
//! besides what they measure).

mod common;

use anyhow::{ensure, Result};
use common::{max_diff, tolerance};
use tch::{Device, Kind, Tensor};
use ulysses::attention::{AttentionConfig, Kernel, Mask, StrategyConfig};
use ulysses::comm::launch;
use ulysses::model::{shift_labels, ForwardOptions, Gpt, GptConfig, Placement};

fn tokens(b: i64, n: i64, vocab: i64) -> Tensor {
    let i = Tensor::arange(b * n, (Kind::Int64, Device::Cpu));
    ((&i * 7919 + (&i * &i) * 31 + 17).remainder(vocab)).reshape([b, n])
}

fn attention() -> AttentionConfig {
    AttentionConfig::new(Kernel::Sdpa, Mask::Causal)
}

type Run = (f64, Vec<(String, Tensor)>);
/// A rank's loss and (name, gradient, placement) of each parameter.
type RankRun = (f64, Vec<(String, Tensor, Placement)>);

/// Loss and gradients of `cfg` with `options` on `p` ranks of `strategy` (gradients of sharded
/// parameters as this rank's slices, with their placement), rank 0's.
fn run(
    cfg: &GptConfig,
    strategy: StrategyConfig,
    p: usize,
    options: ForwardOptions,
    (b, n): (i64, i64),
    kind: Kind,
) -> Result<Vec<RankRun>> {
    launch(p, |ctx| -> Result<RankRun> {
        let s = strategy.build(ctx.world(), attention(), n, cfg.n_head, cfg.n_kv_head)?;
        let layout = s.layout().clone();
        let mut model = Gpt::new(cfg, s, kind, Device::Cpu)?;
        model.set_options(options);
        let toks = tokens(b, n, cfg.vocab_size);
        let labels = shift_labels(&toks)?;
        let (toks, labels) = (layout.shard(&toks, 1, ctx.rank())?, layout.shard(&labels, 1, ctx.rank())?);
        let loss = model.forward_backward(&toks, &labels)?;
        let grads = model
            .params()
            .all()
            .iter()
            .map(|q| (q.name.clone(), q.tensor.grad(), q.placement.clone()))
            .collect();
        Ok((loss.value, grads))
    })
    .map_err(Into::into)
}

/// One device, plain MLP: the reference.
fn reference(cfg: &GptConfig, options: ForwardOptions, bn: (i64, i64), kind: Kind) -> Result<Run> {
    let mut out = run(cfg, StrategyConfig::Single, 1, options, bn, kind)?;
    let (loss, grads) = out.remove(0);
    Ok((loss, grads.into_iter().map(|(n, g, _)| (n, g)).collect()))
}

/// Every rank's loss and gradients against `want` within the model's rounding bounds.
fn compare(
    label: &str,
    cfg: &GptConfig,
    got: &[RankRun],
    want: &Run,
    (b, n): (i64, i64),
    kind: Kind,
) -> Result<()> {
    // Rounding in another order only (tests/common/tolerance.rs): a tile's GEMMs are the
    // untiled GEMMs' rows, computed by calls of other shapes (which may block their sums
    // differently), and the weight gradients are sums over tiles then over tokens instead of one
    // sum over tokens: the chain lengths of the model's bound are unchanged.
    let bounds = tolerance::gpt(cfg, n, b * n, kind);
    for (r, (loss, grads)) in got.iter().enumerate() {
        tolerance::check(
            &format!("{label} rank {r}: loss"),
            (loss - want.0).abs(),
            bounds.loss * want.0.abs(),
        )?;
        ensure!(grads.len() == want.1.len(), "{label}: {} parameters vs {}", grads.len(), want.1.len());
        for ((name, g, placement), (_, w)) in grads.iter().zip(&want.1) {
            let w = match placement {
                Placement::Replicated => w.shallow_clone(),
                Placement::Sharded { dim, index } => w.index_select(*dim, &Tensor::from_slice(index)),
            };
            ensure!(g.defined(), "{label} rank {r}: {name} has no gradient");
            let scale = w.abs().max().double_value(&[]);
            tolerance::check(&format!("{label} rank {r}: d{name}"), max_diff(g, &w), bounds.grad * scale)?;
        }
    }
    Ok(())
}

fn tiled(tile: i64, recompute: bool) -> ForwardOptions {
    ForwardOptions { mlp_tile: Some(tile), recompute_blocks: recompute, ..ForwardOptions::default() }
}

#[test]
fn tiles_of_any_size_give_the_untiled_loss_and_gradients() -> Result<()> {
    // f64, one device: tiles of 1 token, of 5 (the last one shorter: 2 x 23 = 46 tokens), and
    // of a whole sample, with and without full recomputation around them; GPT and Llama MLPs.
    let (b, n) = (2, 23);
    for cfg in [GptConfig::tiny(), GptConfig::llama_tiny()] {
        let want = reference(&cfg, ForwardOptions::default(), (b, n), Kind::Double)?;
        for (tile, recompute) in [(1, false), (5, false), (23, false), (5, true)] {
            let got = run(&cfg, StrategyConfig::Single, 1, tiled(tile, recompute), (b, n), Kind::Double)?;
            let label = format!("{:?} MLP, tile {tile}, recompute {recompute}", cfg.mlp);
            compare(&label, &cfg, &got, &want, (b, n), Kind::Double)?;
        }
    }
    Ok(())
}

#[test]
fn every_strategy_but_megatron_sp_trains_with_a_tiled_mlp_like_one_device() -> Result<()> {
    // f32, rank-dependent shares (N = 24 over 2 and 4 ranks), tile 4 (several tiles a rank).
    let (b, n) = (2, 24);
    for cfg in [GptConfig::tiny(), GptConfig::llama_tiny()] {
        let want = reference(&cfg, ForwardOptions::default(), (b, n), Kind::Float)?;
        for p in [2usize, 4] {
            for strategy in [
                StrategyConfig::Ulysses,
                StrategyConfig::Ring { zigzag: true },
                StrategyConfig::AllGatherKv { zigzag: false },
                StrategyConfig::Usp { ulysses: 2, zigzag: true },
            ] {
                let got = run(&cfg, strategy, p, tiled(4, false), (b, n), Kind::Float)?;
                let label = format!("{:?} MLP, {} P={p}, tile 4", cfg.mlp, strategy.label());
                compare(&label, &cfg, &got, &want, (b, n), Kind::Float)?;
            }
        }
    }
    Ok(())
}

#[test]
fn bad_tiles_are_refused_before_anything_runs() -> Result<()> {
    let cfg = GptConfig::tiny();
    let err = |strategy: StrategyConfig, p: usize, tile: i64| -> String {
        match run(&cfg, strategy, p, tiled(tile, false), (1, 16), Kind::Float) {
            Ok(_) => "accepted".into(),
            Err(e) => format!("{e:#}"),
        }
    };
    let zero = err(StrategyConfig::Single, 1, 0);
    ensure!(zero.contains("an MLP tile of 0 tokens") && zero.contains("between 1 and 16"), "{zero}");
    // 16 tokens over 2 ranks: 8 a rank.
    let big = err(StrategyConfig::Ulysses, 2, 9);
    ensure!(big.contains("an MLP tile of 9 tokens for a rank holding 8 tokens"), "{big}");
    let tp = err(StrategyConfig::MegatronSp, 2, 4);
    ensure!(tp.contains("with Megatron-SP") && tp.contains("all-gathered sequence"), "{tp}");
    Ok(())
}
