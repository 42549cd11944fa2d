"""
Abuse through file names (DESIGN.md rule 8): C{..}, absolute, NUL,
overlong, non-UTF-8 and newline names from a peer are refused by the
protocol's decoding (L{BadPath}) and by the store layer (L{StoreError}),
and a real C{cbackup-client} facing a HOSTILE server, one that encodes
such names as raw bytes past the protocol's checks, writes nothing outside
its store and keeps working.  Figures go to L{tests.abuse_harness.FIGURES}.
"""

from __future__ import annotations

import hashlib
import os
import struct
import subprocess

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.protocol import Factory
from twisted.protocols import amp
from twisted.trial.unittest import SynchronousTestCase, TestCase

from cluster_backup import protocol
from cluster_backup.protocol import BadArgument, BadPath
from cluster_backup.store import Store, StoreError
from cluster_backup.transfer import files_from_bytes
from tests import slow
from tests.abuse_harness import record, snapshot
from tests.harness import Twistd, free_port, sleep, wait_for
from tests.wire import raw_needs as raw_needs_of, raw_paths, raw_records

#: Names a hostile peer may send, none of which may reach a disk.
BAD = [b"..", b"../../escape", b"/etc/passwd", b"a/../../b", b"a/./b", b"a//b", b"a/",
       b"./a", b"x\0y", b"", b"/", b"x" * 4097, b"a/" * 2100 + b"b"]
#: Odd but legal names: they must round-trip exactly.
ODD = [b"caf\xe9", b"new\nline", b"-rf", b"#comment", b";semi", b"sp ace", b"\\x",
       b"a" * 255, b"/".join([b"d"] * 2000)]


def raw_needs(paths, size=10, mtime=1_700_000_000, versions=None) -> bytes:
    """
    Needs for C{paths}: at the version in C{versions} (path -> (size, mtime))
    where it names one, else at C{size} and C{mtime}.
    """
    versions = versions or {}
    return raw_needs_of((p, *versions.get(p, (size, mtime)), 0, 1) for p in paths)


class DecodingTests(SynchronousTestCase):
    """The protocol refuses every bad name on the way in, whichever list carries it."""

    def test_every_list_refuses_bad_names(self):
        refused = 0
        for path in BAD:
            for decode, data in ((protocol.decode_paths, raw_paths([path])),
                                 (protocol.decode_needs, raw_needs([path])),
                                 (protocol.decode_records, raw_records([(path, 1, 1)]))):
                with self.assertRaises(BadArgument, msg=repr(path[:50])) as caught:
                    decode(data)
                if b"\0" not in path:  # a NUL splits it: a malformed list
                    self.assertIsInstance(caught.exception, BadPath)
                refused += 1
            with self.assertRaises(BadPath):
                protocol.encode_paths([path])
        for path in ODD:
            self.assertEqual(protocol.decode_paths(raw_paths([path])), [path])
            self.assertEqual(protocol.decode_needs(raw_needs([path]))[0].path, path)
        record("paths_decoding", bad_names=len(BAD), refusals=refused, odd_names=len(ODD),
               violations=0)

    def test_store_layer_refuses_bad_names_and_symlinked_parents(self):
        base = os.path.abspath(self.mktemp()).encode()
        outside = os.path.join(base, b"outside")
        os.makedirs(outside)
        store = Store(os.path.join(base, b"store"), size=1 << 30)
        store.inventory([])
        top = store.source_dir("evil", "/data")
        os.makedirs(top)
        os.symlink(outside, os.path.join(top, b"linkdir"))
        os.symlink(b"../../../outside", os.path.join(top, b"rellink"))
        with open(os.path.join(top, b"plainfile"), "wb") as f:
            f.write(b"x")
        refused = 0
        for path in BAD + [b"linkdir/passwd", b"rellink/passwd", b"plainfile/x",
                           b"linkdir/a/b"]:
            for call in (lambda p: store.path_of("evil", "/data", p),
                         lambda p: store.cost("evil", "/data", p, 1),
                         lambda p: store.refresh("evil", "/data", p),
                         lambda p: store.remove("evil", "/data", p)):
                with self.assertRaises(StoreError, msg=repr(path[:50])):
                    call(path)
                refused += 1
        for host, spath in (("..", "/data"), ("evil", "relative"), ("evil", "/a/../../b"),
                            (".cbackup", "/x"), ("a/b", "/x")):
            with self.assertRaises(StoreError):
                store.source_dir(host, spath)
            refused += 1
        for path in BAD:
            if path and b"\0" not in path[:0]:
                with self.assertRaises(ValueError):
                    files_from_bytes([path])
        self.assertEqual(os.listdir(outside), [])
        record("paths_store_layer", refusals=refused, violations=0)


# --- a hostile server ----------------------------------------------------------

def _command(name, arguments, response):
    return type(name.decode().title().replace("-", ""), (amp.Command,), dict(
        commandName=name, arguments=arguments, response=response))


