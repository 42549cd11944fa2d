"""
Tests for L{cluster_backup.scanner}: the synchronous walk on real temporary
trees, and L{scan} against the real reactor (it starts threads).
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time

from twisted.internet import reactor, task
from twisted.internet.defer import CancelledError
from twisted.python.threadable import isInIOThread
from twisted.trial import unittest

from tests import slow
from cluster_backup import scanner
from cluster_backup.records import FileRecord
from cluster_backup.scanner import ScanError, ScanResult, scan, walk


def chmod_blocks_reading() -> bool:
    """
    Whether a directory with mode 000 is unreadable to this process (not so
    for root with CAP_DAC_OVERRIDE / CAP_DAC_READ_SEARCH).
    """
    with tempfile.TemporaryDirectory() as tmp:
        os.chmod(tmp, 0)
        try:
            os.listdir(tmp)
        except PermissionError:
            return True
        finally:
            os.chmod(tmp, 0o700)
    return False


UNREADABLE_REASON = (
    "chmod 000 does not stop this process from reading (root): covered by "
    "the vanishing-directory tests; run under setpriv --bounding-set "
    "-dac_override,-dac_read_search to include"
)


def make(root: bytes, files: dict[bytes, bytes]) -> None:
    """Create C{files} (relative path -> content) under C{root}."""
    for rel, content in files.items():
        path = os.path.join(root, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(content)


def collect(batches) -> dict[bytes, FileRecord]:
    """All records of a walk by path, checking that no path comes twice."""
    seen: dict[bytes, FileRecord] = {}
    for records in batches:
        for r in records:
            assert r.path not in seen, r.path
            seen[r.path] = r
    return seen


class WalkTests(unittest.SynchronousTestCase):
    """L{walk} on real trees under the test's temporary directory."""

    def setUp(self) -> None:
        self.root = os.fsencode(os.path.abspath(self.mktemp()))
        os.makedirs(self.root)

    def walk(self, **kw) -> tuple[dict[bytes, FileRecord], ScanResult]:
        w = walk(self.root, **kw)
        return collect(w), w.result

    def test_nested(self) -> None:
        """
        Files at every depth become records with their path relative to the
        root, size and whole-second mtime; the result counts them.
        """
        files = {b"top": b"1", b"a/mid": b"22", b"a/b/c/deep": b"4444"}
        make(self.root, files)
        os.utime(os.path.join(self.root, b"a/mid"), ns=(0, 1_600_000_000_700_000_000))
        got, result = self.walk()
        self.assertEqual(sorted(got), sorted(files))
        self.assertEqual(
            {p: r.size for p, r in got.items()}, {p: len(c) for p, c in files.items()}
        )
        self.assertEqual(got[b"a/mid"].mtime, 1_600_000_000)
        self.assertEqual((result.files, result.bytes), (3, 7))
        self.assertTrue(result.complete)
        self.assertIsNone(result.error)

    def test_mtime_is_floor_of_nanoseconds(self) -> None:
        """
        The mtime is the kernel's whole seconds, even where the float
        C{st_mtime} rounds up to the next second.
        """
        make(self.root, {b"f": b""})
        ns = 1_700_000_000_999_999_999
        os.utime(os.path.join(self.root, b"f"), ns=(ns, ns))
        got, _ = self.walk()
        self.assertEqual(got[b"f"].mtime, 1_700_000_000)

    def test_text_root(self) -> None:
        """A root given as text gives the same bytes records and result root."""
        make(self.root, {b"caf\xe9/x": b"12"})
        w = walk(os.fsdecode(self.root))
        self.assertEqual(list(collect(w)), [b"caf\xe9/x"])
        self.assertEqual(w.result.root, self.root)

    def test_empty_root(self) -> None:
        """An empty root yields no batch and a complete, empty result."""
        w = walk(self.root)
        self.assertEqual(list(w), [])
        self.assertEqual((w.result.files, w.result.complete), (0, True))

    def test_odd_names(self) -> None:
        """
        Names that are not UTF-8 or hold newlines and spaces come back as
        the exact bytes.
        """
        names = [b"caf\xe9", b"new\nline and  spaces ", b"d\xff/x\ty"]
        make(self.root, {n: b"x" for n in names})
        got, _ = self.walk()
        self.assertEqual(sorted(got), sorted(names))

    def test_symlink_to_outside_file(self) -> None:
        """
        A symlink is a record of its own (size = length of its target),
        never followed out of the tree.
        """
        outside = os.fsencode(os.path.abspath(self.mktemp()))
        with open(outside, "wb") as f:
            f.write(b"y" * 1000)
        link = os.path.join(self.root, b"link")
        os.symlink(outside, link)
        os.utime(link, ns=(0, 1_500_000_000_000_000_000), follow_symlinks=False)
        got, result = self.walk()
        self.assertEqual(list(got), [b"link"])
        self.assertEqual(got[b"link"].size, len(outside))
        self.assertEqual(got[b"link"].mtime, 1_500_000_000)
        self.assertEqual(result.bytes, len(outside))

    def test_symlink_to_directory_not_descended(self) -> None:
        """
        A symlink to a directory, inside or outside the tree, is recorded
        as a link and not descended.
        """
        outside = os.fsencode(os.path.abspath(self.mktemp()))
        make(outside, {b"secret": b"s"})
        make(self.root, {b"real/f": b"f"})
        os.symlink(outside, os.path.join(self.root, b"out"))
        os.symlink(b"real", os.path.join(self.root, b"alias"))
        got, result = self.walk()
        self.assertEqual(sorted(got), [b"alias", b"out", b"real/f"])
        self.assertEqual(got[b"alias"].size, 4)
        self.assertTrue(result.complete)

    def test_dangling_symlink(self) -> None:
        """A symlink whose target does not exist is still a record."""
        os.symlink(b"nowhere/at/all", os.path.join(self.root, b"dangling"))
        got, result = self.walk()
        self.assertEqual(got[b"dangling"].size, len(b"nowhere/at/all"))
        self.assertTrue(result.complete)

    def test_fifo_skipped_and_counted(self) -> None:
        """A fifo is no record, is counted, and does not make a scan incomplete."""
        make(self.root, {b"d/f": b"f"})
        os.mkfifo(os.path.join(self.root, b"d/pipe"))
        got, result = self.walk()
        self.assertEqual(list(got), [b"d/f"])
        self.assertEqual(result.specials, 1)
        self.assertTrue(result.complete)

    def test_exclude_base_name_at_any_depth(self) -> None:
        """A pattern without C{/} matches the base name at any depth."""
        make(
            self.root,
            {b"a.tmp": b"", b"d/b.tmp": b"", b"d/e/c.tmp": b"", b"d/tmp.txt": b""},
        )
        got, result = self.walk(exclude=["*.tmp"])
        self.assertEqual(list(got), [b"d/tmp.txt"])
        self.assertEqual(result.excluded, 3)
        self.assertTrue(result.complete)

    def test_exclude_path(self) -> None:
        """
        A pattern with a C{/} matches the whole relative path; a leading
        C{/} anchors a single name at the top; C{*} crosses C{/} as in
        C{fnmatch}.
        """
        make(
            self.root,
            {
                b"x.log": b"",
                b"d/x.log": b"",
                b"d/e/x.log": b"",
                b"d/e/f/y.log": b"",
                b"top": b"",
                b"d/top": b"",
            },
        )
        got, _ = self.walk(exclude=["d/e/*.log", "/top"])
        self.assertEqual(sorted(got), [b"d/top", b"d/x.log", b"x.log"])

    def test_excluded_directory_not_descended(self) -> None:
        """An excluded directory is skipped whole: nothing below it is looked at."""
        make(self.root, {b"keep": b"", b"a/cache/1": b"", b"a/cache/2/3": b""})
        # Would be counted as a special file if the walk went in.
        os.mkfifo(os.path.join(self.root, b"a/cache/pipe"))
        got, result = self.walk(exclude=["cache"])
        self.assertEqual(list(got), [b"keep"])
        self.assertEqual((result.excluded, result.specials), (1, 0))

    def test_exclude_directories_only(self) -> None:
        """A trailing C{/} matches directories only."""
        make(self.root, {b"build/out": b"", b"src/build": b"file named build"})
        got, _ = self.walk(exclude=["build/"])
        self.assertEqual(list(got), [b"src/build"])

    def test_exclude_non_utf8(self) -> None:
        """
        A non-UTF-8 name is excluded by a bytes pattern or by its
        C{os.fsdecode} text; other names are kept.
        """
        make(self.root, {b"caf\xe9": b"", b"cafe": b""})
        for pattern in (b"caf\xe9", os.fsdecode(b"caf\xe9"), b"caf\xe9*"):
            got, _ = self.walk(exclude=[pattern])
            self.assertEqual(list(got), [b"cafe"], pattern)

    def test_bad_exclude_pattern(self) -> None:
        """An empty pattern (or only slashes) is refused."""
        self.assertRaises(ValueError, walk, self.root, exclude=["/"])

    def test_skip_by_path(self) -> None:
        """A store inside the source is not descended."""
        make(self.root, {b"f": b"", b"store/host/copy": b""})
        got, result = self.walk(skip=[os.path.join(self.root, b"store")])
        self.assertEqual(list(got), [b"f"])
        self.assertEqual(result.skipped, 1)
        self.assertTrue(result.complete)

    def test_skip_via_symlinked_alias(self) -> None:
        """
        A skip directory given through a symlink is still recognised, as
        is one given by real path when the root itself is reached through a
        symlink.
        """
        make(self.root, {b"f": b"", b"store/copy": b""})
        alias = os.fsencode(os.path.abspath(self.mktemp()))
        os.symlink(os.path.join(self.root, b"store"), alias)
        got, _ = self.walk(skip=[alias])
        self.assertEqual(list(got), [b"f"])

        root_alias = os.fsencode(os.path.abspath(self.mktemp()))
        os.symlink(self.root, root_alias)
        w = walk(root_alias, skip=[os.path.join(self.root, b"store")])
        self.assertEqual(list(collect(w)), [b"f"])

    def test_skip_by_inode(self) -> None:
        """
        A directory is recognised by (st_dev, st_ino) even under a path
        that is not its real path (a bind mount, which a test cannot make).
        """
        store = os.path.join(self.root, b"store")
        os.mkdir(store)
        st = os.stat(store)
        skipper = scanner._Skipper([store])
        self.assertTrue(skipper(b"/somewhere/else", (st.st_dev, st.st_ino)))
        self.assertTrue(skipper(os.path.realpath(store), (0, 0)))
        self.assertFalse(skipper(b"/somewhere/else", (st.st_dev, st.st_ino + 1)))

    def test_skip_missing_dir_by_path(self) -> None:
        """A skip directory that does not exist (yet) is compared by path."""
        store = os.path.join(self.root, b"store")
        w = walk(self.root, skip=[store])
        make(self.root, {b"store/x": b"", b"y": b""})
        self.assertEqual(list(collect(w)), [b"y"])

    def test_relative_skip_refused(self) -> None:
        """A relative skip directory is ambiguous and refused."""
        self.assertRaises(ValueError, walk, self.root, skip=["store"])

    def test_root_in_skip(self) -> None:
        """Scanning a skipped directory is an error, not an empty result."""
        e = self.assertRaises(ScanError, walk, self.root, skip=[self.root])
        self.assertIn(repr(self.root), str(e))

    def test_missing_root(self) -> None:
        """A missing root raises L{ScanError} naming it, at once."""
        missing = os.path.join(self.root, b"gone")
        e = self.assertRaises(ScanError, walk, missing)
        self.assertIn(repr(missing), str(e))
        self.assertIn("does not exist", str(e))

    def test_root_not_a_directory(self) -> None:
        """A root that is a file raises L{ScanError}."""
        make(self.root, {b"file": b""})
        path = os.path.join(self.root, b"file")
        e = self.assertRaises(ScanError, walk, path)
        self.assertIn("not a directory", str(e))

    def test_root_symlink_followed(self) -> None:
        """The root itself may be a symlink to a directory."""
        make(self.root, {b"f": b""})
        alias = os.fsencode(os.path.abspath(self.mktemp()))
        os.symlink(self.root, alias)
        self.assertEqual(list(collect(walk(alias))), [b"f"])

    def test_unreadable_root(self) -> None:
        """A root that cannot be listed raises L{ScanError} naming it."""
        if not chmod_blocks_reading():
            raise unittest.SkipTest(UNREADABLE_REASON)
        os.chmod(self.root, 0)
        self.addCleanup(os.chmod, self.root, 0o700)
        e = self.assertRaises(ScanError, list, walk(self.root))
        self.assertIn(repr(self.root), str(e))

    def test_unreadable_subdirectory(self) -> None:
        """
        A subdirectory that cannot be listed is counted and named, the rest
        is scanned, and the scan is incomplete.
        """
        if not chmod_blocks_reading():
            raise unittest.SkipTest(UNREADABLE_REASON)
        make(self.root, {b"ok": b"", b"locked/f": b""})
        locked = os.path.join(self.root, b"locked")
        os.chmod(locked, 0)
        self.addCleanup(os.chmod, locked, 0o700)
        got, result = self.walk()
        self.assertEqual(list(got), [b"ok"])
        self.assertFalse(result.complete)
        self.assertEqual(result.missed_paths, [(b"locked", "Permission denied")])

    def test_directory_vanishes_mid_scan(self) -> None:
        """
        A directory removed after it was found but before it was listed is
        counted and named; the scan goes on and is incomplete.
        """
        make(self.root, {b"a/1": b"", b"a/2": b"", b"b/1": b"", b"b/2": b""})
        w = walk(self.root, batch=1)
        first = next(w)
        # Both directories were found before any record: the other one is
        # still waiting to be listed.
        other = b"b" if first[0].path.startswith(b"a/") else b"a"
        shutil.rmtree(os.path.join(self.root, other))
        rest = collect(w)
        self.assertEqual(len(rest), 1)
        self.assertFalse(any(p.startswith(other) for p in rest))
        self.assertFalse(w.result.complete)
        self.assertEqual(w.result.missed, 1)
        self.assertEqual(w.result.missed_paths, [(other, "vanished during the scan")])
        self.assertIn(repr(other), w.result.error)

    def test_file_vanishes_mid_scan(self) -> None:
        """
        A file listed but gone before its lstat is counted and named, and
        makes the scan incomplete.
        """
        make(self.root, {b"f1": b"", b"f2": b"", b"f3": b""})
        w = walk(self.root, batch=1)
        first = next(w)[0].path
        gone = sorted({b"f1", b"f2", b"f3"} - {first})
        for name in gone:
            os.unlink(os.path.join(self.root, name))
        self.assertEqual(list(w), [])
        self.assertEqual(w.result.files, 1)
        self.assertEqual(w.result.missed, 2)
        self.assertEqual(sorted(p for p, _ in w.result.missed_paths), gone)
        self.assertFalse(w.result.complete)

    def test_missed_paths_listed_up_to_limit(self) -> None:
        """All missed paths are counted, only the first few are listed."""
        many = scanner.MAX_LISTED + 5
        make(self.root, {b"f%03d" % i: b"" for i in range(many + 1)})
        w = walk(self.root, batch=1)
        first = next(w)[0].path
        for name in os.listdir(self.root):
            if name != first:
                os.unlink(os.path.join(self.root, name))
        list(w)
        self.assertEqual(w.result.missed, many)
        self.assertEqual(len(w.result.missed_paths), scanner.MAX_LISTED)

    def test_batch_sizes(self) -> None:
        """Batches hold C{batch} records each, except a smaller last one."""
        make(self.root, {b"d%d/f%02d" % (i % 3, i): b"" for i in range(25)})
        w = walk(self.root, batch=10)
        sizes = [len(b) for b in w]
        self.assertEqual(sizes, [10, 10, 5])
        self.assertEqual(w.result.files, 25)

    def test_bad_batch(self) -> None:
        """A batch below 1 is refused."""
        self.assertRaises(ValueError, walk, self.root, batch=0)

    def test_records_are_file_records(self) -> None:
        """
        The walk's records (built without the path validator) are the
        records C{FileRecord()} builds: same type, equal, same hash.
        """
        make(self.root, {b"a": b"1", b"d/b": b"22"})
        os.symlink(b"a", os.path.join(self.root, b"d/link"))
        got, _ = self.walk()
        for path, record in got.items():
            st = os.lstat(os.path.join(self.root, path))
            expected = FileRecord(path, st.st_size, scanner.mtime_of(st))
            self.assertIs(type(record), FileRecord)
            self.assertEqual(record, expected)
            self.assertEqual(hash(record), hash(expected))
        self.assertEqual(len(got), 3)

    def test_negative_mtime(self) -> None:
        """
        A time before 1970 is floored to whole seconds too (-1.5 s is -2),
        as L{scanner.mtime_of} does, not truncated toward zero.
        """
        make(self.root, {b"old": b""})
        path = os.path.join(self.root, b"old")
        try:
            os.utime(path, ns=(0, -1_500_000_000))
        except OSError as e:
            raise unittest.SkipTest(f"no times before 1970 here: {e}")
        if os.lstat(path).st_mtime_ns != -1_500_000_000:
            raise unittest.SkipTest("this filesystem does not keep times before 1970")
        got, _ = self.walk()
        self.assertEqual(got[b"old"].mtime, -2)
        self.assertEqual(got[b"old"].mtime, scanner.mtime_of(os.lstat(path)))

    def test_large_directory_streamed(self) -> None:
        """
        A directory larger than L{scanner.LIST_AT_ONCE} is read as a
        stream, never listed whole; smaller ones are listed at once.  Both
        give all their files.
        """
        files = {b"small/f": b""}
        files.update({b"big/f%04d" % i: b"" for i in range(300)})
        make(self.root, files)
        sizes = {d: os.stat(os.path.join(self.root, d)).st_size for d in (b"", b"small", b"big")}
        limit = max(sizes[b""], sizes[b"small"])
        if sizes[b"big"] <= limit:
            raise unittest.SkipTest(f"directory sizes here do not grow: {sizes}")
        self.patch(scanner, "LIST_AT_ONCE", limit)
        listed = []
        real_listdir = os.listdir

        def listdir(path):
            listed.append(os.path.relpath(path, self.root))
            return real_listdir(path)

        self.patch(os, "listdir", listdir)
        got, result = self.walk()
        self.assertEqual(sorted(got), sorted(files))
        self.assertEqual(sorted(listed), [b".", b"small"])
        self.assertTrue(result.complete)

    def test_vanished_directory_excluded_by_pattern(self) -> None:
        """
        An entry that matches a directories-only pattern and is gone before
        its lstat (so it cannot be known to be a directory) counts as
        excluded, not as missed: a churning excluded directory never makes
        a scan incomplete.  Any other entry gone before its lstat is missed.
        """
        make(self.root, {b"keep": b"", b"a/cache/x": b"", b"a/other": b""})
        real_lstat = os.lstat
        gone = {b"cache", b"other"}

        def lstat(path, *, dir_fd=None):
            if path in gone:
                raise FileNotFoundError(2, "No such file or directory", path)
            return real_lstat(path, dir_fd=dir_fd)

        self.patch(os, "lstat", lstat)
        got, result = self.walk(exclude=["cache/"])
        self.assertEqual(list(got), [b"keep"])
        self.assertEqual((result.excluded, result.missed), (1, 1))
        self.assertEqual(result.missed_paths, [(b"a/other", "vanished during the scan")])


