"""
Tests for L{cluster_backup.restore}: the pure planning and checks, then
C{cbackup restore} run as a subprocess with real rsync against store folders
built by hand in the layout of DESIGN.md rule 6, and (class
L{ClusterRestoreTests}, marked C{slow}) a restore from a real cluster whose
processes were stopped first.
"""

from __future__ import annotations

import os
import subprocess
import sys

from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import SynchronousTestCase, TestCase

from cluster_backup.config import Source, Store
from cluster_backup.restore import (
    STATE,
    Entry,
    RestoreError,
    check_destination,
    check_subpath,
    list_remote,
    looks_like_temp,
    marker_text,
    parse_find,
    plan,
)
from cluster_backup.store import KEPT

from tests import slow


T0 = 1_600_000_000




def e(path: bytes, size: int = 1, mtime: int = T0, kind: str = "file") -> Entry:
    return Entry(path, kind, size, mtime)


def listing(*entries: Entry) -> dict:
    return {x.path: x for x in entries}


def chosen_from(p) -> dict:
    """path -> (store id, entry) of a plan."""
    return {x.path: (sid, x) for sid, xs in p.chosen.items() for x in xs}


class PlanTests(SynchronousTestCase):
    def test_newest_wins(self):
        p = plan([("s1", listing(e(b"f", 5, T0 + 10), e(b"only1"))),
                  ("s2", listing(e(b"f", 9, T0)))])
        got = chosen_from(p)
        self.assertEqual(got[b"f"], ("s1", e(b"f", 5, T0 + 10)))
        self.assertEqual(got[b"only1"][0], "s1")
        self.assertEqual(p.differing, 1)
        self.assertEqual((p.files, p.bytes), (2, 6))

    def test_newest_wins_in_a_later_store(self):
        p = plan([("s1", listing(e(b"f", 9, T0))), ("s2", listing(e(b"f", 5, T0 + 1)))])
        self.assertEqual(chosen_from(p)[b"f"], ("s2", e(b"f", 5, T0 + 1)))
        self.assertEqual(list(p.chosen), ["s2"])  # stores with nothing to copy: no run

    def test_same_mtime_larger_size_wins(self):
        p = plan([("s1", listing(e(b"f", 3))), ("s2", listing(e(b"f", 4)))])
        self.assertEqual(chosen_from(p)[b"f"][0], "s2")

    def test_full_tie_takes_the_first_store(self):
        p = plan([("s1", listing(e(b"f"))), ("s2", listing(e(b"f"))), ("s3", listing(e(b"f")))])
        self.assertEqual(chosen_from(p)[b"f"][0], "s1")
        self.assertEqual(p.differing, 0)

    def test_subpath_filters_by_component(self):
        files = listing(e(b"a/x"), e(b"a/b/y"), e(b"ab/z"), e(b"a"), e(b"top"))
        self.assertEqual(sorted(chosen_from(plan([("s", files)], b"a"))),
                         [b"a", b"a/b/y", b"a/x"])
        self.assertEqual(sorted(chosen_from(plan([("s", files)], b"a/b"))), [b"a/b/y"])
        self.assertEqual(len(chosen_from(plan([("s", files)]))), 5)

    def test_rsync_temp_names_skipped_real_dotfiles_kept(self):
        files = listing(e(b"d/.big.bin.Xy3kQ9"), e(b".bashrc.backup"), e(b".f.ABCDE"),
                        e(b"plain"))
        p = plan([("s", files)])
        self.assertEqual(p.skipped, (b"d/.big.bin.Xy3kQ9",))
        self.assertEqual(sorted(chosen_from(p)), [b".bashrc.backup", b".f.ABCDE", b"plain"])
        self.assertTrue(looks_like_temp(b".new\nline.a1B2c3"))
        self.assertFalse(looks_like_temp(b"x.a1B2c3"))

    def test_empty(self):
        p = plan([("s1", {}), ("s2", {})])
        self.assertEqual((p.files, p.bytes, p.chosen), (0, 0, {}))


