"""
The server: everything C{cbackup-server} runs for the sources of one host.

One L{Ledger} per source, fed by a L{SourceScanner} (now and every
C{rescan}); one rsync daemon serving every source read-only; one AMP
listener on the host's address and C{PORT}.  L{build} only assembles the
service tree: nothing is scanned, spawned or bound until it starts, so
tests can build and inspect it.
"""

from __future__ import annotations

import gc
import os
import signal
import time
from typing import Callable, Optional

from twisted.application.internet import TimerService
from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.endpoints import TCP4ServerEndpoint, TCP6ServerEndpoint
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger

from cluster_backup import accepted as accepted_state
from cluster_backup.config import Cluster, Source, read_secret
from cluster_backup.held import describe
from cluster_backup.ledger import Ledger
from cluster_backup.responder import ServerFactory
from cluster_backup.rsyncd import RsyncDaemon
from cluster_backup.scanner import ScanError, scan

log = Logger()

#: How often the server looks at its ledgers to log safemode and store changes.
WATCH_INTERVAL = 5.0
#: How often the server tells its ledgers it is running (L{Ledger.beat}).
HEARTBEAT = 1.0
#: The fill rule's backstop (Ledger's C{stuck_after}), in report intervals:
#: fill waits for a file below its copies only while it is claimed or fits
#: in some store's reported room (rule 5), and not longer than this
#: without a claim on one (clients renew claims every interval).  Only a
#: store whose room is less than it reported ever leaves this to the timer.
STUCK_INTERVALS = 10


class SourceScanner(Service):
    """
    Scans one source into its ledger at start and every C{interval}
    seconds.  A missing or unreadable source is logged and recorded in the
    ledger as an incomplete scan, never as an empty source; a scan that
    would change too much of it is held by the ledger (L{cluster_backup.held})
    and logged as critical.  C{saved()} is called whenever the ledger's
    accepted state moved, so that it outlives a restart.
    """

    def __init__(self, source: Source, ledger: Ledger, interval: float,
                 skip: list[str], reactor, saved: Callable[[], object] = lambda: None):
        self.source = source
        self.ledger = ledger
        self.skip = skip
        self.reactor = reactor
        self.saved = saved
        self.setName(f"scan {source.id}")
        self._timer = TimerService(interval, self.scan_once)
        self._timer.clock = reactor
        self.scans = 0

    def startService(self) -> None:
        Service.startService(self)
        self._timer.startService()

    def stopService(self) -> Deferred:
        Service.stopService(self)
        return self._timer.stopService()

    @inlineCallbacks
    def scan_once(self):
        """One scan; never raises (a raising TimerService stops for good)."""
        started = time.monotonic()
        accepted = self.ledger.accepted
        self.ledger.scan_started()
        try:
            result = yield scan(self.source.path, self.ledger.scan_batch,
                                exclude=self.source.exclude, skip=self.skip,
                                reactor=self.reactor)
        except ScanError as e:
            self.ledger.scan_finished(False, str(e))
            log.error("scan of {source} failed: {error}", source=self.source.id, error=str(e))
            return
        except Exception:
            self.ledger.scan_finished(False, "internal error during scan")
            log.failure("scan of {source} failed", source=self.source.id)
            return
        error = None
        if not result.complete:
            first = ", ".join(f"{os.fsdecode(p) or '.'} ({why})"
                              for p, why in result.missed_paths[:3])
            error = f"{result.missed} entries could not be read: {first}"
        self.ledger.scan_finished(result.complete, error)
        self.scans += 1
        if self.ledger.accepted != accepted:
            self.saved()
        # The ledger's millions of objects live as long as the server: keep
        # the cyclic GC from walking them all again (a full pass over a big
        # ledger holds the reactor for tens of milliseconds).
        gc.collect()
        gc.freeze()
        log.info(
            "scanned {source}: {files} files, {bytes} B in {seconds:.1f}s"
            "{incomplete}", source=self.source.id, files=result.files,
            bytes=result.bytes, seconds=time.monotonic() - started,
            incomplete="" if result.complete else f" (incomplete: {error})")
        held = self.ledger.status().held
        if held is not None:
            log.critical(
                "scan of {source} HELD: {change} since the last accepted scan, more than "
                "MAX CHANGE allows (unmounted disk? ransomware?); the backups keep the "
                "previous state. If the change is right: cbackup accept -c CONFIG "
                "--source {source}", source=self.source.id, change=describe(held))

    def accept(self) -> Optional[dict]:
        """The operator accepts the held scan (see L{Ledger.accept})."""
        applied = self.ledger.accept()
        if applied is not None:
            log.warn("{source}: held scan accepted by the operator: {change} applied",
                     source=self.source.id, change=describe(applied))
            self.saved()
        return applied


