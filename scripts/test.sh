#!/usr/bin/env bash
# The whole test suite, after the set-up: formatting, clippy (warnings are errors), every test in
# release mode (libtorch kernels are optimised either way; release keeps one build for tests and
# benches), and a build of the benchmarks so they cannot rot.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
"$repo/scripts/setup.sh"
cd "$repo"
step() { echo; echo "=== $* ==="; }
step "cargo fmt --check"
cargo fmt --all -- --check
step "cargo clippy"
cargo clippy --release --all-targets -- -D warnings
step "cargo test"
cargo test --release
step "cargo bench --no-run"
cargo bench --no-run
echo; echo "all checks passed"
