"""
Tests for L{cluster_backup.rsyncd}: the pure config rendering and password
derivation, L{RsyncDaemon} against a fake process reactor, and (marked
C{slow}) a real rsync daemon fetched from by a real rsync client, including
the symlink-escape attempts the daemon must defeat.
"""

from __future__ import annotations

import os
import shutil
import socket
import stat
import tempfile

from hypothesis import given, strategies as st
from zope.interface import implementer

from twisted.internet import reactor as real_reactor
from twisted.internet.defer import ensureDeferred
from twisted.internet.error import ProcessDone, ProcessExitedAlready, ProcessTerminated
from twisted.internet.interfaces import IProcessTransport
from twisted.internet.task import Clock, deferLater
from twisted.internet.utils import getProcessOutputAndValue
from twisted.logger import LogLevel, capturedLogs, formatEvent
from twisted.python.failure import Failure
from twisted.python.procutils import which
from twisted.trial.unittest import SynchronousTestCase, TestCase

from tests import slow
from cluster_backup.rsyncd import (
    REFUSED_OPTIONS,
    RsyncDaemon,
    module_name,
    password_for,
    random_password,
    render_config,
)

try:
    import pytest
except ImportError:  # trial without pytest installed
    pytest = None

RSYNC = (which("rsync") or [None])[0]


def parse_config(text: str) -> dict[str, dict[str, str]]:
    """
    Read rsyncd.conf text the way rsync does (sections, C{key = value},
    values stripped); the global section is C{""}.
    """
    sections: dict[str, dict[str, str]] = {"": {}}
    current = sections[""]
    for line in text.split("\n"):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.startswith("["):
            assert stripped.endswith("]"), line
            current = sections.setdefault(stripped[1:-1], {})
            continue
        key, _, value = stripped.partition("=")
        assert key.strip() not in current, f"duplicate {key!r}"
        current[key.strip()] = value.strip()
    return sections


def render(**overrides) -> str:
    args = dict(
        state_dir="/var/lib/cbackup/rsyncd",
        address="127.0.0.2",
        port=5006,
        modules={"data_0123456789abcdef": "/data"},
        user="cbackup",
        chroot=True,
        uid=0,
        gid=0,
    )
    args.update(overrides)
    return render_config(**args)


