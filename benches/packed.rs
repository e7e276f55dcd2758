//! E8, packed against padded: the text dataset's paragraphs (datasets/, 100-700 tokens each)
//! trained on as packed rows of N tokens (documents end to end, attention and labels inside
//! each) and as padded rows (one paragraph per row, padded to the longest paragraph, the
//! padding unlabelled), per strategy on P = 4 thread ranks, in one process, the two layouts of
//! a strategy one after the other.
//!
//! Per point: the median over steps of the forward-backward time (slowest rank), the labelled
//! tokens per second (what the model learns from: padding and each document's last token
//! carry no label), the loss of the first step, and the causal work per rank (visible pairs)
//! max/mean for the layout the strategy uses. Run: `cargo bench --bench packed` (`-- --quick`:
//! fewer steps).

use std::time::Instant;

use anyhow::Result;
use tch::{Device, Kind, Tensor};
use ulysses::attention::{imbalance, AttentionConfig, Documents, Kernel, Mask, SeqLayout, StrategyConfig};
use ulysses::comm::{launch, OpKind};
use ulysses::cost::bytes::closed_form;
use ulysses::data::{shard_packed, Dataset, TokenStream, Tokenizer};
use ulysses::model::{Gpt, GptConfig};

/// (median step seconds, labelled tokens per step, first loss, ring bytes a step of the rank
/// that sends most) of `strategy` on `p` ranks over the batches `make(step)` gives.
fn measure(
    cfg: &GptConfig,
    strategy: StrategyConfig,
    p: usize,
    n: i64,
    steps: usize,
    make: &(dyn Fn(u64) -> Result<(Tensor, Documents, Option<Tensor>)> + Sync),
) -> Result<(f64, f64, f64, f64)> {
    let per_rank = launch(p, |ctx| -> Result<(Vec<f64>, f64, f64, f64)> {
        let attention = AttentionConfig::new(Kernel::Sdpa, Mask::Causal);
        let s = strategy.build(ctx.world(), attention, n, cfg.n_head, cfg.n_kv_head)?;
        let layout = s.layout().clone();
        let model = Gpt::new(cfg, s, Kind::Float, Device::Cpu)?;
        let (mut times, mut first, mut labelled) = (Vec::new(), f64::NAN, 0.0);
        for step in 0..=steps {
            let (tokens, docs, labels) = make(step as u64)?;
            let mut shard = shard_packed(&tokens, &docs, &layout, ctx.rank())?;
            if let Some(l) = labels {
                shard.labels = layout.shard(&l, 1, ctx.rank())?;
            }
            ctx.world().barrier()?;
            let t0 = Instant::now();
            let loss = model.forward_backward_packed(&shard.tokens, &shard.labels, shard.docs.as_ref())?;
            ctx.world().barrier()?;
            if step == 0 {
                first = loss.value; // the first step also warms the kernels: not timed
                ctx.world().reset_rank_stats();
            } else {
                times.push(t0.elapsed().as_secs_f64());
                labelled = loss.tokens as f64;
            }
        }
        // The ring's K/V blocks and accumulators: every shift this rank sent in the timed steps.
        let shifted: u64 = ctx
            .world()
            .rank_stats_by_group()
            .iter()
            .flat_map(|(_, stats)| {
                stats.iter().filter(|(op, _)| *op == OpKind::Shift).map(|(_, c)| c.bytes_sent)
            })
            .sum();
        Ok((times, first, labelled, shifted as f64 / steps as f64))
    })?;
    let (times, first, labelled, _) = &per_rank[0];
    let ring_bytes = per_rank.iter().map(|r| r.3).fold(0.0, f64::max);
    let mut sorted = times.clone();
    sorted.sort_by(f64::total_cmp);
    Ok((sorted[sorted.len() / 2], *labelled, *first, ring_bytes))
}

