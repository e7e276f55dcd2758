//! Rank-level conformance checks: each runs on every rank of a world group, whatever the backend
//! (threads or MPI processes), with rank-dependent data, and checks its own results against a
//! local computation (or, for sums over ranks, against the group's own all-reduce). The thread
//! tests run them through `launch`; the `mpi-checks` binary runs them under mpirun.
#![allow(dead_code)]

use anyhow::{ensure, Result};
use tch::{Device, Kind, Tensor};
use ulysses::attention::{AttentionConfig, Documents, Kernel, Mask, StrategyConfig};
use ulysses::autograd::Tape;
use ulysses::comm::{AllToAll, Collective, Group, OpKind, ReduceOp};
use ulysses::model::{shift_labels, Gpt, GptConfig, Placement};

use super::{data, det, dot, max_diff};

/// One rank-level check.
type Check = fn(&Group) -> Result<()>;

/// Every check, in order; returns how many ran.
pub fn all(world: &Group) -> Result<usize> {
    let checks: [(&str, Check); 13] = [
        ("collectives", collectives),
        ("round_trip", round_trip),
        ("adjoints", adjoints),
        ("errors", bad_arguments),
        ("strategies", strategies),
        ("gpt", gpt),
        ("zero", super::train_checks::zero),
        ("checkpointing", super::train_checks::checkpointing),
        ("resume", super::train_checks::resume),
        ("reshard", super::train_checks::reshard),
        ("bad_checkpoints", super::train_checks::bad_checkpoints),
        ("gradient_buckets", super::train_checks::gradient_buckets),
        ("overlap", overlap),
    ];
    for (name, check) in &checks {
        check(world).map_err(|e| e.context(format!("check {name} on rank {}", world.rank())))?;
    }
    Ok(checks.len())
}

fn exact(label: &str, got: &Tensor, want: &Tensor) -> Result<()> {
    ensure!(
        got.size() == want.size() && got.kind() == want.kind(),
        "{label}: {:?}{:?} vs {:?}{:?}",
        got.kind(),
        got.size(),
        want.kind(),
        want.size()
    );
    ensure!(got.equal(want), "{label}: max diff {:.3e}", max_diff(got, want));
    Ok(())
}

/// Every collective against the same operation computed locally from every rank's data.
pub fn collectives(g: &Group) -> Result<()> {
    let (p, r) = (g.size(), g.rank());
    let pi = p as i64;
    for kind in [Kind::Float, Kind::BFloat16, Kind::Int64, Kind::Double] {
        for contiguous in [true, false] {
            let label = |op: &str| format!("{op} P={p} {kind:?} contiguous={contiguous}");
            // all-to-all, Ulysses' direction: [2, 3P, 2P, 5] scatter 2, gather 1
            let shape = [2, 3 * pi, 2 * pi, 5];
            let y = g.all_to_all(&data(r, &shape, kind, contiguous), 2, 1)?;
            let parts: Vec<Tensor> =
                (0..p).map(|j| data(j, &shape, kind, true).narrow(2, 2 * r as i64, 2)).collect();
            exact(&label("all_to_all"), &y, &Tensor::cat(&parts, 1))?;
            // uneven all-to-all
            let scatter: Vec<i64> = (0..pi).map(|j| j % 3).collect();
            let gather: Vec<i64> = (0..pi).map(|j| j + 1).collect();
            let rows: i64 = scatter.iter().sum();
            let so: i64 = scatter[..r].iter().sum();
            let y =
                g.all_to_all_v(&data(r, &[rows, gather[r], 4], kind, contiguous), 0, 1, &scatter, &gather)?;
            let parts: Vec<Tensor> = (0..p)
                .map(|j| data(j, &[rows, gather[j], 4], kind, true).narrow(0, so, scatter[r]))
                .collect();
            exact(&label("all_to_all_v"), &y, &Tensor::cat(&parts, 1))?;
            // all-gather, reduce-scatter, all-reduce, broadcast, shift
            let all: Vec<Tensor> = (0..p).map(|j| data(j, &[4, 3], kind, true)).collect();
            let x = data(r, &[4, 3], kind, contiguous);
            exact(&label("all_gather"), &g.all_gather(&x, 1)?, &Tensor::cat(&all, 1))?;
            let acc = if kind == Kind::Double {
                Kind::Double
            } else if kind == Kind::Int64 {
                Kind::Int64
            } else {
                Kind::Float
            };
            let sum = Tensor::stack(&all.iter().map(|t| t.to_kind(acc)).collect::<Vec<_>>(), 0)
                .sum_dim_intlist([0i64].as_slice(), false, acc)
                .to_kind(kind);
            exact(&label("all_reduce"), &g.all_reduce(&x, ReduceOp::Sum)?, &sum)?;
            let xs = data(r, &[2 * pi, 3], kind, contiguous);
            let alls: Vec<Tensor> = (0..p).map(|j| data(j, &[2 * pi, 3], kind, true).to_kind(acc)).collect();
            let rs = Tensor::stack(&alls, 0)
                .sum_dim_intlist([0i64].as_slice(), false, acc)
                .to_kind(kind)
                .narrow(0, 2 * r as i64, 2);
            exact(&label("reduce_scatter"), &g.reduce_scatter(&xs, 0, ReduceOp::Sum)?, &rs)?;
            exact(&label("broadcast"), &g.broadcast(&x, p - 1)?, &all[p - 1])?;
            exact(&label("shift"), &g.shift(&x, 1)?, &all[(r + p - 1) % p])?;
            if let Some(s) = g.reduce(&x, 0, ReduceOp::Sum)? {
                ensure!(r == 0, "reduce gave a result off the root");
                exact(&label("reduce"), &s, &sum)?;
            }
        }
    }
    g.barrier()?;
    Ok(())
}