class StreamedWalkTests(WalkTests):
    """The L{WalkTests} again, with every directory read as a stream."""

    def setUp(self) -> None:
        super().setUp()
        self.patch(scanner, "LIST_AT_ONCE", -1)

    def test_large_directory_streamed(self) -> None:
        """Covered by L{WalkTests} (it sets the limit itself)."""


@slow
class BindMountTests(unittest.SynchronousTestCase):
    """
    L{walk} across real bind mounts, made in a private mount namespace by
    C{unshare -m} (root, or a kernel allowing it); skipped where that fails.
    """

    def setUp(self) -> None:
        self.root = os.path.abspath(self.mktemp())
        make(os.fsencode(self.root), {b"a/f": b"", b"store/copy": b""})
        os.mkdir(os.path.join(self.root, "a", "loop"))
        self.alias = os.path.abspath(self.mktemp())
        os.mkdir(self.alias)

    def walk_with_mounts(self, mounts: list[tuple[str, str]], skip: list[str]):
        """Walk C{self.root} in a namespace with C{mounts}; paths, result."""
        unshare = shutil.which("unshare")
        if unshare is None:
            raise unittest.SkipTest("no unshare(1)")
        code = (
            "import sys\n"
            "from cluster_backup.scanner import walk\n"
            "w = walk(sys.argv[1], skip=sys.argv[2:])\n"
            "print(sorted(r.path for b in w for r in b), w.result.skipped)\n"
        )
        script = "".join(
            f"mount --bind {shlex.quote(src)} {shlex.quote(dst)} || exit 77; "
            for src, dst in mounts
        )
        script += shlex.join([sys.executable, "-c", code, self.root, *skip])
        project = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = dict(os.environ, PYTHONPATH=project)
        run = subprocess.run(
            [unshare, "-m", "sh", "-c", script], capture_output=True, env=env
        )
        if run.returncode in (1, 77) and b"Traceback" not in run.stderr:
            raise unittest.SkipTest(f"cannot bind mount here: {run.stderr!r}")
        self.assertEqual(run.returncode, 0, run.stderr)
        return run.stdout.decode()

    def test_skip_bind_mounted_alias(self) -> None:
        """
        A store given by a bind-mounted alias (different real path, same
        inode) is not descended.
        """
        store = os.path.join(self.root, "store")
        out = self.walk_with_mounts([(store, self.alias)], [self.alias])
        self.assertEqual(out, "[b'a/f'] 1\n")

    def test_bind_mount_loop(self) -> None:
        """A directory bind-mounted below itself is not descended again."""
        loop = os.path.join(self.root, "a", "loop")
        out = self.walk_with_mounts([(self.root, loop)], [])
        self.assertEqual(out, "[b'a/f', b'store/copy'] 1\n")


