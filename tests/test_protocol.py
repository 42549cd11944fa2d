"""
Tests for L{cluster_backup.protocol} (the encodings and their paging), and for
the AMP conversation between the client helpers of L{cluster_backup.session}
and L{cluster_backup.responder}'s L{ServerProtocol} over iosim, against a fake
ledger that records every call.  Both sides are tested together because each
is the other's only real peer.
"""

from __future__ import annotations

import hashlib
import json
import hmac
import struct
from typing import Iterable, Optional

from hypothesis import given, settings, strategies as st
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import capturedLogs, formatEvent
from twisted.protocols import amp
from twisted.test.iosim import FakeTransport, connectedServerAndClient
from twisted.trial.unittest import SynchronousTestCase

from cluster_backup import protocol as P, session as S
from cluster_backup.ledger import Ledger
from cluster_backup.records import (
    FileRecord,
    Need,
    ReportAnswer,
    SourceStatus,
    StoreStatus,
    relpath_problem,
)
from cluster_backup.responder import ServerFactory, ServerProtocol
from tests import wire

SECRET = b"s3cr3t-XYZZY-do-not-leak"
SOURCE = "host1:/data"
OTHER_SOURCE = "host1:/other"
STORE = "host3:/backups"
STORE_B = "host3:/more-backups"
FOREIGN_STORE = "host4:/backups"
STORES = {STORE: "host3", STORE_B: "host3", FOREIGN_STORE: "host4"}
RSYNC = ("host1", 5006, "src-data", "cbackup", "rsync-pw")

MUTATING = {
    "scan_started",
    "scan_batch",
    "scan_finished",
    "inventory_started",
    "report",
    "inventory_finished",
    "claim",
    "release",
    "drop",
}


class LedgerError(Exception):
    pass


# Named like the ledger module's exception, to check translation by name.
LedgerUnknownStore = type("UnknownStore", (LedgerError,), {})
LedgerBadCursor = type("BadCursor", (LedgerError,), {})
LedgerUnknownPath = type("UnknownPath", (LedgerError,), {})


class FakeLedger:
    """
    A small L{LedgerAPI}: files by path, what each store holds, claims; every
    call recorded in C{calls} as C{(method name, arguments)}.
    """

    def __init__(self, source: str, files: Iterable[FileRecord] = (), copies: int = 2):
        self.source = source
        self.copies = copies
        self.files = {r.path: r for r in files}
        self.held: dict[str, dict[bytes, FileRecord]] = {}
        self.claims: dict[str, set[bytes]] = {}
        self.calls: list[tuple] = []
        self.extra_stale: list[bytes] = []
        self.kept: dict[str, set[FileRecord]] = {}
        self.raise_on_report: Optional[Exception] = None
        self._safemode = False

    def mutations(self) -> list[tuple]:
        return [c for c in self.calls if c[0] in MUTATING]

    def state(self):
        return (
            {s: dict(h) for s, h in self.held.items()},
            {s: set(c) for s, c in self.claims.items()},
        )

    @property
    def safemode(self) -> bool:
        return self._safemode

    #: What L{fill_waits} answers; tests set it.
    fill_waits = False

    def scan_started(self) -> None:
        self.calls.append(("scan_started",))

    def scan_batch(self, records) -> None:
        self.calls.append(("scan_batch", list(records)))

    def scan_finished(self, complete, error=None) -> None:
        self.calls.append(("scan_finished", complete, error))

    def inventory_started(self, store: str) -> None:
        self.calls.append(("inventory_started", store))
        self.held[store] = {}

    def report(self, store, held=(), removed=(), used=None, quota=None,
               vet=None, kept=(), unkept=()) -> ReportAnswer:
        held, removed = list(held), list(removed)
        kept_now = self.kept.setdefault(store, set())
        kept_now.update(kept)
        kept_now.difference_update(unkept)
        if vet is not None:  # it may vet every path: it did not scan them
            vet([r.path for r in held])
            vet(removed)
        self.calls.append(("report", store, held, removed, used, quota))
        if self.raise_on_report is not None:
            raise self.raise_on_report
        mine = self.held.setdefault(store, {})
        for r in held:
            mine[r.path] = r
        for p in removed:
            mine.pop(p, None)
        stale = [
            r.path
            for r in held
            if r.path in self.files and self.files[r.path].version != r.version
        ]
        stale += self.extra_stale
        self.extra_stale = []
        return ReportAnswer(stale=stale)

    def inventory_finished(self, store: str) -> ReportAnswer:
        self.calls.append(("inventory_finished", store))
        orphans = sorted(p for p in self.held.get(store, {}) if p not in self.files)
        return ReportAnswer(orphans=orphans)

    def needs(self, store, cursor, limit):
        self.calls.append(("needs", store, cursor, limit))
        if cursor is not None and not cursor.isdigit():
            raise LedgerBadCursor(cursor)
        start = int(cursor) if cursor else 0
        held = self.held.get(store, {})
        wanted = [
            Need(r.path, r.size, r.mtime, 0, self.copies)
            for p, r in sorted(self.files.items())
            if p not in held
        ]
        page = wanted[start : start + limit]
        end = start + len(page)
        return page, (str(end).encode() if end < len(wanted) else None)

    def copies_of(self, path: bytes) -> int:
        """Stores (not hosts: this is a fake) holding C{path} current."""
        current = self.files[path].version
        return sum(
            1 for h in self.held.values() if path in h and h[path].version == current
        )

    def surplus(self, store, cursor, limit):
        """What C{store} holds current with more copies than wanted, most
        copies first; numeric cursors like L{needs}."""
        self.calls.append(("surplus", store, cursor, limit))
        if cursor is not None and not cursor.isdigit():
            raise LedgerBadCursor(cursor)
        if self._safemode:
            return [], None
        start = int(cursor) if cursor else 0
        held = self.held.get(store, {})
        listed = sorted(
            (
                Need(r.path, r.size, r.mtime, self.copies_of(p), self.copies)
                for p, r in self.files.items()
                if p in held and held[p].version == r.version
            ),
            key=lambda n: (-n.copies, n.path),
        )
        listed = [n for n in listed if n.copies > self.copies]
        page = listed[start : start + limit]
        end = start + len(page)
        return page, (str(end).encode() if end < len(listed) else None)

    def claim(self, store, paths, fill=False) -> list[bytes]:
        paths = list(paths)
        self.calls.append(("claim", store, paths, fill))
        taken = set().union(*[c for s, c in self.claims.items() if s != store])
        granted = [p for p in paths if p not in taken]
        self.claims.setdefault(store, set()).update(granted)
        return granted

    def release(self, store, paths) -> None:
        paths = list(paths)
        self.calls.append(("release", store, paths))
        self.claims.get(store, set()).difference_update(paths)

    def drop(self, store, paths) -> list[bytes]:
        """Grants what the store holds; like the real ledger, checks every
        path (a source file, or one the store holds) before any change."""
        paths = list(paths)
        self.calls.append(("drop", store, paths))
        mine = self.held.get(store, {})
        for p in paths:
            if p not in self.files and p not in mine:
                raise LedgerUnknownPath(p)
        granted = [p for p in paths if p in mine]
        for p in granted:
            del mine[p]
        return granted

    def knows(self, path: bytes) -> bool:
        self.calls.append(("knows", path))
        return path in self.files

    def status(self) -> SourceStatus:
        self.calls.append(("status",))
        return SourceStatus(
            source=self.source,
            copies=self.copies,
            files=len(self.files),
            bytes=sum(r.size for r in self.files.values()),
            histogram={0: [1, 10], 2: [len(self.files) - 1, 20]},
            under_files=1,
            under_bytes=10,
            safemode=self._safemode,
            scanned=12.5,
        )

    def store_status(self) -> list[StoreStatus]:
        self.calls.append(("store_status",))
        return [
            StoreStatus(s, s.split(":")[0], "live", len(h), 0, 1.0, quota=100, used=5)
            for s, h in sorted(self.held.items())
        ]


class RecordingTransport(FakeTransport):
    """An iosim transport that also keeps every byte written."""

    def __init__(self, protocol, isServer, traffic: list[bytes]):
        super().__init__(protocol, isServer)
        self.traffic = traffic

    def write(self, data):
        self.traffic.append(data)
        super().write(data)


FILES = [
    FileRecord(b"a.txt", 10, 100),
    FileRecord(b"dir/b.bin", 20, 200),
    FileRecord(b"dir/sub/c", 30, 300),
]


