#!/usr/bin/env python3
"""Runs every test binary of a cargo test build, several at a time, the longest first; then the
doc tests. What `cargo test` runs, in less time: cargo runs the binaries one after another, so
the long ones (the strategies' parity at many P, the MPI processes) leave cores idle.

    run_tests.py [--jobs N] [--expect-tests A,B] -- CARGO_TEST_ARGS...   # e.g. -- --release --features mpi,nccl

1. `cargo test ARGS --no-run --message-format=json` lists the test binaries (building what is
   missing: run it after the build to keep the two apart);
2. N binaries run at once (default: the number of cores), each with `--test-threads=1` so that
   N tests run at a time, as with `cargo test` on N cores; the longest first, by the times of the
   last run (kept in the target folder, `test-times.tsv`); each from the package's folder, as
   cargo runs them;
3. each binary's result is printed when it ends (its whole output if it failed), then
   `cargo test ARGS --doc`; the exit status is non-zero if anything failed;
4. the totals: tests passed and ignored (each ignored test named, with its reason), and
   `--expect-tests`: binaries that must hold tests. A test file behind a cargo feature compiles
   to no test at all without it (`#![cfg(feature = "mpi")]`), and then passes with nothing run:
   a missing feature fails the run instead.
"""

import re

import argparse
import json
import os
import subprocess
import sys
import threading
import time


def test_binaries(cargo_args):
    """(name, path) of every test executable the build has, from cargo's JSON messages."""
    cmd = ["cargo", "test", *cargo_args, "--no-run", "--message-format=json-render-diagnostics"]
    out = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    if out.returncode != 0:
        sys.exit(f"[tests] {' '.join(cmd)} failed (exit status {out.returncode})")
    found = []
    for line in out.stdout.splitlines():
        try:
            msg = json.loads(line)
        except ValueError:
            continue
        if msg.get("reason") == "compiler-artifact" and msg.get("executable") and msg["profile"]["test"]:
            kind = msg["target"]["kind"][0]
            name = msg["target"]["name"] if kind == "test" else f"{kind} {msg['target']['name']}"
            found.append((name, msg["executable"]))
    return found


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="binaries at once (default: cores)")
    ap.add_argument("--expect-tests", default="", help="comma-separated test binaries that must hold tests")
    ap.add_argument("cargo", nargs=argparse.REMAINDER, help="-- arguments of cargo test")
    args = ap.parse_args()
    cargo_args = args.cargo[1:] if args.cargo[:1] == ["--"] else args.cargo
    meta = json.loads(subprocess.run(["cargo", "metadata", "--format-version", "1", "--no-deps"],
                                     stdout=subprocess.PIPE, text=True, check=True).stdout)
    root = os.path.dirname(meta["packages"][0]["manifest_path"])
    times_path = os.path.join(meta["target_directory"], "test-times.tsv")
    last = {}
    if os.path.exists(times_path):
        for line in open(times_path, encoding="utf-8"):
            name, _, seconds = line.rstrip("\n").rpartition("\t")
            try:
                last[name] = float(seconds)
            except ValueError:
                pass

    binaries = test_binaries(cargo_args)
    # Longest first; binaries never timed (new files) before all others: they might be long.
    binaries.sort(key=lambda b: -last.get(b[0], float("inf")))
    print(f"[tests] {len(binaries)} test binaries, {args.jobs} at a time, longest first", flush=True)
    lock = threading.Lock()
    queue = list(binaries)
    results = {}
    tallies = {}  # name -> (passed, ignored, [ignored test lines])
    started = time.monotonic()

    def worker():
        while True:
            with lock:
                if not queue:
                    return
                name, exe = queue.pop(0)
            t0 = time.monotonic()
            proc = subprocess.run([exe, "--test-threads=1"], cwd=root, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True)
            took = time.monotonic() - t0
            summary = [line for line in proc.stdout.splitlines() if line.startswith("test result:")]
            counts = [int(n) for n in re.findall(r"(\d+) (?:passed|ignored)", summary[-1])] if summary else [0, 0]
            skipped = [line[5:].strip() for line in proc.stdout.splitlines()
                       if line.startswith("test ") and " ... ignored" in line]
            with lock:
                results[name] = (proc.returncode, took)
                tallies[name] = (counts[0] if counts else 0, counts[1] if len(counts) > 1 else 0, skipped)
                verdict = "ok" if proc.returncode == 0 else f"FAILED (exit status {proc.returncode})"
                print(f"[tests] {name}: {verdict} in {took:.1f} s  {summary[-1] if summary else ''}", flush=True)
                if proc.returncode != 0:
                    print(proc.stdout, flush=True)

    workers = [threading.Thread(target=worker) for _ in range(max(1, args.jobs))]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    wall = time.monotonic() - started
    with open(times_path, "w", encoding="utf-8") as f:
        for name, (_, took) in sorted(results.items()):
            f.write(f"{name}\t{took:.2f}\n")
    failed = sorted(name for name, (code, _) in results.items() if code != 0)
    total = sum(took for _, took in results.values())
    print(f"[tests] binaries done in {wall:.1f} s (their times add up to {total:.1f} s)", flush=True)
    passed = sum(t[0] for t in tallies.values())
    ignored = [f"{name}: {line}" for name, t in sorted(tallies.items()) for line in t[2]]
    print(f"[tests] {passed} tests passed, {len(ignored)} ignored, in {len(binaries)} binaries", flush=True)
    for line in ignored:
        print(f"[tests]   ignored: {line}", flush=True)
    names = {name for name, _ in binaries}
    for want in filter(None, args.expect_tests.split(",")):
        held = tallies.get(want, (0, 0, []))
        if want not in names or held[0] + held[1] == 0:
            print(f"[tests] {want}: expected to hold tests, but it " +
                  ("was not built" if want not in names else "holds none (is its cargo feature on?)"),
                  file=sys.stderr)
            failed.append(f"{want} (no tests)")
    doc = subprocess.run(["cargo", "test", *cargo_args, "--doc"], cwd=root)
    if doc.returncode != 0:
        failed.append("doc tests")
    if failed:
        print(f"[tests] FAILED: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
