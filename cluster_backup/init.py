"""
C{cbackup init --dir DIR [-c FILE] [--host NAME] [--twistd PATH]}: write
what a host needs to run cluster-backup under systemd.

With C{-c FILE} (an existing config) it writes, into C{DIR}, the systemd
unit of each role this host has in the config (C{cbackup-server.service}
for a host with sources, C{cbackup-client.service} for one with stores),
filled in for this host: C{RequiresMountsFor=} its source or store folders,
the client's C{ReadWritePaths=} its stores, C{ExecStart=} this
installation's C{twistd}, the config's absolute path and C{--host NAME}.

Without C{-c} it writes a starter config (C{DIR/cluster.conf}, naming this
host), a random shared secret for it (C{DIR/secret}, mode 0600) and both
units with the example paths of the packaged units to adjust (or rerun
with C{-c} once the config is final).

The units are rendered from the packaged ones (C{cluster_backup/conf}, the
checkout's C{conf/}), so there is one hardened unit of each kind.  Nothing
is overwritten: when any file to write exists, nothing is written and the
command exits 2 naming it.  It prints what it wrote and the commands to run
next.  Exit 0 when written; 2 on a bad config, an unknown host, a path a
unit cannot hold, or an existing file.
"""

from __future__ import annotations

import argparse
import os
import re
import secrets
import shlex
import shutil
import socket
import sys
from importlib import resources
from typing import Optional, Sequence, TextIO

from cluster_backup.config import ConfigError, load
from cluster_backup.identity import identify

EXIT_OK = 0
EXIT_ERROR = 2

#: role -> the packaged unit file it renders.
UNITS = {"server": "cbackup-server.service", "client": "cbackup-client.service"}

#: Where the server's state lives (its StateDirectory=); the server unit
#: waits for its filesystem as for the sources'.
STATE_ROOT = "/var/lib/cluster-backup"

#: Where systemd reads units from: a unit written there needs no install step.
SYSTEMD_DIRS = ("/etc/systemd/system", "/run/systemd/system", "/usr/local/lib/systemd/system",
                "/usr/lib/systemd/system", "/lib/systemd/system")

#: Folders ProtectHome= covers, and those PrivateTmp= replaces.
HOME_DIRS = ("/home", "/root", "/run/user")
TMP_DIRS = ("/tmp", "/var/tmp")

_SAFE_WORD = re.compile(r"[A-Za-z0-9/._+:@,=\[\]-]+\Z")


class InitError(Exception):
    """A problem that stops C{cbackup init} before it writes anything."""


def template(role: str) -> str:
    """The text of the packaged unit of C{role} ("server" or "client")."""
    return (resources.files("cluster_backup") / "conf" / UNITS[role]).read_text("utf-8")


def quote(word: str, *, exec_line: bool = False) -> str:
    """
    C{word} (a path or a host name) as one word of a unit file setting:
    C{%} doubled (systemd's specifiers), C{$} doubled in a command line
    (its variables), and double-quoted with C{\\\\} and C{\\"} escaped when
    it holds anything but plain path characters.  L{InitError} for what a
    unit file cannot hold (control characters, non-UTF-8 bytes).
    """
    if any(ord(c) < 32 or ord(c) == 127 for c in word):
        raise InitError(f"{word!r}: a control character cannot be written in a unit file")
    try:
        word.encode("utf-8")
    except UnicodeEncodeError:
        raise InitError(f"{word!r}: not UTF-8, cannot be written in a unit file") from None
    text = word.replace("%", "%%")
    if exec_line:
        text = text.replace("$", "$$")
    if _SAFE_WORD.match(word):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _under(path: str, roots: Sequence[str]) -> bool:
    return any(path == r or path.startswith(r + "/") for r in roots)


