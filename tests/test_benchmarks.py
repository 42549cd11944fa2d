"""Smoke runs of the benchmarks, so they do not rot (figures are not checked)."""

import os
import subprocess
import sys

from twisted.trial.unittest import SynchronousTestCase

from tests import slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class BenchmarkSmokeTests(SynchronousTestCase):
    def run_bench(self, script, *args):
        result = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", script), *args],
                                capture_output=True, text=True, timeout=300)
        self.assertEqual(result.returncode, 0, result.stderr)
        return result.stdout

    def test_ledger(self):
        out = self.run_bench("bench_ledger.py", "--files", "2000", "--runs", "2")
        self.assertIn("| memory per file (tracemalloc) |", out)
        self.assertIn("| ListNeeds page, limit 1,000 (", out)

    def test_scan(self):
        out = self.run_bench("bench_scan.py", "--files", "2000", "--runs", "1")
        self.assertIn("| walk rate / find rate |", out)
        self.assertIn("rescan (unchanged): longest gap between", out)

    def test_convergence(self):
        out = self.run_bench("bench_convergence.py", "--stores", "10", "--files", "2000")
        # The simulation's own checks: every file at copies (by the stores'
        # holdings and by the ledgers), no store ever over quota.
        self.assertIn("| outcome | converged at", out)
        self.assertIn("0 files below copies (ledgers: 0) | every file at copies (met) |", out)
        self.assertIn("| store over quota | never", out)


@slow
class EndToEndSmokeTests(SynchronousTestCase):
    """bench_e2e starts real twistd and rsync processes: slow."""

    def test_e2e(self):
        result = subprocess.run(
            [sys.executable, os.path.join(ROOT, "benchmarks", "bench_e2e.py"), "--small", "300",
             "--big", "2", "--big-size", "1m", "--runs", "1", "--timeout", "120"],
            capture_output=True, text=True, timeout=300)
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        # The benchmark's own check: two copies of every file on disk, on
        # distinct hosts, bytes compared with the source.
        self.assertIn("| outcome | every run: 2 copies of every file on disk on distinct hosts, "
                      "bytes compared with the source (", result.stdout)
        self.assertIn("| cluster / rsync pair, best / best |", result.stdout)
        # The breakdown read the processes' logs (microsecond timestamps, the
        # rsync start and end lines).
        for milestone in ("server listening", "first scan done", "first fetch started"):
            self.assertRegex(result.stdout, milestone + r" \| \d+\.\d\d s \|")
        self.assertRegex(result.stdout, r"fetch rsyncs \(all stores\) \| [1-9]\d* runs")
