#!/usr/bin/env bash
# The GPU check, for a machine with one NVIDIA GPU, its driver and Python's CUDA torch 2.11, but
# no Rust toolchain and no OpenMPI: run the binary built here (about 10 MB), pointed at that
# machine's torch as libtorch, one step at a time, within 8 minutes in all.
#   cargo build --release --features nccl --bin ulysses-gpu           # here
#   scripts/gpu-check.sh [BIN_DIR] [--out FILE] [--calibrate FILE] [--mpi]
#   scripts/gpu-check.sh [BIN_DIR] --dry-run                          # the plan, checked; no GPU
# BIN_DIR holds ulysses-gpu (default target/release). Each step is its own process under its own
# cap (`timeout`); its lines go to FILE (default ./gpu-check.txt) as they come, so a lease that
# ends early keeps what was measured. The first step that fails or overruns its cap stops the
# check with one line saying which, how long it ran and why. The steps (ulysses-gpu --steps says
# what each shows):
#   env (this script: the machine's torch, nvidia-smi), preflight, nccl-world, nccl-latency,
#   watchdog, ulysses-parity, ring-parity, stack-8k, calibrate (only with --calibrate FILE).
# NCCL is found by ulysses itself (the NCCL that torch loaded, or torch's wheel, or
# LD_LIBRARY_PATH): nothing to link. With --mpi, and only then (outside the 8 minutes),
# `ulysses run` of a small config on one NCCL process and the refusal of two processes on one
# GPU, which need OpenMPI's mpirun and BIN_DIR/ulysses (--features mpi,nccl).
# Exits 0 if every step passed, 1 at the first failure, 2 on a usage error.
set -uo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

# The plan: step and cap in seconds. The caps, plus the grace `timeout` gives a step it stops
# (KILL_AFTER), must fit BUDGET: a step that overruns ends the check, so no more than one grace
# is ever spent.
PLAN=(
  "env 20"
  "preflight 40"
  "nccl-world 45"
  "nccl-latency 30"
  "watchdog 45"
  "ulysses-parity 45"
  "ring-parity 70"
  "stack-8k 75"
  "calibrate 80"
)
BUDGET=480
KILL_AFTER=5

bin=$repo/target/release
out=gpu-check.txt
calibrate=""
mpi=0
dry=0
while [ $# -gt 0 ]; do
  case "$1" in
    --out) out=${2:?--out needs a file}; shift 2 ;;
    --calibrate) calibrate=${2:?--calibrate needs a file}; shift 2 ;;
    --mpi) mpi=1; shift ;;
    --dry-run) dry=1; shift ;;
    --*) echo "gpu-check: unknown option $1" >&2; exit 2 ;;
    *) bin=$1; shift ;;
  esac
done
gpu=$bin/ulysses-gpu
cli=$bin/ulysses

