"""
The replica ledger of one source: which files it has, which store holds which
version of each, who is fetching what, and so what each store should fetch
next.  Sans-IO: no disk, no network, no reactor; time comes from the C{clock}
passed in (anything with C{.seconds()}), so tests drive it with L{Clock}.

It is built for millions of files, in memory and in time per call:

  - A file is an integer id.  Its path, size, mtime and current holders live
    in parallel lists and arrays; its holders are one small int, a bitmask
    of store indexes (masks are interned, so most files share a handful of
    int objects).
  - Its live copy count (its "tier", claims included) is one byte of the
    C{bytearray} C{_count}, so the files of a tier are found with
    C{bytearray.find} at C speed, with no per-file index to keep up.  Counts
    of 255 and more are kept exactly in a small dict beside it.
  - A store lists a tier in id order as a ring, from a start of its own
    that each of its claims moves to a new pseudo-random place: stores
    asking together start at different places, and stores that took
    neighbouring files do not go on to list the same ones.
  - Reports, the hot path of every inventory and fetch, are checked as a
    whole with C-level calls (C{map}, C{itemgetter}, array comparison).
    Files that change holders are applied in batches: files that share a
    holder mask share their old and new tiers, so tiers, tallies and low
    marks are worked out once per mask, and per file only plain array
    stores remain.  Only unusual records (unknown paths, other versions,
    repeats) go one by one.
  - Everything that depends on time (claims expiring, stores going dead,
    safemode ending) is evaluated lazily when a method is called.

Counting rules (DESIGN.md): a copy counts once per distinct host, only at the
current version, only while its store is not dead; a live claim counts as a
copy on the claimer's host.  The status histogram counts real holdings only.
"""

from __future__ import annotations

import os
import struct
from array import array
from collections import Counter
from hashlib import blake2b
from heapq import heapify, heappop, heappush, merge
from itertools import compress
from itertools import count as counter
from operator import itemgetter, not_
from typing import Callable, Iterable, Iterator, Mapping, Optional, Sequence

from .held import ScanChange, too_big
from .records import (FileRecord, Needs, Records, ReportAnswer, SourceStatus, StoreStatus,
                      bad_path)

__all__ = ["Ledger", "LedgerError", "UnknownStore", "UnknownPath", "BadCursor"]

# needs() and surplus() examine at most this many files per call; when the
# budget runs out they answer a short page with a cursor rather than stall
# the server.
_SCAN_BUDGET = 50_000
# tag, tier, ring start, next position, whether the ring wrapped
_CURSOR = struct.Struct(">BIIIB")
_CURSOR_TAG = 1  # needs() cursors
_SURPLUS_TAG = 2  # surplus() cursors: a needs cursor is no surplus cursor
# A count byte of _CAP means "_CAP or more": the exact count is in _big (a
# free id, in no tier, has _CAP and is not in _big).
_CAP = 255
#: Room beyond a file's size a store's last report must show for the fill
#: rule to count the store as a place for the file (its folders, block
#: rounding): a file that fits only without it counts as fitting nowhere,
#: which starts fill early rather than late.
FIT_SLACK = 1 << 20
_BYTE = [bytes([c]) for c in range(256)]
# Knuth's MMIX linear congruential generator, for listing starts.
_LCG_A, _LCG_C, _M64 = 6364136223846793005, 1442695040888963407, (1 << 64) - 1


class LedgerError(Exception):
    """A request the ledger refused; it changed nothing."""


class UnknownStore(LedgerError):
    """The store id is not one configured to back up this source."""


class UnknownPath(LedgerError):
    """The path is not a file of this source (nor one the store holds)."""


class BadCursor(LedgerError):
    """A needs() or surplus() cursor that this ledger did not produce."""


def _bits(mask: int) -> Iterator[int]:
    """The indexes of the bits set in C{mask}, lowest first."""
    while mask:
        low = mask & -mask
        yield low.bit_length() - 1
        mask ^= low


def _pick(column, ids: list[int]) -> tuple:
    """C{column[i]} for each of C{ids}, at C speed."""
    if len(ids) == 1:
        return (column[ids[0]],)
    return itemgetter(*ids)(column) if ids else ()


def _assign(column, ids: Sequence[int], masks: Sequence[int], value_of: dict) -> None:
    """
    C{column[i] = value_of[m]} for each file C{i} of C{ids} and its mask C{m}
    of C{masks}.  A plain loop: on CPython 3.11 it beats C{map} over
    C{__setitem__} threefold (its subscript store is specialised).
    """
    if len(value_of) == 1:
        (value,) = value_of.values()
        for i in ids:
            column[i] = value
    else:
        for i, m in zip(ids, masks):
            column[i] = value_of[m]


def _once(ids: Sequence[int], *columns: Sequence) -> tuple[Sequence, ...]:
    """
    C{ids} and the C{columns} beside them, with each repeated id (a path
    reported twice) kept once.
    """
    if len(set(ids)) == len(ids):
        return (ids, *columns)
    first = dict(zip(ids, zip(*columns)))
    return (list(first), *map(list, zip(*first.values())))


class _Inventory:
    """What one store reported since its inventory_started()."""

    __slots__ = ("current", "other", "paths", "kept")

    def __init__(self) -> None:
        # Ids reported at the current version, still held since: always a
        # subset of the store's holdings, so equal sizes mean equal sets.
        self.current: set[int] = set()
        self.other: set[int] = set()  # ids reported at another version
        self.paths: set[bytes] = set()  # reported paths the ledger lacks
        self.kept: dict[FileRecord, None] = {}  # superseded versions kept


