"""
The ledger and the planner together, on a cluster too tight to place a
file without a swap: greedy fill must not wait for it for good.

Three hosts back up one source wanting 2 copies.  A holds everything; B
holds the five small files g (at their 2 copies, so not droppable) and has
200 bytes free; C holds h and has 500 free.  The big file f (600 bytes) has
one copy and fits nowhere as things are.  It gets its second copy only if C
fills spare space with copies of g (surplus), so that B may drop its own
and take f in.  If fill waited while f is below its copies, nothing would
ever move.

The driver below plays each store's round the way the client does (needs
and whether fill waits, surplus, plan, drops, claims, reports) with the real L{Ledger} and
L{planner.plan} under a L{Clock}; it does not test the client itself.
"""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from cluster_backup.ledger import Ledger
from cluster_backup.planner import Held, plan
from cluster_backup.records import FileRecord

SOURCE = "src:/data"
SIZES = {b"f": 600, b"h": 100, **{b"g%d" % n: 100 for n in range(5)}}
QUOTAS = {"a:/s": 10_000, "b:/s": 700, "c:/s": 600}
START = {"a:/s": set(SIZES), "b:/s": {b"g%d" % n for n in range(5)}, "c:/s": {b"h"}}
ROUND = 60.0


class TightClusterTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.ledger = Ledger(SOURCE, 2, self.clock, {s: s[0] for s in QUOTAS},
                             report_interval=ROUND)
        self.ledger.scan_started()
        self.ledger.scan_batch([FileRecord(p, n, 1) for p, n in SIZES.items()])
        self.ledger.scan_finished(True)
        self.files = {s: set(held) for s, held in START.items()}
        for store, held in self.files.items():
            self.ledger.inventory_started(store)
            self.ledger.report(store, [FileRecord(p, SIZES[p], 1) for p in held])
            self.ledger.inventory_finished(store)

    def used(self, store):
        return sum(SIZES[p] for p in self.files[store])

    def round(self, store):
        ledger, quota = self.ledger, QUOTAS[store]
        needs, _ = ledger.needs(store, None, 100)
        surplus, _ = ledger.surplus(store, None, 100)
        held = [Held(SOURCE, n.path, n.size, n.copies, n.wanted) for n in surplus]
        p = plan(free=quota - self.used(store), quota=quota, needs=[(SOURCE, needs)],
                 cost=lambda source, path, size: size, now=self.clock.seconds(),
                 keep_deleted={}, held=held, hold_fill=ledger.fill_waits)
        if p.drops:
            gone = ledger.drop(store, [d.path for d in p.drops])
            self.files[store].difference_update(gone)
            ledger.report(store, removed=gone)
        for fill in (False, True):
            paths = [n.path for _, n in p.fetch if (n.copies >= n.wanted) == fill]
            granted = ledger.claim(store, paths, fill=fill) if paths else []
            self.files[store].update(granted)
            self.assertLessEqual(self.used(store), quota, store)
            ledger.report(store, [FileRecord(path, SIZES[path], 1) for path in granted])

    def copies(self, path):
        return sum(path in held for held in self.files.values())

    def test_the_big_file_gets_its_copies(self):
        self.assertEqual(self.copies(b"f"), 1)
        for _ in range(30):  # half an hour of rounds
            self.clock.advance(ROUND)
            for store in sorted(QUOTAS):
                self.round(store)
            if all(self.copies(p) >= 2 for p in SIZES):
                break
        self.assertEqual({p: self.copies(p) >= 2 for p in SIZES}, dict.fromkeys(SIZES, True))
        self.assertEqual(self.ledger.status().histogram.get(1), None)
        for store in QUOTAS:
            self.assertLessEqual(self.used(store), QUOTAS[store])
