"""
A client agent's connections to the servers (DESIGN.md rule 9): one
L{ServerLink} per server, reconnecting with backoff (L{reconnect_delay}),
each call with a deadline (L{call_timeout}), so that a slow or hung server
delays only the work for its own sources.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING, Optional

from twisted.application.internet import ClientService
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.protocols import amp

from cluster_backup import session

if TYPE_CHECKING:
    from cluster_backup.client import Agent

log = Logger()

#: Reconnecting to a server: the first retry after about RECONNECT_FIRST
#: seconds (a client started together with its server finds it listening
#: a moment later), 1.5 times longer after each failure, at most
#: RECONNECT_MAX (see L{reconnect_delay}).
RECONNECT_FIRST = 0.25
RECONNECT_MAX = 60.0
#: Every AMP call to a server must be answered within this many report
#: intervals, bounded below and above (see L{call_timeout}).
CALL_TIMEOUT_INTERVALS = 3
CALL_TIMEOUT_MIN = 5.0
CALL_TIMEOUT_MAX = 60.0


def call_timeout(report_interval: float) -> float:
    """
    Seconds a server has to answer one AMP call (DESIGN.md rule 9).  A
    server answers in milliseconds; one that does not answer in several
    report intervals is hung (stopped, or its disk or VM is), and the
    connection to it is dropped, so that it delays only the work for its
    own sources.
    """
    return min(CALL_TIMEOUT_MAX, max(CALL_TIMEOUT_MIN,
                                     CALL_TIMEOUT_INTERVALS * report_interval))


def reconnect_delay(failures: int, jitter=random.random) -> float:
    """
    Seconds before the next attempt after C{failures} (>= 1) failed ones: a
    ClientService C{retryPolicy}.  Each delay is stretched by up to a half at
    random, so the stores of a restarted server do not all knock at once.
    """
    base = min(RECONNECT_MAX, RECONNECT_FIRST * 1.5 ** min(failures - 1, 100))
    return base * (1 + jitter() / 2)


class LinkProtocol(amp.AMP):
    """
    One connection to a server.  Every call has a deadline (L{call_timeout}):
    a call not answered in time fails with a L{TimeoutError} and the
    connection is dropped (a hung server's connection is of no use; the
    link reconnects with backoff), so no caller ever waits on a hung
    server for good.
    """

    def __init__(self, link: "ServerLink"):
        super().__init__()
        self.link = link

    def callRemote(self, command, **kw):
        d = super().callRemote(command, **kw)
        if d is not None:
            d.addTimeout(self.link.timeout, self.link.reactor,
                         onTimeoutCancel=self._timed_out)
        return d

    def _timed_out(self, result, timeout):
        log.warn("{store}: server {server} did not answer within {timeout:g}s; "
                 "dropping the connection", store=self.link.agent.id,
                 server=self.link.server_host, timeout=timeout)
        if self.transport is not None:
            self.transport.abortConnection()
        raise TimeoutError(f"server {self.link.server_host} did not answer "
                           f"within {timeout:g}s")

    def connectionMade(self):
        super().connectionMade()
        self.link.connected(self)

    def connectionLost(self, reason):
        super().connectionLost(reason)
        self.link.lost(self)


class ServerLink:
    """
    One agent's connection to one server: reconnects with backoff; after
    each connect, authenticates and sends the store's full inventory of
    that server's sources, and only then is C{proto} set (ready).
    """

    def __init__(self, agent: "Agent", server_host: str, address: str, port: int, reactor):
        self.agent = agent
        self.server_host = server_host
        self.reactor = reactor
        self.timeout = call_timeout(agent.cluster.options.report_interval)
        self.sources = [s for s in agent.sources if s.host == server_host]
        endpoint = session.ReportingEndpoint(
            session.server_endpoint(reactor, address, port, timeout=self.timeout),
            server_host, address, port, who=agent.id)
        factory = Factory.forProtocol(lambda: LinkProtocol(self))
        self.service = ClientService(
            endpoint, factory, retryPolicy=reconnect_delay, clock=reactor)
        self.proto: Optional[amp.AMP] = None
        #: The lease renewal in flight with this server, if any.
        self.renewing: Optional[Deferred] = None

    def connected(self, proto: amp.AMP) -> None:
        d = ensureDeferred(self._session(proto))
        d.addErrback(self._session_failed, proto)

    async def _session(self, proto: amp.AMP) -> None:
        await session.login(proto, self.agent.host, self.agent.secret)
        for source in self.sources:
            # A full inventory also ends this store's earlier claims (a
            # killed client's included): see Ledger.inventory_started.
            await self.agent.send_inventory(proto, source)
        self.proto = proto
        log.info("{store}: connected to server {server}", store=self.agent.id,
                 server=self.server_host)
        self.agent.wake()

    def _session_failed(self, failure, proto) -> None:
        log.error("{store}: session with server {server} failed: {why}", store=self.agent.id,
                  server=self.server_host, why=failure.getErrorMessage())
        proto.transport.loseConnection()

    def lost(self, proto) -> None:
        if self.proto is proto:
            self.proto = None
            log.info("{store}: lost server {server}", store=self.agent.id,
                     server=self.server_host)
