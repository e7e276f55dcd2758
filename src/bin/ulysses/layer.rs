//! `ulysses layer`: one attention layer of any strategy from and to safetensors files, so that
//! any other implementation (a PyTorch script: scripts/compare_layer.py) can check it. Packed
//! documents come as a `cu_seqlens` tensor in the input file (FlashAttention's varlen
//! convention: one flat list of offsets over the b x N tokens).

use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use tch::{Kind, Tensor};
use ulysses::attention::{check_finite, Documents, Sharding};
use ulysses::autograd::Tape;
use ulysses::comm::launch;

use crate::args::AttentionArgs;

#[derive(clap::Args)]
pub struct LayerArgs {
    /// The safetensors file with q, k, v (and grad_out; cu_seqlens for packed documents).
    #[arg(long)]
    input: PathBuf,
    /// Where to write out, grad_q, grad_k, grad_v (and lse).
    #[arg(long)]
    output: PathBuf,
    /// Ranks (threads).
    #[arg(long, default_value_t = 4)]
    ranks: usize,
    #[command(flatten)]
    attention: AttentionArgs,
    /// Also write `lse` [b, N, H]: the log-sum-exp of every attention row, in f32 (f64 for f64).
    #[arg(long)]
    lse: bool,
}

/// The named tensors of the input file.
struct Inputs {
    q: Tensor,
    k: Tensor,
    v: Tensor,
    grad_out: Option<Tensor>,
    /// Packed documents, from `cu_seqlens`.
    docs: Option<Documents>,
}

/// Checks that a safetensors file holds all the bytes its header describes: an 8-byte header
/// length, the JSON header, then the tensors' data up to the largest `data_offsets` end.
fn check_length(path: &Path) -> Result<()> {
    use std::io::Read;
    let mut file = std::fs::File::open(path).with_context(|| format!("reading {}", path.display()))?;
    let have = file.metadata()?.len();
    let mut len = [0u8; 8];
    let header_len = match file.read_exact(&mut len) {
        Ok(()) => u64::from_le_bytes(len),
        Err(_) => bail!("{} holds {have} bytes: too short for a safetensors file", path.display()),
    };
    if have < 8 + header_len {
        bail!(
            "{} is truncated or not a safetensors file: its header should take {header_len} bytes, the file \
             holds {have}",
            path.display()
        );
    }
    let mut header = vec![0u8; header_len as usize];
    file.read_exact(&mut header)?;
    let json: serde_json::Value = serde_json::from_slice(&header).with_context(|| {
        format!("{} has a header that is not JSON: not a safetensors file", path.display())
    })?;
    let data_end = json
        .as_object()
        .into_iter()
        .flatten()
        .filter_map(|(_, t)| t.get("data_offsets")?.get(1)?.as_u64())
        .max()
        .unwrap_or(0);
    if have < 8 + header_len + data_end {
        bail!(
            "{} is truncated: its tensors need {data_end} bytes after the header, the file holds {}",
            path.display(),
            have - 8 - header_len
        );
    }
    Ok(())
}

fn read(path: &Path) -> Result<Inputs> {
    check_length(path)?;
    let named = Tensor::read_safetensors(path).with_context(|| format!("reading {}", path.display()))?;
    let take = |name: &str| named.iter().find(|(n, _)| n == name).map(|(_, t)| t.shallow_clone());
    let (q, k, v, grad_out) = (take("q"), take("k"), take("v"), take("grad_out"));
    let cu_seqlens = take("cu_seqlens");
    let names: Vec<&str> = named.iter().map(|(n, _)| n.as_str()).collect();
    let (q, k, v) = match (q, k, v) {
        (Some(q), Some(k), Some(v)) => (q, k, v),
        _ => bail!(
            "{} must hold tensors q, k and v (and optionally grad_out, cu_seqlens); it holds {names:?}",
            path.display()
        ),
    };
    let (qs, ks) = (q.size(), k.size());
    ensure!(qs.len() == 4 && ks.len() == 4, "q {qs:?} and k {ks:?} must be [b, N, heads, d]");
    ensure!(v.size() == ks, "v {:?} must have k's shape {ks:?}", v.size());
    ensure!(
        qs[0] == ks[0] && qs[1] == ks[1] && qs[3] == ks[3],
        "q {qs:?} and k {ks:?} must agree on b, N and d"
    );
    let mut named = vec![("q", &q), ("k", &k), ("v", &v)];
    if let Some(g) = &grad_out {
        ensure!(g.size() == qs, "grad_out {:?} must have q's shape {qs:?}", g.size());
        named.push(("grad_out", g));
    }
    for (name, t) in &named {
        ensure!(
            t.kind() == q.kind()
                && matches!(t.kind(), Kind::Float | Kind::Double | Kind::BFloat16 | Kind::Half),
            "{name} is {:?}: q, k, v and grad_out must share one floating-point dtype (q is {:?})",
            t.kind(),
            q.kind()
        );
    }
    check_finite("layer", &named)?;
    // Packed documents: one flat cu_seqlens over the b x N tokens (i32 or i64, 1-D).
    let docs = match cu_seqlens {
        None => None,
        Some(cu) => {
            ensure!(
                cu.dim() == 1 && matches!(cu.kind(), Kind::Int | Kind::Int64),
                "cu_seqlens must be a 1-D i32 or i64 tensor of offsets over the b x N tokens, got {:?} {:?}",
                cu.kind(),
                cu.size()
            );
            let flat = Vec::<i64>::try_from(cu.to_kind(Kind::Int64))?;
            Some(Documents::from_flat(qs[1], qs[0], &flat).with_context(|| format!("{}", path.display()))?)
        }
    };
    Ok(Inputs { q, k, v, grad_out, docs })
}

