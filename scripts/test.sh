#!/usr/bin/env bash
# The whole test suite, after the set-up: formatting, clippy (warnings are errors) with and
# without the optional backends, every test in release mode (libtorch kernels are optimised
# either way; release keeps one build for tests and benches) with the MPI backend (OpenMPI from
# the set-up; its tests start real processes with mpirun) and the NCCL backend (built and
# checked for its error without a GPU; scripts/gpu-check.sh runs it on one), the float-comparing
# tests again with libtorch's kernels held to older instruction sets, `ulysses submit` on
# a single-node Slurm cluster that scripts/slurm.sh installs and starts, a build of the
# benchmarks, and every notebook executed on the evcxr Rust kernel (scripts/notebooks.sh --check;
# the first time it installs evcxr).
#   ./scripts/test.sh                  # everything
#   ./scripts/test.sh --no-notebooks   # everything but the notebooks
# Each stage prints its time, and the end a table of them (docs/testing.md: what the time goes to).
# ULYSSES_CARGO_ARGS adds arguments to every cargo build here (`--timings`, for instance).
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
# shellcheck disable=SC2206 # several words on purpose
extra=(${ULYSSES_CARGO_ARGS:-})
stages=()
began=$SECONDS
stage_start=$SECONDS
stage_name=""
# step NAME: ends the stage before (its time into the table) and starts NAME.
step() {
  if [ -n "$stage_name" ]; then
    stages+=("$(printf '%6ds  %s' $((SECONDS - stage_start)) "$stage_name")")
    echo "--- $stage_name: $((SECONDS - stage_start)) s"
  fi
  stage_name=$1
  stage_start=$SECONDS
  [ -n "$1" ] && { echo; echo "=== $1 === ($(date +%T))"; }
  return 0
}
# On failure too, say where the time went up to the stage that failed.
trap 'step ""; echo; echo "FAILED in the last stage below; where the time went:"; printf "%s\n" "${stages[@]}"' EXIT

step "cargo fmt --check; the scripts"
cargo fmt --all -- --check
for script in scripts/*.sh scripts/ulysses; do bash -n "$script"; done
python3 "$repo/scripts/build_progress.py" --self-test
# The two clippy runs share every dependency (only mpi and cudarc are extra); each checks this
# crate's targets again under its own cfg.
step "cargo clippy (features: mpi, nccl)"
cargo clippy "${extra[@]}" --release --all-targets --features mpi,nccl -- -D warnings
step "cargo clippy (no features)"
cargo clippy "${extra[@]}" --release --all-targets -- -D warnings
# Built apart from running, so each shows its own time; then the benches, whose build reuses
# the test build (the bench profile is release's).
step "cargo test --no-run (features: mpi, nccl)"
cargo test "${extra[@]}" --release --features mpi,nccl --no-run
step "cargo bench --no-run"
cargo bench "${extra[@]}" --no-run --features mpi,nccl
# What `cargo test` runs (every test binary, then the doc tests), with the binaries two at a
# time (as many as cores), the longest first: cargo would run them one after another.
step "tests (features: mpi, nccl)"
# The property tests draw their cases from a fixed seed here, so that a failure in CI runs again
# as it failed (`PROPTEST_RNG_SEED=<seed> cargo test --release --test properties`); by hand
# (cargo test) they draw a new seed each run. Another seed: PROPTEST_RNG_SEED=<n> ./scripts/test.sh.
export PROPTEST_RNG_SEED=${PROPTEST_RNG_SEED:-20261206}
echo "property tests' seed: PROPTEST_RNG_SEED=$PROPTEST_RNG_SEED"
# The files behind a feature must hold tests here (without it they compile to none and pass).
python3 "$repo/scripts/run_tests.py" --expect-tests mpi,nccl,nccl_loader,gpu_check,slurm -- --release --features mpi,nccl
# The MPI test left out above for its memory (about 6 GiB, 7 s): 2 GiB + 8 bytes between two
# processes, over MPI's 32-bit counts.
cargo test "${extra[@]}" --release --features mpi,nccl --test mpi -- --ignored a_payload_over_2_gib
# The float-comparing tests again with libtorch's, MKL's and oneDNN's kernels held to AVX2 and
# to SSE4.2: what another CPU model computes (each setting checked to have taken first).
step "tests on other CPUs: kernels held to AVX2, then SSE4.2 (scripts/isa_check.py)"
python3 "$repo/scripts/isa_check.py" -- --release --features mpi,nccl
step "Slurm: a single-node cluster (scripts/slurm.sh start), ulysses submit for real"
"$repo/scripts/slurm.sh" start
cargo test "${extra[@]}" --release --features mpi,nccl --test slurm -- --ignored
if [ "$notebooks" = 1 ]; then
  step "notebooks (evcxr kernel, executed into results/notebooks/)"
  "$repo/scripts/notebooks.sh" --check
fi
step ""
trap - EXIT
echo; echo "where the time went:"
printf '%s\n' "${stages[@]}"
echo "all checks passed in $((SECONDS - began)) s ($(date +%T))"
