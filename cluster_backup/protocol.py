"""
The wire contract of the AMP conversation between a client (one agent per
store) and a server: what may be said, and how it is encoded.

Connections always go client -> server.  A client says L{Hello}, proves it
knows the cluster's shared secret with L{Authenticate} (when one is set),
then, for each source it backs up: L{Report}s its holdings (a full inventory
in pages when it connects, deltas after), asks L{ListNeeds}, L{Claim}s what
it will fetch with rsync, asks L{ListSurplus} for the copies it holds above
C{copies} when it is full, L{Release}s claims or asks to drop surplus copies.
L{Status} serves C{cbackup status}.

Every AMP value is at most 65,535 bytes, so every list travels in pages
filled to L{PAGE_BUDGET} bytes by the C{page_*} helpers (a L{Report} carries
up to L{MAX_CHUNKS} pages of each of its lists, as L{Chunks}: a round trip
per page made inventories of millions of files slow), and paths travel as
bytes in a compact columnar encoding (L{PathList}, L{RecordList},
L{NeedList}) whose paths are checked as L{relpath_problem} does, on the way
in and out (a L{Report}'s, on the way in, by the ledger it goes to).

This module holds only what both ends must agree on: errors, limits,
argument encodings, the L{amp.Command}s and L{auth_mac}.  The server side
is L{cluster_backup.responder}; the client side is
L{cluster_backup.session}.  Keeping the contract apart lets each side be
read, and changed, without wading through the other.
"""

from __future__ import annotations

import hmac
import struct
import sys
from array import array
from bisect import bisect_right
from functools import partial
from hashlib import sha256
from itertools import accumulate
from typing import Iterable, Iterator, NoReturn, Optional, Sequence

from attrs import field, frozen
from twisted.protocols import amp

from .records import MAX_PATH, FileRecord, Need, Needs, Records, bad_path, relpath_problem

#: Version of this conversation, sent in L{Hello}.
PROTOCOL_VERSION = 1

#: Most bytes one encoded list value may take.  Under AMP's 65,535-byte
#: value limit with room to spare.
PAGE_BUDGET = 60_000

#: Most values (pages) one list argument may span in one box: a page goes
#: under the argument's own key, the next under C{key.1}, C{key.2}, ...  A
#: long report then costs one round trip per this many pages, and a box
#: stays at most this many values per list (the server bounds its keys).
MAX_CHUNKS = 12

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


#: Most characters of an error message sent to a peer.  Messages quote the
#: peer's own arguments, and an answer value over AMP's limit cannot be sent
#: at all (the connection drops with a traceback instead of the refusal).
MAX_ERROR_MESSAGE = 2000


class ProtocolError(Exception):
    """Base of the errors a peer is told about; the message crosses the wire."""

    def __init__(self, message: object = "") -> None:
        text = str(message)
        if len(text) > MAX_ERROR_MESSAGE:
            text = text[:MAX_ERROR_MESSAGE] + "..."
        super().__init__(text)


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
#
# An empty list is an empty value.  Any other list value is a 4-byte
# big-endian count, then one block per number column (that many
# little-endian integers: 64-bit sizes and mtimes, 32-bit copies), then
# every path followed by a NUL.  Columns, not rows: a page of
# thousands of items is encoded and decoded by a few C-level calls
# (array.frombytes, bytes.split) instead of a Python step per item, and its
# paths are checked by a few substring searches over the joined bytes.

_COUNT = struct.Struct(">I")

#: Bytes of an encoded list (of at least one item) before its items.
LIST_HEADER = _COUNT.size

_BIG_ENDIAN = sys.byteorder == "big"
assert array("q").itemsize == 8 and array("I").itemsize == 4

#: Bytes each kind of item takes besides its path and the path's NUL.
_PATH_FIXED, _RECORD_FIXED, _NEED_FIXED = 0, 16, 24


def _refuse(path, problem: str) -> NoReturn:
    shown = path[:200] if isinstance(path, bytes) else path
    raise BadPath(f"bad path {shown!r}: {problem}")


def _checked(path: bytes) -> bytes:
    problem = relpath_problem(path)
    if problem is not None:
        _refuse(path, problem)
    return path


