//! The tape: gradients through collectives equal single-device autograd (f64, 1e-6), for a
//! composite function and for stacks of L residual blocks, at several world sizes; cuts, inference
//! tapes and the graph being freed after the step.

mod common;

#[path = "common/blocks.rs"]
mod blocks;

use anyhow::{ensure, Result};
use blocks::Blocks;
use common::{assert_close, det, head_split};
use tch::{Kind, Tensor};
use ulysses::autograd::Tape;
use ulysses::comm::launch;

const TOL: f64 = 1e-6; // f64; the differences seen are around 1e-15

/// Rank r's rows of a [N, ..] tensor split by `split`.
fn rows(t: &Tensor, split: &[i64], r: usize) -> Tensor {
    let start: i64 = split[..r].iter().sum();
    t.narrow(0, start, split[r])
}

/// The ranks' losses sum to the single-device loss, and their input gradients, concatenated
/// along the sequence, equal the single-device input gradient.
fn check_loss_and_input_grad(
    label: &str,
    loss: &Tensor,
    x: &Tensor,
    per_rank: &[(f64, &Tensor)],
) -> Result<()> {
    let want = loss.double_value(&[]);
    let got: f64 = per_rank.iter().map(|(l, _)| l).sum();
    ensure!((got - want).abs() < TOL, "{label}: loss {got} vs {want}");
    let dx = Tensor::cat(&per_rank.iter().map(|(_, g)| g.shallow_clone()).collect::<Vec<_>>(), 0);
    assert_close(&format!("{label} dX"), &dx, &x.grad(), TOL);
    Ok(())
}

#[test]
fn composite_function_gradients_match_one_device() -> Result<()> {
    // local matmul, a2a (heads <- sequence), local mixing, all-gather of heads, rank-weighted loss
    let (n, heads, d) = (24i64, 12i64, 3i64);
    let h = heads * d;
    let x_all = det(&[n, h], 1, Kind::Double);
    let w_all = det(&[h, h], 2, Kind::Double) * 0.3;
    for p in [1usize, 2, 3, 4, 8] {
        let weights: Vec<Tensor> = (0..p).map(|r| det(&[n, heads, d], 10 + r as u64, Kind::Double)).collect();

        // One device: the loss summed over the ranks' weightings.
        let x = x_all.copy().set_requires_grad(true);
        let w = w_all.copy().set_requires_grad(true);
        let u = x.matmul(&w).view([n, heads, d]);
        let full = (u.cumsum(0, Kind::Double) * 0.2).sin();
        let loss =
            weights.iter().map(|m| (&full * m).sum(Kind::Double)).fold(Tensor::from(0.0f64), |a, b| a + b);
        loss.backward();

        let seq = vec![n / p as i64; p];
        let hs = head_split(heads, p);
        let per_rank = launch(p, |ctx| -> Result<(f64, Tensor, Tensor)> {
            let (g, r) = (ctx.world(), ctx.rank());
            let tape = Tape::new();
            let xr = rows(&det(&[n, h], 1, Kind::Double), &seq, r).set_requires_grad(true);
            let wr = (det(&[h, h], 2, Kind::Double) * 0.3).set_requires_grad(true);
            // [N/P, h] -> [N/P, H, d] -> [N, H_r, d]
            let u = xr.matmul(&wr).view([-1, heads, d]);
            let u = tape.all_to_all_v(g, &u, 1, 0, &hs, &seq)?;
            let mixed = (u.cumsum(0, Kind::Double) * 0.2).sin();
            // [N, H_r, d] -> [N, H, d], replicated
            let full = tape.all_gather_v(g, &mixed, 1, &hs)?;
            let loss = (&full * det(&[n, heads, d], 10 + r as u64, Kind::Double)).sum(Kind::Double);
            tape.backward(&loss)?;
            ensure!(tape.is_empty(), "the tape keeps records after backward");
            Ok((loss.double_value(&[]), xr.grad(), wr.grad()))
        })?;

        let label = format!("composite P={p}");
        check_loss_and_input_grad(
            &label,
            &loss,
            &x,
            &per_rank.iter().map(|(l, gx, _)| (*l, gx)).collect::<Vec<_>>(),
        )?;
        // A replicated parameter's gradient is the sum of the ranks' parts.
        let dw =
            per_rank.iter().map(|(_, _, gw)| gw.shallow_clone()).fold(w.grad().zeros_like(), |a, b| a + b);
        assert_close(&format!("{label} dW"), &dw, &w.grad(), TOL);
    }
    Ok(())
}

