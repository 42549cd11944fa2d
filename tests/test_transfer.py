"""
Tests for L{cluster_backup.transfer}: pure helpers, the process protocol
against a fake process reactor, and (class L{RealRsyncTests}, marked
C{slow}) real rsync runs on a local source.
"""

from __future__ import annotations

import os
import signal
import stat
import time

from hypothesis import given, strategies as st
from twisted.internet.error import ProcessDone, ProcessExitedAlready, ProcessTerminated
from twisted.internet.task import Clock, deferLater
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from tests import slow
from cluster_backup.records import FileRecord
from cluster_backup.transfer import (
    build_argv,
    classify_exit,
    escape,
    failed_verification,
    fetch,
    files_from_bytes,
    parse_output,
    unescape,
    verify,
)

try:
    import pytest
except ImportError:  # trial without pytest installed
    pytest = None

RSYNC = "/usr/bin/rsync"


class ClassifyExitTests(SynchronousTestCase):
    def test_ok(self):
        self.assertEqual(classify_exit(0), "ok")

    def test_partial(self):
        self.assertEqual(classify_exit(23), "partial")
        self.assertEqual(classify_exit(24), "partial")

    def test_failed(self):
        for code in (1, 2, 3, 5, 10, 11, 12, 20, 30, 35, 255, 99):
            self.assertEqual(classify_exit(code), "failed", code)

    def test_signal(self):
        self.assertEqual(classify_exit(-signal.SIGKILL), "failed")


def _argv(**kw):
    args = dict(
        source_url="rsync://backup@h1:5006/mod/",
        dest_dir="/store/h1/src",
        files_from="/store/.state/files-from",
        partial_dir="/store/.state/partial",
        bwlimit=None,
        timeout=600,
        local=False,
    )
    args.update(kw)
    return build_argv(RSYNC, **args)


class BuildArgvTests(SynchronousTestCase):
    def test_daemon(self):
        argv = _argv()
        self.assertEqual(argv[0], RSYNC)
        self.assertEqual(argv[-3:], ["--", "rsync://backup@h1:5006/mod/", "/store/h1/src/"])
        for opt in ("-a", "--numeric-ids", "-8", "-s", "--from0", "--ignore-times",
                    "--files-from=/store/.state/files-from",
                    "--partial-dir=/store/.state/partial", "--timeout=600",
                    "--out-format=%i %l %b %n", "--no-motd", "--contimeout=600",
                    "--sockopts=TCP_NODELAY"):
            self.assertIn(opt, argv)
        self.assertFalse(any(a.startswith("--bwlimit") for a in argv))
        self.assertNotIn("--delay-updates", argv)

    def test_local(self):
        argv = _argv(source_url="/data/src", local=True)
        self.assertEqual(argv[-2], "/data/src/")
        self.assertNotIn("--no-motd", argv)
        self.assertFalse(any(a.startswith("--contimeout") for a in argv))
        self.assertFalse(any(a.startswith("--sockopts") for a in argv))

    def test_partial_dir_absolute(self):
        for name in ("partial_dir", "dest_dir", "files_from", "temp_dir"):
            self.assertRaises(ValueError, _argv, **{name: "relative/dir"})
        self.assertRaises(ValueError, _argv, source_url="data/src", local=True)
        self.assertRaises(ValueError, _argv, source_url="/data/src", local=False)

    def test_bwlimit(self):
        def kib(b):
            [opt] = [a for a in _argv(bwlimit=b) if a.startswith("--bwlimit=")]
            return int(opt.split("=")[1])

        self.assertEqual(kib(1), 1)
        self.assertEqual(kib(1024), 1)
        self.assertEqual(kib(1025), 2)
        self.assertEqual(kib(10 * 2**20), 10240)
        self.assertRaises(ValueError, _argv, bwlimit=0)

    def test_no_password_anywhere(self):
        # build_argv has no way to take a password; fetch passes it in env.
        self.assertFalse(any("pass" in a.lower() for a in _argv()))

    def test_files_from(self):
        self.assertEqual(
            files_from_bytes([b"b/c", b"#x", b";y", b"a b", b"a b"]),
            b"./#x\0./;y\0a b\0b/c\0",
        )
        for bad in (b"/abs", b"a/../b", b"", b"a\0b"):
            self.assertRaises(ValueError, files_from_bytes, [bad])


names = st.binary(min_size=1, max_size=60).filter(lambda b: b"\0" not in b and b"/" not in b)


