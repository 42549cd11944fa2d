"""
Tests for a config reload of a running ledger (issue 17): stores added and
removed live, copies and settings changed.  Besides the cases one by one,
hypothesis checks that a ledger changed live (A) answers as one built with
the final config (B) and fed the same history.
"""

from __future__ import annotations

from hypothesis import given, strategies as st
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from cluster_backup.ledger import Ledger, LedgerError, UnknownStore
from tests.test_ledger import (DEAD, INTERVAL, SOURCE, STORES, TTL, audit, make, needs_all, rec,
                               scan, surplus_all)

PATHS = [b"f0", b"f1", b"f2", b"f3"]
VERSIONS = [(10, 1), (10, 2), (20, 1)]


def histogram(ledger):
    return ledger.status().histogram


def forgotten(test, ledger, s):
    """The ledger keeps nothing of the removed store of index C{s}."""
    bit = 1 << s
    test.assertFalse(ledger._live & bit)
    test.assertFalse(any(m & bit for m in ledger._holders))
    test.assertFalse(any(m & bit for m in ledger._same_host))
    test.assertFalse(any(s in stale for stale in ledger._stale.values()))
    test.assertFalse(any(s in claims for claims in ledger._claims.values()))
    test.assertEqual((ledger._held_files[s], ledger._held_bytes[s]), (0, 0))
    test.assertEqual((ledger._used[s], ledger._quota[s], ledger._last[s]), (None, None, None))
    for per_store in (ledger._orphans, ledger._kept, ledger._pending, ledger._tell_stale,
                      ledger._tell_orphans, ledger._claimed):
        test.assertFalse(per_store[s])
    test.assertIsNone(ledger._inventory[s])
    test.assertNotIn(s, ledger._inventoried)


class AddStoreTests(SynchronousTestCase):
    """A store added live joins as a new store and counts once it reports."""

    def test_added_store_reports_and_counts(self):
        ledger, _ = make(copies=2, files=[b"f", b"g"])
        ledger.report("b:/1", [rec(b"f")])
        ledger.add_store("e:/1", "e")
        audit(self, ledger)
        by_store = {s.store: s for s in ledger.store_status()}
        self.assertEqual((by_store["e:/1"].state, by_store["e:/1"].host), ("new", "e"))
        self.assertEqual(ledger.deaths["e:/1"], 0)
        self.assertEqual([n.path for n in needs_all(ledger, "e:/1")], [b"g", b"f"])
        self.assertEqual(ledger.claim("e:/1", [b"f"]), [b"f"])
        ledger.inventory_started("e:/1")
        ledger.report("e:/1", [rec(b"f")], used=10, quota=1000)
        ledger.inventory_finished("e:/1")
        audit(self, ledger)
        self.assertEqual(histogram(ledger), {0: [1, 10], 2: [1, 10]})
        by_store = {s.store: s for s in ledger.store_status()}
        self.assertEqual((by_store["e:/1"].state, by_store["e:/1"].files), ("live", 1))

    def test_store_added_on_a_known_host_shares_its_copy(self):
        ledger, _ = make(copies=2, files=[b"f"])
        ledger.report("a:/1", [rec(b"f")])
        ledger.add_store("a:/3", "a")
        self.assertEqual(list(needs_all(ledger, "a:/3")), [])  # its host holds f
        ledger.report("a:/3", [rec(b"f")])
        audit(self, ledger)
        self.assertEqual(histogram(ledger), {1: [1, 10]})
        # Its host mates see its claims as their host's.
        ledger.report("a:/1", removed=[b"f"])
        ledger.report("a:/3", removed=[b"f"])
        self.assertEqual(ledger.claim("a:/3", [b"f"]), [b"f"])
        self.assertEqual(ledger.claim("a:/1", [b"f"]), [])

    def test_an_existing_id_is_refused(self):
        ledger, _ = make(files=[b"f"])
        self.assertRaises(ValueError, ledger.add_store, "b:/1", "b")
        self.assertEqual(len(ledger.store_status()), len(STORES))

    def test_in_safemode_the_added_store_is_waited_for(self):
        ledger, clock = make(files=[b"f"], safemode=True)
        for store in STORES:
            ledger.inventory_started(store)
            if store != "d:/1":
                ledger.inventory_finished(store)
        self.assertTrue(ledger.safemode)
        ledger.add_store("e:/1", "e")
        ledger.inventory_finished("d:/1")
        self.assertTrue(ledger.safemode)  # as a ledger built with e:/1 would
        ledger.inventory_started("e:/1")
        ledger.inventory_finished("e:/1")
        self.assertFalse(ledger.safemode)

    def test_safemode_does_not_come_back(self):
        ledger, clock = make(files=[b"f"], safemode=True)
        clock.advance(5 * INTERVAL)  # over by time, though nobody called since
        ledger.add_store("e:/1", "e")
        self.assertFalse(ledger.safemode)
        ledger, _ = make(files=[b"f"])  # over: every store inventoried
        ledger.add_store("e:/1", "e")
        self.assertFalse(ledger.safemode)


