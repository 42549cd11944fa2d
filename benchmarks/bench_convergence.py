"""
Convergence of many stores: a simulation driving the real ledger and planner.

No processes, no network, no disk: one real L{Ledger} per source and the
real L{planner.plan}, under a fake clock.
Each simulated store keeps its holdings in memory and runs the loop of
L{cluster_backup.client.Agent.round}, mirrored call for call:

  - at arrival, an (empty) inventory to every source, then a round at once;
    a lease renewal (a report with usage) every report interval;
  - a round: when the store is full (free space below every file offered
    in its last round, within 5 report intervals), C{surplus} of every
    source first, and nothing more when it has none; C{needs} of every
    source, following cursors up to 2,000 (pages of 1,000); when the
    offered needs do not all fit in free space, C{surplus} of every offered
    source (up to 10,000; not again after the full-store ask); C{plan} with a cost of
    C{size}; drop requests (C{drop}), the granted copies deleted and
    reported; then per source, batches of 1,000: C{claim}, a transfer of
    the granted files taking C{bytes / --bandwidth} simulated seconds (the
    claims renewed every ttl/3 meanwhile), C{report} of what arrived;
  - the next round after 0.2 s if the round did or awaits work, else after
    the report interval.

Time runs on a heap of pending calls (L{HeapClock}: the same order as
L{Clock}, which re-sorts all of them at every step; C{--list-clock} uses
it).  Every ledger call is one simulated round trip of C{--latency} seconds, so
stores that ask at the same moment all see the same needs before any of
them claims (a herd).  A transfer's bytes count against the store's quota
from its start (rsync's partial file grows to it).

Defaults: 200 stores, 100,000 files over 3 sources wanting 1, 2 and 3
copies, file sizes log-uniform 1 KiB .. 1 MiB, quotas log-uniform between 1x
and 10x of the smallest adding up to 1.15 x what the copies need, stores on
distinct hosts but for a few hosts with two stores; stores arrive at
uniform random times over 10 minutes, one fifth of them together.

Runs until every file is at its copies (the ledgers' status, checked again
against the stores' own holdings) or no progress for an hour of simulated
time.  Checks at every step that no store is over quota and that no host
fetches a file it holds; reports rounds, wall and CPU time, bytes
transferred against the minimum (sum of copies x size), and fetches per file.

Run: C{.venv/bin/python benchmarks/bench_convergence.py [--stores N]
[--files N] [--record]}.  With C{--record} the figures are appended to
C{benchmarks/RESULTS.md}.  C{--experiment NAME} monkeypatches a proposed
product change for this run only (see C{EXPERIMENTS}); off by default.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import math
import os
import platform
import pstats
import random
import sys
import time
from array import array
from collections import defaultdict
from heapq import heappop, heappush
from typing import Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from twisted.internet.base import DelayedCall  # noqa: E402
from twisted.internet.defer import ensureDeferred  # noqa: E402
from twisted.internet.interfaces import IReactorTime  # noqa: E402
from twisted.internet.task import Clock, LoopingCall, deferLater  # noqa: E402
from zope.interface import implementer  # noqa: E402

from cluster_backup import client, planner  # noqa: E402
from cluster_backup.ledger import Ledger  # noqa: E402
from cluster_backup.records import FileRecord  # noqa: E402
from cluster_backup.server import STUCK_INTERVALS  # noqa: E402

REPORT_INTERVAL = 60.0
CLAIM_TTL = 300.0
KEEP_DELETED = 30 * 86400.0
SURPLUS_LIMIT = 10_000  # session.list_surplus's default
PAGE = 1000  # session.list_all_needs / list_surplus page

#: Targets of the issue.
BYTES_TARGET = 1.05


class QuotaExceeded(AssertionError):
    pass


@implementer(IReactorTime)
class HeapClock:
    """
    L{Clock}'s behaviour (calls run in time order, ties in the order they
    were scheduled) on a heap: L{Clock} sorts its whole list of calls at
    every C{callLater} and after every call it runs, which at a thousand
    stores (leases, rounds, round trips, claim renewals all pending) cost
    more than the ledgers and the planner together.
    """

    def __init__(self) -> None:
        self.rightNow = 0.0
        self._heap: list = []  # (time, sequence, call)
        self._sequence = 0

    def seconds(self) -> float:
        return self.rightNow

    def callLater(self, delay, callable, *args, **kw) -> DelayedCall:
        call = DelayedCall(self.rightNow + delay, callable, args, kw,
                           lambda c: None, self._push, self.seconds)
        self._push(call)
        return call

    def _push(self, call: DelayedCall) -> None:
        # Also the resetter: a call moved earlier gets a new entry, and the
        # old one is skipped (the call has run by then).
        self._sequence += 1
        heappush(self._heap, (call.getTime(), self._sequence, call))

    def _settle(self) -> None:
        """Drop cancelled and run entries off the top; move delayed calls."""
        heap = self._heap
        while heap:
            when, _, call = heap[0]
            if call.cancelled or call.called:
                heappop(heap)
            elif call.getTime() != when:  # delayed by reset(): its new place
                heappop(heap)
                call.activate_delay()
                self._push(call)
            else:
                return

    def next_time(self) -> Optional[float]:
        """When the next pending call is due, or None when there is none."""
        self._settle()
        return self._heap[0][0] if self._heap else None

    def getDelayedCalls(self) -> list:
        return [c for _, _, c in self._heap if c.active()]

    def advance(self, amount: float) -> None:
        """Move time on by C{amount} and run every call due by then, in order."""
        self.rightNow += amount
        heap = self._heap
        while True:
            self._settle()
            if not heap or heap[0][0] > self.rightNow:
                return
            _, _, call = heappop(heap)
            call.called = 1
            call.func(*call.args, **call.kw)


def local_index(path: bytes) -> int:
    """A file's index in its source (the path ends with it)."""
    return int(path[-8:])