def check_paths(paths: Sequence[bytes], joined: Optional[bytes] = None) -> None:
    """
    Raise L{BadPath} for the first of C{paths} that L{relpath_problem}
    refuses (at C speed for a page of good ones: see L{bad_path}, which
    also says what C{joined} is).
    """
    found = bad_path(paths, joined)
    if found is not None:
        _refuse(*found)


def _join(paths: Sequence[bytes], check: bool = True) -> bytes:
    """The paths, each followed by a NUL, after checking them (if C{check})."""
    if not paths:
        return b""
    if check:
        check_paths(paths)
    return b"\0".join(paths) + b"\0"


def _encode(paths: Sequence[bytes], numbers: Sequence[array], check: bool = True) -> bytes:
    if not paths:
        return b""
    parts = [_COUNT.pack(len(paths))]
    for column in numbers:
        if _BIG_ENDIAN:
            column = array(column.typecode, column)
            column.byteswap()
        parts.append(column.tobytes())
    parts.append(_join(paths, check))
    return b"".join(parts)


def _decode(data: bytes, codes: str, what: str,
            check: bool = True) -> tuple[list[bytes], list[array]]:
    """
    Split C{data} into its paths and number columns, checking both (the
    paths' names only if C{check}: see L{PathList}).
    """
    if not data:
        return [], [array(code) for code in codes]
    if len(data) < LIST_HEADER:
        raise BadArgument(f"truncated {what} list: {len(data)} bytes")
    (count,) = _COUNT.unpack_from(data)
    view = memoryview(data)
    offset = LIST_HEADER
    numbers = []
    for code in codes:
        column = array(code)
        end = offset + count * column.itemsize
        if end > len(data):
            raise BadArgument(f"truncated {what} list: {count} items need over {len(data)} bytes")
        column.frombytes(view[offset:end])
        if _BIG_ENDIAN:
            column.byteswap()
        numbers.append(column)
        offset = end
    if not count:
        raise BadArgument(f"an empty {what} list must be an empty value")
    rest = data[offset:]
    if not rest.endswith(b"\0"):
        raise BadArgument(f"{what} list does not end with a NUL")
    paths = rest[:-1].split(b"\0")
    if len(paths) != count:
        raise BadArgument(f"{what} list of {count} items holds {len(paths)} paths")
    if check:
        check_paths(paths, rest)
    return paths, numbers


_NON_NEGATIVE = bytes(range(128))


def _no_negative(column: array, what: str) -> None:
    """Refuse a 64-bit column holding a negative number (by sign bytes, at C speed)."""
    data = column.tobytes()
    signs = data[0::8] if _BIG_ENDIAN else data[7::8]
    if signs.translate(None, _NON_NEGATIVE):
        raise BadArgument(f"{what} out of range: negative")


def path_size(path: bytes) -> int:
    """Bytes C{path} adds to an encoded L{PathList} (after L{LIST_HEADER})."""
    return _PATH_FIXED + len(path) + 1


def record_size(record: FileRecord) -> int:
    """Bytes C{record} adds to an encoded L{RecordList} (after L{LIST_HEADER})."""
    return _RECORD_FIXED + len(record.path) + 1


def need_size(need: Need) -> int:
    """Bytes C{need} adds to an encoded L{NeedList} (after L{LIST_HEADER})."""
    return _NEED_FIXED + len(need.path) + 1


def encode_paths(paths: Iterable[bytes]) -> bytes:
    """Encode relative paths; raises L{BadPath} for one that is not."""
    return _encode(list(paths), ())


def encode_records(records: Iterable[FileRecord]) -> bytes:
    """
    Encode file records (L{FileRecord}s or L{Records}).  Their paths are not
    checked again: a L{FileRecord} checks its own, and L{Records} are made
    of those, of a scan's names, or of a decoded (checked) list.
    """
    try:
        columns = Records.of(records)
    except ValueError as e:
        raise BadArgument(f"record out of range: {e}") from None
    _no_negative(columns.sizes, "record size")
    return _encode(columns.paths, (columns.sizes, columns.mtimes), check=False)


