"""
Scanner speed against find(1), and how long a rescan holds the reactor.

Builds a tree of N small files (default 200,000, a few bytes each) in about
N/100 folders under a temporary directory, then measures:

  - files per second of L{cluster_backup.scanner.walk} (consuming every
    batch) against C{find SRC -printf '%s %T@ %p\\0'} on the same tree, warm
    cache: each runs once untimed, then the best of C{--runs} (default 3)
    each, alternating find and walk;
  - a rescan of the unchanged tree as the server does it
    (L{SourceScanner.scan_once}: the real L{scanner.scan} with the real
    reactor, each batch into a real L{Ledger}'s C{scan_batch}, then
    C{scan_finished}, C{gc.collect()} and C{gc.freeze()}) into a ledger that
    already holds the tree: the longest gap between ticks of a 5 ms
    L{LoopingCall} (the longest the reactor was held), the longest single
    C{on_batch} delivery, and the longest pause of the cyclic garbage
    collector (C{gc.callbacks}, any thread).  The first scan (every file
    new to the ledger) is measured the same way, for comparison.

The tree is deleted afterwards (C{--keep} keeps it; C{--tree DIR} reuses an
existing one and never deletes it).

Run: C{.venv/bin/python benchmarks/bench_scan.py [--files N] [--record]}.
With C{--record} the figures are appended to C{benchmarks/RESULTS.md}.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cluster_backup import scanner  # noqa: E402
from cluster_backup.config import Source  # noqa: E402
from cluster_backup.ledger import Ledger  # noqa: E402
from cluster_backup.server import SourceScanner  # noqa: E402

FIND = ["find", None, "-printf", "%s %T@ %p\\0"]
TICK = 0.005  # seconds between LoopingCall ticks
HOLD_TARGET_MS = 50.0
RATE_TARGET = 0.5


def build_tree(root: str, files: int, per_dir: int) -> int:
    """C{files} files of a few bytes, C{per_dir} to a folder, two levels deep."""
    dirs = max(1, -(-files // per_dir))
    fanout = max(1, int(dirs ** 0.5))
    made = 0
    for d in range(dirs):
        folder = os.path.join(root, f"top{d // fanout:03d}", f"dir{d:05d}")
        os.makedirs(folder, exist_ok=True)
        for _ in range(min(per_dir, files - made)):
            with open(os.path.join(folder, f"file{made:07d}.txt"), "wb") as f:
                f.write(b"%d\n" % made)
            made += 1
    return dirs


def time_find(root: str) -> float:
    argv = list(FIND)
    argv[1] = root
    started = time.perf_counter()
    subprocess.run(argv, stdout=subprocess.DEVNULL, check=True)
    return time.perf_counter() - started


def count_find(root: str) -> int:
    argv = list(FIND)
    argv[1] = root
    out = subprocess.run(argv, stdout=subprocess.PIPE, check=True).stdout
    return out.count(b"\0")


def time_walk(root: str) -> tuple[float, float, int]:
    """Wall seconds, CPU seconds and files of one full walk."""
    started, cpu = time.perf_counter(), time.process_time()
    n = 0
    for batch in scanner.walk(root):
        n += len(batch)
    return time.perf_counter() - started, time.process_time() - cpu, n


def reactor_scans(root: str) -> dict:
    """
    A first scan and a rescan into one real Ledger, each by the server's own
    L{SourceScanner.scan_once} (so with what the server does around a scan:
    L{scanner.scan} with its default batch, C{scan_finished}, then
    C{gc.collect()} and C{gc.freeze()}), under the real reactor; for each:
    wall seconds, the longest gap between 5 ms ticks and the longest
    on_batch call (milliseconds), and the batches delivered.
    """
    import gc

    from twisted.internet import reactor
    from twisted.internet.defer import ensureDeferred
    from twisted.internet.task import LoopingCall

    ledger = Ledger("src:/data", 2, reactor, {"h1:/backup": "h1"})
    scanning = SourceScanner(Source("src", root), ledger, 3600.0, [], reactor)
    scan_batch = ledger.scan_batch
    figures: dict = {}
    gaps = {"last": None, "max": 0.0}
    gc_pauses: list = []
    gc_started: list = [0.0]
    longest = [0.0, 0, 0]  # longest on_batch (s), batches, records

    def on_batch(records):
        t = time.perf_counter()
        scan_batch(records)
        longest[0] = max(longest[0], time.perf_counter() - t)
        longest[1] += 1
        longest[2] += len(records)

    ledger.scan_batch = on_batch  # what scan_once hands to scan()

    def on_gc(phase, info):
        if phase == "start":
            gc_started[0] = time.perf_counter()
        else:
            gc_pauses.append(time.perf_counter() - gc_started[0])

    def tick():
        now = time.perf_counter()
        if gaps["last"] is not None:
            gaps["max"] = max(gaps["max"], now - gaps["last"])
        gaps["last"] = now

    async def one(name: str):
        longest[:] = [0.0, 0, 0]
        gc_pauses.clear()
        gaps["last"], gaps["max"] = None, 0.0
        started = time.perf_counter()
        await scanning.scan_once()
        wall = time.perf_counter() - started
        status = ledger.status()
        if status.scan_error is not None:
            raise RuntimeError(f"scan failed: {status.scan_error}")
        figures[name] = dict(wall=wall, gap_ms=gaps["max"] * 1000,
                             gc_ms=max(gc_pauses, default=0.0) * 1000,
                             batch_ms=longest[0] * 1000, batches=longest[1],
                             files=longest[2])

    async def run():
        ticker = LoopingCall(tick)
        ticker.clock = reactor
        ticker.start(TICK)
        try:
            await one("first scan (all new)")
            await one("rescan (unchanged)")
        finally:
            ticker.stop()

    def main():
        d = ensureDeferred(run())
        d.addErrback(lambda f: figures.setdefault("error", f))
        d.addBoth(lambda _: reactor.stop())

    gc.callbacks.append(on_gc)
    reactor.callWhenRunning(main)
    try:
        reactor.run()
    finally:
        gc.callbacks.remove(on_gc)
        gc.unfreeze()
    if "error" in figures:
        figures["error"].raiseException()
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=200_000)
    parser.add_argument("--per-dir", type=int, default=100, help="files per folder")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--tree", help="use this existing tree (not deleted)")
    parser.add_argument("--keep", action="store_true", help="keep the generated tree")
    parser.add_argument("--record", action="store_true")
    run(parser.parse_args())


def run(args) -> None:
    made = None
    if args.tree:
        root = os.path.abspath(args.tree)
        dirs = None
    else:
        made = tempfile.mkdtemp(prefix="bench-scan-")
        root = os.path.join(made, "src")
        os.mkdir(root)
        t = time.perf_counter()
        dirs = build_tree(root, args.files, args.per_dir)
        print(f"built {args.files:,} files in {dirs:,} folders in "
              f"{time.perf_counter() - t:.1f} s", file=sys.stderr)
    try:
        load = os.getloadavg()[0]  # a shared machine: say how busy it was
        # Warm the cache, check both see the same files.
        entries = count_find(root)
        _, _, n = time_walk(root)
        finds, walks, cpus = [], [], []
        for _ in range(args.runs):
            finds.append(time_find(root))
            wall, cpu, _ = time_walk(root)
            walks.append(wall)
            cpus.append(cpu)
        find_s, walk_s = min(finds), min(walks)
        walk_cpu = cpus[walks.index(walk_s)]
        scans = reactor_scans(root)
    finally:
        if made is not None and not args.keep:
            shutil.rmtree(made)
        elif made is not None:
            print(f"tree kept in {root}", file=sys.stderr)

    find_rate, walk_rate = n / find_s, n / walk_s
    ratio = walk_rate / find_rate
    rescan = scans["rescan (unchanged)"]
    ok = lambda good: "met" if good else "**missed**"  # noqa: E731
    where = f"{dirs:,} folders" if dirs is not None else f"tree {root}"
    lines = [
        f"### Scan, {n:,} files — {time.strftime('%Y-%m-%d')}",
        "",
        f"Command: `.venv/bin/python benchmarks/bench_scan.py --files {n}` on "
        f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}; "
        f"{where}, find lists {entries:,} entries (files and folders); warm cache, "
        f"best of {args.runs} alternating runs; 1-minute load average {load:.2f} before.",
        "",
        "| figure | value | target |",
        "|---|---|---|",
        f"| `find -printf '%s %T@ %p\\0'` | {find_s:.2f} s, {find_rate:,.0f} files/s | |",
        f"| `scanner.walk` (all batches) | {walk_s:.2f} s, {walk_rate:,.0f} files/s "
        f"(CPU {walk_cpu:.2f} s) | |",
        f"| walk rate / find rate | {ratio:.2f} | >= {RATE_TARGET} ({ok(ratio >= RATE_TARGET)}) |",
    ]
    for name, f in scans.items():
        lines.append(
            f"| `scan_once()` {name} into a Ledger, real reactor: wall | {f['wall']:.2f} s, "
            f"{f['files'] / f['wall']:,.0f} files/s, {f['batches']} batches | |")
        target = (f"<= {HOLD_TARGET_MS:.0f} ms ({ok(f['gap_ms'] <= HOLD_TARGET_MS)})"
                  if f is rescan else "")
        lines.append(f"| `scan_once()` {name}: longest gap between {TICK * 1000:.0f} ms reactor ticks "
                     f"| {f['gap_ms']:.1f} ms | {target} |")
        lines.append(f"| `scan_once()` {name}: longest on_batch (ledger.scan_batch) "
                     f"| {f['batch_ms']:.1f} ms | |")
        lines.append(f"| `scan_once()` {name}: longest garbage collection (any thread) "
                     f"| {f['gc_ms']:.1f} ms | |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.record:
        path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md")
        with open(path, "a") as f:
            f.write("\n" + text)


if __name__ == "__main__":
    main()
