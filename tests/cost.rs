//! The cost model's exact parts: visible pairs and FLOPs against brute-force counts and the
//! published formula, ZeRO's model states against the spec, alpha-beta prices against hand
//! computations, hardware files refused with the field and the number, and predictions that
//! are finite, ordered as the paper argues, and searchable.

use anyhow::{ensure, Result};
use ulysses::attention::{AttentionConfig, BlockSparse, Kernel, Mask, StrategyConfig};
use ulysses::comm::OpKind;
use ulysses::cost::memory::memory;
use ulysses::cost::network::{price, Placement};
use ulysses::cost::zero::{model_states, padded};
use ulysses::cost::{best, max_seq, megatron_flops, predict, Band, Hardware, Job, SearchSpace, Software};
use ulysses::model::GptConfig;
use ulysses::train::{Checkpointing, Precision, ZeroStage};

fn masks() -> Vec<Mask> {
    let sparse =
        |causal| Mask::BlockSparse(BlockSparse { block: 4, local_blocks: 3, global_blocks: 1, causal });
    vec![
        Mask::None,
        Mask::Causal,
        Mask::SlidingWindow { window: 5 },
        Mask::SlidingWindow { window: 64 },
        sparse(true),
        sparse(false),
    ]
}

#[test]
fn visible_pairs_equal_a_brute_force_count() -> Result<()> {
    for mask in masks() {
        for n in [1i64, 7, 30, 37, 50] {
            for (q0, q1) in [(0, n), (3.min(n), n), (0, n / 2), (n / 3, 2 * n / 3)] {
                let brute =
                    (q0..q1).map(|i| (0..n).filter(|&j| mask.allows(i, j)).count() as u64).sum::<u64>();
                let got = mask.visible_in_rows(q0, q1, n);
                ensure!(got == brute, "{mask:?} n={n} rows [{q0}, {q1}): {got} vs brute force {brute}");
            }
        }
    }
    // Closed forms: n^2, n(n+1)/2, and the window's.
    let n = 1 << 20;
    ensure!(Mask::None.visible_pairs(n) == (n * n) as u64, "none");
    ensure!(Mask::Causal.visible_pairs(n) == (n * (n + 1) / 2) as u64, "causal");
    let w = 4096;
    ensure!(
        Mask::SlidingWindow { window: w }.visible_pairs(n) == (w * (w + 1) / 2 + (n - w) * w) as u64,
        "window"
    );
    Ok(())
}

#[test]
fn model_flops_count_visible_pairs_and_megatrons_convention_is_the_papers() -> Result<()> {
    let cfg = GptConfig::gpt_1_3b();
    let (n, tokens) = (8192i64, 2 * 8192i64);
    let dense = 6.0 * cfg.matmul_params() as f64 * tokens as f64;
    let attention = |pairs: f64| 12.0 * (cfg.n_layer * cfg.n_embd) as f64 * pairs * 2.0;
    for mask in masks().into_iter().chain([Mask::SlidingWindow { window: 1024 }]) {
        let want = dense + attention(mask.visible_pairs(n) as f64);
        let got = cfg.train_flops(tokens, n, &mask);
        ensure!((got - want).abs() <= 1e-9 * want, "{mask:?}: {got} vs {want}");
    }
    // A window is far less than half of dense (issue 11: it used to count as causal).
    let window = cfg.train_flops(tokens, n, &Mask::SlidingWindow { window: 512 }) - dense;
    let causal = cfg.train_flops(tokens, n, &Mask::Causal) - dense;
    ensure!(window < causal / 8.0, "window {window:.3e} vs causal {causal:.3e}");
    // Megatron-DeepSpeed: 24 c B s L h^2 (1 + s/(6h) + V/(16 L h)), by hand for the 1.3B model.
    let (b, s, l, h, v) = (8.0, 32768.0, 24.0, 2048.0, 50304.0);
    let by_hand = 24.0 * 4.0 * b * s * l * h * h * (1.0 + s / (6.0 * h) + v / (16.0 * l * h));
    let got = megatron_flops(&cfg, 8, 32768, Checkpointing::Full);
    ensure!((got - by_hand).abs() <= 1e-12 * by_hand, "megatron {got} vs {by_hand}");
    ensure!(
        megatron_flops(&cfg, 8, 32768, Checkpointing::None) * 4.0 == got * 3.0,
        "c = 3 without checkpointing"
    );
    Ok(())
}

#[test]
fn zero_model_states_follow_the_spec() -> Result<()> {
    // Psi replicated parameters, W ranks: stage 0 16 Psi, 1: 4 Psi + 12 Psi/W, 2: 2 Psi + 14 Psi/W,
    // 3: 16 Psi/W (mixed precision, Adam), with the padded size.
    let cfg = GptConfig { n_layer: 3, ..GptConfig::gpt_125m() };
    for w in [1usize, 3, 8] {
        let job = Job { zero: ZeroStage::NONE, ..Job::new(cfg.clone(), StrategyConfig::Ulysses, w, 4096) };
        let params = ulysses::cost::memory::params_on_rank(&job);
        let psi = params.replicated;
        let pad = padded(psi as i64, w) as f64;
        let pad3: f64 = params.blocks.iter().map(|&m| padded(m, w) as f64).sum();
        for (stage, want) in [
            (0, 16.0 * psi),
            (1, 4.0 * psi + 12.0 * pad / w as f64),
            (2, 2.0 * psi + 14.0 * pad / w as f64),
            (3, 16.0 * pad3 / w as f64),
        ] {
            let j = Job { zero: ZeroStage::new(stage)?, ..job.clone() };
            let (p, g, o) = model_states(&j, &params);
            ensure!((p + g + o - want).abs() < 1e-6, "stage {stage} W={w}: {} vs {want}", p + g + o);
        }
        // f32 without an optimizer: 4 + 4 bytes, nothing else.
        let f32_job = Job { precision: Precision::F32, optimizer: false, ..job.clone() };
        let (p, g, o) = model_states(&f32_job, &params);
        ensure!(p == 4.0 * psi && g == 4.0 * psi && o == 0.0, "f32: {p} {g} {o}");
    }
    Ok(())
}

#[test]
fn alpha_beta_prices_by_hand() -> Result<()> {
    let hw = Hardware::load("dgx-a100-40gb")?;
    let gb = 1e9;
    // Inside a node: 8 ranks, ring all-gather of 7 GB sent: 7 steps x 5 us + 7 GB / (300 GB/s x 0.75).
    let (s, _) = price(&hw, "nccl", OpKind::AllGather, Placement::new(8, 1, 8), 1, 7.0 * gb)?;
    let want = 7.0 * 5e-6 + 7.0 / (300.0 * 0.75);
    ensure!((s - want).abs() < 1e-12, "all-gather {s} vs {want}");
    // An all-to-all of 16 ranks over 2 nodes: 7/15 of the bytes inside, 8/15 across (25 GB/s x 0.8).
    let (s, _) = price(&hw, "nccl", OpKind::AllToAll, Placement::new(16, 1, 8), 1, 15.0 * gb)?;
    let want = 15.0 * 10e-6 + (7.0f64 / (300.0 * 0.65)).max(8.0 / (25.0 * 0.8));
    ensure!((s - want).abs() < 1e-12, "all-to-all {s} vs {want}");
    // A DP group of stride 8 has one member per node.
    ensure!(Placement::new(4, 8, 8).per_node == 1 && Placement::new(4, 2, 8).per_node == 4, "placements");
    ensure!(Placement::new(8, 2, 8).per_node == 4, "stride 2 over nodes of 8");
    Ok(())
}