class RemoveStoreTests(SynchronousTestCase):
    """A store removed live leaves at once, and its copies stop counting."""

    def test_a_removed_store_is_refused_and_gone_from_status(self):
        ledger, _ = make(files=[b"f"])
        ledger.report("c:/1", [rec(b"f")], used=10, quota=100)
        ledger.remove_store("c:/1")
        audit(self, ledger)
        for call in (lambda: ledger.report("c:/1", [rec(b"f")]),
                     lambda: ledger.inventory_started("c:/1"),
                     lambda: ledger.needs("c:/1", None, 10),
                     lambda: ledger.claim("c:/1", [b"f"]),
                     lambda: ledger.remove_store("c:/1")):
            self.assertRaises(UnknownStore, call)
        self.assertNotIn("c:/1", [s.store for s in ledger.store_status()])
        self.assertNotIn("c:/1", ledger.deaths)

    def test_removing_the_only_holder_leaves_the_file_below_its_copies(self):
        ledger, _ = make(copies=1, files=[b"f", b"g"])
        ledger.report("c:/1", [rec(b"f")])
        ledger.report("b:/1", [rec(b"g")])
        self.assertEqual(ledger.status().under_files, 0)
        ledger.remove_store("c:/1")
        audit(self, ledger)
        status = ledger.status()
        self.assertEqual(status.histogram, {0: [1, 10], 1: [1, 10]})
        self.assertEqual((status.under_files, status.under_bytes), (1, 10))
        self.assertEqual([(n.path, n.copies) for n in needs_all(ledger, "d:/1")],
                         [(b"f", 0), (b"g", 1)])

    def test_its_claims_end(self):
        ledger, _ = make(copies=1, files=[b"f"])
        self.assertEqual(ledger.claim("a:/2", [b"f"]), [b"f"])
        self.assertEqual(ledger.claim("b:/1", [b"f"]), [])  # one claimed copy will do
        ledger.remove_store("a:/2")
        audit(self, ledger)
        self.assertEqual(ledger.claim("b:/1", [b"f"]), [b"f"])
        # a:/2's host mate no longer sees its claim as its host's.
        ledger.release("b:/1", [b"f"])
        self.assertEqual(ledger.claim("a:/1", [b"f"]), [b"f"])

    def test_a_host_mate_keeps_the_host_copy(self):
        ledger, _ = make(copies=2, files=[b"f"])
        for store in ("a:/1", "a:/2", "b:/1"):
            ledger.report(store, [rec(b"f")])
        ledger.remove_store("a:/2")
        audit(self, ledger)
        self.assertEqual(histogram(ledger), {2: [1, 10]})

    def test_a_removed_store_no_longer_keeps_an_orphan(self):
        ledger, _ = make(files=[b"f", b"g"])
        ledger.report("b:/1", [rec(b"f")])
        ledger.report("c:/1", [rec(b"f")])
        scan(ledger, [b"g"])  # f is an orphan on b and c
        ledger.remove_store("c:/1")
        self.assertEqual(ledger.drop("b:/1", [b"f"]), [])  # the last copy stays

    def test_the_same_id_added_again_is_a_new_store(self):
        ledger, _ = make(files=[b"f"])
        ledger.report("c:/1", [rec(b"f")])
        s = ledger._index["c:/1"]
        ledger.remove_store("c:/1")
        ledger.add_store("c:/1", "c")
        ledger.add_store("a:/3", "a")
        forgotten(self, ledger, s)
        mate = ledger._index["a:/2"]
        ledger.remove_store("a:/2")
        ledger.add_store("a:/4", "a")  # on the host a:/2 left
        forgotten(self, ledger, mate)
        audit(self, ledger)
        by_store = {s.store: s for s in ledger.store_status()}
        self.assertEqual((by_store["c:/1"].state, by_store["c:/1"].files), ("new", 0))
        self.assertEqual(len(ledger.store_status()), len(STORES) + 1)
        ledger.report("c:/1", [rec(b"f")])
        self.assertEqual(histogram(ledger), {1: [1, 10]})

    def test_a_removed_store_inventoried_no_longer_counts_for_safemode(self):
        ledger, _ = make(files=[b"f"], safemode=True)
        for store in ("a:/1", "a:/2", "b:/1", "c:/1"):
            ledger.inventory_started(store)
            ledger.inventory_finished(store)
        ledger.remove_store("a:/2")
        self.assertTrue(ledger.safemode)  # d:/1 is still awaited
        ledger.inventory_started("d:/1")
        ledger.inventory_finished("d:/1")
        self.assertFalse(ledger.safemode)

    def test_a_removed_store_is_forgotten(self):
        """
        Its stale copies and orphans do not come back as holdings when the
        source's files come back to those versions.
        """
        ledger, _ = make(copies=1, files=[b"f", b"g"])
        ledger.report("c:/1", [rec(b"f", 10, 2), rec(b"g")])  # f: stale
        scan(ledger, [b"f"])  # g: an orphan
        s = ledger._index["c:/1"]
        ledger.remove_store("c:/1")
        forgotten(self, ledger, s)
        scan(ledger, [rec(b"f", 10, 2), b"g"])
        forgotten(self, ledger, s)
        audit(self, ledger)
        self.assertEqual(ledger.status().histogram, {0: [2, 20]})

    def test_a_removed_store_before_the_first_scan_is_forgotten(self):
        ledger, _ = make(copies=1, files=None)  # no scan yet: reports wait
        ledger.report("c:/1", [rec(b"f")])
        s = ledger._index["c:/1"]
        ledger.remove_store("c:/1")
        scan(ledger, [b"f"])
        forgotten(self, ledger, s)
        self.assertEqual(ledger.status().histogram, {0: [1, 10]})

    def test_removing_the_last_store_awaited_ends_safemode(self):
        ledger, _ = make(files=[b"f"], safemode=True)
        for store in STORES:
            if store != "d:/1":
                ledger.inventory_started(store)
                ledger.inventory_finished(store)
        self.assertTrue(ledger.safemode)
        ledger.remove_store("d:/1")
        self.assertFalse(ledger.safemode)


