#!/usr/bin/env python3
"""The float-comparing tests again, with libtorch's CPU kernels held to older instruction sets:
what another CPU model would compute. A test bound that only holds on the CPU it was measured on
fails here, and not on a machine that happens to land a CI run.

    isa_check.py [--jobs N] [--isa NAME ...] -- CARGO_TEST_ARGS...   # e.g. -- --release --features mpi,nccl

For each instruction set (default: `avx2` and `default`, ATen's two below AVX-512; `--isa native`
runs the same with the CPU's own kernels, for the margins alone), three
libraries are told to stay at or below it when the process starts, and all three honour it in
the pinned libtorch 2.11.0 (checked by `tests/kernels.rs` at the start of each set, from their
own words):
  - ATen's vectorised kernels: ATEN_CPU_CAPABILITY=avx2|default (read back with
    at::get_cpu_capability());
  - MKL, the BLAS behind f32 GEMMs: MKL_ENABLE_INSTRUCTIONS=AVX2|SSE4_2 (MKL_VERBOSE names the
    instruction set of its dispatch on Intel CPUs; on others, an AMD EPYC here, it runs a generic
    path and names none, so the setting cannot be read back there and the check says so);
  - oneDNN, behind bf16 GEMMs on AVX-512 CPUs and convolutions: DNNL_MAX_CPU_ISA=AVX2|SSE41
    (DNNL_VERBOSE names its ISA; below AVX-512 libtorch sends bf16 GEMMs elsewhere).
Then the tests that compare floats run under each set: the strategies' parity, a slice of the
property tests, the layer, the GPT's gradients, the conformance checks (threads), interop, the
tape and the trainer (not the E5 convergence curves: bf16 below AVX-512 makes them take minutes,
and their 2% is the paper's claim, not a rounding bound). Each comparison prints the share of its bound
it used (`[margin]` lines, tests/common/tolerance.rs); the table at the end gives the largest per
test binary and instruction set. The exit status is non-zero if any test failed or any setting
did not take.
"""

import argparse
import os
import re
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from run_tests import test_binaries  # noqa: E402

ISAS = {
    "native": {},
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "DNNL_MAX_CPU_ISA": "AVX2"},
    "default": {"ATEN_CPU_CAPABILITY": "default", "MKL_ENABLE_INSTRUCTIONS": "SSE4_2", "DNNL_MAX_CPU_ISA": "SSE41"},
}
# What each library says when the setting took: ATen's capability as tests/kernels.rs reads it,
# MKL's and oneDNN's instruction sets as their verbose modes print them.
EXPECT = {
    "avx2": ("AVX2", "Intel(R) Advanced Vector Extensions 2 (Intel(R) AVX2)", "isa:Intel AVX2"),
    "default": ("DEFAULT", "Intel(R) Streaming SIMD Extensions 4.2", "isa:Intel SSE4.1"),
}
# Test binaries (and test-name filters) that compare floats; properties with fewer cases.
TESTS = [
    ("strategies", []),
    ("properties", []),
    ("conformance", []),
    ("train", []),
    ("interop", []),
    ("ulysses_layer", []),
    ("model", []),
    ("tape", []),
    ("tiled_mlp", []),
]
PROPTEST_CASES = "256"
PERCENT = re.compile(r"([0-9.]+|inf)%")


