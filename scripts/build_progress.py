#!/usr/bin/env python3
"""Runs a cargo build and keeps the terminal moving: what is being compiled, how far along it is,
and roughly how long is left, from a table of the same build measured on a 2-core machine.

    build_progress.py [--times TABLE] [--what TEXT] [--executable BIN] -- cargo build ARGS...
    build_progress.py --from-timings cargo-timing.html --note TEXT [--scale-to SECONDS] > TABLE

Cargo gets `--message-format=json-render-diagnostics`: its JSON messages (stdout) say when each
unit (a crate's library, a build script, a build script's run, a binary) has finished and whether
it was already built; its status lines (stderr: `Compiling polars-core v0.55.2`) say when a
package starts; warnings and errors pass through to stderr as cargo renders them.

How long is left: the units not finished yet are scheduled on the build's cores as cargo does
(dependencies first, the longest chain first), with the durations measured in TABLE, the one that
started already counting what it has done; the result is scaled by how fast this build has gone
so far against the table (a busier or faster machine). TABLE comes from `cargo build --timings`
through --from-timings (see scripts/build-times/README.md). A unit the table lacks counts as
done when it finishes; the estimate is a guide, the elapsed time is exact.

On a terminal: one status line redrawn in place. Elsewhere (CI, pipes): a line every 10 s.
Nothing is printed when everything was already built. The exit status is cargo's.
"""

import argparse
import heapq
import json
import os
import re
import subprocess
import sys
import threading
import time

ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
STATUS = re.compile(r"^\s*(Compiling|Checking|Downloaded|Downloading|Updating|Locking|Adding|Blocking|Fresh|"
                    r"Finished|Installing|Installed|Replacing|Replaced|Running|Executable|Building|Ignored)\b(.*)$")


def clock(seconds):
    """1:05 for 65 s, 1:02:05 past an hour."""
    s = max(0, int(round(seconds)))
    return f"{s // 3600}:{s // 60 % 60:02}:{s % 60:02}" if s >= 3600 else f"{s // 60}:{s % 60:02}"


# ---- the table -------------------------------------------------------------------------------

class Unit:
    def __init__(self, uid, package, target, duration, rmeta, deps, rmeta_deps):
        self.uid, self.package, self.target = uid, package, target
        self.duration, self.rmeta = duration, rmeta
        self.deps, self.rmeta_deps = deps, rmeta_deps
        self.dependents, self.rmeta_dependents = [], []
        self.chain = 0.0  # the longest path from this unit's start to the end of the build


def from_timings(html_path, note, scale_to=None):
    """A table from cargo's timing report: its UNIT_DATA, every unit with what it waited for;
    with `scale_to`, every time multiplied so that the total is that many seconds."""
    text = open(html_path, encoding="utf-8").read()
    m = re.search(r"const UNIT_DATA = (\[.*?\]);\n", text, re.S)
    if not m:
        sys.exit(f"{html_path}: no UNIT_DATA (not a cargo --timings report?)")
    units = json.loads(m.group(1))
    total = re.search(r"Total time:</td><td>([0-9.]+)s", text)
    jobs = re.search(r"jobs=(\d+)", text)
    deps, rmeta_deps = {}, {}
    for u in units:
        for v in u.get("unblocked_units", []):
            deps.setdefault(v, []).append(u["i"])
        for v in u.get("unblocked_rmeta_units", []):
            rmeta_deps.setdefault(v, []).append(u["i"])
    measured = float(total.group(1)) if total else None
    k = scale_to / measured if scale_to and measured else 1.0
    print(f"# {note}")
    if k != 1.0:
        print(f"# times scaled by {k:.4f}: measured total {measured:.1f} s, scaled to {scale_to:.1f} s")
    total_s = f"{measured * k:.1f}" if measured else "?"
    print(f"# total_s={total_s} jobs={jobs.group(1) if jobs else '?'} units={len(units)}")
    print("# id\tpackage\ttarget\tduration_s\trmeta_s\tdeps\trmeta_deps")
    for u in sorted(units, key=lambda u: u["start"]):
        t = u["target"].strip()
        if t == "":
            target = "lib"
        elif t == "build-script":
            target = "build-script"
        elif t == "build-script (run)":
            target = "build-script-run"
        else:  # ' ulysses "bin"', ' "test"', ...
            words = t.replace('"', "").split()
            target = " ".join(reversed(words)) if len(words) == 2 else t
        frontend = [s[1]["end"] * k for s in (u.get("sections") or []) if s[0] == "frontend"]
        rmeta = f"{frontend[0]:.2f}" if frontend else "-"
        join = lambda ids: ";".join(str(i) for i in sorted(ids)) or "-"
        print(f"{u['i']}\t{u['name']}\t{target}\t{u['duration'] * k:.2f}\t{rmeta}\t"
              f"{join(deps.get(u['i'], []))}\t{join(rmeta_deps.get(u['i'], []))}")


