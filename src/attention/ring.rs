//! Ring attention (Li et al. 2021, ring self-attention; Liu et al. 2023, RingAttention): queries
//! stay on their rank, key/value blocks travel around the ring in P-1 steps, and the partial
//! outputs are merged by log-sum-exp in f32.
//!
//! ```text
//! step t on rank r: attend q_r to the K/V block of rank (r - t) mod P, merge; pass K/V to r + 1
//! ```
//!
//! The backward is written by hand (a taped composite op): K/V go around the ring again, each
//! block's dK/dV accumulator travelling with it (in f32) and arriving home after P shifts, so no
//! rank ever holds more than one foreign K/V block. dQ accumulates locally.
//!
//! Overlap: each shift is started before the block it follows is computed and waited for after
//! (`Group::shift_start`), so the next K/V block (and, backward, the dK/dV accumulators)
//! travel while the current block computes; `Group::with_overlap(false)` runs them in turn.
//! Blocks on CUDA in bf16/f16 go to the flash kernel (`flash.rs`), merged in f32.
//!
//! Layouts: contiguous (rank r holds tokens [rN/P, (r+1)N/P)) or zigzag (chunks r and 2P-1-r of
//! 2P), positions travel with the layout into the causal mask, and pairs of runs the mask hides
//! are skipped, which is what makes zigzag balanced.
//!
//! Communication per layer and rank (b samples, H_kv kv heads, es bytes per element, f32 for the
//! accumulators): forward, K and V shift P-1 times: 2 b N H_kv d (P-1)/P elements; backward, K
//! and V shift P-1 times again and dK, dV shift P times: 2 b (N/P) H_kv d ((P-1) es + P x 4) bytes.
//!
//! Packed batches ([`Documents`]) send less where the layout allows ([`RingPlan`]): a block
//! travels only as far as the last rank that attends to some key of it (none at all when every
//! document stays inside one rank's share), and its dK/dV accumulator goes from that rank
//! straight home. An unpacked batch's blocks go the whole way round, the classic ring.

use std::cell::Cell;
use std::rc::Rc;

use tch::Tensor;

use super::blockwise::{heads_first, merge, pair_visible, runs, Blockwise, Work};
use super::flash::block_layout;
use super::{compute_kind, Documents, Mask, SeqLayout, SequenceParallel};
use crate::autograd::Tape;
use crate::comm::{Group, OpKind, Started};
use crate::error::TorchResultExt;
use crate::{Error, Result};

/// How far each block travels round the ring in one batch, and so who sends and receives what
/// at each step (the same table on every rank, from the layout, the mask and the documents).
///
/// Block j (rank j's K/V) is at rank `(j + t) mod P` at step t; `reach[j]` is the last step at
/// which that rank attends to some key of it (0: no other rank does). The block is passed on
/// at step t only if `t + 1 <= reach[j]`, and in the backward its accumulator goes on to the next
/// rank until step `reach[j]`, then straight home to rank j (the next rank when `reach[j] = P - 1`,
/// as in the classic ring).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RingPlan {
    reach: Vec<usize>,
}

impl RingPlan {
    /// Every block the whole way round: the classic ring, an unpacked batch.
    pub fn full(p: usize) -> RingPlan {
        RingPlan { reach: vec![p.saturating_sub(1); p] }
    }

    /// The plan of a batch whose ring ranks hold `segments` (first position, length): for
    /// packed documents, each block as far as a rank attends to it; otherwise [`full`](RingPlan::full).
    pub fn new(mask: &Mask, docs: Option<&Documents>, segments: &[Vec<(i64, i64)>]) -> RingPlan {
        let p = segments.len();
        let Some(docs) = docs.filter(|d| !d.is_whole()) else {
            return RingPlan::full(p);
        };
        let attends = |r: usize, j: usize| {
            segments[r].iter().any(|&q| segments[j].iter().any(|&k| pair_visible(mask, Some(docs), q, k)))
        };
        let reach = (0..p).map(|j| (1..p).rev().find(|&t| attends((j + t) % p, j)).unwrap_or(0)).collect();
        RingPlan { reach }
    }

