"""
C{cbackup demo}: a real cluster on this machine, start to finish.

Three sources and four stores on loopback addresses (127.0.0.x are all this
machine), each host a real C{twistd} process, sample data bigger than any
one store so placement matters.  It shows the copies climbing to their
targets, prints C{cbackup status}, restores one source and compares it byte
for byte with the original, then stops everything it started.

The pieces (sample data, process handling) are also what the scenario
tests use, so the demo and the tests exercise the same cluster.
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from typing import Optional, TextIO

MiB = 1 << 20
MARKER = ".cbackup-demo"


# --- sample data ---------------------------------------------------------

def make_tree(root: bytes, seed: int, files: int, big: int = 0, dirs: int = 30) -> None:
    """
    Fill C{root} with C{files} small files (1-64 KiB) in nested folders,
    names with spaces, a newline and non-UTF-8 bytes, a symlink, and one
    C{big}-byte file when C{big} is set.  Deterministic for a given seed.
    """
    rnd = random.Random(seed)
    folders = [b""]
    for i in range(dirs):
        parent = rnd.choice(folders)
        folders.append(os.path.join(parent, b"dir %d" % i) if parent else b"dir %d" % i)
    for folder in folders:
        os.makedirs(os.path.join(root, folder), exist_ok=True)
    for i in range(files):
        folder = rnd.choice(folders)
        with open(os.path.join(root, folder, b"file-%05d.dat" % i), "wb") as f:
            f.write(rnd.randbytes(rnd.randint(1024, 64 * 1024)))
    specials = {b"name with spaces.txt": b"spaces\n", b"new\nline": b"newline\n",
                b"caf\xe9-latin1": b"non-utf8\n"}
    for name, data in specials.items():
        with open(os.path.join(root, name), "wb") as f:
            f.write(data)
    os.symlink(b"name with spaces.txt", os.path.join(root, b"link-to-spaces"))
    if big:
        with open(os.path.join(root, b"big.bin"), "wb") as f:
            block = rnd.randbytes(MiB)
            for _ in range(big // MiB):
                f.write(block)


def free_port(address: str) -> int:
    """A port free on C{address}, with the next one free too (RSYNC PORT)."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind((address, 0))
            port = s.getsockname()[1]
        if port >= 65535:
            continue
        with socket.socket() as s:
            try:
                s.bind((address, port + 1))
            except OSError:
                continue
        return port
    raise RuntimeError(f"no free pair of ports on {address}")


def can_connect(address: str, port: int) -> bool:
    try:
        with socket.create_connection((address, port), timeout=0.5):
            return True
    except OSError:
        return False


# --- processes -------------------------------------------------------------

#: Where L{precise_log_observer} writes (set by L{Process} for its child).
LOG_FILE_ENV = "CBACKUP_LOG_FILE"
#: twistd's log line timestamps, with microseconds.
PRECISE_TIME_FORMAT = "%Y-%m-%dT%H:%M:%S.%f%z"


def precise_log_observer():
    """
    A twistd C{--logger}: the same text log as C{-l FILE}, but with
    microsecond timestamps and never rotated, into C{$CBACKUP_LOG_FILE}.
    For benchmarks, which time what happens inside the processes from their
    logs (twistd's own timestamps have whole seconds).
    """
    from twisted.logger import textFileLogObserver

    out = open(os.environ[LOG_FILE_ENV], "a", encoding="utf-8", errors="replace")
    return textFileLogObserver(out, timeFormat=PRECISE_TIME_FORMAT)


class Process:
    """
    One C{twistd -n PLUGIN} child, logging to a file; stopped with TERM, then
    KILL.  With C{precise_times} the log's timestamps have microseconds
    (L{precise_log_observer}); C{twistd_options} go to twistd itself (say,
    C{--profile}).
    """

    def __init__(self, plugin: str, config: str, host: str, workdir: str, *extra: str,
                 precise_times: bool = False, twistd_options: tuple = ()):
        self.plugin = plugin
        self.host = host
        self.logfile = os.path.join(workdir, f"{plugin}-{host}.log")
        twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
        logging = (["--logger=cluster_backup.demo.precise_log_observer"] if precise_times
                   else ["-l", self.logfile])
        self.argv = [twistd, "-n", "--pidfile=", *logging, *twistd_options, plugin,
                     "-c", config, "--host", host, *extra]
        self.env = dict(os.environ, **{LOG_FILE_ENV: self.logfile}) if precise_times else None
        self.workdir = workdir
        self.popen: Optional[subprocess.Popen] = None

    def start(self) -> "Process":
        self.popen = subprocess.Popen(
            self.argv, cwd=self.workdir, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=open(self.logfile + ".stderr", "wb"), env=self.env)
        return self

    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def log(self) -> str:
        text = ""
        for path in (self.logfile, self.logfile + ".stderr"):
            if os.path.exists(path):
                with open(path, errors="replace") as f:
                    text += f.read()
        return text

    def stop(self, timeout: float = 15.0) -> Optional[int]:
        if self.popen is None:
            return None
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        return self.popen.returncode


