"""
Write a L{Cluster} back out, in the seed's line format or as YAML.

Used by C{cbackup check} to show what it understood, by the tests to prove
that both formats mean the same thing (text -> Cluster -> text -> Cluster),
and by the demo to generate configs.  Defaults are written only when they
differ, so a written config stays as short as one an operator would write.
"""

from __future__ import annotations

import yaml

from cluster_backup.config import Cluster, Options, Source, Store
from cluster_backup.units import format_duration, format_size


def _option_items(options: Options) -> list[tuple[str, str]]:
    default = Options(port=options.port)
    items = []
    if options.port != Options().port:
        items.append(("PORT", str(options.port)))
    if options.rsync_port != default.rsync_port:
        items.append(("RSYNC PORT", str(options.rsync_port)))
    if options.secret is not None:
        items.append(("SECRET", options.secret))
    if options.secret_file is not None:
        items.append(("SECRET FILE", options.secret_file))
    if options.bwlimit is not None:
        items.append(("BWLIMIT", format_size(options.bwlimit)))
    for key, attr in (("RESCAN", "rescan"), ("REPORT INTERVAL", "report_interval"),
                      ("DEAD AFTER", "dead_after")):
        if getattr(options, attr) != getattr(default, attr):
            items.append((key, format_duration(getattr(options, attr))))
    if options.transport != default.transport:
        items.append(("TRANSPORT", options.transport))
    if options.max_change != default.max_change:
        items.append(("MAX CHANGE", format_fraction(options.max_change)))
    return items


def format_fraction(value: float) -> str:
    """A C{MAX CHANGE} as a percentage that reads back the same."""
    return f"{value * 100:.10g}%"


def _source_items(source: Source) -> list[tuple[str, str]]:
    items = [("copies", str(source.copies))]
    if source.rescan is not None:
        items.append(("rescan", format_duration(source.rescan)))
    items += [("exclude", pattern) for pattern in source.exclude]
    if source.keep_deleted != Source("h", "/").keep_deleted:
        items.append(("keep deleted", format_duration(source.keep_deleted)))
    if source.address is not None:
        items.append(("address", source.address))
    if source.max_change is not None:
        items.append(("max change", format_fraction(source.max_change)))
    return items


def _store_items(store: Store) -> list[tuple[str, str]]:
    items = []
    if store.size is not None:
        items.append(("size", format_size(store.size)))
    if store.reserve is not None:
        items.append(("reserve", format_size(store.reserve)))
    items += [("ignore source", source) for source in store.ignore_sources]
    if store.address is not None:
        items.append(("address", store.address))
    return items


def to_lines(cluster: Cluster) -> str:
    """The cluster in the seed's line format."""
    lines = [f"options: {key}: {value}" for key, value in _option_items(cluster.options)]
    for source in cluster.sources:
        lines.append(f"server: {source.id}")
        lines += [f"{key}: {value}" for key, value in _source_items(source)]
    for store in cluster.stores:
        lines.append(f"backup: {store.id}")
        lines += [f"{key}: {value}" for key, value in _store_items(store)]
    return "\n".join(lines) + "\n"


def _block(head: str, ident: str, items: list[tuple[str, str]]) -> dict:
    block: dict = {head: ident}
    for key, value in items:
        if key in ("exclude", "ignore source"):
            block.setdefault(key, []).append(value)
        else:
            block[key] = value
    return block


def to_yaml(cluster: Cluster) -> str:
    """The cluster as YAML (C{options:}, C{sources:}, C{backups:})."""
    data: dict = {}
    options = dict(_option_items(cluster.options))
    if options:
        data["options"] = options
    data["sources"] = [_block("server", s.id, _source_items(s)) for s in cluster.sources]
    data["backups"] = [_block("backup", s.id, _store_items(s)) for s in cluster.stores]
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=False,
                          allow_unicode=True)
