"""
C{cbackup status}: the pure report (merging, rendering, exit codes) from
hand-made statuses; the network edge against a memory reactor; and the
command against a real cluster of processes.
"""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys

import attrs

from twisted.internet import error as net_error
from twisted.internet.defer import inlineCallbacks
from twisted.internet.testing import MemoryReactorClock
from twisted.internet.utils import getProcessOutputAndValue
from twisted.protocols import amp
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from cluster_backup import status
from cluster_backup.cli import main
from cluster_backup.config import loads
from cluster_backup.protocol import AuthFailed
from cluster_backup.records import SourceStatus, StoreStatus
from cluster_backup.status import Answer, build, exit_code, render_text, to_json

from tests import slow


SECRET = "do-not-print-this-secret"
CONFIG = f"""\
options: PORT: 5005
options: SECRET: {SECRET}
server: host1:/data
copies: 2
server: host2:/other
copies: 1
backup: host3:/b
size: 100gb
backup: host4:/b
size: 1t
"""
S1, S2 = "host1:/data", "host2:/other"
ST3, ST4 = "host3:/b", "host4:/b"
GiB = 1 << 30


def cluster():
    return loads(CONFIG, "cluster.conf")


def source_status(source=S1, copies=2, histogram=None, safemode=False, scanned=1000.0,
                  scan_error=None, held=None) -> SourceStatus:
    """A status whose totals and under-replication follow from C{histogram}."""
    if histogram is None:
        histogram = {copies: [100, 10 * GiB]}
    under = [v for c, v in histogram.items() if c < copies]
    return SourceStatus(
        source=source, copies=copies,
        files=sum(v[0] for v in histogram.values()),
        bytes=sum(v[1] for v in histogram.values()),
        histogram=histogram,
        under_files=sum(v[0] for v in under), under_bytes=sum(v[1] for v in under),
        safemode=safemode, scanned=scanned, scan_error=scan_error, held=held)


HELD = dict(deleted_files=206, deleted_bytes=37 << 20, changed_files=3, changed_bytes=300,
            since=990.0)


def store_status(store=ST3, state="live", files=100, size=GiB, age=2.0, quota=None,
                 used=None, claims=0) -> StoreStatus:
    return StoreStatus(store=store, host=store.split(":")[0], state=state, files=files,
                       bytes=size, last_report_age=age, quota=quota, used=used,
                       claims=claims)


def healthy_answers():
    return [
        Answer("host1", "host1", 5005, (source_status(),),
               ((S1, store_status(ST3)), (S1, store_status(ST4)))),
        Answer("host2", "host2", 5005, (source_status(S2, 1),),
               ((S2, store_status(ST3, files=5, size=10)),
                (S2, store_status(ST4, files=0, size=0, state="new", age=None)))),
    ]


class HistogramTests(SynchronousTestCase):
    def test_marks(self):
        self.assertEqual(status.marks(0, 2), "__")
        self.assertEqual(status.marks(1, 2), "#_")
        self.assertEqual(status.marks(2, 2), "##")
        self.assertEqual(status.marks(3, 2), "###")
        self.assertEqual(status.marks(14, 2), "#x14")
        self.assertEqual(status.marks(3, 20), "#x3 _x17")

    def test_rows_include_the_wanted_count(self):
        s = source_status(histogram={0: [3, 30], 3: [7, 70]})
        self.assertEqual(status.histogram_rows(s), [
            (0, 3, 30, "__", False),
            (2, 0, 0, "##", True),
            (3, 7, 70, "###", False),
        ])

    def test_age(self):
        self.assertEqual(status.age(None), "never")
        self.assertEqual(status.age(-3), "0s")
        self.assertEqual(status.age(59.9), "59s")
        self.assertEqual(status.age(600), "10m")
        self.assertEqual(status.age(3 * 3600 + 5 * 60), "3h05m")
        self.assertEqual(status.age(2 * 86400 + 4 * 3600), "2d04h")


