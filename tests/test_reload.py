"""
L{Server.reload} and L{Client.reload} on a memory reactor: what a new
config changes in a built daemon, what it keeps, and what it refuses.
The scenario with real processes is in C{test_daemon_process}.
"""

from __future__ import annotations

import os

from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from cluster_backup.client_service import Client
from cluster_backup.config import loads
from cluster_backup.server import Server
from cluster_backup.tapbase import reload_config


class Daemons(SynchronousTestCase):

    def setUp(self):
        self.base = os.path.abspath(self.mktemp())
        for name in ("a", "b", "s1", "s2", "s3"):
            os.makedirs(os.path.join(self.base, name))

    def config(self, *, port=7000, secret="first-secret", copies=2, sources=("a",),
               stores=("s1", "s2"), store_size="1g"):
        lines = [f"options: PORT: {port}", f"options: SECRET: {secret}"]
        for name in sources:
            lines += [f"server: h1:{self.base}/{name}", f"copies: {copies}",
                      "address: 127.0.0.2"]
        for n, name in enumerate(stores):
            lines += [f"backup: h{n + 2}:{self.base}/{name}", f"size: {store_size}",
                      f"address: 127.0.0.{n + 3}"]
        return loads("\n".join(lines) + "\n", filename="cluster.conf")

    def server(self, cluster):
        return Server(cluster, "h1", os.path.join(self.base, "state"), MemoryReactorClock())

    def source(self, name):
        return f"h1:{self.base}/{name}"

    def store(self, n, name):
        return f"h{n}:{self.base}/{name}"


class ServerReloadTests(Daemons):

    def test_a_new_source_and_store(self):
        server = self.server(self.config())
        ledger = server.ledgers[self.source("a")]
        self.assertIsNone(server.reload(self.config(sources=("a", "b"),
                                                    stores=("s1", "s2", "s3"))))
        self.assertIs(server.ledgers[self.source("a")], ledger, "the ledger was replaced")
        self.assertEqual(set(server.ledgers), {self.source("a"), self.source("b")})
        self.assertEqual({st.store for st in ledger.store_status()},
                         {self.store(2, "s1"), self.store(3, "s2"), self.store(4, "s3")})
        self.assertIn(self.store(4, "s3"), server.backs[self.source("b")])
        self.assertEqual(set(server.scanners), set(server.ledgers))
        # The rsync daemon serves the new source, with its password.
        self.assertEqual(server.daemon.endpoint(f"{self.base}/b")[2:4][1], "cbackup")

    def test_a_source_and_a_store_leave(self):
        server = self.server(self.config(sources=("a", "b")))
        self.assertIsNone(server.reload(self.config(sources=("a",), stores=("s1",))))
        self.assertEqual(set(server.ledgers), {self.source("a")})
        self.assertEqual(set(server.scanners), {self.source("a")})
        self.assertNotIn(self.source("b"), [s.name for s in server])
        ledger = server.ledgers[self.source("a")]
        self.assertEqual({st.store for st in ledger.store_status()}, {self.store(2, "s1")})
        with self.assertRaises(KeyError):
            server.daemon.endpoint(f"{self.base}/b")

    def test_copies_and_secret(self):
        server = self.server(self.config())
        old_password = server.daemon.endpoint(f"{self.base}/a")[4]
        self.assertIsNone(server.reload(self.config(copies=3, secret="second-secret")))
        self.assertEqual(server.ledgers[self.source("a")].copies, 3)
        self.assertEqual(server.factory._kwargs["secret"], b"second-secret")
        self.assertNotEqual(server.daemon.endpoint(f"{self.base}/a")[4], old_password)

    def test_refused_changes_keep_the_old_config(self):
        cluster = self.config()
        server = self.server(cluster)
        for new, why in [
                (self.config(port=7100), "PORT changed from 7000 to 7100"),
                (loads(f"server: h9:{self.base}/a\nbackup: h2:{self.base}/s1\nsize: 1g\n"),
                 "host h1 is not in the new config"),
                (self.config(sources=()), "host h1 is not in the new config")]:
            self.assertIn(why, server.reload(new))
            self.assertIs(server.cluster, cluster)
            self.assertEqual(set(server.ledgers), {self.source("a")})

    def test_reload_config_logs_and_keeps_on_a_bad_file(self):
        server = self.server(self.config())
        path = os.path.join(self.base, "bad.conf")
        with open(path, "w") as f:
            f.write("server: h1:/a\ncopies: many\n")
        self.assertFalse(reload_config(path, server, "cbackup-server"))
        self.assertEqual(set(server.ledgers), {self.source("a")})


class ClientReloadTests(Daemons):

    def client(self, cluster, host="h2"):
        return Client(cluster, host, MemoryReactorClock())

    def test_unchanged_agents_stay(self):
        client = self.client(self.config())
        (agent,) = client.agents
        self.assertIsNone(client.reload(self.config(stores=("s1", "s2", "s3"))))
        self.assertEqual(client.agents, [agent])

    def test_changed_agent_restarts_after_it_stopped(self):
        client = self.client(self.config())
        (agent,) = client.agents
        self.assertIsNone(client.reload(self.config(sources=("a", "b"))))
        (new,) = client.agents
        self.assertIsNot(new, agent)
        self.assertIsNone(agent.parent)
        self.assertEqual({s.id for s in new.sources}, {self.source("a"), self.source("b")})
        self.assertEqual(client.stopping, {})

    def test_store_quota_change_restarts_only_its_agent(self):
        client = self.client(self.config(), host="h2")
        (agent,) = client.agents
        self.assertIsNone(client.reload(self.config(store_size="2g")))
        self.assertEqual(client.agents[0].config.size, 2 * 2**30)

    def test_no_store_left_is_refused(self):
        client = self.client(self.config())
        (agent,) = client.agents
        self.assertIn("has no stores in the new config",
                      client.reload(self.config(stores=())))
        self.assertEqual(client.agents, [agent])


class LegacyStateDirTests(Daemons):
    """An upgraded server finds the accepted scans the shared default dir kept."""

    def test_baseline_read_from_the_old_dir(self):
        from cluster_backup import accepted
        old = os.path.join(self.base, "old-root")
        os.makedirs(old)
        accepted.save(old, {self.source("a"): (200, 5000), "other:/x": (1, 1)})
        server = Server(self.config(), "h1", os.path.join(self.base, "new"),
                        MemoryReactorClock(), legacy_state_dir=old)
        self.assertEqual(server.baseline, {self.source("a"): (200, 5000)})
        fresh = Server(self.config(), "h1", os.path.join(self.base, "new"),
                       MemoryReactorClock())
        self.assertEqual(fresh.baseline, {})