class EscapeTests(SynchronousTestCase):
    def test_examples(self):
        self.assertEqual(escape(b"new\nline"), b"new\\#012line")
        self.assertEqual(escape(b"caf\xe9\t"), b"caf\xe9\t")
        self.assertEqual(escape(b"a\\#123"), b"a\\#134#123")
        self.assertEqual(escape(b"a\\#12"), b"a\\#12")
        self.assertEqual(unescape(b"a\\#134#189"), b"a\\#189")
        self.assertEqual(unescape(b"a\\#777\\#1"), b"a\\#777\\#1")

    @given(st.lists(names, min_size=1, max_size=4))
    def test_round_trip(self, parts):
        path = b"/".join(parts)
        encoded = escape(path)
        self.assertNotIn(b"\n", encoded)
        self.assertEqual(unescape(encoded), path)


class ParseOutputTests(SynchronousTestCase):
    def test_parse(self):
        lines = [
            b".d..t...... 4096 0 ./",
            b"cd+++++++++ 4096 0 a/",
            b">f+++++++++ 12 55 a/b/deep.txt\n",
            b">f+++++++++ 8 51 new\\#012line",
            b"cL+++++++++ 12 0 link",
            b">f..t...... 4 47 caf\xe9",
            b".f...p..... 4 0 attrs-only",
            b"Welcome to the daemon",
            b"",
        ]
        self.assertEqual(
            parse_output(lines),
            {b"a/b/deep.txt", b"new\nline", b"link", b"caf\xe9"},
        )

    def test_failed_verification(self):
        err = [
            b"WARNING: x failed verification -- update discarded (will try again).",
            b"ERROR: a b\\#012 failed verification -- update put into partial-dir.",
        ]
        self.assertEqual(failed_verification(err), {b"a b\n"})


class FakeProcess:
    """An L{IProcessTransport} double: records signals and stdin closing."""

    pid = 4242

    def __init__(self, reactor, proto, executable, args, env, path):
        self.reactor = reactor
        self.proto = proto
        self.executable = executable
        self.args = args
        self.env = env
        self.path = path
        self.signals = []
        self.stdin = b""
        self.stdin_closed = False
        self.ended = False

    def write(self, data):
        assert not self.stdin_closed, "write after closeStdin"
        self.stdin += data

    def closeStdin(self):
        self.stdin_closed = True

    def signalProcess(self, name):
        if self.ended:
            raise ProcessExitedAlready()
        self.signals.append(name)

    def end(self, code=0, sig=None):
        self.ended = True
        if code == 0 and sig is None:
            reason = Failure(ProcessDone(0))
        else:
            reason = Failure(ProcessTerminated(code, sig))
        self.proto.processEnded(reason)


class FakeProcessReactor(Clock):
    """A L{Clock} that fakes C{spawnProcess} (cf. procmon's DummyProcessReactor)."""

    def __init__(self):
        super().__init__()
        self.processes = []

    def spawnProcess(self, proto, executable, args, env=None, path=None, **kw):
        proc = FakeProcess(self, proto, executable, args, env, path)
        self.processes.append(proc)
        proto.makeConnection(proc)
        # The list comes on stdin, whole, before EOF.
        assert "--files-from=-" in args, args
        assert proc.stdin_closed
        proc.files_from = proc.stdin
        return proc


