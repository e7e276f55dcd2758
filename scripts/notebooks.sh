#!/usr/bin/env bash
# The notebooks (notebooks/*.ipynb) on the evcxr Rust kernel, after the set-up.
#
#   ./scripts/notebooks.sh              # execute every notebook, outputs written into the notebooks
#   ./scripts/notebooks.sh --check      # execute every notebook into results/notebooks/ (what
#                                       # scripts/test.sh and CI run); the committed ones stay as they are
#   ./scripts/notebooks.sh 02_ulysses_layer ...   # only these notebooks (either mode); the
#                                       # exercises' solutions as solutions/01_02_solutions
#   ./scripts/notebooks.sh --lab        # open them in JupyterLab (installed on first use)
#
# A notebook fails the command when any cell errors, and each ends with a cell that asserts its
# claims. The solutions of the exercises (notebooks/solutions/*.ipynb) run after the numbered
# notebooks, as they do. Installs what is missing, once:
#   - evcxr_jupyter 0.22.0 with `cargo install` (about 12 minutes on an idle 2-core machine: 702 s
#     measured for issue 15; what it compiles and the time left are shown as it goes);
#   - a Python venv under $ULYSSES_CACHE (default ~/.cache/ulysses) with nbclient, which gives
#     `jupyter execute` (and JupyterLab for --lab);
#   - a kernelspec named "rust", as evcxr's own (`evcxr_jupyter --install`) is named, in that
#     cache through JUPYTER_PATH (nothing is written to ~/.local/share/jupyter); it adds only the
#     speed settings below. libtorch reaches evcxr as it does for any user of the standard
#     kernel: through notebooks/evcxr.toml, which scripts/setup.sh writes.
# Speed (see docs/notebooks.md): evcxr compiles the library's dependencies again (it
# ignores cargo's target dir); `:opt 0` and `:cache` in its init file, one build folder reused by
# the notebooks run one after another, and a warm-up notebook (00_warmup, no cell timeout) that
# pays the first build make the rest take minutes.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cache=${ULYSSES_CACHE:-$HOME/.cache/ulysses}
evcxr_version=0.22.0
venv=$cache/jupyter-venv
cell_timeout=1200

say() { echo "[notebooks] $*"; }

mode=inplace
names=()
for arg in "$@"; do
  case "$arg" in
    --check) mode=check ;;
    --lab) mode=lab ;;
    -h | --help) sed -n '2,9p' "${BASH_SOURCE[0]}"; exit 0 ;;
    -*) echo "[notebooks] unknown option $arg (try --help)" >&2; exit 2 ;;
    *) names+=("${arg%.ipynb}") ;;
  esac
done

"$repo/scripts/setup.sh"
export PATH="$HOME/.cargo/bin:$PATH"
[ -f "$repo/notebooks/evcxr.toml" ] || { echo "[notebooks] scripts/setup.sh wrote no notebooks/evcxr.toml" >&2; exit 1; }

# 1. evcxr_jupyter, only when this version is missing.
if ! cargo install --list | grep -q "^evcxr_jupyter v$evcxr_version:"; then
  # What it compiles and roughly how long is left, from scripts/build-times/evcxr.tsv. Its own
  # build folder: a CARGO_TARGET_DIR shared with the project would only collect clutter.
  # ULYSSES_CARGO_ARGS (`--timings`) reaches this build too, in a folder that is then kept, so that
  # cargo's report outlives the install.
  extra=()
  [ -z "${ULYSSES_CARGO_ARGS:-}" ] || read -r -a extra <<<"--target-dir $cache/evcxr-build $ULYSSES_CARGO_ARGS"
  env -u CARGO_TARGET_DIR python3 "$repo/scripts/build_progress.py" --times "$repo/scripts/build-times/evcxr.tsv" \
    --what "installing evcxr_jupyter $evcxr_version, the Jupyter Rust kernel (cargo install, once)" \
    -- cargo install --locked evcxr_jupyter --version "$evcxr_version" "${extra[@]}"
