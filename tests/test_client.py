"""
The client's L{Agent} without sockets or processes: a real L{Ledger} behind
a real L{ServerProtocol} over iosim, a real L{Store} in a temp folder, and
a fake process reactor (L{FakeRsyncReactor}: a L{Clock} whose rsync
children copy files as rsync would when the test lets them finish), so the
timing of rounds and the checks around transfers can be driven step by
step.
"""

from __future__ import annotations

import os
import shutil

from twisted.internet.defer import Deferred
from twisted.internet.error import (ConnectionRefusedError, ProcessDone,
                                    ProcessExitedAlready, ProcessTerminated)
from twisted.internet.testing import MemoryReactorClock
from twisted.internet.task import Clock
from twisted.protocols import amp
from twisted.python.failure import Failure
from twisted.test.iosim import connectedServerAndClient
from twisted.trial.unittest import SynchronousTestCase

from cluster_backup import client, links, session, transfer
from cluster_backup.config import loads
from cluster_backup.ledger import Ledger
from cluster_backup.records import FileRecord
from cluster_backup.responder import ServerProtocol

REPORT_INTERVAL = 60


def record_of(root: bytes, rel: bytes) -> FileRecord:
    st = os.lstat(os.path.join(root, rel))
    return FileRecord(rel, st.st_size, st.st_mtime_ns // 10**9)


class FakeRsync:
    """
    One rsync child, as L{FakeRsyncReactor} spawns it: its argv, the
    C{--files-from} list it read on stdin, and L{finish}, which does what
    rsync would (a fetch copies bytes and mtime, as C{rsync -a}; a dry run
    lists the files whose size or mtime differ) and prints its
    C{--out-format} lines, then exits 0.
    """

    pid = 4242

    def __init__(self, reactor, proto, args, source_root: bytes):
        self.reactor = reactor
        self.proto = proto
        self.args = args
        self.source_root = source_root
        self.stdin = b""
        self.stdin_closed = False
        self.signals: list[str] = []
        self.ended = False

    @property
    def kind(self) -> str:
        return "check" if "--dry-run" in self.args else "fetch"

    @property
    def paths(self) -> list[bytes]:
        return [p[2:] if p.startswith(b"./") else p for p in self.stdin.split(b"\0") if p]

    def write(self, data: bytes) -> None:
        assert not self.stdin_closed
        self.stdin += data

    def closeStdin(self) -> None:
        self.stdin_closed = True

    def signalProcess(self, name: str) -> None:
        if self.ended:
            raise ProcessExitedAlready()
        self.signals.append(name)
        self.end(ProcessTerminated(None, {"TERM": 15, "KILL": 9}[name]))

    def end(self, why) -> None:
        self.ended = True
        self.proto.processEnded(Failure(why))

    def finish(self) -> None:
        dest = os.fsencode(self.args[-1])
        for path in self.paths:
            src, dst = os.path.join(self.source_root, path), os.path.join(dest, path)
            a = os.lstat(src)
            if self.kind == "check":
                try:
                    b = os.lstat(dst)
                except FileNotFoundError:
                    b = None
                if b is not None and (a.st_size, a.st_mtime_ns // 10**9) == (
                        b.st_size, b.st_mtime_ns // 10**9):
                    continue
            else:
                os.makedirs(os.path.dirname(dst), exist_ok=True)
                shutil.copy2(src, dst)
            line = b">f+++++++++ %d %d " % (a.st_size, a.st_size) + transfer.escape(path)
            self.proto.childDataReceived(1, line + b"\n")
        self.end(ProcessDone(0))


class FakeRsyncReactor(MemoryReactorClock):
    """
    A L{MemoryReactorClock} (connections are only recorded) whose
    C{spawnProcess} starts a L{FakeRsync} (cf. procmon's DummyProcessReactor).
    """

    def __init__(self, source_root: bytes):
        super().__init__()
        self.source_root = source_root
        self.processes: list[FakeRsync] = []

    def spawnProcess(self, proto, executable, args, env=None, path=None, **kw):
        proc = FakeRsync(self, proto, args, self.source_root)
        self.processes.append(proc)
        proto.makeConnection(proc)
        return proc

    def alive(self) -> list[FakeRsync]:
        return [p for p in self.processes if not p.ended]


class AgentHarness:
    """
    One source (host C{src}, C{copies}) with C{files} (name -> bytes), the
    stores C{stores} (host names, one store each) and an agent for the first
    one, logged in to the source's server over iosim.
    """

    def __init__(self, case: SynchronousTestCase, files: dict, stores=("h1", "h2"),
                 copies: int = 1):
        self.case = case
        self.files = files
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
        self.clock = FakeRsyncReactor(self.source_root)
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
        self.agent = client.Agent(self.cluster, config, config.host, None, self.clock, set())
        self.agent.startService()  # inventory, links (connecting nowhere), lease
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

    def rescan(self) -> None:
        """The server scans the source again."""
        self.ledger.scan_started()
        self.ledger.scan_batch([record_of(self.source_root, rel) for rel in self.files])
        self.ledger.scan_finished(True)

    def report_other_stores(self) -> None:
        """Every other store sends an (empty) inventory: safemode ends."""
        for st in self.cluster.stores[1:]:
            self.ledger.inventory_started(st.id)
            self.ledger.inventory_finished(st.id)

    def held(self) -> set[bytes]:
        return set(self.agent.store.files.get(self.source.id, {}))

    def running(self) -> list[tuple[str, int]]:
        """(kind, number of paths) of each rsync running now."""
        return [(p.kind, len(p.paths)) for p in self.clock.alive()]

    def finish(self, kind: str) -> FakeRsync:
        """Let the running rsync of C{kind} finish, and what follows happen."""
        [proc] = [p for p in self.clock.alive() if p.kind == kind]
        proc.finish()
        self.settle()
        return proc

    def finish_all(self) -> None:
        while self.clock.alive():
            self.clock.alive()[0].finish()
            self.settle()

    def copies(self) -> dict[bytes, int]:
        """Path -> live copies (claims included) the ledger counts, as another store is told."""
        needs, _ = self.ledger.needs(self.cluster.stores[-1].id, None, 10_000)
        return {n.path: n.copies for n in needs}

    def reported(self) -> int:
        """Files the ledger counts as held by this agent's store."""
        [st] = [st for st in self.ledger.store_status() if st.store == self.agent.id]
        return st.files


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
        self.assertEqual(h.clock.processes, [])

        h.report_other_stores()
        h.advance(2 * client.SAFEMODE_RETRY)
        self.assertFalse(h.agent.in_safemode)
        self.assertEqual(h.running(), [("fetch", len(FILES))])
        h.finish_all()
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
        while pauses[-3:] != [REPORT_INTERVAL] * 3 and len(pauses) < 30:
            pauses.append(h.next_round_in())
            h.advance(pauses[-1])
        self.assertLess(sum(pauses), 5 * REPORT_INTERVAL)  # safemode lasts 5 intervals at most
        self.assertEqual(pauses[0], client.SAFEMODE_RETRY)
        self.assertEqual(pauses[1], 2 * client.SAFEMODE_RETRY)
        self.assertEqual(pauses, sorted(pauses))
        self.assertEqual(pauses[-3:], [REPORT_INTERVAL] * 3)
        self.assertTrue(h.agent.in_safemode)
        self.assertEqual(h.clock.processes, [])


class ReconnectDelayTests(SynchronousTestCase):
    def test_first_retry_is_quick_then_backs_off(self):
        low = [links.reconnect_delay(n, jitter=lambda: 0.0) for n in range(1, 30)]
        high = [links.reconnect_delay(n, jitter=lambda: 1.0) for n in range(1, 30)]
        self.assertEqual(low[0], links.RECONNECT_FIRST)
        self.assertLessEqual(high[0], 1.5 * links.RECONNECT_FIRST)
        self.assertEqual(low, sorted(low))
        self.assertAlmostEqual(low[1] / low[0], 1.5)
        self.assertEqual(low[-1], links.RECONNECT_MAX)
        self.assertEqual(high[-1], 1.5 * links.RECONNECT_MAX)
        self.assertEqual(links.reconnect_delay(10**6, jitter=lambda: 0.0), links.RECONNECT_MAX)

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
        reactor.advance(1.5 * links.RECONNECT_FIRST)
        self.assertEqual(len(reactor.tcpClients), 2)


class PipelinedCheckTests(SynchronousTestCase):
    """
    Each batch's check against the source (a dry-run rsync) and its report
    run while the next batch is fetched; a file rewritten during its
    transfer is still never counted.
    """

    def setUp(self):
        self.patch(client, "FILES_PER_BATCH", 4)
        self.h = AgentHarness(self, FILES, copies=2, stores=("h1", "h2", "h3"))

    def start(self) -> AgentHarness:
        self.h.report_other_stores()
        self.h.agent.wake()
        self.h.settle()
        return self.h

    def test_check_overlaps_the_next_fetch(self):
        h = self.start()
        self.assertEqual(h.running(), [("fetch", 4)])
        h.finish("fetch")
        # Batch 1 is checked while batch 2 is fetched.
        self.assertEqual(sorted(h.running()), [("check", 4), ("fetch", 4)])
        self.assertEqual(h.reported(), 0)
        h.finish("check")
        self.assertEqual(h.reported(), 4)  # reported while batch 2 is still in flight
        self.assertEqual(h.running(), [("fetch", 4)])
        h.finish("fetch")
        self.assertEqual(sorted(h.running()), [("check", 4), ("fetch", 2)])
        # A fetch that ends before the previous check waits for it: never two checks.
        h.finish("fetch")
        self.assertEqual(h.running(), [("check", 4)])
        h.finish("check")
        self.assertEqual(h.running(), [("check", 2)])
        h.finish("check")
        self.assertEqual(h.running(), [])
        self.assertEqual(h.reported(), 10)
        self.assertEqual(h.held(), set(FILES))
        self.assertEqual(set(h.copies().values()), {1})  # claims ended, holdings counted
        self.assertEqual(h.next_round_in(), client.BUSY_PAUSE)

    def test_last_check_of_a_round_overlaps_the_next_round(self):
        self.patch(client, "NEEDS_PER_ROUND", 4)
        h = self.start()
        self.assertEqual(h.running(), [("fetch", 4)])
        h.finish("fetch")
        self.assertEqual(h.running(), [("check", 4)])  # the round is over, its check is not
        h.advance(client.BUSY_PAUSE)
        # The next round's needs leave out the batch being checked (claimed).
        self.assertEqual(sorted(h.running()), [("check", 4), ("fetch", 4)])
        first, second = sorted(h.clock.alive(), key=lambda p: p.kind)
        self.assertFalse(set(first.paths) & set(second.paths))
        h.finish("check")
        self.assertEqual(h.reported(), 4)
        while h.clock.alive() or h.reported() < 10:
            if h.clock.alive():
                h.finish_all()
            else:
                h.advance(client.BUSY_PAUSE)
        self.assertEqual(h.held(), set(FILES))
        self.assertEqual(set(h.copies().values()), {1})
        # Nothing left, no check running: back to one round per report interval.
        h.advance(client.BUSY_PAUSE)
        self.assertEqual(h.next_round_in(), REPORT_INTERVAL)

    def test_file_rewritten_during_its_transfer_is_never_counted(self):
        h = self.start()
        fetch = h.finish("fetch")
        # The source file changes after rsync read it: its copy has the old
        # mtime and the old bytes; the source's mtime moved on.
        victim = fetch.paths[0]
        path = os.path.join(h.source_root, victim)
        with open(path, "wb") as f:
            f.write(b"rewritten while rsync read it")
        os.utime(path, (1_600_000_100, 1_600_000_100))
        h.finish("check")
        self.assertNotIn(victim, h.held())
        self.assertFalse(os.path.exists(h.agent.store.path_of("src", h.source.path, victim)))
        self.assertEqual(h.reported(), 3)
        h.finish_all()
        self.assertEqual(h.reported(), 9)
        self.assertEqual(h.copies()[victim], 0)  # not counted, its claim released
        # Once the server's scan knows the new version, the next round
        # fetches it, and that copy counts.
        h.rescan()
        h.advance(client.BUSY_PAUSE)
        self.assertEqual(h.running(), [("fetch", 1)])
        h.finish_all()
        self.assertIn(victim, h.held())
        self.assertEqual(h.reported(), 10)

    def test_stop_ends_both_rsyncs(self):
        h = self.start()
        h.finish("fetch")
        running = h.clock.alive()
        self.assertEqual(len(running), 2)
        d = h.agent.stopService()
        h.settle()
        self.assertEqual([p.signals for p in running], [["TERM"], ["TERM"]])
        self.successResultOf(d)
        self.assertEqual(h.clock.alive(), [])
        self.assertEqual(len(h.clock.processes), 3)  # no rsync started once stopping
        self.assertEqual(h.reported(), 0)  # the check was cut short: nothing vouched for


    def test_stop_between_rounds_ends_the_carried_check(self):
        self.patch(client, "NEEDS_PER_ROUND", 4)
        h = self.start()
        h.finish("fetch")
        [check] = h.clock.alive()
        self.assertEqual((check.kind, h.agent._running), ("check", None))
        d = h.agent.stopService()
        h.settle()
        self.assertEqual(check.signals, ["TERM"])
        self.successResultOf(d)
        self.assertEqual(h.reported(), 0)


class BatchOrderTests(SynchronousTestCase):
    def test_largest_first_within_a_rank(self):
        self.patch(client, "FILES_PER_BATCH", 4)
        files = {b"f%02d" % i: b"x" * (1000 * ((i * 7) % 10) + 1) for i in range(10)}
        h = AgentHarness(self, files, copies=2, stores=("h1", "h2", "h3"))
        # One file already has a copy elsewhere: rarer ones come first, whatever their size.
        big = max(files, key=lambda p: len(files[p]))
        h.report_other_stores()
        h.ledger.report(h.cluster.stores[1].id, [record_of(h.source_root, big)])
        h.agent.wake()
        h.settle()
        sizes = []
        while h.clock.alive():
            kinds = [p.kind for p in h.clock.alive()]
            proc = h.finish("fetch" if "fetch" in kinds else "check")
            if proc.kind == "fetch":
                sizes.append(sorted((len(files[p]) for p in proc.paths), reverse=True))
        rest = sorted((len(d) for p, d in files.items() if p != big), reverse=True)
        self.assertEqual(sizes, [rest[:4], rest[4:8], [len(files[big])] + rest[8:]])
