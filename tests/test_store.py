"""
Tests for L{cluster_backup.store} on real temporary trees, checked against
the real C{du -sb}.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import shutil
import threading
import time

from attrs import frozen
from twisted.logger import capturedLogs, formatEvent
from twisted.trial import unittest

from cluster_backup.orphan_index import WAL_LIMIT
from cluster_backup.records import FileRecord
from cluster_backup.store import KEPT, DirCosts, Store, StoreError, kept_key, tree_usage

try:
    import pytest
except ImportError:  # trial without pytest installed
    pytest = None


@frozen
class Src:
    """The two attributes of a config Source the store uses."""

    host: str
    path: str

    @property
    def id(self) -> str:
        return f"{self.host}:{self.path}"


DATA = Src("host1", "/srv/data")
ROOTSRC = Src("host2", "/")
NONUTF8 = b"caf\xe9/na\xefve \xff.bin"


def du(path) -> int:
    """C{du -sb path}, from the real du."""
    out = subprocess.run(["du", "-sb", os.fsencode(path)], check=True,
                         capture_output=True).stdout
    return int(out.split()[0])


def write(path: bytes, size: int) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(b"x" * size)


def fetch_like_rsync(store: Store, src: Src, rel: bytes, size: int,
                     mtime: int = 1_700_000_000) -> int:
    """
    Do what rsync does to land C{rel} (parents created, a temp file beside
    the final name given the source's C{mtime}, renamed over it; an
    existing old version stays until then), then L{Store.refresh}.
    Returns the peak growth of C{du -sb}.
    """
    before = du(store.root)
    final = store.path_of(src.host, src.path, rel)
    os.makedirs(os.path.dirname(final), exist_ok=True)
    peaks = [du(store.root)]
    tmp = os.path.join(os.path.dirname(final), b"." + os.path.basename(final)[:200] + b".Xa9Zq1")
    write(tmp, size)
    os.utime(tmp, (mtime, mtime))
    peaks.append(du(store.root))
    os.rename(tmp, final)
    peaks.append(du(store.root))
    store.refresh(src.host, src.path, rel)
    return max(peaks) - before


class LayoutTests(unittest.SynchronousTestCase):
    def setUp(self):
        self.store = Store(self.mktemp(), size=10**9)

    def test_source_dir(self):
        root = self.store.root
        self.assertEqual(self.store.source_dir("host1", "/srv/data"), root + b"/host1/srv/data")
        self.assertEqual(self.store.source_dir("host2", "/"), root + b"/host2")

    def test_path_of_non_utf8(self):
        self.assertEqual(self.store.path_of("host1", "/srv/data", NONUTF8),
                         self.store.root + b"/host1/srv/data/" + NONUTF8)

    def test_state_dirs_created(self):
        self.assertTrue(os.path.isdir(self.store.partial_dir))
        self.assertEqual(self.store.state_dir, self.store.root + b"/.cbackup")

    def test_locate_is_the_inverse(self):
        self.store.inventory([DATA, ROOTSRC, Src("host1", "/srv/data/inner")])
        for src, rel in [(DATA, NONUTF8), (ROOTSRC, b"a/b"),
                         (Src("host1", "/srv/data/inner"), b"z")]:
            self.assertEqual(self.store.locate(self.store.path_of(src.host, src.path, rel)),
                             (src.id, rel))
        self.assertIsNone(self.store.locate(self.store.root + b"/elsewhere/x"))

    def test_bad_hosts_refused(self):
        for host in (".cbackup", "", "a/b", ".."):
            self.assertRaises(StoreError, self.store.source_dir, host, "/x")
        self.assertRaises(StoreError, self.store.source_dir, "h", "/a/../b")

    def test_needs_size_or_reserve(self):
        self.assertRaises(ValueError, Store, self.mktemp())
        self.assertRaises(ValueError, Store, self.mktemp(), size=1, reserve=1)


class InventoryTests(unittest.SynchronousTestCase):
    def setUp(self):
        self.store = Store(self.mktemp(), size=10**9)
        r = self.store.root
        write(r + b"/host1/srv/data/a.txt", 10)
        write(r + b"/host1/srv/data/sub/deep/" + NONUTF8, 7)
        os.symlink(b"/etc", r + b"/host1/srv/data/etc-link")  # never followed
        os.utime(r + b"/host1/srv/data/a.txt", ns=(0, 1_700_000_000_999_999_999))
        write(r + b"/host2/top", 3)
        write(r + b"/stray.txt", 5)  # no source
        write(r + b"/host1/other/x", 6)  # host dir, but not a source dir
        write(r + b"/.cbackup/partial/a.txt", 4)

    def test_records(self):
        inv = self.store.inventory([DATA, ROOTSRC])
        self.assertEqual(set(inv), {DATA.id, ROOTSRC.id})
        data = inv[DATA.id]
        self.assertEqual(set(data), {b"a.txt", b"sub/deep/" + NONUTF8, b"etc-link"})
        self.assertEqual(data[b"a.txt"], FileRecord(b"a.txt", 10, 1_700_000_000))
        self.assertEqual(data[b"etc-link"].size, len(b"/etc"))
        self.assertEqual(list(inv[ROOTSRC.id]), [b"top"])
        self.assertEqual(inv[ROOTSRC.id][b"top"].size, 3)

    def test_unknown_counted_not_deleted(self):
        self.store.inventory([DATA, ROOTSRC])
        self.assertEqual((self.store.unknown_files, self.store.unknown_bytes), (2, 11))
        self.assertTrue(os.path.exists(self.store.root + b"/stray.txt"))
        self.assertTrue(os.path.exists(self.store.root + b"/host1/other/x"))

    def test_unconfigured_source_is_unknown(self):
        inv = self.store.inventory([DATA])
        self.assertNotIn(ROOTSRC.id, inv)
        self.assertEqual(self.store.unknown_files, 3)

    def test_nested_sources_deepest_wins(self):
        inner = Src("host1", "/srv/data/sub")
        inv = self.store.inventory([DATA, inner])
        self.assertEqual(set(inv[inner.id]), {b"deep/" + NONUTF8})
        self.assertNotIn(b"sub/deep/" + NONUTF8, inv[DATA.id])

    def test_used_equals_du(self):
        self.store.inventory([DATA, ROOTSRC])
        self.assertEqual(self.store.used, du(self.store.root))
        self.assertEqual(self.store.usage(), du(self.store.root))


class UsageTests(unittest.SynchronousTestCase):
    def setUp(self):
        self.store = Store(self.mktemp(), size=10**9)
        self.store.inventory([DATA, ROOTSRC])

    def test_usage_matches_du(self):
        r = self.store.root
        for i in range(30):
            write(r + b"/host1/srv/data/d%d/e%d/f%d" % (i % 3, i % 5, i), i * 100)
        os.symlink(b"../../nowhere/at/all", r + b"/host1/srv/data/dangling")
        os.symlink(b"d0", r + b"/host1/srv/data/dirlink")
        os.link(r + b"/host1/srv/data/d0/e0/f0", r + b"/host1/srv/data/hard")
        write(self.store.partial_dir + b"/f7", 12345)
        self.assertEqual(self.store.usage(), du(r))

    def test_tree_usage_missing_root_raises(self):
        self.assertRaises(FileNotFoundError, tree_usage, self.store.root + b"/nope")

    def test_running_used_follows_adds_and_removes(self):
        r = self.store.root
        rels = [b"a/b/c%d" % i for i in range(5)] + [b"x/" + NONUTF8, b"top"]
        for n, rel in enumerate(rels):
            fetch_like_rsync(self.store, DATA, rel, 1000 * n)
            self.assertEqual(self.store.used, du(r))
        fetch_like_rsync(self.store, DATA, b"top", 5)  # replaced, smaller
        self.assertEqual(self.store.used, du(r))
        self.assertEqual(self.store.files[DATA.id][b"top"].size, 5)
        for rel in rels:
            self.store.remove(DATA.host, DATA.path, rel)
            self.assertEqual(self.store.used, du(r), rel)
        self.assertEqual(self.store.files[DATA.id], {})

    def test_refresh_after_failed_fetch_counts_new_dirs(self):
        # rsync created the directories, then the transfer failed
        os.makedirs(self.store.path_of(DATA.host, DATA.path, b"new/dirs/x")[:-2])
        self.assertIsNone(self.store.refresh(DATA.host, DATA.path, b"new/dirs/x"))
        self.assertEqual(self.store.used, du(self.store.root))

    def test_refresh_many_is_refresh_of_each(self):
        """One batch refresh gives the records and usage that refreshing each path gives."""
        rels = [b"a/one", b"a/two", b"a/b/three", b"c/d/e/four", b"top", b"gone/x", b"a/b/missing"]
        twin = Store(self.mktemp(), size=10**9)
        twin.inventory([DATA, ROOTSRC])
        for store in (self.store, twin):
            sdir = store.source_dir(DATA.host, DATA.path)
            for n, rel in enumerate(rels[:5]):
                write(sdir + b"/" + rel, 100 * n + 1)
                # The same mtime in both stores, even across a second's turn.
                os.utime(sdir + b"/" + rel, (1_700_000_000 + n, 1_700_000_000 + n))
            os.makedirs(sdir + b"/gone")  # rsync made the folder, then failed
        got = self.store.refresh_many(DATA.host, DATA.path, rels)
        each = {rel: twin.refresh(DATA.host, DATA.path, rel) for rel in rels}
        self.assertEqual(got, each)
        self.assertEqual(list(got), rels)
        self.assertIsNone(got[b"gone/x"])
        self.assertEqual(got[b"c/d/e/four"].size, 301)
        self.assertEqual(self.store.files, twin.files)
        self.assertEqual(self.store.used, du(self.store.root))
        self.assertEqual(twin.used, du(twin.root))

    def test_refresh_many_refuses_a_symlinked_folder(self):
        sdir = self.store.source_dir(DATA.host, DATA.path)
        write(sdir + b"/real/f", 10)
        os.symlink(b"real", sdir + b"/link")
        with self.assertRaises(StoreError):
            self.store.refresh_many(DATA.host, DATA.path, [b"real/f", b"link/f"])

    def test_partials_measured_and_cleaned(self):
        write(self.store.partial_dir + b"/big", 50000)
        self.store.measure_state()
        self.assertEqual(self.store.used, du(self.store.root))
        self.store.clean_partials()
        self.assertEqual(os.listdir(self.store.partial_dir), [])
        self.assertEqual(self.store.used, du(self.store.root))

    def test_remove_cleans_empty_parents_not_source_dir(self):
        fetch_like_rsync(self.store, DATA, b"a/b/c/file", 10)
        fetch_like_rsync(self.store, DATA, b"a/keep", 10)
        freed = self.store.remove(DATA.host, DATA.path, b"a/b/c/file")
        sdir = self.store.source_dir(DATA.host, DATA.path)
        self.assertFalse(os.path.exists(sdir + b"/a/b"))
        self.assertTrue(os.path.exists(sdir + b"/a/keep"))
        self.assertGreaterEqual(freed, 10)
        self.store.remove(DATA.host, DATA.path, b"a/keep")
        self.assertTrue(os.path.isdir(sdir))
        self.assertEqual(os.listdir(sdir), [])
        self.assertEqual(self.store.used, du(self.store.root))

    def test_remove_of_vanished_file_keeps_used_exact(self):
        fetch_like_rsync(self.store, DATA, b"v/gone", 300)
        os.unlink(self.store.path_of(DATA.host, DATA.path, b"v/gone"))
        self.store.remove(DATA.host, DATA.path, b"v/gone")
        self.assertNotIn(b"v/gone", self.store.files[DATA.id])
        self.assertEqual(self.store.used, du(self.store.root))

    def test_remove_refuses_directory(self):
        os.makedirs(self.store.path_of(DATA.host, DATA.path, b"adir"))
        self.assertRaises(StoreError, self.store.remove, DATA.host, DATA.path, b"adir")

    def test_remove_many_is_remove_of_each(self):
        """One batch removal leaves the tree, records, marks and usage that removing each does."""
        rels = [b"a/b/c/one", b"a/b/c/two", b"a/b/three", b"a/keep", b"x/" + NONUTF8,
                b"top", b"never/was", b"vanished"]
        keep = {b"a/keep"}
        twin = Store(self.mktemp(), size=10**9)
        twin.inventory([DATA, ROOTSRC])
        for store in (self.store, twin):
            for n, rel in enumerate(rels[:-2]):
                fetch_like_rsync(store, DATA, rel, 100 * n + 1)
            fetch_like_rsync(store, DATA, b"vanished", 5)
            os.unlink(store.path_of(DATA.host, DATA.path, b"vanished"))
            store.mark_orphans(DATA.id, rels, now=1.0)
        gone = [r for r in rels if r not in keep]
        used = self.store.used
        freed = self.store.remove_many(DATA.host, DATA.path, gone)
        self.assertEqual(freed, used - self.store.used)
        for rel in gone:
            twin.remove(DATA.host, DATA.path, rel)
        self.assertEqual(self.store.files, twin.files)
        self.assertEqual(set(self.store.files[DATA.id]), keep)
        for store in (self.store, twin):
            sdir = store.source_dir(DATA.host, DATA.path)
            self.assertEqual(sorted(os.listdir(sdir)), [b"a"])
            self.assertEqual(os.listdir(sdir + b"/a"), [b"keep"])
            self.assertEqual(store.orphans(), {(DATA.id, b"a/keep"): 1.0})
            self.assertEqual(store.used, du(store.root))

    def test_remove_many_stops_at_a_refused_path(self):
        for rel in (b"d/one", b"d/two", b"e/three"):
            fetch_like_rsync(self.store, DATA, rel, 10)
        self.store.mark_orphans(DATA.id, [b"d/one", b"d/two", b"e/three"], now=1.0)
        with self.assertRaises(StoreError):
            self.store.remove_many(DATA.host, DATA.path, [b"d/one", b"d/two", b"../x", b"e/three"])
        sdir = self.store.source_dir(DATA.host, DATA.path)
        self.assertEqual(os.listdir(sdir), [b"e"])  # d emptied and removed
        self.assertEqual(self.store.orphans(), {(DATA.id, b"e/three"): 1.0})
        self.assertEqual(self.store.used, du(self.store.root))


class StoppedEvent:
    """Looks set from its C{after}-th look on (a stop during the walk)."""

    def __init__(self, after: int):
        self.after = after
        self.looks = 0

    def is_set(self) -> bool:
        self.looks += 1
        return self.looks > self.after


class InventoryStopTests(unittest.SynchronousTestCase):
    def setUp(self):
        self.store = Store(self.mktemp(), size=10**9)
        for i in range(20):
            write(self.store.root + b"/host1/srv/data/d%d/f%d" % (i % 4, i), 10 + i)
        write(self.store.root + b"/stray", 3)
        self.store.inventory([DATA])

    def figures(self):
        s = self.store
        return (s.files, s.used, s.quota, s.unknown_files, s.unknown_bytes, dict(s._dirs),
                s._file_bytes, s._state_bytes, list(s._sources))

    def check_stopped(self, stop):
        write(self.store.root + b"/host1/srv/data/d9/new", 1000)  # not seen yet
        before = self.figures()
        files = {sid: dict(held) for sid, held in self.store.files.items()}
        with self.assertRaises(StoreError) as caught:
            self.store.inventory([DATA, ROOTSRC], stop=stop)
        self.assertIn("inventory stopped", str(caught.exception))
        self.assertEqual(self.figures(), before)
        self.assertEqual(self.store.files, files)
        self.assertIs(self.store.files, before[0])

    def test_stop_already_set(self):
        event = threading.Event()
        event.set()
        self.check_stopped(event)

    def test_stop_during_the_walk(self):
        stop = StoppedEvent(after=4)
        self.check_stopped(stop)
        self.assertEqual(stop.looks, 5)  # once per folder until it was set

    def test_unset_stop_changes_nothing(self):
        plain = Store(self.mktemp(), size=10**9)
        write(plain.root + b"/host1/srv/data/x", 5)
        self.assertEqual(plain.inventory([DATA], stop=threading.Event()),
                         {DATA.id: {b"x": plain.files[DATA.id][b"x"]}})
        self.assertEqual(plain.used, du(plain.root))


class CostTests(unittest.SynchronousTestCase):
    """cost() bounds the real growth of du -sb on this filesystem."""

    def setUp(self):
        self.store = Store(self.mktemp(), size=10**10)
        self.store.inventory([DATA, ROOTSRC])

    def check(self, src, rel, size):
        bound = self.store.cost(src.host, src.path, rel, size)
        growth = fetch_like_rsync(self.store, src, rel, size)
        self.assertGreaterEqual(bound, growth, (rel, size))
        self.assertGreaterEqual(bound, size)
        return bound

    def test_probe_measured(self):
        costs = self.store.dir_costs
        self.assertTrue(costs.measured)
        probe = os.path.join(self.store.state_dir, b"fresh")
        os.mkdir(probe)
        self.assertEqual(costs.new_dir, os.lstat(probe).st_size)
        self.assertGreaterEqual(costs.entry, 64)

    def test_new_nested_file(self):
        deep = self.check(DATA, b"one/two/three/four/f", 100)
        self.assertGreater(deep, self.store.cost(DATA.host, DATA.path, b"one/two/three/four/g", 100))

    def test_root_source_and_non_utf8(self):
        self.check(ROOTSRC, NONUTF8, 3000)

    def test_update_in_place(self):
        self.check(DATA, b"f", 5000)
        self.check(DATA, b"f", 7000)

    def test_many_entries_in_one_dir(self):
        # long names make ext4 overflow its first block and go htree
        for i in range(60):
            self.check(DATA, b"d/" + b"%03d" % i + b"n" * 240, 1)

    def test_empty_file(self):
        self.check(DATA, b"z/empty", 0)

    def test_cost_with_remembered_parents_is_the_same(self):
        write(self.store.source_dir(DATA.host, DATA.path) + b"/a/b/f", 10)
        parents: dict = {}
        for rel in (b"a/b/g", b"a/b/h", b"a/new/x", b"a/new/y", b"z/y/x/w", b"top"):
            self.assertEqual(self.store.cost(DATA.host, DATA.path, rel, 7, parents),
                             self.store.cost(DATA.host, DATA.path, rel, 7), rel)
        self.assertEqual(len(parents), 4)  # a/b, a/new, z/y/x and the source folder

    def test_cost_refuses_bad_paths(self):
        self.assertRaises(StoreError, self.store.cost, DATA.host, DATA.path, b"../x", 1)

    def test_cost_needs_inventory(self):
        fresh = Store(self.mktemp(), size=10**6)
        self.assertRaises(StoreError, fresh.cost, DATA.host, DATA.path, b"x", 1)
        self.assertRaises(StoreError, lambda: fresh.used)

    def test_fallback_when_no_room(self):
        small = Store(self.mktemp(), size=10000)
        small.inventory([DATA])
        self.assertFalse(small.dir_costs.measured)
        self.assertGreaterEqual(small.dir_costs.entry, 4 * 4096)
        self.assertEqual(small.used, du(small.root))

    def test_real_rsync(self):
        rsync = shutil.which("rsync")
        if rsync is None:
            raise unittest.SkipTest("rsync not installed")
        src = self.mktemp().encode()
        write(src + b"/p/q/" + NONUTF8, 4000)
        rel = b"p/q/" + NONUTF8
        bound = self.store.cost(DATA.host, DATA.path, rel, 4000)
        before = du(self.store.root)
        dest = self.store.source_dir(DATA.host, DATA.path)
        os.makedirs(dest, exist_ok=True)
        before = du(self.store.root)
        subprocess.run([rsync, "-a", "--from0", "--files-from=-", "--partial-dir",
                        self.store.partial_dir, src + b"/", dest + b"/"],
                       input=rel + b"\0", check=True)
        # dest was created before "before": only the final state is visible here
        self.assertGreaterEqual(bound, du(self.store.root) - before)
        self.assertEqual(self.store.refresh(DATA.host, DATA.path, rel).size, 4000)
        self.assertEqual(self.store.used, du(self.store.root))


class SafetyTests(unittest.SynchronousTestCase):
    def setUp(self):
        self.store = Store(self.mktemp(), size=10**9)
        self.store.inventory([DATA])
        self.outside = os.path.abspath(self.mktemp()).encode()
        write(self.outside + b"/victim", 3)

    def test_traversal_refused(self):
        for rel in (b"../x", b"a/../../x", b"/etc/passwd", b"", b"a//b", b"a\0b", b"./a"):
            self.assertRaises(StoreError, self.store.path_of, DATA.host, DATA.path, rel)
            self.assertRaises(StoreError, self.store.remove, DATA.host, DATA.path, rel)

    def test_symlinked_parent_refused(self):
        sdir = self.store.source_dir(DATA.host, DATA.path)
        os.makedirs(sdir)
        os.symlink(self.outside, sdir + b"/escape")
        for op in (self.store.path_of, self.store.remove, self.store.refresh):
            self.assertRaises(StoreError, op, DATA.host, DATA.path, b"escape/victim")
        self.assertRaises(StoreError, self.store.cost, DATA.host, DATA.path, b"escape/victim", 1)
        self.assertTrue(os.path.exists(self.outside + b"/victim"))

    def test_symlinked_host_dir_refused(self):
        os.symlink(self.outside, self.store.root + b"/host1")
        self.assertRaises(StoreError, self.store.remove, DATA.host, DATA.path, b"victim")
        self.assertRaises(StoreError, self.store.remove, "host1", "/", b"victim")
        self.assertTrue(os.path.exists(self.outside + b"/victim"))

    def test_file_as_parent_refused(self):
        write(self.store.source_dir(DATA.host, DATA.path) + b"/plain", 1)
        self.assertRaises(StoreError, self.store.path_of, DATA.host, DATA.path, b"plain/x")

    def test_symlink_itself_removed_not_target(self):
        sdir = self.store.source_dir(DATA.host, DATA.path)
        os.makedirs(sdir)
        os.symlink(self.outside + b"/victim", sdir + b"/link")
        self.store.refresh(DATA.host, DATA.path, b"link")
        self.store.remove(DATA.host, DATA.path, b"link")
        self.assertFalse(os.path.lexists(sdir + b"/link"))
        self.assertTrue(os.path.exists(self.outside + b"/victim"))


class OrphanTests(unittest.SynchronousTestCase):
    def setUp(self):
        self.path = self.mktemp()
        self.store = Store(self.path, size=10**9)
        self.store.inventory([DATA])

    def test_timestamps_survive_reopening(self):
        self.store.mark_orphans(DATA.id, [b"old", NONUTF8], now=1000.0)
        self.store.mark_orphans(DATA.id, [b"old", b"new"], now=5000.0)  # old keeps 1000
        again = Store(self.path, size=10**9)
        self.assertEqual(again.orphans(), {(DATA.id, b"old"): 1000.0,
                                           (DATA.id, NONUTF8): 1000.0,
                                           (DATA.id, b"new"): 5000.0})

    def test_expired(self):
        self.store.mark_orphans(DATA.id, [b"old"], now=1000.0)
        self.store.mark_orphans(DATA.id, [b"new"], now=5000.0)
        self.assertEqual(self.store.expired_orphans(6000.0, 4500.0), [(DATA.id, b"old")])
        self.assertEqual(self.store.expired_orphans(6000.0, {DATA.id: 1000.0}),
                         [(DATA.id, b"old"), (DATA.id, b"new")])
        self.assertEqual(self.store.expired_orphans(10**9, {}), [])

    def test_unmark_persists(self):
        self.store.mark_orphans(DATA.id, [b"a", b"b"], now=1.0)
        self.store.unmark(DATA.id, [b"a"])
        self.assertEqual(Store(self.path, size=10**9).orphans(), {(DATA.id, b"b"): 1.0})

    def test_remove_unmarks(self):
        fetch_like_rsync(self.store, DATA, b"gone", 1)
        self.store.mark_orphans(DATA.id, [b"gone"], now=1.0)
        self.store.remove(DATA.host, DATA.path, b"gone")
        self.assertEqual(Store(self.path, size=10**9).orphans(), {})

    def test_state_file_counted(self):
        self.store.mark_orphans(DATA.id, [b"p%d" % i for i in range(200)], now=1.0)
        self.assertEqual(self.store.used, du(self.store.root))

    def test_full_store_keeps_marks_in_memory(self):
        path = self.mktemp()
        full = Store(path, size=1, dir_costs=DirCosts(4096, 16384))
        full.inventory([DATA])
        full.mark_orphans(DATA.id, [b"x"], now=1.0)
        self.assertFalse(full.orphans_persisted)
        self.assertEqual(full.orphans(), {(DATA.id, b"x"): 1.0})
        self.assertFalse(os.path.exists(full.state_dir + b"/index.sqlite"))
        full.close()
        self.assertEqual(Store(path, size=1).orphans(), {})

    def reopen(self, size=10**9, **kw) -> Store:
        """Close the store and open it again, inventory taken."""
        self.store.close()
        self.store = Store(self.path, size=size, **kw)
        self.store.inventory([DATA])
        return self.store

    def test_marks_survive_reopen_with_used_exact(self):
        names = [b"d%d/" % (i % 7) + NONUTF8 + b"%d" % i for i in range(3000)]
        self.store.mark_orphans(DATA.id, names[:2000], now=10.0)
        self.assertTrue(self.store.orphans_persisted)
        self.assertEqual(self.store.used, self.store.usage())
        self.store.mark_orphans(DATA.id, names, now=20.0)  # one batch, 1000 new
        self.store.unmark(DATA.id, names[:500])
        self.assertEqual(self.store.used, self.store.usage())
        want = {(DATA.id, n): 10.0 for n in names[500:2000]}
        want.update({(DATA.id, n): 20.0 for n in names[2000:]})
        self.assertEqual(self.store.orphans(), want)
        again = self.reopen()
        self.assertEqual(again.orphans(), want)
        self.assertEqual(again.used, again.usage())
        self.assertEqual(again.used, du(again.root))

    def test_unmark_then_mark_again_takes_the_new_time(self):
        self.store.mark_orphans(DATA.id, [b"a"], now=1.0)
        self.store.unmark(DATA.id, [b"a"])
        self.store.mark_orphans(DATA.id, [b"a"], now=7.0)
        self.assertEqual(self.reopen().orphans(), {(DATA.id, b"a"): 7.0})

    def write_old_file(self, lines: list[bytes]) -> bytes:
        old = self.store.state_dir + b"/orphans"
        with open(old, "wb") as f:
            f.write(b"".join(line + b"\n" for line in lines))
        return old

    def test_old_orphans_file_migrated(self):
        self.store.close()
        sid = DATA.id.encode().hex().encode()
        old = self.write_old_file([
            b"1000.0 " + sid + b" " + NONUTF8.hex().encode(),
            b"2500.5 " + sid + b" " + b"a/b".hex().encode(),
            b"garbage line",
        ])
        with capturedLogs() as events:
            store = self.store = Store(self.path, size=10**9)
        self.assertIn("orphans:3: unreadable orphan entry ignored",
                      " ".join(formatEvent(e) for e in events))
        want = {(DATA.id, NONUTF8): 1000.0, (DATA.id, b"a/b"): 2500.5}
        self.assertEqual(store.orphans(), want)
        store.inventory([DATA])
        store.mark_orphans(DATA.id, [b"new", NONUTF8], now=9000.0)  # first write
        self.assertFalse(os.path.exists(old))
        self.assertEqual(store.used, store.usage())
        want[(DATA.id, b"new")] = 9000.0
        self.assertEqual(self.reopen().orphans(), want)

    def test_corrupt_database_moved_aside(self):
        self.store.mark_orphans(DATA.id, [b"x"], now=1.0)
        self.store.close()
        db = self.store.state_dir + b"/index.sqlite"
        with open(db, "wb") as f:
            f.write(b"this is no database " * 500)
        with capturedLogs() as events:
            store = self.store = Store(self.path, size=10**9)
        text = " ".join(formatEvent(e) for e in events)
        self.assertIn(os.fsdecode(db), text)
        self.assertIn("unreadable", text)
        self.assertTrue(os.path.exists(db + b".corrupt"))
        self.assertEqual(store.orphans(), {})
        store.inventory([DATA])
        store.mark_orphans(DATA.id, [b"y"], now=2.0)
        self.assertTrue(store.orphans_persisted)
        self.assertEqual(store.used, store.usage())
        self.assertEqual(self.reopen().orphans(), {(DATA.id, b"y"): 2.0})

    def test_damaged_page_moved_aside(self):
        self.store.mark_orphans(DATA.id, [b"p%05d" % i + b"q" * 100 for i in range(2000)],
                                now=1.0)
        self.store.close()
        db = self.store.state_dir + b"/index.sqlite"
        with open(db, "r+b") as f:  # the marks' pages, not the header
            f.seek(4096)
            f.write(os.urandom(3 * 4096))
        with capturedLogs() as events:
            store = self.store = Store(self.path, size=10**9)
        self.assertIn(os.fsdecode(db), " ".join(formatEvent(e) for e in events))
        self.assertEqual(store.orphans(), {})
        store.mark_orphans(DATA.id, [b"z"], now=3.0)
        self.assertEqual(self.reopen().orphans(), {(DATA.id, b"z"): 3.0})


class OrphanQuotaTests(unittest.SynchronousTestCase):
    """Persisting orphan marks never takes a store past its quota (rule 1)."""

    costs = DirCosts(4096, 16384)

    def tight(self, room: int, big: int = 0) -> tuple[Store, bytes]:
        """A store with C{room} bytes free, holding a file of C{big} bytes."""
        stores = []
        for size in (10**12, None):
            path = self.mktemp()
            if size is None:
                size = stores[0].used + room
            store = Store(path, size=size, dir_costs=self.costs)
            if big:
                write(store.source_dir(DATA.host, DATA.path) + b"/big", big)
            store.inventory([DATA])
            stores.append(store)
        stores[0].close()
        store = stores[1]
        self.assertEqual(store.free, room)
        return store, path

    def test_no_room_keeps_marks_in_memory(self):
        store, path = self.tight(2000)
        with capturedLogs() as events:
            store.mark_orphans(DATA.id, [b"a", b"b"], now=1.0)
            store.mark_orphans(DATA.id, [b"c"], now=2.0)
        warnings = [e for e in events if "memory only" in formatEvent(e)]
        self.assertEqual(len(warnings), 1)  # warned once
        self.assertFalse(store.orphans_persisted)
        self.assertEqual(len(store.orphans()), 3)
        self.assertLessEqual(store.usage(), store.quota)
        self.assertEqual(store.used, store.usage())
        store.close()
        self.assertEqual(Store(path, size=10**9).orphans(), {})

    def test_fills_up_and_never_passes_quota(self):
        store, path = self.tight(400_000)
        persisted: dict = {}
        for n in range(60):
            batch = [b"b%02d-%04d" % (n, i) + b"n" * 180 for i in range(100)]
            store.mark_orphans(DATA.id, batch, now=float(n))
            self.assertLessEqual(store.usage(), store.quota, n)
            self.assertEqual(store.used, store.usage(), n)
            if not store.orphans_persisted:
                break
            persisted.update({(DATA.id, p): float(n) for p in batch})
        self.assertFalse(store.orphans_persisted)
        self.assertGreater(len(persisted), 0)  # some fitted before it filled up
        store.close()
        self.assertEqual(Store(path, size=10**9).orphans(), persisted)

    def test_room_made_persists_the_waiting_marks(self):
        store, path = self.tight(2000, big=500_000)
        store.mark_orphans(DATA.id, [b"big", b"other"], now=5.0)
        self.assertFalse(store.orphans_persisted)
        store.remove(DATA.host, DATA.path, b"big")  # frees room, unmarks big
        self.assertTrue(store.orphans_persisted)
        self.assertLessEqual(store.usage(), store.quota)
        self.assertEqual(store.used, store.usage())
        store.close()
        self.assertEqual(Store(path, size=10**9).orphans(), {(DATA.id, b"other"): 5.0})


class OrphanScaleTests(unittest.SynchronousTestCase):
    """
    The regression test for removing orphans one whole-file rewrite at a
    time (quadratic: about 25 files a second with 50,000 orphans): 50,000
    marks, then 50,000 orphan files removed in chunks of 500, as the client
    does, must be fast and each chunk must cost the same, early or late.

    The files are empty: freeing a data block costs this machine's
    filesystem about 0.3 ms (discard), which would measure the disk, not
    the store.
    """

    FILES = 50_000
    CHUNK = 500

    def test_marks_and_chunked_removal_stay_linear(self):
        store = Store(self.mktemp(), size=10**10)
        sdir = store.source_dir(DATA.host, DATA.path)
        rels = [b"d%03d/f%05d" % (i // 500, i) for i in range(self.FILES)]
        for i, rel in enumerate(rels):
            if i % 500 == 0:
                os.makedirs(sdir + b"/d%03d" % (i // 500))
            os.close(os.open(sdir + b"/" + rel, os.O_CREAT | os.O_WRONLY, 0o600))
        store.inventory([DATA])
        started = time.monotonic()
        for i in range(0, self.FILES, self.CHUNK):
            store.mark_orphans(DATA.id, rels[i:i + self.CHUNK], now=float(i))
        marked = time.monotonic()
        self.assertTrue(store.orphans_persisted)
        self.assertEqual(len(store.orphans()), self.FILES)
        self.assertEqual(store.used, store.usage())
        chunks = []
        for i in range(0, self.FILES, self.CHUNK):
            t = time.monotonic()
            store.remove_many(DATA.host, DATA.path, rels[i:i + self.CHUNK])
            chunks.append(time.monotonic() - t)
        total = time.monotonic() - started
        quarter = len(chunks) // 4
        first = statistics.median(chunks[:quarter])
        last = statistics.median(chunks[-quarter:])
        figures = (f"{total:.2f}s in all ({marked - started:.2f}s marking), chunks: first "
                   f"quarter median {first * 1000:.1f} ms, last {last * 1000:.1f} ms")
        # No absolute bound: this machine's speed varies several-fold under
        # load.  The shape is what the quadratic code got wrong (per-chunk
        # time growing with what was removed before: the last quarter
        # about 7 times the first); figures are in the message.
        self.assertLess(last / first, 3.0, figures)
        self.assertEqual(store.files[DATA.id], {})
        self.assertEqual(os.listdir(sdir), [])
        self.assertEqual(store.orphans(), {})
        self.assertEqual(store.used, store.usage())
        wal = store.state_dir + b"/index.sqlite-wal"
        self.assertLess(os.path.getsize(wal), 4 * WAL_LIMIT)  # checkpointed on the way
        if os.environ.get("CBACKUP_PRINT_FIGURES"):
            print(figures)
        store.close()
        again = Store(store.root, size=10**10)
        self.assertEqual(again.orphans(), {})
        again.inventory([DATA])
        self.assertEqual(again.used, again.usage())


class KeptVersionTests(unittest.SynchronousTestCase):
    """
    Versions the source replaced, kept out of the layout (rule 7): moved
    there, counted (du -sb stays equal to the running figure), found again
    by an inventory, deleted, or rewritten in place into the new version.
    """

    def setUp(self):
        self.store = Store(self.mktemp(), size=10 << 20)
        self.store.inventory([DATA])
        for rel, size in ((b"a/b/f", 1000), (b"a/g", 300), (NONUTF8, 5)):
            write(self.store.path_of(DATA.host, DATA.path, rel), size)
        self.store.refresh_many(DATA.host, DATA.path, [b"a/b/f", b"a/g", NONUTF8])
        self.assertEqual(self.store.used, du(self.store.root))

    def test_keep_moves_out_of_the_layout_and_counts(self):
        kept = self.store.keep(DATA.host, DATA.path, [b"a/b/f", NONUTF8, b"absent"], 100.0)
        self.assertEqual([r.path for r in kept], [b"a/b/f", NONUTF8])
        f = kept[0]
        where = os.path.join(self.store.root, KEPT, b"%d.%d" % (f.mtime, f.size),
                             os.fsencode(DATA.host), b"srv/data/a/b/f")
        self.assertTrue(os.path.isfile(where))
        self.assertFalse(os.path.lexists(self.store.path_of(DATA.host, DATA.path, b"a/b/f")))
        self.assertFalse(os.path.lexists(self.store.source_dir(DATA.host, DATA.path) + b"/a/b"))
        self.assertEqual(set(self.store.files[DATA.id]), {b"a/g"})
        self.assertEqual(self.store.used, du(self.store.root))
        self.assertEqual(self.store.orphans()[(DATA.id, kept_key(f))], 100.0)
        # A fresh store finds them again, with their marks.
        again = Store(self.store.root, size=10 << 20)
        again.inventory([DATA])
        self.assertEqual(set(again.kept[DATA.id]), set(kept))
        self.assertEqual(set(again.files[DATA.id]), {b"a/g"})
        self.assertEqual(again.used, du(again.root))
        self.assertEqual(again.orphans()[(DATA.id, kept_key(f))], 100.0)

    def test_remove_kept(self):
        [f] = self.store.keep(DATA.host, DATA.path, [b"a/b/f"], 100.0)
        freed = self.store.remove_kept(DATA.host, DATA.path, f)
        self.assertGreaterEqual(freed, 1000)
        self.assertEqual(os.listdir(os.path.join(self.store.root, KEPT)), [])
        self.assertEqual(self.store.kept[DATA.id], {})
        self.assertEqual(self.store.orphans(), {})
        self.assertEqual(self.store.used, du(self.store.root))

    def test_update_in_place_then_into_the_layout(self):
        [f] = self.store.keep(DATA.host, DATA.path, [b"a/b/f"], 100.0)
        dest = self.store.take_for_update(DATA.host, DATA.path, f)
        self.assertEqual(self.store.used, du(self.store.root))
        self.assertEqual(self.store.kept[DATA.id], {})
        write(os.path.join(dest, b"a/b/f"), 1500)  # what rsync --inplace does
        self.store.finish_update(DATA.host, DATA.path, [b"a/b/f", b"a/never-updated"])
        self.store.refresh_many(DATA.host, DATA.path, [b"a/b/f"])
        self.store.clean_update(DATA.host, DATA.path)
        self.assertEqual(self.store.files[DATA.id][b"a/b/f"].size, 1500)
        self.assertEqual(os.listdir(self.store.update_dir), [])
        self.assertEqual(self.store.used, du(self.store.root))

    def test_keep_refuses_a_symlinked_kept_folder(self):
        os.symlink(b"/tmp", os.path.join(self.store.root, KEPT))
        self.assertRaises(StoreError, self.store.keep, DATA.host, DATA.path, [b"a/g"], 1.0)
        self.assertIn(b"a/g", self.store.files[DATA.id])


class FakeStatvfs:
    """Stands in for os.statvfs: C{available} bytes free to us."""

    def __init__(self, available: int):
        self.available = available
        self.calls = []

    def __call__(self, path):
        self.calls.append(path)
        return os.statvfs_result((4096, 4096, 0, 0, self.available // 4096, 0, 0, 0, 0, 255))


class ReserveTests(unittest.SynchronousTestCase):
    def test_quota_follows_free_space(self):
        fake = FakeStatvfs(100 * 2**20)
        store = Store(self.mktemp(), reserve=30 * 2**20, statvfs=fake,
                      dir_costs=DirCosts(4096, 16384))
        store.inventory([DATA])
        self.assertEqual(store.quota, store.used + 70 * 2**20)
        self.assertEqual(fake.calls[-1], store.root)
        fake.available = 10 * 2**20  # someone else filled the disk
        self.assertEqual(store.refresh_quota(), 0)
        self.assertEqual(store.free, -store.used)
        fake.available = 40 * 2**20
        self.assertEqual(store.refresh_quota(), store.used + 10 * 2**20)

    def test_from_config(self):
        from cluster_backup.config import Store as StoreConfig
        cfg = StoreConfig(host="h", path=os.path.abspath(self.mktemp()), reserve=0)
        store = Store.from_config(cfg, statvfs=FakeStatvfs(2**30))
        store.inventory([])
        self.assertEqual(store.quota, store.used + 2**30)


class TmpfsTests(unittest.SynchronousTestCase):
    """On tmpfs directories are small (40 B) and grow with each entry."""

    def setUp(self):
        self.mnt = os.path.abspath(self.mktemp())
        os.makedirs(self.mnt)
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", self.mnt],
                              capture_output=True)
        if done.returncode != 0:
            raise unittest.SkipTest(
                f"cannot mount a tmpfs (needs root/CAP_SYS_ADMIN): {done.stderr.decode().strip()}")
        self.addCleanup(subprocess.run, ["umount", self.mnt], check=True)
        self.store = Store(os.path.join(self.mnt, "store"), size=2**20)
        self.store.inventory([DATA, ROOTSRC])

    def test_cost_bounds_growth(self):
        costs = self.store.dir_costs
        self.assertTrue(costs.measured)
        self.assertLess(costs.new_dir, 4096)  # tmpfs, not ext4 blocks
        cases = [(DATA, b"a/b/c/d", 10), (DATA, b"a/b/c/e", 10), (DATA, b"a/x", 0),
                 (ROOTSRC, NONUTF8, 100), (DATA, b"a/x", 500)]
        cases += [(DATA, b"wide/%03d" % i + b"w" * 250, 1) for i in range(40)]
        for src, rel, size in cases:
            bound = self.store.cost(src.host, src.path, rel, size)
            growth = fetch_like_rsync(self.store, src, rel, size)
            self.assertGreaterEqual(bound, growth, rel)
            self.assertEqual(self.store.used, du(self.store.root))

    def test_remove_shrinks_dirs_and_used_follows(self):
        for i in range(20):
            fetch_like_rsync(self.store, DATA, b"d/f%d" % i, 10)
        for i in range(19):
            self.store.remove(DATA.host, DATA.path, b"d/f%d" % i)
            self.assertEqual(self.store.used, du(self.store.root))


class FilesystemLimitTests(unittest.SynchronousTestCase):
    """A filesystem smaller than the quota, or filling up (ENOSPC)."""

    def test_quota_follows_small_filesystem(self):
        fake = FakeStatvfs(2**30)
        store = Store(self.mktemp(), size=100 * 2**20, statvfs=fake,
                      dir_costs=DirCosts(4096, 16384))
        store.inventory([DATA])
        self.assertEqual(store.quota, 100 * 2**20)
        fake.available = 10 * 2**20
        self.assertEqual(store.refresh_quota(), store.used + 10 * 2**20 - store.fs_margin)
        self.assertTrue(store.fs_limited)
        fake.available = 2**30
        self.assertEqual(store.refresh_quota(), 100 * 2**20)
        self.assertFalse(store.fs_limited)

    def test_out_of_space_cleans_and_lowers(self):
        fake = FakeStatvfs(10 * 2**20)
        store = Store(self.mktemp(), size=100 * 2**20, statvfs=fake,
                      dir_costs=DirCosts(4096, 16384))
        store.inventory([DATA])
        margin = store.fs_margin
        write(store.partial_dir + b"/f", 5000)
        write(store.temp_dir + b"/g.XyZ123", 7000)
        write(store.state_dir + b"/files-from-abc.lst", 10)
        store.measure_state()
        with_leftovers = store.used
        quota = store.out_of_space()
        self.assertEqual(store.fs_margin, 2 * margin)
        self.assertEqual(os.listdir(store.partial_dir), [])
        self.assertEqual(os.listdir(store.temp_dir), [])
        self.assertFalse(os.path.exists(store.state_dir + b"/files-from-abc.lst"))
        self.assertEqual(store.used, with_leftovers - 12010)
        self.assertEqual(store.used, store.usage())
        self.assertEqual(quota, store.used + 10 * 2**20 - 2 * margin)
