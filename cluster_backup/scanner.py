"""
Walk a source (or a store) and turn what is there into L{FileRecord}s.

Two layers:

  - L{walk} is a plain synchronous iterator over batches of records.  It
    does blocking I/O and nothing else, so tests drive it directly on real
    temporary trees.
  - L{scan} runs a L{walk} in a thread of the reactor's pool and hands each
    batch to a callback I{on the reactor thread}, so the receiver (a ledger,
    which is not thread-safe) never sees another thread, and the reactor is
    never blocked by C{readdir}/C{lstat} on a tree of millions of files.

What is recorded (C{lstat} semantics, nothing below the root is followed):
regular files and symlinks become records (a symlink's size is the length
of its target, as rsync copies links as links); directories are descended;
fifos, sockets and devices are counted and skipped.  A version's mtime is
whole seconds (L{mtime_of}).

Failure policy: a root that is missing, not a directory or unreadable raises
L{ScanError}, because a missing source must never look like an empty one.
Below the root, a directory that cannot be listed or an entry that vanished
between C{readdir} and C{lstat} is counted in the L{ScanResult}, which then
says C{complete=False}: the caller may add what it saw, but must not conclude
that anything it did I{not} see is gone.
"""

from __future__ import annotations

import os
import re
import stat
import threading
from array import array
from fnmatch import translate
from operator import attrgetter
from typing import Callable, Iterator, Optional, Sequence, Union

from attrs import define, field
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool
from twisted.python.failure import Failure

from .records import MAX_PATH, Records

Path = Union[str, bytes, "os.PathLike[str]", "os.PathLike[bytes]"]

#: How many unreadable paths a L{ScanResult} lists (all are counted).
MAX_LISTED = 20

#: Directories whose C{st_size} is at most this many bytes (about 8,000
#: names on ext4) are listed at once by C{os.listdir}, the fastest way;
#: larger ones are streamed through C{os.scandir}, so that the names of a
#: huge directory never sit in memory all together.
LIST_AT_ONCE = 256 * 1024

_OPEN_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
_S_IFMT = 0o170000  # the file type bits of st_mode (what stat.S_IFMT keeps)

_name = attrgetter("name")


class ScanError(Exception):
    """
    The scan's root is missing, not a directory or cannot be listed, or the
    scan was stopped before it finished.  Nothing may be concluded from it.
    """


def mtime_of(st: os.stat_result) -> int:
    """
    The whole-second mtime of C{st}, as a version uses it.

    This is C{st_mtime_ns // 10**9}, i.e. the kernel's C{tv_sec} (what rsync
    and C{find -printf %T@} see), rather than C{int(st.st_mtime)}: the float
    rounds a time within ~0.2 us of the next second up to it, and truncates
    negative times toward zero.  Sources and stores must both use this.
    """
    return st.st_mtime_ns // 1_000_000_000


@define
class ScanResult:
    """
    What a walk saw, filled in as it goes (so it doubles as progress).

    C{files}/C{bytes} count the records produced; C{specials} the fifos,
    sockets and devices skipped; C{excluded} the entries matched by an
    exclude pattern (an excluded directory counts once); C{skipped} the
    directories not descended because they are in C{skip} or are their own
    ancestor (a bind mount loop); C{missed} the directories that could not be
    listed and entries that vanished or could not be stat'ed, with the first
    L{MAX_LISTED} of them in C{missed_paths} as C{(relative path, reason)}
    (C{b""} is the root itself).
    """

    root: bytes
    files: int = 0
    bytes: int = 0
    specials: int = 0
    excluded: int = 0
    skipped: int = 0
    missed: int = 0
    missed_paths: list = field(factory=list)

    @property
    def complete(self) -> bool:
        """Whether every entry under the root was seen (nothing missed)."""
        return self.missed == 0

    @property
    def error(self) -> Optional[str]:
        """C{None} for a complete scan, else a one-line description."""
        if self.missed == 0:
            return None
        shown = "; ".join(f"{p!r}: {why}" for p, why in self.missed_paths[:3])
        more = ", ..." if self.missed > 3 else ""
        return (
            f"scan of {self.root!r} incomplete: {self.missed} path(s) "
            f"could not be read ({shown}{more})"
        )

    def _miss(self, path: bytes, exc: OSError) -> None:
        self.missed += 1
        if len(self.missed_paths) < MAX_LISTED:
            why = exc.strerror or exc.__class__.__name__
            if isinstance(exc, FileNotFoundError):
                why = "vanished during the scan"
            self.missed_paths.append((path, why))


