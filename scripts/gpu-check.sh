#!/usr/bin/env bash
# The GPU check, for a machine with one NVIDIA GPU, CUDA and Python's torch 2.11 but no Rust:
# run the binary built here (cargo build --release --features nccl --bin ulysses-gpu, about
# 5 MB), pointed at that machine's libtorch and NCCL. Prints one summary table; exits non-zero
# if a check fails. Finishes within 5 minutes on an H100.
#   scripts/gpu-check.sh [path/to/ulysses-gpu] [--calibrate hardware/h200-measured.toml]
# With --calibrate it also measures the GPU for the cost model and prints the model's
# prediction of each measured layer stack beside the measurement.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bin=$repo/target/release/ulysses-gpu
if [ $# -gt 0 ] && [ "${1#--}" = "$1" ]; then bin=$1; shift; fi
[ -x "$bin" ] || { echo "gpu-check: no $bin; build it with: cargo build --release --features nccl --bin ulysses-gpu" >&2; exit 2; }

# libtorch (CPU and CUDA halves) from the machine's PyTorch.
torch_dir=$(python3 -c 'import os, torch; print(os.path.dirname(torch.__file__))')
# NCCL from pip's nvidia-nccl wheel, under the name cudarc looks for (libnccl.so).
nccl_dir=$(python3 -c 'import nvidia.nccl as n; import os; print(os.path.join(list(n.__path__)[0], "lib"))' 2>/dev/null || true)
links=$(mktemp -d)
trap 'rm -rf "$links"' EXIT
if [ -n "$nccl_dir" ] && [ -e "$nccl_dir/libnccl.so.2" ]; then
  ln -sf "$nccl_dir/libnccl.so.2" "$links/libnccl.so"
fi
export LD_LIBRARY_PATH="$torch_dir/lib:$links:${nccl_dir:+$nccl_dir:}${LD_LIBRARY_PATH:-}"

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)'
exec timeout 420 "$bin" "$@"
