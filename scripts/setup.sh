#!/usr/bin/env bash
# Set-up for ulysses on a Debian/Ubuntu machine. Idempotent: a second run takes a second.
#
# Installs what a fresh machine lacks:
#   - Debian packages: a C++ compiler, OpenMPI (the mpi backend), libclang (rsmpi's bindgen),
#     python3-venv, DejaVu fonts (the text of PNG plots);
#   - libtorch 2.11.0 (what tch 0.24 links against), the CPU-usable minimum of PyPI's torch wheel,
#     in a venv under $ULYSSES_CACHE (default ~/.cache/ulysses), linked into the repo as .libtorch;
#   - a Rust toolchain through rustup, only if cargo is missing.
#
#   scripts/setup.sh                    # the above (what the README's commands run)
#   scripts/setup.sh --cuda             # on a GPU node: a CUDA build of torch 2.11 as libtorch instead,
#                                       # the one the driver runs (see cuda_variant), in its own venv
#   scripts/setup.sh --cuda-variant cu126   # that build by name (cu126, cu128, cu130)
#   scripts/setup.sh --cuda-plan 575.57.08  # which build a driver version gets; nothing installed
# Nothing needs exporting afterwards: .cargo/config.toml points LIBTORCH at .libtorch and build.rs
# writes libtorch's folder into every binary's rpath.
#
# Each install shows what it is doing, how long it has run and roughly how long is left against
# the time it took on a 2-core Debian 12 machine (the numbers passed to `step` below: apt 45 s for
# OpenMPI and libclang; libtorch 31 s and rustup 13 s, measured 2026-12-02 with empty caches):
# a status line on a terminal, a line every 10 s elsewhere. The log is shown if a step fails.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cache=${ULYSSES_CACHE:-$HOME/.cache/ulysses}
torch_version=2.11.0
venv=$cache/torch-$torch_version
stamp=$venv/.ulysses-complete

say() { echo "[setup] $*"; }

# The CUDA build of torch 2.11 a driver of version $1 runs. NVIDIA's CUDA Toolkit release notes
# ("CUDA Toolkit and Corresponding Driver Versions", and minor version compatibility): CUDA 13.0
# needs a driver 580.65.06 or newer; any CUDA 12.x build runs on 525.60.13 or newer. torch 2.11's
# wheels: cu130 (PyPI's default, with pip's nvidia-nccl-cu13), cu128 and cu126 (PyTorch's index).
cuda_variant() {
  local v=$1
  newer() { printf '%s\n%s\n' "$1" "$v" | sort -V -C; }
  if ! printf '%s' "$v" | grep -qE '^[0-9]+(\.[0-9]+)*$'; then
    echo "[setup] error: driver version '$v' is not a version number (nvidia-smi --query-gpu=driver_version)" >&2
    return 2
  fi
  if newer 580.65.06; then
    echo cu130
  elif newer 525.60.13; then
    echo cu128
  else
    echo "[setup] error: NVIDIA driver $v is older than any CUDA build of torch $torch_version runs on" \
      "(CUDA 12.x needs 525.60.13 or newer, CUDA 13.0 580.65.06): update the driver" >&2
    return 1
  fi
}

cuda=""
while [ $# -gt 0 ]; do
  case "$1" in
    --cuda) cuda=auto ;;
    --cuda-variant)
      cuda=${2:-}
      shift
      case "$cuda" in cu126 | cu128 | cu130) ;; *) echo "[setup] error: --cuda-variant takes cu126, cu128 or cu130, not '$cuda'" >&2; exit 2 ;; esac
      ;;
    --cuda-plan)
      cuda_variant "${2:-}"
      exit $?
      ;;
    -h | --help) sed -n '2,20p' "${BASH_SOURCE[0]}"; exit 0 ;;
    *) echo "[setup] error: unknown option $1 (try --help)" >&2; exit 2 ;;
  esac
  shift
done
if [ "$cuda" = auto ]; then
  driver=$(nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null | head -n 1 || true)
  if [ -z "$driver" ]; then
    echo "[setup] error: --cuda: nvidia-smi reports no driver on this machine (name a build with --cuda-variant)" >&2
    exit 1
  fi
  cuda=$(cuda_variant "$driver") || exit 1
  say "NVIDIA driver $driver: torch $torch_version's $cuda build"
