"""
A store on disk: one backup directory, its layout, inventory, usage, quota
and orphans (DESIGN.md rules 1, 6 and 7).

Layout (rule 6): file C{RELPATH} of source C{shost:/spath} lives at
C{<store>/<shost>/<spath without its leading />/<RELPATH>}, so a plain
C{cp -a} of those folders is a restore.  The store's own state lives in
C{<store>/.cbackup/}: C{partial/} (rsync's C{--partial-dir}), C{tmp/}
(rsync's C{--temp-dir}: a file being received never shows in the layout, so
a killed rsync leaves nothing there that could pass for a copy),
C{index.sqlite} (when each orphan was first seen, so a restart does not reset
the clock; see L{cluster_backup.orphan_index}) and short-lived temp files.
Host names cannot start with a dot (config's C{_HOST}), so no source can
ever map onto C{.cbackup}.

Usage (rule 1) is what C{du -sb <store>} prints: the apparent sizes of every
file, symlink and directory, the store directory and the state directory
included.  L{Store.usage} computes exactly that by walking; L{Store.used} is a
running figure kept equal to it by the store's own operations
(L{Store.refresh} after rsync touched a path, L{Store.remove},
L{Store.measure_state}), so the agent need not walk millions of files after
every batch.  It may only err high (a hard link inside the data is counted
once per name; C{du} counts it once).

L{Store.cost} bounds what fetching one file can add at its peak; see
L{DirCosts} for how directory growth is bounded.

All I/O here is blocking and local; the store never writes outside its
directory: every relative path is checked with L{relpath_problem}, and any
existing directory on the way from the store root to a file that is a symlink
(or not a directory) makes the operation fail with L{StoreError}.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
from typing import Callable, Iterable, Mapping, Optional, Union

from attrs import frozen
from twisted.logger import Logger

from .orphan_index import OrphanIndex
from .records import FileRecord, relpath_problem

log = Logger()

STATE = b".cbackup"
#: Superseded versions kept for keep deleted (rule 7), outside the layout:
#: C{<store>/.cbackup-kept/<mtime>.<size>/<source host>/<source path>/<relpath>}.
KEPT = b".cbackup-kept"
#: A kept version folder's name: C{<mtime>.<size>} of the version.
VERSION_NAME = re.compile(rb"^(-?[0-9]{1,20})\.([0-9]{1,20})$")
#: Where a kept version is updated in place (rsync --inplace) before it
#: goes back into the layout; emptied at start like partial/.
UPDATE = b"update"
PARTIAL = b"partial"
TMP = b"tmp"
#: rsync's C{--files-from} lists (L{transfer.RsyncTransfer}) in the state dir.
LIST_PREFIX = b"files-from-"
#: The orphan marks (L{OrphanIndex}), and the text file they were in before.
INDEX = b"index.sqlite"
ORPHANS = b"orphans"
PROBE = b"probe"

#: Entries created by the directory-growth probe (names of 255 bytes).
PROBE_ENTRIES = 64
#: The probe runs only with at least this much room under the quota (its
#: directory peaks at 64 * 263 bytes of entries: 6 blocks of 4 KiB on ext4).
PROBE_ROOM = 128 << 10
#: Smallest per-entry growth bound used, even on a filesystem whose
#: directories showed no growth in the probe.
MIN_ENTRY = 64

Pathish = Union[str, bytes]


class StoreError(Exception):
    """A path that would leave the store, cross a symlink, or is malformed."""


@frozen
class DirCosts:
    """
    What directories cost on the store's filesystem, in apparent bytes.

    C{new_dir}: C{lstat} size of a fresh empty directory (4096 on ext4, 40 on
    tmpfs).  C{entry}: an upper bound on how much one directory can grow when
    one entry is added.  It is twice the largest growth the probe saw while
    adding L{PROBE_ENTRIES} entries with 255-byte names (the longest a name
    can be) to a fresh directory: on tmpfs every entry adds 20 (bound 40); on
    ext4 the first overflow turns the directory into an htree of three
    blocks (+8192 in one step, later +4096 per leaf split), bound 16384,
    which also covers the worst single insert (leaf split + index split + a
    new tree level = 3 blocks).  C{measured} is False when the conservative
    fallback was used (no room to probe).
    """

    new_dir: int
    entry: int
    measured: bool = True


def measure_dir_costs(parent: bytes) -> DirCosts:
    """Probe C{parent}'s filesystem (see L{DirCosts}); cleans up after itself."""
    probe = os.path.join(parent, PROBE)
    if os.path.lexists(probe):
        shutil.rmtree(probe)
    os.mkdir(probe)
    try:
        new_dir = previous = os.lstat(probe).st_size
        step = 0
        for i in range(PROBE_ENTRIES):
            name = b"%03d" % i + b"x" * 252
            os.close(os.open(os.path.join(probe, name), os.O_CREAT | os.O_WRONLY, 0o600))
            size = os.lstat(probe).st_size
            step = max(step, size - previous)
            previous = size
    finally:
        shutil.rmtree(probe)
    return DirCosts(new_dir=new_dir, entry=max(MIN_ENTRY, 2 * step))


