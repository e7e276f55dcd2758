//! Chunked Ulysses (FPDT, "Fully Pipelined Distributed Transformer", Yao et al. 2024; released as
//! DeepSpeed's Ulysses-Offload): Ulysses' all-to-alls on `u` chunks of each rank's sequence, one
//! after the other, and attention chunk by chunk, so that the all-to-all buffers and the
//! attention's working set are those of one chunk.
//!
//! The sequence is cut into `u P` equal pieces; rank r holds pieces `c P + r` (a strided
//! layout), so that chunk c of every rank, gathered in rank order, is the contiguous segment c
//! of the sequence. Per layer and chunk c:
//!
//! ```text
//! q_c [b, N/(uP), H, d], k_c, v_c [b, N/(uP), H_kv, d]     chunk c of this rank's tokens
//!   | all-to-all: scatter heads, gather sequence (as Ulysses, on a u-th of the tokens)
//! q_c [b, N/u, H_r, d], k_c, v_c [b, N/u, KV_r, d]         segment c of the sequence, this rank's heads
//!   | attention of q_c over every key segment c' it sees (c' <= c when causal), merged by
//!   | log-sum-exp in f32 (blockwise, as ring attention merges its blocks)
//! o_c [b, N/u, H_r, d]
//!   | all-to-all back
//! o_c [b, N/(uP), H, d]
//! ```
//!
//! The backward visits the query chunks in reverse order and recomputes each pair's
//! probabilities from the saved output and log-sum-exp (no `[N/u, N/u]` matrix is kept). Bytes:
//! exactly Ulysses' (the same tensors cross the same all-to-alls, a u-th at a time) in u times the
//! messages. The chunks' all-to-alls are issued chunk by chunk but recorded on the tape as one op
//! (their inputs are slices of the same projection).
//!
//! With an offload store ([`ChunkedUlysses::with_offload`]; FPDT keeps the chunks' K/V in host
//! memory) each chunk's K/V leaves the device once the layer's forward is done and comes back
//! in the backward, which takes the key chunks last first, each once, the one before it on its
//! way meanwhile (double-buffered), and the query chunks that see it. What is not FPDT's yet: the
//! forward runs every chunk's all-to-alls before its attention, so it holds all chunks' K/V at
//! once (FPDT streams them, fetching the older ones back per query chunk).

use std::cell::Cell;
use std::rc::Rc;

use tch::Tensor;

use super::blockwise::{heads_first, merge, pair_visible, Blockwise};
use super::flash::block_layout;
use super::single::check_shapes;
use super::{compute_kind, Documents, HeadPlan, Mask, SeqLayout, SequenceParallel, Work};
use crate::autograd::Tape;
use crate::comm::{AllToAll, Group};
use crate::device::Offload;
use crate::error::TorchResultExt;
use crate::{Error, Result};

const OP: &str = "chunked_ulysses";

/// Ulysses over `u` chunks of each rank's sequence.
pub struct ChunkedUlysses {
    group: Group,
    mask: Mask,
    layout: SeqLayout,
    heads: HeadPlan,
    chunks: usize,
    /// Tokens of one piece: N / (u P).
    piece: i64,
    q_a2a: AllToAll,
    kv_a2a: AllToAll,
    work: Cell<Work>,
    /// Where each chunk's K/V waits between the forward and the backward (FPDT's offload);
    /// `None`: on the device.
    offload: Option<Rc<Offload>>,
    /// Forwards recorded so far: each one's chunks are stored under keys of its own.
    calls: Cell<usize>,
}

impl ChunkedUlysses {
    /// Chunked Ulysses over `group` for sequences of `n` tokens in `chunks` chunks per rank,
    /// attention computed blockwise under `mask`. `n` must split into `chunks x P` equal pieces
    /// (each rank's sequence a multiple of `chunks`); the heads as for Ulysses.
    pub fn new(
        group: Group,
        mask: Mask,
        n: i64,
        heads: i64,
        kv_heads: i64,
        chunks: usize,
    ) -> Result<ChunkedUlysses> {
        let p = group.size();
        let pi = p as i64;
        Self::check(n, p, chunks).map_err(|e| match e {
            Error::InvalidArgument { op, msg, .. } => {
                Error::InvalidArgument { op, group: group.info().to_string(), msg }
            }
            other => other,
        })?;
        let layout = SeqLayout::strided(n, p, chunks)?;
        let plan = HeadPlan::new(heads, kv_heads, p)?;
        let piece = n / (pi * chunks as i64);
        let q_a2a = AllToAll::new(2, 1, plan.q_split().to_vec(), vec![piece; p]);
        let kv_a2a = AllToAll::new(2, 1, plan.kv_split(), vec![piece; p]);
        Ok(ChunkedUlysses {
            group,
            mask,
            layout,
            heads: plan,
            chunks,
            piece,
            q_a2a,
            kv_a2a,
            work: Cell::new(Work::default()),
            offload: None,
            calls: Cell::new(0),
        })
    }

