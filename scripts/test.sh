#!/usr/bin/env bash
# The whole test suite, after the set-up: formatting, clippy (warnings are errors) with and
# without the optional backends, every test in release mode (libtorch kernels are optimised
# either way; release keeps one build for tests and benches) with the MPI backend (OpenMPI from
# the set-up; its tests start real processes with mpirun) and the NCCL backend (built and
# checked for its error without a GPU; scripts/gpu-check.sh runs it on one), `ulysses submit` on
# a single-node Slurm cluster that scripts/slurm.sh installs and starts, a build of the
# benchmarks, and every notebook executed on the evcxr Rust kernel (scripts/notebooks.sh --check;
# the first time it installs evcxr, about 26 minutes on 2 cores).
#   ./scripts/test.sh                  # everything
#   ./scripts/test.sh --no-notebooks   # everything but the notebooks
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
notebooks=1
for arg in "$@"; do
  case "$arg" in
    --no-notebooks) notebooks=0 ;;
    *) echo "[test] unknown option $arg (the only one is --no-notebooks)" >&2; exit 2 ;;
  esac
done
"$repo/scripts/setup.sh"
cd "$repo"
step() { echo; echo "=== $* === ($(date +%T))"; }
step "cargo fmt --check"
cargo fmt --all -- --check
step "cargo clippy (features: mpi, nccl)"
cargo clippy --release --all-targets --features mpi,nccl -- -D warnings
step "cargo clippy (no features)"
cargo clippy --release --all-targets -- -D warnings
step "cargo test (features: mpi, nccl)"
cargo test --release --features mpi,nccl
step "Slurm: a single-node cluster (scripts/slurm.sh start), ulysses submit for real"
"$repo/scripts/slurm.sh" start
cargo test --release --features mpi,nccl --test slurm -- --ignored
step "cargo bench --no-run"
cargo bench --no-run --features mpi,nccl
if [ "$notebooks" = 1 ]; then
  step "notebooks (evcxr kernel, executed into results/notebooks/)"
  "$repo/scripts/notebooks.sh" --check
fi
echo; echo "all checks passed ($(date +%T))"
