"""
The client's decisions for one store, free of I/O: what to fetch next,
which surplus copies to ask the server to let go, which orphans to delete
(DESIGN.md rules 1, 2, 4, 5 and 7).

L{plan} takes plain records describing the store and what the servers
offer, and returns a L{Plan}.  It never counts on space it does not have:
a fetch is planned only into free space plus the expired orphans it
deletes in the same plan (past C{keep deleted}, a store deletes them at
once).  A surplus copy, or an orphan still within C{keep deleted}, may only
go with a server's grant (the server keeps at least one copy of every
orphan, rule 7), and an orphan only to make room for a file below its
copies.  So when a needed file only fits after drops, the plan carries drop
I{requests} and lists the file in C{waiting}; the file is fetched in a
later round, once the grants were carried out and the freed space shows up
in C{free}.
"""

from __future__ import annotations

from typing import AbstractSet, Callable, Mapping, Optional, Sequence

from attrs import field, frozen

from .records import Need, rank

#: (source id, relpath)
Key = tuple[str, bytes]

#: A wanted file must have at least this many fewer copies than a surplus
#: copy for a full store to swap one for the other when the wanted file is
#: itself at or above its copies (hysteresis: no ping-pong between stores).
SWAP_MARGIN = 2


@frozen
class Held:
    """
    A file this store holds, with the live copies and wanted copies the
    server last answered for it.
    """

    source: str
    path: bytes
    size: int
    copies: int
    wanted: int

    @property
    def surplus(self) -> int:
        return self.copies - self.wanted


@frozen
class Orphan:
    """
    A copy this store holds that is no current version of its source: a
    file the source deleted (C{path} its path in the layout), or a
    superseded version kept outside the layout (C{of} the path it is an old
    version of, C{path} the key the store knows it by).
    """

    source: str
    path: bytes
    size: int
    since: float  # when first seen orphaned
    of: Optional[bytes] = None


@frozen
class Drop:
    """
    A request to the server: may this store drop its copy of C{path}?
    Made to make room for C{for_source}/C{for_path}.
    """

    source: str
    path: bytes
    reason: str
    for_source: str
    for_path: bytes


@frozen
class Plan:
    """
    C{fetch}: (source id, need) in the order to fetch, whose costs fit in
    free space plus C{delete_orphans}.  C{drops}: drop requests (nothing is
    dropped before a grant).  C{delete_orphans}: expired orphans, to
    delete now, oldest first.  C{skipped_too_big}: needs whose cost exceeds the whole quota.
    C{waiting}: needs that will fit once the requested drops are granted.
    """

    fetch: list[tuple[str, Need]] = field(factory=list)
    drops: list[Drop] = field(factory=list)
    delete_orphans: list[Key] = field(factory=list)
    skipped_too_big: list[Key] = field(factory=list)
    waiting: list[Key] = field(factory=list)


def may_swap(wanted: Need, surplus: Held) -> bool:
    """
    Whether a full store may ask to drop C{surplus} (which must have more
    copies than wanted) to make room for C{wanted}: always when C{wanted} is
    below its copies, else only when it has at least L{SWAP_MARGIN} fewer
    copies than C{surplus} has.
    """
    if surplus.copies <= surplus.wanted:
        return False
    if wanted.copies < wanted.wanted:
        return True
    return wanted.copies <= surplus.copies - SWAP_MARGIN


