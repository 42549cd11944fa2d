"""
Tests for L{cluster_backup.planner}: hypothesis properties over random
stores and offers, and a few worked examples.
"""

from __future__ import annotations

from hypothesis import given, settings, strategies as st
from twisted.trial import unittest

from cluster_backup.planner import SWAP_MARGIN, Drop, Held, Orphan, Plan, may_swap, plan
from cluster_backup.records import Need, rank

from .planner_reference import reference_plan

NOW = 10_000.0
SOURCES = ["h1:/a", "h2:/b", "h3:/c"]


def flat_cost(overhead=10):
    return lambda source, path, size: size + overhead


def need(path, size=100, copies=0, wanted=2, mtime=1):
    return Need(path, size, mtime, copies, wanted)


# --- strategies -----------------------------------------------------------

paths = st.sampled_from([b"f%d" % i for i in range(12)] + [b"caf\xe9", b"d/\xff"])


@st.composite
def scenarios(draw):
    sources = SOURCES[: draw(st.integers(1, 3))]
    needs = []
    for s in sources:
        ps = draw(st.lists(paths, unique=True, max_size=8))
        needs.append((s, [
            need(p, draw(st.integers(0, 1500)), draw(st.integers(0, 5)), draw(st.integers(1, 4)))
            for p in ps]))
    held = [
        Held(s, p, draw(st.integers(0, 1500)), draw(st.integers(1, 6)), draw(st.integers(1, 4)))
        for s, p in draw(st.lists(st.tuples(st.sampled_from(sources), paths),
                                  unique=True, max_size=8))
    ]
    held_keys = {(h.source, h.path) for h in held}
    orphans = [
        Orphan(s, p, draw(st.integers(0, 800)), draw(st.floats(0, NOW)))
        for s, p in draw(st.lists(st.tuples(st.sampled_from(sources), paths),
                                  unique=True, max_size=5))
        if (s, p) not in held_keys
    ] + kept_versions(draw, sources, paths, st.integers(0, 800))
    keys = [(s, n.path) for s, ns in needs for n in ns]
    busy = set(draw(st.lists(st.sampled_from(keys), max_size=4))) if keys else set()
    no_drop = (set(draw(st.lists(st.sampled_from(sorted(held_keys)), max_size=3)))
               if held_keys else set())
    keep = {s: draw(st.floats(0, 2 * NOW)) for s in sources if draw(st.booleans())}
    overhead = draw(st.integers(1, 60))
    quota = draw(st.integers(0, 6000))
    free = draw(st.integers(-200, quota))
    return dict(free=free, quota=quota, needs=needs, held=held, orphans=orphans,
                busy=busy, no_drop=no_drop, keep_deleted=keep, now=NOW,
                cost=flat_cost(overhead), hold_fill=draw(st.booleans()))


def kept_versions(draw, sources, paths, sizes) -> list:
    """Superseded versions kept (rule 7): orphans of a path, possibly one offered."""
    return [
        Orphan(s, b"%d\0" % n + p, draw(sizes), draw(st.floats(0, NOW)), of=p)
        for n, (s, p) in enumerate(draw(st.lists(st.tuples(st.sampled_from(sources), paths),
                                                 max_size=3)))
    ]