_STORE_ARGS = [(b"source", amp.Unicode()), (b"store", amp.Unicode())]
RawHello = _command(b"hello", [(b"client_host", amp.Unicode()), (b"protocol", amp.Integer())],
                    [(b"nonce", amp.String()), (b"server_host", amp.Unicode()),
                     (b"auth_required", amp.Boolean())])
RawReport = _command(b"report", _STORE_ARGS + [
    (b"files", amp.String()), (b"removed", amp.String()), (b"inventory", amp.Unicode()),
    (b"used", amp.Integer(optional=True)), (b"quota", amp.Integer(optional=True))],
    [(b"stale", amp.String()), (b"orphans", amp.String()), (b"more", amp.Boolean())])
RawListNeeds = _command(b"list-needs", _STORE_ARGS + [
    (b"cursor", amp.String(optional=True)), (b"limit", amp.Integer())],
    [(b"needs", amp.String()), (b"cursor", amp.String(optional=True)),
     (b"safemode", amp.Boolean())])
RawListSurplus = _command(b"list-surplus", _STORE_ARGS + [
    (b"cursor", amp.String(optional=True)), (b"limit", amp.Integer())],
    [(b"needs", amp.String()), (b"cursor", amp.String(optional=True))])
RawClaim = _command(b"claim", _STORE_ARGS + [(b"paths", amp.String())], [
    (b"granted", amp.String()), (b"rsync_host", amp.Unicode()), (b"rsync_port", amp.Integer()),
    (b"rsync_module", amp.Unicode()), (b"rsync_user", amp.Unicode()),
    (b"rsync_password", amp.Unicode()), (b"ttl", amp.Integer())])
RawRelease = _command(b"release", _STORE_ARGS + [(b"paths", amp.String()),
                                                  (b"drop", amp.Boolean())],
                      [(b"granted", amp.String())])

#: What the hostile server offers, one page per ListNeeds, in order; then the last
#: page again.  Each entry: (needs, extra paths granted by Claim).
HOSTILE_PAGES = [
    ([b"../../escape"], []),
    ([b"/etc/passwd"], []),
    ([b"a/../../b"], []),
    ([b"x\0y"], []),
    ([b"x" * 5000], []),
    ([b"caf\xe9/../../../escape"], []),
    ([b"linkdir/passwd"], []),  # legal name, through a symlink inside the store
    ([b"ok.txt"], [b"../../granted-escape"]),  # Claim grants what was not asked
    ([b"ok.txt", b"caf\xe9", b"new\nline", b"evil-link"], []),
]


class HostileServer(amp.AMP):
    """Answers a client with names no honest server would send."""

    def __init__(self, script):
        super().__init__()
        self.script = script

    @RawHello.responder
    def hello(self, client_host, protocol):
        self.script["connections"] += 1
        return dict(nonce=b"", server_host="evil", auth_required=False)

    @RawReport.responder
    def report(self, source, store, files, removed, inventory, used=None, quota=None):
        self.script["reports"] += 1
        if self.script["connections"] == 1:  # the first session: poisoned answers
            return dict(stale=raw_paths([b"../stale-escape"]),
                        orphans=raw_paths([b"/etc/shadow"]), more=False)
        return dict(stale=b"", orphans=b"", more=False)

    @RawListNeeds.responder
    def list_needs(self, source, store, limit, cursor=None):
        i = min(self.script["pages"], len(HOSTILE_PAGES) - 1)
        self.script["pages"] += 1
        self.script["current"] = i
        return dict(needs=raw_needs(HOSTILE_PAGES[i][0], versions=self.script["versions"]),
                    safemode=False)

    @RawListSurplus.responder
    def list_surplus(self, source, store, limit, cursor=None):
        return dict(needs=b"")

    @RawClaim.responder
    def claim(self, source, store, paths):
        self.script["claims"] += 1
        extra = HOSTILE_PAGES[self.script["current"]][1]
        return dict(granted=paths + raw_paths(extra), rsync_host=self.script["address"],
                    rsync_port=self.script["rsync_port"], rsync_module="evil",
                    rsync_user="cbackup", rsync_password="unused", ttl=300)

    @RawRelease.responder
    def release(self, source, store, paths, drop):
        return dict(granted=b"")


ADDRESS = "127.0.0.85"


