"""
The cluster config: one file, the same on every host, read into a frozen
L{Cluster}.

Both spellings (the seed's line format and YAML, see L{config_formats}) are
checked here, once, so they accept and refuse the same things.  Every
problem is reported as C{FILE:LINE: what is wrong}; all problems of a file
are reported together, and nothing is written anywhere.
"""

from __future__ import annotations

import ipaddress
import os
import posixpath
import re
import stat
from typing import Callable, Optional

from attrs import Factory, field, frozen

from cluster_backup import config_formats as formats
from cluster_backup.held import DEFAULT_MAX_CHANGE, parse_max_change
from cluster_backup.units import parse_duration, parse_size

DEFAULT_PORT = 5005
DAY = 86400.0
#: Largest size a config may give: sizes travel as signed 64-bit numbers.
MAX_SIZE = 2**63 - 1
#: Longest duration a config may give (a hundred years); longer is a typo,
#: and an infinite one breaks timers and every place that prints it.
MAX_DURATION = 100 * 365 * DAY


class ConfigError(Exception):
    """
    A config that cannot be used.  C{problems} holds one
    C{"FILE:LINE: message"} string per problem.
    """

    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = problems


@frozen
class Options:
    """
    Global options (DESIGN.md "Config").  Durations are seconds; C{bwlimit}
    is bytes per second (None: unlimited); C{rsync_port} defaults to
    C{port + 1}.
    """

    port: int = DEFAULT_PORT
    rsync_port: int = Factory(lambda self: self.port + 1, takes_self=True)
    secret: Optional[str] = field(default=None, repr=False)
    secret_file: Optional[str] = None
    bwlimit: Optional[int] = None
    rescan: float = 3600.0
    report_interval: float = 60.0
    dead_after: float = 3600.0
    transport: str = "daemon"
    max_change: float = DEFAULT_MAX_CHANGE
    #: Where servers listen: None for the host's own address (see
    #: L{cluster_backup.identity.listen_address}), "*" for every interface.
    listen: Optional[str] = None


@frozen
class Source:
    """A C{server:} block: a directory to protect and the copies wanted."""

    host: str
    path: str
    copies: int = 1
    rescan: Optional[float] = None  # None: the global RESCAN
    exclude: tuple[str, ...] = ()
    keep_deleted: float = 30 * DAY
    address: Optional[str] = None
    max_change: Optional[float] = None  # None: the global MAX CHANGE
    line: int = field(default=0, eq=False, repr=False)

    @property
    def id(self) -> str:
        return f"{self.host}:{self.path}"


@frozen
class Store:
    """
    A C{backup:} block: a directory to fill, bounded by C{size} bytes, or by
    keeping C{reserve} bytes of its filesystem free.
    """

    host: str
    path: str
    size: Optional[int] = None
    reserve: Optional[int] = None
    ignore_sources: tuple[str, ...] = ()
    address: Optional[str] = None
    line: int = field(default=0, eq=False, repr=False)

    @property
    def id(self) -> str:
        return f"{self.host}:{self.path}"


@frozen
class Cluster:
    """Everything one config file says."""

    options: Options = Factory(Options)
    sources: tuple[Source, ...] = ()
    stores: tuple[Store, ...] = ()
    filename: str = field(default="<config>", eq=False, repr=False)

    def hosts(self) -> list[str]:
        """Every host named, in order of first mention."""
        seen: dict[str, None] = {}
        for block in (*self.sources, *self.stores):
            seen.setdefault(block.host, None)
        return list(seen)

    def address_of(self, host: str) -> str:
        """The IP or name to reach C{host} at: its C{address:}, else its name."""
        for block in (*self.sources, *self.stores):
            if block.host == host and block.address:
                return block.address
        return host

    def sources_on(self, host: str) -> list[Source]:
        return [s for s in self.sources if s.host == host]

    def stores_on(self, host: str) -> list[Store]:
        return [s for s in self.stores if s.host == host]

    def same_host(self, a: str, b: str) -> bool:
        """Whether hosts C{a} and C{b} are one machine: one name, or one address."""
        return a == b or self.address_of(a) == self.address_of(b)

    def backs_up(self, store: Store, source: Source) -> bool:
        """
        The own-host rule: C{store} backs up C{source} unless it ignores it
        or is on the source's host.  A copy on the source's host dies with
        that host, so it would not count toward C{copies}; rather than hold
        copies that never count, such a store spends its room on the
        sources of other hosts.
        """
        return source.id not in store.ignore_sources and not self.same_host(
            store.host, source.host)

    def stores_for(self, source: Source) -> list[Store]:
        """The stores that back up C{source} (see L{backs_up})."""
        return [s for s in self.stores if self.backs_up(s, source)]

    def source(self, source_id: str) -> Source:
        for s in self.sources:
            if s.id == source_id:
                return s
        raise KeyError(source_id)


