"""
The AMP conversation between a client (one agent per store) and a server.

Connections always go client -> server.  A client says L{Hello}, proves it
knows the cluster's shared secret with L{Authenticate} (when one is set),
then, for each source it backs up: L{Report}s its holdings (a full inventory
in pages when it connects, deltas after), asks L{ListNeeds}, L{Claim}s what
it will fetch with rsync, asks L{ListSurplus} for the copies it holds above
C{copies} when it is full, L{Release}s claims or asks to drop surplus copies.
L{Status} serves C{cbackup status}.

Every AMP value is at most 65,535 bytes, so every list travels in pages
filled to L{PAGE_BUDGET} bytes by the C{page_*} helpers, and paths travel as
bytes in a compact length-prefixed encoding (L{PathList}, L{RecordList},
L{NeedList}) that is checked with L{relpath_problem} on the way in and out.

The server side is L{ServerProtocol} (built by L{ServerFactory}); the client
side is any L{amp.AMP} plus the helpers L{login}, L{report_inventory},
L{report_delta}, L{list_all_needs}, L{list_surplus}, L{claim}, L{release} and
L{status_all}.
"""

from __future__ import annotations

import hmac
import json
import os
import struct
from collections import deque
from functools import wraps
from hashlib import sha256
from itertools import zip_longest
from typing import (
    Any,
    Callable,
    Coroutine,
    Iterable,
    Mapping,
    Optional,
    Sequence,
    TypeVar,
)

from attrs import asdict, field, frozen
from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.protocols import amp
from twisted.python.failure import Failure

from .records import (
    FileRecord,
    LedgerAPI,
    Need,
    ReportAnswer,
    SourceStatus,
    StoreStatus,
    relpath_problem,
)

log = Logger()

#: Version of this conversation, sent in L{Hello}.
PROTOCOL_VERSION = 1

#: Most bytes one encoded list value may take.  Under AMP's 65,535-byte
#: value limit with room to spare.
PAGE_BUDGET = 60_000

#: A ledger's C{needs} or C{surplus}: (store, cursor, limit) -> (page, cursor).
NeedListing = Callable[[str, Optional[bytes], int], tuple[list[Need], Optional[bytes]]]

#: Bytes of random challenge each side contributes to authentication.
NONCE_BYTES = 32

#: Wrong MACs a connection may send before the server hangs up.
MAX_AUTH_FAILURES = 3

#: Seconds a connection may stay unauthenticated before the server hangs up.
AUTH_TIMEOUT = 30.0

#: Most needs one L{ListNeeds} (or L{ListSurplus}) answer holds, whatever the
#: client asks.
MAX_NEEDS_LIMIT = 10_000

#: Default seconds a claim lasts, told to clients; the ledger's claim lease
#: (L{cluster_backup.ledger.Ledger}'s C{claim_ttl}, 300 by default) should match.
CLAIM_TTL = 300

#: L{Report} C{inventory} marks: a delta, first, last, or only inventory page.
INVENTORY_MARKS = ("", "start", "end", "start+end")


# ---------------------------------------------------------------- errors


class ProtocolError(Exception):
    """Base of the errors a peer is told about; the message crosses the wire."""


class NotAuthenticated(ProtocolError):
    """A command other than Hello/Authenticate came before authentication."""


class AuthFailed(ProtocolError):
    """The MAC was wrong (or one side cannot authenticate the other)."""


class UnsupportedVersion(ProtocolError):
    """The client speaks a protocol version this server does not."""


class UnknownSource(ProtocolError):
    """The source is not served here, or the store does not back it up."""


class UnknownStore(ProtocolError):
    """The store id is not in the server's config."""


class NotYourStore(ProtocolError):
    """The store is configured on another host than the authenticated one."""


class BadArgument(ProtocolError):
    """A value is malformed: truncated list, bad mark, negative number..."""


class BadPath(BadArgument):
    """A path fails L{relpath_problem} (absolute, traversal, NUL, too long)."""


class UnknownPath(ProtocolError):
    """A path the source's ledger does not know (Claim, Release)."""


_COMMON_ERRORS = {
    NotAuthenticated: b"NOT_AUTHENTICATED",
    BadPath: b"BAD_PATH",
    BadArgument: b"BAD_ARGUMENT",
}

_STORE_ERRORS = {
    UnknownSource: b"UNKNOWN_SOURCE",
    UnknownStore: b"UNKNOWN_STORE",
    NotYourStore: b"NOT_YOUR_STORE",
    UnknownPath: b"UNKNOWN_PATH",
}


