//! Chunked Ulysses (FPDT, "Fully Pipelined Distributed Transformer", Yao et al. 2024; released as
//! DeepSpeed's Ulysses-Offload): Ulysses' all-to-alls on `u` chunks of each rank's sequence, one
//! after the other, each chunk attended as soon as the keys it sees have arrived, so that the
//! all-to-all buffers and the attention's working set are those of one chunk.
//!
//! The sequence is cut into `u P` equal pieces; rank r holds pieces `c P + r` (a strided
//! layout), so that chunk c of every rank, gathered in rank order, is the contiguous segment c
//! of the sequence. Per layer, one taped op with a hand-written backward runs, for c = 0..u:
//!
//! ```text
//! q_c [b, N/(uP), H, d], k_c, v_c [b, N/(uP), H_kv, d]     chunk c of this rank's tokens
//!   | all-to-all: scatter heads, gather sequence (as Ulysses, on a u-th of the tokens);
//!   | chunk c+1's all-to-alls are started before chunk c is attended
//! q_c [b, N/u, H_r, d], k_c, v_c [b, N/u, KV_r, d]         segment c of the sequence, this rank's heads
//!   | attention of every query chunk whose keys are all here now (causal: chunk c) over the key
//!   | segments it sees, merged by log-sum-exp in f32 (blockwise, as ring attention merges its
//!   | blocks); older key chunks come back from the offload store one by one, the next one on its
//!   | way meanwhile
//! o_c [b, N/u, H_r, d]
//!   | all-to-all back
//! o_c [b, N/(uP), H, d]
//! ```
//!
//! The backward takes the query chunks in order: chunk c's output gradient crosses its
//! all-to-all, every key chunk it sees comes back (the next on its way), each pair's
//! probabilities are recomputed from the saved output and log-sum-exp (no `[N/u, N/u]` matrix is
//! kept), and dq_c crosses back as soon as it is whole; dk and dv accumulate per key chunk over
//! the rank's own kv heads (f32) and cross back once their last query chunk is done. Bytes:
//! exactly Ulysses' (the same tensors cross the same all-to-alls, a u-th at a time) in u times
//! the messages.
//!
//! With an offload store ([`ChunkedUlysses::with_offload`]; FPDT keeps the chunks in host
//! memory) what the backward needs of each chunk (q, K/V, output and log-sum-exp) leaves the
//! device as soon as the chunk is done: the forward holds at once the chunk in hand and one key
//! chunk coming back, and between forward and backward the op holds nothing but its output.
//! Unlike DeepSpeed's FPDT, the backward keeps dk and dv of every key chunk on the device (f32, the
//! rank's kv heads only) and reads each query chunk back once, instead of keeping dq in host
//! memory and reading the query side back per pair; and any mask is taken (a query chunk that
//! sees later keys waits for them), where FPDT is causal only.

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
    /// Where each chunk's q, K/V, output and log-sum-exp wait between the forward and the
    /// backward (FPDT's offload); `None`: on the device.
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

    /// Moves what the backward needs of each chunk (its q, K/V, output and log-sum-exp) into
    /// `store` as soon as the chunk is done, reads older key chunks back as later query chunks
    /// attend to them, and brings everything back, one chunk ahead, in the backward (FPDT's
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

    fn check_docs(&self, q: &Tensor, docs: Option<&Documents>) -> Result<()> {
        match docs {
            Some(d) => {
                d.refuse_layout(OP)?;
                d.check(OP, q.size()[0], self.layout.global_len(), &self.mask)
            }
            None => Ok(()),
        }
    }

    /// The key chunks an offload store reads back (and keeps) per layer with sequences of `n`
    /// tokens over `p` ranks in `chunks` chunks each, under `mask`: (forward, backward). Causal:
    /// `u (u - 1) / 2` each; a mask under which every chunk sees every other: `u (u - 1)` each.
    pub fn offload_reads(mask: &Mask, n: i64, p: usize, chunks: usize) -> Result<(usize, usize)> {
        Self::check(n, p, chunks)?;
        Ok(Schedule::new(mask, None, n / (p * chunks) as i64 * p as i64, chunks).reads())
    }

    /// What one forward and its backward share: the collectives, the schedule and the store.
    fn plan(&self, d: i64, docs: Option<&Documents>, store: Option<Rc<Offload>>, keep: Keep) -> Plan {
        let (u, p) = (self.chunks, self.group.size());
        let r = self.group.rank();
        let base = self.calls.replace(self.calls.get() + 1) * u * Item::COUNT;
        Plan {
            group: self.group.clone(),
            mask: self.mask,
            docs: docs.cloned(),
            scale: 1.0 / (d as f64).sqrt(),
            piece: self.piece,
            sched: Schedule::new(&self.mask, docs, self.piece * p as i64, u),
            q_a2a: self.q_a2a.clone(),
            kv_a2a: self.kv_a2a.clone(),
            back_a2a: AllToAll::new(1, 2, vec![self.piece; p], self.heads.q_split().to_vec()),
            expand: self.heads.expand_map(r),
            kv_r: self.heads.kv_split()[r],
            store: Store { store, base, keep },
        }
    }
}