class CopiesTests(SynchronousTestCase):
    """Copies changed live: low marks, needs and surplus follow."""

    def test_lowered_copies_make_surplus(self):
        ledger, _ = make(copies=3, files=[b"f"])
        for store in ("a:/1", "b:/1", "c:/1"):
            ledger.report(store, [rec(b"f")])
        self.assertEqual(surplus_all(ledger, "a:/1"), [])
        ledger.set_copies(2)
        audit(self, ledger)
        self.assertEqual([(n.path, n.copies, n.wanted) for n in surplus_all(ledger, "a:/1")],
                         [(b"f", 3, 2)])
        self.assertEqual(ledger.status().copies, 2)
        self.assertEqual(ledger.drop("a:/1", [b"f"]), [b"f"])

    def test_raised_copies_make_files_low(self):
        ledger, _ = make(copies=1, files=[b"f"])
        ledger.report("b:/1", [rec(b"f")])
        self.assertEqual(ledger.status().under_files, 0)
        self.assertEqual(ledger.claim("c:/1", [b"f"]), [])
        ledger.set_copies(2)
        audit(self, ledger)
        self.assertEqual(ledger.status().under_files, 1)
        self.assertEqual([(n.path, n.copies, n.wanted) for n in needs_all(ledger, "c:/1")],
                         [(b"f", 1, 2)])
        self.assertEqual(ledger.claim("c:/1", [b"f"]), [b"f"])

    def test_raised_copies_give_fill_time_to_wait(self):
        """Fill waits for newly low files up to stuck_after from the change."""
        ledger, clock = make(copies=1, files=[rec(b"f", 10)])
        ledger.report("b:/1", [rec(b"f", 10)], used=0, quota=10 * FIT)
        ledger.report("c:/1", used=0, quota=10 * FIT)
        clock.advance(2 * TTL)
        ledger.set_copies(2)
        self.assertTrue(ledger.fill_waits)
        clock.advance(TTL)
        self.assertFalse(ledger.fill_waits)

    def test_bad_copies(self):
        ledger, _ = make(files=[b"f"])
        for bad in (0, -1, "2", 1.5):
            self.assertRaises(ValueError, ledger.set_copies, bad)
        self.assertEqual(ledger.copies, 2)