# --- reading -----------------------------------------------------------

_HOST = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_]([A-Za-z0-9_.\-]*[A-Za-z0-9_])?)$")


def parse_location(text: str) -> tuple[str, str]:
    """
    Split C{host:/absolute/path} (C{[v6addr]:/path} for IPv6) into host and
    normalized path; L{ValueError} says what is wrong.
    """
    if text.startswith("["):
        host, _, rest = text.partition("]")
        host += "]"
        if not rest.startswith(":"):
            raise ValueError(f"expected host:/path, got {text!r}")
        path = rest[1:]
    else:
        host, colon, path = text.partition(":")
        if not colon:
            raise ValueError(f"expected host:/path, got {text!r}")
    host = host.strip()
    path = path.strip()
    if not host or not _HOST.match(host):
        raise ValueError(f"bad host name {host!r} in {text!r}")
    if not path.startswith("/"):
        raise ValueError(f"path must be absolute in {text!r}")
    if any(c in path for c in "\n\r\0"):
        raise ValueError(f"path contains a control character in {text!r}")
    if ".." in path.split("/"):
        raise ValueError(f"path must not contain '..' in {text!r}")
    normalized = posixpath.normpath(path)
    if normalized.startswith("//"):
        normalized = "/" + normalized.lstrip("/")
    return host, normalized


def _positive_int(text: str) -> int:
    try:
        value = int(text.strip())
    except ValueError:
        raise ValueError(f"expected a whole number, got {text!r}")
    if value < 1:
        raise ValueError(f"must be at least 1, got {value}")
    return value


def _port(text: str) -> int:
    value = _positive_int(text)
    if value > 65535:
        raise ValueError(f"port must be 1-65535, got {value}")
    return value


def _size(text: str) -> int:
    value = parse_size(text)
    if value > MAX_SIZE:
        raise ValueError(f"size {text[:40]!r} is too large (at most 2**63 - 1 bytes)")
    return value


def _duration(text: str) -> float:
    value = parse_duration(text)
    if not value <= MAX_DURATION:  # also refuses inf and nan
        raise ValueError(f"duration {text[:40]!r} is too long (at most 100 years)")
    return value


def _positive_size(text: str) -> int:
    value = _size(text)
    if value <= 0:
        raise ValueError(f"size must be more than 0, got {text!r}")
    return value


def _positive_duration(text: str) -> float:
    value = _duration(text)
    if value <= 0:
        raise ValueError(f"duration must be more than 0, got {text!r}")
    return value


def _bwlimit(text: str) -> int:
    stripped = text.strip()
    if stripped.lower().endswith("/s"):
        stripped = stripped[:-2]
    return _positive_size(stripped)


def _address(text: str) -> str:
    try:
        return str(ipaddress.ip_address(text.strip()))
    except ValueError:
        raise ValueError(f"address must be an IP address, got {text!r}")


def _listen(text: str) -> str:
    value = text.strip()
    if value != "*":
        raise ValueError(
            f"LISTEN takes only '*' (every interface), got {text!r}; a server "
            "listens on its host's address (give the host 'address: IP')")
    return value


def _nonempty(text: str) -> str:
    if not text:
        raise ValueError("needs a value")
    return text


def _transport(text: str) -> str:
    value = text.strip().lower()
    if value not in ("daemon", "ssh"):
        raise ValueError(f"TRANSPORT must be 'daemon' or 'ssh', got {text!r}")
    return value


