"""
rsync as a process: fetch one claimed batch of one source with one run.

A client agent calls L{fetch} with the paths it claimed; one C{rsync} child
copies them into the store and the returned L{Deferred} fires with a
L{TransferResult}.  What rsync I{says} it transferred (C{transferred}) is
advice; what counts as a copy (DESIGN.md rule 3) is decided afterwards by
L{verify}, which compares each file on disk with the version the claim
carried.

Facts about rsync 3.5 this module relies on, each checked by hand and by
C{tests/test_transfer.py}:

  - Name output.  Every name rsync prints goes through C{filtered_fwrite}
    (log.c): control bytes (< 0x20, except TAB) become C{\\#ooo} (3 octal
    digits), and so does a backslash that is followed by C{#} and 3 decimal
    digits, so the escaping is reversible (L{unescape}).  Without C{-8}
    rsync also runs the line through iconv in 1,024-byte chunks and checks
    for a literal C{\\#ddd} chunk by chunk: a backslash at offset ~1,021 of
    a long line is then I{not} escaped and the output is ambiguous.  With
    C{-8} the line is filtered in one piece (high bytes pass raw), which is
    unambiguous at any length, so we always pass C{-8}.
  - C{--files-from} drops entries starting with C{#} or C{;} as comments
    (even with C{--from0}); such paths are sent as C{./#name}.
  - A path missing when rsync builds its file list exits 23 ("link_stat
    failed"); a path that disappears between the file list and its transfer
    exits 24 ("file has vanished").
  - A source file rewritten I{during} the transfer arrives with the bytes
    rsync read (possibly new or mixed) but with the mtime of the file list;
    rsync's whole-file checksum covers the bytes the sender sent, so it does
    not notice.  A size change between file list and transfer arrives with
    the new size and the old mtime.  See L{verify} for what that means.
"""

from __future__ import annotations

import errno
import os
import re
import signal
import stat
import time
from typing import Callable, Iterable, Optional

from attrs import define, field, frozen
from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ProcessExitedAlready
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.procutils import which

from cluster_backup.records import FileRecord, relpath_problem

log = Logger()

#: rsync's exit values (C{man rsync}, EXIT VALUES) and what they mean for a
#: batch.  "partial": some files may have arrived, check them one by one;
#: "failed": the run as a whole went wrong (files that did arrive are still
#: found by L{verify}).  A code not listed here is "failed".
EXIT_CODES: dict[int, tuple[str, str]] = {
    0: ("ok", "success"),
    1: ("failed", "syntax or usage error"),
    2: ("failed", "protocol incompatibility"),
    3: ("failed", "errors selecting input/output files, directories"),
    4: ("failed", "requested action not supported"),
    5: ("failed", "error starting client-server protocol (e.g. auth failed)"),
    6: ("failed", "daemon unable to append to log-file"),
    10: ("failed", "error in socket I/O (e.g. connection refused)"),
    11: ("failed", "error in file I/O"),
    12: ("failed", "error in rsync protocol data stream"),
    13: ("failed", "errors with program diagnostics"),
    14: ("failed", "error in IPC code"),
    15: ("failed", "sibling process crashed"),
    16: ("failed", "sibling process was killed by a signal"),
    19: ("failed", "received SIGUSR1"),
    20: ("failed", "received SIGINT, SIGTERM or SIGHUP"),
    21: ("failed", "some error returned by waitpid()"),
    22: ("failed", "error allocating core memory buffers"),
    23: ("partial", "partial transfer due to error"),
    24: ("partial", "partial transfer due to vanished source files"),
    25: ("failed", "the --max-delete limit stopped deletions"),
    30: ("failed", "timeout in data send/receive"),
    35: ("failed", "timeout waiting for daemon connection"),
}

#: What each transferred file prints on stdout.  C{%b} (bytes sent) makes
#: rsync log I{after} the file's data went through, not before; C{%i} tells
#: files from directories; C{%l} is the file's length.
OUT_FORMAT = "%i %l %b %n"