class Harness:
    """A client AMP connected to a L{ServerProtocol} over iosim."""

    def __init__(self, case, secret=SECRET, ledgers=None, serves=None, accept=None):
        self.case = case
        self.clock = Clock()
        self.traffic: list[bytes] = []
        self.ledger = FakeLedger(SOURCE, FILES)
        self.ledgers = ledgers if ledgers is not None else {SOURCE: self.ledger}
        self.server = ServerProtocol(
            self.ledgers,
            STORES,
            secret,
            "host1",
            lambda source: RSYNC,
            self.clock,
            serves=serves,
            accept=accept,
        )
        self.client, _, self.pump = connectedServerAndClient(
            lambda: self.server,
            amp.AMP,
            clientTransportFactory=lambda p: RecordingTransport(p, False, self.traffic),
            serverTransportFactory=lambda p: RecordingTransport(p, True, self.traffic),
            clock=self.clock,
        )
        # AMP forgets its transport when the connection is lost; keep them.
        self.server_io = self.server.transport
        self.client_io = self.client.transport

    def _settle(self, d: Deferred) -> Deferred:
        # Take the result before pumping: AMP's client treats an error
        # answer that has no errback yet when it arrives as fatal.
        outcome: Deferred = Deferred()
        d.chainDeferred(outcome)
        self.pump.flush()
        return outcome

    def ok(self, d):
        return self.case.successResultOf(self._settle(d))

    def refused(self, d, *kinds):
        return self.case.failureResultOf(self._settle(d), *kinds)

    def call(self, command, **kw):
        return self.ok(self.client.callRemote(command, **kw))

    def login(self, host="host3", secret=SECRET):
        return self.ok(S.login(self.client, host, secret))

    def wire(self) -> bytes:
        return b"".join(self.traffic)


# ---------------------------------------------------------------- auth


class AuthTests(SynchronousTestCase):
    def test_login_with_secret(self):
        h = Harness(self)
        self.assertIsNone(h.server.client_host)
        self.assertEqual(h.login(), "host1")
        self.assertEqual(h.server.client_host, "host3")
        answer = h.call(P.Status)
        self.assertIn(SOURCE, answer["statuses"])

    def test_login_without_secret(self):
        h = Harness(self, secret=None)
        hello = h.call(P.Hello, client_host="host3", protocol=P.PROTOCOL_VERSION)
        self.assertFalse(hello["auth_required"])
        self.assertEqual(h.server.client_host, "host3")
        h2 = Harness(self, secret=None)
        self.assertEqual(h2.login(secret=None), "host1")
        self.assertEqual(h2.server.client_host, "host3")

    def test_wrong_secret_refused(self):
        h = Harness(self)
        h.refused(S.login(h.client, "host3", b"wrong"), P.AuthFailed)
        self.assertIsNone(h.server.client_host)
        h.refused(h.client.callRemote(P.Status), P.NotAuthenticated)
        self.assertFalse(h.server_io.disconnecting)

    def test_client_without_secret_refused(self):
        h = Harness(self)
        f = h.refused(S.login(h.client, "host3", None), P.AuthFailed)
        self.assertIn("requires", str(f.value))
        self.assertIsNone(h.server.client_host)

    def test_client_with_secret_refuses_open_server(self):
        """A server that does not check the secret may be an impostor."""
        h = Harness(self, secret=None)
        h.refused(S.login(h.client, "host3", SECRET), P.AuthFailed)

    def test_client_checks_server_mac(self):
        """A server that accepts any MAC but cannot prove the secret is refused."""

        class Impostor(amp.AMP):
            @P.Hello.responder
            def hello(self, client_host, protocol):
                return dict(nonce=b"n" * 32, server_host="host1", auth_required=True)

            @P.Authenticate.responder
            def authenticate(self, client_nonce, mac):
                return dict(server_mac=b"\0" * 32)

        client, server, pump = connectedServerAndClient(Impostor, amp.AMP)
        d = S.login(client, "host3", SECRET)
        pump.flush()
        f = self.failureResultOf(d, P.AuthFailed)
        self.assertIn("prove", str(f.value))

    def test_mac_formula(self):
        """The client's MAC is the documented HMAC and the server checks it."""
        h = Harness(self)
        hello = h.call(P.Hello, client_host="host3", protocol=P.PROTOCOL_VERSION)
        nonce = b"c" * 32
        mac = hmac.new(
            SECRET, b"client" + hello["nonce"] + nonce + b"host3", hashlib.sha256
        ).digest()
        answer = h.call(P.Authenticate, client_nonce=nonce, mac=mac)
        expected = hmac.new(
            SECRET, b"server" + hello["nonce"] + nonce + b"host3", hashlib.sha256
        ).digest()
        self.assertEqual(answer["server_mac"], expected)
        self.assertEqual(h.server.client_host, "host3")

    def test_nothing_answered_before_auth(self):
        h = Harness(self)
        calls = [
            (P.Status, {}),
            (P.ListNeeds, dict(source=SOURCE, store=STORE, limit=10)),
            (P.ListSurplus, dict(source=SOURCE, store=STORE, limit=10)),
            (P.Claim, dict(source=SOURCE, store=STORE, paths=[b"a.txt"])),
            (P.Release, dict(source=SOURCE, store=STORE, paths=[b"a.txt"], drop=True)),
            (
                P.Report,
                dict(
                    source=SOURCE, store=STORE, files=FILES, removed=[], inventory=""
                ),
            ),
        ]
        for command, kw in calls:
            h.refused(h.client.callRemote(command, **kw), P.NotAuthenticated)
        # Also after a Hello that has not been followed by Authenticate.
        h.call(P.Hello, client_host="host3", protocol=P.PROTOCOL_VERSION)
        for command, kw in calls:
            h.refused(h.client.callRemote(command, **kw), P.NotAuthenticated)
        self.assertEqual(h.ledger.calls, [])
        self.assertFalse(h.server_io.disconnecting)

    def test_authenticate_before_hello(self):
        h = Harness(self)
        d = h.client.callRemote(P.Authenticate, client_nonce=b"x" * 32, mac=b"m" * 32)
        h.refused(d, P.NotAuthenticated)
        self.assertIsNone(h.server.client_host)

    def test_nonce_serves_one_try(self):
        """After a wrong MAC, even the right MAC for that nonce is refused."""
        h = Harness(self)
        hello = h.call(P.Hello, client_host="host3", protocol=P.PROTOCOL_VERSION)
        cn = b"c" * 32
        h.refused(
            h.client.callRemote(P.Authenticate, client_nonce=cn, mac=b"bad"),
            P.AuthFailed,
        )
        good = P.auth_mac(SECRET, b"client", hello["nonce"], cn, "host3")
        h.refused(
            h.client.callRemote(P.Authenticate, client_nonce=cn, mac=good),
            P.NotAuthenticated,
        )
        self.assertIsNone(h.server.client_host)

    def test_short_client_nonce_refused(self):
        h = Harness(self)
        hello = h.call(P.Hello, client_host="host3", protocol=P.PROTOCOL_VERSION)
        mac = P.auth_mac(SECRET, b"client", hello["nonce"], b"", "host3")
        d = h.client.callRemote(P.Authenticate, client_nonce=b"", mac=mac)
        h.refused(d, P.AuthFailed)
        self.assertIsNone(h.server.client_host)

    def test_three_failures_hang_up(self):
        h = Harness(self)
        for attempt in range(1, 4):
            self.assertFalse(h.server_io.disconnecting)
            h.call(P.Hello, client_host="host3", protocol=P.PROTOCOL_VERSION)
            d = h.client.callRemote(P.Authenticate, client_nonce=b"c" * 32, mac=b"x")
            h.refused(d, P.AuthFailed)
        self.assertTrue(h.server_io.disconnecting)
        self.assertTrue(h.client_io.disconnected)

    def test_two_failures_then_success(self):
        h = Harness(self)
        for attempt in range(2):
            h.refused(S.login(h.client, "host3", b"wrong"), P.AuthFailed)
        self.assertEqual(h.login(), "host1")
        self.assertFalse(h.server_io.disconnecting)

    def test_unauthenticated_connection_times_out(self):
        h = Harness(self)
        h.clock.advance(P.AUTH_TIMEOUT - 1)
        self.assertFalse(h.server_io.disconnecting)
        h.clock.advance(1)
        self.assertTrue(h.server_io.disconnecting)

    def test_authenticated_connection_does_not_time_out(self):
        h = Harness(self)
        h.login()
        h.clock.advance(P.AUTH_TIMEOUT * 10)
        self.assertFalse(h.server_io.disconnecting)
        self.assertEqual(h.clock.getDelayedCalls(), [])

    def test_unsupported_version(self):
        h = Harness(self)
        d = h.client.callRemote(P.Hello, client_host="host3", protocol=99)
        h.refused(d, P.UnsupportedVersion)

    def test_hello_restarts_authentication(self):
        h = Harness(self)
        h.login()
        h.call(P.Hello, client_host="host4", protocol=P.PROTOCOL_VERSION)
        self.assertIsNone(h.server.client_host)
        h.refused(h.client.callRemote(P.Status), P.NotAuthenticated)
        h.clock.advance(P.AUTH_TIMEOUT)
        self.assertTrue(h.server_io.disconnecting)

    def test_secret_never_on_wire_or_in_logs(self):
        with capturedLogs() as events:
            h = Harness(self)
            h.refused(S.login(h.client, "host3", b"wrong"), P.AuthFailed)
            h.login()
            h.ok(S.report_inventory(h.client, SOURCE, STORE, FILES))
            h.ok(S.list_all_needs(h.client, SOURCE, STORE))
            h.ok(S.list_surplus(h.client, SOURCE, STORE))
            h.ok(S.claim(h.client, SOURCE, STORE, [b"a.txt"]))
            h.ok(S.release(h.client, SOURCE, STORE, [b"a.txt"], drop=True))
            h.ok(S.status_all(h.client))
        wire = h.wire()
        self.assertIn(b"hello", wire)
        self.assertIn(b"dir/sub/c", wire)
        self.assertNotIn(SECRET, wire)
        self.assertNotIn(SECRET.hex().encode(), wire)
        text = "\n".join(formatEvent(e) for e in events)
        self.assertIn("authentication failed for host3 from", text)
        self.assertIn("claimed 1 of 1 files", text)
        self.assertNotIn(SECRET.decode(), text)
        self.assertNotIn("rsync-pw", text)


