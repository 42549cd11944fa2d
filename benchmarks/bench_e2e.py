"""
End to end: a real cluster against a pair of rsyncs (issue 7).

One source (default 10,000 small files of 1-64 KiB, log-uniform, over 100
folders, plus 4 files of 256 MiB; seeded, mtimes a day or more in the past)
wanting C{copies: 2}, and three stores on three hosts with room for
everything.  Each host is its own loopback address (127.0.0.20 for the
source, .21-.23 for the stores), so a copy on each store is a copy on a
distinct host.  Measured, alternating, C{--runs} times (default 5: the
machine is shared, and single runs vary by a factor of two), with
fresh destinations each time and a warm page cache (the data was just
written and read; before each run C{sync}, then a wait until the disks are
idle, so one run's writeback and discards do not slow the next), after one
untimed rsync pair (the first run of a series met a fresher machine than
the later ones: rsync pairs of 6-12 s first, 14-20 s after):

  - the rsync pair: C{rsync -a SRC/ store1/ && rsync -a SRC/ store2/} into
    fresh empty folders on the same filesystem;
  - the cluster: the wall time from starting the real C{twistd -n
    cbackup-server} (source host) and C{twistd -n cbackup-client} (one per
    store host) until two copies of every file exist on disk, on distinct
    hosts: the benchmark polls the stores' folders
    (C{<store>/<source host>/<source path>/<relpath>}) for files with the
    source's size and mtime (each folder is re-listed only when its ctime
    moved, so polling costs little CPU).  Then it compares the bytes of every
    copy it counted with the source, and stops every process (TERM, then
    KILL).

Reported: the best and median of each, their ratio (target: cluster at most
1.3 x the rsync pair), and where the cluster's time went, from the
processes' logs (written with microsecond timestamps).  The config is what
an operator wanting prompt backups might write: C{REPORT INTERVAL: 10s},
C{RESCAN: 1h}, C{DEAD AFTER: 10m}, a C{SECRET}; quotas are twice the
source's size.

Everything lives under one scratch folder (C{--dir}, default the system's
temporary folder, which must be a real disk: the stores are real folders),
deleted at the end, also after a failure or Ctrl-C.  Run:
C{.venv/bin/python benchmarks/bench_e2e.py [--small N] [--big N]
[--big-size SIZE] [--runs N] [--record]}.  With C{--record} the figures are
appended to C{benchmarks/RESULTS.md}.  Exit status 0 only when every
cluster run reached two verified copies of every file.  With
C{BENCH_E2E_KEEP_LOGS=DIR} the processes' logs of every run are copied to
DIR before the run's folder is deleted.
"""

from __future__ import annotations

import argparse
import filecmp
import math
import os
import platform
import random
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from datetime import datetime
from typing import Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cluster_backup.demo import Process, free_port  # noqa: E402
from cluster_backup.units import parse_size  # noqa: E402

MiB = 1 << 20
TARGET = 1.3
SOURCE_HOST, SOURCE_ADDRESS = "src", "127.0.0.20"
STORE_HOSTS = [("st1", "127.0.0.21"), ("st2", "127.0.0.22"), ("st3", "127.0.0.23")]
COPIES = 2
OPTIONS = {"REPORT INTERVAL": "10s", "RESCAN": "1h", "DEAD AFTER": "10m",
           "SECRET": "bench-e2e-secret"}
#: Source mtimes: a day and more before the run, as on any real source.
OLD = 86_400


# --- data ---------------------------------------------------------------------

