"""
The client's side of the AMP conversation: helpers that drive any
L{amp.AMP} connected to a server through the commands of
L{cluster_backup.protocol}.

Each helper hides the conversation's paging: L{report_inventory},
L{report_delta}, L{claim} and L{release} split their lists into pages that
fit the AMP value limit (a L{Report} carries up to L{MAX_CHUNKS} of them),
and L{list_all_needs}, L{list_surplus} and L{status_all} follow cursors to
the end.  L{login} authenticates both ways.
They fire Deferreds, so Twisted code calls them without coroutines.  They
are kept apart from the server so that a client imports only the contract
and these.
"""

from __future__ import annotations

import hmac
import json
import os
from functools import wraps
from itertools import zip_longest
from typing import Any, Callable, Coroutine, Iterable, Optional, TypeVar

from attrs import frozen
from twisted.internet import error as net_error
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.logger import Logger
from twisted.protocols import amp
from twisted.python.failure import Failure
from zope.interface import implementer

from .protocol import (
    MAX_CHUNKS,
    NONCE_BYTES,
    PAGE_BUDGET,
    PROTOCOL_VERSION,
    Authenticate,
    AuthFailed,
    Chunks,
    Claim,
    DropKept,
    Hello,
    ListNeeds,
    ListSurplus,
    Release,
    Report,
    RsyncEndpoint,
    Status,
    auth_mac,
    page_paths,
    page_records,
)
from .records import FileRecord, Need, ReportAnswer, SourceStatus, StoreStatus

R = TypeVar("R")


def _deferred(f: Callable[..., Coroutine[Any, Any, R]]) -> Callable[..., Deferred[R]]:
    @wraps(f)
    def wrapper(*args, **kwargs) -> Deferred[R]:
        return Deferred.fromCoroutine(f(*args, **kwargs))

    return wrapper


@_deferred
async def login(
    proto: amp.AMP,
    client_host: str,
    secret: Optional[bytes],
    nonce: Callable[[int], bytes] = os.urandom,
) -> str:
    """
    Say L{Hello} as C{client_host} and authenticate both ways; fires with
    the server's host name.  A client with a secret refuses a server that
    does not ask for one or cannot prove it knows it (L{AuthFailed}).
    """
    hello = await proto.callRemote(
        Hello, client_host=client_host, protocol=PROTOCOL_VERSION
    )
    server = hello["server_host"]
    if not hello["auth_required"]:
        if secret is not None:
            raise AuthFailed(f"server {server} does not check the secret; refusing it")
        return server
    if secret is None:
        raise AuthFailed(f"server {server} requires the shared secret")
    server_nonce = hello["nonce"]
    if len(server_nonce) != NONCE_BYTES:
        raise AuthFailed(f"server {server} sent a bad challenge")
    client_nonce = nonce(NONCE_BYTES)
    answer = await proto.callRemote(
        Authenticate,
        client_nonce=client_nonce,
        mac=auth_mac(secret, b"client", server_nonce, client_nonce, client_host),
    )
    expected = auth_mac(secret, b"server", server_nonce, client_nonce, client_host)
    if not hmac.compare_digest(answer["server_mac"], expected):
        raise AuthFailed(f"server {server} could not prove it knows the secret")
    return server


async def _send_reports(proto, source, store, sends: list[dict], used, quota) -> ReportAnswer:
    """
    Send one L{Report} per item of C{sends} (its lists and inventory mark),
    then empty deltas while the server says it has C{more} to answer;
    gather the answers.
    """
    stale: list[bytes] = []
    orphans: list[bytes] = []
    more = False
    for send in sends:
        lists = {k: v for k, v in send.items() if k in ("kept", "unkept") and v}
        answer = await proto.callRemote(
            Report,
            source=source,
            store=store,
            files=send.get("files", []),
            removed=send.get("removed", []),
            inventory=send.get("inventory", ""),
            used=used,
            quota=quota,
            **lists,
        )
        stale.extend(answer["stale"])
        orphans.extend(answer["orphans"])
        more = answer["more"]
    while more:
        answer = await proto.callRemote(
            Report, source=source, store=store, files=[], removed=[], inventory=""
        )
        stale.extend(answer["stale"])
        orphans.extend(answer["orphans"])
        more = answer["more"]
    return ReportAnswer(stale=tuple(stale), orphans=tuple(orphans))


def _boxes(pages: list) -> list:
    """C{pages} of one list, grouped into L{Chunks} of one L{Report} each."""
    return [Chunks(pages[k:k + MAX_CHUNKS]) for k in range(0, len(pages), MAX_CHUNKS)]


def inventory_marks(count: int) -> list[str]:
    """The L{Report} C{inventory} marks of an inventory sent in C{count} reports."""
    if count <= 1:
        return ["start+end"]
    return ["start"] + [""] * (count - 2) + ["end"]


