"""
Write docs/RELIABILITY.md from the figures the reliability tests recorded.

    CBACKUP_FIGURES_DIR=docs/reliability .venv/bin/python -m pytest \\
        tests/test_faults_client.py tests/test_faults_server.py \\
        tests/test_faults_source.py tests/test_abuse_*.py
    .venv/bin/python docs/reliability/render.py

(`make reliability` does both.)  The figures are never typed by hand.
"""

import json
import os

HERE = os.path.dirname(os.path.abspath(__file__))

#: (suite, scenario key, title, test, what it checks)
SCENARIOS = [
    ("client", "kill9", "kill -9 of a client during transfers, 10 times",
     "tests/test_faults_client.py::test_kill_client_during_transfers",
     "after each kill and restart, every file in the store is a complete source version "
     "(no truncated or temp file outside .cbackup); converges after the last restart"),
    ("client", "enospc", "a store's filesystem fills before its quota (tmpfs)",
     "tests/test_faults_client.py::test_filesystem_fills_before_quota",
     "ENOSPC noticed, partials cleaned, effective quota lowered; what it held is "
     "byte-identical; the other stores bring every file to its copies"),
    ("client", "changes", "a source file rewritten and one deleted during transfer",
     "tests/test_faults_client.py::test_source_changes_during_transfer",
     "every copy ends with the new bytes or as a whole old-version orphan; no mix counted"),
    ("server", "server_killed", "kill -9 of a server mid-run, then restart",
     "tests/test_faults_server.py::test_server_killed_mid_run_and_restarted",
     "safemode on restart, stores re-report, no copy on disk at the kill removed or "
     "written again (inode and ctime), no copy fetched twice; converges"),
    ("server", "store_host_dead", "a store host that never comes back",
     "tests/test_faults_server.py::test_store_host_never_comes_back",
     "after DEAD AFTER its files are copied to the live hosts until every file is at "
     "its copies there"),
    ("server", "server_stopped", "a server stopped (SIGSTOP 10 s) then continued",
     "tests/test_faults_server.py::test_server_stopped_for_a_while",
     "no store declared dead, nothing dropped or rewritten, reports per store per second "
     "stay bounded after the resume (no lease storm)"),
    ("server", "server_hung", "one of two servers stopped (SIGSTOP) for 2 x DEAD AFTER",
     "tests/test_faults_server.py::test_one_hung_server_does_not_stall_the_others",
     "the stores' leases with the other server stay live (report age under 3 intervals), "
     "its new files reach their copies during the stop, no store is declared dead, "
     "nothing is dropped or written again"),
    ("source", "unmounted", "a source disk unmounted (empty mount point), under space pressure",
     "tests/test_faults_source.py::test_unmounted_source_is_held",
     "the scan is held (server log HELD, status exits 1 with 'held: N deleted'); while "
     "another source grows into the spare room, every original file of the unmounted "
     "source keeps its copies, byte-identical (sampled every second); remounted, the "
     "hold clears and both sources are at their copies"),
    ("source", "missing_root", "a source root renamed away, then back",
     "tests/test_faults_source.py::test_missing_root_fails_status",
     "every rescan fails, status exits 1 with 'scan error', no copy on disk is removed or "
     "written again; back under its name, status exits 0"),
    ("source", "ransomware", "30% of a source rewritten in place (ransomware), then accepted",
     "tests/test_faults_source.py::test_ransomware_is_held_then_accepted",
     "the scan is held (status 'held: 0 deleted, N changed'), every store copy keeps the "
     "original bytes; cbackup accept applies it and the stores fetch the new bytes, the "
     "replaced versions kept with their old bytes (at least one copy each); a second "
     "accept exits 1 'no scan is held'"),
    ("source", "mass_deletion", "50,000 files deleted at a source, accepted, then removed",
     "tests/test_faults_source.py::test_mass_deletion_keeps_the_client_responsive",
     "the deletion is held until cbackup accept; the orphans expire (keep deleted 5 s) and "
     "each store removes 50,000 files while reporting every interval (never stale); SIGTERM "
     "of a client mid-removal ends it in under 5 s; restarted, it finishes the removals"),
    ("source", "big_file_rewritten", "a 50 MB file rewritten on stores with under 50 MB free",
     "tests/test_faults_source.py::test_big_file_rewritten_on_nearly_full_stores",
     "the old copies leave the layout as kept versions; the server lets all but the last go, "
     "and those stores rewrite their old copy in place (rsync --inplace, delta); the new "
     "version reaches its copies, the old one keeps a copy with its old bytes, no quota "
     "passed"),
    ("abuse", None, "bad input and hostile peers",
     "tests/test_abuse_config.py, test_abuse_protocol.py, test_abuse_paths.py, "
     "test_abuse_security.py",
     "config fuzzing (FILE:LINE errors, never a traceback); AMP fuzzing of a live server "
     "(typed errors, other connections served, ledger unchanged); hostile paths and a "
     "hostile server (nothing written outside the store); the secret never on the wire "
     "or in logs; wrong rsync passwords refused"),
]


def load(suite):
    try:
        with open(os.path.join(HERE, f"{suite}.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def table(figures: dict) -> list[str]:
    lines = ["| figure | value |", "|---|---|"]
    for key in sorted(figures):
        value = figures[key]
        if isinstance(value, (dict, list)):
            value = json.dumps(value, sort_keys=True)
            if len(value) > 200:
                value = value[:200] + "..."
        lines.append(f"| {key.replace('_', ' ')} | {value} |")
    return lines


def main() -> None:
    out = [
        "# Reliability: faults, bad input and hostile peers",
        "",
        "Every scenario runs real `twistd` servers and clients, real rsync and real",
        "files on loopback addresses, and ends by checking the ground truth on disk:",
        "every file of every source at its `copies` on distinct hosts with the",
        "source's bytes, no host holding a file twice, nothing outside the store",
        "layout, and no store over its quota at any `du -sb` sample (twice a second",
        "for the whole scenario; one over it is measured again counting each inode",
        "once, since `du` counts a file moved while it walks twice). The figures",
        "below were written by the tests themselves in their last run",
        "(`make reliability`); details and the bugs each scenario found are in",
        "`reliability/client.md`, `reliability/server.md`, `reliability/source.md`",
        "and `reliability/abuse.md`.",
        "",
        "| scenario | test | what it checks | last run |",
        "|---|---|---|---|",
    ]
    details = []
    for suite, key, title, test, checks in SCENARIOS:
        data = load(suite)
        found = {k: v for k, v in data.items() if key is None or k == key}
        if not found:
            out.append(f"| {title} | `{test}` | {checks} | no figures recorded |")
            continue
        recorded = max(str(v.get("recorded", "")) for v in found.values())
        violations = sum(int(v.get("violations", v.get("quota_violations", 0)) or 0)
                         for v in found.values())
        out.append(f"| {title} | `{test}` | {checks} | {recorded}, violations: {violations} |")
        for name, figures in sorted(found.items()):
            details += ["", f"## {title}" + ("" if key else f": {name.replace('_', ' ')}"), ""]
            details += table(figures)
    with open(os.path.join(os.path.dirname(HERE), "RELIABILITY.md"), "w") as f:
        f.write("\n".join(out + details) + "\n")


if __name__ == "__main__":
    main()