    /// Whether `n` tokens split into `chunks` equal chunks on each of `p` ranks: the error if
    /// not.
    pub fn check(n: i64, p: usize, chunks: usize) -> Result<()> {
        let pi = p as i64;
        if p == 0 || chunks == 0 || n % pi != 0 || (n / pi) % chunks as i64 != 0 {
            let local = if p > 0 && n % pi == 0 {
                format!("the local sequence N/P = {}", n / pi)
            } else {
                format!("N = {n} (not a multiple of P = {p})")
            };
            return Err(Error::InvalidArgument {
                op: OP,
                group: format!("{p} ranks"),
                msg: format!("{chunks} chunk(s) per rank: {local} must split into {chunks} equal chunks"),
            });
        }
        Ok(())
    }

    /// Moves each chunk's K/V (as the core keeps them for its backward: expanded to the query
    /// heads, in the accumulation dtype's layout) into `store` once the forward is done, and back
    /// one chunk at a time, the next one coming while this one is used, in the backward (FPDT's
    /// offload; on a recording tape).
    pub fn with_offload(mut self, store: Offload) -> ChunkedUlysses {
        self.offload = Some(Rc::new(store));
        self
    }

    /// The offload store, if any.
    pub fn offload(&self) -> Option<&Offload> {
        self.offload.as_deref()
    }

    /// Chunks per rank.
    pub fn chunks(&self) -> usize {
        self.chunks
    }

    /// Attention work this rank did in the last forward (per head and sample).
    pub fn last_forward_work(&self) -> Work {
        self.work.get()
    }

    /// Segment c of the sequence: (first position, length).
    fn segment(&self, c: usize) -> (i64, i64) {
        let len = self.piece * self.group.size() as i64;
        (c as i64 * len, len)
    }

    fn check_docs(&self, q: &Tensor, docs: Option<&Documents>) -> Result<()> {
        match docs {
            Some(d) => {
                d.refuse_layout(OP)?;
                d.check(OP, q.size()[0], self.layout.global_len(), &self.mask)
            }
            None => Ok(()),
        }
    }

    /// Attention of every query chunk over the key chunks it sees, as one taped op with a
    /// hand-written backward.
    ///
    /// # Shapes
    /// `chunks`: u x [q, k, v], each `[b, N/u, H_r, d]` -> u x `[b, N/u, H_r, d]`.
    fn core(&self, tape: &Tape, chunks: &[[Tensor; 3]], docs: Option<&Documents>) -> Result<Vec<Tensor>> {
        let u = self.chunks;
        let d = chunks[0][0].size()[3];
        let scale = 1.0 / (d as f64).sqrt();
        let segments: Vec<(i64, i64)> = (0..u).map(|c| self.segment(c)).collect();
        let inputs: Vec<&Tensor> = (0..3).flat_map(|i| chunks.iter().map(move |c| &c[i])).collect();
        let saved: Rc<Cell<Option<Saved>>> = Rc::default();
        let keep = Rc::clone(&saved);
        let (mask, docs_f) = (self.mask, docs);
        let (seg_f, seg_b) = (segments.clone(), segments);
        let docs_b = docs.cloned();
        // With offload (and a backward to come), this call's chunks go under keys of its own.
        let store = self.offload.clone().filter(|_| tape.is_recording());
        let base = self.calls.replace(self.calls.get() + 1) * u;
        let store_f = store.clone();
        let outs = tape.record(
            OP,
            &inputs,
            |xs| {
                let (q, k, v) = (&xs[..u], &xs[u..2 * u], &xs[2 * u..]);
                let attn = Blockwise { mask: &mask, docs: docs_f, scale, fused: true };
                let lay = |t: &[Tensor]| t.iter().map(block_layout).collect::<Result<Vec<_>>>();
                let (qh, kh, vh) = (lay(q)?, lay(k)?, lay(v)?);
                let (mut out, mut lse, mut work) = (Vec::new(), Vec::new(), Work::default());
                for (c, qc) in qh.iter().enumerate() {
                    let (o, l, w) = attend_chunk(&attn, qc, &kh, &vh, c, &seg_f)?;
                    work += w;
                    out.push(o);
                    lse.push(l);
                }
                self.work.set(work);
                // [b, H_r, N/u, d] -> [b, N/u, H_r, d], in the inputs' dtype
                let results = out
                    .iter()
                    .map(|o| o.f_transpose(1, 2).and_then(|t| t.f_to_kind(q[0].kind())).op(OP))
                    .collect::<Result<Vec<_>>>()?;
                let own =
                    |t: &[Tensor]| t.iter().map(|x| x.f_contiguous().op(OP)).collect::<Result<Vec<_>>>();
                let kv = match &store_f {
                    None => Kv::Here(own(k)?, own(v)?),
                    Some(s) => {
                        for c in 0..u {
                            // [b, N/u, H_r, d] x 2 -> [2, b, N/u, H_r, d]: one transfer a chunk
                            s.put(base + c, &Tensor::f_stack(&[&k[c], &v[c]], 0).op(OP)?)?;
                        }
                        let kinds = (k[0].kind(), v[0].kind());
                        Kv::Away { store: Rc::clone(s), base, kinds }
                    }
                };
                keep.set(Some(Saved { q: own(q)?, kv, out, lse }));
                Ok(results)
            },
            move |gs| {
                let s = saved.take().ok_or_else(|| Error::Tape {
                    op: OP,
                    msg: "the forward saved nothing for the backward".into(),
                })?;
                backward(&s, gs, mask, docs_b.as_ref(), scale, &seg_b)
            },
        )?;
        Ok(outs)
    }
}

