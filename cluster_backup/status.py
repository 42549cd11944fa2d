"""
C{cbackup status}: ask every server how its sources and stores are doing.

C{cbackup status -c FILE [--json] [--watch SECONDS] [--host NAME]
[--timeout SECONDS]} connects to each host that has sources (its
C{address:} and PORT), authenticates with the config's secret, follows the
L{Status} pages, and prints, per source, a histogram of files by live copies
against the copies wanted, and per store, what the servers last heard from
it.  Servers are asked concurrently, each within C{--timeout}; one that
cannot be asked is shown with the reason and hides nothing else.

Exit status, for monitoring: 0 when every source was reached, is out of
safemode, had a complete scan, has no scan error and no held scan, and has
every file at its copies, and no store is stale or dead; 1 when a source
is not so; 3 when the sources are fine but a store has stopped reporting (C{stale}:
silent for 3 report intervals, or C{dead}: past DEAD AFTER), the early
warning before copies go missing; 2 for a bad config (C{FILE:LINE: problem}
on stderr).

The network part (L{ask_server}, L{ask_all}) only gathers L{Answer}s;
everything after is pure: L{build} turns a config and answers into a
L{Report}, which L{render_text}, L{to_json} and L{exit_code} read.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Optional, Sequence, TextIO

from attrs import frozen
from twisted.internet import error as net_error
from twisted.internet.defer import (
    CancelledError,
    Deferred,
    TimeoutError as DeferredTimeoutError,
    gatherResults,
)
from twisted.internet.endpoints import connectProtocol
from twisted.internet.task import deferLater
from twisted.protocols import amp
from twisted.python.failure import Failure

from cluster_backup import session
from cluster_backup.config import Cluster, ConfigError, load, read_secret
from cluster_backup.held import describe
from cluster_backup.identity import identify_or_none
from cluster_backup.protocol import AuthFailed
from cluster_backup.records import SourceStatus, StoreStatus
from cluster_backup.units import human_size

EXIT_OK = 0
EXIT_PROBLEM = 1
EXIT_BAD_CONFIG = 2
#: Every source is fine, but a store is stale or dead (L{SILENT_STATES}).
EXIT_STALE = 3
#: The store states that mean its client has stopped reporting.
SILENT_STATES = ("stale", "dead")

#: The name we give in L{Hello} when this machine is no host of the config.
ANONYMOUS_CLIENT = "cbackup-status"
DEFAULT_TIMEOUT = 10.0
#: Copy counts above this are drawn as C{#x17} instead of 17 marks.
MAX_MARKS = 12
#: Freshest first: the state a merged store takes.
STATE_ORDER = ("live", "stale", "dead", "new")
CLEAR_SCREEN = "\x1b[H\x1b[2J"


# --- what the servers said ------------------------------------------------


@frozen
class Answer:
    """
    One server's answer: the statuses of its sources and of the stores
    backing them up, or C{error} saying why it could not be asked.
    """

    host: str
    address: str
    port: int
    sources: tuple[SourceStatus, ...] = ()
    stores: tuple[tuple[str, StoreStatus], ...] = ()  # (source id, store status)
    error: Optional[str] = None


def describe_error(reason: BaseException | Failure, timeout: float) -> str:
    """Why a server could not be asked, in a few words for the operator."""
    e = reason.value if isinstance(reason, Failure) else reason
    if isinstance(e, (DeferredTimeoutError, net_error.TimeoutError, CancelledError)):
        return f"no answer within {timeout:g}s"
    if isinstance(e, net_error.ConnectionRefusedError):
        return "connection refused (is cbackup-server running?)"
    if isinstance(e, net_error.DNSLookupError):
        return "cannot resolve the host name (set address: in the config)"
    if isinstance(e, AuthFailed):
        return f"authentication failed: {e} (is the SECRET the same?)"
    if isinstance(e, (net_error.ConnectionLost, net_error.ConnectionDone)):
        return "the server closed the connection"
    if isinstance(e, net_error.ConnectError):
        return f"cannot connect: {e.osError or e}"
    if isinstance(e, (amp.TooLong, amp.IncompatibleVersions, amp.UnhandledCommand)):
        return (f"what answered on that port does not speak this version of the "
                f"cluster-backup protocol ({type(e).__name__}: is PORT right?)")
    if isinstance(e, amp.RemoteAmpError):
        return f"the server refused: {e.description}"
    return f"{type(e).__name__}: {e}"


async def _converse(reactor, address, port, client_host, secret, timeout):
    proto = await connectProtocol(session.server_endpoint(reactor, address, port, timeout), amp.AMP())
    try:
        await session.login(proto, client_host, secret)
        return await session.status_all(proto)
    finally:
        proto.transport.loseConnection()


def timed_out(result, timeout: float):
    # Whatever the cancel produced (ConnectingCancelledError while
    # connecting, CancelledError later), the reason is the timeout.
    raise DeferredTimeoutError(timeout)


def ask_server(
    reactor,
    host: str,
    address: str,
    port: int,
    client_host: str,
    secret: Optional[bytes],
    timeout: float,
) -> Deferred[Answer]:
    """
    Connect, log in and read every L{Status} page, all within C{timeout}
    seconds; fires with an L{Answer} (never fails: errors become its
    C{error}).
    """
    d = Deferred.fromCoroutine(
        _converse(reactor, address, port, client_host, secret, timeout)
    )
    d.addTimeout(timeout, reactor, onTimeoutCancel=timed_out)

    def answered(result):
        sources, stores = result
        return Answer(host, address, port, tuple(sources), tuple(stores))

    def failed(reason: Failure):
        return Answer(host, address, port, error=describe_error(reason, timeout))

    return d.addCallbacks(answered, failed)


def server_hosts(cluster: Cluster) -> list[str]:
    """The hosts that run a server (those with sources), in config order."""
    return list(dict.fromkeys(s.host for s in cluster.sources))


def ask_all(
    reactor, cluster: Cluster, client_host: str, secret: Optional[bytes], timeout: float
) -> Deferred[list[Answer]]:
    """Ask every server at once; fires with their L{Answer}s in config order."""
    port = cluster.options.port
    return gatherResults(
        [
            ask_server(reactor, host, cluster.address_of(host), port, client_host,
                       secret, timeout)
            for host in server_hosts(cluster)
        ]
    )


# --- the report: pure from here on ----------------------------------------


@frozen
class SourceView:
    """
    A source as the report shows it.  C{status} is None when its server
    could not be asked (C{reachable} false) or did not report it; C{error}
    says why.  C{scan_age} is seconds since the last complete scan ended,
    by this machine's clock against the server's (so it assumes the clocks
    agree; a negative skew shows as 0).
    """

    source: str
    copies: int
    server: str
    reachable: bool
    status: Optional[SourceStatus] = None
    error: Optional[str] = None
    scan_age: Optional[float] = None
    #: The backup hosts whose copies count (the config's; the own-host
    #: rule, L{Cluster.backs_up}, leaves out the source's host) and the
    #: stores on the source's host, which do not back it up.
    hosts: tuple[str, ...] = ()
    own: tuple[str, ...] = ()

    @property
    def problems(self) -> list[str]:
        """What keeps this source from being fine; empty when it is."""
        if not self.reachable:
            return ["unreachable"]
        s = self.status
        if s is None:
            return ["not reported"]
        out = []
        if s.safemode:
            out.append("safemode")
        if s.held is not None:
            out.append(f"held: {s.held['deleted_files']:,} deleted, "
                       f"{s.held['changed_files']:,} changed")
        if s.scanned is None:
            out.append("no complete scan yet")
        if s.scan_error:
            out.append("scan error")
        if s.under_files:
            out.append(f"{s.under_files:,} files below {copies_text(s.copies)}")
        if s.too_big:
            out.append(f"{s.too_big['files']:,} files too big for {copies_text(s.copies)}")
        return out


@frozen
class StoreView:
    """
    A store merged over every source it backs up: files and bytes summed,
    the freshest state and smallest report age, claims summed.  C{state} is
    None when no reachable server reported it.
    """

    store: str
    state: Optional[str]
    files: Optional[int] = None
    bytes: Optional[int] = None
    last_report_age: Optional[float] = None
    quota: Optional[int] = None
    used: Optional[int] = None
    claims: Optional[int] = None


@frozen
class Report:
    """Everything one round of asking found out."""

    config: str
    sources: tuple[SourceView, ...]
    stores: tuple[StoreView, ...]
    servers: tuple[Answer, ...]
    now: float


def merge_stores(
    pairs: Sequence[tuple[str, StoreStatus]],
    known: Sequence[str] = (),
    quotas: Optional[dict[str, Optional[int]]] = None,
) -> list[StoreView]:
    """
    Merge the (source, store status) pairs of every server into one view
    per store.  C{known} lists the config's store ids (shown even when
    nobody reported them, in that order; others follow as first seen);
    C{quotas} gives the config's sizes, used when no server knows a quota.
    """
    quotas = quotas or {}
    by_store: dict[str, list[StoreStatus]] = {sid: [] for sid in known}
    for _source, st in pairs:
        by_store.setdefault(st.store, []).append(st)
    views = []
    for sid, seen in by_store.items():
        if not seen:
            views.append(StoreView(sid, None, quota=quotas.get(sid)))
            continue
        fresh = sorted(seen, key=lambda st: (
            STATE_ORDER.index(st.state) if st.state in STATE_ORDER else len(STATE_ORDER),
            st.last_report_age if st.last_report_age is not None else float("inf")))
        ages = [st.last_report_age for st in seen if st.last_report_age is not None]
        quota = next((st.quota for st in fresh if st.quota is not None), quotas.get(sid))
        views.append(StoreView(
            store=sid,
            state=fresh[0].state,
            files=sum(st.files for st in seen),
            bytes=sum(st.bytes for st in seen),
            last_report_age=min(ages) if ages else None,
            quota=quota,
            used=next((st.used for st in fresh if st.used is not None), None),
            claims=sum(st.claims for st in seen),
        ))
    return views


def build(cluster: Cluster, answers: Sequence[Answer], now: float) -> Report:
    """
    The report for C{cluster} from its servers' C{answers}, at clock time
    C{now}: every configured source (in config order, then any a server
    reported that the config lacks) and every store.
    """
    by_host = {a.host: a for a in answers}
    reported = {s.source: s for a in answers for s in a.sources}
    views = []
    for source in cluster.sources:
        where = dict(
            hosts=tuple(dict.fromkeys(st.host for st in cluster.stores_for(source))),
            own=tuple(st.id for st in cluster.stores
                      if cluster.same_host(st.host, source.host)))
        answer = by_host.get(source.host)
        if answer is None or answer.error is not None:
            views.append(SourceView(
                source.id, source.copies, source.host, reachable=False,
                error=answer.error if answer else "not asked", **where))
            continue
        status = reported.pop(source.id, None)
        if status is None:
            views.append(SourceView(
                source.id, source.copies, source.host, reachable=True,
                error="the server does not report this source (is its config the same?)",
                **where))
            continue
        views.append(_source_view(status, source.host, now, **where))
    for status in reported.values():  # the servers know sources this config lacks
        views.append(_source_view(status, status.source.partition(":")[0], now))
    pairs = [pair for a in answers for pair in a.stores]
    stores = merge_stores(pairs, [st.id for st in cluster.stores],
                          {st.id: st.size for st in cluster.stores})
    return Report(cluster.filename, tuple(views), tuple(stores), tuple(answers), now)


def _source_view(status: SourceStatus, server: str, now: float, **where) -> SourceView:
    age = None if status.scanned is None else max(0.0, now - status.scanned)
    return SourceView(status.source, status.copies, server, reachable=True,
                      status=status, scan_age=age, **where)


def silent_stores(report: Report) -> list[StoreView]:
    """The stores that have stopped reporting (stale or dead)."""
    return [st for st in report.stores if st.state in SILENT_STATES]


def exit_code(report: Report) -> int:
    """
    1 when a source needs attention (see L{SourceView.problems}); else 3
    when a store is stale or dead (L{silent_stores}); else 0.
    """
    if any(v.problems for v in report.sources):
        return EXIT_PROBLEM
    return EXIT_STALE if silent_stores(report) else EXIT_OK


def _round(seconds: Optional[float]) -> Optional[float]:
    return None if seconds is None else round(seconds, 1)


def to_json(report: Report) -> dict:
    """The C{--json} object (plain data; the secret is never part of it)."""
    sources = []
    for v in report.sources:
        s = v.status
        item = {"source": v.source, "copies": v.copies, "reachable": v.reachable,
                "error": v.error, "backup_hosts": list(v.hosts),
                "own_host_stores": list(v.own)}
        if s is None:
            item.update(files=None, bytes=None, histogram=None, under_replicated=None,
                        safemode=None, scanned=None, scan_age=None, scan_error=None,
                        held=None, too_big=None)
        else:
            item.update(
                files=s.files, bytes=s.bytes,
                histogram={str(c): fb[0] for c, fb in sorted(s.histogram.items())},
                under_replicated={"files": s.under_files, "bytes": s.under_bytes},
                safemode=s.safemode, scanned=s.scanned is not None,
                scan_age=_round(v.scan_age), scan_error=s.scan_error, held=s.held,
                too_big=s.too_big)
        item["ok"] = not v.problems
        sources.append(item)
    stores = [
        {"store": st.store, "quota": st.quota, "used": st.used, "files": st.files,
         "bytes": st.bytes, "state": st.state, "last_report_age": _round(st.last_report_age),
         "claims": st.claims}
        for st in report.stores
    ]
    servers = [{"host": a.host, "address": a.address, "port": a.port,
                "reachable": a.error is None, "error": a.error}
               for a in report.servers]
    return {"config": report.config, "ok": exit_code(report) == EXIT_OK,
            "sources": sources, "stores": stores, "servers": servers}


# --- text -----------------------------------------------------------------


def age(seconds: Optional[float]) -> str:
    """A short age for people: C{4s}, C{12m}, C{3h05m}, C{2d04h}."""
    if seconds is None:
        return "never"
    s = int(max(0.0, seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def marks(count: int, wanted: int) -> str:
    """One C{#} per live copy and one C{_} per copy still wanted: C{#_}."""
    if max(count, wanted) > MAX_MARKS:
        return f"#x{count}" + (f" _x{wanted - count}" if count < wanted else "")
    return "#" * count + "_" * max(0, wanted - count)


def histogram_rows(status: SourceStatus) -> list[tuple[int, int, int, str, bool]]:
    """
    C{(copies, files, bytes, marks, wanted)} per live-copy count present,
    plus the wanted count's row even when no file is there, ascending.
    """
    counts = dict(status.histogram)
    counts.setdefault(status.copies, [0, 0])
    return [(c, counts[c][0], counts[c][1], marks(c, status.copies), c == status.copies)
            for c in sorted(counts)]


def _table(rows: list[list[str]], right: Sequence[bool], indent: str = "  ") -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return [
        indent + "  ".join(
            cell.rjust(w) if r else cell.ljust(w)
            for cell, w, r in zip(row, widths, right)
        ).rstrip()
        for row in rows
    ]


def copies_text(n: int) -> str:
    """C{1 copy}, C{2 copies}."""
    return f"{n} copy" if n == 1 else f"{n} copies"


def _source_text(v: SourceView) -> list[str]:
    verdict = "OK" if not v.problems else "ATTENTION: " + "; ".join(v.problems)
    lines = [f"source {v.source}  wants {copies_text(v.copies)}  {verdict}"]
    if v.own:
        lines.append(f"  copies count on {len(v.hosts)} backup host(s), not on the "
                     f"source's own host: {', '.join(v.own)} does not back it up")
    s = v.status
    if s is None:
        lines.append(f"  no figures: server {v.server}: {v.error}")
        return lines
    if s.scanned is None:
        scan = "no complete scan yet (figures so far)"
    else:
        scan = f"last complete scan ended {age(v.scan_age)} ago"
    lines.append(f"  {s.files:,} files, {human_size(s.bytes)}; {scan}")
    if s.scan_error:
        lines.append(f"  scan error: {s.scan_error}")
    if s.held is not None:
        lines.append(f"  HELD scan: {describe(s.held)} since the last accepted scan "
                     "(more than MAX CHANGE); the backups keep the previous state")
        lines.append(f"    if the change is right: cbackup accept -c CONFIG --source {v.source}")
    if s.safemode:
        lines.append("  safemode: the server waits for its stores to report what they "
                     "hold (after a restart, or a reload that added this source: reload "
                     "the clients too); no new copies until then")
    if s.files:
        rows = [["copies", "files", "bytes", ""]]
        for c, files, size, m, wanted in histogram_rows(s):
            rows.append([str(c), f"{files:,}", human_size(size),
                         m + ("   <- wanted" if wanted else "")])
        lines += _table(rows, (True, True, True, False), indent="    ")
        if s.under_files:
            lines.append(f"  below {copies_text(s.copies)}: {s.under_files:,} files, "
                         f"{human_size(s.under_bytes)}")
        else:
            lines.append(f"  every file has at least {copies_text(s.copies)}")
    if s.too_big:
        big = s.too_big
        lines.append(f"  {big['files']:,} files ({human_size(big['bytes'])}) can never have "
                     f"{copies_text(s.copies)}: larger than {human_size(big['copies_room'])}, "
                     f"they fit in the quota of fewer than {s.copies} backup hosts")
        for path, size, hosts in big["examples"]:
            lines.append(f"    {path!r} ({human_size(size)}) fits on {hosts} host(s)")
    return lines


def _store_text(stores: Sequence[StoreView]) -> list[str]:
    rows = [["store", "state", "reported", "used", "quota", "files", "bytes", "claims"]]
    for st in stores:
        if st.state is None:
            rows.append([st.store, "?", "-", "-", _size(st.quota), "-", "-", "-"])
            continue
        reported = "never" if st.last_report_age is None else f"{age(st.last_report_age)} ago"
        rows.append([st.store, st.state, reported, _size(st.used), _size(st.quota),
                     f"{st.files:,}", human_size(st.bytes), str(st.claims)])
    lines = _table(rows, (False, False, True, True, True, True, True, True))
    if any(st.state is None for st in stores):
        lines.append("  ?: no reachable server reports this store")
    lines.append("  claims: files being fetched now (the servers know no byte progress)")
    return lines


def _size(n: Optional[int]) -> str:
    return "-" if n is None else human_size(n)


def render_text(report: Report) -> str:
    """The human form of C{report}."""
    answered = sum(1 for a in report.servers if a.error is None)
    clock = time.strftime("%H:%M:%S", time.localtime(report.now))
    head = (f"cluster {report.config} at {clock}: "
            f"{answered} of {len(report.servers)} servers answered")
    lines = [head]
    for a in report.servers:
        if a.error is not None:
            lines.append(f"  server {a.host} ({a.address}:{a.port}) UNREACHABLE: {a.error}")
    for v in report.sources:
        lines.append("")
        lines += _source_text(v)
    lines.append("")
    lines += _store_text(report.stores) if report.stores else ["no stores"]
    if answered < len(report.servers):
        lines.append("  store files and bytes count only the sources of servers that answered")
    if any(v.status is not None and v.status.files for v in report.sources):
        lines.append("  marks: # a live copy, _ a copy still wanted")
    bad = sum(1 for v in report.sources if v.problems)
    verdict = ("all sources ok" if not bad else
               f"{bad} of {len(report.sources)} sources need attention")
    silent = silent_stores(report)
    if silent:
        verdict += (f"; {len(silent)} store{'s' if len(silent) > 1 else ''} not reporting: "
                    + ", ".join(f"{st.store} {st.state} ("
                                + ("never reported" if st.last_report_age is None else
                                   f"last report {age(st.last_report_age)} ago") + ")"
                                for st in silent))
    lines.append("")
    lines.append(verdict)
    return "\n".join(lines) + "\n"


# --- the command ----------------------------------------------------------


def positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}")
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0, got {text!r}")
    return value


