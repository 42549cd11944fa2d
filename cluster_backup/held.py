"""
Held scans (DESIGN.md rule 8): a rescan that deletes or rewrites too much
of a source at once is held, not applied, until an operator accepts it.

An unmounted disk leaves an empty mount point (or one with a marker file
in it); ransomware rewrites files in place.  Either would, applied, turn
every copy into an orphan or a stale copy within one rescan.  The ledger
(L{cluster_backup.ledger.Ledger.scan_finished}) measures each scan's
change against the last accepted state with L{ScanChange} and asks
L{too_big}; a held change keeps the previous state in force (nothing
becomes an orphan, no copy stops counting) until C{cbackup accept}, or
until a later scan's change falls back under the limit.

The limit is C{MAX CHANGE} (default L{DEFAULT_MAX_CHANGE}), a fraction of
the source's files, and of its bytes for deletions:

  - files deleted plus files rewritten, over the files of the last accepted
    scan;
  - bytes deleted over its bytes.  Rewrites do not count in bytes: a VM
    image or a database file is rewritten all the time, and its bytes are
    still there; a source made mostly of a few such files would otherwise
    be held at every scan.  A mass rewrite still shows in the file count,
    and every superseded version is kept as an orphan for C{keep deleted}.

Changes touching fewer than L{HOLD_FLOOR} files are never held: on a
source of a handful of files, editing one is a large fraction, and asking
for an accept each time would only teach operators to turn the rule off.
Their copies are still kept for C{keep deleted} (rule 7).  The one
exception is a scan that finds none of the source's files, whatever their
number: that is an empty mount point far more often than a deliberate
emptying.

Pure: no I/O, no clock.
"""

from __future__ import annotations

from typing import Optional

from attrs import frozen

from .units import human_size

#: 20%: everyday churn between two rescans (an hour by default) is a few
#: percent of a source at most; an unmounted disk is all of it; and a
#: rewrite of a fifth of the files is already far past normal edits.
DEFAULT_MAX_CHANGE = 0.2
#: Changes touching fewer files than this are never held.
HOLD_FLOOR = 10


@frozen
class ScanChange:
    """
    What one scan would change, against the state it started from:
    C{base_files} and C{base_bytes} are the last accepted scan's.
    """

    deleted_files: int
    deleted_bytes: int
    changed_files: int
    changed_bytes: int
    base_files: int
    base_bytes: int

    @property
    def files(self) -> int:
        """Files deleted or rewritten."""
        return self.deleted_files + self.changed_files


def too_big(change: ScanChange, max_change: Optional[float]) -> bool:
    """
    Whether C{change} is over C{max_change} (a fraction; None: never) of
    the source, as the module docstring says.
    """
    if max_change is None or change.base_files == 0:
        return False
    if change.deleted_files >= change.base_files:
        return max_change < 1  # every file gone
    if change.files < HOLD_FLOOR:
        return False
    return (change.files > max_change * change.base_files
            or change.deleted_bytes > max_change * change.base_bytes)


def describe(held: dict) -> str:
    """A held scan (L{cluster_backup.records.SourceStatus.held}) in a few words."""
    return (f"{held['deleted_files']:,} deleted ({human_size(held['deleted_bytes'])}), "
            f"{held['changed_files']:,} changed ({human_size(held['changed_bytes'])})")


def parse_max_change(text: str) -> float:
    """
    C{MAX CHANGE}: a percentage (C{20%}) or a fraction (C{0.2}) above 0.
    C{off} is 1 (100%), which never holds a scan: a scan cannot delete or
    rewrite more than all of a source.
    """
    value = text.strip().lower()
    if value in ("off", "none", "never"):
        return 1.0
    try:
        number = float(value[:-1]) / 100 if value.endswith("%") else float(value)
    except ValueError:
        raise ValueError(f"expected a percentage like 20% or 'off', got {text!r}") from None
    if not number > 0:
        raise ValueError(f"must be above 0%, got {text!r}")
    if value.endswith("%") is False and number > 1:
        raise ValueError(f"a fraction must be at most 1 (write {number:g}% for a "
                         f"percentage), got {text!r}")
    return min(number, 1.0)