/// all-to-all then its inverse is the identity, bit for bit, on random data.
pub fn round_trip(g: &Group) -> Result<()> {
    let p = g.size() as i64;
    for kind in [Kind::Float, Kind::BFloat16] {
        let x = Tensor::randn([2, 5, 4 * p, 3], (kind, Device::Cpu));
        let back = g.all_to_all(&g.all_to_all(&x, 2, 1)?, 1, 2)?;
        exact("round trip", &back, &x)?;
    }
    Ok(())
}

/// Sum over ranks of <A x, y> = sum over ranks of <x, A^T y>, the sums taken by the group.
pub fn adjoints(g: &Group) -> Result<()> {
    let (p, r) = (g.size() as i64, g.rank() as u64);
    type Op = fn(&Tape, &Group, &Tensor) -> ulysses::Result<Tensor>;
    let ops: [(&str, &[i64], Op); 5] = [
        ("all_to_all", &[2, 3, 2, 4], |t, g, x| t.all_to_all(g, &x.repeat([1, 1, g.size() as i64, 1]), 2, 1)),
        ("all_gather", &[3, 5], |t, g, x| t.all_gather(g, x, 1)),
        ("reduce_scatter", &[4, 5], |t, g, x| t.reduce_scatter(g, &x.repeat([g.size() as i64, 1]), 0)),
        ("all_reduce", &[7, 3], |t, g, x| t.all_reduce(g, x)),
        ("shift", &[4, 2], |t, g, x| t.shift(g, x, 1)),
    ];
    for (name, shape, op) in ops {
        let tape = Tape::new();
        let x = det(shape, 100 + r, Kind::Double).set_requires_grad(true);
        let ax = op(&tape, g, &x)?;
        let y = det(&ax.size(), 200 + r, Kind::Double);
        let loss = (&ax * &y).sum(Kind::Double);
        tape.backward(&loss)?;
        let mine = Tensor::from_slice(&[loss.double_value(&[]), dot(&x, &x.grad())]);
        let both = Vec::<f64>::try_from(g.all_reduce(&mine, ReduceOp::Sum)?)?;
        let scale = both[0].abs().max(1.0);
        ensure!(
            (both[0] - both[1]).abs() <= 1e-12 * scale && both[0] != 0.0,
            "{name} P={p}: {} vs {}",
            both[0],
            both[1]
        );
    }
    Ok(())
}

/// Bad arguments are refused before anything is communicated, naming the numbers.
pub fn bad_arguments(g: &Group) -> Result<()> {
    let x = Tensor::ones([2, 6, 3, 4], (Kind::Float, Device::Cpu));
    let cases = [
        (g.all_to_all(&x, 4, 1).map(drop), "dim 4 is out of range"),
        (g.all_to_all(&x, 1, 1).map(drop), "scatter_dim and gather_dim are both 1"),
        (g.all_gather_v(&x, 1, &vec![6; g.size() + 1]).map(drop), "entries"),
        (g.broadcast(&x, g.size()).map(drop), "is not a rank of a group"),
    ];
    for (result, says) in cases {
        let text = result.err().map(|e| e.to_string()).unwrap_or_default();
        ensure!(text.contains(says), "expected {says:?}, got {text:?}");
    }
    g.barrier()?; // nobody communicated: the group still works
    Ok(())
}