@st.composite
def full_stores(draw):
    """
    A store with little or no free space, many surplus copies and many
    offers at every copy count: the swap search at work (zero sizes and
    costs included).
    """
    sources = SOURCES[: draw(st.integers(1, 3))]
    many = st.sampled_from([b"p%d" % i for i in range(30)])
    # Few sizes, so that room often fits exactly.
    sizes = st.sampled_from([0, 1, 10, 100, 250, 500])
    needs = []
    for s in sources:
        ps = draw(st.lists(many, max_size=14))  # repeats: a path offered twice
        needs.append((s, [
            need(p, draw(sizes), draw(st.integers(0, 5)), draw(st.integers(1, 4)))
            for p in ps]))
    held = [
        Held(s, p, draw(sizes), draw(st.integers(1, 7)), draw(st.integers(1, 3)))
        for s, p in draw(st.lists(st.tuples(st.sampled_from(sources), many),
                                  unique=True, max_size=24))
    ]
    held_keys = {(h.source, h.path) for h in held}
    orphans = [
        Orphan(s, p, draw(sizes), draw(st.floats(0, NOW)))
        for s, p in draw(st.lists(st.tuples(st.sampled_from(sources), many),
                                  unique=True, max_size=4))
        if (s, p) not in held_keys
    ] + kept_versions(draw, sources, many, sizes)
    no_drop = (set(draw(st.lists(st.sampled_from(sorted(held_keys)), max_size=4)))
               if held_keys else set())
    keep = {s: draw(st.floats(0, 2 * NOW)) for s in sources if draw(st.booleans())}
    quota = draw(st.sampled_from([100, 500, 3000, 3000]))
    return dict(free=draw(st.sampled_from([-100, 0, 0, 10, 100])), quota=quota, needs=needs,
                held=held, orphans=orphans, busy=set(), no_drop=no_drop, keep_deleted=keep,
                now=NOW, cost=flat_cost(draw(st.sampled_from([0, 0, 1, 10]))))


def candidates(args):
    """The needs the planner may consider, with their sort keys."""
    skip = set(args["busy"]) | {(h.source, h.path) for h in args["held"]}
    skip |= {(o.source, o.path) for o in args["orphans"]}
    out = {}
    for order, (s, ns) in enumerate(args["needs"]):
        for index, n in enumerate(ns):
            if (s, n.path) not in skip and (s, n.path) not in out:
                out[(s, n.path)] = ((rank(n.copies, n.wanted), index, order), n)
    return out


def expired(args, o):
    keep = args["keep_deleted"].get(o.source)
    return keep is not None and args["now"] - o.since >= keep