    /// For each block, the last step a rank attends to it (0: only its owner).
    pub fn reach(&self) -> &[usize] {
        &self.reach
    }

    fn p(&self) -> usize {
        self.reach.len()
    }

    /// The block rank `r` holds at step `t`, if it holds one.
    pub fn held(&self, r: usize, t: usize) -> Option<usize> {
        let src = (r + self.p() - t % self.p()) % self.p();
        (t == 0 || t <= self.reach[src]).then_some(src)
    }

    /// Whether rank `r` passes its block of step `t` on to `r + 1`.
    pub fn passes_on(&self, r: usize, t: usize) -> bool {
        self.held(r, t).is_some_and(|src| t < self.reach[src])
    }

    /// Whether rank `r` receives a block from `r - 1` for step `t + 1`.
    pub fn receives(&self, r: usize, t: usize) -> bool {
        t + 1 < self.p() && self.held(r, t + 1).is_some()
    }

    /// Where rank `r` sends the accumulator of its block of step `t` after adding to it: the
    /// next rank, or home when this was the block's last stop (`None`: nowhere, it holds no
    /// block, or the block is its own and no one else attends to it).
    pub fn accumulator_to(&self, r: usize, t: usize) -> Option<usize> {
        let src = self.held(r, t)?;
        match t.cmp(&self.reach[src]) {
            std::cmp::Ordering::Less => Some((r + 1) % self.p()),
            std::cmp::Ordering::Equal if t > 0 => Some(src),
            _ => None,
        }
    }

    /// The rank whose step-`t` accumulator comes home to rank `r`: its block's last stop.
    pub fn home_from(&self, r: usize, t: usize) -> Option<usize> {
        (t > 0 && self.reach[r] == t).then_some((r + t) % self.p())
    }
}

/// The ring part of ring attention, shared with the Ulysses x ring hybrid.
pub(crate) struct RingCore {
    group: Group,
    mask: Mask,
    /// Segments (first position, length) of the tokens each ring rank holds, in row order.
    segments: Vec<Vec<(i64, i64)>>,
    /// For each query head, its kv head among the kv heads that travel; `None` when equal.
    kv_map: Option<Vec<i64>>,
    /// Attention work of the last forward on this rank.
    work: Cell<Work>,
}

impl RingCore {
    pub fn new(
        group: Group,
        mask: Mask,
        segments: Vec<Vec<(i64, i64)>>,
        kv_map: Option<Vec<i64>>,
    ) -> Result<RingCore> {
        let lens: Vec<i64> = segments.iter().map(|s| s.iter().map(|&(_, len)| len).sum()).collect();
        if lens.len() != group.size() || lens.iter().any(|&l| l != lens[0]) {
            return Err(Error::InvalidArgument {
                op: "ring_attention",
                group: group.info().to_string(),
                msg: format!("every rank of the ring must hold as many tokens; shares {lens:?}"),
            });
        }
        Ok(RingCore { group, mask, segments, kv_map, work: Cell::new(Work::default()) })
    }

    /// Attention work this rank did in the last forward.
    pub fn last_forward_work(&self) -> Work {
        self.work.get()
    }

