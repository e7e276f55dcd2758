//! Byte accounting: what one rank sent and received in one group, per kind of op.
//!
//! Definitions (docs/design.md §2.2): a rank's `bytes_sent` counts the elements it hands to *other*
//! ranks, times the dtype size; the part of a tensor that stays on the rank is never counted.
//! `bytes_received` is the same from the receiving side. Over a group, the sums of the two agree.

use std::collections::BTreeMap;
use std::fmt;

use super::OpKind;

/// Counters of one op kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OpCount {
    /// Collective calls (one all-reduce is one call, whatever it runs inside).
    pub calls: u64,
    pub bytes_sent: u64,
    pub bytes_received: u64,
}

/// One rank's counters for one group.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CommStats {
    by_op: BTreeMap<OpKind, OpCount>,
}

impl CommStats {
    pub(crate) fn add_bytes(&mut self, op: OpKind, sent: u64, received: u64) {
        let c = self.by_op.entry(op).or_default();
        c.bytes_sent += sent;
        c.bytes_received += received;
    }

    pub(crate) fn add_call(&mut self, op: OpKind) {
        self.by_op.entry(op).or_default().calls += 1;
    }

    /// Adds another rank's or group's counters to these.
    pub fn merge(&mut self, other: &CommStats) {
        for (op, c) in other.iter() {
            let mine = self.by_op.entry(op).or_default();
            mine.calls += c.calls;
            mine.bytes_sent += c.bytes_sent;
            mine.bytes_received += c.bytes_received;
        }
    }

    /// The counters of one op kind (zero if it never ran).
    pub fn op(&self, op: OpKind) -> OpCount {
        self.by_op.get(&op).copied().unwrap_or_default()
    }

    /// Bytes sent over all op kinds.
    pub fn bytes_sent(&self) -> u64 {
        self.by_op.values().map(|c| c.bytes_sent).sum()
    }

    /// Bytes received over all op kinds.
    pub fn bytes_received(&self) -> u64 {
        self.by_op.values().map(|c| c.bytes_received).sum()
    }

    /// The op kinds that ran, with their counters.
    pub fn iter(&self) -> impl Iterator<Item = (OpKind, OpCount)> + '_ {
        self.by_op.iter().map(|(k, v)| (*k, *v))
    }
}

impl fmt::Display for CommStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "{:<16}{:>7}{:>16}{:>16}", "op", "calls", "bytes sent", "bytes received")?;
        for (op, c) in self.iter() {
            writeln!(f, "{:<16}{:>7}{:>16}{:>16}", op.name(), c.calls, c.bytes_sent, c.bytes_received)?;
        }
        Ok(())
    }
}