class RenderConfigTests(SynchronousTestCase):
    """L{render_config} writes the safe settings and refuses unsafe values."""

    def test_globals(self) -> None:
        conf = parse_config(render())[""]
        self.assertEqual(conf["address"], "127.0.0.2")
        self.assertEqual(conf["port"], "5006")
        self.assertEqual(conf["pid file"], "/var/lib/cbackup/rsyncd/rsyncd.pid")
        self.assertEqual(conf["lock file"], "/var/lib/cbackup/rsyncd/rsyncd.lock")
        # Its lines go through the server's log (RsyncDaemon._output), not
        # into a file in the state dir that nobody rotates.
        self.assertEqual(conf["log file"], "/dev/stderr")
        self.assertEqual(conf["reverse lookup"], "no")

    def test_module(self) -> None:
        module = parse_config(render())["data_0123456789abcdef"]
        self.assertEqual(module["path"], "/data")
        self.assertEqual(module["read only"], "yes")
        self.assertEqual(module["list"], "no")
        self.assertEqual(module["use chroot"], "yes")
        self.assertEqual(module["munge symlinks"], "no")
        self.assertEqual(module["numeric ids"], "yes")
        self.assertEqual((module["uid"], module["gid"]), ("0", "0"))
        self.assertEqual(module["auth users"], "cbackup:ro")
        self.assertEqual(
            module["secrets file"],
            "/var/lib/cbackup/rsyncd/data_0123456789abcdef.secrets",
        )
        self.assertEqual(module["strict modes"], "yes")
        self.assertEqual(module["max connections"], "16")
        self.assertEqual(module["timeout"], "600")
        refused = module["refuse options"].split()
        self.assertEqual(refused, list(REFUSED_OPTIONS))
        for option in ("copy-links", "copy-unsafe-links", "copy-dirlinks", "delete"):
            self.assertIn(option, refused)
        self.assertNotIn("insecure links", module)

    def test_unprivileged(self) -> None:
        """Without chroot no uid/gid switch is asked for."""
        module = parse_config(render(chroot=False, uid=None, gid=None))[
            "data_0123456789abcdef"
        ]
        self.assertEqual(module["use chroot"], "no")
        self.assertNotIn("uid", module)
        self.assertNotIn("gid", module)
        self.assertEqual(module["read only"], "yes")

    def test_one_section_per_module(self) -> None:
        sections = parse_config(render(modules={"a_1": "/a", "b_2": "/b c"}))
        self.assertEqual(sorted(sections), ["", "a_1", "b_2"])
        self.assertEqual(sections["b_2"]["path"], "/b c")
        self.assertEqual(
            sections["b_2"]["secrets file"], "/var/lib/cbackup/rsyncd/b_2.secrets"
        )

    def test_percent(self) -> None:
        """
        A lone % is literal; %NAME% would be expanded by rsync (which has no
        escape for it), so it is refused.
        """
        text = render(modules={"m": "/data/100%"}, state_dir="/s%x")
        self.assertIn("path = /data/100%\n", text)
        self.assertIn("secrets file = /s%x/m.secrets\n", text)
        for bad in ("/data/%HOME%", "/data/%x%y", "/%A_1%"):
            with self.assertRaises(ValueError, msg=bad) as caught:
                render(modules={"m": bad})
            self.assertIn("%NAME%", str(caught.exception))

    def test_trailing_space_kept(self) -> None:
        """rsync strips a value's trailing space; a trailing slash keeps it."""
        text = render(modules={"m": "/data/x "})
        self.assertIn("path = /data/x /\n", text)

    def test_bad_paths(self) -> None:
        for bad in [
            "relative/path",
            "",
            "/data\nread only = no",
            "/data\r",
            "/data\x00",
            "/da\x7fta",
            "/data/./inner",
            "/data/../etc",
            "//data",
            "/data/",
            "/data\\",
            b"/data",
        ]:
            with self.assertRaises(ValueError, msg=repr(bad)) as caught:
                render(modules={"m": bad})
            self.assertIn("source path", str(caught.exception))
            with self.assertRaises(ValueError, msg=repr(bad)):
                render(state_dir=bad)

    def test_bad_values(self) -> None:
        for bad in [
            dict(address="127.0.0.1\nport = 1"),
            dict(address=""),
            dict(address="a b"),
            dict(port=0),
            dict(port=65536),
            dict(port="873"),
            dict(user="a:b"),
            dict(user="a b"),
            dict(user="a,b"),
            dict(user="@wheel"),
            dict(user="*"),
            dict(user=""),
            dict(modules={}),
            dict(modules={"a]b": "/data"}),
            dict(modules={"a/b": "/data"}),
            dict(modules={"": "/data"}),
            dict(modules={"m\n[x]": "/data"}),
            dict(max_connections=0),
            dict(timeout=-1),
        ]:
            with self.assertRaises(ValueError, msg=repr(bad)):
                render(**bad)

    @given(st.text())
    def test_no_injection(self, path: str) -> None:
        """
        Whatever the source path, the config either is refused or has
        exactly the lines it should, and rsync reads the path back.
        """
        try:
            text = render(modules={"m": path})
        except ValueError:
            return
        expected = render(modules={"m": "/x"})
        self.assertEqual(text.count("\n"), expected.count("\n"))
        module = parse_config(text)["m"]
        self.assertEqual(set(module), set(parse_config(expected)["m"]))
        if module["path"] != path:  # a trailing slash protects trailing space
            self.assertEqual(module["path"], path + "/")
            self.assertTrue(path[-1].isspace())