fi
evcxr=${CARGO_INSTALL_ROOT:-${CARGO_HOME:-$HOME/.cargo}}/bin/evcxr_jupyter

# 2. Jupyter's Python side.
want=(nbclient)
[ "$mode" = lab ] && want+=(jupyterlab)
for pkg in "${want[@]}"; do
  if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c "import ${pkg}" 2>/dev/null; then
    say "installing $pkg into $venv"
    [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
    "$venv/bin/pip" install -q --disable-pip-version-check "$pkg"
  fi
done

# 3. The kernel's settings: evcxr's init file, and the kernelspec. Notebooks executed one after
# another share one build folder (EVCXR_TMPDIR), so each reuses the last one's compiled library;
# live kernels in JupyterLab must not share it, so --lab gets a kernelspec without it. Neither
# says where libtorch is: notebooks/evcxr.toml does (see scripts/setup.sh), for this kernel as
# for evcxr's standard one.
config_dir=$cache/evcxr/config
mkdir -p "$config_dir"
printf ':opt 0\n:cache 8192\n' >"$config_dir/init.evcxr"
jupyter_dir=$cache/jupyter/$mode
spec_dir=$jupyter_dir/kernels/rust
mkdir -p "$spec_dir"
# The build folder lives under /tmp, as evcxr's own default does: evcxr loads each cell's library
# through a relative rpath to Rust's libstd that rustc computes from the deps/ folder, which only
# resolves when the walk up goes through / (a folder under $HOME, where rustup lives, breaks it).
tmpdir_env=""
if [ "$mode" != lab ]; then
  build_dir=${TMPDIR:-/tmp}/ulysses-evcxr-build-$(id -u)
  mkdir -p "$build_dir"
  tmpdir_env=$(printf ',\n    "EVCXR_TMPDIR": "%s"' "$build_dir")
fi
# evcxr_jupyter looks at its own kernelspec folder (kernels/rust under JUPYTER_PATH) each time a
# kernel starts, and when the folder's version.txt is missing or not its own it installs its
# spec there again: its kernel.json, without an "env". Every later kernel would then build in a
# fresh temporary folder without the init file, rebuilding every dependency for each notebook.
# So evcxr installs itself first (its version.txt, logos and kernel.js, whatever its version),
# and then our kernel.json replaces its own; `spec_in_use` checks after each notebook that it
# is still ours.
JUPYTER_PATH=$jupyter_dir "$evcxr" --install >"$jupyter_dir/evcxr-install.log" 2>&1 || {
  cat "$jupyter_dir/evcxr-install.log" >&2
  echo "[notebooks] $evcxr --install failed (its output is above)" >&2
  exit 1
}
cat >"$spec_dir/kernel.json" <<EOF
{
  "argv": ["$evcxr", "--control_file", "{connection_file}"],
  "display_name": "Rust",
  "language": "rust",
  "interrupt_mode": "message",
  "env": {
    "EVCXR_CONFIG_DIR": "$config_dir"$tmpdir_env
  }
}
EOF
# The kernelspec in use still carries the settings written above (evcxr did not replace it).
want_env=(EVCXR_CONFIG_DIR)
[ -n "$tmpdir_env" ] && want_env+=(EVCXR_TMPDIR)
spec_in_use() {
  python3 - "$spec_dir/kernel.json" "${want_env[@]}" <<'PY'
import json, sys
path, want = sys.argv[1], sys.argv[2:]
try:
    env = json.load(open(path)).get("env", {})
except (OSError, ValueError) as e:
    sys.exit(f"[notebooks] cannot read {path}: {e}")
lost = [k for k in want if k not in env]
if lost:
    sys.exit(f"[notebooks] {path} lost {', '.join(lost)} from its env (evcxr installed its own spec over it?)")
PY
}
# What a kernel start does first, without a kernel: evcxr checks its kernelspec folder (and
# would install its own spec there), then stops at the connection file that does not exist.
JUPYTER_PATH=$jupyter_dir "$evcxr" --control_file "$jupyter_dir/no-such-connection-file" >/dev/null 2>&1 || true
spec_in_use
export JUPYTER_PATH=$jupyter_dir
cd "$repo/notebooks"

if [ "$mode" = lab ]; then
  say "JupyterLab on the notebooks (kernel \"Rust\", evcxr's)"
  exec "$venv/bin/jupyter" lab --notebook-dir="$repo/notebooks"
fi

# 4. Execute: the warm-up first (it pays the dependencies' first build, so no cell timeout),
# then each notebook with a per-cell timeout.
if [ ${#names[@]} -eq 0 ]; then
  for f in [0-9][0-9]_*.ipynb solutions/*.ipynb; do
    [ -f "$f" ] && names+=("${f%.ipynb}")
  done
fi
out_dir=$repo/results/notebooks
mkdir -p "$out_dir"
failed=()
for name in 00_warmup "${names[@]/00_warmup}"; do
  [ -n "$name" ] || continue
  [ -f "$name.ipynb" ] || { echo "[notebooks] no notebook notebooks/$name.ipynb" >&2; exit 2; }
  timeout=$cell_timeout
  [ "$name" = 00_warmup ] && timeout=-1
  if [ "$mode" = check ]; then
    # An absolute path: jupyter execute takes --output relative to the notebook's folder.
    where=(--output="$out_dir/$name")
    out=$out_dir/$name.ipynb
    mkdir -p "$(dirname "$out")"
  else
    where=(--inplace)
    out=$name.ipynb
  fi
  say "executing $name.ipynb (cell timeout: $timeout s)"
  started=$(date +%s)
  if "$venv/bin/jupyter" execute --kernel_name=rust --timeout="$timeout" --startup_timeout=120 \
    "${where[@]}" "$name.ipynb" && "$venv/bin/python" - "$name" "$out" <<'PY'
# evcxr reports an error that `?` returns from a cell on the cell's stderr and still calls the
# cell a success: a notebook passes only if no cell wrote to stderr and its last code cell says
# that its claims hold.
import json, sys
name, path = sys.argv[1], sys.argv[2]
cells = [c for c in json.load(open(path))["cells"] if c["cell_type"] == "code"]
bad = []
for i, cell in enumerate(cells):
    for o in cell.get("outputs", []):
        if o.get("output_type") == "error" or o.get("name") == "stderr":
            text = "".join(o.get("text", "")) or o.get("evalue", "")
            bad.append(f"code cell {i + 1}: {text.strip()[:500]}")
        # A chart must be stored as an image (image/svg+xml), which exports keep, not as HTML.
        if "<svg" in "".join(o.get("data", {}).get("text/html", "")):
            bad.append(f"code cell {i + 1}: a chart stored as HTML, not image/svg+xml")
        if "Svg(" in "".join(o.get("data", {}).get("text/plain", "")):
            bad.append(f"code cell {i + 1}: a chart shown as its Debug text (end the cell with .evcxr_display())")
last = "".join("".join(o.get("text", "")) for o in cells[-1].get("outputs", []))
if name != "00_warmup" and "all claims hold" not in last:
    bad.append("the last code cell did not print 'all claims hold'")
for b in bad:
    print(f"[notebooks] {name}: {b}", file=sys.stderr)
sys.exit(1 if bad else 0)
PY
  then
    say "$name.ipynb: passed in $(($(date +%s) - started)) s"
    if ! spec_in_use; then
      say "after $name.ipynb the kernelspec is not ours any more: the next notebooks would rebuild everything"
      failed+=("$name (kernelspec)")
    fi
  else
    say "$name.ipynb: FAILED after $(($(date +%s) - started)) s"
    failed+=("$name")
  fi
done
if [ ${#failed[@]} -gt 0 ]; then
  echo "[notebooks] failed: ${failed[*]}" >&2
  exit 1
fi
[ "$mode" = check ] && say "executed copies in $out_dir"
say "all notebooks passed"
