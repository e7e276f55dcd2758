//! Bad input and broken ranks end in errors that name the op, the group and the numbers, and
//! they come back promptly: never a hang, never a silently wrong result.

use std::time::{Duration, Instant};

use anyhow::{anyhow, ensure, Result};
use tch::{Device, Kind, Tensor};
use ulysses::comm::{launch, LocalLaunch, MeshShape, ReduceOp};
use ulysses::Error;

fn ones(shape: &[i64]) -> Tensor {
    Tensor::ones(shape, (Kind::Float, Device::Cpu))
}

/// Runs `f` on `p` ranks and returns the launch's error text (fails if the launch succeeded).
fn launch_error<F>(p: usize, timeout: Duration, f: F) -> Result<(String, Duration)>
where
    F: Fn(ulysses::comm::RankCtx) -> Result<()> + Sync,
{
    let start = Instant::now();
    match LocalLaunch::new(p).timeout(timeout).run(f) {
        Ok(_) => Err(anyhow!("the launch succeeded but should have failed")),
        Err(e) => Ok((e.to_string(), start.elapsed())),
    }
}

fn assert_mentions(text: &str, needles: &[&str]) {
    for n in needles {
        assert!(text.contains(n), "error text lacks {n:?}: {text}");
    }
}

#[test]
fn mismatched_shapes_across_ranks() -> Result<()> {
    let (text, took) = launch_error(2, Duration::from_secs(30), |ctx| {
        // Rank 1 holds a longer sequence slice than rank 0.
        let x = ones(&[2, 2 + ctx.rank() as i64, 2, 4]);
        let _ = ctx.world().all_to_all(&x, 2, 1)?;
        Ok(())
    })?;
    assert_mentions(&text, &["all_to_all", "world[0, 1]", "ranks disagree", "[2, 2, 1, 4]", "[2, 3, 1, 4]"]);
    assert!(took < Duration::from_secs(5), "took {took:?}");
    Ok(())
}

#[test]
fn mismatched_ops_and_dtypes_across_ranks() -> Result<()> {
    let (text, _) = launch_error(3, Duration::from_secs(30), |ctx| {
        let x = ones(&[3, 3]);
        if ctx.rank() == 2 {
            let _ = ctx.world().all_gather(&x, 0)?;
        } else {
            let _ = ctx.world().reduce_scatter(&x, 0, ReduceOp::Sum)?;
        }
        Ok(())
    })?;
    assert_mentions(&text, &["ranks disagree", "all_gather", "reduce_scatter", "world[0, 1, 2]"]);

    let (text, _) = launch_error(2, Duration::from_secs(30), |ctx| {
        let kind = if ctx.rank() == 0 { Kind::Float } else { Kind::Double };
        let _ = ctx.world().all_reduce(&Tensor::ones([4], (kind, Device::Cpu)), ReduceOp::Sum)?;
        Ok(())
    })?;
    assert_mentions(&text, &["all_reduce", "ranks disagree", "Float", "Double"]);
    Ok(())
}

#[test]
fn a_panicking_rank_releases_the_others() -> Result<()> {
    for p in [2, 4] {
        let (text, took) = launch_error(p, Duration::from_secs(60), |ctx| {
            if ctx.rank() == 1 {
                panic!("rank one is broken");
            }
            let _ = ctx.world().all_to_all(&ones(&[4, 4 * p as i64]), 1, 0)?;
            Ok(())
        })?;
        assert_mentions(&text, &["rank 1 failed", "panicked", "rank one is broken"]);
        // The waiting ranks were released at once, not after the 60 s timeout.
        assert!(took < Duration::from_secs(5), "P={p}: took {took:?}");
    }
    Ok(())
}

#[test]
fn an_erroring_rank_is_named_as_the_cause() -> Result<()> {
    let (text, took) = launch_error(4, Duration::from_secs(60), |ctx| {
        if ctx.rank() == 2 {
            return Err(anyhow!("rank two could not load its shard"));
        }
        ctx.world().barrier()?;
        Ok(())
    })?;
    assert_mentions(&text, &["rank 2 failed", "could not load its shard"]);
    assert!(took < Duration::from_secs(5), "took {took:?}");
    Ok(())
}