#: Global options: normalized key -> (attribute, parser).
OPTION_KEYS: dict[str, tuple[str, Callable[[str], object]]] = {
    "port": ("port", _port),
    "rsync port": ("rsync_port", _port),
    "secret": ("secret", _nonempty),
    "secret file": ("secret_file", _nonempty),
    "bwlimit": ("bwlimit", _bwlimit),
    "rescan": ("rescan", _positive_duration),
    "report interval": ("report_interval", _positive_duration),
    "dead after": ("dead_after", _positive_duration),
    "transport": ("transport", _transport),
    "max change": ("max_change", parse_max_change),
    "listen": ("listen", _listen),
}

#: Block keys: normalized key -> (attribute, parser, may repeat).
SOURCE_KEYS: dict[str, tuple[str, Callable[[str], object], bool]] = {
    "copies": ("copies", _positive_int, False),
    "rescan": ("rescan", _positive_duration, False),
    "exclude": ("exclude", _nonempty, True),
    "keep deleted": ("keep_deleted", _duration, False),
    "address": ("address", _address, False),
    "max change": ("max_change", parse_max_change, False),
}
STORE_KEYS: dict[str, tuple[str, Callable[[str], object], bool]] = {
    "size": ("size", _positive_size, False),
    "reserve": ("reserve", _size, False),
    "ignore source": ("ignore_sources", _nonempty, True),
    "address": ("address", _address, False),
}


