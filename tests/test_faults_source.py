"""
Source-side faults on whole clusters of real processes (DESIGN.md rule 8):
a source disk that is unmounted (an empty mount point with a marker file),
a source root that vanishes, and ransomware rewriting a third of a source
in place.  The backups must keep the previous state while the change is
held, say so in C{cbackup status} (exit 1), and apply it only when the
source comes back or an operator runs C{cbackup accept}.

Each scenario ends with the ground truth read from the stores' folders
(every file at its copies, bytes compared with the source; no double
copies; nothing stray; no quota sample over its quota) plus its own
measurements.  The commands are the real C{cbackup} run as a subprocess,
without blocking the reactor.

Set C{CBACKUP_FIGURES_DIR} to have each scenario record its figures
(see L{tests.figures}, suite C{source}).
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import sys
import time

from twisted.internet import reactor, task
from twisted.internet.defer import inlineCallbacks
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import TestCase

from cluster_backup.config import load, read_secret
from cluster_backup.demo import make_tree
from cluster_backup.status import ask_server
from tests import slow
from tests.cluster_harness import (LocalCluster, check_ground_truth, du, kept_holders,
                                   same_content, sleep, source_files, tree_bytes)
from tests.figures import record as figures_record
from tests.harness import Twistd, wait_for
from tests.test_faults_server import (
    copies_on_disk,
    kill_orphan_daemons,
    log_from,
    log_size,
    store,
)

MiB = 1 << 20
KiB = 1 << 10
CBACKUP = os.path.join(os.path.dirname(sys.executable), "cbackup")
#: Room a store's du -sb needs besides file bytes: the layout's folders
#: (the test's deep base path and about 31 folders per source) and .cbackup.
FOLDERS = 2 * 60 * 4096


def cbackup(*args: str):
    """Run the real C{cbackup}; a Deferred firing with (exit code, stdout + stderr)."""
    d = getProcessOutputAndValue(CBACKUP, args, env=os.environ)
    return d.addCallback(lambda r: (r[2], (r[0] + r[1]).decode(errors="replace")))


def original_holders(cluster: LocalCluster, source: dict, rel: bytes, root: str) -> set[str]:
    """
    Hosts holding a copy of C{rel} of C{source} with the size, whole-second
    mtime and bytes of C{root}/C{rel}: like L{LocalCluster.holders} with
    C{check_bytes}, but against a tree kept aside (the source itself having
    been unmounted or rewritten).
    """
    want_path = os.path.join(os.fsencode(root), rel)
    want = os.lstat(want_path)
    hosts = set()
    for st in cluster.stores:
        path = cluster.copy_path(st, source, rel)
        try:
            got = os.lstat(path)
        except OSError:
            continue
        if ((got.st_size, got.st_mtime_ns // 10**9)
                == (want.st_size, want.st_mtime_ns // 10**9)
                and same_content(want_path, path)):
            hosts.add(st["host"])
    return hosts


def add_bytes(root: str, total: int, seed: int) -> list[bytes]:
    """New files of 16 to 48 KiB under C{root}/added, about C{total} bytes; their paths."""
    rnd = random.Random(seed)
    folder = os.path.join(root, "added")
    os.makedirs(folder, exist_ok=True)
    paths, written = [], 0
    while written < total:
        name = f"new-{len(paths):04d}.dat"
        data = rnd.randbytes(rnd.randint(16 * KiB, 48 * KiB))
        with open(os.path.join(folder, name), "wb") as f:
            f.write(data)
        written += len(data)
        paths.append(os.fsencode(os.path.join("added", name)))
    return paths


def encrypt(path: bytes, mtime: int) -> None:
    """What ransomware does to a file: other bytes (XOR 0x5a), same size, a new mtime."""
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(bytes(b ^ 0x5A for b in data))
    os.utime(path, (mtime, mtime))


def record_figures(scenario: str, figures: dict) -> None:
    figures_record("source", scenario, figures)


@slow
class SourceFaultTests(TestCase):
    """Loopback addresses 127.0.0.100 to 127.0.0.119 only."""

    timeout = 180

    def make(self, sources, stores, **options) -> LocalCluster:
        base = os.path.abspath(self.mktemp())
        options.setdefault("DEAD AFTER", "30s")
        cluster = LocalCluster(base, sources, stores, options)
        self.addCleanup(kill_orphan_daemons, base)
        self.addCleanup(cluster.stop)
        return cluster

    def tree_size(self, source: dict) -> int:
        """The bytes of the tree L{LocalCluster} will generate for C{source}."""
        root = os.path.abspath(self.mktemp())
        os.makedirs(root)
        make_tree(os.fsencode(root), source.get("seed", 1), source["files"], source.get("big", 0))
        return tree_bytes(root)

    def check_ground_truth(self, cluster: LocalCluster, exclude_hosts=()) -> dict:
        return check_ground_truth(self, cluster, exclude_hosts)

    @inlineCallbacks
    def wait_status(self, cluster: LocalCluster, code: int, text: str = "",
                    timeout: float = 40):
        """
        Run C{cbackup status} until it exits C{code} with C{text} in its
        output; its output.  Fails with the last output and the logs.
        """
        last = [(None, "")]

        def check():
            def seen(result):
                last[0] = result
                return result[0] == code and text in result[1]
            return cbackup("status", "-c", cluster.config, "--timeout", "5").addCallback(seen)

        try:
            yield wait_for(check, timeout=timeout, interval=0.5,
                           what=f"cbackup status to exit {code} with {text!r}")
        except AssertionError as e:
            raise AssertionError(f"{e}; last status exited {last[0][0]}:\n{last[0][1]}\n"
                                 f"{cluster.logs()}") from None
        return last[0][1]

    @inlineCallbacks
    def right_after_a_scan(self, server, source: dict):
        """
        Wait for C{server} to log the end of a scan of C{source}: the next
        one starts a RESCAN later, so a change made now is seen whole by
        one scan rather than half by each of two.
        """
        mark = log_size(server.logfile)
        needle = f"scanned {source['host']}:{source['path']}:"
        yield wait_for(lambda: needle in log_from(server.logfile, mark), timeout=30,
                       interval=0.02, what=f"a scan of {source['host']}")

    def wait_full(self, cluster: LocalCluster, source: dict, timeout: float = 90):
        """Wait until every store holds every file of C{source} (all have room)."""
        files = list(source_files(os.fsencode(source["path"])))
        return wait_for(lambda: all(len(cluster.holders(source, rel)) == len(cluster.stores)
                                    for rel in files),
                        timeout=timeout, interval=1.0, what="every store holding every file")

    # --- 1 ---------------------------------------------------------------

    @inlineCallbacks
    def test_unmounted_source_is_held(self):
        """
        Unmount beta's disk (its mount point left empty but for a marker
        file) while stores are full: the scan is held, status says so, and
        when alpha grows into the stores' spare room, the stores drop
        surplus copies, never below beta's copies of its original files.
        Remounted, the hold clears and both sources are at their copies.
        """
        sources = [{"host": "alpha", "address": "127.0.0.100", "copies": 2, "files": 150,
                    "seed": 101},
                   {"host": "beta", "address": "127.0.0.101", "copies": 2, "files": 120,
                    "seed": 102}]
        need = sum(s["copies"] * self.tree_size(s) for s in sources)
        # Three hosts keep 1.3 x what the copies need: little spare room,
        # which greedy fill takes up with surplus copies.
        each = int(need * 1.3 / 3) + FOLDERS
        stores = [store(f"s1st{i}", f"127.0.0.{102 + i}", f"s1st{i}", each) for i in range(3)]
        cluster = self.make(sources, stores)
        alpha, beta = cluster.sources
        yield cluster.start()
        yield cluster.converge(90)
        spare = 3 * each - need - 3 * FOLDERS
        # Greedy fill: every store within 128 KiB of its quota.
        yield wait_for(lambda: all(cluster.max_used[st["name"]] >= st["size_bytes"] - 128 * KiB
                                   for st in stores),
                       timeout=60, interval=1.0, what="the stores full of surplus copies")
        beta_files = list(source_files(os.fsencode(beta["path"])))
        away = beta["path"] + ".away"
        server = cluster.process("cbackup-server", "beta")
        mark = log_size(server.logfile)

        yield self.right_after_a_scan(server, beta)
        os.rename(beta["path"], away)
        os.mkdir(beta["path"])
        with open(os.path.join(beta["path"], "NOT-MOUNTED"), "w") as f:
            f.write("x\n")
        unmounted = time.monotonic()
        yield wait_for(lambda: "HELD" in log_from(server.logfile, mark), timeout=30,
                       interval=0.2, what="the beta server logging a held scan")
        seconds_to_held = time.monotonic() - unmounted
        yield self.wait_status(cluster, 1, f"held: {len(beta_files):,} deleted")

        # Space pressure: alpha grows by 40% of the spare room; both copies
        # of that are 80% of it, which the stores have filled with surplus.
        before = copies_on_disk(cluster)
        minimum = []

        def sample():
            minimum.append(min(len(original_holders(cluster, beta, rel, away))
                               for rel in beta_files))

        sampler = task.LoopingCall(sample)
        sampler.start(1.0)
        self.addCleanup(lambda: sampler.running and sampler.stop())
        added = add_bytes(alpha["path"], int(spare * 0.4), seed=103)
        added_bytes = sum(os.lstat(os.path.join(os.fsencode(alpha["path"]), rel)).st_size
                          for rel in added)
        pressure = time.monotonic()
        alpha_files = list(source_files(os.fsencode(alpha["path"])))
        alpha_short = None
        try:
            yield wait_for(lambda: all(len(cluster.holders(alpha, rel)) >= 2
                                       for rel in alpha_files),
                           timeout=90, interval=1.0, what="alpha at its copies with the new files")
        except AssertionError as e:
            alpha_short = e  # reported after the check on beta, the point of the scenario
        alpha_converged = time.monotonic() - pressure
        yield sleep(5)  # a few more report intervals under pressure
        sampler.stop()
        after = copies_on_disk(cluster)
        dropped = [k for k in before if k not in after]
        beta_prefix = os.path.join(b"beta", os.fsencode(beta["path"]).lstrip(b"/"))
        self.assertGreater(len(minimum), 5, "the sampler stopped")
        self.assertGreaterEqual(min(minimum), 2,
                                f"an original beta file fell to {min(minimum)} copies "
                                f"(samples {minimum})\n{cluster.logs()}")
        self.assertGreater(len(dropped), 0, "the pressure dropped nothing: not pressure")
        if alpha_short is not None:
            short = [os.fsdecode(rel) for rel in alpha_files
                     if len(cluster.holders(alpha, rel)) < 2]
            used = {st["name"]: du(st["path"]) for st in stores}
            raise AssertionError(
                f"{alpha_short}: {len(short)} alpha files below 2 copies, e.g. {short[:3]}; "
                f"stores used {used} of {each} each; copies dropped under pressure: "
                f"{len(dropped)} ({sum(before[k][2] for k in dropped)} B) for "
                f"{len(added)} new files ({added_bytes} B)\n{cluster.logs()}")

        # Remount: the hold clears and everything is at its copies.
        shutil.rmtree(beta["path"])
        os.rename(away, beta["path"])
        remounted = time.monotonic()
        yield self.wait_status(cluster, 0, timeout=60)
        seconds_to_clear = time.monotonic() - remounted
        truth = self.check_ground_truth(cluster)
        record_figures("unmounted", dict(
            truth, faults_injected=1, beta_files=len(beta_files),
            store_quota_bytes=each, spare_bytes=spare, alpha_files_added=len(added),
            alpha_bytes_added=added_bytes, seconds_to_held=round(seconds_to_held, 1),
            pressure_samples=len(minimum), min_beta_copies_under_pressure=min(minimum),
            copies_dropped_under_pressure=len(dropped),
            beta_copies_dropped_under_pressure=sum(
                1 for _, path in dropped if path.startswith(beta_prefix + b"/")),
            seconds_alpha_to_copies=round(alpha_converged, 1),
            seconds_to_clear_after_remount=round(seconds_to_clear, 1)))

    # --- 2 ---------------------------------------------------------------

    @inlineCallbacks
    def test_missing_root_fails_status(self):
        """
        The source's root vanishes (renamed away): the rescan fails,
        status exits 1 with "scan error", and no copy on disk is removed.
        Back under its name, status is 0 again.
        """
        sources = [{"host": "gamma", "address": "127.0.0.105", "copies": 2, "files": 150,
                    "seed": 105}]
        stores = [store(f"s2st{i}", f"127.0.0.{106 + i}", f"s2st{i}", 64 * MiB)
                  for i in range(3)]
        cluster = self.make(sources, stores)
        source = cluster.sources[0]
        yield cluster.start()
        yield cluster.converge(90)
        yield self.wait_full(cluster, source)
        yield self.wait_status(cluster, 0)
        files = list(source_files(os.fsencode(source["path"])))
        server = cluster.process("cbackup-server", "gamma")
        before = copies_on_disk(cluster)
        gone = source["path"] + ".gone"
        mark = log_size(server.logfile)

        os.rename(source["path"], gone)
        renamed = time.monotonic()
        yield self.wait_status(cluster, 1, "scan error")
        seconds_to_error = time.monotonic() - renamed
        yield sleep(6)  # three more rescans, six report intervals
        text = log_from(server.logfile, mark)
        failed_scans = text.count(f"scan of gamma:{source['path']} failed")
        after = copies_on_disk(cluster)
        removed = [k for k in before if k not in after]
        rewritten = [k for k, v in before.items() if k in after and after[k][:2] != v[:2]]
        short = [rel for rel in files
                 if len(original_holders(cluster, source, rel, gone)) < len(cluster.stores)]
        self.assertGreaterEqual(failed_scans, 2, text)
        self.assertNotIn("HELD", text)
        self.assertEqual(removed, [], "copies were removed while the source was missing")
        self.assertEqual(rewritten, [], "copies were written again while the source was missing")
        self.assertEqual(short, [], "copies no longer identical to the source's files")

        os.rename(gone, source["path"])
        back = time.monotonic()
        yield self.wait_status(cluster, 0)
        seconds_to_ok = time.monotonic() - back
        truth = self.check_ground_truth(cluster)
        self.assertEqual([k for k in before if k not in copies_on_disk(cluster)], [])
        record_figures("missing_root", dict(
            truth, faults_injected=1, files=len(files), copies_on_disk=len(before),
            seconds_to_scan_error=round(seconds_to_error, 1),
            failed_scans=failed_scans,
            copies_removed=len(removed), copies_rewritten=len(rewritten),
            seconds_to_ok_after_return=round(seconds_to_ok, 1)))

    # --- 3 ---------------------------------------------------------------

    @inlineCallbacks
    def test_ransomware_is_held_then_accepted(self):
        """
        Rewrite 30% of a source's files in place with other bytes and a
        new mtime: the scan is held, every copy keeps the original bytes;
        C{cbackup accept} applies it, and the stores fetch the new bytes.
        """
        sources = [{"host": "delta", "address": "127.0.0.110", "copies": 2, "files": 100,
                    "seed": 110}]
        # Room for every file on every store, and for the old versions kept
        # as orphans once the new ones are accepted.
        stores = [store(f"s3st{i}", f"127.0.0.{111 + i}", f"s3st{i}", 64 * MiB)
                  for i in range(3)]
        cluster = self.make(sources, stores)
        source = cluster.sources[0]
        root = os.fsencode(source["path"])
        yield cluster.start()
        yield cluster.converge(90)
        # Every store holds every file, so no fetch is running when the
        # files are rewritten.
        yield self.wait_full(cluster, source)
        server = cluster.process("cbackup-server", "delta")
        originals = source["path"] + ".originals"
        shutil.copytree(source["path"], originals, symlinks=True)
        regular = sorted(rel for rel, (kind, size, _) in source_files(root).items()
                         if kind == "file" and size > 0)
        victims = random.Random(111).sample(regular, int(0.3 * len(source_files(root))))
        mark = log_size(server.logfile)

        yield self.right_after_a_scan(server, source)
        new_mtime = int(time.time()) + 5
        for rel in victims:
            encrypt(os.path.join(root, rel), new_mtime)
        encrypted = time.monotonic()
        yield wait_for(lambda: "HELD" in log_from(server.logfile, mark), timeout=30,
                       interval=0.2, what="the server logging a held scan")
        seconds_to_held = time.monotonic() - encrypted
        yield self.wait_status(cluster, 1, f"held: 0 deleted, {len(victims)} changed")

        def old_bytes_copies() -> dict[bytes, set]:
            return {rel: original_holders(cluster, source, rel, originals) for rel in victims}

        def not_original() -> list[str]:
            """Store copies of the victims whose bytes are not the original's."""
            bad = []
            for st in cluster.stores:
                for rel in victims:
                    path = cluster.copy_path(st, source, rel)
                    if os.path.lexists(path) and not same_content(
                            os.path.join(os.fsencode(originals), rel), path):
                        bad.append(f"{st['name']}: {os.fsdecode(rel)}")
            return bad

        at_held = old_bytes_copies()
        yield sleep(5)  # several report intervals, two rescans, with the scan held
        while_held = old_bytes_copies()
        self.assertEqual(not_original(), [])
        self.assertEqual({rel: hosts for rel, hosts in while_held.items() if len(hosts) < 2}, {})

        code, out = yield cbackup("accept", "-c", cluster.config,
                                  "--source", f"delta:{source['path']}")
        accepted = time.monotonic()
        self.assertEqual(code, 0, out)
        self.assertIn("held scan applied", out)
        yield cluster.converge(90)
        yield wait_for(lambda: not cluster.under_replicated(check_bytes=True), timeout=30,
                       interval=1.0, what="every file at its copies with the new bytes")
        seconds_to_converge = time.monotonic() - accepted
        new_copies = sum(len(cluster.holders(source, rel, check_bytes=True)) for rel in victims)
        # Rule 7: the versions the accepted scan replaced are kept as
        # orphans for keep deleted, out of the layout, with their old bytes.
        kept = {rel: kept_holders(cluster, source, rel, os.path.join(
            os.fsencode(originals), rel)) for rel in victims}
        self.assertEqual([os.fsdecode(rel) for rel, hosts in kept.items() if not hosts], [])
        yield self.wait_status(cluster, 0)
        truth = self.check_ground_truth(cluster)

        code2, out2 = yield cbackup("accept", "-c", cluster.config,
                                    "--source", f"delta:{source['path']}")
        self.assertEqual(code2, 1, out2)
        self.assertIn("no scan is held", out2)
        record_figures("ransomware", dict(
            truth, faults_injected=1, files=len(source_files(root)),
            files_encrypted=len(victims), seconds_to_held=round(seconds_to_held, 1),
            copies_with_old_bytes_at_held=sum(len(h) for h in at_held.values()),
            copies_with_old_bytes_after_5s_held=sum(len(h) for h in while_held.values()),
            min_old_byte_copies_while_held=min(len(h) for h in while_held.values()),
            copies_with_new_bytes_after_accept=new_copies,
            old_versions_kept=sum(len(h) for h in kept.values()),
            min_kept_copies_of_an_old_version=min(len(h) for h in kept.values()),
            seconds_to_converge_after_accept=round(seconds_to_converge, 1)))

    # --- 4 ---------------------------------------------------------------

    @inlineCallbacks
    def test_mass_deletion_keeps_the_client_responsive(self):
        """
        A source deletes 50,000 files (issue 15, finding 3): the operator
        accepts the held scan, the orphans expire (keep deleted 5s) and each
        store removes 50,000 files.  Meanwhile every store keeps reporting
        on time, SIGTERM of a client in the middle of its removals ends it
        within 5 s, and after a restart the removals finish.
        """
        bulk = 50_000
        sources = [{"host": "eps", "address": "127.0.0.120", "copies": 2, "files": 100,
                    "seed": 120, "keys": {"keep deleted": "5s"}}]
        stores = [store(f"s4st{i}", f"127.0.0.{121 + i}", f"s4st{i}", 512 * MiB)
                  for i in range(2)]
        cluster = self.make(sources, stores)
        source = cluster.sources[0]
        root = os.fsencode(source["path"])
        for d in range(100):
            folder = os.path.join(root, b"bulk", b"d%02d" % d)
            os.makedirs(folder)
            for n in range(bulk // 100):
                with open(os.path.join(folder, b"f%04d" % n), "wb") as f:
                    f.write(b"%d" % n)
        started = time.monotonic()
        yield cluster.start()
        yield cluster.converge(300)
        seconds_to_back_up = time.monotonic() - started
        server = cluster.process("cbackup-server", "eps")
        secret = read_secret(load(cluster.config))

        yield self.right_after_a_scan(server, source)
        deleted_at = time.monotonic()
        # Out of the source in one rename (an rm -r of 50,000 files may span a
        # rescan, and a part of it is a change small enough to apply at once).
        gone = os.fsencode(source["path"]) + b".deleted-bulk"
        os.rename(os.path.join(root, b"bulk"), gone)
        shutil.rmtree(gone)
        yield self.wait_status(cluster, 1, f"held: {bulk:,} deleted")
        code, out = yield cbackup("accept", "-c", cluster.config,
                                  "--source", f"eps:{source['path']}")
        self.assertEqual(code, 0, out)
        # Watch the stores' leases on the server while they remove.
        victim, other = cluster.stores
        sample_paths = [os.path.join(b"bulk", b"d%02d" % d, b"f0000") for d in range(100)]

        def removing(st) -> bool:
            return any(not os.path.lexists(cluster.copy_path(st, source, rel))
                       for rel in sample_paths)

        worst_age, states, victim_states = 0.0, set(), set()
        client = cluster.process("cbackup-client", victim["host"])
        stop_seconds = None
        while time.monotonic() - deleted_at < 200:
            answer = yield ask_server(reactor, "eps", source["address"], cluster.port,
                                      "cbackup-status", secret, timeout=5)
            self.assertIsNone(answer.error)
            for _, st in answer.stores:
                if st.store == f"{other['host']}:{other['path']}":
                    states.add(st.state)
                    worst_age = max(worst_age, st.last_report_age or 0.0)
                else:
                    victim_states.add(st.state)
            if stop_seconds is None and removing(victim):
                # SIGTERM in the middle of the removals.
                client.signal(signal.SIGTERM)
                t0 = time.monotonic()
                yield wait_for(lambda: not client.running(), timeout=30, interval=0.05,
                               what="the client to stop")
                stop_seconds = time.monotonic() - t0
                left_at_stop = sum(os.path.lexists(cluster.copy_path(victim, source, rel))
                                   for rel in sample_paths)
                cluster.processes.remove(client)
                client = Twistd("cbackup-client", cluster.config, victim["host"],
                                cluster.base).start()
                cluster.processes.append(client)
            if stop_seconds is not None and not any(
                    os.path.lexists(cluster.copy_path(st, source, b"bulk"))
                    for st in cluster.stores):
                break
            yield sleep(0.5)
        gone = not any(os.path.lexists(cluster.copy_path(st, source, b"bulk"))
                       for st in cluster.stores)
        seconds = time.monotonic() - deleted_at
        self.assertIsNotNone(stop_seconds, "the removals were never seen under way")
        self.assertLess(stop_seconds, 5.0)
        self.assertGreater(left_at_stop, 0, "the removals were over before the stop")
        self.assertTrue(gone, "the 50,000 orphans were not all removed")
        # The store that was not stopped removed its 50,000 files reporting
        # every interval: never stale.  The restarted one never went dead.
        self.assertTrue(removing(other))
        self.assertEqual(states, {"live"})
        self.assertLess(worst_age, 3.0)
        self.assertNotIn("dead", victim_states)
        truth = self.check_ground_truth(cluster)
        record_figures("mass_deletion", dict(
            truth, faults_injected=1, files_deleted=bulk, stores=len(stores),
            seconds_to_back_up_first=round(seconds_to_back_up, 1),
            seconds_delete_to_all_removed=round(seconds, 1),
            sigterm_seconds_during_removal=round(stop_seconds, 2),
            sample_files_left_at_sigterm=left_at_stop,
            worst_report_age_seconds_while_removing=round(worst_age, 2),
            store_states_while_removing=sorted(states),
            restarted_store_states=sorted(victim_states)))

    # Backing up 50,000 files first takes most of it; slower when the
    # machine is shared.
    test_mass_deletion_keeps_the_client_responsive.timeout = 480

    # --- 5 ---------------------------------------------------------------

    @inlineCallbacks
    def test_big_file_rewritten_on_nearly_full_stores(self):
        """
        A 50 MB file is rewritten at the source while no store has 50 MB
        free (issue 15, finding 4): the stores keep their old copies out of
        the layout, the server lets all but one of them go, and those stores
        rewrite their old copy in place into the new version, so the new one
        is soon back at its copies, the old one keeps a copy, and no store
        passes its quota.
        """
        big = 50 * MiB
        sources = [{"host": "zeta", "address": "127.0.0.125", "copies": 2, "files": 20,
                    "big": big, "seed": 125}]
        small = self.tree_size(dict(sources[0], big=0))
        # Room for the big file and the small ones, not for a second big one.
        each = big + small + 6 * MiB
        stores = [store(f"s5st{i}", f"127.0.0.{126 + i}", f"s5st{i}", each) for i in range(3)]
        cluster = self.make(sources, stores)
        source = cluster.sources[0]
        root = os.fsencode(source["path"])
        path = os.path.join(root, b"big.bin")
        yield cluster.start()
        yield cluster.converge(120)
        yield sleep(3)  # greedy fill settles
        server = cluster.process("cbackup-server", "zeta")
        old = source["path"] + ".old-big"
        shutil.copy2(path, old)
        holders_before = cluster.holders(source, b"big.bin", check_bytes=True)
        self.assertTrue(all(st["size_bytes"] - du(st["path"]) < big for st in stores))

        yield self.right_after_a_scan(server, source)
        # Rewrite 1 MiB in the middle: rsync's delta transfer has most of it.
        with open(path, "r+b") as f:
            f.seek(big // 2)
            f.write(random.Random(126).randbytes(MiB))
        new_mtime = int(time.time()) + 3
        os.utime(path, (new_mtime, new_mtime))
        changed = time.monotonic()
        yield wait_for(lambda: len(cluster.holders(source, b"big.bin", check_bytes=True)) >= 2,
                       timeout=60, interval=0.5, what="the new version at 2 copies")
        seconds = time.monotonic() - changed
        yield cluster.converge(60)
        yield sleep(3)
        kept = kept_holders(cluster, source, b"big.bin", os.fsencode(old))
        self.assertGreaterEqual(len(kept), 1, "the old version lost every copy")
        text = "".join(t.log() for t in cluster.processes if t.plugin == "cbackup-client")
        in_place = text.count("will be updated in place")
        self.assertGreater(in_place, 0)
        truth = self.check_ground_truth(cluster)
        record_figures("big_file_rewritten", dict(
            truth, faults_injected=1, big_file_bytes=big, store_quota_bytes=each,
            old_version_copies_before=len(holders_before),
            seconds_to_new_version_at_copies=round(seconds, 1),
            stores_keeping_the_old_version=len(kept), updates_in_place=in_place,
            max_used_bytes={k: v for k, v in cluster.max_used.items()}))