def fallback_dir_costs(block: int) -> DirCosts:
    """Costs assumed when the probe cannot run: generous multiples of a block."""
    block = max(block, 4096)
    return DirCosts(new_dir=2 * block, entry=4 * block, measured=False)


def mtime_of(st: os.stat_result) -> int:
    """Whole-second mtime, the kernel's tv_sec (as the scanner uses)."""
    return st.st_mtime_ns // 1_000_000_000


def tree_usage(path: bytes) -> int:
    """
    C{du -sb path}: apparent sizes of C{path} and everything below it,
    never following symlinks, each hard-linked inode counted once.
    """
    seen: set[tuple[int, int]] = set()
    total = 0
    stack = [path]
    first = True
    while stack:
        p = stack.pop()
        try:
            st = os.lstat(p)
        except FileNotFoundError:
            if first:
                raise
            continue
        first = False
        if st.st_nlink > 1 and not stat.S_ISDIR(st.st_mode):
            key = (st.st_dev, st.st_ino)
            if key in seen:
                continue
            seen.add(key)
        total += st.st_size
        if stat.S_ISDIR(st.st_mode):
            try:
                with os.scandir(p) as it:
                    stack.extend(e.path for e in it)
            except FileNotFoundError:
                pass
    return total


def _source_parts(host: str, path: str) -> list[bytes]:
    h = os.fsencode(host)
    if not h or b"/" in h or h.startswith(b".") or b"\0" in h:
        raise StoreError(f"bad source host {host!r}")
    p = os.fsencode(path)
    if not p.startswith(b"/"):
        raise StoreError(f"source path {path!r} is not absolute")
    parts = [x for x in p.split(b"/") if x]
    if any(x in (b".", b"..") or b"\0" in x for x in parts):
        raise StoreError(f"bad source path {path!r}")
    return [h] + parts


def _source_id(source) -> str:
    return f"{source.host}:{source.path}"


