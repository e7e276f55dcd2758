//! How often the two ranks of a transfer compare its envelope (op, dtype, shape), for backends
//! where comparing costs a message of its own (MPI, and NCCL through its control group).
//!
//! Comparing every transfer costs a round trip per batch before any payload moves: on MPI about
//! as much as a small payload, and for NCCL a blocking exchange through the control group per
//! batch, thousands per training step. A correct program repeats a few call signatures (the same
//! shapes every layer and step), so each pair of ranks compares an envelope the first time they
//! see it, and again every `audit`-th transfer between them; in between, both fold every
//! envelope into a running hash, which travels with the next compared envelope. Ranks that
//! disagree on a new envelope get `Error::Mismatch` on both sides, as before; ranks that
//! disagree on envelopes both had seen before are caught at the next comparison, within `audit`
//! transfers, as a mismatch of their histories (the payload in between was of the sizes each
//! side expected, checked by the backend, and may hold the wrong elements). [`EnvelopeChecks::
//! Every`] compares every transfer, as the local backend always does.
//!
//! Both ranks of a pair make the same decision for each transfer because they see the same
//! sequence of envelopes on it (the sender's outgoing and the receiver's incoming): nothing but
//! that sequence decides. A program where they disagree on whether to compare ends with a
//! timeout, never a hang.

#![cfg_attr(not(any(feature = "mpi", feature = "nccl")), allow(dead_code))]

use std::collections::{HashMap, HashSet};
use std::sync::{Mutex, PoisonError};

use super::backend::{describe, HEADER_LEN};

/// When the envelopes of a transfer travel and are compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EnvelopeChecks {
    /// Every transfer.
    Every,
    /// A transfer whose envelope the pair of ranks has not compared before, and every
    /// `audit`-th transfer between them whatever it is, with the history in between.
    NewAndEvery {
        /// A comparison at least every `audit` transfers (1 compares every transfer).
        audit: u32,
    },
}

impl Default for EnvelopeChecks {
    /// New envelopes and every 64th transfer.
    fn default() -> Self {
        EnvelopeChecks::NewAndEvery { audit: 64 }
    }
}

/// Which way a transfer goes, seen from this rank.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Direction {
    Out,
    In,
}

/// What travels when an envelope is compared: the header, the running hash of every envelope
/// before it on this pair and direction, and how many of those were not compared.
pub(crate) const PROOF_LEN: usize = HEADER_LEN + 2;

/// One transfer's comparison: what this rank sends (or expects) and whether it travels now.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Entry {
    pub proof: [i64; PROOF_LEN],
    pub compare: bool,
}

#[derive(Default)]
struct History {
    compared: HashSet<[i64; HEADER_LEN]>,
    hash: u64,
    since: u32,
}

/// One rank's envelope history with every peer of one group.
pub(crate) struct Ledger {
    checks: EnvelopeChecks,
    pairs: Mutex<HashMap<(usize, Direction), History>>,
}

impl Ledger {
    pub(crate) fn new(checks: EnvelopeChecks) -> Ledger {
        Ledger { checks, pairs: Mutex::default() }
    }

    /// The entry of a transfer with `peer` (a group rank) whose header is `header`; nothing
    /// changes until [`commit`](Ledger::commit).
    pub(crate) fn entry(&self, peer: usize, dir: Direction, header: &[i64; HEADER_LEN]) -> Entry {
        let pairs = self.pairs.lock().unwrap_or_else(PoisonError::into_inner);
        let (compared, hash, since) =
            pairs.get(&(peer, dir)).map_or((false, 0, 0), |h| (h.compared.contains(header), h.hash, h.since));
        let compare = match self.checks {
            EnvelopeChecks::Every => true,
            EnvelopeChecks::NewAndEvery { audit } => !compared || since + 1 >= audit.max(1),
        };
        let mut proof = [0i64; PROOF_LEN];
        proof[..HEADER_LEN].copy_from_slice(header);
        proof[HEADER_LEN] = hash as i64;
        proof[HEADER_LEN + 1] = i64::from(since);
        Entry { proof, compare }
    }