# --- the demo ---------------------------------------------------------------

SOURCES = [  # host, address, folder, copies, small files, big file, seed
    ("alpha", "127.0.0.2", "projects", 2, 1500, 20 * MiB, 1),
    ("beta", "127.0.0.3", "mail", 1, 800, 0, 2),
    ("beta", "127.0.0.3", "photos", 2, 300, 0, 3),
]
STORES = [  # host, address, name, quota
    ("store1", "127.0.0.4", "one", 64 * MiB),
    ("store2", "127.0.0.5", "two", 64 * MiB),
    ("store3", "127.0.0.6", "three-a", 40 * MiB),
    ("store3", "127.0.0.6", "three-b", 40 * MiB),
]


def cbackup(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cluster_backup.cli", *args],
                          capture_output=True, text=True)


def write_config(base: str, port: int, sources: dict) -> str:
    lines = ["# cluster-backup demo: every host is this machine, on 127.0.0.x",
             f"options: PORT: {port}", "options: SECRET: demo-only-secret",
             "options: REPORT INTERVAL: 2s", "options: RESCAN: 10s"]
    for host, address, folder, copies, *_ in SOURCES:
        lines += [f"server: {host}:{sources[folder]}", f"copies: {copies}",
                  f"address: {address}"]
    for host, address, name, quota in STORES:
        lines += [f"backup: {host}:{os.path.join(base, 'stores', name)}",
                  f"size: {quota // MiB}m", f"address: {address}"]
    path = os.path.join(base, "cluster.conf")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


def bar(done: int, total: int, width: int = 24) -> str:
    filled = width * done // total if total else width
    return "#" * filled + "." * (width - filled)


def progress_line(status: dict, elapsed: float) -> str:
    parts = []
    for s in status.get("sources", []):
        if not s.get("reachable"):
            parts.append(f"{os.path.basename(s['source'])}: unreachable")
            continue
        under = (s.get("under_replicated") or {}).get("files")
        if s.get("files") is None or under is None or s.get("safemode"):
            parts.append(f"{os.path.basename(s['source'])}: starting")
            continue
        at = s["files"] - under
        parts.append(f"{os.path.basename(s['source'])} x{s['copies']} "
                     f"[{bar(at, s['files'])}] {at}/{s['files']}")
    return f"{elapsed:5.1f}s  " + "   ".join(parts)


def same_tree(a: str, b: str) -> list[str]:
    """Differences between two trees: missing, extra or different files and links."""
    problems = []
    a_b, b_b = os.fsencode(a), os.fsencode(b)
    seen = set()
    for folder, dirs, names in os.walk(a_b):
        for name in names:
            pa = os.path.join(folder, name)
            rel = os.path.relpath(pa, a_b)
            seen.add(rel)
            pb = os.path.join(b_b, rel)
            if os.path.islink(pa):
                if not os.path.islink(pb) or os.readlink(pa) != os.readlink(pb):
                    problems.append(f"link differs: {os.fsdecode(rel)}")
            elif not os.path.isfile(pb) or not filecmp.cmp(pa, pb, shallow=False):
                problems.append(f"differs or missing: {os.fsdecode(rel)}")
    for folder, dirs, names in os.walk(b_b):
        for name in names:
            rel = os.path.relpath(os.path.join(folder, name), b_b)
            if rel not in seen:
                problems.append(f"extra: {os.fsdecode(rel)}")
    return problems


