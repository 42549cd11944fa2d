"""
Plain records shared by the scanner, ledger, planner, protocol and store.

They are frozen values with no behaviour beyond validation, so every part of
the system (and every test) can build and compare them freely.  Paths are
always ``bytes`` relative to a source root: POSIX file names need not be
UTF-8, and a store must reproduce them exactly.
"""

from __future__ import annotations

from typing import Iterable, Optional, Protocol, Sequence

from attrs import field, frozen


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
    if len(path) > 4096:
        return "longer than 4096 bytes"
    if b"\0" in path:
        return "contains NUL"
    if path.startswith(b"/"):
        return "absolute"
    for part in path.split(b"/"):
        if part in (b"", b".", b".."):
            return "has an empty, '.' or '..' component"
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
        object.__setattr__(record, "path", path)
        object.__setattr__(record, "size", size)
        object.__setattr__(record, "mtime", mtime)
        return record


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

    def scan_started(self) -> None: ...

    def scan_batch(self, records: Iterable[FileRecord]) -> None: ...

    def scan_finished(self, complete: bool, error: Optional[str] = None) -> None: ...

    def inventory_started(self, store: str) -> None: ...

    def report(
        self,
        store: str,
        held: Iterable[FileRecord] = (),
        removed: Iterable[bytes] = (),
        used: Optional[int] = None,
        quota: Optional[int] = None,
    ) -> ReportAnswer: ...

    def inventory_finished(self, store: str) -> ReportAnswer: ...

    def needs(
        self, store: str, cursor: Optional[bytes], limit: int
    ) -> tuple[list[Need], Optional[bytes]]: ...

    def surplus(
        self, store: str, cursor: Optional[bytes], limit: int
    ) -> tuple[list[Need], Optional[bytes]]:
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

    def knows(self, path: bytes) -> bool: ...

    def status(self) -> SourceStatus: ...

    def store_status(self) -> list[StoreStatus]: ...
