//! Attention on the GPU: Ulysses in bf16 against f64 on the CPU, and ring attention's blocks on
//! the flash kernel against SDPA on the whole sequence.

use std::time::Instant;

use anyhow::{ensure, Result};
use tch::{Device, Kind, Tensor};
use ulysses::attention::{AttentionConfig, Kernel, Mask, RingAttention, SequenceParallel, UlyssesAttention};
use ulysses::autograd::Tape;
use ulysses::comm::launch;

use crate::{common, sync, GPU};

/// The largest difference between `got` and `want` relative to `want`'s largest magnitude.
fn relative(got: &Tensor, want: &Tensor) -> f64 {
    let (got, want) = (got.to_kind(Kind::Double).to(Device::Cpu), want.to_kind(Kind::Double).to(Device::Cpu));
    common::max_diff(&got, &want) / want.abs().max().double_value(&[]).max(1e-6)
}

/// Ulysses on P thread ranks on the GPU in bf16 against f64 attention on the CPU.
pub fn ulysses_bf16(p: usize) -> Result<String> {
    let (b, n, h, hkv, d) = (2i64, 512i64, 8i64, 2i64, 64i64);
    let inputs = || {
        (
            common::det(&[b, n, h, d], 1, Kind::BFloat16),
            common::det(&[b, n, hkv, d], 2, Kind::BFloat16),
            common::det(&[b, n, hkv, d], 3, Kind::BFloat16),
            common::det(&[b, n, h, d], 4, Kind::BFloat16),
        )
    };
    let (q, k, v, w) = inputs();
    // The reference, f64 on the CPU.
    let want = common::reference_attention(&common::causal(n), &q, &k, &v, &w);
    let per_rank = launch(p, |ctx| -> Result<[Tensor; 4]> {
        let r = ctx.rank();
        let (q, k, v, w) = inputs();
        let attn = UlyssesAttention::new(
            ctx.world().clone(),
            AttentionConfig::new(Kernel::Sdpa, Mask::Causal).build()?,
            n,
            h,
            hkv,
        )?;
        let layout = attn.layout().clone();
        let mine =
            |t: &Tensor| -> Result<Tensor> { Ok(layout.shard(t, 1, r)?.to(GPU).set_requires_grad(true)) };
        let (qs, ks, vs) = (mine(&q)?, mine(&k)?, mine(&v)?);
        let tape = Tape::new();
        let o = attn.forward(&tape, &qs, &ks, &vs)?;
        tape.backward(
            &(o.to_kind(Kind::Float) * layout.shard(&w, 1, r)?.to(GPU).to_kind(Kind::Float)).sum(Kind::Float),
        )?;
        Ok([
            o.detach().to(Device::Cpu),
            qs.grad().to(Device::Cpu),
            ks.grad().to(Device::Cpu),
            vs.grad().to(Device::Cpu),
        ])
    })?;
    let mut worst = 0.0f64;
    for (i, full) in want.iter().enumerate() {
        let got = Tensor::cat(&per_rank.iter().map(|t| t[i].shallow_clone()).collect::<Vec<_>>(), 1);
        worst = worst.max(relative(&got, full));
    }
    ensure!(worst < 2e-2, "P={p}: max relative difference {worst:.3e} > 2e-2");
    Ok(format!("out, dq, dk, dv within {worst:.2e} (relative) of f64, causal, GQA 8/2, N={n}"))
}

/// Out, dq, dk, dv of causal SDPA on the whole sequence (`[b, N, H, d]` inputs in `kind`, on
/// the GPU), and the median seconds of its forward + backward.
fn sdpa(q: &Tensor, k: &Tensor, v: &Tensor, w: &Tensor, kind: Kind) -> Result<([Tensor; 4], f64)> {
    let leaf = |t: &Tensor| t.to_kind(kind).to(GPU).set_requires_grad(true);
    let (q, k, v) = (leaf(q), leaf(k), leaf(v));
    let w = w.to(GPU).to_kind(Kind::Float);
    let run = || -> Result<Tensor> {
        // [b, N, H, d] -> [b, H, N, d] and back
        let o = Tensor::f_scaled_dot_product_attention::<Tensor>(
            &q.transpose(1, 2),
            &k.transpose(1, 2),
            &v.transpose(1, 2),
            None,
            0.0,
            true,
            None,
            false,
        )?
        .transpose(1, 2);
        (o.to_kind(Kind::Float) * &w).sum(Kind::Float).f_backward()?;
        Ok(o)
    };
    let seconds = crate::time(5, || {
        for t in [&q, &k, &v] {
            let _ = t.grad().f_zero_();
        }
        run().map(|_| ())
    })?;
    for t in [&q, &k, &v] {
        let _ = t.grad().f_zero_();
    }
    let o = run()?;
    Ok(([o.detach(), q.grad(), k.grad(), v.grad()], seconds))
}

