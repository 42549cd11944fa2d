"""
The server's rsync daemon: one read-only, authenticated module per source.

Clients fetch files with a stock C{rsync} client from a C{rsync --daemon}
child that L{RsyncDaemon} owns, configures and restarts.  The configuration
is rendered by the pure L{render_config}; it is the security boundary of the
data path, so every value is validated before it is written and the settings
are chosen so that nothing outside a source's root can be read:

  - C{use chroot = yes} when the daemon runs as root: each connection is
    jailed in the module's path, so an absolute or C{..} symlink names a path
    inside the jail and cannot reach the outside, whatever a client asks.
  - Without root (C{use chroot = no}) rsync itself confines each module: it
    sanitizes C{..} and leading C{/} in every path a client sends, and (rsync
    3.5's secure resolver, on unless C{insecure links} is set, which we never
    do) refuses to follow a symlink out of the module while it walks a path.
  - Either way the options that make the sending daemon follow symlinks
    (C{--copy-links}, C{--copy-unsafe-links}, C{--copy-dirlinks}) or read
    device contents (C{--copy-devices}) are refused outright, as are the
    options that delete on the daemon, though C{read only} blocks those too.
  - C{munge symlinks = no}: munging only guards uploads, which a read-only
    module never takes, and on the way out it would strip a
    C{/rsyncd-munged/} prefix from a source's own link, so a backup would
    not hold the link unmangled.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
from typing import Iterable, Mapping, Optional

from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ProcessExitedAlready
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger, LogLevel
from twisted.python.procutils import which

log = Logger()

#: Options the daemon refuses; see the module docstring for why.
REFUSED_OPTIONS = (
    "copy-links",
    "copy-unsafe-links",
    "copy-dirlinks",
    "copy-devices",
    "delete",
    "remove-source-files",
)

_MODULE_RE = re.compile(r"[A-Za-z0-9_]{1,80}\Z")
_USER_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,31}\Z")
_ADDRESS_RE = re.compile(r"[A-Za-z0-9.:%_-]{1,255}\Z")
_VAR_RE = re.compile(r"%[A-Za-z0-9_]+%")
_SLUG_MAX = 40


def module_name(source_path: str) -> str:
    """
    A stable rsync module name for the source directory C{source_path}.

    Readable (the path's letters and digits, C{_} for everything else, at
    most the last 40 characters) and unique (a 64-bit SHA-256 prefix of the
    exact path bytes follows), so two different paths get two different
    names and the same path gets the same name in every process and release.
    """
    try:
        raw = os.fsencode(source_path)
    except UnicodeEncodeError:
        raise ValueError(f"source path {source_path!r}: not a file name") from None
    slug = re.sub(rb"[^A-Za-z0-9]+", b"_", raw).strip(b"_")[-_SLUG_MAX:].lstrip(b"_")
    digest = hashlib.sha256(raw).hexdigest()[:16]
    return f"{slug.decode('ascii')}_{digest}" if slug else digest


def random_password() -> str:
    """A fresh 128-bit password (hex), for a cluster without a secret."""
    return secrets.token_hex(16)


def password_for(secret: Optional[bytes], server_host: str, module: str) -> str:
    """
    The password of C{module} on C{server_host}'s daemon.

    With a cluster secret it is an HMAC of the host and module under the
    secret, so any client holding the secret can derive it, and a password
    seen by one module (or host) opens no other.  Without a secret it is
    L{random_password}: the caller must keep it and hand it out in claims.
    """
    if secret is None:
        return random_password()
    message = b"cluster-backup rsyncd v1\0%s\0%s" % (
        server_host.encode("utf-8"),
        module.encode("utf-8"),
    )
    return hmac.new(secret, message, hashlib.sha256).hexdigest()[:32]


def _checked_path(what: str, path: str) -> str:
    """
    C{path} rendered as an rsyncd.conf value, or C{ValueError} naming
    C{what}: it must be absolute and normalized (so no C{/./}, which rsync
    reads as a chroot divider) with no control character (no newline can
    start a new line), no trailing backslash (a line continuation) and
    nothing like C{%NAME%} (an environment reference).
    """
    if not isinstance(path, str):
        raise ValueError(f"{what} {path!r}: not a str")
    if not path.startswith("/"):
        raise ValueError(f"{what} {path!r}: not an absolute path")
    try:
        os.fsencode(path)
    except UnicodeEncodeError:
        raise ValueError(f"{what} {path!r}: not a file name") from None
    if any(ord(c) < 32 or ord(c) == 127 for c in path):
        raise ValueError(f"{what} {path!r}: contains a control character")
    if path != "/" and (os.path.normpath(path) != path or path.startswith("//")):
        raise ValueError(f"{what} {path!r}: not a normalized path")
    if path.endswith("\\"):
        raise ValueError(f"{what} {path!r}: ends with a backslash")
    # rsync expands %VAR% in string values and (3.5.0, whatever its manual
    # says) has no escape for it: %% stays %%.
    if _VAR_RE.search(path):
        raise ValueError(f"{what} {path!r}: rsync would expand its %NAME%")
    # rsync strips a value's trailing whitespace; a trailing slash keeps it.
    return path + "/" if path[-1].isspace() else path


def secrets_path(state_dir: str, module: str) -> str:
    """Where the secrets file of C{module} lives (one per module)."""
    return os.path.join(state_dir, module + ".secrets")


def render_config(
    state_dir: str,
    address: str,
    port: int,
    modules: Mapping[str, str],
    user: str,
    *,
    chroot: bool,
    uid: Optional[int] = None,
    gid: Optional[int] = None,
    max_connections: int = 16,
    timeout: int = 600,
) -> str:
    """
    The text of an rsyncd.conf serving each C{modules} name -> source path
    read-only to C{user}, listening on C{address}:C{port}.

    Each module has its own secrets file (L{secrets_path}) since each has its
    own password.  C{chroot} must be true only when the daemon runs as root;
    C{uid}/C{gid}, when given, are the ids transfers run as: a root daemon
    passes its own, since the default (C{nobody}) could not read every file.
    C{max_connections} bounds the connections of all
    modules together (they share one lock file); C{timeout} drops a client
    silent that many seconds.  Any unsafe value raises C{ValueError}.
    """
    state = _checked_path("state dir", state_dir)
    if not (isinstance(address, str) and _ADDRESS_RE.match(address)):
        raise ValueError(f"rsync address {address!r}: not an address")
    if not (isinstance(port, int) and 0 < port < 65536):
        raise ValueError(f"rsync port {port!r}: not in 1..65535")
    if not (isinstance(user, str) and _USER_RE.match(user)):
        raise ValueError(f"rsync user {user!r}: not a plain user name")
    if not modules:
        raise ValueError("no rsync module to serve")
    for name, value in (("max connections", max_connections), ("timeout", timeout)):
        if not (isinstance(value, int) and value > 0):
            raise ValueError(f"rsync {name} {value!r}: not a positive integer")
    lines = [
        "# Written by cluster-backup at every start; edits are lost.",
        f"address = {address}",
        f"port = {port}",
        f"pid file = {state}/rsyncd.pid",
        f"lock file = {state}/rsyncd.lock",
        # Its lines go to its stderr, a pipe RsyncDaemon reads, and from
        # there to the server's log (the journal): no file that grows.  It is
        # opened before any chroot, so chrooted connections log there too.
        "log file = /dev/stderr",
        "reverse lookup = no",
        "forward lookup = no",
    ]
    for name, path in sorted(modules.items()):
        if not (isinstance(name, str) and _MODULE_RE.match(name)):
            raise ValueError(f"rsync module name {name!r}: not [A-Za-z0-9_]")
        lines += [
            "",
            f"[{name}]",
            f"    path = {_checked_path('source path', path)}",
            f"    use chroot = {'yes' if chroot else 'no'}",
        ]
        if uid is not None:
            lines.append(f"    uid = {int(uid)}")
        if gid is not None:
            lines.append(f"    gid = {int(gid)}")
        lines += [
            "    munge symlinks = no",
            "    numeric ids = yes",
            "    read only = yes",
            "    list = no",
            f"    auth users = {user}:ro",
            f"    secrets file = {state}/{name}.secrets",
            "    strict modes = yes",
            f"    refuse options = {' '.join(REFUSED_OPTIONS)}",
            f"    max connections = {max_connections}",
            f"    timeout = {timeout}",
        ]
    return "\n".join(lines) + "\n"


#: The prefix of a line rsync writes to its log file: date, time, [pid].
_LOG_PREFIX = re.compile(r"\d{4}/\d\d/\d\d \d\d:\d\d:\d\d \[(\d+)\] ")
#: Lines every connection writes that say nothing the transfer line does not.
_CHATTER = re.compile(r"^(connect from |rsync allowed access |building file list$|"
                      r"name lookup failed)")
_TRANSFER = re.compile(r"^rsync on ")
_TOTALS = re.compile(r"^sent \d+ bytes  received \d+ bytes")

#: The level of a daemon's log line, by its text (rsync 3.x wording): the
#: first that matches, else info.
_LINE_LEVELS = (
    # Every connection writes these: debug, or they would flood the log.
    # First, since they carry a client's words (a path may say "error").
    (LogLevel.debug, re.compile("|".join(
        p.pattern for p in (_CHATTER, _TRANSFER, _TOTALS)))),
    # The daemon cannot serve at all.
    (LogLevel.error, re.compile(
        r"bind\(\) failed|unable to bind|pid file|failed to parse config|"
        r"unknown parameter|socket\(\) failed|chroot|setuid|setgid", re.I)),
    # A client refused, or a transfer that failed: worth an operator's eye.
    (LogLevel.warn, re.compile(
        r"^(auth failed|unknown module|@error|rsync error|rsync: |max connections)|"
        r"refuse|denied|error", re.I)),
)


def daemon_line_level(text: str) -> LogLevel:
    """The log level of the daemon's line C{text} (its prefix removed)."""
    words = re.sub(r'"[^"]*"', '""', text)  # rsync quotes file names: not its words
    for level, pattern in _LINE_LEVELS:
        if pattern.search(words):
            return level
    return LogLevel.info