_LINE_RE = re.compile(rb"([<>ch.*])([fdLDS])(.{9}) (\d+) (\d+) (.*)\Z", re.DOTALL)
_ESCAPE_RE = re.compile(rb"\\#([0-7]{3})")
_NEEDS_ESCAPE_RE = re.compile(rb"[\x00-\x08\x0a-\x1f]|\\(?=#[0-9]{3})")
_VERIFY_FAILED_RE = re.compile(rb"ERROR: (.*) failed verification -- update ")


def classify_exit(code: int) -> str:
    """
    Map an rsync exit status to C{"ok"}, C{"partial"} or C{"failed"}.

    C{code} is the process's exit code, or minus the signal number when a
    signal killed it (as L{subprocess} does); a killed rsync is "failed".
    The codes and their meaning are in L{EXIT_CODES}.
    """
    if code < 0:
        return "failed"
    return EXIT_CODES.get(code, ("failed", "unknown"))[0]


def escape(name: bytes) -> bytes:
    """
    Escape C{name} as rsync 3.5 prints it with C{-8} (log.c
    C{filtered_fwrite}); the inverse of L{unescape}, used by tests.
    """
    return _NEEDS_ESCAPE_RE.sub(lambda m: b"\\#%03o" % m.group()[0], name)


def unescape(text: bytes) -> bytes:
    """
    Decode rsync's C{\\#ooo} escapes in a name it printed.

    A backslash not followed by C{#} and three octal digits is literal:
    rsync escapes a literal backslash exactly when it precedes C{#ddd}.
    """

    def one(m: re.Match) -> bytes:
        value = int(m.group(1), 8)
        return bytes([value]) if value < 256 else m.group()

    return _ESCAPE_RE.sub(one, text)


@frozen
class Item:
    """One line of rsync's C{OUT_FORMAT} output."""

    change: str  # %i update type: > received, c created, h hard link, . attrs
    kind: str  # %i file type: f file, d directory, L symlink, D device, S special
    path: bytes  # decoded, without a directory's trailing slash
    length: int
    sent: int


def parse_line(line: bytes) -> Optional[Item]:
    """Parse one stdout line (newline stripped or not); C{None} if foreign."""
    line = line.rstrip(b"\n")
    m = _LINE_RE.match(line)
    if m is None:
        return None
    path = unescape(m.group(6))
    if m.group(2) == b"d":
        path = path.rstrip(b"/")
    return Item(
        m.group(1).decode("ascii"),
        m.group(2).decode("ascii"),
        path,
        int(m.group(4)),
        int(m.group(5)),
    )


def _transferred_items(lines: Iterable[bytes]) -> dict[bytes, Item]:
    items: dict[bytes, Item] = {}
    for line in lines:
        item = parse_line(line)
        if item is not None and item.kind != "d" and item.change in "<>ch":
            items[item.path] = item
    return items


def parse_output(lines: Iterable[bytes]) -> set[bytes]:
    """
    The relative paths rsync says it transferred or created (files,
    symlinks, devices; not directories, not attribute-only updates), from
    its stdout lines in L{OUT_FORMAT}.  Lines of any other shape (a daemon's
    message, say) are ignored.
    """
    return set(_transferred_items(lines))


def failed_verification(stderr_lines: Iterable[bytes]) -> set[bytes]:
    """
    Paths rsync gave up on after its checksum failed twice.  rsync logs such
    a file on stdout too (logging happens before the check), so these are
    subtracted from what L{parse_output} found.
    """
    failed = set()
    for line in stderr_lines:
        m = _VERIFY_FAILED_RE.match(line.rstrip(b"\n"))
        if m:
            failed.add(unescape(m.group(1)))
    return failed


#: Earlier versions wrote each run's C{--files-from} list to
#: C{<state_dir>/files-from-<random>.lst} (L{cluster_backup.store.Store.clean_partials}
#: still removes leftovers); it now goes to rsync's stdin.
LIST_PREFIX = "files-from-"


#: What rsync prints when the destination's filesystem is full (errno 28).
_NO_SPACE = ("No space left on device", "(28)")


def out_of_space(errors: Iterable[str]) -> bool:
    """
    Whether rsync's stderr lines say the destination filesystem filled up
    (C{write failed on ...: No space left on device (28)}, exit 11 or 23).
    """
    return any(_NO_SPACE[0] in line or line.rstrip().endswith(_NO_SPACE[1])
               for line in errors)