@_deferred
async def report_inventory(
    proto: amp.AMP,
    source: str,
    store: str,
    records: Iterable[FileRecord],
    used: Optional[int] = None,
    quota: Optional[int] = None,
    budget: int = PAGE_BUDGET,
    kept: Iterable[FileRecord] = (),
) -> ReportAnswer:
    """
    Report C{store}'s full inventory of C{source} in pages (one page marked
    C{"start+end"} when it fits, or when empty), with every superseded
    version it C{kept}; fires with every stale and orphaned path the server
    answered.
    """
    sends = [dict(files=files) for files in _boxes(page_records(records, budget))]
    sends += [dict(kept=box) for box in _boxes(page_records(kept, budget))]
    sends = sends or [{}]
    for send, mark in zip(sends, inventory_marks(len(sends))):
        send["inventory"] = mark
    return await _send_reports(proto, source, store, sends, used, quota)


@_deferred
async def report_delta(
    proto: amp.AMP,
    source: str,
    store: str,
    held: Iterable[FileRecord] = (),
    removed: Iterable[bytes] = (),
    used: Optional[int] = None,
    quota: Optional[int] = None,
    budget: int = PAGE_BUDGET,
    kept: Iterable[FileRecord] = (),
    unkept: Iterable[FileRecord] = (),
) -> ReportAnswer:
    """
    Report changes since the last report (at least one L{Report}, which
    renews the lease): files newly C{held} and C{removed}, superseded
    versions newly C{kept} and deleted (C{unkept}); fires with the stale
    and orphaned paths answered.
    """
    pairs = zip_longest(
        _boxes(page_records(held, budget)), _boxes(page_paths(removed, budget)), fillvalue=[]
    )
    sends = [dict(files=files, removed=gone) for files, gone in pairs]
    sends += [dict(kept=box) for box in _boxes(page_records(kept, budget))]
    sends += [dict(unkept=box) for box in _boxes(page_records(unkept, budget))]
    return await _send_reports(proto, source, store, sends or [{}], used, quota)


@_deferred
async def drop_kept(
    proto: amp.AMP,
    source: str,
    store: str,
    kept: Iterable[FileRecord],
    budget: int = PAGE_BUDGET,
) -> list[FileRecord]:
    """Ask to delete superseded versions C{store} keeps, in pages; fires with those granted."""
    granted: list[FileRecord] = []
    for page in page_records(kept, budget):
        answer = await proto.callRemote(DropKept, source=source, store=store, kept=page)
        granted.extend(answer["granted"])
    return granted


def server_endpoint(reactor, address: str, port: int, timeout: float = 10):
    """The client endpoint of a server at C{address} (IPv4, IPv6 or a name)."""
    if ":" in address:
        return TCP6ClientEndpoint(reactor, address.strip("[]"), port, timeout=timeout)
    return TCP4ClientEndpoint(reactor, address, port, timeout=timeout)


def connect_failure_reason(failure: Failure) -> str:
    """Why a connection to a server failed, in a few words for the operator."""
    e = failure.value
    if isinstance(e, net_error.ConnectionRefusedError):
        return "connection refused (is cbackup-server running there?)"
    if isinstance(e, net_error.DNSLookupError):
        return "its name does not resolve (set 'address:' in the config)"
    if isinstance(e, (net_error.TimeoutError, net_error.TCPTimedOutError)):
        return "no connection within the timeout"
    if isinstance(e, net_error.NoRouteError):
        return "no route to the host"
    if isinstance(e, net_error.ConnectError) and e.osError:
        return f"{e.osError}"
    return failure.getErrorMessage() or type(e).__name__


@implementer(IStreamClientEndpoint)
class ReportingEndpoint:
    """
    The endpoint of server C{server} at C{address}:C{port}, wrapping
    C{endpoint}, that logs why connecting fails: a warning naming the
    server, its address and the reason when a reason first appears (not at
    every retry: while it stays the same, C{ClientService}'s retry lines,
    which print this endpoint as C{server NAME at ADDRESS:PORT}, say it goes
    on), and once at info when a connection succeeds after failures.
    C{who} (the store) starts each line.
    """

    def __init__(self, endpoint, server: str, address: str, port: int, who: str = "",
                 logger: Optional[Logger] = None) -> None:
        self._endpoint = endpoint
        self._log = logger or _connect_log
        self._who = f"{who}: " if who else ""
        where = f"[{address}]" if ":" in address and not address.startswith("[") else address
        self._name = f"server {server} at {where}:{port}"
        self._reason: Optional[str] = None
        self._failures = 0

    def __str__(self) -> str:
        return self._name

    def __repr__(self) -> str:
        return f"<ReportingEndpoint {self._name}>"

    def connect(self, factory) -> Deferred:
        return self._endpoint.connect(factory).addCallbacks(self._connected, self._failed)

    def _connected(self, proto):
        if self._failures:
            self._log.info("{who}connected to {server} after {failures} failed attempts",
                           who=self._who, server=self._name, failures=self._failures)
        self._reason, self._failures = None, 0
        return proto

    def _failed(self, failure: Failure) -> Failure:
        if failure.check(CancelledError):  # the service stopped: no failure of the server
            return failure
        self._failures += 1
        reason = connect_failure_reason(failure)
        if reason != self._reason:
            self._reason = reason
            self._log.warn("{who}cannot connect to {server}: {reason}; retrying, with backoff",
                           who=self._who, server=self._name, reason=reason)
        return failure


