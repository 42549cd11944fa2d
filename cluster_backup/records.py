"""
Plain records shared by the scanner, ledger, planner, protocol and store.

They are frozen values with no behaviour beyond validation, so every part of
the system (and every test) can build and compare them freely.  Paths are
always ``bytes`` relative to a source root: POSIX file names need not be
UTF-8, and a store must reproduce them exactly.
"""

from __future__ import annotations

from array import array
from typing import Callable, Iterable, Iterator, Optional, Protocol, Sequence, Union

from attrs import field, frozen


#: Linux PATH_MAX: the longest relative path L{relpath_problem} accepts.
MAX_PATH = 4096


def _check_relpath(instance, attribute, value: bytes) -> None:
    problem = relpath_problem(value)
    if problem is not None:
        raise ValueError(f"bad path {value!r}: {problem}")


def relpath_problem(path: bytes) -> Optional[str]:
    """
    Say what is wrong with C{path} as a path relative to a source root, or
    return C{None} when it is acceptable.

    Acceptable means: non-empty bytes, no NUL, not absolute, no empty, C{.}
    or C{..} component, at most 4,096 bytes (Linux PATH_MAX).  Anything a
    peer sends is checked with this before it touches a ledger or a disk.
    """
    if not isinstance(path, bytes):
        return "not bytes"
    if not path:
        return "empty"
    if len(path) > MAX_PATH:
        return f"longer than {MAX_PATH} bytes"
    if b"\0" in path:
        return "contains NUL"
    if path.startswith(b"/"):
        return "absolute"
    for part in path.split(b"/"):
        if part in (b"", b".", b".."):
            return "has an empty, '.' or '..' component"
    return None


#: A path longer than MAX_PATH covers a whole block of this many bytes,
#: aligned to it, of the joined paths.
_BLOCK = (MAX_PATH + 1) // 2


def _may_be_too_long(paths: Sequence[bytes], joined: bytes) -> bool:
    """
    Whether one of C{paths} (C{joined}, each followed by a NUL) may be over
    L{MAX_PATH}.  Such a path covers a whole aligned block of L{_BLOCK}
    bytes, so a page whose every block holds a NUL (a C{memchr} each, a few
    dozen a page) is clear; only another page measures its paths.
    """
    if all(joined.find(b"\0", k, k + _BLOCK) >= 0
           for k in range(0, len(joined) - _BLOCK + 1, _BLOCK)):
        return False
    return max(map(len, paths)) > MAX_PATH


def bad_path(paths: Sequence[bytes], joined: Optional[bytes] = None) -> Optional[tuple[object, str]]:
    """
    The first of C{paths} that L{relpath_problem} refuses, with what it
    says, or C{None} when it accepts them all.  C{joined}, when the caller
    has it, is the paths, each followed by a NUL, holding no other NUL.

    Every refused path either is too long, holds a NUL or, with the NULs
    read as slashes, puts C{//}, C{/./} or C{/../} into C{"/" + joined}; a
    page with none of those is clear at C speed (a few substring searches),
    and only a suspect one is checked path by path.
    """
    if not paths:
        return None
    if joined is None:
        try:
            joined = b"\0".join(paths) + b"\0"
        except TypeError:  # a str, say
            return _first_refused(paths)
        if joined.count(b"\0") != len(paths):
            return _first_refused(paths)  # one holds a NUL
    slashed = b"/" + joined.replace(b"\0", b"/")
    # No "/." at all (the usual page) rules out "/./" and "/../" in one scan.
    if (b"//" in slashed or (b"/." in slashed and (b"/./" in slashed or b"/../" in slashed))
            or _may_be_too_long(paths, joined)):
        return _first_refused(paths)
    return None


def _first_refused(paths: Iterable) -> Optional[tuple[object, str]]:
    for path in paths:
        problem = relpath_problem(path)
        if problem is not None:
            return path, problem
    return None


@frozen
class FileRecord:
    """
    One file of a source (or of a store's copy of it): its relative path and
    its version.  The version is the pair (size, mtime in whole seconds); a
    copy counts only when its version equals the source's current one.
    Symlinks are records too (size = length of the target), never followed.
    """

    path: bytes = field(validator=_check_relpath)
    size: int
    mtime: int

    @property
    def version(self) -> tuple[int, int]:
        return (self.size, self.mtime)

    @classmethod
    def unchecked(cls, path: bytes, size: int, mtime: int) -> "FileRecord":
        """
        Build a record without validating C{path}: only for paths made from
        readdir names by the scanner (never empty, C{.}, C{..}, nor holding
        C{/} or NUL; it checks the length itself).  The validator is a
        quarter of a scan's time.  Anything from a peer uses C{FileRecord()}.
        """
        record = object.__new__(cls)
        _set_path(record, path)
        _set_size(record, size)
        _set_mtime(record, mtime)
        return record


# The slot descriptors' setters: what object.__setattr__ ends up calling, at
# half its cost.  (Were FileRecord no longer slotted, this fails at import.)
_set_path, _set_size, _set_mtime = (
    FileRecord.__dict__[name].__set__ for name in ("path", "size", "mtime")
)