/// Everything a chunk leaves for the backward, by kind (the store's keys).
#[derive(Clone, Copy)]
enum Item {
    Q = 0,
    Kv = 1,
    Out = 2,
    Lse = 3,
}

impl Item {
    const COUNT: usize = 4;
}

/// What a forward keeps of its chunks once its own attention is done with them.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Keep {
    /// Everything the backward needs (a recording tape).
    Backward,
    /// The log-sum-exp only (`forward_lse`).
    Lse,
    /// Nothing (no backward to come: a disabled tape, the first pass of full checkpointing).
    Nothing,
}

/// A forward's view of the offload store (chunk c's item i under `base + COUNT c + i`) and of
/// what it keeps.
struct Store {
    store: Option<Rc<Offload>>,
    base: usize,
    keep: Keep,
}

/// A tensor kept for the backward: on the device, in the store, or not kept.
enum Held {
    Here(Tensor),
    Away,
    Gone,
}

impl Store {
    fn key(&self, c: usize, item: Item) -> usize {
        self.base + Item::COUNT * c + item as usize
    }

    /// Keeps `x` for the backward (into the store if there is one), or lets it go if nothing
    /// will ask for it. K/V is kept for the forward's own later query chunks either way.
    fn hold(&self, c: usize, item: Item, x: Tensor) -> Result<Held> {
        let wanted =
            matches!((self.keep, item), (Keep::Backward, _) | (_, Item::Kv) | (Keep::Lse, Item::Lse));
        if !wanted {
            return Ok(Held::Gone);
        }
        match &self.store {
            None => Ok(Held::Here(x)),
            Some(s) => {
                s.put(self.key(c, item), &x)?;
                Ok(Held::Away)
            }
        }
    }

    /// A kept tensor for a use that is not its last (the store keeps it).
    fn read(&self, h: &Held, c: usize, item: Item) -> Result<Tensor> {
        match (h, &self.store) {
            (Held::Here(x), _) => Ok(x.shallow_clone()),
            (Held::Away, Some(s)) => s.read(self.key(c, item)),
            (Held::Away, None) | (Held::Gone, _) => Err(lost()),
        }
    }

    /// A kept tensor for its last use.
    fn take(&self, h: Held, c: usize, item: Item) -> Result<Tensor> {
        match (h, &self.store) {
            (Held::Here(x), _) => Ok(x),
            (Held::Away, Some(s)) => s.take(self.key(c, item)),
            (Held::Away, None) | (Held::Gone, _) => Err(lost()),
        }
    }

    /// Starts bringing chunk c's item back for a read (`last` false) or its last use.
    fn prefetch(&self, c: usize, item: Item, last: bool) -> Result<()> {
        match &self.store {
            None => Ok(()),
            Some(s) if last => s.prefetch(self.key(c, item)),
            Some(s) => s.prefetch_read(self.key(c, item)),
        }
    }
}