def path_of(j: int) -> bytes:
    return b"%05d/%08d" % (j // 500, j)


class Source:
    def __init__(self, k: int, copies: int):
        self.k = k
        self.id = f"src{k}:/data"
        self.copies = copies
        self.sizes = array("q")
        self.fetches = array("H")
        self.drops = array("H")
        self.have = array("H")  # complete copies (distinct hosts), from the stores
        self.pending = array("H")  # transfers under way
        self.under = 0  # files with have < copies
        self.ledger: Optional[Ledger] = None

    @property
    def files(self) -> int:
        return len(self.sizes)


class Host:
    def __init__(self, name: str):
        self.name = name
        self.stores: list[SimStore] = []
        self.busy: set = set()  # (source id, path) being fetched by any store of the host

    def holds(self, k: int, j: int) -> bool:
        return any(j in s.held[k] for s in self.stores)


class Stats:
    def __init__(self):
        self.rounds = 0
        self.bytes = 0  # transferred (counted when a transfer starts)
        self.files = 0
        self.dropped_bytes = 0
        self.dropped_files = 0
        self.drop_asked = 0
        self.claims_asked = 0
        self.claims_granted = 0
        self.full_rounds = 0  # rounds that asked surplus only (a full store, no surplus)
        self.last_progress = 0.0
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self.longest: dict[str, float] = defaultdict(float)
        self.items_in: dict[str, int] = defaultdict(int)  # paths or records passed
        self.items_out: dict[str, int] = defaultdict(int)  # needs or paths answered
        self.max_used_fraction = 0.0
        self.source_done: dict[str, float] = {}
        # Fetches by what the file had when granted: below copies (needed);
        # at or above them although offered below (the need went stale
        # between ListNeeds and Claim); offered at or above (greedy fill).
        self.kind_bytes = {"needed": 0, "stale need": 0, "greedy": 0}
        self.kind_files = {"needed": 0, "stale need": 0, "greedy": 0}


class Sim:
    def __init__(self, args):
        self.args = args
        self.rng = random.Random(args.seed)
        self.clock = Clock() if args.list_clock else HeapClock()
        self.stats = Stats()
        self.done = False
        copies = [int(c) for c in args.copies.split(",")]
        self.sources = [Source(k, c) for k, c in enumerate(copies)]
        self.by_id = {s.id: s for s in self.sources}
        rng = self.rng
        lo, hi = math.log(args.min_file), math.log(args.max_file)
        draws = [rng.random() for _ in range(args.files)]
        if args.tail:
            hi = math.log(self.tail_max(args, copies, draws))
        for i, r in enumerate(draws):
            src = self.sources[i % len(self.sources)]
            src.sizes.append(int(math.exp(lo + (hi - lo) * r)))
        for src in self.sources:
            for name in ("fetches", "drops", "have", "pending"):
                setattr(src, name, array("H", bytes(2 * src.files)))
            src.under = src.files
        self.minimum = sum(src.copies * sum(src.sizes) for src in self.sources)
        self.largest = max(max(src.sizes) for src in self.sources if src.files)

        # Hosts: distinct, but for a few with two stores.
        shared = args.shared_hosts if args.shared_hosts is not None else max(1, args.stores // 40)
        shared = min(shared, args.stores // 2)
        self.hosts: list[Host] = []
        self.stores: list[SimStore] = []
        weights = [10 ** rng.uniform(0, 1) for _ in range(args.stores)]
        total = args.spare * self.minimum
        scale = total / sum(weights)
        for n in range(args.stores):
            if n < 2 * shared:
                if n % 2 == 0:
                    self.hosts.append(Host(f"h{len(self.hosts)}"))
            else:
                self.hosts.append(Host(f"h{len(self.hosts)}"))
            host = self.hosts[-1]
            store = SimStore(self, f"{host.name}:/backup{len(host.stores)}", host,
                             int(weights[n] * scale))
            host.stores.append(store)
            self.stores.append(store)
        smallest = min(s.quota for s in self.stores)
        if smallest <= self.largest:
            raise SystemExit(f"smallest store ({smallest} B) is not bigger than the largest "
                             f"file ({self.largest} B): use more --spare or fewer --stores")
        self.quota_total = sum(s.quota for s in self.stores)

        # Arrivals: one fifth together, the rest uniform over the spread.
        herd = set(rng.sample(range(args.stores), args.stores // 5))
        herd_at = args.herd_at if args.herd_at is not None else args.spread / 2
        for n, store in enumerate(self.stores):
            store.arrival = herd_at if n in herd else rng.uniform(0, args.spread)
        self.herd = len(herd)
        self.herd_at = herd_at

        # Ledgers, filled by a complete scan.
        mapping = {s.id: s.host.name for s in self.stores}
        for src in self.sources:
            ledger = Ledger(src.id, src.copies, self.clock, mapping,
                            report_interval=REPORT_INTERVAL, claim_ttl=CLAIM_TTL,
                            stuck_after=STUCK_INTERVALS * REPORT_INTERVAL)  # as server.py
            ledger.scan_started()
            batch = []
            for j, size in enumerate(src.sizes):
                batch.append(FileRecord(path_of(j), size, 1_700_000_000))
                if len(batch) == 2000:
                    ledger.scan_batch(batch)
                    batch = []
            ledger.scan_batch(batch)
            ledger.scan_finished(True)
            src.ledger = ledger
        # As the server does after each scan (server.py).
        gc.collect()
        gc.freeze()
        # A thousand clients share this process, each with thousands of
        # needs alive through its transfers: at Python's default threshold
        # (700) the collector walks them all again and again (18 s of the
        # 90 s CPU of 1,000 stores x 100,000 files; 1.5 s at 20,000).
        gc.set_threshold(args.gc_threshold, 10, 10)

    @staticmethod
    def tail_max(args, copies: list[int], draws: list[float]) -> float:
        """
        The largest file size M for C{--tail}: sizes log-uniform from
        C{--min-file} to M (the same draws), quotas as L{__init__} makes
        them with C{--spare 1}, and M equal to C{--tail} times the smallest
        of those stores (found by bisection on log M; the weights' draws
        come after the sizes', so they are drawn here from a copy of the
        generator).  So every C{--spare} runs the same data set, and only
        the quotas grow with it.
        """
        rng = random.Random(args.seed)
        for _ in range(args.files):
            rng.random()
        weights = [10 ** rng.uniform(0, 1) for _ in range(args.stores)]
        share = min(weights) / sum(weights)
        lo = math.log(args.min_file)

        def gap(log_max: float) -> float:
            need = sum(copies[i % len(copies)] * int(math.exp(lo + (log_max - lo) * r))
                       for i, r in enumerate(draws))
            return args.tail * share * need - math.exp(log_max)

        a, b = lo + 1e-9, math.log(1e15)
        if gap(b) > 0:
            raise SystemExit("--tail: too many files per store for files that large")
        for _ in range(60):
            mid = (a + b) / 2
            a, b = (mid, b) if gap(mid) > 0 else (a, mid)
        return math.exp(a)

    # -- driving --------------------------------------------------------

    def call(self, name: str, fn, *args):
        """
        One ledger call, timed and counted under C{name} (the method, and
        in brackets what for), with the items it was given and answered.
        """
        st = self.stats
        st.calls[name] += 1
        t = time.perf_counter()
        result = fn(*args)
        dt = time.perf_counter() - t
        st.seconds[name] += dt
        if dt > st.longest[name]:
            st.longest[name] = dt
        st.items_in[name] += sum(len(a) for a in args if isinstance(a, (list, tuple)))
        if isinstance(result, list):
            st.items_out[name] += len(result)
        elif isinstance(result, tuple):  # a page and its cursor
            st.items_out[name] += len(result[0])
        return result

    def rpc(self):
        """A round trip's worth of simulated time."""
        return deferLater(self.clock, self.args.latency, lambda: None)

    def converged(self) -> bool:
        # The stores' own count; the ledgers' status is checked at the end.
        return not any(src.under for src in self.sources)

    def gained(self, src: Source, j: int) -> None:
        src.have[j] += 1
        if src.have[j] == src.copies:
            src.under -= 1
            if not src.under:
                self.stats.source_done[src.id] = self.clock.seconds()
        if self.converged():
            self.done = True

    def lost(self, src: Source, j: int) -> None:
        src.drops[j] += 1
        if src.have[j] == src.copies:
            src.under += 1
            self.stats.source_done.pop(src.id, None)
        src.have[j] -= 1

    def run(self) -> str:
        for store in self.stores:
            self.clock.callLater(store.arrival, store.start)
        clock = self.clock
        limit = self.args.max_time
        every = self.args.progress
        shown = time.perf_counter()
        last_arrival = max(s.arrival for s in self.stores)
        while not self.done:
            t = self._next_time()
            if t is None:
                break
            if every and time.perf_counter() - shown > every:
                shown = time.perf_counter()
                print(f"t={clock.seconds():,.0f} s simulated: {self.stats.rounds:,} rounds, "
                      f"below copies {[src.under for src in self.sources]}, "
                      f"{self.stats.files:,} fetched", file=sys.stderr, flush=True)
            if t > limit:
                return "time limit"
            if t - self.stats.last_progress > self.args.idle and t > last_arrival:
                return "stalled"
            clock.rightNow = max(clock.rightNow, t)
            clock.advance(0)
        return "converged" if self.done else "no events"

    def _next_time(self) -> Optional[float]:
        clock = self.clock
        if isinstance(clock, HeapClock):
            return clock.next_time()
        return clock.calls[0].getTime() if clock.calls else None

    def progress(self) -> None:
        self.stats.last_progress = self.clock.seconds()

    # -- checks ---------------------------------------------------------

    def verify(self) -> dict:
        """Every file's copies from the stores' own holdings, rule 2 per host."""
        short = ledger_short = 0
        for src in self.sources:
            counts = array("H", bytes(2 * src.files))
            for host in self.hosts:
                union: set = set()
                total = 0
                for s in host.stores:
                    union |= s.held[src.k]
                    total += len(s.held[src.k])
                assert len(union) == total, f"host {host.name} holds a file twice"
                for j in union:
                    counts[j] += 1
            short += sum(1 for c in counts if c < src.copies)
            assert counts == src.have, f"{src.id}: copy counts differ from the holdings"
            ledger_short += src.ledger.status().under_files
        for s in self.stores:
            s.check_quota()
            used = sum(self.sources[k].sizes[j] for k in range(len(self.sources))
                       for j in s.held[k])
            assert used + s.inflight == s.used, (s.id, used, s.inflight, s.used)
        return dict(short=short, ledger_short=ledger_short)


class SimStore:
    """One store and its agent (L{client.Agent}), in memory."""

    def __init__(self, sim: Sim, sid: str, host: Host, quota: int):
        self.sim = sim
        self.id = sid
        self.host = host
        self.quota = quota
        self.used = 0
        self.inflight = 0  # bytes of transfers under way (counted in used)
        self.held: list[set[int]] = [set() for _ in sim.sources]
        self.no_drop: dict = {}
        self.smallest_offer: Optional[int] = None
        self.offers_at = 0.0
        self.arrival = 0.0
        self.rounds = 0
        self.running = False

    @property
    def free(self) -> int:
        return self.quota - self.used

    def check_quota(self) -> None:
        if self.used > self.quota:
            raise QuotaExceeded(f"{self.id}: {self.used} B used > quota {self.quota} B "
                                f"at t={self.sim.clock.seconds():.1f}")
        frac = self.used / self.quota
        if frac > self.sim.stats.max_used_fraction:
            self.sim.stats.max_used_fraction = frac

    # -- lifecycle (Agent.startService, ServerLink._session, TimerService) --

    def start(self) -> None:
        ensureDeferred(self._connect()).addErrback(self.sim.fail)

    async def _connect(self) -> None:
        sim = self.sim
        for src in sim.sources:
            await sim.rpc()
            # report_inventory of an empty store: one page marked start+end.
            sim.call("inventory_started", src.ledger.inventory_started, self.id)
            sim.call("report (inventory)", src.ledger.report, self.id, (), (), self.used,
                     self.quota)
            sim.call("inventory_finished", src.ledger.inventory_finished, self.id)
        lease = LoopingCall(self.renew)
        lease.clock = sim.clock
        lease.start(REPORT_INTERVAL, now=False)
        self.wake(0.0)

    def renew(self) -> None:
        for src in self.sim.sources:
            self.sim.call("report (lease)", src.ledger.report, self.id, (), (), self.used,
                          self.quota)

    def wake(self, delay: float) -> None:
        if not self.sim.done:
            self.sim.clock.callLater(delay, self._round)

    def _round(self) -> None:
        if self.sim.done:
            return
        d = ensureDeferred(self.round())

        def done(busy):
            self.rounds += 1
            self.sim.stats.rounds += 1
            self.wake(client.BUSY_PAUSE if busy else REPORT_INTERVAL)

        d.addCallback(done).addErrback(self.sim.fail)

    # -- one round (Agent.round) -----------------------------------------

    async def list_all_needs(self, src: Source, limit: int):
        needs: list = []
        cursor = None
        safemode = False
        while len(needs) < limit:
            await self.sim.rpc()
            page, cursor = self.sim.call("needs", src.ledger.needs, self.id, cursor,
                                         min(PAGE, limit - len(needs)))
            safemode = src.ledger.safemode
            fill_waits = src.ledger.fill_waits
            needs.extend(page)
            if cursor is None:
                break
        return needs, safemode, fill_waits

    async def list_surplus(self, src: Source, limit: int = SURPLUS_LIMIT):
        needs: list = []
        cursor = None
        while len(needs) < limit:
            await self.sim.rpc()
            page, cursor = self.sim.call("surplus", src.ledger.surplus, self.id, cursor,
                                         min(PAGE, limit - len(needs)))
            needs.extend(page)
            if cursor is None:
                break
        return needs

    def full(self) -> bool:
        """L{client.Agent._full} (the simulated stores have no orphans)."""
        smallest = self.smallest_offer
        return (smallest is not None and self.free < smallest
                and self.sim.clock.seconds() - self.offers_at
                < client.REASK_FULL * REPORT_INTERVAL)

    async def surplus_of(self, source_ids: list) -> list:
        held: list = []
        for sid in source_ids:
            surplus = await self.list_surplus(self.sim.by_id[sid])
            held += [planner.Held(sid, n.path, n.size, n.copies, n.wanted) for n in surplus]
        return held

    async def round(self) -> bool:
        sim = self.sim
        held = None
        if self.full():
            held = await self.surplus_of([src.id for src in sim.sources])
            if not held:
                sim.stats.full_rounds += 1
                return False
        offered: list = []
        hold_fill = False
        for src in sim.sources:
            needs, safemode, fill_waits = await self.list_all_needs(src, client.NEEDS_PER_ROUND)
            hold_fill = hold_fill or (fill_waits and not safemode)
            if not safemode:
                offered.append((src.id, needs))
        asked = [sid for sid, _ in offered]
        if held is not None:
            held = [h for h in held if h.source in asked]
        elif sum(n.size for _, needs in offered for n in needs) > self.free:
            held = await self.surplus_of(asked)
        else:
            held = []
        if not offered:
            return False
        now = sim.clock.seconds()
        self.smallest_offer = min((n.size for _, needs in offered for n in needs), default=None)
        self.offers_at = now
        self.no_drop = {k: t for k, t in self.no_drop.items()
                        if now - t < REPORT_INTERVAL * 5}
        t = time.perf_counter()
        plan = planner.plan(
            free=self.free, quota=self.quota, needs=offered,
            cost=lambda sid, path, size: size, now=now,
            keep_deleted={s.id: KEEP_DELETED for s in sim.sources},
            held=held, orphans=[], busy=frozenset(self.host.busy),
            no_drop=frozenset(self.no_drop), hold_fill=hold_fill)
        dt = time.perf_counter() - t
        sim.stats.seconds["plan"] += dt
        sim.stats.calls["plan"] += 1
        sim.stats.longest["plan"] = max(sim.stats.longest["plan"], dt)
        sim.stats.items_in["plan"] += sum(len(n) for _, n in offered) + len(held)
        sim.stats.items_out["plan"] += len(plan.fetch)
        # A thousand clients share this process: the offers not planned
        # would stay alive through every store's transfers, millions of
        # objects for the garbage collector to walk again and again.
        offered = held = None  # noqa: F841
        removed: dict = defaultdict(list)
        await self._drops(plan.drops, removed)
        for sid, paths in removed.items():
            await sim.rpc()
            sim.call("report (removed)", sim.by_id[sid].ledger.report, self.id, (), paths,
                     self.used, self.quota)
        fetched = 0
        by_source = client.fetch_order(plan.fetch)
        for sid, needs in by_source.items():
            for i in range(0, len(needs), client.FILES_PER_BATCH):
                fetched += await self.fetch_batch(sim.by_id[sid],
                                                  needs[i:i + client.FILES_PER_BATCH])
        return bool(fetched or plan.drops or plan.delete_orphans)

    async def _drops(self, drops: list, removed: dict) -> None:
        sim = self.sim
        asked: dict = defaultdict(list)
        for drop in drops:
            asked[drop.source].append(drop)
        for sid, items in asked.items():
            src = sim.by_id[sid]
            await sim.rpc()
            paths = [d.path for d in items]
            sim.stats.drop_asked += len(paths)
            granted = set(sim.call("drop", src.ledger.drop, self.id, paths))
            now = sim.clock.seconds()
            for d in items:
                if d.path in granted:
                    j = local_index(d.path)
                    self.held[src.k].remove(j)
                    sim.lost(src, j)
                    size = src.sizes[j]
                    self.used -= size
                    sim.stats.dropped_bytes += size
                    sim.stats.dropped_files += 1
                    removed[sid].append(d.path)
                    sim.progress()
                else:
                    self.no_drop[(sid, d.path)] = now

    async def fetch_batch(self, src: Source, needs: list) -> int:
        sim = self.sim
        ledger = src.ledger
        await sim.rpc()
        paths = [n.path for n in needs]
        sim.stats.claims_asked += len(paths)
        # As Agent.fetch_batch: needs claimed as needs, the rest as greedy fill.
        granted: set = set()
        for fill in (False, True):
            some = [n.path for n in needs if (n.copies >= n.wanted) == fill]
            if some:
                granted.update(sim.call("claim (fill)" if fill else "claim (needs)", ledger.claim,
                                        self.id, some, fill))
        batch = [n for n in needs if n.path in granted]
        if not batch:
            return 0
        sim.stats.claims_granted += len(batch)
        keys = {(src.id, n.path) for n in batch}
        self.host.busy |= keys
        paths = [n.path for n in batch]
        size = 0
        for n in batch:
            j = local_index(n.path)
            if self.host.holds(src.k, j):
                raise AssertionError(f"{self.id}: host already holds {n.path!r} of {src.id}")
            src.fetches[j] += 1
            size += n.size
            if n.copies >= n.wanted:
                kind = "greedy"
            elif src.have[j] + src.pending[j] >= src.copies:
                kind = "stale need"
            else:
                kind = "needed"
            src.pending[j] += 1
            sim.stats.kind_bytes[kind] += n.size
            sim.stats.kind_files[kind] += 1
        # The transfer's bytes count from its start (rsync's partial files).
        self.used += size
        self.inflight += size
        self.check_quota()
        sim.stats.bytes += size
        sim.stats.files += len(batch)
        renew = LoopingCall(lambda: sim.call("claim (renew)", ledger.claim, self.id, paths))
        renew.clock = sim.clock
        renew.start(max(1.0, CLAIM_TTL / 3), now=False)
        try:
            seconds = size / sim.args.bandwidth if sim.args.bandwidth else 0.0
            await deferLater(sim.clock, seconds, lambda: None)
        finally:
            renew.stop()
            self.host.busy -= keys
            self.inflight -= size
        held = self.held[src.k]
        for n in batch:
            held.add(local_index(n.path))
        arrived = [FileRecord.unchecked(n.path, n.size, n.mtime) for n in batch]
        await sim.rpc()
        sim.call("report (fetched)", ledger.report, self.id, arrived, (), self.used, self.quota)
        for n in batch:  # a copy counts once the server knows it
            j = local_index(n.path)
            src.pending[j] -= 1
            sim.gained(src, j)
        sim.progress()
        return len(batch)


def _fail(sim: Sim):
    def fail(failure):
        if not sim.done:
            sim.done = True
            sim.failure = failure
    return fail


# -- experiments: proposed product changes, monkeypatched for one run ------

EXPERIMENTS: dict = {}


def experiment(fn):
    """Register C{fn} (patches, returns an undo callable) as C{--experiment NAME}."""
    EXPERIMENTS[fn.__name__.replace("_", "-")] = fn
    return fn


def main() -> None:
    args = build_parser().parse_args()
    undo = [EXPERIMENTS[name]() for name in args.experiment]
    try:
        report(args)
    finally:
        for restore in undo:
            if restore:
                restore()


def simulate(args) -> tuple[Sim, str]:
    """Run one simulation of C{args}; returns it and its outcome (raises what failed)."""
    sim = Sim(args)
    sim.failure = None
    sim.fail = _fail(sim)
    outcome = sim.run()
    if sim.failure is not None:
        sim.failure.raiseException()
    return sim, outcome


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stores", type=int, default=200)
    parser.add_argument("--files", type=int, default=100_000)
    parser.add_argument("--copies", default="1,2,3", help="copies of each source")
    parser.add_argument("--spare", type=float, default=1.15,
                        help="total quota / bytes the copies need")
    parser.add_argument("--min-file", type=int, default=1024)
    parser.add_argument("--max-file", type=int, default=1 << 20)
    parser.add_argument("--tail", type=float, default=0.0, metavar="FRACTION",
                        help="a heavy tail: the largest file (instead of --max-file) is "
                        "FRACTION of the smallest store at --spare 1")
    parser.add_argument("--shared-hosts", type=int, default=None,
                        help="hosts with two stores (default stores/40)")
    parser.add_argument("--spread", type=float, default=600.0,
                        help="arrivals are uniform over this many seconds")
    parser.add_argument("--herd-at", type=float, default=None,
                        help="when one fifth of the stores arrive together (default spread/2)")
    parser.add_argument("--bandwidth", type=float, default=10e6,
                        help="bytes per simulated second per store (0: instant)")
    parser.add_argument("--latency", type=float, default=0.001,
                        help="simulated seconds per ledger call")
    parser.add_argument("--idle", type=float, default=3600.0,
                        help="stop after this long (simulated) without progress")
    parser.add_argument("--max-time", type=float, default=7 * 86400.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--progress", type=float, default=0, metavar="SECONDS",
                        help="print progress to stderr every SECONDS of wall time")
    parser.add_argument("--experiment", action="append", default=[],
                        choices=sorted(EXPERIMENTS) or None,
                        help="monkeypatch a proposed product change (see EXPERIMENTS)")
    parser.add_argument("--list-clock", action="store_true",
                        help="twisted's Clock (sorts its calls at every step) instead of "
                        "the heap one; same events in the same order, slower")
    parser.add_argument("--gc-threshold", type=int, default=20_000,
                        help="the garbage collector's first threshold during the run "
                        "(Python's default: 700)")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="print the N costliest functions (cProfile)")
    parser.add_argument("--record", action="store_true")
    return parser


class GCTimer:
    """Time spent in the cyclic garbage collector from now until L{stop}."""

    def __init__(self):
        self.seconds = 0.0
        self.runs = 0
        self._start = 0.0
        gc.callbacks.append(self._callback)

    def _callback(self, phase, info):
        if phase == "start":
            self._start = time.perf_counter()
        else:
            self.seconds += time.perf_counter() - self._start
            self.runs += 1

    def stop(self):
        gc.callbacks.remove(self._callback)


def report(args) -> None:
    t0, c0 = time.perf_counter(), time.process_time()
    sim = Sim(args)
    sim.failure = None
    sim.fail = _fail(sim)
    setup_wall, setup_cpu = time.perf_counter() - t0, time.process_time() - c0
    profile = cProfile.Profile() if args.profile else None
    gc_time = GCTimer()
    t0, c0 = time.perf_counter(), time.process_time()
    if profile:
        profile.enable()
    outcome = sim.run()
    if profile:
        profile.disable()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    gc_time.stop()
    if sim.failure is not None:
        sim.failure.raiseException()
    checked = sim.verify()
    if profile:
        pstats.Stats(profile, stream=sys.stderr).sort_stats("tottime").print_stats(args.profile)

    st = sim.stats
    ratio = st.bytes / sim.minimum
    max_fetch = {src.id: max(src.fetches) if src.files else 0 for src in sim.sources}
    over = sum(1 for src in sim.sources for f in src.fetches if f > src.copies + 1)
    refetched = sum(1 for src in sim.sources for f in src.fetches if f > src.copies)
    all_copies = outcome == "converged" and checked["short"] == checked["ledger_short"] == 0
    # Files fetched more than copies + 1 times: how often they were dropped.
    churn: dict = defaultdict(int)
    for src in sim.sources:
        for j, f in enumerate(src.fetches):
            if f > src.copies + 1:
                churn[src.drops[j]] += 1
    fetch_ok = over == 0
    ok = lambda good: "met" if good else "**missed**"  # noqa: E731
    rounds_per_store = sorted(s.rounds for s in sim.stores)
    exp = f" --experiment {' --experiment '.join(args.experiment)}" if args.experiment else ""
    lines = [
        f"### Convergence, {args.stores:,} stores x {args.files:,} files{exp} — "
        f"{time.strftime('%Y-%m-%d')}",
        "",
        f"Command: `.venv/bin/python benchmarks/bench_convergence.py "
        f"{' '.join(sys.argv[1:]).replace(' --record', '')}` "
        f"(seed {args.seed}) on {platform.machine()}, "
        f"{os.cpu_count()} cores, Python {platform.python_version()}.  "
        f"Sources {', '.join(f'{s.id} x{s.copies}' for s in sim.sources)}; "
        f"files {args.min_file:,}..{max(max(s.sizes) for s in sim.sources if s.files):,} B "
        f"log-uniform; "
        f"{len(sim.hosts)} hosts; quotas {min(s.quota for s in sim.stores):,}.."
        f"{max(s.quota for s in sim.stores):,} B, total {sim.quota_total / sim.minimum:.3f} x "
        f"the minimum; arrivals over {args.spread:.0f} s, {sim.herd} together at "
        f"{sim.herd_at:.0f} s; {args.bandwidth / 1e6:g} MB/s per store, "
        f"{args.latency * 1000:g} ms per call.  Setup (ledgers) {setup_wall:.1f} s, {setup_cpu:.1f} s CPU.",
        "",
        "| figure | value | target |",
        "|---|---|---|",
        f"| outcome | {outcome} at t={sim.clock.seconds():,.0f} s simulated; "
        f"{checked['short']:,} files below copies (ledgers: {checked['ledger_short']:,}) | every file at copies "
        f"({ok(all_copies)}) |",
        f"| rounds (all stores) | {st.rounds:,}; per store median "
        f"{rounds_per_store[len(rounds_per_store) // 2]}, max {rounds_per_store[-1]}; "
        f"{st.full_rounds:,} of a full store without surplus (no needs asked) | |",
        f"| wall / CPU time of the simulation | {wall:.1f} s / {cpu:.1f} s; garbage collection "
        f"{gc_time.seconds:.1f} s in {gc_time.runs:,} runs (threshold {args.gc_threshold:,}) | |",
        f"| bytes transferred / minimum | {ratio:.4f} ({st.bytes:,} / {sim.minimum:,} B) "
        f"| <= {BYTES_TARGET} ({ok(ratio <= BYTES_TARGET)}) |",
        f"| files fetched / copies wanted | {st.files:,} / "
        f"{sum(s.copies * s.files for s in sim.sources):,}; {refetched:,} files fetched "
        f"more than copies times | |",
        f"| max fetches of one file | "
        f"{', '.join(f'{sid.split(chr(58))[0]} {m}' for sid, m in max_fetch.items())}; "
        f"{over} files over copies + 1"
        + (" (by times dropped: " + ", ".join(f"{d}: {n:,}" for d, n in sorted(churn.items()))
           + ")" if churn else "")
        + f" | <= copies + 1 ({ok(fetch_ok)}) |",
        "| fetches by kind (copies when granted) | "
        + "; ".join(f"{k} {st.kind_files[k]:,} files {st.kind_bytes[k] / sim.minimum:.4f} x min"
                    for k in st.kind_bytes)
        + f"; in flight at the end {sum(s.inflight for s in sim.stores) / sim.minimum:.4f} x min"
        " | |",
        "| source at copies (simulated s) | "
        + ", ".join(f"{sid.split(chr(58))[0]} {t:,.0f}" for sid, t in st.source_done.items())
        + " | |",
        f"| copies dropped (granted swaps) | {st.dropped_files:,} files, "
        f"{st.dropped_bytes:,} B; {st.drop_asked:,} asked | |",
        f"| claims granted / asked | {st.claims_granted:,} / {st.claims_asked:,} | |",
        f"| store over quota | never (checked at every change); fullest "
        f"{st.max_used_fraction:.4f} of its quota | never (met) |",
    ]
    total_calls = sum(st.seconds.values())
    by_method: dict = defaultdict(lambda: [0, 0.0])
    for name, s in st.seconds.items():
        entry = by_method[name.split(" (")[0]]
        entry[0] += st.calls[name]
        entry[1] += s
    parts = ", ".join(f"{name} {n:,} calls {s:.1f} s"
                      for name, (n, s) in sorted(by_method.items(), key=lambda kv: -kv[1][1]))
    lines.append(f"| time in ledger/planner calls | {total_calls:.1f} s: {parts} | |")
    lines += [
        "",
        "| call (what for) | calls | total s | ms per call | longest ms "
        "| items given / answered per call |",
        "|---|---|---|---|---|---|",
    ]
    for name, s in sorted(st.seconds.items(), key=lambda kv: -kv[1]):
        n = st.calls[name]
        lines.append(
            f"| {name} | {n:,} | {s:.1f} | {1000 * s / n:.2f} | {1000 * st.longest[name]:.1f} "
            f"| {st.items_in[name] / n:,.0f} / {st.items_out[name] / n:,.0f} |")
    lines.append("")
    lines.append("Items: needs and surplus, needs answered; claim and drop, paths given and "
                 "granted; report, records held and paths removed; plan, needs and surplus "
                 "copies given, fetches planned.")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.record:
        path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md")
        with open(path, "a") as f:
            f.write("\n" + text)
    if not (all_copies and fetch_ok):
        sys.exit(0)  # a missed target is a finding, not a crash


if __name__ == "__main__":
    main()
