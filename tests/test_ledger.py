"""
Tests for L{cluster_backup.ledger}: counting per host, need order, claims,
leases, safemode, versions, scans, refusals, and (with hypothesis) a model of
the whole ledger that every sequence of operations must agree with.
"""

from __future__ import annotations

from collections import Counter

from hypothesis import given, strategies as st
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from cluster_backup import ledger as ledger_module
from cluster_backup.ledger import (
    FIT_SLACK,
    BadCursor,
    Ledger,
    LedgerError,
    UnknownPath,
    UnknownStore,
)
from cluster_backup.records import FileRecord, ReportAnswer, bad_path, rank

SOURCE = "src:/data"
# Two stores on host "a", one on each of "b", "c" and "d".
STORES = {"a:/1": "a", "a:/2": "a", "b:/1": "b", "c:/1": "c", "d:/1": "d"}
INTERVAL = 60.0
DEAD = 3600.0
TTL = 300.0


def rec(path: bytes, size: int = 10, mtime: int = 1) -> FileRecord:
    return FileRecord(path, size, mtime)


def make(copies: int = 2, stores=STORES, files=(), safemode=False):
    """
    A ledger with a Clock, after one complete scan of C{files} (paths or
    records); out of safemode (every store inventoried, empty) unless
    C{safemode}.
    """
    clock = Clock()
    ledger = Ledger(
        SOURCE, copies, clock, stores,
        report_interval=INTERVAL, dead_after=DEAD, claim_ttl=TTL,
    )
    if files is not None:
        scan(ledger, files)
    if not safemode:
        for store in stores:
            ledger.inventory_started(store)
            ledger.inventory_finished(store)
    return ledger, clock


def scan(ledger, files, complete=True, error=None):
    ledger.scan_started()
    ledger.scan_batch([f if isinstance(f, FileRecord) else rec(f) for f in files])
    ledger.scan_finished(complete, error)


def needs_all(ledger, store, limit=10_000):
    needs, cursor = ledger.needs(store, None, limit)
    assert cursor is None
    return needs


def surplus_all(ledger, store, page=10_000):
    """Follow surplus() cursors to the end; every need it listed."""
    out, cursor = [], None
    while True:
        needs, cursor = ledger.surplus(store, cursor, page)
        out.extend(needs)
        if cursor is None:
            return out


def snapshot(ledger):
    """Everything observable, to show a refused call changed nothing."""
    return (
        ledger.status(),
        ledger.store_status(),
        {s: ledger.needs(s, None, 100) for s in STORES},
        {s: ledger.surplus(s, None, 100) for s in STORES},
    )


def audit(test, ledger):
    """
    The ledger's running tallies (tiers, low marks, per-tier totals, per-store
    files, bytes and claims), recomputed from its holder masks and claims:
    reports apply them in batches, and a batch that miscounts shows here.
    """
    ledger.status()  # expire claims and stores due by now
    live = ledger._live
    tiers = Counter()
    nbytes = Counter()
    held = Counter()
    held_bytes = Counter()
    lows = 0
    for i, path in enumerate(ledger._paths):
        if path is None:
            continue
        mask = ledger._holders[i]
        claims = ledger._claims.get(i, {})
        tier = ledger._hosts_in((mask & live) | sum(1 << s for s in claims))
        test.assertEqual(ledger._copies(i), tier, path)
        low = ledger._hosts_in(mask & live) < ledger.copies
        test.assertEqual(bool(ledger._low[i]), low, path)
        lows += low
        tiers[tier] += 1
        nbytes[tier] += ledger._size[i]
        for s in range(len(ledger._store_ids)):
            if mask >> s & 1:
                held[s] += 1
                held_bytes[s] += ledger._size[i]
    test.assertEqual(ledger._lows, lows)
    test.assertEqual(ledger._tally, {n: [tiers[n], nbytes[n]] for n in tiers})
    for s in range(len(ledger._store_ids)):
        test.assertEqual((ledger._held_files[s], ledger._held_bytes[s]),
                         (held[s], held_bytes[s]), ledger._store_ids[s])
        test.assertEqual(ledger._claimed[s],
                         {i for i, claims in ledger._claims.items() if s in claims},
                         ledger._store_ids[s])
    test.assertEqual(ledger._shared, {i for i, claims in ledger._claims.items() if len(claims) > 1})
    test.assertNotIn({}, list(ledger._claims.values()))


class CountingTests(SynchronousTestCase):
    """Copies are counted once per distinct host, at the current version."""

    def test_two_stores_on_one_host_are_one_copy(self):
        ledger, _ = make(files=[b"f"])
        ledger.report("a:/1", [rec(b"f")])
        ledger.report("a:/2", [rec(b"f")])
        self.assertEqual(ledger.status().histogram, {1: [1, 10]})
        ledger.report("b:/1", [rec(b"f")])
        self.assertEqual(ledger.status().histogram, {2: [1, 10]})

    def test_status_totals(self):
        ledger, _ = make(files=[rec(b"x", 5), rec(b"y", 7), rec(b"z", 11)])
        ledger.report("a:/1", [rec(b"x", 5), rec(b"y", 7)])
        ledger.report("b:/1", [rec(b"x", 5)])
        status = ledger.status()
        self.assertEqual((status.files, status.bytes), (3, 23))
        self.assertEqual(status.histogram, {0: [1, 11], 1: [1, 7], 2: [1, 5]})
        self.assertEqual((status.under_files, status.under_bytes), (2, 18))
        self.assertFalse(status.safemode)
        self.assertEqual(status.source, SOURCE)
        self.assertEqual(status.copies, 2)

    def test_files_too_big_for_their_copies_are_named(self):
        """
        A file larger than the copies-th largest host quota fits on fewer
        hosts than its copies need: status names it with the reason.
        Two stores of one host count as one host (the larger quota).
        """
        ledger, _ = make(copies=2, files=[rec(b"small", 10), rec(b"mid", 500),
                                          rec(b"huge", 5000), rec(b"caf\xe9", 900)])
        self.assertIsNone(ledger.status().too_big)  # no quota reported yet
        for store, quota in {"a:/1": 100, "a:/2": 6000, "b:/1": 800, "c:/1": 700}.items():
            ledger.report(store, used=0, quota=quota)
        self.assertEqual(ledger.status().too_big, {
            "files": 2, "bytes": 5900, "copies_room": 800,
            "examples": [["huge", 5000, 1], ["caf\udce9", 900, 1]]})
        ledger.report("d:/1", used=0, quota=5000)
        self.assertIsNone(ledger.status().too_big)

    def test_store_status_counts_current_holdings(self):
        ledger, clock = make(files=[rec(b"x", 5), rec(b"y", 7)])
        clock.advance(10)
        ledger.report("a:/1", [rec(b"x", 5), rec(b"y", 8)], used=100, quota=1000)
        clock.advance(5)
        by_store = {s.store: s for s in ledger.store_status()}
        a1 = by_store["a:/1"]
        self.assertEqual((a1.files, a1.bytes, a1.used, a1.quota), (1, 5, 100, 1000))
        self.assertEqual((a1.state, a1.last_report_age, a1.host), ("live", 5, "a"))


class NeedsTests(SynchronousTestCase):
    """Needs come rarest first, per-store shuffled, without the host's files."""

    def test_priority_order(self):
        stores = dict(STORES, **{"e:/1": "e"})
        paths = [b"zero", b"one", b"two", b"three"]
        ledger, _ = make(copies=3, stores=stores, files=paths)
        ledger.report("a:/1", [rec(b"one"), rec(b"two"), rec(b"three")])
        ledger.report("b:/1", [rec(b"two"), rec(b"three")])
        ledger.report("c:/1", [rec(b"three")])
        needs = needs_all(ledger, "e:/1")
        self.assertEqual([n.path for n in needs], paths)
        self.assertEqual([n.copies for n in needs], [0, 1, 2, 3])
        self.assertEqual({n.wanted for n in needs}, {3})

    def test_surplus_after_under_replicated(self):
        files = [b"f%d" % n for n in range(20)]
        ledger, _ = make(copies=1, files=files)
        ledger.report("b:/1", [rec(p) for p in files[:10]])
        needs = needs_all(ledger, "c:/1")
        self.assertEqual({n.path for n in needs[:10]}, set(files[10:]))
        self.assertEqual({n.path for n in needs[10:]}, set(files[:10]))
        ranks = [rank(n.copies, n.wanted) for n in needs]
        self.assertEqual(ranks, sorted(ranks))

    def test_order_differs_per_store_and_is_stable(self):
        files = [b"dir/file%04d" % n for n in range(300)]
        ledger, _ = make(files=files)
        b = [n.path for n in needs_all(ledger, "b:/1")]
        c = [n.path for n in needs_all(ledger, "c:/1")]
        self.assertEqual(sorted(b), sorted(files))
        self.assertEqual(sorted(c), sorted(files))
        self.assertNotEqual(b[:10], c[:10])
        self.assertEqual(b, [n.path for n in needs_all(ledger, "b:/1")])

    def test_paging_covers_everything_once(self):
        files = [b"p%03d" % n for n in range(100)]
        ledger, _ = make(files=files)
        ledger.report("b:/1", [rec(p) for p in files[:30]])
        seen, cursor, pages = [], None, 0
        while True:
            page, cursor = ledger.needs("c:/1", cursor, 7)
            self.assertLessEqual(len(page), 7)
            seen.extend(n.path for n in page)
            pages += 1
            if cursor is None:
                break
        self.assertEqual(sorted(seen), files)
        self.assertEqual(len(seen), len(set(seen)))
        self.assertEqual(seen, [n.path for n in needs_all(ledger, "c:/1")])
        self.assertGreater(pages, 10)

    def test_excludes_what_the_host_holds(self):
        ledger, _ = make(files=[b"f", b"g"])
        ledger.report("a:/1", [rec(b"f")])
        self.assertEqual([n.path for n in needs_all(ledger, "a:/2")], [b"g"])
        self.assertEqual({n.path for n in needs_all(ledger, "b:/1")}, {b"f", b"g"})

    def test_excludes_what_the_host_claims(self):
        ledger, _ = make(files=[b"f", b"g"])
        self.assertEqual(ledger.claim("a:/1", [b"f"]), [b"f"])
        self.assertEqual([n.path for n in needs_all(ledger, "a:/2")], [b"g"])
        copies = {n.path: n.copies for n in needs_all(ledger, "b:/1")}
        self.assertEqual(copies, {b"f": 1, b"g": 0})

    def test_bad_cursor(self):
        ledger, _ = make(files=[b"f"])
        self.assertRaises(BadCursor, ledger.needs, "b:/1", b"nonsense", 10)
        self.assertTrue(issubclass(BadCursor, LedgerError))


