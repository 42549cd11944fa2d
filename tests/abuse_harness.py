"""
Helpers for the abuse tests (C{tests/test_abuse_*.py}): a blocking raw AMP
peer that can send any bytes, a server process shared by the tests of one
class, a figures file the tests fill for C{docs/reliability/abuse.md}, and
tree snapshots.

Everything here is blocking on purpose: the processes under test are
separate, so a test can speak plain sockets and use hypothesis freely
(hypothesis cannot drive a test that returns a Deferred).
"""

from __future__ import annotations

import atexit
import hashlib
import os
import socket
import struct
import time
from typing import Callable, Optional

from cluster_backup.protocol import auth_mac
from tests.figures import record as figures_record

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

def record(scenario: str, **figures) -> None:
    """Record C{figures} of one abuse scenario (see L{tests.figures})."""
    figures_record("abuse", scenario, figures)


# --- raw AMP ------------------------------------------------------------------

def encode_box(items) -> bytes:
    """
    The wire form of a box given as (key, value) pairs or a dict, with no
    checks at all: keys and values of any length are written with their
    length truncated to 16 bits, so a caller can also build broken frames.
    """
    if isinstance(items, dict):
        items = items.items()
    out = []
    for k, v in items:
        out.append(struct.pack(">H", len(k) & 0xFFFF) + k)
        out.append(struct.pack(">H", len(v) & 0xFFFF) + v)
    out.append(b"\0\0")
    return b"".join(out)


class Closed(Exception):
    """The peer closed the connection."""


class RawAMP:
    """A blocking AMP peer over a plain socket that can send anything."""

    def __init__(self, address: str, port: int, timeout: float = 5.0):
        self.sock = socket.create_connection((address, port), timeout=timeout)
        self.buf = b""
        self.tag = 0
        self.sent = 0

    def close(self) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sent += len(data)
        self.sock.sendall(data)

    def _read(self, n: int) -> bytes:
        while len(self.buf) < n:
            try:
                data = self.sock.recv(65536)
            except ConnectionResetError:
                data = b""
            if not data:
                raise Closed()
            self.buf += data
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def read_box(self) -> dict:
        box = {}
        while True:
            (n,) = struct.unpack(">H", self._read(2))
            if n == 0:
                return box
            key = self._read(n)
            (m,) = struct.unpack(">H", self._read(2))
            box[key] = self._read(m)

    def next_tag(self) -> bytes:
        self.tag += 1
        return b"%d" % self.tag

    def call(self, command: bytes, **arguments: bytes) -> dict:
        """Send one command (arguments already encoded) and read its answer."""
        box = {b"_command": command, b"_ask": self.next_tag()}
        box.update({k.encode(): v for k, v in arguments.items()})
        self.send(encode_box(box))
        return self.read_box()

    def login(self, host: str, secret: Optional[bytes]) -> dict:
        hello = self.call(b"hello", client_host=host.encode(), protocol=b"1")
        if secret is None or hello.get(b"auth_required") != b"True":
            return hello
        client_nonce = os.urandom(32)
        mac = auth_mac(secret, b"client", hello[b"nonce"], client_nonce, host)
        return self.call(b"authenticate", client_nonce=client_nonce, mac=mac)

    def is_open(self, wait: float = 0.3) -> bool:
        """True unless the peer closed the connection within C{wait} seconds."""
        self.sock.settimeout(wait)
        try:
            data = self.sock.recv(65536)
        except socket.timeout:
            return True
        except OSError:
            return False
        finally:
            self.sock.settimeout(5.0)
        self.buf += data
        return bool(data)


# --- a process shared by one class's tests --------------------------------------

class Shared:
    """
    A resource started by the first test of a class that needs it and
    stopped after its last test (or at exit, when only some ran): trial has
    no C{setUpClass}.
    """

    def __init__(self, start: Callable[[], object], stop: Callable[[object], None],
                 tests: int):
        self._start, self._stop, self._left = start, stop, tests
        self.value = None
        atexit.register(self.close)

    def get(self, testcase) -> object:
        if self.value is None:
            self.value = self._start()
        testcase.addCleanup(self._done)
        return self.value

    def _done(self) -> None:
        self._left -= 1
        if self._left <= 0:
            self.close()

    def close(self) -> None:
        if self.value is not None:
            value, self.value = self.value, None
            self._stop(value)


def count_tests(cls) -> int:
    return sum(1 for name in dir(cls) if name.startswith("test"))


def wait_until(predicate, timeout: float = 30.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.1)


# --- trees -------------------------------------------------------------------

def snapshot(root: bytes) -> dict[bytes, tuple]:
    """
    Every entry under C{root} (never following symlinks): relative path ->
    (kind, size, content hash or link target).
    """
    out = {}
    for folder, dirs, names in os.walk(root):
        for name in dirs + names:
            path = os.path.join(folder, name)
            rel = os.path.relpath(path, root)
            st = os.lstat(path)
            if os.path.islink(path):
                out[rel] = ("link", os.readlink(path))
            elif os.path.isdir(path):
                out[rel] = ("dir",)
            else:
                with open(path, "rb") as f:
                    out[rel] = ("file", st.st_size, hashlib.sha256(f.read()).hexdigest())
    return out


def files_containing(root: bytes, needles: list[bytes]) -> list[bytes]:
    """Regular files under C{root} (symlinks not followed) holding any of C{needles}."""
    found = []
    for folder, _, names in os.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            if os.path.islink(path) or not os.path.isfile(path):
                continue
            with open(path, "rb") as f:
                data = f.read()
            if any(n in data for n in needles):
                found.append(path)
    return found