fn lost() -> Error {
    Error::Tape { op: OP, msg: "a kept chunk is neither on the device nor in a store".into() }
}

/// Which key chunks each query chunk sees, and when.
struct Schedule {
    /// Segment c of the sequence: (first position, length).
    segments: Vec<(i64, i64)>,
    /// The key chunks each query chunk sees, in order.
    sees: Vec<Vec<usize>>,
    /// The chunk after whose arrival each query chunk is attended: the last key chunk it sees,
    /// or itself if later.
    ready: Vec<usize>,
    /// The last query chunk that sees each key chunk (`None`: none does).
    last_user: Vec<Option<usize>>,
}

impl Schedule {
    /// `u` chunks of `len` tokens each (segment c: positions `c len ..`).
    fn new(mask: &Mask, docs: Option<&Documents>, len: i64, u: usize) -> Schedule {
        let segments: Vec<(i64, i64)> = (0..u).map(|c| (c as i64 * len, len)).collect();
        let sees: Vec<Vec<usize>> = (0..u)
            .map(|c| (0..u).filter(|&c2| pair_visible(mask, docs, segments[c], segments[c2])).collect())
            .collect();
        let ready = (0..u).map(|c| sees[c].last().copied().unwrap_or(c).max(c)).collect();
        let last_user = (0..u).map(|c2| (0..u).rev().find(|&c| sees[c].contains(&c2))).collect();
        Schedule { segments, sees, ready, last_user }
    }

    /// The arrival step after which the forward no longer needs key chunk c2: the last at which
    /// a query chunk that sees it is attended (its own arrival if none does).
    fn last_forward_use(&self, c2: usize) -> usize {
        (0..self.sees.len())
            .filter(|&c| self.sees[c].contains(&c2))
            .map(|c| self.ready[c])
            .max()
            .unwrap_or(c2)
    }

    /// Key chunks read back from a store (kept there): (forward, backward).
    fn reads(&self) -> (usize, usize) {
        let forward = (0..self.sees.len())
            .map(|c| self.sees[c].iter().filter(|&&c2| c2 != self.ready[c]).count())
            .sum();
        let backward = (0..self.sees.len())
            .map(|c| self.sees[c].iter().filter(|&&c2| self.last_user[c2] != Some(c)).count())
            .sum();
        (forward, backward)
    }
}

/// One forward and its backward: collectives, schedule, store.
struct Plan {
    group: Group,
    mask: Mask,
    docs: Option<Documents>,
    scale: f64,
    piece: i64,
    sched: Schedule,
    q_a2a: AllToAll,
    kv_a2a: AllToAll,
    back_a2a: AllToAll,
    /// Rank r's kv head for each of its query heads (GQA); `None` for plain multi-head.
    expand: Option<Vec<i64>>,
    /// Rank r's kv heads.
    kv_r: i64,
    store: Store,
}

/// What the forward keeps for the backward, per chunk: q `[b, N/u, H_r, d]` (input dtype), K/V
/// stacked `[2, b, N/u, KV_r, d]`, out `[b, H_r, N/u, d]` and lse `[b, H_r, N/u]` (accumulation
/// dtype).
struct Saved {
    q: Vec<Held>,
    kv: Vec<Held>,
    out: Vec<Held>,
    lse: Vec<Held>,
    kinds: [tch::Kind; 3],
}