class SubpathTests(SynchronousTestCase):
    def test_accepted(self):
        self.assertIsNone(check_subpath(None))
        self.assertEqual(check_subpath("a/b/"), b"a/b")
        self.assertEqual(check_subpath(os.fsdecode(b"caf\xe9")), b"caf\xe9")

    def test_refused(self):
        for bad in ("/etc", "../x", "a/../b", "a/./b", "a//b", "..", ".", ""):
            with self.subTest(bad=bad):
                self.assertRaises(RestoreError, check_subpath, bad)


class FindListingTests(SynchronousTestCase):
    def test_parse(self):
        out = (b"f 12 1600000000.9999999990 ./a/b\0"
               b"l 3 1600000001.0000000000 ./new\nline\0"
               b"f 1 1599999999.5 ./caf\xe9\0"
               b"d 4096 1600000000.0 ./dir\0"
               b"f x 1 ./bad-size\0"
               b"f 1 1 ./a/../escape\0")
        self.assertEqual(parse_find(out), {
            b"a/b": Entry(b"a/b", "file", 12, T0),
            b"new\nline": Entry(b"new\nline", "link", 3, T0 + 1),
            b"caf\xe9": Entry(b"caf\xe9", "file", 1, T0 - 1),
        })

    def test_remote_command_run_by_a_shell(self):
        """The ssh command, run by a local shell in place of ssh, lists the store."""
        base = os.fsencode(os.path.abspath(self.mktemp()))
        root = os.path.join(base, b"store", b"h", b"src dir")
        os.makedirs(os.path.join(root, b"sub 'q'"))
        for name in (b"sub 'q'/f$x", b"new\nline", b"caf\xe9"):
            with open(os.path.join(root, name), "wb") as f:
                f.write(b"12345")
            os.utime(os.path.join(root, name), (T0, T0))
        os.symlink(b"caf\xe9", os.path.join(root, b"link"))
        calls = []

        def fake_ssh(argv, **kw):
            calls.append(argv)
            return subprocess.run(["sh", "-c", argv[-1]], **kw)

        store = os.fsdecode(os.path.join(base, b"store"))
        got = list_remote("h", store, root, None, run=fake_ssh)
        self.assertEqual(calls[0][0], "ssh")
        self.assertEqual(sorted(got), [b"caf\xe9", b"link", b"new\nline", b"sub 'q'/f$x"])
        self.assertEqual(got[b"new\nline"], Entry(b"new\nline", "file", 5, T0))
        self.assertEqual(got[b"link"].kind, "link")
        self.assertEqual(sorted(list_remote("h", store, root, b"sub 'q'", run=fake_ssh)),
                         [b"sub 'q'/f$x"])
        self.assertEqual(list_remote("h", store, root, b"absent", run=fake_ssh), {})
        self.assertEqual(list_remote("h", store, os.path.join(root, b"none"), None,
                                     run=fake_ssh), {})
        from cluster_backup.restore import ReadError
        self.assertRaises(ReadError, list_remote, "h", store + "-gone", root, None, run=fake_ssh)


