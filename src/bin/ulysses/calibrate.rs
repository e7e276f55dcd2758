//! `ulysses calibrate`: measures this machine into a hardware file for the cost model: f32
//! GEMMs and libtorch's fused attention (forward + backward) at the sizes the toy models use,
//! the bandwidth of an elementwise op, all on one thread (one rank); then the collectives of
//! the local backend (2 thread ranks) and of the MPI backend (2 processes). About a minute.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use tch::{Device, Kind};
use ulysses::comm::LocalLaunch;
use ulysses::cost::calibrate::{
    curve, link_from_samples, measure_attention, measure_bandwidth, measure_comm, measure_matmul,
    median_of_rounds, CommSample,
};
use ulysses::cost::hardware::{AttentionCurve, Device as DeviceSpec, DeviceKind, Efficiency, Network, Node};
use ulysses::cost::Hardware;

#[derive(clap::Args)]
pub struct CalibrateArgs {
    /// Where to write the hardware file.
    #[arg(long, default_value = "hardware/cpu-2core.toml")]
    out: PathBuf,
    /// The file's name (what predictions name their hardware by).
    #[arg(long, default_value = "cpu-2core")]
    name: String,
    /// Leave the MPI backend out (a build without the `mpi` feature cannot measure it).
    #[arg(long)]
    no_mpi: bool,
    /// Measure even when other work keeps the machine busy (the file then describes a busy
    /// machine; without it, more than a quarter of the CPU time going to other work in the
    /// second before is an error).
    #[arg(long)]
    allow_busy: bool,
}

/// The share of the machine's CPU time other work may take in the second before calibrating.
const BUSY_LIMIT: f64 = 0.25;
/// How far the local link measured again at the end may move before the file is said to
/// describe a machine that changed while it was measured.
const REPEAT_TOLERANCE: f64 = 0.15;

/// Bytes per rank the collectives are timed at.
const COMM_SIZES: [i64; 5] = [16 << 10, 64 << 10, 256 << 10, 1 << 20, 4 << 20];
/// Rounds over every size (see `median_of_rounds`).
const COMM_ROUNDS: usize = 3;
const MARK: &str = "CALIBRATE_SAMPLE ";