class _Pool:
    """
    The surplus copies a plan may ask to drop, in drop order: most surplus
    first, then most copies, then largest, then by source and path.

    Whether a copy may be swapped for a wanted file (L{may_swap}) depends
    only on its copies and wanted copies, so the pool is kept as classes of
    equal (surplus, copies), each a list in drop order with its unclaimed
    bytes.  A search for room walks the classes the wanted file may swap
    with, and one that cannot succeed costs a sum over the classes instead
    of a walk over every copy (the hot spot of a full store offered
    thousands of files).  Copies taken are always the front of their class.
    """

    def __init__(self, held: Sequence[Held], no_drop: AbstractSet[Key]):
        groups: dict[tuple[int, int], list[Held]] = {}
        for h in held:
            if h.copies > h.wanted and (h.source, h.path) not in no_drop:
                groups.setdefault((h.surplus, h.copies), []).append(h)
        # [a member (for may_swap), members in drop order, next untaken, bytes untaken]
        self.classes: list[list] = []
        for key in sorted(groups, key=lambda k: (-k[0], -k[1])):
            members = sorted(groups[key], key=lambda h: (-h.size, h.source, h.path))
            self.classes.append([members[0], members, 0, sum(h.size for h in members)])
        self._eligible: dict[tuple[int, int], tuple[list[list], int]] = {}
        #: Bytes of all copies not taken yet: no search can free more.
        self.bytes = sum(c[3] for c in self.classes)

    def take(self, need: Need, short: int) -> Optional[list[Held]]:
        """
        The first copies in drop order that may make room for C{need}
        whose sizes add up to at least C{short}, taken out of the pool; or
        C{None} (nothing taken) when all of them together would not.
        """
        # Which classes may swap depends on the need's copies and wanted
        # only: remembered until something is taken.
        sig = (need.copies, need.wanted)
        found = self._eligible.get(sig)
        if found is None:
            eligible = [c for c in self.classes if c[2] < len(c[1]) and may_swap(need, c[0])]
            found = self._eligible[sig] = (eligible, sum(c[3] for c in eligible))
        eligible, total = found
        if total < short:
            return None
        self._eligible.clear()
        chosen: list[Held] = []
        freed = 0
        for c in eligible:
            if freed >= short:
                break
            members, i = c[1], c[2]
            while i < len(members) and freed < short:
                h = members[i]
                chosen.append(h)
                freed += h.size
                c[3] -= h.size
                i += 1
            c[2] = i
        self.bytes -= freed
        return chosen


def plan(
    *,
    free: int,
    quota: int,
    needs: Sequence[tuple[str, Sequence[Need]]],
    cost: Callable[[str, bytes, int], int],
    now: float,
    keep_deleted: Mapping[str, float],
    held: Sequence[Held] = (),
    orphans: Sequence[Orphan] = (),
    busy: AbstractSet[Key] = frozenset(),
    no_drop: AbstractSet[Key] = frozenset(),
    hold_fill: bool = False,
) -> Plan:
    """
    Decide one round for one store.

    C{free}: quota minus used, bytes (may be negative).  C{quota}: the
    store's whole quota.  C{needs}: per source id, in the server's order,
    the needs it offered.  C{cost(source, path, size)}: the bytes fetching
    would add at its peak (L{cluster_backup.store.Store.cost}).
    C{keep_deleted}: seconds per source id (a source not in it: orphans
    never expire).  C{held}: this store's files, with copies from the
    server.  C{orphans}: this store's orphans.  C{busy}: files this host
    holds or is fetching through any of its stores (rule 2).  C{no_drop}:
    held files and orphans not to ask about (a request pending, or refused
    lately).

    Needs are taken rarest first across sources by L{rank}, ties in the
    order the servers gave (then source order).  Each that fits is
    fetched; one that does not fit requests drops if they would make it
    fit: for a file below its copies young orphans first (oldest first),
    then surplus copies (most surplus first); for any other file surplus
    copies only (an orphan is kept for C{keep deleted} rather than give way
    to an extra copy).  After a request nothing more is fetched this round,
    so the space the drops make is not taken by a less rare file.

    Greedy fill (needs at or above their copies) waits while anything
    offered is still below its copies and could fit at all: surplus taken
    now would only be swapped out again for the rarer files, and fetched
    again by the next store.  It waits only as long as this round plans
    one of those rarer files (a fetch, or drops to make room): when none
    can be fetched or made room for here, the space is filled.  Idle space
    would help nobody, and the surplus copies filled here are what lets a
    full store elsewhere drop one and take a rarer file in (it may drop
    only surplus).  With C{hold_fill} (a server said its files below
    copies are being fetched: L{cluster_backup.protocol.ListNeeds}) there
    is no fill at all this round.
    """
    args = dict(free=free, quota=quota, needs=needs, cost=cost, now=now,
                keep_deleted=keep_deleted, held=held, orphans=orphans, busy=busy,
                no_drop=no_drop)
    wait_fill = any(n.copies < n.wanted and cost(sid, n.path, n.size) <= quota
                    for sid, offered in needs for n in offered)
    result = _plan(wait_fill=wait_fill or hold_fill, **args)
    if wait_fill and not hold_fill and not (result.fetch or result.waiting):
        result = _plan(wait_fill=False, **args)
    return result


