"""
Tests for L{cluster_backup.client.Agent.round}: an agent with a real store
on a temporary folder, talking over iosim to a L{ServerProtocol} in front of
a real L{Ledger}, under a fake clock.  No rsync runs: the cases are ones
where nothing fits, or where the store only asks to drop.
"""

from __future__ import annotations

import os

from twisted.internet.defer import ensureDeferred
from twisted.internet.task import Clock
from twisted.protocols import amp
from twisted.test.iosim import connectedServerAndClient
from twisted.trial.unittest import SynchronousTestCase

from cluster_backup import client, session
from cluster_backup.config import Cluster, Options, Source, Store as StoreConfig
from cluster_backup.ledger import Ledger
from cluster_backup.records import FileRecord
from cluster_backup.responder import ServerProtocol
from cluster_backup.store import Store

SOURCE = Source("srv", "/data", copies=1)
MTIME = 1_700_000_000
BIG = 100_000  # every file the source offers
MINE = 200_000  # the one file the store may hold: a swap for it makes room for one BIG
RSYNC = ("srv", 5006, "data", "cbackup", "pw")


class CountingLedger:
    """A real L{Ledger}, counting the calls made to each of its methods."""

    def __init__(self, ledger: Ledger):
        self._ledger = ledger
        self.calls: dict[str, int] = {}

    def __getattr__(self, name):
        value = getattr(self._ledger, name)
        if not callable(value):
            return value

        def counted(*args, **kw):
            self.calls[name] = self.calls.get(name, 0) + 1
            return value(*args, **kw)
        return counted


class RoundTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        root = os.path.abspath(self.mktemp())
        os.mkdir(root)
        self.store_path = os.path.join(root, "store")
        me = StoreConfig("me", self.store_path, size=10**9)
        other = StoreConfig("other", "/backup", size=10**9)
        self.cluster = Cluster(Options(report_interval=60.0), (SOURCE,), (me, other))
        ledger = Ledger(SOURCE.id, SOURCE.copies, self.clock, {me.id: "me", other.id: "other"})
        ledger.scan_batch([FileRecord(b"f%d" % i, BIG, MTIME) for i in range(20)])
        ledger.scan_batch([FileRecord(b"mine", MINE, MTIME)])
        ledger.scan_finished(True)
        self.ledger = CountingLedger(ledger)
        self.other = other.id
        server = ServerProtocol({SOURCE.id: self.ledger}, {me.id: "me", other.id: "other"},
                                None, "srv", lambda source: RSYNC, self.clock)
        self.proto, _, self.pump = connectedServerAndClient(
            lambda: server, amp.AMP, clock=self.clock)
        self.store = Store(self.store_path, size=10**9)
        self.me = me

    def start(self, hold_mine: bool, free: int) -> client.Agent:
        """
        The agent, its store holding C{mine} or not, logged in and
        inventoried, with C{free} bytes free; the other store holds C{mine}.
        """
        if hold_mine:
            path = self.store.path_of(SOURCE.host, SOURCE.path, b"mine")
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as f:
                f.write(b"m" * MINE)
            os.utime(path, (MTIME, MTIME))
        agent = client.Agent(self.cluster, self.me, "me", None, self.clock, set(),
                             store=self.store)
        self.store.inventory(agent.sources)
        self.store.size = self.store.used + free
        self.store.refresh_quota()
        self.assertEqual(self.store.free, free)
        self.ok(session.login(self.proto, "me", None))
        agent.links["srv"].proto = self.proto
        self.ok(ensureDeferred(agent.send_inventory(self.proto, SOURCE)))
        ledger = self.ledger._ledger
        ledger.inventory_started(self.other)
        ledger.report(self.other, [FileRecord(b"mine", MINE, MTIME)])
        ledger.inventory_finished(self.other)
        self.assertFalse(ledger.safemode)
        return agent

    def ok(self, d):
        d = ensureDeferred(d) if not hasattr(d, "addCallback") else d
        self.pump.flush()
        return self.successResultOf(d)

    def round(self, agent) -> tuple[bool, dict]:
        """Run one round; returns its result and the ledger calls it made."""
        self.ledger.calls.clear()
        busy = self.ok(agent.round())
        return busy, dict(self.ledger.calls)

    def test_full_store_without_surplus_stops_asking_for_needs(self):
        """
        Nothing offered fits and nothing held may go: the next rounds ask
        for surplus only, until the store has room again or REASK_FULL
        report intervals passed.
        """
        agent = self.start(hold_mine=False, free=50_000)
        busy, calls = self.round(agent)
        self.assertFalse(busy)
        self.assertGreater(calls.get("needs", 0), 0)
        busy, calls = self.round(agent)
        self.assertFalse(busy)
        self.assertNotIn("needs", calls)
        self.assertGreater(calls.get("surplus", 0), 0)
        self.clock.advance(client.REASK_FULL * 60.0)
        busy, calls = self.round(agent)
        self.assertGreater(calls.get("needs", 0), 0)

    def test_full_store_asks_again_with_room(self):
        agent = self.start(hold_mine=False, free=50_000)
        self.round(agent)
        self.assertTrue(agent._full())
        self.store.size += BIG - 50_000
        self.store.refresh_quota()
        self.assertFalse(agent._full())

    def test_full_store_with_surplus_still_swaps(self):
        """
        A full store that holds a surplus copy asks for needs every round
        and asks to drop the copy for a file below its copies.
        """
        agent = self.start(hold_mine=True, free=30_000)
        # The first round learns that nothing offered fits (and swaps at once).
        busy, calls = self.round(agent)
        self.assertTrue(busy)
        self.assertEqual((calls.get("surplus", 0) > 0, calls.get("drop")), (True, 1))
        self.assertNotIn(b"mine", self.store.files.get(SOURCE.id, {}))
        self.assertFalse(agent._full())  # the drop made room for an offer

    def test_full_store_with_surplus_asks_needs(self):
        agent = self.start(hold_mine=True, free=30_000)
        agent._smallest_offer, agent._offers_at = BIG, self.clock.seconds()
        self.assertTrue(agent._full())
        busy, calls = self.round(agent)
        # Surplus first, then needs, then the drop for a file below copies.
        self.assertGreater(calls.get("surplus", 0), 0)
        self.assertGreater(calls.get("needs", 0), 0)
        self.assertEqual(calls.get("drop"), 1)
        self.assertTrue(busy)