class PropertyTests(unittest.SynchronousTestCase):
    """Invariants of L{plan} over random inputs."""

    def run_plan(self, args) -> Plan:
        return plan(**args)

    def fetched_cost(self, args, p):
        return sum(args["cost"](s, n.path, n.size) for s, n in p.fetch)

    @given(scenarios())
    def test_quota_never_exceeded(self, args):
        p = self.run_plan(args)
        orphans = {(o.source, o.path): o for o in args["orphans"]}
        freed = sum(orphans[k].size for k in p.delete_orphans)
        if p.fetch:
            self.assertLessEqual(self.fetched_cost(args, p), args["free"] + freed)
        self.assertEqual(len(set(p.delete_orphans)), len(p.delete_orphans))

    @given(scenarios())
    def test_nothing_the_host_holds(self, args):
        p = self.run_plan(args)
        keys = [(s, n.path) for s, n in p.fetch]
        self.assertEqual(len(keys), len(set(keys)))
        held = {(h.source, h.path) for h in args["held"]}
        for k in keys:
            self.assertNotIn(k, args["busy"])
            self.assertNotIn(k, held)

    @given(scenarios())
    def test_drops_only_surplus_or_young_orphans_and_allowed(self, args):
        p = self.run_plan(args)
        held = {(h.source, h.path): h for h in args["held"]}
        orphans = {(o.source, o.path): o for o in args["orphans"]}
        wanted = {(s, n.path): n for s, ns in args["needs"] for n in ns}
        dropped = [(d.source, d.path) for d in p.drops]
        self.assertEqual(len(dropped), len(set(dropped)))
        for d in p.drops:
            key = (d.source, d.path)
            self.assertNotIn(key, args["no_drop"])
            self.assertIn((d.for_source, d.for_path), p.waiting)
            if key in orphans:
                # Rule 7: an orphan within keep deleted makes room only for
                # a file below its copies (an expired one is deleted, not asked).
                self.assertFalse(expired(args, orphans[key]))
                n = wanted[(d.for_source, d.for_path)]
                self.assertLess(n.copies, n.wanted)
                self.assertNotIn(key, p.delete_orphans)
            else:
                h = held[key]
                self.assertGreater(h.copies, h.wanted)

    @given(scenarios())
    def test_swap_margin(self, args):
        p = self.run_plan(args)
        held = {(h.source, h.path): h for h in args["held"]}
        wanted = {(s, n.path): n for s, ns in args["needs"] for n in ns}
        for d in p.drops:
            n = wanted[(d.for_source, d.for_path)]
            h = held.get((d.source, d.path))
            if h is not None:
                self.assertTrue(n.copies < n.wanted or n.copies <= h.copies - SWAP_MARGIN,
                                (n, h))

    @given(st.data())
    def test_swap_margin_when_full_and_nothing_is_below_copies(self, data):
        """A full store, all needs at or above copies: swaps need the margin."""
        held = [Held("h1:/a", b"s%d" % i, data.draw(st.integers(1, 500)),
                     data.draw(st.integers(2, 6)), 1) for i in range(data.draw(st.integers(1, 6)))]
        needs = [need(b"w%d" % i, data.draw(st.integers(1, 500)), copies=c, wanted=w)
                 for i, (c, w) in enumerate(data.draw(st.lists(
                     st.integers(1, 6).flatmap(lambda c: st.tuples(st.just(c), st.integers(1, c))),
                     min_size=1, max_size=6)))]
        p = plan(free=0, quota=10**6, needs=[("h2:/b", needs)], cost=flat_cost(1),
                 now=NOW, keep_deleted={}, held=held)
        by_path = {h.path: h for h in held}
        wanted = {n.path: n for n in needs}
        for d in p.drops:
            self.assertLessEqual(wanted[d.for_path].copies, by_path[d.path].copies - SWAP_MARGIN)
        self.assertEqual(p.fetch, [])

    @given(scenarios())
    def test_waiting_files_are_not_fetched_yet(self, args):
        p = self.run_plan(args)
        fetched = {(s, n.path) for s, n in p.fetch}
        self.assertFalse(fetched & set(p.waiting))
        self.assertEqual(bool(p.drops), bool(p.waiting))

    @given(scenarios())
    def test_rarest_first(self, args):
        """No fetched file ranks after an unfetched one that would have fit."""
        p = self.run_plan(args)
        cands = candidates(args)
        cost = args["cost"]
        fetched = {(s, n.path) for s, n in p.fetch}
        room = args["free"] + sum(o.size for o in args["orphans"] if expired(args, o))
        for key, (order, n) in cands.items():
            if key in fetched or cost(key[0], n.path, n.size) > args["quota"]:
                continue
            later = [k for k in fetched if cands[k][0] > order]
            if not later:
                continue
            before = sum(cost(k[0], cands[k][1].path, cands[k][1].size)
                         for k in fetched if cands[k][0] < order)
            self.assertGreater(cost(key[0], n.path, n.size), room - before, (key, later))

    @given(scenarios())
    def test_fetch_order_is_rank_order(self, args):
        p = self.run_plan(args)
        cands = candidates(args)
        orders = [cands[(s, n.path)][0] for s, n in p.fetch]
        self.assertEqual(orders, sorted(orders))

    @given(scenarios())
    def test_too_big_skipped(self, args):
        p = self.run_plan(args)
        cost = args["cost"]
        big = {k for k, (_, n) in candidates(args).items()
               if cost(k[0], n.path, n.size) > args["quota"]}
        self.assertEqual(set(p.skipped_too_big), big)
        self.assertFalse(big & {(s, n.path) for s, n in p.fetch})
        self.assertFalse(big & set(p.waiting))

    @given(scenarios())
    def test_orphans(self, args):
        """Expired orphans are deleted; young ones never, only asked for."""
        p = self.run_plan(args)
        deleted = set(p.delete_orphans)
        old = [o for o in args["orphans"] if expired(args, o)]
        young = sorted((o for o in args["orphans"] if not expired(args, o)
                        and (o.source, o.path) not in args["no_drop"]),
                       key=lambda o: (o.since, o.source, o.path))
        self.assertEqual(deleted, {(o.source, o.path) for o in old})
        # A file below its copies asks first for its own old versions (rule
        # 7), then for the others oldest first: those others are the oldest
        # of the young orphans not asked as someone's own version.
        by_key = {(o.source, o.path): o for o in young}
        asked = [(by_key[(d.source, d.path)], d) for d in p.drops
                 if (d.source, d.path) in by_key]
        own = {id(o) for o, d in asked if o.of is not None
               and (o.source, o.of) == (d.for_source, d.for_path)}
        others = sorted((o for o, d in asked if id(o) not in own),
                        key=lambda o: (o.since, o.source, o.path))
        rest = [o for o in young if id(o) not in own]
        self.assertEqual(others, rest[: len(others)])