class Saver:
    """
    Keeps every ledger's accepted state in C{state_dir} (L{accepted_state}),
    written in a thread, one write at a time; a save asked for during a
    write makes one more write after it.
    """

    def __init__(self, state_dir: str, ledgers: dict[str, Ledger], reactor):
        self.state_dir = state_dir
        self.ledgers = ledgers
        self.reactor = reactor
        self._writing: Optional[Deferred] = None
        self._again = False

    def save(self) -> None:
        if self._writing is not None:
            self._again = True
            return
        data = {source: ledger.accepted for source, ledger in self.ledgers.items()}
        self._writing = deferToThreadPool(self.reactor, self.reactor.getThreadPool(),
                                          self._write, data)
        self._writing.addErrback(lambda f: log.error(
            "cannot save the accepted scans in {dir}: {why}", dir=self.state_dir,
            why=f.getErrorMessage()))
        self._writing.addBoth(self._written)

    def _write(self, data) -> None:
        os.makedirs(self.state_dir, mode=0o700, exist_ok=True)
        accepted_state.save(self.state_dir, data)

    def _written(self, _) -> None:
        self._writing = None
        if self._again:
            self._again = False
            self.save()


class Listener(Service):
    """
    The AMP listener.  Failing to listen (port taken, address not ours) is
    fatal: logged plainly and the reactor stopped, rather than a server that
    runs but can never be reached.
    """

    def __init__(self, endpoint, factory, reactor, where: str):
        self.endpoint = endpoint
        self.factory = factory
        self.reactor = reactor
        self.where = where
        self.port = None
        self.setName("AMP listener")

    def startService(self) -> None:
        Service.startService(self)
        d = self.endpoint.listen(self.factory)
        d.addCallbacks(self._listening, self._failed)

    def _listening(self, port) -> None:
        self.port = port
        log.info("listening for backup clients on {where}", where=self.where)

    def _failed(self, failure) -> None:
        log.critical("cannot listen on {where}: {why}; stopping", where=self.where,
                     why=failure.getErrorMessage())
        if self.reactor.running:
            self.reactor.stop()

    def stopService(self):
        Service.stopService(self)
        if self.port is not None:
            port, self.port = self.port, None
            return port.stopListening()


def _daemon_pid(state_dir: str) -> Optional[int]:
    """
    The pid of an rsync daemon still serving with C{state_dir}'s config: one
    a server killed without its cleanup (KILL, OOM) left behind, holding the
    rsync port.  Found by its pid file, checked against its command line.
    """
    config = os.path.join(state_dir, "rsyncd.conf")
    try:
        with open(os.path.join(state_dir, "rsyncd.pid")) as f:
            pid = int(f.read().split()[0])
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
    except (OSError, ValueError, IndexError):
        return None
    if state == b"Z" or b"--daemon" not in argv or b"--config=" + os.fsencode(config) not in argv:
        return None
    return pid