class MergeStoresTests(SynchronousTestCase):
    def test_merge_over_sources(self):
        pairs = [
            (S1, store_status(ST3, "stale", 10, 100, 200.0, quota=5, used=4, claims=2)),
            (S2, store_status(ST3, "live", 1, 7, 3.0, quota=None, used=None, claims=1)),
        ]
        [view] = status.merge_stores(pairs)
        self.assertEqual(view, status.StoreView(
            ST3, "live", files=11, bytes=107, last_report_age=3.0, quota=5, used=4,
            claims=3))

    def test_freshest_state_wins(self):
        for states, want in [(("new", "dead"), "dead"), (("dead", "stale"), "stale"),
                             (("new", "live", "dead"), "live")]:
            pairs = [(S1, store_status(state=s, age=None if s == "new" else 9.0))
                     for s in states]
            self.assertEqual(status.merge_stores(pairs)[0].state, want)

    def test_unreported_configured_store(self):
        views = status.merge_stores([], known=[ST3], quotas={ST3: 5 * GiB})
        self.assertEqual(views, [status.StoreView(ST3, None, quota=5 * GiB)])

    def test_config_quota_when_servers_know_none(self):
        [view] = status.merge_stores([(S1, store_status(ST3))], [ST3], {ST3: 9})
        self.assertEqual(view.quota, 9)


class BuildTests(SynchronousTestCase):
    def test_healthy(self):
        report = build(cluster(), healthy_answers(), now=1060.0)
        self.assertEqual([v.problems for v in report.sources], [[], []])
        self.assertEqual(report.sources[0].scan_age, 60.0)
        self.assertEqual(exit_code(report), 0)
        self.assertEqual([st.state for st in report.stores], ["live", "live"])
        self.assertEqual(report.stores[0].files, 105)

    def test_own_host_rule_is_shown(self):
        """A store on a source's host is named as not backing it up."""
        own = loads(CONFIG + "backup: host1:/backup\nsize: 1t\n", "cluster.conf")
        report = build(own, healthy_answers(), now=1000.0)
        s1, s2 = report.sources
        self.assertEqual((s1.hosts, s1.own), (("host3", "host4"), ("host1:/backup",)))
        self.assertEqual((s2.hosts, s2.own), (("host3", "host4", "host1"), ()))
        text = render_text(report)
        self.assertIn("source host1:/data  wants 2 copies  OK\n  copies count on 2 backup "
                      "host(s), not on the source's own host: host1:/backup does not "
                      "back it up\n", text)
        self.assertEqual(text.count("own host"), 1)
        data = to_json(report)["sources"]
        self.assertEqual((data[0]["backup_hosts"], data[0]["own_host_stores"]),
                         (["host3", "host4"], ["host1:/backup"]))

    def test_files_too_big_are_named(self):
        big = {"files": 2, "bytes": 5 * GiB, "copies_room": GiB,
               "examples": [["vm/disk.img", 4 * GiB, 1], ["caf\udce9", GiB + 1, 1]]}
        answers = healthy_answers()
        answers[0] = Answer("host1", "host1", 5005, (attrs.evolve(source_status(),
                                                                  too_big=big),),
                            answers[0].stores)
        report = build(cluster(), answers, now=1000.0)
        self.assertEqual(report.sources[0].problems, ["2 files too big for 2 copies"])
        self.assertEqual(exit_code(report), 1)
        text = render_text(report)
        self.assertIn("  2 files (5G) can never have 2 copies: larger than 1G, they fit in "
                      "the quota of fewer than 2 backup hosts\n"
                      "    'vm/disk.img' (4G) fits on 1 host(s)\n", text)
        self.assertEqual(to_json(report)["sources"][0]["too_big"], big)

    def test_unreachable_server_hides_nothing_else(self):
        answers = healthy_answers()
        answers[1] = Answer("host2", "10.0.0.2", 5005, error="connection refused")
        report = build(cluster(), answers, now=1000.0)
        s1, s2 = report.sources
        self.assertEqual((s1.reachable, s1.problems), (True, []))
        self.assertEqual((s2.reachable, s2.error, s2.status), (False, "connection refused",
                                                               None))
        self.assertEqual(exit_code(report), 1)
        self.assertEqual(report.stores[0].files, 100)  # host1's view only

    def test_every_problem_fails(self):
        cases = {
            "safemode": source_status(safemode=True),
            "no complete scan yet": source_status(scanned=None),
            "5 files below 2 copies": source_status(histogram={1: [5, 5], 2: [9, 9]}),
            # The root went missing after a complete scan: figures stand, but
            # the source is not being watched (issue 15, finding 5).
            "scan error": source_status(scan_error="/data: No such file or directory"),
            "held: 206 deleted, 3 changed": source_status(held=HELD),
        }
        for problem, s in cases.items():
            answers = healthy_answers()
            answers[0] = Answer("host1", "host1", 5005, (s,), ())
            report = build(cluster(), answers, now=1000.0)
            self.assertEqual(report.sources[0].problems, [problem])
            self.assertEqual(exit_code(report), 1, problem)

    def test_source_the_server_does_not_report(self):
        answers = healthy_answers()
        answers[1] = Answer("host2", "host2", 5005, (), ())
        report = build(cluster(), answers, now=1000.0)
        self.assertEqual(report.sources[1].problems, ["not reported"])
        self.assertTrue(report.sources[1].reachable)
        self.assertEqual(exit_code(report), 1)

    def test_source_unknown_to_the_config_is_shown(self):
        answers = healthy_answers()
        extra = source_status("host1:/elsewhere", 1)
        answers[0] = Answer("host1", "host1", 5005, (source_status(), extra), ())
        report = build(cluster(), answers, now=1000.0)
        self.assertEqual([v.source for v in report.sources], [S1, S2, "host1:/elsewhere"])

    def test_held_scan_is_shown_with_the_command_that_accepts_it(self):
        answers = healthy_answers()
        answers[0] = Answer("host1", "host1", 5005, (source_status(held=HELD),), ())
        report = build(cluster(), answers, now=1000.0)
        text = render_text(report)
        self.assertIn("ATTENTION: held: 206 deleted, 3 changed\n", text)
        self.assertIn("HELD scan: 206 deleted (37M), 3 changed (300B)", text)
        self.assertIn(f"cbackup accept -c CONFIG --source {S1}\n", text)
        self.assertEqual(to_json(report)["sources"][0]["held"], HELD)
        self.assertFalse(to_json(report)["sources"][0]["ok"])

    def test_stale_or_dead_store_exits_3(self):
        """
        A store silent for 3 report intervals (stale), or past DEAD AFTER
        (dead), is the early warning monitoring wants: exit 3 while every
        source is fine; a source that needs attention still makes it 1.
        """
        for state in ("stale", "dead"):
            answers = healthy_answers()
            answers[0] = Answer("host1", "host1", 5005, (source_status(),),
                                ((S1, store_status(ST3, state=state, age=200.0)),
                                 (S1, store_status(ST4))))
            answers[1] = Answer("host2", "host2", 5005, (source_status(S2, 1),),
                                ((S2, store_status(ST3, state=state, age=190.0)),))
            report = build(cluster(), answers, now=1000.0)
            self.assertEqual([v.problems for v in report.sources], [[], []])
            self.assertEqual(exit_code(report), 3, state)
            self.assertEqual(status.EXIT_STALE, 3)
            self.assertFalse(to_json(report)["ok"])
            text = render_text(report)
            self.assertTrue(text.endswith(
                f"\nall sources ok; 1 store not reporting: {ST3} {state} "
                "(last report 3m ago)\n"), text)
            answers[0] = Answer("host1", "host1", 5005, (source_status(safemode=True),),
                                answers[0].stores)
            self.assertEqual(exit_code(build(cluster(), answers, now=1000.0)), 1)

    def test_status_help_names_every_exit_code(self):
        result = subprocess.run([sys.executable, "-m", "cluster_backup.cli", "status",
                                 "--help"], capture_output=True, text=True, timeout=60)
        self.assertEqual(result.returncode, 0, result.stderr)
        text = " ".join(result.stdout.split())
        self.assertIn("Exit 0 when every source is reachable", text)
        self.assertIn("3 when the sources are fine but a store is stale or dead", text)
        self.assertIn("2 on a bad config", text)

    def test_scan_age_never_negative(self):
        report = build(cluster(), healthy_answers(), now=900.0)  # server clock ahead
        self.assertEqual(report.sources[0].scan_age, 0.0)


