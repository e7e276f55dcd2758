//! Property tests: random world sizes, batches, lengths (N < 2P, N prime, N < P), heads and kv
//! heads (dividing H), head sizes, masks, kernels, strategies and dtypes. Every case either
//! matches single-device f64 attention (output, dq, dk, dv and the log-sum-exp, element by
//! element within the dtype's tolerance: tests/common/parity.rs) or is refused with an error
//! that says one of the case's faults and names its numbers, exactly when the strategy's own
//! check (or the kernel's) says it cannot run. The faults come from each strategy's
//! requirements written out in this file, and the library's checks must agree with them.
//! Never a panic, never NaN.
//!
//! [`CASES`] cases per run (about half run, half are refused), which take about 20 s on the
//! 2-core machine; `PROPTEST_CASES=N` runs more. The seed is random unless `PROPTEST_RNG_SEED`
//! fixes it; a failing case is saved in `tests/properties.proptest-regressions` and replayed
//! first on the next run.

mod common;

use common::parity::{allclose, reference, run, tol, Grad, Spec};
use proptest::prelude::*;
use tch::Kind;
use ulysses::attention::{AttentionConfig, BlockSparse, Kernel, Mask, StrategyConfig};

/// Cases per run in CI: 2048, about 20 s on the 2-core machine (1030 of 2002 ran in one run,
/// the others were refused).
const CASES: u32 = 2048;

fn config() -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(CASES);
    ProptestConfig { cases, max_shrink_iters: 200, ..ProptestConfig::default() }
}

/// One generated case.
#[derive(Debug, Clone, Copy)]
struct Case {
    p: usize,
    strategy: StrategyConfig,
    kernel: Kernel,
    mask: Mask,
    spec: Spec,
}

fn masks(n: i64) -> impl Strategy<Value = Mask> {
    prop_oneof![
        Just(Mask::None),
        Just(Mask::Causal),
        (1..=n + 2).prop_map(|window| Mask::SlidingWindow { window }),
        (1i64..=6, 1i64..=4, any::<bool>()).prop_flat_map(|(block, local_blocks, causal)| {
            (0..=local_blocks).prop_map(move |global_blocks| {
                Mask::BlockSparse(BlockSparse { block, local_blocks, global_blocks, causal })
            })
        }),
    ]
}

fn strategies(p: usize) -> impl Strategy<Value = StrategyConfig> {
    prop_oneof![
        1 => Just(StrategyConfig::Single),
        3 => Just(StrategyConfig::Ulysses),
        2 => Just(StrategyConfig::MegatronSp),
        2 => any::<bool>().prop_map(|zigzag| StrategyConfig::Ring { zigzag }),
        2 => any::<bool>().prop_map(|zigzag| StrategyConfig::AllGatherKv { zigzag }),
        2 => (1..=p, any::<bool>()).prop_map(|(ulysses, zigzag)| StrategyConfig::Usp { ulysses, zigzag }),
        2 => (1usize..=3).prop_map(|chunks| StrategyConfig::UlyssesChunked { chunks }),
    ]
}

/// Any length up to 40 (N < P, N < 2P, primes), or a multiple of 2P (what zigzag layouts and
/// Megatron-SP take), so that about half the cases run and half are refused.
fn lengths(p: usize) -> impl Strategy<Value = i64> {
    let p = p as i64;
    prop_oneof![1i64..=40, (1i64..=3).prop_map(move |k| 2 * p * k)]
}

/// Any head count up to 8, or a multiple of P (what Megatron-SP takes).
fn head_counts(p: usize) -> impl Strategy<Value = i64> {
    let p = p as i64;
    prop_oneof![1i64..=8, (1i64..=2).prop_map(move |k| p * k)]
}

fn cases() -> impl Strategy<Value = Case> {
    (1usize..=8)
        .prop_flat_map(|p| (Just(p), lengths(p), head_counts(p), strategies(p)))
        .prop_flat_map(|(p, n, heads, strategy)| {
            let divisors: Vec<i64> = (1..=heads).filter(|k| heads % k == 0).collect();
            let shape = (
                1i64..=2,
                proptest::sample::select(divisors),
                prop_oneof![1i64..=8, Just(16i64), Just(64i64)],
            );
            let values = (
                proptest::sample::select(vec![Kind::Double, Kind::Float, Kind::BFloat16]),
                proptest::sample::select(vec![0.5, 3.0, 10.0]),
                prop_oneof![Just(Grad::Ones), Just(Grad::Random)],
                0u64..1000,
            );
            let kernel = proptest::sample::select(vec![Kernel::Math, Kernel::Sdpa, Kernel::Blocked]);
            (Just((p, n, heads, strategy)), shape, values, kernel, masks(n))
        })
        .prop_map(|((p, n, heads, strategy), (b, kv_heads, d), (kind, logits, grad, seed), kernel, mask)| {
            Case {
                p,
                strategy,
                kernel,
                mask,
                spec: Spec { b, n, heads, kv_heads, d, kind, logits, grad, seed },
            }
        })
}

/// Whether the case can run, by the checks a user can call before launching anything.
fn runnable(c: &Case) -> bool {
    let kernel_used =
        matches!(c.strategy, StrategyConfig::Single | StrategyConfig::Ulysses | StrategyConfig::MegatronSp);
    c.strategy.check(c.spec.n, c.p, c.spec.heads, c.spec.kv_heads).is_ok()
        && (!kernel_used || AttentionConfig::new(c.kernel, c.mask).build().is_ok())
}

/// A reason a case cannot run: a word the refusal must say and the numbers it must name.
#[derive(Debug)]
struct Fault {
    word: &'static str,
    numbers: Vec<i64>,
}