class ProtocolTests(SynchronousTestCase):
    def setUp(self):
        self.reactor = FakeProcessReactor()
        self.state = self.mktemp()
        os.makedirs(self.state)

    def start(self, **kw):
        args = dict(
            source_url="rsync://backup@h1:5006/mod/",
            password="s3cret",
            dest_dir="/store/h1/src",
            paths=[b"b", b"new\nline", b"a"],
            partial_dir=os.path.abspath(os.path.join(self.state, "partial")),
            rsync=RSYNC,
        )
        args.update(kw)
        d, cancel = fetch(self.reactor, **args)
        results = []
        d.addCallback(results.append)
        [proc] = self.reactor.processes
        return proc, results, cancel

    def test_spawn(self):
        proc, results, _ = self.start(bwlimit=2048)
        self.assertEqual(proc.executable, RSYNC)
        self.assertEqual(proc.args[0], RSYNC)
        self.assertIn("--bwlimit=2", proc.args)
        self.assertNotIn("s3cret", " ".join(proc.args))
        self.assertEqual(set(proc.env), {"PATH", "LANG", "RSYNC_PASSWORD"})
        self.assertEqual(proc.env["RSYNC_PASSWORD"], "s3cret")
        self.assertEqual(proc.env["LANG"], "C")
        self.assertEqual(proc.files_from, b"a\0b\0new\nline\0")
        self.assertTrue(proc.stdin_closed)
        self.assertTrue(stat.S_IMODE(os.stat(os.path.join(self.state, "partial")).st_mode) == 0o700)
        self.assertEqual(results, [])

    def test_no_password(self):
        proc, _, _ = self.start(password=None, source_url="/data/src")
        self.assertEqual(set(proc.env), {"PATH", "LANG"})

    def test_output_and_exit(self):
        proc, results, _ = self.start()
        self.reactor.advance(3)
        proto = proc.proto
        proto.childDataReceived(1, b"cd+++++++++ 4096 0 a/\n>f+++++++++ 10 5")
        proto.childDataReceived(1, b"3 a\n>f+++++++++ 8 51 new\\#012line\n")
        proto.childDataReceived(2, b"rsync: [sender] link_stat \"b\" failed\n")
        self.assertEqual(os.listdir(self.state), ["partial"])  # no list file, even now
        proc.end(23)
        [result] = results
        self.assertEqual(result.exit_code, 23)
        self.assertEqual(result.status, "partial")
        self.assertEqual(result.transferred, {b"a", b"new\nline"})
        self.assertEqual(result.bytes, 18)
        self.assertEqual(result.wire_bytes, 104)
        self.assertEqual(result.seconds, 3)
        self.assertEqual(result.errors, ('rsync: [sender] link_stat "b" failed',))
        self.assertEqual(os.listdir(self.state), ["partial"])

    def test_exit_codes(self):
        for code, sig, status in ((0, None, "ok"), (24, None, "partial"),
                                  (30, None, "failed"), (None, signal.SIGKILL, "failed")):
            self.reactor.processes.clear()
            proc, results, _ = self.start()
            proc.end(code, sig)
            self.assertEqual(results[0].status, status)
            self.assertEqual(results[0].exit_code, code if sig is None else -sig)

    def test_cancel_term_then_kill(self):
        proc, results, cancel = self.start(kill_after=5.0)
        cancel()
        self.assertEqual(proc.signals, ["TERM"])
        cancel()  # idempotent
        self.reactor.advance(4.9)
        self.assertEqual(proc.signals, ["TERM"])
        self.reactor.advance(0.1)
        self.assertEqual(proc.signals, ["TERM", "KILL"])
        self.assertEqual(results, [])
        proc.end(None, signal.SIGKILL)
        self.assertEqual(results[0].status, "cancelled")
        self.assertEqual(os.listdir(self.state), ["partial"])

    def test_cancel_exits_on_term(self):
        proc, results, cancel = self.start(kill_after=5.0)
        cancel()
        proc.end(20)
        self.assertEqual(results[0].status, "cancelled")
        self.assertEqual(self.reactor.getDelayedCalls(), [])
        self.reactor.advance(10)
        self.assertEqual(proc.signals, ["TERM"])

    def test_cancel_after_exit(self):
        proc, results, cancel = self.start()
        proc.end(0)
        cancel()
        self.assertEqual(proc.signals, [])
        self.assertEqual(results[0].status, "ok")

    def test_bad_path_spawns_nothing(self):
        self.assertRaises(ValueError, fetch, self.reactor, source_url="/x", password=None,
                          dest_dir="/d", paths=[b"../x"], partial_dir="/p")
        self.assertEqual(self.reactor.processes, [])

    def test_spawn_error_leaves_nothing(self):
        def boom(*a, **kw):
            raise OSError("no fork")

        self.reactor.spawnProcess = boom
        self.assertRaises(OSError, fetch, self.reactor, source_url="/x", password=None,
                          dest_dir="/d", paths=[b"x"], partial_dir=os.path.abspath(self.state + "/p"),
                          rsync=RSYNC)
        self.assertEqual(os.listdir(self.state), ["p"])

    def test_no_list_file_in_the_store(self):
        """The list goes to stdin: nothing beyond the fetched files lands in the store."""
        paths = [b"x" * 200 + b"%d" % i for i in range(500)]
        self.start(paths=paths)
        [proc] = self.reactor.processes
        self.assertEqual(proc.files_from, files_from_bytes(paths))
        self.assertEqual(os.listdir(self.state), ["partial"])

    def test_empty_batch(self):
        d, _ = fetch(self.reactor, source_url="/x", password=None, dest_dir="/d",
                     paths=[], partial_dir="/p")
        self.assertEqual(self.successResultOf(d).status, "ok")
        self.assertEqual(self.reactor.processes, [])


