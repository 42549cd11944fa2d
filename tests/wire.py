"""
Raw AMP list values in the protocol's wire format (see the encoding notes in
L{cluster_backup.protocol}), built without any check, so tests can send what
a broken or hostile peer would: bad names, negative or huge numbers, NULs.
"""

from __future__ import annotations

import struct
from typing import Iterable, Sequence


def raw_list(paths: Sequence[bytes], *columns: tuple[str, Sequence[int]]) -> bytes:
    """
    A list value of C{paths} (each followed by a NUL) with number
    C{columns} given as (struct code, values), e.g. C{("Q", sizes)}; an
    empty value for no paths.
    """
    if not paths:
        return b""
    out = [struct.pack(">I", len(paths))]
    for code, values in columns:
        out.append(struct.pack(f"<{len(values)}{code}", *values))
    out.extend(p + b"\0" for p in paths)
    return b"".join(out)


def raw_paths(paths: Iterable[bytes]) -> bytes:
    return raw_list(list(paths))


def raw_records(items: Iterable[tuple[bytes, int, int]]) -> bytes:
    """(path, size, mtime) items; sizes are written unsigned (>= 2**63 reads negative)."""
    items = list(items)
    return raw_list([p for p, _, _ in items], ("Q", [s for _, s, _ in items]),
                    ("q", [m for _, _, m in items]))


def raw_needs(items: Iterable[tuple[bytes, int, int, int, int]]) -> bytes:
    """(path, size, mtime, copies, wanted) items."""
    items = list(items)
    return raw_list([i[0] for i in items], ("Q", [i[1] for i in items]),
                    ("q", [i[2] for i in items]), ("I", [i[3] for i in items]),
                    ("I", [i[4] for i in items]))
