"""
Figures of the reliability scenarios, for docs/RELIABILITY.md.

When C{CBACKUP_FIGURES_DIR} is set, each scenario merges its figures into
C{<dir>/<suite>.json}; otherwise nothing is written (a test run never
changes the checkout).  C{make reliability-figures} sets it to
C{docs/reliability}.
"""

import json
import os
import time


def record(suite: str, scenario: str, figures: dict) -> None:
    folder = os.environ.get("CBACKUP_FIGURES_DIR")
    if not folder:
        return
    path = os.path.join(folder, f"{suite}.json")
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError):
        data = {}
    data[scenario] = dict(figures, recorded=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    os.makedirs(folder, exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)