impl Plan {
    fn attn(&self) -> Blockwise<'_> {
        Blockwise { mask: &self.mask, docs: self.docs.as_ref(), scale: self.scale, fused: true }
    }

    /// Chunk c of a rank-local tensor.
    ///
    /// # Shapes
    /// `[b, s_r, heads, d]` -> `[b, N/(uP), heads, d]`.
    fn rows(&self, t: &Tensor, c: usize) -> Result<Tensor> {
        t.f_narrow(1, c as i64 * self.piece, self.piece).op(OP)
    }

    /// A key chunk `[2, b, N/u, KV_r, d]` as the kernel takes it: (k, v) `[b, H_r, N/u, d]`.
    fn kernel_kv(&self, kv: &Tensor) -> Result<(Tensor, Tensor)> {
        let expand = |t: Tensor| -> Result<Tensor> {
            // [b, N/u, KV_r, d] -> [b, N/u, H_r, d]
            let t = match &self.expand {
                None => t,
                Some(map) => t.f_index_select(2, &Tensor::from_slice(map).f_to(t.device()).op(OP)?).op(OP)?,
            };
            block_layout(&t)
        };
        Ok((expand(kv.f_get(0).op(OP)?)?, expand(kv.f_get(1).op(OP)?)?))
    }

    /// The forward: every chunk through its all-to-alls and attention, chunk c+1's all-to-alls
    /// in flight while chunk c attends. Returns the output, what the backward needs and the
    /// attention work done.
    ///
    /// # Shapes
    /// `q`: `[b, s_r, H, d]`, `k`, `v`: `[b, s_r, sum(KV_r), d]` (replicated kv heads) ->
    /// `[b, s_r, H, d]`.
    fn forward(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<(Tensor, Saved, Work)> {
        let (sched, g) = (&self.sched, &self.group);
        let u = sched.sees.len();
        let start = |c: usize| -> Result<[_; 3]> {
            // [b, N/(uP), H, d] -> [b, N/u, H_r, d]; [b, N/(uP), sum(KV_r), d] -> [b, N/u, KV_r, d]
            Ok([
                g.all_to_all_spec_start(&self.rows(q, c)?, &self.q_a2a)?,
                g.all_to_all_spec_start(&self.rows(k, c)?, &self.kv_a2a)?,
                g.all_to_all_spec_start(&self.rows(v, c)?, &self.kv_a2a)?,
            ])
        };
        let attn = self.attn();
        let st = &self.store;
        // Per chunk: q waiting for its keys, the output sent back; what is kept for the backward.
        let (mut waiting, mut outs): (Vec<Option<Tensor>>, Vec<Option<Tensor>>) = (nones(u), nones(u));
        let (mut q_held, mut kv, mut out_held, mut lse_held): Kept = (nones(u), nones(u), nones(u), nones(u));
        let mut work = Work::default();
        let mut next = Some(start(0)?);
        for a in 0..u {
            let [sq, sk, sv] = next.take().ok_or_else(lost)?;
            let (qa, ka, va) = (sq.wait()?, sk.wait()?, sv.wait()?);
            if a + 1 < u {
                next = Some(start(a + 1)?);
            }
            waiting[a] = Some(qa);
            // [b, N/u, KV_r, d] x 2 -> [2, b, N/u, KV_r, d]: one transfer a chunk
            let kv_a = Tensor::f_stack(&[ka, va], 0).op(OP)?;
            for c in (0..u).filter(|&c| sched.ready[c] == a) {
                let qc = waiting[c].take().ok_or_else(lost)?;
                let qh = block_layout(&qc)?; // [b, H_r, N/u, d]
                let mut acc: Option<(Tensor, Tensor)> = None;
                let seen = &sched.sees[c];
                for (i, &c2) in seen.iter().enumerate() {
                    let kv_c2 = match &kv[c2] {
                        _ if c2 == a => kv_a.shallow_clone(),
                        Some(h) => st.read(h, c2, Item::Kv)?,
                        None => return Err(lost()),
                    };
                    if let Some(&after) = seen.get(i + 1).filter(|&&n| n != a) {
                        st.prefetch(after, Item::Kv, false)?;
                    }
                    let (kh, vh) = self.kernel_kv(&kv_c2)?;
                    let (o, l, w) =
                        attn.forward(&qh, &kh, &vh, &[sched.segments[c]], &[sched.segments[c2]])?;
                    work += w;
                    acc = Some(match acc {
                        None => (o, l),
                        Some(prev) => merge(&prev, &(o, l)).op(OP)?,
                    });
                }
                let (o, l) = match acc {
                    Some(x) => x,
                    None => empty(&qh)?,
                };
                // [b, H_r, N/u, d] -> [b, N/u, H_r, d] (input dtype) -> [b, N/(uP), H, d]
                let o_in = o.f_transpose(1, 2).and_then(|t| t.f_to_kind(q.kind())).op(OP)?;
                outs[c] = Some(g.all_to_all_spec(&o_in, &self.back_a2a)?);
                q_held[c] = Some(st.hold(c, Item::Q, qc)?);
                out_held[c] = Some(st.hold(c, Item::Out, o)?);
                lse_held[c] = Some(st.hold(c, Item::Lse, l)?);
            }
            // Chunk a's K/V: later query chunks read it back, the backward takes it.
            kv[a] = Some(st.hold(a, Item::Kv, kv_a)?);
            if st.keep != Keep::Backward {
                // Without a backward, a key chunk goes once the last query chunk that sees it is done.
                for (c2, slot) in kv.iter_mut().enumerate() {
                    if slot.is_some() && sched.last_forward_use(c2) <= a {
                        *slot = Some(Held::Gone);
                    }
                }
            }
        }
        let saved = Saved {
            q: every(q_held)?,
            kv: every(kv)?,
            out: every(out_held)?,
            lse: every(lse_held)?,
            kinds: [q.kind(), k.kind(), v.kind()],
        };
        let outs = every(outs)?;
        // u x [b, N/(uP), H, d] -> [b, s_r, H, d]
        Ok((Tensor::f_cat(&outs, 1).op(OP)?, saved, work))
    }

    /// Rank r's share of a key chunk's gradient, summed over the query heads of each kv head,
    /// in f32 (f64 for f64).
    ///
    /// # Shapes
    /// `[b, H_r, N/u, d]` -> `[b, KV_r, N/u, d]`.
    fn compact(&self, t: &Tensor) -> Result<Tensor> {
        let t = t.f_to_kind(compute_kind(t.kind())).op(OP)?;
        let Some(map) = &self.expand else { return Ok(t) };
        let mut size = t.size();
        size[1] = self.kv_r;
        let index = Tensor::from_slice(map).f_to(t.device()).op(OP)?;
        Tensor::f_zeros(&size, (t.kind(), t.device())).and_then(|z| z.f_index_add(1, &index, &t)).op(OP)
    }

    /// The gradients of q, k and v (rank-local, as the forward took them) from the output's:
    /// query chunks in order, each key chunk it sees brought back (the next on its way), dq of
    /// a chunk sent back once whole, dk and dv once their last query chunk is done.
    ///
    /// # Shapes
    /// `dout`: `[b, s_r, H, d]` -> `[b, s_r, H, d]`, `[b, s_r, sum(KV_r), d]` x 2.
    fn backward(&self, s: Saved, dout: &Tensor) -> Result<Vec<Tensor>> {
        let _no_grad = tch::no_grad_guard();
        let (sched, g, st, attn) = (&self.sched, &self.group, &self.store, self.attn());
        let (u, last_user) = (sched.sees.len(), &sched.last_user);
        let [qk, kk, vk] = s.kinds;
        let mut kv: Vec<Option<Held>> = s.kv.into_iter().map(Some).collect();
        // dk, dv of each key chunk being summed, f32 [b, KV_r, N/u, d]; and sent back
        let (mut dkv, mut dkv_back): (Vec<Option<(Tensor, Tensor)>>, _) = (nones(u), nones(u));
        // [b, KV_r, N/u, d] -> [b, N/u, KV_r, d] -> [b, N/(uP), sum(KV_r), d]
        let kv_inverse = self.kv_a2a.inverse();
        let kv_back = |t: &Tensor, kind: tch::Kind| -> Result<Tensor> {
            let t = t.f_transpose(1, 2).and_then(|t| t.f_to_kind(kind)).op(OP)?;
            g.all_to_all_spec(&t, &kv_inverse)
        };
        let mut dq_back = Vec::with_capacity(u);
        let items = s.q.into_iter().zip(s.out).zip(s.lse).enumerate();
        for (c, ((q_h, out_h), lse_h)) in items {
            let qh = block_layout(&st.take(q_h, c, Item::Q)?)?; // [b, H_r, N/u, d]
            let (out, lse) = (st.take(out_h, c, Item::Out)?, st.take(lse_h, c, Item::Lse)?);
            // [b, N/(uP), H, d] -> [b, N/u, H_r, d] -> [b, H_r, N/u, d] (accumulation dtype)
            let doh = heads_first(&g.all_to_all_spec(&self.rows(dout, c)?, &self.q_a2a)?)?;
            // delta = rowsum(dout * out), [b, H_r, N/u]
            let delta = doh
                .f_mul(&out)
                .and_then(|t| t.f_sum_dim_intlist([-1i64].as_slice(), false, t.kind()))
                .op(OP)?;
            let mut dq = Tensor::f_zeros(qh.size(), (compute_kind(qh.kind()), qh.device())).op(OP)?;
            let seen = &sched.sees[c];
            for (i, &c2) in seen.iter().enumerate() {
                let h = kv[c2].take().ok_or_else(lost)?;
                let kv_c2 = if last_user[c2] == Some(c) {
                    st.take(h, c2, Item::Kv)?
                } else {
                    let t = st.read(&h, c2, Item::Kv)?;
                    kv[c2] = Some(h);
                    t
                };
                if let Some(&after) = seen.get(i + 1) {
                    st.prefetch(after, Item::Kv, last_user[after] == Some(c))?;
                }
                let (kh, vh) = self.kernel_kv(&kv_c2)?;
                let (a, b, e) = attn.backward_pair(
                    &qh,
                    &kh,
                    &vh,
                    (&doh, &out, &lse, &delta),
                    sched.segments[c],
                    sched.segments[c2],
                )?;
                dq = dq.f_add(&a).op(OP)?;
                let (b, e) = (self.compact(&b)?, self.compact(&e)?);
                dkv[c2] = Some(match dkv[c2].take() {
                    None => (b, e),
                    Some((x, y)) => (x.f_add(&b).op(OP)?, y.f_add(&e).op(OP)?),
                });
            }
            // dq of chunk c is whole: [b, H_r, N/u, d] -> [b, N/u, H_r, d] -> [b, N/(uP), H, d]
            let dq = dq.f_transpose(1, 2).and_then(|t| t.f_to_kind(qk)).op(OP)?;
            dq_back.push(g.all_to_all_spec(&dq, &self.back_a2a)?);
            // Key chunks whose last query chunk this was: dk, dv whole.
            for c2 in (0..u).filter(|&c2| last_user[c2] == Some(c)) {
                let (x, y) = dkv[c2].take().ok_or_else(lost)?;
                dkv_back[c2] = Some((kv_back(&x, kk)?, kv_back(&y, vk)?));
            }
        }
        // Key chunks no query sees: zero gradients (every rank sends them alike), and their K/V
        // out of the store.
        for c2 in (0..u).filter(|&c2| last_user[c2].is_none()) {
            let kv_c2 = st.take(kv[c2].take().ok_or_else(lost)?, c2, Item::Kv)?;
            // [b, N/u, KV_r, d] -> [b, KV_r, N/u, d]
            let z = kv_c2.f_get(0).and_then(|t| t.f_transpose(1, 2)).and_then(|t| t.f_zeros_like()).op(OP)?;
            dkv_back[c2] = Some((kv_back(&z, kk)?, kv_back(&z, vk)?));
        }
        let (dk, dv): (Vec<Tensor>, Vec<Tensor>) = every(dkv_back)?.into_iter().unzip();
        // u x [b, N/(uP), heads, d] -> [b, s_r, heads, d]
        let cat = |t: &[Tensor]| Tensor::f_cat(t, 1).op(OP);
        Ok(vec![cat(&dq_back)?, cat(&dk)?, cat(&dv)?])
    }
}

