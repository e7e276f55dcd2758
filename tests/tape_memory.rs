//! What a taped op keeps alive until the backward: the graph of its inputs, not their values.
//! Measured on the process's RSS with 64 MiB tensors, so this file holds this one test (tests
//! of one file share a process, and would add their own allocations to the reading).

use anyhow::{ensure, Context, Result};
use tch::{Device, Kind, Tensor};
use ulysses::autograd::Tape;
use ulysses::comm::launch;

fn rss_mib() -> Result<f64> {
    let text = std::fs::read_to_string("/proc/self/status")?;
    let line = text.lines().find(|l| l.starts_with("VmRSS:")).context("no VmRSS")?;
    let kb: f64 = line.split_whitespace().nth(1).context("no value")?.parse()?;
    Ok(kb / 1024.0)
}

#[test]
fn a_record_keeps_the_graph_of_its_inputs_but_not_their_values() -> Result<()> {
    // SAFETY: mallopt only sets a glibc tuning parameter: every allocation of 1 MiB or more is
    // mapped on its own and unmapped when freed, so the RSS follows live tensors.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20);
    }
    const MIB: i64 = 64;
    let elems = MIB * (1 << 20) / 4;
    launch(1, |ctx| -> Result<()> {
        let g = ctx.world();
        let w = Tensor::ones([1], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let tape = Tape::new();
        let before = rss_mib()?;
        // A non-leaf input: its graph (a product with the leaf w) saves the ones for dw, not the
        // product itself.
        let ones = Tensor::ones([elems / 16, 16], (Kind::Float, Device::Cpu));
        let x = &ones * &w; // [elems/16, 16], 64 MiB
                            // A small view of a large buffer, as Ulysses' v of the fused qkv projection.
        let big = &ones * &w; // another 64 MiB
        let view = big.narrow(1, 0, 1);
        let y = tape.all_to_all(g, &x, 1, 0)?; // P = 1: a copy, 64 MiB
        let z = tape.all_to_all(g, &view, 1, 0)?; // 4 MiB
        drop((x, big, view));
        let held = rss_mib()? - before;
        // Kept: the ones (64 MiB, saved by the products' graph), y (64), z (4), w.
        // Holding the inputs as tensors would add x and big: 128 MiB more.
        ensure!(
            held < (2 * MIB) as f64 + 4.0 + 24.0,
            "after the forward the process holds {held:.1} MiB more; the graph and the outputs \
             need {} MiB",
            2 * MIB + 4
        );
        let loss = y.sum(Kind::Float) + z.sum(Kind::Float);
        tape.backward(&loss)?;
        // Both records reached w: every element of x and of the view contributes 1.
        let want = (elems + elems / 16) as f64;
        let got = w.grad().double_value(&[0]);
        ensure!(got == want, "dw = {got}, expected {want}");
        Ok(())
    })?;
    Ok(())
}