_connect_log = Logger(namespace="cluster_backup.session")


async def _follow(proto, command, source: str, store: str, limit: int,
                  page: int) -> tuple[list[Need], Optional[dict]]:
    """
    Ask C{command} (L{ListNeeds} or L{ListSurplus}) page after page,
    following cursors (through short or empty pages) until the end or
    C{limit} needs; returns the needs and the last answer.
    """
    needs: list[Need] = []
    cursor, answer = None, None
    while len(needs) < limit:
        answer = await proto.callRemote(
            command, source=source, store=store, cursor=cursor,
            limit=min(page, limit - len(needs)))
        needs.extend(answer["needs"])
        cursor = answer["cursor"]
        if cursor is None:
            break
    return needs, answer


@_deferred
async def list_all_needs(
    proto: amp.AMP, source: str, store: str, limit: int = 10_000, page: int = 1_000
) -> tuple[list[Need], bool, bool]:
    """
    Follow L{ListNeeds} cursors until the end or C{limit} needs; fires with
    C{(needs, safemode, fill_waits)} (the last page's).
    """
    needs, last = await _follow(proto, ListNeeds, source, store, limit, page)
    return needs, bool(last and last["safemode"]), bool(last and last.get("fill_waits"))


@_deferred
async def list_surplus(
    proto: amp.AMP, source: str, store: str, limit: int = 10_000, page: int = 1_000
) -> list[Need]:
    """
    Follow L{ListSurplus} cursors (through short or empty pages) until the
    end or C{limit} needs; fires with C{store}'s surplus copies of
    C{source}, most copies first.
    """
    needs, _ = await _follow(proto, ListSurplus, source, store, limit, page)
    return needs


@frozen
class Grant:
    """What a L{claim} got: the paths granted, where to fetch, for how long."""

    granted: tuple[bytes, ...]
    endpoint: RsyncEndpoint
    ttl: int


@_deferred
async def claim(
    proto: amp.AMP,
    source: str,
    store: str,
    paths: Iterable[bytes],
    fill: bool = False,
    budget: int = PAGE_BUDGET,
) -> Grant:
    """
    Claim C{paths} in pages (as needs, or with C{fill} as greedy fill: see
    L{Claim}); fires with a L{Grant} of everything granted.
    """
    granted: list[bytes] = []
    answer = None
    for page in page_paths(paths, budget) or [[]]:
        answer = await proto.callRemote(Claim, source=source, store=store, paths=page,
                                        fill=fill)
        granted.extend(answer["granted"])
    endpoint = RsyncEndpoint(
        answer["rsync_host"],
        answer["rsync_port"],
        answer["rsync_module"],
        answer["rsync_user"],
        answer["rsync_password"],
    )
    return Grant(tuple(granted), endpoint, answer["ttl"])


@_deferred
async def release(
    proto: amp.AMP,
    source: str,
    store: str,
    paths: Iterable[bytes],
    drop: bool = False,
    budget: int = PAGE_BUDGET,
) -> list[bytes]:
    """Release (or, with C{drop}, ask to drop) C{paths} in pages; fires with
    the paths granted for dropping (none for a plain release)."""
    granted: list[bytes] = []
    for page in page_paths(paths, budget):
        answer = await proto.callRemote(
            Release, source=source, store=store, paths=page, drop=drop
        )
        granted.extend(answer["granted"])
    return granted


def parse_statuses(text: str) -> tuple[list[SourceStatus], list[tuple[str, StoreStatus]]]:
    """Turn a L{Status} page into source statuses and (source, store status)."""
    sources, stores = [], []
    for item in json.loads(text):
        kind = item.pop("kind")
        if kind == "source":
            item["histogram"] = {int(k): v for k, v in item["histogram"].items()}
            sources.append(SourceStatus(**item))
        elif kind == "store":
            source = item.pop("source")
            stores.append((source, StoreStatus(**item)))
    return sources, stores


@_deferred
async def status_all(
    proto: amp.AMP,
) -> tuple[list[SourceStatus], list[tuple[str, StoreStatus]]]:
    """Follow L{Status} cursors to the end; fires as L{parse_statuses}."""
    sources: list[SourceStatus] = []
    stores: list[tuple[str, StoreStatus]] = []
    cursor = None
    while True:
        answer = await proto.callRemote(Status, cursor=cursor)
        more_sources, more_stores = parse_statuses(answer["statuses"])
        sources.extend(more_sources)
        stores.extend(more_stores)
        cursor = answer["cursor"]
        if cursor is None:
            return sources, stores