class ClaimTests(SynchronousTestCase):
    """A claim counts as a copy on the claimer's host for claim_ttl."""

    def test_claim_counts_as_copy_not_in_histogram(self):
        ledger, _ = make(copies=1, files=[b"f", b"g"])
        self.assertEqual(ledger.claim("b:/1", [b"f"]), [b"f"])
        self.assertEqual({n.path: n.copies for n in needs_all(ledger, "c:/1")},
                         {b"g": 0, b"f": 1})
        # A copy for the purpose of claims: f has enough while g does not.
        self.assertEqual(ledger.claim("c:/1", [b"f"]), [])
        self.assertEqual(ledger.status().histogram, {0: [2, 20]})
        claims = {s.store: s.claims for s in ledger.store_status()}
        self.assertEqual(claims["b:/1"], 1)

    def test_claim_expires(self):
        ledger, clock = make(copies=1, files=[b"f", b"g"])
        ledger.claim("b:/1", [b"f"])
        clock.advance(TTL - 1)
        self.assertEqual(ledger.claim("c:/1", [b"f"]), [])
        clock.advance(1)
        self.assertEqual(ledger.claim("c:/1", [b"f"]), [b"f"])
        claims = {s.store: s.claims for s in ledger.store_status()}
        self.assertEqual((claims["b:/1"], claims["c:/1"]), (0, 1))

    def test_reclaim_renews(self):
        ledger, clock = make(copies=1, files=[b"f", b"g"])
        ledger.claim("b:/1", [b"f"])
        clock.advance(TTL - 1)
        self.assertEqual(ledger.claim("b:/1", [b"f"]), [b"f"])
        clock.advance(TTL - 1)
        self.assertEqual(ledger.claim("c:/1", [b"f"]), [])
        self.assertEqual({n.path: n.copies for n in needs_all(ledger, "c:/1")},
                         {b"g": 0, b"f": 1})

    def test_refused_when_host_holds_or_claims(self):
        ledger, _ = make(files=[b"f", b"g"])
        ledger.report("a:/1", [rec(b"f")])
        self.assertEqual(ledger.claim("a:/2", [b"f"]), [])
        ledger.claim("a:/1", [b"g"])
        self.assertEqual(ledger.claim("a:/2", [b"g"]), [])
        self.assertEqual(ledger.claim("b:/1", [b"f", b"g"]), [b"f", b"g"])

    def test_greedy_fill_only_when_nothing_is_under(self):
        ledger, _ = make(copies=1, files=[b"f", b"g"])
        for store in STORES:  # every store has room for g
            ledger.report(store, used=0, quota=100 * FIT_SLACK)
        ledger.report("b:/1", [rec(b"f")])
        self.assertEqual(ledger.claim("c:/1", [b"f"], fill=True), [])
        # g's claim makes it count as a copy, but fill waits for the copy itself.
        self.assertEqual(ledger.claim("d:/1", [b"g"]), [b"g"])
        self.assertEqual(ledger.claim("c:/1", [b"f"], fill=True), [])
        ledger.report("d:/1", [rec(b"g")])
        self.assertEqual(ledger.claim("c:/1", [b"f"], fill=True), [b"f"])
        # c is fetching f: a second store's fill of it waits for c's copy.
        self.assertEqual(ledger.claim("a:/1", [b"f"], fill=True), [])
        ledger.report("c:/1", [rec(b"f")])
        self.assertEqual(ledger.claim("a:/1", [b"f"], fill=True), [b"f"])
        # A holder dying makes g low again: no more fill meanwhile.
        ledger.drop("d:/1", [b"g"])  # refused: the only copy
        ledger.report("d:/1", removed=[b"g"])
        self.assertEqual(ledger.claim("c:/1", [b"g"]), [b"g"])  # a need again
        self.assertEqual(ledger.claim("a:/2", [b"g"], fill=True), [])

    def test_greedy_fill_waits_only_while_a_low_file_can_be_placed(self):
        """
        The fill rule: fill waits while a file below its copies is being
        fetched or fits in the free room of a live store on a host without
        a copy of it.  When it fits nowhere, fill starts at once (no
        timer): a copy filled here is the surplus a full store elsewhere
        may drop to take the rare file in.
        """
        big = 8 * FIT_SLACK
        ledger, clock = make(copies=2, files=[rec(b"f", big), rec(b"g")])
        room = {"a:/1": 0, "a:/2": 0, "b:/1": 0, "c:/1": 2 * big, "d:/1": 0}
        for store, free in room.items():
            ledger.report(store, used=10 * big - free, quota=10 * big)
        ledger.report("a:/1", [rec(b"f", big), rec(b"g")])
        ledger.report("b:/1", [rec(b"g")])  # f is below its copies, g at them
        # c has room for f: fill waits for c to take it.
        self.assertTrue(ledger.fill_waits)
        self.assertEqual(ledger.claim("d:/1", [b"g"], fill=True), [])
        # c fills up with something else: f fits nowhere, fill starts now.
        ledger.report("c:/1", used=10 * big - big // 2)
        self.assertFalse(ledger.fill_waits)
        self.assertEqual(ledger.claim("d:/1", [b"g"], fill=True), [b"g"])
        ledger.release("d:/1", [b"g"])
        # Room on a's host does not count: a holds f already.
        ledger.report("a:/2", used=0)
        self.assertFalse(ledger.fill_waits)
        # b makes room (it dropped g, say): fill waits again, and while
        # b fetches f it goes on waiting, room or not.
        ledger.report("b:/1", used=0)
        self.assertTrue(ledger.fill_waits)
        self.assertEqual(ledger.claim("b:/1", [b"f"]), [b"f"])
        ledger.report("b:/1", used=10 * big)
        self.assertTrue(ledger.fill_waits)
        self.assertEqual(ledger.claim("d:/1", [b"g"], fill=True), [])
        # f gets its copies: nothing is below copies, nothing waits.
        ledger.report("b:/1", [rec(b"f", big)])
        self.assertFalse(ledger.fill_waits)

    def test_room_no_store_uses_starts_fill_after_the_backstop(self):
        """
        A store whose report shows room for a low file but that never
        claims it (it sees less room than it said) does not hold fill for
        ever: after C{stuck_after} (the claim ttl here) with no claim on a
        low file, fill goes on.  A store that never reported its usage is
        no place for a file.
        """
        ledger, clock = make(copies=2, files=[b"f", b"g"])
        ledger.report("a:/1", [rec(b"f"), rec(b"g")])
        ledger.report("b:/1", [rec(b"g")])
        self.assertFalse(ledger.fill_waits)  # no store said how full it is
        ledger.report("c:/1", used=0, quota=100 * FIT_SLACK)
        clock.advance(TTL - 1)
        self.assertTrue(ledger.fill_waits)
        self.assertEqual(ledger.claim("d:/1", [b"g"], fill=True), [])
        clock.advance(1)
        self.assertFalse(ledger.fill_waits)
        self.assertEqual(ledger.claim("d:/1", [b"g"], fill=True), [b"g"])
        ledger.release("d:/1", [b"g"])
        # Somebody fetching f: fill waits again, as long as the claim is renewed.
        self.assertEqual(ledger.claim("c:/1", [b"f"]), [b"f"])
        self.assertTrue(ledger.fill_waits)
        clock.advance(TTL - 1)
        self.assertEqual(ledger.claim("c:/1", [b"f"]), [b"f"])  # renewed
        clock.advance(TTL - 1)
        self.assertEqual(ledger.claim("d:/1", [b"g"], fill=True), [])

    def test_a_need_is_granted_only_while_below_copies(self):
        """A need others claimed meanwhile is refused, even once nothing is under."""
        ledger, _ = make(copies=2, files=[b"f", b"g"])
        ledger.report("a:/1", [rec(b"f"), rec(b"g")])
        self.assertEqual(ledger.needs("c:/1", None, 10)[0][0].copies, 1)  # offered as a need
        self.assertEqual(ledger.claim("b:/1", [b"f", b"g"]), [b"f", b"g"])
        # f and g are at 2 copies (a's holding, b's claim): c's need went stale.
        self.assertEqual(ledger.claim("c:/1", [b"f"]), [])
        # As fill it waits until b's copies are there.
        self.assertEqual(ledger.claim("c:/1", [b"f"], fill=True), [])
        ledger.report("b:/1", [rec(b"f"), rec(b"g")])
        self.assertEqual(ledger.claim("c:/1", [b"f"], fill=True), [b"f"])
        # Renewing one's own claim needs no flag.
        self.assertEqual(ledger.claim("c:/1", [b"f"]), [b"f"])

    def test_release(self):
        ledger, _ = make(copies=1, files=[b"f", b"g"])
        ledger.claim("b:/1", [b"f"])
        ledger.release("b:/1", [b"f", b"g"])
        self.assertEqual(ledger.claim("c:/1", [b"f"]), [b"f"])
        self.assertEqual({s.store: s.claims for s in ledger.store_status()}["b:/1"], 0)

    def test_holding_ends_the_claim(self):
        ledger, clock = make(copies=2, files=[b"f"])
        ledger.claim("b:/1", [b"f"])
        ledger.report("b:/1", [rec(b"f")])
        self.assertEqual({s.store: s.claims for s in ledger.store_status()}["b:/1"], 0)
        clock.advance(TTL)
        self.assertEqual(ledger.status().histogram, {1: [1, 10]})


class LeaseTests(SynchronousTestCase):
    """Silent stores go stale, then dead; dead stores' copies stop counting."""

    def test_states(self):
        ledger, clock = make(files=[b"f"], safemode=True)
        self.assertEqual({s.state for s in ledger.store_status()}, {"new"})
        ledger.report("b:/1", [rec(b"f")])
        clock.advance(3 * INTERVAL - 1)
        states = {s.store: s.state for s in ledger.store_status()}
        self.assertEqual((states["b:/1"], states["c:/1"]), ("live", "new"))
        clock.advance(1)
        self.assertEqual({s.store: s.state for s in ledger.store_status()}["b:/1"], "stale")
        self.assertEqual(ledger.status().histogram, {1: [1, 10]})
        clock.advance(DEAD - 3 * INTERVAL)
        self.assertEqual({s.store: s.state for s in ledger.store_status()}["b:/1"], "dead")

    def test_dead_copies_stop_counting_and_come_back(self):
        ledger, clock = make(copies=1, files=[b"f", b"g"])
        ledger.report("b:/1", [rec(b"f"), rec(b"g")])
        ledger.report("c:/1", [rec(b"g")])
        self.assertEqual({n.path: n.copies for n in needs_all(ledger, "d:/1")},
                         {b"f": 1, b"g": 2})
        clock.advance(DEAD - 1)
        ledger.report("c:/1")
        clock.advance(1)
        self.assertEqual(ledger.status().histogram, {0: [1, 10], 1: [1, 10]})
        self.assertEqual([(n.path, n.copies) for n in needs_all(ledger, "d:/1")],
                         [(b"f", 0), (b"g", 1)])
        ledger.report("b:/1")
        self.assertEqual(ledger.status().histogram, {1: [1, 10], 2: [1, 10]})


class HeartbeatTests(SynchronousTestCase):
    """
    With a heartbeat, time the ledger's owner was not running (a gap of more
    than two heartbeats between calls) is nobody's silence: it moves leases,
    claims and the safemode timer on instead of killing every store.
    """

    BEAT = 1.0

    def make(self, **kw):
        clock = Clock()
        ledger = Ledger(SOURCE, 1, clock, STORES, report_interval=INTERVAL,
                        dead_after=DEAD, claim_ttl=TTL, heartbeat=self.BEAT, **kw)
        scan(ledger, [b"f", b"g"])
        return ledger, clock

    def ready(self):
        ledger, clock = self.make()
        for store in STORES:
            ledger.inventory_started(store)
            ledger.inventory_finished(store)
        ledger.report("b:/1", [rec(b"f")])
        return ledger, clock

    def beat_for(self, ledger, clock, seconds):
        for _ in range(int(seconds / self.BEAT)):
            clock.advance(self.BEAT)
            ledger.beat()

    def test_pause_longer_than_dead_after_kills_no_store(self):
        ledger, clock = self.ready()
        clock.advance(DEAD + 10)  # the process was stopped: no beat
        self.assertEqual(ledger.status().histogram, {0: [1, 10], 1: [1, 10]})
        self.assertEqual(ledger.deaths["b:/1"], 0)
        self.assertAlmostEqual(ledger.deaf_seconds, DEAD + 10 - self.BEAT)
        self.assertEqual({s.store: s.state for s in ledger.store_status()}["b:/1"], "live")
        self.assertEqual(ledger.drop("b:/1", [b"f"]), [])  # still the only copy

    def test_silence_while_running_still_kills(self):
        ledger, clock = self.ready()
        self.beat_for(ledger, clock, DEAD)
        self.assertEqual(ledger.deaths["b:/1"], 1)
        self.assertEqual(ledger.status().histogram, {0: [2, 20]})
        self.assertEqual(ledger.deaf_seconds, 0.0)

    def test_silence_before_and_after_a_pause_adds_up(self):
        ledger, clock = self.ready()
        self.beat_for(ledger, clock, DEAD / 2)
        clock.advance(DEAD)  # stopped
        ledger.beat()
        self.assertEqual(ledger.deaths["b:/1"], 0)
        self.beat_for(ledger, clock, DEAD / 2 - 2 * self.BEAT)
        self.assertEqual(ledger.deaths["b:/1"], 0)
        self.beat_for(ledger, clock, 2 * self.BEAT)
        self.assertEqual(ledger.deaths["b:/1"], 1)

    def test_two_beats_late_is_no_pause(self):
        ledger, clock = self.ready()
        clock.advance(2 * self.BEAT)
        ledger.beat()
        self.assertEqual(ledger.deaf_seconds, 0.0)
        clock.advance(2 * self.BEAT + 0.5)
        ledger.beat()
        self.assertEqual(ledger.deaf_seconds, self.BEAT + 0.5)

    def test_claims_outlive_a_pause(self):
        ledger, clock = self.ready()
        self.assertEqual(ledger.claim("c:/1", [b"g"]), [b"g"])
        clock.advance(TTL + 5)  # stopped
        self.assertEqual(ledger.store_status()[3].claims, 1)
        self.assertEqual({n.path: n.copies for n in needs_all(ledger, "d:/1")},
                         {b"f": 1, b"g": 1})  # g still counts its claim
        self.beat_for(ledger, clock, 4)
        self.assertEqual(ledger.store_status()[3].claims, 1)
        self.beat_for(ledger, clock, TTL)
        self.assertEqual(ledger.store_status()[3].claims, 0)
        self.assertEqual({n.path: n.copies for n in needs_all(ledger, "d:/1")},
                         {b"f": 1, b"g": 0})

    def test_safemode_timer_waits_out_a_pause(self):
        ledger, clock = self.make()
        ledger.report("b:/1", [rec(b"f")])
        clock.advance(5 * INTERVAL)  # stopped before anyone could report
        self.assertTrue(ledger.safemode)
        self.beat_for(ledger, clock, 5 * INTERVAL)
        self.assertFalse(ledger.safemode)

    def test_without_heartbeat_a_gap_is_silence(self):
        ledger, clock = make(copies=1, files=[b"f"])
        ledger.report("b:/1", [rec(b"f")])
        clock.advance(DEAD)
        ledger.beat()  # deaths, like all that time makes true, apply at a call
        self.assertEqual(ledger.deaths["b:/1"], 1)
        self.assertEqual(ledger.deaf_seconds, 0.0)

    def test_bad_heartbeat(self):
        for bad in (0, -1.0):
            self.assertRaises(ValueError, Ledger, SOURCE, 1, Clock(), STORES, heartbeat=bad)


class SafemodeTests(SynchronousTestCase):
    """After a start: no needs, claims or drops until stores re-reported."""

    def test_blocks_needs_claims_drops(self):
        ledger, _ = make(copies=1, files=[b"f"], safemode=True)
        ledger.report("b:/1", [rec(b"f")])
        ledger.report("c:/1", [rec(b"f")])
        self.assertTrue(ledger.safemode)
        self.assertEqual(ledger.needs("d:/1", None, 10), ([], None))
        self.assertEqual(ledger.claim("d:/1", [b"f"]), [])
        self.assertEqual(ledger.drop("b:/1", [b"f"]), [])
        self.assertTrue(ledger.status().safemode)
        self.assertEqual(ledger.status().histogram, {2: [1, 10]})

    def test_ends_when_every_store_inventoried(self):
        ledger, _ = make(copies=1, files=[b"f"], safemode=True)
        stores = list(STORES)
        for store in stores[:-1]:
            ledger.inventory_started(store)
            ledger.inventory_finished(store)
        self.assertTrue(ledger.safemode)
        ledger.inventory_started(stores[-1])
        ledger.report(stores[-1], [rec(b"f")])
        self.assertTrue(ledger.safemode)
        ledger.inventory_finished(stores[-1])
        self.assertFalse(ledger.safemode)
        self.assertEqual(ledger.drop(stores[-1], [b"f"]), [])

    def test_ends_after_five_intervals(self):
        ledger, clock = make(copies=1, files=[b"f", b"g"], safemode=True)
        ledger.report("b:/1", [rec(b"f")])
        ledger.report("c:/1", [rec(b"f")])
        clock.advance(5 * INTERVAL - 1)
        self.assertTrue(ledger.safemode)
        self.assertEqual(ledger.claim("d:/1", [b"g"]), [])
        clock.advance(1)
        self.assertEqual(ledger.claim("d:/1", [b"g"]), [b"g"])
        self.assertFalse(ledger.safemode)
        self.assertEqual(ledger.drop("b:/1", [b"f"]), [b"f"])
        self.assertEqual(len(needs_all(ledger, "a:/1")), 2)

    def test_no_stores_no_safemode(self):
        ledger = Ledger(SOURCE, 1, Clock(), {})
        self.assertFalse(ledger.safemode)


class VersionTests(SynchronousTestCase):
    """Only copies at the current version (size, mtime) count."""

    def test_changed_version_makes_copies_stale(self):
        ledger, _ = make(copies=1, files=[rec(b"f", 10, 1)])
        self.assertEqual(ledger.report("b:/1", [rec(b"f", 10, 1)]), ReportAnswer([], []))
        scan(ledger, [rec(b"f", 12, 2)])
        self.assertEqual(ledger.status().histogram, {0: [1, 12]})
        self.assertEqual(ledger.report("b:/1").stale, [b"f"])
        self.assertEqual(ledger.report("b:/1", [rec(b"f", 10, 1)]).stale, [b"f"])
        self.assertEqual(needs_all(ledger, "b:/1")[0].size, 12)
        self.assertEqual(ledger.report("b:/1", [rec(b"f", 12, 2)]), ReportAnswer([], []))
        self.assertEqual(ledger.status().histogram, {1: [1, 12]})

    def test_report_of_other_version_is_stale(self):
        ledger, _ = make(files=[rec(b"f", 10, 5)])
        self.assertEqual(ledger.report("b:/1", [rec(b"f", 10, 4)]).stale, [b"f"])
        self.assertEqual(ledger.status().histogram, {0: [1, 10]})
        self.assertEqual({s.store: s.files for s in ledger.store_status()}["b:/1"], 0)

    def test_stale_copies_go_while_another_host_keeps_the_version(self):
        ledger, _ = make(copies=2, files=[rec(b"f", 10, 1), rec(b"g")])
        ledger.report("b:/1", [rec(b"f", 10, 9)])
        self.assertEqual(ledger.drop("b:/1", [b"f"]), [])  # the last copy of that version
        ledger.report("c:/1", [], kept=[rec(b"f", 10, 9)])
        self.assertEqual(ledger.drop("b:/1", [b"f"]), [b"f"])
        self.assertEqual(ledger.drop_kept("c:/1", [rec(b"f", 10, 9)]), [])  # now c's is

    def test_the_last_copy_of_an_orphan_stays(self):
        """Rule 7: within keep deleted the cluster keeps one copy of each orphan."""
        ledger, clock = make(copies=2, files=[rec(b"f", 10, 1), rec(b"g")])
        ledger.report("b:/1", [rec(b"gone", 5, 1), rec(b"old", 5, 1)])
        ledger.report("a:/1", [rec(b"gone", 5, 1)])  # same version, host a
        ledger.report("a:/2", [rec(b"old", 5, 1)])
        ledger.report("c:/1", [rec(b"old", 5, 2)])  # another version: no help
        self.assertEqual(ledger.drop("b:/1", [b"gone", b"old"]), [b"gone", b"old"])
        # Now a and its host mate hold the last copies: they must stay.
        self.assertEqual(ledger.drop("a:/1", [b"gone"]), [])
        self.assertEqual(ledger.drop("a:/2", [b"old"]), [])
        self.assertEqual(ledger.drop("c:/1", [b"old"]), [])
        self.assertRaises(UnknownPath, ledger.drop, "b:/1", [b"gone"])
        # Copies of stores declared dead do not count.
        ledger.report("d:/1", [rec(b"old", 5, 2)])
        clock.advance(DEAD)
        ledger.report("c:/1")
        self.assertEqual(ledger.drop("c:/1", [b"old"]), [])
        ledger.report("d:/1")
        self.assertEqual(ledger.drop("c:/1", [b"old"]), [b"old"])


class ScanTests(SynchronousTestCase):
    """Only a complete scan removes files; orphans need a complete scan."""

    def test_incomplete_scan_keeps_files(self):
        ledger, clock = make(files=[b"f", b"g"])
        clock.advance(100)
        scan(ledger, [b"h"], complete=False, error="permission denied")
        status = ledger.status()
        self.assertEqual((status.files, status.scan_error, status.scanned), (3, "permission denied", 0))
        self.assertTrue(ledger.knows(b"f"))
        scan(ledger, [], complete=False, error="no such directory")
        self.assertEqual(ledger.status().files, 3)

    def test_complete_scan_removes_and_orphans(self):
        ledger, clock = make(files=[b"f", b"g"])
        ledger.report("b:/1", [rec(b"f"), rec(b"g")])
        clock.advance(100)
        scan(ledger, [b"g"])
        status = ledger.status()
        self.assertEqual((status.files, status.scanned, status.scan_error), (1, 100, None))
        self.assertFalse(ledger.knows(b"f"))
        self.assertEqual(ledger.report("b:/1").orphans, [b"f"])
        self.assertEqual(ledger.report("b:/1", [rec(b"f")]).orphans, [b"f"])
        self.assertEqual({s.store: s.files for s in ledger.store_status()}["b:/1"], 1)

    def test_orphans_only_after_complete_scan(self):
        clock = Clock()
        ledger = Ledger(SOURCE, 1, clock, STORES)
        self.assertEqual(ledger.report("b:/1", [rec(b"f"), rec(b"x")]), ReportAnswer([], []))
        ledger.inventory_started("c:/1")
        ledger.report("c:/1", [rec(b"x")])
        ledger.scan_started()
        ledger.scan_batch([rec(b"f")])
        self.assertEqual(ledger.status().histogram, {1: [1, 10]})
        scan_answer = ledger.report("b:/1")
        self.assertEqual(scan_answer.orphans, [])
        ledger.scan_finished(True)
        self.assertEqual(ledger.report("b:/1").orphans, [b"x"])
        self.assertEqual(ledger.inventory_finished("c:/1").orphans, [b"x"])
        self.assertEqual(ledger.status().histogram, {1: [1, 10]})

    def test_reappearing_file_adopts_orphan_copies(self):
        ledger, _ = make(copies=1, files=[b"f"])
        ledger.report("b:/1", [rec(b"f")])
        scan(ledger, [])
        self.assertEqual(ledger.status().files, 0)
        scan(ledger, [b"f"])
        self.assertEqual(ledger.status().histogram, {1: [1, 10]})

    def test_complete_finish_needs_a_start(self):
        ledger, _ = make(files=[b"f"])
        self.assertRaises(LedgerError, ledger.scan_finished, True)
        self.assertTrue(ledger.knows(b"f"))


class HeldScanTests(SynchronousTestCase):
    """
    A scan that deletes or rewrites more than C{max_change} of the source is
    held (DESIGN.md rule 8): nothing becomes an orphan, no copy stops
    counting, until accept() or a scan that changes little enough.
    """

    FILES = [rec(b"f%03d" % n, 10, 1) for n in range(100)]

    def held_ledger(self, max_change=0.2, accepted=None, files=None):
        clock = Clock()
        ledger = Ledger(SOURCE, 2, clock, STORES, report_interval=INTERVAL,
                        dead_after=DEAD, claim_ttl=TTL, max_change=max_change,
                        accepted=accepted)
        if files is None:
            files = self.FILES
        scan(ledger, files)
        for store in STORES:
            ledger.inventory_started(store)
            if store in ("b:/1", "c:/1"):
                ledger.report(store, files)
            ledger.inventory_finished(store)
        return ledger, clock

    def test_unmounted_source_is_held(self):
        """An empty mount point with a marker file: every file 'deleted'."""
        ledger, clock = self.held_ledger()
        before = ledger.status().histogram
        clock.advance(10)
        scan(ledger, [rec(b"NOT-MOUNTED", 2, 5)])
        status = ledger.status()
        self.assertEqual(status.held, dict(deleted_files=100, deleted_bytes=1000,
                                           changed_files=0, changed_bytes=0, since=10))
        # The new file is there; the old ones still count, and none is an orphan.
        self.assertEqual(status.histogram, {**before, 0: [1, 2]})
        self.assertTrue(all(ledger.knows(r.path) for r in self.FILES))
        self.assertEqual(ledger.report("b:/1").orphans, [])
        self.assertEqual(ledger.drop("b:/1", [b"f000"]), [])  # at 2 copies: no surplus
        self.assertEqual(status.scanned, 0)  # the last accepted scan
        # Still unmounted at the next scan: still held, since unchanged.
        clock.advance(10)
        scan(ledger, [rec(b"NOT-MOUNTED", 2, 5)])
        self.assertEqual(ledger.status().held["since"], 10)
        # The operator says it is right: now they are orphans.
        applied = ledger.accept()
        self.assertEqual(applied["deleted_files"], 100)
        self.assertIsNone(ledger.status().held)
        self.assertEqual(ledger.status().files, 1)
        self.assertEqual(sorted(ledger.report("b:/1").orphans), [r.path for r in self.FILES])
        self.assertEqual(ledger.status().scanned, 20)
        self.assertIsNone(ledger.accept())  # nothing held any more

    def test_rewrites_are_held_and_copies_keep_counting(self):
        """Ransomware: 30 of 100 files rewritten in place (same size)."""
        ledger, clock = self.held_ledger()
        encrypted = [rec(r.path, r.size, 99) for r in self.FILES[:30]]
        scan(ledger, encrypted + self.FILES[30:])
        status = ledger.status()
        self.assertEqual((status.held["changed_files"], status.held["deleted_files"]), (30, 0))
        self.assertEqual(status.histogram, {2: [100, 1000]})
        # The stores' copies are still current; the new versions are not.
        self.assertEqual(ledger.report("b:/1", self.FILES[:30]).stale, [])
        self.assertEqual(ledger.report("d:/1", encrypted[:1]).stale, [b"f000"])
        self.assertEqual(needs_all(ledger, "d:/1")[0].mtime, 1)
        ledger.accept()
        self.assertEqual(sorted(ledger.report("b:/1").stale), [r.path for r in encrypted])
        self.assertEqual(ledger.status().histogram, {0: [29, 290], 1: [1, 10], 2: [70, 700]})

    def test_a_small_change_applies_at_once(self):
        ledger, _ = self.held_ledger()
        scan(ledger, self.FILES[15:])  # 15% deleted
        self.assertIsNone(ledger.status().held)
        self.assertEqual(ledger.status().files, 85)
        self.assertEqual(len(ledger.report("b:/1").orphans), 15)

    def test_hold_ends_when_the_source_comes_back(self):
        ledger, _ = self.held_ledger()
        scan(ledger, [])
        self.assertIsNotNone(ledger.status().held)
        scan(ledger, self.FILES)  # remounted
        self.assertIsNone(ledger.status().held)
        self.assertEqual(ledger.status().histogram, {2: [100, 1000]})
        self.assertEqual(ledger.report("b:/1").orphans, [])

    def test_a_later_held_scan_replaces_the_earlier(self):
        ledger, _ = self.held_ledger()
        scan(ledger, self.FILES[50:])
        scan(ledger, self.FILES[30:])
        self.assertEqual(ledger.accept()["deleted_files"], 30)
        self.assertEqual(ledger.status().files, 70)

    def test_few_files_are_never_held_but_all_gone_is(self):
        files = self.FILES[:20]
        ledger, _ = self.held_ledger(files=files)
        scan(ledger, files[9:])  # 45% deleted, but only 9 files
        self.assertIsNone(ledger.status().held)
        self.assertEqual(ledger.status().files, 11)
        scan(ledger, [])  # every file gone
        self.assertEqual(ledger.status().held["deleted_files"], 11)

    def test_incomplete_scan_with_many_rewrites_is_held(self):
        ledger, _ = self.held_ledger()
        scan(ledger, [rec(r.path, 1, 7) for r in self.FILES[:50]], complete=False,
             error="permission denied")
        status = ledger.status()
        self.assertEqual((status.held["changed_files"], status.scan_error), (50, None))
        self.assertEqual(status.histogram, {2: [100, 1000]})
        ledger.accept()
        self.assertEqual(ledger.status().scan_error, "permission denied")
        self.assertEqual(ledger.status().files, 100)  # an incomplete scan removes nothing

    def test_a_held_complete_scan_ends_an_earlier_scan_error(self):
        ledger, _ = self.held_ledger()
        scan(ledger, self.FILES[:90], complete=False, error="2 entries vanished")
        self.assertEqual(ledger.status().scan_error, "2 entries vanished")
        scan(ledger, [])  # complete, and held
        self.assertIsNotNone(ledger.status().held)
        self.assertIsNone(ledger.status().scan_error)

    def test_deleted_bytes_count(self):
        files = [rec(b"big", 10_000, 1)] + self.FILES[:30]
        ledger, _ = self.held_ledger(files=files)
        scan(ledger, files[20:])  # 20 files, 10,190 of 10,300 bytes
        held = ledger.status().held
        self.assertEqual((held["deleted_files"], held["deleted_bytes"]), (20, 10_190))

    def test_without_max_change_nothing_is_held(self):
        ledger, _ = self.held_ledger(max_change=None)
        scan(ledger, [])
        self.assertIsNone(ledger.status().held)
        self.assertEqual(ledger.status().files, 0)

    def test_first_scan_after_a_restart_is_measured_against_the_last_accepted(self):
        """A disk that did not mount at boot: the ledger knew nothing before."""
        clock = Clock()
        ledger = Ledger(SOURCE, 2, clock, STORES, report_interval=INTERVAL,
                        dead_after=DEAD, claim_ttl=TTL, max_change=0.2,
                        accepted=(100, 1000))
        # The stores re-report before the scan ends, as after any restart.
        for store in ("b:/1", "c:/1"):
            ledger.inventory_started(store)
            ledger.report(store, self.FILES)
            ledger.inventory_finished(store)
        scan(ledger, [rec(b"NOT-MOUNTED", 2, 5)])
        status = ledger.status()
        self.assertEqual((status.held["deleted_files"], status.held["deleted_bytes"]),
                         (99, 998))
        self.assertEqual(ledger.report("b:/1").orphans, [])  # kept aside, not orphaned
        self.assertEqual(ledger.accepted, (100, 1000))
        scan(ledger, [rec(b"NOT-MOUNTED", 2, 5)])  # still held at the next scan
        self.assertIsNotNone(ledger.status().held)
        ledger.accept()
        self.assertEqual(len(ledger.report("b:/1").orphans), 100)
        self.assertEqual(ledger.accepted, (1, 2))

    def test_restart_with_the_source_intact_is_not_held(self):
        clock = Clock()
        ledger = Ledger(SOURCE, 2, clock, STORES, max_change=0.2, accepted=(100, 1000))
        scan(ledger, self.FILES[:95])
        self.assertIsNone(ledger.status().held)
        self.assertEqual(ledger.accepted, (95, 950))


class InventoryTests(SynchronousTestCase):
    """An inventory replaces what the ledger thinks a store holds."""

    def test_unreported_holdings_forgotten(self):
        ledger, _ = make(files=[b"f", b"g", b"h"])
        ledger.report("b:/1", [rec(b"f"), rec(b"g"), rec(b"h", 1, 1), rec(b"old")])
        ledger.inventory_started("b:/1")
        ledger.report("b:/1", [rec(b"g")])
        answer = ledger.inventory_finished("b:/1")
        self.assertEqual(answer, ReportAnswer([], []))
        self.assertEqual({s.store: s.files for s in ledger.store_status()}["b:/1"], 1)
        self.assertEqual(ledger.status().histogram, {0: [2, 20], 1: [1, 10]})
        self.assertRaises(UnknownPath, ledger.drop, "b:/1", [b"old"])
        self.assertEqual(ledger.drop("b:/1", [b"h"]), [])

    def test_rescan_during_an_inventory(self):
        """Files removed, changed or reused mid-inventory: only what was reported stays."""
        files = [b"f%d" % n for n in range(6)]
        ledger, _ = make(copies=1, files=files)
        ledger.report("b:/1", [rec(p) for p in files])
        ledger.inventory_started("b:/1")
        ledger.report("b:/1", [rec(p) for p in files[:4]])  # all known: the fast path
        # f0 is deleted and f1 changes; then a new file takes f0's freed id.
        scan(ledger, [rec(b"f1", 20)] + [rec(p) for p in files[2:]])
        scan(ledger, [rec(b"f1", 20)] + [rec(p) for p in files[2:]] + [rec(b"new")])
        answer = ledger.inventory_finished("b:/1")
        self.assertEqual((list(answer.stale), list(answer.orphans)), ([b"f1"], [b"f0"]))
        status = {s.store: s for s in ledger.store_status()}["b:/1"]
        self.assertEqual((status.files, status.bytes), (2, 20))  # f2, f3: f4, f5 unreported
        self.assertEqual(ledger.status().histogram, {0: [4, 50], 1: [2, 20]})
        self.assertEqual({n.path for n in needs_all(ledger, "c:/1")},
                         {b"f1", b"f4", b"f5", b"new", b"f2", b"f3"})
        # What b reported and still has may go once another host keeps
        # that version too (rule 7): the orphan and the stale copy.
        self.assertEqual(ledger.drop("b:/1", [b"f0", b"f1"]), [])
        ledger.report("c:/1", [rec(b"f0")], kept=[rec(b"f1")])
        self.assertEqual(ledger.drop("b:/1", [b"f0", b"f1"]), [b"f0", b"f1"])
        self.assertEqual(ledger.drop("b:/1", [b"new"]), [])

    def test_new_inventory_drops_the_stores_claims(self):
        """A client that restarted must not be kept from files by its own dead claims."""
        ledger, _ = make(copies=1, files=[b"f", b"g"])
        self.assertEqual(ledger.claim("b:/1", [b"f"]), [b"f"])
        self.assertEqual(ledger.claim("c:/1", [b"f"]), [])
        ledger.inventory_started("b:/1")
        ledger.inventory_finished("b:/1")
        self.assertEqual({s.store: s.claims for s in ledger.store_status()}["b:/1"], 0)
        self.assertIn(b"f", {n.path for n in needs_all(ledger, "b:/1")})
        self.assertEqual(ledger.claim("c:/1", [b"f"]), [b"f"])

    def test_finish_needs_a_start(self):
        ledger, _ = make(files=[b"f"])
        self.assertRaises(LedgerError, ledger.inventory_finished, "b:/1")


class DropTests(SynchronousTestCase):
    """A drop is granted only while copies other live hosts remain."""

    def test_needs_copies_on_other_hosts(self):
        ledger, _ = make(copies=2, files=[b"f"])
        ledger.report("a:/1", [rec(b"f")])
        ledger.report("a:/2", [rec(b"f")])
        ledger.report("b:/1", [rec(b"f")])
        # Two hosts hold it: nobody may drop, not even a same-host duplicate.
        self.assertEqual(ledger.drop("a:/1", [b"f"]), [])
        self.assertEqual(ledger.drop("b:/1", [b"f"]), [])
        ledger.report("c:/1", [rec(b"f")])
        self.assertEqual(ledger.drop("b:/1", [b"f"]), [b"f"])
        # Counted at once: c may not drop too.
        self.assertEqual(ledger.drop("c:/1", [b"f"]), [])
        self.assertEqual(ledger.status().histogram, {2: [1, 10]})

    def test_claims_do_not_count(self):
        ledger, _ = make(copies=1, files=[b"f"])
        ledger.report("b:/1", [rec(b"f")])
        self.assertEqual(ledger.claim("c:/1", [b"f"], fill=True), [b"f"])
        self.assertEqual(ledger.drop("b:/1", [b"f"]), [])

    def test_dead_copies_do_not_count(self):
        ledger, clock = make(copies=1, files=[b"f"])
        ledger.report("b:/1", [rec(b"f")])
        ledger.report("c:/1", [rec(b"f")])
        clock.advance(DEAD)
        ledger.report("b:/1")
        self.assertEqual(ledger.drop("b:/1", [b"f"]), [])
        ledger.report("c:/1")
        self.assertEqual(ledger.drop("b:/1", [b"f"]), [b"f"])

    def test_not_held_not_granted(self):
        ledger, _ = make(copies=1, files=[b"f"])
        ledger.report("b:/1", [rec(b"f")])
        ledger.report("c:/1", [rec(b"f")])
        self.assertEqual(ledger.drop("d:/1", [b"f"]), [])
        self.assertEqual(ledger.status().histogram, {2: [1, 10]})


class SurplusTests(SynchronousTestCase):
    """
    A store's surplus: what it holds current with more live copies than
    wanted, most copies first, counted like drop() counts.
    """

    def test_only_held_current_files_above_copies(self):
        ledger, _ = make(copies=1, files=[b"f", b"g", b"h", b"k"])
        ledger.report("b:/1", [rec(b"f"), rec(b"g"), rec(b"h"), rec(b"k", 1, 2)])
        ledger.report("c:/1", [rec(b"f"), rec(b"g"), rec(b"k")])
        ledger.report("d:/1", [rec(b"f"), rec(b"k")])
        got = {st: [(n.path, n.copies, n.wanted) for n in surplus_all(ledger, st)]
               for st in STORES}
        self.assertEqual(got["b:/1"], [(b"f", 3, 1), (b"g", 2, 1)])
        self.assertEqual(sorted(got["c:/1"]), [(b"f", 3, 1), (b"g", 2, 1), (b"k", 2, 1)])
        self.assertEqual(sorted(got["d:/1"]), [(b"f", 3, 1), (b"k", 2, 1)])
        self.assertEqual(got["a:/1"], [])
        need = surplus_all(ledger, "b:/1")[0]
        self.assertEqual((need.size, need.mtime), (10, 1))

    def test_same_host_counts_once(self):
        ledger, _ = make(copies=1, files=[b"f"])
        ledger.report("a:/1", [rec(b"f")])
        ledger.report("a:/2", [rec(b"f")])
        self.assertEqual(surplus_all(ledger, "a:/1"), [])
        ledger.report("b:/1", [rec(b"f")])
        self.assertEqual([n.copies for n in surplus_all(ledger, "a:/2")], [2])

    def test_most_copies_first(self):
        stores = {f"h{n}:/s": f"h{n}" for n in range(6)}
        files = [b"f%03d" % n for n in range(60)]
        ledger, _ = make(copies=1, stores=stores, files=files)
        expected = {}
        for n, path in enumerate(files):
            holders = 1 + n % 6  # h0 holds all; 1 to 6 copies
            for h in range(holders):
                ledger.report(f"h{h}:/s", [rec(path)])
            if holders > 1:
                expected[path] = holders
        needs = surplus_all(ledger, "h0:/s")
        self.assertEqual({n.path: n.copies for n in needs}, expected)
        counts = [n.copies for n in needs]
        self.assertEqual(counts, sorted(counts, reverse=True))
        self.assertEqual(counts[0], 6)
        self.assertEqual({n.wanted for n in needs}, {1})

    def test_dead_holdings_do_not_count(self):
        ledger, clock = make(copies=1, files=[b"f"])
        ledger.report("b:/1", [rec(b"f")])
        ledger.report("c:/1", [rec(b"f")])
        self.assertEqual([n.copies for n in surplus_all(ledger, "b:/1")], [2])
        clock.advance(DEAD)
        ledger.report("b:/1")
        self.assertEqual(surplus_all(ledger, "b:/1"), [])
        ledger.report("c:/1")
        self.assertEqual([n.copies for n in surplus_all(ledger, "b:/1")], [2])

    def test_dead_holdings_of_claimed_files_do_not_count(self):
        ledger, clock = make(copies=1, files=[b"f"])
        for store in ("b:/1", "c:/1", "d:/1"):
            ledger.report(store, [rec(b"f")])
        clock.advance(DEAD - 1)
        for store in ("a:/1", "b:/1", "c:/1"):
            ledger.report(store)
        self.assertEqual(ledger.claim("a:/1", [b"f"], fill=True), [b"f"])
        clock.advance(1)  # d dies; a's claim is still live
        self.assertEqual([n.copies for n in surplus_all(ledger, "b:/1")], [2])
        self.assertEqual([n.copies for n in needs_all(ledger, "a:/2")], [])

    def test_a_dead_stores_claims_end(self):
        """
        A store declared dead fetches nothing: its claims stop counting at
        once (not when they expire), so other stores take those files, and
        it may claim again only once it reports.
        """
        clock = Clock()
        ledger = Ledger(SOURCE, 1, clock, STORES, report_interval=10.0, dead_after=100.0,
                        claim_ttl=TTL)
        scan(ledger, [b"f"])
        for store in STORES:
            ledger.inventory_started(store)
            ledger.inventory_finished(store)
        self.assertEqual(ledger.claim("a:/1", [b"f"]), [b"f"])
        self.assertEqual([n.copies for n in needs_all(ledger, "b:/1")], [1])
        clock.advance(100)  # a dies, silent; its claim had 200 s left
        for store in ("b:/1", "c:/1"):
            ledger.report(store)
        self.assertEqual([n.copies for n in needs_all(ledger, "b:/1")], [0])
        claims = {s.store: s.claims for s in ledger.store_status()}
        self.assertEqual(claims["a:/1"], 0)
        self.assertEqual(ledger.claim("a:/1", [b"f"]), [])
        self.assertEqual(ledger.claim("b:/1", [b"f"]), [b"f"])
        ledger.report("a:/1")
        self.assertEqual(ledger.claim("a:/1", [b"f"], fill=True), [])  # b fetches it
        ledger.report("b:/1", [rec(b"f")])
        self.assertEqual(ledger.claim("c:/1", [b"f"], fill=True), [b"f"])

    def test_claims_do_not_count(self):
        ledger, _ = make(copies=1, files=[b"f", b"g"])
        ledger.report("b:/1", [rec(b"f"), rec(b"g")])
        ledger.report("c:/1", [rec(b"g")])
        # A greedy claim raises f's count to 2 and g's to 3; only real
        # holdings count for surplus, as for drop().
        self.assertEqual(ledger.claim("d:/1", [b"f", b"g"], fill=True), [b"f", b"g"])
        self.assertEqual({n.path: n.copies for n in needs_all(ledger, "a:/1")},
                         {b"f": 2, b"g": 3})
        got = [(n.path, n.copies) for n in surplus_all(ledger, "b:/1")]
        self.assertEqual(got, [(b"g", 2)])
        self.assertEqual(ledger.drop("b:/1", [b"f"]), [])
        # Claims expire or end; the counts do not move.
        ledger.release("d:/1", [b"f", b"g"])
        self.assertEqual([(n.path, n.copies) for n in surplus_all(ledger, "b:/1")], got)

    def test_claimed_files_keep_their_order_and_pages(self):
        stores = {f"h{n}:/s": f"h{n}" for n in range(5)}
        files = [b"f%03d" % n for n in range(40)]
        ledger, _ = make(copies=1, stores=stores, files=files)
        for n, path in enumerate(files):
            for h in range(2 + n % 2):  # 2 or 3 copies, h0 holds all
                ledger.report(f"h{h}:/s", [rec(path)])
        ledger.claim("h4:/s", files[::3])  # raises tiers, not real counts
        before = surplus_all(ledger, "h0:/s")
        self.assertEqual(len(before), 40)
        counts = [n.copies for n in before]
        self.assertEqual(counts, sorted(counts, reverse=True))
        self.assertEqual(counts.count(3), 20)
        paged = surplus_all(ledger, "h0:/s", page=3)
        self.assertEqual(paged, before)

    def test_safemode_lists_nothing(self):
        ledger, _ = make(copies=1, files=[b"f"], safemode=True)
        ledger.report("b:/1", [rec(b"f")])
        ledger.report("c:/1", [rec(b"f")])
        self.assertTrue(ledger.safemode)
        self.assertEqual(ledger.surplus("b:/1", None, 10), ([], None))
        self.assertEqual(ledger.drop("b:/1", [b"f"]), [])

    def test_nothing_held_nothing_listed(self):
        ledger, _ = make(copies=1, files=[b"f"])
        ledger.report("b:/1", [rec(b"f")])
        ledger.report("c:/1", [rec(b"f")])
        self.assertEqual(ledger.surplus("d:/1", None, 10), ([], None))
        self.assertEqual(ledger.surplus("b:/1", None, 0), ([], None))

    def test_paging_covers_everything_once(self):
        files = [b"p%03d" % n for n in range(200)]
        ledger, _ = make(copies=1, files=files)
        ledger.report("b:/1", [rec(p) for p in files])
        ledger.report("c:/1", [rec(p) for p in files[:120]])
        ledger.report("d:/1", [rec(p) for p in files[:50]])
        full = surplus_all(ledger, "b:/1")
        self.assertEqual(len(full), 120)
        seen, cursor, pages = [], None, 0
        while True:
            page, cursor = ledger.surplus("b:/1", cursor, 7)
            self.assertLessEqual(len(page), 7)
            seen.extend(page)
            pages += 1
            if cursor is None:
                break
        self.assertEqual(seen, full)
        self.assertEqual(len({n.path for n in seen}), 120)
        self.assertGreater(pages, 15)
        self.assertEqual([n.copies for n in seen], [3] * 50 + [2] * 70)

    def test_scan_budget_gives_short_pages(self):
        self.patch(ledger_module, "_SCAN_BUDGET", 5)
        files = [b"p%03d" % n for n in range(300)]
        ledger, _ = make(copies=1, files=files)
        ledger.report("c:/1", [rec(p) for p in files])
        ledger.report("d:/1", [rec(p) for p in files])
        ledger.report("b:/1", [rec(p) for p in files[::10]])
        seen, cursor, calls = [], None, 0
        while True:
            page, cursor = ledger.surplus("b:/1", cursor, 1000)
            seen.extend(n.path for n in page)
            calls += 1
            if cursor is None:
                break
        self.assertEqual(sorted(seen), files[::10])
        self.assertGreater(calls, 10)

    def test_order_differs_per_store(self):
        files = [b"q%03d" % n for n in range(300)]
        ledger, _ = make(copies=1, files=files)
        for store in ("b:/1", "c:/1"):
            ledger.report(store, [rec(p) for p in files])
        b = [n.path for n in surplus_all(ledger, "b:/1")]
        c = [n.path for n in surplus_all(ledger, "c:/1")]
        self.assertEqual(sorted(b), files)
        self.assertEqual(sorted(c), files)
        self.assertNotEqual(b[:10], c[:10])

    def test_granted_drop_shrinks_surplus(self):
        ledger, _ = make(copies=1, files=[b"f", b"g"])
        for store in ("b:/1", "c:/1", "d:/1"):
            ledger.report(store, [rec(b"f"), rec(b"g")])
        ledger.report("a:/1", [rec(b"g")])
        self.assertEqual([(n.path, n.copies) for n in surplus_all(ledger, "b:/1")],
                         [(b"g", 4), (b"f", 3)])
        self.assertEqual(ledger.drop("c:/1", [b"f"]), [b"f"])
        self.assertEqual([(n.path, n.copies) for n in surplus_all(ledger, "b:/1")],
                         [(b"g", 4), (b"f", 2)])
        self.assertEqual([n.path for n in surplus_all(ledger, "c:/1")], [b"g"])
        self.assertEqual(ledger.drop("d:/1", [b"f"]), [b"f"])
        self.assertEqual([n.path for n in surplus_all(ledger, "b:/1")], [b"g"])
        self.assertEqual(ledger.drop("b:/1", [b"f"]), [])

    def test_listed_exactly_when_drop_is_granted(self):
        ledger, _ = make(copies=2, files=[b"f%d" % n for n in range(12)])
        for n in range(12):
            for store in list(STORES)[: n % 6]:
                ledger.report(store, [rec(b"f%d" % n)])
        for store in STORES:
            listed = {n.path for n in surplus_all(ledger, store)}
            for n in range(12):
                path = b"f%d" % n
                before = snapshot(ledger)
                granted = ledger.drop(store, [path]) == [path]
                self.assertEqual(path in listed, granted, (store, path))
                if granted:
                    ledger.report(store, [rec(path)])  # put it back
                self.assertEqual(snapshot(ledger), before)

    def test_bad_cursor(self):
        ledger, _ = make(copies=1, files=[b"f%d" % n for n in range(5)])
        ledger.report("b:/1", [rec(b"f%d" % n) for n in range(5)])
        ledger.report("c:/1", [rec(b"f%d" % n) for n in range(5)])
        self.assertRaises(BadCursor, ledger.surplus, "b:/1", b"nonsense", 10)
        _, needs_cursor = ledger.needs("d:/1", None, 1)
        self.assertIsNotNone(needs_cursor)
        self.assertRaises(BadCursor, ledger.surplus, "b:/1", needs_cursor, 10)
        _, surplus_cursor = ledger.surplus("b:/1", None, 1)
        self.assertIsNotNone(surplus_cursor)
        self.assertRaises(BadCursor, ledger.needs, "d:/1", surplus_cursor, 10)
        self.assertRaises(UnknownStore, ledger.surplus, "x:/1", None, 10)


class BatchedReportTests(SynchronousTestCase):
    """
    Reports of many files are applied in batches (by holder mask); the
    batches must count as file-by-file calls would.  Each case is one the
    random model below meets rarely.
    """

    def test_held_and_new_files_in_one_report(self):
        ledger, _ = make(files=[b"f", b"g", b"h"])
        ledger.report("a:/1", [rec(b"f")])
        ledger.report("a:/1", [rec(b"f"), rec(b"g"), rec(b"h", 10)])
        (a1,) = [s for s in ledger.store_status() if s.store == "a:/1"]
        self.assertEqual((a1.files, a1.bytes), (3, 30))
        self.assertEqual(ledger.status().histogram, {1: [3, 30]})
        audit(self, ledger)

    def test_fetch_of_a_file_two_stores_claimed(self):
        ledger, _ = make(files=[b"f"])
        self.assertEqual(ledger.claim("a:/1", [b"f"]), [b"f"])
        self.assertEqual(ledger.claim("b:/1", [b"f"]), [b"f"])
        ledger.report("a:/1", [rec(b"f")])
        # b:/1's claim still counts: f has its two copies for now.
        self.assertEqual([(n.path, n.copies) for n in needs_all(ledger, "c:/1")],
                         [(b"f", 2)])
        claims = {s.store: s.claims for s in ledger.store_status()}
        self.assertEqual((claims["a:/1"], claims["b:/1"]), (0, 1))
        audit(self, ledger)

    def test_fetched_claims_own_and_others_and_free_in_one_report(self):
        ledger, _ = make(files=[b"f", b"g", b"h"])
        ledger.claim("a:/1", [b"f"])
        ledger.claim("b:/1", [b"g"])
        ledger.report("a:/1", [rec(b"f"), rec(b"g"), rec(b"h")])
        self.assertEqual(ledger.status().histogram, {1: [3, 30]})
        # g counts a:/1's holding and b:/1's claim; f and h one copy each.
        self.assertEqual(sorted((n.path, n.copies) for n in needs_all(ledger, "c:/1")),
                         [(b"f", 1), (b"g", 2), (b"h", 1)])
        audit(self, ledger)


class ScaleTests(SynchronousTestCase):
    """Counts past a byte, and listings that move on after a claim."""

    def test_more_than_255_copies_are_counted_exactly(self):
        stores = {f"h{n}:/s": f"h{n}" for n in range(300)}
        ledger, _ = make(copies=1, stores=stores, files=[b"f", b"g"])
        for n in range(300):
            ledger.report(f"h{n}:/s", [rec(b"f")] + ([rec(b"g")] if n < 256 else []))
        self.assertEqual(ledger.status().histogram, {256: [1, 10], 300: [1, 10]})
        self.assertEqual([(n.path, n.copies) for n in surplus_all(ledger, "h0:/s")],
                         [(b"f", 300), (b"g", 256)])
        self.assertEqual([(n.path, n.copies) for n in needs_all(ledger, "h299:/s")],
                         [(b"g", 256)])
        self.assertEqual(ledger.drop("h1:/s", [b"f"]), [b"f"])
        self.assertEqual(ledger.status().histogram, {256: [1, 10], 299: [1, 10]})
        for n in range(2, 256):  # down through the cap
            ledger.drop(f"h{n}:/s", [b"g"])
        self.assertEqual(ledger.status().histogram, {2: [1, 10], 299: [1, 10]})
        self.assertEqual([n.copies for n in needs_all(ledger, "h299:/s")], [2])
        audit(self, ledger)
        # Reported removals and new holdings cross the cap in batches too.
        for n in range(2, 260):
            ledger.report(f"h{n}:/s", [rec(b"g")], [b"f"])
        self.assertEqual(ledger.status().histogram, {41: [1, 10], 260: [1, 10]})
        audit(self, ledger)

    def test_a_claim_moves_the_listing_on(self):
        files = [b"f%03d" % n for n in range(1000)]
        ledger, _ = make(copies=1, files=files)
        first = [n.path for n in ledger.needs("b:/1", None, 10)[0]]
        self.assertEqual(first, [n.path for n in ledger.needs("b:/1", None, 10)[0]])
        starts = {first[0]}
        for _ in range(5):
            page = [n.path for n in ledger.needs("b:/1", None, 10)[0]]
            self.assertEqual(ledger.claim("b:/1", page[:5]), page[:5])
            after = [n.path for n in ledger.needs("b:/1", None, 10)[0]]
            self.assertEqual(set(after) & set(page[:5]), set())  # the host claims them
            starts.add(after[0])
        # Each claim sends the next listing somewhere else in the ring, so
        # stores that claimed side by side do not list the same files next.
        self.assertEqual(len(starts), 6)
        c = [n.path for n in ledger.needs("c:/1", None, 10)[0]]
        self.assertNotEqual(c[0], first[0])
        # With copies=2 b's claims stay in a listed tier: still not re-listed.
        ledger2, _ = make(copies=2, files=files)
        page = [n.path for n in ledger2.needs("b:/1", None, 10)[0]]
        ledger2.claim("b:/1", page)
        nxt = ledger2.needs("b:/1", None, 10)[0]
        self.assertEqual(set(n.path for n in nxt) & set(page), set())
        self.assertEqual({n.copies for n in nxt}, {0})
        self.assertEqual(len(needs_all(ledger2, "b:/1")), len(files) - 10)


class RefusalTests(SynchronousTestCase):
    """Unknown stores and paths raise and change nothing."""

    def setUp(self):
        self.ledger, self.clock = make(copies=1, files=[b"f", b"g"])
        self.ledger.report("b:/1", [rec(b"f")])
        self.ledger.report("c:/1", [rec(b"f")])
        self.ledger.claim("d:/1", [b"g"])

    def test_unknown_store(self):
        before = snapshot(self.ledger)
        calls = [
            lambda: self.ledger.inventory_started("x:/1"),
            lambda: self.ledger.inventory_finished("x:/1"),
            lambda: self.ledger.report("x:/1", [rec(b"g")]),
            lambda: self.ledger.needs("x:/1", None, 10),
            lambda: self.ledger.surplus("x:/1", None, 10),
            lambda: self.ledger.claim("x:/1", [b"g"]),
            lambda: self.ledger.release("d:/2", [b"g"]),
            lambda: self.ledger.drop("x:/1", [b"f"]),
        ]
        for call in calls:
            e = self.assertRaises(UnknownStore, call)
            self.assertIsInstance(e, LedgerError)
        self.assertEqual(snapshot(self.ledger), before)

    def test_unknown_path(self):
        before = snapshot(self.ledger)
        e = self.assertRaises(UnknownPath, self.ledger.claim, "a:/1", [b"f", b"nope", b"nor"])
        self.assertEqual(e.args, (b"nope",))
        self.assertRaises(UnknownPath, self.ledger.release, "d:/1", [b"g", b"nope"])
        self.assertRaises(UnknownPath, self.ledger.drop, "b:/1", [b"f", b"nope"])
        self.assertEqual(snapshot(self.ledger), before)
        self.assertEqual(self.ledger.drop("b:/1", [b"f"]), [b"f"])


    def test_scan_of_a_bad_path(self):
        """A scan never adds a path relpath_problem refuses: reports trust known paths."""
        before = snapshot(self.ledger)
        for bad in (b"../x", b"a//b", b"/etc/passwd", b"x" * 4097):
            e = self.assertRaises(ValueError, self.ledger.scan_batch,
                                  [rec(b"new"), FileRecord.unchecked(bad, 1, 1)])
            self.assertIn(repr(bad[:50])[:-1], str(e))
            self.assertFalse(self.ledger.knows(b"new"))
        self.assertEqual(snapshot(self.ledger), before)

    def test_report_vets_unknown_paths_first(self):
        """
        C{vet} sees a report's held paths, then its removed ones, when the
        list names a path the ledger does not know, before anything
        changes; a report of known paths needs no look.
        """
        seen = []

        def vet(paths):
            seen.append(list(paths))
            found = bad_path(paths)
            if found is not None:
                raise ValueError(found)

        self.ledger.report("b:/1", [rec(b"f"), rec(b"g")], [b"f"], vet=vet)
        self.assertEqual(seen, [])
        self.clock.advance(5)
        before = snapshot(self.ledger)
        for bad in (b"../x", b"a//b", b"/etc/passwd", b"a/./b", b"x" * 4097):
            held = [rec(b"g"), FileRecord.unchecked(bad, 1, 1)]
            del seen[:]
            self.assertRaises(ValueError, self.ledger.report, "c:/1", held, vet=vet)
            self.assertEqual(seen, [[b"g", bad]])
            del seen[:]
            self.assertRaises(ValueError, self.ledger.report, "c:/1", [rec(b"g")],
                              [b"f", bad], vet=vet)
            self.assertEqual(seen, [[b"f", bad]])
        # Nothing changed: no lease renewed (report ages stay 5 s), no orphan kept.
        self.assertEqual(snapshot(self.ledger), before)
        self.assertEqual(self.ledger.report("c:/1", [], [b"gone"]).orphans, [])
        # A good unknown name passes the vet and is an orphan (the scan is complete).
        del seen[:]
        answer = self.ledger.report("c:/1", [rec(b"g"), rec(b"unknown")], vet=vet)
        self.assertEqual(seen, [[b"g", b"unknown"]])
        self.assertEqual(answer.orphans, [b"unknown"])

# -- a model of the ledger, checked against every sequence of operations ------

PATHS = [b"f0", b"f1", b"f2"]
VERSIONS = [(10, 1), (10, 2), (20, 1)]
COPIES = 2
stores_st = st.sampled_from(sorted(STORES))
paths_st = st.sampled_from(PATHS)
ops_st = st.lists(
    st.one_of(
        # Fetches and drops are weighted up, so drops get granted often.
        st.tuples(st.just("fetch"), st.sets(stores_st, min_size=1), paths_st),
        st.tuples(st.just("drop"), stores_st, paths_st),
        st.tuples(st.just("claim"), stores_st, paths_st, st.booleans()),
        st.tuples(st.just("claimfetch"), stores_st, paths_st),  # as a client does
        # A file deleted at the source, then a store asks to drop its orphan.
        st.tuples(st.just("deletedrop"), paths_st, stores_st),
        st.tuples(st.just("release"), stores_st, paths_st),
        st.tuples(st.just("drop"), stores_st, paths_st),
        st.tuples(st.just("lose"), stores_st, paths_st),
        # Several files in one report (repeats and other versions included),
        # as a fetched batch is: the ledger batches those.
        st.tuples(st.just("fetchmany"), stores_st,
                  st.lists(st.tuples(paths_st, st.sampled_from([None] + VERSIONS)),
                           min_size=2, max_size=6)),
        st.tuples(st.just("losemany"), stores_st, st.lists(paths_st, min_size=2, max_size=5)),
        st.tuples(st.just("report"), stores_st),
        st.tuples(st.just("inventory"), stores_st),
        st.tuples(st.just("begin"), stores_st),  # an inventory left open...
        st.tuples(st.just("end"), stores_st),  # ...while other calls come
        st.tuples(st.just("advance"), st.sampled_from([1, 30, 200, 400, 4000])),
        st.tuples(
            st.just("rescan"),
            st.dictionaries(paths_st, st.sampled_from(VERSIONS)),
            st.booleans(),
        ),
    ),
    min_size=15,
    max_size=80,
)


class Model:
    """What the ledger should say, computed the slow, obvious way."""

    def __init__(self, clock):
        self.clock = clock
        self.current = {p: VERSIONS[0] for p in PATHS}
        self.truth = {s: {} for s in STORES}  # what each store really holds
        self.last = {}
        self.claims = {}  # (store, path) -> deadline
        self.inventoried = set()
        self.open = set()  # stores with an inventory begun and not ended
        self.low_claimed = clock.seconds()  # a claim on a file below copies

    @property
    def now(self):
        return self.clock.seconds()

    @property
    def safe(self):
        return self.now < 5 * INTERVAL and self.inventoried != set(STORES)

    def live(self, store):
        return store in self.last and self.now - self.last[store] < DEAD

    def dead(self, store):
        """Declared dead (a store that never reported is not)."""
        return store in self.last and self.now - self.last[store] >= DEAD

    def forget_dead_claims(self):
        """A store's claims end when it is declared dead."""
        for store, path in [k for k in self.claims if self.dead(k[0])]:
            del self.claims[(store, path)]

    def holds(self, store, path):
        return path in self.current and self.truth[store].get(path) == self.current[path]

    def hosts(self, path, exclude_host=None):
        return {
            STORES[t] for t in STORES
            if self.live(t) and self.holds(t, path) and STORES[t] != exclude_host
        }

    def claimers(self, path):
        return {t for (t, p), d in self.claims.items() if p == path and d > self.now}

    def with_claims(self, path):
        return len(self.hosts(path) | {STORES[t] for t in self.claimers(path)})

    def host_has(self, store, path):
        mates = [t for t in STORES if STORES[t] == STORES[store]]
        return any(self.holds(t, path) for t in mates) or any(
            STORES[t] == STORES[store] for t in self.claimers(path)
        )


class ModelTests(SynchronousTestCase):
    """Any order of reports, claims, drops, time and rescans keeps the rules."""

    @given(st.booleans(), ops_st)
    def test_ledger_agrees_with_model(self, start_safe, ops):
        clock = Clock()
        ledger = Ledger(SOURCE, COPIES, clock, STORES, report_interval=INTERVAL,
                        dead_after=DEAD, claim_ttl=TTL)
        scan(ledger, [rec(p, *VERSIONS[0]) for p in PATHS])
        model = Model(clock)
        if not start_safe:
            clock.advance(5 * INTERVAL)
            self.assertFalse(ledger.safemode)
        for op in ops:
            getattr(self, "do_" + op[0])(ledger, model, *op[1:])
            self.check(ledger, model)

    def do_fetch(self, ledger, model, stores, path):
        for store in sorted(stores):
            if path in model.current:
                model.truth[store][path] = model.current[path]
                model.claims.pop((store, path), None)
                model.last[store] = model.now
                ledger.report(store, [rec(path, *model.current[path])])

    def do_fetchmany(self, ledger, model, store, items):
        """Report (path, version) items at once; None is the current version."""
        records = []
        for path, version in items:
            if path not in model.current:
                continue
            version = version or model.current[path]
            model.truth[store][path] = version
            if version == model.current[path]:
                model.claims.pop((store, path), None)
            records.append(rec(path, *version))
        model.last[store] = model.now
        ledger.report(store, records)

    def do_losemany(self, ledger, model, store, paths):
        for path in paths:
            model.truth[store].pop(path, None)
        model.last[store] = model.now
        ledger.report(store, removed=paths)

    def do_lose(self, ledger, model, store, path):
        if path in model.truth[store]:
            del model.truth[store][path]
            model.last[store] = model.now
            ledger.report(store, removed=[path])

    def do_report(self, ledger, model, store):
        model.last[store] = model.now
        ledger.report(store)

    def do_inventory(self, ledger, model, store):
        model.last[store] = model.now
        for key in [k for k in model.claims if k[0] == store]:
            del model.claims[key]  # a new session drops the store's claims
        ledger.inventory_started(store)
        ledger.report(store, [rec(p, *v) for p, v in sorted(model.truth[store].items())])
        ledger.inventory_finished(store)
        model.inventoried.add(store)
        model.open.discard(store)

    def do_begin(self, ledger, model, store):
        model.last[store] = model.now
        for key in [k for k in model.claims if k[0] == store]:
            del model.claims[key]
        ledger.inventory_started(store)
        ledger.report(store, [rec(p, *v) for p, v in sorted(model.truth[store].items())])
        model.open.add(store)

    def do_end(self, ledger, model, store):
        if store not in model.open:
            return
        model.last[store] = model.now
        ledger.inventory_finished(store)
        model.open.discard(store)
        model.inventoried.add(store)

    def do_advance(self, ledger, model, seconds):
        clock_before = model.now
        model.clock.advance(seconds)
        self.assertEqual(model.now, clock_before + seconds)

    def do_rescan(self, ledger, model, files, complete):
        scan(ledger, [rec(p, *v) for p, v in sorted(files.items())],
             complete, None if complete else "boom")
        if complete:
            model.current = dict(files)
            for key in [k for k in model.claims if k[1] not in files]:
                del model.claims[key]
        else:
            model.current.update(files)
        # A store whose copy became current again is done fetching it.
        for key in [k for k in model.claims if model.holds(*k)]:
            del model.claims[key]

    def do_claim(self, ledger, model, store, path, fill):
        if path not in model.current:
            self.assertRaises(UnknownPath, ledger.claim, store, [path], fill)
            return
        renew = store in model.claimers(path)
        under = any(len(model.hosts(p)) < COPIES for p in model.current)  # real copies
        # Fill waits for files below copies while somebody claims them.
        stuck = model.now - model.low_claimed >= TTL
        expected = not model.safe and not model.dead(store) and (
            renew
            or (not model.host_has(store, path)
                and (model.with_claims(path) < COPIES
                     or (fill and (not under or stuck) and not model.claimers(path))))
        )
        granted = ledger.claim(store, [path], fill)
        self.assertEqual(granted, [path] if expected else [])
        if expected:
            model.claims[(store, path)] = model.now + TTL
            if len(model.hosts(path)) < COPIES:
                model.low_claimed = model.now

    def do_deletedrop(self, ledger, model, path, store):
        files = {p: v for p, v in model.current.items() if p != path}
        self.do_rescan(ledger, model, files, True)
        self.check(ledger, model)
        self.do_drop(ledger, model, store, path)

    def do_claimfetch(self, ledger, model, store, path):
        self.do_claim(ledger, model, store, path, False)
        self.check(ledger, model)
        self.do_fetch(ledger, model, {store}, path)

    def do_release(self, ledger, model, store, path):
        if path not in model.current:
            self.assertRaises(UnknownPath, ledger.release, store, [path])
            return
        ledger.release(store, [path])
        model.claims.pop((store, path), None)

    def do_drop(self, ledger, model, store, path):
        held = model.truth[store]
        if path not in model.current and path not in held:
            self.assertRaises(UnknownPath, ledger.drop, store, [path])
            return
        others = model.hosts(path, exclude_host=STORES[store])
        if model.holds(store, path):  # current: rule 4
            may = len(others) >= COPIES
        else:  # stale or an orphan: another live host keeps that version (rule 7)
            may = path in held and any(
                self.live(model, t) and STORES[t] != STORES[store]
                and model.truth[t].get(path) == held[path] for t in STORES)
        expected = not model.safe and path in held and may
        granted = ledger.drop(store, [path])
        self.assertEqual(granted, [path] if expected else [])
        if granted:
            self.drops_granted = getattr(self, "drops_granted", 0) + 1
            current = model.holds(store, path)
            del held[path]
            if current:
                # The rule itself: enough live current copies elsewhere.
                self.assertGreaterEqual(
                    len(model.hosts(path, exclude_host=STORES[store])), COPIES
                )

    @staticmethod
    def live(model, store):
        """Counted: reported and not declared dead (a ledger's live stores)."""
        return not model.dead(store)

    def check(self, ledger, model):
        model.forget_dead_claims()
        audit(self, ledger)
        status = ledger.status()
        histogram = Counter()
        sizes = Counter()
        for path, version in model.current.items():
            n = len(model.hosts(path))
            histogram[n] += 1
            sizes[n] += version[0]
        self.assertEqual(status.histogram, {n: [histogram[n], sizes[n]] for n in histogram})
        self.assertEqual(status.files, len(model.current))
        self.assertEqual(status.safemode, model.safe)
        for s in ledger.store_status():
            self.assertEqual(s.files, sum(model.holds(s.store, p) for p in model.current))
            self.assertEqual(s.claims, len([k for k, d in model.claims.items()
                                            if k[0] == s.store and d > model.now]))
        for store in STORES:
            needs = needs_all(ledger, store)
            if model.safe:
                self.assertEqual(needs, [])
                continue
            expected = {
                p: model.with_claims(p) for p in model.current
                if not model.host_has(store, p)
            }
            self.assertEqual({n.path: n.copies for n in needs}, expected)
            ranks = [rank(n.copies, n.wanted) for n in needs]
            self.assertEqual(ranks, sorted(ranks))
        for store in STORES:
            surplus = surplus_all(ledger, store, page=2)
            if model.safe:
                self.assertEqual(surplus, [])
                continue
            expected = {
                p: len(model.hosts(p)) for p in model.current
                if model.holds(store, p) and len(model.hosts(p)) > COPIES
            }
            self.assertEqual({n.path: n.copies for n in surplus}, expected)
            self.assertEqual(len(surplus), len(expected))
            counts = [n.copies for n in surplus]
            self.assertEqual(counts, sorted(counts, reverse=True))
