"""
The client's log when it cannot connect to a server: each failure names the
server, its address and port, and the reason; a reason is logged as a
warning when it first appears (not at every retry), and the recovery once.
"""

from __future__ import annotations

import os

from zope.interface import implementer

from twisted.application.internet import ClientService
from twisted.internet.defer import Deferred
from twisted.internet.error import (ConnectionDone, ConnectionRefusedError, DNSLookupError,
                                    TimeoutError as ConnectTimeoutError)
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import LogLevel, Logger, capturedLogs, formatEvent
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from cluster_backup import client, links, session
from cluster_backup.config import loads


@implementer(IStreamClientEndpoint)
class FakeEndpoint:
    """An endpoint whose connection attempts the test ends, one by one."""

    def __init__(self) -> None:
        self.attempts: list[tuple[object, Deferred]] = []

    def connect(self, factory) -> Deferred:
        d: Deferred = Deferred()
        self.attempts.append((factory, d))
        return d

    def fail(self, error: Exception) -> None:
        self.attempts[-1][1].errback(Failure(error))

    def succeed(self) -> Protocol:
        factory, d = self.attempts[-1]
        proto = factory.buildProtocol(None)
        proto.makeConnection(StringTransport())
        d.callback(proto)
        return proto


def retry_at_once(failures: int) -> float:
    return 1.0


class ReportingEndpointTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.fake = FakeEndpoint()
        self.events: list[dict] = []
        self.endpoint = session.ReportingEndpoint(
            self.fake, "src", "10.0.0.9", 5005, who="st:/b",
            logger=Logger(observer=self.events.append))
        self.service = ClientService(self.endpoint, Factory.forProtocol(Protocol),
                                     retryPolicy=retry_at_once, clock=self.clock)

    def logged(self) -> list[tuple[str, str]]:
        out = [(e["log_level"].name, formatEvent(e)) for e in self.events]
        del self.events[:]
        return out

    def fail(self, error: Exception) -> None:
        self.fake.fail(error)
        self.clock.advance(1.0)

    def test_each_reason_once_then_the_recovery(self):
        with capturedLogs() as service_events:
            self.service.startService()
            self.fail(ConnectionRefusedError())
        self.assertEqual(self.logged(), [(
            "warn", "st:/b: cannot connect to server src at 10.0.0.9:5005: connection "
            "refused (is cbackup-server running there?); retrying, with backoff")])
        # ClientService's own line names the server too, not an object address.
        [retry] = [formatEvent(e) for e in service_events if "attempt" in e]
        self.assertEqual(retry, "Scheduling retry 1 to connect server src at "
                         "10.0.0.9:5005 in 1.0 seconds.")

        for _ in range(5):  # the same reason again: no warning at every retry
            self.fail(ConnectionRefusedError())
        self.assertEqual(self.logged(), [])
        self.fail(ConnectTimeoutError())
        self.assertEqual(self.logged(), [(
            "warn", "st:/b: cannot connect to server src at 10.0.0.9:5005: no connection "
            "within the timeout; retrying, with backoff")])
        self.fail(DNSLookupError("src"))
        self.assertEqual(self.logged(), [(
            "warn", "st:/b: cannot connect to server src at 10.0.0.9:5005: its name does "
            "not resolve (set 'address:' in the config); retrying, with backoff")])

        self.fake.succeed()
        self.assertEqual(self.logged(), [(
            "info", "st:/b: connected to server src at 10.0.0.9:5005 after 8 failed "
            "attempts")])
        self.assertEqual(len(self.fake.attempts), 9)
        self.service.stopService()

    def test_after_a_recovery_the_same_reason_warns_again(self):
        self.service.startService()
        self.fail(ConnectionRefusedError())
        proto = self.fake.succeed()
        self.assertEqual([level for level, _ in self.logged()], ["warn", "info"])
        proto.connectionLost(Failure(ConnectionDone()))  # the server went away
        self.clock.advance(1.0)
        self.assertEqual(len(self.fake.attempts), 3)
        self.fail(ConnectionRefusedError())
        self.assertEqual([level for level, _ in self.logged()], ["warn"])
        self.service.stopService()

    def test_first_connection_logs_nothing_and_stopping_is_no_failure(self):
        self.service.startService()
        self.fake.succeed()
        self.service.stopService()
        self.service.startService()
        self.service.stopService()  # cancels the attempt in progress
        self.assertEqual(self.logged(), [])
        self.assertEqual(str(self.endpoint), "server src at 10.0.0.9:5005")

    def test_ipv6_address(self):
        endpoint = session.ReportingEndpoint(self.fake, "v6", "fd00::5", 5005)
        self.assertEqual(str(endpoint), "server v6 at [fd00::5]:5005")


class AgentLinkTests(SynchronousTestCase):
    def test_a_refused_connection_names_server_address_and_reason(self):
        """An agent's link to a server logs its failures through a ReportingEndpoint."""
        store = os.path.abspath(self.mktemp())
        cluster = loads("server: src:/data\ncopies: 1\naddress: 127.0.0.9\n"
                        f"backup: st:{store}\nsize: 1m\n")
        reactor = MemoryReactorClock()
        agent = client.Agent(cluster, cluster.stores[0], "st", None, reactor, set())
        service = agent.links["src"].service
        with capturedLogs() as events:
            service.startService()
            self.addCleanup(service.stopService)
            _, _, factory, _, _ = reactor.tcpClients[0]
            factory.clientConnectionFailed(reactor.connectors[0],
                                           Failure(ConnectionRefusedError()))
            reactor.advance(2 * links.RECONNECT_FIRST)
            _, _, factory, _, _ = reactor.tcpClients[1]
            factory.clientConnectionFailed(reactor.connectors[1],
                                           Failure(ConnectionRefusedError()))
        warnings = [formatEvent(e) for e in events if e["log_level"] == LogLevel.warn]
        self.assertEqual(warnings, [
            f"st:{store}: cannot connect to server src at 127.0.0.9:5005: connection "
            "refused (is cbackup-server running there?); retrying, with backoff"])
        text = "\n".join(formatEvent(e) for e in events)
        self.assertNotIn("object at 0x", text)
        self.assertIn("Scheduling retry 2 to connect server src at 127.0.0.9:5005 in ", text)
