"""
The client's decisions for one store, free of I/O: what to fetch next,
which surplus copies to ask the server to let go, which orphans to delete
(DESIGN.md rules 1, 2, 4, 5 and 7).

L{plan} takes plain records describing the store and what the servers
offer, and returns a L{Plan}.  It never counts on space it does not have:
a fetch is planned only into free space plus the orphans it deletes in the
same plan (a store may delete an orphan at once).  A surplus copy may only
go with a server's grant, so when a needed file only fits after drops, the
plan carries drop I{requests} and lists the file in C{waiting}; the file is
fetched in a later round, once the grants were carried out and the freed
space shows up in C{free}.
"""

from __future__ import annotations

from typing import AbstractSet, Callable, Mapping, Sequence

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
    """A file this store holds that its source no longer has."""

    source: str
    path: bytes
    size: int
    since: float  # when first seen orphaned


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
    dropped before a grant).  C{delete_orphans}: orphans to delete now
    (expired ones, then young ones the fetches need room from, oldest
    first).  C{skipped_too_big}: needs whose cost exceeds the whole quota.
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
    held files not to ask about (a request pending, or refused lately).

    Needs are taken rarest first across sources by L{rank}, ties in the
    order the servers gave (then source order).  Each that fits is
    fetched; one that does not fit deletes young orphans (oldest first) if
    they make it fit, else requests surplus drops (most surplus first) if
    those would, after which nothing more is fetched this round, so the
    space the drops make is not taken by a less rare file.
    """
    result = Plan()
    # Greedy fill waits while anything offered is still below its copies
    # (and could fit at all): surplus taken now would only be swapped out
    # again for the rarer files, and fetched again by the next store.
    wait_fill = any(n.copies < n.wanted and cost(sid, n.path, n.size) <= quota
                    for sid, offered in needs for n in offered)
    room = free
    expired_keys: set[Key] = set()
    young: list[Orphan] = []
    for o in sorted(orphans, key=lambda o: (o.since, o.source, o.path)):
        keep = keep_deleted.get(o.source)
        if keep is not None and now - o.since >= keep:
            result.delete_orphans.append((o.source, o.path))
            expired_keys.add((o.source, o.path))
            room += o.size
        else:
            young.append(o)

    skip: set[Key] = set(busy)
    skip.update((h.source, h.path) for h in held)
    skip.update((o.source, o.path) for o in orphans)
    candidates = []
    for order, (source, source_needs) in enumerate(needs):
        for index, need in enumerate(source_needs):
            key = (source, need.path)
            if key in skip:
                continue
            skip.add(key)  # a need listed twice is considered once
            if wait_fill and need.copies >= need.wanted:
                if cost(source, need.path, need.size) > quota:
                    result.skipped_too_big.append(key)
                continue
            candidates.append((rank(need.copies, need.wanted), index, order, source, need))
    candidates.sort(key=lambda c: c[:3])

    pool = sorted(
        (h for h in held if h.copies > h.wanted and (h.source, h.path) not in no_drop),
        key=lambda h: (-h.surplus, -h.copies, -h.size, h.source, h.path),
    )
    young_room = sum(o.size for o in young)
    closed = False  # drops were requested: fetch nothing more this round
    for _, _, _, source, need in candidates:
        c = cost(source, need.path, need.size)
        if c > quota:
            result.skipped_too_big.append((source, need.path))
            continue
        if not closed and c <= room:
            result.fetch.append((source, need))
            room -= c
            continue
        if not closed and c <= room + young_room:
            while room < c:
                o = young.pop(0)
                result.delete_orphans.append((o.source, o.path))
                room += o.size
                young_room -= o.size
            result.fetch.append((source, need))
            room -= c
            continue
        short = c - (0 if closed else room + young_room)
        chosen = []
        freed = 0
        for h in pool:
            if freed >= short:
                break
            if may_swap(need, h):
                chosen.append(h)
                freed += h.size
        if freed < short:
            continue  # cannot be made to fit now: a smaller one may
        for h in chosen:
            pool.remove(h)
            why = ("below copies" if need.copies < need.wanted
                   else f"{need.copies} copies vs {h.copies}")
            result.drops.append(Drop(
                h.source, h.path,
                f"surplus {h.copies}/{h.wanted}, room for {need.path!r} ({why})",
                source, need.path))
        result.waiting.append((source, need.path))
        # What is free and the young orphans now wait for this file; later
        # needs can only be made room for by drops of their own.
        closed = True
    return result
