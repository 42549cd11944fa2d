"""
Each source's last accepted scan, as C{(files, bytes)}, kept in the
server's state directory so that the first scan after a restart is
measured against it (L{cluster_backup.held}): a disk that did not mount at
boot must not pass for a source whose files were all deleted.

One small JSON file, C{accepted.json}, replaced atomically.  A missing or
unreadable file means nothing was accepted yet (logged when unreadable):
the first scan then sets the baseline.
"""

from __future__ import annotations

import json
import os
from typing import Optional

from twisted.logger import Logger

log = Logger()

FILENAME = "accepted.json"


def load(state_dir: str) -> dict[str, tuple[int, int]]:
    """Source id -> (files, bytes) as last saved in C{state_dir}."""
    path = os.path.join(state_dir, FILENAME)
    try:
        with open(path, "rb") as f:
            data = json.loads(f.read(1 << 20))
        return {str(k): (int(v[0]), int(v[1])) for k, v in data.items()}
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, TypeError, IndexError, AttributeError) as e:
        log.warn("{path}: unreadable ({why}); the next scans set the baseline again",
                 path=path, why=str(e))
        return {}


def save(state_dir: str, accepted: dict[str, Optional[tuple[int, int]]]) -> None:
    """Write C{accepted} (sources with None left out) to C{state_dir}, atomically."""
    data = {k: list(v) for k, v in sorted(accepted.items()) if v is not None}
    path = os.path.join(state_dir, FILENAME)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