    /// # Shapes
    /// `q`: `[b, s, Hq, d]`, `k`, `v`: `[b, s, Hkv, d]` (this rank's tokens) -> `[b, s, Hq, d]`;
    /// `docs`: the batch's packed documents, if any.
    pub fn forward(
        &self,
        tape: &Tape,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        docs: Option<&Documents>,
    ) -> Result<Tensor> {
        self.check_docs(q, docs)?;
        let scale = 1.0 / (q.size()[3] as f64).sqrt();
        // Who holds what and where each block travels: worked out once for both passes.
        let route = Rc::new(self.route(docs));
        let route_for_backward = Rc::clone(&route);
        // The forward leaves what the backward needs here.
        let saved: Rc<Cell<Option<Saved>>> = Rc::default();
        let saved_for_backward = Rc::clone(&saved);
        let out = tape.record(
            "ring_attention",
            &[q, k, v],
            |xs| {
                let (out, lse, work) = self.ring_forward(&xs[0], &xs[1], &xs[2], scale, docs, &route)?;
                self.work.set(work);
                let result =
                    out.f_transpose(1, 2).and_then(|o| o.f_to_kind(xs[0].kind())).op("ring_attention")?;
                // A strided input is a view of a larger buffer (the model's v is a slice of
                // its fused qkv projection): keep a compact copy, not the whole buffer.
                let own = |x: &Tensor| x.f_contiguous().op("ring_attention");
                saved.set(Some(Saved { q: own(&xs[0])?, k: own(&xs[1])?, v: own(&xs[2])?, out, lse }));
                Ok(vec![result])
            },
            {
                let ring = self.detached();
                let docs = docs.cloned();
                move |gs| {
                    let s = saved_for_backward.take().ok_or_else(|| Error::Tape {
                        op: "ring_attention",
                        msg: "the forward saved nothing for the backward".into(),
                    })?;
                    ring.ring_backward(&s, &gs[0], scale, docs.as_ref(), &route_for_backward)
                }
            },
        )?;
        out.into_iter().next().ok_or_else(|| Error::Tape { op: "ring_attention", msg: "no output".into() })
    }

    /// The forward ring without autograd, with the log-sum-exp.
    ///
    /// # Shapes
    /// As [`forward`](RingCore::forward); lse `[b, s, Hq]` in f32 (f64 for f64).
    pub fn forward_lse(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        docs: Option<&Documents>,
    ) -> Result<(Tensor, Tensor)> {
        self.check_docs(q, docs)?;
        let _no_grad = tch::no_grad_guard();
        let scale = 1.0 / (q.size()[3] as f64).sqrt();
        let (out, lse, work) = self.ring_forward(q, k, v, scale, docs, &self.route(docs))?;
        self.work.set(work);
        // [b, Hq, s, d] -> [b, s, Hq, d]; [b, Hq, s] -> [b, s, Hq]
        let out = out.f_transpose(1, 2).and_then(|o| o.f_to_kind(q.kind())).op("ring_attention")?;
        Ok((out, lse.f_transpose(1, 2).op("ring_attention")?))
    }

    /// Packed documents must describe this batch: b samples of the whole sequence (the ring's
    /// segments cover it).
    fn check_docs(&self, q: &Tensor, docs: Option<&Documents>) -> Result<()> {
        let Some(d) = docs else {
            return Ok(());
        };
        let n: i64 = self.segments.iter().flatten().map(|&(_, len)| len).sum();
        d.check("ring_attention", q.size()[0], n, &self.mask)?;
        if let Some(l) = d.layout() {
            let own: Vec<i64> = self.segments.iter().map(|s| s.iter().map(|&(_, len)| len).sum()).collect();
            if l.ranks() != own.len() || l.lens() != own.as_slice() {
                return Err(Error::InvalidArgument {
                    op: "ring_attention",
                    group: self.group.info().to_string(),
                    msg: format!(
                        "the batch's {} layout gives the ranks {:?} tokens; the ring holds {own:?}",
                        l.name(),
                        l.lens()
                    ),
                });
            }
        }
        Ok(())
    }

    /// The segments each rank holds in this batch: the batch's own layout if its documents
    /// carry one, else the ring's.
    fn segments_for(&self, docs: Option<&Documents>) -> Vec<Vec<(i64, i64)>> {
        match docs.and_then(Documents::layout) {
            Some(l) => l.grouped_segments(1),
            None => self.segments.clone(),
        }
    }

    /// The segments each rank holds in this batch and how far each block travels.
    fn route(&self, docs: Option<&Documents>) -> Route {
        let segments = self.segments_for(docs);
        let plan = RingPlan::new(&self.mask, docs, &segments);
        Route { segments, plan }
    }

    /// A copy without the work counter, for the backward closure.
    fn detached(&self) -> RingCore {
        RingCore {
            group: self.group.clone(),
            mask: self.mask,
            segments: self.segments.clone(),
            kv_map: self.kv_map.clone(),
            work: Cell::new(Work::default()),
        }
    }