def run(exe, args, env, cwd):
    t0 = time.monotonic()
    proc = subprocess.run([exe, "--test-threads=1", "--nocapture", *args], cwd=cwd, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return proc, time.monotonic() - t0


def kernels_took(exe, isa, env, cwd):
    """Runs tests/kernels.rs under the setting with the libraries' verbose modes; the problems."""
    want_aten, want_mkl, want_dnnl = EXPECT.get(isa, (None, "", ""))
    env = dict(env, MKL_VERBOSE="1", DNNL_VERBOSE="1")
    if want_aten:
        env["ULYSSES_EXPECT_CPU_CAPABILITY"] = want_aten
    proc, _ = run(exe, [], env, cwd)
    out = proc.stdout
    problems = []
    if proc.returncode != 0:
        problems.append(f"tests/kernels.rs failed:\n{out}")
    mkl = [line for line in out.splitlines() if line.startswith("MKL_VERBOSE oneMKL")]
    notes, vendor = [], cpu_vendor()
    if mkl and "Extensions" not in mkl[0] and vendor != "GenuineIntel":
        # On a CPU not made by Intel (an AMD EPYC here) MKL runs its generic code path and its
        # verbose line names no instruction set ("Intel(R) Architecture processors"), with or
        # without the setting: it cannot be read back, so it is said, not failed. ATen and
        # oneDNN still have to say theirs.
        notes.append(f"MKL names no instruction set on this {vendor} CPU, so its setting cannot be "
                     f"read back here (on Intel CPUs it must say {want_mkl!r})")
    elif not mkl or want_mkl not in mkl[0]:
        problems.append(f"MKL does not say {want_mkl!r}: {mkl[:1]}")
    dnnl = [line for line in out.splitlines() if ",info,cpu,isa:" in line]
    if not dnnl or want_dnnl not in dnnl[0]:
        problems.append(f"oneDNN does not say {want_dnnl!r}: {dnnl[:1]}")
    said = [line[line.index("ATen CPU capability"):] for line in out.splitlines() if "ATen CPU capability" in line]
    mkl_said = (mkl[0][:120] if mkl else "MKL: ?") + "".join(f"\n[isa]   note: {n}" for n in notes)
    return problems, (said[0] if said else "ATen: ?"), mkl_said, (dnnl[0] if dnnl else "oneDNN: ?")


def cpu_vendor():
    """/proc/cpuinfo's vendor_id (GenuineIntel, AuthenticAMD, ...), or "unknown"."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="binaries at once (default: cores)")
    ap.add_argument("--isa", action="append", choices=sorted(ISAS), help="instruction sets (default: all)")
    ap.add_argument("cargo", nargs=argparse.REMAINDER, help="-- arguments of cargo test")
    args = ap.parse_args()
    cargo_args = args.cargo[1:] if args.cargo[:1] == ["--"] else args.cargo
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    exes = dict(test_binaries(cargo_args))
    missing = [name for name, _ in TESTS + [("kernels", [])] if name not in exes]
    if missing:
        sys.exit(f"[isa] no test binary for {', '.join(missing)} in this build")
    isas = args.isa or [isa for isa in ISAS if isa != "native"]
    failed = []
    for isa in isas:
        env = dict(os.environ, **ISAS[isa])
        problems, aten, mkl, dnnl = kernels_took(exes["kernels"], isa, env, root)
        settings = " ".join(f"{k}={v}" for k, v in ISAS[isa].items())
        print(f"[isa] {isa}: {settings}\n[isa]   {aten}\n[isa]   {mkl}\n[isa]   {dnnl}", flush=True)
        if problems:
            for p in problems:
                print(f"[isa] {isa}: the setting did not take: {p}", file=sys.stderr)
            failed.append(f"{isa}: settings")
    if failed:
        print(f"[isa] FAILED: {', '.join(failed)}", file=sys.stderr)
        return 1

    jobs = [(isa, name, filters) for isa in isas for name, filters in TESTS]
    lock = threading.Lock()
    results = {}
    started = time.monotonic()

    def worker():
        while True:
            with lock:
                if not jobs:
                    return
                isa, name, filters = jobs.pop(0)
            env = dict(os.environ, **ISAS[isa], PROPTEST_CASES=PROPTEST_CASES)
            proc, took = run(exes[name], filters, env, root)
            worst = (-1.0, "")
            for line in proc.stdout.splitlines():
                shares = PERCENT.findall(line) if line.startswith("[margin] ") else []
                if shares:
                    used = float(shares[-1])
                    if used > worst[0]:
                        worst = (used, line[len("[margin] "):])
            summary = [line for line in proc.stdout.splitlines() if line.startswith("test result:")]
            with lock:
                results[(isa, name)] = (proc.returncode, took, worst)
                verdict = "ok" if proc.returncode == 0 else f"FAILED (exit status {proc.returncode})"
                print(f"[isa] {isa} {name}: {verdict} in {took:.1f} s  {summary[-1] if summary else ''}", flush=True)
                if proc.returncode != 0:
                    lines = [line for line in proc.stdout.splitlines() if not line.startswith("[margin]")]
                    print("\n".join(lines), flush=True)

    workers = [threading.Thread(target=worker) for _ in range(max(1, args.jobs))]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    print(f"\n[isa] the largest share of a bound used, per test binary ({time.monotonic() - started:.0f} s):")
    print(f"[isa] {'test':<14}" + "".join(f"{isa:>12}" for isa in isas) + "   where (the last set)")
    for name, _ in TESTS:
        cells, where = [], ""
        for isa in isas:
            code, _, (used, label) = results[(isa, name)]
            cells.append("FAILED" if code != 0 else ("-" if used < 0 else f"{used:.1f}%"))
            where = label
        print(f"[isa] {name:<14}" + "".join(f"{c:>12}" for c in cells) + f"   {where[:90]}")
    failed = [f"{isa} {name}" for (isa, name), (code, _, _) in sorted(results.items()) if code != 0]
    if failed:
        print(f"[isa] FAILED: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