@frozen
class Need:
    """
    A file some store should fetch: its current version, how many live copies
    it has (distinct hosts, counting live claims) and how many are wanted.
    """

    path: bytes
    size: int
    mtime: int
    copies: int
    wanted: int


def rank(copies: int, wanted: int) -> tuple[int, float]:
    """
    The priority of a file with C{copies} live copies out of C{wanted};
    smaller sorts first.

    Order (DESIGN.md rule 5): no copy at all; then one copy when more are
    wanted; then by the fraction copies/wanted while below C{wanted}; then
    surplus copies by fewest copies.  The same function orders needs inside a
    ledger and across sources in the planner.
    """
    if copies <= 0:
        return (0, 0.0)
    if copies < wanted:
        if copies == 1:
            return (1, 0.0)
        return (2, copies / wanted)
    return (3, float(copies))


class _Columns:
    """
    A list of records kept as columns: C{paths} (a list of bytes) and, per
    entry of C{_NUMBERS}, an C{array} of integers.  Iterating or indexing
    builds the row objects (C{_ROW}) on demand.

    Millions of records cross the protocol and the ledger; building an attrs
    object per record costs more than everything else those paths do, so the
    protocol decodes a page into columns and the ledger's loops read them.
    Equal to another instance with equal columns, or to any list or tuple of
    the same rows.  Paths are not checked here: the protocol checks the paths
    it decodes, and L{of} takes rows that checked themselves.
    """

    __slots__ = ("paths",)
    #: (column name, row attribute, array typecode) of each number column.
    _NUMBERS: tuple[tuple[str, str, str], ...] = ()
    _ROW: type

    def __init__(self, paths: list, *numbers: array) -> None:
        if len(numbers) != len(self._NUMBERS):
            raise TypeError(f"{type(self).__name__} needs {len(self._NUMBERS)} number columns")
        for (name, _, code), column in zip(self._NUMBERS, numbers):
            if not isinstance(column, array) or column.typecode != code or len(column) != len(paths):
                raise ValueError(f"column {name} must be an array({code!r}) of {len(paths)}")
            object.__setattr__(self, name, column)
        object.__setattr__(self, "paths", paths)

    def __setattr__(self, name, value):
        raise AttributeError(f"{type(self).__name__} is immutable")

    @classmethod
    def of(cls, rows: Iterable) -> "_Columns":
        """
        Columns of C{rows} (objects with the rows' attributes), or C{rows}
        itself if it is one already.  Raises C{ValueError} for a number out
        of its array's range (sizes and mtimes are 64-bit).
        """
        if isinstance(rows, cls):
            return rows
        rows = rows if isinstance(rows, (list, tuple)) else list(rows)
        try:
            return cls([r.path for r in rows], *cls._numbers(rows))
        except OverflowError as e:
            raise ValueError(f"number out of range: {e}") from None

    @classmethod
    def join(cls, parts: Sequence["_Columns"]) -> "_Columns":
        """One instance holding the rows of C{parts}, in order."""
        if len(parts) == 1:
            return parts[0]
        paths: list = []
        for part in parts:
            paths.extend(part.paths)
        numbers = []
        for name, _, code in cls._NUMBERS:
            column = array(code)
            for part in parts:
                column.extend(getattr(part, name))
            numbers.append(column)
        return cls(paths, *numbers)

    @staticmethod
    def _numbers(rows: Sequence) -> tuple[array, ...]:
        """The number columns of C{rows}, one array each."""
        raise NotImplementedError

    def _columns(self) -> tuple:
        return (self.paths,) + tuple(getattr(self, n) for n, _, _ in self._NUMBERS)

    def __len__(self) -> int:
        return len(self.paths)

    def __iter__(self) -> Iterator:
        return map(self._make, *self._columns())

    def __getitem__(self, index: Union[int, slice]):
        columns = self._columns()
        if isinstance(index, slice):
            return type(self)(*(c[index] for c in columns))
        return self._make(*(c[index] for c in columns))

    def __eq__(self, other) -> bool:
        if type(other) is type(self):
            return self._columns() == other._columns()
        if isinstance(other, (list, tuple)):
            return list(self) == list(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        shown = ", ".join(repr(r) for r in self[:3])
        more = ", ..." if len(self) > 3 else ""
        return f"{type(self).__name__}([{shown}{more}], {len(self)} rows)"


class Records(_Columns):
    """L{FileRecord}s as columns: C{paths}, C{sizes}, C{mtimes}."""

    __slots__ = ("sizes", "mtimes")
    _NUMBERS = (("sizes", "size", "q"), ("mtimes", "mtime", "q"))
    _make = staticmethod(FileRecord.unchecked)

    @staticmethod
    def _numbers(rows: Sequence) -> tuple[array, ...]:
        # Plain comprehensions: several times faster than attrgetter here.
        return array("q", [r.size for r in rows]), array("q", [r.mtime for r in rows])


class Needs(_Columns):
    """L{Need}s as columns: C{paths}, C{sizes}, C{mtimes}, C{copies}, C{wanted}."""

    __slots__ = ("sizes", "mtimes", "copies", "wanted")
    _NUMBERS = (("sizes", "size", "q"), ("mtimes", "mtime", "q"),
                ("copies", "copies", "I"), ("wanted", "wanted", "I"))
    _make = Need

    @staticmethod
    def _numbers(rows: Sequence) -> tuple[array, ...]:
        return (array("q", [r.size for r in rows]), array("q", [r.mtime for r in rows]),
                array("I", [r.copies for r in rows]), array("I", [r.wanted for r in rows]))


@frozen
class ReportAnswer:
    """
    What a server answers to a store's report: paths it holds at a version
    that is no longer current (C{stale}), and paths its source no longer has
    (C{orphans}, only known after a complete scan).
    """

    stale: Sequence[bytes] = ()
    orphans: Sequence[bytes] = ()


@frozen
class SourceStatus:
    """A source's replication state, for C{cbackup status}."""

    source: str
    copies: int
    files: int
    bytes: int
    histogram: dict  # live copies (int) -> [files, bytes]
    under_files: int
    under_bytes: int
    safemode: bool
    scanned: Optional[float]  # clock time the last complete scan ended
    scan_error: Optional[str] = None
    #: A held scan (L{cluster_backup.held}): deleted_files, deleted_bytes,
    #: changed_files, changed_bytes, and since (clock time first held).
    held: Optional[dict] = None
    #: Files that can never have their copies: larger than the quota of all
    #: but fewer than C{copies} backup hosts (L{Ledger.too_big}): files,
    #: bytes, copies_room (the C{copies}-th largest host quota) and
    #: examples ([path as text, size, hosts it fits on], largest first).
    too_big: Optional[dict] = None


@frozen
class StoreStatus:
    """A store as one server sees it, for C{cbackup status}."""

    store: str
    host: str
    state: str  # "new" (never reported), "live", "stale" or "dead"
    files: int
    bytes: int
    last_report_age: Optional[float]
    quota: Optional[int] = None
    used: Optional[int] = None
    claims: int = 0


class LedgerAPI(Protocol):
    """
    What the server's protocol and scanner need from one source's ledger.
    Implemented by L{cluster_backup.ledger.Ledger}; tests may use fakes with
    the same methods.  Store ids are the config's C{"host:/path"} strings.
    """

    source: str
    copies: int

    @property
    def safemode(self) -> bool: ...

    @property
    def fill_waits(self) -> bool: ...

    def scan_started(self) -> None: ...

    def scan_batch(self, records: Iterable[FileRecord]) -> None: ...

    def scan_finished(self, complete: bool, error: Optional[str] = None) -> None: ...

    def inventory_started(self, store: str) -> None: ...

    def report(
        self,
        store: str,
        held: Iterable[FileRecord] = (),  # or L{Records}, as the protocol decodes
        removed: Iterable[bytes] = (),
        used: Optional[int] = None,
        quota: Optional[int] = None,
        vet: Optional[Callable[[list[bytes]], object]] = None,
        kept: Iterable[FileRecord] = (),
        unkept: Iterable[FileRecord] = (),
    ) -> ReportAnswer:
        """
        Apply a store's report (C{kept} and C{unkept}: superseded versions
        it keeps outside its layout, see L{cluster_backup.protocol.Report}).
        C{vet}, when given, is called with each of C{held}'s paths and
        C{removed} that names a path the ledger does not know (a ledger may
        call it with any), before the report changes anything: the server
        leaves a report's paths unchecked until then.
        """
        ...

    def inventory_finished(self, store: str) -> ReportAnswer: ...

    def needs(
        self, store: str, cursor: Optional[bytes], limit: int
    ) -> tuple[Sequence[Need], Optional[bytes]]:
        """
        Up to C{limit} needs of C{store}, rarest first, and a cursor for the
        next page (C{None} at the end).  A sequence of L{Need}s: the ledger
        answers L{Needs} (columns), which the protocol encodes without a
        step per need.
        """
        ...

    def surplus(
        self, store: str, cursor: Optional[bytes], limit: int
    ) -> tuple[Sequence[Need], Optional[bytes]]:
        """
        Up to C{limit} files C{store} holds at the current version whose
        live copies exceed C{copies} (the copies it may ask to drop), most
        copies first, and an opaque cursor for the next page (C{None} at the
        end; a page may be short, even empty, with a cursor).  C{Need.copies}
        counts real holdings only (distinct hosts, live stores, no claims),
        the count L{drop} decides by; C{Need.wanted} is C{copies}.  Nothing
        (C{([], None)}) in safemode.  Raises C{UnknownStore} for a store not
        backing up this source and C{BadCursor} for a cursor it did not make.
        """
        ...

    def claim(self, store: str, paths: Iterable[bytes], fill: bool = False) -> list[bytes]: ...

    def release(self, store: str, paths: Iterable[bytes]) -> None: ...

    def drop(self, store: str, paths: Iterable[bytes]) -> list[bytes]: ...

    def drop_kept(self, store: str, kept: Iterable[FileRecord]) -> list[FileRecord]: ...

    def knows(self, path: bytes) -> bool: ...

    def status(self) -> SourceStatus: ...

    def store_status(self) -> list[StoreStatus]: ...