def _union(patterns: list[str]):
    if not patterns:
        return None
    return re.compile("|".join(translate(p) for p in patterns)).match


class _Excluder:
    """
    Exclude patterns compiled into (at most) four regular expressions.  The
    walk asks C{excluder(rel, name)} before an entry's lstat (an excluded
    entry costs no syscall) and C{excluder.directory(rel, name)} once the
    lstat says it is a directory.
    """

    def __init__(self, patterns: Sequence[Union[str, bytes]]):
        # (base name or path) x (any entry or directories only)
        lists: dict[tuple[bool, bool], list[str]] = {
            (a, d): [] for a in (False, True) for d in (False, True)
        }
        for p in patterns:
            p = os.fsdecode(p)
            dir_only = p.endswith("/")
            anchored = "/" in p.rstrip("/")
            p = p.strip("/")
            if not p:
                raise ValueError(f"empty exclude pattern in {patterns!r}")
            lists[(anchored, dir_only)].append(p)
        self.base = _union(lists[(False, False)])
        self.path = _union(lists[(True, False)])
        self.base_dir = _union(lists[(False, True)])
        self.path_dir = _union(lists[(True, True)])

    def __call__(self, rel: bytes, name: bytes) -> bool:
        """Whether a pattern for any kind of entry excludes C{rel}."""
        return bool(
            (self.base and self.base(os.fsdecode(name)))
            or (self.path and self.path(os.fsdecode(rel)))
        )

    def directory(self, rel: bytes, name: bytes) -> bool:
        """Whether a directories-only pattern excludes C{rel}, if a directory."""
        return bool(
            (self.base_dir and self.base_dir(os.fsdecode(name)))
            or (self.path_dir and self.path_dir(os.fsdecode(rel)))
        )


class _Skipper:
    """Directories never descended, known by real path and by inode."""

    def __init__(self, dirs: Sequence[Path]):
        self.real = set()
        self.ids = set()
        for d in dirs:
            d = os.fsencode(d)
            if not os.path.isabs(d):
                raise ValueError(f"skip directory {d!r} is not absolute")
            self.real.add(os.path.realpath(d))
            try:
                st = os.stat(d)
            except OSError:
                continue  # absent now: the real path still applies
            self.ids.add((st.st_dev, st.st_ino))

    def __call__(self, real: bytes, ident: tuple[int, int]) -> bool:
        return ident in self.ids or real in self.real


def _within(ident: tuple[int, int], chain: Optional[tuple]) -> bool:
    """Whether C{ident} is one of the directories in an ancestor chain."""
    while chain is not None:
        if chain[0] == ident:
            return True
        chain = chain[1]
    return False