class DestinationTests(SynchronousTestCase):
    def setUp(self):
        self.base = os.fsencode(os.path.abspath(self.mktemp()))
        os.makedirs(self.base)
        self.marker = marker_text(Source("h", "/src"), None)

    def check(self, to, force=False, stores=(), source=None):
        return check_destination(to, force=force, marker=self.marker, stores=stores,
                                 source_here=source)

    def test_missing_or_empty_is_fine(self):
        self.assertFalse(self.check(os.path.join(self.base, b"new", b"deeper")))
        self.assertFalse(self.check(self.base))

    def test_not_empty_needs_force(self):
        open(os.path.join(self.base, b"x"), "w").close()
        self.assertRaises(RestoreError, self.check, self.base)
        self.assertFalse(self.check(self.base, force=True))

    def test_own_state_resumes_without_force(self):
        os.makedirs(os.path.join(self.base, STATE))
        with open(os.path.join(self.base, STATE, b"restoring"), "wb") as f:
            f.write(self.marker)
        open(os.path.join(self.base, b"x"), "w").close()
        self.assertTrue(self.check(self.base))
        with open(os.path.join(self.base, STATE, b"restoring"), "wb") as f:
            f.write(marker_text(Source("h", "/other"), None))
        self.assertRaises(RestoreError, self.check, self.base)

    def test_symlinked_component_refused(self):
        real = os.path.join(self.base, b"real")
        os.makedirs(real)
        os.symlink(real, os.path.join(self.base, b"link"))
        with self.assertRaises(RestoreError) as c:
            self.check(os.path.join(self.base, b"link", b"to"))
        self.assertIn("link is a symlink", str(c.exception))

    def test_inside_store_refused(self):
        store = os.path.join(self.base, b"store")
        for to in (store, os.path.join(store, b"x")):
            self.assertRaises(RestoreError, self.check, to, True, [store])
        self.assertFalse(self.check(os.path.join(self.base, b"storex"), stores=[store]))

    def test_source_needs_force(self):
        src = os.path.join(self.base, b"src")
        self.assertRaises(RestoreError, self.check, src, False, (), src)
        self.assertRaises(RestoreError, self.check, os.path.join(src, b"a"), False, (), src)
        self.assertFalse(self.check(src, True, (), src))

    def test_not_a_folder(self):
        path = os.path.join(self.base, b"file")
        open(path, "w").close()
        self.assertRaises(RestoreError, self.check, path, True)


class ServerQueryTests(SynchronousTestCase):
    """L{no_copy} over iosim against a real L{Ledger} and server protocol."""

    SECRET = b"s3cret"

    def setUp(self):
        from twisted.internet.task import Clock
        from twisted.protocols import amp
        from twisted.test.iosim import connectedServerAndClient

        from cluster_backup.ledger import Ledger
        from cluster_backup.records import FileRecord
        from cluster_backup.responder import ServerProtocol

        self.source = Source("h1", "/data")
        self.store_a, self.store_b = Store("h2", "/st"), Store("h3", "/st")
        clock = Clock()
        self.ledger = Ledger(self.source.id, 2, clock,
                             {self.store_a.id: "h2", self.store_b.id: "h3"})
        files = [FileRecord(p, 10, T0) for p in
                 (b"held/one", b"held/two", b"lost/one", b"lost/two", b"lost2", b"top")]
        self.ledger.scan_started()
        self.ledger.scan_batch(files)
        self.ledger.scan_finished(True)
        self.held = files[:2] + files[-1:]
        self.server = ServerProtocol({self.source.id: self.ledger},
                                     {self.store_a.id: "h2", self.store_b.id: "h3"},
                                     self.SECRET, "h1", lambda source: None, clock)
        self.client, _, self.pump = connectedServerAndClient(
            lambda: self.server, amp.AMP, clock=clock)

    def ask(self, subpath=None, secret=SECRET):
        from twisted.internet.defer import Deferred

        from cluster_backup.restore import no_copy

        d = Deferred.fromCoroutine(no_copy(self.client, self.store_b, self.source, subpath,
                                           secret))
        self.pump.flush()
        return self.successResultOf(d)

    def report_all(self):
        for store, held in ((self.store_a.id, self.held), (self.store_b.id, [])):
            self.ledger.inventory_started(store)
            self.ledger.report(store, held)
            self.ledger.inventory_finished(store)

    def test_files_with_no_copy(self):
        self.report_all()
        view = self.ask()
        self.assertFalse(view.safemode)
        self.assertTrue(view.complete)
        self.assertEqual(sorted(view.missing), [b"lost/one", b"lost/two", b"lost2"])
        self.assertEqual(sorted(self.ask(b"lost").missing), [b"lost/one", b"lost/two"])

    def test_safemode_says_so(self):
        self.assertTrue(self.ask().safemode)

    def test_report(self):
        import io

        from cluster_backup.restore import ServerView, report_server

        out, err = io.StringIO(), io.StringIO()
        view = ServerView((b"lost/one", b"new\nline", b"old"), True, False)
        self.assertEqual(report_server(view, {b"old"}, out, err, self.source), 2)
        self.assertIn("3 files of h1:/data have no current copy", out.getvalue())
        self.assertIn("1 of them are restored at an older version", out.getvalue())
        self.assertIn("not restored: new\\#012line", out.getvalue())
        self.assertEqual(report_server("refused", set(), out, err, self.source), 0)
        self.assertIn("could not ask h1's server", err.getvalue())


