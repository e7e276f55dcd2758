//! Checks for the exercises of the notebooks (notebooks/README.md, "Exercises").
//!
//! Each exercise asks the learner for one function; its check here runs that function on
//! several world sizes and shapes against a reference computed another way, and returns a
//! one-line verdict, or an error naming the first mismatch (the exercise, the case, the rank,
//! what came back and what was expected). The notebooks and their reference solutions
//! (notebooks/solutions/) call the same checks, and tests/course.rs makes sure that every check
//! accepts the reference solution and rejects wrong ones.
//!
//! [`attempt`] runs a check in a notebook cell: a stub that still panics with its `todo!()`
//! gives [`Outcome::NotAttempted`] instead of a failing cell.

use std::fmt;
use std::panic::{catch_unwind, AssertUnwindSafe};

use tch::{Device, Kind, Tensor};

use crate::attention::{AttentionConfig, SequenceParallel, UlyssesAttention};
use crate::autograd::Tape;
use crate::comm::{launch, Group, OpKind};
use crate::{Error, Result, TorchResultExt};

/// What a check said about the learner's function.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The function still panics with its `todo!()`.
    NotAttempted(String),
    /// The check passed: its verdict.
    Passed(String),
    /// The check failed: the first mismatch, or the learner's own error or panic.
    Failed(String),
}

impl Outcome {
    /// Whether the check passed.
    pub fn passed(&self) -> bool {
        matches!(self, Outcome::Passed(_))
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Outcome::NotAttempted(what) => write!(f, "not attempted yet: {what}"),
            Outcome::Passed(verdict) => write!(f, "{verdict}"),
            Outcome::Failed(mismatch) => write!(f, "not yet right: {mismatch}"),
        }
    }
}

/// The text `todo!()` panics with.
const TODO: &str = "not yet implemented";

/// Runs `check` (one of this module's checks on the learner's function) with panics caught and
/// their message kept off stderr: a `todo!()` still in the function (on any rank) gives
/// [`Outcome::NotAttempted`], any other panic or error [`Outcome::Failed`] with its message.
pub fn attempt(check: impl FnOnce() -> Result<String>) -> Outcome {
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let result = catch_unwind(AssertUnwindSafe(check));
    std::panic::set_hook(hook);
    let message = match result {
        Ok(Ok(verdict)) => return Outcome::Passed(verdict),
        Ok(Err(e)) => e.to_string(),
        Err(panic) => panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "a panic with a non-string payload".into()),
    };
    if message.contains(TODO) {
        Outcome::NotAttempted(format!("the function still has its todo!() ({message})"))
    } else {
        Outcome::Failed(message)
    }
}

fn mismatch(op: &'static str, msg: String) -> Error {
    Error::InvalidArgument { op, group: "world".into(), msg }
}

/// (P, b, N, H, d) of the re-sharding check: P = 1 to 4, P dividing N and H.
const RESHARD_CASES: [(usize, i64, i64, i64, i64); 5] =
    [(1, 1, 4, 2, 1), (2, 1, 8, 4, 2), (3, 1, 6, 6, 1), (4, 2, 8, 4, 3), (4, 1, 16, 8, 2)];