# ---------------------------------------------------------------- commands


class CommandTests(SynchronousTestCase):
    def setUp(self):
        self.h = Harness(self)
        self.h.login()
        self.ledger = self.h.ledger

    def test_report_inventory_one_page(self):
        held = [FileRecord(b"a.txt", 10, 100), FileRecord(b"dir/b.bin", 21, 200)]
        held.append(FileRecord(b"gone", 1, 1))
        answer = self.h.ok(
            S.report_inventory(self.h.client, SOURCE, STORE, held, used=50, quota=900)
        )
        self.assertEqual(answer, ReportAnswer(stale=(b"dir/b.bin",), orphans=(b"gone",)))
        self.assertEqual(
            self.ledger.calls,
            [
                ("inventory_started", STORE),
                ("report", STORE, held, [], 50, 900),
                ("inventory_finished", STORE),
            ],
        )

    def test_report_inventory_pages(self):
        """Pages travel MAX_CHUNKS to a Report; the server sees them in order."""
        held = [FileRecord(b"f%04d" % i, i, i) for i in range(100)]
        pages = len(P.page_records(held, 100))
        self.assertGreater(pages, 2 * P.MAX_CHUNKS)
        answer = self.h.ok(
            S.report_inventory(self.h.client, SOURCE, STORE, held, budget=100)
        )
        self.assertEqual(set(answer.orphans), {r.path for r in held})
        names = [c[0] for c in self.ledger.calls]
        self.assertEqual(names[0], "inventory_started")
        self.assertEqual(names[-1], "inventory_finished")
        self.assertEqual(names.count("inventory_started"), 1)
        reported = [r for c in self.ledger.calls if c[0] == "report" for r in c[2]]
        self.assertEqual(reported, held)
        self.assertEqual(names.count("report"), -(-pages // P.MAX_CHUNKS))

    def test_report_delta_chunks_both_lists(self):
        held = [FileRecord(b"h%04d" % i, i, i) for i in range(60)]
        gone = [b"g%04d" % i for i in range(90)]
        boxes = -(-max(len(P.page_records(held, 100)), len(P.page_paths(gone, 100)))
                  // P.MAX_CHUNKS)
        self.h.ok(S.report_delta(self.h.client, SOURCE, STORE, held, gone, budget=100))
        reports = [c for c in self.ledger.calls if c[0] == "report"]
        self.assertEqual(len(reports), boxes)
        self.assertEqual([r for c in reports for r in c[2]], held)
        self.assertEqual([p for c in reports for p in c[3]], gone)

    def test_report_empty_inventory(self):
        answer = self.h.ok(S.report_inventory(self.h.client, SOURCE, STORE, []))
        self.assertEqual(answer, ReportAnswer())
        self.assertEqual(
            [c[0] for c in self.ledger.calls],
            ["inventory_started", "report", "inventory_finished"],
        )

    def test_inventory_marks(self):
        self.assertEqual(S.inventory_marks(1), ["start+end"])
        self.assertEqual(S.inventory_marks(2), ["start", "end"])
        self.assertEqual(S.inventory_marks(4), ["start", "", "", "end"])

    def test_report_delta(self):
        new = [FileRecord(b"dir/sub/c", 30, 300)]
        self.h.ok(S.report_delta(self.h.client, SOURCE, STORE, new, [b"a.txt"], used=7))
        self.assertEqual(self.ledger.calls, [("report", STORE, new, [b"a.txt"], 7, None)])

    def test_report_delta_empty_renews(self):
        self.h.ok(S.report_delta(self.h.client, SOURCE, STORE))
        self.assertEqual(self.ledger.calls, [("report", STORE, [], [], None, None)])

    def test_report_answer_overflow_is_continued(self):
        """An answer too big for one value comes in several, nothing lost."""
        stale = [b"s%03d/" % i + b"x" * 4000 for i in range(40)]
        self.ledger.extra_stale = list(stale)
        answer = self.h.call(
            P.Report, source=SOURCE, store=STORE, files=[], removed=[], inventory=""
        )
        self.assertTrue(answer["more"])
        self.assertLessEqual(len(P.encode_paths(answer["stale"])), P.PAGE_BUDGET)
        got = list(answer["stale"])
        while answer["more"]:
            answer = self.h.call(
                P.Report, source=SOURCE, store=STORE, files=[], removed=[], inventory=""
            )
            got += answer["stale"]
        self.assertEqual(got, stale)
        # and the helper follows "more" by itself
        self.ledger.extra_stale = list(stale)
        result = self.h.ok(S.report_delta(self.h.client, SOURCE, STORE))
        self.assertEqual(list(result.stale), stale)

    def test_list_needs(self):
        answer = self.h.call(P.ListNeeds, source=SOURCE, store=STORE, limit=2)
        self.assertEqual(
            answer["needs"], [Need(b"a.txt", 10, 100, 0, 2), Need(b"dir/b.bin", 20, 200, 0, 2)]
        )
        self.assertEqual(answer["cursor"], b"2")
        self.assertFalse(answer["safemode"])
        answer = self.h.call(
            P.ListNeeds, source=SOURCE, store=STORE, limit=2, cursor=answer["cursor"]
        )
        self.assertEqual(answer["needs"], [Need(b"dir/sub/c", 30, 300, 0, 2)])
        self.assertIsNone(answer["cursor"])
        self.assertEqual(self.ledger.mutations(), [])

    def test_list_needs_safemode(self):
        self.ledger._safemode = True
        answer = self.h.call(P.ListNeeds, source=SOURCE, store=STORE, limit=5)
        self.assertTrue(answer["safemode"])

    def test_list_all_needs(self):
        needs, safemode, fill_waits = self.h.ok(
            S.list_all_needs(self.h.client, SOURCE, STORE, page=1)
        )
        self.assertEqual([n.path for n in needs], [r.path for r in FILES])
        self.assertEqual((safemode, fill_waits), (False, False))
        self.h.ledger.fill_waits = True
        _, _, fill_waits = self.h.ok(S.list_all_needs(self.h.client, SOURCE, STORE))
        self.assertTrue(fill_waits)
        needs, _, _ = self.h.ok(S.list_all_needs(self.h.client, SOURCE, STORE, limit=2))
        self.assertEqual(len(needs), 2)

    def test_list_needs_big_paths_fit(self):
        """Needs with 4,096-byte paths are sent in fewer per page, none lost."""
        files = [FileRecord(b"%04d" % i + b"n" * 4092, i, i) for i in range(100)]
        self.ledger.files = {r.path: r for r in files}
        answer = self.h.call(P.ListNeeds, source=SOURCE, store=STORE, limit=100)
        self.assertLess(len(answer["needs"]), 100)
        self.assertLessEqual(len(P.encode_needs(answer["needs"])), P.PAGE_BUDGET)
        needs, _, _ = self.h.ok(S.list_all_needs(self.h.client, SOURCE, STORE, page=100))
        self.assertEqual([n.path for n in needs], [r.path for r in files])

    def test_list_needs_asks_the_ledger_once_a_page(self):
        """Pages just over the budget are not listed twice (once too many, then fewer)."""
        files = [FileRecord(b"%04d" % i + b"n" * 60, i, i) for i in range(3000)]
        self.ledger.files = {r.path: r for r in files}
        self.ledger.calls.clear()
        needs, _, _ = self.h.ok(S.list_all_needs(self.h.client, SOURCE, STORE, limit=3000))
        self.assertEqual([n.path for n in needs], [r.path for r in files])
        asks = [c for c in self.ledger.calls if c[0] == "needs"]
        # 1,000 needs of 89 bytes do not fit one 60,000-byte page; each
        # page after the first is asked for once, at a size that fits.
        pages = -(-3000 // ((P.PAGE_BUDGET - P.LIST_HEADER) // P.need_size(needs[0])))
        self.assertLessEqual(len(asks), pages + 1)

    def hold(self, store: str, *records: FileRecord) -> None:
        """Make the fake ledger believe C{store} holds C{records}."""
        self.ledger.held.setdefault(store, {}).update((r.path, r) for r in records)

    def surplus_setup(self):
        """a.txt: 3 copies, dir/b.bin: 2, dir/sub/c: 1 (one wanted); STORE
        holds all three, dir/b.bin at a stale version on STORE_B."""
        self.ledger.copies = 1
        self.h.ok(S.report_inventory(self.h.client, SOURCE, STORE, FILES))
        self.hold(FOREIGN_STORE, FILES[0], FILES[1])
        self.hold(STORE_B, FILES[0], FileRecord(b"dir/sub/c", 31, 300))
        self.ledger.calls.clear()

    def test_list_surplus(self):
        self.surplus_setup()
        answer = self.h.call(P.ListSurplus, source=SOURCE, store=STORE, limit=1)
        self.assertEqual(answer["needs"], [Need(b"a.txt", 10, 100, 3, 1)])
        self.assertEqual(answer["cursor"], b"1")
        answer = self.h.call(
            P.ListSurplus, source=SOURCE, store=STORE, limit=5, cursor=answer["cursor"]
        )
        self.assertEqual(answer["needs"], [Need(b"dir/b.bin", 20, 200, 2, 1)])
        self.assertIsNone(answer["cursor"])
        self.assertNotIn("safemode", answer)
        self.assertEqual(
            self.ledger.calls,
            [("surplus", STORE, None, 1), ("surplus", STORE, b"1", 5)],
        )
        self.assertEqual(self.ledger.mutations(), [])
        answer = self.h.call(P.ListSurplus, source=SOURCE, store=STORE_B, limit=5)
        self.assertEqual(answer["needs"], [Need(b"a.txt", 10, 100, 3, 1)])

    def test_list_surplus_helper(self):
        self.surplus_setup()
        needs = self.h.ok(S.list_surplus(self.h.client, SOURCE, STORE, page=1))
        self.assertEqual(
            [(n.path, n.copies) for n in needs], [(b"a.txt", 3), (b"dir/b.bin", 2)]
        )
        self.assertEqual([c[0] for c in self.ledger.calls], ["surplus"] * 2)
        needs = self.h.ok(S.list_surplus(self.h.client, SOURCE, STORE, limit=1))
        self.assertEqual([n.path for n in needs], [b"a.txt"])
        self.assertEqual(self.ledger.calls[-1], ("surplus", STORE, None, 1))

    def test_list_surplus_follows_empty_pages(self):
        """A short or empty page with a cursor is not the end."""
        self.surplus_setup()
        real = self.ledger.surplus

        def budgeted(store, cursor, limit):
            if cursor is None:
                return [], b"0"
            return real(store, cursor, 1)

        self.ledger.surplus = budgeted
        needs = self.h.ok(S.list_surplus(self.h.client, SOURCE, STORE))
        self.assertEqual([n.path for n in needs], [b"a.txt", b"dir/b.bin"])

    def test_list_surplus_safemode(self):
        self.surplus_setup()
        self.ledger._safemode = True
        answer = self.h.call(P.ListSurplus, source=SOURCE, store=STORE, limit=5)
        self.assertEqual((answer["needs"], answer["cursor"]), ([], None))
        self.assertEqual(self.h.ok(S.list_surplus(self.h.client, SOURCE, STORE)), [])

    def test_list_surplus_big_paths_fit(self):
        """Surplus with 4,096-byte paths comes in fewer per page, none lost."""
        files = [FileRecord(b"%04d" % i + b"s" * 4092, i, i) for i in range(100)]
        self.ledger.files = {r.path: r for r in files}
        self.ledger.copies = 1
        self.hold(STORE, *files)
        self.hold(FOREIGN_STORE, *files)
        answer = self.h.call(P.ListSurplus, source=SOURCE, store=STORE, limit=100)
        self.assertLess(len(answer["needs"]), 100)
        self.assertIsNotNone(answer["cursor"])
        self.assertLessEqual(len(P.encode_needs(answer["needs"])), P.PAGE_BUDGET)
        needs = self.h.ok(S.list_surplus(self.h.client, SOURCE, STORE, page=100))
        self.assertEqual([n.path for n in needs], [r.path for r in files])

    def test_claim(self):
        grant = self.h.ok(S.claim(self.h.client, SOURCE, STORE, [b"a.txt", b"dir/b.bin"]))
        self.assertEqual(grant.granted, (b"a.txt", b"dir/b.bin"))
        self.assertEqual(grant.endpoint, P.RsyncEndpoint(*RSYNC))
        self.assertEqual(grant.endpoint.password, "rsync-pw")
        self.assertNotIn("rsync-pw", repr(grant))
        self.assertEqual(grant.ttl, P.CLAIM_TTL)
        self.assertEqual(self.ledger.claims[STORE], {b"a.txt", b"dir/b.bin"})
        # another store of the same host is granted only what is left
        grant = self.h.ok(S.claim(self.h.client, SOURCE, STORE_B, [b"a.txt", b"dir/sub/c"]))
        self.assertEqual(grant.granted, (b"dir/sub/c",))

    def test_claim_says_need_or_fill(self):
        """Claims are needs unless the client says greedy fill."""
        self.h.ok(S.claim(self.h.client, SOURCE, STORE, [b"a.txt"]))
        self.h.ok(S.claim(self.h.client, SOURCE, STORE, [b"dir/b.bin"], fill=True))
        claims = [c for c in self.ledger.calls if c[0] == "claim"]
        self.assertEqual(claims, [("claim", STORE, [b"a.txt"], False),
                                  ("claim", STORE, [b"dir/b.bin"], True)])

    def test_claim_pages(self):
        files = [FileRecord(b"%04d" % i + b"c" * 3000, i, i) for i in range(50)]
        self.ledger.files = {r.path: r for r in files}
        paths = [r.path for r in files]
        grant = self.h.ok(S.claim(self.h.client, SOURCE, STORE, paths))
        self.assertEqual(list(grant.granted), paths)
        self.assertGreater(len(self.ledger.mutations()), 1)

    def test_release(self):
        self.h.ok(S.claim(self.h.client, SOURCE, STORE, [b"a.txt"]))
        granted = self.h.ok(S.release(self.h.client, SOURCE, STORE, [b"a.txt"]))
        self.assertEqual(granted, [])
        self.assertEqual(self.ledger.claims[STORE], set())
        self.assertIn(("release", STORE, [b"a.txt"]), self.ledger.calls)

    def test_release_drop(self):
        self.h.ok(S.report_inventory(self.h.client, SOURCE, STORE, FILES[:2]))
        answer = self.h.call(
            P.Release, source=SOURCE, store=STORE, paths=[b"a.txt", b"dir/sub/c"], drop=True
        )
        self.assertEqual(answer["granted"], [b"a.txt"])
        self.assertIn(("drop", STORE, [b"a.txt", b"dir/sub/c"]), self.ledger.calls)

    def test_drop_orphan(self):
        """An orphan (unknown to the source, held by the store) may be dropped."""
        orphan = FileRecord(b"deleted/on/source", 5, 5)
        answer = self.h.ok(S.report_inventory(self.h.client, SOURCE, STORE, [orphan]))
        self.assertEqual(answer.orphans, (orphan.path,))
        granted = self.h.ok(
            S.release(self.h.client, SOURCE, STORE, [orphan.path], drop=True)
        )
        self.assertEqual(granted, [orphan.path])
        self.assertNotIn(orphan.path, self.ledger.held[STORE])

    def test_status(self):
        self.h.ok(S.report_inventory(self.h.client, SOURCE, STORE, FILES))
        sources, stores = self.h.ok(S.status_all(self.h.client))
        self.assertEqual(sources, [self.ledger.status()])
        self.assertEqual(stores, [(SOURCE, s) for s in self.ledger.store_status()])

    def test_status_pages(self):
        many = [
            StoreStatus(f"host{i}:/" + "p" * 200, f"host{i}", "live", i, i, None)
            for i in range(1000)
        ]
        self.ledger.store_status = lambda: many
        answer = self.h.call(P.Status)
        self.assertIsNotNone(answer["cursor"])
        self.assertLessEqual(len(answer["statuses"].encode()), P.PAGE_BUDGET)
        sources, stores = self.h.ok(S.status_all(self.h.client))
        self.assertEqual([s for _, s in stores], many)
        self.assertEqual(len(sources), 1)

    def test_status_bad_cursor(self):
        self.h.refused(self.h.client.callRemote(P.Status, cursor=b"-5"), P.BadArgument)
        self.h.refused(self.h.client.callRemote(P.Status, cursor=b"x"), P.BadArgument)

    def test_unknown_command_not_handled(self):
        class Bogus(amp.Command):
            commandName = b"bogus"

        self.h.refused(self.h.client.callRemote(Bogus), amp.UnhandledCommand)

    def test_odd_names_round_trip(self):
        """Non-UTF-8, newline, CR, and control bytes survive a real exchange."""
        odd = [
            b"caf\xe9/na\xefve",
            b"line\nbreak",
            b"cr\r\nlf",
            b"\xff\xfe\x00"[:2] + b"/x",
            b"tab\there/\x01\x7f",
            b" lead and trail ",
        ]
        records = [FileRecord(p, i, i) for i, p in enumerate(odd)]
        self.ledger.files = {r.path: r for r in records}
        self.h.ok(S.report_inventory(self.h.client, SOURCE, STORE, records))
        reported = [c for c in self.ledger.calls if c[0] == "report"][0][2]
        self.assertEqual(reported, records)
        grant = self.h.ok(S.claim(self.h.client, SOURCE, STORE_B, odd))
        self.assertEqual(list(grant.granted), odd)
        needs, _, _ = self.h.ok(S.list_all_needs(self.h.client, SOURCE, STORE_B))
        self.assertEqual(sorted(n.path for n in needs), sorted(odd))


# ---------------------------------------------------------------- refusals


class RawClaim(amp.Command):
    """L{Claim} with the paths value sent as raw bytes, to forge bad input."""

    commandName = P.Claim.commandName
    arguments = [
        (b"source", amp.Unicode()),
        (b"store", amp.Unicode()),
        (b"paths", amp.String()),
    ]
    response = [(b"granted", amp.String())]
    errors = dict(P.Claim.allErrors)


class RawReport(amp.Command):
    """L{Report} with the files value sent as raw bytes."""

    commandName = P.Report.commandName
    arguments = [
        (b"source", amp.Unicode()),
        (b"store", amp.Unicode()),
        (b"files", amp.String()),
        (b"removed", amp.String()),
        (b"inventory", amp.Unicode()),
    ]
    response = [(b"stale", amp.String())]
    errors = dict(P.Report.allErrors)


def raw_paths(*paths: bytes) -> bytes:
    return wire.raw_paths(paths)


def raw_records(*paths: bytes) -> bytes:
    return wire.raw_records((p, 1, 1) for p in paths)


class RawChunkedReport(amp.Command):
    """L{Report} with raw values under any of files, files.1 ... files.13."""

    commandName = P.Report.commandName
    arguments = [
        (b"source", amp.Unicode()),
        (b"store", amp.Unicode()),
        (b"files", amp.String(optional=True)),
    ] + [(b"files.%d" % k, amp.String(optional=True)) for k in range(1, 14)] + [
        (b"removed", amp.String()),
        (b"inventory", amp.Unicode()),
    ]
    response = [(b"stale", amp.String())]
    errors = dict(P.Report.allErrors)


class RawChunkedClaim(amp.Command):
    """L{Claim} with a continuation value, which Claim does not take."""

    commandName = P.Claim.commandName
    arguments = RawClaim.arguments + [(b"paths.1", amp.String())]
    response = RawClaim.response
    errors = dict(P.Claim.allErrors)


BAD_PATHS = [
    b"../etc/passwd",
    b"a/../../b",
    b"/etc/passwd",
    b"a\0b",
    b"",
    b"a//b",
    b"./a",
    b"x" * 4097,
]


class RefusalTests(SynchronousTestCase):
    """Every refusal is typed, keeps the connection, and changes no ledger."""

    def setUp(self):
        self.other = FakeLedger(OTHER_SOURCE, FILES)
        self.h = Harness(
            self,
            ledgers=None,
            serves=lambda store, source: not (store == STORE_B and source == OTHER_SOURCE),
        )
        self.h.ledgers[OTHER_SOURCE] = self.other
        self.h.login()
        self.ledger = self.h.ledger

    def assertUnchanged(self):
        self.assertEqual(self.ledger.mutations(), [])
        self.assertEqual(self.other.mutations(), [])
        # the connection still works
        self.assertFalse(self.h.server_io.disconnecting)
        self.assertIn("statuses", self.h.call(P.Status))

    def every_command(self, source, store):
        c = self.h.client
        return [
            S.report_inventory(c, source, store, FILES),
            S.report_delta(c, source, store, FILES, [b"a.txt"]),
            S.list_all_needs(c, source, store),
            S.list_surplus(c, source, store),
            S.claim(c, source, store, [b"a.txt"]),
            S.release(c, source, store, [b"a.txt"]),
            S.release(c, source, store, [b"a.txt"], drop=True),
        ]

    def test_unknown_source(self):
        for d in self.every_command("host1:/nope", STORE):
            self.h.refused(d, P.UnknownSource)
        self.assertUnchanged()

    def test_store_not_backing_up_source(self):
        for d in self.every_command(OTHER_SOURCE, STORE_B):
            f = self.h.refused(d, P.UnknownSource)
            self.assertIn("does not back up", str(f.value))
        self.assertUnchanged()

    def test_unknown_store(self):
        for d in self.every_command(SOURCE, "host3:/nope"):
            self.h.refused(d, P.UnknownStore)
        self.assertUnchanged()

    def test_another_hosts_store(self):
        for d in self.every_command(SOURCE, FOREIGN_STORE):
            self.h.refused(d, P.NotYourStore)
        self.assertUnchanged()

    def check_refusal(self, failure, bad):
        """A bad name is a BadPath naming its problem; one with a NUL, a malformed list."""
        if b"\0" in bad:
            self.assertRegex(str(failure.value), r"list of \d+ items holds \d+ paths")
        else:
            self.assertIsInstance(failure.value, P.BadPath)
            self.assertIn(relpath_problem(bad), str(failure.value))

    def test_bad_paths_refused_by_server(self):
        for bad in BAD_PATHS:
            d = self.h.client.callRemote(
                RawClaim, source=SOURCE, store=STORE, paths=raw_paths(b"a.txt", bad)
            )
            self.check_refusal(self.h.refused(d, P.BadArgument), bad)
            d = self.h.client.callRemote(
                RawReport,
                source=SOURCE,
                store=STORE,
                files=raw_records(bad),
                removed=b"",
                inventory="start+end",
            )
            self.check_refusal(self.h.refused(d, P.BadArgument), bad)
            d = self.h.client.callRemote(
                RawReport,
                source=SOURCE,
                store=STORE,
                files=b"",
                removed=raw_paths(bad),
                inventory="",
            )
            self.check_refusal(self.h.refused(d, P.BadArgument), bad)
        self.assertEqual(self.ledger.calls, [])
        self.assertUnchanged()

    def chunked_report(self, values: dict):
        return self.h.client.callRemote(
            RawChunkedReport, source=SOURCE, store=STORE, removed=b"", inventory="",
            **values)

    def test_chunked_report_joined(self):
        d = self.chunked_report({"files": raw_records(b"a.txt"),
                                 "files.1": raw_records(b"dir/b.bin")})
        self.h.ok(d)
        (call,) = self.ledger.calls
        self.assertEqual([r.path for r in call[2]], [b"a.txt", b"dir/b.bin"])

    def test_bad_chunk_keys_refused(self):
        one = raw_records(b"a.txt")
        cases = {
            "continuation without a first value": {"files.1": one},
            "a gap": {"files": one, "files.2": one},
            "over MAX_CHUNKS values": {"files": one, **{
                "files.%d" % k: one for k in range(1, P.MAX_CHUNKS + 1)}},
        }
        for why, values in cases.items():
            f = self.h.refused(self.chunked_report(values), P.BadArgument)
            self.assertIn("files", str(f.value), why)
        d = self.h.client.callRemote(RawChunkedClaim, source=SOURCE, store=STORE,
                                     paths=raw_paths(b"a.txt"),
                                     **{"paths.1": raw_paths(b"dir/b.bin")})
        f = self.h.refused(d, P.BadArgument)
        self.assertIn("paths takes one value", str(f.value))
        # A bad path in a later value refuses the whole report.
        f = self.h.refused(self.chunked_report({"files": one, "files.1": raw_records(b"../x")}),
                           P.BadArgument)
        self.assertIsInstance(f.value, P.BadPath)
        self.assertEqual(self.ledger.calls, [])
        self.assertUnchanged()

    def test_truncated_value_refused(self):
        for data in [b"\x00", b"\x00\x05abc", raw_paths(b"a.txt")[:-1]]:
            d = self.h.client.callRemote(RawClaim, source=SOURCE, store=STORE, paths=data)
            self.h.refused(d, P.BadArgument)
        self.assertUnchanged()

    def test_bad_paths_refused_by_client(self):
        for bad in BAD_PATHS:
            sent = len(self.h.wire())
            d = S.claim(self.h.client, SOURCE, STORE, [bad])
            self.h.refused(d, P.BadPath)
            self.assertEqual(len(self.h.wire()), sent)  # nothing was sent
        self.assertEqual(self.ledger.calls, [])

    def test_unknown_paths(self):
        paths = [b"a.txt", b"dir/nope", b"dir/b.bin"]
        for drop in (None, False):
            if drop is None:
                d = S.claim(self.h.client, SOURCE, STORE, paths)
            else:
                d = S.release(self.h.client, SOURCE, STORE, paths, drop=drop)
            f = self.h.refused(d, P.UnknownPath)
            self.assertIn("dir/nope", str(f.value))
        self.assertUnchanged()

    def test_unknown_paths_drop(self):
        """A drop naming a path neither in the source nor held changes nothing."""
        self.h.ok(S.report_inventory(self.h.client, SOURCE, STORE, FILES))
        before = self.ledger.state()
        paths = [b"a.txt", b"dir/nope", b"dir/b.bin"]
        d = S.release(self.h.client, SOURCE, STORE, paths, drop=True)
        f = self.h.refused(d, P.UnknownPath)
        self.assertIn("dir/nope", str(f.value))
        self.assertEqual(self.ledger.state(), before)
        self.assertEqual(self.ledger.calls[-1][0], "drop")
        self.assertFalse(self.h.server_io.disconnecting)

    def test_bad_inventory_mark(self):
        d = self.h.client.callRemote(
            P.Report, source=SOURCE, store=STORE, files=FILES, removed=[], inventory="begin"
        )
        self.h.refused(d, P.BadArgument)
        self.assertUnchanged()

    def test_negative_usage(self):
        d = S.report_delta(self.h.client, SOURCE, STORE, FILES, used=-1)
        self.h.refused(d, P.BadArgument)
        self.assertUnchanged()

    def test_bad_limit(self):
        d = self.h.client.callRemote(P.ListNeeds, source=SOURCE, store=STORE, limit=0)
        self.h.refused(d, P.BadArgument)
        self.assertUnchanged()

    def test_limit_is_capped(self):
        for command, name in ((P.ListNeeds, "needs"), (P.ListSurplus, "surplus")):
            self.h.call(command, source=SOURCE, store=STORE, limit=10**9)
            kind, store, cursor, limit = self.ledger.calls[-1]
            self.assertEqual((kind, store, cursor), (name, STORE, None))
            self.assertLessEqual(limit, P.MAX_NEEDS_LIMIT)
            self.assertGreater(limit, 0)

    def test_surplus_bad_limit(self):
        for limit in (0, -3):
            d = self.h.client.callRemote(
                P.ListSurplus, source=SOURCE, store=STORE, limit=limit
            )
            self.h.refused(d, P.BadArgument)
        self.assertEqual(self.ledger.calls, [])
        self.assertUnchanged()

    def test_surplus_bad_cursor_translated(self):
        d = self.h.client.callRemote(
            P.ListSurplus, source=SOURCE, store=STORE, limit=5, cursor=b"garbage"
        )
        f = self.h.refused(d, P.BadArgument)
        self.assertIn("BadCursor", str(f.value))
        self.assertUnchanged()

    def test_surplus_refusals_touch_no_ledger(self):
        """Every refused ListSurplus is refused before any ledger call."""
        c = self.h.client
        cases = [
            (P.UnknownSource, dict(source="host1:/nope", store=STORE)),
            (P.UnknownSource, dict(source=OTHER_SOURCE, store=STORE_B)),
            (P.UnknownStore, dict(source=SOURCE, store="host3:/nope")),
            (P.NotYourStore, dict(source=SOURCE, store=FOREIGN_STORE)),
        ]
        for kind, kw in cases:
            self.h.refused(c.callRemote(P.ListSurplus, limit=5, **kw), kind)
        self.assertEqual(self.ledger.calls, [])
        self.assertEqual(self.other.calls, [])
        self.assertUnchanged()

    def test_ledger_errors_translated_by_name(self):
        self.ledger.raise_on_report = LedgerUnknownStore("ledger has no such store")
        d = S.report_delta(self.h.client, SOURCE, STORE)
        f = self.h.refused(d, P.UnknownStore)
        self.assertIn("ledger has no such store", str(f.value))
        self.assertFalse(self.h.server_io.disconnecting)

    def test_bad_cursor_translated(self):
        d = self.h.client.callRemote(
            P.ListNeeds, source=SOURCE, store=STORE, limit=5, cursor=b"garbage"
        )
        self.h.refused(d, P.BadArgument)
        self.assertUnchanged()


# ---------------------------------------------------------------- real ledger

REAL_STORES = {
    STORE: "host3",
    STORE_B: "host3",
    FOREIGN_STORE: "host4",
    "host5:/b": "host5",
}


class RealLedgerSurplusTests(SynchronousTestCase):
    """ListSurplus and drops over AMP against a real L{Ledger}."""

    def setUp(self):
        self.clock = Clock()
        self.real = Ledger(SOURCE, 1, self.clock, REAL_STORES)
        self.real.scan_started()
        self.real.scan_batch(FILES)
        self.real.scan_finished(True)
        self.h = Harness(self, ledgers={SOURCE: self.real})
        self.h.login()
        for store in (FOREIGN_STORE, "host5:/b", STORE_B):
            self.real.inventory_started(store)
            held = {FOREIGN_STORE: FILES[:2], "host5:/b": FILES[:1]}.get(store, [])
            self.real.report(store, held)
            self.real.inventory_finished(store)
        self.assertTrue(self.real.safemode)  # STORE has not reported yet

    def test_surplus_then_drop(self):
        self.assertEqual(self.h.ok(S.list_surplus(self.h.client, SOURCE, STORE)), [])
        self.h.ok(S.report_inventory(self.h.client, SOURCE, STORE, FILES))
        self.assertFalse(self.real.safemode)
        needs = self.h.ok(S.list_surplus(self.h.client, SOURCE, STORE, page=1))
        self.assertEqual(
            needs, [Need(b"a.txt", 10, 100, 3, 1), Need(b"dir/b.bin", 20, 200, 2, 1)]
        )
        granted = self.h.ok(
            S.release(self.h.client, SOURCE, STORE, [b"a.txt"], drop=True)
        )
        self.assertEqual(granted, [b"a.txt"])
        needs = self.h.ok(S.list_surplus(self.h.client, SOURCE, STORE))
        self.assertEqual([n.path for n in needs], [b"dir/b.bin"])
        # STORE_B (same host) holds nothing: it has nothing to drop.
        self.assertEqual(self.h.ok(S.list_surplus(self.h.client, SOURCE, STORE_B)), [])

    def test_bad_cursors_refused(self):
        self.h.ok(S.report_inventory(self.h.client, SOURCE, STORE, FILES))
        before = (self.real.status(), self.real.store_status())
        _, needs_cursor = self.real.needs("host5:/b", None, 1)
        self.assertIsNotNone(needs_cursor)
        for cursor in (b"garbage", needs_cursor):
            d = self.h.client.callRemote(
                P.ListSurplus, source=SOURCE, store=STORE, limit=5, cursor=cursor
            )
            self.h.refused(d, P.BadArgument)
        d = self.h.client.callRemote(P.ListSurplus, source=SOURCE, store=STORE, limit=0)
        self.h.refused(d, P.BadArgument)
        self.assertEqual((self.real.status(), self.real.store_status()), before)
        self.assertFalse(self.h.server_io.disconnecting)


class RealLedgerPathTests(SynchronousTestCase):
    """
    Bad names in a Report against a real L{Ledger}: the Report's lists are
    decoded unchecked and the ledger has the names it does not know
    checked, so this shows each list of each kind of report is refused
    with the ledger unchanged, whether the scan is complete (a bad name
    would be an orphan) or not (it would be kept aside).
    """

    def setUp(self):
        self.clock = Clock()

    def start(self, complete: bool) -> None:
        self.real = Ledger(SOURCE, 1, self.clock, REAL_STORES)
        self.real.scan_started()
        self.real.scan_batch(FILES)
        if complete:
            self.real.scan_finished(True)
        self.h = Harness(self, ledgers={SOURCE: self.real})
        self.h.login()
        self.h.ok(S.report_inventory(self.h.client, SOURCE, STORE, FILES[:1]))
        self.clock.advance(7)

    def state(self):
        return (self.real.status(), self.real.store_status(),
                self.real.needs(STORE_B, None, 100))

    def report(self, files=(), removed=(), inventory=""):
        return self.h.client.callRemote(
            RawReport, source=SOURCE, store=STORE, files=raw_records(*files),
            removed=raw_paths(*removed), inventory=inventory)

    def test_bad_names_in_every_list_and_kind_of_report(self):
        refused = 0
        for complete in (True, False):
            self.start(complete)
            before = self.state()
            for bad in BAD_PATHS:
                for inventory in ("", "start", "start+end"):
                    for files, removed in (([b"a.txt", bad], []), ([b"a.txt"], [b"a.txt", bad])):
                        d = self.report(files, removed, inventory)
                        f = self.h.refused(d, P.BadArgument)
                        RefusalTests.check_refusal(self, f, bad)
                        refused += 1
                        # Nothing changed: no lease renewed, no inventory begun.
                        self.assertEqual(self.state(), before, (complete, bad, inventory))
            # No bad name was kept as an orphan or aside for the scan's end.
            if not complete:
                self.real.scan_finished(True)
            answer = self.h.ok(S.report_delta(self.h.client, SOURCE, STORE, FILES[:1], []))
            self.assertEqual((list(answer.stale), list(answer.orphans)), ([], []))
        self.assertEqual(refused, 2 * len(BAD_PATHS) * 6)

    def test_odd_unknown_names_pass(self):
        self.start(True)
        answer = self.h.ok(S.report_delta(self.h.client, SOURCE, STORE,
                                          [FileRecord(b"caf\xe9/new\nline", 1, 1)], []))
        self.assertEqual(list(answer.orphans), [b"caf\xe9/new\nline"])

class AcceptTests(SynchronousTestCase):
    """L{P.Accept} over AMP against a real L{Ledger} holding a scan."""

    def setUp(self):
        self.clock = Clock()
        many = [FileRecord(b"f%02d" % n, 10, 1) for n in range(20)]
        self.real = Ledger(SOURCE, 1, self.clock, REAL_STORES, max_change=0.2)
        self.real.scan_started()
        self.real.scan_batch(many)
        self.real.scan_finished(True)
        self.real.scan_started()
        self.real.scan_batch(many[:5])
        self.real.scan_finished(True)  # 15 of 20 gone: held
        self.h = Harness(self, ledgers={SOURCE: self.real},
                         accept=lambda source: self.real.accept())

    def test_needs_authentication(self):
        self.h.refused(self.h.client.callRemote(P.Accept, source=SOURCE), P.NotAuthenticated)
        self.assertIsNotNone(self.real.status().held)

    def test_accept_applies_once(self):
        self.h.login("cbackup-status")
        self.assertEqual(self.real.status().files, 20)
        answer = self.h.call(P.Accept, source=SOURCE)
        self.assertTrue(answer["applied"])
        self.assertEqual(json.loads(answer["change"])["deleted_files"], 15)
        self.assertEqual(self.real.status().files, 5)
        self.assertFalse(self.h.call(P.Accept, source=SOURCE)["applied"])

    def test_unknown_source(self):
        self.h.login()
        self.h.refused(self.h.client.callRemote(P.Accept, source="host9:/x"),
                       P.UnknownSource)
        self.assertIsNotNone(self.real.status().held)


class KeptVersionTests(SynchronousTestCase):
    """Report's kept/unkept and DropKept over AMP against a real L{Ledger} (rule 7)."""

    def setUp(self):
        self.clock = Clock()
        self.real = Ledger(SOURCE, 1, self.clock, REAL_STORES)
        self.real.scan_started()
        self.real.scan_batch(FILES)
        self.real.scan_finished(True)
        self.h = Harness(self, ledgers={SOURCE: self.real})
        self.h.login()
        for store in REAL_STORES:
            if store != STORE:
                self.real.inventory_started(store)
                self.real.inventory_finished(store)
        self.old = FileRecord(b"a.txt", 9, 50)

    def test_inventory_kept_then_drop_only_while_kept_elsewhere(self):
        self.h.ok(S.report_inventory(self.h.client, SOURCE, STORE, FILES, kept=[self.old]))
        self.assertFalse(self.real.safemode)
        self.assertEqual(self.h.ok(S.drop_kept(self.h.client, SOURCE, STORE, [self.old])), [])
        self.real.report(FOREIGN_STORE, [], kept=[self.old])
        granted = self.h.ok(S.drop_kept(self.h.client, SOURCE, STORE, [self.old]))
        self.assertEqual(list(granted), [self.old])
        # Granted at once: the other host's copy is now the last one.
        self.assertEqual(self.real.drop_kept(FOREIGN_STORE, [self.old]), [])

    def test_delta_kept_and_unkept(self):
        self.h.ok(S.report_inventory(self.h.client, SOURCE, STORE, FILES))
        self.real.report(FOREIGN_STORE, [], kept=[self.old])
        self.h.ok(S.report_delta(self.h.client, SOURCE, STORE, kept=[self.old]))
        self.h.ok(S.report_delta(self.h.client, SOURCE, STORE, unkept=[self.old]))
        self.assertEqual(self.h.ok(S.drop_kept(self.h.client, SOURCE, STORE, [self.old])), [])

    def test_bad_kept_path_refused(self):
        self.h.ok(S.report_inventory(self.h.client, SOURCE, STORE, FILES))
        d = self.h.client.callRemote(P.Report, source=SOURCE, store=STORE, files=[],
                                     removed=[], inventory="",
                                     kept=[FileRecord.unchecked(b"../x", 1, 1)])
        self.h.refused(d, P.BadPath, P.BadArgument)


# ---------------------------------------------------------------- encodings


def _component():
    return st.binary(min_size=1, max_size=40).map(
        lambda b: b.replace(b"/", b"_").replace(b"\0", b"_")
    ).map(lambda b: b + b"_" if b in (b".", b"..") else b)


paths_strategy = st.one_of(
    st.lists(_component(), min_size=1, max_size=8).map(b"/".join),
    st.integers(1, 4096).map(lambda n: b"p" * n),
    st.integers(1, 2047).map(lambda n: b"d" * n + b"/" + b"f" * (4095 - n - 1)),
)
records_strategy = st.builds(
    FileRecord,
    paths_strategy,
    st.integers(0, 2**63 - 1),  # off_t: sizes are signed 64-bit
    st.integers(-(2**63), 2**63 - 1),
)
needs_strategy = st.builds(
    Need,
    paths_strategy,
    st.integers(0, 2**63 - 1),
    st.integers(-(2**63), 2**63 - 1),
    st.integers(0, 2**32 - 1),
    st.integers(0, 2**32 - 1),
)
budgets = st.one_of(st.just(P.PAGE_BUDGET), st.integers(4200, P.PAGE_BUDGET))


class EncodingTests(SynchronousTestCase):
    def test_paths_strategy_is_valid(self):
        self.assertIsNone(relpath_problem(b"d" * 2047 + b"/" + b"f" * 2048))
        self.assertEqual(len(b"d" * 2047 + b"/" + b"f" * 2048), 4096)

    @given(st.lists(paths_strategy, max_size=50))
    def test_paths_round_trip(self, paths):
        self.assertEqual(P.decode_paths(P.encode_paths(paths)), paths)

    @given(st.lists(st.integers(1, 300).map(lambda n: b"s" * n), max_size=60),
           st.integers(0, 60), st.integers(2000, 4200))
    def test_a_long_path_anywhere_in_a_page_is_measured(self, short, at, n):
        # The decoder skips measuring paths when every aligned block of the
        # page holds a NUL; a path over MAX_PATH must still be caught
        # wherever it falls, and one of MAX_PATH bytes pass.
        paths = short[:at] + [b"L" * n] + short[at:]
        data = P._encode(paths, (), check=False)
        if n > P.MAX_PATH:
            self.assertRaises(P.BadPath, P.decode_paths, data)
        else:
            self.assertEqual(P.decode_paths(data), paths)

    @given(st.lists(records_strategy, max_size=50))
    def test_records_round_trip(self, records):
        self.assertEqual(P.decode_records(P.encode_records(records)), records)

    @given(st.lists(needs_strategy, max_size=50))
    def test_needs_round_trip(self, needs):
        self.assertEqual(P.decode_needs(P.encode_needs(needs)), needs)

    @given(st.binary(max_size=300))
    def test_garbage_decodes_or_is_refused(self, data):
        """Any bytes decode, or raise the typed error, never anything else."""
        for decode, encode in [
            (P.decode_paths, P.encode_paths),
            (P.decode_records, P.encode_records),
            (P.decode_needs, P.encode_needs),
        ]:
            try:
                items = decode(data)
            except P.BadArgument:
                continue
            self.assertEqual(encode(items), data)

    def test_sizes_match_encoding(self):
        r = FileRecord(b"abc", 1, 2)
        n = Need(b"abcd", 1, 2, 3, 4)
        for size, encode, item in [(P.path_size, P.encode_paths, b"abc"),
                                   (P.record_size, P.encode_records, r),
                                   (P.need_size, P.encode_needs, n)]:
            self.assertEqual(P.LIST_HEADER + size(item), len(encode([item])))
            self.assertEqual(P.LIST_HEADER + 3 * size(item), len(encode([item] * 3)))
            self.assertEqual(b"", encode([]))

    @given(st.lists(st.binary(max_size=12).filter(lambda p: b"\0" not in p),
                    min_size=1, max_size=8))
    def test_paths_checked_as_relpath_problem_says(self, paths):
        """The page-wide check refuses exactly what relpath_problem refuses."""
        bad = [p for p in paths if relpath_problem(p) is not None]
        if bad:
            with self.assertRaises(P.BadPath) as caught:
                P.encode_paths(paths)
            self.assertIn(repr(bad[0][:200]), str(caught.exception))
        else:
            self.assertEqual(P.decode_paths(P.encode_paths(paths)), paths)

    def test_paths_with_nul_or_not_bytes_refused(self):
        for paths in ([b"a", b"b\0c"], [b"a", "b"]):
            with self.assertRaises(P.BadPath):
                P.encode_paths(paths)

    def test_out_of_range_numbers_refused(self):
        with self.assertRaises(P.BadArgument):
            P.encode_records([FileRecord(b"a", -1, 0)])
        with self.assertRaises(P.BadArgument):
            P.encode_needs([Need(b"a", 0, 0, -1, 2)])
        with self.assertRaises(P.BadPath):
            P.encode_needs([Need(b"../a", 0, 0, 1, 2)])

    def test_oversized_value_refused(self):
        paths = [b"p" * 4096] * 20
        with self.assertRaises(P.BadArgument):
            P.PathList().toString(paths)
        self.assertLessEqual(len(P.PathList().toString(paths[:14])), amp.MAX_VALUE_LENGTH)

    def test_paginate_refuses_oversized_item(self):
        with self.assertRaises(ValueError):
            P.page_paths([b"p" * 100], budget=50)
        self.assertEqual(P.page_paths([]), [])


class PagingTests(SynchronousTestCase):
    def check_pages(self, items, pages, encode, size, budget):
        self.assertEqual([x for page in pages for x in page], list(items))
        for i, page in enumerate(pages):
            self.assertTrue(page)
            length = len(encode(page))
            self.assertLessEqual(length, budget)
            self.assertLessEqual(length, amp.MAX_VALUE_LENGTH)
            if i + 1 < len(pages):
                # greedy: the next item would not have fitted
                self.assertGreater(length + size(pages[i + 1][0]), budget)
            self.assertEqual(length, P.LIST_HEADER + sum(size(x) for x in page))

    @given(st.lists(paths_strategy, max_size=100), budgets)
    def test_page_paths(self, paths, budget):
        pages = P.page_paths(paths, budget)
        self.check_pages(paths, pages, P.encode_paths, P.path_size, budget)

    @given(st.lists(records_strategy, max_size=100), budgets)
    def test_page_records(self, records, budget):
        pages = P.page_records(records, budget)
        self.check_pages(records, pages, P.encode_records, P.record_size, budget)

    @given(st.lists(needs_strategy, max_size=100), budgets)
    def test_page_needs(self, needs, budget):
        pages = P.page_needs(needs, budget)
        self.check_pages(needs, pages, P.encode_needs, P.need_size, budget)

    @settings(max_examples=3)
    @given(st.integers(1, 4096), st.integers(0, 2**32))
    def test_100k_records(self, longest, seed):
        """100,000 records of paths up to C{longest} bytes page under budget."""
        pool = [b"r" * (1 + (seed + i * 7919) % longest) for i in range(97)]
        records = [FileRecord(pool[i % 97], i, i) for i in range(100_000)]
        pages = P.page_records(records)
        self.check_pages(records, pages, P.encode_records, P.record_size, P.PAGE_BUDGET)
        self.assertEqual(
            [r for page in pages for r in P.decode_records(P.encode_records(page))],
            records,
        )

    def test_100k_longest_paths(self):
        path = b"d" * 2047 + b"/" + b"f" * 2048
        paths = [path] * 100_000
        pages = P.page_paths(paths)
        per_page = (P.PAGE_BUDGET - P.LIST_HEADER) // P.path_size(path)
        self.assertEqual(len(pages), -(-100_000 // per_page))
        self.check_pages(paths, pages, P.encode_paths, P.path_size, P.PAGE_BUDGET)


class ExchangeTests(SynchronousTestCase):
    """Arbitrary valid paths survive a real AMP exchange unchanged."""

    @settings(max_examples=30)
    @given(st.lists(paths_strategy, min_size=1, max_size=30, unique=True))
    def test_claim_round_trip(self, paths):
        h = Harness(self)
        h.login()
        h.ledger.files = {p: FileRecord(p, 1, 1) for p in paths}
        grant = h.ok(S.claim(h.client, SOURCE, STORE, paths))
        self.assertEqual(list(grant.granted), paths)
        claimed = [p for c in h.ledger.calls if c[0] == "claim" for p in c[2]]
        self.assertEqual(claimed, paths)


class FactoryTests(SynchronousTestCase):
    def test_factory_builds_configured_protocols(self):
        ledger = FakeLedger(SOURCE, FILES)
        factory = ServerFactory(
            {SOURCE: ledger}, STORES, SECRET, "host1", lambda s: RSYNC, Clock()
        )
        a = factory.buildProtocol(None)
        b = factory.buildProtocol(None)
        self.assertIsInstance(a, ServerProtocol)
        self.assertIsNot(a, b)
        self.assertIs(a.ledgers[SOURCE], ledger)
        self.assertIs(a.factory, factory)
        client, server, pump = connectedServerAndClient(lambda: a, amp.AMP)
        d = S.login(client, "host3", SECRET)
        pump.flush()
        self.assertEqual(self.successResultOf(d), "host1")