class Store:
    """
    One backup directory.  Build it, call L{inventory} once (it walks the
    store and sets L{used} and L{quota}), then keep L{used} current with
    L{refresh} for every path rsync was asked to fetch, L{remove} for drops,
    and L{measure_state} after each rsync run (partial files).

    C{size} or C{reserve} as in the config (exactly one).  C{statvfs} is
    C{os.statvfs} or a fake with the same result fields (C{f_bavail},
    C{f_frsize}, C{f_bsize}).  C{dir_costs} skips the probe.
    """

    def __init__(
        self,
        path: Pathish,
        size: Optional[int] = None,
        reserve: Optional[int] = None,
        *,
        statvfs: Callable = os.statvfs,
        dir_costs: Optional[DirCosts] = None,
    ):
        if (size is None) == (reserve is None):
            raise ValueError("give exactly one of size or reserve")
        self.root = os.path.abspath(os.fsencode(path)).rstrip(b"/") or b"/"
        self.size = size
        self.reserve = reserve
        self._statvfs = statvfs
        self.dir_costs = dir_costs
        self.state_dir = os.path.join(self.root, STATE)
        self.partial_dir = os.path.join(self.state_dir, PARTIAL)
        self.temp_dir = os.path.join(self.state_dir, TMP)
        self.update_dir = os.path.join(self.state_dir, UPDATE)
        self._orphans_file = os.path.join(self.state_dir, ORPHANS)
        if not os.path.isdir(self.root):
            os.mkdir(self.root)  # its parent must exist: no mkdir -p of a typo
        for d in (self.state_dir, self.partial_dir, self.temp_dir, self.update_dir):
            st = _lstat(d)
            if st is None:
                os.mkdir(d, 0o700)
            elif not stat.S_ISDIR(st.st_mode):
                raise StoreError(f"{d!r} exists and is not a directory")
        #: source id -> relpath -> record, as on disk (after L{inventory}).
        self.files: dict[str, dict[bytes, FileRecord]] = {}
        #: source id -> superseded version kept -> its version folder name
        #: (see L{KEPT}), as on disk (after L{inventory}).
        self.kept: dict[str, dict[FileRecord, bytes]] = {}
        #: (files, bytes) under the store that belong to no configured source.
        self.unknown_files = 0
        self.unknown_bytes = 0
        self.unknown_sample: list[bytes] = []
        self.quota: Optional[int] = size
        #: Bytes of the filesystem kept free when it, not the configured
        #: quota, is the limit (L{refresh_quota}); grows at each L{out_of_space}.
        self.fs_margin: Optional[int] = None
        #: True while the filesystem's free space is what limits the quota.
        self.fs_limited = False
        self.orphans_persisted = True
        self._sources: list = []
        self._dirs: dict[bytes, int] = {}  # store-relative dir -> size, state dir excluded
        self._file_bytes = 0
        self._state_bytes = 0
        self._used: Optional[int] = None
        self._index = OrphanIndex(os.path.join(self.state_dir, INDEX), self._orphans_file)
        self._parts: dict[tuple[str, str], list[bytes]] = {}  # see _target

    @classmethod
    def from_config(cls, store, **kw) -> "Store":
        """A L{Store} for a config C{backup:} block."""
        return cls(store.path, size=store.size, reserve=store.reserve, **kw)

    # --- layout ---------------------------------------------------------

    def source_dir(self, source_host: str, source_path: str) -> bytes:
        """The directory holding source C{source_host:source_path}'s files."""
        return os.path.join(self.root, *_source_parts(source_host, source_path))

    def path_of(self, source_host: str, source_path: str, relpath: bytes) -> bytes:
        """Where C{relpath} of the source lives (checked, see L{StoreError})."""
        return self._target(source_host, source_path, relpath)[0]

    def locate(self, path: Pathish) -> Optional[tuple[str, bytes]]:
        """
        The inverse of the layout: (source id, relpath) for an absolute path
        in the store, with the deepest configured source (after
        L{inventory}) that contains it; None if none does.
        """
        path = os.fsencode(path)
        if not path.startswith(self.root + b"/"):
            return None
        rel = path[len(self.root) + 1:]
        best = None
        for source in self._sources:
            prefix = b"/".join(_source_parts(source.host, source.path))
            if rel.startswith(prefix + b"/") and (best is None or len(prefix) > len(best[1])):
                best = (_source_id(source), prefix)
        if best is None:
            return None
        return best[0], rel[len(best[1]) + 1:]

    def _target(self, host: str, spath: str, relpath: bytes,
                parents: Optional[dict] = None) -> tuple[bytes, int]:
        """
        The absolute path of C{relpath} and how many of its parent
        directories do not exist yet.  Refuses bad paths and symlinked or
        non-directory parents.

        C{parents}, when given, remembers what was found for each parent
        directory, so the many files of one folder cost one walk: pass the
        same dict only for calls between which nothing on disk changes.
        """
        problem = relpath_problem(relpath)
        if problem is not None:
            raise StoreError(f"refusing path {relpath!r}: {problem}")
        top = self._parts.get((host, spath))
        if top is None:
            top = self._parts[(host, spath)] = _source_parts(host, spath)
        parts = relpath.split(b"/")
        key = (host, spath, *parts[:-1])
        found = parents.get(key) if parents is not None else None
        if found is None:
            found = self._walk_parents(top + parts[:-1], relpath)
            if parents is not None:
                parents[key] = found
        current, missing = found
        return os.path.join(current, parts[-1]), missing

    def _walk_parents(self, parts: list[bytes], relpath: bytes) -> tuple[bytes, int]:
        current = self.root
        missing = 0
        for part in parts:
            current = os.path.join(current, part)
            if missing:
                missing += 1
                continue
            st = _lstat(current)
            if st is None:
                missing = 1
            elif stat.S_ISLNK(st.st_mode):
                raise StoreError(f"refusing {relpath!r}: {current!r} is a symlink")
            elif not stat.S_ISDIR(st.st_mode):
                raise StoreError(f"refusing {relpath!r}: {current!r} is not a directory")
        return current, missing

    # --- inventory and usage --------------------------------------------

    def inventory(self, sources: Iterable, stop=None) -> dict[str, dict[bytes, FileRecord]]:
        """
        Walk the store (disk is the truth) and return, per source id, the
        files it holds (regular files and symlinks, lstat, never followed).
        A file inside nested sources belongs to the deepest one.  Files that
        belong to no source are counted in C{unknown_*}, never touched.
        Also sets L{used} (= L{usage}) and L{quota}, and probes L{DirCosts}
        the first time.

        C{stop} (a C{threading.Event}, or anything with C{is_set()}) is
        looked at once per directory: once set, the walk ends with
        L{StoreError} and the store's figures stay as they were, so the
        walk can run in a thread and be cancelled.
        """
        sources = list(sources)
        # Folder (store-relative) -> (source id, None for the layout or the
        # kept version folder's name).
        owners: dict[bytes, tuple[str, Optional[bytes]]] = {
            b"/".join(_source_parts(s.host, s.path)): (_source_id(s), None) for s in sources
        }
        for version in self._kept_versions():
            for s in sources:
                prefix = b"/".join([KEPT, version] + _source_parts(s.host, s.path))
                owners[prefix] = (_source_id(s), version)
        files: dict[str, dict[bytes, FileRecord]] = {_source_id(s): {} for s in sources}
        kept: dict[str, dict[FileRecord, bytes]] = {_source_id(s): {} for s in sources}
        dirs: dict[bytes, int] = {b"": os.lstat(self.root).st_size}
        file_bytes = unknown_files = unknown_bytes = 0
        unknown_sample: list[bytes] = []
        stack: list[tuple[bytes, Optional[str], int]] = [(b"", None, 0)]
        while stack:
            if stop is not None and stop.is_set():
                raise StoreError("inventory stopped")
            rel_dir, owner, cut = stack.pop()
            full_dir = os.path.join(self.root, rel_dir) if rel_dir else self.root
            try:
                with os.scandir(full_dir) as it:
                    entries = list(it)
            except FileNotFoundError:
                if rel_dir:
                    dirs.pop(rel_dir, None)
                    continue
                raise
            for entry in entries:
                name = os.fsencode(entry.name)
                if not rel_dir and name == STATE:
                    continue
                rel = rel_dir + b"/" + name if rel_dir else name
                try:
                    st = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                if stat.S_ISDIR(st.st_mode):
                    dirs[rel] = st.st_size
                    if rel in owners:
                        stack.append((rel, owners[rel], len(rel) + 1))
                    else:
                        stack.append((rel, owner, cut))
                    continue
                record = None
                if owner is not None and (stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode)):
                    try:
                        record = FileRecord(rel[cut:], st.st_size, mtime_of(st))
                    except ValueError:
                        record = None
                if record is None:
                    unknown_files += 1
                    unknown_bytes += st.st_size
                    if len(unknown_sample) < 20:
                        unknown_sample.append(rel)
                else:
                    sid, version = owner
                    if version is None:
                        files[sid][record.path] = record
                    else:
                        kept[sid][record] = version
                    file_bytes += st.st_size
        self._sources = sources
        self.files = files
        self.kept = kept
        self._dirs = dirs
        self._file_bytes = file_bytes
        self.unknown_files, self.unknown_bytes = unknown_files, unknown_bytes
        self.unknown_sample = unknown_sample
        self._state_bytes = tree_usage(self.state_dir)
        self._recount()
        if self.unknown_files:
            log.warn(
                "store {store}: {count} files ({bytes} B) belong to no configured "
                "source; left alone (e.g. {sample})",
                store=self.root, count=self.unknown_files, bytes=self.unknown_bytes,
                sample=self.unknown_sample[:3])
        self.refresh_quota()
        if self.dir_costs is None:
            if self.quota - self.used >= PROBE_ROOM:
                self.dir_costs = measure_dir_costs(self.state_dir)
            else:
                self.dir_costs = fallback_dir_costs(self._statvfs(self.root).f_bsize)
                log.warn("store {store}: no room to probe directory costs; assuming {costs}",
                         store=self.root, costs=self.dir_costs)
            self.measure_state()
        return self.files

    def _recount(self) -> None:
        self._used = (sum(self._dirs.values()) + self._file_bytes
                      + self.unknown_bytes + self._state_bytes)

    def usage(self) -> int:
        """What C{du -sb} of the store prints, by walking it now."""
        return tree_usage(self.root)

    @property
    def used(self) -> int:
        """The running usage figure (see the module docstring)."""
        if self._used is None:
            raise StoreError("call inventory() first")
        return self._used

    @property
    def free(self) -> int:
        """Quota minus used; negative when over (e.g. a reserve shrank)."""
        return self.quota - self.used

    def refresh_quota(self) -> int:
        """
        Recompute the (effective) quota: C{size}, or in reserve mode current
        usage plus the filesystem's free bytes beyond C{reserve} (never
        negative); in both cases at most current usage plus what the
        filesystem has free beyond L{fs_margin}, so a store on a filesystem
        smaller than its quota (or shared and filling up) plans only what
        fits.  Block rounding makes files take more room than their apparent
        size: the margin absorbs that, and grows at each L{out_of_space}.
        """
        st = self._statvfs(self.root)
        available = st.f_bavail * st.f_frsize
        if self.reserve is not None:
            quota = max(0, self.used + available - self.reserve)
        else:
            quota = self.size
        if self.fs_margin is None:
            # In reserve mode the reserve is the margin until a first ENOSPC.
            self.fs_margin = 0 if self.reserve is not None else 64 * max(st.f_frsize, 4096)
        room = max(0, self.used + available - self.fs_margin)
        limited = room < quota
        if limited and not self.fs_limited:
            log.warn("store {store}: its filesystem has less room than its quota; "
                     "effective quota {quota} B", store=self.root, quota=room)
        self.fs_limited = limited
        self.quota = min(quota, room)
        return self.quota

    def out_of_space(self) -> int:
        """
        The filesystem filled up (ENOSPC): remove partial and temp files,
        double the free-space margin (at most a quarter of the filesystem)
        and recompute the quota; returns the new quota.
        """
        self.clean_partials()
        st = self._statvfs(self.root)
        block = max(st.f_frsize, 4096)
        whole = st.f_blocks * st.f_frsize
        margin = max(self.fs_margin or 0, 64 * block)
        cap = whole // 4 if whole else 2 * margin  # f_blocks 0: size unknown
        self.fs_margin = max(margin, min(2 * margin, cap))
        self.fs_limited = False  # warn again with the new figure
        return self.refresh_quota()

    def measure_state(self) -> int:
        """Re-walk the (small) state directory; returns its usage."""
        before = self._state_bytes
        self._state_bytes = tree_usage(self.state_dir)
        if self._used is not None:
            self._used += self._state_bytes - before
        return self._state_bytes

    def resync(self) -> None:
        """Walk everything again (e.g. hourly, or after a killed rsync)."""
        self.inventory(self._sources)

    def _refresh_dirs(self, parts: list[bytes], done: Optional[set] = None) -> None:
        """
        Re-lstat the store root and the directories C{parts} lead through;
        with C{done} (tuples of parts), skip those in it and add those seen.
        """
        rel = b""
        for i in range(len(parts) + 1):
            if done is not None:
                key = tuple(parts[:i])
                if key in done:
                    continue
                done.add(key)
            if i:
                rel = b"/".join(parts[:i])
            st = _lstat(os.path.join(self.root, rel) if rel else self.root)
            if st is None or not stat.S_ISDIR(st.st_mode):
                if rel in self._dirs:  # it went away: forget it and all below
                    for gone in [d for d in self._dirs if d == rel or d.startswith(rel + b"/")]:
                        self._used -= self._dirs.pop(gone)
                return
            self._used += st.st_size - self._dirs.get(rel, 0)
            self._dirs[rel] = st.st_size

    def refresh(self, source_host: str, source_path: str, relpath: bytes) -> Optional[FileRecord]:
        """
        Bring L{used} and L{files} up to date for one path rsync may have
        written (fetched, replaced, or failed after creating directories):
        returns the record now on disk, or None.
        """
        return self.refresh_many(source_host, source_path, [relpath])[relpath]

    def refresh_many(self, source_host: str, source_path: str,
                     relpaths: Iterable[bytes]) -> dict[bytes, Optional[FileRecord]]:
        """
        L{refresh} for every path of C{relpaths} (say, one rsync run's),
        each folder on the way looked at once: relpath -> the record now on
        disk, or None.
        """
        self.used  # raises before inventory()
        parents: dict = {}
        refreshed: set = set()
        out: dict[bytes, Optional[FileRecord]] = {}
        for relpath in relpaths:
            path, _ = self._target(source_host, source_path, relpath, parents)
            dirs = (self._parts[(source_host, source_path)] + relpath.split(b"/"))[:-1]
            self._refresh_dirs(dirs, refreshed)
            out[relpath] = self._refresh_file(source_host, source_path, relpath, path)
        return out

    def _refresh_file(self, source_host: str, source_path: str, relpath: bytes,
                      path: bytes) -> Optional[FileRecord]:
        sid = f"{source_host}:{source_path}"
        holdings = self.files.setdefault(sid, {})
        old = holdings.pop(relpath, None)
        if old is not None:
            self._file_bytes -= old.size
            self._used -= old.size
        st = _lstat(path)
        if st is None or not (stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode)):
            return None
        record = FileRecord(relpath, st.st_size, mtime_of(st))
        holdings[relpath] = record
        self._file_bytes += st.st_size
        self._used += st.st_size
        return record

    def cost(self, source_host: str, source_path: str, relpath: bytes, size: int,
             parents: Optional[dict] = None) -> int:
        """
        An upper bound on how much fetching C{relpath} (C{size} bytes) can
        add to C{du -sb} at its peak:

          - C{size}: rsync writes the new version to a temp file beside the
            old one (if any), which is removed only at the end;
          - C{m * new_dir} for the C{m} missing parent directories;
          - C{(m + 3) * entry}: one new entry in the first existing ancestor
            and in each new intermediate directory, two in the file's own
            directory (rsync's temp name and the final name exist together
            during the rename), one in the partial dir (an interrupted
            transfer is moved there).
        """
        if self.dir_costs is None:
            raise StoreError("call inventory() first")
        _, missing = self._target(source_host, source_path, relpath, parents)
        c = self.dir_costs
        return size + missing * c.new_dir + (missing + 3) * c.entry

    # --- removal ---------------------------------------------------------

    def remove(self, source_host: str, source_path: str, relpath: bytes) -> int:
        """
        Delete one file (or symlink) and the directories it leaves empty,
        up to but not including the source's directory; forget its orphan
        mark.  Returns the bytes freed (the drop in L{used}).  A missing file
        is not an error (0 freed, unless empty parents were removed).
        """
        return self.remove_many(source_host, source_path, [relpath])

    def remove_many(self, source_host: str, source_path: str,
                    relpaths: Iterable[bytes]) -> int:
        """
        L{remove} each of C{relpaths}, then forget their orphan marks in one
        write: the cost follows the number of paths given, not the number of
        files or orphans in the store, so a caller can remove many files in
        bounded chunks.  Returns the bytes freed.  A refused path
        (L{StoreError}) ends the call; the paths before it are removed and
        unmarked.
        """
        before = self.used  # raises before inventory()
        sid = f"{source_host}:{source_path}"
        top = _source_parts(source_host, source_path)
        done: list[bytes] = []
        # Folders (below the source's) that held a removed file: those left
        # empty are removed at the end, deepest first, then what remains on
        # their way is measured once, however many files each folder held.
        emptied: set[tuple[bytes, ...]] = set()
        left: set[tuple[bytes, ...]] = set()
        parents: dict = {}  # see _target: no folder changes before the end
        try:
            for relpath in relpaths:
                folder, missing = self._unlink(source_host, source_path, sid, relpath, parents)
                (emptied if folder and not missing else left).add(folder)
                done.append(relpath)
        finally:
            left |= self._remove_empty(top, emptied)
            measured: set = set()
            for folder in left:
                self._refresh_dirs(top + list(folder), measured)
            self.unmark(sid, done)
        return before - self.used

    def _unlink(self, source_host: str, source_path: str, sid: str, relpath: bytes,
                parents: dict) -> tuple[tuple[bytes, ...], int]:
        """
        Delete one file (or symlink) and forget its record: its folder's
        parts below the source's, and how many of them are missing.
        """
        path, missing = self._target(source_host, source_path, relpath, parents)
        st = _lstat(path)
        if st is not None and stat.S_ISDIR(st.st_mode):
            raise StoreError(f"refusing to remove {relpath!r}: it is a directory")
        if st is not None:
            os.unlink(path)
        record = self.files.get(sid, {}).pop(relpath, None)
        # Subtract what the running figure counted for it (also when the
        # file had vanished); a file never refreshed was never counted, so
        # nothing is subtracted and the figure can only err high.
        gone = record.size if record is not None else 0
        self._file_bytes -= gone
        self._used -= gone
        return tuple(relpath.split(b"/")[:-1]), missing

    def _remove_empty(self, top: list[bytes],
                      folders: set[tuple[bytes, ...]]) -> set[tuple[bytes, ...]]:
        """
        Remove those of C{folders} (parts below the source's folder C{top})
        that are empty, and then their parents left empty, never the
        source's folder itself; returns the deepest folders that remain.
        """
        levels: dict[int, set] = {}
        for folder in folders:
            levels.setdefault(len(folder), set()).add(folder)
        for depth in range(max(levels, default=0), 0, -1):
            for folder in levels.pop(depth, ()):
                try:
                    os.rmdir(os.path.join(self.root, *top, *folder))
                except OSError:
                    levels.setdefault(0, set()).add(folder)  # stays: measure it
                    continue
                self._used -= self._dirs.pop(b"/".join(top + list(folder)), 0)
                levels.setdefault(depth - 1, set()).add(folder[:-1])
        return levels.get(0, set())

    def clean_partials(self) -> None:
        """
        Empty the partial and temp dirs and remove C{--files-from} lists
        (leftovers of interrupted transfers, or of a killed client).  Call
        it only while no rsync runs for this store.
        """
        for folder in (self.partial_dir, self.temp_dir, self.update_dir):
            with os.scandir(folder) as it:
                entries = list(it)
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.path)
                else:
                    os.unlink(entry.path)
        with os.scandir(self.state_dir) as it:
            lists = [e.path for e in it if os.fsencode(e.name).startswith(LIST_PREFIX)
                     and e.is_file(follow_symlinks=False)]
        for path in lists:
            os.unlink(path)
        self.measure_state()

    # --- kept versions (rule 7) --------------------------------------------

    def _kept_versions(self) -> list[bytes]:
        """The version folders under L{KEPT} (names that are not one are left alone)."""
        try:
            with os.scandir(os.path.join(self.root, KEPT)) as it:
                return [os.fsencode(e.name) for e in it
                        if VERSION_NAME.match(os.fsencode(e.name)) and e.is_dir(follow_symlinks=False)]
        except (FileNotFoundError, NotADirectoryError):
            return []

    def _kept_parts(self, host: str, spath: str, record: FileRecord,
                    version: Optional[bytes] = None) -> list[bytes]:
        """Store-relative parts of where C{record} is kept (see L{KEPT})."""
        if version is None:
            version = b"%d.%d" % (record.mtime, record.size)
        return [KEPT, version] + _source_parts(host, spath) + record.path.split(b"/")

    def _checked_parents(self, parts: list[bytes], relpath: bytes) -> tuple[bytes, int]:
        problem = relpath_problem(relpath)
        if problem is not None:
            raise StoreError(f"refusing path {relpath!r}: {problem}")
        current, missing = self._walk_parents(parts[:-1], relpath)
        return os.path.join(current, parts[-1]), missing

    def keep_cost(self, source_host: str, source_path: str, relpath: bytes) -> int:
        """
        An upper bound on what moving the layout copy of C{relpath} into
        L{KEPT} adds to usage: the folders it needs there, and an entry in
        each (the file's own bytes only move).
        """
        record = self.files.get(f"{source_host}:{source_path}", {}).get(relpath)
        if record is None or self.dir_costs is None:
            return 0
        _, missing = self._checked_parents(
            self._kept_parts(source_host, source_path, record), relpath)
        c = self.dir_costs
        return missing * c.new_dir + (missing + 1) * c.entry

    def keep(self, source_host: str, source_path: str, relpaths: Iterable[bytes],
             now: float) -> list[FileRecord]:
        """
        Move the layout copies of C{relpaths} (versions the source replaced)
        into L{KEPT}, as orphans first seen C{now}, marked in one write;
        returns their records (a path the layout has no copy of is
        skipped).  The layout then has no copy of those paths.  A refused
        path (L{StoreError}) or a failed move ends the call; the copies
        moved before it are kept and marked.
        """
        sid = f"{source_host}:{source_path}"
        top = _source_parts(source_host, source_path)
        kept: list[FileRecord] = []
        try:
            for relpath in relpaths:
                record = self.files.get(sid, {}).get(relpath)
                if record is None:
                    continue
                parts = self._kept_parts(source_host, source_path, record)
                target, missing = self._checked_parents(parts, relpath)
                source = self.path_of(source_host, source_path, relpath)
                if missing:
                    os.makedirs(os.path.dirname(target), mode=0o700, exist_ok=True)
                os.rename(source, target)
                self.files[sid].pop(relpath)
                self.kept.setdefault(sid, {})[record] = parts[1]
                self._refresh_dirs(parts[:-1])
                self._prune(top + relpath.split(b"/")[:-1], len(top), 0)
                kept.append(record)
        finally:
            self.mark_orphans(sid, [kept_key(r) for r in kept], now)
        return kept

    def remove_kept(self, source_host: str, source_path: str, record: FileRecord) -> int:
        """
        Delete a kept version and the folders it leaves empty (up to
        L{KEPT}); returns the bytes freed.  A missing one is not an error.
        """
        before = self.used
        sid = f"{source_host}:{source_path}"
        version = self.kept.get(sid, {}).pop(record, None)
        parts = self._kept_parts(source_host, source_path, record, version)
        path, missing = self._checked_parents(parts, record.path)
        st = _lstat(path)
        if st is not None and not stat.S_ISDIR(st.st_mode):
            os.unlink(path)
        if version is not None:
            self._file_bytes -= record.size
            self._used -= record.size
        self._prune(parts[:-1], 1, missing)
        self.unmark(sid, [kept_key(record)])
        return before - self.used

    def take_for_update(self, source_host: str, source_path: str,
                        record: FileRecord) -> bytes:
        """
        Move a kept version into the update folder (L{UPDATE}), at
        C{<update>/<source host>/<source path>/<relpath>}, to be rewritten
        there in place by rsync and then put in the layout with
        L{finish_update}; returns the update folder of the source.
        """
        sid = f"{source_host}:{source_path}"
        version = self.kept[sid].pop(record)
        parts = self._kept_parts(source_host, source_path, record, version)
        path, _ = self._checked_parents(parts, record.path)
        dest_root = os.path.join(self.update_dir, *_source_parts(source_host, source_path))
        target = os.path.join(dest_root, record.path)
        os.makedirs(os.path.dirname(target), mode=0o700, exist_ok=True)
        os.rename(path, target)
        self._file_bytes -= record.size
        self._used -= record.size
        self._prune(parts[:-1], 1, 0)
        self.unmark(sid, [kept_key(record)])
        self.measure_state()
        return dest_root

    def finish_update(self, source_host: str, source_path: str,
                      relpaths: Iterable[bytes]) -> None:
        """
        Put files rewritten in the update folder (L{take_for_update}) into
        the layout; those missing there (the update failed) are skipped.
        Call L{refresh_many} for them afterwards, as after any fetch.
        """
        dest_root = os.path.join(self.update_dir, *_source_parts(source_host, source_path))
        for relpath in relpaths:
            updated = os.path.join(dest_root, relpath)
            if _lstat(updated) is None:
                continue
            target, missing = self._target(source_host, source_path, relpath)
            if missing:
                os.makedirs(os.path.dirname(target), exist_ok=True)
            os.rename(updated, target)
        self.measure_state()

    def clean_update(self, source_host: str, source_path: str) -> None:
        """Empty the update folder of a source (what an update left unfinished)."""
        parts = _source_parts(source_host, source_path)
        dest_root = os.path.join(self.update_dir, *parts)
        if _lstat(dest_root) is not None:
            shutil.rmtree(dest_root)
        for n in range(len(parts) - 1, 0, -1):  # and the folders left empty
            try:
                os.rmdir(os.path.join(self.update_dir, *parts[:n]))
            except OSError:
                break
        self.measure_state()

    def _prune(self, parts: list[bytes], keep: int, missing: int) -> None:
        """
        Remove the empty folders of C{parts} (store-relative), deepest first,
        keeping the first C{keep}; then re-measure the folders left.
        """
        while len(parts) > keep and not missing:
            try:
                os.rmdir(os.path.join(self.root, *parts))
            except OSError:
                break
            self._used -= self._dirs.pop(b"/".join(parts), 0)
            parts = parts[:-1]
        self._refresh_dirs(parts)

    # --- orphans -----------------------------------------------------------

    def mark_orphans(self, source_id: str, paths: Iterable[bytes], now: float) -> None:
        """Remember C{now} as the first time each of C{paths} was orphaned."""
        self._index.mark(source_id, paths, now)
        self._save_orphans()

    def unmark(self, source_id: str, paths: Iterable[bytes]) -> None:
        """The source has these files again: they are no longer orphans."""
        self._index.unmark(source_id, paths)
        self._save_orphans()

    def orphans(self) -> dict[tuple[str, bytes], float]:
        """(source id, relpath) -> when first seen orphaned."""
        return dict(self._index.marks)

    def expired_orphans(
        self, now: float, keep_deleted: Union[float, Mapping[str, float]]
    ) -> list[tuple[str, bytes]]:
        """
        Orphans kept at least C{keep_deleted} seconds (a number, or per
        source id; a source missing from the mapping never expires).
        """
        out = []
        for (sid, path), since in sorted(self._index.marks.items(), key=lambda kv: kv[1]):
            keep = keep_deleted.get(sid) if isinstance(keep_deleted, Mapping) else keep_deleted
            if keep is not None and now - since >= keep:
                out.append((sid, path))
        return out

    def _save_orphans(self) -> None:
        """
        Persist the orphan marks' changes (one transaction), only when what
        that can add to the state dir (L{OrphanIndex.growth}) fits under the
        quota; otherwise keep them in memory, to be written by a later call
        that fits (a restart before then restarts their clocks: they are
        kept longer, which is the safe side).
        """
        if not self._index.dirty:
            return
        if self._used is not None and self.quota is not None:
            if self.used + self._index.growth() > self.quota:
                if self.orphans_persisted:
                    log.warn("store {store} is full: orphan marks kept in memory only",
                             store=self.root)
                self.orphans_persisted = False
                return
        self.orphans_persisted = self._index.flush()
        if self._used is not None:
            self.measure_state()

    def close(self) -> None:
        """Close the orphan index (the store object is not used after this)."""
        self._index.close()


def kept_key(record: FileRecord) -> bytes:
    """
    The orphan mark key of a kept version: C{<mtime>.<size>} and its path
    joined by a NUL, which no relative path holds, so a kept version's mark
    never meets a layout orphan's.
    """
    return b"%d.%d\0%s" % (record.mtime, record.size, record.path)


def _lstat(path: bytes) -> Optional[os.stat_result]:
    try:
        return os.lstat(path)
    except FileNotFoundError:
        return None
    except NotADirectoryError:
        return None
