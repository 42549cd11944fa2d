"""
Advice about a valid config: what a careful operator wants to hear before
deploying it.  Pure functions over a L{Cluster} (and, when known, the
measured size of sources, the SECRET FILE's mode, a resolver of host
names), returning plain sentences.
"""

from __future__ import annotations

from typing import Callable, Mapping, Optional

from cluster_backup.config import Cluster
from cluster_backup.identity import as_ip
from cluster_backup.units import human_size


def _inside(inner: str, outer: str) -> bool:
    return inner == outer or inner.startswith(outer.rstrip("/") + "/")


def warnings(cluster: Cluster, source_bytes: Optional[Mapping[str, int]] = None,
             largest: Optional[Mapping[str, tuple[str, int]]] = None) -> list[str]:
    """
    Warnings for C{cluster}.  C{source_bytes} maps source ids to their
    measured size where that is known (C{cbackup check --measure} on the
    source's host); the quota check runs only for those.  C{largest} maps
    source ids to their largest file (path, size), measured the same way:
    one that fits in the quota of fewer backup hosts than C{copies} can
    never have its copies.
    """
    out: list[str] = []
    for source in cluster.sources:
        hosts = {store.host for store in cluster.stores_for(source)}
        own = [store.id for store in cluster.stores
               if cluster.same_host(store.host, source.host)]
        if source.copies > len(hosts):
            mine = (f" (not counting {', '.join(own)} on the source's own host: "
                    "a copy there dies with it)") if own else ""
            out.append(
                f"source {source.id} wants {source.copies} copies but only "
                f"{len(hosts)} distinct backup host(s) back it up{mine}; copies are "
                f"counted per host, so at most {len(hosts)} can exist")
    for store in cluster.stores:
        for source in cluster.sources_on(store.host):
            if _inside(store.path, source.path) or _inside(source.path, store.path):
                out.append(
                    f"backup {store.id} overlaps source {source.id} on the same "
                    "host: a copy there is lost with the source's disk, and the "
                    "server never scans the store's folder")
    if source_bytes:
        out += _quota_warnings(cluster, source_bytes)
    if largest:
        out += _fit_warnings(cluster, largest)
    if cluster.options.listen == "*":
        out.append("LISTEN *: every server listens on all its interfaces (PORT and "
                   "RSYNC PORT), not only on its host's address")
    if cluster.options.transport == "ssh":
        out.append("TRANSPORT ssh is not built yet: clients fetch through each "
                   "server's rsync daemon (TRANSPORT daemon)")
    if cluster.options.secret is None and cluster.options.secret_file is None:
        out.append(
            "no SECRET or SECRET FILE: any machine that can reach PORT "
            f"{cluster.options.port} can join as a backup client and read the "
            "sources; set a shared secret")
    return out


def _fit_warnings(cluster: Cluster, largest: Mapping[str, tuple[str, int]]) -> list[str]:
    """Sources whose largest file fits in the quota of fewer hosts than its copies."""
    out = []
    for source in cluster.sources:
        if source.id not in largest:
            continue
        path, size = largest[source.id]
        stores = cluster.stores_for(source)
        if any(store.size is None for store in stores):
            continue  # a reserve store's room depends on its disk: unknowable here
        room: dict[str, int] = {}
        for store in stores:
            room[store.host] = max(room.get(store.host, 0), store.size)
        fits = sum(1 for quota in room.values() if size <= quota)
        if fits < source.copies:
            out.append(
                f"source {source.id}: its largest file {path!r} ({human_size(size)}) "
                f"fits in the quota of {fits} backup host(s), so it can never have "
                f"{source.copies} copies; grow a store or lower copies")
    return out


def _quota_warnings(cluster: Cluster, source_bytes: Mapping[str, int]) -> list[str]:
    out = []
    for source in cluster.sources:
        if source.id not in source_bytes:
            continue
        stores = cluster.stores_for(source)
        if any(store.size is None for store in stores):
            continue  # a reserve store's room depends on its disk: unknowable here
        wanted = source.copies * source_bytes[source.id]
        room = sum(store.size for store in stores)
        if wanted > room:
            out.append(
                f"source {source.id} holds {human_size(source_bytes[source.id])}; "
                f"{source.copies} copies need {human_size(wanted)} but its backups "
                f"have {human_size(room)} of quota in all")
    needed = sum(s.copies * source_bytes[s.id] for s in cluster.sources if s.id in source_bytes)
    if all(s.id in source_bytes for s in cluster.sources) and all(
            st.size is not None for st in cluster.stores):
        total = sum(st.size for st in cluster.stores)
        if needed > total:
            out.append(
                f"all copies of all sources need {human_size(needed)} but the "
                f"backups have {human_size(total)} of quota in all")
    return out


def secret_file_warnings(path: str, mode: int) -> list[str]:
    """
    A SECRET FILE (at C{path}, with C{st_mode} C{mode}) that group or
    others can read gives the cluster away; one they can write lets them
    lock every host out.
    """
    access = [word for word, bits in (("readable", 0o044), ("writable", 0o022))
              if mode & bits]
    whom = [word for word, bits in (("its group", 0o060), ("others", 0o006)) if mode & bits]
    if not access:
        return []
    return [f"SECRET FILE {path} is {' and '.join(access)} by {' and '.join(whom)} "
            f"(mode {mode & 0o7777:04o}): whoever reads it can join the cluster and read "
            f"every source; chmod 600 {path}"]


def unresolved_warnings(cluster: Cluster, resolve: Callable[[str], object]) -> list[str]:
    """
    The hosts without C{address:} whose name does not resolve: C{resolve}
    (L{socket.getaddrinfo} in C{cbackup check}) raises C{OSError} for them.
    An IP address needs no lookup.  Each warning names the config line
    where the host first appears.
    """
    out = []
    for host in cluster.hosts():
        if cluster.address_of(host) != host or as_ip(host) is not None:
            continue
        try:
            resolve(host)
        except (OSError, UnicodeError) as e:
            why = getattr(e, "strerror", None) or str(e)
            line = next(b.line for b in (*cluster.sources, *cluster.stores) if b.host == host)
            where = f"{cluster.filename}:{line}: " if line else ""
            harm = ("clients cannot connect to its server" if cluster.sources_on(host)
                    else "cbackup restore cannot reach its stores over ssh")
            out.append(f"{where}host {host} does not resolve here ({why}): {harm}; fix its "
                       "name in DNS or /etc/hosts, or give it 'address: IP'")
    return out
