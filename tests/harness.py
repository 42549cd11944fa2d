"""
Real processes for integration tests: C{twistd} plugins started as child
processes on loopback addresses, always stopped (TERM, then KILL) by the
test's cleanup, with their logs kept for the failure message.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from typing import Optional

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.task import deferLater

BIN = os.path.dirname(sys.executable)
TWISTD = os.path.join(BIN, "twistd")


def free_port(address: str = "127.0.0.1", pair: bool = True) -> int:
    """
    A TCP port free on C{address} now (and, with C{pair}, the port after it
    too, for RSYNC PORT = PORT + 1).
    """
    for _ in range(200):
        with socket.socket() as s:
            s.bind((address, 0))
            port = s.getsockname()[1]
        if port >= 65535:
            continue
        if not pair:
            return port
        with socket.socket() as s:
            try:
                s.bind((address, port + 1))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port pair")


def can_connect(address: str, port: int) -> bool:
    try:
        with socket.create_connection((address, port), timeout=0.5):
            return True
    except OSError:
        return False


class Twistd:
    """One C{twistd -n PLUGIN ...} child process."""

    def __init__(self, plugin: str, config: str, host: str, workdir: str, *extra: str):
        self.plugin = plugin
        self.host = host
        self.workdir = workdir
        os.makedirs(workdir, exist_ok=True)
        self.logfile = os.path.join(workdir, f"{plugin}-{host}.log")
        self.argv = [TWISTD, "-n", "--pidfile=", "-l", self.logfile, plugin,
                     "-c", config, "--host", host, *extra]
        self.process: Optional[subprocess.Popen] = None

    def start(self) -> "Twistd":
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.process = subprocess.Popen(
            self.argv, cwd=self.workdir, env=env, stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=open(self.logfile + ".stderr", "wb"))
        return self

    def log(self) -> str:
        text = ""
        for path in (self.logfile, self.logfile + ".stderr"):
            if os.path.exists(path):
                with open(path, errors="replace") as f:
                    text += f.read()
        return text

    @inlineCallbacks
    def wait_listening(self, address: str, port: int, timeout: float = 30.0):
        deadline = time.monotonic() + timeout
        while not can_connect(address, port):
            if self.process.poll() is not None:
                raise AssertionError(
                    f"{self.plugin} exited with {self.process.returncode}:\n{self.log()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.plugin} not listening after {timeout}s:\n"
                                     f"{self.log()}")
            yield deferLater(reactor, 0.1, lambda: None)

    def signal(self, sig: int) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(sig)

    def stop(self, timeout: float = 15.0) -> Optional[int]:
        """TERM, then KILL after C{timeout}; returns the exit status."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


def sleep(seconds: float) -> Deferred:
    return deferLater(reactor, seconds, lambda: None)


@inlineCallbacks
def wait_for(predicate, timeout: float = 30.0, interval: float = 0.2, what: str = "condition"):
    """Poll C{predicate()} (which may return a Deferred) until it is true."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if isinstance(value, Deferred):
            value = yield value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        yield sleep(interval)