/// Every strategy's output and dq, dk, dv for this rank's tokens against single-device f64
/// attention computed on this rank.
pub fn strategies(g: &Group) -> Result<()> {
    let p = g.size();
    let (b, n, heads, kv_heads, d) = (2i64, 48i64, 8i64, 2i64, 4i64);
    let mut list = vec![
        StrategyConfig::Ulysses,
        StrategyConfig::Ring { zigzag: false },
        StrategyConfig::Ring { zigzag: true },
        StrategyConfig::AllGatherKv { zigzag: true },
    ];
    if p.is_multiple_of(2) && p > 2 {
        list.push(StrategyConfig::Usp { ulysses: 2, zigzag: true });
    }
    let (q, k, v, w) = (
        det(&[b, n, heads, d], 21, Kind::Double),
        det(&[b, n, kv_heads, d], 22, Kind::Double),
        det(&[b, n, kv_heads, d], 23, Kind::Double),
        det(&[b, n, heads, d], 24, Kind::Double),
    );
    // The reference on this rank: causal attention, kv head of query head h is h / G.
    let want = super::reference_attention(&super::causal(n), &q, &k, &v, &w);
    // Packed, two batches of the same documents in each sample: 5, 19 and 24 tokens (on 2 ranks no
    // document crosses a share and a ring sends nothing; on 3 and 4 blocks travel part of the way
    // and their accumulators go home from there), and 30 and 18 (on 4 ranks block 0 travels two
    // steps, so its accumulator comes home from two ranks away).
    let doc_sets = [vec![5i64, 19, 24], vec![30i64, 18]];
    let mut packings = Vec::new();
    for lengths in &doc_sets {
        let docs = Documents::from_lengths(n, &[lengths.clone(), lengths.clone()])?;
        let doc_of = Tensor::from_slice(
            &lengths.iter().enumerate().flat_map(|(i, &l)| vec![i as i64; l as usize]).collect::<Vec<_>>(),
        );
        let same_doc = doc_of.unsqueeze(1).eq_tensor(&doc_of.unsqueeze(0));
        let want = super::reference_attention(&super::causal(n).logical_and(&same_doc), &q, &k, &v, &w);
        packings.push((docs, want));
    }

    let packed_list: Vec<StrategyConfig> = list
        .iter()
        .copied()
        .filter(|s| matches!(s, StrategyConfig::Ring { .. } | StrategyConfig::Usp { .. }))
        .collect();
    let runs = list.into_iter().map(|s| (s, None)).chain(
        packed_list.iter().flat_map(|&s| (0..packings.len()).map(move |i| (s, Some(i)))).collect::<Vec<_>>(),
    );
    for (strategy, packing) in runs {
        let s = strategy.build(g, AttentionConfig::new(Kernel::Math, Mask::Causal), n, heads, kv_heads)?;
        let layout = s.layout().clone();
        let mine = |t: &Tensor| -> Result<Tensor> {
            Ok(layout.shard(t, 1, g.rank())?.copy().set_requires_grad(true))
        };
        let (qs, ks, vs) = (mine(&q)?, mine(&k)?, mine(&v)?);
        let tape = Tape::new();
        let o = s.forward_docs(&tape, &qs, &ks, &vs, packing.map(|i| &packings[i].0))?;
        let want = packing.map_or(&want, |i| &packings[i].1);
        tape.backward(&(&o * layout.shard(&w, 1, g.rank())?).sum(Kind::Double))?;
        // k and v gradients are sums over every rank's queries: each rank holds its tokens' part.
        for (name, got, full) in [
            ("out", o.detach(), &want[0]),
            ("dq", qs.grad(), &want[1]),
            ("dk", ks.grad(), &want[2]),
            ("dv", vs.grad(), &want[3]),
        ] {
            let slice = layout.shard(full, 1, g.rank())?;
            let diff = max_diff(&got, &slice);
            ensure!(
                diff < 1e-10,
                "{} P={p} documents {:?} {name}: max diff {diff:.3e}",
                strategy.label(),
                packing.map(|i| &doc_sets[i])
            );
        }
    }
    Ok(())
}