def register(subparsers) -> None:
    """Add C{status} to the C{cbackup} command."""
    p = subparsers.add_parser(
        "status", help="ask every server how replication is going",
        description="Ask every server (concurrently) for its sources' copies "
        "and its stores' reports.  Exit 0 when every source is reachable, out "
        "of safemode, scanned without error or held change, and at its copies, "
        "and no store is stale or dead; 1 when a source is not so; 3 when the sources "
        "are fine but a store is stale or dead (its client silent for 3 report "
        "intervals, or past DEAD AFTER); 2 on a bad config.")
    p.add_argument("-c", "--config", required=True, help="the cluster config file")
    p.add_argument("--json", action="store_true", help="print one JSON object "
                   "(with --watch, one per line)")
    p.add_argument("--watch", type=positive_seconds, metavar="SECONDS",
                   help="ask again every SECONDS until Ctrl-C")
    p.add_argument("--host", help="ask as this host of the config "
                   "(default: found from this machine's names, else anonymous)")
    p.add_argument("--timeout", type=positive_seconds, default=DEFAULT_TIMEOUT,
                   metavar="SECONDS",
                   help=f"give each server this long to answer (default {DEFAULT_TIMEOUT:g})")
    p.set_defaults(func=cmd_status)


def frame(report: Report, as_json: bool, watching: bool, tty: bool) -> str:
    """What one round prints."""
    if as_json:
        data = to_json(report)
        if watching:
            return json.dumps(data) + "\n"
        return json.dumps(data, indent=2) + "\n"
    text = render_text(report)
    return (CLEAR_SCREEN + text) if (watching and tty) else text