/// Every reason the case cannot run, by each strategy's requirements written out here from its
/// definition (not by the library's checks, which [`runnable`] calls): the test then holds the
/// checks to these rules, and each refusal to one of them.
fn faults(c: &Case) -> Vec<Fault> {
    let (n, p, h) = (c.spec.n, c.p as i64, c.spec.heads);
    let fault = |word, numbers: &[i64]| Fault { word, numbers: numbers.to_vec() };
    let mut out = Vec::new();
    // Every rank a token of a contiguous split; zigzag: 2P equal chunks.
    let contiguous = |out: &mut Vec<Fault>, ranks: i64| {
        if n < ranks {
            out.push(fault("token", &[n, ranks]));
        }
    };
    let zigzag = |out: &mut Vec<Fault>, ranks: i64| {
        if n % (2 * ranks) != 0 {
            out.push(fault("2P", &[n, 2 * ranks]));
        }
    };
    match c.strategy {
        StrategyConfig::Single if p != 1 => out.push(fault("1 rank", &[p])),
        StrategyConfig::Single => {}
        // All-to-all over heads: a query head per rank (H >= P; uneven splits are allowed).
        StrategyConfig::Ulysses => {
            if h < p {
                out.push(fault("head", &[h, p]));
            }
            contiguous(&mut out, p);
        }
        // Tensor parallelism: P divides H and H_kv.
        StrategyConfig::MegatronSp => {
            if h % p != 0 || c.spec.kv_heads % p != 0 {
                out.push(fault("divisible", &[p, h, c.spec.kv_heads]));
            }
            contiguous(&mut out, p);
        }
        // Ring passes equal blocks: P divides N.
        StrategyConfig::Ring { zigzag: true } | StrategyConfig::AllGatherKv { zigzag: true } => {
            zigzag(&mut out, p)
        }
        StrategyConfig::Ring { zigzag: false } => {
            if n % p != 0 {
                out.push(fault("divisible", &[n, p]));
            }
        }
        StrategyConfig::AllGatherKv { zigzag: false } => contiguous(&mut out, p),
        // A ring of P/U ranks of Ulysses groups of U: U divides P, a head per Ulysses rank,
        // equal ring chunks (each rank's chunk, N/ring tokens, cut into U equal runs).
        StrategyConfig::Usp { ulysses: u, zigzag: z } => {
            let u = u as i64;
            if p % u != 0 {
                out.push(fault("Ulysses degree", &[u, p]));
            } else {
                if h < u {
                    out.push(fault("head", &[h, u]));
                }
                let ring = p / u;
                if z {
                    zigzag(&mut out, ring);
                } else if n % ring != 0 {
                    out.push(fault("divisible", &[n, ring]));
                }
                if n % ring == 0 && (n / ring) % u != 0 {
                    out.push(fault("evenly", &[u]));
                }
            }
        }
        // Ulysses on u equal chunks of each rank's sequence: a head per rank, P divides N and u
        // divides N/P.
        StrategyConfig::UlyssesChunked { chunks } => {
            let u = chunks as i64;
            if h < p {
                out.push(fault("head", &[h, p]));
            }
            if n % p != 0 {
                out.push(fault("chunk", &[n, p]));
            } else if (n / p) % u != 0 {
                out.push(fault("chunk", &[n / p, u]));
            }
        }
    }
    // The blocked kernel computes a pattern's blocks: a dense rule has none to skip.
    let kernel_used =
        matches!(c.strategy, StrategyConfig::Single | StrategyConfig::Ulysses | StrategyConfig::MegatronSp);
    if kernel_used && c.kernel == Kernel::Blocked && matches!(c.mask, Mask::None | Mask::Causal) {
        out.push(fault("dense", &[]));
    }
    out
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn every_case_matches_one_device_or_is_refused_naming_the_numbers(c in cases()) {
        let label = format!("{} P={} kernel {:?} {:?} {:?}", c.strategy.label(), c.p, c.kernel, c.mask, c.spec);
        // The library's checks agree with the rules written out here.
        let faults = faults(&c);
        prop_assert!(
            faults.is_empty() == runnable(&c),
            "{label}: by the rules {faults:?}, but the library's checks say runnable = {}",
            runnable(&c)
        );
        match run(c.strategy, c.kernel, c.p, &c.spec, c.mask) {
            Ok(got) => {
                prop_assert!(runnable(&c), "{label}: ran although its check refuses it");
                let want = reference(&c.spec, c.mask).map_err(|e| TestCaseError::fail(e.to_string()))?;
                for (i, name) in ["out", "dq", "dk", "dv", "lse"].iter().enumerate() {
                    allclose(&format!("{label} {name}"), &got[i], &want[i], tol(&c.spec, c.p))
                        .map_err(|e| TestCaseError::fail(e.to_string()))?;
                }
            }
            Err(e) => {
                let text = e.to_string();
                prop_assert!(!runnable(&c), "{label}: refused although its check accepts it: {text}");
                prop_assert!(!text.contains("panicked"), "{label}: a rank panicked: {text}");
                // The refusal is one of the case's faults: it says that fault's word and names
                // every number of it (as a whole number, not a digit of another).
                let numbers: Vec<&str> = text.split(|ch: char| !ch.is_ascii_digit()).collect();
                let names = |f: &Fault| {
                    text.contains(f.word) && f.numbers.iter().all(|x| numbers.contains(&x.to_string().as_str()))
                };
                prop_assert!(faults.iter().any(names), "{label}: the refusal is none of {faults:?}: {text}");
            }
        }
    }
}