/// The GPT's loss and every parameter gradient with Ulysses and Megatron-SP against one device
/// (computed on this rank).
pub fn gpt(g: &Group) -> Result<()> {
    let p = g.size();
    let cfg = GptConfig { n_head: 8, n_kv_head: 8, n_embd: 64, ..GptConfig::tiny() };
    let (b, n) = (2i64, 32i64);
    let i = Tensor::arange(b * n, (Kind::Int64, Device::Cpu));
    let toks = ((&i * 7919 + 17).remainder(cfg.vocab_size)).reshape([b, n]);
    let labels = shift_labels(&toks)?;
    let attention = AttentionConfig::new(Kernel::Sdpa, Mask::Causal);
    // One device.
    let single = StrategyConfig::Single.build(&one_rank(g)?, attention, n, cfg.n_head, cfg.n_kv_head)?;
    let reference = Gpt::new(&cfg, single, Kind::Float, Device::Cpu)?;
    let want = reference.forward_backward(&toks, &labels)?;
    // Megatron-SP needs the 8 heads divisible by P.
    let strategies = if 8usize.is_multiple_of(p) {
        vec![StrategyConfig::Ulysses, StrategyConfig::MegatronSp]
    } else {
        vec![StrategyConfig::Ulysses]
    };
    for strategy in strategies {
        let s = strategy.build(g, attention, n, cfg.n_head, cfg.n_kv_head)?;
        let layout = s.layout().clone();
        let model = Gpt::new(&cfg, s, Kind::Float, Device::Cpu)?;
        let loss = model
            .forward_backward(&layout.shard(&toks, 1, g.rank())?, &layout.shard(&labels, 1, g.rank())?)?;
        // Rounding in another order: the bounds of the model's chain of sums in f32
        // (tests/common/tolerance.rs).
        let bounds = super::tolerance::gpt(&cfg, n, b * n, Kind::Float);
        let label = format!("{} P={p}", strategy.label());
        super::tolerance::check(
            &format!("{label}: loss"),
            (loss.value - want.value).abs(),
            bounds.loss * want.value,
        )?;
        for (mine, full) in model.params().all().iter().zip(reference.params().all()) {
            let w = match &mine.placement {
                Placement::Replicated => full.tensor.grad(),
                Placement::Sharded { dim, index } => {
                    full.tensor.grad().index_select(*dim, &Tensor::from_slice(index))
                }
            };
            let bound = bounds.grad * w.abs().max().double_value(&[]);
            super::tolerance::check(
                &format!("{label}: d{}", mine.name),
                max_diff(&mine.tensor.grad(), &w),
                bound,
            )?;
        }
    }
    Ok(())
}

/// A group of this rank alone (for single-device references).
fn one_rank(g: &Group) -> Result<Group> {
    g.split("self", Some(g.rank()), 0)?.ok_or_else(|| anyhow::anyhow!("no group of one"))
}