@slow
class HostileServerTests(TestCase):
    """A real cbackup-client against L{HostileServer} and a plain rsync daemon."""

    timeout = 120

    def setUp(self):
        self.base = os.path.abspath(self.mktemp())
        self.parent = os.path.join(self.base, "parent")
        self.store = os.path.join(self.parent, "store")
        self.outside = os.path.join(self.parent, "outside")
        self.evil = os.path.join(self.base, "evilsrc")
        for d in (self.store, self.outside, self.evil, os.path.join(self.parent, "etc")):
            os.makedirs(d)
        with open(os.path.join(self.parent, "etc", "passwd"), "wb") as f:
            f.write(b"root:x:0:0:sentinel\n")
        files = {b"ok.txt": b"fine\n", b"caf\xe9": b"latin\n", b"new\nline": b"nl\n",
                 b"escape": b"ESCAPED\n", b"passwd": b"ESCAPED\n"}
        for name, data in files.items():
            with open(os.path.join(self.evil.encode(), name), "wb") as f:
                f.write(data)
        os.symlink(os.path.join(self.parent, "etc", "passwd"),
                   os.path.join(self.evil, "evil-link"))
        # A directory of the store that is a symlink to outside it.
        top = os.path.join(self.store, "evil", "data")
        os.makedirs(top)
        os.symlink(self.outside, os.path.join(top, "linkdir"))
        self.port = free_port(ADDRESS)
        with open(os.path.join(self.base, "rsyncd.conf"), "w") as f:
            f.write(f"address = {ADDRESS}\nport = {self.port + 1}\n"
                    f"pid file = {self.base}/rsyncd.pid\nlog file = {self.base}/rsyncd.log\n"
                    f"[evil]\n path = {self.evil}\n use chroot = no\n read only = yes\n")
        self.config = os.path.join(self.base, "cluster.conf")
        with open(self.config, "w") as f:
            f.write(f"options: PORT: {self.port}\noptions: REPORT INTERVAL: 1s\n"
                    f"server: evil:/data\ncopies: 1\naddress: {ADDRESS}\n"
                    f"backup: st:{self.store}\nsize: 100m\naddress: 127.0.0.86\n")

    def etc_passwd(self) -> str:
        with open("/etc/passwd", "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()

    @inlineCallbacks
    def test_client_writes_nothing_outside_its_store(self):
        # The legal names are offered at the version the rsync daemon serves, as
        # an honest server would: a copy at another version would be kept aside
        # (rule 7) and fetched again, and this test is about names, not versions.
        versions = {}
        for name in os.listdir(self.evil.encode()):
            st = os.lstat(os.path.join(self.evil.encode(), name))
            versions[name] = (st.st_size, int(st.st_mtime))
        state = dict(connections=0, reports=0, pages=0, claims=0, current=0,
                     address=ADDRESS, rsync_port=self.port + 1, versions=versions)
        for k in ("connections", "reports", "pages", "claims"):
            state[k] = 0
        port = yield TCP4ServerEndpoint(reactor, self.port, interface=ADDRESS).listen(
            Factory.forProtocol(lambda: HostileServer(state)))
        self.addCleanup(port.stopListening)
        rsyncd = subprocess.Popen(
            ["rsync", "--daemon", "--no-detach", f"--config={self.base}/rsyncd.conf"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.addCleanup(lambda: (rsyncd.terminate(), rsyncd.wait()))
        before = snapshot(self.parent.encode())
        passwd = self.etc_passwd()
        client = Twistd("cbackup-client", self.config, "st", self.base).start()
        self.addCleanup(client.stop)

        def arrived():
            if not client.running():
                raise AssertionError(f"the client died:\n{client.log()}")
            return (state["pages"] > len(HOSTILE_PAGES)
                    and os.path.exists(os.path.join(self.store, "evil", "data", "ok.txt")))

        yield wait_for(arrived, timeout=90, what="the client to outlive every hostile page")
        yield sleep(1.0)
        self.assertTrue(client.running(), client.log())
        client.stop()
        after = snapshot(self.parent.encode())
        store_rel = b"store"
        created = {p: v for p, v in after.items() if before.get(p) != v}
        outside_store = sorted(p for p in created if not p.startswith(store_rel + b"/"))
        self.assertEqual(outside_store, [], "written outside the store")
        removed = sorted(p for p in before if p not in after)
        self.assertEqual(removed, [])
        self.assertEqual(self.etc_passwd(), passwd)
        self.assertEqual(os.listdir(self.outside), [])
        fetched = {p for p in created if p.startswith(b"store/evil/data/")}
        for name in (b"ok.txt", b"caf\xe9", b"new\nline", b"evil-link"):
            self.assertIn(b"store/evil/data/" + name, fetched, sorted(fetched))
        self.assertEqual(after[b"store/evil/data/evil-link"][0], "link")
        kept = sorted(p for p in after if p.startswith(b"store/.cbackup-kept/")
                      and after[p][0] != "dir")
        self.assertEqual(kept, [], "a copy at the offered version was set aside")
        for p in created:
            if after[p][0] == "file":
                with open(os.path.join(self.parent.encode(), p), "rb") as f:
                    data = f.read()
                self.assertNotIn(b"ESCAPED", data, p)
                self.assertNotIn(b"sentinel", data, p)
        log = client.log()
        refusals = log.count("bad path") + log.count("refusing")
        self.assertGreater(refusals, 0, log)
        record("paths_hostile_server", hostile_pages=len(HOSTILE_PAGES),
               pages_served=state["pages"], sessions=state["connections"],
               claims=state["claims"], refusals_logged=refusals,
               entries_compared=len(after), written_outside_store=0,
               store_entries_created=len(created), violations=0)
