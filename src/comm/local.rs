//! The local backend: P ranks as P threads of one process, exchanging tensors through memory.
//!
//! A transfer is a *letter* left in a mailbox, one FIFO per (group, sender, receiver). The letter
//! holds a view of the sender's tensor (no copy) and its [`Envelope`]; the receiver checks the
//! envelope, copies the data straight into its output view (one copy per element, on CPU or
//! between device tensors) and returns a receipt. A sender returns only once every letter it
//! posted has its receipt, so its inputs are never read after it returns.
//!
//! One mutex and one condition variable serve the whole world: letters, receipts, and the two
//! facts that release every waiting rank at once, "a rank failed" and "a rank exited". Copies run
//! outside the lock. Every wait is bounded by the world's timeout.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use tch::Tensor;

use super::backend::{Backend, Envelope};
use super::group::GroupInfo;
use super::OpKind;
use crate::{Error, Result};

/// The state shared by the ranks (threads) of one local launch.
pub struct LocalWorld {
    size: usize,
    timeout: Duration,
    state: Mutex<WorldState>,
    changed: Condvar,
}

#[derive(Default)]
struct WorldState {
    /// Letters in flight, FIFO per (group id, sender, receiver) in global ranks.
    mail: HashMap<(String, usize, usize), VecDeque<Letter>>,
    /// Receipts by letter id: Ok, or what the receiver found wrong.
    receipts: HashMap<u64, std::result::Result<(), String>>,
    next_id: u64,
    /// The first failure (global rank, why); once set, every waiting rank gives up.
    failed: Option<(usize, String)>,
    /// Ranks whose function has returned.
    exited: Vec<bool>,
}

struct Letter {
    id: u64,
    envelope: Envelope,
    data: Tensor,
}

impl LocalWorld {
    /// A world of `size` ranks whose waits give up after `timeout`.
    pub fn new(size: usize, timeout: Duration) -> Arc<LocalWorld> {
        let state = WorldState { exited: vec![false; size], ..Default::default() };
        Arc::new(LocalWorld { size, timeout, state: Mutex::new(state), changed: Condvar::new() })
    }

    pub fn size(&self) -> usize {
        self.size
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Rank `rank`'s connection, for its world group and every subgroup.
    pub fn endpoint(self: &Arc<Self>, rank: usize) -> Arc<dyn Backend> {
        Arc::new(LocalEndpoint { world: Arc::clone(self), rank })
    }

    /// Records that `rank` failed (the first record wins) and wakes every waiting rank.
    pub fn fail(&self, rank: usize, why: String) {
        let mut st = self.lock();
        st.failed.get_or_insert((rank, why));
        self.changed.notify_all();
    }

    /// Records that `rank`'s function returned; ranks still waiting for it give up.
    pub fn exit(&self, rank: usize) {
        self.lock().exited[rank] = true;
        self.changed.notify_all();
    }

    /// The first recorded failure, if any.
    pub fn first_failure(&self) -> Option<(usize, String)> {
        self.lock().failed.clone()
    }

    fn lock(&self) -> MutexGuard<'_, WorldState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// One rank's connection to a [`LocalWorld`].
struct LocalEndpoint {
    world: Arc<LocalWorld>,
    /// Global rank.
    rank: usize,
}

impl Backend for LocalEndpoint {
    fn name(&self) -> &'static str {
        "local"
    }

    fn exchange(
        &self,
        group: &GroupInfo,
        op: OpKind,
        sends: Vec<Option<Tensor>>,
        recvs: Vec<Option<Tensor>>,
    ) -> Result<()> {
        let ex = Exchange { world: &self.world, group, op, me: self.rank, start: Instant::now() };
        let posted = ex.post(sends)?;
        ex.receive(recvs)?;
        ex.await_receipts(posted)
    }

    fn split(
        &self,
        _parent: &GroupInfo,
        _color: Option<usize>,
        _key: usize,
        sub: Option<&GroupInfo>,
    ) -> Result<Option<Arc<dyn Backend>>> {
        // Mailboxes are keyed by group id, so one endpoint serves every group.
        Ok(sub.map(|_| {
            Arc::new(LocalEndpoint { world: Arc::clone(&self.world), rank: self.rank }) as Arc<dyn Backend>
        }))
    }
}

/// One call of [`Backend::exchange`] on one rank.
struct Exchange<'a> {
    world: &'a LocalWorld,
    group: &'a GroupInfo,
    op: OpKind,
    /// Global rank of the caller.
    me: usize,
    start: Instant,
}