async def _rounds(reactor, cluster, client_host, secret, args, out, last: list) -> int:
    tty = out.isatty() if hasattr(out, "isatty") else False
    while True:
        answers = await ask_all(reactor, cluster, client_host, secret, args.timeout)
        report = build(cluster, answers, reactor.seconds())
        out.write(frame(report, args.json, args.watch is not None, tty))
        out.flush()
        last[0] = exit_code(report)
        if args.watch is None:
            return last[0]
        await deferLater(reactor, args.watch, lambda: None)


def run_until_done(reactor, work, last: list, err: TextIO) -> int:
    """Run the reactor until C{work()} is done or Ctrl-C; return its code."""
    def done(result):
        if isinstance(result, Failure):
            err.write(result.getTraceback())
            last[0] = EXIT_PROBLEM
        if reactor.running:
            reactor.stop()

    reactor.callWhenRunning(lambda: Deferred.fromCoroutine(work()).addBoth(done))
    reactor.run()
    return last[0]


def cmd_status(args: argparse.Namespace, out: TextIO, err: TextIO, reactor=None) -> int:
    try:
        cluster = load(args.config)
        secret = read_secret(cluster)
        me = identify_or_none(cluster, args.host)  # several hosts match: anonymous
    except ConfigError as e:
        for problem in e.problems:
            print(problem, file=err)
        return EXIT_BAD_CONFIG
    if not cluster.sources:
        print(f"{cluster.filename}: no sources, so no servers to ask", file=err)
        return EXIT_PROBLEM
    if reactor is None:
        from twisted.internet import reactor
    last = [EXIT_PROBLEM]
    return run_until_done(reactor, lambda: _rounds(reactor, cluster, me or ANONYMOUS_CLIENT,
                                         secret, args, out, last), last, err)