class DaemonLog:
    """
    Sends the rsync daemon's log lines (C{log file = /dev/stderr}: its
    stderr, read by L{RsyncDaemon}) to the server's log, without rsync's
    date and pid (the pid is the event's C{rsync_pid}), each at its
    L{daemon_line_level}.

    A connection's chatter is not logged: each transfer makes one debug
    line (C{rsync on MODULE/PATH from USER@HOST (ADDRESS)} with its byte
    totals), and a warning or error of that connection names its transfer.
    A line rsync wrote both to stderr and to its log is logged once.
    """

    #: Transfers remembered until their totals line (a killed connection
    #: never writes one): the oldest are forgotten beyond this.
    MAX_OPEN = 256

    def __init__(self, logger: Logger = log) -> None:
        self._log = logger
        self._last_bare: Optional[str] = None
        self._open: dict[int, str] = {}

    def line(self, raw: bytes) -> None:
        text = raw.decode("utf-8", "replace").rstrip("\r")
        pid = None
        prefixed = _LOG_PREFIX.match(text)
        if prefixed:
            pid, text = int(prefixed.group(1)), text[prefixed.end():]
            if text == self._last_bare:  # logged already, as rsync wrote it to stderr
                self._last_bare = None
                return
        else:
            self._last_bare = text
        if not text.strip() or _CHATTER.match(text):
            return
        if pid is not None and _TRANSFER.match(text):
            self._open[pid] = text
            while len(self._open) > self.MAX_OPEN:
                del self._open[next(iter(self._open))]
            return
        transfer = self._open.pop(pid, None) if _TOTALS.match(text) else self._open.get(pid)
        level = daemon_line_level(text)
        if transfer is not None:
            self._log.emit(level, "rsync daemon: {transfer}: {line}", transfer=transfer,
                           line=text, rsync_pid=pid)
        else:
            self._log.emit(level, "rsync daemon: {line}", line=text, rsync_pid=pid)