    /// K or V `[b, s, Hkv, d]` -> `[b, Hq, s, d]` in the block dtype (`flash::block_layout`).
    fn expand(&self, kv: &Tensor) -> Result<Tensor> {
        let t = block_layout(kv)?;
        match &self.kv_map {
            None => Ok(t),
            Some(map) => {
                let index = Tensor::from_slice(map).f_to(t.device()).op("ring_attention")?;
                t.f_index_select(1, &index).op("ring_attention")
            }
        }
    }

    /// dK or dV `[b, Hq, t, d]` summed back onto the kv heads that travel: `[b, Hkv, t, d]`.
    fn reduce_heads(&self, g: &Tensor, kv_heads: i64) -> Result<Tensor> {
        match &self.kv_map {
            None => Ok(g.shallow_clone()),
            Some(map) => {
                let index = Tensor::from_slice(map).f_to(g.device()).op("ring_attention")?;
                let s = g.size();
                Tensor::f_zeros([s[0], kv_heads, s[2], s[3]], (g.kind(), g.device()))
                    .and_then(|z| z.f_index_add(1, &index, g))
                    .op("ring_attention")
            }
        }
    }

    /// The forward ring: (out `[b, Hq, s, d]`, lse `[b, Hq, s]`) in f32, and the work done.
    fn ring_forward(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        scale: f64,
        docs: Option<&Documents>,
        Route { segments, plan }: &Route,
    ) -> Result<(Tensor, Tensor, Work)> {
        let (p, r) = (self.group.size(), self.group.rank());
        let attn = Blockwise { mask: &self.mask, docs, scale, fused: true };
        let qh = block_layout(q)?;
        let (mut kb, mut vb) = (k.shallow_clone(), v.shallow_clone());
        let mut acc: Option<(Tensor, Tensor)> = None;
        let mut work = Work::default();
        for step in 0..p {
            // The next block travels while this one is attended to.
            let next = self.pass(plan, step, &kb, &vb)?;
            // Rank `src`'s block is here unless no rank from here on attends to it.
            if let Some(src) = plan.held(r, step) {
                let (o, lse, w) =
                    attn.forward(&qh, &self.expand(&kb)?, &self.expand(&vb)?, &segments[r], &segments[src])?;
                work += w;
                acc = Some(match acc {
                    None => (o, lse),
                    Some(prev) => merge(&prev, &(o, lse)).op("ring_attention")?,
                });
            }
            if let Some((k_next, v_next)) = arrived(next)? {
                (kb, vb) = (k_next, v_next);
            }
        }
        let (out, lse) = acc.ok_or_else(|| Error::Tape { op: "ring_attention", msg: "empty ring".into() })?;
        Ok((out, lse, work))
    }

    /// Starts passing this rank's block of step `t` on to `r + 1` and receiving the block of
    /// step `t + 1` from `r - 1`, each only where the plan says (K and V as two calls, the
    /// classic ring's two shifts).
    fn pass(&self, plan: &RingPlan, t: usize, k: &Tensor, v: &Tensor) -> Result<[Started<Vec<Tensor>>; 2]> {
        let (p, r) = (self.group.size(), self.group.rank());
        let one = |x: &Tensor| {
            let sends = if plan.passes_on(r, t) { vec![((r + 1) % p, x.shallow_clone())] } else { vec![] };
            let recvs = if plan.receives(r, t) { vec![((r + p - 1) % p, x)] } else { vec![] };
            self.group.peers_start(OpKind::Shift, sends, recvs)
        };
        Ok([one(k)?, one(v)?])
    }