/// The preset's file as written, with its comments.
fn preset_text() -> Result<String> {
    Ok(std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/hardware/dgx-a100-40gb.toml"))?)
}

#[test]
fn bad_hardware_files_name_the_field_and_the_number() -> Result<()> {
    for name in Hardware::presets() {
        Hardware::load(name)?;
    }
    let good = preset_text()?;
    // Written back as TOML, a preset reads back the same.
    let hw = Hardware::load("dgx-a100-40gb")?;
    ensure!(Hardware::parse(&hw.to_toml()?, "round trip")? == hw, "round trip");
    let without = good.lines().filter(|l| !l.starts_with("memory_gib")).collect::<Vec<_>>().join("\n");
    let cases = [
        (without, "missing field `memory_gib`"),
        (
            good.replace("memory_bandwidth_gbs = 1555.0", "memory_bandwidth_gbs = -1555.0"),
            "memory_bandwidth_gbs = -1555 must be a positive",
        ),
        (
            good.replace("memory_bound = 0.80", "memory_bound = 1.5"),
            "efficiency.memory_bound = 1.5 must lie in (0, 1]",
        ),
        (
            good.replace("bandwidth_gbs = 25.0", "bandwidth_gbs = 0.0"),
            "network.nccl.inter.bandwidth_gbs = 0 must be a positive",
        ),
        (good.replace("devices_per_node = 8", "devices_per_node = 0"), "node.devices_per_node = 0"),
        (good.replace("[1.0e9, 0.58]", "[1.0e7, 0.58]"), "sizes must increase"),
        (
            good.replace("matmul = [0.9412, 1.0588]", "matmul = [1.2, 1.0588]"),
            "bands.matmul = [1.2, 1.0588] must be",
        ),
        (good.replace("latency = [2.0, 0.5]", "latency = [0.5, 2.0]"), "bands.latency = [0.5, 2] must be"),
        (
            good.replace("reserved_gib = [3.0, 0.5]", "reserved_gib = [0.5, 3.0]"),
            "bands.reserved_gib = [0.5, 3] must hold device.reserved_gib = 2",
        ),
        (good.replace("bf16 = 312.0", "bf16 = nan"), "device.peak_tflops.bf16 = NaN must be a positive"),
        (good.replace("link_gbs = 32.0", "link_gbs = 0.0"), "host.link_gbs = 0 must be positive"),
        (
            good.replace("link_efficiency = 0.75", "link_efficiency = 1.5"),
            "host.link_efficiency = 1.5 must lie in (0, 1]",
        ),
        (
            good.replace("host_link = [0.8, 1.2]", "host_link = [1.2, 0.8]"),
            "bands.host_link = [1.2, 0.8] must be",
        ),
    ];
    for (text, want) in cases {
        let err = Hardware::parse(&text, "test.toml").err().map(|e| e.to_string()).unwrap_or_default();
        ensure!(err.contains(want) && err.contains("test.toml"), "{err:?} lacks {want:?}");
    }
    let err = Hardware::load("dgx-a200").err().map(|e| e.to_string()).unwrap_or_default();
    ensure!(err.contains("no such preset or file") && err.contains("dgx-a100-40gb"), "{err}");
    Ok(())
}

#[test]
fn a_measured_file_says_when_it_describes_another_machine() -> Result<()> {
    use ulysses::cost::hardware::{host_cores, host_cpu};
    // A datasheet preset has no provenance: nothing to say.
    ensure!(Hardware::load("dgx-a100-40gb")?.measured_elsewhere().is_none(), "a datasheet preset");
    // cpu-2core as measured, with its provenance set to this machine, then to another CPU, then
    // to other core counts.
    let mut hw = Hardware::load("cpu-2core")?;
    let prov = hw.provenance.get_or_insert_with(Default::default);
    prov.insert("cpu".into(), host_cpu());
    prov.insert("cores".into(), host_cores().to_string());
    ensure!(hw.measured_elsewhere().is_none(), "this machine: {:?}", hw.measured_elsewhere());
    let mut other = hw.clone();
    other.provenance.get_or_insert_with(Default::default).insert("cpu".into(), "Some Other CPU 9000".into());
    let note = other.measured_elsewhere().unwrap_or_default();
    ensure!(
        note.contains("Some Other CPU 9000")
            && note.contains(&host_cpu())
            && note.contains("ulysses calibrate"),
        "{note}"
    );
    let mut more = hw.clone();
    more.provenance
        .get_or_insert_with(Default::default)
        .insert("cores".into(), (host_cores() + 6).to_string());
    let note = more.measured_elsewhere().unwrap_or_default();
    ensure!(note.contains(&format!("{} cores", host_cores() + 6)), "{note}");
    // The CPU preset predictions default to: one measured on this CPU, or cpu-2core (which then
    // says it was measured elsewhere); the EPYC file was measured on an AMD EPYC.
    let chosen = ulysses::cost::hardware::cpu_preset_for_host();
    let hw = Hardware::load(chosen)?;
    ensure!(
        hw.measured_elsewhere().is_none() || chosen == "cpu-2core",
        "{chosen}: {:?}",
        hw.measured_elsewhere()
    );
    let epyc = Hardware::load("cpu-2core-epyc")?;
    ensure!(
        epyc.provenance.as_ref().and_then(|p| p.get("cpu")).map(String::as_str) == Some("AMD EPYC"),
        "{epyc:?}"
    );
    Ok(())
}

fn paper_job(model: GptConfig, strategy: StrategyConfig, ranks: usize, seq: i64) -> Job {
    Job { zero: ZeroStage::new(3).unwrap_or_default(), ..Job::new(model, strategy, ranks, seq) }
}

#[test]
fn predictions_are_finite_and_ordered_as_the_paper_argues() -> Result<()> {
    let hw = Hardware::load("dgx-a100-40gb")?;
    let model = GptConfig::gpt_6_7b();
    for s in ["ulysses", "megatron_sp", "ring_zigzag", "allgather_kv", "usp_zigzag:8"] {
        let p = predict(&paper_job(model.clone(), s.parse().map_err(anyhow::Error::msg)?, 32, 65536), &hw)?;
        let numbers =
            [p.step_s, p.tokens_per_s, p.mfu, p.megatron_mfu, p.memory.peak_bytes, p.bytes_sent_per_rank];
        ensure!(numbers.iter().all(|x| x.is_finite() && *x > 0.0), "{s}: {numbers:?}");
        ensure!(p.mfu < 1.0 && p.megatron_tflops_per_gpu > p.model_tflops_per_gpu, "{s}: conventions {p:?}");
    }
    // Per-rank bytes: Ulysses' fall as P grows at a fixed N, Megatron-SP's do not (§3.2).
    let bytes = |s: StrategyConfig, p: usize| -> Result<f64> {
        Ok(predict(&paper_job(GptConfig::gpt_1_3b(), s, p, 65536), &hw)?.bytes_sent_per_rank)
    };
    ensure!(bytes(StrategyConfig::Ulysses, 16)? < bytes(StrategyConfig::Ulysses, 4)?, "ulysses bytes");
    ensure!(
        bytes(StrategyConfig::MegatronSp, 16)? >= bytes(StrategyConfig::MegatronSp, 4)?,
        "megatron bytes"
    );
    // Bad jobs: heads that do not split, a length ring cannot shard.
    let err = |j: Job| predict(&j, &hw).err().map(|e| e.to_string()).unwrap_or_default();
    let e = err(paper_job(GptConfig::gpt_1_3b(), StrategyConfig::Ulysses, 32, 65536));
    ensure!(e.contains("H=16 < P=32"), "{e}");
    let e = err(paper_job(GptConfig::gpt_1_3b(), StrategyConfig::Ring { zigzag: true }, 8, 1000));
    ensure!(e.contains("N=1000, 2P=16"), "{e}");
    // f64 is predicted with 8-byte elements: every element-sized transfer (the all-to-alls,
    // ZeRO-3's parameter gathers) 4x bf16's, the f32 gradient reduction the same, so the bytes
    // grow by more than 2x and less than 4x (an f64 priced as bf16 gives 1x); memory grows.
    let bf16 = paper_job(GptConfig::gpt_1_3b(), StrategyConfig::Ulysses, 8, 8192);
    let (wide, narrow) =
        (predict(&Job { precision: Precision::F64, ..bf16.clone() }, &hw)?, predict(&bf16, &hw)?);
    let ratio = wide.bytes_sent_per_rank / narrow.bytes_sent_per_rank;
    ensure!(ratio > 2.0 && ratio < 4.0, "f64 / bf16 bytes {ratio}");
    ensure!(
        wide.memory.peak_bytes > narrow.memory.peak_bytes,
        "f64 peak {} vs bf16 {}",
        wide.memory.peak_bytes,
        narrow.memory.peak_bytes
    );
    Ok(())
}

#[test]
fn search_finds_a_fitting_setting_and_the_longest_sequence_grows_with_gpus() -> Result<()> {
    let hw = Hardware::load("dgx-a100-40gb")?;
    let space = SearchSpace { sp: Vec::new(), micro_batch: vec![1, 2], ..SearchSpace::everything() };
    let base = paper_job(GptConfig::gpt_1_3b(), StrategyConfig::Ulysses, 16, 131072);
    let p = best(&base, &hw, &space)?;
    ensure!(p.memory.fits && p.memory.resident_bytes <= p.memory.capacity_bytes, "{:?}", p.memory);
    let only = SearchSpace {
        zero: vec![ZeroStage::new(3)?],
        checkpointing: vec![Checkpointing::Full],
        micro_batch: vec![1],
        ..SearchSpace::default()
    };
    let (a, b) = (
        max_seq(&Job { ranks: 4, ..base.clone() }, &hw, &only)?.job.seq,
        max_seq(&Job { ranks: 16, ..base.clone() }, &hw, &only)?.job.seq,
    );
    ensure!(b > 2 * a, "max sequence on 16 GPUs {b} vs 4 GPUs {a}");
    // Over every strategy: the best is at least as fast as Ulysses' best.
    let any = SearchSpace { strategies: ulysses::cost::every_strategy(), ..space.clone() };
    let overall = best(&base, &hw, &any)?;
    ensure!(overall.tokens_per_s >= p.tokens_per_s, "{} vs {}", overall.tokens_per_s, p.tokens_per_s);
    // A model that fits nowhere: a clear error with the numbers.
    let huge = GptConfig { n_layer: 400, n_embd: 16384, n_head: 128, n_kv_head: 128, ..GptConfig::gpt_30b() };
    let e = best(&paper_job(huge, StrategyConfig::Ulysses, 8, 8192), &hw, &space)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    ensure!(e.contains("no setting fits") && e.contains("GiB"), "{e}");
    Ok(())
}

#[test]
fn attention_kernels_change_time_and_memory_as_they_should() -> Result<()> {
    let hw = Hardware::load("dgx-a100-40gb")?;
    let job = |kernel, mask| Job {
        attention: AttentionConfig::new(kernel, mask),
        checkpointing: Checkpointing::None,
        ..paper_job(GptConfig::gpt_1_3b(), StrategyConfig::Ulysses, 8, 16384)
    };
    let flash = predict(&job(Kernel::Sdpa, Mask::Causal), &hw)?;
    let math = predict(&job(Kernel::Math, Mask::Causal), &hw)?;
    ensure!(math.memory.peak_bytes > flash.memory.peak_bytes, "the math kernel keeps s^2 scores");
    let sparse =
        Mask::BlockSparse(BlockSparse { block: 64, local_blocks: 4, global_blocks: 1, causal: true });
    let blocked = predict(&job(Kernel::Blocked, sparse), &hw)?;
    ensure!(blocked.model_flops < flash.model_flops, "block-sparse counts fewer pairs");
    Ok(())
}

#[test]
fn the_search_agrees_with_trying_every_setting_by_hand() -> Result<()> {
    // A small space enumerated here, apart from the search's own enumeration: 1.3B on 8 GPUs at
    // 64K, Ulysses and zigzag ring, every SP degree (DP the rest), micro-batch 1 and 2, ZeRO 0-3,
    // no and full checkpointing. best() must return the fastest setting that fits, and the same
    // tokens/s; max_seq() a length that fits at some setting where the next step fits at none.
    let hw = Hardware::load("dgx-a100-40gb")?;
    let base = paper_job(GptConfig::gpt_1_3b(), StrategyConfig::Ulysses, 8, 65536);
    let strategies = vec![StrategyConfig::Ulysses, StrategyConfig::Ring { zigzag: true }];
    let zeros: Vec<ZeroStage> = (0..=3).map(ZeroStage::new).collect::<Result<_, _>>()?;
    let ckpts = vec![Checkpointing::None, Checkpointing::Full];
    let space = SearchSpace {
        strategies: strategies.clone(),
        sp: Vec::new(),
        micro_batch: vec![1, 2],
        zero: zeros.clone(),
        checkpointing: ckpts.clone(),
        global_batch: None,
    };
    let settings = |seq: i64| {
        let mut jobs = Vec::new();
        for sp in [1usize, 2, 4, 8] {
            for &strategy in &strategies {
                for b in [1i64, 2] {
                    for &zero in &zeros {
                        for &checkpointing in &ckpts {
                            jobs.push(Job {
                                strategy,
                                dp: 8 / sp,
                                micro_batch: b,
                                zero,
                                checkpointing,
                                seq,
                                ..base.clone()
                            });
                        }
                    }
                }
            }
        }
        jobs
    };
    let (mut fastest, mut tried, mut fit) = (None::<(f64, String)>, 0, 0);
    for job in settings(base.seq) {
        let Ok(p) = predict(&job, &hw) else { continue };
        tried += 1;
        if p.memory.fits {
            fit += 1;
            if fastest.as_ref().is_none_or(|(t, _)| p.tokens_per_s > *t) {
                fastest = Some((p.tokens_per_s, job.describe()));
            }
        }
    }
    let (want, how) = fastest.ok_or_else(|| anyhow::anyhow!("nothing fits of {tried} settings"))?;
    let got = best(&base, &hw, &space)?;
    ensure!(
        got.tokens_per_s == want && got.job.describe() == how,
        "best(): {} at {:.0} tokens/s; by hand ({fit} of {tried} fit): {how} at {want:.0}",
        got.job.describe(),
        got.tokens_per_s
    );
    // The longest sequence: fits at some setting, and one step longer fits at none.
    let longest = max_seq(&base, &hw, &space)?.job.seq;
    let step = 1024; // lcm(1024, 2 x 8 ranks)
    let fits_at_some = |seq: i64| settings(seq).iter().any(|j| predict(j, &hw).is_ok_and(|p| p.memory.fits));
    ensure!(fits_at_some(longest), "max_seq {longest} fits at no setting");
    ensure!(!fits_at_some(longest + step), "max_seq {longest}, but {} fits at some setting", longest + step);
    Ok(())
}

#[test]
fn software_profiles_load_and_bad_ones_name_the_field() -> Result<()> {
    for name in Software::presets() {
        Software::load(name)?;
    }
    let a100 = "[[attention]]\ndevice = \"A100\"\nhead_dim = 128\n";
    let cases = [
        ("attention_band = [1.2, 1.5]\n".to_string(), "attention_band = [1.2, 1.5] must be"),
        (format!("{a100}points = [[512, 1.3]]\n"), "efficiency in (0, 1]"),
        (format!("{a100}points = [[2048, 0.3], [512, 0.2]]\n"), "sizes must increase (2048 then 512)"),
        ("[baseline]\nkernel = \"math\"\nzero = [4]\ncheckpointing = [\"full\"]\n".into(), "stage 4"),
        ("[zero3]\nprefetch_bucket_elems = -1.0\n".into(), "prefetch_bucket_elems = -1"),
        ("speed = 3\n".into(), "unknown field `speed`"),
    ];
    for (body, want) in cases {
        let text = format!("name = \"bad\"\n{body}");
        let err = Software::parse(&text, "sw.toml").err().map(|e| e.to_string()).unwrap_or_default();
        ensure!(err.contains(want) && err.contains("sw.toml"), "{err:?} lacks {want:?}");
    }
    let err = Software::load("flash-attention-9").err().map(|e| e.to_string()).unwrap_or_default();
    ensure!(err.contains("no such software") && err.contains("megatron-deepspeed-2023"), "{err}");
    // The paper's software ran on A100s only: on an H100 it says which devices it has.
    let paper = Software::load("megatron-deepspeed-2023")?;
    let err = Hardware::load("dgx-h100")?.with_software(&paper, Band::Central).err().map(|e| e.to_string());
    let err = err.unwrap_or_default();
    ensure!(err.contains("A100") && err.contains("H100-SXM5"), "{err}");
    // A datasheet preset measured nothing: "measured" has no curves to keep there.
    let measured = Software::load("measured")?;
    let err = Hardware::load("dgx-a100-40gb")?.with_software(&measured, Band::Central).err();
    let err = err.map(|e| e.to_string()).unwrap_or_default();
    ensure!(err.contains("this file has none") && err.contains("flash-attention-2"), "{err}");
    // The calibrated CPU file keeps its own curves under "measured", its default.
    ensure!(Hardware::load("cpu-2core")?.software_name() == "measured");
    Ok(())
}

#[test]
fn attention_speed_is_the_softwares_and_bands_take_the_ends_of_each_range() -> Result<()> {
    let close = |a: f64, b: f64| (a - b).abs() <= 1e-12 * b.abs().max(1.0);
    let today = Hardware::load("dgx-a100-40gb")?;
    ensure!(today.software_name() == "flash-attention-2" && today.band() == Band::Central);
    let paper = today.with_software(&Software::load("megatron-deepspeed-2023")?, Band::Central)?;
    // The tops of the curves (head size 128 from 8K keys) as the files write them: 0.53 and
    // 0.294 (FlashAttention-2 over the middle of "1.3-2.5x").
    let (fa2, fa1) =
        (today.attention_efficiency(128, 65536.0, true), paper.attention_efficiency(128, 65536.0, true));
    ensure!(close(fa2, 0.53) && close(fa1, 0.294), "{fa2} {fa1}");
    ensure!((fa2 / fa1 - 1.80).abs() < 0.01, "FA2 / Triton FA1 = {}", fa2 / fa1);
    // Head size 96 (the 30B) takes the nearest curve in log distance: 128.
    ensure!(close(paper.attention_efficiency(96, 65536.0, true), 0.294));
    // Bands: the software's range for attention, the hardware's for the rest.
    let (lo, hi) = (paper.at_band(Band::Low), paper.at_band(Band::High));
    ensure!(close(lo.attention_efficiency(128, 65536.0, true), 0.294 * 0.585));
    ensure!(close(hi.attention_efficiency(128, 65536.0, true), 0.294 * 1.65));
    ensure!(
        close(lo.matmul_efficiency(1e12), 0.85 * 0.9412) && close(hi.matmul_efficiency(1e12), 0.85 * 1.0588)
    );
    ensure!(lo.reserved_gib() == 3.0 && paper.reserved_gib() == 2.0 && hi.reserved_gib() == 0.5);
    // Capped at 1: memory-bound 0.80 x 1.1875 = 0.95; a link at 0.80 x 1.15 = 0.92.
    ensure!(close(hi.memory_bound_efficiency("add"), 0.95));
    let inter = &hi.network("nccl")?.inter.clone().ok_or_else(|| anyhow::anyhow!("no inter link"))?;
    ensure!(close(hi.link_efficiency(inter, OpKind::AllToAll)?, 0.92));
    ensure!(close(lo.link_latency_s(inter), 20e-6) && close(hi.link_latency_s(inter), 5e-6));
    Ok(())
}

#[test]
fn bands_bound_the_central_prediction() -> Result<()> {
    let paper = Hardware::load("dgx-a100-40gb")?
        .with_software(&Software::load("megatron-deepspeed-2023")?, Band::Central)?;
    let mut n = 0;
    for strategy in
        [StrategyConfig::Ulysses, StrategyConfig::MegatronSp, StrategyConfig::Ring { zigzag: true }]
    {
        for (seq, zero, dp) in [(8192, 3, 4), (65536, 3, 1), (32768, 1, 2), (131072, 0, 1)] {
            let job = Job {
                zero: ZeroStage::new(zero)?,
                dp,
                ..Job::new(GptConfig::preset("6.7b")?, strategy, 32, seq)
            };
            let [lo, mid, hi] = Band::ALL.map(|b| predict(&job, &paper.at_band(b)));
            let (lo, mid, hi) = (lo?, mid?, hi?);
            ensure!(
                lo.band == Band::Low && hi.band == Band::High && mid.software == "megatron-deepspeed-2023"
            );
            ensure!(
                lo.step_s >= mid.step_s && mid.step_s >= hi.step_s,
                "{}: steps {} / {} / {} s not ordered",
                job.describe(),
                lo.step_s,
                mid.step_s,
                hi.step_s
            );
            ensure!(lo.memory.capacity_bytes < mid.memory.capacity_bytes);
            ensure!(mid.memory.capacity_bytes < hi.memory.capacity_bytes);
            n += 1;
        }
    }
    ensure!(n == 12);
    Ok(())
}

/// Seconds of `p`'s fused attention kernels.
fn attention_s(p: &ulysses::cost::Prediction) -> f64 {
    p.compute.iter().filter(|c| c.1 == ulysses::cost::work::OpClass::Attention).map(|c| c.2).sum()
}

#[test]
fn few_heads_after_the_split_leave_the_sms_idle_that_the_grid_leaves() -> Result<()> {
    // 7B: 32 heads of 128. The paper's software (Triton FlashAttention: a CTA per 128 rows
    // forward, per 128 keys backward, one per SM) on an A100 (108 SMs), against the same machine
    // without SMs named (no grid factor): the ratio of the attention kernels' time is the grid's
    // factor alone, every other input equal.
    let sw = Software::load("megatron-deepspeed-2023")?;
    let a100 = Hardware::load("dgx-a100-40gb")?.with_software(&sw, Band::Central)?;
    ensure!(a100.device.sm_count == 108);
    let mut no_grid = a100.clone();
    no_grid.device.sm_count = 0;
    let cfg = GptConfig::preset("6.7b")?;
    for (ranks, seq, lo, hi, why) in [
        // One head per GPU at 8K, b = 1: forward 64 CTAs of 1..64 key blocks on 108 SMs, all
        // started at once and done when the longest is, 2080 / (108 x 64) = 0.30 busy; the
        // backward the same; the reference grid (16K tokens: 2 x 16 lanes) keeps them ~all busy.
        (32, 8192, 0.28, 0.33, "one head at 8K"),
        // Sixteen heads per GPU: 16 x 64 = 1024 CTAs, the reference's kind of grid.
        (2, 8192, 0.95, 1.05, "sixteen heads at 8K"),
        // One head at 256K: 2048 CTAs a lane, many waves: the long sequence fills the GPU.
        (32, 262_144, 0.95, 1.05, "one head at 256K"),
    ] {
        let job = Job { micro_batch: 1, ..Job::new(cfg.clone(), StrategyConfig::Ulysses, ranks, seq) };
        let factor = attention_s(&predict(&job, &no_grid)?) / attention_s(&predict(&job, &a100)?);
        ensure!(
            factor >= lo && factor <= hi,
            "{why}: attention runs at {factor} of the reference grid's speed"
        );
        // The optimistic end takes no loss; the pessimistic end the simulated one.
        let high = attention_s(&predict(&job, &no_grid.at_band(Band::High))?)
            / attention_s(&predict(&job, &a100.at_band(Band::High))?);
        ensure!((high - factor.max(1.0)).abs() < 1e-9, "{why}: high band factor {high} vs central {factor}");
        let low = attention_s(&predict(&job, &no_grid.at_band(Band::Low))?)
            / attention_s(&predict(&job, &a100.at_band(Band::Low))?);
        ensure!((low - factor).abs() < 1e-9, "{why}: low band factor {low} vs central {factor}");
    }
    // A baseline on the math kernel names no grid; a CPU names no SMs, so the measured
    // profile's grid (for a GPU's calibration) changes nothing there.
    ensure!(Software::load("megatron-lm-2023")?.attention_grid.is_none());
    let measured = Software::load("measured")?;
    ensure!(measured.attention_grid.is_some());
    let gridless = Software { attention_grid: None, ..measured.clone() };
    let cpu = Hardware::load("cpu-2core")?;
    let job = Job {
        micro_batch: 1,
        precision: Precision::F32,
        backend: "local".into(),
        ..Job::new(GptConfig::tiny(), StrategyConfig::Ulysses, 4, 2048)
    };
    let with = attention_s(&predict(&job, &cpu.with_software(&measured, Band::Central)?)?);
    let without = attention_s(&predict(&job, &cpu.with_software(&gridless, Band::Central)?)?);
    ensure!(with == without && with > 0.0, "{with} s with the grid, {without} s without");
    Ok(())
}

/// Seconds of the ZeRO-3 collectives of `p` in one pass, and what of them is exposed.
fn zero3_pass(p: &ulysses::cost::Prediction, forward: bool) -> (f64, f64) {
    let in_pass = |c: &&ulysses::cost::step::CommTime| {
        c.what.starts_with("block ") && (c.phase == ulysses::cost::Phase::Forward) == forward
    };
    let g = p.comm.iter().filter(in_pass).map(|c| c.seconds).sum();
    let e = p.comm.iter().filter(in_pass).map(|c| c.exposed).sum();
    (g, e)
}

#[test]
fn deepspeeds_prefetch_hides_what_the_pipeline_formula_says() -> Result<()> {
    let today = Hardware::load("dgx-a100-40gb")?;
    let paper = today.with_software(&Software::load("megatron-deepspeed-2023")?, Band::Central)?;
    for (seq, dp, ckpt) in
        [(32768, 8, Checkpointing::Full), (8192, 16, Checkpointing::Full), (16384, 8, Checkpointing::None)]
    {
        let job = Job {
            zero: ZeroStage::new(3)?,
            dp,
            checkpointing: ckpt,
            ..Job::new(GptConfig::preset("6.7b")?, StrategyConfig::Ulysses, 32, seq)
        };
        let units = (job.model.n_layer + 1) as f64;
        let p = predict(&job, &paper)?;
        // Every micro-step's compute: all of it but the once-per-step terms.
        let per_step: f64 = p
            .compute
            .iter()
            .filter(|c| c.0 == "optimizer update" || c.0 == "gradient reduction copies")
            .map(|c| c.2)
            .sum();
        let micro = p.compute_s() - per_step;
        let share = if ckpt == Checkpointing::Full { 0.25 } else { 1.0 / 3.0 };
        for (forward, c) in [(true, micro * share), (false, micro * (1.0 - share))] {
            let (g, exposed) = zero3_pass(&p, forward);
            let want = g / units + (units - 1.0) / units * (g - c).max(0.0);
            ensure!(
                g > 0.0 && (exposed - want).abs() <= 1e-12 * want,
                "{}: {exposed} vs {want}",
                job.describe()
            );
            ensure!(exposed < g, "{}: the prefetch hides nothing", job.describe());
        }
        // This toolkit's trainer (no prefetch in its software): every gather waits.
        let own = predict(&job, &today)?;
        for forward in [true, false] {
            let (g, exposed) = zero3_pass(&own, forward);
            ensure!(g > 0.0 && exposed == g);
        }
        // Pessimistic: nothing hidden, and one more gather per unit under full checkpointing,
        // of the forward's bytes; optimistic: all of it up to the whole compute.
        let lo = predict(&job, &paper.at_band(Band::Low))?;
        let again: Vec<_> = lo.comm.iter().filter(|c| c.what.ends_with("(recomputed forward)")).collect();
        let forward_bytes: f64 = lo
            .comm
            .iter()
            .filter(|c| c.what == "block parameter all-gather" && c.phase == ulysses::cost::Phase::Forward)
            .map(|c| c.bytes)
            .sum();
        if ckpt == Checkpointing::Full {
            ensure!(again.len() == 1 && again[0].bytes == forward_bytes && again[0].calls == units as u64);
        } else {
            ensure!(again.is_empty());
        }
        ensure!(lo.comm.iter().filter(|c| c.what.starts_with("block ")).all(|c| c.exposed == c.seconds));
        let hi = predict(&job, &paper.at_band(Band::High))?;
        let per_step_hi: f64 = hi
            .compute
            .iter()
            .filter(|c| c.0 == "optimizer update" || c.0 == "gradient reduction copies")
            .map(|c| c.2)
            .sum();
        let total: f64 = hi.comm.iter().filter(|c| c.what.starts_with("block ")).map(|c| c.seconds).sum();
        let exposed: f64 = hi.comm.iter().filter(|c| c.what.starts_with("block ")).map(|c| c.exposed).sum();
        let want = (total - (hi.compute_s() - per_step_hi)).max(0.0);
        ensure!((exposed - want).abs() <= 1e-9 * total, "{exposed} vs {want}");
    }
    Ok(())
}

#[test]
fn megatron_lms_distributed_optimizer_shards_the_tensor_parallel_states_over_dp() -> Result<()> {
    let today = Hardware::load("dgx-a100-40gb")?;
    let megatron = today.with_software(&Software::load("megatron-lm-2023")?, Band::Central)?;
    let optimizer = |m: &ulysses::cost::MemoryReport| {
        m.states.iter().filter(|t| t.name == "optimizer states").map(|t| t.bytes).sum::<f64>()
    };
    for (dp, zero) in [(2, 1), (4, 1), (4, 0), (1, 1)] {
        let job = Job {
            dp,
            zero: ZeroStage::new(zero)?,
            attention: AttentionConfig::new(Kernel::Math, Mask::Causal),
            ..Job::new(GptConfig::preset("6.7b")?, StrategyConfig::MegatronSp, 8 * dp, 8192)
        };
        let params = ulysses::cost::zero::params_on_rank(&job);
        let (own, theirs) = (optimizer(&memory(&job, 0, &today)?), optimizer(&memory(&job, 0, &megatron)?));
        // 12 bytes (f32 master weights and Adam's two moments) per tensor-parallel element,
        // kept whole by this toolkit, 1/dp of it by Megatron-LM's distributed optimizer.
        let want = if zero == 1 { 12.0 * params.sharded * (1.0 - 1.0 / dp as f64) } else { 0.0 };
        ensure!((own - theirs - want).abs() <= 1e-6 * own, "dp {dp} zero {zero}: {own} - {theirs} vs {want}");
    }
    Ok(())
}

#[test]
fn the_frameworks_time_per_layer_is_counted_once_per_layer_pass() -> Result<()> {
    let here = Hardware::load("cpu-2core")?;
    let per_layer = here.efficiency.layer_overhead_us * 1e-6;
    ensure!(per_layer > 0.0, "cpu-2core.toml has no measured layer overhead");
    let cfg = GptConfig { n_layer: 3, ..GptConfig::tiny() };
    for (ckpt, passes) in [(Checkpointing::None, 1.0), (Checkpointing::Full, 4.0 / 3.0)] {
        for accum in [1, 3] {
            // One rank on one thread: no oversubscription stretches it.
            let job = Job {
                precision: Precision::F32,
                checkpointing: ckpt,
                grad_accum: accum,
                backend: "local".into(),
                ..Job::new(cfg.clone(), StrategyConfig::Single, 1, 1024)
            };
            let p = predict(&job, &here)?;
            let got: f64 =
                p.compute.iter().filter(|c| c.0 == "framework dispatch (per layer)").map(|c| c.2).sum();
            let want = 3.0 * passes * per_layer * accum as f64;
            ensure!((got - want).abs() <= 1e-12 * want, "{}: {got} s vs {want} s", job.describe());
        }
    }
    // A GPU launches ahead of its kernels: no such term on the datasheet presets (not measured)...
    let a100 = Hardware::load("dgx-a100-40gb")?;
    let p = predict(&Job::new(GptConfig::preset("1.3b")?, StrategyConfig::Ulysses, 8, 8192), &a100)?;
    ensure!(p.compute.iter().filter(|c| c.0 == "framework dispatch (per layer)").all(|c| c.2 == 0.0));
    // ... and where measured, the host's launches overlap the kernels: the step shows only what
    // the launches take beyond the kernels, nothing where the kernels take longer.
    let mut launched = a100.clone();
    launched.efficiency.layer_overhead_us = 2000.0;
    for (cfg, seq, exposed) in [(GptConfig::tiny(), 256, true), (GptConfig::preset("1.3b")?, 8192, false)] {
        let job = Job::new(cfg, StrategyConfig::Single, 1, seq);
        let p = predict(&job, &launched)?;
        let dispatch: f64 =
            p.compute.iter().filter(|c| c.0 == "framework dispatch (per layer)").map(|c| c.2).sum();
        let kernels: f64 =
            p.compute.iter().filter(|c| c.0 != "framework dispatch (per layer)").map(|c| c.2).sum();
        let host = job.model.n_layer as f64 * 4.0 / 3.0 * 2000e-6;
        ensure!(
            (dispatch - (host - kernels).max(0.0)).abs() <= 1e-12 * host,
            "{}: dispatch {dispatch} s shown, launches {host} s, kernels {kernels} s",
            job.describe()
        );
        ensure!(
            (dispatch > 0.0) == exposed,
            "{}: dispatch {dispatch} s, kernels {kernels} s",
            job.describe()
        );
    }
    // Measured on this machine: 2 and 6 layers at 8 tokens differ by a positive time per layer
    // (6 layers are three times the dispatch of 2; the pairs are timed in turn, so load from
    // elsewhere slows both). Its size is calibration's to say (`ulysses calibrate`), not this
    // test's: under four busy loops on the two cores it came out at 0.096 s against about 1 ms
    // idle, so the bound only rules out a wrong difference (a second per layer at 8 tokens).
    let measured = ulysses::cost::calibrate::measure_layer_overhead(11)?;
    ensure!(measured > 0.0 && measured < 1.0, "{measured} s per layer");
    Ok(())
}

#[test]
fn polling_mpi_ranks_hold_their_cores_while_they_wait() -> Result<()> {
    // Four ranks on this machine's two cores: the local backend's waiting ranks sleep (the busy
    // ones share the freed cores: the mean load sets the pace), the MPI backend's poll (the most
    // loaded rank's work at its share of the cores sets it).
    let here = Hardware::load("cpu-2core")?;
    let step = |mask: Mask, backend: &str| -> Result<f64> {
        let job = Job {
            precision: Precision::F32,
            attention: AttentionConfig::new(Kernel::Sdpa, mask),
            backend: backend.into(),
            ..Job::new(GptConfig::tiny(), StrategyConfig::Ring { zigzag: false }, 4, 8192)
        };
        Ok(predict(&job, &here)?.compute_s())
    };
    // Unmasked, every rank does the same work: the two agree.
    let (local, mpi) = (step(Mask::None, "local")?, step(Mask::None, "mpi")?);
    ensure!((mpi - local).abs() <= 1e-9 * local, "unmasked: local {local} s, mpi {mpi} s");
    // Causal and contiguous, the last rank attends to 2P-1 times the first's pairs.
    let (local, mpi) = (step(Mask::Causal, "local")?, step(Mask::Causal, "mpi")?);
    ensure!(mpi > 1.1 * local, "causal: local {local} s, mpi {mpi} s");
    Ok(())
}

#[test]
fn a_sparse_kernel_without_padding_computes_the_visible_blocks_a_brute_force_count_finds() -> Result<()> {
    use ulysses::cost::flops::{padded_block_pairs, visible_block_pairs};
    let sparse = |block, local_blocks, global_blocks, causal| {
        Mask::BlockSparse(BlockSparse { block, local_blocks, global_blocks, causal })
    };
    for mask in [
        sparse(4, 3, 1, true),
        sparse(4, 3, 1, false),
        sparse(2, 4, 2, true),
        sparse(2, 4, 2, false),
        sparse(8, 1, 1, true),
        Mask::SlidingWindow { window: 4 },
    ] {
        let block = match mask {
            Mask::BlockSparse(b) => b.block,
            Mask::SlidingWindow { window } => window,
            _ => unreachable!(),
        };
        for n in [block, 5 * block, 12 * block, 12 * block + 3] {
            let nb = (n + block - 1) / block;
            // A key block counts for a query block when any of their pairs is visible.
            let mut blocks = 0i64;
            for qb in 0..nb {
                for kb in 0..nb {
                    let visible = (qb * block..((qb + 1) * block).min(n))
                        .any(|i| (kb * block..((kb + 1) * block).min(n)).any(|j| mask.allows(i, j)));
                    blocks += i64::from(visible);
                }
            }
            let want = (blocks * block * block) as f64;
            let got = visible_block_pairs(&mask, n);
            ensure!(got == want, "{mask:?} n={n}: {got} pairs vs brute force {want}");
            ensure!(padded_block_pairs(&mask, n) >= got, "{mask:?} n={n}: padding computes less");
        }
    }
    Ok(())
}

#[test]
fn process_ranks_pay_the_pack_copies_their_staging_and_a_fresh_processs_code_pages() -> Result<()> {
    use ulysses::cost::work::passes;
    use ulysses::cost::Phase;
    // The EPYC file measured both new inputs (`ulysses calibrate`); the arithmetic below holds
    // for any file that has them.
    let hw = Hardware::load("cpu-2core-epyc")?;
    ensure!(hw.device.code_pages_gib > 0.0, "cpu-2core-epyc.toml has no code_pages_gib");
    let (bw, eff) = (hw.device.memory_bandwidth_gbs * 1e9, hw.memory_bound_efficiency("a2a_pack"));
    let cfg = GptConfig::tiny();
    // Two ranks on the file's two cores, unmasked: equal work, no oversubscription stretch.
    let job = |strategy: StrategyConfig, backend: &str, b: i64| Job {
        precision: Precision::F32,
        attention: AttentionConfig::new(Kernel::Sdpa, Mask::None),
        backend: backend.into(),
        micro_batch: b,
        ..Job::new(cfg.clone(), strategy, 2, 2048)
    };
    let pack = |p: &ulysses::cost::Prediction| -> f64 {
        p.compute.iter().filter(|c| c.0 == "all-to-all pack and unpack copies").map(|c| c.2).sum()
    };
    let term = |m: &ulysses::cost::MemoryReport, name: &str| -> f64 {
        m.all_terms().iter().filter(|t| t.name == name).map(|t| t.bytes).sum()
    };
    for b in [1, 2] {
        let p = predict(&job(StrategyConfig::Ulysses, "mpi", b), &hw)?;
        // The bytes that cross in all-to-alls, copied once (b = 1: only the head side is
        // strided) or twice (b > 1: the sequence side too), read and written.
        let crossing: f64 = p
            .comm
            .iter()
            .filter(|c| c.op == OpKind::AllToAll && c.phase != Phase::Step)
            .map(|c| c.bytes)
            .sum();
        ensure!(crossing > 0.0, "Ulysses sends no all-to-all bytes?");
        let want = passes::PACK * b as f64 * crossing / (bw * eff);
        ensure!((pack(&p) - want).abs() <= 1e-12 * want, "b = {b}: pack {} s vs {want} s", pack(&p));
        // Staging: q's H/P heads of the rank's tokens for the other peer, out and in.
        let (h, tok) = (cfg.n_embd as f64, (b * 2048 / 2) as f64);
        let staging = 2.0 * 1.0 * tok * (h / 2.0) * 4.0;
        let got = term(&p.memory, "MPI staging buffers (strided all-to-all chunks)");
        ensure!(got == staging, "b = {b}: staging {got} B vs {staging} B");
        let code = term(&p.memory, "library code a fresh process pages in");
        ensure!(code == hw.device.code_pages_gib * (1u64 << 30) as f64, "code pages {code} B");
        // Thread ranks copy each chunk straight into place and share a process that has run.
        let local = predict(&job(StrategyConfig::Ulysses, "local", b), &hw)?;
        ensure!(pack(&local) == 0.0, "thread ranks pay {} s of packing", pack(&local));
        ensure!(
            term(&local.memory, "library code a fresh process pages in") == 0.0
                && term(&local.memory, "MPI staging buffers (strided all-to-all chunks)") == 0.0,
            "thread ranks have no process of their own"
        );
        // The resident peak is what it was on threads plus the code pages once (not times the
        // allocator's slack) and the staging times the slack.
        let extra = p.memory.resident_bytes - local.memory.resident_bytes;
        let want = code + staging * hw.device.allocator_slack;
        ensure!((extra - want).abs() <= 1e-9 * want, "b = {b}: {extra} B more than threads, {want} expected");
    }
    // Megatron-SP sends contiguous slabs: nothing packed, no staging.
    let p = predict(&job(StrategyConfig::MegatronSp, "mpi", 1), &hw)?;
    ensure!(pack(&p) == 0.0 && term(&p.memory, "MPI staging buffers (strided all-to-all chunks)") == 0.0);
    // A GPU's allocator does not see code pages.
    let a100 = Hardware::load("dgx-a100-40gb")?;
    let p = predict(&Job::new(GptConfig::preset("1.3b")?, StrategyConfig::Ulysses, 8, 8192), &a100)?;
    ensure!(p.memory.process.is_empty(), "a GPU rank counts {:?}", p.memory.process);
    Ok(())
}

#[test]
fn offload_copies_hide_behind_the_blocks_beside_them_and_must_fit_the_hosts_memory() -> Result<()> {
    let gib = (1u64 << 30) as f64;
    let h100 = Hardware::load("dgx-h100")?;
    let host = h100.host.clone().ok_or_else(|| anyhow::anyhow!("dgx-h100.toml gives no [host]"))?;
    // The link at each band: the file's rate times its efficiency, the band's multiplier on it.
    let at = |band: Band| h100.at_band(band).host_link_bytes_per_s().unwrap_or(f64::NAN);
    ensure!(at(Band::Central) == host.link_gbs * 1e9 * host.link_efficiency);
    ensure!(at(Band::Low) == host.link_gbs * 1e9 * (host.link_efficiency * h100.bands.host_link[0]));
    ensure!(
        at(Band::High) == host.link_gbs * 1e9 * (host.link_efficiency * h100.bands.host_link[1]).min(1.0)
    );
    // Llama-3-8B on 8 GPUs with its block inputs offloaded.
    let cfg = GptConfig::preset("llama3-8b")?;
    let job = Job { offload: true, ..Job::new(cfg.clone(), StrategyConfig::Ulysses, 8, 131_072) };
    let block = (131_072 / 8) as f64 * cfg.n_embd as f64 * 2.0; // [s/P, h] in bf16
    let l = cfg.n_layer as f64;
    for band in Band::ALL {
        let hw = h100.at_band(band);
        let p = predict(&job, &hw)?;
        let o = p.offload.clone().ok_or_else(|| anyhow::anyhow!("no offload time on dgx-h100"))?;
        ensure!(o.bytes == l * block, "{band:?}: {} B each way, {} expected", o.bytes, l * block);
        let t = block / at(band);
        ensure!(
            (o.seconds - 2.0 * l * t).abs() <= 1e-12 * o.seconds,
            "{band:?}: {} s on the link",
            o.seconds
        );
        // Pessimistic: nothing hidden; optimistic: everything (central: by hand below).
        match band {
            Band::Low => {
                ensure!(o.exposed == o.seconds, "low band: {} of {} s exposed", o.exposed, o.seconds)
            }
            Band::High => ensure!(o.exposed == 0.0, "high band: {} s exposed", o.exposed),
            Band::Central => ensure!(o.exposed >= 0.0 && o.exposed <= o.seconds, "exposed {}", o.exposed),
        }
        // The step counts it.
        let parts = p.compute_s() + p.comm_exposed_s() + o.exposed;
        ensure!(
            (p.step_s - parts).abs() <= 1e-9 * p.step_s,
            "{band:?}: step {} s, parts {parts} s",
            p.step_s
        );
        ensure!(p.memory.host_bytes == l * block, "{band:?}: {} B in host memory", p.memory.host_bytes);
    }
    // The central exposure by hand: each copy hidden up to the compute of the block beside it
    // (a quarter of a block's compute beside the copy out, its recomputation and backward beside
    // the copy back), the micro-step's compute (less the once-per-step terms) spread evenly
    // over the blocks.
    let p = predict(&Job { optimizer: false, ..job.clone() }, &h100)?;
    let o = p.offload.clone().ok_or_else(|| anyhow::anyhow!("no offload time"))?;
    let t = block / at(Band::Central);
    let c = p.compute_s()
        - p.compute.iter().filter(|c| c.0 == "gradient reduction copies").map(|c| c.2).sum::<f64>();
    let want = l * ((t - c / (4.0 * l)).max(0.0) + (t - 3.0 * c / (4.0 * l)).max(0.0));
    ensure!(
        (o.exposed - want).abs() <= 1e-9 * o.seconds,
        "central exposed {} s, {want} s by hand",
        o.exposed
    );
    // Without offload, or on a file without a host: nothing timed, nothing in host memory.
    ensure!(predict(&Job { offload: false, ..job.clone() }, &h100)?.offload.is_none());
    let mut no_host = h100.clone();
    no_host.host = None;
    let p = predict(&job, &no_host)?;
    ensure!(p.offload.is_none() && p.memory.host_capacity_bytes.is_none());
    // Llama-3-70B at 4M tokens on one node: 80 block inputs of [4M/8, 8192] bf16 a GPU are more
    // than its eighth of the node's host memory.
    let big = GptConfig::preset("llama3-70b")?;
    let job = Job { offload: true, ..Job::new(big.clone(), StrategyConfig::Ulysses, 8, 4 << 20) };
    let m = memory(&job, 0, &h100)?;
    let share = host.memory_gib * gib / 8.0;
    ensure!(m.host_capacity_bytes == Some(share), "{:?}", m.host_capacity_bytes);
    ensure!(m.host_bytes > share && !m.fits, "{} B offloaded of {share}: fits = {}", m.host_bytes, m.fits);
    no_host.host = None;
    ensure!(memory(&job, 0, &no_host)?.host_bytes > share, "the bytes do not depend on the file");
    // Chunked Ulysses' offload (FPDT): without checkpointing every layer's chunks go to the host
    // and back: q (the rank's 4 query heads of 128) and K/V (its one kv head of Llama-3-8B's 8) in
    // bf16, the output and log-sum-exp in f32; the key chunks read again come back besides
    // (causal, u = 4: 6 forward and 6 backward reads of a quarter of the K/V). Under full
    // checkpointing one layer's at a time. Other strategies keep no chunks: refused.
    let kv = |ckpt: Checkpointing| Job {
        kv_offload: true,
        checkpointing: ckpt,
        ..Job::new(cfg.clone(), StrategyConfig::UlyssesChunked { chunks: 4 }, 8, 131_072)
    };
    let n = 131_072.0;
    let per_layer = n * (4.0 + 2.0 * 1.0) * 128.0 * 2.0 + n * 4.0 * 128.0 * 4.0 + n * 4.0 * 4.0;
    let reads = 12.0 * 2.0 * (n / 4.0) * 1.0 * 128.0 * 2.0;
    let p = predict(&kv(Checkpointing::None), &h100)?;
    let o = p.offload.clone().ok_or_else(|| anyhow::anyhow!("no K/V offload time"))?;
    ensure!(
        o.bytes == l * per_layer && p.memory.host_bytes == l * per_layer,
        "{} B, {} B",
        o.bytes,
        p.memory.host_bytes
    );
    ensure!(o.bytes_back == l * (per_layer + reads), "{} B back", o.bytes_back);
    ensure!(memory(&kv(Checkpointing::Full), 0, &h100)?.host_bytes == per_layer);
    let plain = Job { kv_offload: false, ..kv(Checkpointing::None) };
    ensure!(p.memory.peak_bytes < predict(&plain, &h100)?.memory.peak_bytes, "K/V offload frees nothing?");
    let err = predict(&Job { strategy: StrategyConfig::Ulysses, ..kv(Checkpointing::None) }, &h100)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    ensure!(err.contains("K/V offload is chunked Ulysses'"), "{err}");
    Ok(())
}

#[test]
fn zero_offload_moves_the_optimizer_to_the_host_and_prices_its_update_there() -> Result<()> {
    // Llama-3-8B on 4 A100-40GB, Ulysses, ZeRO-3: with the optimizer offloaded the device keeps
    // its parameter shard only; the host holds the states (12 B a parameter of the partition)
    // and an f32 gradient partition (4 B); the update streams 30 B a parameter at the rank's
    // quarter of the node's 409.6 GB/s at 0.5; the gradients (f32 reduction) go out and the
    // bf16 parameters come back over the 32 GB/s link at 0.75.
    let hw = Hardware::load("dgx-a100-40gb")?;
    let cfg = GptConfig::preset("llama3-8b")?;
    let base = Job { zero: ZeroStage::new(3)?, ..Job::new(cfg, StrategyConfig::Ulysses, 4, 32768) };
    let off = Job { optimizer_offload: true, ..base.clone() };
    let (m0, m1) = (memory(&base, 0, &hw)?, memory(&off, 0, &hw)?);
    ensure!(m1.states[0].bytes == m0.states[0].bytes, "parameters moved: {:?}", m1.states);
    ensure!(m1.states[1].bytes == 0.0 && m1.states[2].bytes == 0.0, "left on the device: {:?}", m1.states);
    let partition = m0.states[2].bytes / 12.0;
    ensure!(partition > 1.9e9, "a quarter of 8B parameters: {partition}");
    ensure!(
        (m1.host_bytes - 16.0 * partition).abs() <= 1e-6 * m1.host_bytes,
        "host {} B, expected {} B",
        m1.host_bytes,
        16.0 * partition
    );
    ensure!(m1.peak_bytes < m0.peak_bytes - 13.0 * partition, "{} -> {}", m0.peak_bytes, m1.peak_bytes);
    let (p0, p1) = (predict(&base, &hw)?, predict(&off, &hw)?);
    let o = p1.optimizer_offload.clone().ok_or_else(|| anyhow::anyhow!("no optimizer offload priced"))?;
    let close = |a: f64, b: f64| (a - b).abs() <= 1e-9 * b.abs().max(1e-12);
    ensure!(close(o.params, partition), "{} parameters, {partition}", o.params);
    ensure!(close(o.update_s, partition * 30.0 / (409.6e9 * 0.5 / 4.0)), "update {} s", o.update_s);
    let link = 32e9 * 0.75;
    ensure!(close(o.copies_s, partition * 4.0 / link + partition * 2.0 / link), "copies {} s", o.copies_s);
    // The device's update term is gone and the exposed host side is added, nothing else moves.
    let device_update: f64 = p0.compute.iter().filter(|c| c.0 == "optimizer update").map(|c| c.2).sum();
    ensure!(device_update > 0.0 && p1.compute.iter().all(|c| c.0 != "optimizer update"));
    ensure!(
        close(p1.step_s - o.exposed, p0.step_s - device_update),
        "{} - {} vs {} - {device_update}",
        p1.step_s,
        o.exposed,
        p0.step_s
    );
    // At least the update and the way back are exposed; the bands order the exposure.
    ensure!(o.exposed >= o.update_s + partition * 2.0 / link * (1.0 - 1e-12));
    let at = |band| -> Result<f64> {
        Ok(predict(&off, &hw.at_band(band))?.optimizer_offload.map_or(f64::NAN, |o| o.exposed))
    };
    let (lo, hi) = (at(Band::Low)?, at(Band::High)?);
    ensure!(lo > o.exposed && o.exposed > hi, "exposed: low {lo}, central {}, high {hi}", o.exposed);
    // Refused: stage 0 (nothing partitioned to move), and a file that gives no host bandwidth.
    let e = predict(&Job { zero: ZeroStage::NONE, ..off.clone() }, &hw).err().map(|e| e.to_string());
    ensure!(e.as_deref().is_some_and(|e| e.contains("ZeRO stage 1 or more")), "{e:?}");
    let mut no_bw = hw.clone();
    if let Some(h) = no_bw.host.as_mut() {
        h.memory_gbs = None;
        h.adam_efficiency = None;
    }
    let e = predict(&off, &no_bw).err().map(|e| e.to_string());
    ensure!(e.as_deref().is_some_and(|e| e.contains("memory_gbs")), "{e:?}");
    Ok(())
}
