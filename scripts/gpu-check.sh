#!/usr/bin/env bash
# The GPU check, for a machine with one NVIDIA GPU, CUDA and Python's torch 2.11 but no Rust: run
# the binaries built here, pointed at that machine's libtorch and NCCL, as one prepared script.
#   cargo build --release --features nccl --bin ulysses-gpu         # about 5 MB: the checks
#   cargo build --release --features mpi,nccl --bin ulysses         # `ulysses run` on NCCL
#   scripts/gpu-check.sh [folder holding both] [--calibrate hardware/h200-measured.toml]
#                                                                   # default folder: target/release
# 1. ulysses-gpu: NCCL communicators and a transfer through the side stream, the local backend
#    on the GPU, Ulysses bf16 parity, ring's flash blocks against SDPA (time and parity), the
#    bf16 matmul peak, the 1.3B layer stack at 8K and 32K with Ulysses at P=1 on NCCL (tokens/s,
#    MFU, CUDA peak memory against the activation formula): one table. With --calibrate it also
#    measures the GPU for the cost model into that hardware file and prints the model's
#    prediction of each measured layer stack beside the measurement.
# 2. `ulysses run` of a small config with backend = "nccl" on 1 process (mpirun): its tables,
#    with the CUDA allocator as their memory measure;
# 3. the same on 2 processes, which this one GPU cannot hold: refused by the driver before
#    anything starts, and by the ranks themselves when started directly (both name the GPU).
# Exits 0 if every check ran and passed, 1 if one failed, 3 if one could not run (said why).
set -uo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bin=$repo/target/release
if [ $# -gt 0 ] && [ "${1#--}" = "$1" ]; then bin=$1; shift; fi
gpu=$bin/ulysses-gpu
cli=$bin/ulysses
[ -x "$gpu" ] || { echo "gpu-check: no $gpu; build it with: cargo build --release --features nccl --bin ulysses-gpu" >&2; exit 2; }

# libtorch (CPU and CUDA halves) from the machine's PyTorch.
torch_dir=$(python3 -c 'import os, torch; print(os.path.dirname(torch.__file__))')
# NCCL from pip's nvidia-nccl wheel, under the name cudarc looks for (libnccl.so).
nccl_dir=$(python3 -c 'import nvidia.nccl as n; import os; print(os.path.join(list(n.__path__)[0], "lib"))' 2>/dev/null || true)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/links"
if [ -n "$nccl_dir" ] && [ -e "$nccl_dir/libnccl.so.2" ]; then
  ln -sf "$nccl_dir/libnccl.so.2" "$work/links/libnccl.so"
fi
export LD_LIBRARY_PATH="$torch_dir/lib:$work/links:${nccl_dir:+$nccl_dir:}${LD_LIBRARY_PATH:-}"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)'
status=0
fail() { echo "FAIL $*"; status=1; }
skip() { echo "SKIP $*"; [ "$status" = 1 ] || status=3; }

echo "=== 1. ulysses-gpu ==="
timeout 900 "$gpu" "$@" || fail "ulysses-gpu (exit $?)"

echo "=== 2-3. ulysses run on NCCL processes ==="
if [ ! -x "$cli" ]; then
  skip "ulysses run on NCCL: no $cli (cargo build --release --features mpi,nccl --bin ulysses)"
elif ! command -v mpirun >/dev/null 2>&1 || ! "$cli" --version >/dev/null 2>&1; then
  skip "ulysses run on NCCL: needs OpenMPI (mpirun and libmpi.so.40) on this machine: apt-get install openmpi-bin"
else
  config() {
    cat <<EOF
name = "gpu_smoke"
[model]
preset = "125m"
n_layer = 2
[parallel]
ranks = [$1]
strategies = ["ulysses", "ring_zigzag"]
backend = "nccl"
device = "cuda"
[train]
dtype = "bf16"
seq = [4096, 16384]
steps = 3
EOF
  }
  config 1 >"$work/one.toml"
  if (cd "$work" && timeout 600 "$cli" run one.toml --output "$work/one"); then
    if grep -q cuda_peak_allocated "$work/one/steps.csv"; then
      echo "ok   ulysses run, backend nccl, 1 process: $(($(wc -l <"$work/one/steps.csv") - 1)) step rows, memory measured by the CUDA allocator"
      cat "$work/one/points.csv"
    else
      fail "ulysses run, 1 process: steps.csv does not name the CUDA allocator as its memory measure"
    fi
  else
    fail "ulysses run, backend nccl, 1 process"
  fi
  config 2 >"$work/two.toml"
  out=$(cd "$work" && timeout 120 "$cli" run two.toml --output "$work/two" 2>&1)
  if [ $? -ne 0 ] && grep -q "need 2 GPUs per node, but this node has 1" <<<"$out" && [ ! -e "$work/two" ]; then
    echo "ok   2 processes on 1 GPU refused before anything started: $(grep -o 'parallel.ranks.*' <<<"$out" | head -n 1)"
  else
    fail "2 processes on 1 GPU were not refused by the driver: $out"
  fi
  mkdir -p "$work/direct"
  cp "$work/two.toml" "$work/direct/config.toml"
  out=$(timeout 120 mpirun -n 2 --oversubscribe "$cli" run-point --dir "$work/direct" --point 0 --base "$work" 2>&1)
  if [ $? -ne 0 ] && grep -q "both drive the GPU at PCI" <<<"$out"; then
    echo "ok   2 ranks started directly on 1 GPU refused by the ranks: $(grep -o 'ranks 0 and 1 both drive.*' <<<"$out" | head -n 1)"
  else
    fail "2 ranks on 1 GPU started directly were not refused clearly: $out"
  fi
fi
case $status in
  0) echo "gpu-check: every check ran and passed" ;;
  1) echo "gpu-check: a check FAILED" ;;
  3) echo "gpu-check: INCOMPLETE: a check could not run (SKIP above)" ;;
esac
exit $status
