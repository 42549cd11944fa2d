"""
C{cbackup restore}: put a source, or a folder of it, back from the stores.

    cbackup restore -c FILE --source HOST:/PATH --to DIR [--path SUBPATH]
                    [--store HOST:/PATH ...] [--host NAME] [--local]
                    [--at TIME] [--force] [--dry-run]

Stores keep files whole under C{<store>/<source host>/<source path>/<relpath>}
(DESIGN.md rule 6), so a restore is a listing and a plain rsync:

  1. I{List} every file and symlink (size, whole-second mtime) under
     C{<store>/<host>/<path>/<SUBPATH>} of every store of the config (or of
     each C{--store}).  A store on this host (or any store, with
     C{--local}: its disk was moved here) is walked by path; another
     host's is listed with C{ssh HOST find ... -printf}.  A store's
     C{.cbackup} state folder sits beside the host folders, never inside a
     source's folder, so it is never listed.  Names shaped like rsync's temp
     files (C{.NAME.XXXXXX}, left when a transfer was killed) are skipped
     and named in a warning.  A store that cannot be read is a warning, as
     long as another one can be read.
     The versions a store keeps of files the source replaced (rule 7,
     C{<store>/.cbackup-kept/<mtime>.<size>/<host>/<path>/}) are listed
     too, for stores read here (by path or C{--local}; not yet over ssh).
  2. I{Plan} (L{plan}, pure): where stores differ on a file, the newest
     mtime wins, then the larger size, then the earlier store (stores on
     this host first, then config order, then kept versions).  With
     C{--at TIME}, versions written after TIME are left out: each file is
     restored as it was then.
  3. I{Copy}: one C{rsync -a -s --numeric-ids --files-from --from0} run per
     chosen store, into C{DIR}, keeping the source layout from the source's
     root: file C{RELPATH} lands at C{DIR/RELPATH} (so with C{--path a/b},
     at C{DIR/a/b/...}; a restore of the whole source into an empty folder
     and one of a folder into the same place agree).  rsync's quick check
     (same size and mtime) skips files already in C{DIR}, so a rerun
     finishes an interrupted restore.  Temp and partial files live in
     C{DIR/.cbackup-restore/}, removed once everything is restored; while it
     is there, a rerun of the same restore needs no C{--force}.
  4. I{Verify} every restored file's size and mtime (L{transfer.verify}).
  5. Optionally I{ask the source's server} (short timeout, the config's
     secret) which files no store holds: see L{ask_server}.

Safety: nothing is written outside C{DIR}; C{--path} must be relative
without C{..}; C{DIR} must not be (inside) a store nor have a symlink among
its own path components; restoring into the live source folder needs
C{--force}, and so does a non-empty C{DIR}.  rsync runs without C{-K}, so a
symlink found inside C{DIR} where a folder is restored is replaced, never
followed.  C{--dry-run} prints what would be copied from where and writes
nothing.

Exit: 0 when every file found was restored, 1 when some could not be (or
no store could be read, or none holds anything), 2 for bad arguments or
config.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import stat
import subprocess
import time
from datetime import datetime
from decimal import ROUND_FLOOR, Decimal, InvalidOperation
from typing import Callable, Iterable, Mapping, Optional, Sequence, TextIO

from attrs import frozen

from cluster_backup import transfer
from cluster_backup.config import Cluster, ConfigError, Source, Store, load, parse_location, read_secret
from cluster_backup.identity import identify_or_none
from cluster_backup.records import FileRecord, relpath_problem
from cluster_backup.store import KEPT, VERSION_NAME
from cluster_backup.units import human_size

EXIT_OK = 0
EXIT_INCOMPLETE = 1
EXIT_BAD_ARGS = 2

#: The restore's own state folder inside C{--to}.
STATE = b".cbackup-restore"
#: Marks the state folder as this restore's: source id and path, one a line.
MARKER = b"restoring"
#: How many names of files no store holds are printed.
SHOW_MISSING = 20
#: Seconds for the whole optional conversation with the source's server.
SERVER_TIMEOUT = 10.0
#: At most this many names with no copy are fetched from the server.
MISSING_LIMIT = 100_000
SSH = ["ssh", "-o", "BatchMode=yes", "-o", "ConnectTimeout=10"]

# rsync's temp names: "." + name + "." + mkstemp's 6 random [A-Za-z0-9].  A
# suffix of lowercase letters only (1 in 180 temp names) is taken for a real
# name such as ".bashrc.backup".
_TEMP_NAME = re.compile(rb"\A\.(.+)\.(?![a-z]{6}\Z)[A-Za-z0-9]{6}\Z", re.DOTALL)


#: Extra passes for files that vanished from their store during the copy.
RETRIES = 3


class RestoreError(Exception):
    """Bad arguments or a refused destination: exit 2, nothing written."""


@frozen
class Entry:
    """One file or symlink a store holds: C{kind} is C{"file"} or C{"link"}."""

    path: bytes
    kind: str
    size: int
    mtime: int


def show(path: bytes) -> str:
    """A path for messages: control bytes as rsync prints them, other bytes raw."""
    return transfer.escape(path).decode("utf-8", "backslashreplace")


# --- pure planning -------------------------------------------------------


def check_subpath(text: Optional[str]) -> Optional[bytes]:
    """
    C{--path} as bytes relative to the source root (trailing slashes
    dropped), or None for the whole source.  Raises L{RestoreError} for an
    absolute path, C{..}, C{.} or empty components.
    """
    if text is None:
        return None
    raw = os.fsencode(text)
    if raw.startswith(b"/"):
        raise RestoreError(f"--path {text!r} must be relative to the source's root, not absolute")
    raw = raw.rstrip(b"/")
    problem = relpath_problem(raw)
    if problem is not None:
        raise RestoreError(f"--path {text!r}: {problem}")
    return raw


def within(path: bytes, subpath: Optional[bytes]) -> bool:
    """True when C{path} is C{subpath} or below it (always, for None)."""
    return subpath is None or path == subpath or path.startswith(subpath + b"/")


def looks_like_temp(path: bytes) -> bool:
    """True for a name shaped like an rsync temp file (C{.NAME.XXXXXX})."""
    return _TEMP_NAME.match(path.rpartition(b"/")[2]) is not None


def beats(a: Entry, b: Entry) -> bool:
    """True when version C{a} wins over C{b}: newer mtime, then larger size."""
    return (a.mtime, a.size) > (b.mtime, b.size)


@frozen
class Plan:
    """
    Which store each file is restored from.  C{chosen}: store id -> entries
    (stores in the order given to L{plan}, empty ones left out);
    C{differing}: how many files had different versions in different
    stores; C{skipped}: names left out as rsync temp files.
    """

    chosen: dict
    differing: int
    skipped: tuple

    @property
    def files(self) -> int:
        return sum(len(v) for v in self.chosen.values())

    @property
    def bytes(self) -> int:
        return sum(e.size for v in self.chosen.values() for e in v)

    def entries(self) -> list[Entry]:
        return [e for v in self.chosen.values() for e in v]


def plan(listings: Sequence[tuple[str, Mapping[bytes, Entry]]],
         subpath: Optional[bytes] = None, at: Optional[float] = None) -> Plan:
    """
    Choose a store for every file under C{subpath} found in C{listings}
    (C{(store id, path -> entry)}, in order of preference for ties): the
    newest mtime wins, then the larger size, then the earlier store.  With
    C{at} (a time), versions written after it are left out: the newest
    version as of C{at}.
    """
    best: dict[bytes, tuple[int, Entry]] = {}
    versions: dict[bytes, set] = {}
    skipped = set()
    for index, (_, listing) in enumerate(listings):
        for path, entry in listing.items():
            if not within(path, subpath) or (at is not None and entry.mtime > at):
                continue
            if looks_like_temp(path):
                skipped.add(path)
                continue
            versions.setdefault(path, set()).add((entry.kind, entry.size, entry.mtime))
            current = best.get(path)
            if current is None or beats(entry, current[1]):
                best[path] = (index, entry)
    chosen: dict[str, list[Entry]] = {}
    for path in sorted(best):
        index, entry = best[path]
        chosen.setdefault(listings[index][0], []).append(entry)
    order = {sid: i for i, (sid, _) in enumerate(listings)}
    chosen = dict(sorted(chosen.items(), key=lambda kv: order[kv[0]]))
    differing = sum(1 for v in versions.values() if len(v) > 1)
    return Plan(chosen, differing, tuple(sorted(skipped)))


# --- listing the stores ----------------------------------------------------


class ReadError(Exception):
    """A store that cannot be read (message names it)."""


def source_dir(store_path: str, source: Source) -> bytes:
    """Where C{store_path} keeps C{source}'s files (DESIGN.md rule 6)."""
    return os.path.join(os.fsencode(store_path), os.fsencode(source.host),
                        os.fsencode(source.path).lstrip(b"/"))