def read_table(path):
    """The units of a table, keyed by id; its total time and jobs (from its header)."""
    units, total, jobs = {}, None, None
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.startswith("#"):
                for key, value in re.findall(r"(\w+)=([0-9.]+)", line):
                    if key == "total_s":
                        total = float(value)
                    elif key == "jobs":
                        jobs = int(value)
                continue
            cols = line.rstrip("\n").split("\t")
            if len(cols) != 7:
                continue
            ids = lambda s: [] if s == "-" else [int(x) for x in s.split(";")]
            uid = int(cols[0])
            units[uid] = Unit(uid, cols[1], cols[2], float(cols[3]),
                              None if cols[4] == "-" else float(cols[4]), ids(cols[5]), ids(cols[6]))
    # Who waits for whom, and the longest chain from each unit to the end of the build (the
    # scheduler's priority), dependents before dependencies.
    for u in units.values():
        u.deps = [d for d in u.deps if d in units]
        u.rmeta_deps = [d for d in u.rmeta_deps if d in units]
        for d in u.deps:
            units[d].dependents.append(u.uid)
        for d in u.rmeta_deps:
            units[d].rmeta_dependents.append(u.uid)
    order, seen = [], set()
    for root in units:
        stack = [(root, False)]
        while stack:
            uid, expanded = stack.pop()
            if expanded:
                order.append(uid)
            elif uid not in seen:
                seen.add(uid)
                stack.append((uid, True))
                stack.extend((v, False) for v in units[uid].dependents + units[uid].rmeta_dependents)
    for uid in order:  # every dependent comes before the unit it waits for
        u = units[uid]
        u.chain = u.duration + max((units[v].chain for v in u.dependents + u.rmeta_dependents), default=0.0)
    return units, total, jobs


def remaining(units, done, running, now, jobs):
    """Seconds (table time) until every unit is done: cargo's schedule replayed on `jobs` cores.

    `done`: ids finished; `running`: id -> moment it started (on the clock of `now`). Events in
    time order; a unit is ready once its dependencies have finished (or written their metadata,
    for the edges cargo pipelines), and a free core takes the ready unit with the longest chain."""
    waits = {uid: len(u.deps) + len(u.rmeta_deps) for uid, u in units.items() if uid not in done}
    events = []  # (time, 0 = metadata written / 1 = finished, id)
    ready = []  # (-chain, id)
    t, free, end = 0.0, jobs, 0.0

    def resolve(uid, kind):
        for v in (units[uid].dependents if kind else units[uid].rmeta_dependents):
            if v in waits and v not in done and v not in running:
                waits[v] -= 1
                if waits[v] == 0:
                    heapq.heappush(ready, (-units[v].chain, v))

    for uid, started in running.items():
        u = units[uid]
        left = max(u.duration - (now - started), 0.1 * u.duration, 0.5)
        meta = (u.rmeta if u.rmeta is not None else u.duration) - (now - started)
        heapq.heappush(events, (max(0.0, min(meta, left)), 0, uid))
        heapq.heappush(events, (left, 1, uid))
        free -= 1
    for uid in done:
        resolve(uid, 0)
        resolve(uid, 1)
    for uid, n in waits.items():
        if n == 0 and uid not in running:
            heapq.heappush(ready, (-units[uid].chain, uid))
    free = max(free, 0)
    while True:
        while free > 0 and ready:
            _, uid = heapq.heappop(ready)
            u = units[uid]
            heapq.heappush(events, (t + (u.rmeta if u.rmeta is not None else u.duration), 0, uid))
            heapq.heappush(events, (t + u.duration, 1, uid))
            free -= 1
        if not events:
            return end
        t, kind, uid = heapq.heappop(events)
        end = max(end, t)
        if kind == 1:
            free += 1
        resolve(uid, kind)