# File names as Python sees them: any bytes but NUL and "/", decoded.
paths = st.lists(
    st.binary(min_size=1).map(lambda b: b.replace(b"\0", b"").replace(b"/", b"")),
    min_size=1,
).map(lambda parts: os.fsdecode(b"/" + b"/".join(parts)))


class ModuleNameTests(SynchronousTestCase):
    """L{module_name} is safe, readable, stable and collision-free."""

    def test_readable(self) -> None:
        name = module_name("/srv/Photos 2024")
        self.assertTrue(name.startswith("srv_Photos_2024_"), name)

    def test_stable(self) -> None:
        """The same name in every process and release: pinned here."""
        self.assertEqual(module_name("/data"), "data_bd47413b5c03dfc6")
        self.assertEqual(module_name("/"), "8a5edab282632443")

    def test_long_path(self) -> None:
        name = module_name("/" + "x" * 5000)
        self.assertLessEqual(len(name), 80)

    def test_undecodable(self) -> None:
        """A path from os.fsdecode with undecodable bytes still gets a name."""
        name = module_name(os.fsdecode(b"/data/\xff\xfe"))
        self.assertRegex(name, r"\A[A-Za-z0-9_]+\Z")

    def test_not_a_file_name(self) -> None:
        """A str no file name decodes to (a lone surrogate) is refused."""
        with self.assertRaises(ValueError):
            module_name("/data/\ud800")
        with self.assertRaises(ValueError):
            render(modules={"m": "/data/\ud800"})

    @given(paths)
    def test_safe(self, path: str) -> None:
        name = module_name(path)
        self.assertRegex(name, r"\A[A-Za-z0-9_]{1,80}\Z")
        self.assertEqual(module_name(path), name)

    @given(paths, paths)
    def test_no_collision(self, a: str, b: str) -> None:
        if a != b:
            self.assertNotEqual(module_name(a), module_name(b))


class PasswordTests(SynchronousTestCase):
    """L{password_for} and L{random_password}."""

    def test_deterministic(self) -> None:
        self.assertEqual(
            password_for(b"secret", "host1", "data_1"),
            password_for(b"secret", "host1", "data_1"),
        )

    def test_differs(self) -> None:
        base = password_for(b"secret", "host1", "data_1")
        self.assertNotEqual(base, password_for(b"secret", "host1", "data_2"))
        self.assertNotEqual(base, password_for(b"secret", "host2", "data_1"))
        self.assertNotEqual(base, password_for(b"other", "host1", "data_1"))

    def test_no_ambiguity(self) -> None:
        """Host and module are delimited: ("a", "bc") is not ("ab", "c")."""
        self.assertNotEqual(
            password_for(b"s", "a", "bc"), password_for(b"s", "ab", "c")
        )

    def test_shape(self) -> None:
        for password in (password_for(b"s", "h", "m"), random_password()):
            self.assertRegex(password, r"\A[0-9a-f]{32}\Z")

    def test_random_without_secret(self) -> None:
        self.assertNotEqual(password_for(None, "h", "m"), password_for(None, "h", "m"))


@implementer(IProcessTransport)
class FakeProcess:
    """An L{IProcessTransport} that records signals and exits when told."""

    def __init__(self, proto, pid: int) -> None:
        self.proto = proto
        self.pid = pid
        self.signals: list[str] = []
        self.stdin_closed = False

    def signalProcess(self, signal: str) -> None:
        if self.pid is None:
            raise ProcessExitedAlready()
        self.signals.append(signal)

    def closeStdin(self) -> None:
        self.stdin_closed = True

    def exit(self, code: int = 0, signal=None) -> None:
        self.pid = None
        if code == 0 and signal is None:
            reason = ProcessDone(0)
        else:
            reason = ProcessTerminated(code if signal is None else None, signal)
        self.proto.processEnded(Failure(reason))