# The plan's total and its check against the budget.
total=0
for entry in "${PLAN[@]}"; do
  total=$((total + ${entry#* }))
done
if [ "$dry" = 1 ]; then
  echo "gpu-check plan (caps in seconds; calibrate runs with --calibrate FILE):"
  for entry in "${PLAN[@]}"; do printf '  %-16s %4d\n' "${entry% *}" "${entry#* }"; done
  echo "  total ${total} s of caps + ${KILL_AFTER} s grace = $((total + KILL_AFTER)) s, budget ${BUDGET} s"
  status=0
  if [ $((total + KILL_AFTER)) -gt "$BUDGET" ]; then
    echo "gpu-check: FAIL the plan's caps (${total} s + ${KILL_AFTER} s) exceed the budget of ${BUDGET} s"
    status=1
  fi
  if [ -x "$gpu" ]; then
    known=$("$gpu" --steps | cut -f1)
    for entry in "${PLAN[@]}"; do
      step=${entry% *}
      [ "$step" = env ] && continue
      if ! grep -qx "$step" <<<"$known"; then
        echo "gpu-check: FAIL the plan's step $step is not one that $gpu knows ($(tr '\n' ' ' <<<"$known"))"
        status=1
      fi
    done
    [ "$status" = 0 ] && echo "  every step is one that $gpu knows"
  else
    echo "  (no $gpu: the steps were not checked against it)"
  fi
  exit $status
fi

[ -x "$gpu" ] || { echo "gpu-check: no $gpu; build it with: cargo build --release --features nccl --bin ulysses-gpu" >&2; exit 2; }
mkdir -p "$(dirname "$out")"
: >"$out"
began=$SECONDS
say() { echo "$*" | tee -a "$out"; }
# stop STEP N SECS CAP DETAIL: the one line that ends a failed check.
stop() {
  say "gpu-check: FAIL at step $1 ($2 of ${#PLAN[@]}) after $3 s (cap $4 s): $5"
  say "gpu-check: results so far in $out ($((SECONDS - began)) s in all)"
  rm -f "$out.step"
  exit 1
}

say "gpu-check $(date -u +%FT%TZ) on $(hostname): plan of ${#PLAN[@]} steps, ${total} s of caps"
n=0
for entry in "${PLAN[@]}"; do
  step=${entry% *}
  cap=${entry#* }
  n=$((n + 1))
  t0=$SECONDS
  if [ "$step" = env ]; then
    # The machine's CUDA torch as libtorch (its lib folder holds libtorch_cuda.so).
    say "=== env (cap ${cap} s) ==="
    timeout 10 nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee -a "$out"
    info=$(timeout -k "$KILL_AFTER" "$cap" python3 -c \
      'import os, torch; print(os.path.dirname(torch.__file__), torch.__version__, torch.version.cuda)' 2>&1)
    rc=$?
    [ $rc -eq 124 ] && stop env $n $((SECONDS - t0)) "$cap" "python3 -c 'import torch' ran past its cap"
    read -r torch_dir torch_version torch_cuda <<<"$(tail -n 1 <<<"$info")"
    if [ $rc -ne 0 ] || [ ! -d "$torch_dir/lib" ]; then
      stop env $n $((SECONDS - t0)) "$cap" "no Python torch here: $(tail -n 1 <<<"$info")"
    fi
    if [ "$torch_cuda" = None ]; then
      stop env $n $((SECONDS - t0)) "$cap" "torch $torch_version at $torch_dir is a CPU build: install a CUDA torch 2.11"
    fi
    export LD_LIBRARY_PATH="$torch_dir/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    say "ok   env ($((SECONDS - t0)) s): torch $torch_version (CUDA $torch_cuda) at $torch_dir as libtorch"
    continue
  fi
  args=("$step")
  if [ "$step" = calibrate ]; then
    [ -n "$calibrate" ] || { say "skip calibrate: no --calibrate FILE"; continue; }
  fi
  [ -n "$calibrate" ] && args+=(--calibrate "$calibrate")
  say "=== $step (cap ${cap} s) ==="
  timeout -k "$KILL_AFTER" "$cap" "$gpu" "${args[@]}" 2>&1 | tee "$out.step" | tee -a "$out"
  rc=${PIPESTATUS[0]}
  secs=$((SECONDS - t0))
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    stop "$step" $n $secs "$cap" "ran past its cap and was stopped; its last line: $(tail -n 1 "$out.step")"
  elif [ "$rc" -ne 0 ]; then
    line=$(grep -m 1 '^FAIL ' "$out.step" || tail -n 1 "$out.step")
    stop "$step" $n $secs "$cap" "exit $rc: $line"
  fi
done
rm -f "$out.step"
say "gpu-check: every step passed in $((SECONDS - began)) s; results in $out"

if [ "$mpi" = 1 ]; then
  # Outside the plan: `ulysses run` on NCCL processes, which needs OpenMPI on this machine.
  export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
  if [ ! -x "$cli" ] || ! command -v mpirun >/dev/null 2>&1 || ! "$cli" --version >/dev/null 2>&1; then
    say "gpu-check: FAIL --mpi needs $cli (--features mpi,nccl) and OpenMPI (mpirun, libmpi.so.40) here"
    exit 1
  fi
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
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
  if ! (cd "$work" && timeout 600 "$cli" run one.toml --output "$work/one") 2>&1 | tee -a "$out"; then
    say "gpu-check: FAIL ulysses run, backend nccl, 1 process"; exit 1
  fi
  grep -q cuda_peak_allocated "$work/one/steps.csv" ||
    { say "gpu-check: FAIL ulysses run, 1 process: steps.csv does not name the CUDA allocator"; exit 1; }
  say "ok   ulysses run, backend nccl, 1 process: $(($(wc -l <"$work/one/steps.csv") - 1)) step rows"
  tee -a "$out" <"$work/one/points.csv"
  config 2 >"$work/two.toml"
  got=$(cd "$work" && timeout 120 "$cli" run two.toml --output "$work/two" 2>&1)
  if [ $? -ne 0 ] && grep -q "need 2 GPUs per node, but this node has 1" <<<"$got" && [ ! -e "$work/two" ]; then
    say "ok   2 processes on 1 GPU refused before anything started"
  else
    say "gpu-check: FAIL 2 processes on 1 GPU were not refused by the driver: $got"; exit 1
  fi
  mkdir -p "$work/direct"
  cp "$work/two.toml" "$work/direct/config.toml"
  got=$(timeout 120 mpirun -n 2 --oversubscribe "$cli" run-point --dir "$work/direct" --point 0 --base "$work" 2>&1)
  if [ $? -ne 0 ] && grep -q "both drive the GPU at PCI" <<<"$got"; then
    say "ok   2 ranks started directly on 1 GPU refused by the ranks"
  else
    say "gpu-check: FAIL 2 ranks on 1 GPU started directly were not refused clearly: $got"; exit 1
  fi
fi
exit 0