class JsonTests(SynchronousTestCase):
    def test_shape(self):
        answers = healthy_answers()
        answers[0] = Answer("host1", "host1", 5005,
                            (source_status(histogram={0: [1, 10], 2: [4, 40]}),),
                            ((S1, store_status(ST3, quota=7, used=3, claims=2)),))
        answers[1] = Answer("host2", "host2", 5005, error="no answer within 10s")
        data = json.loads(json.dumps(to_json(build(cluster(), answers, now=1010.04))))
        s1, s2 = data["sources"]
        self.assertEqual(s1["source"], S1)
        self.assertEqual(s1["histogram"], {"0": 1, "2": 4})
        self.assertEqual((s1["files"], s1["bytes"], s1["copies"]), (5, 50, 2))
        self.assertEqual(s1["under_replicated"], {"files": 1, "bytes": 10})
        self.assertEqual((s1["safemode"], s1["scanned"], s1["scan_age"], s1["scan_error"],
                          s1["reachable"], s1["error"]),
                         (False, True, 10.0, None, True, None))
        self.assertEqual(s2["reachable"], False)
        self.assertEqual(s2["error"], "no answer within 10s")
        for key in ("files", "bytes", "histogram", "under_replicated", "safemode",
                    "scanned", "scan_age"):
            self.assertIsNone(s2[key], key)
        self.assertEqual(data["stores"][0], {
            "store": ST3, "quota": 7, "used": 3, "files": 100, "bytes": GiB,
            "state": "live", "last_report_age": 2.0, "claims": 2})
        self.assertEqual(data["stores"][1]["state"], None)  # nobody reachable reports it
        self.assertEqual(data["stores"][1]["quota"], 1 << 40)  # from the config
        self.assertFalse(data["ok"])

    def test_never_the_secret(self):
        report = build(cluster(), healthy_answers(), now=1000.0)
        self.assertNotIn("answered", render_text(report).split("\n", 1)[1])
        self.assertNotIn(SECRET, json.dumps(to_json(report)))
        self.assertNotIn(SECRET, render_text(report))


