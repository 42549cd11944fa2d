"""
The server's side of the AMP conversation: L{ServerProtocol} answers one
client connection's commands (defined in L{cluster_backup.protocol}) from
the sources' ledgers, and L{ServerFactory} builds one per connection.

It authenticates the client, checks every argument (store on the
authenticated host, source served, paths known) before any ledger call,
pages every answer to the AMP value limit and turns refusals into the
typed errors of the protocol.  It is kept apart from the wire contract so
that the contract reads on its own and the client need not import it.
"""

from __future__ import annotations

import hmac
import json
import os
from collections import Counter, deque
from typing import Any, Callable, Mapping, Optional, Sequence

from attrs import asdict
from twisted.internet.defer import fail
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.protocols import amp
from twisted.python.failure import Failure

from .protocol import (
    AUTH_TIMEOUT,
    Accept,
    CLAIM_TTL,
    COMMANDS,
    INVENTORY_MARKS,
    LIST_HEADER,
    MAX_AUTH_FAILURES,
    MAX_NEEDS_LIMIT,
    NONCE_BYTES,
    OPEN_COMMANDS,
    PAGE_BUDGET,
    PROTOCOL_VERSION,
    Authenticate,
    AuthFailed,
    BadArgument,
    Claim,
    DropKept,
    Hello,
    ListNeeds,
    ListSurplus,
    NotAuthenticated,
    NotYourStore,
    ProtocolError,
    Release,
    Report,
    RsyncEndpoint,
    Status,
    UnknownPath,
    UnknownSource,
    UnknownStore,
    UnsupportedVersion,
    auth_mac,
    check_paths,
    need_size,
    needs_fitting,
    path_size,
)
from .records import FileRecord, LedgerAPI, Need, Needs, Records

log = Logger()

#: Most keys one box may hold (our largest command has nine), so a peer
#: cannot grow one box without end.
MAX_BOX_KEYS = 32

#: Bytes a need takes in a page besides its path.
NEED_BYTES = need_size(Need(b"", 0, 0, 0, 0))

#: A ledger's C{needs} or C{surplus}: (store, cursor, limit) -> (page, cursor).
NeedListing = Callable[[str, Optional[bytes], int], tuple[list[Need], Optional[bytes]]]


def _peer_name(transport) -> str:
    addr = transport.getPeer() if transport is not None else None
    host, port = getattr(addr, "host", None), getattr(addr, "port", None)
    if host is not None and port is not None:
        return f"{host}:{port}"
    return str(addr)


def _status_items(ledgers: Mapping[str, LedgerAPI]) -> list[str]:
    items = []
    for source in sorted(ledgers):
        ledger = ledgers[source]
        s = asdict(ledger.status())
        s["histogram"] = {str(k): v for k, v in s["histogram"].items()}
        items.append(json.dumps(dict(s, kind="source"), sort_keys=True))
        for st in ledger.store_status():
            items.append(
                json.dumps(dict(asdict(st), kind="store", source=source), sort_keys=True)
            )
    return items


