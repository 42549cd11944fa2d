"""
The client: everything C{cbackup-client} runs for the stores of one host.

One L{Agent} per store.  An agent keeps one connection per server it needs
(reconnecting with backoff), authenticates, sends its full inventory of each
source, then loops: ListNeeds -> plan -> Claim -> rsync -> Report.  It
renews its lease every C{REPORT INTERVAL}, keeps its claims alive during
long transfers, releases what failed, and drops a copy only when the server
granted it.
"""

from __future__ import annotations

import os
import threading
import time
from collections import defaultdict
from typing import Optional

from attrs import define, field
from twisted.application.internet import TimerService
from twisted.application.service import MultiService, Service
from twisted.internet.defer import (Deferred, ensureDeferred, gatherResults, maybeDeferred,
                                    succeed)
from twisted.internet.interfaces import IReactorThreads
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThreadPool
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from cluster_backup import planner, session, transfer
from cluster_backup.links import ServerLink
from cluster_backup.config import Cluster, Source, Store as StoreConfig
from cluster_backup.protocol import UnknownPath
from cluster_backup.records import FileRecord, ReportAnswer, rank
from cluster_backup.store import Store, StoreError, kept_key
from cluster_backup.units import human_size

log = Logger()

#: Most needs asked of one source per round, and most files per rsync run.
NEEDS_PER_ROUND = 2000
FILES_PER_BATCH = 1000
#: Pause between rounds while there is work (seconds): only a breath, since a
#: round that did work is worth repeating at once.
BUSY_PAUSE = 0.05
#: First pause before asking again a server that answered in safemode; it
#: doubles at each answer in safemode, up to C{REPORT INTERVAL}.  Safemode
#: ends as soon as the last store has reported, typically seconds after a
#: start: waiting a whole report interval would leave stores idle that long.
SAFEMODE_RETRY = 0.1

#: A full store asks for needs only when it holds surplus copies, or after
#: this many report intervals (see L{Agent._full}).
REASK_FULL = 5
#: Removals (L{Agent._remove_all}) go in chunks of at most this many files,
#: for at most REMOVE_SLICE seconds before the reactor runs again.
REMOVE_CHUNK = 64
REMOVE_SLICE = 0.02
@define
class Unreported:
    """What changed in a store for one source since its last report."""

    removed: list[bytes] = field(factory=list)  # layout paths no longer held
    kept: list[FileRecord] = field(factory=list)  # versions newly kept (rule 7)
    unkept: list[FileRecord] = field(factory=list)  # kept versions deleted

    def merge(self, other: "Unreported") -> None:
        self.removed += other.removed
        self.kept += other.kept
        self.unkept += other.unkept


def in_thread(reactor, f, *args) -> Deferred:
    """
    C{f(*args)} in a thread of C{reactor}'s pool (disk work never holds
    the reactor, rule 9); inline on a reactor without threads (a test's
    fake one).
    """
    if IReactorThreads.providedBy(reactor):
        return deferToThreadPool(reactor, reactor.getThreadPool(), f, *args)
    return maybeDeferred(f, *args)


def fetch_order(fetch: list) -> dict[str, list]:
    """
    A plan's fetches (C{(source id, need)}) as the needs to fetch from each
    source, in order: rarest first, and within a rank of files below their
    copies the largest first, so long transfers start early and the needed
    copies end on short batches (stores finish together instead of waiting
    on one that drew a big file last).  Greedy fill keeps the servers'
    order: a big surplus copy started last only delays the next need.
    """
    by_source: dict[str, list] = defaultdict(list)
    for sid, need in fetch:
        by_source[sid].append(need)
    for needs in by_source.values():
        needs.sort(key=lambda n: (rank(n.copies, n.wanted),
                                  -n.size if n.copies < n.wanted else 0))
    return by_source


async def release_claims(proto, source_id: str, store_id: str, paths: list) -> None:
    """
    Abandon claims on C{paths}.  The server refuses the whole list when one
    path is gone from the source (deleted during its transfer): then
    release them one by one, skipping those, so the others do not stay
    claimed (and unfetched) until their claims expire.
    """
    try:
        await session.release(proto, source_id, store_id, paths)
    except UnknownPath:
        for path in paths:
            try:
                await session.release(proto, source_id, store_id, [path])
            except UnknownPath:
                pass