class TextTests(SynchronousTestCase):
    def test_histogram_table(self):
        answers = healthy_answers()
        answers[0] = Answer("host1", "host1", 5005, (source_status(histogram={
            0: [12, int(1.2 * GiB)], 1: [300, 200 << 20], 2: [892, int(1.8 * GiB)]},
            scan_error="permission denied: /data/x"),), ())
        text = render_text(build(cluster(), answers, now=1300.0))
        self.assertRegex(text, r"source host1:/data  wants 2 copies  ATTENTION: "
                               r"scan error; 312 files below 2 copies\n")
        self.assertRegex(text, r"\n +0 +12 +1\.2G  __\n")
        self.assertRegex(text, r"\n +1 +300 +200M  #_\n")
        self.assertRegex(text, r"\n +2 +892 +1\.8G  ##   <- wanted\n")
        self.assertIn("below 2 copies: 312 files, 1.4G", text)
        self.assertIn("1,204 files, 3.2G; last complete scan ended 5m ago", text)
        self.assertIn("scan error: permission denied: /data/x", text)
        self.assertIn("source host2:/other  wants 1 copy  OK", text)
        self.assertIn("every file has at least 1 copy", text)

    def test_unreachable_and_safemode(self):
        answers = healthy_answers()
        answers[0] = Answer("host1", "host1", 5005, (source_status(safemode=True),), ())
        answers[1] = Answer("host2", "10.1.1.2", 5005, error="connection refused")
        text = render_text(build(cluster(), answers, now=1000.0))
        self.assertIn("1 of 2 servers answered", text)
        self.assertIn("server host2 (10.1.1.2:5005) UNREACHABLE: connection refused", text)
        self.assertIn("source host2:/other  wants 1 copy  ATTENTION: unreachable", text)
        self.assertIn("safemode: the server waits for its stores to report", text)
        self.assertIn("ATTENTION: safemode", text)
        self.assertIn("2 of 2 sources need attention", text)
        self.assertIn("store files and bytes count only the sources of servers that "
                      "answered", text)

    def test_store_table(self):
        answers = healthy_answers()
        answers[0] = Answer("host1", "host1", 5005, (source_status(),), (
            (S1, store_status(ST3, files=1204, size=3 * GiB, age=4.0, quota=100 * GiB,
                              used=3 * GiB, claims=40)),))
        text = render_text(build(cluster(), answers, now=1000.0))
        self.assertRegex(text, r"store +state +reported +used +quota +files +bytes +claims")
        # host2's report of host3 (2s ago) is fresher than host1's (4s ago)
        self.assertRegex(text, r"host3:/b +live +2s ago +3G +100G +1,209 +3G +40\n")
        self.assertIn("claims: files being fetched now", text)

    def test_no_reachable_server_reports_a_store(self):
        answers = [Answer("host1", "host1", 5005, error="x"),
                   Answer("host2", "host2", 5005, error="y")]
        text = render_text(build(cluster(), answers, now=1000.0))
        self.assertRegex(text, r"host3:/b +\? +- +- +100G")
        self.assertIn("?: no reachable server reports this store", text)

    def test_watch_frames(self):
        report = build(cluster(), healthy_answers(), now=1000.0)
        self.assertTrue(status.frame(report, False, True, True).startswith(
            status.CLEAR_SCREEN))
        self.assertFalse(status.frame(report, False, True, False).startswith("\x1b"))
        one_line = status.frame(report, True, True, True)
        self.assertEqual(one_line.count("\n"), 1)
        self.assertEqual(json.loads(one_line)["ok"], True)


