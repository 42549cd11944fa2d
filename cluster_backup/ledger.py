"""
The replica ledger of one source: which files it has, which store holds which
version of each, who is fetching what, and so what each store should fetch
next.  Sans-IO: no disk, no network, no reactor; time comes from the C{clock}
passed in (anything with C{.seconds()}), so tests drive it with L{Clock}.

It is built for millions of files.  A file is an integer id; its path, size,
mtime, hash and copy count live in parallel lists and arrays, and its current
holders are one small int, a bitmask of store indexes (masks are interned, so
most files share a handful of int objects).  Files are indexed by live copy
count ("tier") and, inside a tier, by a bucket of their path hash, so a page
of needs touches a few buckets instead of sorting every file; a page of a
store's surplus copies walks the tiers above C{copies} the same way.  Everything
that depends on time (claims expiring, stores going dead, safemode ending) is
evaluated lazily when a method is called.

Counting rules (DESIGN.md): a copy counts once per distinct host, only at the
current version, only while its store is not dead; a live claim counts as a
copy on the claimer's host.  The status histogram counts real holdings only.
"""

from __future__ import annotations

import struct
from array import array
from bisect import bisect_left, insort
from hashlib import blake2b
from heapq import heappop, heappush
from typing import Iterable, Mapping, Optional
from zlib import crc32

from .records import FileRecord, Need, ReportAnswer, SourceStatus, StoreStatus, rank

__all__ = ["Ledger", "LedgerError", "UnknownStore", "UnknownPath", "BadCursor"]

_M32 = 0xFFFFFFFF
# 2**12 hash buckets per tier: at a million files a bucket holds a few hundred
# ids, small enough to sort one per page step, few enough to cost little.
_BUCKET_SHIFT = 20
_BUCKETS = 1 << (32 - _BUCKET_SHIFT)
# needs() examines at most this many files per call; when the budget runs out
# it answers a short page with a cursor rather than stalling the server.
_SCAN_BUDGET = 50_000
_CURSOR = struct.Struct(">BHHIQ")
_CURSOR_TAG = 1  # needs() cursors
_SURPLUS_TAG = 2  # surplus() cursors: a needs cursor is no surplus cursor


class LedgerError(Exception):
    """A request the ledger refused; it changed nothing."""


class UnknownStore(LedgerError):
    """The store id is not one configured to back up this source."""


class UnknownPath(LedgerError):
    """The path is not a file of this source (nor one the store holds)."""


class BadCursor(LedgerError):
    """A needs() or surplus() cursor that this ledger did not produce."""


def _path_hash(path: bytes) -> int:
    # crc32 is cheap; the odd multiplier spreads its low bits into the top
    # bits, which pick the bucket.
    return (crc32(path) * 0x9E3779B1) & _M32


class _Tier:
    """The files with one live copy count, bucketed by path hash."""

    __slots__ = ("buckets", "order", "files", "bytes")

    def __init__(self) -> None:
        self.buckets: dict[int, set[int]] = {}
        self.order: list[int] = []  # sorted keys of non-empty buckets
        self.files = 0
        self.bytes = 0

    def add(self, i: int, b: int, size: int) -> None:
        bucket = self.buckets.get(b)
        if bucket is None:
            bucket = self.buckets[b] = set()
            insort(self.order, b)
        bucket.add(i)
        self.files += 1
        self.bytes += size

    def remove(self, i: int, b: int, size: int) -> None:
        bucket = self.buckets[b]
        bucket.remove(i)
        if not bucket:
            del self.buckets[b]
            del self.order[bisect_left(self.order, b)]
        self.files -= 1
        self.bytes -= size


class _Inventory:
    """What one store reported since its inventory_started()."""

    __slots__ = ("marks", "paths")

    def __init__(self, n: int) -> None:
        self.marks = bytearray(n)  # by file id; ids >= len count as seen
        self.paths: set[bytes] = set()  # reported paths the ledger lacks


