//! What one rank of a point does, whatever started it (a thread or an MPI process): build the
//! model and its trainer, then step, measuring every step (time, tokens/s, memory, bytes by
//! group and op), reporting it to the writer and saving the checkpoints asked for.

use std::path::{Path, PathBuf};
use std::time::Instant;

use tch::{Device, Kind, Tensor};

use super::config::{ExperimentConfig, Packing, Point, BALANCE_CHUNKS};
use super::memory::MemoryProbe;
use super::results::{CommRow, StepRow};
use super::run::{checkpoints_dir, Report};
use crate::attention::AttentionConfig;
use crate::comm::{Mesh, MeshShape, RankCtx, ReduceOp};
use crate::data::{shard, shard_packed, Dataset, Shard};
use crate::error::TorchResultExt;
use crate::model::{Gpt, GptConfig, IGNORE};
use crate::train::{TrainGroups, Trainer};
use crate::{Error, Result};

/// Everything a rank needs to run a point.
pub(super) struct RankSpec<'a> {
    cfg: &'a ExperimentConfig,
    point: &'a Point,
    gpt: &'a GptConfig,
    attention: AttentionConfig,
    kind: Kind,
    dataset: &'a dyn Dataset,
    /// Ranks sharing this process (threads): memory readings are divided among them.
    ranks_in_process: usize,
    /// This rank's device (its own GPU with NCCL; threads share cuda:0).
    device: Device,
    /// Where the point's checkpoints go (with `train.checkpoint_every`).
    checkpoints: Option<PathBuf>,
    /// The checkpoint the point starts from.
    start: Option<PathBuf>,
}

impl<'a> RankSpec<'a> {
    pub(super) fn new(
        cfg: &'a ExperimentConfig,
        point: &'a Point,
        gpt: &'a GptConfig,
        dataset: &'a dyn Dataset,
        ranks_in_process: usize,
        device: Device,
    ) -> Result<RankSpec<'a>> {
        Ok(RankSpec {
            cfg,
            point,
            gpt,
            attention: cfg.attention()?,
            kind: cfg.kind()?,
            dataset,
            ranks_in_process,
            device,
            checkpoints: None,
            start: None,
        })
    }

    /// Checkpoints under the run's folder `dir`, and the one to start from.
    pub(super) fn checkpoints(mut self, dir: &Path, start: Option<PathBuf>) -> RankSpec<'a> {
        self.checkpoints = self.cfg.train.checkpoint_every.map(|_| checkpoints_dir(dir, self.point));
        self.start = start;
        self
    }
}