class ReferenceTests(unittest.SynchronousTestCase):
    """
    L{plan} decides exactly as the plain L{reference_plan}: the same
    fetches, drops, deletions, skips and waits, in the same order.
    """

    @given(scenarios())
    def test_same_as_reference(self, args):
        self.assertEqual(plan(**args), reference_plan(**args))

    @settings(max_examples=500)
    @given(full_stores())
    def test_same_as_reference_when_full(self, args):
        self.assertEqual(plan(**args), reference_plan(**args))

    def test_same_as_reference_at_scale(self):
        """Thousands of offers and surplus copies, as a store sees at 1,000,000 files."""
        import random
        rng = random.Random(7)
        for free in (-5000, 0, 300_000, 3_000_000):
            needs = [(sid, [need(b"n%d" % i, rng.randint(1, 20_000), rng.randint(0, 4),
                                 rng.randint(1, 3)) for i in range(2000)])
                     for sid in SOURCES]
            held = [Held(sid, b"h%d" % i, rng.randint(1, 20_000), rng.randint(1, 6),
                         rng.randint(1, 3)) for sid in SOURCES for i in range(1500)]
            args = dict(free=free, quota=10**7, needs=needs, held=held, cost=flat_cost(7),
                        now=NOW, keep_deleted={}, busy={(SOURCES[0], b"n5")},
                        no_drop={(SOURCES[1], b"h3")})
            self.assertEqual(plan(**args), reference_plan(**args))