/// Makes q, k, v and the output weights `[b, N, H, d]` (f32, CPU), the same on every call.
type Inputs<'a> = dyn Fn() -> (Tensor, Tensor, Tensor, Tensor) + Sync + 'a;

/// Ring attention (zigzag) on `p` thread ranks sharing the GPU, inputs in `kind`: every rank's
/// (out, dq, dk, dv) for its tokens, and the median seconds of a forward + backward (all ranks,
/// which share the GPU, so the time is the whole sequence's work).
fn ring(p: usize, inputs: &'_ Inputs<'_>, kind: Kind) -> Result<(Vec<[Tensor; 4]>, f64)> {
    let per_rank = launch(p, |ctx| -> Result<([Tensor; 4], f64)> {
        let (q, k, v, w) = &inputs();
        let (n, h, hkv) = (q.size()[1], q.size()[2], k.size()[2]);
        let (world, r) = (ctx.world().clone(), ctx.rank());
        let attn = RingAttention::new(world.clone(), Mask::Causal, n, h, hkv, true)?;
        let layout = attn.layout().clone();
        let mine = |t: &Tensor| -> Result<Tensor> {
            Ok(layout.shard(t, 1, r)?.to_kind(kind).to(GPU).set_requires_grad(true))
        };
        let (qs, ks, vs) = (mine(q)?, mine(k)?, mine(v)?);
        let ws = layout.shard(w, 1, r)?.to(GPU).to_kind(Kind::Float);
        let step = || -> Result<Tensor> {
            for t in [&qs, &ks, &vs] {
                let _ = t.grad().f_zero_();
            }
            let tape = Tape::new();
            let o = attn.forward(&tape, &qs, &ks, &vs)?;
            tape.backward(&(o.to_kind(Kind::Float) * &ws).sum(Kind::Float))?;
            Ok(o)
        };
        let _ = step()?;
        let mut times = Vec::new();
        for _ in 0..5 {
            world.barrier()?;
            sync();
            let t0 = Instant::now();
            let _ = step()?;
            sync();
            world.barrier()?;
            times.push(t0.elapsed().as_secs_f64());
        }
        times.sort_by(f64::total_cmp);
        let o = step()?;
        Ok(([o.detach(), qs.grad(), ks.grad(), vs.grad()], times[times.len() / 2]))
    })?;
    let seconds = per_rank.iter().map(|(_, t)| *t).fold(0.0, f64::max);
    Ok((per_rank.into_iter().map(|(t, _)| t).collect(), seconds))
}

/// Ring attention's blocks on the flash kernel (bf16) against SDPA on the whole sequence:
/// parity of out, dq, dk, dv against an f32 reference, and the time of a forward + backward
/// against SDPA (bf16, flash) and against ring's math path (f32).
pub fn ring_flash(p: usize, n: i64) -> Result<String> {
    let (b, h, d) = (1i64, 16i64, 128i64);
    let inputs = move || {
        (
            common::det(&[b, n, h, d], 11, Kind::Float),
            common::det(&[b, n, h, d], 12, Kind::Float),
            common::det(&[b, n, h, d], 13, Kind::Float),
            common::det(&[b, n, h, d], 14, Kind::Float),
        )
    };
    let (q, k, v, w) = inputs();
    let (want, _) = sdpa(&q, &k, &v, &w, Kind::Float)?;
    let (sdpa_bf16, t_sdpa) = sdpa(&q, &k, &v, &w, Kind::BFloat16)?;
    let (flash, t_flash) = ring(p, &inputs, Kind::BFloat16)?;
    let (_, t_math) = ring(p, &inputs, Kind::Float)?;
    let layout = ulysses::attention::SeqLayout::zigzag(n, p)?;
    let (mut worst_ring, mut worst_sdpa) = (0.0f64, 0.0f64);
    for i in 0..4 {
        worst_sdpa = worst_sdpa.max(relative(&sdpa_bf16[i], &want[i]));
        for (r, got) in flash.iter().enumerate() {
            worst_ring = worst_ring.max(relative(&got[i], &layout.shard(&want[i], 1, r)?));
        }
    }
    ensure!(worst_ring < 2e-2, "ring (flash blocks, bf16): max relative difference {worst_ring:.3e} > 2e-2");
    Ok(format!(
        "zigzag P={p} on one GPU, H={h}, d={d}, N={n}, causal: out, dq, dk, dv within {worst_ring:.2e} of f32 \
         (SDPA bf16: {worst_sdpa:.2e}); fwd+bwd {:.2} ms vs SDPA bf16 {:.2} ms ({:.2}x) vs ring math f32 {:.2} ms ({:.2}x)",
        t_flash * 1e3,
        t_sdpa * 1e3,
        t_flash / t_sdpa,
        t_math * 1e3,
        t_math / t_flash
    ))
}