/// One rank of one point: build, then step, measuring and reporting each step.
pub(super) fn rank_main(
    ctx: RankCtx,
    spec: &RankSpec<'_>,
    send: &(dyn Fn(Report) -> Result<()> + Sync),
) -> Result<()> {
    let (cfg, point, gpt) = (spec.cfg, spec.point, spec.gpt);
    let (dp, k) = (point.dp, point.grad_accum);
    let sp = point.ranks / dp;
    let world = ctx.world().clone().with_overlap(cfg.parallel.overlap);
    let mesh = Mesh::new(&world, MeshShape::dp_sp(dp, sp)?)?;
    let (sp_group, dp_group) = (mesh.group("sp")?, mesh.group("dp")?);
    let device = spec.device;
    let kv_store = cfg.kv_store(point, device)?;
    let strategy = point.strategy.build_with_kv_store(
        sp_group,
        spec.attention,
        point.seq,
        gpt.n_head,
        gpt.n_kv_head,
        kv_store,
    )?;
    let layout = strategy.layout().clone();
    let model = Gpt::new(gpt, strategy, spec.kind, device)?;
    let mut trainer = Trainer::new(model, TrainGroups::new(&mesh)?, cfg.train_config(point)?)?;
    if let Some(from) = &spec.start {
        trainer.load(from)?;
    }
    let world = &world;

    // Memory once every rank has built its model, and its peak from then (one reset per
    // process or GPU).
    world.synchronize()?;
    crate::device::synchronize(device)?;
    world.barrier()?;
    MemoryProbe::reset(device, spec.ranks_in_process == 1 || ctx.rank() == 0)?;
    world.barrier()?;
    let memory = MemoryProbe::new(device, spec.ranks_in_process);
    world.barrier()?;

    let (b, n, total) = (cfg.train.batch, point.seq, cfg.train.warmup + cfg.train.steps);
    let corpus = match point.packing {
        Packing::None => None,
        packing => Some(spec.dataset.corpus().ok_or_else(|| Error::InvalidArgument {
            op: "experiment",
            group: "-".into(),
            msg: format!(
                "packing {packing:?} needs a dataset with documents (a text file's paragraphs); {} has none",
                spec.dataset.describe()
            ),
        })?),
    };
    // Packed and padded rows: the tokens are those with a label (padding and each document's
    // last token have none), the FLOPs those of the batch's documents (summed per step below).
    let tokens = (b * n) as f64 * (dp * k) as f64;
    let flops = gpt.train_flops(b * n * (dp * k) as i64, n, &spec.attention.mask);
    for step in trainer.steps_taken() as usize..total {
        // Micro-batch m of replica d draws the dataset's replica d k + m, so that one device
        // accumulating dp x k micro-batches sees the global batch of dp replicas.
        let replica = mesh.coord("dp")? * k;
        let (seed, draw) = (cfg.train.seed, |m: usize| (replica + m) as u64);
        let micro = |m: usize| -> Result<(Shard, f64, f64)> {
            let to = |t: &Tensor| t.f_to(device).op("experiment");
            let rank = sp_group.rank();
            // A ring on a packed batch's own balanced layout (`[train] balance`).
            let balanced = |docs: crate::attention::Documents| -> Result<_> {
                if point.balanced {
                    let l = docs.balanced_layout(&spec.attention.mask, sp, BALANCE_CHUNKS)?;
                    Ok((docs.with_layout(l.clone())?, l))
                } else {
                    Ok((docs, layout.clone()))
                }
            };
            match (point.packing, &corpus) {
                (Packing::Packed, Some(c)) => {
                    let (global, docs) = c.packed(seed, step as u64, draw(m), b, n)?;
                    let (docs, layout) = balanced(docs)?;
                    let shard = shard_packed(&to(&global)?, &docs, &layout, rank)?;
                    let labelled = (b * n - docs.flat().len() as i64 + 1) as f64; // one per document lost
                    Ok((shard, labelled, gpt.train_flops_packed(&docs, &spec.attention.mask)))
                }
                (Packing::Padded, Some(c)) => {
                    let (global, docs, labels) = c.padded(seed, step as u64, draw(m), b, n, 0)?;
                    let (docs, layout) = balanced(docs)?;
                    let mut shard = shard_packed(&to(&global)?, &docs, &layout, rank)?;
                    shard.labels = layout.shard(&to(&labels)?, 1, rank)?;
                    let labelled =
                        labels.f_ne(IGNORE).and_then(|l| l.f_sum(Kind::Double)).op("experiment")?;
                    Ok((
                        shard,
                        labelled.double_value(&[]),
                        gpt.train_flops_packed(&docs, &spec.attention.mask),
                    ))
                }
                _ => {
                    let global = spec.dataset.batch(seed, step as u64, draw(m), b, n)?;
                    let flops = gpt.train_flops(b * n, n, &spec.attention.mask);
                    Ok((shard(&to(&global)?, &layout, rank)?, (b * n) as f64, flops))
                }
            }
        };
        let drawn = (0..k).map(micro).collect::<Result<Vec<_>>>()?;
        // Every replica's labelled tokens and FLOPs (they draw different rows), outside the clock.
        let (mut tokens, mut flops) = (tokens, flops);
        if corpus.is_some() {
            let mine = [drawn.iter().map(|d| d.1).sum::<f64>(), drawn.iter().map(|d| d.2).sum::<f64>()];
            let all = dp_group.all_reduce(&Tensor::from_slice(&mine), ReduceOp::Sum)?;
            (tokens, flops) = (all.double_value(&[0]), all.double_value(&[1]));
        }
        let batches: Vec<Shard> = drawn.into_iter().map(|d| d.0).collect();
        // The clock reads a device with nothing queued (GPU-true step times).
        crate::device::synchronize(device)?;
        world.barrier()?;
        world.reset_rank_stats();
        let t0 = Instant::now();
        let report = trainer.step(&batches)?;
        world.synchronize()?;
        crate::device::synchronize(device)?;
        world.barrier()?;
        let seconds = t0.elapsed().as_secs_f64();
        let by_group = world.rank_stats_by_group();
        // The loss over data-parallel replicas, outside the timed step and its counters.
        let loss_value = if dp > 1 {
            dp_group.all_reduce(&Tensor::from_slice(&[report.loss]), ReduceOp::Avg)?.double_value(&[0])
        } else {
            report.loss
        };
        let (peak, reserved, measure, outside) = memory.read()?;
        let sent: u64 = by_group.iter().map(|(_, s)| s.bytes_sent()).sum();
        let received: u64 = by_group.iter().map(|(_, s)| s.bytes_received()).sum();
        let row = StepRow {
            point: point.index as u32,
            strategy: point.label(),
            ranks: point.ranks as u32,
            sp: sp as u32,
            dp: dp as u32,
            seq: n,
            batch: b,
            step: step as u32,
            warmup: step < cfg.train.warmup,
            rank: ctx.rank() as u32,
            step_ms: seconds * 1e3,
            tokens_per_s: tokens / seconds,
            model_tflops: flops / seconds / 1e12,
            loss: loss_value,
            peak_mib_per_rank: peak,
            peak_reserved_mib_per_rank: reserved,
            outside_allocator_mib_per_rank: outside,
            memory: measure.to_string(),
            bytes_sent: sent,
            bytes_received: received,
            grad_norm: report.grad_norm,
            lr: report.lr,
            loss_scale: report.loss_scale,
            skipped: report.skipped.is_some(),
        };
        let comm = by_group
            .into_iter()
            .flat_map(|(group, stats)| {
                stats
                    .iter()
                    .map(|(op, c)| CommRow {
                        point: point.index as u32,
                        step: step as u32,
                        rank: ctx.rank() as u32,
                        group: group.clone(),
                        op: op.name().to_string(),
                        calls: c.calls,
                        bytes_sent: c.bytes_sent,
                        bytes_received: c.bytes_received,
                    })
                    .collect::<Vec<_>>()
            })
            .collect();
        send((row, comm))?;
        // The model state, after the step's measurements.
        if let (Some(dir), Some(every)) = (&spec.checkpoints, cfg.train.checkpoint_every) {
            if (step + 1) % every == 0 || step + 1 == total {
                let data = serde_json::json!({
                    "dataset": spec.dataset.describe(), "seed": cfg.train.seed, "next_step": step + 1,
                    "micro_batch": "the dataset's replica dp_rank x grad_accum + m of step next_step",
                });
                trainer.save(dir, data)?;
            }
        }
    }
    Ok(())
}