fi
if [ -z "$cuda" ]; then
  # A CUDA build that an earlier `--cuda` linked stays (the README's commands run this again).
  linked=$(readlink "$repo/.libtorch" 2>/dev/null || true)
  case "$linked" in
    "$cache/torch-$torch_version-cu"*) cuda=${linked#"$cache/torch-$torch_version-"} cuda=${cuda%%/*} ;;
  esac
fi
if [ -n "$cuda" ]; then
  venv=$cache/torch-$torch_version-$cuda
  stamp=$venv/.ulysses-complete
fi
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
clock() { printf '%d:%02d' $(($1 / 60)) $(($1 % 60)); }

# step LABEL MEASURED_S DETAIL_FN CMD...: runs CMD with its output in a log, showing LABEL, the time
# so far, the time left against MEASURED_S (or DETAIL_FN's own estimate) and the log's last line;
# on failure prints the log's end. DETAIL_FN (or -) prints "left_s|detail" from the log.
step() {
  local label=$1 measured=$2 detail_fn=$3 log rc=0 start=$SECONDS last=-10 now left detail status out
  shift 3
  log=$(mktemp)
  say "$label (measured here: about $(clock "$measured"))"
  "$@" >"$log" 2>&1 &
  local pid=$!
  while kill -0 "$pid" 2>/dev/null; do
    sleep 1
    now=$((SECONDS - start))
    left=$((measured - now)) detail=""
    if [ "$detail_fn" != - ]; then
      out=$("$detail_fn" "$log" "$now" || true)
      if [ -n "$out" ]; then
        [ -z "${out%%|*}" ] || left=${out%%|*}
        detail=${out#*|}
      fi
    fi
    [ -n "$detail" ] || detail=$(tail -c 3000 "$log" | tr '\r' '\n' | grep -v '^[[:space:]]*$' | tail -n 1 | cut -c1-70 || true)
    if [ "${left:-0}" -gt 0 ]; then left="~$(clock "$left") left"; else left="longer than measured"; fi
    status="[setup] $label: $(clock "$now"), $left  $detail"
    if [ -t 2 ]; then
      printf '\r\033[2K%s' "${status:0:$(($(tput cols 2>/dev/null || echo 100) - 1))}" >&2
    elif [ $((now - last)) -ge 10 ]; then
      echo "$status" >&2
      last=$now
    fi
  done
  wait "$pid" || rc=$?
  [ -t 2 ] && printf '\r\033[2K' >&2
  if [ "$rc" != 0 ]; then
    tail -n 40 "$log" >&2
    say "$label FAILED after $(clock $((SECONDS - start))) (exit status $rc; the log's end is above)"
    rm -f "$log"
    return "$rc"
  fi
  rm -f "$log"
  say "$label: done in $(clock $((SECONDS - start)))"
}

# apt's progress: packages fetched and set up out of those it installs (upgraded + newly
# installed, from "2 upgraded, 53 newly installed, ..."). Only the `Get:` lines of packages count,
# `Get:12 http://... bookworm/main amd64 libfoo-dev amd64 1.2-3 [123 kB]` (seven words before the
# size), not those of `apt-get update`'s index files (`Get:1 http://... bookworm InRelease [151 kB]`,
# `... bookworm/main amd64 Packages [8792 kB]`). scripts/build_progress.py --self-test checks it.
apt_detail() {
  local total got set
  total=$(grep -oE '^[0-9]+ upgraded, [0-9]+ newly installed' "$1" | tail -n 1 | awk '{print $1 + $3}' || true)
  got=$(grep -cE '^Get:[0-9]+ +([^ ]+ +){6}\[' "$1" || true)
  set=$(grep -c '^Setting up' "$1" || true)
  [ -n "$total" ] && echo "|fetched $got/$total packages, set up $set/$total"
}

# pip's progress: megabytes in its download folder out of the wheels' 545 MB.
pip_detail() {
  local mb
  mb=$(du -sm "$pip_tmp" 2>/dev/null | cut -f1 || echo 0)
  if [ "${mb:-0}" -gt 5 ] && [ "$mb" -lt 545 ]; then
    echo "$(($2 * (545 - mb) / mb + 15))|downloaded $mb of 545 MB"
  fi
}

# 1. Debian packages, only those missing.
packages=(g++ make pkg-config libopenmpi-dev openmpi-bin libclang-dev python3 python3-venv fonts-dejavu-core curl)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
# python3-venv is only needed when this python cannot make a venv with pip by itself
# (pyenv and other self-built pythons can).
if [ ${#missing[@]} -gt 0 ] && python3 -c 'import ensurepip, venv' 2>/dev/null; then
  missing=("${missing[@]/python3-venv}")
  read -r -a missing <<<"${missing[*]}"
fi
if [ ${#missing[@]} -gt 0 ]; then
  [ "$(id -u)" = 0 ] || sudo -v # ask for the password here, not in the background
  step "installing Debian packages: ${missing[*]}" 45 apt_detail \
    as_root env DEBIAN_FRONTEND=noninteractive sh -c 'apt-get update && apt-get install -y "$@"' sh "${missing[@]}"
fi

# 2. Rust, only if cargo is missing.
if ! command -v cargo >/dev/null 2>&1; then
  if [ -x "$HOME/.cargo/bin/cargo" ]; then
    export PATH="$HOME/.cargo/bin:$PATH"
  else
    step "cargo not found: installing the stable Rust toolchain with rustup" 13 - \
      sh -c 'curl -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal --component clippy,rustfmt'
    export PATH="$HOME/.cargo/bin:$PATH"
  fi
fi

# 3. libtorch from PyPI (CPU-usable minimum; see shared/SETUP.md for why these three wheels).
if [ -n "$cuda" ] && [ ! -f "$stamp" ]; then
  # The whole CUDA wheel with its NVIDIA libraries (CUDA runtime, cuBLAS, cuDNN, NCCL): about
  # 3 GB. cu130 is PyPI's own torch; the others come from PyTorch's index.
  index=()
  [ "$cuda" = cu130 ] || index=(--index-url "https://download.pytorch.org/whl/$cuda")
  rm -rf "$venv"
  mkdir -p "$cache"
  step "installing torch $torch_version ($cuda, with its NVIDIA libraries: about 3 GB) into $venv" 180 - \
    sh -c 'python3 -m venv "$1" && shift && "$@"' sh "$venv" \
    "$venv/bin/pip" install --progress-bar off --no-cache-dir --disable-pip-version-check "${index[@]}" "torch==$torch_version"
  touch "$stamp"
fi
if [ ! -f "$stamp" ]; then
  rm -rf "$venv"
  mkdir -p "$cache"
  pip_tmp=$cache/pip-download
  rm -rf "$pip_tmp" && mkdir -p "$pip_tmp"
  step "installing libtorch $torch_version from PyPI into $venv (545 MB download, 1.3 GB on disk)" 31 pip_detail \
    sh -c 'python3 -m venv "$1" && TMPDIR="$2" "$1/bin/pip" install --progress-bar off --no-cache-dir \
      --disable-pip-version-check --no-deps "torch==$3" nvidia-cuda-runtime==13.0.96 nvidia-cuda-cupti==13.0.85' \
    sh "$venv" "$pip_tmp" "$torch_version"
  rm -rf "$pip_tmp"
  touch "$stamp"
fi
torch_dir=$(find "$venv/lib" -maxdepth 3 -type d -path '*site-packages/torch' | head -n 1)
if [ ! -f "$torch_dir/lib/libtorch_cpu.so" ]; then
  echo "[setup] error: $venv holds no torch/lib/libtorch_cpu.so; remove $venv and run again" >&2
  exit 1
fi
if [ "$(readlink "$repo/.libtorch" 2>/dev/null)" != "$torch_dir" ]; then
  ln -sfn "$torch_dir" "$repo/.libtorch"
fi
# 4. The notebooks: evcxr (any kernel of it, such as its standard Jupyter kernel "rust") reads
# notebooks/evcxr.toml when it starts in notebooks/, and runs its prelude: where libtorch is for
# evcxr's builds (the repo's .cargo/config.toml does not reach evcxr's build folder) and for the
# process that runs the cells, which `:restart` starts again with it. This checkout's paths, so
# git ignores the file. Jupyter starts a kernel in its notebook's folder, so the solutions of the
# exercises (notebooks/solutions/) get the same file there.
nb_toml=$repo/notebooks/evcxr.toml
nb_want="# Written by scripts/setup.sh for this checkout (ignored by git): where libtorch is.
[evcxr]
prelude = '''
:build_env LIBTORCH=$torch_dir
:env LD_LIBRARY_PATH=$torch_dir/lib
:restart
'''"
for nb_toml in "$nb_toml" "$repo/notebooks/solutions/evcxr.toml"; do
  if [ -d "$(dirname "$nb_toml")" ] && [ "$(cat "$nb_toml" 2>/dev/null)" != "$nb_want" ]; then
    printf '%s\n' "$nb_want" >"$nb_toml"
  fi
done
say "ready: libtorch $torch_version at $repo/.libtorch -> $torch_dir"