def make_data(root: str, *, seed: int, small: int, small_min: int, small_max: int,
              dist: str, folders: int, big: int, big_size: int) -> dict[str, tuple[int, int]]:
    """
    Write the source tree; returns relpath -> (size, mtime).  Small files
    go into C{folders} folders two levels deep (C{dNN/dNN}), big ones into
    C{big/}.
    """
    rnd = random.Random(seed)
    fanout = max(1, math.isqrt(folders))
    dirs = [os.path.join(f"d{i // fanout:02d}", f"d{i % fanout:02d}") for i in range(folders)]
    for d in dirs + ["big"]:
        os.makedirs(os.path.join(root, d), exist_ok=True)
    now = int(time.time())
    files: dict[str, tuple[int, int]] = {}

    def put(rel: str, size: int, chunks) -> None:
        path = os.path.join(root, rel)
        with open(path, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
        mtime = now - OLD - rnd.randrange(365 * 86_400)
        os.utime(path, (mtime, mtime))
        files[rel] = (size, mtime)

    for i in range(small):
        if dist == "log":
            size = int(math.exp(rnd.uniform(math.log(small_min), math.log(small_max + 1))))
        else:
            size = rnd.randint(small_min, small_max)
        size = min(max(size, small_min), small_max)
        put(os.path.join(rnd.choice(dirs), f"file-{i:06d}.dat"), size, [rnd.randbytes(size)])
    for i in range(big):
        full, rest = divmod(big_size, MiB)
        chunks = (rnd.randbytes(MiB if n < full else rest) for n in range(full + 1))
        put(os.path.join("big", f"big-{i}.bin"), big_size, chunks)
    return files


def same_bytes(a: str, b: str) -> bool:
    try:
        return filecmp.cmp(a, b, shallow=False)
    except OSError:
        return False


def read_all(root: str) -> None:
    """Read every file once (warm page cache for both contestants)."""
    for folder, _, names in os.walk(root):
        for name in names:
            with open(os.path.join(folder, name), "rb") as f:
                while f.read(8 * MiB):
                    pass


def filesystem_of(path: str) -> str:
    """The filesystem type /proc/mounts gives for C{path}'s mount ("" if unknown)."""
    best, kind = "", ""
    try:
        with open("/proc/mounts") as f:
            for line in f:
                parts = line.split()
                if len(parts) > 2 and (path == parts[1] or path.startswith(
                        parts[1].rstrip("/") + "/")) and len(parts[1]) >= len(best):
                    best, kind = parts[1], parts[2]
    except OSError:
        pass
    return kind


def disk_activity() -> tuple:
    """Reads, writes, discards and flushes completed, and I/Os in flight, of every disk."""
    total = [0] * 5
    try:
        with open("/proc/diskstats") as f:
            for line in f:
                fields = line.split()
                if len(fields) < 14 or fields[2].startswith(("loop", "ram")):
                    continue
                values = [int(x) for x in fields[3:]] + [0] * 8
                for i, k in enumerate((0, 4, 11, 15, 8)):  # reads, writes, discards, flushes, in flight
                    total[i] += values[k]
    except OSError:
        pass
    return tuple(total)


def settle(quiet: float = 1.0, timeout: float = 30.0) -> float:
    """
    Flush, then wait until the disks have done nothing for C{quiet} seconds
    (at most C{timeout}): deleting the previous run's copies leaves writes
    and, on a filesystem mounted with C{discard}, discards in flight that
    would slow whichever contestant runs next.  Returns the seconds waited.
    """
    started = time.monotonic()
    os.sync()
    last, since = disk_activity(), time.monotonic()
    while time.monotonic() - started < timeout:
        time.sleep(0.1)
        now = disk_activity()
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet:
            break
    return time.monotonic() - started


def rsync_version() -> str:
    try:
        out = subprocess.run(["rsync", "--version"], capture_output=True, text=True).stdout
    except OSError:
        return "rsync (version unknown)"
    return " ".join(out.split()[:3]) if out else "rsync (version unknown)"


# --- the rsync pair -----------------------------------------------------------

def rsync_pair(src: str, base: str) -> tuple[float, float]:
    """
    C{rsync -a SRC/ store1/ && rsync -a SRC/ store2/} into fresh folders;
    (wall seconds, CPU seconds of the rsyncs).
    """
    dests = [os.path.join(base, "store1"), os.path.join(base, "store2")]
    for d in dests:
        os.makedirs(d)
    settle()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.monotonic()
    for d in dests:
        subprocess.run(["rsync", "-a", src + "/", d + "/"], check=True)
    seconds = time.monotonic() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return seconds, cpu


# --- the cluster --------------------------------------------------------------

#: More than the kernel's timestamp granularity (a jiffy, at most 10 ms), ns.
TICK = 100_000_000


class Watch:
    """
    Counts copies on disk: for each store, which source files it holds with
    the source's size and mtime.  A folder is listed again only when its
    ctime moved since the last listing, or was within L{TICK} of that
    listing (the kernel stamps ctime from a coarse clock: an entry added just
    after a listing, in the same tick, leaves it unchanged).  Not its mtime:
    rsync sets a folder's mtime to the source folder's.
    """

    def __init__(self, files: dict[str, tuple[int, int]], roots: dict[str, str]):
        self.files = files
        self.roots = roots  # store host -> its copy of the source's folder
        self.hosts: dict[str, set[str]] = {rel: set() for rel in files}
        self.short = set(files)
        # store host -> folder -> names still to find there
        self.pending: dict[str, dict[str, set[str]]] = {}
        for host in roots:
            by_folder: dict[str, set[str]] = defaultdict(set)
            for rel in files:
                folder, name = os.path.split(rel)
                by_folder[folder].add(name)
            self.pending[host] = by_folder
        #: (host, folder) -> (its ctime, when it was listed), nanoseconds
        self.listed: dict[tuple[str, str], tuple[int, int]] = {}
        self.first_copy: Optional[float] = None

    def poll(self, now: float) -> bool:
        """Look once; true when every file has COPIES copies on distinct hosts."""
        for host, by_folder in self.pending.items():
            for folder in list(by_folder):
                names = by_folder[folder]
                path = os.path.join(self.roots[host], folder)
                try:
                    ctime = os.stat(path).st_ctime_ns
                except FileNotFoundError:
                    continue
                key = (host, folder)
                seen = self.listed.get(key)
                if seen is not None and seen[0] == ctime and seen[1] - ctime > TICK:
                    continue
                self.listed[key] = (ctime, time.time_ns())
                with os.scandir(path) as entries:
                    for entry in entries:
                        if entry.name not in names:
                            continue
                        rel = os.path.join(folder, entry.name)
                        if rel not in self.short:
                            names.discard(entry.name)
                            continue
                        try:
                            st = entry.stat(follow_symlinks=False)
                        except FileNotFoundError:
                            continue
                        if (st.st_size, st.st_mtime_ns // 10**9) != self.files[rel]:
                            continue  # an older leftover? (never here: fresh stores)
                        names.discard(entry.name)
                        self.hosts[rel].add(host)
                        if self.first_copy is None:
                            self.first_copy = now
                        if len(self.hosts[rel]) >= COPIES:
                            self.short.discard(rel)
                if not names:
                    del by_folder[folder]
        return not self.short

    def verify(self, src: str) -> list[str]:
        """Problems with the copies counted: bytes that differ from the source."""
        bad = []
        for rel, hosts in self.hosts.items():
            for host in sorted(hosts):
                copy = os.path.join(self.roots[host], rel)
                if not same_bytes(os.path.join(src, rel), copy):
                    bad.append(f"{host}: {rel}")
        return bad

    def copies_counted(self) -> int:
        return sum(len(h) for h in self.hosts.values())


def write_config(base: str, src: str, port: int, quota: int) -> str:
    lines = ["# bench_e2e: one source, three stores, every host on 127.0.0.x",
             f"options: PORT: {port}"]
    lines += [f"options: {k}: {v}" for k, v in OPTIONS.items()]
    lines += [f"server: {SOURCE_HOST}:{src}", f"copies: {COPIES}",
              f"address: {SOURCE_ADDRESS}"]
    for host, address in STORE_HOSTS:
        lines += [f"backup: {host}:{os.path.join(base, 'store-' + host)}",
                  f"size: {quota}", f"address: {address}"]
    path = os.path.join(base, "cluster.conf")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


class ClusterFailed(Exception):
    pass


def cluster_run(src: str, base: str, files: dict, quota: int, *, timeout: float,
                interval: float, profile: Optional[str] = None) -> dict:
    """
    One timed cluster run in the fresh folder C{base}; returns its figures.
    Every process is stopped before returning, whatever happens.
    """
    os.makedirs(base)
    port = free_port(SOURCE_ADDRESS)
    config = write_config(base, src, port, quota)
    roots = {host: os.path.join(base, "store-" + host, SOURCE_HOST, src.lstrip("/"))
             for host, _ in STORE_HOSTS}
    watch = Watch(files, roots)
    def options(plugin: str, host: str) -> tuple:
        if profile is None:
            return ()
        out = os.path.join(profile, f"{plugin}-{host}.prof")
        return (f"--profile={out}", "--profiler=cprofile", "--savestats")

    processes = [Process("cbackup-server", config, SOURCE_HOST, base, "--state-dir",
                         os.path.join(base, "state-" + SOURCE_HOST), precise_times=True,
                         twistd_options=options("cbackup-server", SOURCE_HOST))]
    processes += [Process("cbackup-client", config, host, base, precise_times=True,
                          twistd_options=options("cbackup-client", host))
                  for host, _ in STORE_HOSTS]
    settle()
    try:
        started_wall = time.time()
        started = time.monotonic()
        me = resource.getrusage(resource.RUSAGE_SELF)
        for p in processes:
            p.start()
        while True:
            # Look often only near the end, where the figure is decided.
            time.sleep(interval if len(watch.short) < len(files) / 10 else 4 * interval)
            now = time.monotonic() - started
            if watch.poll(now):
                break
            dead = [p for p in processes if not p.running()]
            if dead:
                raise ClusterFailed(f"{dead[0].plugin} {dead[0].host} exited:\n"
                                    f"{dead[0].log()[-3000:]}")
            if now > timeout:
                raise ClusterFailed(f"{len(watch.short)} files short of {COPIES} copies "
                                    f"after {timeout:.0f}s, e.g. {sorted(watch.short)[:3]}")
        seconds = now
        cpu = cpu_seconds(processes)
        after = resource.getrusage(resource.RUSAGE_SELF)
        cpu["this benchmark's polling"] = (after.ru_utime + after.ru_stime) - (
            me.ru_utime + me.ru_stime)
        bad = watch.verify(src)
        if bad:
            raise ClusterFailed(f"{len(bad)} copies differ from the source, e.g. {bad[:3]}")
    finally:
        for p in reversed(processes):  # clients first: no retries against a stopped server
            p.stop()
    result = {"seconds": seconds, "copies": watch.copies_counted(),
              "first_copy": watch.first_copy, "cpu": cpu}
    result.update(breakdown(processes, started_wall, seconds))
    return result


def _proc_times(pid: int) -> tuple[float, float]:
    """(own, reaped children's) CPU seconds of a live process, from /proc."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except OSError:
        return 0.0, 0.0
    tick = os.sysconf("SC_CLK_TCK")
    # fields[0] is field 3 (state): utime, stime, cutime, cstime are 14-17
    return (int(fields[11]) + int(fields[12])) / tick, (int(fields[13]) + int(fields[14])) / tick


def cpu_seconds(processes: list[Process]) -> dict[str, float]:
    """
    CPU used so far: the server, its rsync daemon (with the transfers it
    forked and reaped), the clients, and the rsyncs they ran and reaped.
    """
    out = {"server": 0.0, "rsync daemon": 0.0, "clients": 0.0, "client rsyncs": 0.0}
    server = processes[0]
    out["server"] = _proc_times(server.popen.pid)[0]
    m = re.search(r"rsync daemon started on \S+ \(pid (\d+)\)", server.log())
    if m:
        out["rsync daemon"] = sum(_proc_times(int(m.group(1))))
    for c in processes[1:]:
        own, children = _proc_times(c.popen.pid)
        out["clients"] += own
        out["client rsyncs"] += children
    return out


# --- what the logs say ----------------------------------------------------------

_LINE = re.compile(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+[+-]\d{4}) \[[^]]*\] (.*)")
_RSYNC_START = re.compile(r"rsync (fetch|check) of (\d+) paths from \S+ started \(pid (\d+)\)")
_RSYNC_END = re.compile(r"rsync (fetch|check) from \S+: \S+ \(exit \S+\), (\d+) files, "
                        r"(\d+) B in ([\d.]+)s")


def log_lines(process: Process, started_wall: float):
    """(seconds since the start, message) of each line of a process's log."""
    try:
        with open(process.logfile, encoding="utf-8", errors="replace") as f:
            for line in f:
                m = _LINE.match(line)
                if m:
                    when = datetime.strptime(m.group(1), "%Y-%m-%dT%H:%M:%S.%f%z").timestamp()
                    yield when - started_wall, m.group(2)
    except FileNotFoundError:
        return


def first(lines, text: str) -> Optional[float]:
    return next((t for t, message in lines if text in message), None)


def breakdown(processes: list[Process], started_wall: float, end: float) -> dict:
    """Milestones (seconds since the processes were started) and rsync time, from the logs."""
    server, clients = processes[0], processes[1:]
    out: dict = {}
    lines = list(log_lines(server, started_wall))
    out["server log opened"] = lines[0][0] if lines else None
    out["server listening"] = first(lines, "listening for backup clients")
    out["first scan done"] = first(lines, "scanned ")
    connected, claims = [], []
    fetch_s = check_s = 0.0
    fetch_runs = check_runs = 0
    fetching_s = idle_s = 0.0
    for c in clients:
        clines = list(log_lines(c, started_wall))
        t = first(clines, "connected to server")
        if t is not None:
            connected.append(t)
        t = first(clines, "rsync fetch of")
        if t is not None:
            claims.append(t)
        # The intervals (clipped to the end) this store had an rsync running.
        spans: dict[str, list] = {"fetch": [], "check": []}
        for t, m in clines:
            e = _RSYNC_END.search(m)
            if e and t - float(e.group(4)) < end:
                kind, secs = e.group(1), float(e.group(4))
                spans[kind].append((t - secs, min(t, end)))
                if kind == "fetch":
                    fetch_s, fetch_runs = fetch_s + min(t, end) - (t - secs), fetch_runs + 1
                else:
                    check_s, check_runs = check_s + min(t, end) - (t - secs), check_runs + 1
        fetching_s += union(spans["fetch"])
        if spans["fetch"]:
            begin = min(a for a, _ in spans["fetch"])
            idle_s += (end - begin) - union(spans["fetch"] + spans["check"])
    out["every store connected (inventory sent)"] = max(connected) if len(connected) == len(
        clients) else None
    out["first fetch started"] = min(claims) if claims else None
    out["fetch rsyncs"] = (fetch_runs, fetch_s)
    out["check rsyncs"] = (check_runs, check_s)
    out["store fetching"] = fetching_s / len(clients)
    out["store idle"] = idle_s / len(clients)
    return out


def union(spans: list) -> float:
    """Total length of the union of (start, end) intervals."""
    total, reach = 0.0, None
    for a, b in sorted(spans):
        if reach is None or a > reach:
            total, reach = total + b - a, b
        elif b > reach:
            total, reach = total + b - reach, b
    return total


# --- report -------------------------------------------------------------------

def fmt_s(x: Optional[float]) -> str:
    return "-" if x is None else f"{x:.2f} s"


def report(args, files: dict, baseline: list[float], baseline_cpu: list[float],
           cluster: list[dict]) -> str:
    total = sum(size for size, _ in files.values())
    times = [c["seconds"] for c in cluster]
    best_b, best_c = min(baseline), min(times)
    med_b, med_c = statistics.median(baseline), statistics.median(times)
    ratio, med_ratio = best_c / best_b, med_c / med_b
    per_run = ", ".join(f"{c['seconds'] / b:.2f}" for b, c in zip(baseline, cluster))
    mid = sorted(cluster, key=lambda c: c["seconds"])[len(cluster) // 2]

    def verdict(ok: bool) -> str:
        return "met" if ok else "**missed**"

    command = " ".join(["benchmarks/bench_e2e.py"] + sys.argv[1:])
    small_bytes = sum(s for rel, (s, _) in files.items() if not rel.startswith("big/"))
    lines = [
        f"### End to end, {args.small:,} small files + {args.big} x "
        f"{args.big_size / MiB:g} MiB, copies 2, 3 stores — {time.strftime('%Y-%m-%d')}",
        "",
        f"Command: `.venv/bin/python {command}` on {platform.machine()}, "
        f"{os.cpu_count()} cores, Python {platform.python_version()}; seed {args.seed}. "
        f"Source: {len(files):,} files, {total / MiB:,.0f} MiB ({args.small:,} files of "
        f"{args.small_min:,}..{args.small_max:,} B, {args.dist}-uniform, "
        f"{small_bytes / MiB:,.0f} MiB, over {args.folders} folders; {args.big} of "
        f"{args.big_size:,} B) on {args.fs or 'an unknown filesystem'}. Cluster: one "
        f"cbackup-server, three cbackup-clients (one store each, quota "
        f"{args.quota / MiB:,.0f} MiB), each host on its own 127.0.0.x; "
        + ", ".join(f"`{k}: {v}`" for k, v in OPTIONS.items() if k != "SECRET")
        + f", a SECRET. {len(baseline)} alternating runs, fresh destinations, warm cache, "
        f"disks idle before each, after {'an untimed rsync pair' if args.warmup else 'no warm-up'}"
        f"; {rsync_version()}.",
        "",
        "| figure | value | target |",
        "|---|---|---|",
        f"| outcome | every run: {COPIES} copies of every file on disk on distinct hosts, "
        f"bytes compared with the source ({min(c['copies'] for c in cluster):,}+ copies "
        f"checked per run) | two copies (met) |",
        f"| rsync pair (`rsync -a SRC/ store1/ && rsync -a SRC/ store2/`) | best "
        f"{best_b:.2f} s, median {med_b:.2f} s | |",
        f"| cluster: start of the processes to {COPIES} copies on disk | best {best_c:.2f} s, "
        f"median {med_c:.2f} s | |",
        f"| cluster / rsync pair, best / best | {ratio:.2f} | <= {TARGET} ({verdict(ratio <= TARGET)}) |",
        f"| cluster / rsync pair, median / median (per run: {per_run}) | {med_ratio:.2f} | "
        f"<= {TARGET} ({verdict(med_ratio <= TARGET)}) |",
    ]
    milestones = ["server log opened", "server listening", "first scan done",
                  "every store connected (inventory sent)", "first fetch started"]
    for name in milestones:
        lines.append(f"| median run ({mid['seconds']:.2f} s): {name} | {fmt_s(mid[name])} | |")
    lines.append(f"| median run: first copy on disk | {fmt_s(mid['first_copy'])} | |")
    lines.append(f"| median run: last copy on disk ({COPIES} of everything) | "
                 f"{fmt_s(mid['seconds'])} | |")
    runs, secs = mid["fetch rsyncs"]
    lines.append(f"| median run: fetch rsyncs (all stores) | {runs} runs, {secs:.2f} s | |")
    runs, secs = mid["check rsyncs"]
    lines.append(f"| median run: check rsyncs after fetches (all stores) | {runs} runs, "
                 f"{secs:.2f} s | |")
    lines.append(f"| median run: per store (mean of 3), from its first fetch to the end: "
                 f"fetching / neither fetching nor checking | {mid['store fetching']:.2f} s / "
                 f"{mid['store idle']:.2f} s | |")
    cpu = dict(mid["cpu"])
    polling = cpu.pop("this benchmark's polling")
    lines.append(f"| median run: CPU until {COPIES} copies | {sum(cpu.values()):.1f} s: "
                 + ", ".join(f"{k} {v:.1f} s" for k, v in cpu.items())
                 + f" (rsync pair: {statistics.median(baseline_cpu):.1f} s; this benchmark's "
                 f"polling {polling:.2f} s) | |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", type=int, default=10_000, help="small files")
    parser.add_argument("--small-min", type=parse_size, default=1024)
    parser.add_argument("--small-max", type=parse_size, default=64 * 1024)
    parser.add_argument("--dist", choices=("log", "uniform"), default="log",
                        help="small file sizes: log-uniform (default) or uniform")
    parser.add_argument("--folders", type=int, default=100)
    parser.add_argument("--big", type=int, default=4, help="big files")
    parser.add_argument("--big-size", type=parse_size, default=256 * MiB)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--dir", default=None, help="where to make the scratch folder")
    parser.add_argument("--timeout", type=float, default=600.0, help="per cluster run")
    parser.add_argument("--poll", type=float, default=0.2,
                        help="seconds between looks once 90%% of the files have their copies "
                        "(four times that before)")
    parser.add_argument("--no-warmup", dest="warmup", action="store_false",
                        help="skip the untimed rsync pair before the timed runs")
    parser.add_argument("--record", action="store_true")
    parser.add_argument("--profile", metavar="DIR",
                        help="run every process under cProfile, its stats saved in DIR "
                        "(slows them: figures are then not comparable)")
    args = parser.parse_args()
    if args.profile:
        args.profile = os.path.abspath(args.profile)
        os.makedirs(args.profile, exist_ok=True)

    # A TERM must clean up like Ctrl-C does (stop the processes, delete the data).
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    scratch = tempfile.mkdtemp(prefix="cbackup-bench-e2e-", dir=args.dir)
    args.fs = filesystem_of(os.path.realpath(scratch))
    if args.fs in ("tmpfs", "ramfs"):
        print(f"warning: {scratch} is on {args.fs}, not a disk", file=sys.stderr)
    try:
        src = os.path.join(scratch, "source")
        started = time.monotonic()
        files = make_data(src, seed=args.seed, small=args.small, small_min=args.small_min,
                          small_max=args.small_max, dist=args.dist, folders=args.folders,
                          big=args.big, big_size=args.big_size)
        total = sum(size for size, _ in files.values())
        args.quota = 2 * total + 64 * MiB
        read_all(src)
        print(f"data: {len(files):,} files, {total / MiB:,.0f} MiB in "
              f"{time.monotonic() - started:.1f}s, under {scratch} ({args.fs})", file=sys.stderr)
        if args.warmup:
            # Untimed: the first run on this machine met a fresher machine
            # than the later ones (rsync pairs of 6-12 s first, 14-20 s after).
            base = os.path.join(scratch, "warmup")
            seconds, _ = rsync_pair(src, base)
            shutil.rmtree(base)
            print(f"warm-up rsync pair (untimed): {seconds:.2f} s", file=sys.stderr)
        baseline: list[float] = []
        baseline_cpu: list[float] = []
        cluster: list[dict] = []
        for run in range(args.runs):
            base = os.path.join(scratch, f"rsync-{run}")
            seconds, cpu = rsync_pair(src, base)
            baseline.append(seconds)
            baseline_cpu.append(cpu)
            shutil.rmtree(base)
            print(f"run {run + 1}: rsync pair {baseline[-1]:.2f} s", file=sys.stderr)
            base = os.path.join(scratch, f"cluster-{run}")
            try:
                cluster.append(cluster_run(src, base, files, args.quota,
                                           timeout=args.timeout, interval=args.poll,
                                           profile=args.profile))
            except ClusterFailed as e:
                print(f"run {run + 1}: cluster FAILED: {e}", file=sys.stderr)
                print("| outcome | FAILED | two copies (**missed**) |")
                return 1
            finally:
                if os.environ.get("BENCH_E2E_KEEP_LOGS"):
                    keep = os.environ["BENCH_E2E_KEEP_LOGS"]
                    os.makedirs(keep, exist_ok=True)
                    for name in os.listdir(base):
                        if name.endswith(".log") or name.endswith(".stderr"):
                            shutil.copy(os.path.join(base, name),
                                        os.path.join(keep, f"run{run + 1}-{name}"))
                shutil.rmtree(base, ignore_errors=True)
            c = cluster[-1]
            print(f"run {run + 1}: cluster {c['seconds']:.2f} s "
                  f"({c['seconds'] / baseline[-1]:.2f} x); "
                  + ", ".join(f"{k} {fmt_s(c[k])}" for k in (
                      "server listening", "first scan done",
                      "every store connected (inventory sent)", "first fetch started")),
                  file=sys.stderr)
        text = report(args, files, baseline, baseline_cpu, cluster)
        print(text)
        if args.record:
            path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md")
            with open(path, "a") as f:
                f.write("\n" + text)
        return 0
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