    /// Adds a transfer to the history once its batch went through: compared (`true`) or not.
    pub(crate) fn commit(&self, peer: usize, dir: Direction, header: &[i64; HEADER_LEN], compared: bool) {
        let mut pairs = self.pairs.lock().unwrap_or_else(PoisonError::into_inner);
        let h = pairs.entry((peer, dir)).or_default();
        h.hash = header
            .iter()
            .fold(h.hash ^ 0x9e37_79b9_7f4a_7c15, |acc, &x| (acc ^ x as u64).wrapping_mul(0x100_0000_01b3));
        if compared {
            h.compared.insert(*header);
            h.since = 0;
        } else {
            h.since += 1;
        }
    }
}

/// What is wrong when a sender's proof `sent` differs from its receiver's `expected`, or `None`
/// when they agree: the envelope itself, or (the same envelope) the history before it.
pub(crate) fn disagreement(
    sent: &[i64; PROOF_LEN],
    expected: &[i64; PROOF_LEN],
    sender: usize,
    receiver: usize,
) -> Option<String> {
    let header = |p: &[i64; PROOF_LEN]| -> [i64; HEADER_LEN] {
        let mut h = [0; HEADER_LEN];
        h.copy_from_slice(&p[..HEADER_LEN]);
        h
    };
    if sent[..HEADER_LEN] != expected[..HEADER_LEN] {
        return Some(format!(
            "rank {sender} sent {} but rank {receiver} expected {}",
            describe(&header(sent)),
            describe(&header(expected))
        ));
    }
    if sent[HEADER_LEN..] != expected[HEADER_LEN..] {
        return Some(format!(
            "ranks {sender} and {receiver} agree on this {} but not on the transfers between them \
             since their last comparison ({} and {} transfers not compared, history hashes {:x} and \
             {:x}): an earlier batch was not the same on both",
            describe(&header(sent)),
            sent[HEADER_LEN + 1],
            expected[HEADER_LEN + 1],
            sent[HEADER_LEN],
            expected[HEADER_LEN]
        ));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(x: i64) -> [i64; HEADER_LEN] {
        [0, 6, 1, x, x, -1, -1, -1]
    }

    #[test]
    fn new_envelopes_and_every_audit_th_are_compared() {
        let l = Ledger::new(EnvelopeChecks::NewAndEvery { audit: 3 });
        let mut decisions = Vec::new();
        for x in [1, 1, 1, 1, 2, 1, 1, 1] {
            let e = l.entry(0, Direction::Out, &h(x));
            decisions.push(e.compare);
            l.commit(0, Direction::Out, &h(x), e.compare);
        }
        // new, seen, seen, seen (3 after the last comparison: audit), new, seen, seen, seen (audit)
        assert_eq!(decisions, [true, false, false, true, true, false, false, true]);
        // Directions and peers keep their own histories.
        assert!(l.entry(0, Direction::In, &h(1)).compare);
        assert!(l.entry(1, Direction::Out, &h(1)).compare);
        let every = Ledger::new(EnvelopeChecks::Every);
        every.commit(0, Direction::Out, &h(1), true);
        assert!(every.entry(0, Direction::Out, &h(1)).compare);
    }

    #[test]
    fn histories_that_differ_are_told_apart_from_envelopes_that_differ() {
        let (a, b) = (Ledger::new(EnvelopeChecks::default()), Ledger::new(EnvelopeChecks::default()));
        for l in [&a, &b] {
            l.commit(1, Direction::Out, &h(1), true);
            l.commit(1, Direction::Out, &h(2), true);
        }
        // The same two envelopes, skipped in another order on each side.
        a.commit(1, Direction::Out, &h(1), false);
        a.commit(1, Direction::Out, &h(2), false);
        b.commit(1, Direction::Out, &h(2), false);
        b.commit(1, Direction::Out, &h(1), false);
        let (pa, pb) = (a.entry(1, Direction::Out, &h(3)).proof, b.entry(1, Direction::Out, &h(3)).proof);
        let said = disagreement(&pa, &pb, 0, 1).expect("histories differ");
        assert!(said.contains("not on the transfers between them"), "{said}");
        assert!(disagreement(&pa, &pa, 0, 1).is_none());
        let pc = a.entry(1, Direction::Out, &h(4)).proof;
        assert!(disagreement(&pa, &pc, 0, 1).expect("envelopes differ").contains("sent"));
    }
}