# ---------------------------------------------------------------- encoding

_PATH = struct.Struct(">H")  # path length
_RECORD = struct.Struct(">HQq")  # path length, size, mtime
_NEED = struct.Struct(">HQqII")  # path length, size, mtime, copies, wanted


def _checked(path: bytes) -> bytes:
    problem = relpath_problem(path)
    if problem is not None:
        shown = path[:200] if isinstance(path, bytes) else path
        raise BadPath(f"bad path {shown!r}: {problem}")
    return path


def path_size(path: bytes) -> int:
    """Bytes C{path} takes in an encoded L{PathList}."""
    return _PATH.size + len(path)


def record_size(record: FileRecord) -> int:
    """Bytes C{record} takes in an encoded L{RecordList}."""
    return _RECORD.size + len(record.path)


def need_size(need: Need) -> int:
    """Bytes C{need} takes in an encoded L{NeedList}."""
    return _NEED.size + len(need.path)


def encode_paths(paths: Iterable[bytes]) -> bytes:
    """Encode paths as (2-byte big-endian length, bytes) pairs."""
    out = []
    for path in paths:
        _checked(path)
        out.append(_PATH.pack(len(path)))
        out.append(path)
    return b"".join(out)


def encode_records(records: Iterable[FileRecord]) -> bytes:
    """Encode file records as (length, size, mtime, path) tuples."""
    out = []
    try:
        for r in records:
            if not isinstance(r, FileRecord):  # a FileRecord checked its path
                _checked(r.path)
            out.append(_RECORD.pack(len(r.path), r.size, r.mtime))
            out.append(r.path)
    except struct.error as e:
        raise BadArgument(f"record out of range: {e}") from None
    return b"".join(out)


def encode_needs(needs: Iterable[Need]) -> bytes:
    """Encode needs as (length, size, mtime, copies, wanted, path) tuples."""
    out = []
    try:
        for n in needs:
            out.append(
                _NEED.pack(len(_checked(n.path)), n.size, n.mtime, n.copies, n.wanted)
            )
            out.append(n.path)
    except struct.error as e:
        raise BadArgument(f"need out of range: {e}") from None
    return b"".join(out)


def _decode(data: bytes, head: struct.Struct, what: str, check=True) -> list[tuple]:
    """Split C{data} into (header fields..., path) tuples, checking paths."""
    items = []
    offset, end = 0, len(data)
    while offset < end:
        if end - offset < head.size:
            raise BadArgument(f"truncated {what} list at byte {offset}")
        fields = head.unpack_from(data, offset)
        offset += head.size
        length = fields[0]
        if end - offset < length:
            raise BadArgument(f"truncated {what} list at byte {offset}")
        path = data[offset : offset + length]
        offset += length
        items.append(fields[1:] + ((_checked(path) if check else path),))
    return items


def decode_paths(data: bytes) -> list[bytes]:
    """Inverse of L{encode_paths}; raises L{BadPath} or L{BadArgument}."""
    return [path for (path,) in _decode(data, _PATH, "path")]


def decode_records(data: bytes) -> list[FileRecord]:
    """Inverse of L{encode_records}; raises L{BadPath} or L{BadArgument}."""
    try:
        # FileRecord checks each path with relpath_problem itself.
        return [
            FileRecord(p, s, m) for s, m, p in _decode(data, _RECORD, "record", False)
        ]
    except ValueError:
        _decode(data, _RECORD, "record")  # raises BadPath naming the problem
        raise


def decode_needs(data: bytes) -> list[Need]:
    """Inverse of L{encode_needs}; raises L{BadPath} or L{BadArgument}."""
    return [Need(p, s, m, c, w) for s, m, c, w, p in _decode(data, _NEED, "need")]


class _Encoded(amp.Argument):
    def __init__(self, encode, decode, optional=False):
        super().__init__(optional)
        self._encode = encode
        self._decode = decode

    def toString(self, inObject) -> bytes:
        data = self._encode(inObject)
        if len(data) > amp.MAX_VALUE_LENGTH:
            raise BadArgument(
                f"{len(data)}-byte list value is over AMP's limit: page it"
            )
        return data

    def fromString(self, inString: bytes):
        return self._decode(inString)


class PathList(_Encoded):
    """An AMP argument holding a list of relative paths (bytes)."""

    def __init__(self, optional=False):
        super().__init__(encode_paths, decode_paths, optional)


