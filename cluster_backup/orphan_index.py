"""
A store's orphan marks on disk: (source id, relpath) -> when the file was
first seen orphaned (DESIGN.md rule 7), in an SQLite database in the store's
state dir (C{<store>/.cbackup/index.sqlite}, WAL mode, its C{-wal} and
C{-shm} files beside it).

Why a database: the marks used to be one text file rewritten (and fsynced)
whole at every change, so removing or marking N orphans one at a time cost
O(N^2) and held the reactor for minutes.  Here a batch of marks or unmarks
is one transaction whose cost follows the batch, not the number of marks.

L{OrphanIndex.marks} is the in-memory copy every read uses; the database is
the truth on disk.  Changes wait in memory (L{OrphanIndex.dirty}) until
L{OrphanIndex.flush} writes them; the store first compares
L{OrphanIndex.growth} with its free space, so persisting never passes the
quota (rule 1).  A damaged database is moved aside (C{index.sqlite.corrupt})
with a warning and the index starts empty: orphan clocks restart, which
keeps orphans longer, the safe side.  The old C{orphans} text file is read
on open and deleted after the first write that has its marks in the
database.
"""

from __future__ import annotations

import os
import sqlite3
from typing import Iterable, Optional

from twisted.logger import Logger

log = Logger()

Key = tuple[str, bytes]

#: Estimated database bytes per mark beyond its source id and path.
ROW = 64
#: Pages a write may touch beyond the rows' leaves: page 1, root, interiors.
SPARE_PAGES = 8
#: Checkpoint (and truncate) the WAL once it is larger than this.
WAL_LIMIT = 1 << 20
SHM_REGION = 32768  # one -shm region indexes 4096 WAL frames
SCHEMA = """CREATE TABLE IF NOT EXISTS marks (
    sid TEXT NOT NULL, path BLOB NOT NULL, since REAL NOT NULL,
    PRIMARY KEY (sid, path)) WITHOUT ROWID"""
CORRUPT = (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB)


def _size(path: bytes) -> int:
    try:
        return os.lstat(path).st_size
    except FileNotFoundError:
        return 0


def _broken(e: BaseException) -> bool:
    """An error of the database file itself (not a bug in how it is used)."""
    return isinstance(e, sqlite3.DatabaseError) and not isinstance(e, sqlite3.ProgrammingError)


