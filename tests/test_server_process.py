"""
The real C{twistd -n cbackup-server} on a loopback address, spoken to over
AMP as a store would, with a real C{rsync} fetching through its daemon.
"""

from __future__ import annotations

import os

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.utils import getProcessOutputAndValue
from twisted.protocols import amp
from twisted.trial.unittest import TestCase

from cluster_backup import protocol, session
from cluster_backup.records import FileRecord
from tests import slow
from tests.harness import Twistd, free_port, proc_cmdlines, wait_for


ADDRESS = "127.0.0.2"
SECRET = "integration-secret-4d1f"
OUTSIDE = b"outside-bytes-that-must-never-be-served\n"




@slow
class ServerProcessTests(TestCase):
    timeout = 120

    def setUp(self):
        base = os.path.abspath(self.mktemp())
        self.source = os.path.join(base, "source")
        self.outside = os.path.join(base, "outside")
        self.dest = os.path.join(base, "dest")
        self.state = os.path.join(base, "state")
        for d in (self.source, os.path.join(self.source, "sub"), self.outside, self.dest):
            os.makedirs(d)
        self.files = {b"a.txt": b"hello backup\n" * 100,
                      b"sub/b\nnew line.bin": bytes(range(256)) * 40,
                      b"sub/caf\xe9": b"non-utf8 name\n"}
        for rel, data in self.files.items():
            with open(os.path.join(os.fsencode(self.source), rel), "wb") as f:
                f.write(data)
        with open(os.path.join(self.outside, "secret.txt"), "wb") as f:
            f.write(OUTSIDE)
        os.symlink(os.path.join(self.outside, "secret.txt"), os.path.join(self.source, "escape"))
        os.symlink(self.outside, os.path.join(self.source, "escdir"))
        self.port = free_port(ADDRESS)
        self.config = os.path.join(base, "cluster.conf")
        with open(self.config, "w") as f:
            f.write(f"options: PORT: {self.port}\noptions: SECRET: {SECRET}\n"
                    f"server: srv:{self.source}\ncopies: 1\naddress: {ADDRESS}\n"
                    f"backup: st:{base}/store\nsize: 1g\naddress: 127.0.0.3\n")
        self.source_id = f"srv:{self.source}"
        self.store_id = f"st:{base}/store"
        self.server = Twistd("cbackup-server", self.config, "srv", base,
                             "--state-dir", self.state)
        self.addCleanup(self.stop_server)

    def stop_server(self):
        code = self.server.stop()
        leftovers = [c for c in proc_cmdlines() if self.state in c]
        self.assertEqual(leftovers, [], "rsync daemon outlived the server")
        self.assertIsNotNone(code)

    @inlineCallbacks
    def connect(self):
        proto = yield connectProtocol(
            TCP4ClientEndpoint(reactor, ADDRESS, self.port), amp.AMP())
        self.addCleanup(proto.transport.loseConnection)
        return proto

    def rsync(self, grant, paths, *flags):
        e = grant.endpoint
        sources = [f"rsync://{e.user}@{e.host}:{e.port}/{e.module}/{p}" for p in paths]
        return getProcessOutputAndValue(
            "/usr/bin/rsync", ["-a", "--protect-args", *flags, *sources, self.dest + "/"],
            env={"RSYNC_PASSWORD": e.password, "PATH": os.environ.get("PATH", "")})

    @inlineCallbacks
    def test_claim_fetch_report_status(self):
        self.server.start()
        yield self.server.wait_listening(ADDRESS, self.port)
        proto = yield self.connect()
        server_host = yield session.login(proto, "st", SECRET.encode())
        self.assertEqual(server_host, "srv")

        @inlineCallbacks
        def scanned():
            sources, _ = yield session.status_all(proto)
            return sources[0].scanned is not None

        yield wait_for(scanned, what="the first scan")
        yield session.report_inventory(proto, self.source_id, self.store_id, [])
        needs, safemode, _ = yield session.list_all_needs(proto, self.source_id, self.store_id)
        self.assertFalse(safemode)
        self.assertEqual({n.path for n in needs},
                         set(self.files) | {b"escape", b"escdir"})

        grant = yield session.claim(proto, self.source_id, self.store_id, [b"a.txt"])
        self.assertEqual(grant.granted, (b"a.txt",))
        out, err, code = yield self.rsync(grant, ["a.txt"])
        self.assertEqual(code, 0, err)
        with open(os.path.join(self.dest, "a.txt"), "rb") as f:
            self.assertEqual(f.read(), self.files[b"a.txt"])
        st = os.lstat(os.path.join(self.dest, "a.txt"))
        answer = yield session.report_delta(
            proto, self.source_id, self.store_id,
            [FileRecord(b"a.txt", st.st_size, int(st.st_mtime))])
        self.assertEqual((list(answer.stale), list(answer.orphans)), ([], []))
        sources, stores = yield session.status_all(proto)
        (status,) = sources
        self.assertEqual(status.histogram.get(1), [1, len(self.files[b"a.txt"])])
        self.assertEqual(status.under_files, len(self.files) + 2 - 1)

        # A wrong password is refused by the daemon.
        bad = session.Grant(grant.granted, protocol.RsyncEndpoint(
            grant.endpoint.host, grant.endpoint.port, grant.endpoint.module,
            grant.endpoint.user, "wrong"), grant.ttl)
        out, err, code = yield self.rsync(bad, ["a.txt"])
        self.assertNotEqual(code, 0)

    @inlineCallbacks
    def test_symlink_escape_not_served(self):
        self.server.start()
        yield self.server.wait_listening(ADDRESS, self.port)
        proto = yield self.connect()
        yield session.login(proto, "st", SECRET.encode())
        yield wait_for(lambda: session.status_all(proto).addCallback(
            lambda r: r[0][0].scanned is not None), what="the first scan")
        yield session.report_inventory(proto, self.source_id, self.store_id, [])
        grant = yield session.claim(proto, self.source_id, self.store_id,
                                    [b"escape", b"escdir"])
        for flags in ([], ["-L"], ["--copy-unsafe-links"], ["-k"]):
            yield self.rsync(grant, ["escape", "escdir/secret.txt", "escdir/"], *flags)
        leaked = []
        for folder, _, names in os.walk(self.dest):
            for name in names:
                path = os.path.join(folder, name)
                if os.path.isfile(path) and not os.path.islink(path):
                    with open(path, "rb") as f:
                        if OUTSIDE in f.read():
                            leaked.append(path)
        self.assertEqual(leaked, [])
        self.assertEqual(os.readlink(os.path.join(self.dest, "escape")),
                         os.path.join(self.outside, "secret.txt"))

    @inlineCallbacks
    def test_wrong_secret_refused(self):
        self.server.start()
        yield self.server.wait_listening(ADDRESS, self.port)
        proto = yield self.connect()
        with self.assertRaises(Exception):
            yield session.login(proto, "st", b"not-the-secret")
        self.assertNotIn(SECRET, self.server.log())
