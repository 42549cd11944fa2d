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
import re
import signal
import time
from typing import Callable, Optional

from twisted.application.internet import TimerService
from twisted.application.service import Service
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.endpoints import TCP4ServerEndpoint, TCP6ServerEndpoint
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger

from cluster_backup import accepted as accepted_state
from cluster_backup.config import Cluster, ConfigError, Source, read_secret
from cluster_backup.held import describe
from cluster_backup.identity import listen_address
from cluster_backup.ledger import Ledger
from cluster_backup.lifecycle import Fatal, Guarded, port_free, private_dir
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
#: Where the servers' state dirs live by default, one per host (L{default_state_dir}).
STATE_ROOT = "/var/lib/cluster-backup/server"


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

    def configure(self, source: Source, interval: float, skip: list[str]) -> None:
        """
        A reloaded config: the source's excludes and folders to skip apply
        from the next scan, the new interval from the next wait.
        """
        self.source = source
        self.skip = skip
        self._timer.step = interval
        loop = getattr(self._timer, "_loop", None)
        if loop is not None:
            loop.interval = interval

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
    fatal (L{Fatal}): a server that runs but can never be reached would
    only look healthy.
    """

    def __init__(self, endpoint, factory, reactor, where: str, fatal: Fatal):
        self.endpoint = endpoint
        self.factory = factory
        self.reactor = reactor
        self.where = where
        self.fatal = fatal
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
        self.fatal(f"cannot listen on {self.where}: {failure.getErrorMessage()}")

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
            if deaf > self.deaf.get(source, 0.0):
                log.warn("{source}: the server was not running for {seconds:.1f}s; "
                         "leases and claims extended by that", source=source,
                         seconds=deaf - self.deaf.get(source, 0.0))
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
            if now != self.last.get(source):
                log.info("{source}: safemode {state}", source=source,
                         state="on (waiting for stores to report)" if now else "off")
                self.last[source] = now

    def _stores(self, source: str, ledger: Ledger) -> None:
        dead = set()
        for st in ledger.store_status():
            if st.state == "dead":
                dead.add(st.store)
            if ledger.deaths[st.store] > self.deaths.get(source, {}).get(st.store, 0):
                log.warn("{source}: store {store} is dead (silent {age:.0f}s); its copies "
                         "no longer count", source=source, store=st.store,
                         age=st.last_report_age or 0)
            elif st.store in self.dead.get(source, ()) and st.state != "dead":
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
        return TCP6ServerEndpoint(reactor, port, interface=address)
    return TCP4ServerEndpoint(reactor, port, interface=address or "")


def default_state_dir(host: str) -> str:
    """
    The state dir of C{host}'s server when C{--state-dir} is not given: one
    per host, so two servers on one machine (two hosts of one config, a
    test, a container) never share their rsync daemon's files.
    """
    slug = re.sub(r"[^A-Za-z0-9._-]", "_", host).lstrip(".") or "_"
    return os.path.join(STATE_ROOT, slug)


class Server(Guarded):
    """
    The service tree of C{cbackup-server} for one host: per source a
    ledger and a scanner, the rsync daemon, the AMP listener and the
    watches.  Nothing is scanned, spawned or bound until it starts, and
    then only once its checks pass (L{Guarded}): the state dir is private
    and writable, and both ports can be bound on the host's address.

    L{reload} applies a new config to the running tree: sources and the
    stores backing them up come and go, options and the secret change,
    and every ledger that stays keeps its scan, its copies and its leases.
    """

    def __init__(self, cluster: Cluster, host: str, state_dir: str, reactor,
                 fatal: Optional[Fatal] = None, legacy_state_dir: Optional[str] = None):
        self.fatal = fatal or Fatal(reactor, "cbackup-server")
        super().__init__([], self.fatal)
        self.host = host
        self.state_dir = state_dir
        self.reactor = reactor
        self.cluster = cluster
        options = cluster.options
        self.bind, problem = listen_address(cluster, host)
        if problem:
            raise ConfigError([f"{cluster.filename}: {problem}"])
        self.secret = read_secret(cluster)
        self.ledgers: dict[str, Ledger] = {}
        self.scanners: dict[str, SourceScanner] = {}
        self.paths: dict[str, str] = {}
        self.backs: dict[str, set[str]] = {}
        self.store_hosts: dict[str, str] = {}
        self.baseline = accepted_state.load(state_dir)
        if not self.baseline and legacy_state_dir:
            # A server upgraded from the time the default state dir was one
            # for every host: its baselines (keyed by source id) still hold.
            old = accepted_state.load(legacy_state_dir)
            self.baseline = {s.id: old[s.id] for s in cluster.sources_on(host) if s.id in old}
        self.saving = Saver(state_dir, self.ledgers, reactor)
        rsync_dir = os.path.join(state_dir, "rsyncd")
        self.checks = [lambda: private_dir(state_dir),
                       lambda: reap_stale_daemon(rsync_dir) and None,
                       lambda: port_free(self.bind, options.port, "PORT"),
                       lambda: port_free(self.bind, options.rsync_port, "RSYNC PORT")]
        sources = cluster.sources_on(host)
        for source in sources:
            self._add_source(cluster, source)
        self._set_stores(cluster)
        self.daemon = RsyncDaemon(
            reactor, rsync_dir, self.bind or "0.0.0.0", options.rsync_port,
            [s.path for s in sources], host, secret=self.secret)
        self.daemon.setName("rsync daemon")
        self.daemon.setServiceParent(self)
        reach = cluster.address_of(host)

        def rsync_endpoint(source_id: str):
            _, port, module, user, password = self.daemon.endpoint(self.paths[source_id])
            return (reach, port, module, user, password)

        self.factory = ServerFactory(
            self.ledgers, self.store_hosts, self.secret, host, rsync_endpoint, reactor,
            serves=lambda store, source: store in self.backs.get(source, ()),
            accept=lambda source: self.scanners[source].accept())
        where = f"{self.bind or '*'}:{options.port}"
        listener = Listener(_listen_endpoint(reactor, self.bind, options.port), self.factory,
                            reactor, where, self.fatal)
        listener.setServiceParent(self)
        Heartbeat(self.ledgers, reactor).setServiceParent(self)
        SafemodeWatch(self.ledgers, reactor).setServiceParent(self)
        TrafficLog(self.factory, min(60.0, max(WATCH_INTERVAL, options.report_interval)),
                   reactor).setServiceParent(self)

    def _ledger_options(self, cluster: Cluster, source: Source) -> dict:
        options = cluster.options
        return dict(report_interval=options.report_interval, dead_after=options.dead_after,
                    stuck_after=STUCK_INTERVALS * options.report_interval,
                    max_change=(source.max_change if source.max_change is not None
                                else options.max_change))

    def _add_source(self, cluster: Cluster, source: Source) -> None:
        stores = {store.id: store.host for store in cluster.stores_for(source)}
        self.ledgers[source.id] = Ledger(
            source.id, source.copies, self.reactor, stores, heartbeat=HEARTBEAT,
            accepted=self.baseline.get(source.id), **self._ledger_options(cluster, source))
        self.paths[source.id] = source.path
        scanner = SourceScanner(
            source, self.ledgers[source.id], source.rescan or cluster.options.rescan,
            self._skip(cluster), self.reactor, saved=self.saving.save)
        self.scanners[source.id] = scanner
        scanner.setServiceParent(self)

    def _skip(self, cluster: Cluster) -> list[str]:
        """Stores of this host inside a source are never scanned as data."""
        return [store.path for store in cluster.stores_on(self.host)]

    def _set_stores(self, cluster: Cluster) -> None:
        """Which stores back up which source, and their hosts (for the factory)."""
        self.store_hosts.clear()
        self.store_hosts.update({store.id: store.host for store in cluster.stores})
        self.backs.clear()
        for source in cluster.sources_on(self.host):
            self.backs[source.id] = {store.id for store in cluster.stores_for(source)}

    # --- reload ------------------------------------------------------------

    def fixed(self, cluster: Cluster) -> Optional[str]:
        """Why C{cluster} cannot be applied live, or None."""
        old = self.cluster.options
        new = cluster.options
        if self.host not in cluster.hosts():
            return f"host {self.host} is not in the new config"
        if not cluster.sources_on(self.host):
            return f"host {self.host} has no sources in the new config (stop the server instead)"
        for name, a, b in (("PORT", old.port, new.port),
                           ("RSYNC PORT", old.rsync_port, new.rsync_port)):
            if a != b:
                return f"{name} changed from {a} to {b}; restart the server to apply it"
        bind, problem = listen_address(cluster, self.host)
        if problem:
            return problem
        if bind != self.bind:
            return (f"the listening address changed from {self.bind or '*'} to {bind or '*'}; "
                    "restart the server to apply it")
        return None

    def reload(self, cluster: Cluster) -> Optional[str]:
        """
        Apply C{cluster} (a new config) to the running server; returns why
        not, or None once applied.  What cannot change live (the ports, the
        listening address, this host) is refused and the old config stays.
        """
        problem = self.fixed(cluster)
        if problem:
            return problem
        try:
            secret = read_secret(cluster)
        except ConfigError as e:
            return str(e)
        old = {s.id: s for s in self.cluster.sources_on(self.host)}
        new = {s.id: s for s in cluster.sources_on(self.host)}
        self.daemon.reconfigure([s.path for s in new.values()], secret)
        for source_id in old.keys() - new.keys():
            scanner = self.scanners.pop(source_id)
            scanner.disownServiceParent()
            del self.ledgers[source_id], self.paths[source_id]
            log.info("{source}: no longer in the config; its ledger is dropped",
                     source=source_id)
        for source_id in new.keys() & old.keys():
            self._update_source(cluster, new[source_id])
        for source_id in new.keys() - old.keys():
            self._add_source(cluster, new[source_id])
            log.info("{source}: new in the config; scanning it", source=source_id)
        self._set_stores(cluster)
        self.secret = secret
        self.factory.configure(secret=secret)
        self.cluster = cluster
        return None

    def _update_source(self, cluster: Cluster, source: Source) -> None:
        """A source in both configs: its stores, copies and options, in place."""
        ledger = self.ledgers[source.id]
        wanted = {store.id: store.host for store in cluster.stores_for(source)}
        had = {st.store for st in ledger.store_status()}
        for store_id in had - wanted.keys():
            ledger.remove_store(store_id)
            log.warn("{source}: store {store} no longer backs it up; its copies no "
                     "longer count", source=source.id, store=store_id)
        for store_id in sorted(wanted.keys() - had):
            ledger.add_store(store_id, wanted[store_id])
            log.info("{source}: new store {store}", source=source.id, store=store_id)
        if ledger.copies != source.copies:
            log.info("{source}: copies {old} -> {new}", source=source.id,
                     old=ledger.copies, new=source.copies)
            ledger.set_copies(source.copies)
        ledger.configure(**self._ledger_options(cluster, source))
        self.scanners[source.id].configure(
            source, source.rescan or cluster.options.rescan, self._skip(cluster))


def build(cluster: Cluster, host: str, state_dir: str, reactor,
          fatal: Optional[Fatal] = None, legacy_state_dir: Optional[str] = None) -> Server:
    """
    The service tree of C{cbackup-server} for C{host} (L{Server}).  Raises
    L{ConfigError} for an unreadable C{SECRET FILE} or an address this
    host cannot listen on.  C{legacy_state_dir}: where an older server kept
    its state (read only for the accepted scans, when C{state_dir} has none).
    """
    return Server(cluster, host, state_dir, reactor, fatal, legacy_state_dir)