def reap_stale_daemon(state_dir: str, grace: float = 5.0) -> Optional[int]:
    """
    End the rsync daemon a previous server left running in C{state_dir}, if
    any (TERM, then KILL after C{grace} seconds); returns its pid.  Blocks
    for at most C{grace} seconds, once, at start.  Its transfers in flight
    run on in their own processes and finish.
    """
    pid = _daemon_pid(state_dir)
    if pid is None:
        return None
    log.warn("an rsync daemon (pid {pid}) left by a previous server holds the rsync "
             "port; stopping it", pid=pid)
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, grace)):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return pid
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if _daemon_pid(state_dir) != pid:
                return pid
            time.sleep(0.05)
    log.error("the rsync daemon left by a previous server (pid {pid}) did not stop",
              pid=pid)
    return pid


class StaleDaemonReaper(Service):
    """Runs L{reap_stale_daemon} at start, before the rsync daemon is spawned."""

    def __init__(self, state_dir: str):
        self.state_dir = state_dir
        self.setName("stale rsync daemon reaper")

    def startService(self) -> None:
        Service.startService(self)
        try:
            reap_stale_daemon(self.state_dir)
        except Exception:
            log.failure("looking for a stale rsync daemon")


class Heartbeat(TimerService):
    """
    Tells every ledger the server runs, every L{HEARTBEAT} seconds, so that
    time the process was stopped or blocked is not taken for the stores'
    silence (L{Ledger.beat}).
    """

    def __init__(self, ledgers: dict[str, Ledger], reactor):
        super().__init__(HEARTBEAT, self.beat)
        self.clock = reactor
        self.ledgers = ledgers
        self.deaf = {source: 0.0 for source in ledgers}

    def beat(self) -> None:
        for source, ledger in self.ledgers.items():
            try:
                ledger.beat()
                deaf = ledger.deaf_seconds
            except Exception:
                log.failure("heartbeat of {source}", source=source)
                continue
            if deaf > self.deaf[source]:
                log.warn("{source}: the server was not running for {seconds:.1f}s; "
                         "leases and claims extended by that", source=source,
                         seconds=deaf - self.deaf[source])
                self.deaf[source] = deaf


class SafemodeWatch(TimerService):
    """Logs when a ledger leaves (or enters) safemode, and stores dying."""

    def __init__(self, ledgers: dict[str, Ledger], reactor):
        super().__init__(WATCH_INTERVAL, self.check)
        self.clock = reactor
        self.ledgers = ledgers
        self.last = {source: None for source in ledgers}
        self.deaths = {source: dict(ledger.deaths) for source, ledger in ledgers.items()}
        self.dead: dict[str, set[str]] = {source: set() for source in ledgers}

    def check(self) -> None:
        for source, ledger in self.ledgers.items():
            try:
                now = ledger.safemode
                self._stores(source, ledger)
            except Exception:
                log.failure("safemode check of {source}", source=source)
                continue
            if now != self.last[source]:
                log.info("{source}: safemode {state}", source=source,
                         state="on (waiting for stores to report)" if now else "off")
                self.last[source] = now

    def _stores(self, source: str, ledger: Ledger) -> None:
        dead = set()
        for st in ledger.store_status():
            if st.state == "dead":
                dead.add(st.store)
            if ledger.deaths[st.store] > self.deaths[source].get(st.store, 0):
                log.warn("{source}: store {store} is dead (silent {age:.0f}s); its copies "
                         "no longer count", source=source, store=st.store,
                         age=st.last_report_age or 0)
            elif st.store in self.dead[source] and st.state != "dead":
                log.info("{source}: store {store} is back", source=source, store=st.store)
        self.deaths[source] = dict(ledger.deaths)
        self.dead[source] = dead


