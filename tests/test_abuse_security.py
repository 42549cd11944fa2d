"""
The secret never travels and never lands in a log, and no byte from
outside a source reaches a store.

A real C{cbackup-client} converges from a real C{cbackup-server} through a
recording TCP relay (plain sockets and threads, on loopback): the client's
copy of the config names the relay as the server's address.  Every byte
both ways is searched for the SECRET in plain, hex and base64 forms, and so
are both processes' logs and the rsync daemon's state.  The sources hold
symlinks pointing out of them (to an C{/etc}-like folder, to the other
source, to the store); the store must hold those links as links and no
regular file with an outside byte.  Figures go to
L{tests.abuse_harness.FIGURES}.
"""

from __future__ import annotations

import base64
import os
import socket
import threading

from twisted.trial.unittest import SynchronousTestCase

from tests import slow
from tests.abuse_harness import files_containing, record, wait_until
from tests.cluster_harness import same_content, source_files
from tests.harness import Twistd, free_port

SERVER_ADDRESS = "127.0.0.90"
RELAY_ADDRESS = "127.0.0.91"
SECRET = "abuse-secret-Zq8tV3wK"
OUTSIDE = b"OUTSIDE-BYTES-never-in-a-store\n"


class RecordingRelay:
    """Relays TCP connections to a target and keeps every byte, per direction."""

    def __init__(self, address: str, port: int, target: tuple[str, int]):
        self.target = target
        self.listener = socket.create_server((address, port))
        self.captured = {"to server": bytearray(), "to client": bytearray()}
        self.connections = 0
        self.lock = threading.Lock()
        self.threads: list[threading.Thread] = []
        self._spawn(self._accept)

    def _spawn(self, target, *args) -> None:
        t = threading.Thread(target=target, args=args, daemon=True)
        t.start()
        self.threads.append(t)

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.target)
            except OSError:
                client.close()
                continue
            self.connections += 1
            self._spawn(self._pump, client, server, "to server")
            self._spawn(self._pump, server, client, "to client")

    def _pump(self, src: socket.socket, dst: socket.socket, direction: str) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                with self.lock:
                    self.captured[direction] += data
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self.listener.close()


def secret_forms(secret: bytes) -> dict[str, bytes]:
    return {
        "plain": secret,
        "hex": secret.hex().encode(),
        "HEX": secret.hex().upper().encode(),
        "base64": base64.b64encode(secret).rstrip(b"="),
        "base64url": base64.urlsafe_b64encode(secret).rstrip(b"="),
        "utf-16": secret.decode().encode("utf-16-le"),
    }