class ExampleTests(unittest.SynchronousTestCase):
    """Worked cases of the rules, one each."""

    def plan(self, **kw):
        args = dict(free=10_000, quota=100_000, needs=[], cost=flat_cost(0),
                    now=NOW, keep_deleted={})
        args.update(kw)
        return plan(**args)

    def test_rarest_first_across_sources_ties_by_server_order(self):
        p = self.plan(needs=[
            ("h1:/a", [need(b"a1", copies=1), need(b"a2", copies=0), need(b"a3", copies=3, wanted=2)]),
            ("h2:/b", [need(b"b1", copies=0), need(b"b2", copies=2, wanted=4)]),
        ])
        self.assertEqual([(s, n.path) for s, n in p.fetch], [
            ("h2:/b", b"b1"), ("h1:/a", b"a2"), ("h1:/a", b"a1"), ("h2:/b", b"b2")])

    def test_greedy_fill_waits_for_needed_files(self):
        """Surplus is fetched only in a round that offers nothing below its copies."""
        needed = ("h1:/a", [need(b"a1", copies=1), need(b"s", copies=3, wanted=2)])
        self.assertEqual([n.path for _, n in self.plan(needs=[needed]).fetch], [b"a1"])
        surplus_only = ("h1:/a", [need(b"s", copies=3, wanted=2)])
        self.assertEqual([n.path for _, n in self.plan(needs=[surplus_only]).fetch], [b"s"])

    def test_greedy_fill_when_no_needed_file_can_be_placed_here(self):
        """
        A needed file that fits the quota but not the free space, with no
        surplus here to drop for it, is not planned: then the free space is
        filled (a full store elsewhere may then drop its now-surplus copy of
        the filled file and take the needed one in).  Waiting would leave
        the space idle for good.
        """
        big = ("h1:/a", [need(b"big", 600, copies=1), need(b"s", 300, copies=2, wanted=2)])
        held = [Held("h1:/a", b"h", 100, 2, 2)]  # held at its copies: not droppable
        p = self.plan(free=500, quota=5_000, needs=[big], held=held)
        self.assertEqual([n.path for _, n in p.fetch], [b"s"])
        self.assertEqual((p.drops, p.waiting), ([], []))
        # With room for it, the needed file goes first and fill waits.
        p = self.plan(free=700, quota=5_000, needs=[big], held=held)
        self.assertEqual([n.path for _, n in p.fetch], [b"big"])
        # With surplus to drop for it, drops are asked and fill waits too.
        surplus = [Held("h1:/a", b"h", 200, 3, 2)]
        p = self.plan(free=500, quota=5_000, needs=[big], held=surplus)
        self.assertEqual((p.fetch, p.waiting), ([], [("h1:/a", b"big")]))

    def test_no_fill_while_a_server_holds_it(self):
        """A server whose files below copies are being fetched holds fill of every source."""
        offered = [("h1:/a", [need(b"s", copies=3, wanted=2)]),
                   ("h2:/b", [need(b"t", copies=2, wanted=2)])]
        self.assertEqual(self.plan(needs=offered, hold_fill=True).fetch, [])
        self.assertEqual(len(self.plan(needs=offered).fetch), 2)
        # Needed files are fetched all the same, even one that nothing waits on.
        offered[1][1].append(need(b"u", copies=1, wanted=2))
        p = self.plan(needs=offered, hold_fill=True)
        self.assertEqual([n.path for _, n in p.fetch], [b"u"])

    def test_fills_free_space_only(self):
        p = self.plan(free=250, needs=[("h1:/a", [need(b"x", 100), need(b"y", 200), need(b"z", 150)])])
        self.assertEqual([n.path for _, n in p.fetch], [b"x", b"z"])
        self.assertEqual(p.drops, [])

    def test_too_big_for_quota(self):
        p = self.plan(quota=1000, needs=[("h1:/a", [need(b"huge", 1001), need(b"ok", 10)])])
        self.assertEqual(p.skipped_too_big, [("h1:/a", b"huge")])
        self.assertEqual([n.path for _, n in p.fetch], [b"ok"])

    def test_expired_orphans_deleted_young_kept(self):
        p = self.plan(keep_deleted={"h1:/a": 100.0}, orphans=[
            Orphan("h1:/a", b"old", 5, NOW - 200), Orphan("h1:/a", b"young", 5, NOW - 50),
            Orphan("h2:/b", b"forever", 5, 0.0)])
        self.assertEqual(p.delete_orphans, [("h1:/a", b"old")])

    def test_young_orphans_are_asked_for_oldest_first(self):
        """Within keep deleted an orphan goes only with the server's grant."""
        p = self.plan(free=50, keep_deleted={"h1:/a": 10**9}, orphans=[
            Orphan("h1:/a", b"o3", 100, 30.0), Orphan("h1:/a", b"o1", 100, 10.0),
            Orphan("h1:/a", b"o2", 100, 20.0)],
            needs=[("h1:/a", [need(b"want", 200, copies=1)])])
        self.assertEqual(p.delete_orphans, [])
        self.assertEqual([(d.path, d.for_path) for d in p.drops],
                         [(b"o1", b"want"), (b"o2", b"want")])
        self.assertEqual((p.fetch, p.waiting), ([], [("h1:/a", b"want")]))

    def test_young_orphans_never_make_room_for_surplus(self):
        p = self.plan(free=0, keep_deleted={"h1:/a": 10**9},
                      orphans=[Orphan("h1:/a", b"o", 100, 1.0)],
                      needs=[("h1:/a", [need(b"extra", 100, copies=2, wanted=2)])])
        self.assertEqual((p.drops, p.delete_orphans, p.fetch, p.waiting), ([], [], [], []))

    def test_a_files_own_old_version_is_asked_for_first(self):
        """A store that must make room for a file updates its old version in place."""
        p = self.plan(free=0, keep_deleted={"h1:/a": 10**9}, orphans=[
            Orphan("h1:/a", b"older", 100, 1.0),
            Orphan("h1:/a", b"5.100\0want", 100, 9.0, of=b"want")],
            needs=[("h1:/a", [need(b"want", 100, copies=1)])])
        self.assertEqual([d.path for d in p.drops], [b"5.100\0want"])

    def test_refused_orphans_are_not_asked_again(self):
        p = self.plan(free=0, keep_deleted={"h1:/a": 10**9},
                      orphans=[Orphan("h1:/a", b"last", 100, 1.0),
                               Orphan("h1:/a", b"other", 100, 2.0)],
                      no_drop={("h1:/a", b"last")},
                      needs=[("h1:/a", [need(b"want", 100, copies=0)])])
        self.assertEqual([d.path for d in p.drops], [b"other"])

    def test_orphans_before_drops(self):
        p = self.plan(free=0, orphans=[Orphan("h1:/a", b"o", 100, 1.0)],
                      held=[Held("h1:/a", b"surplus", 100, 5, 1)],
                      needs=[("h1:/a", [need(b"want", 100, copies=0)])])
        self.assertEqual([d.path for d in p.drops], [b"o"])
        self.assertEqual(p.delete_orphans, [])

    def test_drop_requested_for_below_copies_file_fetch_waits(self):
        p = self.plan(free=10, held=[Held("h1:/a", b"s", 500, 3, 2)],
                      needs=[("h2:/b", [need(b"want", 300, copies=1, wanted=2),
                                        need(b"small", 5, copies=2, wanted=2)])])
        self.assertEqual([(d.source, d.path, d.for_path) for d in p.drops],
                         [("h1:/a", b"s", b"want")])
        self.assertEqual(p.waiting, [("h2:/b", b"want")])
        # the space is kept for the waiting file: nothing else fetched
        self.assertEqual(p.fetch, [])

    def test_hysteresis(self):
        surplus = Held("h1:/a", b"s", 500, 3, 1)
        one_fewer = need(b"w", 300, copies=2, wanted=1)
        two_fewer = need(b"w", 300, copies=1, wanted=1)
        self.assertFalse(may_swap(one_fewer, surplus))
        self.assertTrue(may_swap(two_fewer, surplus))
        p = self.plan(free=0, held=[surplus], needs=[("h2:/b", [one_fewer])])
        self.assertEqual((p.drops, p.fetch), ([], []))
        p = self.plan(free=0, held=[surplus], needs=[("h2:/b", [two_fewer])])
        self.assertEqual([d.path for d in p.drops], [b"s"])

    def test_never_drops_at_or_below_copies(self):
        p = self.plan(free=0, held=[Held("h1:/a", b"exact", 500, 2, 2)],
                      needs=[("h2:/b", [need(b"w", 100, copies=0)])])
        self.assertEqual(p.drops, [])
        self.assertEqual(p.waiting, [])

    def test_most_surplus_dropped_first(self):
        p = self.plan(free=0, held=[Held("h1:/a", b"plus1", 500, 3, 2),
                                    Held("h1:/a", b"plus3", 500, 5, 2),
                                    Held("h1:/a", b"plus2", 500, 4, 2)],
                      needs=[("h2:/b", [need(b"w", 400, copies=0)])])
        self.assertEqual([d.path for d in p.drops], [b"plus3"])

    def test_refused_drops_not_asked_again(self):
        p = self.plan(free=0, held=[Held("h1:/a", b"s", 500, 3, 1)],
                      no_drop={("h1:/a", b"s")},
                      needs=[("h2:/b", [need(b"w", 100, copies=0)])])
        self.assertEqual(p.drops, [])

    def test_no_drops_when_they_would_not_suffice(self):
        p = self.plan(free=0, held=[Held("h1:/a", b"s", 50, 3, 1)],
                      needs=[("h2:/b", [need(b"w", 100, copies=0)])])
        self.assertEqual((p.drops, p.waiting), ([], []))

    def test_busy_and_held_skipped(self):
        p = self.plan(busy={("h1:/a", b"other-store")}, held=[Held("h1:/a", b"mine", 1, 1, 1)],
                      needs=[("h1:/a", [need(b"other-store"), need(b"mine"), need(b"new")])])
        self.assertEqual([n.path for _, n in p.fetch], [b"new"])

    def test_drop_record(self):
        p = self.plan(free=0, held=[Held("h1:/a", b"s", 500, 3, 1)],
                      needs=[("h2:/b", [need(b"w", 100, copies=0)])])
        self.assertEqual(len(p.drops), 1)
        d = p.drops[0]
        self.assertIsInstance(d, Drop)
        self.assertEqual((d.for_source, d.for_path), ("h2:/b", b"w"))
        self.assertIn("surplus 3/1", d.reason)
