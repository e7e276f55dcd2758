//! Pricing collectives: where a group sits, and the alpha-beta time of each call on its links.
//!
//! Ranks fill nodes in order (rank g on node g / devices_per_node). A group of `P` ranks with
//! stride `st` (SP groups are contiguous, DP groups stride SP) has `G` members per node: all of
//! them when it fits in one node, `devices_per_node / st` when the stride is smaller than a
//! node, one otherwise. Its traffic then splits between the intra-node link (NVLink/NVSwitch)
//! and the inter-node link (a node's NICs shared by its devices: per-device bandwidth):
//!
//! - all-to-all: a rank sends `bytes (G-1)/(P-1)` inside its node and `bytes (P-G)/(P-1)`
//!   out of it, both at once; the slower part sets the time (an all-to-all that leaves the node
//!   is limited by the node's NICs); `P-1` latency steps;
//! - ring all-gather, reduce-scatter (`P-1` steps), all-reduce (`2(P-1)` steps), shift (1 step):
//!   every byte crosses the ring's slowest link, inter-node as soon as the ring spans nodes.
//!
//! `time = latency x steps + bytes / (bandwidth x efficiency(op))`, with the bytes of
//! [`super::bytes`] (what the counters count).

use crate::comm::OpKind;
use crate::Result;

use super::hardware::{Hardware, Link};

/// Where a group sits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Placement {
    pub size: usize,
    /// Members of the group in one node.
    pub per_node: usize,
}

impl Placement {
    /// The placement of a group of `size` ranks with `stride` on nodes of `devices_per_node`.
    pub fn new(size: usize, stride: usize, devices_per_node: usize) -> Placement {
        let per_node = if size * stride <= devices_per_node {
            size
        } else if stride < devices_per_node {
            (devices_per_node / stride).clamp(1, size)
        } else {
            1
        };
        Placement { size, per_node }
    }

    /// Whether the group spans more than one node.
    pub fn crosses_nodes(&self) -> bool {
        self.per_node < self.size
    }
}

/// Which links a call used, for the breakdown.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum LinkUse {
    None,
    Intra,
    Inter,
}

impl LinkUse {
    pub fn name(self) -> &'static str {
        match self {
            LinkUse::None => "-",
            LinkUse::Intra => "intra-node",
            LinkUse::Inter => "inter-node",
        }
    }
}

/// Seconds of `calls` calls of `op` sending `bytes` in total (this rank) on a group placed as
/// `at`, over the `backend` network of `hw`; and the link that bounds it.
pub fn price(
    hw: &Hardware,
    backend: &str,
    op: OpKind,
    at: Placement,
    calls: u64,
    bytes: f64,
) -> Result<(f64, LinkUse)> {
    let p = at.size;
    if p <= 1 || calls == 0 {
        return Ok((0.0, LinkUse::None));
    }
    let net = hw.network(backend)?;
    let inter = match (&net.inter, at.crosses_nodes()) {
        (Some(l), true) => Some(l),
        (None, true) => {
            return Err(crate::Error::InvalidArgument {
                op: "cost",
                group: hw.name.clone(),
                msg: format!(
                    "a group of {p} ranks spans {} nodes of {} devices, but network.{backend} has no inter-node link",
                    p.div_ceil(at.per_node),
                    hw.node.devices_per_node
                ),
            })
        }
        _ => None,
    };
    let steps = match op {
        OpKind::AllReduce => 2 * (p - 1),
        OpKind::Shift | OpKind::Send | OpKind::Recv => 1,
        _ => p - 1,
    } as f64;
    let transfer = |link: &Link, b: f64| -> Result<f64> {
        Ok(b / (link.bandwidth_gbs * 1e9 * hw.link_efficiency(link, op)?))
    };
    let latency = |link: &Link| hw.link_latency_s(link) * steps * calls as f64;
    Ok(match (op, inter) {
        (_, None) => (latency(&net.intra) + transfer(&net.intra, bytes)?, LinkUse::Intra),
        (OpKind::AllToAll, Some(x)) => {
            let g = at.per_node as f64;
            let intra_b = bytes * (g - 1.0) / (p as f64 - 1.0);
            let inter_b = bytes * (p as f64 - g) / (p as f64 - 1.0);
            (latency(x) + transfer(&net.intra, intra_b)?.max(transfer(x, inter_b)?), LinkUse::Inter)
        }
        (_, Some(x)) => (latency(x) + transfer(x, bytes)?, LinkUse::Inter),
    })
}