pub fn run(args: &CalibrateArgs) -> Result<()> {
    // Other work on the machine slows every measurement (three runs right after other work moved
    // the links by up to 45% on a 2-core VM): look before measuring.
    let busy = other_work(Duration::from_secs(1));
    match busy {
        Some(share) if share > BUSY_LIMIT && !args.allow_busy => bail!(
            "the machine is busy: {:.0}% of its CPU time went to other work (or to other virtual \
             machines) in the last second, more than {:.0}%; calibrate on a quiet machine, or pass \
             --allow-busy to measure it as it is",
            100.0 * share,
            100.0 * BUSY_LIMIT
        ),
        Some(share) => eprintln!("other work in the second before: {:.0}% of the CPU time", 100.0 * share),
        None => eprintln!("note: /proc/stat unreadable: the machine's load is not checked"),
    }
    let ticks_before = cpu_ticks();
    let started = Instant::now();
    tch::set_num_threads(1);
    let cpu = Device::Cpu;
    let no_sync = || {};
    // GEMMs of the toy models (tokens x h x {3h, h, 4h}, 4h x h, h x vocab) and two squares.
    let mut shapes = vec![(512, 512, 512), (1024, 1024, 1024)];
    for m in [256, 1024, 4096, 16384] {
        for (k, n) in
            [(64, 64), (64, 192), (64, 256), (256, 64), (128, 128), (128, 384), (128, 512), (512, 128)]
        {
            shapes.push((m, k, n));
        }
    }
    say("f32 GEMMs", started);
    let gemms = measure_matmul(cpu, Kind::Float, &shapes, 3, &no_sync)?;
    let peak = gemms.iter().map(|s| s.flops / s.seconds).fold(0.0, f64::max);
    say(&format!("best GEMM {:.1} GFLOP/s (the peak of this file); fused attention", peak / 1e9), started);
    let mut attention = Vec::new();
    for causal in [true, false] {
        for (d, heads, seqs) in [
            (16, 2, vec![256, 512, 1024, 2048, 4096, 8192, 16384]),
            (64, 1, vec![256, 512, 1024, 2048, 4096]),
        ] {
            let mut samples = Vec::new();
            for n in seqs.into_iter().filter(|&n| causal || n <= 8192) {
                let runs = if n >= 8192 { 1 } else { 3 };
                samples.extend(measure_attention(
                    cpu,
                    Kind::Float,
                    (heads, d),
                    causal,
                    &[n],
                    runs,
                    &no_sync,
                )?);
            }
            attention.push(AttentionCurve {
                device: None,
                head_dim: d,
                causal,
                points: curve(&samples, peak),
            });
        }
    }
    say("memory bandwidth", started);
    let bandwidth = measure_bandwidth(cpu, Kind::Float, 8 << 20, 5, &no_sync)?;
    say("norms, RoPE, adds, GELU, cross-entropy, ring merges (4096 tokens, h = 128)", started);
    let shapes = ulysses::cost::calibrate::OpShapes { tokens: 4096, h: 128, heads: 8, vocab: 256 };
    let memory_bound_ops = ulysses::cost::calibrate::measure_memory_bound_ops(shapes, bandwidth, 5)?;
    say("the allocator over four reference steps (tiny GPT, one device, N=4096)", started);
    // On a fresh thread, as a rank is: the kernel libraries' per-thread buffers appear in its
    // first step.
    let (workspace, slack) = std::thread::spawn(|| {
        tch::set_num_threads(1);
        ulysses::cost::calibrate::measure_step_memory(4096, 4)
    })
    .join()
    .map_err(|_| anyhow::anyhow!("the memory measurement panicked"))??;
    say("the library code a fresh process pages in over its first step (a process of its own)", started);
    let code_pages = first_step_pages()?;
    eprintln!("  {:.1} MiB", code_pages / (1 << 20) as f64);
    say("the framework's time per layer (tiny GPT, 8 tokens, 2 and 6 layers)", started);
    let layer_overhead = std::thread::spawn(|| {
        tch::set_num_threads(1);
        ulysses::cost::calibrate::measure_layer_overhead(31)
    })
    .join()
    .map_err(|_| anyhow::anyhow!("the layer overhead measurement panicked"))??;
    eprintln!("  {:.0} us per layer (forward + backward)", layer_overhead * 1e6);
    say("local backend collectives (2 thread ranks)", started);
    let local = local_samples()?;
    show("local", &local);
    let mut network = std::collections::BTreeMap::new();
    let local_link = link_from_samples(&local)?;
    network.insert("local".to_string(), Network { intra: local_link.clone(), inter: None });
    if !args.no_mpi {
        say("MPI backend collectives (2 processes)", started);
        let mpi = mpi_samples()?;
        show("mpi", &mpi);
        network.insert("mpi".to_string(), Network { intra: link_from_samples(&mpi)?, inter: None });
    }
    // The local link once more: a machine whose speed changed while it was measured (other work
    // started, a neighbour on the host) shows it here.
    say("local backend collectives again (the machine's steadiness)", started);
    let repeat = link_from_samples(&local_samples()?)?.bandwidth_gbs / local_link.bandwidth_gbs;
    let steal = steal_share(ticks_before, cpu_ticks());
    let mut steadiness = vec![
        ("local_link_again".to_string(), format!("{repeat:.2}x")),
        ("other_work_before_percent".to_string(), busy.map_or("?".into(), |b| format!("{:.0}", 100.0 * b))),
        ("steal_percent".to_string(), steal.map_or("?".into(), |s| format!("{:.1}", 100.0 * s))),
    ];
    if (repeat - 1.0).abs() > REPEAT_TOLERANCE {
        eprintln!(
            "warning: the local link measured {:.2}x its first value at the end of the run (more than \
             {:.0}% apart): the machine's speed changed while it was measured; calibrate again on a \
             quiet machine",
            repeat,
            100.0 * REPEAT_TOLERANCE
        );
        steadiness
            .push(("steady".to_string(), "no: the local link moved between the start and the end".into()));
    }
    let cores = std::thread::available_parallelism().map_or(1, |c| c.get());
    let gib = (1u64 << 30) as f64;
    let hw = Hardware {
        name: args.name.clone(),
        description: format!(
            "this machine ({cores} cores), one rank per thread, measured by ulysses calibrate"
        ),
        device: DeviceSpec {
            kind: DeviceKind::Cpu,
            model: format!("{} core", ulysses::cost::hardware::host_cpu()),
            peak_tflops: [("f32".to_string(), peak / 1e12)].into_iter().collect(),
            memory_gib: meminfo_kib("MemTotal:").unwrap_or(0.0) * 1024.0 / gib,
            reserved_gib: meminfo_self_rss_gib(),
            workspace_gib: workspace / gib,
            code_pages_gib: code_pages / gib,
            allocator_slack: slack,
            memory_bandwidth_gbs: bandwidth / 1e9,
            // A CPU: no streaming multiprocessors for a kernel's grid to leave idle.
            sm_count: 0,
        },
        // All ranks of a CPU job share this machine: many rank slots, `cores` compute at once.
        node: Node { devices_per_node: 1024, compute_slots: cores, shared_memory: true },
        efficiency: Efficiency {
            matmul: curve(&gemms, peak),
            attention,
            // The bandwidth was measured with an elementwise add (copies reach all of it); the
            // other kinds as timed.
            memory_bound: 1.0,
            memory_bound_ops,
            layer_overhead_us: layer_overhead * 1e6,
        },
        network,
        host: None,
        bands: Default::default(),
        provenance: Some(provenance(started).into_iter().chain(steadiness).collect()),
        applied: Default::default(),
    };
    let text = Hardware::parse(&hw.to_toml()?, "calibration")?.to_toml()?;
    let header = "# Written by `ulysses calibrate` (src/bin/ulysses/calibrate.rs): every number below was\n\
                  # measured on the machine named in [provenance], one libtorch thread per rank. The f32\n\
                  # \"peak\" is the best GEMM measured, not a datasheet figure; efficiencies are against it.\n\
                  # workspace_gib and allocator_slack come from a reference step (tiny GPT, one device,\n\
                  # N=4096): what the first step allocates and keeps, and peak RSS / peak live bytes over\n\
                  # four steps above the built model, as a run measures a point's memory;\n\
                  # code_pages_gib from its first step in a fresh process (file-backed pages it maps in).\n";
    if let Some(dir) = args.out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&args.out, format!("{header}{text}"))?;
    println!("{text}");
    println!("wrote {} in {:.0} s", args.out.display(), started.elapsed().as_secs_f64());
    Ok(())
}

