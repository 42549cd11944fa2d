"""
The edges of a daemon's life, shared by C{cbackup-server} and
C{cbackup-client}: checks that run before anything starts, a fatal failure
that ends the process with a non-zero status (so systemd restarts it and
the journal says why), and SIGHUP, which reloads the config.

twistd has no way for a service to choose the process's exit status: when
the reactor stops, C{twistd} exits 0.  L{Fatal} is the one place that
does: it stops the reactor, lets every service stop as usual (the rsync
daemon included), and then ends the process with status 1.
"""

from __future__ import annotations

import errno
import os
import signal
import socket
import sys
from typing import Callable, Iterable, Optional

from twisted.application.service import MultiService, Service
from twisted.internet.error import ReactorNotRunning
from twisted.logger import Logger

log = Logger()

#: The exit status of a daemon that could not start or go on.
EXIT_FATAL = 1


def exit_process(code: int) -> None:
    """End this process now with C{code}, after flushing what it printed."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


class Fatal:
    """
    Call with a reason when the daemon cannot start or go on: the reason is
    logged as critical, the reactor stops (at once, or as soon as it runs:
    under twistd services start before it does), every service stops, and
    then C{exit(EXIT_FATAL)} runs.  C{exit=None} only stops the reactor
    (tests running in a shared reactor).  Only the first reason counts.
    """

    def __init__(self, reactor, what: str, exit: Optional[Callable[[int], None]] = None):
        self.reactor = reactor
        self.what = what
        self.exit = exit
        self.reason: Optional[str] = None

    def __call__(self, reason: str) -> None:
        if self.reason is not None:
            return
        self.reason = reason
        log.critical("{what}: {reason}; exiting", what=self.what, reason=reason)
        if self.exit is not None:
            self.reactor.addSystemEventTrigger("after", "shutdown", self.exit, EXIT_FATAL)
        if self.reactor.running:
            self._stop()
        else:
            self.reactor.callWhenRunning(self._stop)

    def _stop(self) -> None:
        try:
            self.reactor.stop()
        except ReactorNotRunning:
            pass


class Guarded(MultiService):
    """
    The top service of a daemon: at start it runs C{checks} (each returns
    a problem sentence or None) in order, and starts its children only when
    all pass.  A problem is handed to C{fatal} and nothing else starts, so
    a server that cannot listen never scans nor spawns its rsync daemon.
    """

    def __init__(self, checks: Iterable[Callable[[], Optional[str]]], fatal: Fatal):
        super().__init__()
        self.checks = list(checks)
        self.fatal = fatal
        self.children_started = False

    def startService(self) -> None:
        for check in self.checks:
            problem = check()
            if problem:
                Service.startService(self)
                self.fatal(problem)
                return
        self.children_started = True
        super().startService()

    def stopService(self):
        if not self.children_started:
            return Service.stopService(self)
        self.children_started = False
        return super().stopService()


def private_dir(path: str) -> Optional[str]:
    """
    Make C{path} a folder only its owner can use (mode 0700) and check
    that we can write in it; the problem, or None.
    """
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
        os.chmod(path, 0o700)
        probe = os.path.join(path, ".write-test")
        with open(probe, "wb"):
            pass
        os.unlink(probe)
    except OSError as e:
        return f"state dir {path}: {e.strerror}"
    return None


def port_free(address: Optional[str], port: int, what: str) -> Optional[str]:
    """
    Whether a listener could bind C{address} (None: every interface) and
    C{port} now, as Twisted's would (with C{SO_REUSEADDR}); the problem,
    or None.  The port is let go at once: this only turns the common
    failures into a clear reason before anything starts.
    """
    family = socket.AF_INET6 if address and ":" in address else socket.AF_INET
    shown = f"[{address}]" if family == socket.AF_INET6 else (address or "*")
    try:
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((address or "", port))
    except OSError as e:
        why = {errno.EADDRINUSE: "another process listens there",
               errno.EADDRNOTAVAIL: "not an address of this machine",
               errno.EACCES: "permission denied"}.get(e.errno, e.strerror)
        return f"cannot listen on {shown}:{port} ({what}): {why}"
    return None


def on_sighup(reactor, reload: Callable[[], object]) -> None:
    """
    Run C{reload()} in the reactor whenever the process gets SIGHUP (the
    default would end it, and the journal would say nothing).
    """
    def handler(signum, frame):
        reactor.callFromThread(reload)

    signal.signal(signal.SIGHUP, handler)
