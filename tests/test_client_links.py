"""
Servers are independent (DESIGN.md rule 9): an agent backing up the sources
of two servers, one of which stops answering, keeps renewing its lease with
the other on time and keeps fetching from it; the call to the hung server
times out and its connection is dropped.

Real L{Ledger}s behind real L{ServerProtocol}s, the agent's own link
protocols over iosim (one pump per server, so a server is "hung" by never
pumping its connection again), a real L{Store} in a temp folder and the fake
rsync reactor of L{tests.test_client}.
"""

from __future__ import annotations

import os

from twisted.test.iosim import connectedServerAndClient
from twisted.trial.unittest import SynchronousTestCase

from cluster_backup import client, links
from cluster_backup.config import loads
from cluster_backup.ledger import Ledger
from cluster_backup.responder import ServerProtocol
from tests.test_client import FakeRsyncReactor, record_of

INTERVAL = 10
DEAD_AFTER = 40


class HungServerTests(SynchronousTestCase):
    def setUp(self):
        base = os.path.abspath(self.mktemp())
        self.roots = {}
        lines = [f"options: REPORT INTERVAL: {INTERVAL}s", f"options: DEAD AFTER: {DEAD_AFTER}s"]
        # "hung" sorts first: a client that renews server by server in
        # order would wait on it before ever reaching "ok".
        for host in ("hung", "ok"):
            root = os.path.join(base, "src-" + host).encode()
            os.makedirs(root)
            for n in range(3):
                with open(os.path.join(root, b"f%d" % n), "wb") as f:
                    f.write(b"x" * 100)
            self.roots[host] = root
            lines += [f"server: {host}:{os.fsdecode(root)}", "copies: 1"]
        lines += [f"backup: st:{base}/store", "size: 10m"]
        os.makedirs(os.path.join(base, "store"))
        self.cluster = loads("\n".join(lines) + "\n")
        self.clock = FakeRsyncReactor(self.roots["ok"])
        self.agent = client.Agent(self.cluster, self.cluster.stores[0], "st", None,
                                  self.clock, set())
        self.agent.store.inventory(self.agent.sources)
        # No round while the sessions start (a session's end wakes the
        # agent): each test starts its own.
        self.agent._stopping = True
        self.ledgers, self.pumps = {}, {}
        for source in self.cluster.sources:
            ledger = Ledger(source.id, 1, self.clock, {"st:" + f"{base}/store": "st"},
                            report_interval=INTERVAL, dead_after=DEAD_AFTER)
            ledger.scan_started()
            ledger.scan_batch([record_of(self.roots[source.host], b"f%d" % n)
                               for n in range(3)])
            ledger.scan_finished(True)
            server = ServerProtocol(
                {source.id: ledger}, {self.agent.id: "st"}, None, source.host,
                lambda sid: ("127.0.0.1", 1, "module", "user", "password"), self.clock)
            link = self.agent.links[source.host]
            _, _, pump = connectedServerAndClient(
                lambda server=server: server, lambda link=link: links.LinkProtocol(link),
                clock=self.clock)
            self.ledgers[source.host] = ledger
            self.pumps[source.host] = pump
        # Both sessions (login and inventory) go through; the agent is live
        # on both servers.
        for _ in range(10):
            for pump in self.pumps.values():
                pump.flush()
        for host, link in self.agent.links.items():
            self.assertIsNotNone(link.proto, host)
        self.assertEqual(self.clock.alive(), [])
        self.agent._stopping = False

    def state(self, host: str) -> str:
        [st] = self.ledgers[host].store_status()
        return st.state

    def test_lease_with_the_other_server_is_renewed_on_time(self):
        timeout = links.call_timeout(INTERVAL)
        self.assertEqual(timeout, 30)
        hung_link = self.agent.links["hung"]
        # From now on the hung server's connection is never pumped again.
        for step in range(int(3 * DEAD_AFTER / INTERVAL)):
            self.clock.advance(INTERVAL)
            self.agent.renew()
            for _ in range(5):
                self.clock.advance(0)
                self.pumps["ok"].flush()
            [st] = self.ledgers["ok"].store_status()
            self.assertEqual(st.state, "live", step)
            self.assertLess(st.last_report_age, INTERVAL, step)
        # The renewal to the hung server timed out and its connection was
        # aborted (the loss reaches the link when the transport reports it).
        self.assertIs(self.pumps["hung"].client, hung_link.proto)
        self.assertTrue(hung_link.proto.transport.disconnecting)
        self.pumps["hung"].flush()
        self.assertIsNone(hung_link.proto)

    def test_call_timeout_bounds(self):
        self.assertEqual(links.call_timeout(0.5), links.CALL_TIMEOUT_MIN)
        self.assertEqual(links.call_timeout(10), 30)
        self.assertEqual(links.call_timeout(3600), links.CALL_TIMEOUT_MAX)

    def test_a_round_goes_on_without_the_hung_server(self):
        """Needs are asked of both at once; the hung one's answer is given up on."""
        for ledger in self.ledgers.values():
            self.assertFalse(ledger.safemode)
        self.agent.wake()
        for _ in range(5):
            self.clock.advance(0)
            self.pumps["ok"].flush()
        # Nothing moves until the hung server's call times out...
        self.assertEqual(self.clock.alive(), [])
        self.clock.advance(links.call_timeout(INTERVAL))
        for _ in range(5):
            self.clock.advance(0)
            self.pumps["ok"].flush()
        # ...then the round fetches the other server's files.
        [fetch] = self.clock.alive()
        self.assertEqual(sorted(fetch.paths), [b"f0", b"f1", b"f2"])
        self.assertIn(b"ok", fetch.args[-1].encode())