FIT = 1 << 21  # a quota step with room to spare beyond FIT_SLACK


class ConfigureTests(SynchronousTestCase):
    """report_interval, dead_after, stuck_after and max_change changed live."""

    def settings(self, **changed):
        options = dict(report_interval=INTERVAL, dead_after=DEAD, stuck_after=None,
                       max_change=None)
        options.update(changed)
        return options

    def test_a_shorter_dead_after_applies_at_once(self):
        ledger, clock = make(copies=1, files=[b"f"])
        ledger.report("b:/1", [rec(b"f")])
        clock.advance(600)
        self.assertEqual(ledger.status().under_files, 0)
        ledger.configure(**self.settings(dead_after=500))
        self.assertEqual(ledger.status().under_files, 1)
        self.assertEqual(ledger.deaths["b:/1"], 1)
        ledger.report("b:/1")
        self.assertEqual(ledger.status().under_files, 0)

    def test_a_longer_report_interval_moves_stale(self):
        ledger, clock = make(files=[b"f"])
        ledger.report("b:/1")
        clock.advance(4 * INTERVAL)
        states = {s.store: s.state for s in ledger.store_status()}
        self.assertEqual(states["b:/1"], "stale")
        ledger.configure(**self.settings(report_interval=2 * INTERVAL))
        states = {s.store: s.state for s in ledger.store_status()}
        self.assertEqual(states["b:/1"], "live")

    def test_max_change_applies_to_the_next_scan(self):
        files = [b"f%d" % n for n in range(20)]
        ledger, _ = make(files=files)
        ledger.configure(**self.settings(max_change=0.2))
        scan(ledger, files[:10])
        self.assertIsNotNone(ledger.status().held)
        ledger.configure(**self.settings(max_change=None))
        self.assertIsNotNone(ledger.status().held)  # held until accepted or rescanned
        scan(ledger, files[:10])
        self.assertIsNone(ledger.status().held)
        self.assertEqual(ledger.status().files, 10)

    def test_stuck_after(self):
        ledger, clock = make(copies=1, files=[rec(b"f", 10)])
        ledger.report("c:/1", used=0, quota=10 * FIT)
        self.assertEqual(ledger.claim("b:/1", [b"f"]), [b"f"])
        self.assertTrue(ledger.fill_waits)
        ledger.configure(**self.settings(stuck_after=10))
        clock.advance(10)
        self.assertFalse(ledger.fill_waits)


# -- a ledger changed live against one built with the final config -------------

