//! `ulysses layer`: one Ulysses attention layer from and to safetensors files.

use std::path::Path;

use anyhow::{bail, ensure, Context, Result};
use tch::{Kind, Tensor};
use ulysses::attention::{AttentionConfig, Kernel, Mask, SequenceParallel, UlyssesAttention};
use ulysses::autograd::Tape;
use ulysses::comm::{launch, OpKind};

/// The named tensors of the input file.
struct Inputs {
    q: Tensor,
    k: Tensor,
    v: Tensor,
    grad_out: Option<Tensor>,
}

fn read(path: &Path) -> Result<Inputs> {
    let named = Tensor::read_safetensors(path).with_context(|| format!("reading {}", path.display()))?;
    let take = |name: &str| named.iter().find(|(n, _)| n == name).map(|(_, t)| t.shallow_clone());
    let (q, k, v, grad_out) = (take("q"), take("k"), take("v"), take("grad_out"));
    let names: Vec<&str> = named.iter().map(|(n, _)| n.as_str()).collect();
    match (q, k, v) {
        (Some(q), Some(k), Some(v)) => Ok(Inputs { q, k, v, grad_out }),
        _ => bail!(
            "{} must hold tensors q, k and v (and optionally grad_out); it holds {names:?}",
            path.display()
        ),
    }
}

pub fn run(input: &Path, output: &Path, p: usize, kernel: Kernel, mask: Mask) -> Result<()> {
    let x = read(input)?;
    let (qs, ks) = (x.q.size(), x.k.size());
    ensure!(qs.len() == 4 && ks.len() == 4, "q {qs:?} and k {ks:?} must be [b, N, heads, d]");
    ensure!(x.v.size() == ks, "v {:?} must have k's shape {ks:?}", x.v.size());
    if let Some(g) = &x.grad_out {
        ensure!(g.size() == qs, "grad_out {:?} must have q's shape {qs:?}", g.size());
    }
    let (n, heads, kv_heads) = (qs[1], qs[2], ks[2]);
    let attention = AttentionConfig::new(kernel, mask);
    println!(
        "Ulysses layer on {p} ranks: q {qs:?}, k/v {ks:?}, {:?}, kernel {kernel:?}, mask {mask:?}",
        x.q.kind()
    );

    let per_rank = launch(p, |ctx| -> Result<([Tensor; 4], u64)> {
        let r = ctx.rank();
        // Each rank reads the file and keeps its own tokens, as ranks of a real job would.
        let x = read(input)?;
        let attn = UlyssesAttention::new(ctx.world().clone(), attention.build()?, n, heads, kv_heads)?;
        let layout = attn.layout().clone();
        let mine =
            |t: &Tensor| -> Result<Tensor> { Ok(layout.shard(t, 1, r)?.copy().set_requires_grad(true)) };
        let (q, k, v) = (mine(&x.q)?, mine(&x.k)?, mine(&x.v)?);
        let tape = Tape::new();
        let out = attn.forward(&tape, &q, &k, &v)?;
        // The gradient of sum(out * grad_out) with respect to out is grad_out (summed in f32
        // for half types, which f32 holds exactly, and in f64 for f64).
        let acc = if out.kind() == Kind::Double { Kind::Double } else { Kind::Float };
        let loss = match &x.grad_out {
            Some(g) => (out.to_kind(acc) * layout.shard(g, 1, r)?.to_kind(acc)).sum(acc),
            None => out.to_kind(acc).sum(acc),
        };
        tape.backward(&loss)?;
        let sent = ctx.world().stats().op(OpKind::AllToAll).bytes_sent;
        Ok(([out.detach(), q.grad(), k.grad(), v.grad()], sent))
    })?;

    let names = ["out", "grad_q", "grad_k", "grad_v"];
    let gathered: Vec<(&str, Tensor)> = names
        .iter()
        .enumerate()
        .map(|(i, name)| {
            (*name, Tensor::cat(&per_rank.iter().map(|(t, _)| t[i].shallow_clone()).collect::<Vec<_>>(), 1))
        })
        .collect();
    Tensor::write_safetensors(&gathered, output).with_context(|| format!("writing {}", output.display()))?;
    for (r, (_, sent)) in per_rank.iter().enumerate() {
        println!("rank {r}: sent {sent} B in all-to-alls (forward and backward)");
    }
    println!("wrote {} ({})", output.display(), names.join(", "));
    Ok(())
}