/// q, K/V, output and log-sum-exp of each chunk, as they become kept.
type Kept = (Vec<Option<Held>>, Vec<Option<Held>>, Vec<Option<Held>>, Vec<Option<Held>>);

fn nones<T>(u: usize) -> Vec<Option<T>> {
    (0..u).map(|_| None).collect()
}

/// Every chunk's, or the error if one is missing.
fn every<T>(v: Vec<Option<T>>) -> Result<Vec<T>> {
    v.into_iter().map(|x| x.ok_or_else(lost)).collect()
}

/// Output 0 and lse -inf for queries that see no key.
fn empty(q: &Tensor) -> Result<(Tensor, Tensor)> {
    let s = q.size();
    let opts = (compute_kind(q.kind()), q.device());
    let lse = Tensor::f_full([s[0], s[1], s[2]], f64::NEG_INFINITY, opts).op(OP)?;
    Ok((Tensor::f_zeros(&s, opts).op(OP)?, lse))
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
        check_shapes(OP, &self.layout, &self.heads, self.group.rank(), q, k, v)?;
        self.check_docs(q, docs)?;
        // [b, s_r, H_kv, d] -> [b, s_r, sum(KV_r), d]: each kv head once per rank that needs it
        let (k, v) = (self.heads.replicate_kv(k)?, self.heads.replicate_kv(v)?);
        // With offload (and a backward to come), this call's chunks go under keys of its own.
        let store = self.offload.clone().filter(|_| tape.is_recording());
        let keep = if tape.is_recording() { Keep::Backward } else { Keep::Nothing };
        let plan = Rc::new(self.plan(q.size()[3], docs, store, keep));
        let saved: Rc<Cell<Option<Saved>>> = Rc::default();
        let (keep, plan_b) = (Rc::clone(&saved), Rc::clone(&plan));
        // One record for the chunks' all-to-alls and attention: the backward runs the adjoint
        // all-to-alls chunk by chunk as it goes.
        let out = tape.record(
            OP,
            &[q, &k, &v],
            |xs| {
                let (out, s, work) = plan.forward(&xs[0], &xs[1], &xs[2])?;
                self.work.set(work);
                keep.set(Some(s));
                Ok(vec![out])
            },
            move |gs| {
                let s = saved.take().ok_or_else(|| Error::Tape {
                    op: OP,
                    msg: "the forward saved nothing for the backward".into(),
                })?;
                plan_b.backward(s, &gs[0])
            },
        )?;
        out.into_iter().next().ok_or_else(lost)
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
        check_shapes(OP, &self.layout, &self.heads, self.group.rank(), q, k, v)?;
        self.check_docs(q, docs)?;
        let _no_grad = tch::no_grad_guard();
        let (k, v) = (self.heads.replicate_kv(k)?, self.heads.replicate_kv(v)?);
        let plan = self.plan(q.size()[3], docs, None, Keep::Lse);
        let (out, saved, work) = plan.forward(q, &k, &v)?;
        self.work.set(work);
        let lses = saved
            .lse
            .into_iter()
            .enumerate()
            .map(|(c, h)| {
                // [b, H_r, N/u] -> [b, N/u, H_r] -> [b, N/(uP), H]
                let l = plan.store.take(h, c, Item::Lse)?.f_transpose(1, 2).op(OP)?;
                plan.group.all_to_all_spec(&l, &plan.back_a2a)
            })
            .collect::<Result<Vec<_>>>()?;
        // u x [b, N/(uP), H] -> [b, s_r, H]
        Ok((out, Tensor::f_cat(&lses, 1).op(OP)?))
    }
}