def build_argv(
    rsync: str,
    *,
    source_url: str,
    dest_dir: str,
    files_from: str,
    partial_dir: str,
    bwlimit: Optional[int],
    timeout: int,
    local: bool,
    temp_dir: Optional[str] = None,
    dry_run: bool = False,
    inplace: bool = False,
) -> list[str]:
    """
    The argv of one batch fetch (no password: that travels in the
    environment as C{RSYNC_PASSWORD}).

    With C{inplace}, rsync rewrites the files already in C{dest_dir} in
    place, with them as the basis of its delta transfer (C{--inplace}, which
    takes no C{--partial-dir}): a store's update folder, where a kept old
    version is turned into the new one using no more room than the larger
    of the two (DESIGN.md rule 7).  An interrupted run leaves a mixed file
    there, which is never counted and is removed at the next start.

    With C{dry_run} nothing is written: rsync's quick check (size and
    mtime, no C{--ignore-times}) lists the paths whose copy in C{dest_dir}
    differs from the source I{now}; see L{changed_since}.

    C{source_url} is C{rsync://user@host:port/module/} (daemon) or, with
    C{local}, an absolute directory.  C{files_from} is an absolute path, or
    C{-} for rsync's stdin.  C{bwlimit} is in bytes per second
    (rsync takes KiB/s: rounded up, at least 1); C{None} means no limit.
    C{partial_dir} and C{temp_dir} must be absolute; see the module
    docstring and the report in C{tests/test_transfer.py} for why each
    option is there.
    """
    if local:
        if not os.path.isabs(source_url):
            raise ValueError(f"local source {source_url!r} is not an absolute path")
    elif not source_url.startswith("rsync://"):
        raise ValueError(f"source {source_url!r} is not an rsync:// URL")
    for name, value in (("dest_dir", dest_dir), ("files_from", files_from if files_from != "-"
                                                 else None),
                        ("partial_dir", partial_dir), ("temp_dir", temp_dir)):
        if value is not None and not os.path.isabs(value):
            raise ValueError(f"{name} {value!r} is not an absolute path")
    if timeout <= 0:
        raise ValueError(f"timeout {timeout!r} must be positive")
    argv = [
        rsync,
        "-a",  # -rlptgoD; -r has no effect with --files-from (not implied)
        "--numeric-ids",  # keep uid/gid numbers: a restore is a plain copy
        "-8",  # unambiguous name escaping (see module docstring)
        "-s",  # --secluded-args: names never pass through a remote shell
        # never trust a same size+mtime leftover in dest (a dry run is
        # exactly that quick check)
        "--dry-run" if dry_run else "--ignore-times",
        "--mkpath",  # create <store>/<host>/<path> if missing
        "--from0",
        f"--files-from={files_from}",
        "--inplace" if inplace else f"--partial-dir={partial_dir}",
        f"--timeout={timeout}",
        f"--out-format={OUT_FORMAT}",
    ]
    if inplace and local:
        argv.append("--no-whole-file")  # a local copy is whole by default
    if temp_dir is not None:
        argv.append(f"--temp-dir={temp_dir}")
    if bwlimit is not None:
        if bwlimit <= 0:
            raise ValueError(f"bwlimit {bwlimit!r} must be positive (None: no limit)")
        argv.append(f"--bwlimit={max(1, -(-bwlimit // 1024))}")
    if not local:
        # TCP_NODELAY: the daemon handshake (greeting, auth, arguments) is a
        # few small writes each waiting for an answer; with Nagle's algorithm
        # and delayed ACKs each of them can stall 40 ms, about 0.1 s per run
        # (a third of a check of 1,000 files).  Bulk data goes in large
        # writes either way.
        argv += ["--no-motd", f"--contimeout={timeout}", "--sockopts=TCP_NODELAY"]
    argv += ["--", source_url.rstrip("/") + "/", dest_dir.rstrip("/") + "/"]
    return argv