def encode_needs(needs: Iterable[Need]) -> bytes:
    """Encode needs (L{Need}s or L{Needs})."""
    try:
        columns = Needs.of(needs)
    except ValueError as e:
        raise BadArgument(f"need out of range: {e}") from None
    _no_negative(columns.sizes, "need size")
    return _encode(columns.paths,
                   (columns.sizes, columns.mtimes, columns.copies, columns.wanted))


def decode_paths(data: bytes, check: bool = True) -> list[bytes]:
    """
    Inverse of L{encode_paths}; raises L{BadPath} (only if C{check}) or
    L{BadArgument}.
    """
    return _decode(data, "", "path", check)[0]


def decode_records(data: bytes, check: bool = True) -> Records:
    """
    Inverse of L{encode_records}; raises L{BadPath} (only if C{check}) or
    L{BadArgument}.
    """
    paths, (sizes, mtimes) = _decode(data, "qq", "record", check)
    _no_negative(sizes, "record size")
    return Records(paths, sizes, mtimes)


def decode_needs(data: bytes) -> Needs:
    """Inverse of L{encode_needs}; raises L{BadPath} or L{BadArgument}."""
    paths, (sizes, mtimes, copies, wanted) = _decode(data, "qqII", "need")
    _no_negative(sizes, "need size")
    return Needs(paths, sizes, mtimes, copies, wanted)


class Chunks(tuple):
    """
    Pages of one list value, sent in one box: each page as one AMP value
    (see L{MAX_CHUNKS}).  Only arguments made with C{chunked=True} take
    them; the receiver gets the pages joined into one list.
    """


class _Encoded(amp.Argument):
    def __init__(self, encode, decode, optional=False, chunked=False, join=None):
        super().__init__(optional)
        self._encode = encode
        self._decode = decode
        self._chunked = chunked
        self._join = join

    # Our argument names are plain identifiers: the wire name decoded is the
    # Python one.
    def toBox(self, name, strings, objects, proto):
        label = name.decode()
        value = objects.get(label)
        if not isinstance(value, Chunks):
            return super().toBox(name, strings, objects, proto)
        if not self._chunked or not 0 < len(value) <= MAX_CHUNKS:
            raise BadArgument(f"{len(value)} pages cannot go in one {label} value")
        del objects[label]
        strings[name] = self.toString(value[0])
        for k, page in enumerate(value[1:], 1):
            strings[b"%s.%d" % (name, k)] = self.toString(page)

    def fromBox(self, name, strings, objects, proto):
        prefix = name + b"."
        # A box has a few dozen keys at most (the server bounds them).
        extra = [k for k in strings if k.startswith(prefix)]
        if not extra:
            return super().fromBox(name, strings, objects, proto)
        label = name.decode()
        if not self._chunked:
            raise BadArgument(f"{label} takes one value, not {label}.1 and on")
        if len(extra) >= MAX_CHUNKS:
            raise BadArgument(f"{label} spans over {MAX_CHUNKS} values")
        keys = [b"%s.%d" % (name, k) for k in range(1, len(extra) + 1)]
        if name not in strings or set(extra) != set(keys):
            raise BadArgument(f"{label}: its values must be {label}, {label}.1, "
                              f"{label}.2 ... without gaps")
        pages = [self.fromString(strings.pop(k)) for k in [name] + keys]
        objects[label] = self._join(pages)

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
    """
    An AMP argument holding a list of relative paths (bytes).  With
    C{checked} false, the receiver's decoding checks the list's form but not
    the paths' names: its responder checks them (L{check_paths}), or has
    them checked, before they change anything.
    """

    def __init__(self, optional=False, chunked=False, checked=True):
        super().__init__(encode_paths, partial(decode_paths, check=checked), optional, chunked,
                         lambda pages: [p for page in pages for p in page])


class RecordList(_Encoded):
    """
    An AMP argument holding L{FileRecord}s; decoded as L{Records}.
    C{checked} is as for L{PathList}.
    """

    def __init__(self, optional=False, chunked=False, checked=True):
        super().__init__(encode_records, partial(decode_records, check=checked), optional,
                         chunked, Records.join)


class NeedList(_Encoded):
    """An AMP argument holding L{Need}s; decoded as L{Needs}."""

    def __init__(self, optional=False):
        super().__init__(encode_needs, decode_needs, optional)


