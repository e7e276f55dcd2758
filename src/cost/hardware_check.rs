//! Checking a hardware file field by field: every number positive and finite, efficiencies
//! in (0, 1], curves increasing in size, every link with every collective's efficiency. The
//! message names the field and the number.

use crate::comm::OpKind;

use super::hardware::{Hardware, Link};

impl Hardware {
    /// Every number checked: positive, efficiencies in (0, 1], curves increasing in size.
    pub(super) fn validate(&self) -> std::result::Result<(), String> {
        let d = &self.device;
        positive("device.memory_gib", d.memory_gib)?;
        positive("device.memory_bandwidth_gbs", d.memory_bandwidth_gbs)?;
        if !(d.reserved_gib >= 0.0 && d.reserved_gib < d.memory_gib) {
            return Err(format!(
                "device.reserved_gib = {} must lie in [0, memory_gib = {})",
                d.reserved_gib, d.memory_gib
            ));
        }
        if !(d.workspace_gib.is_finite() && d.workspace_gib >= 0.0) {
            return Err(format!("device.workspace_gib = {} must be zero or positive", d.workspace_gib));
        }
        if !(d.code_pages_gib.is_finite() && d.code_pages_gib >= 0.0) {
            return Err(format!("device.code_pages_gib = {} must be zero or positive", d.code_pages_gib));
        }
        if !(d.allocator_slack.is_finite() && d.allocator_slack >= 1.0) {
            return Err(format!("device.allocator_slack = {} must be at least 1", d.allocator_slack));
        }
        if d.peak_tflops.is_empty() {
            return Err("device.peak_tflops must give at least one dtype (f32, bf16, f16, f64)".into());
        }
        for (k, v) in &d.peak_tflops {
            if !["f32", "f64", "bf16", "f16"].contains(&k.as_str()) {
                return Err(format!("device.peak_tflops.{k}: unknown dtype; use f32, f64, bf16, f16"));
            }
            positive(&format!("device.peak_tflops.{k}"), *v)?;
        }
        let n = &self.node;
        if n.devices_per_node == 0 || n.compute_slots == 0 {
            return Err(format!(
                "node.devices_per_node = {} and node.compute_slots = {} must be at least 1",
                n.devices_per_node, n.compute_slots
            ));
        }
        let e = &self.efficiency;
        fraction("efficiency.memory_bound", e.memory_bound)?;
        for (op, v) in &e.memory_bound_ops {
            if !["layer_norm", "rope", "add", "gelu", "cross_entropy", "ring", "copy", "a2a_pack"]
                .contains(&op.as_str())
            {
                return Err(format!(
                    "efficiency.memory_bound_ops.{op}: unknown op; use layer_norm, rope, add, gelu, cross_entropy, ring, copy, a2a_pack"
                ));
            }
            fraction(&format!("efficiency.memory_bound_ops.{op}"), *v)?;
        }
        curve("efficiency.matmul", &e.matmul)?;
        if !(e.layer_overhead_us.is_finite() && e.layer_overhead_us >= 0.0) {
            return Err(format!(
                "efficiency.layer_overhead_us = {} must be zero or positive",
                e.layer_overhead_us
            ));
        }
        for c in &e.attention {
            if c.head_dim < 1 {
                return Err(format!("efficiency.attention head_dim = {} must be at least 1", c.head_dim));
            }
            curve(&format!("efficiency.attention (head_dim {})", c.head_dim), &c.points)?;
        }
        let b = &self.bands;
        for (field, [lo, hi]) in [
            ("matmul", b.matmul),
            ("memory_bound", b.memory_bound),
            ("network", b.network),
            ("host_link", b.host_link),
        ] {
            if !(lo.is_finite() && hi.is_finite() && lo > 0.0 && lo <= 1.0 && hi >= 1.0) {
                return Err(format!(
                    "bands.{field} = [{lo}, {hi}] must be [pessimistic <= 1, optimistic >= 1], both positive"
                ));
            }
        }
        let [lo, hi] = b.latency;
        if !(lo.is_finite() && hi.is_finite() && lo >= 1.0 && hi > 0.0 && hi <= 1.0) {
            return Err(format!(
                "bands.latency = [{lo}, {hi}] must be [pessimistic >= 1, optimistic in (0, 1]]"
            ));
        }
        if let Some([lo, hi]) = b.reserved_gib {
            if !(hi >= 0.0 && hi <= d.reserved_gib && lo >= d.reserved_gib && lo < d.memory_gib) {
                return Err(format!(
                    "bands.reserved_gib = [{lo}, {hi}] must hold device.reserved_gib = {} between them \
                     (pessimistic first) and stay below memory_gib = {}",
                    d.reserved_gib, d.memory_gib
                ));
            }
        }
        if let Some(h) = &self.host {
            if !(h.link_gbs.is_finite() && h.link_gbs > 0.0) {
                return Err(format!("host.link_gbs = {} must be positive", h.link_gbs));
            }
            fraction("host.link_efficiency", h.link_efficiency)?;
            if !(h.memory_gib.is_finite() && h.memory_gib > 0.0) {
                return Err(format!("host.memory_gib = {} must be positive", h.memory_gib));
            }
            if let Some(bw) = h.memory_gbs {
                positive("host.memory_gbs", bw)?;
            }
            if let Some(eff) = h.adam_efficiency {
                fraction("host.adam_efficiency", eff)?;
            }
            if h.memory_gbs.is_some() != h.adam_efficiency.is_some() {
                return Err(
                    "host.memory_gbs and host.adam_efficiency go together: give both or neither".into()
                );
            }
        }
        if self.network.is_empty() {
            return Err("give at least one [network.<backend>] (nccl, local or mpi)".into());
        }
        for (name, net) in &self.network {
            link(&format!("network.{name}.intra"), &net.intra)?;
            if let Some(inter) = &net.inter {
                link(&format!("network.{name}.inter"), inter)?;
            }
        }
        Ok(())
    }
}

