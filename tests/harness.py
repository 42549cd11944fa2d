"""
Real processes for integration tests: C{twistd} plugins started as child
processes on loopback addresses, always stopped (TERM, then KILL) by the
test's cleanup, with their logs kept for the failure message.
"""

from __future__ import annotations

import os
import subprocess
import time
from typing import Optional

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.task import deferLater

from cluster_backup.demo import Process, can_connect, free_port  # noqa: F401 (re-used by tests)


class Twistd(Process):
    """L{Process} with what tests also need: waiting without blocking the reactor, signals."""

    @property
    def process(self) -> Optional[subprocess.Popen]:
        return self.popen

    @inlineCallbacks
    def wait_listening(self, address: str, port: int, timeout: float = 30.0):
        deadline = time.monotonic() + timeout
        while not can_connect(address, port):
            if self.popen.poll() is not None:
                raise AssertionError(
                    f"{self.plugin} exited with {self.popen.returncode}:\n{self.log()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.plugin} not listening after {timeout}s:\n"
                                     f"{self.log()}")
            yield deferLater(reactor, 0.1, lambda: None)

    def signal(self, sig: int) -> None:
        if self.running():
            self.popen.send_signal(sig)


def proc_cmdlines() -> list[str]:
    """The command line of every process on this machine, space-joined."""
    found = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    found.append(f.read().replace(b"\0", b" ").decode(errors="replace"))
            except OSError:
                pass
    return found


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