class Walk:
    """
    An iterator over batches (L{Records}) of at most C{batch} records under a root,
    in no particular order, with the running L{ScanResult} in C{result}.
    Build it with L{walk}.
    """

    def __init__(self, root: Path, exclude, skip, batch: int):
        if batch < 1:
            raise ValueError(f"batch must be at least 1, not {batch!r}")
        self.root = os.fsencode(root)
        self.result = ScanResult(root=self.root)
        self._excluder = _Excluder(exclude) if exclude else None
        self._skipper = _Skipper(skip) if skip else None
        self._batch = batch
        try:
            st = os.stat(self.root)
        except FileNotFoundError:
            raise ScanError(f"{self.root!r} does not exist") from None
        except OSError as e:
            raise ScanError(f"cannot stat {self.root!r}: {e.strerror}") from None
        if not stat.S_ISDIR(st.st_mode):
            raise ScanError(f"{self.root!r} is not a directory")
        self._root_id = (st.st_dev, st.st_ino)
        self._root_size = st.st_size
        real = os.path.realpath(self.root)
        if self._skipper and self._skipper(real, self._root_id):
            raise ScanError(f"{self.root!r} is itself a skipped directory")
        self._real_prefix = real.rstrip(b"/") + b"/"
        self._batches = self._run()

    def __iter__(self) -> Iterator[Records]:
        return self

    def __next__(self) -> Records:
        return next(self._batches)

    def close(self) -> None:
        """Stop early and release the open directory, if any."""
        self._batches.close()

    def _run(self) -> Iterator[Records]:
        # The cost of a scan is this loop's cost per entry: the lstat and
        # what Python does around it.  Hence: names from os.listdir (no
        # DirEntry), lstat through the directory's fd (the kernel resolves
        # one name, as find does), the stat tuple's items instead of
        # attributes, records gathered as columns.
        result = self.result
        excluder, skipper, batch = self._excluder, self._skipper, self._batch
        real_prefix = self._real_prefix
        lstat, listdir, open_dir, close = os.lstat, os.listdir, os.open, os.close
        IFMT, IFREG, IFLNK, IFDIR = _S_IFMT, stat.S_IFREG, stat.S_IFLNK, stat.S_IFDIR
        max_path = MAX_PATH
        # (path to list, relative prefix, its st_size, its (dev, ino) and its parent's...)
        pending = [(self.root, b"", self._root_size, (self._root_id, None))]
        # The batch as columns (see Records): three appends per file cost
        # less than building a FileRecord object each.
        paths: list[bytes] = []
        sizes: list[int] = []
        mtimes: list[int] = []
        files = size = 0
        try:
            while pending:
                path, prefix, dir_size, chain = pending.pop()
                try:
                    fd = open_dir(path, _OPEN_DIR)
                except OSError as e:
                    if not prefix:
                        raise ScanError(f"cannot list {path!r}: {e.strerror}") from None
                    result._miss(prefix[:-1], e)
                    continue
                streamed = None
                try:
                    # Names by path, lstat by fd: the same directory unless
                    # it is replaced in between, as in any walk by path.
                    if dir_size > LIST_AT_ONCE:
                        streamed = os.scandir(path)
                        names = map(_name, streamed)
                    else:
                        names = listdir(path)
                    for name in names:
                        rel = prefix + name
                        if excluder is not None and excluder(rel, name):
                            result.excluded += 1
                            continue
                        try:
                            st = lstat(name, dir_fd=fd)
                        except OSError as e:
                            if (isinstance(e, FileNotFoundError) and excluder is not None
                                    and excluder.directory(rel, name)):
                                result.excluded += 1  # gone, and excluded by its name
                            else:
                                result._miss(rel, e)
                            continue
                        # A stat_result is also the tuple (mode, ino, dev,
                        # nlink, uid, gid, size, atime, mtime, ctime) of
                        # integers: item 8 is tv_sec, i.e. mtime_of(st).
                        kind = st[0] & IFMT
                        if kind == IFREG or kind == IFLNK:
                            if len(rel) > max_path:
                                result._miss(rel, OSError(0, "longer than 4096 bytes"))
                                continue
                            paths.append(rel)
                            sizes.append(st[6])
                            mtimes.append(st[8])
                            if len(paths) >= batch:
                                files += len(paths)
                                size += sum(sizes)
                                result.files, result.bytes = files, size
                                yield Records(paths, array("q", sizes), array("q", mtimes))
                                paths, sizes, mtimes = [], [], []
                        elif kind == IFDIR:
                            if excluder is not None and excluder.directory(rel, name):
                                result.excluded += 1
                                continue
                            ident = (st[2], st[1])
                            if _within(ident, chain) or (
                                skipper and skipper(real_prefix + rel, ident)
                            ):
                                result.skipped += 1
                                continue
                            pending.append(
                                (path + b"/" + name, rel + b"/", st[6], (ident, chain))
                            )
                        else:
                            result.specials += 1
                except OSError as e:  # listing failed, at once or part way
                    result._miss(prefix[:-1], e)
                finally:
                    close(fd)
                    if streamed is not None:
                        streamed.close()
            files += len(paths)
            size += sum(sizes)
            result.files, result.bytes = files, size
            if paths:
                yield Records(paths, array("q", sizes), array("q", mtimes))
        finally:
            result.files, result.bytes = files, size


