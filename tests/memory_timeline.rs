//! The memory timeline (src/train/timeline.rs) and the trainer's observer: observing a step
//! changes no bit of its losses and parameters (ZeRO 0 and 3, no and full checkpointing, P = 1,
//! 2 and 4 thread ranks), and the timeline labels its samples with every phase of the step.

mod common;

use std::rc::Rc;

use anyhow::{ensure, Result};
use common::training::{self, Run};
use ulysses::attention::StrategyConfig;
use ulysses::comm::launch;
use ulysses::model::{BlockHooks, Unit};
use ulysses::train::{Checkpointing, MemoryTimeline, Precision};

/// Hooks that write down every call, to check the order the observer sees.
#[derive(Default)]
struct Calls(std::cell::RefCell<Vec<String>>);

impl Calls {
    fn push(&self, what: &str, unit: Unit) -> ulysses::Result<()> {
        self.0.borrow_mut().push(format!("{what} {}", unit.name()));
        Ok(())
    }
}

impl BlockHooks for Calls {
    fn before_forward(&self, unit: Unit) -> ulysses::Result<()> {
        self.push("before_forward", unit)
    }
    fn after_forward(&self, unit: Unit) -> ulysses::Result<()> {
        self.push("after_forward", unit)
    }
    fn before_backward(&self, unit: Unit) -> ulysses::Result<()> {
        self.push("before_backward", unit)
    }
    fn after_backward(&self, unit: Unit) -> ulysses::Result<()> {
        self.push("after_backward", unit)
    }
}

/// Rank 0's losses, parameters and the calls its observer saw (none when `observe` is false).
fn train(p: usize, run: &Run, observe: bool) -> Result<(Vec<f64>, training::Named, Vec<String>)> {
    let mut out = launch(p, |ctx| -> Result<_> {
        let mut t = training::trainer(ctx.world(), run)?;
        let calls = Rc::new(Calls::default());
        if observe {
            t.observe(Rc::clone(&calls) as Rc<dyn BlockHooks>);
        }
        let losses = training::steps(&mut t, run, 0, run.steps)?;
        let seen = calls.0.borrow().clone();
        Ok((losses, t.parameters()?, seen))
    })?;
    Ok(out.swap_remove(0))
}

#[test]
fn observing_a_step_changes_no_bit_and_sees_every_unit_in_order() -> Result<()> {
    for (p, dp) in [(1, 1), (2, 1), (4, 2)] {
        for zero in [0, 3] {
            for ckpt in [Checkpointing::None, Checkpointing::Full] {
                let run = Run::tiny(StrategyConfig::Ulysses, dp, Precision::F32, zero).checkpointing(ckpt);
                let label = format!("P={p} dp={dp} ZeRO-{zero} {ckpt:?}");
                let (want_loss, want, _) = train(p, &run, false)?;
                let (loss, got, calls) = train(p, &run, true)?;
                ensure!(loss == want_loss, "{label}: losses {loss:?} vs {want_loss:?}");
                for ((name, g), (_, w)) in got.iter().zip(&want) {
                    ensure!(g.equal(w), "{label}: {name} differs");
                }
                // Per step: the outer unit and each block forward, then the backward in reverse.
                let l = run.model.n_layer as usize;
                let mut step = vec!["before_forward outer".to_string()];
                for i in 0..l {
                    step.push(format!("before_forward block {i}"));
                    step.push(format!("after_forward block {i}"));
                }
                step.push("after_forward outer".into());
                step.push("before_backward outer".into());
                for i in (0..l).rev() {
                    step.push(format!("before_backward block {i}"));
                    step.push(format!("after_backward block {i}"));
                }
                step.push("after_backward outer".into());
                let expected: Vec<String> = (0..run.steps).flat_map(|_| step.clone()).collect();
                ensure!(calls == expected, "{label}: the observer saw\n{calls:#?}\nwant\n{expected:#?}");
            }
        }
    }
    Ok(())
}

#[test]
fn the_timeline_labels_its_samples_with_the_steps_phases() -> Result<()> {
    // A 2-layer GPT at N = 512 on 2 thread ranks, full checkpointing, three steps, sampled every
    // 50 us: each block's forward and backward lasts far longer than that here.
    let mut run = Run::tiny(StrategyConfig::Ulysses, 1, Precision::F32, 0).checkpointing(Checkpointing::Full);
    run.n = 512;
    let out = launch(2, |ctx| -> Result<_> {
        let mut t = training::trainer(ctx.world(), &run)?;
        let timeline = (ctx.rank() == 0).then(|| MemoryTimeline::start(std::time::Duration::from_micros(50)));
        if let Some(tl) = &timeline {
            t.observe(Rc::new(tl.marker()));
        }
        training::steps(&mut t, &run, 0, run.steps)?;
        Ok(timeline.map(MemoryTimeline::finish))
    })?;
    let tl = out.into_iter().flatten().next().ok_or_else(|| anyhow::anyhow!("rank 0 kept no timeline"))?;
    let sampled = tl.by_phase();
    for want in ["forward: block 0", "forward: block 1", "backward: block 1", "backward: block 0"] {
        ensure!(tl.phases.iter().any(|p| p == want), "no phase {want:?} in {:?}", tl.phases);
    }
    ensure!(
        sampled.iter().any(|p| p.0.starts_with("backward")) && tl.samples.len() > 10,
        "{} samples in {sampled:?}",
        tl.samples.len()
    );
    ensure!(tl.samples.windows(2).all(|w| w[0].t_ms <= w[1].t_ms), "the samples are not in time order");
    let (peak, phase) = tl.peak().ok_or_else(|| anyhow::anyhow!("no peak"))?;
    ensure!(
        tl.samples.iter().all(|s| s.live_bytes <= peak.live_bytes) && !phase.is_empty(),
        "the peak is not the largest sample"
    );
    // The CSV: a header and one line per sample.
    let csv = tl.to_csv(0.0);
    ensure!(csv.lines().count() == tl.samples.len() + 1 && csv.starts_with("t_ms,live_mib,phase"));
    Ok(())
}