pub fn run(a: &LayerArgs) -> Result<()> {
    let x = read(&a.input)?;
    let (qs, ks) = (x.q.size(), x.k.size());
    let (n, heads, kv_heads) = (qs[1], qs[2], ks[2]);
    let attention = a.attention.config();
    // Every refusal (layout, heads, kernel and mask) before any rank starts.
    a.attention.strategy.check(n, a.ranks, heads, kv_heads)?;
    attention.build()?;
    if let Some(d) = &x.docs {
        d.check("layer", qs[0], n, &a.attention.mask)?;
    }
    println!(
        "{} on {} ranks: q {qs:?}, k/v {ks:?}, {:?}, kernel {:?}, mask {:?}{}",
        a.attention.strategy.label(),
        a.ranks,
        x.q.kind(),
        a.attention.kernel,
        a.attention.mask,
        x.docs.as_ref().map_or(String::new(), |d| {
            let counts: Vec<usize> = (0..d.samples()).map(|s| d.lengths(s).len()).collect();
            format!(", packed documents per sample {counts:?}")
        })
    );

    let per_rank = launch(a.ranks, |ctx| -> Result<(Vec<Tensor>, u64, Sharding)> {
        let r = ctx.rank();
        // Each rank reads the file and keeps its own share, as ranks of a real job would.
        let x = read(&a.input)?;
        let s = a.attention.strategy.build(ctx.world(), attention, n, heads, kv_heads)?;
        let sharding = s.sharding();
        let mine =
            |t: &Tensor| -> Result<Tensor> { Ok(sharding.shard(t, r)?.copy().set_requires_grad(true)) };
        let (q, k, v) = (mine(&x.q)?, mine(&x.k)?, mine(&x.v)?);
        let tape = Tape::new();
        let out = s.forward_docs(&tape, &q, &k, &v, x.docs.as_ref())?;
        // The gradient of sum(out * grad_out) with respect to out is grad_out (summed in f32
        // for half types, which f32 holds exactly, and in f64 for f64).
        let acc = if out.kind() == Kind::Double { Kind::Double } else { Kind::Float };
        let loss = match &x.grad_out {
            Some(g) => (out.to_kind(acc) * sharding.shard(g, r)?.to_kind(acc)).sum(acc),
            None => out.to_kind(acc).sum(acc),
        };
        tape.backward(&loss)?;
        let sent = ctx.world().rank_stats().bytes_sent();
        let mut tensors = vec![out.detach(), q.grad(), k.grad(), v.grad()];
        if a.lse {
            let (q, k, v) = (q.detach(), k.detach(), v.detach());
            tensors.push(s.forward_lse_docs(&q, &k, &v, x.docs.as_ref())?.1);
        }
        Ok((tensors, sent, sharding))
    })?;

    let sharding = &per_rank[0].2;
    let mut names = vec!["out", "grad_q", "grad_k", "grad_v"];
    if a.lse {
        names.push("lse");
    }
    let mut gathered = Vec::new();
    for (i, name) in names.iter().enumerate() {
        let parts: Vec<Tensor> = per_rank.iter().map(|(t, ..)| t[i].shallow_clone()).collect();
        gathered.push((*name, sharding.unshard(&parts)?));
    }
    // Never a silently wrong file: finite inputs whose scores overflow the dtype, or a bug.
    for (name, t) in &gathered {
        check_finite("layer", &[(name, t)]).with_context(|| {
            format!(
                "{} computed a non-finite {name} from finite inputs; nothing written",
                a.attention.strategy.label()
            )
        })?;
    }
    Tensor::write_safetensors(&gathered, &a.output)
        .with_context(|| format!("writing {}", a.output.display()))?;
    for (r, (_, sent, _)) in per_rank.iter().enumerate() {
        println!(
            "rank {r}: sent {sent} B (forward and backward{})",
            if a.lse { ", and the lse pass" } else { "" }
        );
    }
    println!("wrote {} ({})", a.output.display(), names.join(", "));
    Ok(())
}