class _Held:
    """
    A scan held back (L{cluster_backup.held}): what it would change, kept
    to be applied as it stands if the operator accepts it.
    """

    __slots__ = ("change", "changes", "deleted", "complete", "error", "since", "ended")

    def __init__(self, change: ScanChange, changes: dict[int, tuple[int, int]],
                 deleted: list[int], complete: bool, error: Optional[str],
                 since: float, ended: float) -> None:
        self.change = change
        self.changes = changes  # file id -> its new (size, mtime)
        self.deleted = deleted  # ids of the files the scan did not see
        self.complete = complete
        self.error = error
        self.since = since  # when a scan was first held (of a run of held ones)
        self.ended = ended  # when this scan ended

    def summary(self) -> dict:
        """Plain data for L{SourceStatus.held}."""
        c = self.change
        return dict(deleted_files=c.deleted_files, deleted_bytes=c.deleted_bytes,
                    changed_files=c.changed_files, changed_bytes=c.changed_bytes,
                    since=self.since)


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
    @param max_change: the fraction of the source a scan may delete or
        rewrite before it is held (L{cluster_backup.held}); None: never held.
    @param stuck_after: how long no claim on a file below its copies may be
        granted or renewed before greedy fill stops waiting for those files
        (they are stuck: see L{claim}); default C{claim_ttl}.  A server
        passes a few report intervals, and clients renew their claims every
        interval.
    @param accepted: C{(files, bytes)} of the last scan accepted before this
        ledger existed (the server keeps it across restarts), so the first
        scan after a restart is measured against it: see L{scan_finished}.
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
        stuck_after: Optional[float] = None,
        heartbeat: Optional[float] = None,
        max_change: Optional[float] = None,
        accepted: Optional[tuple[int, int]] = None,
    ) -> None:
        if not isinstance(copies, int) or copies < 1:
            raise ValueError(f"copies must be a positive integer, not {copies!r}")
        self.source = source
        self.copies = copies
        self._clock = clock
        self._report_interval = report_interval
        self._dead_after = dead_after
        self._claim_ttl = claim_ttl
        self._stuck_after = claim_ttl if stuck_after is None else stuck_after
        self._created = clock.seconds()
        self._safe = True
        if heartbeat is not None and not heartbeat > 0:
            raise ValueError(f"heartbeat must be positive seconds, not {heartbeat!r}")
        self._heartbeat = heartbeat
        self._awake: Optional[float] = None  # when we last ran (heartbeat only)
        #: Seconds this ledger did not count against leases, claims and
        #: safemode because its owner was not running (see L{beat}).
        self.deaf_seconds = 0.0

        # Stores, by index, each added by L{_join}.  A removed store keeps
        # its index, retired (L{remove_store}): indexes never shift.
        self._store_ids: list[str] = []
        self._index: dict[str, int] = {}  # store id -> index, retired ones left out
        self._retired: set[int] = set()
        self._hosts: list[str] = []
        # Host name -> its number, in order of appearance: a host keeps its
        # number for the ledger's life (no rule depends on their order).
        self._host_number: dict[str, int] = {}
        self._host_bit: list[int] = []
        # For each store, the mask of every store on the same host.
        self._same_host: list[int] = []
        # Where each store's listings start in the id ring: an offset of its
        # own, moved to a new pseudo-random place by each of its claims.
        self._resume: list[int] = []
        self._offset: list[int] = []  # surplus() always starts here
        self._live = 0  # stores not dead
        self._last: list[Optional[float]] = []
        self._next_death = float("-inf")  # no store can die before this
        self._used: list[Optional[int]] = []
        self._quota: list[Optional[int]] = []
        self._held_files: list[int] = []
        self._held_bytes: list[int] = []
        # file id -> {store: version it holds that is not current}
        self._stale: dict[int, dict[int, tuple[int, int]]] = {}
        self._orphans: list[dict[bytes, tuple[int, int]]] = []
        # Superseded versions each store keeps outside its layout (rule 7),
        # as records of the path at that version, whatever the source has
        # at that path now.
        self._kept: list[dict[FileRecord, None]] = []
        self._pending: list[dict[bytes, tuple[int, int]]] = []
        self._tell_stale: list[dict[bytes, None]] = []
        self._tell_orphans: list[dict[bytes, None]] = []
        self._inventory: list[Optional[_Inventory]] = []
        self._inventoried: set[int] = set()
        self._claimed: list[set[int]] = []  # store -> files it claims
        #: store id -> how many times it was declared dead.
        self.deaths: dict[str, int] = {}
        for sid in stores:
            self._join(sid, stores[sid])

        # Files, by id.
        self._ids: dict[bytes, int] = {}
        self._paths: list[Optional[bytes]] = []
        self._size = array("q")
        self._mtime = array("q")
        self._count = bytearray()  # live copies incl. claims (its tier), capped
        self._big: dict[int, int] = {}  # exact counts of _CAP and more
        # 1 where a file has fewer real live copies than wanted (claims not
        # counted), and how many do: greedy fill waits until none does.
        self._low = bytearray()
        self._lows = 0
        # When a claim on a low file was last granted or renewed: fill waits
        # for the low files only while somebody is fetching them.
        self._low_claimed = self._created
        # (key, when, result) of the last L{_low_placeable}; the key counts
        # changes of stores' reported usage among other things.
        self._placeable: Optional[tuple[tuple, float, bool]] = None
        self._usage_changes = 0
        self._holders: list[int] = []  # mask of stores holding it current
        self._free: list[int] = []
        self._tally: dict[int, list[int]] = {}  # count -> [files, bytes]
        self._bytes = 0
        self._masks: dict[int, int] = {}  # interned holder masks
        self._ncopies: dict[int, int] = {0: 0}  # store mask -> distinct hosts

        # Claims: file id -> {store: deadline}; a heap of (deadline, seq,
        # store, ids) with one entry per claim call, to expire them.  Two
        # indexes of them (kept with every change, checked by the tests'
        # audit) let a report of fetched files finish their claims without
        # a look at each: the files each store claims, and the files two or
        # more stores claim (rare: claims go to files still needed).
        self._claims: dict[int, dict[int, float]] = {}
        self._shared: set[int] = set()
        self._claim_heap: list[tuple[float, int, int, tuple[int, ...]]] = []
        self._claim_seq = counter()

        # Scans.
        self._seen: Optional[bytearray] = None  # marks of the running scan
        # New versions the running scan found, applied when it ends (or held).
        self._changes: dict[int, tuple[int, int]] = {}
        self._scanned: Optional[float] = None
        self._scan_error: Optional[str] = None
        self._max_change = max_change
        #: (files, bytes) of the source as last accepted; None before any.
        self.accepted: Optional[tuple[int, int]] = accepted
        self._held: Optional[_Held] = None

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
        self._low_claimed += seconds
        self._last = [None if last is None else last + seconds for last in self._last]
        self._next_death = float("-inf")
        if self._claim_heap:
            for claimers in self._claims.values():
                for s in claimers:
                    claimers[s] += seconds
            self._claim_heap = [(d + seconds, q, s, ids) for d, q, s, ids in self._claim_heap]
            heapify(self._claim_heap)

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
            deadline, _, s, ids = heappop(heap)
            for i in ids:
                claims = self._claims.get(i)
                if claims is not None and claims.get(s) == deadline:
                    self._unclaim(i, s, claims)
        if now >= self._next_death:
            soonest = float("inf")
            for s, last in enumerate(self._last):
                bit = 1 << s
                if last is None or not self._live & bit:
                    continue
                if now - last >= self._dead_after:
                    # Its holdings stop counting, and so do its claims: a
                    # store silent that long is fetching nothing (a client
                    # renews its lease while it fetches), and its claims
                    # would hide those files from every store until they
                    # expired.
                    self.deaths[self._store_ids[s]] += 1
                    self._kill(s)
                else:
                    soonest = min(soonest, last + self._dead_after)
            self._next_death = soonest
        if self._safe and (
            now - self._created >= 5 * self._report_interval
            or len(self._inventoried) == len(self._index)
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

    @property
    def fill_waits(self) -> bool:
        """
        True while greedy fill of this source waits (see L{claim}).  Clients
        hold fill of every source while one of theirs says so, so surplus of
        one source does not take the bandwidth and the time the copies
        another still needs are being fetched in.
        """
        return self._fill_waits(self._tick())

    def _fill_waits(self, now: float) -> bool:
        """
        The fill rule: greedy fill waits while a file below its copies is
        being fetched or could be, that is, while one is claimed or fits in
        the free room of a live store on a host without a copy of it
        (L{_low_placeable}).  A low file that fits nowhere starts fill at
        once: surplus copies filled into the stores with room are what let
        a full store drop one and take that file in.  Backstop: a file the
        ledger thinks fits but that no store claims for C{stuck_after}
        (the store sees less room than its report said) starts fill too.
        """
        if not self._lows:
            return False
        key = (self._lows, self._live, len(self._claims), self._usage_changes)
        cached = self._placeable
        if cached is None or cached[0] != key or now - cached[1] >= 1.0:
            found = any(self._low[i] for i in self._claims) or self._low_placeable()
            self._placeable = cached = (key, now, found)
        return cached[2] and now - self._low_claimed < self._stuck_after

    def _low_placeable(self) -> bool:
        """
        Whether some file below its copies, unclaimed, fits (with
        L{FIT_SLACK} to spare) in the free room (quota minus used, as last
        reported) of a live store on a host that holds no copy of it.  A
        store that has not reported its usage is no place.
        L{_fill_waits} keeps the answer for a second while nothing it
        depends on changed in number: the walk over the low files is long
        only when none fits anywhere.
        """
        rooms = []
        for s in range(len(self._store_ids)):
            used, quota = self._used[s], self._quota[s]
            if self._live >> s & 1 and used is not None and quota is not None:
                room = quota - used - FIT_SLACK
                if room > 0:
                    rooms.append((room, self._same_host[s]))
        found = False
        if rooms:
            largest = max(room for room, _ in rooms)
            low, sizes, holders, claims = self._low, self._size, self._holders, self._claims
            i = low.find(1)
            while i != -1 and not found:
                size = sizes[i]
                if size <= largest and i not in claims:
                    found = any(size <= room and not holders[i] & host
                                for room, host in rooms)
                i = low.find(1, i + 1)
        return found

    # -- stores and settings (a config reload) ----------------------------------

    def _join(self, store: str, host: str) -> None:
        """
        Store C{store} on C{host} takes the next index: it holds nothing,
        has never reported (a new store) and is live.  A new host gets the
        next free host number.
        """
        s = len(self._store_ids)
        bit = 1 << s
        self._store_ids.append(store)
        self._index[store] = s
        self._hosts.append(host)
        if host not in self._host_number:
            self._host_number[host] = len(self._host_number)
        self._host_bit.append(1 << self._host_number[host])
        self._same_host.append(bit)
        for t in range(s):
            if self._hosts[t] == host and t not in self._retired:
                self._same_host[t] |= bit
                self._same_host[s] |= 1 << t
        start = int.from_bytes(blake2b(store.encode("utf-8", "surrogateescape"),
                                       digest_size=8).digest(), "big")
        self._resume.append(start)
        self._offset.append(start)
        self._live |= bit
        self._last.append(None)
        self._used.append(None)
        self._quota.append(None)
        self._held_files.append(0)
        self._held_bytes.append(0)
        self._orphans.append({})
        self._kept.append({})
        self._pending.append({})
        self._tell_stale.append({})
        self._tell_orphans.append({})
        self._inventory.append(None)
        self._claimed.append(set())
        self.deaths[store] = 0

    def _kill(self, s: int) -> None:
        """Store C{s} stops counting: its holdings and its claims (a death)."""
        bit = 1 << s
        self._live &= ~bit
        self._drop_claims(s)
        self._recount_store(bit)

    def add_store(self, store: str, host: str) -> None:
        """
        A store on C{host} joins this source (a config reload): it holds
        nothing and has never reported, just as a store configured from the
        start, so it can report, list needs and claim at once.  Every other
        store keeps its index, host, holdings, lease and claims.  While the
        ledger is still in safemode it waits for this store's inventory too
        (as a ledger built with it would); a ledger out of safemode stays
        out.  An id already configured is a C{ValueError}.
        """
        if store in self._index:
            raise ValueError(f"store {store!r} already backs up {self.source}")
        self._join(store, host)
        self._placeable = None

    def remove_store(self, store: str) -> None:
        """
        C{store} no longer backs up this source (a config reload): its
        copies stop counting at once, as at its death, and its claims end;
        the ledger forgets what it held, kept and was told, and it leaves
        status.  Files it alone held fall below their copies, and status
        shows them so: the operator chose it.  Its index stays, retired,
        so no other store's index (in every holder mask) has to move; a
        later call naming it is refused as for an unknown store
        (L{UnknownStore}), and a store added later under the same id is a
        new store.
        """
        s = self._store(store)
        self._tick()
        bit = 1 << s
        self._kill(s)
        for i, m in enumerate(self._holders):
            if m & bit:
                self._holders[i] = self._intern(m & ~bit)
        for i in [i for i, stale in self._stale.items() if s in stale]:
            self._drop_stale(i, s)
        self._held_files[s] = 0
        self._held_bytes[s] = 0
        self._last[s] = None
        self._used[s] = None
        self._quota[s] = None
        self._orphans[s] = {}
        self._kept[s] = {}
        self._pending[s] = {}
        self._tell_stale[s] = {}
        self._tell_orphans[s] = {}
        self._inventory[s] = None
        self._inventoried.discard(s)
        for t in range(len(self._same_host)):  # no mask names it any more
            self._same_host[t] &= ~bit
        self._retired.add(s)
        del self._index[store]
        del self.deaths[store]
        self._placeable = None

    def set_copies(self, copies: int) -> None:
        """
        Want C{copies} live copies of each file from now on (a config
        reload).  Tiers count copies and do not depend on it; each file's
        low mark does, and is worked out again (O(files)), so the ledger
        answers as one built with C{copies} would.  One exception, on
        purpose: when copies rise, greedy fill waits up to C{stuck_after}
        from now for the files that became low, as after a start, rather
        than find them stuck at once because nobody claimed them before.
        """
        if not isinstance(copies, int) or copies < 1:
            raise ValueError(f"copies must be a positive integer, not {copies!r}")
        now = self._tick()
        raised = copies > self.copies
        self.copies = copies
        for i, path in enumerate(self._paths):
            if path is not None:
                self._recount(i)
        self._placeable = None
        if raised:
            self._low_claimed = now

    def configure(self, *, report_interval: float, dead_after: float,
                  stuck_after: Optional[float], max_change: Optional[float]) -> None:
        """
        New settings (a config reload), as the constructor takes them; they
        apply from now on.  A store already declared dead stays dead until
        it reports, even if the new C{dead_after} is longer; a held scan
        stays held until L{accept} or the next scan (which the new
        C{max_change} measures).
        """
        self._report_interval = report_interval
        self._dead_after = dead_after
        self._next_death = float("-inf")  # deaths are due by the new dead_after
        self._stuck_after = self._claim_ttl if stuck_after is None else stuck_after
        self._max_change = max_change
        self._placeable = None

    # -- counting -----------------------------------------------------------

    def _hosts_in(self, mask: int) -> int:
        n = self._ncopies.get(mask)
        if n is None:
            hosts = 0
            for s in _bits(mask):
                hosts |= self._host_bit[s]
            n = self._ncopies[mask] = hosts.bit_count()
        return n

    def _intern(self, mask: int) -> int:
        return self._masks.setdefault(mask, mask)

    def _copies(self, i: int) -> int:
        """File C{i}'s exact tier (live copies, claims included)."""
        c = self._count[i]
        return self._big[i] if c == _CAP else c

    def _set_count(self, i: int, n: int, old: int) -> None:
        """Move file C{i} from tier C{old} to tier C{n}, keeping the tallies."""
        size = self._size[i]
        tally = self._tally
        t = tally[old]
        t[0] -= 1
        t[1] -= size
        if not t[0]:
            del tally[old]
        t = tally.get(n)
        if t is None:
            tally[n] = [1, size]
        else:
            t[0] += 1
            t[1] += size
        if n >= _CAP:
            self._count[i] = _CAP
            self._big[i] = n
        else:
            self._count[i] = n
            if old >= _CAP:
                del self._big[i]

    def _recount(self, i: int) -> None:
        """Move file C{i} to the tier of its live copy count; mark it low or not."""
        m = self._holders[i] & self._live
        real = self._ncopies.get(m)
        if real is None:
            real = self._hosts_in(m)
        low = real < self.copies
        if low != self._low[i]:
            self._low[i] = low
            self._lows += 1 if low else -1
        claims = self._claims.get(i)
        if claims:
            for s in claims:
                m |= 1 << s
        n = self._ncopies.get(m)
        if n is None:
            n = self._hosts_in(m)
        old = self._count[i]
        if old == _CAP:
            old = self._big[i]
        if n != old:
            self._set_count(i, n, old)

    def _recount_store(self, bit: int) -> None:
        # O(files): only when a store dies or comes back.
        for i, m in enumerate(self._holders):
            if m & bit:
                self._recount(i)

    def _shift(self, ids: list[int], masks: Sequence[int], s: int, add: bool,
               sizes: Optional[Sequence[int]] = None) -> None:
        """
        Apply a batch of holdings store C{s} gained (C{add}) or lost: files
        C{ids} (each once), none of them claimed, whose holder masks are
        C{masks} (and sizes C{sizes}, when the caller has gathered them).
        Files with one mask share their old and new tier (claims would make
        tiers differ), so tiers, tallies and low marks are worked out once
        per distinct mask, and per file only the arrays are written: a
        report of thousands of files pays no recount for each.
        """
        bit = 1 << s
        live, copies, tally = self._live, self.copies, self._tally
        hosts_in = self._hosts_in
        new_of = {m: self._intern(m | bit if add else m & ~bit) for m in set(masks)}
        _assign(self._holders, ids, masks, new_of)
        if sizes is None:
            sizes = _pick(self._size, ids)
        k, total = len(ids), sum(sizes)
        self._held_files[s] += k if add else -k
        self._held_bytes[s] += total if add else -total
        inventory = self._inventory[s]
        if not add and inventory is not None:
            inventory.current.difference_update(ids)
        tier_of = {m: hosts_in(new & live) for m, new in new_of.items()}
        old_of = {m: hosts_in(m & live) for m in new_of}
        moved = {m: (old_of[m], n) for m, n in tier_of.items() if old_of[m] != n}
        if not moved:
            return
        if any(old >= _CAP or n >= _CAP for old, n in moved.values()):
            for i, m in zip(ids, masks):
                if m in moved:
                    self._recount(i)
            return
        _assign(self._count, ids, masks, tier_of)
        if len(new_of) == 1:  # one mask: no need to count them
            files, nbytes = {masks[0]: k}, {masks[0]: total}
        else:
            files = Counter(masks)
            nbytes = dict.fromkeys(moved, 0)
            for m, size in zip(masks, sizes):
                if m in nbytes:
                    nbytes[m] += size
        lows = 0
        for m, (old, n) in moved.items():
            t = tally[old]
            t[0] -= files[m]
            t[1] -= nbytes[m]
            if not t[0]:
                del tally[old]
            t = tally.setdefault(n, [0, 0])
            t[0] += files[m]
            t[1] += nbytes[m]
            lows += files[m] * ((n < copies) - (old < copies))
        if any((old < copies) != (n < copies) for old, n in moved.values()):
            low_of = {m: n < copies for m, n in tier_of.items()}
            _assign(self._low, ids, masks, low_of)
            self._lows += lows

    def _take(self, ids: list[int], masks: Sequence[int], s: int,
              sizes: Optional[Sequence[int]] = None) -> None:
        """
        Store C{s} finished fetches it claimed: the files C{ids} (each once
        and claimed by C{s}; holder masks C{masks}; sizes C{sizes}, when the
        caller has gathered them) gain
        C{s} as a holder and lose that claim.  C{s} is live (its report
        renewed it), so its host counts as a holder just as it did as a
        claimer: the files keep their tiers, and only low marks may change,
        worked out once per mask; per file only a few plain stores remain.
        """
        bit = 1 << s
        live, copies, hosts_in = self._live, self.copies, self._hosts_in
        new_of = {m: self._intern(m | bit) for m in set(masks)}
        _assign(self._holders, ids, masks, new_of)
        claims = self._claims
        if self._shared.isdisjoint(ids):  # the usual case: s alone claimed them
            for i in ids:
                del claims[i]
        else:
            shared = self._shared
            for i in ids:
                claimers = claims[i]
                del claimers[s]
                if not claimers:
                    del claims[i]
                elif len(claimers) == 1:
                    shared.discard(i)
        self._claimed[s].difference_update(ids)
        k = len(ids)
        self._held_files[s] += k
        self._held_bytes[s] += sum(_pick(self._size, ids) if sizes is None else sizes)
        # A file's low mark follows its holder mask (claims aside).
        low_of = {m: hosts_in(new & live) < copies for m, new in new_of.items()}
        if any(low_of[m] != (hosts_in(m & live) < copies) for m in new_of):
            files = Counter(masks)
            self._lows += sum(files[m] * (low_of[m] - (hosts_in(m & live) < copies))
                              for m in new_of)
            _assign(self._low, ids, masks, low_of)

    # -- holdings -----------------------------------------------------------

    def _drop_stale(self, i: int, s: int) -> Optional[tuple[int, int]]:
        """Forget that C{s} holds a stale version of C{i}; return it."""
        stale = self._stale.get(i)
        if stale is None:
            return None
        version = stale.pop(s, None)
        if not stale:
            del self._stale[i]
        return version

    def _hold(self, i: int, s: int) -> None:
        """Store C{s} holds file C{i} at its current version."""
        bit = 1 << s
        m = self._holders[i]
        if not m & bit:
            self._holders[i] = self._intern(m | bit)
            self._held_files[s] += 1
            self._held_bytes[s] += self._size[i]
        self._drop_stale(i, s)
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
            inventory = self._inventory[s]
            if inventory is not None:
                inventory.current.discard(i)
            self._recount(i)

    def _drop_claims(self, s: int) -> None:
        """Forget every claim of store C{s}."""
        for i in sorted(self._claimed[s]):
            self._unclaim(i, s, self._claims[i])

    def _unclaim(self, i: int, s: int, claims: dict[int, float]) -> None:
        del claims[s]
        if not claims:
            del self._claims[i]
        elif len(claims) == 1:
            self._shared.discard(i)
        self._claimed[s].remove(i)
        self._recount(i)

    def _place(self, i: int, s: int, version: tuple[int, int]) -> bool:
        """Record that C{s} holds C{i} at C{version}; say if it is current."""
        if version[0] == self._size[i] and version[1] == self._mtime[i]:
            self._hold(i, s)
            return True
        self._unhold(i, s)
        self._stale.setdefault(i, {})[s] = version
        return False

    # -- files ----------------------------------------------------------------

    def _add(self, path: bytes, size: int, mtime: int) -> int:
        if self._free:
            i = self._free.pop()
            self._paths[i] = path
            self._size[i] = size
            self._mtime[i] = mtime
            self._count[i] = 0
            self._low[i] = 1
            self._holders[i] = 0
            if self._seen is not None and i < len(self._seen):
                self._seen[i] = 1
        else:
            i = len(self._paths)
            self._paths.append(path)
            self._size.append(size)
            self._mtime.append(mtime)
            self._count.append(0)
            self._low.append(1)
            self._holders.append(0)
            if self._seen is not None:
                self._seen.append(1)
        self._lows += 1
        self._ids[path] = i
        self._bytes += size
        t = self._tally.get(0)
        if t is None:
            self._tally[0] = [1, size]
        else:
            t[0] += 1
            t[1] += size
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
        self._tally[self._copies(i)][1] += delta
        m = self._holders[i]
        self._holders[i] = 0
        self._size[i] = size
        self._mtime[i] = mtime
        stale = self._stale.get(i, {})
        current = [s for s, version in stale.items() if version == (size, mtime)]
        for s in _bits(m):
            self._held_files[s] -= 1
            self._held_bytes[s] -= old[0]
            self._stale.setdefault(i, {})[s] = old
            self._tell_stale[s][path] = None
            inventory = self._inventory[s]
            if inventory is not None and i in inventory.current:
                # reported during this inventory, at a version now stale
                inventory.current.discard(i)
                inventory.other.add(i)
        for s in current:  # a copy of the new version was there already
            self._hold(i, s)
            self._tell_stale[s].pop(path, None)
            inventory = self._inventory[s]
            if inventory is not None and i in inventory.other:
                inventory.other.discard(i)
                inventory.current.add(i)  # as reported, and current again
        self._recount(i)

    def _remove(self, i: int) -> None:
        """File C{i} left the source: its copies become orphans."""
        path = self._paths[i]
        version = (self._size[i], self._mtime[i])
        for s in _bits(self._holders[i]):
            self._held_files[s] -= 1
            self._held_bytes[s] -= version[0]
            self._orphans[s][path] = version
            self._tell_orphans[s][path] = None
        for s, old in self._stale.pop(i, {}).items():
            self._orphans[s][path] = old
            self._tell_orphans[s][path] = None
            self._tell_stale[s].pop(path, None)
        for inventory in self._inventory:
            # A path reported during an inventory stays remembered as orphan.
            if inventory is not None and (i in inventory.current or i in inventory.other):
                inventory.current.discard(i)
                inventory.other.discard(i)
                inventory.paths.add(path)
        claims = self._claims.pop(i, None)
        if claims:
            for s in claims:
                self._claimed[s].remove(i)
            self._shared.discard(i)
        c = self._copies(i)
        t = self._tally[c]
        t[0] -= 1
        t[1] -= version[0]
        if not t[0]:
            del self._tally[c]
        self._big.pop(i, None)
        self._count[i] = _CAP  # not in _big: in no tier at all
        if self._low[i]:
            self._low[i] = 0
            self._lows -= 1
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
        A scan of the source begins.  Batches may follow; what they change
        applies when it ends (L{scan_finished}).
        """
        self._tick()
        self._seen = bytearray(len(self._paths))
        self._changes = {}

    def scan_batch(self, records: Iterable[FileRecord]) -> None:
        """
        Files the running scan found (L{FileRecord}s or L{Records}).  New
        files appear at once; new versions of known files and removals wait
        for L{scan_finished}, which may hold them.  A batch without
        L{scan_started} starts a scan.  A path L{relpath_problem} refuses is
        a C{ValueError} and changes nothing: L{report} trusts the paths the
        ledger knows.
        """
        columns = Records.of(records)
        found = bad_path(columns.paths)
        if found is not None:
            raise ValueError(f"scan of {self.source} found bad path {found[0]!r}: {found[1]}")
        self._tick()
        if self._seen is None:
            self.scan_started()
        seen = self._seen
        ids = self._ids
        sizes = self._size
        mtimes = self._mtime
        changes = self._changes
        waiting = [
            s for s in range(len(self._store_ids)) if self._pending[s] or self._orphans[s]
        ]
        for path, size, mtime in zip(columns.paths, columns.sizes, columns.mtimes):
            i = ids.get(path)
            if i is None:
                i = self._add(path, size, mtime)
                if waiting:
                    self._adopt(i, path, waiting)
                continue
            if i < len(seen):
                seen[i] = 1
            if sizes[i] != size or mtimes[i] != mtime:
                changes[i] = (size, mtime)
            else:
                changes.pop(i, None)

    def scan_finished(self, complete: bool, error: Optional[str] = None) -> None:
        """
        The scan ended.  If C{complete}, files it did not see are removed
        (their copies become orphans); if not, nothing is removed (an
        unreadable source is not an empty one) and C{error} is kept for
        status.  New versions it found make the copies of the old ones
        stale.

        Unless the change is too big (L{cluster_backup.held}): then none of
        it applies, the source stays as last accepted, and L{status} says
        what is held until L{accept}, or until a later scan's change is
        small enough again.  A change is measured per file against the
        ledger, and for the first scan after a restart (whose ledger knew
        nothing before) by how many files and bytes are missing against
        C{accepted}: an unmounted disk at boot is the usual case.
        """
        now = self._tick()
        seen, self._seen = self._seen, None
        changes, self._changes = self._changes, {}
        if complete and seen is None:
            raise LedgerError("scan_finished(complete=True) without scan_started()")
        deleted: list[int] = []
        if complete:
            pos = seen.find(0)
            while pos >= 0:
                if self._paths[pos] is not None:
                    deleted.append(pos)
                pos = seen.find(0, pos + 1)
        change = self._measure(changes, deleted, complete)
        if too_big(change, self._max_change):
            since = self._held.since if self._held is not None else now
            self._held = _Held(change, changes, deleted, complete, error, since, now)
            if complete:
                self._scan_error = error  # this scan could read the source
            return
        self._held = None
        self._apply(changes, deleted, complete, error, now)

    def _measure(self, changes: dict[int, tuple[int, int]], deleted: list[int],
                 complete: bool) -> ScanChange:
        """What a scan would change (see L{scan_finished})."""
        size = self._size
        deleted_bytes = sum(size[i] for i in deleted)
        changed_bytes = sum(size[i] for i in changes)
        deleted_files = len(deleted)
        base_files, base_bytes = self.accepted or (len(self._ids), self._bytes)
        if complete and self.accepted is not None:
            # Files and bytes the scan found, against the last accepted.
            found_files = len(self._ids) - deleted_files
            found_bytes = (self._bytes - deleted_bytes
                           + sum(new[0] - size[i] for i, new in changes.items()))
            deleted_files = max(deleted_files, base_files - found_files)
            deleted_bytes = max(deleted_bytes, base_bytes - found_bytes)
        return ScanChange(deleted_files, deleted_bytes, len(changes), changed_bytes,
                          base_files, base_bytes)

    def _apply(self, changes: dict[int, tuple[int, int]], deleted: list[int],
               complete: bool, error: Optional[str], now: float) -> None:
        """Apply a scan's changes (and if C{complete} its removals)."""
        before = self._bytes
        for i, (size, mtime) in changes.items():
            if self._paths[i] is not None:
                self._change(i, size, mtime)
        if not complete:
            self._scan_error = error if error is not None else "scan incomplete"
            if self.accepted is not None:  # the files stand; their sizes moved
                self.accepted = (self.accepted[0], self.accepted[1] + self._bytes - before)
            return
        for i in deleted:
            if self._paths[i] is not None:
                self._remove(i)
        first = self._scanned is None
        self._scanned = now
        self._scan_error = error
        self.accepted = (len(self._ids), self._bytes)
        if first:
            # Paths stores reported before we knew the source are orphans.
            for s, pending in enumerate(self._pending):
                self._orphans[s].update(pending)
                self._tell_orphans[s].update(dict.fromkeys(pending))
                pending.clear()

    def accept(self) -> Optional[dict]:
        """
        The operator accepts the held scan: apply it as it stands.  Returns
        what it changed (as L{SourceStatus.held}), or None when nothing was
        held.
        """
        now = self._tick()
        held, self._held = self._held, None
        if held is None:
            return None
        self._apply(held.changes, held.deleted, held.complete, held.error, now)
        if held.complete:
            self._scanned = held.ended
        return held.summary()

    # -- reports --------------------------------------------------------------

    def _store(self, store: str) -> int:
        s = self._index.get(store)
        if s is None:
            raise UnknownStore(store)
        return s

    def _renew(self, s: int, now: float) -> None:
        self._last[s] = now
        self._next_death = min(self._next_death, now + self._dead_after)
        bit = 1 << s
        if not self._live & bit:
            self._live |= bit
            self._recount_store(bit)
            self._next_death = float("-inf")

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
        self._drop_claims(s)
        self._inventory[s] = _Inventory()

    def report(
        self,
        store: str,
        held: Iterable[FileRecord] = (),
        removed: Iterable[bytes] = (),
        used: Optional[int] = None,
        quota: Optional[int] = None,
        vet: Optional[Callable[[list[bytes]], object]] = None,
        kept: Iterable[FileRecord] = (),
        unkept: Iterable[FileRecord] = (),
    ) -> ReportAnswer:
        """
        C{store} holds C{held} (L{FileRecord}s or L{Records}, at their
        versions) and no longer holds C{removed}; renews its lease.  It
        keeps the superseded versions C{kept} outside its layout (an
        inventory lists them all) and no longer keeps C{unkept}.  Answers
        which reported paths are at a stale version and which are orphans
        (plus any learned since its last answer, e.g. from a rescan).  Paths
        unknown before the first complete scan are kept aside and answered
        once that scan ends.

        C{vet}, when given, is called with the paths of C{held}, then those
        of C{removed}, whenever that list names a path the ledger does not
        know, before the report changes anything; an exception it raises
        ends the report.  A server that left a peer's paths unchecked checks
        them there: a path the ledger knows came from a scan, which gives
        only paths L{relpath_problem} accepts (L{scan_batch} makes sure), so
        the usual report, of known files only, needs no check of its names.
        """
        s = self._store(store)
        removed = removed if isinstance(removed, list) else list(removed)
        held = Records.of(held)
        held_ids = self._known(held.paths)
        removed_ids = self._known(removed)
        if vet is not None:
            if held_ids is None:
                vet(held.paths)
            if removed_ids is None:
                vet(removed)
        now = self._tick()
        self._renew(s, now)
        inventory = self._inventory[s]
        # Ids stay as they are until a scan adds or removes files.
        if removed and not self._remove_bulk(s, removed, removed_ids, inventory):
            self._remove_each(s, removed, inventory)
        if held.paths and not self._report_bulk(s, held, held_ids, inventory):
            self._report_each(s, held, inventory)
        self._keep(s, kept, unkept, inventory)
        if (used is not None and used != self._used[s]) or (
                quota is not None and quota != self._quota[s]):
            self._usage_changes += 1
        if used is not None:
            self._used[s] = used
        if quota is not None:
            self._quota[s] = quota
        return self._answer(s)

    def _keep(self, s: int, kept: Iterable[FileRecord], unkept: Iterable[FileRecord],
              inventory: Optional[_Inventory]) -> None:
        """Record the versions C{s} keeps (during an inventory: all it keeps)."""
        into = inventory.kept if inventory is not None else self._kept[s]
        for r in Records.of(kept):
            into[r] = None
        for r in Records.of(unkept):
            self._kept[s].pop(r, None)
            if inventory is not None:
                inventory.kept.pop(r, None)

    def _known(self, paths: list[bytes]) -> Optional[list[int]]:
        """The ids of C{paths} if the ledger knows each of them, else None."""
        try:
            return list(map(self._ids.__getitem__, paths))
        except KeyError:
            return None

    def _apart(self, ids: list[int]) -> bool:
        """
        Whether no id repeats and none of those files has a stale version
        held anywhere: then every path changes only its own file, and a
        report can be applied in batches, in any order.
        """
        return len(set(ids)) == len(ids) and (not self._stale
                                              or self._stale.keys().isdisjoint(ids))

    def _remove_bulk(self, s: int, removed: list[bytes], ids: Optional[list[int]],
                     inventory: Optional[_Inventory]) -> bool:
        """
        The common removal (known paths, each once, unclaimed, no stale
        version anywhere; C{ids} theirs, or None if one is unknown) applied
        in batches by L{_shift}; says True.  Else changes nothing and says
        False.
        """
        if (ids is None or not self._apart(ids)
                or (self._claims and not self._claims.keys().isdisjoint(ids))):
            return False
        masks = _pick(self._holders, ids)
        held = list(map((1 << s).__and__, masks))
        if all(held):
            self._shift(ids, masks, s, add=False)
        elif any(held):
            self._shift(list(compress(ids, held)), list(compress(masks, held)), s, add=False)
        if inventory is not None:
            inventory.other.difference_update(ids)
        self._forget_paths(s, removed)
        return True

    def _forget_paths(self, s: int, paths: list[bytes]) -> None:
        """C{s} no longer holds C{paths}: forget them as its orphans, pending and news."""
        # Most of these are empty: look only in those that are not.
        for d in (self._orphans[s], self._pending[s], self._tell_stale[s],
                  self._tell_orphans[s]):
            if d:
                for path in paths:
                    d.pop(path, None)

    def _remove_each(self, s: int, removed: list[bytes], inventory: Optional[_Inventory]) -> None:
        """Apply C{removed} path by path (unknown, repeated, claimed or stale ones)."""
        ids = self._ids
        stale = self._stale
        claims = self._claims
        holders = self._holders
        bit = 1 << s
        gone: list[int] = []  # unclaimed files s no longer holds, and their masks
        masks: list[int] = []
        for path in removed:
            i = ids.get(path)
            if i is not None:
                m = holders[i]
                if m & bit:
                    if i in claims:
                        self._unhold(i, s)
                    else:
                        gone.append(i)
                        masks.append(m)
                if i in stale:
                    self._drop_stale(i, s)
                if inventory is not None:
                    inventory.other.discard(i)
        if gone:
            self._shift(*_once(gone, masks), s, add=False)
        self._forget_paths(s, removed)

    def _report_bulk(self, s: int, held: Records, ids: Optional[list[int]],
                     inventory: Optional[_Inventory]) -> bool:
        """
        The common reports, at C speed: every record a file the ledger
        knows (C{ids} theirs; None if one is not), at its current version,
        each once, with no stale version held anywhere.  An inventory's
        renewals change only the inventory's marks; new holdings go to
        L{_hold_new}.  Says True; for any other report it changes nothing
        and says False.
        """
        if ids is None:
            return False
        # Arrays compare with memcmp; only gathering the ledger's side is per
        # item.  Holder masks are interned, so a page has few distinct ones.
        masks = _pick(self._holders, ids)
        sizes = _pick(self._size, ids)  # kept: new holdings add up their bytes
        if array("q", sizes) != held.sizes or array("q", _pick(self._mtime, ids)) != held.mtimes:
            return False
        bit = 1 << s
        known = [m & bit for m in set(masks)]
        if not all(known):
            if not self._apart(ids):
                return False
            if any(known):  # some were held already: only the others are new
                new = list(map(not_, map(bit.__and__, masks)))
                self._hold_new(s, list(compress(ids, new)), list(compress(masks, new)),
                               list(compress(sizes, new)))
            else:
                self._hold_new(s, ids, masks, sizes)
        if inventory is not None:
            inventory.current.update(ids)
        return True

    def _hold_new(self, s: int, ids: Sequence[int], masks: Sequence[int],
                  sizes: Sequence[int]) -> None:
        """
        C{s} now holds the files C{ids} (each once, current, not held by
        C{s} before, with holder masks C{masks} and sizes C{sizes}):
        unclaimed ones go to L{_shift} and those C{s} claimed to L{_take}, in batches; files only
        other stores claimed change tiers one by one.
        """
        claims = self._claims
        if not claims or claims.keys().isdisjoint(ids):
            self._shift(ids, masks, s, add=True, sizes=sizes)
        elif self._claimed[s].issuperset(ids):
            self._take(ids, masks, s, sizes)
        else:
            claimers = list(map(claims.get, ids))
            free, mine, theirs = [], [], []  # indexes into ids
            for k, c in enumerate(claimers):
                (free if c is None else mine if s in c else theirs).append(k)
            if free:
                self._shift(_pick(ids, free), _pick(masks, free), s, add=True,
                            sizes=_pick(sizes, free))
            if mine:
                self._take(_pick(ids, mine), _pick(masks, mine), s, _pick(sizes, mine))
            for k in theirs:
                self._hold(ids[k], s)
        tell_stale = self._tell_stale[s]
        if tell_stale:
            paths = self._paths
            for i in ids:
                tell_stale.pop(paths[i], None)

    def _report_each(self, s: int, held: Records, inventory: Optional[_Inventory]) -> None:
        """
        Apply C{held} record by record (unknown, repeated and stale paths
        among them).  New holdings still go in batches (L{_shift},
        L{_take}) while they can; anything else first applies the batches,
        so the calls keep their order.
        """
        ids = self._ids
        orphans = self._orphans[s]
        pending = self._pending[s]
        tell_stale = self._tell_stale[s]
        tell_orphans = self._tell_orphans[s]
        bit = 1 << s
        holders = self._holders
        sizes = self._size
        mtimes = self._mtime
        scanned = self._scanned is not None
        claims = self._claims
        stale = self._stale
        current = inventory.current if inventory is not None else None
        free: list[int] = []  # unclaimed files s now holds, and their masks
        free_masks: list[int] = []
        mine: list[int] = []  # files s claimed and now holds, and their masks
        mine_masks: list[int] = []

        def flush():
            if free:  # a path reported twice moves once
                self._shift(*_once(free, free_masks), s, add=True)
                free.clear()
                free_masks.clear()
            if mine:
                self._take(*_once(mine, mine_masks), s)
                mine.clear()
                mine_masks.clear()

        for path, size, mtime in zip(held.paths, held.sizes, held.mtimes):
            i = ids.get(path)
            if i is None:
                if inventory is not None:
                    inventory.paths.add(path)
                if scanned:
                    orphans[path] = (size, mtime)
                    tell_orphans[path] = None
                else:
                    pending[path] = (size, mtime)
                continue
            if sizes[i] != size or mtimes[i] != mtime:
                flush()
                self._unhold(i, s)
                stale.setdefault(i, {})[s] = (size, mtime)
                tell_stale[path] = None
                if inventory is not None:
                    inventory.other.add(i)
                continue
            if current is not None:
                current.add(i)
            m = holders[i]
            if m & bit:
                continue  # already known: the common inventory case
            if tell_stale:
                tell_stale.pop(path, None)
            claimers = claims.get(i)
            if i in stale or (claimers is not None and s not in claimers):
                flush()
                self._hold(i, s)
            elif claimers is None:
                free.append(i)
                free_masks.append(m)
            else:
                mine.append(i)
                mine_masks.append(m)
        flush()

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
        reported = inventory.current
        paths = self._paths
        if len(reported) != self._held_files[s]:
            # Something held was not reported (the reported are a subset).
            bit = 1 << s
            for i, m in enumerate(self._holders):
                if m & bit and i not in reported and paths[i] not in inventory.paths:
                    self._unhold(i, s)
        for i in [i for i, st in self._stale.items()
                  if s in st and i not in inventory.other and paths[i] not in inventory.paths]:
            self._drop_stale(i, s)
        for d in (self._orphans[s], self._pending[s]):
            for path in [p for p in d if p not in inventory.paths]:
                del d[path]
                self._tell_orphans[s].pop(path, None)
        self._kept[s] = inventory.kept
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

    def _tier(self, c: int, lo: int, hi: int) -> Iterator[int]:
        """The ids in [C{lo}, C{hi}) of the files in tier C{c}, ascending."""
        if c < _CAP:
            find = self._count.find
            b = _BYTE[c]
            i = find(b, lo, hi)
            while i >= 0:
                yield i
                i = find(b, i + 1, hi)
        else:
            yield from sorted(i for i, n in self._big.items() if n == c and lo <= i < hi)

    def _decode(
        self, cursor: Optional[bytes], expected: int
    ) -> Optional[tuple[int, int, int, int]]:
        if cursor is None:
            return None
        try:
            tag, c, start, pos, wrapped = _CURSOR.unpack(cursor)
        except (struct.error, TypeError):
            raise BadCursor(cursor) from None
        if tag != expected or wrapped > 1 or start > len(self._paths):
            raise BadCursor(cursor)
        if wrapped and pos > start:
            raise BadCursor(cursor)
        return c, start, pos, wrapped

    def _walk(
        self, tiers, origin: int, resume: Optional[tuple[int, int, int, int]], tag: int
    ) -> Iterator[tuple[int, int, list[tuple[int, int, int]]]]:
        """
        How to walk C{tiers} in order, each as a ring of ids starting at
        C{origin}, or for the first from where the cursor C{resume} stopped:
        C{(tier, ring start, spans)}, each span C{(lo, hi, wrapped)} a range
        of ids to walk in order.  A cursor after id C{i} of a span is
        C{_CURSOR.pack(tag, tier, start, i + 1, wrapped)}.
        """
        n = len(self._paths)
        for c in tiers:
            if resume is not None and c != resume[0]:
                if (c < resume[0]) if tag == _CURSOR_TAG else (c > resume[0]):
                    continue  # listed before the cursor's tier
            if resume is not None and c == resume[0]:
                _, start, pos, wrapped = resume
            else:
                start = (origin >> 32) % n  # an LCG's high bits are its good ones
                pos, wrapped = start, 0
            yield c, start, ([(pos, n, 0), (0, start, 1)] if not wrapped else [(pos, start, 1)])
            resume = None

    def needs(
        self, store: str, cursor: Optional[bytes], limit: int
    ) -> tuple[Needs, Optional[bytes]]:
        """
        Up to C{limit} files C{store} should fetch, rarest first (fewest live
        copies, claims included), skipping what its host holds or claims; and
        a cursor for the next page, or C{None} at the end.  Inside one tier
        the files come in id order as a ring, from a start of the store's
        own that moves with each of its claims, so stores asking together
        get different files.  Surplus files come last (greedy
        fill).  A page may be short, with a cursor, when a call has examined
        many files its host already holds.
        """
        s = self._store(store)
        self._tick()
        resume = self._decode(cursor, _CURSOR_TAG)
        if self._safe or limit <= 0 or not self._ids:
            return Needs.of(()), None
        mine = self._same_host[s]
        holders = self._holders
        claims = self._claims
        budget = _SCAN_BUDGET
        out: list[int] = []
        tiers: list[int] = []
        for c, start, spans in self._walk(sorted(self._tally), self._resume[s], resume,
                                          _CURSOR_TAG):
            for lo, hi, wrapped in spans:
                for i in self._tier(c, lo, hi):
                    budget -= 1
                    if not holders[i] & mine:
                        claimers = claims.get(i)
                        if not claimers or not any(mine >> t & 1 for t in claimers):
                            out.append(i)
                            tiers.append(c)
                            if len(out) >= limit:
                                break
                    if budget <= 0:
                        break
                else:
                    continue
                after = _CURSOR.pack(_CURSOR_TAG, c, start, i + 1, wrapped)
                return self._needs(out, tiers), after
        return self._needs(out, tiers), None

    def _needs(self, ids: list[int], copies: list[int]) -> Needs:
        return Needs(
            list(_pick(self._paths, ids)),
            array("q", _pick(self._size, ids)),
            array("q", _pick(self._mtime, ids)),
            array("I", copies),
            array("I", [self.copies]) * len(ids),
        )

    def surplus(
        self, store: str, cursor: Optional[bytes], limit: int
    ) -> tuple[Needs, Optional[bytes]]:
        """
        Up to C{limit} files C{store} holds at the current version that have
        more live copies than C{copies}, most copies first; and a cursor for
        the next page, or C{None} at the end.  These are the copies a full
        store may ask to drop (DESIGN.md rules 4 and 5).

        A need's C{copies} counts real holdings only (distinct hosts, live
        stores, current version; claims do not count), the count L{drop}
        decides by: a live store's file is listed exactly when L{drop} would
        grant it now.  C{wanted} is C{copies}.  Inside one count the order
        is a ring of ids from an offset of the store's own.  Nothing in
        safemode.  A page may be short, with a cursor, when a call has
        examined many files the store does not hold.
        """
        s = self._store(store)
        self._tick()
        resume = self._decode(cursor, _SURPLUS_TAG)
        if self._safe or limit <= 0 or not self._held_files[s]:
            return Needs.of(()), None
        bit = 1 << s
        wanted = self.copies
        holders = self._holders
        claims = self._claims
        live = self._live
        ncopies = self._ncopies
        # A claim raises a file's tier above its real count: claimed files
        # this store holds are placed by their real count, apart from tiers.
        extra: dict[int, list[int]] = {}
        for i in claims:
            m = holders[i]
            if m & bit:
                m &= live
                n = ncopies.get(m)
                if n is None:
                    n = self._hosts_in(m)
                if n > wanted:
                    extra.setdefault(n, []).append(i)
        for ids in extra.values():
            ids.sort()
        tiers = sorted({c for c in self._tally if c > wanted}.union(extra), reverse=True)
        budget = _SCAN_BUDGET
        out: list[int] = []
        counts: list[int] = []
        for c, start, spans in self._walk(tiers, self._offset[s], resume, _SURPLUS_TAG):
            more = extra.get(c, ())
            for lo, hi, wrapped in spans:
                walk = ((i, False) for i in self._tier(c, lo, hi))
                if more:
                    walk = merge(walk, [(i, True) for i in more if lo <= i < hi])
                for i, added in walk:
                    budget -= 1
                    # A claimed file counts by its real count: only as one of extra.
                    if added or (holders[i] & bit and i not in claims):
                        out.append(i)
                        counts.append(c)
                        if len(out) >= limit:
                            break
                    if budget <= 0:
                        break
                else:
                    continue
                after = _CURSOR.pack(_SURPLUS_TAG, c, start, i + 1, wrapped)
                return self._needs(out, counts), after
        return self._needs(out, counts), None

    def claim(self, store: str, paths: Iterable[bytes], fill: bool = False) -> list[bytes]:
        """
        C{store} wants to fetch C{paths}; grant those its host neither holds
        nor claims and that still need a copy (fewer than C{copies}, counting
        live claims).  With C{fill} (greedy fill: the store was offered them
        at or above their copies) such a path is also granted once every
        file of the source has C{copies} real live copies (claims do not
        count: surplus waits until the needed transfers are done, rather
        than compete with them), or once no claim on a file below its
        copies was granted or renewed for C{stuck_after} seconds: nobody can
        place those files now (every host that lacks one is full), and
        surplus copies filled elsewhere are what lets a full store drop one
        and take a rarer file in.  Without it, a need that went
        stale between L{needs} and this claim (other stores claimed it
        meanwhile) is refused, so it does not become an unplanned surplus
        copy.  A grant counts as a copy on its host for C{claim_ttl}
        seconds, so other stores do not fetch the same file meanwhile;
        claiming again renews it (whatever C{fill}).  A grant moves the
        start of the store's next listing of needs.  Nothing in safemode,
        nothing to a dead store (it must report first), and a store's
        claims end when it is declared dead.
        """
        s = self._store(store)
        now = self._tick()
        paths, ids = self._ids_of(paths)
        if self._safe or not self._live >> s & 1:
            return []  # a dead store reports (and so comes back) first
        mine = self._same_host[s]
        deadline = now + self._claim_ttl
        claims = self._claims
        copies = self.copies
        low = self._low
        fill_waits = self._fill_waits(now)
        claimed = self._claimed[s]
        granted: list[bytes] = []
        granted_ids: list[int] = []
        for path, i in zip(paths, ids):
            claimers = claims.get(i)
            if claimers is not None and s in claimers:
                claimers[s] = deadline
                granted.append(path)
                granted_ids.append(i)
                if low[i]:
                    self._low_claimed = now
                continue
            if self._holders[i] & mine:
                continue
            if claimers and any(mine >> t & 1 for t in claimers):
                continue
            if self._copies(i) >= copies and (not fill or fill_waits or claimers):
                # Not needed; as fill only once nothing is low (or the low
                # files are stuck), and not while another store fetches it
                # (two stores racing for the same fill would both fetch it).
                continue
            if low[i]:
                self._low_claimed = now
            if claimers is None:
                claims[i] = {s: deadline}
            else:
                claimers[s] = deadline
                self._shared.add(i)
            claimed.add(i)
            self._recount(i)
            granted.append(path)
            granted_ids.append(i)
        if granted_ids:
            heappush(self._claim_heap,
                     (deadline, next(self._claim_seq), s, tuple(granted_ids)))
            # The next listing starts elsewhere: after the claimed files it
            # would meet other stores that took the files just after theirs
            # and list the same ones as they do (and, as fill, fetch them
            # too); a jump keeps stores apart.  An LCG: cheap, deterministic.
            self._resume[s] = (self._resume[s] * _LCG_A + _LCG_C) & _M64
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
        copy.  An orphan (a file the source no longer has) or a stale copy
        (a version it replaced) may go only while a live store on another
        host keeps the same version (DESIGN.md rule 7: the cluster keeps at
        least one copy of every orphan; the client deletes one past C{keep
        deleted} without asking).  Nothing in safemode.
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
        granted = []
        for path in paths:
            i = self._ids.get(path)
            if i is None:
                if path in orphans and self._kept_elsewhere(s, path, orphans[path]):
                    del orphans[path]
                    self._tell_orphans[s].pop(path, None)
                    granted.append(path)
            elif i in self._stale and s in self._stale[i]:
                if self._kept_elsewhere(s, path, self._stale[i][s]):
                    self._drop_stale(i, s)
                    self._tell_stale[s].pop(path, None)
                    granted.append(path)
            elif self._holders[i] & bit:
                if self._hosts_in(self._holders[i] & self._live & others) >= self.copies:
                    self._unhold(i, s)
                    granted.append(path)
        return granted

    def drop_kept(self, store: str, kept: Iterable[FileRecord]) -> list[FileRecord]:
        """
        C{store} asks to delete superseded versions it keeps; grant those a
        live store on another host keeps too (DESIGN.md rule 7), at once, so
        two stores can never both drop the last copy of a version.  A version
        the store did not report keeping is not granted.  Nothing in
        safemode.
        """
        s = self._store(store)
        self._tick()
        if self._safe:
            return []
        mine = self._kept[s]
        granted = []
        for r in Records.of(kept):
            if r in mine and self._kept_elsewhere(s, r.path, (r.size, r.mtime)):
                del mine[r]
                granted.append(r)
        return granted

    def _kept_elsewhere(self, s: int, path: bytes, version: tuple[int, int]) -> bool:
        """
        Whether a live store on another host than C{s}'s holds C{path} at
        C{version}: as the current version, a stale copy, an orphan, or a
        kept version.
        """
        host = self._hosts[s]
        live = self._live
        others = [t for t in range(len(self._store_ids))
                  if live >> t & 1 and self._hosts[t] != host]
        record = FileRecord.unchecked(path, *version)
        i = self._ids.get(path)
        if i is not None:
            if (self._size[i], self._mtime[i]) == version and any(
                    self._holders[i] >> t & 1 for t in others):
                return True
            stale = self._stale.get(i, {})
            if any(stale.get(t) == version for t in others):
                return True
        return any(self._orphans[t].get(path) == version or record in self._kept[t]
                   for t in others)

    # -- status ---------------------------------------------------------------

    def status(self) -> SourceStatus:
        """
        The source's replication state: files, bytes, and a histogram of
        live copies (real holdings only, claims excluded) -> [files, bytes].
        """
        self._tick()
        histogram: dict[int, list[int]] = {c: list(t) for c, t in self._tally.items()}
        for i in self._claims:
            real = self._hosts_in(self._holders[i] & self._live)
            c = self._copies(i)
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
            held=None if self._held is None else self._held.summary(),
            too_big=self.too_big(),
        )

    def too_big(self, examples: int = 5) -> Optional[dict]:
        """
        The files that can never reach C{copies}: a file fits on a host when
        it is no larger than the largest quota its stores reported, and
        copies are per host, so a file larger than the C{copies}-th largest
        host quota fits on fewer hosts than it needs.  None when every file
        fits (or no store reported a quota yet).  See L{SourceStatus}.
        """
        rooms: dict[int, int] = {}
        for s, quota in enumerate(self._quota):
            if quota is not None:
                host = self._host_bit[s]
                rooms[host] = max(rooms.get(host, 0), quota)
        if not rooms or not self._ids:
            return None
        ranked = sorted(rooms.values(), reverse=True)
        room = ranked[self.copies - 1] if len(ranked) >= self.copies else 0
        if max(self._size) <= room:
            return None
        found = [(self._size[i], self._paths[i]) for i in self._ids.values()
                 if self._size[i] > room]
        if not found:
            return None
        found.sort(reverse=True)
        return {"files": len(found), "bytes": sum(size for size, _ in found),
                "copies_room": room,
                "examples": [[os.fsdecode(path), size, sum(size <= q for q in ranked)]
                             for size, path in found[:examples]]}

    def store_status(self) -> list[StoreStatus]:
        """Each configured store as this ledger sees it, in config order."""
        now = self._tick()
        result = []
        for s, sid in enumerate(self._store_ids):
            if s in self._retired:
                continue
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
                    claims=len(self._claimed[s]),
                )
            )
        return result