def ops_st(stores, kinds):
    """Lists of operations of C{kinds}, naming C{stores}."""
    store = st.sampled_from(sorted(stores))
    path = st.sampled_from(PATHS + [b"x"])  # x: never on the source
    version = st.sampled_from([None] * 3 + VERSIONS)  # None: the current version
    items = st.lists(st.tuples(path, version), min_size=1, max_size=4)
    paths = st.lists(path, min_size=1, max_size=3)
    every = {
        "fetch": st.tuples(st.just("fetch"), store, items),
        "lose": st.tuples(st.just("lose"), store, paths),
        "usage": st.tuples(st.just("usage"), store, st.sampled_from([0, 5 * FIT]),
                           st.sampled_from([FIT, 10 * FIT])),
        "keep": st.tuples(st.just("keep"), store, path, st.sampled_from(VERSIONS)),
        "dropkept": st.tuples(st.just("dropkept"), store, path, st.sampled_from(VERSIONS)),
        "inventory": st.tuples(st.just("inventory"), store, items),
        "begin": st.tuples(st.just("begin"), store, items),
        "end": st.tuples(st.just("end"), store),
        "advance": st.tuples(st.just("advance"), st.sampled_from([1, 30, 200, 400, 4000])),
        "rescan": st.tuples(st.just("rescan"), st.dictionaries(path, st.sampled_from(VERSIONS)),
                            st.booleans()),
        "claim": st.tuples(st.just("claim"), store, paths, st.booleans()),
        "lowclaim": st.tuples(st.just("lowclaim"), store, paths),
        "release": st.tuples(st.just("release"), store, paths),
        "drop": st.tuples(st.just("drop"), store, paths),
    }
    return st.lists(st.one_of([every[k] for k in kinds]), max_size=30)


# Calls whose outcome depends neither on other stores nor on copies.
QUIET = ["fetch", "lose", "usage", "keep", "dropkept", "inventory", "begin", "end", "advance",
         "rescan", "release"]
ALL = QUIET + ["claim", "drop"]


class Twins:
    """
    Ledger C{a}, to be changed live, and ledger C{b}, built with the final
    config: one clock, one history, after one scan and out of safemode by
    time (a ledger with more stores would wait longer for inventories).
    """

    def __init__(self, test, stores_a, stores_b, copies_a=2, copies_b=2):
        self.test = test
        self.clock = Clock()
        self.a = Ledger(SOURCE, copies_a, self.clock, stores_a, report_interval=INTERVAL,
                        dead_after=DEAD, claim_ttl=TTL)
        self.b = Ledger(SOURCE, copies_b, self.clock, stores_b, report_interval=INTERVAL,
                        dead_after=DEAD, claim_ttl=TTL)
        self.stores_b = stores_b
        self.current = {p: VERSIONS[0] for p in PATHS}
        for ledger in (self.a, self.b):
            scan(ledger, [rec(p, *v) for p, v in self.current.items()])
        self.clock.advance(5 * INTERVAL)

    def run(self, ops, only_a=(), compare=True):
        """
        Apply C{ops} to both ledgers (those naming a store of C{only_a} to
        C{a} alone), check that both answer alike and, if C{compare}, that
        they agree after each.
        """
        for op in ops:
            if op[0] == "lowclaim":
                # A claim granted whatever the copies: of files the store's
                # needs list below the copies of both ledgers.
                low = min(self.a.copies, self.b.copies)
                listed = {n.path for n in needs_all(self.a, op[1]) if n.copies < low}
                op = ("claim", op[1], [p for p in op[2] if p in listed], False)
            if op[0] == "advance":
                self.clock.advance(op[1])
            elif op[0] == "rescan":
                for ledger in (self.a, self.b):
                    scan(ledger, [rec(p, *v) for p, v in sorted(op[1].items())], op[2],
                         None if op[2] else "boom")
                if op[2]:
                    self.current = dict(op[1])
                else:
                    self.current.update(op[1])
            elif op[1] in only_a:
                self.call(self.a, op)
            else:
                self.test.assertEqual(self.call(self.a, op), self.call(self.b, op), op)
            audit(self.test, self.a)
            if compare:
                self.check()

    def records(self, items):
        return [rec(p, *(v or self.current.get(p, VERSIONS[0]))) for p, v in items]

    def call(self, ledger, op):
        """One operation on one ledger: its answer, or the class of its refusal."""
        kind, store = op[0], op[1]
        try:
            if kind == "fetch":
                return ledger.report(store, self.records(op[2]))
            if kind == "lose":
                return ledger.report(store, removed=op[2])
            if kind == "usage":
                return ledger.report(store, used=op[2], quota=op[3])
            if kind == "keep":
                return ledger.report(store, kept=[rec(op[2], *op[3])])
            if kind == "dropkept":
                return ledger.drop_kept(store, [rec(op[2], *op[3])])
            if kind in ("inventory", "begin"):
                ledger.inventory_started(store)
                answer = ledger.report(store, self.records(op[2]))
                if kind == "begin":
                    return answer
                return answer, ledger.inventory_finished(store)
            if kind == "end":
                return ledger.inventory_finished(store)
            if kind == "claim":
                return ledger.claim(store, op[2], op[3])
            if kind == "release":
                return ledger.release(store, op[2])
            if kind == "drop":
                return ledger.drop(store, op[2])
        except LedgerError as e:
            return type(e)
        raise AssertionError(op)

    def check(self):
        """Both ledgers say the same: status, stores, deaths, needs, surplus."""
        for ledger in (self.a, self.b):
            audit(self.test, ledger)
        self.test.assertEqual(self.a.status(), self.b.status())
        self.test.assertEqual(self.a.store_status(), self.b.store_status())
        self.test.assertEqual(self.a.deaths, self.b.deaths)
        for store in self.stores_b:
            self.test.assertEqual(needs_all(self.a, store), needs_all(self.b, store), store)
            self.test.assertEqual(surplus_all(self.a, store, page=2),
                                  surplus_all(self.b, store, page=2), store)