/// Started collectives (several in flight at once, waited for in another order) equal the
/// blocking ones, with overlap on and off; every strategy that overlaps (Ulysses' k, v
/// all-to-alls, ring's K/V and dK/dV shifts, USP) gives bit-identical outputs, gradients and
/// counted bytes with overlap on and off.
pub fn overlap(world: &Group) -> Result<()> {
    let (p, r) = (world.size(), world.rank());
    let pi = p as i64;
    for on in [true, false] {
        let g = world.clone().with_overlap(on);
        let label = |op: &str| format!("{op} started, P={p}, overlap {on}");
        let x = data(r, &[3, 4 * pi, 5], Kind::Float, false);
        let y = data(r + 7, &[2, 2], Kind::Double, true);
        let spec = AllToAll::new(1, 0, vec![4; p], vec![3; p]);
        let a = g.shift_start(&x, 1)?;
        let b = g.all_to_all_spec_start(&x, &spec)?;
        let c = g.shift_start(&y, -1)?;
        let (cy, bx, ax) = (c.wait()?, b.wait()?, a.wait()?);
        exact(&label("shift -1"), &cy, &g.shift(&y, -1)?)?;
        exact(&label("all_to_all"), &bx, &g.all_to_all_spec(&x, &spec)?)?;
        exact(&label("shift 1"), &ax, &g.shift(&x, 1)?)?;
    }
    let (b, n, heads, kv_heads, d) = (2i64, 16 * pi, 8i64, 2i64, 8i64);
    let (q, k, v, w) = (
        det(&[b, n, heads, d], 31, Kind::Float),
        det(&[b, n, kv_heads, d], 32, Kind::Float),
        det(&[b, n, kv_heads, d], 33, Kind::Float),
        det(&[b, n, heads, d], 34, Kind::Float),
    );
    let mut list = vec![
        StrategyConfig::Ulysses,
        StrategyConfig::Ring { zigzag: false },
        StrategyConfig::Ring { zigzag: true },
    ];
    if p.is_multiple_of(2) && p > 2 {
        list.push(StrategyConfig::Usp { ulysses: 2, zigzag: true });
    }
    for strategy in list {
        let mut runs: Vec<(Vec<Tensor>, u64)> = Vec::new();
        for on in [true, false] {
            let g = world.clone().with_overlap(on);
            let s =
                strategy.build(&g, AttentionConfig::new(Kernel::Sdpa, Mask::Causal), n, heads, kv_heads)?;
            let layout = s.layout().clone();
            let mine =
                |t: &Tensor| -> Result<Tensor> { Ok(layout.shard(t, 1, r)?.copy().set_requires_grad(true)) };
            let (qs, ks, vs) = (mine(&q)?, mine(&k)?, mine(&v)?);
            g.reset_rank_stats();
            let tape = Tape::new();
            let o = s.forward(&tape, &qs, &ks, &vs)?;
            tape.backward(&(&o * layout.shard(&w, 1, r)?).sum(Kind::Float))?;
            runs.push((vec![o.detach(), qs.grad(), ks.grad(), vs.grad()], g.rank_stats().bytes_sent()));
        }
        for (i, name) in ["out", "dq", "dk", "dv"].iter().enumerate() {
            exact(
                &format!("{} P={p} {name}, overlap on vs off", strategy.label()),
                &runs[0].0[i],
                &runs[1].0[i],
            )?;
        }
        ensure!(
            runs[0].1 == runs[1].1 && runs[0].1 > 0 || p == 1,
            "{} P={p}: {} bytes sent with overlap, {} without",
            strategy.label(),
            runs[0].1,
            runs[1].1
        );
    }
    Ok(())
}

