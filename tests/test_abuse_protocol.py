"""
Abuse of the AMP conversation against a live C{twistd -n cbackup-server}
(DESIGN.md rule 8): random and malformed boxes as raw bytes over TCP,
before and after authentication, for every command.

The server must answer every command with a typed error (never AMP's
C{UNKNOWN}, which means an exception it did not expect) or drop only that
connection; a second, well-behaved connection keeps working throughout;
the ledger (L{Status}, less the report age) is unchanged; and the server
log holds no traceback.  The same server, which has a SECRET, serves the
authentication and store-ownership checks.  Figures go to
L{tests.abuse_harness.FIGURES}.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
from collections import Counter

from hypothesis import HealthCheck, given, settings, strategies as st
from twisted.trial.unittest import SynchronousTestCase

from cluster_backup import protocol
from cluster_backup.protocol import COMMANDS, NeedList, PathList, RecordList, auth_mac
from cluster_backup.rsyncd import module_name, password_for
from tests import slow
from tests.abuse_harness import (
    Closed, RawAMP, Shared, count_tests, encode_box, record, wait_until)
from tests.harness import Twistd, free_port
from tests import wire

ADDRESS = "127.0.0.80"
SECRET = b"abuse-protocol-secret-91c7"
SERVER = "srv"

#: Error codes a refusal may carry; AMP's UNKNOWN means an unexpected exception.
TYPED = {b"BAD_ARGUMENT", b"BAD_PATH", b"UNKNOWN_SOURCE", b"UNKNOWN_STORE",
         b"NOT_YOUR_STORE", b"UNKNOWN_PATH", b"UNHANDLED", b"NOT_AUTHENTICATED",
         b"AUTH_FAILED", b"UNSUPPORTED_VERSION"}

#: Paths a hostile peer may send.
BAD_PATHS = [b"..", b"../../escape", b"/etc/passwd", b"a/../../b", b"a/./b", b"a//b",
             b"x\0y", b"", b"/", b"a/", b"." , b"x" * 5000]
ODD_PATHS = [b"caf\xe9", b"new\nline", b"sp ace", b"#hash", b"-rf", b"a" * 4096]


class LiveServer:
    """A real cbackup-server with a SECRET, two stores, and a small source."""

    def __init__(self, base: str):
        self.base = base
        self.source = os.path.join(base, "source")
        os.makedirs(os.path.join(self.source, "sub"))
        self.files = {b"a.txt": b"alpha\n" * 50, b"sub/b": b"beta\n", b"caf\xe9": b"latin\n"}
        for rel, data in self.files.items():
            with open(os.path.join(os.fsencode(self.source), rel), "wb") as f:
                f.write(data)
        self.port = free_port(ADDRESS)
        self.state = os.path.join(base, "state")
        self.source_id = f"{SERVER}:{self.source}"
        self.store_id = f"st:{base}/store"
        self.other_id = f"other:{base}/store2"
        self.config = os.path.join(base, "cluster.conf")
        with open(self.config, "w") as f:
            f.write(f"options: PORT: {self.port}\noptions: SECRET: {SECRET.decode()}\n"
                    "options: REPORT INTERVAL: 1h\noptions: RESCAN: 1h\n"
                    f"server: {SERVER}:{self.source}\ncopies: 1\naddress: {ADDRESS}\n"
                    f"backup: {self.store_id}\nsize: 1g\naddress: 127.0.0.81\n"
                    f"backup: {self.other_id}\nsize: 1g\naddress: 127.0.0.82\n")
        self.process = Twistd("cbackup-server", self.config, SERVER, base,
                              "--state-dir", self.state).start()
        wait_until(lambda: self.listening(), 30, "the server to listen")
        self.good = self.connect()
        self.good.login("st", SECRET)
        wait_until(lambda: self.status()[0]["scanned"] is not None, 30, "the first scan")
        st_ = os.lstat(os.path.join(self.source, "a.txt"))
        held = protocol.encode_records(
            [protocol.FileRecord(b"a.txt", st_.st_size, st_.st_mtime_ns // 10**9)])
        answer = self.good.call(b"report", source=self.source_id.encode(),
                                store=self.store_id.encode(), files=held, removed=b"",
                                inventory=b"start+end", used=b"300", quota=b"1000")
        assert b"_answer" in answer, answer
        self.baseline = self.ledger()

    def listening(self) -> bool:
        if not self.process.running():
            raise AssertionError(f"server exited:\n{self.process.log()}")
        from tests.harness import can_connect
        return can_connect(ADDRESS, self.port)

    def connect(self) -> RawAMP:
        return RawAMP(ADDRESS, self.port)

    def status(self) -> list:
        answer = self.good.call(b"status")
        assert b"_answer" in answer, answer
        return json.loads(answer[b"statuses"])

    def ledger(self) -> list:
        """Status without what moves with the clock alone."""
        items = self.status()
        for item in items:
            item.pop("last_report_age", None)
        return items

    def stop(self) -> None:
        self.good.close()
        self.process.stop()


def _start():
    import tempfile
    return LiveServer(tempfile.mkdtemp(prefix="abuse-protocol-", dir=os.getcwd()))


# --- strategies ----------------------------------------------------------------

_raw_list = wire.raw_paths
_raw_records = wire.raw_records
_raw_needs = wire.raw_needs


paths = st.one_of(st.sampled_from(BAD_PATHS + ODD_PATHS + [b"a.txt", b"sub/b", b"nope"]),
                  st.binary(max_size=40))
garbage = st.one_of(st.binary(max_size=200), st.just(b"x" * 65535),
                    st.sampled_from([b"", b"\xff\xfe", b"\0", b"-1", b"True", b"None"]))
u64 = st.integers(0, 2**64 - 1)
i64 = st.integers(-2**63, 2**63 - 1)
u32 = st.integers(0, 2**32 - 1)


def value_for(argument, ids) -> st.SearchStrategy:
    """Valid-looking and broken encodings of one AMP argument type."""
    from twisted.protocols import amp
    if isinstance(argument, PathList):
        good = st.lists(paths, max_size=5).map(_raw_list)
    elif isinstance(argument, RecordList):
        good = st.lists(st.tuples(paths, u64, i64), max_size=5).map(_raw_records)
    elif isinstance(argument, NeedList):
        good = st.lists(st.tuples(paths, u64, i64, u32, u32), max_size=5).map(_raw_needs)
    elif isinstance(argument, amp.Integer):
        good = st.one_of(st.integers(-2**70, 2**70).map(lambda n: b"%d" % n),
                         st.sampled_from([b"1", b"0", b"9" * 5000, b"1e3", b" 1"]))
    elif isinstance(argument, amp.Boolean):
        good = st.sampled_from([b"True", b"False", b"true", b"1"])
    elif isinstance(argument, amp.Unicode):
        good = st.one_of(st.sampled_from(ids), st.text(max_size=30).map(
            lambda t: t.encode("utf-8", "surrogatepass")))
    else:
        good = st.sampled_from([b"", b"0", b"start", b"start+end", b"end"])
    truncated = good.map(lambda v: v[:-1] if v else b"\x00")
    return st.one_of(good, good, good, garbage, truncated)


@st.composite
def command_box(draw, ids, commands=None):
    """One command box: known or unknown name, each argument valid, broken or missing."""
    names = sorted(COMMANDS) if commands is None else commands
    name = draw(st.one_of(st.sampled_from(names), st.sampled_from(
        [b"StartTLS", b"bogus", b"", b"hello\0", b"x" * 255]), st.binary(max_size=20)))
    box = {b"_command": name, b"_ask": b"%d" % draw(st.integers(1, 10**6))}
    command = COMMANDS.get(name)
    for key, argument in (command.arguments if command else []):
        choice = draw(st.integers(0, 9))
        if choice == 0:
            continue  # missing
        box[key] = draw(value_for(argument, ids))
    for _ in range(draw(st.integers(0, 2))):
        box[draw(st.binary(min_size=1, max_size=20))] = draw(garbage)
    return box


# --- the tests ------------------------------------------------------------------

@slow
class ProtocolAbuseTests(SynchronousTestCase):
    """Hostile peers against one live server shared by these tests."""

    examples = 400

    def setUp(self):
        self.server: LiveServer = SHARED.get(self)
        self.stats = Counter()

    def ids(self) -> list[bytes]:
        s = self.server
        return [s.source_id.encode(), s.store_id.encode(), s.other_id.encode(),
                b"st:/elsewhere", SERVER.encode(), b"st", b"\xff"]

    def assert_still_serving(self) -> None:
        """The well-behaved connection still works and the ledger is as it was."""
        self.assertEqual(self.server.ledger(), self.server.baseline)

    def check_answer(self, box: dict, answer: dict, authenticated: bool) -> None:
        if b"_error" in answer:
            code = answer.get(b"_error_code")
            self.assertIn(code, TYPED, f"{box!r:.300} -> {answer!r:.300}")
            if not authenticated and box[b"_command"] not in protocol.OPEN_COMMANDS \
                    and box[b"_command"] in COMMANDS:
                self.assertEqual(code, b"NOT_AUTHENTICATED")
            self.stats["refused"] += 1
        else:
            self.assertIn(b"_answer", answer)
            name = box[b"_command"]
            if not authenticated:
                self.assertIn(name, protocol.OPEN_COMMANDS, f"{box!r:.300} -> {answer!r:.300}")
            else:
                # Only what cannot change the ledger may succeed here.  Accept
                # changes it only when a scan is held (none is here: it answers
                # applied False); any peer with the secret may accept, as
                # `cbackup accept` does.  assert_still_serving checks the ledger.
                self.assertIn(name, (b"hello", b"list-needs", b"list-surplus", b"status",
                                     b"authenticate", b"accept"),
                              f"{box!r:.300} -> {answer!r:.300}")
                if name == b"accept":
                    self.assertEqual(answer.get(b"applied"), b"False", answer)
            self.stats["answered"] += 1

    def exchange(self, conn: RawAMP, box: dict, authenticated: bool) -> bool:
        """Send C{box}; check the answer; False when the server hung up."""
        conn.send(encode_box(box))
        self.stats["boxes"] += 1
        try:
            answer = conn.read_box()
        except Closed:
            self.stats["dropped"] += 1
            return False
        self.check_answer(box, answer, authenticated)
        return True

    def safe_for_ledger(self, box: dict, host: str) -> dict:
        """
        As the store's owner, a well-formed mutating command could change
        the ledger legitimately: make those address the other store.
        """
        s = self.server
        if host == "st" and box[b"_command"] in (b"report", b"claim", b"release") \
                and box.get(b"store") == s.store_id.encode():
            box[b"store"] = s.other_id.encode()
        return box

    def test_unauthenticated_commands(self):
        """Before authentication only a refusal, a Hello answer or a hang-up."""

        @settings(max_examples=self.examples, deadline=None,
                  suppress_health_check=list(HealthCheck))
        @given(st.booleans(), st.lists(command_box(self.ids()), min_size=1, max_size=4))
        def run(hello_first, boxes):
            conn = self.server.connect()
            self.stats["connections"] += 1
            if hello_first:
                boxes = [{b"_command": b"hello", b"_ask": b"0", b"client_host": b"st",
                          b"protocol": b"1"}] + boxes
            try:
                for box in boxes:
                    # Hello alone never authenticates: this server has a secret.
                    if not self.exchange(conn, box, authenticated=False):
                        break
            finally:
                conn.close()
                self.stats["bytes_sent"] += conn.sent
            self.assert_still_serving()

        run()
        self.finish("protocol_unauthenticated")

    def test_authenticated_commands(self):
        """After authentication: typed errors for every malformed command."""

        @settings(max_examples=self.examples, deadline=None,
                  suppress_health_check=list(HealthCheck))
        @given(st.sampled_from(["st", "intruder", "other"]),
               st.lists(command_box(self.ids(), sorted(set(COMMANDS) - {b"hello",
                                                                        b"authenticate"})),
                        min_size=1, max_size=5))
        def run(host, boxes):
            conn = self.server.connect()
            self.stats["connections"] += 1
            try:
                answer = conn.login(host, SECRET)
                self.assertIn(b"server_mac", answer)
                for box in boxes:
                    if not self.exchange(conn, self.safe_for_ledger(box, host), True):
                        break
            finally:
                conn.close()
                self.stats["bytes_sent"] += conn.sent
            self.assert_still_serving()

        run()
        self.finish("protocol_authenticated")

    def test_raw_frames(self):
        """Random bytes, truncated frames, long keys, huge boxes: a hang-up at most."""
        good = encode_box({b"_command": b"status", b"_ask": b"1"})
        frames = st.one_of(
            st.binary(max_size=2000),
            st.binary(min_size=1, max_size=len(good) - 1).map(lambda b: good[:len(b)]),
            st.just(b"\x01\x00" + b"k" * 256 + b"\x00\x01v\x00\x00"),  # key over 255
            st.just(b"\x00\x01k\xff\xff" + b"v" * 1000),  # value shorter than announced
            st.integers(33, 5000).map(lambda n: b"".join(
                struct.pack(">H", 4) + b"k%03d" % (i % 1000) + b"\x00\x01v"
                for i in range(n)) + b"\x00\x00"),  # a box of many keys
            st.just(encode_box({b"_answer": b"1"}) + encode_box({b"_error": b"9"})),
            st.just(encode_box({b"k": b"v"})),
            st.just(encode_box({b"_command": b"status"})),  # no _ask
            st.just((struct.pack(">H", 255) + b"k" * 255 + struct.pack(">H", 65535)
                     + b"v" * 65535) * 40),  # 2.6 MB of one box
        )

        @settings(max_examples=self.examples, deadline=None,
                  suppress_health_check=list(HealthCheck))
        @given(st.booleans(), frames)
        def run(login, data):
            conn = self.server.connect()
            self.stats["connections"] += 1
            try:
                if login:
                    conn.login("st", SECRET)
                try:
                    conn.send(data)
                    conn.sock.shutdown(1)  # a truncated frame stays truncated
                except OSError:
                    pass
                try:
                    while True:
                        answer = conn.read_box()
                        if b"_error" in answer:
                            self.assertIn(answer.get(b"_error_code"), TYPED, answer)
                except (Closed, OSError, struct.error):
                    pass
            finally:
                conn.close()
                self.stats["bytes_sent"] += conn.sent
            self.assert_still_serving()

        run()
        self.finish("protocol_raw_frames")

    def finish(self, name: str) -> None:
        log = self.server.process.log()
        first = log.find("Traceback")
        self.assertEqual(first, -1, log[max(0, first - 1500):first + 3000])
        self.assertNotIn("Unhandled Error", log)
        self.assertNotIn(SECRET.decode(), log)
        record(name, examples=self.examples, connections=self.stats["connections"],
               boxes=self.stats["boxes"], answered=self.stats["answered"],
               refused=self.stats["refused"], dropped=self.stats["dropped"],
               bytes_sent=self.stats["bytes_sent"], ledger_changes=0, server_tracebacks=0,
               violations=0)

    # --- authentication and ownership (rule 8, and DESIGN.md "Protocol") ----------

    def test_no_or_wrong_secret_gets_only_refusals(self):
        s = self.server
        secret_things = [s.source.encode(), b"a.txt", b"sub/b", s.store_id.encode()]
        seen = []
        refusals = 0
        for secret in (None, b"wrong-secret"):
            conn = s.connect()
            hello = conn.call(b"hello", client_host=b"st", protocol=b"1")
            self.assertEqual(hello[b"auth_required"], b"True")
            seen.append(hello)
            if secret is not None:
                for attempt in range(protocol.MAX_AUTH_FAILURES):
                    client_nonce = os.urandom(32)
                    mac = auth_mac(secret, b"client", hello[b"nonce"], client_nonce, "st")
                    answer = conn.call(b"authenticate", client_nonce=client_nonce, mac=mac)
                    seen.append(answer)
                    self.assertEqual(answer.get(b"_error_code"), b"AUTH_FAILED")
                    refusals += 1
                    if attempt + 1 < protocol.MAX_AUTH_FAILURES:
                        hello = conn.call(b"hello", client_host=b"st", protocol=b"1")
                wait_until(lambda: not conn.is_open(), 5, "the hang-up after 3 wrong MACs")
                conn = s.connect()
                conn.call(b"hello", client_host=b"st", protocol=b"1")
            for name in sorted(set(COMMANDS) - protocol.OPEN_COMMANDS):
                answer = conn.call(name, source=s.source_id.encode(),
                                   store=s.store_id.encode(), limit=b"10", paths=b"",
                                   files=b"", removed=b"", inventory=b"start+end",
                                   drop=b"False")
                seen.append(answer)
                self.assertEqual(answer.get(b"_error_code"), b"NOT_AUTHENTICATED", answer)
                refusals += 1
            conn.close()
        leaked = [a for a in seen for thing in secret_things if thing in b"".join(a.values())]
        self.assertEqual(leaked, [])
        self.assert_still_serving()
        record("auth_refusals", refusals=refusals, leaks=0, violations=0)

    def test_stores_act_only_for_themselves(self):
        s = self.server
        cases = 0
        for host, store, code in (("st", b"st:/not/in/config", b"UNKNOWN_STORE"),
                                  ("st", s.other_id.encode(), b"NOT_YOUR_STORE"),
                                  ("intruder", s.store_id.encode(), b"NOT_YOUR_STORE"),
                                  ("other", s.store_id.encode(), b"NOT_YOUR_STORE")):
            conn = s.connect()
            conn.login(host, SECRET)
            src = s.source_id.encode()
            calls = [
                (b"report", dict(files=b"", removed=_raw_list([b"a.txt"]), inventory=b"")),
                (b"report", dict(files=b"", removed=b"", inventory=b"start+end")),
                (b"release", dict(paths=_raw_list([b"a.txt"]), drop=b"True")),
                (b"release", dict(paths=_raw_list([b"a.txt"]), drop=b"False")),
                (b"claim", dict(paths=_raw_list([b"a.txt"]))),
                (b"list-needs", dict(limit=b"10")),
                (b"list-surplus", dict(limit=b"10")),
            ]
            for name, args in calls:
                answer = conn.call(name, source=src, store=store, **args)
                self.assertEqual(answer.get(b"_error_code"), code, (host, store, name, answer))
                cases += 1
            conn.close()
        self.assert_still_serving()
        record("store_ownership", refused=cases, violations=0)

    def test_rsync_refuses_a_wrong_password(self):
        s = self.server
        module = module_name(s.source)
        url = f"rsync://cbackup@{ADDRESS}:{s.port + 1}/{module}/a.txt"
        dest = os.path.abspath(self.mktemp())
        os.makedirs(dest)
        codes = {}
        for label, password in (("wrong", "not-the-password"),
                                ("secret itself", SECRET.decode()),
                                ("other module's", password_for(SECRET, SERVER, "x" + module)),
                                ("right", password_for(SECRET, SERVER, module))):
            proc = subprocess.run(["rsync", "-a", "--contimeout=10", url, dest + "/"],
                                  env={"RSYNC_PASSWORD": password, "PATH": os.environ["PATH"]},
                                  capture_output=True, timeout=60)
            codes[label] = proc.returncode
        self.assertEqual(codes, {"wrong": 5, "secret itself": 5, "other module's": 5,
                                 "right": 0})
        with open(os.path.join(dest, "a.txt"), "rb") as f:
            self.assertEqual(f.read(), s.files[b"a.txt"])
        for name in os.listdir(s.state):  # rsyncd.conf, secrets files, logs
            path = os.path.join(s.state, name)
            if os.path.isfile(path):
                with open(path, "rb") as f:
                    self.assertNotIn(SECRET, f.read(), path)
        self.assertNotIn(SECRET.decode(), s.process.log())
        record("rsync_password", refused=3, exit_codes=codes, violations=0)


SHARED = Shared(_start, LiveServer.stop, count_tests(ProtocolAbuseTests))