class LiveAgainstBuiltTests(SynchronousTestCase):
    """
    A ledger changed live answers as one built with the final config and
    fed the same history, then keeps doing so.  At the change the clock
    then moves on, by a second or by C{stuck_after}: the fill rule keeps
    its answer for a second, and its stuck timer is the one thing a live
    change does not rebuild (see L{Ledger.set_copies}; a removed store's
    claims also counted as fetches of low files).
    """

    @given(st.data())
    def test_add_store(self, data):
        store, host = data.draw(st.sampled_from([("e:/1", "e"), ("a:/3", "a")]))
        final = dict(STORES, **{store: host})
        twins = Twins(self, STORES, final)
        twins.run(data.draw(ops_st(STORES, ALL)), compare=False)
        twins.a.add_store(store, host)
        twins.check()
        self.clock_moves(twins, 1)
        twins.run(data.draw(ops_st(final, ALL)))

    @given(st.data())
    def test_remove_store(self, data):
        removed = data.draw(st.sampled_from(sorted(STORES)))
        final = {s: h for s, h in STORES.items() if s != removed}
        twins = Twins(self, STORES, final)
        twins.run(data.draw(ops_st(final, ALL)), compare=False)
        # Then the removed store does anything while the others' calls
        # decide nothing its copies or claims could change.
        during = st.one_of(ops_st(final, QUIET), ops_st([removed], ALL))
        twins.run(data.draw(st.lists(during, max_size=4).map(sum_lists)), only_a=[removed],
                  compare=False)
        index = twins.a._index[removed]
        twins.a.remove_store(removed)
        twins.check()
        forgotten(self, twins.a, index)
        self.assertRaises(UnknownStore, twins.a.report, removed, [rec(b"f0")])
        self.clock_moves(twins, TTL)
        twins.run(data.draw(ops_st(final, ALL)))
        forgotten(self, twins.a, index)

    @given(st.data())
    def test_set_copies(self, data):
        old, new = data.draw(st.tuples(st.integers(1, 4), st.integers(1, 4)))
        twins = Twins(self, STORES, STORES, copies_a=old, copies_b=new)
        twins.run(data.draw(ops_st(STORES, QUIET + ["lowclaim"])), compare=False)
        twins.a.set_copies(new)
        twins.check()
        self.clock_moves(twins, TTL if new > old else 1)
        twins.run(data.draw(ops_st(STORES, ALL)))

    def clock_moves(self, twins, seconds):
        twins.clock.advance(seconds)
        twins.check()


def sum_lists(lists):
    out = []
    for one in lists:
        out.extend(one)
    return out