def files_from_bytes(paths: Iterable[bytes]) -> bytes:
    """
    The NUL-terminated C{--files-from} list for C{paths}, sorted (rsync
    then visits each directory once).  Raises L{ValueError} for a path
    L{relpath_problem} rejects.  A path starting with C{#} or C{;} gets a
    C{./} prefix, else rsync would skip it as a comment.
    """
    out = []
    for path in sorted(set(paths)):
        problem = relpath_problem(path)
        if problem is not None:
            raise ValueError(f"bad path {path!r}: {problem}")
        out.append((b"./" + path if path[:1] in (b"#", b";") else path) + b"\0")
    return b"".join(out)


@frozen
class TransferResult:
    """
    How one rsync run ended.

    C{exit_code} is rsync's exit code (minus the signal number if a signal
    killed it, C{None} if it never started); C{status} is L{classify_exit}'s
    word or C{"cancelled"}; C{transferred} the paths rsync reported, minus
    those it gave up on; C{errors} its stderr lines; C{seconds} how long it
    ran; C{bytes} the total length of the transferred files and
    C{wire_bytes} what rsync counted as sent for them; C{started} the
    reactor time it was started (see L{verify}'s C{unsettled_from}).
    """

    exit_code: Optional[int]
    status: str
    transferred: frozenset = field(converter=frozenset)
    errors: tuple = field(converter=tuple)
    seconds: float
    bytes: int
    wire_bytes: int = 0
    started: float = 0.0


#: Worst last: how two runs of one batch end together (L{combined}).
_STATUS_ORDER = ("ok", "partial", "failed", "cancelled")


def combined(a: TransferResult, b: TransferResult) -> TransferResult:
    """Two runs of one batch (say, a fetch and an in-place update) as one result."""
    worst = max(a, b, key=lambda r: _STATUS_ORDER.index(r.status)
                if r.status in _STATUS_ORDER else len(_STATUS_ORDER))
    return TransferResult(
        worst.exit_code, worst.status, a.transferred | b.transferred, a.errors + b.errors,
        a.seconds + b.seconds, a.bytes + b.bytes, a.wire_bytes + b.wire_bytes,
        min(a.started, b.started))


class _RsyncProcessProtocol(ProcessProtocol):
    """Splits rsync's output into lines for its L{RsyncTransfer}."""

    def __init__(self, owner: "RsyncTransfer") -> None:
        self._owner = owner
        self._buffers = {1: b"", 2: b""}

    def connectionMade(self) -> None:
        # The --files-from list: written as the pipe takes it, then EOF
        # (closing waits for what is still buffered).
        self.transport.write(self._owner.listing)
        self.transport.closeStdin()

    def childDataReceived(self, fd: int, data: bytes) -> None:
        if fd not in self._buffers:
            return
        *lines, self._buffers[fd] = (self._buffers[fd] + data).split(b"\n")
        for line in lines:
            self._owner._line(fd, line)

    def processEnded(self, reason: Failure) -> None:
        for fd, rest in self._buffers.items():
            if rest:
                self._owner._line(fd, rest)
        self._buffers = {1: b"", 2: b""}
        self._owner._ended(reason)


