"""
A whole cluster on this machine for scenario tests: sources with generated
data, a config in the seed's line format, one C{cbackup-server} per source
host and one C{cbackup-client} per store host (real twistd processes on
127.0.0.x), and ground-truth checks that read the stores' folders.
"""

from __future__ import annotations

import filecmp
import os
import random
import subprocess
from collections import defaultdict
from typing import Collection, Optional

from twisted.internet import task
from twisted.internet import reactor

from cluster_backup.demo import make_tree
from cluster_backup.store import KEPT
from tests.harness import Twistd, free_port


def source_files(root: bytes) -> dict[bytes, tuple]:
    """relpath -> (kind, size, mtime) for every file and symlink under C{root}."""
    out = {}
    for folder, dirs, names in os.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            st = os.lstat(path)
            rel = os.path.relpath(path, root)
            out[rel] = ("link" if os.path.islink(path) else "file", st.st_size,
                        st.st_mtime_ns // 10**9)
    return out


def write_random(path: bytes, size: int, seed: int) -> None:
    """A file of C{size} bytes (whole MiB), each MiB other bytes, from C{seed}."""
    rnd = random.Random(seed)
    with open(path, "wb") as f:
        block = rnd.randbytes(1 << 20)
        for i in range(size >> 20):
            f.write(bytes([i % 251]) + block[1:])


def same_content(a: bytes, b: bytes) -> bool:
    if os.path.islink(a) or os.path.islink(b):
        return os.path.islink(a) and os.path.islink(b) and os.readlink(a) == os.readlink(b)
    try:
        return filecmp.cmp(a, b, shallow=False)
    except OSError:
        return False


def du(path: str) -> int:
    out = subprocess.run(["du", "-sb", path], capture_output=True, text=True)
    if out.returncode not in (0, 1):  # 1: a file vanished while counting
        raise AssertionError(out.stderr)
    return int(out.stdout.split()[0])


def inode_usage(path: str) -> int:
    """C{du -sb} counting every inode once, whatever its links or moves while walked."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for folder, dirs, names in os.walk(path):
        for name in [""] + dirs + names:
            try:
                st = os.lstat(os.path.join(folder, name) if name else folder)
            except OSError:
                continue
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_size
    return total


class LocalCluster:
    """Sources, stores and their processes; see the module docstring."""

    def __init__(self, base: str, sources: list[dict], stores: list[dict],
                 options: Optional[dict] = None):
        """
        C{sources}: dicts with C{host}, C{address}, C{copies}, C{files},
        C{big}, C{seed}, and optionally C{keys} (more keys of its block).
        C{stores}: dicts with C{host}, C{address}, C{name}, C{size}.
        """
        self.base = os.path.abspath(base)
        os.makedirs(self.base, exist_ok=True)
        self.sources = sources
        self.stores = stores
        self.port = free_port(sources[0]["address"])
        for s in sources:
            s["path"] = os.path.join(self.base, "src-" + s["host"])
            os.makedirs(s["path"])
            make_tree(os.fsencode(s["path"]), s.get("seed", 1), s["files"], s.get("big", 0))
        for st in stores:
            st["path"] = os.path.join(self.base, "store-" + st["name"])
        opts = {"PORT": self.port, "REPORT INTERVAL": "1s", "RESCAN": "2s",
                "DEAD AFTER": "60s", "SECRET": "cluster-test-secret"}
        opts.update(options or {})
        lines = [f"options: {k}: {v}" for k, v in opts.items()]
        for s in sources:
            lines += [f"server: {s['host']}:{s['path']}", f"copies: {s['copies']}",
                      f"address: {s['address']}"]
            lines += [f"{key}: {value}" for key, value in s.get("keys", {}).items()]
        for st in stores:
            lines += [f"backup: {st['host']}:{st['path']}", f"size: {st['size']}",
                      f"address: {st['address']}"]
        self.config = os.path.join(self.base, "cluster.conf")
        with open(self.config, "w") as f:
            f.write("\n".join(lines) + "\n")
        self.processes: list[Twistd] = []
        self.samples = 0
        self.max_used: dict[str, int] = defaultdict(int)
        self.violations: list[str] = []
        self.du_races = 0  # samples du counted a moving file twice in (see sample)
        self._sampler: Optional[task.LoopingCall] = None

    @classmethod
    def written(cls, base: str, config: str, sources: list[dict],
                stores: list[dict]) -> "LocalCluster":
        """
        The checks of a cluster whose config and sources a test wrote itself
        (as users write it): C{sources} with C{host}, C{path}, C{copies};
        C{stores} with C{host}, C{path}, C{name}, C{size_bytes}.  Its
        processes are the test's to start (append them to C{processes}).
        """
        self = cls.__new__(cls)
        self.base, self.config, self.sources, self.stores = base, config, sources, stores
        self.processes = []
        self.samples = 0
        self.max_used = defaultdict(int)
        self.violations = []
        self.du_races = 0
        self._sampler = None
        return self

    # --- processes --------------------------------------------------------

    def start(self, servers: Optional[list[str]] = None):
        """
        Start the servers (all, or the hosts named), then every client;
        returns a Deferred that fires once the servers listen.
        """
        from twisted.internet.defer import gatherResults

        hosts = sorted({s["host"] for s in self.sources}) if servers is None else servers
        waits = [self.start_server(host) for host in hosts]
        for host in sorted({st["host"] for st in self.stores}):
            self.processes.append(
                Twistd("cbackup-client", self.config, host, self.base).start())
        self.start_sampling()
        return gatherResults(waits, consumeErrors=True)

    def start_sampling(self) -> None:
        """Sample every store's usage twice a second (L{sample}) until L{stop}."""
        self._sampler = task.LoopingCall(self.sample)
        self._sampler.start(0.5)

    def start_server(self, host: str):
        """Start the server of C{host}; returns a Deferred that fires once it listens."""
        address = next(s["address"] for s in self.sources if s["host"] == host)
        t = Twistd("cbackup-server", self.config, host, self.base,
                   "--state-dir", os.path.join(self.base, "state-" + host)).start()
        self.processes.append(t)
        return t.wait_listening(address, self.port)

    def stop(self) -> None:
        if self._sampler is not None and self._sampler.running:
            self._sampler.stop()
        for t in self.processes:
            t.stop()

    def logs(self) -> str:
        return "\n".join(f"==== {t.plugin} {t.host}\n{t.log()[-6000:]}" for t in self.processes)

    def process(self, plugin: str, host: str) -> Twistd:
        return next(t for t in self.processes if t.plugin == plugin and t.host == host)

    # --- ground truth -----------------------------------------------------

    def sample(self) -> None:
        """
        One quota sample of every store (C{du -sb}), as the rules demand.
        C{du} is not atomic: a file renamed from a folder it has not read
        yet into one it has not read yet (rsync's temp file into the
        layout, a kept version into the update folder) is counted twice.
        So a sample over the quota is measured again counting each inode
        once, and only a second measure over the quota is a violation (two
        distinct files are two files however they are walked).
        """
        self.samples += 1
        for st in self.stores:
            if os.path.isdir(st["path"]):
                used = du(st["path"])
                if used > st["size_bytes"]:
                    again = inode_usage(st["path"])
                    if again > st["size_bytes"]:
                        self.violations.append(
                            f"{st['name']}: du -sb {used}, each inode once {again} "
                            f"> {st['size_bytes']}")
                    else:
                        self.du_races += 1
                        used = again
                self.max_used[st["name"]] = max(self.max_used[st["name"]], used)

    def copy_path(self, store: dict, source: dict, rel: bytes) -> bytes:
        return os.path.join(os.fsencode(store["path"]), os.fsencode(source["host"]),
                            os.fsencode(source["path"]).lstrip(b"/"), rel)

    def holders(self, source: dict, rel: bytes, check_bytes: bool = False,
                exclude_hosts: Collection[str] = ()) -> dict[str, int]:
        """
        store host -> how many of its stores hold a current copy of C{rel};
        the stores of C{exclude_hosts} (say, hosts gone for good) are not read.
        """
        src = os.path.join(os.fsencode(source["path"]), rel)
        want = os.lstat(src)
        found: dict[str, int] = defaultdict(int)
        for st in self.stores:
            if st["host"] in exclude_hosts:
                continue
            path = self.copy_path(st, source, rel)
            try:
                got = os.lstat(path)
            except OSError:
                continue
            if (got.st_size, got.st_mtime_ns // 10**9) != (want.st_size,
                                                           want.st_mtime_ns // 10**9):
                continue
            if check_bytes and not same_content(src, path):
                continue
            found[st["host"]] += 1
        return found

    def under_replicated(self, check_bytes: bool = False,
                         exclude_hosts: Collection[str] = ()) -> list[str]:
        """
        Files of every source with fewer than C{copies} current copies on
        distinct hosts, not counting the stores of C{exclude_hosts}.
        """
        short = []
        for s in self.sources:
            for rel in source_files(os.fsencode(s["path"])):
                hosts = self.holders(s, rel, check_bytes, exclude_hosts)
                if len(hosts) < s["copies"]:
                    short.append(f"{s['host']}:{os.fsdecode(rel)} has {len(hosts)}")
        return short

    def converge(self, timeout: float = 240, exclude_hosts=()):
        """
        A Deferred that fires once every file is at its copies (on hosts not
        in C{exclude_hosts}); fails with the files short and the logs.
        """
        from tests.harness import wait_for

        def short_and_logs(failure):
            failure.trap(AssertionError)
            short = self.under_replicated(exclude_hosts=exclude_hosts)
            raise AssertionError(f"{len(short)} files short, e.g. {short[:5]}\n{self.logs()}")

        d = wait_for(lambda: not self.under_replicated(exclude_hosts=exclude_hosts),
                     timeout=timeout, interval=1.0, what="every file at its copies")
        return d.addErrback(short_and_logs)

    def double_copies(self) -> list[str]:
        """Files held twice on one host (rule 2)."""
        doubles = []
        for s in self.sources:
            for rel in source_files(os.fsencode(s["path"])):
                for host, n in self.holders(s, rel).items():
                    if n > 1:
                        doubles.append(f"{host} holds {os.fsdecode(rel)} {n} times")
        return doubles

    def stray_files(self) -> list[str]:
        """Anything in a store outside the layout or its state folder."""
        stray = []
        layout = {os.path.join(os.fsencode(s["host"]), os.fsencode(s["path"]).lstrip(b"/"))
                  for s in self.sources}
        for st in self.stores:
            root = os.fsencode(st["path"])
            for folder, dirs, names in os.walk(root):
                rel = os.path.relpath(folder, root)
                if rel.split(b"/")[0] in (b".cbackup", KEPT):
                    continue  # the state folder; kept versions: see kept_holders
                for name in names:
                    path = os.path.relpath(os.path.join(folder, name), root)
                    if not any(path.startswith(prefix + b"/") for prefix in layout):
                        stray.append(f"{st['name']}: {os.fsdecode(path)}")
        return stray


def check_ground_truth(case, cluster: LocalCluster, exclude_hosts: Collection[str] = ()) -> dict:
    """
    What every scenario ends with, read from the stores' folders: every
    file of every source at its copies on distinct hosts (not counting
    C{exclude_hosts}) with the source's bytes, no host holding a file
    twice, nothing outside the layout, no quota sample over its quota.
    Asserts with C{case}; returns the figures.
    """
    files = sum(len(source_files(os.fsencode(s["path"]))) for s in cluster.sources)
    case.assertEqual(cluster.under_replicated(check_bytes=True, exclude_hosts=exclude_hosts),
                     [])
    case.assertEqual(cluster.double_copies(), [])
    case.assertEqual(cluster.stray_files(), [])
    cluster.sample()
    case.assertGreater(cluster.samples, 4)
    case.assertEqual(cluster.violations, [])
    if os.environ.get("CBACKUP_TEST_LOGS"):
        print(cluster.logs())
    return {"files_checked": files, "bytes_compared": sum(
        tree_bytes(s["path"]) * s["copies"] for s in cluster.sources),
        "quota_samples": cluster.samples, "quota_violations": len(cluster.violations),
        "du_counted_a_moving_file_twice": cluster.du_races}


def tree_bytes(path: str) -> int:
    """Bytes of the files and symlinks under C{path}."""
    return sum(size for kind, size, _ in source_files(os.fsencode(path)).values())


def kept_holders(cluster: LocalCluster, source: dict, rel: bytes, original: bytes) -> set[str]:
    """
    The store hosts that keep a superseded version of C{rel} (rule 7) in
    their kept versions folder with the bytes of the file C{original}.
    """
    want = os.lstat(original)
    version = b"%d.%d" % (want.st_mtime_ns // 10**9, want.st_size)
    found = set()
    for st in cluster.stores:
        path = os.path.join(os.fsencode(st["path"]), KEPT, version, os.fsencode(source["host"]),
                            os.fsencode(source["path"]).lstrip(b"/"), rel)
        if os.path.lexists(path) and same_content(original, path):
            found.add(st["host"])
    return found


def sleep(seconds: float):
    return task.deferLater(reactor, seconds, lambda: None)