# ---------------------------------------------------------------- paging


def _bounds(paths: Sequence[bytes], fixed: int, budget: int) -> Iterator[tuple[int, int]]:
    """
    C{(start, end)} of consecutive pages of items (with C{paths}, each item
    taking C{fixed} bytes more than its path and NUL) whose encodings take at
    most C{budget} bytes each, each page filled greedily.

    @raise ValueError: if one item alone is bigger than C{budget}.
    """
    room = budget - LIST_HEADER
    each = fixed + 1
    lengths = list(accumulate(map(len, paths)))  # of the paths alone, at C speed
    n = len(lengths)

    def used(j: int) -> int:  # bytes of items 0..j
        return lengths[j] + (j + 1) * each

    start, base = 0, 0
    while start < n:
        end = bisect_right(range(n), base + room, start, key=used)
        if end == start:
            size = used(start) - base + LIST_HEADER
            raise ValueError(f"one item takes {size} bytes, over the {budget} budget")
        yield start, end
        start, base = end, used(end - 1)


def page_paths(paths: Iterable[bytes], budget: int = PAGE_BUDGET) -> list[list[bytes]]:
    """Pages of C{paths} that each encode in at most C{budget} bytes."""
    paths = list(paths)
    return [paths[a:b] for a, b in _bounds(paths, _PATH_FIXED, budget)]


def page_records(records: Iterable[FileRecord], budget: int = PAGE_BUDGET) -> list[Records]:
    """Pages of C{records} (as L{Records}) that each encode in at most C{budget} bytes."""
    columns = Records.of(records)
    return [columns[a:b] for a, b in _bounds(columns.paths, _RECORD_FIXED, budget)]


def page_needs(needs: Iterable[Need], budget: int = PAGE_BUDGET) -> list[Needs]:
    """Pages of C{needs} (as L{Needs}) that each encode in at most C{budget} bytes."""
    columns = Needs.of(needs)
    return [columns[a:b] for a, b in _bounds(columns.paths, _NEED_FIXED, budget)]