def walk(
    root: Path,
    *,
    exclude: Sequence[Union[str, bytes]] = (),
    skip: Sequence[Path] = (),
    batch: int = 2000,
) -> Walk:
    """
    Walk the tree under C{root} synchronously, yielding batches of at most
    C{batch} records as L{Records} (a sequence of L{FileRecord}s kept as
    columns; paths relative to C{root}, bytes, C{/}-separated);
    the returned L{Walk}'s C{result} holds the L{ScanResult}.

    C{root} itself is followed if it is a symlink; nothing below it is.
    Raises L{ScanError} at once if C{root} is missing or not a directory, and
    from the first C{next()} if it cannot be listed.  Raises C{ValueError}
    for a bad pattern, a relative C{skip} directory or C{batch < 1}.

    C{exclude} patterns use C{fnmatch} syntax (C{*}, C{?}, C{[...]}; case
    sensitive) against names decoded with C{os.fsdecode}, so a non-UTF-8
    name is matched by a pattern holding the same surrogate escapes (or by
    the same bytes: bytes patterns are decoded the same way):
      - a pattern without C{/} matches the base name at any depth
        (C{*.tmp}, C{.cache});
      - a pattern with a C{/} matches the whole relative path from the root
        (C{var/log/*.gz}); a leading C{/} only marks such an anchored
        pattern (C{/build} is C{build} at the top only).  As in C{fnmatch},
        C{*} also matches C{/} here (C{a/*.log} matches C{a/b/c.log});
      - a trailing C{/} matches directories only (C{cache/}).
    An excluded directory is not descended.

    C{skip} names absolute directories never descended (a store that lies
    inside the source), recognised by real path and by C{(st_dev, st_ino)},
    so a symlinked alias or a bind mount of it is skipped too.  A directory
    that is its own ancestor (a bind mount loop) is not descended again.
    """
    return Walk(root, exclude, skip, batch)


class _Stopped(Exception):
    pass


def scan(
    root: Path,
    on_batch: Callable[[Records], object],
    *,
    exclude: Sequence[Union[str, bytes]] = (),
    skip: Sequence[Path] = (),
    batch: int = 2000,
    depth: int = 4,
    reactor=None,
) -> Deferred:
    """
    Run L{walk} in a thread of C{reactor}'s thread pool and call
    C{on_batch(records)} on the reactor thread for each batch, in order;
    fire with the L{ScanResult} after the last batch was delivered.

    At most C{depth} batches are handed over and not yet consumed; the walk
    thread waits for the reactor beyond that, so its memory stays bounded
    however large the tree (about C{(depth + 2) * batch} records, and the
    names of one directory of at most L{LIST_AT_ONCE} bytes).  Each
    delivery is one C{on_batch} call, so C{batch} bounds how long the reactor
    is held.

    Fails with L{ScanError} for a bad root (see L{walk}) or when the reactor
    shuts down first; with whatever C{on_batch} raised, after which no more
    batches are delivered.  Cancelling the L{Deferred} stops the walk thread
    at its next batch and delivers nothing more.
    """
    if reactor is None:
        from twisted.internet import reactor
    if depth < 1:
        raise ValueError(f"depth must be at least 1, not {depth!r}")
    stop = threading.Event()
    slots = threading.Semaphore(depth)
    failed: list[Failure] = []

    def deliver(records: Records) -> None:
        try:
            if not stop.is_set():
                on_batch(records)
        except Exception:
            failed.append(Failure())
            stop.set()
        finally:
            slots.release()

    def work() -> ScanResult:
        batches = walk(root, exclude=exclude, skip=skip, batch=batch)
        try:
            for records in batches:
                # Poll so that a stop (cancel, shutdown) never leaves this
                # thread blocked and the thread pool unable to join it.
                while not slots.acquire(timeout=0.1):
                    if stop.is_set():
                        raise _Stopped()
                if stop.is_set():
                    raise _Stopped()
                reactor.callFromThread(deliver, records)
        finally:
            batches.close()
        return batches.result

    def shutdown() -> None:
        stop.set()
        trigger.clear()

    result = Deferred(lambda d: stop.set())
    trigger = [reactor.addSystemEventTrigger("before", "shutdown", shutdown)]

    def done(outcome):
        if trigger:
            reactor.removeSystemEventTrigger(trigger.pop())
        if result.called:  # cancelled
            return
        if failed:
            result.errback(failed[0])
        elif isinstance(outcome, Failure):
            if outcome.check(_Stopped):
                outcome = Failure(ScanError(f"scan of {os.fsencode(root)!r} stopped"))
            result.errback(outcome)
        else:
            result.callback(outcome)

    deferToThreadPool(reactor, reactor.getThreadPool(), work).addBoth(done)
    return result
