"""
Unit tests of the daemons' edges (L{cluster_backup.lifecycle}) and of where
a server listens (L{cluster_backup.identity.listen_address}).
"""

from __future__ import annotations

import os
import socket

from twisted.application.service import Service
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from cluster_backup.config import loads
from cluster_backup.identity import listen_address
from cluster_backup.lifecycle import EXIT_FATAL, Fatal, Guarded, port_free, private_dir
from cluster_backup.server import default_state_dir


class Recorder(Service):
    def __init__(self, events):
        self.events = events

    def startService(self):
        Service.startService(self)
        self.events.append("start")

    def stopService(self):
        Service.stopService(self)
        self.events.append("stop")


class FatalTests(SynchronousTestCase):

    def test_before_the_reactor_runs(self):
        """
        Under twistd services start before the reactor runs: the stop waits
        for it, and the exit runs after shutdown, once.
        """
        reactor = MemoryReactorClock()
        exits = []
        fatal = Fatal(reactor, "cbackup-server", exits.append)
        fatal("cannot listen")
        fatal("a second reason")
        self.assertEqual(fatal.reason, "cannot listen")
        self.assertFalse(reactor.hasStopped)
        self.assertEqual(len(reactor.whenRunningHooks), 1)
        reactor.running = True
        reactor.whenRunningHooks[0][0]()
        self.assertTrue(reactor.hasStopped)
        after = reactor.triggers["after"]["shutdown"]
        self.assertEqual(len(after), 1)
        callable_, args, kwargs = after[0]
        callable_(*args, **kwargs)
        self.assertEqual(exits, [EXIT_FATAL])

    def test_running(self):
        reactor = MemoryReactorClock()
        reactor.running = True
        Fatal(reactor, "cbackup-client")("store gone")
        self.assertTrue(reactor.hasStopped)
        self.assertEqual(reactor.triggers.get("after", {}).get("shutdown", []), [])


class GuardedTests(SynchronousTestCase):

    def test_checks_pass(self):
        events = []
        top = Guarded([lambda: None], Fatal(MemoryReactorClock(), "x"))
        Recorder(events).setServiceParent(top)
        top.startService()
        top.stopService()
        self.assertEqual(events, ["start", "stop"])

    def test_a_check_fails(self):
        """Nothing starts; the reason goes to fatal; stopping stops nothing."""
        events = []
        ran = []
        fatal = Fatal(MemoryReactorClock(), "x")
        top = Guarded([lambda: "port taken", lambda: ran.append(1)], fatal)
        Recorder(events).setServiceParent(top)
        top.startService()
        self.assertEqual(fatal.reason, "port taken")
        self.assertEqual(ran, [])
        top.stopService()
        self.assertEqual(events, [])


class PrivateDirTests(SynchronousTestCase):

    def test_created_0700(self):
        path = os.path.join(self.mktemp(), "server", "h1")
        self.assertIsNone(private_dir(path))
        self.assertEqual(os.stat(path).st_mode & 0o777, 0o700)

    def test_existing_made_private(self):
        path = self.mktemp()
        os.makedirs(path, mode=0o755)
        os.chmod(path, 0o755)
        self.assertIsNone(private_dir(path))
        self.assertEqual(os.stat(path).st_mode & 0o777, 0o700)

    def test_a_file_in_the_way(self):
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("x")
        problem = private_dir(path)
        self.assertIn(f"state dir {path}: ", problem)


class PortFreeTests(SynchronousTestCase):

    def test_free_and_taken(self):
        sock = socket.socket()
        self.addCleanup(sock.close)
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        self.assertEqual(port_free("127.0.0.1", port, "PORT"),
                         f"cannot listen on 127.0.0.1:{port} (PORT): "
                         "another process listens there")
        sock.close()
        self.assertIsNone(port_free("127.0.0.1", port, "PORT"))

    def test_not_ours(self):
        self.assertIn("not an address of this machine",
                      port_free("192.0.2.1", 7000, "RSYNC PORT"))


CONFIG = """\
server: {host}:/data
copies: 1
{address}
backup: other:/backup
size: 1g
address: 10.9.9.9
{listen}"""


def cluster(host, address="", listen=""):
    return loads(CONFIG.format(host=host, address=address, listen=listen))


class ListenAddressTests(SynchronousTestCase):
    """Where a server listens: its host's address, never every interface unasked."""

    def listen(self, c, host, resolved=(), local=()):
        return listen_address(c, host, resolve=lambda name: list(resolved),
                              is_local=lambda a: a in local)

    def test_ip_named_host(self):
        self.assertEqual(self.listen(cluster("192.168.1.10"), "192.168.1.10",
                                     local={"192.168.1.10"}), ("192.168.1.10", None))

    def test_ipv6_named_host(self):
        self.assertEqual(self.listen(cluster("[fd00::5]"), "[fd00::5]", local={"fd00::5"}),
                         ("fd00::5", None))

    def test_address_given(self):
        c = cluster("nas", "address: 10.0.0.5")
        self.assertEqual(self.listen(c, "nas", local={"10.0.0.5"}), ("10.0.0.5", None))

    def test_address_not_ours(self):
        address, problem = self.listen(cluster("192.168.1.10"), "192.168.1.10")
        self.assertIsNone(address)
        self.assertIn("192.168.1.10 is not an address of this machine", problem)

    def test_name_resolving_here(self):
        """A name: its non-loopback address of this machine, IPv4 first."""
        got = self.listen(cluster("nas"), "nas", resolved=["fd00::5", "10.0.0.5", "127.0.1.1"],
                          local={"fd00::5", "10.0.0.5", "127.0.1.1"})
        self.assertEqual(got, ("10.0.0.5", None))

    def test_name_resolving_only_to_loopback(self):
        """Debian's /etc/hosts trap: say so, never bind 127.0.1.1 or everything."""
        address, problem = self.listen(cluster("nas"), "nas", resolved=["127.0.1.1"],
                                       local={"127.0.1.1"})
        self.assertIsNone(address)
        self.assertIn("resolves here only to 127.0.1.1", problem)
        self.assertIn("'LISTEN: *'", problem)

    def test_localhost_asks_for_loopback(self):
        got = self.listen(cluster("localhost"), "localhost", resolved=["::1", "127.0.0.1"],
                          local={"::1", "127.0.0.1"})
        self.assertEqual(got, ("127.0.0.1", None))

    def test_name_not_here(self):
        address, problem = self.listen(cluster("nas"), "nas", resolved=["10.1.1.1"])
        self.assertIn("resolves to no address of this machine", problem)

    def test_listen_everywhere_when_told(self):
        c = cluster("nas", listen="options: LISTEN: *\n")
        self.assertEqual(self.listen(c, "nas"), (None, None))

    def test_listen_takes_only_star(self):
        from cluster_backup.config import ConfigError
        with self.assertRaises(ConfigError) as e:
            cluster("nas", listen="options: LISTEN: 0.0.0.0\n")
        self.assertIn("LISTEN takes only '*'", str(e.exception))


class DefaultStateDirTests(SynchronousTestCase):

    def test_one_per_host(self):
        self.assertEqual(default_state_dir("192.168.1.10"),
                         "/var/lib/cluster-backup/server/192.168.1.10")
        self.assertNotEqual(default_state_dir("a"), default_state_dir("b"))
        self.assertEqual(default_state_dir("[fd00::5]"),
                         "/var/lib/cluster-backup/server/_fd00__5_")
        self.assertEqual(default_state_dir(".."), "/var/lib/cluster-backup/server/_")