/// Exercise of notebook 01: Ulysses' forward re-sharding. `f(group, x)` gets rank r's
/// `[b, N/P, H, d]` (tokens `r N/P ..`, every head) and must return `[b, N, H/P, d]` (every
/// token, heads `r H/P ..`), in sequence and head order. The reference slices one global tensor
/// whose every element is distinct: by tokens for the input, by heads for the expected output.
pub fn check_ulysses_reshard<F>(f: F) -> Result<String>
where
    F: Fn(&Group, &Tensor) -> Result<Tensor> + Sync,
{
    const OP: &str = "check_ulysses_reshard";
    for (p, b, n, h, d) in RESHARD_CASES {
        let pi = p as i64;
        let case = format!("P={p}, global [b={b}, N={n}, H={h}, d={d}]");
        let found = launch(p, |ctx| -> Result<Option<String>> {
            let r = ctx.rank() as i64;
            // Every rank builds the same global tensor (a Tensor cannot be shared by the threads).
            let global = Tensor::arange(b * n * h * d, (Kind::Double, Device::Cpu)).reshape([b, n, h, d]);
            let x = global.f_narrow(1, r * n / pi, n / pi).op(OP)?.copy();
            let want = global.f_narrow(2, r * h / pi, h / pi).op(OP)?;
            let got = f(ctx.world(), &x)?;
            let (gs, ws) = (got.size(), want.size());
            if gs != ws {
                return Ok(Some(format!(
                    "rank {r} was given {:?} and returned {gs:?}, expected {ws:?}",
                    x.size()
                )));
            }
            let got = got.f_to_kind(Kind::Double).op(OP)?;
            let wrong = got.f_ne_tensor(&want).op(OP)?.f_nonzero().op(OP)?;
            if wrong.size()[0] == 0 {
                return Ok(None);
            }
            let at = Vec::<i64>::try_from(wrong.get(0)).op(OP)?;
            // Element ((b' N + t) H + head) d + d' of the global tensor is token t, head `head`.
            let input = |v: f64| {
                let i = v as i64;
                if v == i as f64 && (0..b * n * h * d).contains(&i) {
                    format!("{v} (token {}, head {})", i / (h * d) % n, i / d % h)
                } else {
                    format!("{v} (not an input element)")
                }
            };
            Ok(Some(format!(
                "rank {r} returned the right shape {gs:?} but element {at:?} is {} where {} was expected",
                input(got.double_value(&at)),
                input(want.double_value(&at)),
            )))
        })?;
        if let Some(msg) = found.into_iter().flatten().next() {
            return Err(mismatch(OP, format!("{case}: {msg}")));
        }
    }
    Ok(format!(
        "correct: [b, N/P, H, d] -> [b, N, H/P, d] on every rank for {} cases (P = 1 to 4)",
        RESHARD_CASES.len()
    ))
}

/// (P, N, H, H_kv) of the bytes check: P divides N, H and H_kv (the closed form's even case).
const BYTES_CASES: [(usize, i64, i64, i64); 6] =
    [(2, 16, 4, 4), (2, 32, 8, 2), (4, 32, 8, 8), (4, 32, 8, 4), (3, 24, 6, 3), (8, 64, 16, 8)];

/// Exercise of notebook 02: `f(n, p, heads, kv_heads, d)` must give the bytes one rank sends in
/// the all-to-alls of one Ulysses attention layer, forward and backward, for one sequence
/// (b = 1) of f32. The reference is what the library counts: [`UlyssesAttention`] runs forward
/// and backward on P thread ranks and every rank's all-to-all bytes are compared.
pub fn check_ulysses_bytes<F>(f: F) -> Result<String>
where
    F: Fn(u64, u64, u64, u64, u64) -> u64,
{
    const OP: &str = "check_ulysses_bytes";
    let d = 4i64;
    for (p, n, heads, kv_heads) in BYTES_CASES {
        let yours = f(n as u64, p as u64, heads as u64, kv_heads as u64, d as u64);
        let counted = launch(p, |ctx| -> Result<(u64, u64)> {
            let g = ctx.world();
            let attn =
                UlyssesAttention::new(g.clone(), AttentionConfig::default().build()?, n, heads, kv_heads)?;
            let s = attn.layout().len(ctx.rank());
            let seed = ctx.rank() as f64;
            let input = |kv: i64, shift: f64| {
                let len = s * kv * d;
                (Tensor::arange(len, (Kind::Float, Device::Cpu)) * 0.1 + seed + shift)
                    .sin()
                    .reshape([1, s, kv, d])
                    .set_requires_grad(true)
            };
            let (q, k, v) = (input(heads, 0.0), input(kv_heads, 1.0), input(kv_heads, 2.0));
            let tape = Tape::new();
            let o = attn.forward(&tape, &q, &k, &v)?;
            let forward = g.stats().op(OpKind::AllToAll).bytes_sent;
            tape.backward(&o.sum(Kind::Float))?;
            Ok((forward, g.stats().op(OpKind::AllToAll).bytes_sent))
        })?;
        for (r, (forward, both)) in counted.into_iter().enumerate() {
            if yours != both {
                return Err(mismatch(
                    OP,
                    format!(
                        "P={p}, N={n}, H={heads}, H_kv={kv_heads}, d={d}: your formula gives {yours} B, \
                         rank {r} sent {both} B ({forward} B forward + {} B backward)",
                        both - forward
                    ),
                ));
            }
        }
    }
    Ok(format!(
        "correct: the bytes of every rank in {} layers (P = 2 to 8, H_kv from H down to H/4)",
        BYTES_CASES.len()
    ))
}
