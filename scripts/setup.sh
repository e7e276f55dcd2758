#!/usr/bin/env bash
# Set-up for ulysses on a Debian/Ubuntu machine. Idempotent: a second run takes a second.
#
# Installs what a fresh machine lacks:
#   - Debian packages: a C++ compiler, OpenMPI (the mpi backend), libclang (rsmpi's bindgen),
#     python3-venv, DejaVu fonts (the text of PNG plots);
#   - libtorch 2.11.0 (what tch 0.24 links against), the CPU-usable minimum of PyPI's torch wheel,
#     in a venv under $ULYSSES_CACHE (default ~/.cache/ulysses), linked into the repo as .libtorch;
#   - a Rust toolchain through rustup, only if cargo is missing.
# Nothing needs exporting afterwards: .cargo/config.toml points LIBTORCH at .libtorch and build.rs
# writes libtorch's folder into every binary's rpath.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cache=${ULYSSES_CACHE:-$HOME/.cache/ulysses}
torch_version=2.11.0
venv=$cache/torch-$torch_version
stamp=$venv/.ulysses-complete

say() { echo "[setup] $*"; }
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

# 1. Debian packages, only those missing.
packages=(g++ make pkg-config libopenmpi-dev openmpi-bin libclang-dev python3-venv fonts-dejavu-core)
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
  say "installing Debian packages: ${missing[*]}"
  as_root apt-get update -qq
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# 2. Rust, only if cargo is missing.
if ! command -v cargo >/dev/null 2>&1; then
  if [ -x "$HOME/.cargo/bin/cargo" ]; then
    export PATH="$HOME/.cargo/bin:$PATH"
  else
    say "cargo not found: installing the stable Rust toolchain with rustup"
    curl -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal --component clippy,rustfmt
    export PATH="$HOME/.cargo/bin:$PATH"
  fi
fi

# 3. libtorch from PyPI (CPU-usable minimum; see shared/SETUP.md for why these three wheels).
if [ ! -f "$stamp" ]; then
  say "installing libtorch $torch_version from PyPI into $venv (about 550 MB download)"
  rm -rf "$venv"
  mkdir -p "$cache"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check --no-deps \
    "torch==$torch_version" nvidia-cuda-runtime==13.0.96 nvidia-cuda-cupti==13.0.85
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
say "ready: libtorch $torch_version at $repo/.libtorch -> $torch_dir"