class FakeProcessReactor(Clock):
    """A L{Clock} whose C{spawnProcess} records and returns L{FakeProcess}es."""

    def __init__(self) -> None:
        super().__init__()
        self.spawned: list[tuple[FakeProcess, str, list, dict, str]] = []

    def spawnProcess(self, proto, executable, args=(), env=None, path=None, **kw):
        process = FakeProcess(proto, pid=1000 + len(self.spawned))
        proto.makeConnection(process)
        self.spawned.append((process, executable, list(args), env, path))
        return process


class RsyncDaemonTests(SynchronousTestCase):
    """L{RsyncDaemon} against a fake process reactor and a L{Clock}."""

    def setUp(self) -> None:
        self.top = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.top)
        self.state = os.path.join(self.top, "state")
        self.reactor = FakeProcessReactor()
        self.daemon = RsyncDaemon(
            self.reactor, self.state, "127.0.0.2", 5006, ["/data", "/srv/b"],
            host="host1", secret=b"secret", stop_timeout=10, chroot=False,
            rsync="/opt/rsync/bin/rsync",
        )

    def process(self) -> FakeProcess:
        return self.reactor.spawned[-1][0]

    def test_argv(self) -> None:
        self.daemon.startService()
        [(process, executable, args, env, path)] = self.reactor.spawned
        self.assertEqual(executable, "/opt/rsync/bin/rsync")
        self.assertEqual(
            args,
            [executable, "--daemon", "--no-detach",
             "--config=" + os.path.join(self.state, "rsyncd.conf")],
        )
        self.assertIsInstance(env, dict)
        self.assertNotIn("RSYNC_PASSWORD", env)
        self.assertEqual(path, self.state)

    def test_rsync_found_on_path(self) -> None:
        """By default the executable is rsync's full path on C{PATH}."""
        if RSYNC is None:
            raise self.skipTest("no rsync on PATH")
        daemon = RsyncDaemon(self.reactor, self.state, "127.0.0.2", 5006, ["/data"],
                             host="host1", chroot=False)
        daemon.startService()
        [(process, executable, args, env, path)] = self.reactor.spawned
        self.assertTrue(os.path.isabs(executable))
        self.assertEqual(executable, os.path.abspath(RSYNC))
        self.assertEqual(args[0], executable)

    def test_files(self) -> None:
        """The state dir is 0700; config and secrets files 0600."""
        self.daemon.startService()
        self.assertEqual(stat.S_IMODE(os.stat(self.state).st_mode), 0o700)
        with open(os.path.join(self.state, "rsyncd.conf")) as f:
            conf = parse_config(f.read())
        host, port, module, user, password = self.daemon.endpoint("/data")
        self.assertEqual((host, port, user), ("127.0.0.2", 5006, "cbackup"))
        self.assertEqual(conf[module]["path"], "/data")
        self.assertEqual(password, password_for(b"secret", "host1", module))
        secrets = conf[module]["secrets file"]
        with open(secrets) as f:
            self.assertEqual(f.read(), f"cbackup:{password}\n")
        for name in (secrets, os.path.join(self.state, "rsyncd.conf")):
            self.assertEqual(stat.S_IMODE(os.stat(name).st_mode), 0o600)

    def test_endpoint_unknown(self) -> None:
        with self.assertRaises(KeyError):
            self.daemon.endpoint("/elsewhere")

    def test_bad_input_changes_nothing(self) -> None:
        with self.assertRaises(ValueError):
            RsyncDaemon(self.reactor, self.state, "127.0.0.2", 5006, ["/a\nb"], host="h")
        self.assertFalse(os.path.exists(self.state))

    def test_stderr_logged(self) -> None:
        self.daemon.startService()
        with capturedLogs() as events:
            self.process().proto.childDataReceived(2, b"rsync: bind() failed: Addr")
            self.process().proto.childDataReceived(2, b"ess in use\nsecond")
            self.process().exit(10)
        lines = [e.get("line") for e in events if "line" in e]
        self.assertEqual(lines, ["rsync: bind() failed: Address in use", "second"])

    def test_lines_logged_at_their_levels(self) -> None:
        """
        The daemon logs to its stderr (C{log file = /dev/stderr}): each line
        goes to our log without rsync's date and pid, at a level that fits:
        a daemon that cannot serve is an error, refused clients and failed
        transfers a warning.  A connection's chatter is not logged: one
        debug line per transfer, with its totals.
        """
        self.daemon.startService()
        first = b"2026/12/06 01:41:50 [11744] "
        other = b"2026/12/06 01:41:51 [11745] "
        transfer = "rsync on m/file from cbackup@UNDETERMINED (127.0.0.1)"
        lines = [
            b"2026/12/06 01:41:50 [11740] rsyncd version 3.5.0 starting, listening on "
            b"port 5006",
            first + b"connect from UNDETERMINED (127.0.0.1)",
            first + b"rsync allowed access on module m from UNDETERMINED (127.0.0.1)",
            first + transfer.encode(),
            other + b"connect from UNDETERMINED (127.0.0.1)",
            other + b"rsync on m/chroot error denied from cbackup@UNDETERMINED (127.0.0.1)",
            first + b"building file list",
            other + b'rsync: [sender] link_stat "/bind() failed chroot" (in m) failed: No '
            b'such file or directory (2)',
            first + b"sent 114 bytes  received 48 bytes  total size 3",
            first + b"auth failed on module m from UNDETERMINED (127.0.0.1) for cbackup: "
            b"password mismatch",
            first + b"unknown module 'nomod' tried from UNDETERMINED (127.0.0.1)",
            first + b"rsync: The server is configured to refuse --copy-links (-L)",
            first + b"rsync error: requested action not supported (code 4) at "
            b"clientserver.c(1267) [sender=3.5.0]",
            first + b"max connections (16) reached -- try again later",
            b"failed to lock pid file /s/rsyncd.pid: Resource temporarily unavailable",
            # rsync wrote that to stderr and to its log: logged once.
            first + b"failed to lock pid file /s/rsyncd.pid: Resource temporarily unavailable",
            first + b"bind() failed: Address already in use (address-family 2)",
            first + b"unable to bind any inbound sockets on port 5006",
            b"something new",
        ]
        with capturedLogs() as events:
            for line in lines:
                self.process().proto.childDataReceived(2, line + b"\n")
        logged = [(e["log_level"].name, e.get("rsync_pid"), formatEvent(e))
                  for e in events if "line" in e]
        self.assertEqual(logged, [
            ("info", 11740, "rsync daemon: rsyncd version 3.5.0 starting, listening on "
             "port 5006"),
            ("warn", 11745, "rsync daemon: rsync on m/chroot error denied from "
             "cbackup@UNDETERMINED (127.0.0.1): rsync: [sender] link_stat \"/bind() failed "
             "chroot\" (in m) failed: No such file or directory (2)"),
            ("debug", 11744, f"rsync daemon: {transfer}: sent 114 bytes  received 48 bytes  "
             "total size 3"),
            ("warn", 11744, "rsync daemon: auth failed on module m from UNDETERMINED "
             "(127.0.0.1) for cbackup: password mismatch"),
            ("warn", 11744, "rsync daemon: unknown module 'nomod' tried from UNDETERMINED "
             "(127.0.0.1)"),
            ("warn", 11744, "rsync daemon: rsync: The server is configured to refuse "
             "--copy-links (-L)"),
            ("warn", 11744, "rsync daemon: rsync error: requested action not supported "
             "(code 4) at clientserver.c(1267) [sender=3.5.0]"),
            ("warn", 11744, "rsync daemon: max connections (16) reached -- try again later"),
            ("error", None, "rsync daemon: failed to lock pid file /s/rsyncd.pid: Resource "
             "temporarily unavailable"),
            ("error", 11744, "rsync daemon: bind() failed: Address already in use "
             "(address-family 2)"),
            ("error", 11744, "rsync daemon: unable to bind any inbound sockets on port 5006"),
            ("info", None, "rsync daemon: something new"),
        ])

    def test_restart_with_backoff(self) -> None:
        """An unexpected exit restarts after 1, 2, 4 ... 60 s."""
        self.daemon.startService()
        for delay in [1, 2, 4, 8, 16, 32, 60, 60]:
            spawned = len(self.reactor.spawned)
            self.process().exit(10)
            self.reactor.advance(delay - 0.01)
            self.assertEqual(len(self.reactor.spawned), spawned)
            self.reactor.advance(0.01)
            self.assertEqual(len(self.reactor.spawned), spawned + 1)

    def test_backoff_reset_after_long_run(self) -> None:
        self.daemon.startService()
        for _ in range(3):
            self.process().exit(10)
            self.reactor.advance(60)
        self.reactor.advance(60)  # ran a minute: healthy again
        spawned = len(self.reactor.spawned)
        self.process().exit(10)
        self.reactor.advance(1)
        self.assertEqual(len(self.reactor.spawned), spawned + 1)

    def test_stop_term_then_kill(self) -> None:
        self.daemon.startService()
        process = self.process()
        d = self.daemon.stopService()
        self.assertEqual(process.signals, ["TERM"])
        self.assertNoResult(d)
        self.reactor.advance(9.9)
        self.assertEqual(process.signals, ["TERM"])
        self.reactor.advance(0.1)
        self.assertEqual(process.signals, ["TERM", "KILL"])
        self.assertNoResult(d)
        process.exit(signal=9)
        self.assertIsNone(self.successResultOf(d))
        self.reactor.advance(1000)
        self.assertEqual(len(self.reactor.spawned), 1)

    def test_stop_term_enough(self) -> None:
        self.daemon.startService()
        process = self.process()
        d = self.daemon.stopService()
        process.exit(signal=15)
        self.assertIsNone(self.successResultOf(d))
        self.assertEqual(self.reactor.getDelayedCalls(), [])
        self.assertEqual(process.signals, ["TERM"])

    def test_stop_twice(self) -> None:
        self.daemon.startService()
        first = self.daemon.stopService()
        second = self.daemon.stopService()
        self.assertEqual(self.process().signals, ["TERM"])
        self.process().exit(signal=15)
        self.successResultOf(first)
        self.successResultOf(second)

    def test_no_restart_after_stop(self) -> None:
        """Stopped while waiting to restart: nothing to signal, no restart."""
        self.daemon.startService()
        self.process().exit(10)
        d = self.daemon.stopService()
        self.assertIsNone(self.successResultOf(d))
        self.reactor.advance(1000)
        self.assertEqual(len(self.reactor.spawned), 1)
        self.assertEqual(self.process().signals, [])

    def test_start_again(self) -> None:
        """A stopped service starts afresh with the same passwords."""
        self.daemon.startService()
        endpoint = self.daemon.endpoint("/data")
        d = self.daemon.stopService()
        self.process().exit(signal=15)
        self.successResultOf(d)
        self.daemon.startService()
        self.assertEqual(len(self.reactor.spawned), 2)
        self.assertEqual(self.daemon.endpoint("/data"), endpoint)


