"""
The planner's decisions written the straightforward way: L{reference_plan}
is L{cluster_backup.planner.plan} as it was before it was made fast for
large stores (commit c5c6742).  Tests check that the fast one decides
exactly the same on random inputs; keep the two in step when a rule changes.
"""

from __future__ import annotations

from typing import AbstractSet, Callable, Mapping, Sequence

from cluster_backup.planner import Drop, Held, Key, Orphan, Plan, may_swap
from cluster_backup.records import Need, rank


def reference_plan(
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
    """The decisions of L{cluster_backup.planner.plan}, computed plainly."""
    args = dict(free=free, quota=quota, needs=needs, cost=cost, now=now,
                keep_deleted=keep_deleted, held=held, orphans=orphans, busy=busy,
                no_drop=no_drop)
    # Greedy fill waits while anything offered is still below its copies
    # (and could fit at all), as long as one of those is planned; not at
    # all while a server holds it.
    if hold_fill:
        return _reference_pass(wait_fill=True, **args)
    if not any(cost(sid, n.path, n.size) <= quota
               for sid, offered in needs for n in offered if n.copies < n.wanted):
        return _reference_pass(wait_fill=False, **args)
    result = _reference_pass(wait_fill=True, **args)
    planned = result.fetch + result.waiting
    return result if planned else _reference_pass(wait_fill=False, **args)


def _reference_pass(*, free, quota, needs, cost, now, keep_deleted, held, orphans, busy,
                    no_drop, wait_fill) -> Plan:
    result = Plan()
    room = free
    young: list[Orphan] = []
    for o in sorted(orphans, key=lambda o: (o.since, o.source, o.path)):
        keep = keep_deleted.get(o.source)
        if keep is not None and now - o.since >= keep:
            # Past keep deleted: gone at once, no grant needed.
            result.delete_orphans.append((o.source, o.path))
            room += o.size
        elif (o.source, o.path) not in no_drop:
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
        # Ask for room: young orphans only for a file below its copies
        # (its own old versions first, then oldest first), then surplus
        # copies it may swap with.
        short = c - (0 if closed else room)
        below = need.copies < need.wanted
        takes_orphans = []
        freed = 0
        mine = [o for o in young if (o.source, o.of) == (source, need.path)]
        for o in (mine + [o for o in young if o not in mine] if below else []):
            if freed >= short:
                break
            takes_orphans.append(o)
            freed += o.size
        chosen = []
        for h in pool:
            if freed >= short:
                break
            if may_swap(need, h):
                chosen.append(h)
                freed += h.size
        if freed < short:
            continue  # cannot be made to fit now: a smaller one may
        for o in takes_orphans:
            young.remove(o)
            result.drops.append(Drop(
                o.source, o.path, f"orphan, room for {need.path!r} (below copies)",
                source, need.path))
        for h in chosen:
            pool.remove(h)
            why = ("below copies" if below else f"{need.copies} copies vs {h.copies}")
            result.drops.append(Drop(
                h.source, h.path,
                f"surplus {h.copies}/{h.wanted}, room for {need.path!r} ({why})",
                source, need.path))
        result.waiting.append((source, need.path))
        # What is free now waits for this file; later needs can only be
        # made room for by drops of their own.
        closed = True
    return result