class TrafficLog(TimerService):
    """Logs how many connections and commands the server handled, now and then."""

    def __init__(self, factory: ServerFactory, interval: float, reactor):
        super().__init__(interval, self.tell)
        self.clock = reactor
        self.factory = factory
        self.since: Optional[float] = None

    def tell(self) -> None:
        now = self.clock.seconds()
        since, self.since = self.since, now
        counts = self.factory.traffic.copy()
        self.factory.traffic.clear()
        if since is None or not counts:
            return
        log.info("traffic in {seconds:.1f}s: {connections} connections, {reports} reports, "
                 "{needs} needs lists, {claims} claims, {releases} releases",
                 seconds=now - since, connections=counts.get("connections", 0),
                 reports=counts.get("report", 0), needs=counts.get("list-needs", 0),
                 claims=counts.get("claim", 0), releases=counts.get("release", 0))


def _listen_endpoint(reactor, address: Optional[str], port: int):
    if address and ":" in address:
        return TCP6ServerEndpoint(reactor, port, interface=address.strip("[]"))
    return TCP4ServerEndpoint(reactor, port, interface=address or "")


def _bind_address(cluster: Cluster, host: str) -> Optional[str]:
    """The host's C{address:} when given; else None (all interfaces)."""
    address = cluster.address_of(host)
    return None if address == host else address


def build(cluster: Cluster, host: str, state_dir: str, reactor) -> MultiService:
    """
    The service tree of C{cbackup-server} for C{host}: per source a ledger
    and a scanner, the rsync daemon, the AMP listener and the safemode
    watch.  Raises L{ConfigError} for an unreadable C{SECRET FILE}.
    """
    options = cluster.options
    secret = read_secret(cluster)
    top = MultiService()
    sources = cluster.sources_on(host)
    ledgers: dict[str, Ledger] = {}
    scanners: dict[str, SourceScanner] = {}
    baseline = accepted_state.load(state_dir)
    saving = Saver(state_dir, ledgers, reactor)
    for source in sources:
        stores = {store.id: store.host for store in cluster.stores_for(source)}
        ledgers[source.id] = Ledger(
            source.id, source.copies, reactor, stores,
            report_interval=options.report_interval, dead_after=options.dead_after,
            heartbeat=HEARTBEAT, accepted=baseline.get(source.id),
            stuck_after=STUCK_INTERVALS * options.report_interval,
            max_change=(source.max_change if source.max_change is not None
                        else options.max_change))
        # Stores of this host inside the source are never scanned as data.
        skip = [store.path for store in cluster.stores_on(host)]
        scanners[source.id] = SourceScanner(
            source, ledgers[source.id], source.rescan or options.rescan, skip, reactor,
            saved=saving.save)
        scanners[source.id].setServiceParent(top)
    bind = _bind_address(cluster, host)
    StaleDaemonReaper(os.path.join(state_dir, "rsyncd")).setServiceParent(top)
    daemon = RsyncDaemon(
        reactor, os.path.join(state_dir, "rsyncd"), bind or "0.0.0.0",
        options.rsync_port, [s.path for s in sources], host, secret=secret)
    daemon.setName("rsync daemon")
    daemon.setServiceParent(top)
    reach = cluster.address_of(host)
    paths = {s.id: s.path for s in sources}

    def rsync_endpoint(source_id: str):
        _, port, module, user, password = daemon.endpoint(paths[source_id])
        return (reach, port, module, user, password)

    backs = {s.id: {store.id for store in cluster.stores_for(s)} for s in sources}
    factory = ServerFactory(
        ledgers, {store.id: store.host for store in cluster.stores}, secret, host,
        rsync_endpoint, reactor, serves=lambda store, source: store in backs.get(source, ()),
        accept=lambda source: scanners[source].accept())
    listener = Listener(_listen_endpoint(reactor, bind, options.port), factory, reactor,
                        f"{bind or '*'}:{options.port}")
    listener.setServiceParent(top)
    Heartbeat(ledgers, reactor).setServiceParent(top)
    SafemodeWatch(ledgers, reactor).setServiceParent(top)
    TrafficLog(factory, min(60.0, max(WATCH_INTERVAL, options.report_interval)),
               reactor).setServiceParent(top)
    top.ledgers = ledgers
    top.factory = factory
    top.daemon = daemon
    return top