#[test]
fn a_rank_that_never_arrives_times_out() -> Result<()> {
    let timeout = Duration::from_millis(300);
    let (text, _) = launch_error(2, timeout, |ctx| {
        if ctx.rank() == 1 {
            // Busy elsewhere for far longer than the timeout.
            std::thread::sleep(Duration::from_millis(1500));
            return Ok(());
        }
        let start = Instant::now();
        let err = ctx.world().all_reduce(&ones(&[8]), ReduceOp::Sum).expect_err("must time out");
        let waited = start.elapsed();
        ensure!(matches!(err, Error::Timeout { .. }), "wanted a timeout, got {err}");
        ensure!(waited >= timeout && waited < timeout * 3, "the collective returned after {waited:?}");
        Err(err.into())
    })?;
    assert_mentions(&text, &["rank 0 failed", "all_reduce", "timed out", "ranks [1]"]);
    Ok(())
}

#[test]
fn a_rank_that_returns_early_releases_its_peers() -> Result<()> {
    let (text, took) = launch_error(3, Duration::from_secs(60), |ctx| {
        if ctx.rank() == 0 {
            return Ok(()); // forgets the collective
        }
        let _ = ctx.world().all_gather(&ones(&[2]), 0)?;
        Ok(())
    })?;
    assert_mentions(&text, &["all_gather", "rank 0 returned from its function"]);
    assert!(took < Duration::from_secs(5), "took {took:?}");
    Ok(())
}

#[test]
fn invalid_dims_and_splits_are_refused_before_communicating() -> Result<()> {
    let texts = launch(2, |ctx| -> Result<Vec<String>> {
        let g = ctx.world();
        let x = ones(&[2, 6, 3, 4]);
        let errors = vec![
            g.all_to_all(&x, 4, 1).map(|_| ()),
            g.all_to_all(&x, 1, 1).map(|_| ()),
            g.all_to_all(&x, 2, 1).map(|_| ()), // 3 heads on 2 ranks
            g.all_to_all_v(&x, 2, 1, &[1, 1, 1], &[6, 6]).map(|_| ()),
            g.all_to_all_v(&x, 2, 1, &[1, 1], &[6, 6]).map(|_| ()),
            g.all_to_all_v(&x, 2, 1, &[4, -1], &[6, 6]).map(|_| ()),
            g.all_to_all_v(&x, 2, 1, &[2, 1], &[5, 5]).map(|_| ()),
            g.all_gather_v(&x, 1, &[6]).map(|_| ()),
            g.reduce_scatter(&x, 2, ReduceOp::Sum).map(|_| ()),
            g.all_reduce(&Tensor::ones([3], (Kind::Int64, Device::Cpu)), ReduceOp::Avg).map(|_| ()),
            g.broadcast(&x, 2).map(|_| ()),
            g.send(&x, ctx.rank()),
            g.recv(&x, 5).map(|_| ()),
        ];
        // Every call failed, and nobody communicated: the group still works.
        g.barrier()?;
        errors
            .into_iter()
            .map(|e| e.err().map(|e| e.to_string()).ok_or_else(|| anyhow!("a bad call succeeded")))
            .collect()
    })?;
    let expected: [&[&str]; 13] = [
        &["all_to_all", "world[0, 1]", "dim 4 is out of range", "[2, 6, 3, 4]"],
        &["all_to_all", "scatter_dim and gather_dim are both 1"],
        &["all_to_all", "dim 2 has 3 elements, not divisible by the group size 2", "_v"],
        &["all_to_all", "scatter_split has 3 entries [1, 1, 1] for 2 ranks"],
        &["all_to_all", "scatter_split [1, 1] sums to 2 but dim 2 has 3 elements"],
        &["all_to_all", "negative entry"],
        &["all_to_all", "= 5 but this rank's input has 6 along dim 1"],
        &["all_gather", "sizes has 1 entries [6] for 2 ranks"],
        &["reduce_scatter", "dim 2 has 3 elements, not divisible by the group size 2"],
        &["all_reduce", "Avg needs a floating-point dtype, got Int64"],
        &["broadcast", "root 2 is not a rank of a group of 2"],
        &["send", "is this rank itself"],
        &["recv", "src 5 is not a rank of a group of 2"],
    ];
    for rank_texts in &texts {
        for (text, needles) in rank_texts.iter().zip(expected) {
            assert_mentions(text, needles);
        }
    }
    Ok(())
}

#[test]
fn a_mesh_that_does_not_fit_the_world_is_refused() -> Result<()> {
    let texts = launch(4, |ctx| -> Result<String> {
        let err = ctx.mesh(MeshShape::dp_sp(3, 2)?).expect_err("a 6-rank mesh on 4 ranks");
        Ok(err.to_string())
    })?;
    assert_mentions(&texts[0], &["mesh", "spans 6 ranks but the world has 4"]);
    let err = MeshShape::new(&[("sp", 2), ("sp", 2)]).expect_err("duplicate axis");
    assert_mentions(&err.to_string(), &["axis \"sp\" appears twice"]);
    Ok(())
}