def list_local(store_path: str, root: bytes, subpath: Optional[bytes]) -> dict[bytes, Entry]:
    """
    Every file and symlink under C{root}/C{subpath}, by path relative to
    C{root}; never follows symlinks.  Raises L{ReadError} when the store
    folder itself cannot be read; a missing source folder is an empty
    listing (the store holds nothing of it).
    """
    try:
        if not stat.S_ISDIR(os.stat(store_path).st_mode):
            raise ReadError(f"store {store_path} is not a folder")
        os.listdir(store_path)
    except OSError as e:
        raise ReadError(f"cannot read store {store_path}: {e.strerror or e}") from None
    start = os.path.join(root, subpath) if subpath else root
    out: dict[bytes, Entry] = {}
    try:
        st = os.lstat(start)
    except FileNotFoundError:
        return out
    except OSError as e:
        raise ReadError(f"cannot read {os.fsdecode(start)}: {e.strerror or e}") from None
    if not stat.S_ISDIR(st.st_mode):
        if subpath is not None:
            _add(out, subpath, st)
        return out
    stack = [subpath or b""]
    while stack:
        rel_dir = stack.pop()
        folder = os.path.join(root, rel_dir) if rel_dir else root
        try:
            with os.scandir(folder) as it:
                found = list(it)
        except OSError as e:
            raise ReadError(f"cannot read {os.fsdecode(folder)}: {e.strerror or e}") from None
        for entry in found:
            rel = os.path.join(rel_dir, os.fsencode(entry.name)) if rel_dir else os.fsencode(entry.name)
            try:
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            if stat.S_ISDIR(st.st_mode):
                stack.append(rel)
            else:
                _add(out, rel, st)
    return out