@define
class RsyncTransfer:
    """
    One batch fetch: C{start()} spawns rsync and returns a L{Deferred} that
    fires with a L{TransferResult} (never errbacks once started); C{cancel()}
    sends TERM, then KILL after C{kill_after} seconds, and the result's
    status is then C{"cancelled"}.  The C{--files-from} list goes to rsync's
    stdin: no file is written for it, so a run adds nothing to the store
    beyond what it fetches (quota, DESIGN.md rule 1), and cannot fail for
    want of room for its list.
    """

    reactor: object
    source_url: str
    password: Optional[str]
    dest_dir: str
    paths: list
    partial_dir: str
    bwlimit: Optional[int] = None
    timeout: int = 600
    kill_after: float = 10.0
    rsync: Optional[str] = None
    temp_dir: Optional[str] = None
    dry_run: bool = False
    inplace: bool = False
    _deferred: Optional[Deferred] = field(init=False, default=None)
    _transport: object = field(init=False, default=None)
    listing: bytes = field(init=False, default=b"")
    _out: list = field(init=False, factory=list)
    _err: list = field(init=False, factory=list)
    _started: float = field(init=False, default=0.0)
    _cancelled: bool = field(init=False, default=False)
    _killer: object = field(init=False, default=None)
    _done: bool = field(init=False, default=False)

    def start(self) -> Deferred:
        self.listing = files_from_bytes(self.paths)
        if not self.listing:
            self._done = True
            return succeed(TransferResult(0, "ok", (), (), 0.0, 0))
        rsync = self.rsync or _find_rsync()
        local = not self.source_url.startswith("rsync://")
        os.makedirs(self.partial_dir, mode=0o700, exist_ok=True)
        if self.temp_dir is not None:
            os.makedirs(self.temp_dir, mode=0o700, exist_ok=True)
        argv = build_argv(
            rsync,
            source_url=self.source_url,
            dest_dir=self.dest_dir,
            files_from="-",
            partial_dir=self.partial_dir,
            bwlimit=self.bwlimit,
            timeout=self.timeout,
            local=local,
            temp_dir=self.temp_dir,
            dry_run=self.dry_run,
            inplace=self.inplace,
        )
        env = {"PATH": os.environ.get("PATH", os.defpath), "LANG": "C"}
        if self.password is not None:
            env["RSYNC_PASSWORD"] = self.password
        self._deferred = Deferred()
        self._started = self.reactor.seconds()
        self._transport = self.reactor.spawnProcess(
            _RsyncProcessProtocol(self), rsync, argv, env=env, path=None
        )
        log.info("rsync {kind} of {count} paths from {source} started (pid {pid})",
                 kind=self.kind, count=len(self.paths), source=self.source_url,
                 pid=self._transport.pid, argv=argv)
        return self._deferred

    @property
    def kind(self) -> str:
        """C{"fetch"}, or C{"check"} for a dry run (L{changed_since})."""
        return "check" if self.dry_run else "fetch"

    def cancel(self) -> None:
        """Stop the transfer: TERM now, KILL if still running later."""
        if self._done or self._cancelled or self._transport is None:
            return
        self._cancelled = True
        self._signal("TERM")
        self._killer = self.reactor.callLater(self.kill_after, self._signal, "KILL")

    def _signal(self, name: str) -> None:
        try:
            self._transport.signalProcess(name)
        except ProcessExitedAlready:
            pass

    def _line(self, fd: int, line: bytes) -> None:
        if fd == 1:
            self._out.append(line)
        else:
            self._err.append(line)
            log.warn("rsync {source}: {line}", source=self.source_url,
                     line=line.decode("utf-8", "backslashreplace"))

    def _ended(self, reason: Failure) -> None:
        self._done = True
        if self._killer is not None and self._killer.active():
            self._killer.cancel()
        code = getattr(reason.value, "exitCode", None)
        sig = getattr(reason.value, "signal", None)
        if code is None and sig is not None:
            code = -sig
        if self._cancelled:
            status = "cancelled"
        elif code is None:
            status = "failed"
        else:
            status = classify_exit(code)
        items = _transferred_items(self._out)
        for path in failed_verification(self._err):
            items.pop(path, None)
        result = TransferResult(
            exit_code=code,
            status=status,
            transferred=items.keys(),
            errors=[e.decode("utf-8", "backslashreplace") for e in self._err],
            seconds=self.reactor.seconds() - self._started,
            bytes=sum(i.length for i in items.values()),
            wire_bytes=sum(i.sent for i in items.values()),
            started=self._started,
        )
        log.info(
            "rsync {kind} from {source}: {status} (exit {code}), {count} files, {bytes} B "
            "in {seconds:.3f}s", kind=self.kind, source=self.source_url, status=status, code=code,
            count=len(items), bytes=result.bytes, seconds=result.seconds,
        )
        self._deferred.callback(result)


def fetch(reactor, **kwargs) -> tuple[Deferred, Callable[[], None]]:
    """
    Start L{RsyncTransfer}C{(reactor, **kwargs)}; return its result's
    L{Deferred} and its C{cancel}.  Keywords: C{source_url}, C{password},
    C{dest_dir}, C{paths} (relative bytes), C{partial_dir},
    C{bwlimit=None} (bytes/s), C{timeout=600}, C{kill_after=10.0},
    C{rsync=None}, C{temp_dir=None}, C{dry_run=False}, C{inplace=False}.
    """
    transfer = RsyncTransfer(reactor, **kwargs)
    return transfer.start(), transfer.cancel