fn main() -> Result<()> {
    let quick = std::env::args().any(|a| a == "--quick");
    let steps = if quick { 3 } else { 7 };
    let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let stream = TokenStream::from_text(&repo.join("datasets/sequence_parallelism.txt"), Tokenizer::Byte)?;
    let corpus = stream.corpus().ok_or_else(|| anyhow::anyhow!("the text has no paragraphs"))?;
    let lengths: Vec<usize> = corpus.documents.iter().map(|d| d.len()).collect();
    let (p, n_packed) = (4usize, 2048i64);
    // Padded to the longest paragraph, rounded up to 4P chunks (zigzag's layout needs 2P, the
    // balanced layout 4 per rank).
    let q = 4 * p as i64;
    let n_padded = (corpus.longest() as i64 + q - 1) / q * q;
    // As many padded rows as a packed row holds documents on average, so that a step sees about
    // as many real tokens either way.
    let mean = lengths.iter().sum::<usize>() as f64 / lengths.len() as f64;
    let b_padded = ((n_packed as f64 / mean).round() as i64).max(1);
    let cfg =
        GptConfig { n_layer: 2, n_head: 8, n_kv_head: 8, n_embd: 128, vocab_size: 256, ..GptConfig::tiny() };
    println!(
        "== E8: packed vs padded, {} paragraphs of {}..{} tokens (mean {mean:.0}); GPT {}x{} H={}, f32, causal, \
         P={p} threads; packed b=1 N={n_packed}, padded b={b_padded} N={n_padded}; medians of {steps} steps ==",
        lengths.len(),
        lengths.iter().min().unwrap_or(&0),
        lengths.iter().max().unwrap_or(&0),
        cfg.n_layer,
        cfg.n_embd,
        cfg.n_head
    );
    println!(
        "{:<14} {:<7} {:>9} {:>12} {:>10} {:>8} {:>14} {:>9} {:>13}",
        "strategy",
        "layout",
        "step ms",
        "labelled/s",
        "vs padded",
        "loss",
        "work max/mean",
        "balanced",
        "ring sent"
    );
    for strategy in [
        StrategyConfig::Ulysses,
        StrategyConfig::Ring { zigzag: false },
        StrategyConfig::Ring { zigzag: true },
    ] {
        let packed = |step: u64| -> Result<(Tensor, Documents, Option<Tensor>)> {
            let (t, d) = corpus.packed(1, step, 0, 1, n_packed)?;
            Ok((t, d, None))
        };
        let padded = |step: u64| -> Result<(Tensor, Documents, Option<Tensor>)> {
            let (t, d, l) = corpus.padded(1, step, 0, b_padded, n_padded, i64::from(b' '))?;
            Ok((t, d, Some(l)))
        };
        let (pad_s, pad_tokens, pad_loss, pad_ring) = measure(&cfg, strategy, p, n_padded, steps, &padded)?;
        let (pack_s, pack_tokens, pack_loss, pack_ring) =
            measure(&cfg, strategy, p, n_packed, steps, &packed)?;
        // What the classic ring sends a step (every block the whole way round): the closed form
        // per layer and sample, forward and backward.
        let classic = |n: i64, b: i64| -> f64 {
            let es = 4; // f32
            match closed_form(strategy, n, cfg.n_embd, cfg.n_kv_head * cfg.head_dim(), p, es) {
                Some((f, bw)) if strategy != StrategyConfig::Ulysses => (f + bw) * (cfg.n_layer * b) as f64,
                _ => f64::NAN,
            }
        };
        // The attention work per rank of the layout, for the batches of step 1.
        let work = |docs: &Documents, n: i64| -> Result<(f64, f64)> {
            let layout = match strategy {
                StrategyConfig::Ring { zigzag: true } => SeqLayout::zigzag(n, p)?,
                _ => SeqLayout::contiguous(n, p)?,
            };
            let balanced = docs.balanced_layout(&Mask::Causal, p, 4)?;
            Ok((
                imbalance(&docs.work_per_rank(&Mask::Causal, &layout)),
                imbalance(&docs.work_per_rank(&Mask::Causal, &balanced)),
            ))
        };
        let (pack_work, pad_work) = (work(&packed(1)?.1, n_packed)?, work(&padded(1)?.1, n_padded)?);
        let (pad_rate, pack_rate) = (pad_tokens / pad_s, pack_tokens / pack_s);
        for (layout, s, rate, loss, w, ring, classic) in [
            ("padded", pad_s, pad_rate, pad_loss, pad_work, pad_ring, classic(n_padded, b_padded)),
            ("packed", pack_s, pack_rate, pack_loss, pack_work, pack_ring, classic(n_packed, 1)),
        ] {
            let sent = if classic.is_nan() {
                "-".to_string()
            } else {
                format!("{:.2} MiB {:.2}", ring / 1048576.0, ring / classic)
            };
            println!(
                "{:<14} {layout:<7} {:>9.1} {rate:>12.0} {:>9.2}x {loss:>8.4} {:>14.3} {:>9.3} {sent:>13}",
                strategy.label(),
                s * 1e3,
                rate / pad_rate,
                w.0,
                w.1
            );
        }
    }
    println!("(labelled/s: tokens with a label per second of forward and backward, the slowest rank; work:");
    println!(" visible pairs of the rank with the most over the mean in the strategy's layout, and in the");
    println!(" balanced layout of 4 chunks per rank; Ulysses attends every rank's heads over the whole");
    println!(" sequence, so its attention work is even whatever the layout says; ring sent: K/V blocks and");
    println!(
        " dK/dV accumulators a step, counted, of the rank that sends most, and over what the classic ring"
    );
    println!(
        " sends, every block the whole way round: a packed block goes only as far as a rank attends to it)"
    );
    Ok(())
}