def _add(out: dict, rel: bytes, st: os.stat_result) -> None:
    if stat.S_ISREG(st.st_mode):
        kind = "file"
    elif stat.S_ISLNK(st.st_mode):
        kind = "link"
    else:
        return  # stores hold only files and symlinks
    out[rel] = Entry(rel, kind, st.st_size, st.st_mtime_ns // 1_000_000_000)


#: C{find -printf}: type, size, mtime, path; NUL-terminated.
FIND_FORMAT = r"%y %s %T@ %p\0"


def remote_list_command(store_path: str, root: bytes, subpath: Optional[bytes]) -> str:
    """
    The shell command run over ssh to list C{root}/C{subpath}: exit 3 when
    the store folder is missing, an empty listing when the source's folder
    is; paths printed as C{./RELPATH}.
    """
    start = b"./" + subpath if subpath else b"."
    q = lambda b: shlex.quote(os.fsdecode(b))  # noqa: E731
    return (f"test -d {shlex.quote(store_path)} || exit 3; "
            f"cd {q(root)} 2>/dev/null || exit 0; "
            f"test -e {q(start)} || test -L {q(start)} || exit 0; "
            f"find {q(start)} \\( -type f -o -type l \\) -printf {shlex.quote(FIND_FORMAT)}")


def parse_find(output: bytes) -> dict[bytes, Entry]:
    """Parse L{FIND_FORMAT} records (paths C{./RELPATH}); bad records are skipped."""
    out: dict[bytes, Entry] = {}
    for record in output.split(b"\0"):
        if not record:
            continue
        try:
            kind, size, mtime, path = record.split(b" ", 3)
            seconds = int(Decimal(mtime.decode("ascii")).to_integral_value(ROUND_FLOOR))
            size_n = int(size)
        except (ValueError, InvalidOperation, UnicodeDecodeError):
            continue
        if path.startswith(b"./"):
            path = path[2:]
        if kind not in (b"f", b"l") or relpath_problem(path) is not None:
            continue
        out[path] = Entry(path, "file" if kind == b"f" else "link", size_n, seconds)
    return out


def list_remote(target: str, store_path: str, root: bytes, subpath: Optional[bytes],
                run: Callable = subprocess.run) -> dict[bytes, Entry]:
    """List a store on another host with C{ssh TARGET find ...}."""
    command = remote_list_command(store_path, root, subpath)
    try:
        done = run([*SSH, target, command], stdin=subprocess.DEVNULL,
                   stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    except OSError as e:
        raise ReadError(f"cannot run ssh to {target}: {e}") from None
    if done.returncode == 3:
        raise ReadError(f"store {target}:{store_path} is not a folder there")
    if done.returncode != 0:
        why = done.stderr.decode("utf-8", "replace").strip().splitlines()
        raise ReadError(f"cannot list {target}:{store_path} over ssh "
                        f"(exit {done.returncode}): {why[-1] if why else 'no message'}")
    return parse_find(done.stdout)


@frozen
class Location:
    """
    Where to read one store: by path here (C{target} None) or over ssh.
    C{version} names a kept versions folder of the store (rule 7: versions
    the source replaced, under C{<store>/.cbackup-kept/<version>/}), None
    for the store's layout.
    """

    store: Store
    root: bytes  # the source's folder in the store
    target: Optional[str]  # ssh host (address) or None
    version: Optional[bytes] = None

    @property
    def id(self) -> str:
        if self.version is None:
            return self.store.id
        return f"{self.store.id} (kept version {self.version.decode()})"

    def rsync_source(self) -> str:
        path = os.fsdecode(self.root).rstrip("/") + "/"
        return f"{self.target}:{path}" if self.target else path

    def listing(self, subpath: Optional[bytes]) -> dict[bytes, Entry]:
        if self.target is None:
            return list_local(self.store.path, self.root, subpath)
        return list_remote(self.target, self.store.path, self.root, subpath)


def kept_locations(loc: Location, source: Source) -> list[Location]:
    """
    The kept versions folders of a store read here, as L{Location}s (a
    store read over ssh: none, see the module docstring).
    """
    if loc.target is not None:
        return []
    kept = os.path.join(os.fsencode(loc.store.path), KEPT)
    try:
        names = sorted(os.listdir(kept))
    except OSError:
        return []
    return [Location(loc.store, source_dir(os.fsdecode(os.path.join(kept, name)), source),
                     None, name) for name in names if VERSION_NAME.match(name)]


def locations(cluster: Cluster, source: Source, stores: Sequence[Store],
              host: Optional[str], local: bool) -> list[Location]:
    """One L{Location} per store; stores on this host first (cheaper for ties)."""
    out = []
    for st in stores:
        if local or st.host == host:
            target = None
        else:
            address = cluster.address_of(st.host)
            target = f"[{address}]" if ":" in address else address
        out.append(Location(st, source_dir(st.path, source), target))
    return sorted(out, key=lambda loc: loc.target is not None)


# --- the destination -------------------------------------------------------


def _inside(path: bytes, folder: bytes) -> bool:
    folder = folder.rstrip(b"/") or b"/"
    return path == folder or path.startswith(folder.rstrip(b"/") + b"/")


def symlinked_component(path: bytes) -> Optional[bytes]:
    """The first existing component of absolute C{path} that is a symlink, or None."""
    current = b"/"
    for part in [p for p in path.split(b"/") if p]:
        current = os.path.join(current, part)
        try:
            st = os.lstat(current)
        except FileNotFoundError:
            return None
        if stat.S_ISLNK(st.st_mode):
            return current
    return None


def marker_text(source: Source, subpath: Optional[bytes]) -> bytes:
    return source.id.encode("utf-8") + b"\n" + (subpath or b"") + b"\n"


def check_destination(to: bytes, *, force: bool, marker: bytes,
                      stores: Iterable[bytes], source_here: Optional[bytes]) -> bool:
    """
    Refuse a bad C{--to} (L{RestoreError}); return True when it holds an
    interrupted run of the same restore (its state folder's marker equals
    C{marker}).  C{stores}: real paths of the stores readable here;
    C{source_here}: the source's real path when it is on this machine.
    """
    shown = os.fsdecode(to)
    link = symlinked_component(to)
    if link is not None:
        raise RestoreError(f"--to {shown}: {os.fsdecode(link)} is a symlink; "
                           f"give the real path (see realpath)")
    for store in stores:
        if _inside(to, store):
            raise RestoreError(f"--to {shown} is inside the store {os.fsdecode(store)}; "
                               f"restore somewhere else")
    if source_here is not None and (_inside(to, source_here) or _inside(source_here, to)) \
            and not force:
        raise RestoreError(f"--to {shown} overlaps the source folder {os.fsdecode(source_here)}; "
                           f"restoring over live data needs --force")
    try:
        st = os.lstat(to)
    except FileNotFoundError:
        return False
    if not stat.S_ISDIR(st.st_mode):
        raise RestoreError(f"--to {shown} exists and is not a folder")
    names = set(os.listdir(to))
    resuming = False
    if STATE in names:
        try:
            with open(os.path.join(to, STATE, MARKER), "rb") as f:
                resuming = f.read() == marker
        except OSError:
            resuming = False
        if not resuming and not force:
            raise RestoreError(f"--to {shown} holds {STATE.decode()} of another restore; "
                               f"use --force to reuse it")
    if names - {STATE} and not resuming and not force:
        raise RestoreError(f"--to {shown} is not empty; use --force to restore into it "
                           f"(files with the same size and mtime are kept)")
    return resuming


def present(to: bytes, entries: Iterable[Entry]) -> set[bytes]:
    """Paths already in C{to} as rsync's quick check sees them (kind, size, mtime)."""
    out = set()
    for e in entries:
        try:
            st = os.lstat(os.path.join(to, e.path))
        except OSError:
            continue
        kind = "link" if stat.S_ISLNK(st.st_mode) else "file" if stat.S_ISREG(st.st_mode) else None
        if kind == e.kind and st.st_size == e.size and st.st_mtime_ns // 1_000_000_000 == e.mtime:
            out.add(e.path)
    return out


# --- copying ---------------------------------------------------------------


def rsync_argv(rsync: str, source: str, dest: bytes, files_from: bytes,
               state: bytes, ssh: bool) -> list:
    """One run's argv (see the module docstring); quick check on, no C{-K}."""
    argv = [rsync, "-a", "-s", "--numeric-ids", "-8", "--from0",
            b"--files-from=" + files_from,
            b"--partial-dir=" + os.path.join(state, b"partial"),
            b"--temp-dir=" + os.path.join(state, b"tmp"),
            f"--out-format={transfer.OUT_FORMAT}"]
    if ssh:
        argv += ["-e", " ".join(SSH)]
    return argv + ["--", source, dest.rstrip(b"/") + b"/"]


class Progress:
    """Files and bytes done, per run and overall, on C{err}: one rewritten
    line on a tty, else a plain line every few seconds and at each run's end."""

    def __init__(self, err: TextIO, files: int, size: int, clock=time.monotonic):
        self.err, self.clock = err, clock
        self.tty = hasattr(err, "isatty") and err.isatty()
        self.files, self.size = files, size
        self.done_files = self.done_bytes = 0
        self._last = -1e9

    def line(self, label: str, files: int, size: int, of_files: int, of_size: int) -> str:
        return (f"{label}: {files}/{of_files} files, {human_size(size)}/{human_size(of_size)}; "
                f"overall {self.done_files}/{self.files} files, "
                f"{human_size(self.done_bytes)}/{human_size(self.size)}")

    def update(self, text: str, final: bool = False) -> None:
        now = self.clock()
        if not final and now - self._last < (0.2 if self.tty else 5.0):
            return
        self._last = now
        if self.tty:
            self.err.write("\r\x1b[K" + text + ("\n" if final else ""))
        else:
            self.err.write(text + "\n")
        self.err.flush()


def run_rsync(argv: list, on_item: Callable[[transfer.Item], None]) -> tuple[int, list[str]]:
    """Run rsync, feeding each transferred item to C{on_item}; returns (exit, other lines)."""
    other = []
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, env={**os.environ, "LANG": "C"})
    try:
        for line in proc.stdout:
            item = transfer.parse_line(line)
            if item is None:
                other.append(line.rstrip(b"\n").decode("utf-8", "backslashreplace"))
            elif item.kind != "d" and item.change in "<>ch":
                on_item(item)
        return proc.wait(), other
    except BaseException:
        proc.terminate()
        proc.wait()
        raise


def copy(plan_: Plan, locs: Mapping[str, Location], to: bytes, already: set,
         err: TextIO) -> list[str]:
    """One rsync run per chosen store; returns error lines worth showing."""
    state = os.path.join(to, STATE)
    rsync = shutil.which("rsync") or "rsync"
    progress = Progress(err, plan_.files, plan_.bytes)
    done_before = [e for e in plan_.entries() if e.path in already]
    progress.done_files = len(done_before)
    progress.done_bytes = sum(e.size for e in done_before)
    problems: list[str] = []
    runs = len(plan_.chosen)
    for n, (sid, entries) in enumerate(plan_.chosen.items(), 1):
        loc = locs[sid]
        label = f"[{n}/{runs}] from {sid}"
        sizes = {e.path: e.size for e in entries}
        run = {"files": sum(1 for e in entries if e.path in already),
               "bytes": sum(e.size for e in entries if e.path in already)}
        total_bytes = sum(sizes.values())

        def on_item(item, sizes=sizes, run=run, label=label, total=len(entries),
                    total_bytes=total_bytes):
            if item.path not in sizes:
                return
            run["files"] += 1
            run["bytes"] += sizes[item.path]
            progress.done_files += 1
            progress.done_bytes += sizes[item.path]
            progress.update(progress.line(label, run["files"], run["bytes"], total, total_bytes))

        files_from = os.path.join(state, b"files-from-%d" % n)
        with open(files_from, "wb") as f:
            f.write(transfer.files_from_bytes(sizes))
        argv = rsync_argv(rsync, loc.rsync_source(), to, files_from, state, loc.target is not None)
        code, other = run_rsync(argv, on_item)
        os.unlink(files_from)
        progress.update(progress.line(label, run["files"], run["bytes"], len(entries),
                                      total_bytes) + f" (rsync exit {code})", final=True)
        if code != 0:
            meaning = transfer.EXIT_CODES.get(code, ("failed", "unknown"))[1]
            problems.append(f"rsync from {sid} exited {code} ({meaning})")
            problems += [f"  {line}" for line in other[-10:]]
    return problems


# --- asking the source's server (optional) ---------------------------------


@frozen
class ServerView:
    """What the server said: paths under the sub-path with no live copy."""

    missing: tuple
    complete: bool  # False: stopped at MISSING_LIMIT
    safemode: bool


async def ask_server(reactor, cluster: Cluster, source: Source, subpath: Optional[bytes],
                     secret: Optional[bytes], timeout: float = SERVER_TIMEOUT) -> ServerView:
    """
    The source's files that no store holds, from its server's ledger:
    L{ListNeeds} for a store backing the source lists rarest first, so the
    files with C{copies == 0} come first and the listing stops at the first
    file with a copy.  Accurate for live stores at the file's current
    version; a file being fetched right now counts its claim as a copy, and
    copies on dead stores or at an older version do not count (such files
    may still be restored from the stores read here, at their version).
    """
    from twisted.internet.endpoints import connectProtocol
    from twisted.protocols import amp

    from cluster_backup import session

    backing = cluster.stores_for(source) or list(cluster.stores)
    if not backing:
        raise ReadError("the config has no store to ask about")
    address = cluster.address_of(source.host)
    port = cluster.options.port
    proto = await connectProtocol(session.server_endpoint(reactor, address, port, timeout),
                                  amp.AMP())
    try:
        return await no_copy(proto, backing[0], source, subpath, secret)
    finally:
        proto.transport.loseConnection()


async def no_copy(proto, store: Store, source: Source, subpath: Optional[bytes],
                  secret: Optional[bytes], limit: int = MISSING_LIMIT) -> ServerView:
    """
    Over a connected C{proto}: log in as C{store}'s host (the shared secret
    is the credential), then page L{ListNeeds} for C{store} until the first
    need with a copy; see L{ask_server}.
    """
    from cluster_backup import session
    from cluster_backup.protocol import ListNeeds

    await session.login(proto, store.host, secret)
    missing: list[bytes] = []
    cursor = None
    safemode = False
    while len(missing) < limit:
        answer = await proto.callRemote(ListNeeds, source=source.id, store=store.id,
                                        cursor=cursor, limit=1000)
        safemode = answer["safemode"]
        for need in answer["needs"]:
            if need.copies > 0:
                return ServerView(tuple(missing), True, safemode)
            if within(need.path, subpath):
                missing.append(need.path)
        cursor = answer["cursor"]
        if cursor is None:
            return ServerView(tuple(missing), True, safemode)
    return ServerView(tuple(missing), False, safemode)


def query_server(cluster: Cluster, source: Source, subpath: Optional[bytes],
                 timeout: float = SERVER_TIMEOUT):
    """Run L{ask_server} on the global reactor (once per process); returns a
    L{ServerView} or an error message."""
    from twisted.internet import reactor
    from twisted.internet.defer import Deferred

    try:
        secret = read_secret(cluster)
    except ConfigError as e:
        return e.problems[0]
    result: list = []

    def start():
        d = Deferred.fromCoroutine(ask_server(reactor, cluster, source, subpath, secret, timeout))
        d.addTimeout(timeout, reactor)
        d.addBoth(result.append)
        d.addBoth(lambda _: reactor.stop())

    reactor.callWhenRunning(start)
    reactor.run(installSignalHandlers=False)
    outcome = result[0] if result else "no answer"
    if hasattr(outcome, "getErrorMessage"):
        return outcome.getErrorMessage() or outcome.type.__name__
    return outcome


def report_server(view, found: set, out: TextIO, err: TextIO, source: Source) -> int:
    """Print what the server said; returns how many files no store read here has."""
    if isinstance(view, str):
        print(f"restore: could not ask {source.host}'s server which files no store holds "
              f"({view}); going on without it", file=err)
        return 0
    if view.safemode:
        print(f"restore: {source.host}'s server is in safemode (stores still reporting): "
              f"it cannot yet say which files no store holds", file=err)
        return 0
    absent = [p for p in view.missing if p not in found]
    older = len(view.missing) - len(absent)
    more = "" if view.complete else " (at least)"
    if not view.missing:
        print(f"server {source.host}: every file of {source.id} has a copy in a live store",
              file=out)
        return 0
    print(f"server {source.host}: {len(view.missing)}{more} files of {source.id} have no "
          f"current copy in a live store; {older} of them are restored at an older version"
          f"{', the others are in no store read here:' if absent else ''}", file=out)
    for p in absent[:SHOW_MISSING]:
        print(f"  not restored: {show(p)}", file=out)
    if len(absent) > SHOW_MISSING:
        print(f"  ... and {len(absent) - SHOW_MISSING} more", file=out)
    return len(absent)


# --- the command -----------------------------------------------------------


def _select_stores(cluster: Cluster, names: Optional[list]) -> list[Store]:
    if not names:
        return list(cluster.stores)
    chosen = []
    for text in names:
        try:
            host, path = parse_location(text)
        except ValueError as e:
            raise RestoreError(f"--store {text}: {e}")
        match = [s for s in cluster.stores if (s.host, s.path) == (host, path)]
        if not match:
            known = ", ".join(s.id for s in cluster.stores) or "none"
            raise RestoreError(f"--store {text} is not a store of {cluster.filename} "
                               f"(stores: {known})")
        if match[0] not in chosen:
            chosen.append(match[0])
    return chosen


def _source(cluster: Cluster, text: str, err: TextIO) -> tuple[Source, bool]:
    try:
        host, path = parse_location(text)
    except ValueError as e:
        raise RestoreError(f"--source {text}: {e}")
    try:
        return cluster.source(f"{host}:{path}"), True
    except KeyError:
        print(f"restore: warning: {host}:{path} is not a source of {cluster.filename}; "
              f"reading the stores anyway", file=err)
        return Source(host, path), False


def _real(path: str) -> bytes:
    return os.path.realpath(os.fsencode(path))


def cmd_restore(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    try:
        cluster = load(args.config)
    except ConfigError as e:
        for problem in e.problems:
            print(problem, file=err)
        return EXIT_BAD_ARGS
    try:
        return _restore(cluster, args, out, err)
    except ConfigError as e:
        for problem in e.problems:
            print(problem, file=err)
        return EXIT_BAD_ARGS
    except RestoreError as e:
        print(f"restore: {e}", file=err)
        return EXIT_BAD_ARGS


def _restore(cluster: Cluster, args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    subpath = check_subpath(args.path)
    source, configured = _source(cluster, args.source, err)
    stores = _select_stores(cluster, args.store)
    if not stores:
        raise RestoreError(f"{cluster.filename} names no store to restore from")
    host = identify_or_none(cluster, args.host)
    if host is None and not args.local:
        print("restore: this machine is no host of the config: every store is read over "
              "ssh (use --host NAME, or --local if the stores' folders are here)", file=err)
    to = os.path.abspath(os.fsencode(args.to))
    locs = locations(cluster, source, stores, host, args.local)
    here = [_real(loc.store.path) for loc in locs if loc.target is None]
    source_here = _real(source.path) if (args.local or source.host == host) else None
    marker = marker_text(source, subpath)
    resuming = check_destination(to, force=args.force, marker=marker, stores=here,
                                 source_here=source_here)

    listings = []
    read = []
    for loc in locs:
        try:
            listing = loc.listing(subpath)
        except ReadError as e:
            print(f"restore: warning: {e}", file=err)
            continue
        print(f"store {loc.id}: {len(listing)} files of {source.id}"
              f"{'' if loc.target is None else ' (over ssh)'}", file=out)
        listings.append((loc.id, listing))
        read.append(loc)
    if not listings:
        print("restore: no store could be read; nothing restored", file=err)
        return EXIT_INCOMPLETE
    # The versions the source replaced, kept for keep deleted (rule 7):
    # the newest version of a file may be one of them (its current copies
    # lost), and with --at an older one is wanted.
    kept = [k for loc in read for k in kept_locations(loc, source)]
    kept_files = 0
    for loc in kept:
        try:
            listing = loc.listing(subpath)
        except ReadError as e:
            print(f"restore: warning: {e}", file=err)
            continue
        kept_files += len(listing)
        listings.append((loc.id, listing))
    if kept:
        print(f"kept versions: {kept_files} of {source.id} in {len(kept)} folders", file=out)
    locs = locs + kept
    at = args.at
    the_plan = plan(listings, subpath, at)
    for path in the_plan.skipped:
        print(f"restore: warning: skipped {show(path)}: named like an rsync temp file "
              f"left by an interrupted transfer (copy it by hand if it is real)", file=err)
    if any(e.path == STATE or e.path.startswith(STATE + b"/") for e in the_plan.entries()):
        raise RestoreError(f"the source has its own {STATE.decode()} folder, which the restore "
                           f"uses for its state; restore with --path into another folder")
    for store in here:  # a store below --to: nothing may be restored into it
        for e in the_plan.entries():
            if _inside(os.path.join(to, e.path), store):
                raise RestoreError(f"restoring {show(e.path)} into {os.fsdecode(to)} would "
                                   f"write inside the store {os.fsdecode(store)}")
    what = f"{source.id}" + (f" (path {show(subpath)})" if subpath else "")
    if at is not None:
        what += " as of " + time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(at))
    already = present(to, the_plan.entries())
    print(f"{'would restore' if args.dry_run else 'restoring'} {the_plan.files} files "
          f"({human_size(the_plan.bytes)}) of {what} into {os.fsdecode(to)}; "
          f"{len(already)} already there with the same size and mtime; "
          f"{the_plan.differing} differed between stores (newest taken)", file=out)
    for sid, entries in the_plan.chosen.items():
        print(f"  from {sid}: {len(entries)} files ({human_size(sum(e.size for e in entries))})",
              file=out)
    if args.dry_run:
        for sid, entries in the_plan.chosen.items():
            for e in entries:
                state = "present" if e.path in already else "copy"
                print(f"{state}\t{sid}\t{show(e.path)}", file=out)
    unknown = 0
    if configured and not args.no_server:
        view = query_server(cluster, source, subpath)
        unknown = report_server(view, {e.path for e in the_plan.entries()}, out, err, source)
    if args.dry_run:
        return EXIT_OK
    if not the_plan.files:
        print(f"restore: no store read holds any file of {what}", file=err)
        return EXIT_INCOMPLETE

    state = os.path.join(to, STATE)
    os.makedirs(to, exist_ok=True)
    for folder in (state, os.path.join(state, b"partial"), os.path.join(state, b"tmp")):
        os.makedirs(folder, mode=0o700, exist_ok=True)
    with open(os.path.join(state, MARKER), "wb") as f:
        f.write(marker)
    if resuming:
        print("resuming an interrupted restore", file=out)
    by_id = {loc.id: loc for loc in locs}
    out.flush()
    pending, good = the_plan, []
    for attempt in range(RETRIES + 1):
        try:
            problems = copy(pending, by_id, to, already, err)
        except KeyboardInterrupt:
            print("restore: interrupted; run the same command again to finish", file=err)
            return EXIT_INCOMPLETE
        for line in problems:
            print(f"restore: {line}", file=err)
        records = [FileRecord(e.path, e.size, e.mtime) for e in pending.entries()]
        done, bad = transfer.verify(os.fsdecode(to), records)
        good += done
        if not bad or attempt == RETRIES:
            break
        # A live cluster moves copies around (a store may drop a surplus
        # copy while we read it): look for the missing files again.
        print(f"restore: {len(bad)} files changed in their store while being copied; "
              "looking for them again", file=err)
        wanted = set(bad)
        relisted = []
        for loc in locs:
            try:
                listing = loc.listing(subpath)
            except ReadError:
                continue
            relisted.append((loc.id, {p: e for p, e in listing.items() if p in wanted}))
        pending, already = plan(relisted, subpath, at), set()
        if not pending.files:
            break
    if bad:
        print(f"restore: {len(bad)} files could not be restored; run again to retry "
              f"(state kept in {os.fsdecode(state)}):", file=err)
        for p in bad[:SHOW_MISSING]:
            print(f"  {show(p)}", file=err)
        if len(bad) > SHOW_MISSING:
            print(f"  ... and {len(bad) - SHOW_MISSING} more", file=err)
        return EXIT_INCOMPLETE
    shutil.rmtree(state)
    print(f"restored {len(good)} files ({human_size(sum(r.size for r in good))}) of {what} into "
          f"{os.fsdecode(to)}" + (f"; {unknown} files of the source are in no store read"
                                  if unknown else ""), file=out)
    return EXIT_OK


def parse_at(text: str) -> float:
    """C{--at}: an ISO date and time (local time when no zone is given), or C{@SECONDS}."""
    try:
        if text.startswith("@"):
            return float(text[1:])
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected YYYY-MM-DD[THH:MM[:SS]] or @SECONDS, got {text!r}") from None


def register(sub) -> None:
    """Add C{cbackup restore} to the command's subparsers."""
    p = sub.add_parser(
        "restore", help="put a source (or a folder of it) back from the stores",
        description="Put a source (or a folder of it) back from the stores that hold its "
                    "files: the newest version of each file wins; DIR/RELPATH as in the source.")
    p.add_argument("-c", "--config", required=True, help="the cluster config file")
    p.add_argument("--source", required=True, metavar="HOST:/PATH",
                   help="the source to restore, as in the config")
    p.add_argument("--to", required=True, metavar="DIR",
                   help="restore into this folder (DIR/RELPATH, as in the source)")
    p.add_argument("--path", metavar="SUBPATH",
                   help="only this file or folder, relative to the source's root")
    p.add_argument("--store", action="append", metavar="HOST:/PATH",
                   help="read only this store (repeatable; default: every store)")
    p.add_argument("--host", help="act as this host of the config")
    p.add_argument("--local", action="store_true",
                   help="every store's folder is reachable here by its path (no ssh)")
    p.add_argument("--force", action="store_true",
                   help="restore into a non-empty folder, or into the source itself")
    p.add_argument("--dry-run", action="store_true",
                   help="print what would be copied from where; write nothing")
    p.add_argument("--no-server", action="store_true",
                   help="do not ask the source's server which files no store holds")
    p.add_argument("--at", type=parse_at, metavar="TIME",
                   help="restore each file as it was at TIME (the newest version written "
                        "by then, from the layout or the kept versions): YYYY-MM-DD[THH:MM[:SS]] "
                        "in local time, or @SECONDS since the epoch")
    p.set_defaults(func=cmd_restore)
