"""Smoke runs of the benchmarks, so they do not rot (figures are not checked)."""

import os
import subprocess
import sys

from twisted.trial.unittest import SynchronousTestCase

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
        self.assertIn("ListNeeds page of 1,000 (AMP)", out)