def free_port(address: str) -> int:
    with socket.socket() as s:
        s.bind((address, 0))
        return s.getsockname()[1]


def tree_bytes(top: str) -> list[bytes]:
    """The contents of every regular file under C{top}, links not followed."""
    found = []
    for parent, dirs, files in os.walk(top):
        for name in files:
            path = os.path.join(parent, name)
            if stat.S_ISREG(os.lstat(path).st_mode):
                with open(path, "rb") as f:
                    found.append(f.read())
    return found


class _RealDaemonMixin:
    """
    A real rsync daemon serving a source that holds a file and symlinks to a
    file and a directory outside it, fetched from by the real rsync client.
    """

    chroot: bool
    address = "127.0.0.2"

    def setUp(self):
        if RSYNC is None:
            raise self.skipTest("no rsync")
        top = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, top)
        self.outside = os.path.join(top, "outside")
        os.mkdir(self.outside)
        self.secret_bytes = b"OUTSIDE-SECRET-" + random_password().encode()
        with open(os.path.join(self.outside, "secret"), "wb") as f:
            f.write(self.secret_bytes)
        os.mkdir(os.path.join(self.outside, "dir"))
        with open(os.path.join(self.outside, "dir", "secret2"), "wb") as f:
            f.write(self.secret_bytes)
        # A space and a % in the name: the config must carry them verbatim.
        self.source = os.path.join(top, "source 100%")
        os.mkdir(self.source)
        self.payload = b"payload\x00\xff" + os.urandom(64)
        with open(os.path.join(self.source, "file"), "wb") as f:
            f.write(self.payload)
        links = {
            "abslink": os.path.join(self.outside, "secret"),
            "rellink": "../outside/secret",
            "deeplink": "../../../../../../../.." + self.outside + "/secret",
            "absdirlink": os.path.join(self.outside, "dir"),
            "reldirlink": "../outside/dir",
        }
        self.links = links
        for name, target in links.items():
            os.symlink(target, os.path.join(self.source, name))
        self.dest = os.path.join(top, "dest")
        self.port = free_port(self.address)
        self.state_dir = os.path.join(top, "state")
        self.daemon = RsyncDaemon(
            real_reactor, self.state_dir, self.address, self.port,
            [self.source], host="testhost", secret=b"test secret",
            chroot=self.chroot, stop_timeout=5,
        )
        self.daemon.startService()
        self.pid = self.daemon._process.pid
        self.addCleanup(lambda: ensureDeferred(self.stop_daemon()))
        self.endpoint = self.daemon.endpoint(self.source)
        return ensureDeferred(self.wait_listening())

    async def stop_daemon(self) -> None:
        await self.daemon.stopService()
        with self.assertRaises(ProcessLookupError):
            os.kill(self.pid, 0)

    async def wait_listening(self) -> None:
        for _ in range(100):
            with socket.socket() as s:
                if s.connect_ex((self.address, self.port)) == 0:
                    return
            await deferLater(real_reactor, 0.05)
        self.fail(f"rsync daemon never listened on {self.address}:{self.port}")

    async def fetch(self, *args: str, password=None, source="") -> tuple[int, bytes]:
        """Run the rsync client; its exit code and stderr."""
        host, port, module, user, real_password = self.endpoint
        os.makedirs(self.dest, exist_ok=True)
        url = f"rsync://{user}@{host}:{port}/{module}/{source}"
        env = {"RSYNC_PASSWORD": password or real_password, "PATH": os.defpath}
        out, err, code = await getProcessOutputAndValue(
            RSYNC, [*args, url, self.dest + "/"], env=env, reactor=real_reactor
        )
        return code, err

    def assertNoOutsideBytes(self) -> None:
        for content in tree_bytes(self.dest):
            self.assertNotIn(self.secret_bytes, content)

    async def test_fetch_file(self) -> None:
        code, err = await self.fetch("-a", source="file")
        self.assertEqual(code, 0, err)
        with open(os.path.join(self.dest, "file"), "rb") as f:
            self.assertEqual(f.read(), self.payload)

    async def test_wrong_password(self) -> None:
        code, err = await self.fetch("-a", password="wrong", source="file")
        self.assertEqual(code, 5, err)
        self.assertIn(b"auth failed", err)
        self.assertFalse(os.path.exists(os.path.join(self.dest, "file")))

    async def test_unknown_module_not_listed(self) -> None:
        """C{list = no}: a listing request shows no module."""
        host, port, module, user, password = self.endpoint
        out, err, code = await getProcessOutputAndValue(
            RSYNC, [f"rsync://{host}:{port}/"], env={"PATH": os.defpath},
            reactor=real_reactor,
        )
        self.assertNotIn(module.encode(), out)

    async def test_symlinks_stay_links(self) -> None:
        """C{-a} copies every symlink as a link with its target verbatim."""
        code, err = await self.fetch("-a")
        self.assertEqual(code, 0, err)
        for name, target in self.links.items():
            path = os.path.join(self.dest, name)
            self.assertTrue(os.path.islink(path), name)
            self.assertEqual(os.readlink(path), target)
        self.assertNoOutsideBytes()

    async def test_following_links_refused(self) -> None:
        for option in ("-L", "--copy-links", "--copy-unsafe-links", "-k",
                       "--copy-dirlinks"):
            code, err = await self.fetch("-a", option)
            self.assertNotEqual(code, 0, option)
            self.assertIn(b"refuse", err.lower(), option)
            self.assertNoOutsideBytes()

    async def test_paths_through_links(self) -> None:
        """Naming a path through a symlinked directory reads nothing outside."""
        for source in ("absdirlink/secret2", "reldirlink/secret2", "abslink/",
                       "absdirlink/", "../outside/secret", "/../outside/secret"):
            await self.fetch("-a", source=source)
            self.assertNoOutsideBytes()
        listing = os.path.join(os.path.dirname(self.dest), "files-from")
        with open(listing, "wb") as f:
            f.write(b"\0".join([
                b"absdirlink/secret2", b"reldirlink/secret2",
                b"../outside/secret", os.fsencode(self.outside) + b"/secret",
            ]))
        await self.fetch("-a", "--from0", "--files-from=" + listing)
        self.assertNoOutsideBytes()

    async def test_lines_in_the_servers_log(self) -> None:
        """
        The daemon's own lines reach our log (the journal) at their levels,
        from the chrooted connection too, and no log file grows in the
        state dir.
        """
        host, port, module, user, password = self.endpoint
        with capturedLogs() as events:
            code, err = await self.fetch("-a", password="wrong", source="file")
            self.assertEqual(code, 5, err)
            code, err = await self.fetch("-a", source="file")
            self.assertEqual(code, 0, err)

            def seen(level, start):
                return [e for e in events if e.get("log_level") == level
                        and e.get("line", "").startswith(start)]

            for _ in range(100):
                if seen(LogLevel.debug, "sent "):
                    break
                await deferLater(real_reactor, 0.05)
        self.assertEqual(len(seen(LogLevel.warn, f"auth failed on module {module} from ")),
                         1, events)
        [transfer] = seen(LogLevel.debug, "sent ")
        self.assertTrue(transfer["transfer"].startswith(f"rsync on {module}/file from {user}@"),
                        transfer)
        # Nothing else of these two connections: no chatter.
        self.assertEqual([e["line"] for e in events if e.get("rsync_pid") is not None
                          and e["line"] != transfer["line"]
                          and not e["line"].startswith(("auth failed", "rsyncd version"))],
                         [])
        self.assertEqual(sorted(os.listdir(self.state_dir)),
                         sorted(["rsyncd.conf", "rsyncd.lock", "rsyncd.pid",
                                 f"{module}.secrets"]))

    async def test_no_delete(self) -> None:
        """--remove-source-files cannot touch the read-only source."""
        code, err = await self.fetch("-a", "--remove-source-files", source="file")
        self.assertNotEqual(code, 0, err)
        self.assertTrue(os.path.exists(os.path.join(self.source, "file")))


@slow
class ChrootDaemonTests(_RealDaemonMixin, TestCase):
    """The daemon as root: each connection is chrooted into its source."""

    chroot = True

    def setUp(self):
        if os.geteuid() != 0:
            raise self.skipTest("chroot needs root")
        return super().setUp()


@slow
class NoChrootDaemonTests(_RealDaemonMixin, TestCase):
    """
    The unprivileged configuration (no chroot): rsync's own path sanitizing
    and secure resolver must confine reads.  Run as root this is the harder
    case, since root-owned links pass the resolver's ownership test.
    """

    chroot = False

