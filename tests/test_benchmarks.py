"""Smoke runs of the benchmarks, so they do not rot (figures are not checked)."""

import os
import subprocess
import sys

from hypothesis import given, reject, settings, strategies as st
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


def load_bench(name: str):
    """A benchmark script as a module (benchmarks/ is no package)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "benchmarks",
                                                                     name + ".py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # attrs classes need their module registered
    spec.loader.exec_module(module)
    return module


class TightConvergenceTests(SynchronousTestCase):
    """
    Issue 16's tight cases, smaller, under hypothesis: total quota 1.05 to
    1.2 times what the copies need, file sizes log-uniform up to half the
    smallest store, store sizes up to 10 times apart.  The real ledger and
    planner (bench_convergence's simulation) must reach every file's copies
    within twice the time the same data takes with ample space (plus three
    report intervals, see below), fetching at most 5% of the minimum bytes
    and at most one copy of any file that it later drops, and with no
    store over its quota (the simulation raises at once).
    """

    def setUp(self):
        import gc
        self.bench = load_bench("bench_convergence")
        threshold = gc.get_threshold()
        self.addCleanup(gc.set_threshold, *threshold)
        self.addCleanup(gc.unfreeze)

    def run_case(self, stores: int, spare: float, seed: int, copies: int):
        # Transfers are instant: the largest file follows the quotas (half
        # the smallest store), which vary by orders of magnitude with the
        # draws, so no one bandwidth fits every case.
        # Every store arrives at once (with arrivals spread, ample space
        # converges before the last store arrives and tight space cannot).
        # Every store on a host of its own: two stores of one host hold
        # one copy between them, so their quotas would not all be usable.
        args = self.bench.build_parser().parse_args([
            "--stores", str(stores), "--files", str(30 * stores), "--copies", str(copies),
            "--spare", str(spare), "--tail", "0.5", "--seed", str(seed), "--spread", "0",
            "--bandwidth", "0",
            "--shared-hosts", "0"])
        try:
            return self.bench.simulate(args)
        except SystemExit:  # --tail: these draws have no such largest file
            reject()

    @given(stores=st.integers(8, 14), spare=st.sampled_from([1.05, 1.1, 1.2]),
           seed=st.integers(1, 10_000), copies=st.integers(1, 3))
    @settings(max_examples=10, deadline=None)
    def test_tight_space_converges(self, stores, spare, seed, copies):
        ample, outcome = self.run_case(stores, 3.0, seed, copies)
        self.assertEqual(outcome, "converged")
        sim, outcome = self.run_case(stores, spare, seed, copies)
        case = (f"{stores} stores, spare {spare}, seed {seed}, copies {copies}: "
                f"{sim.clock.seconds():.0f} s against {ample.clock.seconds():.0f} s ample")
        self.assertEqual(outcome, "converged", case)
        checked = sim.verify()
        self.assertEqual((checked["short"], checked["ledger_short"]), (0, 0), case)
        # A store with nothing to do looks again after a report interval,
        # and making room takes a few rounds (fill, then a drop and the
        # fetch): with instant transfers, the tight case may take
        # up to 3 intervals more than twice its ample time
        # (bench_convergence's larger tight cases meet 2x flat).
        self.assertLessEqual(sim.clock.seconds(),
                             2 * ample.clock.seconds() + 3 * self.bench.REPORT_INTERVAL, case)
        # Waste, not fill: greedy fill rightly puts surplus copies in the
        # spare room (a small file may get a 4th copy of 2), so what is
        # bounded is what was fetched and is not held at the end (dropped
        # to make room): at most 5% of the minimum, and at most one wasted
        # fetch per file.
        held = sum(store.used for store in sim.stores)
        self.assertLessEqual(sim.stats.bytes - held, 0.05 * sim.minimum, case)
        for src in sim.sources:
            wasted = max(f - have for f, have in zip(src.fetches, src.have))
            self.assertLessEqual(wasted, 1, case)
        self.assertLessEqual(sim.stats.max_used_fraction, 1.0, case)