/// The local backend's collectives on 2 thread ranks, as rank 0 timed them.
fn local_samples() -> Result<Vec<CommSample>> {
    LocalLaunch::new(2)
        .timeout(Duration::from_secs(120))
        .run(|ctx| comm_rounds(ctx.world()))?
        .into_iter()
        .next()
        .context("no rank reported")
}

/// Every collective at every size, `COMM_ROUNDS` times over, as one set of samples (the median
/// of the rounds' medians of 11 calls).
fn comm_rounds(group: &ulysses::comm::Group) -> ulysses::Result<Vec<CommSample>> {
    let rounds = (0..COMM_ROUNDS)
        .map(|_| measure_comm(group, &COMM_SIZES, 11))
        .collect::<ulysses::Result<Vec<_>>>()?;
    Ok(median_of_rounds(&rounds))
}

/// The samples behind a link, for the record.
fn show(backend: &str, samples: &[CommSample]) {
    for s in samples {
        eprintln!(
            "  {backend:<6} {:<15} P={} {:>10.0} B sent {:>9.3} ms {:>7.3} GB/s",
            s.op,
            s.ranks,
            s.bytes_sent,
            s.seconds * 1e3,
            s.bytes_sent / s.seconds / 1e9
        );
    }
}

fn say(what: &str, started: Instant) {
    eprintln!("[calibrate {:>5.1} s] {what}", started.elapsed().as_secs_f64());
}