class _Checker:
    """Turns a L{formats.Document} into a L{Cluster}, collecting problems."""

    def __init__(self, filename: str):
        self.filename = filename
        self.problems: list[tuple[int, str]] = []

    def problem(self, line: int, message: str) -> None:
        self.problems.append((line, message))

    def parse(self, entry: formats.Entry, parser, what: str):
        try:
            return parser(entry.value)
        except ValueError as e:
            self.problem(entry.line, f"{what}: {e}")
            return None

    def options(self, doc: formats.Document) -> Options:
        values: dict[str, object] = {}
        seen: dict[str, int] = {}
        for entry in doc.options + doc.stray:
            if entry.key not in OPTION_KEYS:
                if entry.key in SOURCE_KEYS or entry.key in STORE_KEYS:
                    self.problem(
                        entry.line,
                        f"'{entry.key}' belongs inside a server: or backup: block "
                        "(it comes before the first block here)")
                else:
                    self.problem(
                        entry.line,
                        f"unknown option {entry.key!r}; known options: "
                        + ", ".join(k.upper() for k in OPTION_KEYS))
                continue
            if entry.key in seen:
                self.problem(
                    entry.line,
                    f"{entry.key.upper()} given twice (first at line {seen[entry.key]})")
                continue
            seen[entry.key] = entry.line
            attr, parser = OPTION_KEYS[entry.key]
            value = self.parse(entry, parser, entry.key.upper())
            if value is not None:
                values[attr] = value
        if values.get("secret") and values.get("secret_file"):
            self.problem(seen["secret file"], "give SECRET or SECRET FILE, not both")
        port = values.get("port", DEFAULT_PORT)
        if values.get("rsync_port", port + 1) == port:
            self.problem(seen["rsync port"], f"RSYNC PORT must differ from PORT ({port})")
        if "rsync_port" not in values and port == 65535:
            self.problem(seen["port"], "PORT 65535 leaves no room for RSYNC PORT "
                         "(PORT + 1); set RSYNC PORT")
        return Options(**values)

    def block(self, block: formats.Block, keys: dict, other: dict) -> Optional[dict]:
        values: dict[str, object] = {"line": block.head.line}
        if block.broken:  # its head's problem is reported; check its keys only
            values["host"] = values["path"] = None
        else:
            try:
                values["host"], values["path"] = parse_location(block.head.value)
            except ValueError as e:
                self.problem(block.head.line, f"{block.head.key}: {e}")
                values["host"] = values["path"] = None
        seen: dict[str, int] = {}
        failed: set[str] = set()
        ignores: list[tuple[str, int]] = []
        for entry in block.entries:
            if entry.key not in keys:
                self.problem(entry.line, self.unknown_key(entry.key, block, keys, other))
                continue
            attr, parser, repeats = keys[entry.key]
            if entry.key in seen and not repeats:
                self.problem(
                    entry.line, f"'{entry.key}' given twice in this block "
                    f"(first at line {seen[entry.key]})")
                continue
            seen[entry.key] = entry.line
            value = self.parse(entry, parser, entry.key)
            if value is None:
                failed.add(attr)
                continue
            if attr == "ignore_sources":
                ignores.append((value, entry.line))
            elif repeats:
                values[attr] = values.get(attr, ()) + (value,)
            else:
                values[attr] = value
        values["_failed"] = failed
        if block.kind == "store":
            values["_ignores"] = ignores
        if values["host"] is None:
            return None  # its keys are checked; a block without a head builds nothing
        return values

    def unknown_key(self, key: str, block: formats.Block, keys: dict, other: dict) -> str:
        kind = "server" if block.kind == "source" else "backup"
        if key in other:
            return f"'{key}' is not a key of a {kind}: block"
        if key in OPTION_KEYS:
            return (f"{key.upper()} is a global option: write 'options: "
                    f"{key.upper()}: ...' or put it before the first block")
        return (f"unknown key {key!r} in a {kind}: block; known keys: "
                + ", ".join(keys))

    def check(self, doc: formats.Document) -> Cluster:
        options = self.options(doc)
        sources: list[Source] = []
        stores: list[Store] = []
        first: dict[tuple[str, str], int] = {}
        # A source whose head could not be read may be the one an
        # 'ignore source' names: do not call that name unknown.
        unread_source = False
        for block in doc.blocks:
            keys, other = ((SOURCE_KEYS, STORE_KEYS) if block.kind == "source"
                           else (STORE_KEYS, SOURCE_KEYS))
            values = self.block(block, keys, other)
            if values is None:
                unread_source = unread_source or block.kind == "source"
                continue
            failed = values.pop("_failed")
            ident = (block.kind, f"{values['host']}:{values['path']}")
            if ident in first:
                self.problem(
                    block.head.line,
                    f"duplicate {'source' if block.kind == 'source' else 'backup'} "
                    f"{ident[1]} (first at line {first[ident]})")
                continue
            first[ident] = block.head.line
            if block.kind == "source":
                sources.append(Source(**values))
            else:
                if failed & {"size", "reserve"}:
                    continue  # already reported where the value was written
                if ("size" in values) == ("reserve" in values):
                    self.problem(
                        block.head.line,
                        f"backup {ident[1]} needs exactly one of 'size' or 'reserve'"
                        + (" (both given)" if "size" in values else ""))
                    continue
                stores.append(values)
        known = {s.id for s in sources}
        built_stores = []
        for values in stores:
            normalized = []
            for text, line in values.pop("_ignores"):
                try:
                    host, path = parse_location(text)
                except ValueError as e:
                    self.problem(line, f"ignore source: {e}")
                    continue
                if f"{host}:{path}" not in known:
                    if not unread_source:
                        self.problem(line, f"ignore source: {text} is not a source of "
                                     "this config")
                    continue
                normalized.append(f"{host}:{path}")
            values["ignore_sources"] = tuple(normalized)
            built_stores.append(Store(**values))
        self.check_addresses(sources, built_stores)
        return Cluster(options, tuple(sources), tuple(built_stores), filename=self.filename)

    def check_addresses(self, sources, stores) -> None:
        """
        One address per host, and one host per address: copies are counted
        per host, so one machine under two names would count twice.
        """
        given: dict[str, tuple[str, int]] = {}
        owner: dict[str, tuple[str, int]] = {}
        for block in (*sources, *stores):
            if not block.address:
                continue
            if block.host in given and given[block.host][0] != block.address:
                self.problem(
                    block.line,
                    f"host {block.host} has address {block.address} here but "
                    f"{given[block.host][0]} at line {given[block.host][1]}")
                continue
            given.setdefault(block.host, (block.address, block.line))
            other, line = owner.setdefault(block.address, (block.host, block.line))
            if other != block.host:
                self.problem(
                    block.line,
                    f"address {block.address} is given to host {block.host} here and to "
                    f"host {other} at line {line}; one machine must have one name "
                    "(copies are counted per host)")

    def error(self) -> ConfigError:
        return ConfigError([f"{self.filename}:{line}: {message}"
                            for line, message in sorted(self.problems)])


