//! A prediction as text: the job and its assumptions, the step's time by op class and by
//! collective and link, throughput in both FLOP conventions, memory by component.

use std::fmt;

use super::step::Prediction;

const GIB: f64 = (1u64 << 30) as f64;

impl fmt::Display for Prediction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let j = &self.job;
        writeln!(
            f,
            "{} on {} x {} ({}), {} layers h={} H={} H_kv={} V={}",
            j.describe(),
            j.ranks,
            self.hardware,
            j.backend,
            j.model.n_layer,
            j.model.n_embd,
            j.model.n_head,
            j.model.n_kv_head,
            j.model.vocab_size
        )?;
        writeln!(
            f,
            "  attention {:?} {:?}; micro-batch {} x grad accumulation {} x dp {} = {} sequences per step; overlap {}",
            j.attention.kernel,
            j.attention.mask,
            j.micro_batch,
            j.grad_accum,
            j.dp,
            j.global_batch(),
            if j.overlap { "on" } else { "off" }
        )?;
        writeln!(
            f,
            "step {:.3} s (slowest rank {}), {:.0} tokens/s",
            self.step_s, self.slowest_rank, self.tokens_per_s
        )?;
        writeln!(
            f,
            "  per GPU: {:.1} TFLOP/s model FLOPs (MFU {:.1}%), {:.1} TFLOP/s Megatron-DeepSpeed convention ({:.1}% of peak)",
            self.model_tflops_per_gpu,
            100.0 * self.mfu,
            self.megatron_tflops_per_gpu,
            100.0 * self.megatron_mfu
        )?;
        writeln!(f, "  compute {:.3} s:", self.compute_s())?;
        for (name, class, s) in self.compute.iter().filter(|c| c.2 > 0.0) {
            writeln!(f, "    {name:<40} {:<13} {:>9.4} s", class.name(), s)?;
        }
        writeln!(f, "  communication, exposed {:.3} s:", self.comm_exposed_s())?;
        for c in self.comm.iter().filter(|c| c.calls > 0) {
            writeln!(
                f,
                "    {:<30} {:<10} {:<15} {:<7} {:<10} {:>5} calls {:>10.1} MiB {:>9.4} s (exposed {:.4})",
                c.what,
                format!("{:?}", c.phase).to_lowercase(),
                c.op.name(),
                format!("{:?}", c.group).to_lowercase(),
                c.link.name(),
                c.calls,
                c.bytes / (1u64 << 20) as f64,
                c.seconds,
                c.exposed
            )?;
        }
        if let Some(o) = &self.offload {
            writeln!(
                f,
                "  offload to host memory: {:.1} MiB out, {:.1} MiB back, {:.4} s on the host link (exposed {:.4})",
                o.bytes / (1u64 << 20) as f64,
                o.bytes_back / (1u64 << 20) as f64,
                o.seconds,
                o.exposed
            )?;
        }
        if let Some(o) = &self.optimizer_offload {
            writeln!(
                f,
                "  optimizer on the host (ZeRO-Offload): {:.3} G parameters, update {:.4} s, copies {:.4} s (exposed {:.4})",
                o.params / 1e9,
                o.update_s,
                o.copies_s,
                o.exposed
            )?;
        }
        let m = &self.memory;
        writeln!(
            f,
            "memory per GPU: peak {:.2} GiB live, {:.2} GiB resident, of {:.2} GiB usable: {}",
            m.peak_bytes / GIB,
            m.resident_bytes / GIB,
            m.capacity_bytes / GIB,
            if m.fits { "fits" } else { "OUT OF MEMORY" }
        )?;
        for t in m.all_terms().into_iter().filter(|t| t.bytes > 0.0) {
            writeln!(f, "    {:<52} {:>9.3} GiB", t.name, t.bytes / GIB)?;
        }
        if m.host_bytes > 0.0 {
            let cap = m.host_capacity_bytes.map_or("no host memory given".to_string(), |c| {
                format!("of {:.1} GiB a GPU's share of the node's host memory", c / GIB)
            });
            writeln!(f, "  offloaded to host memory: {:.3} GiB, {cap}", m.host_bytes / GIB)?;
        }
        Ok(())
    }
}