class VerifyTests(SynchronousTestCase):
    def test_verify(self):
        root = os.path.abspath(self.mktemp())
        os.makedirs(os.path.join(root, "d", "sub"))
        with open(os.path.join(root, "d", "f"), "wb") as f:
            f.write(b"12345")
        os.utime(os.path.join(root, "d", "f"), (1000, 1000))
        os.symlink("nowhere", os.path.join(root, "l"))
        os.utime(os.path.join(root, "l"), (2000, 2000), follow_symlinks=False)
        good = FileRecord(b"d/f", 5, 1000)
        link = FileRecord(b"l", 7, 2000)
        records = [
            good,
            link,
            FileRecord(b"d/f2", 5, 1000),  # missing
            FileRecord(b"d", os.lstat(os.path.join(root, "d")).st_size, 0),
            FileRecord(b"d/sub", 4096, 0),  # a directory
        ]
        complete, bad = verify(root, records + [FileRecord(b"d/f", 5, 1001)])
        self.assertEqual(complete, [good, link])
        self.assertEqual(bad, [b"d/f2", b"d", b"d/sub", b"d/f"])
        complete, bad = verify(root, [good, link], unsettled_from=2000)
        self.assertEqual((complete, bad), ([good], [b"l"]))


# --- real rsync -------------------------------------------------------------

NAMES = [
    b"top.txt",
    b"dir/sub/deep.txt",
    b"dir/with space.txt",
    b"new\nline",
    b"caf\xe9",
    b"#comment-like",
    b"back\\#012slash",
    b"link",
    b"big.bin",
    b"dir/not-fetched.txt",
    b"other/not-fetched.txt",
]