    /// The backward ring: K/V go round again with their dK/dV accumulators.
    fn ring_backward(
        &self,
        s: &Saved,
        dout: &Tensor,
        scale: f64,
        docs: Option<&Documents>,
        Route { segments, plan }: &Route,
    ) -> Result<Vec<Tensor>> {
        let _no_grad = tch::no_grad_guard();
        let (p, r) = (self.group.size(), self.group.rank());
        let attn = Blockwise { mask: &self.mask, docs, scale, fused: true };
        let f = |e: tch::TchError| Error::Torch { op: "ring_attention", source: e };
        let qh = block_layout(&s.q)?;
        let doh = heads_first(dout)?;
        // delta = rowsum(dout * out), [b, Hq, s]
        let delta = doh
            .f_mul(&s.out)
            .and_then(|t| t.f_sum_dim_intlist([-1i64].as_slice(), false, t.kind()))
            .map_err(f)?;
        // Accumulators in f32 (f64 for f64), whatever dtype the blocks compute in.
        let acc_zeros =
            |t: &Tensor| Tensor::f_zeros(t.size(), (compute_kind(t.kind()), t.device())).map_err(f);
        let dq = acc_zeros(&qh)?;
        let kv_heads = s.k.size()[2];
        let (mut kb, mut vb) = (s.k.shallow_clone(), s.v.shallow_clone());
        // [b, Hkv, s, d] f32: the shape of every dK/dV accumulator, travelling with its block.
        let acc_like = heads_first(&s.k).and_then(|t| t.f_zeros_like().op("ring_attention"))?;
        let qruns = runs(&segments[r]);
        // The accumulators sent at the previous step (on to the next rank, or home), and what
        // they bring here: the accumulator of the block this rank holds next, and this rank's
        // own once its block's last stop is done with it.
        let mut travelling: Option<[Started<Vec<Tensor>>; 2]> = None;
        let (mut incoming, mut own): (Option<Pair>, Option<Pair>) = (None, None);
        let mut expected = (false, false); // (incoming, own) in the travelling batch
        for step in 0..p {
            let next = self.pass(plan, step, &kb, &vb)?;
            let held = plan.held(r, step);
            let mut contribution = None;
            if let Some(src) = held {
                let (kh, vh) = (self.expand(&kb)?, self.expand(&vb)?);
                let (dk_full, dv_full) = (acc_zeros(&kh)?, acc_zeros(&vh)?);
                for &(qo, q0, nq) in &qruns {
                    for &(ko, k0, nk) in &runs(&segments[src]) {
                        if !pair_visible(&self.mask, docs, (q0, nq), (k0, nk)) {
                            continue;
                        }
                        let narrow = |t: &Tensor, o: i64, n: i64| t.f_narrow(2, o, n).map_err(f);
                        let (dqp, dkp, dvp) = attn.backward_pair(
                            &narrow(&qh, qo, nq)?,
                            &narrow(&kh, ko, nk)?,
                            &narrow(&vh, ko, nk)?,
                            (
                                &narrow(&doh, qo, nq)?,
                                &narrow(&s.out, qo, nq)?,
                                &s.lse.f_narrow(2, qo, nq).map_err(f)?,
                                &delta.f_narrow(2, qo, nq).map_err(f)?,
                            ),
                            (q0, nq),
                            (k0, nk),
                        )?;
                        let _ = narrow(&dq, qo, nq)?.f_add_(&dqp).map_err(f)?;
                        let _ = narrow(&dk_full, ko, nk)?.f_add_(&dkp).map_err(f)?;
                        let _ = narrow(&dv_full, ko, nk)?.f_add_(&dvp).map_err(f)?;
                    }
                }
                contribution =
                    Some((self.reduce_heads(&dk_full, kv_heads)?, self.reduce_heads(&dv_full, kv_heads)?));
            }
            if let Some(batch) = travelling.take() {
                let (i, o) = accumulators_arrived(batch, expected)?;
                incoming = i;
                own = own.or(o);
            }
            // This block's accumulator: what came with it plus this rank's part, then on to
            // the next rank, home, or (its own block, which no one else attends to) kept.
            let mut sends = Vec::new();
            if let Some((dk_c, dv_c)) = contribution {
                let (dk_in, dv_in) = match incoming.take() {
                    Some(acc) => acc,
                    None => (acc_zeros(&acc_like)?, acc_zeros(&acc_like)?),
                };
                let (dk, dv) = (dk_in.f_add(&dk_c).map_err(f)?, dv_in.f_add(&dv_c).map_err(f)?);
                match plan.accumulator_to(r, step) {
                    Some(dst) => sends.push((dst, dk, dv)),
                    None => own = Some((dk, dv)),
                }
            }
            let mut from = Vec::new();
            expected = (plan.receives(r, step), plan.home_from(r, step).is_some());
            if expected.0 {
                from.push((r + p - 1) % p);
            }
            from.extend(plan.home_from(r, step));
            let start = |pick: fn(&(usize, Tensor, Tensor)) -> &Tensor| {
                let sends = sends.iter().map(|x| (x.0, pick(x).shallow_clone())).collect();
                self.group.peers_start(OpKind::Shift, sends, from.iter().map(|&j| (j, &acc_like)).collect())
            };
            travelling = Some([start(|x| &x.1)?, start(|x| &x.2)?]);
            if let Some((k_next, v_next)) = arrived(next)? {
                (kb, vb) = (k_next, v_next);
            }
        }
        if let Some(batch) = travelling {
            own = own.or(accumulators_arrived(batch, expected)?.1);
        }
        let (dk, dv) = own.ok_or_else(|| Error::Tape {
            op: "ring_attention",
            msg: format!("rank {r}'s dK/dV accumulator did not come home (reach {:?})", plan.reach()),
        })?;
        // [b, H, s, d] -> [b, s, H, d], in the inputs' dtypes
        let back =
            |t: &Tensor, like: &Tensor| t.f_transpose(1, 2).and_then(|t| t.f_to_kind(like.kind())).map_err(f);
        Ok(vec![back(&dq, &s.q)?, back(&dk, &s.k)?, back(&dv, &s.v)?])
    }
}