class RecordList(_Encoded):
    """An AMP argument holding a list of L{FileRecord}s."""

    def __init__(self, optional=False):
        super().__init__(encode_records, decode_records, optional)


class NeedList(_Encoded):
    """An AMP argument holding a list of L{Need}s."""

    def __init__(self, optional=False):
        super().__init__(encode_needs, decode_needs, optional)


# ---------------------------------------------------------------- paging

T = TypeVar("T")


def paginate(
    items: Iterable[T], size: Callable[[T], int], budget: int = PAGE_BUDGET
) -> list[list[T]]:
    """
    Split C{items} in order into pages whose sizes add up to at most
    C{budget}, each page filled greedily.  No items, no pages.

    @raise ValueError: if one item alone is bigger than C{budget}.
    """
    pages: list[list[T]] = []
    page: list[T] = []
    used = 0
    for item in items:
        n = size(item)
        if n > budget:
            raise ValueError(f"one item takes {n} bytes, over the {budget} budget")
        if used + n > budget:
            pages.append(page)
            page, used = [], 0
        page.append(item)
        used += n
    if page:
        pages.append(page)
    return pages


def page_paths(paths: Iterable[bytes], budget: int = PAGE_BUDGET) -> list[list[bytes]]:
    """Pages of C{paths} that each encode in at most C{budget} bytes."""
    return paginate(paths, path_size, budget)


def page_records(
    records: Iterable[FileRecord], budget: int = PAGE_BUDGET
) -> list[list[FileRecord]]:
    """Pages of C{records} that each encode in at most C{budget} bytes."""
    return paginate(records, record_size, budget)


def page_needs(needs: Iterable[Need], budget: int = PAGE_BUDGET) -> list[list[Need]]:
    """Pages of C{needs} that each encode in at most C{budget} bytes."""
    return paginate(needs, need_size, budget)


def _fitting(items: Sequence[T], size: Callable[[T], int], budget: int) -> int:
    """How many of the first C{items} fit in C{budget} bytes."""
    used = 0
    for i, item in enumerate(items):
        used += size(item)
        if used > budget:
            return i
    return len(items)


# ---------------------------------------------------------------- commands


class _Command(amp.Command):
    errors = _COMMON_ERRORS


class Hello(_Command):
    """
    Open the conversation as C{client_host} (a host name from the config).

    Answers the server's challenge C{nonce} and whether L{Authenticate} must
    follow.  When the server has no secret, Hello alone authenticates.  A new
    Hello restarts authentication on this connection.
    """

    commandName = b"hello"
    arguments = [(b"client_host", amp.Unicode()), (b"protocol", amp.Integer())]
    response = [
        (b"nonce", amp.String()),
        (b"server_host", amp.Unicode()),
        (b"auth_required", amp.Boolean()),
    ]
    errors = {UnsupportedVersion: b"UNSUPPORTED_VERSION"}


class Authenticate(_Command):
    """
    Prove knowledge of the shared secret: C{mac} is
    C{auth_mac(secret, b"client", nonce, client_nonce, client_host)}; the
    answer's C{server_mac} is the same with C{b"server"}, so the client
    checks the server too.  Each server nonce serves one attempt; the
    server hangs up after L{MAX_AUTH_FAILURES} wrong MACs.
    """

    commandName = b"authenticate"
    arguments = [(b"client_nonce", amp.String()), (b"mac", amp.String())]
    response = [(b"server_mac", amp.String())]
    errors = {AuthFailed: b"AUTH_FAILED"}


class Report(_Command):
    """
    Tell the server what C{store} holds of C{source}: C{files} held (at their
    version) and C{removed} paths no longer held.  Renews the store's lease.

    A full inventory is a run of pages marked C{"start"}, C{""}..., C{"end"};
    a one-page inventory is marked C{"start+end"}.  An unmarked (C{""})
    report outside an inventory is a delta.

    The answer lists C{stale} paths (held at an old version) and C{orphans}
    (no longer in the source).  When they would not fit in one answer the
    rest is kept for this connection and C{more} is true: the client sends
    further reports (an empty delta will do) until C{more} is false.
    """

    commandName = b"report"
    arguments = [
        (b"source", amp.Unicode()),
        (b"store", amp.Unicode()),
        (b"files", RecordList()),
        (b"removed", PathList()),
        (b"inventory", amp.Unicode()),
        (b"used", amp.Integer(optional=True)),
        (b"quota", amp.Integer(optional=True)),
    ]
    response = [
        (b"stale", PathList()),
        (b"orphans", PathList()),
        (b"more", amp.Boolean()),
    ]
    errors = _STORE_ERRORS