/// What the core keeps for its backward: each chunk's q (compact), K/V, output and
/// log-sum-exp in the accumulation dtype.
struct Saved {
    q: Vec<Tensor>,
    kv: Kv,
    out: Vec<Tensor>,
    lse: Vec<Tensor>,
}

/// Each chunk's K and V: on the device, or in an offload store (chunk c under `base + c`,
/// stacked `[2, b, N/u, H_r, d]`), with the dtypes the gradients come back in.
enum Kv {
    Here(Vec<Tensor>, Vec<Tensor>),
    Away { store: Rc<Offload>, base: usize, kinds: (tch::Kind, tch::Kind) },
}

impl Kv {
    /// Chunk c's (k, v), brought back from the store if it is there, and the chunk before it
    /// started on its way (the backward takes the chunks last first).
    fn chunk(&self, c: usize) -> Result<(Tensor, Tensor)> {
        match self {
            Kv::Here(k, v) => Ok((k[c].shallow_clone(), v[c].shallow_clone())),
            Kv::Away { store, base, .. } => {
                let kv = store.take(base + c)?;
                if let Some(before) = c.checked_sub(1) {
                    store.prefetch(base + before)?;
                }
                Ok((kv.f_get(0).op(OP)?, kv.f_get(1).op(OP)?))
            }
        }
    }

    fn kinds(&self) -> (tch::Kind, tch::Kind) {
        match self {
            Kv::Here(k, v) => (k[0].kind(), v[0].kind()),
            Kv::Away { kinds, .. } => *kinds,
        }
    }
}

/// Query chunk c (`qh`, `[b, H_r, N/u, d]`) over every key chunk it sees (segments in global
/// positions), merged by log-sum-exp: (out, lse `[b, H_r, N/u]`) in the accumulation dtype, and
/// the work done. Rows that see no key get 0 and -inf.
fn attend_chunk(
    attn: &Blockwise,
    qh: &Tensor,
    kh: &[Tensor],
    vh: &[Tensor],
    c: usize,
    segments: &[(i64, i64)],
) -> Result<(Tensor, Tensor, Work)> {
    let (mut acc, mut work): (Option<(Tensor, Tensor)>, Work) = (None, Work::default());
    for (c2, (k, v)) in kh.iter().zip(vh).enumerate() {
        if !pair_visible(attn.mask, attn.docs, segments[c], segments[c2]) {
            continue;
        }
        let (o, l, w) = attn.forward(qh, k, v, &[segments[c]], &[segments[c2]])?;
        work += w;
        acc = Some(match acc {
            None => (o, l),
            Some(prev) => merge(&prev, &(o, l)).op(OP)?,
        });
    }
    let (o, l) = match acc {
        Some(x) => x,
        None => empty(qh)?,
    };
    Ok((o, l, work))
}

/// Output 0 and lse -inf for queries that see no key.
fn empty(q: &Tensor) -> Result<(Tensor, Tensor)> {
    let s = q.size();
    let opts = (compute_kind(q.kind()), q.device());
    let lse = Tensor::f_full([s[0], s[1], s[2]], f64::NEG_INFINITY, opts).op(OP)?;
    Ok((Tensor::f_zeros(&s, opts).op(OP)?, lse))
}