/// The backend's own collectives (`on`: the world was launched with them, as NCCL runs on a
/// GPU; MPI's `native_collectives`): the group takes them exactly where it should (all-reduce;
/// reduce-scatter and all-gather over equal contiguous slabs; dtypes the backend has), and
/// their byte counts are the formula of the transfers they stand for. Integer-valued data give
/// exact sums in any order; rank-dependent fractions give every rank the same bits, within
/// `γ(P)·Σ|x|` of the f64 sum (P - 1 additions in some order, each rounding by at most u).
pub fn native(g: &Group, on: bool) -> Result<()> {
    let (p, r) = (g.size(), g.rank());
    let pi = p as i64;
    for kind in [Kind::Float, Kind::Double, Kind::Int64, Kind::Int, Kind::BFloat16] {
        let x = data(r, &[2 * pi + 1, 3], kind, true);
        let native = on && kind != Kind::BFloat16; // MPI has no bfloat16: the group's transfers
        let asked = g.runs_natively(&Collective::AllReduce { buf: &x, reduce: ReduceOp::Sum });
        ensure!(asked == native, "{kind:?}: runs natively {asked}, expected {native}");
        // A strided tensor is not one the library takes.
        let t = data(r, &[3, 4], kind, false);
        ensure!(
            !g.runs_natively(&Collective::AllReduce { buf: &t, reduce: ReduceOp::Sum }),
            "{kind:?} strided"
        );
        // all-reduce of 3(2P+1) elements: exact (integers), bytes of its two halves.
        g.reset_stats();
        let got = g.all_reduce(&x, ReduceOp::Sum)?;
        let all: Vec<Tensor> =
            (0..p).map(|j| data(j, &[2 * pi + 1, 3], kind, true).to_kind(Kind::Double)).collect();
        let want = Tensor::stack(&all, 0).sum_dim_intlist([0i64].as_slice(), false, Kind::Double);
        exact(&format!("all_reduce {kind:?}"), &got, &want.to_kind(kind))?;
        let n = x.numel() as i64;
        let mine = n / pi + i64::from((r as i64) < n % pi);
        let elems = (n - mine) + (pi - 1) * mine;
        let e = kind.elt_size_in_bytes() as u64;
        let c = g.stats().op(OpKind::AllReduce);
        ensure!(
            c.calls == 1 && c.bytes_sent == elems as u64 * e && c.bytes_received == elems as u64 * e,
            "all_reduce {kind:?} P={p}: {c:?}, expected {elems} elements each way"
        );
        if kind == Kind::BFloat16 {
            continue;
        }
        // reduce-scatter and all-gather over dim 0 (equal slabs): exact, bytes as formula.
        g.reset_stats();
        let xs = data(r, &[2 * pi, 3], kind, true);
        let rs = g.reduce_scatter(&xs, 0, ReduceOp::Sum)?;
        let alls: Vec<Tensor> =
            (0..p).map(|j| data(j, &[2 * pi, 3], kind, true).to_kind(Kind::Double)).collect();
        let sum = Tensor::stack(&alls, 0).sum_dim_intlist([0i64].as_slice(), false, Kind::Double);
        exact(&format!("reduce_scatter {kind:?}"), &rs, &sum.narrow(0, 2 * r as i64, 2).to_kind(kind))?;
        let gathered = g.all_gather(&rs, 0)?;
        exact(&format!("all_gather {kind:?}"), &gathered, &sum.to_kind(kind))?;
        let (rsc, agc) = (g.stats().op(OpKind::ReduceScatter), g.stats().op(OpKind::AllGather));
        let part = 6 * e * (p as u64 - 1); // 2 rows of 3 from or to each other rank
        ensure!(
            rsc.bytes_sent == part
                && rsc.bytes_received == part
                && agc.bytes_sent == part
                && agc.bytes_received == part,
            "{kind:?} P={p}: reduce-scatter {rsc:?}, all-gather {agc:?}, expected {part} bytes each way"
        );
        // ZeRO's all-gather into the buffer whose view at this rank's place is the input.
        let flat = Tensor::zeros([4 * pi], (kind, Device::Cpu));
        let part_view = flat.narrow(0, 4 * r as i64, 4);
        part_view.shallow_clone().copy_(&data(r, &[4], kind, true));
        g.all_gather_into(&part_view, &flat, 0, &vec![4; p])?;
        let each: Vec<Tensor> = (0..p).map(|j| data(j, &[4], kind, true)).collect();
        exact(&format!("all_gather_into in place {kind:?}"), &flat, &Tensor::cat(&each, 0))?;
        if matches!(kind, Kind::Float | Kind::Double) {
            // Avg and Max.
            let avg = g.all_reduce(&x, ReduceOp::Avg)?;
            let max = g.all_reduce(&x, ReduceOp::Max)?;
            let want_max = Tensor::stack(&all, 0).amax([0i64].as_slice(), false).to_kind(kind);
            exact(&format!("all_reduce max {kind:?}"), &max, &want_max)?;
            let want_avg = (want.shallow_clone() / p as f64).to_kind(kind);
            // Sum exact, one division: correctly rounded on both paths.
            exact(&format!("all_reduce avg {kind:?}"), &avg, &want_avg)?;
            // Fractions: every rank the same bits, within gamma(P) sum|x| of the f64 sum.
            let frac = |j: usize| {
                (Tensor::arange(97, (Kind::Double, Device::Cpu)) * (0.37 + j as f64) / 7.0)
                    .sin()
                    .to_kind(kind)
            };
            let got = g.all_reduce(&frac(r), ReduceOp::Sum)?;
            let every = g.all_gather(&got.unsqueeze(0), 0)?;
            for j in 0..p {
                ensure!(
                    every.get(j as i64).equal(&got),
                    "{kind:?}: rank {j}'s all-reduce differs from rank {r}'s"
                );
            }
            let fs: Vec<Tensor> = (0..p).map(|j| frac(j).to_kind(Kind::Double)).collect();
            let stack = Tensor::stack(&fs, 0);
            let exact_sum = stack.sum_dim_intlist([0i64].as_slice(), false, Kind::Double);
            let abs_sum = stack.abs().sum_dim_intlist([0i64].as_slice(), false, Kind::Double);
            let u = if kind == Kind::Float { f64::from(f32::EPSILON) / 2.0 } else { f64::EPSILON / 2.0 };
            let gamma = (p as f64 * u) / (1.0 - p as f64 * u);
            let err = (got.to_kind(Kind::Double) - &exact_sum).abs() - abs_sum * gamma;
            let worst = err.max().double_value(&[]);
            ensure!(worst <= 0.0, "{kind:?} P={p}: all-reduce beyond gamma(P) sum|x| by {worst:.3e}");
        }
    }
    g.barrier()?;
    Ok(())
}