# ---- the build -------------------------------------------------------------------------------

def package_of(package_id):
    """`registry+https://...#polars-core@0.55.2` -> polars-core; `path+file:///x/ulysses#0.1.0` -> ulysses."""
    frag = package_id.split("#", 1)[-1]
    if "@" in frag:
        return frag.split("@", 1)[0]
    return package_id.split("#", 1)[0].rstrip("/").rsplit("/", 1)[-1]


def unit_of(msg):
    """(package, table target) of a JSON message that says a unit finished, else None."""
    reason = msg.get("reason")
    if reason == "build-script-executed":
        return package_of(msg["package_id"]), "build-script-run"
    if reason != "compiler-artifact":
        return None
    kind = msg["target"]["kind"]
    name = msg["target"]["name"]
    if "custom-build" in kind:
        target = "build-script"
    elif msg.get("profile", {}).get("test") or "test" in kind or "bench" in kind:
        target = f"test {name}"
    elif "bin" in kind or "example" in kind:
        target = f"{kind[0]} {name}"
    else:
        target = "lib"
    return package_of(msg["package_id"]), target


class Build:
    def __init__(self, args):
        self.table = {}
        self.total, self.table_jobs = None, None
        if args.times and os.path.exists(args.times):
            self.table, self.total, self.table_jobs = read_table(args.times)
        self.by_key = {}
        for u in self.table.values():
            self.by_key.setdefault((u.package, u.target), []).append(u.uid)
        self.jobs = args.jobs or self.table_jobs or os.cpu_count() or 1
        # Cargo's own overhead (scheduling, waiting on the jobserver): the measured total over the
        # replayed schedule of the whole table.
        self.overhead = 1.0
        if self.table and self.total:
            self.overhead = min(1.5, max(1.0, self.total / max(1e-9, remaining(self.table, set(), {}, 0.0, self.jobs))))
        self.what = args.what
        self.tty = sys.stderr.isatty()
        self.lock = threading.Lock()
        self.started = time.monotonic()
        self.first_work = None  # when the first unit that was not fresh started
        self.done, self.fresh, self.running = set(), set(), {}
        self.packages = {}  # package -> when its `Compiling` line came
        self.active = {}  # the packages compiling now -> since when
        self.finished = 0
        self.compiled = 0
        self.downloaded = 0
        self.phase = "starting cargo"
        self.start_estimate = None
        self.status_shown = False
        self.last_line = 0.0
        self.executables = {}
        self.said_hello = False
        self.blocked = False

    # -- what cargo says

    def on_json(self, msg):
        if msg.get("reason") == "compiler-artifact" and msg.get("executable"):
            self.executables[msg["target"]["name"]] = msg["executable"]
        key = unit_of(msg)
        if key is None:
            return
        with self.lock:
            self.finished += 1
            # A build script's run has no `fresh`: it ran if its package was compiled.
            fresh = msg.get("fresh", key[0] not in self.packages)
            if not fresh:
                self.compiled += 1
            candidates = [i for i in self.by_key.get(key, []) if i not in self.done]
            if candidates:
                uid = next((i for i in candidates if i in self.running), candidates[0])
                self.done.add(uid)
                self.running.pop(uid, None)
                if fresh:
                    self.fresh.add(uid)
            # The package's next unit (its library after its build script) starts now. A package
            # shows as compiling from its `Compiling` line until a unit ends that the table has
            # nothing after (without a table: its library or binary; a build script never ends it).
            if key[0] in self.packages and not fresh:
                if self.mark_running(key[0]) is None and not key[1].startswith("build-script"):
                    self.active.pop(key[0], None)

    def on_stderr(self, raw):
        line = ANSI.sub("", raw.rstrip("\n"))
        m = STATUS.match(line)
        with self.lock:
            if not m:
                self.print_line(raw.rstrip("\n"))
                return
            word, rest = m.group(1), m.group(2).strip()
            if word in ("Compiling", "Checking"):
                package = rest.split(" ", 1)[0]
                now = time.monotonic()
                if self.first_work is None:
                    self.first_work = now
                    self.hello()
                self.packages[package] = now
                self.active[package] = now
                self.mark_running(package)
                self.phase = "compiling"
            elif word == "Downloaded":
                self.downloaded += 1
                self.phase = f"downloading crates ({self.downloaded} so far)"
                self.hello()
            elif word in ("Downloading", "Updating", "Locking", "Blocking", "Installing"):
                self.phase = f"{word.lower()} {rest}".strip()
                self.hello()
                if word == "Installing" or word == "Blocking" and not self.blocked:
                    self.print_line(line.strip())
                self.blocked = self.blocked or word == "Blocking"
            elif word in ("Installed", "Replaced", "Replacing", "Executable", "Ignored"):
                self.print_line(line.strip())

    def mark_running(self, package):
        """The first unit of `package` not finished yet is the one compiling (its id, or None)."""
        for uid in sorted(i for (p, _), ids in self.by_key.items() if p == package for i in ids):
            if uid not in self.done:
                self.running.setdefault(uid, time.monotonic())
                return uid
        return None

    # -- what we say

    def hello(self):
        if self.said_hello:
            return
        self.said_hello = True
        if self.total is not None:
            self.print_line(f"[build] {self.what}: {clock(self.total)} measured on a {self.table_jobs}-core machine "
                            "with nothing built (less when some of it is built); progress below")
        else:
            self.print_line(f"[build] {self.what}")

    def estimate(self):
        """Seconds left (this machine's), or None without a table."""
        if not self.table:
            return None
        now = time.monotonic()
        left = remaining(self.table, self.done, self.running, now, self.jobs) * self.overhead
        if self.first_work is None:
            return left
        if self.start_estimate is None:
            self.start_estimate = remaining(self.table, self.fresh, {}, now, self.jobs) * self.overhead
        elapsed, progressed = now - self.first_work, self.start_estimate - left
        speed = min(5.0, max(0.3, elapsed / progressed)) if progressed > 15 else 1.0
        return left * speed

    def status(self):
        elapsed = time.monotonic() - self.started
        parts = [f"[build {clock(elapsed)}]"]
        if self.first_work is None:
            parts.append(self.phase)
        else:
            total = len(self.table) if self.table else None
            parts.append(f"{self.finished}/{total} units" if total else f"{self.finished} units")
            left = self.estimate()
            if left is not None:
                parts.append(f"~{clock(left)} left")
            now = time.monotonic()
            busy = sorted(self.active.items(), key=lambda kv: kv[1])
            if busy:
                parts.append("compiling " + ", ".join(f"{p} {clock(now - t)}" for p, t in busy))
        return "  ".join(parts)

    def print_line(self, text):
        """A line above the status line (which is redrawn after it)."""
        if self.tty and self.status_shown:
            sys.stderr.write("\r\x1b[2K")
            self.status_shown = False
        sys.stderr.write(text + "\n")
        sys.stderr.flush()

    def tick(self):
        with self.lock:
            if not self.said_hello:
                return
            now = time.monotonic()
            if self.tty:
                width = os.get_terminal_size(sys.stderr.fileno()).columns if sys.stderr.isatty() else 120
                sys.stderr.write("\r\x1b[2K" + self.status()[: max(20, width - 1)])
                sys.stderr.flush()
                self.status_shown = True
            elif now - self.last_line >= 10:
                self.last_line = now
                sys.stderr.write(self.status() + "\n")
                sys.stderr.flush()

    def finish(self, code):
        with self.lock:
            if self.tty and self.status_shown:
                sys.stderr.write("\r\x1b[2K")
            if self.said_hello:
                took = clock(time.monotonic() - self.started)
                verdict = "built" if code == 0 else f"FAILED (cargo exit status {code})"
                sys.stderr.write(f"[build] {verdict} in {took}: {self.compiled} units compiled, "
                                 f"{self.finished - self.compiled} already built\n")
            sys.stderr.flush()


