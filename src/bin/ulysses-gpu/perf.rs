//! Throughput and memory on the GPU: the bf16 matmul peak, and the 1.3B GPT's layer stack with
//! Ulysses at P=1 on NCCL (the path a multi-GPU run takes, with one rank), its CUDA allocator
//! peak against the activation formula of docs/design.md §2.4.

use std::time::Duration;

use anyhow::{ensure, Result};
use tch::{Kind, Tensor};
use ulysses::attention::{AttentionConfig, Kernel, Mask, StrategyConfig};
use ulysses::comm::{nccl_group, LocalLaunch};
use ulysses::device::{cuda_memory, reset_cuda_peak};
use ulysses::model::{shift_labels, Gpt, GptConfig};

use crate::{time, GPU};

const MIB: f64 = 1024.0 * 1024.0;

/// bf16 matmul TFLOP/s at 8192^3: the peak MFU is measured against.
pub fn matmul_peak() -> Result<f64> {
    let n = 8192i64;
    let (a, b) = (Tensor::randn([n, n], (Kind::BFloat16, GPU)), Tensor::randn([n, n], (Kind::BFloat16, GPU)));
    let s = time(20, || {
        let _ = a.matmul(&b);
        Ok(())
    })?;
    Ok(2.0 * (n * n * n) as f64 / s / 1e12)
}

/// One measurement of the layer stack.
pub struct Stack {
    /// Median seconds of one forward + backward.
    pub seconds: f64,
    pub tokens_per_s: f64,
    /// Model FLOPs (`GptConfig::train_flops`) per second.
    pub tflops: f64,
    /// The CUDA allocator's peak allocated during a forward + backward, and the bytes held
    /// before it (parameters and their gradients, kept by the earlier steps), in MiB.
    pub peak_mib: f64,
    pub model_mib: f64,
    /// The activation formula: L x 34 x s x b x h bytes (Korthikanti et al. 2022, §4, 16-bit
    /// activations, flash attention: no s^2 term).
    pub predicted_mib: f64,
}

impl Stack {
    pub fn describe(&self, peak: Option<f64>) -> String {
        let mfu = peak.map_or(String::from("n/a"), |p| format!("{:.1}%", 100.0 * self.tflops / p));
        let above = self.peak_mib - self.model_mib;
        format!(
            "{:.0} tokens/s, {:.1} model TFLOP/s, MFU {mfu}; CUDA peak allocated {:.0} MiB = parameters and \
             gradients {:.0} + {:.0} (activations, temporaries), formula 34sbhL = {:.0} MiB: measured/predicted {:.2}",
            self.tokens_per_s,
            self.tflops,
            self.peak_mib,
            self.model_mib,
            above,
            self.predicted_mib,
            above / self.predicted_mib
        )
    }
}

/// Forward + backward of the 1.3B GPT with `layers` layers at `n` tokens, bf16, Ulysses at P=1
/// on an NCCL world of one (SDPA, which takes the flash kernel).
pub fn gpt_stack(layers: i64, n: i64) -> Result<Stack> {
    let out = LocalLaunch::new(1).run(|ctx| -> Result<Stack> {
        let world = nccl_group(ctx.world(), GPU, Duration::from_secs(120))?;
        let cfg = GptConfig { n_layer: layers, ..GptConfig::gpt_1_3b() };
        let attn = AttentionConfig::new(Kernel::Sdpa, Mask::Causal);
        let strategy = StrategyConfig::Ulysses.build(&world, attn, n, cfg.n_head, cfg.n_kv_head)?;
        let model = Gpt::new(&cfg, strategy, Kind::BFloat16, GPU)?;
        let tokens = Tensor::randint(cfg.vocab_size, [1, n], (Kind::Int64, GPU));
        let labels = shift_labels(&tokens)?;
        let step = || -> Result<()> {
            model.zero_grad();
            model.forward_backward(&tokens, &labels)?;
            world.synchronize()?;
            Ok(())
        };
        let s = time(3, step)?;
        // Memory of one more step, from the parameters (and the gradients the earlier steps left).
        model.zero_grad();
        crate::sync();
        let model_mib = cuda_memory(0)?.allocated as f64 / MIB;
        reset_cuda_peak(0)?;
        step()?;
        crate::sync();
        let peak_mib = cuda_memory(0)?.peak_allocated as f64 / MIB;
        ensure!(
            peak_mib >= model_mib,
            "peak {peak_mib:.0} MiB below the {model_mib:.0} MiB held before the step"
        );
        let activations = 34.0 * (n * cfg.n_embd * layers) as f64;
        Ok(Stack {
            seconds: s,
            tokens_per_s: n as f64 / s,
            tflops: cfg.train_flops(n, n, &Mask::Causal) / s / 1e12,
            peak_mib,
            model_mib,
            predicted_mib: activations / MIB,
        })
    })?;
    out.into_iter().next().ok_or_else(|| anyhow::anyhow!("no rank reported"))
}