class ListNeeds(_Command):
    """
    Ask for up to C{limit} of C{store}'s needs from C{source}, most urgent
    first, starting after C{cursor}.  The answer's C{cursor} continues the
    listing (absent at the end); it may hold fewer than C{limit} needs to stay
    under the value limit.  C{safemode} true means the server lists no needs
    yet.  Files the store's host holds are never listed; L{ListSurplus} gives
    the copy counts of those above C{copies}.
    """

    commandName = b"list-needs"
    arguments = [
        (b"source", amp.Unicode()),
        (b"store", amp.Unicode()),
        (b"cursor", amp.String(optional=True)),
        (b"limit", amp.Integer()),
    ]
    response = [
        (b"needs", NeedList()),
        (b"cursor", amp.String(optional=True)),
        (b"safemode", amp.Boolean()),
    ]
    errors = _STORE_ERRORS


class ListSurplus(_Command):
    """
    Ask for up to C{limit} of the files C{store} holds of C{source} at the
    current version that have more live copies than the source's C{copies}:
    the copies a full store may ask to drop (with L{Release} C{drop}) to
    make room for a rarer file.  Most copies first, starting after
    C{cursor}.  Each need's C{copies} counts real live holdings on distinct
    hosts (claims do not count), the same count a drop is granted by;
    C{wanted} is the source's C{copies}.  The answer's C{cursor} continues
    the listing (absent at the end); a page may hold fewer than C{limit}
    needs, even none, and still have a cursor.  Nothing is listed while the
    server is in safemode (no drop would be granted either).
    """

    commandName = b"list-surplus"
    arguments = [
        (b"source", amp.Unicode()),
        (b"store", amp.Unicode()),
        (b"cursor", amp.String(optional=True)),
        (b"limit", amp.Integer()),
    ]
    response = [
        (b"needs", NeedList()),
        (b"cursor", amp.String(optional=True)),
    ]
    errors = _STORE_ERRORS


class Claim(_Command):
    """
    Claim C{paths} of C{source} for C{store} to fetch now.  The server grants
    a subset (C{granted}), each counted as a copy for C{ttl} seconds, and
    names the rsync daemon module to fetch them from.  Every path must be
    known to the source, or nothing is claimed.
    """

    commandName = b"claim"
    arguments = [
        (b"source", amp.Unicode()),
        (b"store", amp.Unicode()),
        (b"paths", PathList()),
    ]
    response = [
        (b"granted", PathList()),
        (b"rsync_host", amp.Unicode()),
        (b"rsync_port", amp.Integer()),
        (b"rsync_module", amp.Unicode()),
        (b"rsync_user", amp.Unicode()),
        (b"rsync_password", amp.Unicode()),
        (b"ttl", amp.Integer()),
    ]
    errors = _STORE_ERRORS


class Release(_Command):
    """
    With C{drop} false, abandon C{store}'s claims on C{paths}; C{granted} is
    empty, and every path must be a file of the source.  With C{drop} true,
    ask to delete C{store}'s copies of C{paths}; C{granted} are the ones it
    may delete (surplus, stale or orphaned copies).  A drop may name orphans
    (files the source no longer has), so the ledger itself checks those
    paths, before it changes anything.  A refused call changes nothing.
    """

    commandName = b"release"
    arguments = [
        (b"source", amp.Unicode()),
        (b"store", amp.Unicode()),
        (b"paths", PathList()),
        (b"drop", amp.Boolean()),
    ]
    response = [(b"granted", PathList())]
    errors = _STORE_ERRORS


class Status(_Command):
    """
    A page of the server's status: C{statuses} is a JSON list of objects,
    C{{"kind": "source", ...SourceStatus}} and C{{"kind": "store", "source":
    id, ...StoreStatus}}; C{cursor} continues it (absent at the end).  See
    L{parse_statuses}.
    """

    commandName = b"status"
    arguments = [(b"cursor", amp.String(optional=True))]
    response = [
        (b"statuses", amp.Unicode()),
        (b"cursor", amp.String(optional=True)),
    ]


_COMMANDS = {
    c.commandName: c
    for c in (
        Hello, Authenticate, Report, ListNeeds, ListSurplus, Claim, Release, Status
    )
}
_OPEN_COMMANDS = {Hello.commandName, Authenticate.commandName}


