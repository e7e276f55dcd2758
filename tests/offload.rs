//! Activation offload (src/device/offload.rs): full checkpointing's block inputs moved to disk
//! after each block's forward and brought back for its backward give the same loss and
//! gradients bit for bit, leave nothing behind, and refuse what cannot work. The memory it
//! frees, read from the allocator, is checked in tests/cost_memory.rs.

mod common;

use anyhow::{ensure, Context, Result};
use tch::{Device, Kind, Tensor};
use ulysses::attention::{AttentionConfig, Kernel, Mask, SingleDevice, StrategyConfig};
use ulysses::comm::launch;
use ulysses::model::{shift_labels, ForwardOptions, Gpt, GptConfig, Offload, OffloadTarget};

fn tokens(b: i64, n: i64, vocab: i64) -> Tensor {
    let i = Tensor::arange(b * n, (Kind::Int64, Device::Cpu));
    ((&i * 7919 + (&i * &i) * 31 + 17).remainder(vocab)).reshape([b, n])
}

/// A fresh folder of this test process.
fn scratch(name: &str) -> Result<std::path::PathBuf> {
    let dir = std::env::temp_dir().join(format!("ulysses-offload-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

fn full() -> ForwardOptions {
    ForwardOptions { recompute_blocks: true, ..ForwardOptions::default() }
}

/// A rank's loss, gradients, files after the forward and after the backward, and the most
/// bytes the store held.
type RankRun = (f64, Vec<Tensor>, usize, usize, u64);

/// Each rank's loss and gradients with full checkpointing, the block inputs offloaded to a
/// folder under `dir` or kept; with offload, what the store's folder held after the forward
/// (files) and after the backward, and its stats.
fn run(
    cfg: &GptConfig,
    strategy: StrategyConfig,
    p: usize,
    dir: Option<&std::path::Path>,
) -> Result<Vec<RankRun>> {
    let (b, n) = (2, 24);
    let out = launch(p, |ctx| -> Result<RankRun> {
        let attention = AttentionConfig::new(Kernel::Sdpa, Mask::Causal);
        let s = strategy.build(ctx.world(), attention, n, cfg.n_head, cfg.n_kv_head)?;
        let layout = s.layout().clone();
        let mut model = Gpt::new(cfg, s, Kind::Float, Device::Cpu)?;
        model.set_options(full());
        if let Some(d) = dir {
            model.set_offload(Some(Offload::new(OffloadTarget::Disk(d.to_path_buf()), Device::Cpu)?));
        }
        let toks = tokens(b, n, cfg.vocab_size);
        let labels = shift_labels(&toks)?;
        let (toks, labels) = (layout.shard(&toks, 1, ctx.rank())?, layout.shard(&labels, 1, ctx.rank())?);
        let tape = ulysses::autograd::Tape::new();
        let loss = model.loss(&tape, &toks, &labels)?;
        let files = |m: &Gpt| -> Result<usize> {
            Ok(match m.offload().and_then(|o| o.folder()) {
                Some(f) => std::fs::read_dir(f)?.count(),
                None => 0,
            })
        };
        let after_forward = files(&model)?;
        model.backward(&tape, &loss)?;
        model.sync_gradients()?;
        let after_backward = files(&model)?;
        let peak = model.offload().map_or(0, |o| o.stats().peak_held_bytes);
        let grads = model.params().iter().map(|(_, t)| t.grad()).collect();
        Ok((loss.value, grads, after_forward, after_backward, peak))
    })?;
    Ok(out)
}

#[test]
fn offloaded_block_inputs_give_the_same_gradients_bit_for_bit() -> Result<()> {
    // The inputs go to a file and come back byte for byte; everything else computes as
    // without offload, in the same order with the same kernels: equal, not close.
    let dir = scratch("same")?;
    for cfg in [GptConfig::tiny(), GptConfig::llama_tiny()] {
        for (strategy, p) in [
            (StrategyConfig::Single, 1),
            (StrategyConfig::Ulysses, 2),
            (StrategyConfig::Ring { zigzag: true }, 4),
            (StrategyConfig::MegatronSp, 2),
        ] {
            let label = format!("{:?} MLP, {} P={p}", cfg.mlp, strategy.label());
            let kept = run(&cfg, strategy, p, None)?;
            let offloaded = run(&cfg, strategy, p, Some(&dir))?;
            for (r, (a, b)) in kept.iter().zip(&offloaded).enumerate() {
                ensure!(a.0 == b.0, "{label} rank {r}: loss {} kept, {} offloaded", a.0, b.0);
                for (i, (ga, gb)) in a.1.iter().zip(&b.1).enumerate() {
                    ensure!(ga.equal(gb), "{label} rank {r}: gradient {i} differs");
                }
                // One file per block after the forward, none after the backward; the most held
                // at once is every block's input: L x b x s_r x h x 4 bytes.
                ensure!(
                    b.2 == cfg.n_layer as usize && b.3 == 0,
                    "{label} rank {r}: files {} then {}",
                    b.2,
                    b.3
                );
                let s_r = 24 / p as u64;
                let (l, h) = (cfg.n_layer as u64, cfg.n_embd as u64);
                ensure!(b.4 == l * 2 * s_r * h * 4, "{label} rank {r}: held at most {} bytes", b.4);
            }
        }
    }
    // Every store removed its folder when its model was dropped.
    let left: Vec<_> = std::fs::read_dir(&dir)?.collect();
    ensure!(left.is_empty(), "left behind: {left:?}");
    std::fs::remove_dir(&dir)?;
    Ok(())
}

#[test]
fn what_offload_cannot_do_is_refused_by_name() -> Result<()> {
    // A folder that cannot be made: under a file.
    let dir = scratch("refused")?;
    let file = dir.join("a-file");
    std::fs::write(&file, b"not a folder")?;
    let err = Offload::new(OffloadTarget::Disk(file.clone()), Device::Cpu)
        .err()
        .context("a folder under a file")?
        .to_string();
    ensure!(err.contains("offload folder") && err.contains("cannot make"), "{err}");
    let err = Offload::new(OffloadTarget::Disk("/no/such/folder".into()), Device::Cpu)
        .err()
        .context("a missing folder")?
        .to_string();
    ensure!(err.contains("/no/such/folder"), "{err}");
    // Host memory for a CPU model: nothing to move.
    let err = Offload::new(OffloadTarget::Host, Device::Cpu).err().context("host on CPU")?.to_string();
    ensure!(err.contains("in host memory already"), "{err}");
    // Offload without full checkpointing.
    let cfg = GptConfig::tiny();
    let s = SingleDevice::new(AttentionConfig::default().build()?, 8, cfg.n_head, cfg.n_kv_head)?;
    let mut model = Gpt::new(&cfg, Box::new(s), Kind::Float, Device::Cpu)?;
    model.set_offload(Some(Offload::new(OffloadTarget::Disk(dir.clone()), Device::Cpu)?));
    let toks = tokens(1, 8, cfg.vocab_size);
    let err =
        model.forward_backward(&toks, &shift_labels(&toks)?).err().context("no checkpointing")?.to_string();
    ensure!(err.contains("needs full checkpointing"), "{err}");
    drop(model);
    std::fs::remove_file(&file)?;
    std::fs::remove_dir(&dir)?; // fails if the store left its folder behind
    Ok(())
}