impl Exchange<'_> {
    /// Leaves a letter for every peer in `sends`; returns (letter id, peer) of each.
    fn post(&self, sends: Vec<Option<Tensor>>) -> Result<Vec<(u64, usize)>> {
        let mut st = self.world.lock();
        self.check_failed(&st)?;
        let mut posted = Vec::new();
        for (j, data) in sends.into_iter().enumerate() {
            let Some(data) = data else { continue };
            let peer = self.group.ranks[j];
            let id = st.next_id;
            st.next_id += 1;
            let envelope = Envelope::of(self.op, &data);
            let key = (self.group.id.clone(), self.me, peer);
            st.mail.entry(key).or_default().push_back(Letter { id, envelope, data });
            posted.push((id, peer));
        }
        self.world.changed.notify_all();
        Ok(posted)
    }

    /// Takes the letter of every peer in `recvs`, in whatever order they arrive, and copies it
    /// into place.
    fn receive(&self, recvs: Vec<Option<Tensor>>) -> Result<()> {
        let mut pending: Vec<(usize, Tensor)> =
            recvs.into_iter().enumerate().filter_map(|(j, t)| t.map(|t| (self.group.ranks[j], t))).collect();
        let mut st = self.world.lock();
        while !pending.is_empty() {
            let arrived = pending.iter().enumerate().find_map(|(i, (peer, _))| {
                let letter = st.mail.get_mut(&self.key(*peer)).and_then(VecDeque::pop_front);
                letter.map(|letter| (i, letter))
            });
            let Some((i, letter)) = arrived else {
                self.check_failed(&st)?;
                if let Some((peer, _)) = pending.iter().find(|(peer, _)| st.exited[*peer]) {
                    return Err(self.abort(
                        st,
                        format!("rank {peer} returned from its function without sending its part"),
                    ));
                }
                let peers: Vec<usize> = pending.iter().map(|(peer, _)| *peer).collect();
                st = self.wait(st, || format!("waiting for data from ranks {peers:?}"))?;
                continue;
            };
            let (peer, mut dst) = pending.swap_remove(i);
            drop(st);
            let expected = Envelope::of(self.op.peer_kind(), &dst);
            let outcome = if letter.envelope != expected {
                Err(format!("rank {peer} sent {} but rank {} expected {expected}", letter.envelope, self.me))
            } else {
                dst.f_copy_(&letter.data).map_err(|e| format!("copy from rank {peer}: {e}"))
            };
            st = self.world.lock();
            st.receipts.insert(letter.id, outcome.clone());
            self.world.changed.notify_all();
            if let Err(detail) = outcome {
                return Err(self.mismatch(st, detail));
            }
        }
        Ok(())
    }

    /// Waits until every letter this rank posted has been received.
    fn await_receipts(&self, mut posted: Vec<(u64, usize)>) -> Result<()> {
        let mut st = self.world.lock();
        loop {
            let mut complaint = None;
            posted.retain(|(id, _)| match st.receipts.remove(id) {
                Some(Ok(())) => false,
                Some(Err(detail)) => {
                    complaint = Some(detail);
                    false
                }
                None => true,
            });
            if let Some(detail) = complaint {
                return Err(self.mismatch(st, detail));
            }
            if posted.is_empty() {
                return Ok(());
            }
            self.check_failed(&st)?;
            if let Some((_, peer)) = posted.iter().find(|(_, peer)| st.exited[*peer]) {
                let why = format!("rank {peer} returned from its function without receiving");
                return Err(self.abort(st, why));
            }
            let peers: Vec<usize> = posted.iter().map(|(_, peer)| *peer).collect();
            st = self.wait(st, || format!("waiting for ranks {peers:?} to receive"))?;
        }
    }

    fn key(&self, sender: usize) -> (String, usize, usize) {
        (self.group.id.clone(), sender, self.me)
    }

    /// Sleeps until something changes or the timeout runs out (then the world fails).
    fn wait<'g>(
        &self,
        st: MutexGuard<'g, WorldState>,
        what: impl FnOnce() -> String,
    ) -> Result<MutexGuard<'g, WorldState>> {
        let waited = self.start.elapsed();
        let timeout = self.world.timeout;
        if waited >= timeout {
            let err = Error::Timeout {
                op: self.op.name(),
                group: self.group.to_string(),
                rank: self.me,
                waited,
                timeout,
                what: what(),
            };
            self.fail_world(st, &err);
            return Err(err);
        }
        let (st, _) =
            self.world.changed.wait_timeout(st, timeout - waited).unwrap_or_else(PoisonError::into_inner);
        Ok(st)
    }

    fn check_failed(&self, st: &WorldState) -> Result<()> {
        match &st.failed {
            Some((rank, why)) => Err(Error::Aborted {
                op: self.op.name(),
                group: self.group.to_string(),
                rank: self.me,
                cause: format!("rank {rank} failed: {why}"),
            }),
            None => Ok(()),
        }
    }

    fn mismatch(&self, st: MutexGuard<'_, WorldState>, detail: String) -> Error {
        let err = Error::Mismatch { op: self.op.name(), group: self.group.to_string(), detail };
        self.fail_world(st, &err);
        err
    }

    fn abort(&self, st: MutexGuard<'_, WorldState>, cause: String) -> Error {
        let err = Error::Aborted { op: self.op.name(), group: self.group.to_string(), rank: self.me, cause };
        self.fail_world(st, &err);
        err
    }

    /// A collective that failed leaves its group unusable: release every other rank.
    fn fail_world(&self, mut st: MutexGuard<'_, WorldState>, err: &Error) {
        st.failed.get_or_insert((self.me, err.to_string()));
        self.world.changed.notify_all();
    }
}