def _plan(*, free, quota, needs, cost, now, keep_deleted, held, orphans, busy, no_drop,
          wait_fill: bool) -> Plan:
    """
    One pass of L{plan} (its arguments, typed there): with C{wait_fill},
    needs at or above their copies are left out.
    """
    result = Plan()
    room = free
    young: list[Orphan] = []  # orphans kept for keep deleted, oldest first
    for o in sorted(orphans, key=lambda o: (o.since, o.source, o.path)):
        keep = keep_deleted.get(o.source)
        if keep is not None and now - o.since >= keep:
            result.delete_orphans.append((o.source, o.path))
            room += o.size
        elif (o.source, o.path) not in no_drop:
            young.append(o)

    skip: set[Key] = set(busy)
    skip.update((h.source, h.path) for h in held)
    skip.update((o.source, o.path) for o in orphans)
    ranks: dict[tuple[int, int], tuple[int, float]] = {}
    candidates = []
    for order, (source, source_needs) in enumerate(needs):
        for index, need in enumerate(source_needs):
            key = (source, need.path)
            if key in skip:
                continue
            skip.add(key)  # a need listed twice is considered once
            c = cost(source, need.path, need.size)
            if wait_fill and need.copies >= need.wanted:
                if c > quota:
                    result.skipped_too_big.append(key)
                continue
            r = ranks.get((need.copies, need.wanted))
            if r is None:
                r = ranks[(need.copies, need.wanted)] = rank(need.copies, need.wanted)
            # (rank, index, order) is unique: the sort never compares further.
            candidates.append((r, index, order, c, source, need))
    candidates.sort()

    pool: Optional[_Pool] = None  # built when first needed
    # Old versions of a file, by (source, path): asked for first when that
    # file needs room, since the store then updates the old copy in place.
    own: dict[tuple[str, bytes], list[int]] = {}
    for k, o in enumerate(young):
        if o.of is not None:
            own.setdefault((o.source, o.of), []).append(k)
    taken: set[int] = set()
    next_young = 0  # young[:next_young] are all taken
    closed = False  # drops were requested: fetch nothing more this round
    for _, _, _, c, source, need in candidates:
        if c > quota:
            result.skipped_too_big.append((source, need.path))
            continue
        if not closed and c <= room:
            result.fetch.append((source, need))
            room -= c
            continue
        # Room must be asked for: young orphans (only for a file below its
        # copies: its own old versions, then oldest first), then surplus.
        short = c - (0 if closed else room)
        asked: list[int] = []
        freed = 0
        if need.copies < need.wanted:
            for k in own.get((source, need.path), ()):
                if freed < short and k not in taken:
                    asked.append(k)
                    freed += young[k].size
            k = next_young
            while freed < short and k < len(young):
                if k not in taken and k not in asked:
                    asked.append(k)
                    freed += young[k].size
                k += 1
        chosen: Optional[list[Held]] = []
        if freed < short:
            if pool is None:
                pool = _Pool(held, no_drop)
            rest = short - freed
            chosen = pool.take(need, rest) if rest <= pool.bytes else None
            if chosen is None:
                continue  # cannot be made to fit now: a smaller one may
        for k in asked:
            o = young[k]
            taken.add(k)
            result.drops.append(Drop(
                o.source, o.path, f"orphan, room for {need.path!r} (below copies)",
                source, need.path))
        while next_young in taken:
            next_young += 1
        for h in chosen:
            why = ("below copies" if need.copies < need.wanted
                   else f"{need.copies} copies vs {h.copies}")
            result.drops.append(Drop(
                h.source, h.path,
                f"surplus {h.copies}/{h.wanted}, room for {need.path!r} ({why})",
                source, need.path))
        result.waiting.append((source, need.path))
        # What is free now waits for this file; later needs can only be
        # made room for by drops of their own.
        closed = True
    return result