@slow
class SecretAndSymlinkTests(SynchronousTestCase):
    def setUp(self):
        base = os.path.abspath(self.mktemp())
        self.base = base
        self.main = os.path.join(base, "src-main")
        self.other = os.path.join(base, "src-other")
        self.etc = os.path.join(base, "etc")
        self.store = os.path.join(base, "store")
        for d in (self.main, os.path.join(self.main, "docs"), self.other, self.etc):
            os.makedirs(d)
        for folder, names in ((self.main, ["a.txt", "docs/b.txt"]), (self.other, ["o.txt"])):
            for name in names:
                with open(os.path.join(folder, name), "wb") as f:
                    f.write(b"inside %s\n" % name.encode() * 20)
        with open(os.path.join(self.etc, "shadow"), "wb") as f:
            f.write(OUTSIDE)
        with open(os.path.join(self.other, "private.txt"), "wb") as f:
            f.write(b"OTHER-SOURCE-ONLY\n")
        links = {
            "etc-shadow": os.path.join(self.etc, "shadow"),
            "etc-dir": self.etc,
            "rel-up": "../etc/shadow",
            "to-other": os.path.join(self.other, "private.txt"),
            "to-store": self.store,
            "docs/deep-up": "../../etc",
        }
        for name, target in links.items():
            os.symlink(target, os.path.join(self.main, name))
        self.links = links
        self.port = free_port(SERVER_ADDRESS)
        free_port(RELAY_ADDRESS)  # the same port must be free there too
        common = (f"options: PORT: {self.port}\noptions: SECRET: {SECRET}\n"
                  "options: REPORT INTERVAL: 1s\noptions: RESCAN: 1h\n")
        blocks = (f"server: srv:{self.main}\ncopies: 1\naddress: {{addr}}\n"
                  f"server: srv:{self.other}\ncopies: 1\n"
                  f"backup: st:{self.store}\nsize: 100m\naddress: 127.0.0.92\n")
        self.server_conf = os.path.join(base, "server.conf")
        self.client_conf = os.path.join(base, "client.conf")
        for path, addr in ((self.server_conf, SERVER_ADDRESS),
                           (self.client_conf, RELAY_ADDRESS)):
            with open(path, "w") as f:
                f.write(common + blocks.format(addr=addr))

    def test_converge_through_a_recording_relay(self):
        try:
            relay = RecordingRelay(RELAY_ADDRESS, self.port, (SERVER_ADDRESS, self.port))
        except OSError as e:
            raise AssertionError(f"relay port {self.port} taken on {RELAY_ADDRESS}: {e}")
        self.addCleanup(relay.close)
        server = Twistd("cbackup-server", self.server_conf, "srv", self.base,
                        "--state-dir", os.path.join(self.base, "state")).start()
        self.addCleanup(server.stop)
        client = Twistd("cbackup-client", self.client_conf, "st", self.base).start()
        self.addCleanup(client.stop)

        expected = {}
        for root in (self.main, self.other):
            for rel, info in source_files(os.fsencode(root)).items():
                expected[os.path.join(os.fsencode(root), rel)] = os.path.join(
                    os.fsencode(self.store), b"srv", os.fsencode(root).lstrip(b"/"), rel)

        def converged():
            for proc in (server, client):
                if not proc.running():
                    raise AssertionError(f"{proc.plugin} exited:\n{proc.log()}")
            return all(os.path.lexists(dst) and same_content(src, dst)
                       for src, dst in expected.items())

        wait_until(converged, 90, "the store to hold every file and link")
        client.stop()
        server.stop()
        relay.close()

        # No byte from outside a source: links stay links, nothing outside is copied.
        store_main = os.path.join(self.store, "srv", self.main.lstrip("/"))
        for name, target in self.links.items():
            path = os.path.join(store_main, name)
            self.assertTrue(os.path.islink(path), path)
            self.assertEqual(os.readlink(path), target)
        leaked = files_containing(os.fsencode(self.store), [OUTSIDE, b"OTHER-SOURCE-ONLY"])
        # private.txt is the other source's own file, backed up where it belongs.
        allowed = os.fsencode(os.path.join(self.store, "srv", self.other.lstrip("/"),
                                           "private.txt"))
        self.assertEqual([p for p in leaked if p != allowed], [])

        # The secret is never on the wire, in a log, or in the daemon's state.
        forms = secret_forms(SECRET.encode())
        wire = {d: bytes(b) for d, b in relay.captured.items()}
        self.assertGreater(len(wire["to server"]), 0)
        self.assertGreater(len(wire["to client"]), 0)
        found = [(d, name) for d, data in wire.items() for name, form in forms.items()
                 if form in data]
        self.assertEqual(found, [])
        texts = {"server log": server.log().encode(), "client log": client.log().encode()}
        state = os.path.join(self.base, "state")
        for folder, _, names in os.walk(state):
            for name in names:
                with open(os.path.join(folder, name), "rb") as f:
                    texts[os.path.relpath(os.path.join(folder, name), self.base)] = f.read()
        in_files = [(where, name) for where, data in texts.items()
                    for name, form in forms.items() if form in data]
        self.assertEqual(in_files, [])
        record("secret_on_wire", connections=relay.connections,
               bytes_to_server=len(wire["to server"]), bytes_to_client=len(wire["to client"]),
               forms_searched=sorted(forms), files_searched=len(texts),
               bytes_of_files_searched=sum(len(t) for t in texts.values()),
               rsync_password_on_wire=b"rsync_password" in wire["to client"],
               found=0, violations=0)
        record("paths_source_symlinks", links=len(self.links), files_expected=len(expected),
               store_files_with_outside_bytes=0, violations=0)
