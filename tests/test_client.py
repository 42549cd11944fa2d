"""
The client's L{Agent} without sockets or processes: a real L{Ledger} behind
a real L{ServerProtocol} over iosim, a L{Clock}, a real L{Store} in a temp
folder, and a fake rsync (L{FakeRsyncAgent}) that copies files as rsync
would, so the timing of rounds and the checks around transfers can be
driven step by step.
"""

from __future__ import annotations

import os
import shutil

from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.testing import MemoryReactorClock
from twisted.internet.task import Clock
from twisted.protocols import amp
from twisted.python.failure import Failure
from twisted.test.iosim import connectedServerAndClient
from twisted.trial.unittest import SynchronousTestCase

from cluster_backup import client, session, transfer
from cluster_backup.config import loads
from cluster_backup.ledger import Ledger
from cluster_backup.records import FileRecord
from cluster_backup.responder import ServerProtocol

REPORT_INTERVAL = 60


def record_of(root: bytes, rel: bytes) -> FileRecord:
    st = os.lstat(os.path.join(root, rel))
    return FileRecord(rel, st.st_size, st.st_mtime_ns // 10**9)


class FakeRsyncAgent(client.Agent):
    """
    An agent whose rsync runs are fakes: a fetch copies the files (bytes and
    mtime, as C{rsync -a}) from the source folder into the store; a check
    lists the files whose size or mtime differ between the two now.
    C{during_fetch(paths)} runs after a fetch copied and before it returns
    (a source file rewritten while rsync read it keeps the old mtime on its
    copy, which is what the copy with C{copy2} before the rewrite gives).
    """

    during_fetch = None

    def __init__(self, *args, source_root: bytes, **kwargs):
        super().__init__(*args, **kwargs)
        self.source_root = source_root
        self.runs: list[tuple[str, list]] = []

    async def _rsync(self, source, grant, paths, check=False):
        dest = self.store.source_dir(source.host, source.path)
        self.runs.append(("check" if check else "fetch", sorted(paths)))
        changed = []
        for path in paths:
            src, dst = os.path.join(self.source_root, path), os.path.join(dest, path)
            if check:
                try:
                    a, b = os.lstat(src), os.lstat(dst)
                except FileNotFoundError:
                    continue
                if (a.st_size, a.st_mtime_ns // 10**9) != (b.st_size, b.st_mtime_ns // 10**9):
                    changed.append(path)
            else:
                os.makedirs(os.path.dirname(dst), exist_ok=True)
                shutil.copy2(src, dst)
                changed.append(path)
        if not check and self.during_fetch is not None:
            self.during_fetch(paths)
        return transfer.TransferResult(0, "ok", changed, (), 0.01, 0)


class AgentHarness:
    """
    One source (host C{src}, C{copies}) with C{files} (name -> bytes), the
    stores C{stores} (host names, one store each) and an agent for the first
    one, logged in to the source's server over iosim.
    """

    def __init__(self, case: SynchronousTestCase, files: dict, stores=("h1", "h2"),
                 copies: int = 1):
        self.case = case
        base = os.path.abspath(case.mktemp())
        self.source_root = os.path.join(base, "source").encode()
        for rel, data in files.items():
            path = os.path.join(self.source_root, rel)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as f:
                f.write(data)
            os.utime(path, (1_600_000_000, 1_600_000_000))
        lines = [f"options: REPORT INTERVAL: {REPORT_INTERVAL}s",
                 f"server: src:{os.fsdecode(self.source_root)}", f"copies: {copies}"]
        for host in stores:
            lines += [f"backup: {host}:{base}/store-{host}", "size: 100m"]
        self.cluster = loads("\n".join(lines) + "\n")
        self.source = self.cluster.sources[0]
        self.clock = Clock()
        self.ledger = Ledger(self.source.id, copies, self.clock,
                             {s.id: s.host for s in self.cluster.stores},
                             report_interval=REPORT_INTERVAL)
        self.ledger.scan_started()
        self.ledger.scan_batch([record_of(self.source_root, rel)
                                for rel in files])
        self.ledger.scan_finished(True)
        server = ServerProtocol(
            {self.source.id: self.ledger}, {s.id: s.host for s in self.cluster.stores}, None,
            "src", lambda sid: ("127.0.0.1", 1, "module", "user", "password"), self.clock)
        self.proto, _, self.pump = connectedServerAndClient(lambda: server, amp.AMP,
                                                            clock=self.clock)
        config = self.cluster.stores[0]
        os.makedirs(config.path)
        self.agent = FakeRsyncAgent(self.cluster, config, config.host, None, self.clock, set(),
                                    source_root=self.source_root)
        self.agent.store.inventory(self.agent.sources)
        self.agent.store.clean_partials()
        self.ok(session.login(self.proto, config.host, None))
        self.ok(self.agent.send_inventory(self.proto, self.source))
        self.agent.links[self.source.host].proto = self.proto

    def ok(self, d: Deferred):
        d = Deferred.fromCoroutine(d) if not isinstance(d, Deferred) else d
        self.pump.flush()
        return self.case.successResultOf(d)

    def settle(self) -> None:
        """Let every pending call and answer go through, without time passing."""
        for _ in range(50):
            self.clock.advance(0)
            self.pump.flush()

    def next_round_in(self) -> float:
        """Seconds until the agent's next planned round."""
        planned = self.agent._next
        self.case.assertTrue(planned is not None and planned.active(), "no round planned")
        return round(planned.getTime() - self.clock.seconds(), 6)

    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)
        self.settle()

    def report_other_stores(self) -> None:
        """Every other store sends an (empty) inventory: safemode ends."""
        for st in self.cluster.stores[1:]:
            self.ledger.inventory_started(st.id)
            self.ledger.inventory_finished(st.id)

    def held(self) -> set[bytes]:
        return set(self.agent.store.files.get(self.source.id, {}))


FILES = {b"dir%d/file-%d.dat" % (i % 3, i): b"x" * (100 + i) for i in range(10)}


class SafemodeRetryTests(SynchronousTestCase):
    """A round that finds the server in safemode asks again soon, not after REPORT INTERVAL."""

    def test_retry_doubles_then_fetches_once_safemode_ends(self):
        h = AgentHarness(self, FILES)
        self.assertTrue(h.ledger.safemode)  # h2 has not reported
        h.agent.wake()
        h.settle()
        self.assertTrue(h.agent.in_safemode)
        self.assertEqual(h.next_round_in(), client.SAFEMODE_RETRY)
        h.advance(client.SAFEMODE_RETRY)
        self.assertEqual(h.next_round_in(), 2 * client.SAFEMODE_RETRY)
        self.assertEqual(h.agent.runs, [])

        h.report_other_stores()
        h.advance(2 * client.SAFEMODE_RETRY)
        self.assertFalse(h.agent.in_safemode)
        self.assertEqual(h.held(), set(FILES))
        self.assertEqual(h.next_round_in(), client.BUSY_PAUSE)
        # Nothing left to do: back to one round per report interval.
        h.advance(client.BUSY_PAUSE)
        self.assertEqual(h.next_round_in(), REPORT_INTERVAL)

    def test_retry_never_waits_longer_than_the_report_interval(self):
        h = AgentHarness(self, FILES)
        h.agent.wake()
        h.settle()
        pauses = []
        for _ in range(9):  # 243.5 s: safemode lasts at most 5 intervals, 300 s
            pauses.append(h.next_round_in())
            h.advance(pauses[-1])
        self.assertEqual(pauses, [0.5, 1, 2, 4, 8, 16, 32, 60, 60])
        self.assertTrue(h.agent.in_safemode)
        self.assertEqual(h.agent.runs, [])


class ReconnectDelayTests(SynchronousTestCase):
    def test_first_retry_is_quick_then_backs_off(self):
        low = [client.reconnect_delay(n, jitter=lambda: 0.0) for n in range(1, 30)]
        high = [client.reconnect_delay(n, jitter=lambda: 1.0) for n in range(1, 30)]
        self.assertEqual(low[0], client.RECONNECT_FIRST)
        self.assertLessEqual(high[0], 1.5 * client.RECONNECT_FIRST)
        self.assertEqual(low, sorted(low))
        self.assertAlmostEqual(low[1] / low[0], 1.5)
        self.assertEqual(low[-1], client.RECONNECT_MAX)
        self.assertEqual(high[-1], 1.5 * client.RECONNECT_MAX)
        self.assertEqual(client.reconnect_delay(10**6, jitter=lambda: 0.0), client.RECONNECT_MAX)

    def test_link_retries_a_refused_connection_quickly(self):
        """A client started before its server connects a fraction of a second after it listens."""
        cluster = loads("server: src:/data\ncopies: 1\naddress: 127.0.0.9\n"
                        "backup: st:" + os.path.abspath(self.mktemp()) + "\nsize: 1m\n")
        reactor = MemoryReactorClock()
        agent = client.Agent(cluster, cluster.stores[0], "st", None, reactor, set())
        service = agent.links["src"].service
        service.startService()
        self.addCleanup(service.stopService)
        self.assertEqual(len(reactor.tcpClients), 1)
        host, port, factory, _, _ = reactor.tcpClients[0]
        self.assertEqual((host, port), ("127.0.0.9", 5005))
        factory.clientConnectionFailed(reactor.connectors[0], Failure(ConnectionRefusedError()))
        reactor.advance(1.5 * client.RECONNECT_FIRST)
        self.assertEqual(len(reactor.tcpClients), 2)