class Ledger:
    """
    The ledger of one source (see the module docstring), implementing
    L{cluster_backup.records.LedgerAPI}.

    @param source: the source id, C{"host:/path"}.
    @param copies: how many live copies on distinct hosts are wanted.
    @param clock: anything with C{seconds()}.
    @param stores: every store id backing up this source -> its host name.
    @param heartbeat: when given, the owner promises a call (L{beat}) at
        least this often while it runs; a longer gap is time it could not
        hear anyone and does not count against leases, claims or safemode.
    """

    def __init__(
        self,
        source: str,
        copies: int,
        clock,
        stores: Mapping[str, str],
        *,
        report_interval: float = 60.0,
        dead_after: float = 3600.0,
        claim_ttl: float = 300.0,
        heartbeat: Optional[float] = None,
    ) -> None:
        if not isinstance(copies, int) or copies < 1:
            raise ValueError(f"copies must be a positive integer, not {copies!r}")
        self.source = source
        self.copies = copies
        self._clock = clock
        self._report_interval = report_interval
        self._dead_after = dead_after
        self._claim_ttl = claim_ttl
        self._created = clock.seconds()
        self._safe = True
        if heartbeat is not None and not heartbeat > 0:
            raise ValueError(f"heartbeat must be positive seconds, not {heartbeat!r}")
        self._heartbeat = heartbeat
        self._awake: Optional[float] = None  # when we last ran (heartbeat only)
        #: Seconds this ledger did not count against leases, claims and
        #: safemode because its owner was not running (see L{beat}).
        self.deaf_seconds = 0.0

        # Stores, by index.
        self._store_ids = list(stores)
        self._index = {sid: s for s, sid in enumerate(self._store_ids)}
        self._hosts = [stores[sid] for sid in self._store_ids]
        host_numbers = {h: n for n, h in enumerate(sorted(set(self._hosts)))}
        self._host_bit = [1 << host_numbers[h] for h in self._hosts]
        # For each store, the mask of every store on the same host.
        self._same_host = [
            sum(1 << t for t, h in enumerate(self._hosts) if h == host)
            for host in self._hosts
        ]
        self._salt = [
            int.from_bytes(blake2b(sid.encode("utf-8", "surrogateescape"), digest_size=4).digest(), "big")
            for sid in self._store_ids
        ]
        n = len(self._store_ids)
        self._live = (1 << n) - 1  # stores not dead
        self._last: list[Optional[float]] = [None] * n
        self._used: list[Optional[int]] = [None] * n
        self._quota: list[Optional[int]] = [None] * n
        self._held_files = [0] * n
        self._held_bytes = [0] * n
        self._stale: list[dict[int, tuple[int, int]]] = [{} for _ in range(n)]
        self._orphans: list[dict[bytes, tuple[int, int]]] = [{} for _ in range(n)]
        self._pending: list[dict[bytes, tuple[int, int]]] = [{} for _ in range(n)]
        self._tell_stale: list[dict[bytes, None]] = [{} for _ in range(n)]
        self._tell_orphans: list[dict[bytes, None]] = [{} for _ in range(n)]
        self._inventory: list[Optional[_Inventory]] = [None] * n
        self._inventoried: set[int] = set()
        self._claim_count = [0] * n
        #: store id -> how many times it was declared dead.
        self.deaths: dict[str, int] = dict.fromkeys(self._store_ids, 0)

        # Files, by id.
        self._ids: dict[bytes, int] = {}
        self._paths: list[Optional[bytes]] = []
        self._size = array("q")
        self._mtime = array("q")
        self._hash = array("I")
        self._count = array("H")  # live copies incl. claims = its tier
        self._holders: list[int] = []  # mask of stores holding it current
        self._free: list[int] = []
        self._tiers: dict[int, _Tier] = {0: _Tier()}
        self._bytes = 0
        self._masks: dict[int, int] = {}  # interned holder masks
        self._ncopies: dict[int, int] = {0: 0}  # store mask -> distinct hosts

        # Claims: file id -> {store: deadline}, and a heap to expire them.
        self._claims: dict[int, dict[int, float]] = {}
        self._claim_heap: list[tuple[float, int, int]] = []

        # Scans.
        self._seen: Optional[bytearray] = None  # marks of the running scan
        self._scanned: Optional[float] = None
        self._scan_error: Optional[str] = None

    # -- time ---------------------------------------------------------------

    def beat(self) -> None:
        """
        The owner is running.  With a C{heartbeat}, the owner calls this at
        least every C{heartbeat} seconds (any other call counts as well); a
        longer gap between calls means the owner could hear no one (process
        stopped or suspended, reactor blocked), so that time is not counted
        as anyone's silence: leases, claims and the safemode timer are
        moved on by it.  Otherwise a server stopped for longer than
        C{dead_after} would, on waking, find every store dead at once.
        """
        self._tick()

    def _deaf(self, seconds: float) -> None:
        """Move every lease, claim and the safemode start on by C{seconds}."""
        self.deaf_seconds += seconds
        self._created += seconds
        self._last = [None if last is None else last + seconds for last in self._last]
        if self._claim_heap:
            for claimers in self._claims.values():
                for s in claimers:
                    claimers[s] += seconds
            self._claim_heap = [(d + seconds, i, s) for d, i, s in self._claim_heap]

    def _tick(self) -> float:
        """Apply whatever the clock made true since the last call."""
        now = self._clock.seconds()
        if self._heartbeat is not None:
            awake = self._awake
            if awake is not None and now - awake > 2 * self._heartbeat:
                self._deaf(now - awake - self._heartbeat)
            self._awake = now
        heap = self._claim_heap
        while heap and heap[0][0] <= now:
            deadline, i, s = heappop(heap)
            claims = self._claims.get(i)
            if claims is not None and claims.get(s) == deadline:
                self._unclaim(i, s, claims)
        for s, last in enumerate(self._last):
            bit = 1 << s
            if last is not None and self._live & bit and now - last >= self._dead_after:
                self._live &= ~bit
                self.deaths[self._store_ids[s]] += 1
                self._recount_store(bit)
        if self._safe and (
            now - self._created >= 5 * self._report_interval
            or len(self._inventoried) == len(self._store_ids)
        ):
            self._safe = False
        return now

    @property
    def safemode(self) -> bool:
        """
        True while stores may still be re-reporting after a start: until every
        store finished an inventory or 5 report intervals passed.  No needs,
        claims or drops are granted meanwhile, since the counts are not yet
        trustworthy.
        """
        self._tick()
        return self._safe

    # -- counting -----------------------------------------------------------

    def _hosts_in(self, mask: int) -> int:
        n = self._ncopies.get(mask)
        if n is None:
            hosts = 0
            m = mask
            while m:
                low = m & -m
                hosts |= self._host_bit[low.bit_length() - 1]
                m ^= low
            n = self._ncopies[mask] = hosts.bit_count()
        return n

    def _intern(self, mask: int) -> int:
        return self._masks.setdefault(mask, mask)

    def _recount(self, i: int) -> None:
        """Move file C{i} to the tier of its live copy count."""
        # Hot path (every new holding): tier moves are inlined.
        m = self._holders[i] & self._live
        claims = self._claims.get(i)
        if claims:
            for s in claims:
                m |= 1 << s
        n = self._ncopies.get(m)
        if n is None:
            n = self._hosts_in(m)
        count = self._count
        old = count[i]
        if n != old:
            count[i] = n
            b = self._hash[i] >> _BUCKET_SHIFT
            size = self._size[i]
            tiers = self._tiers
            tier = tiers[old]
            bucket = tier.buckets[b]
            bucket.remove(i)
            if not bucket:
                del tier.buckets[b]
                del tier.order[bisect_left(tier.order, b)]
            tier.files -= 1
            tier.bytes -= size
            tier = tiers.get(n)
            if tier is None:
                tier = tiers[n] = _Tier()
            bucket = tier.buckets.get(b)
            if bucket is None:
                bucket = tier.buckets[b] = set()
                insort(tier.order, b)
            bucket.add(i)
            tier.files += 1
            tier.bytes += size

    def _recount_store(self, bit: int) -> None:
        # O(files): only when a store dies or comes back.
        for i, m in enumerate(self._holders):
            if m & bit:
                self._recount(i)

    def _under(self) -> int:
        return sum(t.files for c, t in self._tiers.items() if c < self.copies)

    # -- holdings -----------------------------------------------------------

    def _hold(self, i: int, s: int) -> None:
        """Store C{s} holds file C{i} at its current version."""
        bit = 1 << s
        m = self._holders[i]
        if not m & bit:
            self._holders[i] = self._intern(m | bit)
            self._held_files[s] += 1
            self._held_bytes[s] += self._size[i]
        self._stale[s].pop(i, None)
        claims = self._claims.get(i)
        if claims is not None and s in claims:
            # The fetch is done: the holding now counts for this host.
            self._unclaim(i, s, claims)
        else:
            self._recount(i)

    def _unhold(self, i: int, s: int) -> None:
        bit = 1 << s
        m = self._holders[i]
        if m & bit:
            self._holders[i] = self._intern(m & ~bit)
            self._held_files[s] -= 1
            self._held_bytes[s] -= self._size[i]
            self._recount(i)

    def _unclaim(self, i: int, s: int, claims: dict[int, float]) -> None:
        del claims[s]
        if not claims:
            del self._claims[i]
        self._claim_count[s] -= 1
        self._recount(i)

    def _place(self, i: int, s: int, version: tuple[int, int]) -> bool:
        """Record that C{s} holds C{i} at C{version}; say if it is current."""
        if version[0] == self._size[i] and version[1] == self._mtime[i]:
            self._hold(i, s)
            return True
        self._unhold(i, s)
        self._stale[s][i] = version
        return False

    # -- files ----------------------------------------------------------------

    def _add(self, path: bytes, size: int, mtime: int) -> int:
        h = _path_hash(path)
        if self._free:
            i = self._free.pop()
            self._paths[i] = path
            self._size[i] = size
            self._mtime[i] = mtime
            self._hash[i] = h
            self._count[i] = 0
            self._holders[i] = 0
            for inv in self._inventory:
                if inv is not None and i < len(inv.marks):
                    inv.marks[i] = 0
            if self._seen is not None and i < len(self._seen):
                self._seen[i] = 1
        else:
            i = len(self._paths)
            self._paths.append(path)
            self._size.append(size)
            self._mtime.append(mtime)
            self._hash.append(h)
            self._count.append(0)
            self._holders.append(0)
            if self._seen is not None:
                self._seen.append(1)
        self._ids[path] = i
        self._bytes += size
        self._tiers[0].add(i, h >> _BUCKET_SHIFT, size)
        return i

    def _adopt(self, i: int, path: bytes, stores: list[int]) -> None:
        """A new file: holdings stores reported before it existed apply now."""
        for s in stores:
            version = self._pending[s].pop(path, None)
            if version is None:
                version = self._orphans[s].pop(path, None)
                self._tell_orphans[s].pop(path, None)
            if version is not None:
                if not self._place(i, s, version):
                    self._tell_stale[s][path] = None

    def _change(self, i: int, size: int, mtime: int) -> None:
        """A new version of file C{i}: current copies become stale."""
        path = self._paths[i]
        old = (self._size[i], self._mtime[i])
        delta = size - old[0]
        self._bytes += delta
        self._tiers[self._count[i]].bytes += delta
        m = self._holders[i]
        self._holders[i] = 0
        self._size[i] = size
        self._mtime[i] = mtime
        for s in range(len(self._store_ids)):
            if m & (1 << s):
                self._held_files[s] -= 1
                self._held_bytes[s] -= old[0]
                self._stale[s][i] = old
                self._tell_stale[s][path] = None
            elif self._stale[s].get(i) == (size, mtime):
                self._hold(i, s)
                self._tell_stale[s].pop(path, None)
        self._recount(i)

    def _remove(self, i: int) -> None:
        """File C{i} left the source: its copies become orphans."""
        path = self._paths[i]
        version = (self._size[i], self._mtime[i])
        m = self._holders[i]
        for s in range(len(self._store_ids)):
            if m & (1 << s):
                self._held_files[s] -= 1
                self._held_bytes[s] -= version[0]
                self._orphans[s][path] = version
                self._tell_orphans[s][path] = None
            old = self._stale[s].pop(i, None)
            if old is not None:
                self._orphans[s][path] = old
                self._tell_orphans[s][path] = None
                self._tell_stale[s].pop(path, None)
        for inventory in self._inventory:
            # A path reported during an inventory stays remembered as orphan.
            if inventory is not None and i < len(inventory.marks) and inventory.marks[i]:
                inventory.paths.add(path)
        claims = self._claims.pop(i, None)
        if claims:
            for s in claims:
                self._claim_count[s] -= 1
        self._tiers[self._count[i]].remove(i, self._hash[i] >> _BUCKET_SHIFT, version[0])
        self._bytes -= version[0]
        del self._ids[path]
        self._paths[i] = None
        self._holders[i] = 0
        self._free.append(i)

    def knows(self, path: bytes) -> bool:
        """Whether C{path} is a current file of this source."""
        return path in self._ids

    # -- scans ----------------------------------------------------------------

    def scan_started(self) -> None:
        """
        A scan of the source begins.  Batches may follow; only a complete
        finish removes the files the scan did not see.
        """
        self._tick()
        self._seen = bytearray(len(self._paths))

    def scan_batch(self, records: Iterable[FileRecord]) -> None:
        """
        Files the running scan found.  New files appear at once and a new
        version makes existing copies stale at once; removals wait for
        L{scan_finished}.  A batch without L{scan_started} starts a scan.
        """
        self._tick()
        if self._seen is None:
            self.scan_started()
        seen = self._seen
        ids = self._ids
        sizes = self._size
        mtimes = self._mtime
        waiting = [
            s for s in range(len(self._store_ids)) if self._pending[s] or self._orphans[s]
        ]
        for record in records:
            path = record.path
            i = ids.get(path)
            if i is None:
                i = self._add(path, record.size, record.mtime)
                if waiting:
                    self._adopt(i, path, waiting)
                continue
            if i < len(seen):
                seen[i] = 1
            if sizes[i] != record.size or mtimes[i] != record.mtime:
                self._change(i, record.size, record.mtime)

    def scan_finished(self, complete: bool, error: Optional[str] = None) -> None:
        """
        The scan ended.  If C{complete}, files it did not see are removed
        (their copies become orphans).  If not, nothing is removed (an
        unreadable source is not an empty one) and C{error} is kept for
        status.
        """
        now = self._tick()
        seen = self._seen
        if not complete:
            self._seen = None
            self._scan_error = error if error is not None else "scan incomplete"
            return
        if seen is None:
            raise LedgerError("scan_finished(complete=True) without scan_started()")
        self._seen = None
        pos = seen.find(0)
        while pos >= 0:
            if self._paths[pos] is not None:
                self._remove(pos)
            pos = seen.find(0, pos + 1)
        first = self._scanned is None
        self._scanned = now
        self._scan_error = error
        if first:
            # Paths stores reported before we knew the source are orphans.
            for s, pending in enumerate(self._pending):
                self._orphans[s].update(pending)
                self._tell_orphans[s].update(dict.fromkeys(pending))
                pending.clear()

    # -- reports --------------------------------------------------------------

    def _store(self, store: str) -> int:
        s = self._index.get(store)
        if s is None:
            raise UnknownStore(store)
        return s

    def _renew(self, s: int, now: float) -> None:
        self._last[s] = now
        bit = 1 << s
        if not self._live & bit:
            self._live |= bit
            self._recount_store(bit)

    def _answer(self, s: int) -> ReportAnswer:
        stale = list(self._tell_stale[s])
        orphans = list(self._tell_orphans[s])
        self._tell_stale[s].clear()
        self._tell_orphans[s].clear()
        return ReportAnswer(stale=stale, orphans=orphans)

    def inventory_started(self, store: str) -> None:
        """
        A full inventory of C{store} begins: holdings it does not report
        before L{inventory_finished} are forgotten.  Renews its lease.

        A full inventory starts a new session of that store (its client
        restarted or reconnected), so its earlier claims are dropped: the
        transfers behind them are gone, and leaving them would hide those
        files from every store until the claims expire.
        """
        s = self._store(store)
        now = self._tick()
        self._renew(s, now)
        for i in [i for i, claimers in self._claims.items() if s in claimers]:
            self._unclaim(i, s, self._claims[i])
        self._inventory[s] = _Inventory(len(self._paths))

    def report(
        self,
        store: str,
        held: Iterable[FileRecord] = (),
        removed: Iterable[bytes] = (),
        used: Optional[int] = None,
        quota: Optional[int] = None,
    ) -> ReportAnswer:
        """
        C{store} holds C{held} (at their versions) and no longer holds
        C{removed}; renews its lease.  Answers which reported paths are at a
        stale version and which are orphans (plus any learned since its last
        answer, e.g. from a rescan).  Paths unknown before the first complete
        scan are kept aside and answered once that scan ends.
        """
        s = self._store(store)
        now = self._tick()
        self._renew(s, now)
        ids = self._ids
        stale = self._stale[s]
        orphans = self._orphans[s]
        pending = self._pending[s]
        tell_stale = self._tell_stale[s]
        tell_orphans = self._tell_orphans[s]
        inventory = self._inventory[s]
        for path in removed:
            i = ids.get(path)
            if i is not None:
                self._unhold(i, s)
                stale.pop(i, None)
            orphans.pop(path, None)
            pending.pop(path, None)
            tell_stale.pop(path, None)
            tell_orphans.pop(path, None)
        bit = 1 << s
        holders = self._holders
        sizes = self._size
        mtimes = self._mtime
        marks = inventory.marks if inventory is not None else bytearray()
        nmarks = len(marks)
        scanned = self._scanned is not None
        claims = self._claims
        masks_get = self._masks.get
        intern = self._intern
        recount = self._recount
        nfiles = nbytes = 0
        for record in held:
            path = record.path
            i = ids.get(path)
            if i is None:
                if inventory is not None:
                    inventory.paths.add(path)
                if scanned:
                    orphans[path] = record.version
                    tell_orphans[path] = None
                else:
                    pending[path] = record.version
                continue
            if i < nmarks:
                marks[i] = 1
            if sizes[i] == record.size and mtimes[i] == record.mtime:
                m = holders[i]
                if m & bit:
                    continue  # already known: the common inventory case
                if i in claims or i in stale:
                    self._hold(i, s)
                else:
                    # _hold() inlined: this is the hot path of a fetch report.
                    m |= bit
                    holders[i] = masks_get(m) or intern(m)
                    nfiles += 1
                    nbytes += sizes[i]
                    recount(i)
                if tell_stale:
                    tell_stale.pop(path, None)
            else:
                self._unhold(i, s)
                stale[i] = record.version
                tell_stale[path] = None
        self._held_files[s] += nfiles
        self._held_bytes[s] += nbytes
        if used is not None:
            self._used[s] = used
        if quota is not None:
            self._quota[s] = quota
        return self._answer(s)

    def inventory_finished(self, store: str) -> ReportAnswer:
        """
        C{store}'s inventory is complete: forget what it did not report, and
        count it as re-reported for safemode.  Answers like L{report}.
        """
        s = self._store(store)
        now = self._tick()
        inventory = self._inventory[s]
        if inventory is None:
            raise LedgerError(f"inventory_finished({store!r}) without inventory_started()")
        self._renew(s, now)
        self._inventory[s] = None
        marks = inventory.marks
        n = len(marks)
        bit = 1 << s
        paths = self._paths
        for i, m in enumerate(self._holders):
            if m & bit and i < n and not marks[i] and paths[i] not in inventory.paths:
                self._unhold(i, s)
        stale = self._stale[s]
        for i in [i for i in stale if i < n and not marks[i] and paths[i] not in inventory.paths]:
            del stale[i]
        for d in (self._orphans[s], self._pending[s]):
            for path in [p for p in d if p not in inventory.paths]:
                del d[path]
                self._tell_orphans[s].pop(path, None)
        self._inventoried.add(s)
        self._tick()  # safemode may end now
        return self._answer(s)

    # -- needs, claims, drops -------------------------------------------------

    def _ids_of(self, paths: Iterable[bytes]) -> tuple[list[bytes], list[int]]:
        paths = list(paths)
        ids = []
        for path in paths:
            i = self._ids.get(path)
            if i is None:
                raise UnknownPath(path)
            ids.append(i)
        return paths, ids

    def needs(
        self, store: str, cursor: Optional[bytes], limit: int
    ) -> tuple[list[Need], Optional[bytes]]:
        """
        Up to C{limit} files C{store} should fetch, rarest first (by
        L{rank}), skipping what its host holds or claims; and a cursor for
        the next page, or C{None} at the end.  Inside one tier the order is a
        rotation of the hash order that differs per store, so stores asking
        together get different files.  Surplus files come last (greedy
        fill).  A page may be short, with a cursor, when a call has examined
        many files its host already holds.
        """
        s = self._store(store)
        self._tick()
        start = self._decode(cursor, _CURSOR_TAG)
        if self._safe or limit <= 0:
            return [], None
        mine = self._same_host[s]
        salt = self._salt[s]
        b0 = salt >> _BUCKET_SHIFT
        holders = self._holders
        hashes = self._hash
        claims = self._claims
        paths = self._paths
        sizes = self._size
        mtimes = self._mtime
        wanted = self.copies
        budget = _SCAN_BUDGET
        out: list[Need] = []
        for c in sorted(self._tiers, key=lambda c: rank(c, wanted)):
            tier = self._tiers[c]
            if not tier.files or (start is not None and c < start[0]):
                continue
            resume = start is not None and c == start[0]
            r0 = start[1] if resume else 0
            order = tier.order
            split = bisect_left(order, b0)
            if b0 + r0 < _BUCKETS:
                first = order[bisect_left(order, b0 + r0):]
                rest = order[:split]
            else:
                first = []
                rest = order[bisect_left(order, b0 + r0 - _BUCKETS):split]
            for b in first + rest:
                r = (b - b0) % _BUCKETS
                bucket = tier.buckets[b]
                budget -= len(bucket)
                keyed = sorted(
                    ((hashes[i] - salt) & _M32, i) for i in bucket if not holders[i] & mine
                )
                if resume and r == r0:
                    after = (start[2], start[3])
                    keyed = [e for e in keyed if e > after]
                for k, i in keyed:
                    claimers = claims.get(i)
                    if claimers and any(mine >> t & 1 for t in claimers):
                        continue
                    out.append(Need(paths[i], sizes[i], mtimes[i], c, wanted))
                    if len(out) >= limit:
                        return out, _CURSOR.pack(_CURSOR_TAG, c, r, k, i)
                if budget <= 0:
                    return out, _CURSOR.pack(_CURSOR_TAG, c, r, _M32, 2**64 - 1)
        return out, None

    @staticmethod
    def _decode(
        cursor: Optional[bytes], expected: int
    ) -> Optional[tuple[int, int, int, int]]:
        if cursor is None:
            return None
        try:
            tag, c, r, k, i = _CURSOR.unpack(cursor)
        except (struct.error, TypeError):
            raise BadCursor(cursor) from None
        if tag != expected or r >= _BUCKETS:
            raise BadCursor(cursor)
        return c, r, k, i

    def surplus(
        self, store: str, cursor: Optional[bytes], limit: int
    ) -> tuple[list[Need], Optional[bytes]]:
        """
        Up to C{limit} files C{store} holds at the current version that have
        more live copies than C{copies}, most copies first; and a cursor for
        the next page, or C{None} at the end.  These are the copies a full
        store may ask to drop (DESIGN.md rules 4 and 5).

        A need's C{copies} counts real holdings only (distinct hosts, live
        stores, current version; claims do not count), the count L{drop}
        decides by: a live store's file is listed exactly when L{drop} would
        grant it now.  C{wanted} is C{copies}.  Inside one count the order
        is a per-store rotation of the hash order, as in L{needs}.  Nothing
        in safemode.  A page may be short, with a cursor, when a call has
        examined many files the store does not hold.
        """
        s = self._store(store)
        self._tick()
        start = self._decode(cursor, _SURPLUS_TAG)
        if self._safe or limit <= 0 or not self._held_files[s]:
            return [], None
        bit = 1 << s
        wanted = self.copies
        salt = self._salt[s]
        b0 = salt >> _BUCKET_SHIFT
        holders = self._holders
        hashes = self._hash
        claims = self._claims
        paths = self._paths
        sizes = self._size
        mtimes = self._mtime
        tiers = self._tiers
        live = self._live
        ncopies = self._ncopies
        # A claim raises a file's tier above its real count: claimed files
        # this store holds are placed by their real count, apart from tiers.
        extra: dict[int, dict[int, list[int]]] = {}  # count -> bucket -> ids
        for i in claims:
            m = holders[i]
            if m & bit:
                m &= live
                n = ncopies.get(m)
                if n is None:
                    n = self._hosts_in(m)
                if n > wanted:
                    b = hashes[i] >> _BUCKET_SHIFT
                    extra.setdefault(n, {}).setdefault(b, []).append(i)
        counts = {c for c, t in tiers.items() if c > wanted and t.files}
        counts.update(extra)
        budget = _SCAN_BUDGET
        out: list[Need] = []
        for c in sorted(counts, reverse=True):
            if start is not None and c > start[0]:
                continue
            tier = tiers.get(c)
            buckets = tier.buckets if tier is not None else {}
            more = extra.get(c)
            order = tier.order if tier is not None else []
            if more:
                order = sorted(set(order).union(more))
            resume = start is not None and c == start[0]
            r0 = start[1] if resume else 0
            split = bisect_left(order, b0)
            if b0 + r0 < _BUCKETS:
                first = order[bisect_left(order, b0 + r0):]
                rest = order[:split]
            else:
                first = []
                rest = order[bisect_left(order, b0 + r0 - _BUCKETS):split]
            for b in first + rest:
                r = (b - b0) % _BUCKETS
                bucket = buckets.get(b, ())
                budget -= len(bucket)
                found = [i for i in bucket if holders[i] & bit and i not in claims]
                if more and b in more:
                    found.extend(more[b])
                keyed = sorted(((hashes[i] - salt) & _M32, i) for i in found)
                if resume and r == r0:
                    after = (start[2], start[3])
                    keyed = [e for e in keyed if e > after]
                for k, i in keyed:
                    out.append(Need(paths[i], sizes[i], mtimes[i], c, wanted))
                    if len(out) >= limit:
                        return out, _CURSOR.pack(_SURPLUS_TAG, c, r, k, i)
                if budget <= 0:
                    return out, _CURSOR.pack(_SURPLUS_TAG, c, r, _M32, 2**64 - 1)
        return out, None

    def claim(self, store: str, paths: Iterable[bytes], fill: bool = False) -> list[bytes]:
        """
        C{store} wants to fetch C{paths}; grant those its host neither holds
        nor claims and that still need a copy (fewer than C{copies}, counting
        live claims).  With C{fill} (greedy fill: the store was offered them
        at or above their copies) such a path is also granted once no file
        of the source is below C{copies}.  Without it, a need that went
        stale between L{needs} and this claim (other stores claimed it
        meanwhile) is refused, so it does not become an unplanned surplus
        copy.  A grant counts as a copy on its host for C{claim_ttl}
        seconds, so other stores do not fetch the same file meanwhile;
        claiming again renews it (whatever C{fill}).  Nothing in safemode.
        """
        s = self._store(store)
        now = self._tick()
        paths, ids = self._ids_of(paths)
        if self._safe:
            return []
        mine = self._same_host[s]
        deadline = now + self._claim_ttl
        granted = []
        for path, i in zip(paths, ids):
            claimers = self._claims.get(i)
            if claimers is not None and s in claimers:
                claimers[s] = deadline
                heappush(self._claim_heap, (deadline, i, s))
                granted.append(path)
                continue
            if self._holders[i] & mine:
                continue
            if claimers and any(mine >> t & 1 for t in claimers):
                continue
            if self._count[i] >= self.copies and (not fill or self._under()):
                continue
            self._claims.setdefault(i, {})[s] = deadline
            heappush(self._claim_heap, (deadline, i, s))
            self._claim_count[s] += 1
            self._recount(i)
            granted.append(path)
        return granted

    def release(self, store: str, paths: Iterable[bytes]) -> None:
        """C{store} abandons its claims on C{paths} (others are ignored)."""
        s = self._store(store)
        self._tick()
        paths, ids = self._ids_of(paths)
        for i in ids:
            claimers = self._claims.get(i)
            if claimers is not None and s in claimers:
                self._unclaim(i, s, claimers)

    def drop(self, store: str, paths: Iterable[bytes]) -> list[bytes]:
        """
        C{store} asks to delete its copies of C{paths}; grant those it may.
        A current copy may go only while at least C{copies} live current
        copies remain on other hosts (claims do not count); the grant takes
        effect at once, so two stores can never both drop the last surplus
        copy.  Stale and orphaned copies may always go.  Nothing in safemode.
        """
        s = self._store(store)
        self._tick()
        paths = list(paths)
        orphans = self._orphans[s]
        for path in paths:
            if path not in self._ids and path not in orphans and path not in self._pending[s]:
                raise UnknownPath(path)
        if self._safe:
            return []
        bit = 1 << s
        others = ~self._same_host[s]
        stale = self._stale[s]
        granted = []
        for path in paths:
            i = self._ids.get(path)
            if i is None:
                if path in orphans:
                    del orphans[path]
                    self._tell_orphans[s].pop(path, None)
                    granted.append(path)
            elif i in stale:
                del stale[i]
                self._tell_stale[s].pop(path, None)
                granted.append(path)
            elif self._holders[i] & bit:
                if self._hosts_in(self._holders[i] & self._live & others) >= self.copies:
                    self._unhold(i, s)
                    granted.append(path)
        return granted

    # -- status ---------------------------------------------------------------

    def status(self) -> SourceStatus:
        """
        The source's replication state: files, bytes, and a histogram of
        live copies (real holdings only, claims excluded) -> [files, bytes].
        """
        self._tick()
        histogram: dict[int, list[int]] = {
            c: [t.files, t.bytes] for c, t in self._tiers.items() if t.files
        }
        for i in self._claims:
            real = self._hosts_in(self._holders[i] & self._live)
            c = self._count[i]
            if real != c:
                size = self._size[i]
                histogram[c][0] -= 1
                histogram[c][1] -= size
                entry = histogram.setdefault(real, [0, 0])
                entry[0] += 1
                entry[1] += size
        histogram = {c: v for c, v in sorted(histogram.items()) if v[0]}
        under = [v for c, v in histogram.items() if c < self.copies]
        return SourceStatus(
            source=self.source,
            copies=self.copies,
            files=len(self._ids),
            bytes=self._bytes,
            histogram=histogram,
            under_files=sum(v[0] for v in under),
            under_bytes=sum(v[1] for v in under),
            safemode=self._safe,
            scanned=self._scanned,
            scan_error=self._scan_error,
        )

    def store_status(self) -> list[StoreStatus]:
        """Each configured store as this ledger sees it, in config order."""
        now = self._tick()
        result = []
        for s, sid in enumerate(self._store_ids):
            last = self._last[s]
            if last is None:
                state, age = "new", None
            else:
                age = now - last
                if age >= self._dead_after:
                    state = "dead"
                elif age >= 3 * self._report_interval:
                    state = "stale"
                else:
                    state = "live"
            result.append(
                StoreStatus(
                    store=sid,
                    host=self._hosts[s],
                    state=state,
                    files=self._held_files[s],
                    bytes=self._held_bytes[s],
                    last_report_age=age,
                    quota=self._quota[s],
                    used=self._used[s],
                    claims=self._claim_count[s],
                )
            )
        return result