/// A K and V block, or their dK and dV accumulators.
type Pair = (Tensor, Tensor);

/// The K and V blocks a [`pass`](RingCore::pass) received, once complete (`None`: none came).
fn arrived([k, v]: [Started<Vec<Tensor>>; 2]) -> Result<Option<Pair>> {
    let (mut k, mut v) = (k.wait()?, v.wait()?);
    Ok(k.pop().zip(v.pop()))
}

/// The dK and dV accumulators of one step's batch, once complete: (the one coming with the next
/// block, this rank's own coming home), as `expected` says which were received, in that order.
fn accumulators_arrived(
    [dk, dv]: [Started<Vec<Tensor>>; 2],
    expected: (bool, bool),
) -> Result<(Option<Pair>, Option<Pair>)> {
    let (mut dk, mut dv) = (dk.wait()?.into_iter(), dv.wait()?.into_iter());
    let mut take = |wanted: bool| if wanted { dk.next().zip(dv.next()) } else { None };
    let incoming = take(expected.0);
    Ok((incoming, take(expected.1)))
}

/// One batch's segments per ring rank and the plan of who sends what ([`RingPlan`]).
struct Route {
    segments: Vec<Vec<(i64, i64)>>,
    plan: RingPlan,
}

/// What the forward keeps for the backward: its inputs (this rank's block only, compact), the
/// output and the log-sum-exp in f32.
struct Saved {
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
}

/// Ring attention over a sequence-parallel group.
pub struct RingAttention {
    core: RingCore,
    layout: SeqLayout,
    heads: i64,
    kv_heads: i64,
}

impl RingAttention {
    /// Ring attention over `group` for sequences of `n` tokens, contiguous or zigzag; `n` must
    /// split evenly (P or 2P chunks), since every block travels to every rank.
    pub fn new(
        group: Group,
        mask: Mask,
        n: i64,
        heads: i64,
        kv_heads: i64,
        zigzag: bool,
    ) -> Result<RingAttention> {
        let layout = RingAttention::check(n, group.size(), heads, kv_heads, zigzag)?;
        RingAttention::with_layout(group, mask, layout, heads, kv_heads)
    }