class ScanTests(unittest.TestCase):
    """L{scan} with the real reactor and its thread pool."""

    def setUp(self) -> None:
        self.root = os.fsencode(os.path.abspath(self.mktemp()))
        self.paths = [b"d%d/f%02d" % (i % 4, i) for i in range(30)]
        make(self.root, {p: b"x" * i for i, p in enumerate(self.paths)})

    def test_batches_on_reactor_thread(self) -> None:
        """
        Every batch reaches C{on_batch} on the reactor thread, in chunks of
        C{batch}, and the result counts them all.
        """
        reactor_thread = threading.get_ident()
        calls: list[tuple[int, bool, list[FileRecord]]] = []

        def on_batch(records):
            calls.append((threading.get_ident(), isInIOThread(), records))

        d = scan(self.root, on_batch, batch=7, reactor=reactor)

        def check(result):
            self.assertEqual({(t, io) for t, io, _ in calls}, {(reactor_thread, True)})
            self.assertEqual([len(r) for _, _, r in calls], [7, 7, 7, 7, 2])
            paths = sorted(r.path for _, _, rs in calls for r in rs)
            self.assertEqual(paths, sorted(self.paths))
            self.assertEqual((result.files, result.bytes), (30, sum(range(30))))
            self.assertTrue(result.complete)

        return d.addCallback(check)

    def test_walk_runs_in_another_thread(self) -> None:
        """The directory walk itself does not run on the reactor thread."""
        reactor_thread = threading.get_ident()
        threads = []
        real_walk = scanner.walk

        def spy(*a, **kw):
            threads.append(threading.get_ident())
            return real_walk(*a, **kw)

        self.patch(scanner, "walk", spy)
        d = scan(self.root, lambda records: None, reactor=reactor)

        def check(result):
            self.assertEqual(len(threads), 1)
            self.assertNotEqual(threads[0], reactor_thread)

        return d.addCallback(check)

    def test_missing_root(self) -> None:
        """A missing root fails the L{Deferred} with L{ScanError}."""
        missing = os.path.join(self.root, b"gone")
        d = scan(missing, lambda records: None, reactor=reactor)
        return self.assertFailure(d, ScanError)

    def test_on_batch_error_stops(self) -> None:
        """
        An exception from C{on_batch} fails the scan with it, and no more
        batches are delivered.
        """
        calls = []

        def on_batch(records):
            calls.append(records)
            time.sleep(0.1)  # let the walk thread hand over more batches
            raise ZeroDivisionError()

        d = scan(self.root, on_batch, batch=1, reactor=reactor)
        d = self.assertFailure(d, ZeroDivisionError)
        return d.addCallback(lambda _: self.assertEqual(len(calls), 1))

    def test_backpressure(self) -> None:
        """
        The walk thread runs at most C{depth} batches ahead of the
        reactor, so its memory stays bounded however slow the receiver.
        """
        produced: list[int] = []
        real_walk = scanner.walk

        def counting_walk(*a, **kw):
            return CountingWalk(real_walk(*a, **kw), produced)

        self.patch(scanner, "walk", counting_walk)
        ahead = []

        def on_batch(records):
            if not ahead:
                time.sleep(0.3)  # a slow receiver, holding the reactor
                ahead.append(len(produced))

        d = scan(self.root, on_batch, batch=1, depth=2, reactor=reactor)

        def check(result):
            # 2 handed over (one of them being consumed) + 1 waiting for a
            # slot; without backpressure all 30 would be out by now.
            self.assertLessEqual(ahead[0], 3)
            self.assertEqual(len(produced), 30)
            self.assertEqual(result.files, 30)

        return d.addCallback(check)

    def test_cancel(self) -> None:
        """
        Cancelling the scan fails it with L{CancelledError} and no batch
        is delivered after, even those already handed to the reactor.
        """
        calls = []

        def on_batch(records):
            calls.append(records)
            if len(calls) == 1:
                time.sleep(0.1)  # let the walk thread hand over more batches
                scanning.cancel()

        scanning = scan(self.root, on_batch, batch=1, depth=4, reactor=reactor)
        d = self.assertFailure(scanning, CancelledError)
        d.addCallback(lambda _: task.deferLater(reactor, 0.3, lambda: None))
        d.addCallback(lambda _: self.assertEqual(len(calls), 1))
        return d


class CountingWalk:
    """A L{scanner.Walk} that notes the size of each batch it produces."""

    def __init__(self, walk: scanner.Walk, produced: list[int]):
        self.walk = walk
        self.result = walk.result
        self.produced = produced

    def __iter__(self):
        return self

    def __next__(self):
        records = next(self.walk)
        self.produced.append(len(records))
        return records

    def close(self):
        self.walk.close()