def run_demo(base: str, out: TextIO, timeout: float = 100.0) -> int:
    """The whole demo in C{base}; returns the exit code."""
    started = time.monotonic()
    base = os.path.abspath(base)
    if os.path.exists(base):
        if not os.path.exists(os.path.join(base, MARKER)):
            print(f"{base} exists and is not a demo folder; choose another --dir", file=out)
            return 2
        shutil.rmtree(base)
    os.makedirs(os.path.join(base, "stores"))
    open(os.path.join(base, MARKER), "w").close()

    def say(text: str = "") -> None:
        print(text, file=out, flush=True)

    say(f"== sample data in {base}")
    sources = {}
    for host, address, folder, copies, files, big, seed in SOURCES:
        sources[folder] = os.path.join(base, "sources", host, folder)
        os.makedirs(sources[folder])
        make_tree(os.fsencode(sources[folder]), seed, files, big)
        sizes = [os.lstat(os.path.join(d, n)).st_size
                 for d, _, ns in os.walk(sources[folder]) for n in ns]
        say(f"   {host}:{sources[folder]}  {len(sizes)} files, "
            f"{sum(sizes) / MiB:.0f} MiB, copies {copies}")
    config = write_config(base, free_port("127.0.0.2"), sources)
    say(f"== config {config}")
    check = cbackup("check", "-c", config)
    say("   " + "\n   ".join(check.stdout.strip().splitlines()))
    if check.returncode != 0:
        say(check.stderr)
        return 1

    processes = []
    try:
        say("== starting servers and clients (twistd -n cbackup-server / cbackup-client)")
        for host in dict.fromkeys(h for h, *_ in SOURCES):
            processes.append(Process("cbackup-server", config, host, base, "--state-dir",
                                     os.path.join(base, "state", host)).start())
        for host in dict.fromkeys(h for h, *_ in STORES):
            processes.append(Process("cbackup-client", config, host, base).start())
        say("== copies climbing to their targets")
        status: dict = {}
        code = 1
        while time.monotonic() - started < timeout:
            time.sleep(1.0)
            dead = [p for p in processes if not p.running()]
            if dead:
                say(f"!! {dead[0].plugin} {dead[0].host} exited:\n{dead[0].log()[-3000:]}")
                return 1
            result = cbackup("status", "-c", config, "--json", "--timeout", "3")
            try:
                status = json.loads(result.stdout)
            except ValueError:
                continue
            say("   " + progress_line(status, time.monotonic() - started))
            code = result.returncode
            if code == 0:
                break
        say("== cbackup status")
        final = cbackup("status", "-c", config)
        say(final.stdout.rstrip())
        if final.returncode != 0:
            say("!! the cluster did not reach its copies in time; logs are in " + base)
            return 1

        restored = os.path.join(base, "restored-projects")
        origin = f"alpha:{sources['projects']}"
        say(f"== cbackup restore --source {origin} --to {restored} --local")
        result = cbackup("restore", "-c", config, "--source", origin,
                         "--to", restored, "--local")
        if result.returncode != 0:
            say(result.stdout + result.stderr)
            return 1
        problems = same_tree(sources["projects"], restored)
        count = sum(len(ns) for _, _, ns in os.walk(restored))
        if problems:
            say(f"!! restore differs from the source: {problems[:10]}")
            return 1
        say(f"   restored {count} files; byte for byte identical to the source")
    finally:
        say("== stopping")
        for p in reversed(processes):
            p.stop()
    say(f"== done in {time.monotonic() - started:.0f}s; logs and stores in {base}")
    return 0


def cmd_demo(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    return run_demo(args.dir, out, args.timeout)


def register(sub) -> None:
    """Add C{cbackup demo} to the command's subparsers."""
    p = sub.add_parser(
        "demo", help="run a real cluster on this machine and restore from it",
        description="Run a real cluster on this machine: generate sources with awkward "
        "names on two source hosts and four stores on three backup hosts (one twistd "
        "process per host, on 127.0.0.2 to 127.0.0.6), show the copies climbing to "
        "their targets, run cbackup status, restore one source and compare it byte "
        "for byte, then stop every process.  The config, logs and stores stay in "
        "--dir.")
    p.add_argument("--dir", default="cbackup-demo",
                   help="working folder (replaced if it holds an earlier demo)")
    p.add_argument("--timeout", type=float, default=100.0,
                   help="seconds to wait for every copy")
    p.set_defaults(func=cmd_demo)