def render_unit(
    role: str,
    *,
    twistd: str,
    config: str,
    host: Optional[str] = None,
    mounts: Sequence[str] = (),
    writable: Sequence[str] = (),
    readme: Optional[str] = None,
    note: str = "",
) -> str:
    """
    The packaged unit of C{role} with C{ExecStart=} running C{twistd} on
    C{config} (as C{host} when given).  When C{mounts} is given it replaces
    the example C{RequiresMountsFor=} (and C{writable} the client's example
    C{ReadWritePaths=}); C{ProtectHome=} and C{PrivateTmp=} are relaxed when
    a path needs it.  C{readme}: the README to name in C{Documentation=}
    (none: the line goes).  C{note}: a comment line put first.
    """
    command = [quote(twistd, exec_line=True), "-n", "--pidfile=", f"cbackup-{role}",
               "-c", quote(config, exec_line=True)]
    if host is not None:
        command += ["--host", quote(host, exec_line=True)]
    paths = list(mounts) + list(writable)
    out, seen = [], set()
    for line in template(role).splitlines():
        key = line.split("=", 1)[0] if "=" in line and not line.startswith("#") else None
        if key == "ExecStart":
            line = "ExecStart=" + " ".join(command)
        elif key == "Documentation":
            if readme is None or not _SAFE_WORD.match(readme):
                continue  # a URL: no quoting
            line = "Documentation=file://" + readme.replace("%", "%%")
        elif key == "RequiresMountsFor" and mounts:
            line = "RequiresMountsFor=" + " ".join(quote(p) for p in mounts)
        elif key == "ReadWritePaths" and writable:
            line = "ReadWritePaths=" + " ".join(quote(p) for p in writable)
        elif key == "ProtectHome" and any(_under(p, HOME_DIRS) for p in paths):
            out.append(f"# {', '.join(HOME_DIRS)}: a folder of this host is there.")
            line = "ProtectHome=read-only"
        elif key == "PrivateTmp" and any(_under(p, TMP_DIRS) for p in paths):
            out.append(f"# No private {' or '.join(TMP_DIRS)}: a folder of this host is there.")
            line = "PrivateTmp=no"
        if key:
            seen.add(key)
        out.append(line)
    wanted = {"ExecStart", "RequiresMountsFor"} | ({"ReadWritePaths"} if writable else set())
    if not wanted <= seen:  # pragma: no cover - the packaged units have them
        raise InitError(f"packaged {UNITS[role]} lacks {', '.join(sorted(wanted - seen))}=")
    if note:
        out.insert(0, "# " + note)
    return "\n".join(out) + "\n"


def starter_config(host: str, secret_file: str) -> str:
    """A starter config naming C{host} as a source, with two example stores."""
    return f"""\
# cluster-backup config: a starter written by `cbackup init` on {host}.
# The same file goes to every host, e.g. /etc/cluster-backup/cluster.conf,
# with the same SECRET FILE.  Name the real sources and stores, then check
# it: cbackup check -c FILE.  Every key, with its default: reference.conf
# beside the units (conf/ in a checkout, cluster_backup/conf/ installed).
options: PORT: 5005
options: SECRET FILE: {secret_file}

# A folder of this host to back up, and how many copies it wants, each on
# another host:
server: {host}:/srv/projects
copies: 2

# Backup folders on other hosts (never the source's own), with their quotas:
backup: backup1:/backups
size: 1t
backup: backup2:/backups
size: 1t
"""


def default_twistd() -> Optional[str]:
    """The twistd beside this Python (a virtualenv's), else the one on PATH."""
    beside = os.path.join(os.path.dirname(sys.executable), "twistd")
    if os.access(beside, os.X_OK):
        return beside
    found = shutil.which("twistd")
    return os.path.abspath(found) if found else None


def checkout_readme() -> Optional[str]:
    """The README of the checkout this package runs from, if it does."""
    here = os.path.dirname(os.path.abspath(__file__))
    readme = os.path.join(os.path.dirname(here), "README.md")
    return readme if os.path.isfile(readme) else None


def _plan(args: argparse.Namespace, out_dir: str, twistd: str) -> tuple[dict, list, list]:
    """
    What to write (path -> (text, mode)), the notes to print, and the
    commands to run next.  Raises L{InitError} or L{ConfigError}.
    """
    files: dict[str, tuple[str, int]] = {}
    notes: list[str] = []
    readme = checkout_readme()
    if args.config is None:
        host = args.host or socket.gethostname().split(".")[0] or "host1"
        if not re.match(r"[A-Za-z0-9_]([A-Za-z0-9_.-]*[A-Za-z0-9_])?\Z", host):
            raise InitError(f"host name {host!r} cannot be a config host: give --host NAME")
        config = os.path.join(out_dir, "cluster.conf")
        secret = os.path.join(out_dir, "secret")
        files[config] = (starter_config(host, secret), 0o644)
        files[secret] = (secrets.token_hex(32) + "\n", 0o600)
        for role in UNITS:
            files[os.path.join(out_dir, UNITS[role])] = (render_unit(
                role, twistd=twistd, config=config, host=args.host, readme=readme,
                note="Written by `cbackup init` from the packaged unit: adjust the "
                "ADJUST lines."), 0o644)
        notes.append(f"the units show example paths: adjust their ADJUST lines, or, once "
                     f"{config} names the real sources and stores, rerun "
                     f"`cbackup init --dir OTHER_DIR -c {config}` for units with this "
                     f"host's paths")
        notes += _hidden(config, secret)
        nxt = [f"edit {config}: the real sources (server:) and stores (backup:)",
               f"cbackup check -c {shlex.quote(config)}",
               f"copy {config} and {secret} (mode 0600) to every host"]
        return files, notes, nxt + _enable_steps(files, out_dir)
    config = os.path.abspath(args.config)
    cluster = load(config)
    host = identify(cluster, args.host)
    if host is None:
        raise InitError(f"this machine is none of the hosts in {config} "
                        f"({', '.join(cluster.hosts())}); give --host NAME")
    sources = [s.path for s in cluster.sources_on(host)]
    stores = [s.path for s in cluster.stores_on(host)]
    note = f"Written by `cbackup init` for host {host} of {config}."
    if sources:
        files[os.path.join(out_dir, UNITS["server"])] = (render_unit(
            "server", twistd=twistd, config=config, host=host, readme=readme,
            mounts=sources + [STATE_ROOT], note=note), 0o644)
    else:
        notes.append(f"{host} has no sources (server: lines): no server unit")
    if stores:
        files[os.path.join(out_dir, UNITS["client"])] = (render_unit(
            "client", twistd=twistd, config=config, host=host, readme=readme,
            mounts=stores, writable=stores, note=note), 0o644)
    else:
        notes.append(f"{host} has no stores (backup: lines): no client unit")
    if not files:
        raise InitError(f"{host} has neither sources nor stores in {config}: nothing to run")
    notes += _hidden(config, cluster.options.secret_file)
    nxt = [f"cbackup check -c {shlex.quote(config)} --host {shlex.quote(host)}"]
    nxt += [f"mkdir -m 0700 {shlex.quote(p)}   # the client's unit needs its stores to exist"
            for p in stores if not os.path.isdir(p)]
    return files, notes, nxt + _enable_steps(files, out_dir)


