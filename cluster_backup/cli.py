"""
The C{cbackup} command: tools for the operator.

C{cbackup check -c FILE [--host NAME] [--json]} reads a config and prints
what it understood, with warnings; exit 0 when valid, 2 when not (one
C{FILE:LINE: problem} per line on stderr).  The other subcommands live in
their own modules, each with a C{register(subparsers)} function: see
L{COMMANDS}.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import json
import os
import socket
import sys
from typing import Callable, Optional, Sequence, TextIO

from cluster_backup import checks
from cluster_backup.config import Cluster, ConfigError, load, read_secret_file
from cluster_backup.config_write import format_fraction
from cluster_backup.identity import identify_or_none, listen_address
from cluster_backup.measure import measure
from cluster_backup.units import format_duration, human_size

EXIT_OK = 0
EXIT_BAD_CONFIG = 2


def _roles(cluster: Cluster, host: Optional[str]) -> list[str]:
    if host is None:
        return []
    roles = []
    if cluster.sources_on(host):
        roles.append("server")
    if cluster.stores_on(host):
        roles.append("client")
    return roles


def describe(cluster: Cluster, host: Optional[str], host_note: Optional[str] = None,
             measured: Optional[dict] = None, problems: Sequence[str] = ()) -> dict:
    """
    What C{check --json} prints: plain data, no secret.  C{measured}: the
    sources of this host as L{cluster_backup.measure} walked them.
    """
    o = cluster.options
    measured = measured or {}
    return {
        "config": cluster.filename,
        "options": {
            "port": o.port,
            "rsync_port": o.rsync_port,
            "secret": o.secret is not None or o.secret_file is not None,
            "secret_file": o.secret_file,
            "bwlimit": o.bwlimit,
            "rescan": o.rescan,
            "report_interval": o.report_interval,
            "dead_after": o.dead_after,
            "transport": o.transport,
            "max_change": o.max_change,
        },
        "sources": [
            {
                "host": s.host,
                "path": s.path,
                "copies": s.copies,
                "rescan": s.rescan if s.rescan is not None else o.rescan,
                "exclude": list(s.exclude),
                "keep_deleted": s.keep_deleted,
                "max_change": s.max_change if s.max_change is not None else o.max_change,
                "address": cluster.address_of(s.host),
                "backed_up_by": [st.id for st in cluster.stores_for(s)],
            }
            for s in cluster.sources
        ],
        "stores": [
            {
                "host": s.host,
                "path": s.path,
                "size": s.size,
                "reserve": s.reserve,
                "ignore_sources": list(s.ignore_sources),
                "address": cluster.address_of(s.host),
            }
            for s in cluster.stores
        ],
        "host": host,
        "host_note": host_note,
        "roles": _roles(cluster, host),
        "measured": {sid: {"files": m.files, "bytes": m.bytes,
                           "largest": list(m.largest) if m.largest else None}
                     for sid, m in measured.items()},
        "warnings": list(problems) + checks.warnings(
            cluster, {sid: m.bytes for sid, m in measured.items()},
            {sid: m.largest for sid, m in measured.items() if m.largest}),
    }


def print_text(info: dict, out: TextIO) -> None:
    """The human form of L{describe}'s data."""
    o = info["options"]
    bw = f"{human_size(o['bwlimit'])}/s" if o["bwlimit"] else "unlimited"
    secret = f"from {o['secret_file']}" if o["secret_file"] else ("set" if o["secret"] else "none")
    print(f"config {info['config']}: valid", file=out)
    print(f"options: PORT {o['port']}, RSYNC PORT {o['rsync_port']}, "
          f"TRANSPORT {o['transport']}, SECRET {secret}, BWLIMIT {bw}, "
          f"RESCAN {format_duration(o['rescan'])}, "
          f"REPORT INTERVAL {format_duration(o['report_interval'])}, "
          f"DEAD AFTER {format_duration(o['dead_after'])}, "
          f"MAX CHANGE {format_fraction(o['max_change'])}", file=out)
    print(f"sources ({len(info['sources'])}):", file=out)
    for s in info["sources"]:
        extra = f", exclude {', '.join(s['exclude'])}" if s["exclude"] else ""
        print(f"  {s['host']}:{s['path']}  copies {s['copies']}, "
              f"rescan {format_duration(s['rescan'])}, "
              f"keep deleted {format_duration(s['keep_deleted'])}, "
              f"max change {format_fraction(s['max_change'])}, "
              f"{len(s['backed_up_by'])} backup(s){extra}", file=out)
    print(f"backups ({len(info['stores'])}):", file=out)
    for s in info["stores"]:
        if s["size"] is not None:
            room = f"size {human_size(s['size'])} ({s['size']} bytes)"
        else:
            room = f"reserve {human_size(s['reserve'])} ({s['reserve']} bytes) free"
        ignore = f", ignores {', '.join(s['ignore_sources'])}" if s["ignore_sources"] else ""
        print(f"  {s['host']}:{s['path']}  {room}{ignore}", file=out)
    if info["host"]:
        roles = " and ".join(info["roles"])
        listen = info.get("listen")
        where = ("" if listen is None else
                 "; its server listens on every interface" if listen == "*" else
                 f"; its server listens on {listen}")
        print(f"this host: {info['host']} ({roles}){where}", file=out)
    else:
        print(f"this host: {info['host_note']}", file=out)
    for sid, m in info["measured"].items():
        biggest = (f", largest {m['largest'][0]!r} ({human_size(m['largest'][1])})"
                   if m["largest"] else "")
        print(f"measured {sid}: {m['files']:,} files, {human_size(m['bytes'])}{biggest}",
              file=out)
    if info["warnings"]:
        print(f"warnings ({len(info['warnings'])}):", file=out)
        for w in info["warnings"]:
            print(f"  - {w}", file=out)


