"""
C{cbackup accept -c FILE --source HOST:/PATH}: let a held scan through.

A rescan that deletes or rewrites more than C{MAX CHANGE} of a source is
held by its server (DESIGN.md rule 8, L{cluster_backup.held}): the backups
keep the previous state, and C{cbackup status} says what is held.  When
the operator has checked that the change is right (the files really were
deleted, the disk really is gone for good), this command tells the
source's server to apply it.

It connects to the source's server like C{cbackup status} (its address
and PORT, authenticated with the config's secret) and sends L{Accept}.
Exit 0 when the server applied the held scan; 1 when nothing was held or
the server could not be asked; 2 for a bad config or a source the config
does not have.
"""

from __future__ import annotations

import argparse
import json
from typing import TextIO

from twisted.internet.defer import Deferred
from twisted.internet.endpoints import connectProtocol
from twisted.protocols import amp

from cluster_backup import session
from cluster_backup.config import ConfigError, load, parse_location, read_secret
from cluster_backup.held import describe
from cluster_backup.identity import identify_or_none
from cluster_backup.protocol import Accept
from cluster_backup.status import (
    ANONYMOUS_CLIENT,
    DEFAULT_TIMEOUT,
    EXIT_BAD_CONFIG,
    EXIT_OK,
    EXIT_PROBLEM,
    positive_seconds,
    run_until_done,
    timed_out,
    describe_error,
)


async def _accept(reactor, address: str, port: int, client_host: str, secret, source: str,
                  timeout: float) -> dict:
    proto = await connectProtocol(session.server_endpoint(reactor, address, port, timeout),
                                  amp.AMP())
    try:
        await session.login(proto, client_host, secret)
        return await proto.callRemote(Accept, source=source)
    finally:
        proto.transport.loseConnection()


def register(subparsers) -> None:
    """Add C{accept} to the C{cbackup} command."""
    p = subparsers.add_parser(
        "accept", help="apply a source's held scan (after checking it is right)",
        description="A rescan that deleted or changed more than MAX CHANGE of a source "
        "is held: the backups keep the previous state.  Tell the source's server to "
        "apply it.  Exit 0 when applied; 1 when nothing was held or the server could "
        "not be asked; 2 on a bad config or unknown source.")
    p.add_argument("-c", "--config", required=True, help="the cluster config file")
    p.add_argument("--source", required=True, metavar="HOST:/PATH",
                   help="the source whose held scan to apply")
    p.add_argument("--host", help="ask as this host of the config "
                   "(default: found from this machine's names, else anonymous)")
    p.add_argument("--timeout", type=positive_seconds, default=DEFAULT_TIMEOUT,
                   metavar="SECONDS",
                   help=f"give the server this long to answer (default {DEFAULT_TIMEOUT:g})")
    p.set_defaults(func=cmd_accept)


def cmd_accept(args: argparse.Namespace, out: TextIO, err: TextIO, reactor=None) -> int:
    try:
        cluster = load(args.config)
        secret = read_secret(cluster)
        me = identify_or_none(cluster, args.host)
    except ConfigError as e:
        for problem in e.problems:
            print(problem, file=err)
        return EXIT_BAD_CONFIG
    try:
        host, path = parse_location(args.source)
        source = cluster.source(f"{host}:{path}")
    except (ValueError, KeyError):
        known = ", ".join(s.id for s in cluster.sources) or "none"
        print(f"{cluster.filename}: no source {args.source!r} (sources: {known})", file=err)
        return EXIT_BAD_CONFIG
    if reactor is None:
        from twisted.internet import reactor
    address, port = cluster.address_of(source.host), cluster.options.port
    last = [EXIT_PROBLEM]

    async def work() -> None:
        d = Deferred.fromCoroutine(_accept(reactor, address, port, me or ANONYMOUS_CLIENT,
                                           secret, source.id, args.timeout))
        d.addTimeout(args.timeout, reactor, onTimeoutCancel=timed_out)
        try:
            answer = await d
        except Exception as e:
            print(f"server {source.host} ({address}:{port}): "
                  f"{describe_error(e, args.timeout)}", file=err)
            return
        if not answer["applied"]:
            print(f"{source.id}: no scan is held; nothing to accept", file=out)
            return
        change = json.loads(answer["change"])
        print(f"{source.id}: held scan applied: {describe(change)}", file=out)
        last[0] = EXIT_OK

    return run_until_done(reactor, work, last, err)