def _hidden(*paths: Optional[str]) -> list[str]:
    """Notes for the files the units must read but hide (ProtectHome=, PrivateTmp=)."""
    return [f"{p} is under {', '.join(HOME_DIRS + TMP_DIRS)}, which the units hide: "
            "move it (e.g. to /etc/cluster-backup/) and rerun"
            for p in paths if p and _under(os.path.abspath(p), HOME_DIRS + TMP_DIRS)]


def _enable_steps(files: dict, out_dir: str) -> list[str]:
    units = [name for name in UNITS.values() if os.path.join(out_dir, name) in files]
    steps = [] if out_dir in SYSTEMD_DIRS else [
        f"install -m 0644 {shlex.quote(os.path.join(out_dir, u))} /etc/systemd/system/"
        for u in units]
    steps.append("systemctl daemon-reload")
    for u in units:
        name = u.removesuffix(".service")
        steps += [f"systemctl enable --now {name}", f"journalctl -u {name} -f"]
    return steps


def _write_new(path: str, text: str, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)


def cmd_init(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    out_dir = os.path.abspath(args.dir)
    twistd = args.twistd or default_twistd()
    if twistd is None:
        print("cbackup init: no twistd found beside this Python or on PATH: "
              "give --twistd PATH", file=err)
        return EXIT_ERROR
    twistd = os.path.abspath(twistd)
    try:
        files, notes, nxt = _plan(args, out_dir, twistd)
    except ConfigError as e:
        for problem in e.problems:
            print(problem, file=err)
        return EXIT_ERROR
    except InitError as e:
        print(f"cbackup init: {e}", file=err)
        return EXIT_ERROR
    existing = [p for p in files if os.path.lexists(p)]
    if existing:
        for p in existing:
            print(f"cbackup init: {p} exists; not overwriting it "
                  "(remove it, or choose another --dir)", file=err)
        return EXIT_ERROR
    try:
        os.makedirs(out_dir, exist_ok=True)
        for path, (text, mode) in files.items():
            _write_new(path, text, mode)
            print(f"wrote {path}", file=out)
    except OSError as e:
        print(f"cbackup init: cannot write {e.filename}: {e.strerror}", file=err)
        return EXIT_ERROR
    for n in notes:
        print(f"note: {n}", file=out)
    print("next:", file=out)
    for step in nxt:
        print(f"  {step}", file=out)
    return EXIT_OK


def register(subparsers) -> None:
    """Add C{init} to the C{cbackup} command."""
    p = subparsers.add_parser(
        "init", help="write a starter config, or this host's systemd units",
        description="With -c FILE: write the systemd unit of each role this host has "
        "in the config (cbackup-server.service, cbackup-client.service), filled in "
        "with its source and store folders.  Without -c: a starter config "
        "(cluster.conf), a random shared secret (secret) and both units with example "
        "paths.  Never overwrites a file: exit 2, naming it, when one exists.")
    p.add_argument("--dir", required=True, help="the folder to write into (created if missing)")
    p.add_argument("-c", "--config", help="an existing cluster config: units for this "
                   "host's role(s) in it, with its paths")
    p.add_argument("--host", help="this host's name in the config (default: found from "
                   "this machine's names; without -c, its host name)")
    p.add_argument("--twistd", help="the twistd the units run (default: the one beside "
                   "this Python, else on PATH)")
    p.set_defaults(func=cmd_init)