#[test]
fn residual_stacks_match_one_device() -> Result<()> {
    let (n, heads, d) = (24i64, 8i64, 4i64);
    let h = heads * d;
    for layers in [1usize, 2, 8] {
        let x_all = det(&[n, h], 3, Kind::Double);
        let m_all = det(&[n, h], 4, Kind::Double);
        let reference = Blocks::new(layers, heads, d, Kind::Double, 7);
        let x = x_all.copy().set_requires_grad(true);
        let loss = (reference.forward_plain(&x) * &m_all).sum(Kind::Double);
        loss.backward();

        for p in [1usize, 2, 3, 4, 8] {
            let seq = vec![n / p as i64; p];
            let hs = head_split(heads, p);
            let per_rank = launch(p, |ctx| -> Result<(f64, Tensor, Vec<Tensor>)> {
                let (g, r) = (ctx.world(), ctx.rank());
                let stack = Blocks::new(layers, heads, d, Kind::Double, 7);
                let tape = Tape::new();
                let xr = rows(&det(&[n, h], 3, Kind::Double), &seq, r).set_requires_grad(true);
                let out = stack.forward_sp(&tape, g, &xr, &hs, &seq, true)?;
                let loss = (out * rows(&det(&[n, h], 4, Kind::Double), &seq, r)).sum(Kind::Double);
                ensure!(tape.len() == 3 * layers, "records: {:?}", tape.ops());
                tape.backward(&loss)?;
                let grads = stack.params().iter().map(|w| w.grad()).collect();
                Ok((loss.double_value(&[]), xr.grad(), grads))
            })?;

            let label = format!("L={layers} P={p}");
            check_loss_and_input_grad(
                &label,
                &loss,
                &x,
                &per_rank.iter().map(|(l, gx, _)| (*l, gx)).collect::<Vec<_>>(),
            )?;
            for (i, w) in reference.params().iter().enumerate() {
                let summed = per_rank
                    .iter()
                    .map(|(_, _, gs)| gs[i].shallow_clone())
                    .fold(w.zeros_like(), |a, b| a + b);
                assert_close(&format!("{label} dW[{i}]"), &summed, &w.grad(), TOL);
            }
        }
    }
    Ok(())
}

#[test]
fn without_cuts_the_tape_says_where_to_cut() -> Result<()> {
    let texts = launch(2, |ctx| -> Result<String> {
        let stack = Blocks::new(2, 4, 2, Kind::Double, 1);
        let tape = Tape::new();
        let x = det(&[6, 8], 1, Kind::Double).set_requires_grad(true);
        let out = stack.forward_sp(&tape, ctx.world(), &x, &[2, 2], &[6, 6], false)?;
        let err = tape.backward(&out.sum(Kind::Double)).expect_err("no cuts: the graph is reached twice");
        Ok(err.to_string())
    })?;
    for t in texts {
        ensure!(t.contains("tape.cut"), "the error does not advise a cut: {t}");
    }
    Ok(())
}

#[test]
fn the_graph_is_freed_after_backward() -> Result<()> {
    launch(2, |ctx| -> Result<()> {
        let stack = Blocks::new(2, 4, 2, Kind::Double, 1);
        let tape = Tape::new();
        let x = det(&[6, 8], 1, Kind::Double).set_requires_grad(true);
        let out = stack.forward_sp(&tape, ctx.world(), &x, &[2, 2], &[6, 6], true)?;
        // A loss whose backward needs saved tensors (the product's inputs).
        let loss = (&out * &out).sum(Kind::Double);
        tape.backward(&loss)?;
        // Nothing kept the graph alive: a second pass from the loss has nothing to run through.
        ensure!(loss.f_backward().is_err(), "the graph survived the step (keep_graph?)");
        ensure!(tape.is_empty(), "records survived the step");
        Ok(())
    })?;
    Ok(())
}

#[test]
fn a_disabled_tape_records_nothing_and_a_plain_backward_through_a_collective_is_an_error() -> Result<()> {
    let texts = launch(2, |ctx| -> Result<String> {
        let stack = Blocks::new(2, 4, 2, Kind::Double, 1);
        let x = det(&[6, 8], 1, Kind::Double);
        let training = Tape::new();
        let a = stack.forward_sp(&training, ctx.world(), &x, &[2, 2], &[6, 6], true)?;
        let off = Tape::disabled();
        let b = stack.forward_sp(&off, ctx.world(), &x, &[2, 2], &[6, 6], true)?;
        ensure!(off.is_empty() && training.len() == 6, "records: {}", training.len());
        ensure!(a.equal(&b), "the disabled tape's forward differs");
        ensure!(off.backward(&b.sum(Kind::Double)).is_err(), "backward on a disabled tape");
        // A plain backward would reach every W2 but lose every W1 (only reachable through an
        // all-to-all): it must fail instead, naming the collective.
        let err = b.sum(Kind::Double).f_backward().expect_err("a plain backward crossed a collective");
        // Under no_grad the same forward builds no graph at all (evaluation).
        let c = tch::no_grad(|| stack.forward_sp(&off, ctx.world(), &x, &[2, 2], &[6, 6], true))?;
        ensure!(!c.requires_grad() && c.equal(&a), "no_grad evaluation");
        // Cuts alone keep plain autograd (the single-device model trains this way).
        let y = det(&[3, 2], 2, Kind::Double).set_requires_grad(true);
        (off.cut(&y)? * off.cut(&y)?).sum(Kind::Double).backward();
        assert_close("d(y^2)/dy through cuts", &y.grad(), &(&y * 2.0), 0.0);
        training.clear();
        Ok(err.to_string())
    })?;
    for t in texts {
        for needle in ["all_to_all", "Tape::disabled()", "tape.backward"] {
            ensure!(t.contains(needle), "the error lacks {needle:?}: {t}");
        }
    }
    Ok(())
}