def loads(text: str, filename: str = "<config>", yaml_format: Optional[bool] = None) -> Cluster:
    """
    Read a config from text.  The format is YAML when C{yaml_format} says
    so, or (when it is None) when the file name ends in C{.yaml}/C{.yml} or
    the text starts with a YAML section; otherwise the seed's line format.
    """
    if yaml_format is None:
        yaml_format = (filename.endswith((".yaml", ".yml"))
                       or formats.looks_like_yaml(text))
    checker = _Checker(filename)
    try:
        doc = formats.read_yaml(text) if yaml_format else formats.read_lines(text)
    except formats.SyntaxProblems as e:  # YAML that cannot be parsed at all
        checker.problems.extend(e.problems)
        raise checker.error()
    # Lines that could not be read are problems; every other line is still
    # checked, so one typo hides nothing else.
    checker.problems.extend(doc.problems)
    cluster = checker.check(doc)
    if checker.problems:
        raise checker.error()
    return cluster


def load(path: str) -> Cluster:
    """Read the config file at C{path}; unreadable files are a ConfigError too."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise ConfigError([f"{path}: cannot read config: {e.strerror}"])
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise ConfigError([f"{path}:{line}: not valid UTF-8 text"])
    if text.startswith("\ufeff"):  # a byte order mark some editors write
        text = text[1:]
    return loads(text, filename=path)


def read_secret(cluster: Cluster) -> Optional[bytes]:
    """
    The shared secret as bytes: C{SECRET}, or the first line of C{SECRET
    FILE} (read now, on the host that needs it, by L{read_secret_file}).
    None when neither is set.
    """
    options = cluster.options
    if options.secret:
        return options.secret.encode("utf-8")
    if options.secret_file:
        return read_secret_file(options.secret_file, cluster.filename)[0]
    return None


#: The most a SECRET FILE may hold.  Its secret is its first line; a larger
#: file is the wrong file (a log, a disk image), and is not read at all.
MAX_SECRET_FILE = 64 * 1024


def _file_kind(mode: int) -> str:
    for test, kind in ((stat.S_ISDIR, "a folder"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return kind
    return "not a file"


def read_secret_file(path: str, config: str = "<config>") -> tuple[bytes, os.stat_result]:
    """
    The secret in the SECRET FILE at C{path} (its first line, stripped) and
    the file's C{fstat}, for L{cluster_backup.checks} to judge its mode.

    Only a regular file (or a symlink to one) of at most L{MAX_SECRET_FILE}
    bytes is read: a folder, a device (C{/dev/zero} never ends), a FIFO
    (opening one waits for a writer) or a socket is refused before it is
    opened, and again after (it is opened non-blocking, so a file swapped
    for a FIFO in between cannot hang us).  Every refusal is a
    L{ConfigError} naming C{config} and C{path}, caused by the C{OSError}
    when there was one.
    """
    def refused(why: str) -> ConfigError:
        return ConfigError([f"{config}: SECRET FILE {path}: {why}"])

    def check(st: os.stat_result) -> None:
        if not stat.S_ISREG(st.st_mode):
            raise refused(f"not a regular file ({_file_kind(st.st_mode)})")
        if st.st_size > MAX_SECRET_FILE:
            raise refused(f"larger than {MAX_SECRET_FILE // 1024} KiB ({st.st_size} "
                          "bytes); a secret file holds one line")

    try:
        check(os.stat(path))
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as e:
        raise refused(f"cannot read: {e.strerror}") from e
    try:
        st = os.fstat(fd)
        check(st)
        data = b""
        while len(data) <= MAX_SECRET_FILE:  # a file may grow after the fstat
            chunk = os.read(fd, MAX_SECRET_FILE + 1 - len(data))
            if not chunk:
                break
            data += chunk
    except OSError as e:
        raise refused(f"cannot read: {e.strerror}") from e
    finally:
        os.close(fd)
    if len(data) > MAX_SECRET_FILE:
        raise refused(f"larger than {MAX_SECRET_FILE // 1024} KiB; a secret file holds "
                      "one line")
    lines = data.splitlines()
    secret = lines[0].strip() if lines else b""
    if not secret:
        raise ConfigError([f"{config}: SECRET FILE {path} is empty"])
    return secret, st