def resolve_host(host: str) -> None:
    """Look C{host} up as a client would; C{OSError} when it does not resolve."""
    socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)


def _read_secret_file(cluster: Cluster) -> list[str]:
    """
    Read the SECRET FILE as the daemons will (L{read_secret_file}: a
    L{ConfigError} when it cannot be used); the warnings about its mode.
    """
    path = cluster.options.secret_file
    if not path:
        return []
    try:
        _secret, st = read_secret_file(path, cluster.filename)
    except ConfigError as e:
        if isinstance(e.__cause__, PermissionError):
            raise ConfigError([f"{e.problems[0]} (as uid {os.geteuid()}); run check as "
                               "the user the daemons run as"]) from e.__cause__
        raise
    return checks.secret_file_warnings(path, st.st_mode)


def cmd_check(args: argparse.Namespace, out: TextIO, err: TextIO,
              resolve: Callable[[str], object] = resolve_host) -> int:
    try:
        cluster = load(args.config)
        problems = _read_secret_file(cluster)
    except ConfigError as e:
        for problem in e.problems:
            print(problem, file=err)
        return EXIT_BAD_CONFIG
    try:
        host = identify_or_none(cluster, args.host)
    except ConfigError as e:
        for problem in e.problems:
            print(problem, file=err)
        return EXIT_BAD_CONFIG
    note = None if host else ("not found in this config, or several of its hosts match; "
                              "use --host NAME to check a host's view")
    problems += checks.unresolved_warnings(cluster, resolve)
    listen = None
    if host is not None and cluster.sources_on(host):
        address, problem = listen_address(cluster, host)
        if problem:
            problems.append(f"the server of {host} cannot start: {problem}")
        else:
            listen = address or "*"
    measured = {}
    if args.measure:
        if host is None:
            print("--measure walks the sources of this host: name it with --host", file=err)
            return EXIT_BAD_CONFIG
        measured, measure_problems = measure(cluster, host)
        problems += measure_problems
    info = describe(cluster, host, note, measured, problems)
    info["listen"] = listen
    if args.json:
        json.dump(info, out, indent=2)
        out.write("\n")
    else:
        print_text(info, out)
    return EXIT_OK


#: Modules providing more subcommands: C{register(subparsers)} adds a parser
#: whose C{func(args, out, err) -> exit code} runs it.
COMMANDS = ("status", "accept", "restore", "demo", "init")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="cbackup",
        description="cluster-backup: operator tools.")
    p.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    check = sub.add_parser(
        "check", help="check a config and print what it means",
        description="Read a cluster config, report every problem in it (FILE:LINE each, "
        "exit 2), and print what it means: options, sources, backups, this host's "
        "role, and warnings (too few backup hosts for the copies, a store inside a "
        "source, no secret, a SECRET FILE others can read, host names that do not "
        "resolve).  The SECRET FILE is read as the daemons read it.  Run it on each "
        "host: it also says which host of the config this machine is.")
    check.add_argument("-c", "--config", required=True, help="the cluster config file")
    check.add_argument("--host", help="check as this host of the config")
    check.add_argument("--json", action="store_true", help="print one JSON object")
    check.add_argument("--measure", action="store_true",
                       help="walk this host's sources: warn when the quotas cannot hold "
                       "their copies, or a file is too big for its copies")
    check.set_defaults(func=cmd_check)
    for name in COMMANDS:
        importlib.import_module(f"cluster_backup.{name}").register(sub)
    return p


def version() -> str:
    """The installed distribution's version, else the package's own."""
    try:
        return importlib.metadata.version("cluster-backup")
    except importlib.metadata.PackageNotFoundError:  # run from a checkout, not installed
        from cluster_backup import __version__
        return __version__


def main(argv: Optional[Sequence[str]] = None, out: TextIO = sys.stdout,
         err: TextIO = sys.stderr) -> int:
    """Entry point of the C{cbackup} console script."""
    args = parser().parse_args(argv)
    return args.func(args, out, err)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