class ServerProtocol(amp.AMP):
    """
    The server's side of one client connection.

    @param ledgers: source id -> that source's ledger.
    @param stores: store id -> the host the config puts it on.
    @param secret: the shared secret, or C{None} to trust L{Hello} alone.
    @param server_host: this server's host name, told in L{Hello}.
    @param rsync: source id -> its rsync endpoint, as an L{RsyncEndpoint} or
        a C{(host, port, module, user, password)} tuple.
    @param clock: for the authentication timeout.
    @param serves: C{(store id, source id) -> bool}, whether that store backs
        up that source (the config's C{ignore source}); default all.
    @param claim_ttl: seconds a claim lasts, told in L{Claim} answers.
    @param nonce: C{n -> n random bytes}.
    @param accept: source id -> accept its held scan (L{Accept}); returns
        what it applied, or None; default: nothing is ever held.
    """

    def __init__(
        self,
        ledgers: Mapping[str, LedgerAPI],
        stores: Mapping[str, str],
        secret: Optional[bytes],
        server_host: str,
        rsync: Callable[[str], Any],
        clock: IReactorTime,
        serves: Optional[Callable[[str, str], bool]] = None,
        claim_ttl: int = CLAIM_TTL,
        nonce: Callable[[int], bytes] = os.urandom,
        accept: Optional[Callable[[str], Optional[dict]]] = None,
    ):
        super().__init__()
        self.accept_scan = accept if accept is not None else (lambda source: None)
        self.ledgers = ledgers
        self.stores = stores
        self._secret = secret
        self.server_host = server_host
        self.rsync = rsync
        self.clock = clock
        self.serves = serves if serves is not None else (lambda store, source: True)
        self.claim_ttl = claim_ttl
        self._nonce = nonce
        self.peer = "?"
        self.client_host: Optional[str] = None  # set once authenticated
        self._hello_host: Optional[str] = None
        self._server_nonce: Optional[bytes] = None
        self._failures = 0
        self._hang_up_after_send = False
        self._auth_timer = None
        # (source, store) -> (stale deque, orphans deque) not yet answered
        self._unanswered: dict[tuple[str, str], tuple[deque, deque]] = {}
        # Encoded bytes per need expected in the next page (see _need_page).
        self._need_bytes = NEED_BYTES + 64

    def __repr__(self) -> str:
        return f"<ServerProtocol peer={self.peer} host={self.client_host}>"

    # -- connection

    def connectionMade(self) -> None:
        super().connectionMade()
        self.peer = _peer_name(self.transport)
        log.info("connection from {peer}", peer=self.peer)
        self._count("connections")
        self._auth_timer = self.clock.callLater(AUTH_TIMEOUT, self._auth_timed_out)

    def connectionLost(self, reason: Failure) -> None:
        self._cancel_auth_timer()
        log.info(
            "connection from {peer} ({host}) closed", peer=self.peer, host=self.client_host
        )
        super().connectionLost(reason)

    def _count(self, what: str) -> None:
        traffic = getattr(getattr(self, "factory", None), "traffic", None)
        if traffic is not None:
            traffic[what] += 1

    def _auth_timed_out(self) -> None:
        self._auth_timer = None
        log.warn("{peer} did not authenticate in time; hanging up", peer=self.peer)
        self.transport.loseConnection()

    def _cancel_auth_timer(self) -> None:
        if self._auth_timer is not None and self._auth_timer.active():
            self._auth_timer.cancel()
        self._auth_timer = None

    def sendBox(self, box) -> None:
        super().sendBox(box)
        if self._hang_up_after_send:
            self.transport.loseConnection()

    def _hang_up(self, why: str) -> None:
        """Handle nothing more this peer sent, and close the connection."""
        log.warn("{peer}: {why}; hanging up", peer=self.peer, why=why)
        self.pauseProducing()  # ends the parsing of what is already buffered
        self.transport.loseConnection()

    def proto_key(self, string: bytes) -> str:
        """Bound a box's size: no command of ours has more than a few keys."""
        if string and self._currentBox is not None and len(self._currentBox) >= MAX_BOX_KEYS:
            self._hang_up(f"sent a box of more than {MAX_BOX_KEYS} keys")
            return "key"
        return super().proto_key(string)

    def ampBoxReceived(self, box) -> None:
        """
        The server never asks anything, so an answer, an error or a box
        that is not a command is a broken peer: hang up (AMP's default
        raises, and logs a traceback, on an answer to nothing).
        """
        if amp.COMMAND not in box or amp.ANSWER in box or amp.ERROR in box:
            self._hang_up("sent a box that is not a command")
            return
        super().ampBoxReceived(box)

    def unhandledError(self, failure: Failure) -> None:
        """A refused command sent without C{_ask} has no one to tell: log it."""
        if failure.check(amp.RemoteAmpError, ProtocolError):
            log.warn("{peer}: refused a command sent without _ask: {why}",
                     peer=self.peer,
                     why=getattr(failure.value, "description", None) or str(failure.value))
            return
        super().unhandledError(failure)

    # -- dispatch

    def locateResponder(self, name: bytes):
        """
        Only our commands; only Hello/Authenticate before authentication;
        a value that fails to decode is answered with its typed error
        instead of AMP's default of dropping the connection.
        """
        command = COMMANDS.get(name)
        if command is None:
            return None
        self._count(name.decode("ascii", "replace"))
        if self.client_host is None and name not in OPEN_COMMANDS:
            return lambda box: fail(
                _remote(command, NotAuthenticated("authenticate first (Hello)"))
            )
        responder = super().locateResponder(name)

        def guarded(box):
            try:
                try:
                    return responder(box)  # raises here only while decoding
                except (KeyError, ValueError, TypeError, OverflowError) as e:
                    # amp's own argument types: a missing argument, a bad
                    # Integer, Boolean or UTF-8 Unicode.
                    raise BadArgument(f"malformed arguments: {type(e).__name__}: "
                                      f"{str(e)[:200]}") from None
            except ProtocolError as e:
                log.warn(
                    "{peer}: refused {command}: {error}",
                    peer=self.peer,
                    command=name,
                    error=str(e),
                )
                return fail(_remote(command, e))

        return guarded

    # -- authentication

    def _authenticated(self, client_host: str) -> None:
        self.client_host = client_host
        self._cancel_auth_timer()
        log.info("{peer} authenticated as {host}", peer=self.peer, host=client_host)

    @Hello.responder
    def hello(self, client_host: str, protocol: int) -> dict:
        if protocol != PROTOCOL_VERSION:
            raise UnsupportedVersion(
                f"client speaks protocol {protocol}, server {PROTOCOL_VERSION}"
            )
        if not client_host or len(client_host) > 255:
            raise BadArgument("client_host must be 1 to 255 characters")
        if any(c < " " or c == "\x7f" for c in client_host):
            raise BadArgument("client_host must not hold control characters")
        self.client_host = None
        self._server_nonce = None
        if self._auth_timer is None:  # a Hello restarts authentication
            self._auth_timer = self.clock.callLater(AUTH_TIMEOUT, self._auth_timed_out)
        if self._secret is None:
            self._authenticated(client_host)
            return dict(nonce=b"", server_host=self.server_host, auth_required=False)
        self._hello_host = client_host
        self._server_nonce = self._nonce(NONCE_BYTES)
        return dict(
            nonce=self._server_nonce, server_host=self.server_host, auth_required=True
        )

    @Authenticate.responder
    def authenticate(self, client_nonce: bytes, mac: bytes) -> dict:
        if self._secret is None:
            raise AuthFailed("this server has no secret: Hello alone authenticates")
        server_nonce, self._server_nonce = self._server_nonce, None
        if server_nonce is None or self._hello_host is None:
            raise NotAuthenticated("send Hello first (each nonce serves one try)")
        host = self._hello_host
        expected = auth_mac(self._secret, b"client", server_nonce, client_nonce, host)
        if len(client_nonce) != NONCE_BYTES or not hmac.compare_digest(mac, expected):
            self._failures += 1
            log.warn(
                "authentication failed for {host} from {peer} ({failures} of {most})",
                host=host,
                peer=self.peer,
                failures=self._failures,
                most=MAX_AUTH_FAILURES,
            )
            if self._failures >= MAX_AUTH_FAILURES:
                log.warn("hanging up on {peer}", peer=self.peer)
                self._hang_up_after_send = True
            raise AuthFailed("wrong MAC")
        self._authenticated(host)
        return dict(
            server_mac=auth_mac(self._secret, b"server", server_nonce, client_nonce, host)
        )

    # -- checks, all made before any ledger call

    def _ledger_for(self, source: str, store: str) -> LedgerAPI:
        host = self.stores.get(store)
        if host is None:
            raise UnknownStore(f"no store {store!r} in the config")
        if host != self.client_host:
            raise NotYourStore(
                f"store {store!r} is on {host!r}, not on {self.client_host!r}"
            )
        ledger = self.ledgers.get(source)
        if ledger is None:
            raise UnknownSource(f"{self.server_host} serves no source {source!r}")
        if not self.serves(store, source):
            raise UnknownSource(f"store {store!r} does not back up {source!r}")
        return ledger

    @staticmethod
    def _all_known(ledger: LedgerAPI, paths: Sequence[bytes]) -> None:
        for path in paths:
            if not ledger.knows(path):
                raise UnknownPath(f"{ledger.source} has no file {path[:200]!r}")

    # -- commands

    @Report.responder
    def report(
        self,
        source: str,
        store: str,
        files: list[FileRecord],
        removed: list[bytes],
        inventory: str,
        used: Optional[int] = None,
        quota: Optional[int] = None,
        kept: Optional[Records] = None,
        unkept: Optional[Records] = None,
    ) -> dict:
        ledger = self._ledger_for(source, store)
        if inventory not in INVENTORY_MARKS:
            raise BadArgument(f"inventory must be one of {INVENTORY_MARKS}")
        if any(n is not None and not 0 <= n < 2**63 for n in (used, quota)):
            raise BadArgument("used and quota must be 0 to 2**63 - 1")
        answers = []
        with _ledger_errors():
            if inventory.startswith("start"):
                # It changes the ledger: every path must pass first.
                check_paths(files.paths)
                check_paths(removed)
                ledger.inventory_started(store)
            # The ledger has the names it does not know checked (a path it
            # knows came from a scan), before it changes anything.
            answers.append(ledger.report(store, files, removed, used, quota, vet=check_paths,
                                         kept=kept or (), unkept=unkept or ()))
            if inventory.endswith("end"):
                answers.append(ledger.inventory_finished(store))
        stale, orphans = self._unanswered.setdefault((source, store), (deque(), deque()))
        for answer in answers:
            stale.extend(answer.stale)
            orphans.extend(answer.orphans)
        stale_page = _take(stale, PAGE_BUDGET)
        orphan_page = _take(orphans, PAGE_BUDGET)
        more = bool(stale or orphans)
        if not more:
            del self._unanswered[(source, store)]
        return dict(stale=stale_page, orphans=orphan_page, more=more)

    def _need_page(
        self,
        listing: NeedListing,
        store: str,
        cursor: Optional[bytes],
        limit: int,
    ) -> tuple[Needs, Optional[bytes]]:
        """
        One page of C{listing} (a ledger's C{needs} or C{surplus}) that fits
        in L{PAGE_BUDGET} bytes.

        The ledger's cursor is opaque, so a page too big to send is asked
        again for only as many needs as fit.  To ask once, not twice, the
        first ask is for no more needs than fit at the bytes per need of
        this connection's last page (a page may be short: see L{ListNeeds}).
        """
        if limit < 1:
            raise BadArgument("limit must be at least 1")
        limit = min(limit, MAX_NEEDS_LIMIT)
        ask = min(limit, max(1, (PAGE_BUDGET - LIST_HEADER) // self._need_bytes))
        with _ledger_errors():
            needs, after = listing(store, cursor, ask)
            while len(needs) > (fit := needs_fitting(needs, PAGE_BUDGET)):
                if len(needs) > ask:
                    raise RuntimeError("ledger returned more needs than asked for")
                ask = fit
                needs, after = listing(store, cursor, ask)
        needs = Needs.of(needs)
        if needs:
            # 5% over this page's mean, so a like page fits at the first ask.
            mean = NEED_BYTES + sum(map(len, needs.paths)) / len(needs)
            self._need_bytes = int(mean * 1.05) + 1
        return needs, after

    @ListNeeds.responder
    def list_needs(
        self, source: str, store: str, limit: int, cursor: Optional[bytes] = None
    ) -> dict:
        ledger = self._ledger_for(source, store)
        needs, after = self._need_page(ledger.needs, store, cursor, limit)
        return dict(needs=needs, cursor=after, safemode=ledger.safemode,
                    fill_waits=ledger.fill_waits)

    @ListSurplus.responder
    def list_surplus(
        self, source: str, store: str, limit: int, cursor: Optional[bytes] = None
    ) -> dict:
        ledger = self._ledger_for(source, store)
        needs, after = self._need_page(ledger.surplus, store, cursor, limit)
        return dict(needs=needs, cursor=after)

    @Claim.responder
    def claim(self, source: str, store: str, paths: list[bytes], fill: bool = False) -> dict:
        ledger = self._ledger_for(source, store)
        self._all_known(ledger, paths)
        endpoint = self.rsync(source)
        if not isinstance(endpoint, RsyncEndpoint):
            endpoint = RsyncEndpoint(*endpoint)
        with _ledger_errors():
            granted = list(ledger.claim(store, paths, fill))
        log.info(
            "{store} claimed {granted} of {asked} files of {source}{why}",
            store=store,
            source=source,
            granted=len(granted),
            asked=len(paths),
            why=" (greedy fill)" if fill else "",
        )
        return dict(
            granted=granted,
            rsync_host=endpoint.host,
            rsync_port=endpoint.port,
            rsync_module=endpoint.module,
            rsync_user=endpoint.user,
            rsync_password=endpoint.password,
            ttl=self.claim_ttl,
        )

    @Release.responder
    def release(self, source: str, store: str, paths: list[bytes], drop: bool) -> dict:
        ledger = self._ledger_for(source, store)
        if not drop:
            self._all_known(ledger, paths)
        # Orphans are not known to the source but may be dropped: for a drop
        # the ledger checks every path (UnknownPath) before changing anything.
        with _ledger_errors():
            if not drop:
                ledger.release(store, paths)
                return dict(granted=[])
            granted = list(ledger.drop(store, paths))
        log.info(
            "{store} may drop {granted} of {asked} copies of {source}",
            store=store,
            source=source,
            granted=len(granted),
            asked=len(paths),
        )
        return dict(granted=granted)

    @DropKept.responder
    def drop_kept(self, source: str, store: str, kept: Records) -> dict:
        ledger = self._ledger_for(source, store)
        with _ledger_errors():
            granted = list(ledger.drop_kept(store, kept))
        log.info("{store} may drop {granted} of {asked} kept versions of {source}",
                 store=store, source=source, granted=len(granted), asked=len(kept))
        return dict(granted=granted)

    @Accept.responder
    def accept(self, source: str) -> dict:
        if source not in self.ledgers:
            raise UnknownSource(f"{self.server_host} serves no source {source[:300]!r}")
        applied = self.accept_scan(source)
        log.warn("{host} ({peer}) accepted the held scan of {source}: {what}",
                 host=self.client_host, peer=self.peer, source=source,
                 what="nothing was held" if applied is None else "applied")
        if applied is None:
            return dict(applied=False)
        return dict(applied=True, change=json.dumps(applied, sort_keys=True))

    @Status.responder
    def status(self, cursor: Optional[bytes] = None) -> dict:
        try:
            start = int(cursor) if cursor is not None else 0
        except ValueError:
            start = -1
        if start < 0:
            raise BadArgument(f"bad status cursor {cursor[:50]!r}")
        items = _status_items(self.ledgers)
        page, used, i = [], 2, start
        while i < len(items) and (not page or used + len(items[i]) + 1 <= PAGE_BUDGET):
            page.append(items[i])
            used += len(items[i]) + 1
            i += 1
        after = str(i).encode("ascii") if i < len(items) else None
        return dict(statuses="[" + ",".join(page) + "]", cursor=after)


def _remote(command: type[amp.Command], error: ProtocolError) -> amp.RemoteAmpError:
    """The wire form of C{error} as an answer to C{command}."""
    for cls in type(error).__mro__:
        code = command.allErrors.get(cls)
        if code is not None:
            return amp.RemoteAmpError(code, str(error), local=Failure(error))
    raise error


#: A ledger's exception class names and the errors a client is told instead.
_LEDGER_ERRORS = {
    "UnknownStore": UnknownStore,
    "UnknownPath": UnknownPath,
    "UnknownSource": UnknownSource,
    "BadCursor": BadArgument,
}


class _ledger_errors:
    """
    Translate a ledger's refusals (matched by class name, so this module need
    not import the ledger) into typed protocol errors.  The responders check
    everything they can first, so these are a safety net.
    """

    def __enter__(self):
        return self

    def __exit__(self, kind, value, tb):
        if kind is None or issubclass(kind, ProtocolError):
            return False
        for cls in kind.__mro__:
            ours = _LEDGER_ERRORS.get(cls.__name__)
            if ours is not None:
                raise ours(f"{cls.__name__}: {value}"[:500]) from value
        return False


def _take(queue: deque, budget: int) -> list[bytes]:
    """Pop paths off C{queue} while they fit in C{budget} encoded bytes."""
    out, used = [], LIST_HEADER
    while queue and used + path_size(queue[0]) <= budget:
        path = queue.popleft()
        out.append(path)
        used += path_size(path)
    return out


#: L{ServerProtocol}'s arguments in order, so the factory holds them by name.
_PROTOCOL_ARGS = ("ledgers", "stores", "secret", "server_host", "rsync", "clock")


class ServerFactory(Factory):
    """
    Builds a L{ServerProtocol} per connection, with the arguments given here
    (the same as L{ServerProtocol}'s), and counts the traffic they handle.
    """

    protocol = ServerProtocol

    def __init__(self, *args, **kwargs):
        self._kwargs = dict(zip(_PROTOCOL_ARGS, args), **kwargs)
        #: connections and commands (by name) handled since last cleared.
        self.traffic: Counter[str] = Counter()

    def configure(self, **kwargs) -> None:
        """New arguments (a reloaded secret, say) for the connections to come."""
        self._kwargs.update(kwargs)

    def buildProtocol(self, addr) -> ServerProtocol:
        p = ServerProtocol(**self._kwargs)
        p.factory = self
        return p