const PAGES_MARK: &str = "CALIBRATE_PAGES ";

/// The library code a fresh process pages in over its first step: a child process of this
/// binary (`calibrate-pages`) measures it, since this one has run every kernel by now.
fn first_step_pages() -> Result<f64> {
    let out = std::process::Command::new(std::env::current_exe()?)
        .arg("calibrate-pages")
        .output()
        .context("cannot start this program again to measure a fresh process")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let bytes =
        text.lines().find_map(|l| l.strip_prefix(PAGES_MARK)).and_then(|v| v.trim().parse::<f64>().ok());
    match bytes {
        Some(b) if out.status.success() => Ok(b),
        _ => bail!(
            "the fresh process's measurement failed ({}): {}{}",
            out.status,
            text,
            String::from_utf8_lossy(&out.stderr)
        ),
    }
}

/// This process as calibrate's fresh one: the reference step's first-step pages, printed.
pub fn pages_process() -> Result<()> {
    tch::set_num_threads(1);
    let bytes = ulysses::cost::calibrate::measure_first_step_pages(4096)?;
    println!("{PAGES_MARK}{bytes}");
    Ok(())
}

/// The MPI backend's samples: 2 processes of this binary (`calibrate-comm`), rank 0 printing.
fn mpi_samples() -> Result<Vec<CommSample>> {
    let me = std::env::current_exe()?;
    let out = ulysses::comm::mpirun_command(2, &me, &["calibrate-comm".to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("cannot start mpirun (install OpenMPI, or pass --no-mpi)")?;
    let mut samples = Vec::new();
    let output = out.wait_with_output()?;
    for line in BufReader::new(&output.stdout[..]).lines().map_while(Result::ok) {
        let (_, body) = ulysses::comm::untag(&line);
        if let Some((_, json)) = body.split_once(MARK) {
            samples.push(serde_json::from_str::<CommSample>(json)?);
        }
    }
    if !output.status.success() || samples.is_empty() {
        bail!(
            "the MPI measurement failed ({}): {}\n(build with --features mpi, or pass --no-mpi)",
            output.status,
            String::from_utf8_lossy(&output.stderr).lines().rev().take(8).collect::<Vec<_>>().join("\n")
        );
    }
    Ok(samples)
}

/// This process as one rank of the MPI measurement: rank 0 prints every sample as JSON.
#[cfg(feature = "mpi")]
pub fn comm_rank() -> Result<()> {
    let samples = ulysses::comm::MpiLaunch::new().timeout(Duration::from_secs(120)).threads_per_rank(1).run(
        |ctx| -> Result<Option<Vec<CommSample>>> {
            let s = comm_rounds(ctx.world())?;
            Ok((ctx.rank() == 0).then_some(s))
        },
    )?;
    for s in samples.into_iter().flatten() {
        println!("{MARK}{}", serde_json::to_string(&s)?);
    }
    Ok(())
}

#[cfg(not(feature = "mpi"))]
pub fn comm_rank() -> Result<()> {
    bail!("this ulysses was built without the `mpi` feature: cargo build --release --features mpi")
}

fn meminfo_kib(field: &str) -> Option<f64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    text.lines().find(|l| l.starts_with(field))?.split_whitespace().nth(1)?.parse().ok()
}

/// This process's resident memory once libtorch is loaded: what a rank holds before its model.
fn meminfo_self_rss_gib() -> f64 {
    let text = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kib: f64 = text
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    kib / (1024.0 * 1024.0)
}

/// The machine's CPU time counters (/proc/stat's first line, in ticks): (busy, stolen by the
/// hypervisor, total); `None` where there is no /proc.
fn cpu_ticks() -> Option<(u64, u64, u64)> {
    ticks_of(&std::fs::read_to_string("/proc/stat").ok()?)
}

/// [`cpu_ticks`] of a /proc/stat text.
fn ticks_of(stat: &str) -> Option<(u64, u64, u64)> {
    let line = stat.lines().next().filter(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> = line.split_whitespace().skip(1).map(|x| x.parse().ok()).collect::<Option<_>>()?;
    // user nice system idle iowait irq softirq steal
    let [user, nice, system, idle, iowait, irq, softirq, steal] = v.get(..8)?.try_into().ok()?;
    let busy = user + nice + system + irq + softirq;
    Some((busy, steal, busy + idle + iowait + steal))
}

/// The share of the machine's CPU time that went to other work (busy, or stolen by other
/// virtual machines) over `window`, this process sleeping meanwhile.
fn other_work(window: Duration) -> Option<f64> {
    let before = cpu_ticks()?;
    std::thread::sleep(window);
    let after = cpu_ticks()?;
    let total = after.2.saturating_sub(before.2);
    let other = after.0.saturating_sub(before.0) + after.1.saturating_sub(before.1);
    (total > 0).then(|| other as f64 / total as f64)
}

/// The share of the machine's CPU time the hypervisor gave to other virtual machines between two
/// readings.
fn steal_share(before: Option<(u64, u64, u64)>, after: Option<(u64, u64, u64)>) -> Option<f64> {
    let (b, a) = (before?, after?);
    let total = a.2.saturating_sub(b.2);
    (total > 0).then(|| a.1.saturating_sub(b.1) as f64 / total as f64)
}

/// Date, command, host facts, versions: how the file was made.
fn provenance(started: Instant) -> std::collections::BTreeMap<String, String> {
    let secs = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let git = std::process::Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map_or("unknown".into(), |o| String::from_utf8_lossy(&o.stdout).trim().to_string());
    let host = std::fs::read_to_string("/etc/hostname").map_or("unknown".into(), |h| h.trim().to_string());
    [
        ("date_utc", utc_date(secs)),
        ("command", std::env::args().collect::<Vec<_>>().join(" ")),
        ("host", host),
        ("cpu", ulysses::cost::hardware::host_cpu()),
        ("cores", ulysses::cost::hardware::host_cores().to_string()),
        ("memory_gib", format!("{:.1}", meminfo_kib("MemTotal:").unwrap_or(0.0) / (1024.0 * 1024.0))),
        ("os", format!("{} {}", std::env::consts::OS, std::env::consts::ARCH)),
        ("ulysses", format!("{} (git {git})", env!("CARGO_PKG_VERSION"))),
        ("libtorch", "2.11.0".to_string()),
        ("threads_per_rank", "1".to_string()),
        ("seconds", format!("{:.0}", started.elapsed().as_secs_f64())),
        // Other work on the machine slows every measurement: the load it ran under.
        (
            "load_average_after",
            std::fs::read_to_string("/proc/loadavg")
                .map_or("?".into(), |l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" ")),
        ),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

/// `YYYY-MM-DD HH:MM` from Unix seconds (proleptic Gregorian, UTC).
fn utc_date(secs: u64) -> String {
    let (days, rem) = ((secs / 86400) as i64, secs % 86400);
    // Howard Hinnant's civil_from_days
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02} {:02}:{:02}", rem / 3600, rem % 3600 / 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_ticks_split_busy_stolen_and_total_time() {
        // user nice system idle iowait irq softirq steal guest guest_nice
        let stat = "cpu  100 5 50 1000 20 3 2 7 0 0\ncpu0 50 2 25 500 10 1 1 3 0 0\n";
        assert_eq!(ticks_of(stat), Some((160, 7, 1187)));
        assert_eq!(ticks_of("cpu  1 2 3\n"), None, "too few fields");
        assert_eq!(ticks_of("intr 1 2 3 4 5 6 7 8\n"), None, "not the cpu line");
        assert_eq!(steal_share(Some((0, 10, 100)), Some((50, 30, 300))), Some(0.1));
        // This machine's counters (Linux, as every machine this toolkit runs on) read, and other
        // work's share is a fraction.
        let share = other_work(Duration::from_millis(200)).expect("/proc/stat readable");
        assert!((0.0..=1.0).contains(&share), "{share}");
    }
}