class DescribeErrorTests(SynchronousTestCase):
    def test_reasons(self):
        cases = [
            (net_error.ConnectionRefusedError(), "connection refused"),
            (net_error.TimeoutError(), "no answer within 3s"),
            (AuthFailed("wrong MAC"), "authentication failed: wrong MAC"),
            (net_error.DNSLookupError("nowhere"), "cannot resolve"),
            (net_error.ConnectionDone(), "closed the connection"),
            (amp.TooLong(True, False, b"k", None), "does not speak this version of the "
             "cluster-backup protocol (TooLong: is PORT right?)"),
        ]
        for exc, want in cases:
            self.assertIn(want, status.describe_error(Failure(exc), 3))


class AskServerTests(SynchronousTestCase):
    """The network edge against a memory reactor: timeouts and refusals."""

    def ask(self):
        reactor = MemoryReactorClock()
        d = status.ask_server(reactor, "host1", "10.0.0.1", 5005, "me", b"s", 4.0)
        return reactor, d

    def test_timeout(self):
        reactor, d = self.ask()
        self.assertNoResult(d)
        self.assertEqual(reactor.tcpClients[0][:2], ("10.0.0.1", 5005))
        reactor.advance(4.0)
        answer = self.successResultOf(d)
        self.assertEqual(answer, Answer("host1", "10.0.0.1", 5005,
                                        error="no answer within 4s"))

    def test_refused(self):
        reactor, d = self.ask()
        factory = reactor.tcpClients[0][2]
        factory.clientConnectionFailed(reactor.connectors[0],
                                       Failure(net_error.ConnectionRefusedError()))
        self.assertIn("connection refused", self.successResultOf(d).error)

    def test_ipv6_address(self):
        reactor = MemoryReactorClock()
        status.ask_server(reactor, "h", "[::1]", 5005, "me", None, 1.0)
        self.assertEqual(reactor.tcpClients[0][:2], ("::1", 5005))


class CommandTests(SynchronousTestCase):
    def run_status(self, text, *extra):
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(text)
        out, err = io.StringIO(), io.StringIO()
        code = main(["status", "-c", path, *extra], out, err)
        return code, out.getvalue(), err.getvalue(), path

    def test_bad_config(self):
        code, out, err, path = self.run_status(CONFIG.replace("copies: 2", "copies: many"))
        self.assertEqual(code, 2)
        self.assertEqual(out, "")
        self.assertRegex(err, rf"^{re.escape(path)}:4: copies: ")

    def test_unknown_host(self):
        code, out, err, path = self.run_status(CONFIG, "--host", "nowhere")
        self.assertEqual(code, 2)
        self.assertIn("--host nowhere is not a host of this config", err)

    def test_unreadable_secret_file(self):
        code, out, err, path = self.run_status(
            "options: SECRET FILE: /nonexistent/secret\nserver: h:/d\nbackup: g:/b\n"
            "size: 1g\n")
        self.assertEqual(code, 2)
        self.assertIn("SECRET FILE /nonexistent/secret: cannot read", err)


# --- real processes ---------------------------------------------------------




def cbackup_status(config, *extra):
    """Run C{cbackup status} as a child process; fires (out, err, code)."""
    return getProcessOutputAndValue(
        sys.executable, ["-m", "cluster_backup.cli", "status", "-c", config, *extra],
        env=dict(os.environ), path=os.getcwd())


class BadConfigProcessTests(TestCase):
    @inlineCallbacks
    def test_bad_config(self):
        path = os.path.abspath(self.mktemp())
        with open(path, "w") as f:
            f.write("server: h:/data\ncopies: 0\n")
        out, err, code = yield cbackup_status(path, "--json")
        self.assertEqual(code, 2)
        self.assertEqual(out, b"")
        self.assertIn(f"{path}:2: copies: must be at least 1".encode(), err)