class OrphanIndex:
    """The marks of the database at C{path}, and of the old text file C{legacy}."""

    def __init__(self, path: bytes, legacy: bytes):
        self.path = path
        self.legacy = legacy
        self.marks: dict[Key, float] = {}
        self._add: dict[Key, float] = {}  # in marks, not yet in the database
        self._add_bytes = 0  # estimated database bytes of _add's rows
        self._drop: set[Key] = set()  # in the database, no longer in marks
        self._legacy_left = False
        self._failing = False
        self._db: Optional[sqlite3.Connection] = None
        self._page = 4096
        if os.path.lexists(path):  # a new database is made by the first flush
            try:
                self._db = self._connect()
                for row in self._db.execute("PRAGMA quick_check"):
                    if row[0] != "ok":
                        raise sqlite3.DatabaseError(f"quick_check: {row[0]}")
                for sid, rel, since in self._db.execute("SELECT sid, path, since FROM marks"):
                    self.marks[(sid, bytes(rel))] = float(since)
            except sqlite3.DatabaseError as e:
                if not _broken(e):
                    raise
                self._move_aside(e)
                self.marks.clear()
        self._load_legacy()

    @property
    def dirty(self) -> bool:
        """Whether memory holds changes the database does not."""
        return bool(self._add or self._drop or self._legacy_left)

    def mark(self, sid: str, paths: Iterable[bytes], now: float) -> None:
        for p in paths:
            key = (sid, p)
            if key not in self.marks:
                self.marks[key] = self._add[key] = now
                self._add_bytes += self._row_bytes(key)

    def unmark(self, sid: str, paths: Iterable[bytes]) -> None:
        for p in paths:
            key = (sid, p)
            if self.marks.pop(key, None) is None:
                continue
            if key in self._add:
                del self._add[key]
                self._add_bytes -= self._row_bytes(key)
            else:
                self._drop.add(key)

    def growth(self) -> int:
        """
        An upper bound on what L{flush} (with its checkpoint) can add to the
        state dir: the new rows' pages in the database (leaves half full,
        long rows on overflow pages), pages that now exist only in the WAL
        and a checkpoint will write, a WAL frame for every page the
        transaction can touch (a leaf and its siblings per changed row), and
        new C{-shm} regions.
        """
        page = self._page
        new = -(-self._add_bytes // page) + SPARE_PAGES
        pages = unflushed = 0
        if self._db is not None:
            try:
                pages = self._db.execute("PRAGMA page_count").fetchone()[0]
            except sqlite3.DatabaseError as e:  # flush will say what is wrong
                if not _broken(e):
                    raise
            unflushed = max(0, pages * page - _size(self.path))
        touched = min(4 * (len(self._add) + len(self._drop)), pages) + new
        wal = 32 + touched * (page + 24)
        frames = max(0, _size(self.path + b"-wal") - 32) // (page + 24) + touched
        shm = max(0, SHM_REGION * (1 + frames // 4096) - _size(self.path + b"-shm"))
        return unflushed + new * page + wal + shm

    def flush(self) -> bool:
        """
        Write the waiting changes in one transaction; checkpoint a large WAL.
        False (marks kept in memory, a warning) when the database fails.
        """
        if not self.dirty:
            return True
        try:
            if self._db is None:
                for stale in (self.path + b"-wal", self.path + b"-shm"):
                    if os.path.lexists(stale):
                        os.unlink(stale)
                self._db = self._connect()
            db = self._db
            db.execute("BEGIN IMMEDIATE")
            try:
                db.executemany("DELETE FROM marks WHERE sid = ? AND path = ?", self._drop)
                db.executemany("INSERT OR IGNORE INTO marks VALUES (?, ?, ?)",
                               ((sid, p, t) for (sid, p), t in self._add.items()))
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
            self._add.clear()
            self._add_bytes = 0
            self._drop.clear()
            if self._legacy_left or _size(self.path + b"-wal") > WAL_LIMIT:
                db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
            if self._legacy_left:
                try:
                    os.unlink(self.legacy)
                except FileNotFoundError:
                    pass
                self._legacy_left = False
        except (sqlite3.DatabaseError, OSError) as e:
            if isinstance(e, sqlite3.DatabaseError) and not _broken(e):
                raise
            if not self._failing:
                log.warn("{file}: cannot write orphan marks ({error}); kept in memory",
                         file=os.fsdecode(self.path), error=e)
            self._failing = True
            if getattr(e, "sqlite_errorcode", 0) & 0xFF in CORRUPT:
                self._move_aside(e)
                self._add = dict(self.marks)
                self._add_bytes = sum(map(self._row_bytes, self._add))
                self._drop.clear()
            return False
        self._failing = False
        return True

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    # --- internals -----------------------------------------------------

    def _row_bytes(self, key: Key) -> int:
        """Database bytes one mark can take (twice its size: leaves split half full)."""
        size = len(key[0].encode("utf-8")) + len(key[1]) + ROW
        return 2 * size if size <= self._page // 4 else 2 * size + self._page

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode=WAL").fetchall()
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute("PRAGMA temp_store=MEMORY")
            db.execute("PRAGMA cache_size=-16384")  # KiB: big batches do not spill
            db.execute(f"PRAGMA journal_size_limit={WAL_LIMIT}")
            db.execute(SCHEMA)
            self._page = db.execute("PRAGMA page_size").fetchone()[0]
        except BaseException:
            db.close()
            raise
        return db

    def _move_aside(self, error: BaseException) -> None:
        self.close()
        aside = self.path + b".corrupt"
        log.warn("{file}: orphan index unreadable ({error}); moved to {aside}; "
                 "marks not in memory are lost (their orphan clocks restart)",
                 file=os.fsdecode(self.path), error=error, aside=os.fsdecode(aside))
        for suffix in (b"", b"-wal", b"-shm"):
            try:
                if suffix == b"-shm":
                    os.unlink(self.path + suffix)
                else:
                    os.replace(self.path + suffix, aside + suffix)
            except FileNotFoundError:
                pass
            except OSError as e:  # the next write tries again
                log.warn("{file}: cannot move it aside: {error}",
                         file=os.fsdecode(self.path + suffix), error=e)

    def _load_legacy(self) -> None:
        """The old C{orphans} file: C{<since> <hex sid> <hex path>} lines."""
        try:
            with open(self.legacy, "rb") as f:
                lines = f.read().splitlines()
        except FileNotFoundError:
            return
        self._legacy_left = True
        for n, line in enumerate(lines, 1):
            try:
                since, sid, path = line.split(b" ")
                key = (bytes.fromhex(sid.decode()).decode("utf-8"), bytes.fromhex(path.decode()))
                since = float(since)
            except ValueError:
                log.warn("{file}:{line}: unreadable orphan entry ignored",
                         file=os.fsdecode(self.legacy), line=n)
                continue
            if key not in self.marks:  # the database's time wins
                self.mark(key[0], [key[1]], since)
