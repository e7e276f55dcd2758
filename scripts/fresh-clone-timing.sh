#!/usr/bin/env bash
# A newcomer's first run, timed: the README's two commands on a fresh clone with nothing cached
# (an empty cargo home: no registry; an empty ~/.cache: no libtorch, no evcxr caches, no pip
# cache; an empty target folder), then both again warm. Run it on an idle machine: on a shared one
# the times are noise. It changes nothing outside its work folder (Debian packages that are
# missing are installed by the set-up, as on a fresh machine).
#
#   scripts/fresh-clone-timing.sh                      # this repository at HEAD (commit first)
#   scripts/fresh-clone-timing.sh --ref e997839        # another revision (the "before")
#   scripts/fresh-clone-timing.sh --fresh-toolchain    # also an empty rustup home: rustup installs Rust
#   scripts/fresh-clone-timing.sh --no-notebooks       # the test command without the notebooks
#   scripts/fresh-clone-timing.sh --main-only          # only the main command, fresh then warm
#   scripts/fresh-clone-timing.sh --work DIR           # where it all goes (default /tmp/ulysses-fresh-<time>)
#   scripts/fresh-clone-timing.sh --dry-run            # clone, print the environment and the commands, stop
#
# Writes into the work folder: clone/ (the checkout, its target/ and results/), home/ (HOME,
# CARGO_HOME, the caches), logs/*.log (each command's output, every line prefixed with the
# seconds since that command started), cargo-timings/ (cargo's --timings reports of the builds,
# for what costs most), build-records/ (every build shown with its progress, recorded for
# `scripts/build_progress.py --replay`), and times.tsv (stage, seconds), which it also prints. With the toolchain
# kept, what differs from a clean container is only the Debian packages already installed
# (shared/SETUP.md: about 45 s for OpenMPI and libclang) and the toolchain (13 s with rustup).
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
ref=HEAD
fresh_toolchain=0
notebooks=1
main_only=0
dry_run=0
work=/tmp/ulysses-fresh-$(date +%Y%m%dT%H%M%S)
while [ $# -gt 0 ]; do
  case "$1" in
    --ref) ref=$2; shift ;;
    --fresh-toolchain) fresh_toolchain=1 ;;
    --no-notebooks) notebooks=0 ;;
    --main-only) main_only=1 ;;
    --work) work=$2; shift ;;
    --dry-run) dry_run=1 ;;
    -h | --help) sed -n '2,25p' "${BASH_SOURCE[0]}"; exit 0 ;;
    *) echo "unknown option $1 (try --help)" >&2; exit 2 ;;
  esac
  shift
done
[ -e "$work" ] && { echo "$work exists: pick another --work" >&2; exit 2; }
mkdir -p "$work/home" "$work/logs" "$work/cargo-timings"
rev=$(git -C "$repo" rev-parse --verify "$ref^{commit}")
git clone --quiet --no-local "$repo" "$work/clone"
git -C "$work/clone" checkout --quiet "$rev"
echo "fresh clone of $rev in $work/clone"

# The environment of a new user: a HOME of its own; nothing of the project's build settings.
orig_home=$HOME
export HOME=$work/home CARGO_HOME=$work/home/.cargo
unset CARGO_TARGET_DIR LIBTORCH LIBTORCH_USE_PYTORCH LD_LIBRARY_PATH ULYSSES_CACHE XDG_CACHE_HOME \
  JUPYTER_PATH EVCXR_CONFIG_DIR EVCXR_TMPDIR RUSTC_WRAPPER CARGO_BUILD_JOBS
path_without_cargo=$(printf '%s' "$PATH" | tr ':' '\n' | grep -v "^$orig_home/.cargo/bin\$" | paste -sd: -)
if [ "$fresh_toolchain" = 1 ]; then
  export RUSTUP_HOME=$work/home/.rustup PATH=$path_without_cargo
else
  # rustup's proxies (cargo, rustc) from the machine, its toolchains where they are; registry empty.
  export RUSTUP_HOME=${RUSTUP_HOME:-$orig_home/.rustup} PATH=$orig_home/.cargo/bin:$path_without_cargo
fi
# cargo --timings for every build the commands run (scripts/ulysses and scripts/test.sh pass it),
# and a recording of every build that shows its progress (scripts/build_progress.py), to replay
# through the time-left estimate (`build_progress.py --replay`).
export ULYSSES_CARGO_ARGS=--timings ULYSSES_BUILD_RECORD_DIR=$work/build-records
cd "$work/clone"

times=$work/times.tsv
printf 'stage\tseconds\n' >"$times"
# timed NAME CMD...: runs CMD, every line of its output prefixed with the seconds since it started
# (into logs/NAME.log and the terminal), and adds its wall time to times.tsv.
timed() {
  local name=$1 start=$SECONDS rc=0
  shift
  echo "=== $name: $* ($(date +%T))"
  set +e
  "$@" 2>&1 | while IFS= read -r line; do printf '%5d  %s\n' $((SECONDS - start)) "$line"; done |
    tee "$work/logs/$name.log"
  rc=${PIPESTATUS[0]}
  set -e
  printf '%s\t%d\n' "$name" $((SECONDS - start)) >>"$times"
  cp -r target/cargo-timings/. "$work/cargo-timings/" 2>/dev/null || true
  cp -r "$HOME/.cache/ulysses/evcxr-build/cargo-timings/." "$work/cargo-timings/" 2>/dev/null || true
  [ "$rc" = 0 ] || echo "=== $name FAILED (exit status $rc)"
  return 0
}

test_args=()
[ "$notebooks" = 1 ] || test_args=(--no-notebooks)
if [ "$dry_run" = 1 ]; then
  env | grep -E '^(HOME|CARGO_HOME|RUSTUP_HOME|PATH|ULYSSES_CARGO_ARGS|ULYSSES_BUILD_RECORD_DIR)=' | sort
  echo "cargo: $(command -v cargo || echo 'none: the set-up will install Rust')"
  echo "would run, in $work/clone: ./scripts/ulysses run experiments/quickstart.toml --report;" \
    "./scripts/test.sh ${test_args[*]}; both again"
  exit 0
fi
timed main_fresh ./scripts/ulysses run experiments/quickstart.toml --report
[ "$main_only" = 1 ] || timed test_fresh ./scripts/test.sh "${test_args[@]}"
timed main_warm ./scripts/ulysses run experiments/quickstart.toml --report
[ "$main_only" = 1 ] || timed test_warm ./scripts/test.sh "${test_args[@]}"

# Where the first command's time went: the set-up's and the build's own last lines.
for log in main_fresh; do
  grep -E '^\s*[0-9]+  \[setup\] .*done in|^\s*[0-9]+  \[build\] (built|FAILED)|points in' "$work/logs/$log.log" |
    sed "s/^/$log: /" || true
done
[ "$main_only" = 1 ] ||
  grep -E '^\s*[0-9]+  === .* ===|took' "$work/logs/test_fresh.log" | sed 's/^/test_fresh: /' || true
echo
column -t "$times"
echo "logs in $work/logs, cargo's timing reports in $work/cargo-timings, build recordings in $work/build-records"