def auth_mac(
    secret: bytes,
    role: bytes,
    server_nonce: bytes,
    client_nonce: bytes,
    client_host: str,
) -> bytes:
    """
    HMAC-SHA256 over C{role} (C{b"client"} or C{b"server"}), both nonces
    (L{NONCE_BYTES} each, so the concatenation is unambiguous) and the
    client's host name in UTF-8.
    """
    message = role + server_nonce + client_nonce + client_host.encode("utf-8")
    return hmac.new(secret, message, sha256).digest()


# ---------------------------------------------------------------- server


@frozen
class RsyncEndpoint:
    """Where and as whom a client fetches a source's files with rsync."""

    host: str
    port: int
    module: str
    user: str
    password: str = field(repr=False)


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
    ):
        super().__init__()
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

    def __repr__(self) -> str:
        return f"<ServerProtocol peer={self.peer} host={self.client_host}>"

    # -- connection

    def connectionMade(self) -> None:
        super().connectionMade()
        self.peer = _peer_name(self.transport)
        log.info("connection from {peer}", peer=self.peer)
        self._auth_timer = self.clock.callLater(AUTH_TIMEOUT, self._auth_timed_out)

    def connectionLost(self, reason: Failure) -> None:
        self._cancel_auth_timer()
        log.info(
            "connection from {peer} ({host}) closed", peer=self.peer, host=self.client_host
        )
        super().connectionLost(reason)

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

    # -- dispatch

    def locateResponder(self, name: bytes):
        """
        Only our commands; only Hello/Authenticate before authentication;
        a value that fails to decode is answered with its typed error
        instead of AMP's default of dropping the connection.
        """
        command = _COMMANDS.get(name)
        if command is None:
            return None
        if self.client_host is None and name not in _OPEN_COMMANDS:
            return lambda box: fail(
                _remote(command, NotAuthenticated("authenticate first (Hello)"))
            )
        responder = super().locateResponder(name)

        def guarded(box):
            try:
                return responder(box)  # raises here only while decoding
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
    ) -> dict:
        ledger = self._ledger_for(source, store)
        if inventory not in INVENTORY_MARKS:
            raise BadArgument(f"inventory must be one of {INVENTORY_MARKS}")
        if (used is not None and used < 0) or (quota is not None and quota < 0):
            raise BadArgument("used and quota must not be negative")
        answers = []
        with _ledger_errors():
            if inventory.startswith("start"):
                ledger.inventory_started(store)
            answers.append(ledger.report(store, files, removed, used, quota))
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

    @staticmethod
    def _need_page(
        listing: NeedListing,
        store: str,
        cursor: Optional[bytes],
        limit: int,
    ) -> tuple[list[Need], Optional[bytes]]:
        """
        One page of C{listing} (a ledger's C{needs} or C{surplus}) that fits
        in L{PAGE_BUDGET} bytes.
        """
        if limit < 1:
            raise BadArgument("limit must be at least 1")
        limit = min(limit, MAX_NEEDS_LIMIT)
        with _ledger_errors():
            needs, after = listing(store, cursor, limit)
            # The ledger's cursor is opaque, so when its page is too big to
            # send, ask again for only as many needs as fit.
            while len(needs) > (fit := _fitting(needs, need_size, PAGE_BUDGET)):
                if len(needs) > limit:
                    raise RuntimeError("ledger returned more needs than asked for")
                limit = fit
                needs, after = listing(store, cursor, limit)
        return needs, after

    @ListNeeds.responder
    def list_needs(
        self, source: str, store: str, limit: int, cursor: Optional[bytes] = None
    ) -> dict:
        ledger = self._ledger_for(source, store)
        needs, after = self._need_page(ledger.needs, store, cursor, limit)
        return dict(needs=needs, cursor=after, safemode=ledger.safemode)

    @ListSurplus.responder
    def list_surplus(
        self, source: str, store: str, limit: int, cursor: Optional[bytes] = None
    ) -> dict:
        ledger = self._ledger_for(source, store)
        needs, after = self._need_page(ledger.surplus, store, cursor, limit)
        return dict(needs=needs, cursor=after)

    @Claim.responder
    def claim(self, source: str, store: str, paths: list[bytes]) -> dict:
        ledger = self._ledger_for(source, store)
        self._all_known(ledger, paths)
        endpoint = self.rsync(source)
        if not isinstance(endpoint, RsyncEndpoint):
            endpoint = RsyncEndpoint(*endpoint)
        with _ledger_errors():
            granted = list(ledger.claim(store, paths))
        log.info(
            "{store} claimed {granted} of {asked} files of {source}",
            store=store,
            source=source,
            granted=len(granted),
            asked=len(paths),
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
    out, used = [], 0
    while queue and used + path_size(queue[0]) <= budget:
        path = queue.popleft()
        out.append(path)
        used += path_size(path)
    return out


class ServerFactory(Factory):
    """Builds a L{ServerProtocol} per connection; arguments as its own."""

    protocol = ServerProtocol

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
    ):
        self.ledgers = ledgers
        self.stores = stores
        self._secret = secret
        self.server_host = server_host
        self.rsync = rsync
        self.clock = clock
        self.serves = serves
        self.claim_ttl = claim_ttl

    def buildProtocol(self, addr) -> ServerProtocol:
        p = ServerProtocol(
            self.ledgers,
            self.stores,
            self._secret,
            self.server_host,
            self.rsync,
            self.clock,
            serves=self.serves,
            claim_ttl=self.claim_ttl,
        )
        p.factory = self
        return p


