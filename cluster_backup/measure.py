"""
C{cbackup check --measure}: walk the sources of this host (as the server's
scan would: same excludes, stores inside a source skipped) and say how big
each is and its largest file, so L{cluster_backup.checks} can tell before
deployment whether the quotas can hold the copies, and whether a file is
too large for its copies to exist at all.
"""

from __future__ import annotations

import os
from typing import Optional

from attrs import frozen

from cluster_backup.config import Cluster
from cluster_backup.scanner import ScanError, walk


@frozen
class Measured:
    """One source as walked: files, bytes, and its largest file (path text, size)."""

    files: int
    bytes: int
    largest: Optional[tuple[str, int]]


def measure(cluster: Cluster, host: str) -> tuple[dict[str, Measured], list[str]]:
    """
    Walk every source of C{host}; returns their figures by source id and
    the sources that could not be walked, each as a sentence.
    """
    skip = [store.path for store in cluster.stores_on(host)]
    found: dict[str, Measured] = {}
    problems: list[str] = []
    for source in cluster.sources_on(host):
        files = total = 0
        largest: Optional[tuple[int, bytes]] = None
        try:
            for batch in walk(source.path, exclude=source.exclude, skip=skip):
                for path, size in zip(batch.paths, batch.sizes):
                    files += 1
                    total += size
                    if largest is None or size > largest[0]:
                        largest = (size, path)
        except (ScanError, OSError) as e:
            problems.append(f"source {source.id} could not be measured: {e}")
            continue
        found[source.id] = Measured(
            files, total, None if largest is None else (os.fsdecode(largest[1]), largest[0]))
    return found, problems