/// The gradients of every chunk's q, k, v (in that order, as the record's inputs), the query
/// chunks taken last first, each pair's probabilities recomputed from the saved output and
/// log-sum-exp.
fn backward(
    s: &Saved,
    gs: &[Tensor],
    mask: Mask,
    docs: Option<&Documents>,
    scale: f64,
    segments: &[(i64, i64)],
) -> Result<Vec<Tensor>> {
    let _no_grad = tch::no_grad_guard();
    let u = segments.len();
    let attn = Blockwise { mask: &mask, docs, scale, fused: true };
    let qh = s.q.iter().map(block_layout).collect::<Result<Vec<_>>>()?;
    // dout heads first and delta = rowsum(dout * out), [b, H_r, N/u, d] and [b, H_r, N/u]
    let doh = gs.iter().map(heads_first).collect::<Result<Vec<_>>>()?;
    let delta = doh
        .iter()
        .zip(&s.out)
        .map(|(g, o)| {
            g.f_mul(o).and_then(|t| t.f_sum_dim_intlist([-1i64].as_slice(), false, t.kind())).op(OP)
        })
        .collect::<Result<Vec<_>>>()?;
    // Accumulators in f32 (f64 for f64), [b, H_r, N/u, d]
    let zeros = |t: &Tensor| Tensor::f_zeros(t.size(), (compute_kind(t.kind()), t.device())).op(OP);
    let mut dq = qh.iter().map(zeros).collect::<Result<Vec<_>>>()?;
    let (mut dk, mut dv) = (Vec::with_capacity(u), Vec::with_capacity(u));
    // Key chunks last first, each brought to the device once; the query chunks that see it.
    for c2 in (0..u).rev() {
        let (k, v) = s.kv.chunk(c2)?;
        let (kh, vh) = (block_layout(&k)?, block_layout(&v)?);
        let (mut dkc, mut dvc) = (zeros(&kh)?, zeros(&vh)?);
        for c in 0..u {
            if !pair_visible(&mask, docs, segments[c], segments[c2]) {
                continue;
            }
            let (a, b, e) = attn.backward_pair(
                &qh[c],
                &kh,
                &vh,
                (&doh[c], &s.out[c], &s.lse[c], &delta[c]),
                segments[c],
                segments[c2],
            )?;
            dq[c] = dq[c].f_add(&a).op(OP)?;
            dkc = dkc.f_add(&b).op(OP)?;
            dvc = dvc.f_add(&e).op(OP)?;
        }
        dk.push(dkc);
        dv.push(dvc);
    }
    dk.reverse();
    dv.reverse();
    // [b, H_r, N/u, d] -> [b, N/u, H_r, d], in the inputs' dtypes
    let back = |g: &Tensor, kind: tch::Kind| g.f_transpose(1, 2).and_then(|t| t.f_to_kind(kind)).op(OP);
    let (kk, vk) = s.kv.kinds();
    let mut grads = Vec::with_capacity(3 * u);
    for g in &dq {
        grads.push(back(g, s.q[0].kind())?);
    }
    for g in &dk {
        grads.push(back(g, kk)?);
    }
    for g in &dv {
        grads.push(back(g, vk)?);
    }
    Ok(grads)
}