# ---------------------------------------------------------------- client

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


async def _send_reports(proto, source, store, pages, used, quota) -> ReportAnswer:
    """
    Send one L{Report} per C{(files, removed, mark)} page, then empty deltas
    while the server says it has C{more} to answer; gather the answers.
    """
    stale: list[bytes] = []
    orphans: list[bytes] = []
    more = False
    for files, removed, mark in pages:
        answer = await proto.callRemote(
            Report,
            source=source,
            store=store,
            files=files,
            removed=removed,
            inventory=mark,
            used=used,
            quota=quota,
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


def inventory_marks(count: int) -> list[str]:
    """The L{Report} C{inventory} marks of an inventory sent in C{count} pages."""
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
) -> ReportAnswer:
    """
    Report C{store}'s full inventory of C{source} in pages (one page marked
    C{"start+end"} when it fits, or when empty); fires with every stale and
    orphaned path the server answered.
    """
    pages = page_records(records, budget) or [[]]
    marks = inventory_marks(len(pages))
    sends = [(page, [], mark) for page, mark in zip(pages, marks)]
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
) -> ReportAnswer:
    """
    Report changes since the last report (at least one L{Report}, which
    renews the lease); fires with the stale and orphaned paths answered.
    """
    pairs = zip_longest(
        page_records(held, budget), page_paths(removed, budget), fillvalue=[]
    )
    sends = [(files, gone, "") for files, gone in pairs] or [([], [], "")]
    return await _send_reports(proto, source, store, sends, used, quota)


@_deferred
async def list_all_needs(
    proto: amp.AMP, source: str, store: str, limit: int = 10_000, page: int = 1_000
) -> tuple[list[Need], bool]:
    """
    Follow L{ListNeeds} cursors until the end or C{limit} needs; fires with
    C{(needs, safemode)}.
    """
    needs: list[Need] = []
    cursor = None
    safemode = False
    while len(needs) < limit:
        answer = await proto.callRemote(
            ListNeeds,
            source=source,
            store=store,
            cursor=cursor,
            limit=min(page, limit - len(needs)),
        )
        needs.extend(answer["needs"])
        safemode = answer["safemode"]
        cursor = answer["cursor"]
        if cursor is None:
            break
    return needs, safemode


@_deferred
async def list_surplus(
    proto: amp.AMP, source: str, store: str, limit: int = 10_000, page: int = 1_000
) -> list[Need]:
    """
    Follow L{ListSurplus} cursors (through short or empty pages) until the
    end or C{limit} needs; fires with C{store}'s surplus copies of
    C{source}, most copies first.
    """
    needs: list[Need] = []
    cursor = None
    while len(needs) < limit:
        answer = await proto.callRemote(
            ListSurplus,
            source=source,
            store=store,
            cursor=cursor,
            limit=min(page, limit - len(needs)),
        )
        needs.extend(answer["needs"])
        cursor = answer["cursor"]
        if cursor is None:
            break
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
    budget: int = PAGE_BUDGET,
) -> Grant:
    """Claim C{paths} in pages; fires with a L{Grant} of everything granted."""
    granted: list[bytes] = []
    answer = None
    for page in page_paths(paths, budget) or [[]]:
        answer = await proto.callRemote(Claim, source=source, store=store, paths=page)
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