    /// Ring attention on any layout whose ranks hold as many tokens, e.g. one that balances a
    /// packed batch's work ([`Documents::balanced_layout`]).
    pub fn with_layout(
        group: Group,
        mask: Mask,
        layout: SeqLayout,
        heads: i64,
        kv_heads: i64,
    ) -> Result<RingAttention> {
        let p = group.size();
        if kv_heads < 1 || heads % kv_heads != 0 {
            return Err(Error::InvalidArgument {
                op: "ring_attention",
                group: group.info().to_string(),
                msg: format!("{heads} query heads cannot be grouped over {kv_heads} key/value heads"),
            });
        }
        if layout.ranks() != p {
            return Err(Error::InvalidArgument {
                op: "ring_attention",
                group: group.info().to_string(),
                msg: format!(
                    "the {} layout is for {} ranks, the group has {p}",
                    layout.name(),
                    layout.ranks()
                ),
            });
        }
        let segments = layout.grouped_segments(1);
        let g = heads / kv_heads;
        let kv_map = (g > 1).then(|| (0..heads).map(|h| h / g).collect());
        Ok(RingAttention { core: RingCore::new(group, mask, segments, kv_map)?, layout, heads, kv_heads })
    }

    /// Attention work this rank did in the last forward (per head and sample).
    pub fn last_forward_work(&self) -> Work {
        self.core.last_forward_work()
    }

    /// Whether ring attention can run on `p` ranks: its layout if so.
    pub fn check(n: i64, p: usize, heads: i64, kv_heads: i64, zigzag: bool) -> Result<SeqLayout> {
        let bad =
            |msg: String| Error::InvalidArgument { op: "ring_attention", group: format!("{p} ranks"), msg };
        if kv_heads < 1 || heads % kv_heads != 0 {
            return Err(bad(format!(
                "{heads} query heads cannot be grouped over {kv_heads} key/value heads"
            )));
        }
        if zigzag {
            return SeqLayout::zigzag(n, p);
        }
        if p == 0 || n % p as i64 != 0 {
            return Err(bad(format!(
                "ring attention needs N divisible by P (N={n}, P={p}); Ulysses handles any N"
            )));
        }
        SeqLayout::contiguous(n, p)
    }
}

impl SequenceParallel for RingAttention {
    fn name(&self) -> &'static str {
        "ring"
    }

    fn layout(&self) -> &SeqLayout {
        &self.layout
    }

    fn rank(&self) -> usize {
        self.core.group.rank()
    }

    fn group(&self) -> Option<&Group> {
        Some(&self.core.group)
    }

    /// # Shapes
    /// `q`: `[b, s_r, H, d]`, `k`, `v`: `[b, s_r, H_kv, d]` -> `[b, s_r, H, d]`.
    fn forward_docs(
        &self,
        tape: &Tape,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        docs: Option<&Documents>,
    ) -> Result<Tensor> {
        check_local("ring", &self.layout, self.rank(), self.heads, self.kv_heads, q, k, v)?;
        self.core.forward(tape, q, k, v, docs)
    }

    fn forward_lse_docs(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        docs: Option<&Documents>,
    ) -> Result<(Tensor, Tensor)> {
        check_local("ring", &self.layout, self.rank(), self.heads, self.kv_heads, q, k, v)?;
        self.core.forward_lse(q, k, v, docs)
    }

    /// Positions within documents of this rank's tokens in the batch's own layout, if its
    /// documents carry one.
    fn input_positions_docs(&self, docs: &Documents, device: tch::Device) -> Result<Tensor> {
        let layout = docs.layout().unwrap_or(&self.layout);
        docs.local_positions(&layout.positions(self.rank(), device)?)
    }
}

/// q `[b, s_r, H, d]` and k, v `[b, s_r, H_kv, d]` for this rank's share.
#[allow(clippy::too_many_arguments)]
pub(crate) fn check_local(
    op: &'static str,
    layout: &SeqLayout,
    rank: usize,
    heads: i64,
    kv_heads: i64,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
) -> Result<()> {
    let plan = super::HeadPlan::new(heads, kv_heads, 1)?;
    super::single::check_shapes(op, layout, &plan, rank, q, k, v)
}