def _write_private(path: str, data: bytes) -> None:
    """Replace C{path} with C{data}, mode 0600, never through a symlink."""
    tmp = path + ".tmp"
    try:
        os.unlink(tmp)
    except FileNotFoundError:
        pass
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, data)
    finally:
        os.close(fd)
    os.replace(tmp, path)


class _RsyncProtocol(ProcessProtocol):
    """Feeds the daemon's output lines and its end to an L{RsyncDaemon}."""

    def __init__(self, owner: "RsyncDaemon") -> None:
        self._owner = owner
        self._partial = {1: b"", 2: b""}

    def childDataReceived(self, fd: int, data: bytes) -> None:
        *lines, self._partial[fd] = (self._partial.get(fd, b"") + data).split(b"\n")
        for line in lines:
            self._owner._output(line)

    def processEnded(self, reason) -> None:
        for rest in self._partial.values():
            if rest:
                self._owner._output(rest)
        self._owner._ended(reason.value)


class RsyncDaemon(Service):
    """
    Runs C{rsync --daemon --no-detach} serving C{sources} while the service
    runs: restarts it with a backoff (C{min_backoff} doubling to
    C{max_backoff}, reset after a run that lasted C{max_backoff}) when it
    exits; on stop sends TERM, then KILL after C{stop_timeout} seconds.

    Passwords are L{password_for} C{host} and each module: derived from
    C{secret} when there is one, else random for the life of this object.
    C{chroot} defaults to whether we run as root (the only way it works).
    Everything is validated here, so bad input fails before anything starts.
    """

    def __init__(
        self,
        reactor,
        state_dir: str,
        address: str,
        port: int,
        sources: Iterable[str],
        host: str,
        secret: Optional[bytes] = None,
        user: str = "cbackup",
        rsync: Optional[str] = None,
        max_connections: int = 16,
        timeout: int = 600,
        stop_timeout: float = 10.0,
        min_backoff: float = 1.0,
        max_backoff: float = 60.0,
        chroot: Optional[bool] = None,
    ) -> None:
        self._reactor = reactor
        self._state_dir = state_dir
        self._address = address
        self._port = port
        self._user = user
        self._host = host
        self._passwords: dict[str, str] = {}
        self._daemon_log = DaemonLog()
        root = os.geteuid() == 0
        if chroot is None:
            chroot = root
        elif chroot and not root:
            raise ValueError("use chroot needs the daemon to run as root")
        self._render = dict(
            chroot=chroot,
            uid=os.getuid() if root else None,
            gid=os.getgid() if root else None,
            max_connections=max_connections,
            timeout=timeout,
        )
        self._configure(sources, secret)
        if rsync is None:
            found = which("rsync")
            if not found:
                raise ValueError("no rsync executable on PATH")
            rsync = found[0]
        self._rsync = os.path.abspath(rsync)
        self._stop_timeout = stop_timeout
        self._min_backoff = self._backoff = min_backoff
        self._max_backoff = max_backoff
        self._process = None
        self._started_at = 0.0
        self._restart_call = None
        self._kill_call = None
        self._gone: list[Deferred] = []

    def _configure(self, sources: Iterable[str], secret: Optional[bytes]) -> None:
        """The modules, passwords and config text for C{sources} and C{secret}."""
        modules: dict[str, str] = {}
        for path in sources:
            name = module_name(path)
            if modules.setdefault(name, path) != path:
                raise ValueError(f"sources {path!r} and {modules[name]!r} clash")
        old = self._passwords
        self._config = render_config(
            self._state_dir, self._address, self._port, modules, self._user, **self._render)
        self._modules = modules
        # Without a secret a module's random password lasts as long as we do.
        self._passwords = {m: (old[m] if secret is None and m in old
                               else password_for(secret, self._host, m)) for m in modules}

    def reconfigure(self, sources: Iterable[str], secret: Optional[bytes]) -> None:
        """
        Serve C{sources} with C{secret}'s passwords from now on (a reloaded
        config).  rsync reads its config again for every connection, so the
        running daemon serves the new modules without a restart.
        """
        self._configure(sources, secret)
        if self.running:
            self._write_files()

    @property
    def config_path(self) -> str:
        return os.path.join(self._state_dir, "rsyncd.conf")

    def endpoint(self, source_path: str) -> tuple[str, int, str, str, str]:
        """
        Where a client fetches C{source_path} from: (host, port, module,
        user, password).  C{KeyError} for a path this daemon does not serve.
        """
        module = module_name(source_path)
        if self._modules.get(module) != source_path:
            raise KeyError(source_path)
        return (self._address, self._port, module, self._user, self._passwords[module])

    def startService(self) -> None:
        Service.startService(self)
        os.makedirs(self._state_dir, mode=0o700, exist_ok=True)
        os.chmod(self._state_dir, 0o700)
        self._write_files()
        self._spawn()

    def _write_files(self) -> None:
        """The secrets file of every module, then the config naming them."""
        for module, password in self._passwords.items():
            secret_line = f"{self._user}:{password}\n".encode("ascii")
            _write_private(secrets_path(self._state_dir, module), secret_line)
        _write_private(self.config_path, os.fsencode(self._config))

    def _spawn(self) -> None:
        self._restart_call = None
        # An rsync before 3.2 will not start over a pid file a KILL left.
        try:
            os.unlink(os.path.join(self._state_dir, "rsyncd.pid"))
        except FileNotFoundError:
            pass
        argv = [self._rsync, "--daemon", "--no-detach", "--config=" + self.config_path]
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C"}
        self._started_at = self._reactor.seconds()
        self._process = self._reactor.spawnProcess(
            _RsyncProtocol(self), self._rsync, argv, env=env, path=self._state_dir
        )
        log.info("rsync daemon started on {address}:{port} (pid {pid})",
                 address=self._address, port=self._port, pid=self._process.pid)

    def _output(self, line: bytes) -> None:
        self._daemon_log.line(line)

    def _ended(self, status) -> None:
        self._process = None
        if self._kill_call is not None:
            if self._kill_call.active():
                self._kill_call.cancel()
            self._kill_call = None
        if not self.running:
            log.info("rsync daemon stopped ({status})", status=status)
            gone, self._gone = self._gone, []
            for d in gone:
                d.callback(None)
            return
        if self._reactor.seconds() - self._started_at >= self._max_backoff:
            self._backoff = self._min_backoff
        delay = self._backoff
        self._backoff = min(self._backoff * 2, self._max_backoff)
        log.warn("rsync daemon exited ({status}; its last lines are logged above); "
                 "restarting in {delay} s", status=status, delay=delay)
        self._restart_call = self._reactor.callLater(delay, self._spawn)

    def stopService(self) -> Deferred:
        """TERM the daemon, KILL it after a timeout; fires once it is gone."""
        Service.stopService(self)
        if self._restart_call is not None:
            self._restart_call.cancel()
            self._restart_call = None
        if self._process is None:
            return succeed(None)
        d = Deferred()
        self._gone.append(d)
        if self._kill_call is None:
            self._signal("TERM")
            self._kill_call = self._reactor.callLater(
                self._stop_timeout, self._signal, "KILL"
            )
        return d

    def _signal(self, name: str) -> None:
        if name == "KILL":
            self._kill_call = None
            log.warn("rsync daemon ignored TERM; killing it")
        try:
            self._process.signalProcess(name)
        except ProcessExitedAlready:
            pass