# --- whole command, real rsync, stores built by hand --------------------------

SRC_HOST, SRC_PATH = "src1", "/data/photos"
NEW = T0 + 1000


def write(path: bytes, data: bytes, mtime: int = T0) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
    os.utime(path, (mtime, mtime))


def tree(root: bytes) -> dict:
    """relpath -> ("link", target) or ("file", bytes, mtime) of everything under root."""
    out = {}
    for folder, dirs, names in os.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            rel = os.path.relpath(path, root)
            if os.path.islink(path):
                out[rel] = ("link", os.readlink(path))
            else:
                with open(path, "rb") as f:
                    out[rel] = ("file", f.read(), os.lstat(path).st_mtime_ns // 10**9)
    return out


class CommandTests(SynchronousTestCase):
    """C{cbackup restore --local} over three hand-built stores."""

    def setUp(self):
        self.base = os.path.abspath(self.mktemp())
        os.makedirs(self.base)
        self.stores = [os.path.join(self.base, n) for n in ("st-a", "st-b", "st-c")]
        conf = ["options: PORT: 1", f"server: {SRC_HOST}:{SRC_PATH}", "copies: 2",
                "address: 127.0.0.1"]  # nothing listens on port 1: the server is gone
        for i, s in enumerate(self.stores):
            conf += [f"backup: host{i}:{s}", "size: 1g"]
        self.config = os.path.join(self.base, "cluster.conf")
        with open(self.config, "w") as f:
            f.write("\n".join(conf) + "\n")
        a, b, c = (self.src(s) for s in self.stores)
        # The expected restore, and where each file comes from.
        write(a + b"/only-a.txt", b"only in a\n")
        write(b + b"/dir/only-b.bin", bytes(range(256)) * 50)
        write(a + b"/dir/changed.txt", b"old version, longer than the new one\n", T0)
        write(b + b"/dir/changed.txt", b"new version\n", NEW)
        write(c + b"/dir/changed.txt", b"old version, longer than the new one\n", T0)
        write(c + b"/caf\xe9-latin1", b"non-utf8\n")
        write(a + b"/new\nline", b"newline\n")
        write(b + b"/new\nline", b"newline\n")
        write(c + b"/sub/deep/x.dat", b"x" * 100_000)
        write(c + b"/sub/y.dat", b"y")
        write(a + b"/sub/z.dat", b"zz")
        write(a + b"/#hash and ;semi", b"comment-like names\n")
        os.symlink(b"dir/changed.txt", a + b"/link")
        # Not data: a store's state folder, with layout-looking content.
        for s in self.stores:
            write(os.fsencode(s) + b"/.cbackup/partial/changed.txt", b"partial junk")
            write(os.fsencode(s) + b"/.cbackup/" + os.fsencode(SRC_HOST)
                  + os.fsencode(SRC_PATH) + b"/ghost", b"not a file of the source")
        # Another source's files in the same store are not restored either.
        write(os.fsencode(self.stores[0]) + b"/other/data/photos/elsewhere", b"no")
        self.expected = {
            b"only-a.txt": ("file", b"only in a\n", T0),
            b"dir/only-b.bin": ("file", bytes(range(256)) * 50, T0),
            b"dir/changed.txt": ("file", b"new version\n", NEW),
            b"caf\xe9-latin1": ("file", b"non-utf8\n", T0),
            b"new\nline": ("file", b"newline\n", T0),
            b"sub/deep/x.dat": ("file", b"x" * 100_000, T0),
            b"sub/y.dat": ("file", b"y", T0),
            b"sub/z.dat": ("file", b"zz", T0),
            b"#hash and ;semi": ("file", b"comment-like names\n", T0),
            b"link": ("link", b"dir/changed.txt"),
        }
        self.to = os.path.join(self.base, "restored")

    def src(self, store: str) -> bytes:
        return os.path.join(os.fsencode(store), os.fsencode(SRC_HOST),
                            os.fsencode(SRC_PATH).lstrip(b"/"))

    def restore(self, *extra: str, to=None, local=True) -> subprocess.CompletedProcess:
        argv = [sys.executable, "-m", "cluster_backup.cli", "restore", "-c", self.config,
                "--source", f"{SRC_HOST}:{SRC_PATH}", "--to", to or self.to, *extra]
        if local:
            argv.append("--local")
        return subprocess.run(argv, capture_output=True, timeout=120)

    def assertOk(self, result, code=0):
        self.assertEqual(result.returncode, code,
                         f"stdout:\n{result.stdout.decode(errors='replace')}\n"
                         f"stderr:\n{result.stderr.decode(errors='replace')}")

    def test_restore_everything_newest_wins(self):
        result = self.restore()
        self.assertOk(result)
        self.assertEqual(tree(os.fsencode(self.to)), self.expected)
        self.assertFalse(os.path.lexists(os.path.join(self.to, os.fsdecode(STATE))))
        self.assertIn(b"restored 10 files", result.stdout)
        self.assertIn(b"1 differed between stores", result.stdout)
        # Progress on stderr, per run and overall; the server (port 1) is gone.
        self.assertIn(b"overall 10/10 files", result.stderr)
        self.assertIn(b"could not ask src1's server", result.stderr)

    def kept(self, store: str, version: bytes) -> bytes:
        return os.path.join(os.fsencode(store), KEPT, version, os.fsencode(SRC_HOST),
                            os.fsencode(SRC_PATH).lstrip(b"/"))

    def test_kept_versions_and_as_of_a_time(self):
        """Rule 7: versions the source replaced are kept out of the layout; --at finds them."""
        oldest = T0 - 1000
        write(self.kept(self.stores[2], b"%d.4" % oldest) + b"/sub/y.dat", b"yold", oldest)
        write(self.kept(self.stores[0], b"%d.3" % (NEW + 10)) + b"/only-a.txt", b"new", NEW + 10)
        # Junk in the kept folder that is no version folder is not read.
        write(os.fsencode(self.stores[0]) + b"/" + KEPT + b"/junk/only-a.txt", b"junk")
        result = self.restore()
        self.assertOk(result)
        self.assertIn(b"kept versions: 2 of", result.stdout)
        got = tree(os.fsencode(self.to))
        self.assertEqual(got[b"only-a.txt"], ("file", b"new", NEW + 10))  # the newest anywhere
        self.assertEqual(got[b"sub/y.dat"], self.expected[b"sub/y.dat"])
        to2 = os.path.join(self.base, "as-of")
        result = self.restore("--at", f"@{oldest + 1}", to=to2)
        self.assertOk(result)
        self.assertEqual(tree(os.fsencode(to2)), {b"sub/y.dat": ("file", b"yold", oldest)})
        to3 = os.path.join(self.base, "as-of-t0")
        self.assertOk(self.restore("--at", f"@{T0}", to=to3))
        got = tree(os.fsencode(to3))
        self.assertEqual(got[b"dir/changed.txt"][1], b"old version, longer than the new one\n")
        self.assertEqual(got[b"only-a.txt"], self.expected[b"only-a.txt"])
        bad = self.restore("--at", "last tuesday", to=os.path.join(self.base, "x"))
        self.assertOk(bad, 2)
        self.assertIn(b"--at", bad.stderr)

    def test_sub_path(self):
        result = self.restore("--path", "sub/")
        self.assertOk(result)
        self.assertEqual(tree(os.fsencode(self.to)),
                         {k: v for k, v in self.expected.items() if k.startswith(b"sub/")})
        self.assertIn(b"restored 3 files", result.stdout)

    def test_sub_path_single_file(self):
        self.assertOk(self.restore("--path", "dir/changed.txt"))
        self.assertEqual(tree(os.fsencode(self.to)),
                         {b"dir/changed.txt": self.expected[b"dir/changed.txt"]})

    def test_dry_run_writes_nothing(self):
        result = self.restore("--dry-run")
        self.assertOk(result)
        self.assertFalse(os.path.lexists(self.to))
        self.assertIn(b"would restore 10 files", result.stdout)
        self.assertIn(b"copy\thost1:" + os.fsencode(self.stores[1]) + b"\tdir/changed.txt",
                      result.stdout)
        self.assertIn(b"new\\#012line", result.stdout)

    def test_refuses_non_empty_to(self):
        os.makedirs(self.to)
        write(os.fsencode(self.to) + b"/mine", b"keep me")
        result = self.restore()
        self.assertOk(result, 2)
        self.assertIn(b"is not empty; use --force", result.stderr)
        self.assertEqual(tree(os.fsencode(self.to)), {b"mine": ("file", b"keep me", T0)})
        self.assertOk(self.restore("--force"))
        self.assertEqual(tree(os.fsencode(self.to)),
                         {**self.expected, b"mine": ("file", b"keep me", T0)})

    def test_refuses_bad_paths(self):
        for bad in ("../x", "/etc", "a/../../x"):
            with self.subTest(path=bad):
                result = self.restore("--path", bad)
                self.assertOk(result, 2)
                self.assertIn(b"--path", result.stderr)
                self.assertFalse(os.path.lexists(self.to))

    def test_refuses_symlinked_to(self):
        real = os.path.join(self.base, "real")
        os.makedirs(real)
        os.symlink(real, os.path.join(self.base, "alias"))
        result = self.restore(to=os.path.join(self.base, "alias", "restored"))
        self.assertOk(result, 2)
        self.assertIn(b"is a symlink", result.stderr)
        self.assertEqual(os.listdir(real), [])

    def test_refuses_to_inside_a_store(self):
        result = self.restore(to=os.path.join(self.stores[1], "restored"))
        self.assertOk(result, 2)
        self.assertIn(b"inside the store", result.stderr)

    def test_symlink_inside_to_is_not_followed(self):
        outside = os.path.join(self.base, "outside")
        os.makedirs(outside)
        os.makedirs(self.to)
        os.symlink(outside, os.path.join(self.to, "dir"))
        self.assertOk(self.restore("--force"))
        self.assertEqual(os.listdir(outside), [])
        self.assertEqual(tree(os.fsencode(self.to)), self.expected)

    def test_unknown_store_is_an_error(self):
        result = self.restore("--store", "nohost:/nowhere")
        self.assertOk(result, 2)
        self.assertIn(b"not a store of", result.stderr)

    def test_chosen_stores_only(self):
        result = self.restore("--store", f"host0:{self.stores[0]}",
                              "--store", f"host2:{self.stores[2]}")
        self.assertOk(result)
        got = tree(os.fsencode(self.to))
        self.assertNotIn(b"dir/only-b.bin", got)
        self.assertEqual(got[b"dir/changed.txt"],
                         ("file", b"old version, longer than the new one\n", T0))

    def test_unreadable_store_is_a_warning(self):
        os.rename(self.stores[2], self.stores[2] + ".moved")
        result = self.restore()
        self.assertOk(result)
        self.assertIn(b"warning: cannot read store " + os.fsencode(self.stores[2]),
                      result.stderr)
        got = tree(os.fsencode(self.to))
        self.assertNotIn(b"sub/y.dat", got)
        self.assertEqual(got[b"only-a.txt"], self.expected[b"only-a.txt"])

    def test_no_readable_store_fails(self):
        for s in self.stores:
            os.rename(s, s + ".moved")
        result = self.restore()
        self.assertOk(result, 1)
        self.assertIn(b"no store could be read", result.stderr)

    def test_resume(self):
        self.assertOk(self.restore())
        to = os.fsencode(self.to)
        files = sorted(p for p, v in self.expected.items() if v[0] == "file")
        gone, kept = files[::2], files[1::2]
        before = {p: os.lstat(os.path.join(to, p)) for p in kept}
        for p in gone:
            os.unlink(os.path.join(to, p))
        result = self.restore("--force")
        self.assertOk(result)
        self.assertEqual(tree(to), self.expected)
        self.assertIn(b"restoring 10 files", result.stdout)
        self.assertIn(b"%d already there" % (len(self.expected) - len(gone)), result.stdout)
        for p in kept:  # untouched: same inode, no new change time
            st = os.lstat(os.path.join(to, p))
            self.assertEqual((st.st_ino, st.st_ctime_ns),
                             (before[p].st_ino, before[p].st_ctime_ns), p)

    def test_interrupted_run_resumes_without_force(self):
        """A state folder left by the same restore lets a rerun go on."""
        to = os.fsencode(self.to)
        os.makedirs(os.path.join(to, STATE))
        with open(os.path.join(to, STATE, b"restoring"), "wb") as f:
            f.write(marker_text(Source(SRC_HOST, SRC_PATH), None))
        write(to + b"/only-a.txt", b"only in a\n")
        result = self.restore()
        self.assertOk(result)
        self.assertIn(b"resuming", result.stdout)
        self.assertEqual(tree(to), self.expected)


# --- a real cluster, stopped before the restore ---------------------------------


@slow
class ClusterRestoreTests(TestCase):
    timeout = 300

    @inlineCallbacks
    def test_restore_after_the_cluster_is_gone(self):
        from cluster_backup.demo import same_tree
        from tests.cluster_harness import LocalCluster
        from tests.harness import wait_for

        MiB = 1 << 20
        sources = [{"host": "rsrc", "address": "127.0.0.11", "copies": 2, "files": 300,
                    "big": 4 * MiB, "seed": 7}]
        stores = [{"host": h, "address": a, "name": h, "size": str(64 * MiB),
                   "size_bytes": 64 * MiB}
                  for h, a in (("rst1", "127.0.0.12"), ("rst2", "127.0.0.13"))]
        cluster = LocalCluster(os.path.abspath(self.mktemp()), sources, stores)
        self.addCleanup(cluster.stop)
        yield cluster.start()
        yield wait_for(lambda: not cluster.under_replicated(), timeout=200, interval=1.0,
                       what="every file at its copies")
        source = cluster.sources[0]

        def restore(*extra):
            return subprocess.run(
                [sys.executable, "-m", "cluster_backup.cli", "restore", "-c", cluster.config,
                 "--source", f"rsrc:{source['path']}", "--local", *extra],
                capture_output=True, timeout=120)

        # While the server runs it answers (with the secret): nothing is missing.
        up = restore("--to", os.path.join(cluster.base, "dry"), "--dry-run")
        self.assertEqual(up.returncode, 0, up.stderr)
        self.assertIn(b"every file of rsrc:", up.stdout, up.stdout + up.stderr)

        cluster.stop()
        to = os.path.join(cluster.base, "restored")
        down = restore("--to", to)
        self.assertEqual(down.returncode, 0, down.stdout + down.stderr)
        self.assertIn(b"could not ask rsrc's server", down.stderr)
        self.assertEqual(same_tree(source["path"], to), [])
        self.assertEqual(tree(os.fsencode(to)), tree(os.fsencode(source["path"])))