impl SequenceParallel for ChunkedUlysses {
    fn name(&self) -> &'static str {
        "ulysses_chunked"
    }

    fn layout(&self) -> &SeqLayout {
        &self.layout
    }

    fn rank(&self) -> usize {
        self.group.rank()
    }

    fn group(&self) -> Option<&Group> {
        Some(&self.group)
    }

    /// # Shapes
    /// `q`: `[b, s_r, H, d]`, `k`, `v`: `[b, s_r, H_kv, d]` (this rank's u pieces, in chunk
    /// order) -> `[b, s_r, H, d]`.
    fn forward_docs(
        &self,
        tape: &Tape,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        docs: Option<&Documents>,
    ) -> Result<Tensor> {
        let r = self.group.rank();
        check_shapes(OP, &self.layout, &self.heads, r, q, k, v)?;
        self.check_docs(q, docs)?;
        // [b, s_r, H_kv, d] -> [b, s_r, sum(KV_r), d]: each kv head once per rank that needs it
        let (k, v) = (self.heads.replicate_kv(k)?, self.heads.replicate_kv(v)?);
        // Chunk c of this rank's tokens: [b, N/(uP), H, d], [b, N/(uP), sum(KV_r), d]
        let rows = |t: &Tensor, c: usize| t.f_narrow(1, c as i64 * self.piece, self.piece).op(OP);
        let mut slices = Vec::with_capacity(3 * self.chunks);
        for c in 0..self.chunks {
            slices.extend([
                (rows(q, c)?, &self.q_a2a),
                (rows(&k, c)?, &self.kv_a2a),
                (rows(&v, c)?, &self.kv_a2a),
            ]);
        }
        // One record for every chunk's three all-to-alls (a u-th of the tokens each, chunk by
        // chunk): the slices come from the same tensors, often views of one projection, and a
        // piece of graph must not feed two records.
        // [b, N/(uP), H, d] -> [b, N/u, H_r, d]; [b, N/(uP), sum(KV_r), d] -> [b, N/u, KV_r, d]
        let full =
            tape.all_to_all_many(&self.group, &slices.iter().map(|(t, a)| (t, *a)).collect::<Vec<_>>())?;
        let chunks = full
            .chunks(3)
            .map(|x| {
                // [b, N/u, KV_r, d] -> [b, N/u, H_r, d]
                Ok([x[0].shallow_clone(), self.heads.expand_kv(r, &x[1])?, self.heads.expand_kv(r, &x[2])?])
            })
            .collect::<Result<Vec<_>>>()?;
        let outs = self.core(tape, &chunks, docs)?;
        if self.offload.is_some() && tape.is_recording() {
            // The chunks' K/V are in the store now: the tape keeps the all-to-alls' outputs only
            // to meet their gradients, so their values can go.
            for x in full.chunks(3) {
                tape.release_values(&x[1])?;
                tape.release_values(&x[2])?;
            }
        }
        drop(chunks);
        // u x [b, N/u, H_r, d] -> u x [b, N/(uP), H, d] -> [b, s_r, H, d]
        let back_a2a =
            AllToAll::new(1, 2, vec![self.piece; self.group.size()], self.heads.q_split().to_vec());
        let back =
            tape.all_to_all_many(&self.group, &outs.iter().map(|o| (o, &back_a2a)).collect::<Vec<_>>())?;
        Tensor::f_cat(&back, 1).op(OP)
    }

    /// # Shapes
    /// As `forward`; lse `[b, s_r, H]`.
    fn forward_lse_docs(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        docs: Option<&Documents>,
    ) -> Result<(Tensor, Tensor)> {
        let r = self.group.rank();
        check_shapes(OP, &self.layout, &self.heads, r, q, k, v)?;
        self.check_docs(q, docs)?;
        let _no_grad = tch::no_grad_guard();
        let (k, v) = (self.heads.replicate_kv(k)?, self.heads.replicate_kv(v)?);
        let g = &self.group;
        let d = q.size()[3];
        let attn = Blockwise { mask: &self.mask, docs, scale: 1.0 / (d as f64).sqrt(), fused: true };
        let rows = |t: &Tensor, c: usize| t.f_narrow(1, c as i64 * self.piece, self.piece).op(OP);
        let (mut kh, mut vh) = (Vec::with_capacity(self.chunks), Vec::with_capacity(self.chunks));
        for c in 0..self.chunks {
            // [b, N/(uP), sum(KV_r), d] -> [b, N/u, KV_r, d] -> [b, N/u, H_r, d] -> [b, H_r, N/u, d]
            let kc = self.heads.expand_kv(r, &g.all_to_all_spec(&rows(&k, c)?, &self.kv_a2a)?)?;
            let vc = self.heads.expand_kv(r, &g.all_to_all_spec(&rows(&v, c)?, &self.kv_a2a)?)?;
            kh.push(block_layout(&kc)?);
            vh.push(block_layout(&vc)?);
        }
        let segments: Vec<(i64, i64)> = (0..self.chunks).map(|c| self.segment(c)).collect();
        let (mut outs, mut lses) = (Vec::new(), Vec::new());
        let pieces = vec![self.piece; g.size()];
        for c in 0..self.chunks {
            let qh = block_layout(&g.all_to_all_spec(&rows(q, c)?, &self.q_a2a)?)?;
            let (o, l, _) = attend_chunk(&attn, &qh, &kh, &vh, c, &segments)?;
            // [b, H_r, N/u, d] -> [b, N/u, H_r, d] -> [b, N/(uP), H, d]; lse [b, H_r, N/u] -> [b, N/(uP), H]
            let o = o.f_transpose(1, 2).and_then(|t| t.f_to_kind(q.kind())).op(OP)?;
            outs.push(g.all_to_all_v(&o, 1, 2, &pieces, self.heads.q_split())?);
            lses.push(g.all_to_all_v(&l.f_transpose(1, 2).op(OP)?, 1, 2, &pieces, self.heads.q_split())?);
        }
        Ok((Tensor::f_cat(&outs, 1).op(OP)?, Tensor::f_cat(&lses, 1).op(OP)?))
    }
}