fn positive(field: &str, v: f64) -> std::result::Result<(), String> {
    if v.is_finite() && v > 0.0 {
        Ok(())
    } else {
        Err(format!("{field} = {v} must be a positive number"))
    }
}

fn fraction(field: &str, v: f64) -> std::result::Result<(), String> {
    if v.is_finite() && v > 0.0 && v <= 1.0 {
        Ok(())
    } else {
        Err(format!("{field} = {v} must lie in (0, 1]"))
    }
}

fn curve(field: &str, points: &[[f64; 2]]) -> std::result::Result<(), String> {
    if points.is_empty() {
        return Err(format!("{field} needs at least one [size, efficiency] point"));
    }
    for (i, [size, eff]) in points.iter().enumerate() {
        positive(&format!("{field}[{i}] size"), *size)?;
        fraction(&format!("{field}[{i}] efficiency"), *eff)?;
        if i > 0 && *size <= points[i - 1][0] {
            return Err(format!("{field}: sizes must increase ({} then {size})", points[i - 1][0]));
        }
    }
    Ok(())
}

fn link(field: &str, l: &Link) -> std::result::Result<(), String> {
    positive(&format!("{field}.bandwidth_gbs"), l.bandwidth_gbs)?;
    if !(l.latency_us.is_finite() && l.latency_us >= 0.0) {
        return Err(format!("{field}.latency_us = {} must be zero or positive", l.latency_us));
    }
    for op in [OpKind::AllToAll, OpKind::AllGather, OpKind::ReduceScatter, OpKind::AllReduce, OpKind::Shift] {
        match l.efficiency.get(op.name()) {
            Some(v) => fraction(&format!("{field}.efficiency.{}", op.name()), *v)?,
            None => return Err(format!("{field}.efficiency lacks {}", op.name())),
        }
    }
    Ok(())
}