@slow
class ClusterStatusTests(TestCase):
    """C{cbackup status} against a small real cluster on 127.0.0.21-25."""

    timeout = 180

    @inlineCallbacks
    def test_converged_then_wrong_secret_then_server_stopped(self):
        from tests.cluster_harness import LocalCluster, source_files
        from tests.harness import wait_for

        sources = [
            {"host": "src21", "address": "127.0.0.21", "copies": 2, "files": 150,
             "seed": 21},
            {"host": "src22", "address": "127.0.0.22", "copies": 1, "files": 80,
             "seed": 22},
        ]
        stores = [{"host": f"st{n}", "address": f"127.0.0.{n}", "name": f"st{n}",
                   "size": "200m", "size_bytes": 200 << 20} for n in (23, 24, 25)]
        cluster = LocalCluster(os.path.abspath(self.mktemp()), sources, stores)
        self.addCleanup(cluster.stop)
        yield cluster.start()
        ids = [f"{s['host']}:{s['path']}" for s in sources]
        on_disk = {i: len(source_files(os.fsencode(s["path"])))
                   for i, s in zip(ids, sources)}

        # 1. Converged: exit 0, every source at its copies, every store live.
        last = {}

        @inlineCallbacks
        def all_ok():
            out, err, code = yield cbackup_status(cluster.config, "--json")
            last.update(out=out, err=err, code=code)
            return code == 0 and all(st["state"] == "live"
                                     for st in json.loads(out)["stores"])

        try:
            yield wait_for(all_ok, timeout=120, interval=1.0, what="status exit 0")
        except AssertionError:
            raise AssertionError(f"{last}\n{cluster.logs()}")
        self.assertEqual(cluster.under_replicated(), [])
        data = json.loads(last["out"])
        self.assertEqual([s["source"] for s in data["sources"]], ids)
        for s, src in zip(data["sources"], sources):
            self.assertEqual(s["files"], on_disk[s["source"]])
            self.assertEqual(sum(s["histogram"].values()), s["files"])
            self.assertTrue(all(int(c) >= src["copies"] for c in s["histogram"]), s)
            self.assertEqual(s["under_replicated"], {"files": 0, "bytes": 0})
            self.assertEqual((s["reachable"], s["safemode"], s["scanned"], s["error"]),
                             (True, False, True, None))
            self.assertLess(s["scan_age"], 60)
        self.assertEqual(sorted(st["store"] for st in data["stores"]),
                         sorted(f"{st['host']}:{st['path']}" for st in stores))
        for st in data["stores"]:
            self.assertEqual(st["quota"], 200 << 20)
            self.assertLess(st["last_report_age"], 10)
        held = sum(st["files"] for st in data["stores"])
        self.assertGreaterEqual(held, sum(s["copies"] * on_disk[i]
                                          for s, i in zip(sources, ids)))

        out, err, code = yield cbackup_status(cluster.config)
        text = out.decode()
        self.assertEqual(code, 0, text + err.decode())
        self.assertIn("2 of 2 servers answered", text)
        self.assertIn(f"source {ids[0]}  wants 2 copies  OK", text)
        self.assertRegex(text, r"\n +2 +[\d,]+ +\S+  ##   <- wanted\n")
        self.assertIn("all sources ok", text)
        self.assertNotIn("cluster-test-secret", text)

        # 2. A wrong secret: every server refuses, nothing is shown as fine.
        wrong = os.path.join(cluster.base, "wrong-secret.conf")
        with open(cluster.config) as f, open(wrong, "w") as g:
            g.write(f.read().replace("cluster-test-secret", "not-the-secret"))
        out, err, code = yield cbackup_status(wrong, "--json", "--timeout", "5")
        self.assertEqual(code, 1, err)
        for s in json.loads(out)["sources"]:
            self.assertFalse(s["reachable"])
            self.assertIn("authentication failed", s["error"])
        self.assertNotIn(b"not-the-secret", out + err)

        # 3. One server stopped: exit 1, its source unreachable, the other whole.
        cluster.process("cbackup-server", "src22").stop()
        out, err, code = yield cbackup_status(cluster.config, "--json", "--timeout", "5")
        self.assertEqual(code, 1, err)
        s21, s22 = json.loads(out)["sources"]
        self.assertEqual((s22["reachable"], s22["files"]), (False, None))
        self.assertIn("connection refused", s22["error"])
        self.assertEqual((s21["reachable"], s21["files"], s21["under_replicated"]),
                         (True, on_disk[ids[0]], {"files": 0, "bytes": 0}))
        out, err, code = yield cbackup_status(cluster.config, "--timeout", "5")
        self.assertEqual(code, 1)
        self.assertIn(b"UNREACHABLE: connection refused", out)
        self.assertIn(b"1 of 2 sources need attention", out)