def needs_fitting(needs: Iterable[Need], budget: int = PAGE_BUDGET) -> int:
    """How many of the first C{needs} encode in at most C{budget} bytes."""
    columns = Needs.of(needs)
    for _, end in _bounds(columns.paths, _NEED_FIXED, budget):
        return end
    return 0


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

    C{files} and C{removed} may each span up to L{MAX_CHUNKS} values (see
    L{Chunks}).  A full inventory is a run of reports marked C{"start"},
    C{""}..., C{"end"}; a one-report inventory is marked C{"start+end"}.
    An unmarked (C{""}) report outside an inventory is a delta.

    C{kept} lists superseded versions the store keeps outside its layout
    (DESIGN.md rule 7: a copy the source replaced is kept for C{keep
    deleted}), each a record of the source path at its old size and mtime:
    in an inventory every one of them, in a delta those newly kept.
    C{unkept} lists kept versions the store deleted (a delta only).  Both
    are optional and checked like C{files}.

    The answer lists C{stale} paths (held at an old version) and C{orphans}
    (no longer in the source).  When they would not fit in one answer the
    rest is kept for this connection and C{more} is true: the client sends
    further reports (an empty delta will do) until C{more} is false.
    """

    commandName = b"report"
    arguments = [
        (b"source", amp.Unicode()),
        (b"store", amp.Unicode()),
        # Checked by the ledger's report (see Ledger.report's vet): a path
        # it knows came from a scan, so only the others need a look.
        (b"files", RecordList(chunked=True, checked=False)),
        (b"removed", PathList(chunked=True, checked=False)),
        (b"inventory", amp.Unicode()),
        (b"used", amp.Integer(optional=True)),
        (b"quota", amp.Integer(optional=True)),
        (b"kept", RecordList(optional=True, chunked=True)),
        (b"unkept", RecordList(optional=True, chunked=True)),
    ]
    response = [
        (b"stale", PathList()),
        (b"orphans", PathList()),
        (b"more", amp.Boolean()),
    ]
    errors = _STORE_ERRORS


#: The arguments of a paged listing of needs (L{ListNeeds}, L{ListSurplus}).
_NEEDS_PAGE = [
    (b"source", amp.Unicode()),
    (b"store", amp.Unicode()),
    (b"cursor", amp.String(optional=True)),
    (b"limit", amp.Integer()),
]


class ListNeeds(_Command):
    """
    Ask for up to C{limit} of C{store}'s needs from C{source}, most urgent
    first, starting after C{cursor}.  The answer's C{cursor} continues the
    listing (absent at the end); it may hold fewer than C{limit} needs to stay
    under the value limit.  C{safemode} true means the server lists no needs
    yet.  C{fill_waits} true means files of the source are below their
    copies and being fetched: the store should take no surplus (of any
    source) meanwhile; absent means false.  Files the store's host holds are
    never listed; L{ListSurplus} gives the copy counts of those above
    C{copies}.
    """

    commandName = b"list-needs"
    arguments = _NEEDS_PAGE
    response = [
        (b"needs", NeedList()),
        (b"cursor", amp.String(optional=True)),
        (b"safemode", amp.Boolean()),
        (b"fill_waits", amp.Boolean(optional=True)),
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
    arguments = _NEEDS_PAGE
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

    Without C{fill} the paths are claimed as needs: each is granted only
    while it is still below the source's C{copies} (live claims count), so
    a need other stores took meanwhile is refused rather than fetched as an
    unplanned extra copy.  With C{fill} true (greedy fill: the store was
    offered them at or above their copies) they are also granted once every
    file of the source has its copies in real holdings (claims do not count:
    surplus waits for the needed transfers rather than compete with them).
    Renewing one's own claim is always granted.
    """

    commandName = b"claim"
    arguments = [
        (b"source", amp.Unicode()),
        (b"store", amp.Unicode()),
        (b"paths", PathList()),
        (b"fill", amp.Boolean(optional=True)),
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


class DropKept(_Command):
    """
    Ask to delete superseded versions C{store} keeps of C{source}'s files
    (those it reported as C{kept} in a L{Report}); C{granted} are the ones it
    may delete.  The server grants one only while another live host keeps
    the same version (DESIGN.md rule 7), and nothing in safemode.  A
    version the server does not know the store keeps is not granted.
    """

    commandName = b"drop-kept"
    arguments = [
        (b"source", amp.Unicode()),
        (b"store", amp.Unicode()),
        (b"kept", RecordList()),
    ]
    response = [(b"granted", RecordList())]
    errors = _STORE_ERRORS


class Status(_Command):
    """
    A page of the server's status: C{statuses} is a JSON list of objects,
    C{{"kind": "source", ...SourceStatus}} and C{{"kind": "store", "source":
    id, ...StoreStatus}}; C{cursor} continues it (absent at the end).  See
    L{cluster_backup.session.parse_statuses}.
    """

    commandName = b"status"
    arguments = [(b"cursor", amp.String(optional=True))]
    response = [
        (b"statuses", amp.Unicode()),
        (b"cursor", amp.String(optional=True)),
    ]


class Accept(_Command):
    """
    The operator accepts C{source}'s held scan (DESIGN.md rule 8; see
    L{cluster_backup.held}): the server applies it as it stands.
    C{applied} is false when nothing was held; otherwise C{change} is a
    JSON object of what it changed (deleted_files, deleted_bytes,
    changed_files, changed_bytes, since).
    """

    commandName = b"accept"
    arguments = [(b"source", amp.Unicode())]
    response = [
        (b"applied", amp.Boolean()),
        (b"change", amp.Unicode(optional=True)),
    ]
    errors = {UnknownSource: b"UNKNOWN_SOURCE"}


#: Every command of the conversation, by wire name.
COMMANDS = {
    c.commandName: c
    for c in (
        Hello, Authenticate, Report, ListNeeds, ListSurplus, Claim, Release, DropKept,
        Status, Accept
    )
}

#: Commands a connection may send before it is authenticated.
OPEN_COMMANDS = {Hello.commandName, Authenticate.commandName}


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


# ---------------------------------------------------------------- rsync


@frozen
class RsyncEndpoint:
    """Where and as whom a client fetches a source's files with rsync."""

    host: str
    port: int
    module: str
    user: str
    password: str = field(repr=False)