def changed_since(reactor, **kwargs) -> tuple[Deferred, Callable[[], None]]:
    """
    After a fetch, which of its C{paths} no longer match the source: the
    same run as L{fetch} (same keywords, no C{bwlimit} needed) as a dry run
    without C{--ignore-times}, so rsync lists exactly the paths whose source
    size or mtime differs from the copy now in C{dest_dir}
    (C{TransferResult.transferred}).  A source file rewritten while rsync
    read it arrives with mixed bytes and the I{old} mtime (module
    docstring); once rsync is done reading, the source's mtime has moved
    on, so this check catches it.  Paths gone from the source are not
    listed (exit 23/24): their copies are whole old versions (orphans).
    """
    kwargs["dry_run"] = True
    return fetch(reactor, **kwargs)


def stray_processes(marker: str) -> list[int]:
    """
    Processes of this user whose argv holds C{marker} exactly (an agent
    passes C{--partial-dir=<its store>}): rsyncs left running by a client
    that was killed (C{kill -9} leaves its children running).  Linux
    C{/proc}; elsewhere none are found.
    """
    wanted = os.fsencode(marker)
    found = []
    try:
        names = os.listdir("/proc")
    except OSError:
        return found
    me, uid = os.getpid(), os.getuid()
    for name in names:
        if not name.isdigit() or int(name) == me:
            continue
        try:
            if os.stat(f"/proc/{name}").st_uid != uid:
                continue
            with open(f"/proc/{name}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if wanted in argv:
            found.append(int(name))
    return found


def kill_strays(marker: str, wait: float = 5.0) -> int:
    """
    SIGKILL every L{stray_processes}C{(marker)} and wait (blocking, at
    most C{wait} seconds) until none is left; returns how many were killed.
    Run before taking an inventory, so no stray rsync still writes into the
    store while it is counted and cleaned.
    """
    pids = stray_processes(marker)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + wait
    while pids and stray_processes(marker) and time.monotonic() < deadline:
        time.sleep(0.05)
    return len(pids)


def no_space_error(e: BaseException) -> bool:
    """Whether C{e} is an C{OSError} for a full filesystem (ENOSPC, EDQUOT)."""
    return isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)


def _find_rsync() -> str:
    found = which("rsync")
    if not found:
        raise FileNotFoundError("rsync not found on PATH")
    return found[0]


def verify(
    dest_dir: str,
    expected: Iterable[FileRecord],
    *,
    unsettled_from: Optional[int] = None,
) -> tuple[list[FileRecord], list[bytes]]:
    """
    Split C{expected} into the records whose copy under C{dest_dir} is
    complete and current, and the paths of the others.

    A copy counts only if C{lstat} finds a non-directory (a symlink is not
    followed) with exactly the expected size and whole-second mtime.

    Why this is enough, and where it is not: rsync gives a file the mtime
    of its file list, taken when the run began.  A source changed I{before}
    that arrives with its new size/mtime and fails here.  One changed
    I{during} the transfer can arrive with the old mtime and new bytes
    (rsync does not notice); but its source mtime has moved on, so the
    version we report is no longer the source's current one and the server
    counts it stale (rule 3), and the next fetch re-sends it
    (C{--ignore-times}).  The gap is a rewrite within the same second as
    the expected mtime: pass C{unsettled_from} (the run's start, less any
    clock skew allowance) and records with C{mtime >= unsettled_from} are
    treated as bad.
    """
    root = os.fsencode(dest_dir)
    complete: list[FileRecord] = []
    bad: list[bytes] = []
    for record in expected:
        try:
            st = os.lstat(os.path.join(root, record.path))
        except OSError:
            bad.append(record.path)
            continue
        if (
            not stat.S_ISDIR(st.st_mode)
            and st.st_size == record.size
            and st.st_mtime_ns // 1_000_000_000 == record.mtime
            and (unsettled_from is None or record.mtime < unsettled_from)
        ):
            complete.append(record)
        else:
            bad.append(record.path)
    return complete, bad
