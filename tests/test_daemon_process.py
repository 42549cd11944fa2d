"""
The daemons' lives as a sysadmin meets them, with real C{twistd}
processes: a server that cannot listen exits non-zero within seconds,
hosts named by their IP address (no C{address:}, default state dirs) each
listen on their own address, and SIGHUP reloads the config of a live
cluster without losing or fetching again a copy.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import time

from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import TestCase

from cluster_backup.demo import MiB, can_connect, make_tree
from cluster_backup.server import STATE_ROOT
from tests import slow
from tests.cluster_harness import LocalCluster, check_ground_truth, sleep, tree_bytes
from tests.harness import Twistd, free_port, proc_cmdlines, wait_for


def _wait_exit(process: Twistd, timeout: float) -> float:
    """Seconds until C{process} exits; fails after C{timeout}."""
    started = time.monotonic()
    while process.popen.poll() is None:
        if time.monotonic() - started > timeout:
            raise AssertionError(f"{process.plugin} still running after {timeout}s:\n"
                                 f"{process.log()}")
        time.sleep(0.1)
    return time.monotonic() - started


@slow
class FatalStartTests(TestCase):
    """A server that cannot serve ends, non-zero, and says why."""

    timeout = 60

    def setUp(self):
        self.base = os.path.abspath(self.mktemp())
        os.makedirs(os.path.join(self.base, "src"))
        with open(os.path.join(self.base, "src", "f"), "wb") as f:
            f.write(b"x" * 100)
        self.port = free_port("127.0.0.2")
        self.config = os.path.join(self.base, "cluster.conf")
        with open(self.config, "w") as f:
            f.write(f"options: PORT: {self.port}\noptions: SECRET: s3cret-fatal\n"
                    f"server: srv:{self.base}/src\ncopies: 1\naddress: 127.0.0.2\n"
                    f"backup: st:{self.base}/store\nsize: 1g\naddress: 127.0.0.3\n")
        self.state = os.path.join(self.base, "state")

    def taken(self, port: int) -> socket.socket:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.2", port))
        sock.listen()
        self.addCleanup(sock.close)
        return sock

    def start_and_wait_exit(self) -> tuple[int, float, str]:
        server = Twistd("cbackup-server", self.config, "srv", self.base,
                        "--state-dir", self.state).start()
        self.addCleanup(server.stop)
        seconds = _wait_exit(server, 10)
        self.assertEqual([c for c in proc_cmdlines() if self.state in c], [],
                         "the server left its rsync daemon running")
        return server.popen.returncode, seconds, server.log()

    def test_port_taken(self):
        self.taken(self.port)
        code, seconds, log = self.start_and_wait_exit()
        self.assertNotEqual(code, 0, log)
        self.assertIn(f"cannot listen on 127.0.0.2:{self.port} (PORT): another process "
                      "listens there; exiting", log)
        self.assertNotIn("Traceback", log)

    def test_rsync_port_taken(self):
        self.taken(self.port + 1)
        code, seconds, log = self.start_and_wait_exit()
        self.assertNotEqual(code, 0, log)
        self.assertIn(f"127.0.0.2:{self.port + 1} (RSYNC PORT): another process", log)

    def test_state_dir_unwritable(self):
        with open(self.state, "w") as f:  # a file where the folder should be
            f.write("not a folder")
        code, seconds, log = self.start_and_wait_exit()
        self.assertNotEqual(code, 0, log)
        self.assertIn(f"state dir {self.state}", log)

    def test_client_store_unusable(self):
        """The client too: a store it cannot use ends it, non-zero, saying which."""
        with open(os.path.join(self.base, "store"), "w") as f:
            f.write("a file where the store's folder should be")
        client = Twistd("cbackup-client", self.config, "st", self.base).start()
        self.addCleanup(client.stop)
        _wait_exit(client, 10)
        self.assertNotEqual(client.popen.returncode, 0)
        self.assertIn(os.path.join(self.base, "store"), client.log())
        self.assertNotIn("Traceback", client.log())

    def test_address_not_ours(self):
        with open(self.config, "a") as f:
            f.write("server: far:/srv\naddress: 192.0.2.7\n")
        server = Twistd("cbackup-server", self.config, "far", self.base).start()
        self.addCleanup(server.stop)
        _wait_exit(server, 10)
        self.assertNotEqual(server.popen.returncode, 0)
        self.assertIn("192.0.2.7 is not an address of this machine", server.log())
        self.assertNotIn("Traceback", server.log())


@slow
class IPNamedHostsTests(TestCase):
    """
    The config most users write: hosts named by their IP address, no
    C{address:}, servers with their default state dirs.  Two servers on one
    machine each listen on their own address and keep their own state.
    """

    timeout = 300
    SERVERS = ("127.0.0.2", "127.0.0.3")

    @inlineCallbacks
    def test_two_servers_by_ip_converge(self):
        base = os.path.abspath(self.mktemp())
        port = free_port("127.0.0.2")
        lines = [f"options: PORT: {port}", "options: SECRET: ip-named-secret",
                 "options: REPORT INTERVAL: 1s", "options: RESCAN: 2s"]
        sources = []
        for n, ip in enumerate(self.SERVERS):
            path = os.path.join(base, f"src{n}")
            os.makedirs(path)
            make_tree(os.fsencode(path), n + 1, 150)
            lines += [f"server: {ip}:{path}", "copies: 2"]
            sources.append({"host": ip, "path": path, "copies": 2})
        stores = []
        for ip in ("127.0.0.4", "127.0.0.5"):
            path = os.path.join(base, "store-" + ip)
            lines += [f"backup: {ip}:{path}", "size: 200m"]
            stores.append({"host": ip, "path": path, "name": ip, "size_bytes": 200 * MiB})
        os.makedirs(base, exist_ok=True)
        config = os.path.join(base, "cluster.conf")
        with open(config, "w") as f:
            f.write("\n".join(lines) + "\n")
        for ip in self.SERVERS:
            state = os.path.join(STATE_ROOT, ip)
            if not os.path.exists(state):
                self.addCleanup(shutil.rmtree, state, True)
        cluster = LocalCluster.written(base, config, sources, stores)
        self.addCleanup(cluster.stop)
        cluster.start_sampling()
        for ip in self.SERVERS:  # no --state-dir: the default, one per host
            server = Twistd("cbackup-server", config, ip, base).start()
            cluster.processes.append(server)
            yield server.wait_listening(ip, port)
        for ip in ("127.0.0.4", "127.0.0.5"):
            cluster.processes.append(Twistd("cbackup-client", config, ip, base).start())
        # Each listens on its own address only, not on every interface.
        self.assertFalse(can_connect("127.0.0.9", port), "a server listens on 0.0.0.0")
        for ip in self.SERVERS:
            state = os.path.join(STATE_ROOT, ip)
            self.assertEqual(os.stat(state).st_mode & 0o777, 0o700)
            with open(os.path.join(state, "rsyncd", "rsyncd.conf")) as f:
                self.assertIn(f"address = {ip}\n", f.read())
        yield cluster.converge(180)
        for server in cluster.processes[:2]:
            self.assertTrue(server.running(), server.log())
            self.assertNotIn("rsync daemon (pid", server.log(),
                             "a server stopped the other's rsync daemon")
        check_ground_truth(self, cluster)


@slow
class ReloadTests(TestCase):
    """
    SIGHUP reloads the config: a new source on a running server and a new
    store on a running client join, with no copy lost or fetched again; a
    config that cannot apply live is refused and the old one stays.
    """

    timeout = 400

    def stored(self, cluster: LocalCluster) -> dict[bytes, tuple[int, int]]:
        """Every file in the stores' layouts -> (inode, mtime_ns)."""
        out = {}
        for st in cluster.stores:
            root = os.fsencode(st["path"])
            for folder, dirs, names in os.walk(root):
                dirs[:] = [d for d in dirs if d != b".cbackup"]
                for name in names:
                    path = os.path.join(folder, name)
                    s = os.lstat(path)
                    out[path] = (s.st_ino, s.st_mtime_ns)
        return out

    def hup(self, cluster: LocalCluster) -> None:
        for t in cluster.processes:
            t.signal(signal.SIGHUP)

    @inlineCallbacks
    def test_sighup_adds_a_source_and_a_store(self):
        base = os.path.abspath(self.mktemp())
        sources = [{"host": "h1", "address": "127.0.0.2", "copies": 2, "files": 200,
                    "seed": 1}]
        stores = [
            {"host": "h2", "address": "127.0.0.3", "name": "s2", "size": "400m",
             "size_bytes": 400 * MiB},
            {"host": "h3", "address": "127.0.0.4", "name": "s3", "size": "400m",
             "size_bytes": 400 * MiB},
        ]
        cluster = LocalCluster(base, sources, stores)
        self.addCleanup(cluster.stop)
        yield cluster.start()
        yield cluster.converge(120)
        before = self.stored(cluster)
        self.assertGreater(len(before), 400)
        original = open(cluster.config).read()

        # Refused live: a new PORT.  Every process logs why and goes on.
        with open(cluster.config, "w") as f:
            f.write(original.replace(f"PORT: {cluster.port}", f"PORT: {cluster.port + 7}"))
        self.hup(cluster)
        server = cluster.process("cbackup-server", "h1")
        yield wait_for(lambda: "reload refused" in server.log(), 20, what="the refusal")
        self.assertIn(f"PORT changed from {cluster.port} to {cluster.port + 7}", server.log())
        # And a config with a typo: refused, naming the line.
        with open(cluster.config, "w") as f:
            f.write(original + "copies: many\n")
        self.hup(cluster)
        yield wait_for(lambda: "is not a key of a backup: block" in server.log(), 20,
                       what="the typo's line")
        yield sleep(1)
        for t in cluster.processes:
            self.assertTrue(t.running(), f"{t.plugin} {t.host} ended:\n{t.log()}")
        self.assertTrue(can_connect("127.0.0.2", cluster.port))

        # A second source on h1, and a store on h2 beside s2 (whose room
        # is small, so h2's copies of the new source must go to the new
        # store).
        path = os.path.join(base, "src-h1-more")
        os.makedirs(path)
        make_tree(os.fsencode(path), 7, 40, big=6 * MiB)
        more = {"host": "h1", "address": "127.0.0.2", "copies": 2, "path": path}
        used = tree_bytes(sources[0]["path"])
        s2_size = used + 2 * MiB
        stores[0]["size_bytes"] = s2_size
        new_store = {"host": "h2", "address": "127.0.0.3", "name": "s2b",
                     "path": os.path.join(base, "store-s2b"), "size_bytes": 400 * MiB}
        text = original.replace("size: 400m\naddress: 127.0.0.3",
                                f"size: {s2_size}\naddress: 127.0.0.3", 1)
        text += (f"server: h1:{path}\ncopies: 2\naddress: 127.0.0.2\n"
                 f"backup: h2:{new_store['path']}\nsize: 400m\naddress: 127.0.0.3\n")
        with open(cluster.config, "w") as f:
            f.write(text)
        cluster.sources.append(more)
        cluster.stores.append(new_store)
        self.hup(cluster)
        yield wait_for(lambda: "cbackup-server: reloaded" in server.log(), 20,
                       what="the server's reload")
        yield cluster.converge(180)
        self.assertTrue(os.listdir(new_store["path"]))
        held_new = [p for p in self.stored(cluster) if p.startswith(
            os.fsencode(new_store["path"]))]
        self.assertTrue(held_new, "the new store holds nothing")
        # No copy lost or fetched again: every file held before is there,
        # the same inode with the same mtime.
        after = self.stored(cluster)
        moved = [p for p, v in before.items() if after.get(p) != v]
        self.assertEqual(moved, [], f"{len(moved)} copies lost or fetched again")
        for t in cluster.processes:
            self.assertTrue(t.running(), f"{t.plugin} {t.host} ended:\n{t.log()}")
        self.assertNotIn("Traceback", cluster.logs())
        check_ground_truth(self, cluster)
