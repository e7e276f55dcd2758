#!/usr/bin/env bash
# The whole test suite, after the set-up: formatting, clippy (warnings are errors) with and
# without the optional backends, every test in release mode (libtorch kernels are optimised
# either way; release keeps one build for tests and benches) with the MPI backend (OpenMPI from
# the set-up; its tests start real processes with mpirun) and the NCCL backend (built and
# checked for its error without a GPU; scripts/gpu-check.sh runs it on one), and a build of the
# benchmarks.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
"$repo/scripts/setup.sh"
cd "$repo"
step() { echo; echo "=== $* ==="; }
step "cargo fmt --check"
cargo fmt --all -- --check
step "cargo clippy (features: mpi, nccl)"
cargo clippy --release --all-targets --features mpi,nccl -- -D warnings
step "cargo clippy (no features)"
cargo clippy --release --all-targets -- -D warnings
step "cargo test (features: mpi, nccl)"
cargo test --release --features mpi,nccl
step "cargo bench --no-run"
cargo bench --no-run --features mpi,nccl
echo; echo "all checks passed"