def self_test():
    """Checks what the estimate rests on; run by scripts/test.sh."""
    here = os.path.dirname(os.path.abspath(__file__))
    assert package_of("registry+https://github.com/rust-lang/crates.io-index#polars-core@0.55.2") == "polars-core"
    assert package_of("path+file:///work/ulysses#0.1.0") == "ulysses"
    assert package_of("path+file:///work/wt/newcomer#ulysses@0.1.0") == "ulysses"
    lib = {"reason": "compiler-artifact", "package_id": "x#tch@0.24.0", "profile": {"test": False},
           "target": {"kind": ["lib"], "name": "tch"}}
    assert unit_of(lib) == ("tch", "lib")
    assert unit_of({**lib, "target": {"kind": ["custom-build"], "name": "build-script-build"}}) == ("tch", "build-script")
    assert unit_of({"reason": "build-script-executed", "package_id": "x#tch@0.24.0"}) == ("tch", "build-script-run")
    assert unit_of({**lib, "target": {"kind": ["bin"], "name": "ulysses"}}) == ("tch", "bin ulysses")
    for name in ("cli.tsv", "evcxr.tsv"):
        units, total, jobs = read_table(os.path.join(here, "build-times", name))
        assert units and total and jobs, name
        # The replayed schedule of the whole table is the measured build within 15 % (cargo's own
        # overhead is the rest), one core takes the sum of the durations, and nothing left is 0.
        full = remaining(units, set(), {}, 0.0, jobs)
        assert 0.85 * total <= full <= total * 1.01, (name, full, total)
        serial = sum(u.duration for u in units.values())
        assert abs(remaining(units, set(), {}, 0.0, 1) - serial) < 1e-6 * serial, name
        assert remaining(units, set(units), {}, 0.0, jobs) == 0.0, name
        # A unit that has run for longer than measured still counts as a little work left.
        longest = max(units.values(), key=lambda u: u.duration)
        done = {i for i in units if i != longest.uid and longest.uid not in units[i].deps}
        assert remaining(units, done, {longest.uid: 0.0}, 2 * longest.duration, jobs) > 0.0, name
    print("build_progress.py: self-test passed")
    return 0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--times", help="the measured table of this build (scripts/build-times/*.tsv)")
    ap.add_argument("--what", default="cargo build", help="what is being built, for the first line")
    ap.add_argument("--executable", help="print the path of this binary target to stdout at the end")
    ap.add_argument("--jobs", type=int, help="cores the estimate schedules on (default: the table's)")
    ap.add_argument("--from-timings", metavar="HTML", help="print a table made from a cargo --timings report")
    ap.add_argument("--note", default="", help="the table's first line (with --from-timings)")
    ap.add_argument("--scale-to", type=float, help="with --from-timings: scale the times to this total (s)")
    ap.add_argument("cargo", nargs=argparse.REMAINDER, help="-- cargo build ...")
    ap.add_argument("--self-test", action="store_true", help="check the parsing and the estimate, then exit")
    args = ap.parse_args()
    if args.self_test:
        return self_test()
    if args.from_timings:
        from_timings(args.from_timings, args.note, args.scale_to)
        return 0
    cmd = args.cargo[1:] if args.cargo[:1] == ["--"] else args.cargo
    if not cmd:
        ap.error("no cargo command after --")
    cmd = cmd + ["--message-format=json-render-diagnostics"]
    if sys.stderr.isatty() and not any(a.startswith("--color") for a in cmd):
        cmd.append("--color=always")
    build = Build(args)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1)

    def read_stdout():
        for line in proc.stdout:
            try:
                msg = json.loads(line)
            except ValueError:
                build.print_line(line.rstrip("\n"))
                continue
            build.on_json(msg)

    def read_stderr():
        for line in proc.stderr:
            build.on_stderr(line)

    readers = [threading.Thread(target=read_stdout, daemon=True), threading.Thread(target=read_stderr, daemon=True)]
    for r in readers:
        r.start()
    try:
        while proc.poll() is None:
            build.tick()
            time.sleep(0.5)
    except KeyboardInterrupt:
        proc.terminate()
    for r in readers:
        r.join()
    code = proc.wait()
    build.finish(code)
    if code == 0 and args.executable:
        exe = build.executables.get(args.executable)
        if exe is None:
            sys.stderr.write(f"[build] cargo reported no executable named {args.executable}\n")
            return 1
        print(exe)
    return code


if __name__ == "__main__":
    sys.exit(main())