class Agent(MultiService):
    """Fills one store from the servers of the sources it backs up."""

    def __init__(self, cluster: Cluster, config: StoreConfig, host: str,
                 secret: Optional[bytes], reactor, busy: set, store: Optional[Store] = None):
        super().__init__()
        self.cluster = cluster
        self.config = config
        self.id = config.id
        self.host = host
        self.secret = secret
        self.reactor = reactor
        self.busy = busy  # (source id, path) being fetched by any agent of this host
        self.store = store or Store.from_config(config)
        self.sources = [s for s in cluster.sources if cluster.backs_up(config, s)]
        self.by_id = {s.id: s for s in self.sources}
        self.setName(f"agent {self.id}")
        self.links: dict[str, ServerLink] = {}
        for server_host in sorted({s.host for s in self.sources}):
            link = ServerLink(self, server_host, cluster.address_of(server_host),
                              cluster.options.port, reactor)
            self.links[server_host] = link
            link.service.setServiceParent(self)
        lease = TimerService(cluster.options.report_interval, self.renew)
        lease.clock = reactor
        lease.setServiceParent(self)
        self.no_drop: dict[tuple[str, bytes], float] = {}
        #: source id -> copies on disk whose check against the source could
        #: not run (the server went away mid-batch): not reported until checked.
        self.unverified: dict[str, set[bytes]] = {}
        self.warned_too_big: set[tuple[str, bytes]] = set()
        #: source id -> what changed on disk and is not reported yet
        #: (L{_report_changes}): layout paths removed, versions kept, kept
        #: versions deleted.
        self.unreported: dict[str, Unreported] = defaultdict(Unreported)
        #: source id -> paths whose copy here is a version the source
        #: replaced, to move into the kept versions (L{_keep_old_versions}).
        self.to_keep: dict[str, dict[bytes, None]] = defaultdict(dict)
        #: (source id, path) -> a kept old version of that file the server
        #: let go, to be updated in place into the new version (rule 7).
        self.basis: dict[tuple[str, bytes], FileRecord] = {}
        #: Whether the last round found a server in safemode, and the pause
        #: before asking again (see L{SAFEMODE_RETRY}).
        self.in_safemode = False
        self._safemode_pause: Optional[float] = None
        #: The smallest file offered in the last round that had offers, and when.
        self._smallest_offer: Optional[int] = None
        self._offers_at = 0.0
        self._next: Optional[object] = None
        self._running: Optional[Deferred] = None
        #: The check and report of the previous round's last batch, if running.
        self._checking: Optional[Deferred] = None
        self._cancels: set = set()  # of the rsyncs running (a fetch and a check)
        self._stopping = False
        self._ready: Deferred = succeed(None)  # the start-up count (startService)
        self._stop_count = threading.Event()
        self._children_started = False

    # --- lifecycle -----------------------------------------------------

    def startService(self) -> None:
        """
        Count the store (L{Store.inventory}) in a thread, then start the
        links and the lease; a stop meanwhile ends the count at once.
        """
        Service.startService(self)  # the children start once the store is counted
        self._stopping = False
        self._children_started = False
        self._stop_count = threading.Event()
        started = time.monotonic()
        self._ready = in_thread(self.reactor, self._count, self._stop_count)
        self._ready.addCallbacks(self._counted, self._count_failed,
                                 callbackArgs=(started,))

    def _count(self, stop: threading.Event) -> int:
        """
        Blocking start-up work, in a thread (it logs nothing there): stray
        rsyncs, then the inventory.  Returns how many rsyncs it killed.
        """
        # A client killed with -9 leaves its rsyncs running: stop them
        # before counting and cleaning what they write.
        killed = transfer.kill_strays(self._rsync_marker())
        self.store.inventory(self.sources, stop=stop)
        return killed

    def _counted(self, killed: int, started: float) -> None:
        if killed:
            log.warn("{store}: killed {n} rsync processes left by a previous client",
                     store=self.id, n=killed)
        if self._stopping:
            return
        self.store.clean_partials()
        held = sum(len(f) for f in self.store.files.values())
        log.info("{store}: {files} files held, {used} of {quota} used "
                 "(inventory took {seconds:.1f}s)", store=self.id, files=held,
                 used=human_size(self.store.used), quota=human_size(self.store.quota or 0),
                 seconds=time.monotonic() - started)
        if self.store.unknown_files:
            log.warn("{store}: {n} files belong to no configured source; left alone",
                     store=self.id, n=self.store.unknown_files)
        for service in self:
            service.startService()
        self._children_started = True
        self.wake(1.0)

    def _count_failed(self, failure) -> None:
        if self._stopping:
            return  # the stop ended the count
        log.failure("{store}: cannot count the store; it stays idle", failure,
                    store=self.id)

    def stopService(self):
        self._stopping = True
        self._stop_count.set()
        if self._next is not None and self._next.active():
            self._next.cancel()
        for cancel in list(self._cancels):
            cancel()
        if self._children_started:
            stopped = super().stopService()
        else:
            stopped = succeed(Service.stopService(self))
        # Fires once the count, the round and the check in flight have
        # ended (no new rsync starts now, see _rsync), then with the
        # children's stop.
        return ensureDeferred(self._quiet()).addBoth(lambda _: stopped)

    async def _quiet(self) -> None:
        """Wait for the count, the round in flight, then the check it leaves running."""
        if not self._ready.called:
            await self._ready  # never fails: see startService
        if self._running is not None:
            await self._running  # never fails: see _round
        if self._checking is not None:
            await self._checking  # never fails: see fetch_batch

    def wake(self, delay: float = 0.0) -> None:
        """Run a round after C{delay} seconds (sooner than any planned one)."""
        if self._stopping or self._running is not None:
            return
        if self._next is not None and self._next.active():
            if self._next.getTime() <= self.reactor.seconds() + delay:
                return
            self._next.cancel()
        self._next = self.reactor.callLater(delay, self._round)

    def _round(self) -> None:
        self._next = None
        self._running = ensureDeferred(self.round())

        def done(result):
            self._running = None
            if not self._stopping:
                self.wake(self._pause(result is True))

        def failed(failure):
            log.failure("{store}: round failed", failure, store=self.id)
            return False

        self._running.addErrback(failed).addCallback(done)

    def _pause(self, busy: bool) -> float:
        """Seconds until the next round, after one that was C{busy} or not."""
        interval = self.cluster.options.report_interval
        if not self.in_safemode:
            self._safemode_pause = None
        elif not busy:
            pause = self._safemode_pause
            self._safemode_pause = min(interval, SAFEMODE_RETRY if pause is None else 2 * pause)
            return self._safemode_pause
        return BUSY_PAUSE if busy else interval

    # --- reports -------------------------------------------------------

    def usage(self) -> dict:
        self.store.refresh_quota()
        return {"used": max(0, self.store.used), "quota": self.store.quota}

    async def send_inventory(self, proto, source: Source) -> None:
        records = list(self.store.files.get(source.id, {}).values())
        kept = list(self.store.kept.get(source.id, {}))
        # A full inventory says everything: nothing earlier is left to report.
        self.unreported.pop(source.id, None)
        answer = await session.report_inventory(proto, source.id, self.id, records,
                                                kept=kept, **self.usage())
        self.handle_answer(source, answer)

    def handle_answer(self, source: Source, answer: ReportAnswer) -> None:
        if answer.orphans:
            self.store.mark_orphans(source.id, answer.orphans, self.reactor.seconds())
            log.info("{store}: {n} files of {source} are orphans (deleted at the source); "
                     "kept for {keep}", store=self.id, n=len(answer.orphans),
                     source=source.id, keep=f"{source.keep_deleted:.0f}s")
        if answer.stale:
            # Kept at the start of the next round, in slices (rule 9).
            self.to_keep[source.id].update(dict.fromkeys(answer.stale))
            log.info("{store}: {n} files of {source} changed at the source; their old "
                     "versions are kept for {keep}, the new ones will be fetched",
                     store=self.id, n=len(answer.stale), source=source.id,
                     keep=f"{source.keep_deleted:.0f}s")

    async def _keep_old_versions(self) -> None:
        """
        Move this store's copies of the versions its sources replaced
        (L{to_keep}) out of the layout into its kept versions (rule 7), in
        chunks of at most L{REMOVE_CHUNK} between which the reactor runs,
        as long as the store has room for their folders.  A copy that cannot
        be kept stays in the layout as a stale copy (its drop needs another
        host to keep that version too).
        """
        now = self.reactor.seconds()
        for sid in list(self.to_keep):
            source = self.by_id[sid]
            paths = list(self.to_keep.pop(sid))
            while paths and not self._stopping:
                slice_ends = time.monotonic() + REMOVE_SLICE
                while paths and time.monotonic() < slice_ends:
                    chunk, paths = paths[:REMOVE_CHUNK], paths[REMOVE_CHUNK:]
                    try:
                        room = [p for p in chunk if self.store.keep_cost(
                            source.host, source.path, p) <= self.store.free]
                        kept = self.store.keep(source.host, source.path, room, now)
                    except (OSError, StoreError) as e:
                        log.warn("{store}: cannot keep old versions of {source}: {why}",
                                 store=self.id, source=sid, why=str(e))
                        kept = []
                    delta = self.unreported[sid]
                    delta.removed += [r.path for r in kept]
                    delta.kept += kept
                await deferLater(self.reactor, 0, lambda: None)

    def renew(self) -> None:
        """
        Renew this store's lease with every connected server, each on its
        own: a slow or hung server delays only its own renewal (DESIGN.md
        rule 9), and a renewal still in flight is not stacked upon.  Returns
        nothing, so the lease timer never waits on any server.
        """
        for link in self.links.values():
            if link.proto is None or link.renewing is not None:
                continue
            link.renewing = ensureDeferred(self._renew(link))
            link.renewing.addBoth(self._renewed, link)

    @staticmethod
    def _renewed(_, link: ServerLink) -> None:
        link.renewing = None

    async def _renew(self, link: ServerLink) -> None:
        proto = link.proto
        for source in link.sources:
            try:
                await self._report_changes(proto, source)
            except Exception as e:
                log.warn("{store}: lease renewal with {server} failed: {why}",
                         store=self.id, server=link.server_host, why=str(e) or repr(e))
                return

    async def _report_changes(self, proto, source: Source) -> None:
        """
        One report to C{source}'s server of what changed on disk and was
        not reported yet (it renews the lease too).  What a failed report
        carried is reported again next time (or by the next inventory).
        """
        delta = self.unreported.pop(source.id, Unreported())
        try:
            answer = await session.report_delta(
                proto, source.id, self.id, removed=delta.removed, kept=delta.kept,
                unkept=delta.unkept, **self.usage())
        except Exception:
            self.unreported[source.id].merge(delta)
            raise
        self.handle_answer(source, answer)

    # --- one round -----------------------------------------------------

    def _proto(self, source: Source):
        return self.links[source.host].proto

    async def round(self) -> bool:
        """
        One plan-and-act round.  True when it did or awaits work (so the
        next round comes soon), False when there was nothing to do.
        """
        await self._keep_old_versions()
        # Still checking the previous round's last batch while asking for
        # needs: what that check removes is not among them.
        checking_before = self._checking is not None and not self._checking.called
        held: Optional[list[planner.Held]] = None
        if self._full():
            # Nothing offered last time fitted, and nothing here can go to
            # make room: new offers could only be used for swaps, so ask
            # for surplus first and for needs only if there is some.
            held = await self._surplus([s.id for s in self.sources])
            if not held:
                return False
        offered: list[tuple[str, list]] = []
        safe = hold_fill = False
        # Every server at once: a slow one delays only its own answer.
        asks = [self._needs_of(source) for source in self.sources
                if self._proto(source) is not None]
        for answer in await gatherResults([ensureDeferred(a) for a in asks]):
            if answer is None:
                continue
            source, needs, safemode, fill_waits = answer
            hold_fill = hold_fill or (fill_waits and not safemode)
            if safemode:
                safe = True
            else:
                offered.append((source.id, needs))
        self.in_safemode = safe
        # Swaps need the copies of what we hold.  Ask only when the offered
        # files do not all fit, and ask every source: the surplus to drop
        # may well belong to another source than the file that needs room.
        asked = [sid for sid, _ in offered]
        if held is not None:
            held = [h for h in held if h.source in asked]
        elif sum(n.size for _, needs in offered for n in needs) > self.store.free:
            held = await self._surplus(asked)
        else:
            held = []
        if not offered:
            return False
        now = self.reactor.seconds()
        self._smallest_offer = min((n.size for _, needs in offered for n in needs),
                                   default=None)
        self._offers_at = now
        self.no_drop = {k: t for k, t in self.no_drop.items()
                        if now - t < self.cluster.options.report_interval * 5}
        orphans = self._orphans(now)
        self.store.refresh_quota()
        parents: dict = {}  # nothing on disk changes while planning (Store.cost)
        plan = planner.plan(
            free=self.store.free, quota=self.store.quota or 0, needs=offered,
            cost=lambda sid, path, size: self._cost(sid, path, size, parents), now=now,
            keep_deleted={s.id: s.keep_deleted for s in self.sources},
            held=held, orphans=orphans, busy=frozenset(self.busy),
            no_drop=frozenset(self.no_drop), hold_fill=hold_fill)
        for key in plan.skipped_too_big:
            if key not in self.warned_too_big:
                self.warned_too_big.add(key)
                log.warn("{store}: {path} of {source} is larger than the whole quota; "
                         "skipped", store=self.id, path=os.fsdecode(key[1]), source=key[0])
        await self._remove_all([(sid, path) for sid, path in plan.delete_orphans],
                               "orphan past keep deleted")
        await self._drops(plan.drops)
        await self._report_removed()
        fetched = 0
        by_source = fetch_order(plan.fetch)
        # Each batch's check against the source and its report (latency
        # bound: a dry-run rsync and two AMP calls) overlap the next batch's
        # transfer, the last one's the next round's start; at most one of
        # each runs at a time.  (Its claims keep the batch out of the next
        # round's needs; its files are already counted in the store's usage.)
        checking, self._checking = self._checking, None
        try:
            if checking is not None and not by_source:
                # Nothing to fetch: wait for the previous round's check; if it
                # was still running when needs were asked, look again soon
                # (what it removed, changed during its transfer, is wanted).
                await checking
                checking = None
                return checking_before or bool(plan.drops or plan.delete_orphans)
            for sid, needs in by_source.items():
                for i in range(0, len(needs), FILES_PER_BATCH):
                    if self._stopping:
                        return False
                    later: list = []
                    fetched += await self.fetch_batch(self.by_id[sid],
                                                      needs[i:i + FILES_PER_BATCH], later)
                    if checking is not None:
                        await checking
                    checking = later[0]() if later else None
        finally:
            self._checking = checking
        return bool(fetched or plan.drops or plan.delete_orphans)

    async def _needs_of(self, source: Source) -> Optional[tuple]:
        """
        C{(source, needs, safemode, fill_waits)} from C{source}'s server,
        the needs this store already meets on disk reported rather than
        offered (L{_already_held}); None when the server could not be asked.
        """
        proto = self._proto(source)
        try:
            needs, safemode, fill_waits = await session.list_all_needs(
                proto, source.id, self.id, limit=NEEDS_PER_ROUND)
            if not safemode:
                needs = await self._already_held(proto, source, needs)
        except Exception as e:
            # One bad server (or a lost connection) must not starve the others.
            log.warn("{store}: asking {source} for needs failed: {why}",
                     store=self.id, source=source.id, why=str(e) or repr(e))
            return None
        return source, needs, safemode, fill_waits

    def _full(self) -> bool:
        """
        Whether this store's free space is smaller than every file offered
        in its last round (so than any cost) and it has no orphans to
        delete: then only swaps can use what the servers offer.  Forgotten
        after L{REASK_FULL} report intervals, so files smaller than those
        seen are found in time.
        """
        smallest = self._smallest_offer
        return (smallest is not None and self.store.free < smallest
                and self.reactor.seconds() - self._offers_at
                < REASK_FULL * self.cluster.options.report_interval
                and not self.store.orphans())

    async def _surplus(self, source_ids: list) -> list:
        """
        This store's surplus copies (L{planner.Held}) of C{source_ids}, asked
        of every server at once; a server that cannot be asked has none.
        """
        async def one(sid: str) -> list:
            proto = self._proto(self.by_id[sid])
            if proto is None:
                return []
            try:
                surplus = await session.list_surplus(proto, sid, self.id)
            except Exception as e:
                log.warn("{store}: asking {source} for surplus failed: {why}",
                         store=self.id, source=sid, why=str(e) or repr(e))
                return []
            return [planner.Held(sid, n.path, n.size, n.copies, n.wanted) for n in surplus]

        lists = await gatherResults([ensureDeferred(one(sid)) for sid in source_ids])
        return [h for held in lists for h in held]

    async def _already_held(self, proto, source: Source, needs: list) -> list:
        """
        Needs this store already meets on disk (same size and mtime: a report
        lost with a connection, or a server that restarted) are reported as
        held instead of being fetched again; returns the others.
        """
        held = self.store.files.get(source.id, {})
        have = [held[n.path] for n in needs
                if n.path in held and (held[n.path].size, held[n.path].mtime) == (n.size, n.mtime)]
        if not have:
            return needs
        doubtful = self.unverified.get(source.id, set())
        if doubtful & {r.path for r in have}:
            have = await self._check_held(proto, source, have, doubtful)
        answer = await session.report_delta(proto, source.id, self.id, held=have, **self.usage())
        self.handle_answer(source, answer)
        log.info("{store}: {n} files of {source} were already here; reported, not fetched",
                 store=self.id, n=len(have), source=source.id)
        done = {r.path for r in have}
        return [n for n in needs if n.path not in done]

    async def _check_held(self, proto, source: Source, have: list, doubtful: set) -> list:
        """
        Of C{have}, the copies that may be reported: those not in
        C{doubtful}, and the doubtful ones that a claim and a check against
        the source now vouch for (a changed one is removed).  Doubtful ones
        that cannot be checked yet are left out, to be tried next round.
        """
        sure = [r for r in have if r.path not in doubtful]
        unsure = [r for r in have if r.path in doubtful]
        # fill: the check must be allowed whatever the copies of these files.
        grant = await session.claim(proto, source.id, self.id, [r.path for r in unsure],
                                    fill=True)
        granted = set(grant.granted)
        if not granted:
            return sure
        try:
            kept, _ = await self._keep_unchanged(
                source, grant, [r for r in unsure if r.path in granted], {})
        finally:
            await release_claims(proto, source.id, self.id, sorted(granted))
        return sure + kept

    def _cost(self, sid: str, path: bytes, size: int, parents: Optional[dict] = None) -> int:
        """
        What fetching C{path} adds to usage at its peak (L{Store.cost}); an
        update in place over a kept old version (L{basis}) adds only what
        the new version is larger by.
        """
        source = self.by_id[sid]
        cost = self.store.cost(source.host, source.path, path, size, parents)
        basis = self.basis.get((sid, path))
        return cost - min(size, basis.size) if basis is not None else cost

    def _orphans(self, now: float) -> list[planner.Orphan]:
        """
        This store's orphans for the planner: files deleted at the source
        still in the layout, and the superseded versions it keeps (keyed by
        L{kept_key}), each with when it was first orphaned.
        """
        marks = self.store.orphans()
        out = []
        for sid, held in self.store.files.items():
            out += [planner.Orphan(sid, path, held[path].size, since)
                    for (s, path), since in marks.items() if s == sid and path in held]
        bases = set(self.basis.values())
        for sid, kept in self.store.kept.items():
            for record in kept:
                if record in bases:
                    continue  # let go already, to be updated in place
                key = kept_key(record)
                out.append(planner.Orphan(sid, key, record.size, marks.get((sid, key), now),
                                          of=record.path))
        return out

    def _kept_by_key(self, sid: str) -> dict[bytes, FileRecord]:
        """The versions of C{sid} this store keeps, by their L{kept_key}."""
        return {kept_key(record): record for record in self.store.kept.get(sid, {})}

    async def _remove_all(self, keys: list[tuple[str, bytes]], reason: str) -> None:
        """
        Delete layout copies and kept versions (by L{kept_key}) of C{keys}
        (source id, path), in chunks of at most L{REMOVE_CHUNK} that each
        end after L{REMOVE_SLICE} seconds, yielding to the reactor between
        them: 100,000 removals never hold the reactor, so leases, reports
        and a stop go on meanwhile (rule 9).  A stop ends the removals.
        """
        by_source: dict[str, list[bytes]] = defaultdict(list)
        for sid, path in keys:
            by_source[sid].append(path)
        for sid, paths in by_source.items():
            source = self.by_id[sid]
            copies = [p for p in paths if b"\0" not in p]
            by_key = self._kept_by_key(sid)
            kept = [by_key[p] for p in paths if p in by_key]
            files = freed = 0
            started = self.reactor.seconds()
            while copies or kept:
                if self._stopping:
                    return
                slice_ends = time.monotonic() + REMOVE_SLICE
                while (copies or kept) and time.monotonic() < slice_ends:
                    if copies:
                        chunk, copies = copies[:REMOVE_CHUNK], copies[REMOVE_CHUNK:]
                        freed += self.store.remove_many(source.host, source.path, chunk)
                        self.unreported[sid].removed += chunk
                    else:
                        record = kept.pop()
                        freed += self.store.remove_kept(source.host, source.path, record)
                        self.unreported[sid].unkept.append(record)
                        chunk = [record]
                    files += len(chunk)
                await deferLater(self.reactor, 0, lambda: None)
            log.info("{store}: dropped {files} files of {source} ({reason}; {freed} B freed "
                     "in {seconds:.1f}s)", store=self.id, files=files, source=sid,
                     reason=reason, freed=freed, seconds=self.reactor.seconds() - started)

    async def _drops(self, drops: list) -> None:
        """
        Ask each server to let go of the copies and kept versions C{drops}
        name; delete those granted.  A kept version granted to make room for
        a newer version of the same file is not deleted but kept as the
        basis the new version is written over (L{basis}).
        """
        asked: dict[str, list] = defaultdict(list)
        for drop in drops:
            asked[drop.source].append(drop)
        for sid, items in asked.items():
            proto = self._proto(self.by_id[sid])
            if proto is None:
                continue
            copies = [d.path for d in items if b"\0" not in d.path]
            by_key = self._kept_by_key(sid)
            kept = {d.path: by_key[d.path] for d in items if d.path in by_key}
            try:
                granted = set(await session.release(proto, sid, self.id, copies, drop=True)
                              if copies else ())
                if kept:
                    granted.update(kept_key(r) for r in await session.drop_kept(
                        proto, sid, self.id, list(kept.values())))
            except Exception as e:
                log.warn("{store}: asking {source} to drop {n} copies failed: {why}",
                         store=self.id, source=sid, n=len(items), why=str(e) or repr(e))
                continue
            now = self.reactor.seconds()
            gone = []
            for d in items:
                if d.path not in granted:
                    self.no_drop[(sid, d.path)] = now
                elif d.path in kept and kept[d.path].path == d.for_path:
                    self.basis[(sid, d.for_path)] = kept[d.path]
                    self.unreported[sid].unkept.append(kept[d.path])
                    log.info("{store}: {path} of {source} will be updated in place from its "
                             "old version", store=self.id, path=os.fsdecode(d.for_path),
                             source=sid)
                else:
                    gone.append((sid, d.path))
                    log.info("{store}: dropping {path} of {source} ({reason})",
                             store=self.id, path=os.fsdecode(d.path.replace(b"\0", b" ")),
                             source=sid, reason=d.reason)
            await self._remove_all(gone, "granted by the server")

    async def _report_removed(self) -> None:
        """Report what changed on disk to every server that is connected."""
        for sid in list(self.unreported):
            proto = self._proto(self.by_id[sid])
            if proto is None:
                continue
            try:
                await self._report_changes(proto, self.by_id[sid])
            except Exception as e:
                log.warn("{store}: reporting changes of {source} failed: {why}",
                         store=self.id, source=sid, why=str(e) or repr(e))

    async def fetch_batch(self, source: Source, needs: list,
                          later: Optional[list] = None) -> int:
        """
        Claim, rsync, verify and report one batch; returns files fetched.
        With C{later} (a list), return as soon as the files are on disk,
        with how many are, and append to C{later} a function that starts
        checking them against the source and reporting them and returns a
        Deferred (that never fails: errors are logged): the caller fetches
        its next batch meanwhile (see L{round}).
        """
        proto = self._proto(source)
        if proto is None:
            return 0
        # Needs are claimed as needs (refused if others took them meanwhile),
        # copies offered at or above their count as greedy fill (see Claim).
        granted: set = set()
        for fill in (False, True):
            paths = [n.path for n in needs if (n.copies >= n.wanted) == fill]
            if paths:
                grant = await session.claim(proto, source.id, self.id, paths, fill=fill)
                granted.update(grant.granted)
        batch = await self._keep_before_fetch(proto, source,
                                              [n for n in needs if n.path in granted])
        if not batch:
            return 0
        keys = {(source.id, n.path) for n in batch}
        self.busy |= keys
        paths = [n.path for n in batch]
        held = self.store.files.get(source.id, {})
        before = {p: held[p] for p in paths if p in held}
        renew = LoopingCall(self._renew_claim, proto, source, paths)
        renew.clock = self.reactor
        # Every report interval (at most a third of the ttl): the server
        # takes files below copies as stuck after a few intervals unclaimed.
        renew.start(max(1.0, min(grant.ttl / 3, self.cluster.options.report_interval)),
                    now=False)
        inplace = [p for p in paths if (source.id, p) in self.basis]
        whole = [p for p in paths if (source.id, p) not in self.basis]
        try:
            result = await self._rsync(source, grant, whole)
            if inplace:
                result = transfer.combined(result, await self._update_in_place(
                    source, grant, inplace))
        finally:
            if renew.running:
                renew.stop()
            self.busy -= keys
        found = self.store.refresh_many(source.host, source.path, paths)
        arrived = [record for record in found.values() if record is not None]
        self.store.measure_state()
        if transfer.out_of_space(result.errors):
            quota = self.store.out_of_space()
            log.warn("{store}: filesystem is full (rsync: No space left on device); partial "
                     "files removed, effective quota now {quota} ({used} used)",
                     store=self.id, quota=human_size(quota),
                     used=human_size(max(0, self.store.used)))
        if later is None:
            return await self._settle_batch(source, grant, paths, before, arrived, result)

        def settle() -> Deferred:
            d = ensureDeferred(self._settle_batch(source, grant, paths, before, arrived, result))
            return d.addErrback(self._settle_failed, source)

        later.append(settle)
        return len(arrived)

    async def _keep_before_fetch(self, proto, source: Source, batch: list) -> list:
        """
        Of C{batch} (needs claimed), those to fetch now.  A file this store
        holds at another version than the one offered is a version the
        source replaced, even if the server's word of it has not come yet:
        its copy is kept (rule 7) before rsync would write over it.  One
        that cannot be kept (no room for its folders) is not fetched, and
        its claim is released.
        """
        held = self.store.files.get(source.id, {})
        old = [n.path for n in batch
               if n.path in held and (held[n.path].size, held[n.path].mtime) != (n.size, n.mtime)]
        if not old:
            return batch
        self.to_keep[source.id].update(dict.fromkeys(old))
        await self._keep_old_versions()
        held = self.store.files.get(source.id, {})
        stuck = {p for p in old if p in held}
        if stuck:
            await release_claims(proto, source.id, self.id, sorted(stuck))
        return [n for n in batch if n.path not in stuck]

    async def _update_in_place(self, source: Source, grant, paths: list):
        """
        Fetch C{paths} by rewriting in place the old versions the server let
        go for them (L{basis}): each is moved to the store's update folder,
        rsync rewrites it there with it as the delta basis (room: the larger
        of the two versions, not both), and what rsync finished goes into
        the layout.  A failed update leaves nothing in the layout.
        """
        dest = None
        for path in paths:
            record = self.basis.pop((source.id, path))
            try:
                dest = self.store.take_for_update(source.host, source.path, record)
            except (OSError, StoreError, KeyError) as e:
                log.warn("{store}: cannot update {path} of {source} in place: {why}",
                         store=self.id, path=os.fsdecode(path), source=source.id, why=str(e))
        result = await self._rsync(source, grant, paths, update_dir=dest)
        done = sorted(result.transferred) if result.status in ("ok", "partial") else []
        self.store.finish_update(source.host, source.path, done)
        self.store.clean_update(source.host, source.path)
        return result

    def _settle_failed(self, failure, source: Source) -> int:
        log.failure("{store}: checking and reporting a batch of {source} failed", failure,
                    store=self.id, source=source.id)
        return 0

    async def _settle_batch(self, source: Source, grant, paths: list, before: dict,
                            arrived: list, result) -> int:
        """
        The end of L{fetch_batch}: check what arrived against the source (a
        file rewritten during its transfer is removed, never counted), report
        the rest, release the claims on what did not arrive.
        """
        arrived, discarded = await self._keep_unchanged(source, grant, arrived, before)
        arrived_paths = {r.path for r in arrived}
        missing = [p for p in paths if p not in arrived_paths]
        # The connection may have been replaced during a long transfer: report
        # on the live one (a new session's inventory did not include these).
        live = self._proto(source)
        if live is not None:
            answer = await session.report_delta(live, source.id, self.id, held=arrived,
                                                removed=discarded, **self.usage())
            self.handle_answer(source, answer)
            if missing:
                await release_claims(live, source.id, self.id, missing)
        size = sum(r.size for r in arrived)
        seconds = max(result.seconds, 1e-6)
        log.info("{store}: fetched {files} files ({bytes} B) of {source} in {seconds:.1f}s "
                 "({rate}/s), rsync {status}; {missing} not fetched; quota {used} of {quota}",
                 store=self.id, files=len(arrived), bytes=size, source=source.id,
                 seconds=seconds, rate=human_size(int(size / seconds)), status=result.status,
                 missing=len(missing), used=human_size(max(0, self.store.used)),
                 quota=human_size(self.store.quota or 0))
        return len(arrived)

    def _rsync_marker(self) -> str:
        """The argv entry that marks this store's rsyncs (see L{transfer.kill_strays})."""
        return "--temp-dir=" + os.fsdecode(self.store.temp_dir)

    async def _rsync(self, source: Source, grant, paths: list, check: bool = False,
                     update_dir: Optional[bytes] = None):
        """
        Fetch C{paths} (or with C{check}, list those whose copy differs from
        the source now, see L{transfer.changed_since}; with C{update_dir},
        rewrite the files there in place, see L{_update_in_place}).  A run
        that cannot even start (say, fork fails) is a failed result; once
        the agent is stopping, none starts (a cancelled result).
        """
        if self._stopping:
            return transfer.TransferResult(None, "cancelled", (), (), 0.0, 0)
        dest = update_dir or self.store.source_dir(source.host, source.path)
        e = grant.endpoint  # never this host's own source (Cluster.backs_up)
        url, password = f"rsync://{e.user}@{e.host}:{e.port}/{e.module}/", e.password
        run = transfer.changed_since if check else transfer.fetch
        try:
            d, cancel = run(
                self.reactor, source_url=url, password=password, dest_dir=os.fsdecode(dest),
                paths=paths, partial_dir=os.fsdecode(self.store.partial_dir),
                temp_dir=os.fsdecode(self.store.temp_dir),
                bwlimit=None if check else self.cluster.options.bwlimit,
                inplace=update_dir is not None)
        except OSError as e:
            log.warn("{store}: rsync for {source} did not start: {why}", store=self.id,
                     source=source.id, why=str(e))
            return transfer.TransferResult(None, "failed", (), (str(e),), 0.0, 0)
        self._cancels.add(cancel)
        try:
            return await d
        finally:
            self._cancels.discard(cancel)

    async def _keep_unchanged(self, source: Source, grant, arrived: list,
                              before: dict) -> tuple[list, list]:
        """
        Of the copies this run wrote (new, or another size or mtime than
        C{before} it), keep those the source still has at the same size and
        mtime; remove the others (a source file rewritten while rsync read
        it arrives with mixed bytes under its old mtime), so no such copy is
        ever reported.  When the check itself fails nothing it wrote can be
        vouched for, and all of that is removed.  Copies rsync left as they
        were are kept as they were.  Returns the copies kept and the paths
        removed.
        """
        written = [r for r in arrived if before.get(r.path) != r
                   or r.path in self.unverified.get(source.id, ())]
        if not written:
            return arrived, []
        result = await self._rsync(source, grant, [r.path for r in written], check=True)
        if result.status not in ("ok", "partial"):
            # The server went away mid-batch (e.g. restarted): keep the copies
            # but do not vouch for them; the next round checks them again
            # (L{_already_held}) rather than fetching them again.
            self.unverified.setdefault(source.id, set()).update(r.path for r in written)
            log.warn("{store}: could not check {n} arrived files of {source} against the "
                     "source (rsync {status}); kept, not reported until checked",
                     store=self.id, n=len(written), source=source.id, status=result.status)
            return [r for r in arrived if r not in written], []
        changed = set(result.transferred) & {r.path for r in written}
        self.unverified.get(source.id, set()).difference_update(r.path for r in written)
        for path in sorted(changed):
            self.store.remove(source.host, source.path, path)
            log.info("{store}: {path} of {source} changed at the source during its "
                     "transfer; copy removed, not counted", store=self.id,
                     path=os.fsdecode(path), source=source.id)
        return [r for r in arrived if r.path not in changed], sorted(changed)

    def _renew_claim(self, proto, source: Source, paths: list):
        d = session.claim(proto, source.id, self.id, paths)
        d.addErrback(lambda f: log.warn("{store}: claim renewal failed: {why}",
                                        store=self.id, why=f.getErrorMessage()))
        return d