@slow
class RealRsyncTests(TestCase):
    """Real reactor, real rsync, local source."""

    timeout = 60

    def setUp(self):
        base = os.path.abspath(self.mktemp())
        self.src = os.path.join(base, "src").encode()
        self.store = os.path.join(base, "store")
        self.dest = os.path.join(self.store, "h1", "data")
        self.state = os.path.join(self.store, ".state")
        self.partial = os.path.join(self.state, "partial")
        os.makedirs(self.state)
        for name in NAMES:
            path = os.path.join(self.src, name)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            if name == b"link":
                os.symlink(b"dir/sub/deep.txt", path)
                os.utime(path, (1_500_000_000, 1_500_000_000), follow_symlinks=False)
                continue
            with open(path, "wb") as f:
                f.write(os.urandom(5 * 2**20) if name == b"big.bin" else name * 3)
            os.utime(path, (1_600_000_000, 1_600_000_000))

    def fetch(self, paths, **kw):
        from twisted.internet import reactor

        return fetch(
            reactor,
            source_url=self.src.decode(),
            password=None,
            dest_dir=self.dest,
            paths=paths,
            partial_dir=self.partial,
            **kw,
        )

    def records(self, paths):
        out = []
        for p in paths:
            st = os.lstat(os.path.join(self.src, p))
            out.append(FileRecord(p, st.st_size, st.st_mtime_ns // 10**9))
        return out

    def dest_files(self):
        found = set()
        root = self.dest.encode()
        for dirpath, dirs, files in os.walk(root):
            for n in files + [d for d in dirs if os.path.islink(os.path.join(dirpath, d))]:
                found.add(os.path.relpath(os.path.join(dirpath, n), root))
        return found

    async def test_fetch_subset(self):
        wanted = [n for n in NAMES if b"not-fetched" not in n]
        d, _ = self.fetch(wanted)
        result = await d
        self.assertEqual((result.status, result.exit_code), ("ok", 0), result.errors)
        self.assertEqual(result.transferred, set(wanted))
        self.assertEqual(self.dest_files(), set(wanted))
        for name in wanted:
            s, t = os.path.join(self.src, name), os.path.join(self.dest.encode(), name)
            if name == b"link":
                self.assertEqual(os.readlink(t), os.readlink(s))
            else:
                with open(s, "rb") as a, open(t, "rb") as b:
                    self.assertEqual(a.read(), b.read(), name)
            self.assertEqual(os.lstat(t).st_mtime_ns // 10**9, os.lstat(s).st_mtime_ns // 10**9)
        complete, bad = verify(self.dest, self.records(wanted))
        self.assertEqual((len(complete), bad), (len(wanted), []))
        self.assertEqual(os.listdir(self.partial), [])
        self.assertEqual(os.listdir(self.state), ["partial"])

    async def test_long_list_through_stdin(self):
        """A list far beyond a pipe's buffer (64 KiB) reaches rsync whole."""
        names = [b"many/%04d-" % i + b"n" * 150 for i in range(2000)]
        for name in names:
            path = os.path.join(self.src, name)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as f:
                f.write(name[-3:])
        d, _ = self.fetch(names)
        result = await d
        self.assertEqual((result.status, result.exit_code), ("ok", 0), result.errors)
        self.assertEqual(result.transferred, set(names))
        self.assertEqual(self.dest_files(), set(names))

    async def test_vanished(self):
        wanted = [b"top.txt", b"dir/with space.txt"]
        expected = self.records(wanted)
        os.unlink(os.path.join(self.src, b"top.txt"))
        d, _ = self.fetch(wanted)
        result = await d
        self.assertEqual((result.status, result.exit_code), ("partial", 23))
        self.assertEqual(result.transferred, {b"dir/with space.txt"})
        complete, bad = verify(self.dest, expected)
        self.assertEqual(([r.path for r in complete], bad), ([b"dir/with space.txt"], [b"top.txt"]))

    async def test_changed_before_fetch_is_not_current(self):
        [expected] = self.records([b"top.txt"])
        with open(os.path.join(self.src, b"top.txt"), "ab") as f:
            f.write(b"more")
        result = await self.fetch([b"top.txt"])[0]
        self.assertEqual(result.status, "ok")
        self.assertEqual(verify(self.dest, [expected]), ([], [b"top.txt"]))

    async def test_long_escaped_names(self):
        """
        Without -8, rsync 3.5 leaves a literal backslash-#ddd unescaped when
        it falls on a 1,024-byte iconv chunk boundary of a long line; with
        -8 every offset decodes back to the requested name.
        """
        deep = b"/".join([b"d" * 250] * 4)
        os.makedirs(os.path.join(self.src, deep))
        wanted = []
        for k in range(40):
            name = deep + b"/" + b"x" * k + b"\\#123y"
            with open(os.path.join(self.src, name), "wb") as f:
                f.write(b"1")
            wanted.append(name)
        result = await self.fetch(wanted)[0]
        self.assertEqual(result.status, "ok", result.errors)
        self.assertEqual(result.transferred, set(wanted))

    async def test_cancel(self):
        from twisted.internet import reactor

        d, cancel = self.fetch([b"big.bin"], bwlimit=256 * 1024, kill_after=5.0)
        await deferLater(reactor, 1.0, lambda: None)
        cancel()
        result = await d
        self.assertEqual(result.status, "cancelled")
        self.assertIn(result.exit_code, (20, -signal.SIGKILL))  # exited, reaped
        self.assertEqual(result.transferred, set())
        self.assertEqual(self.dest_files(), set())
        self.assertLessEqual(set(os.listdir(self.partial)), {"big.bin"})
        self.assertEqual(sorted(os.listdir(self.state)), ["partial"])



class FaultHelpersTests(SynchronousTestCase):
    """Helpers the client uses against kill -9, ENOSPC and changing sources."""

    def test_out_of_space(self):
        from cluster_backup.transfer import out_of_space
        self.assertTrue(out_of_space([
            'rsync: [receiver] write failed on "a/b": No space left on device (28)',
            "rsync error: error in file IO (code 11) at receiver.c(657) [receiver=3.5.0]"]))
        vanished = 'rsync: link_stat "/x" failed: No such file or directory (2)'
        self.assertFalse(out_of_space([vanished]))

    def test_dry_run_argv(self):
        argv = _argv(dry_run=True)
        self.assertIn("--dry-run", argv)
        self.assertNotIn("--ignore-times", argv)
        self.assertNotIn("--dry-run", _argv())

    def test_kill_strays(self):
        import subprocess
        import sys

        from cluster_backup.transfer import kill_strays, stray_processes
        marker = "--partial-dir=" + os.path.abspath(self.mktemp())
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)",
                                  marker])
        self.addCleanup(child.wait)
        self.addCleanup(child.kill)
        for _ in range(100):
            if stray_processes(marker):
                break
            time.sleep(0.02)
        self.assertEqual(stray_processes(marker), [child.pid])
        self.assertEqual(stray_processes(marker + "x"), [])
        self.assertEqual(kill_strays(marker), 1)
        self.assertEqual(child.wait(5), -9)
