"""
Tests for the config: the seed's format, the YAML twin, errors with lines.
"""

from __future__ import annotations

import os
import string
import subprocess
import sys

from hypothesis import given, strategies as st
from twisted.trial.unittest import SynchronousTestCase

from cluster_backup.config import (Cluster, ConfigError, Options, Source, Store, load, loads,
                                   read_secret)
from cluster_backup.config_write import to_lines, to_yaml

HERE = os.path.dirname(os.path.abspath(__file__))
CONF = os.path.join(os.path.dirname(HERE), "conf")

SEED = """\
options: PORT: 5005
server: host1:/path/to/directory
copies: 2
server: host2:/path/to/otherdir
copies: 1
backup: host3:/path/for/backups
size: 100gb
backup: host4:/path/for/backups
size: 1t
"""

GiB = 2**30
TiB = 2**40
#: The most a SECRET FILE may hold (64 KiB: a secret is one line).
MAX_SECRET_FILE = 64 * 1024


class SeedTests(SynchronousTestCase):
    """The user's own example loads unchanged, in both spellings."""

    def check_seed(self, cluster: Cluster) -> None:
        self.assertEqual(cluster.options.port, 5005)
        self.assertEqual(cluster.options.rsync_port, 5006)
        self.assertEqual(
            [(s.host, s.path, s.copies) for s in cluster.sources],
            [("host1", "/path/to/directory", 2), ("host2", "/path/to/otherdir", 1)])
        self.assertEqual(
            [(s.host, s.path, s.size, s.reserve) for s in cluster.stores],
            [("host3", "/path/for/backups", 100 * GiB, None),
             ("host4", "/path/for/backups", 1 * TiB, None)])

    def test_seed_text(self):
        self.check_seed(loads(SEED, "seed.conf"))

    def test_shipped_example_is_the_seed(self):
        with open(os.path.join(CONF, "cluster.conf")) as f:
            self.assertEqual(f.read(), SEED)
        self.check_seed(load(os.path.join(CONF, "cluster.conf")))

    def test_shipped_yaml_twin(self):
        cluster = load(os.path.join(CONF, "cluster.yaml"))
        self.check_seed(cluster)
        self.assertEqual(cluster, loads(SEED))

    def test_defaults(self):
        cluster = loads(SEED)
        o = cluster.options
        self.assertEqual(
            (o.secret, o.bwlimit, o.rescan, o.report_interval, o.dead_after, o.transport),
            (None, None, 3600.0, 60.0, 3600.0, "daemon"))
        self.assertEqual(cluster.sources[0].keep_deleted, 30 * 86400.0)
        self.assertEqual(cluster.sources[0].exclude, ())

    def test_secret_not_in_repr(self):
        cluster = loads("SECRET: hunter2-very-secret\n" + SEED.split("\n", 1)[1])
        self.assertEqual(cluster.options.secret, "hunter2-very-secret")
        self.assertNotIn("hunter2", repr(cluster))


class LineFormatTests(SynchronousTestCase):
    """Everything DESIGN.md's "Config" section promises of the line format."""

    def test_every_key(self):
        text = """\
# a comment line
PORT: 6000            # bare option before the first block
options: RSYNC PORT: 7000
options: SECRET: s3cret#not-a-comment
options: BWLIMIT: 10mb/s
options: RESCAN: 2h
options: REPORT_INTERVAL: 30s
options: dead-after: 1d
options: TRANSPORT: ssh
source: alpha:/srv/data/
copies: 3
rescan: 1h30m
exclude: *.tmp
exclude: cache/
keep deleted: 2w
address: 10.0.0.1
backup: beta:/backups
reserve: 50G
ignore source: alpha:/srv/data
Address: 10.0.0.2
backup: gamma:/b
size: 1.5t
"""
        cluster = loads(text, "all.conf")
        o = cluster.options
        self.assertEqual(
            (o.port, o.rsync_port, o.secret, o.bwlimit, o.rescan, o.report_interval,
             o.dead_after, o.transport),
            (6000, 7000, "s3cret#not-a-comment", 10 * 2**20, 7200.0, 30.0, 86400.0, "ssh"))
        (source,) = cluster.sources
        self.assertEqual(source, Source(
            host="alpha", path="/srv/data", copies=3, rescan=5400.0,
            exclude=("*.tmp", "cache/"), keep_deleted=14 * 86400.0, address="10.0.0.1"))
        beta, gamma = cluster.stores
        self.assertEqual(beta, Store(host="beta", path="/backups", reserve=50 * GiB,
                                     ignore_sources=("alpha:/srv/data",), address="10.0.0.2"))
        self.assertEqual(gamma.size, int(1.5 * TiB))
        self.assertEqual(cluster.stores_for(source), [gamma])
        self.assertEqual(cluster.address_of("alpha"), "10.0.0.1")
        self.assertEqual(cluster.address_of("gamma"), "gamma")

    def test_units(self):
        for text, expected in [("512", 512), ("1k", 1024), ("1KB", 1024), ("2KiB", 2048),
                               ("100gb", 100 * GiB), ("1t", TiB), ("1P", 2**50),
                               ("3 m", 3 * 2**20)]:
            cluster = loads(f"backup: h:/b\nsize: {text}\n")
            self.assertEqual(cluster.stores[0].size, expected, text)
        for text, expected in [("45", 45.0), ("45s", 45.0), ("5m", 300.0), ("2h", 7200.0),
                               ("30d", 30 * 86400.0), ("1h30m", 5400.0), ("1d 12h", 129600.0)]:
            cluster = loads(f"server: h:/s\nkeep deleted: {text}\n")
            self.assertEqual(cluster.sources[0].keep_deleted, expected, text)

    def test_ipv6_host(self):
        cluster = loads("server: [fd00::5]:/data\n")
        self.assertEqual((cluster.sources[0].host, cluster.sources[0].path),
                         ("[fd00::5]", "/data"))


def problems(text: str, filename: str = "bad.conf") -> list[str]:
    try:
        loads(text, filename)
    except ConfigError as e:
        return e.problems
    raise AssertionError(f"{text!r} loaded without error")


class ErrorTests(SynchronousTestCase):
    """Every bad input names its file and line, in both formats."""

    def assertProblem(self, text: str, line: int, words: str, filename="bad.conf"):
        found = problems(text, filename)
        self.assertTrue(
            any(p.startswith(f"{filename}:{line}: ") and words in p for p in found),
            f"expected {filename}:{line}: ...{words}... in {found}")

    def test_unknown_key_in_block(self):
        self.assertProblem(SEED.replace("copies: 1", "copeis: 1"), 5, "unknown key 'copeis'")

    def test_unknown_option(self):
        self.assertProblem("options: PROT: 5005\n" + SEED, 1, "unknown option 'prot'")

    def test_key_outside_block(self):
        self.assertProblem("copies: 2\n" + SEED, 1, "belongs inside a server: or backup: block")

    def test_global_option_inside_block(self):
        self.assertProblem(SEED + "PORT: 6000\n", 10, "global option")

    def test_bad_size(self):
        self.assertProblem(SEED.replace("size: 1t", "size: lots"), 9, "bad size 'lots'")

    def test_bad_duration(self):
        self.assertProblem(SEED + "server: h:/x\nrescan: 5 fortnights\n", 11, "bad duration")

    def test_copies_below_one(self):
        self.assertProblem(SEED.replace("copies: 2", "copies: 0"), 3, "at least 1")

    def test_copies_not_a_number(self):
        self.assertProblem(SEED.replace("copies: 2", "copies: two"), 3, "whole number")

    def test_missing_size(self):
        self.assertProblem(SEED.replace("size: 1t\n", ""), 8, "exactly one of 'size' or 'reserve'")

    def test_size_and_reserve(self):
        self.assertProblem(SEED + "reserve: 1g\n", 8, "both given")

    def test_duplicate_source(self):
        self.assertProblem(SEED + "server: host1:/path/to/directory/\ncopies: 1\n", 10,
                           "duplicate source host1:/path/to/directory (first at line 2)")

    def test_duplicate_key(self):
        self.assertProblem(SEED.replace("copies: 1", "copies: 1\ncopies: 3"), 6, "given twice")

    def test_bad_location(self):
        self.assertProblem("server: /no/host\n", 1, "expected host:/path")
        self.assertProblem("server: ho st:/x\n", 1, "bad host name")
        self.assertProblem("server: host:relative/path\n", 1, "absolute")
        self.assertProblem("server: host:/a/../b\n", 1, "'..'")

    def test_bad_port_and_address(self):
        self.assertProblem("PORT: 70000\n", 1, "1-65535")
        self.assertProblem("server: h:/s\naddress: not-an-ip\n", 2, "IP address")
        self.assertProblem("RSYNC PORT: 5005\n", 1, "differ from PORT")

    def test_conflicting_addresses(self):
        self.assertProblem("server: h:/s\naddress: 10.0.0.1\nbackup: h:/b\nsize: 1g\n"
                           "address: 10.0.0.2\n", 3, "has address 10.0.0.2 here")

    def test_one_address_two_hosts(self):
        self.assertProblem("server: a:/s\naddress: 10.0.0.1\nserver: b:/s\n"
                           "address: 10.0.0.1\n", 3, "one machine must have one name")

    def test_ignore_unknown_source(self):
        self.assertProblem(SEED + "ignore source: host1:/path/to/directory\n"
                           "ignore source: host9:/nope\n", 11, "not a source")

    def test_no_colon(self):
        self.assertProblem("server host1:/x\n", 1, "missing ':' after 'server'")
        self.assertProblem("just words\n", 1, "expected 'key: value'")

    def test_several_problems_all_reported(self):
        found = problems(SEED.replace("copies: 2", "copies: 0").replace("size: 1t", "size: x"))
        self.assertEqual([p.split(":")[1] for p in found], ["3", "9"])

    def test_yaml_syntax_error_line(self):
        text = "sources:\n  - server: h:/s\n    copies: [1\n"
        self.assertProblem(text, 4, "YAML syntax error", filename="bad.yaml")

    def test_yaml_errors_have_lines(self):
        text = ("options:\n  PORT: 5005\nsources:\n  - server: h:/s\n    copies: 0\n"
                "  - server: h:/s\nbackups:\n  - backup: b:/b\n    colour: red\n")
        found = problems(text, "bad.yaml")
        self.assertEqual(sorted(p.split(":", 2)[1] for p in found), ["5", "6", "8", "9"])
        self.assertProblem(text, 9, "unknown key 'colour'", filename="bad.yaml")
        self.assertProblem("sources: []\nwhatever: 1\n", 2, "unknown top-level key",
                           filename="bad.yaml")
        self.assertProblem("sources:\n  - copies: 1\n", 2, "exactly one of", filename="bad.yaml")

    def test_unreadable_file(self):
        missing = self.mktemp()
        with self.assertRaises(ConfigError) as raised:
            load(missing)
        self.assertIn(missing, str(raised.exception))
        self.assertIn("cannot read config", str(raised.exception))

    def test_not_utf8(self):
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(SEED.encode() + b"server: h:/caf\xe9\n")
        with self.assertRaises(ConfigError) as raised:
            load(path)
        self.assertEqual(raised.exception.problems, [f"{path}:10: not valid UTF-8 text"])


class EveryLineCheckedTests(SynchronousTestCase):
    """
    A line that cannot be read hides nothing else: every other line is
    still checked, and every problem is reported with its line.
    """

    def test_unreadable_line_and_bad_values_all_reported(self):
        text = (SEED.replace("copies: 2", "copies: 0")
                .replace("size: 1t", "size: huge")
                .replace("server: host2:/path/to/otherdir",
                         "server: host2:/path/to/otherdir\njust words"))
        found = problems(text)
        self.assertEqual([p.split(":")[1] for p in found], ["3", "5", "10"], found)
        self.assertIn("bad.conf:5: expected 'key: value', got 'just words'", found)

    def test_bad_block_head_keeps_its_keys_apart(self):
        """
        A block head that cannot be read (no ':' after 'server') still opens
        a block: its keys are checked there, and do not land in the block
        before it (no false 'given twice').
        """
        text = SEED.replace("server: host2:/path/to/otherdir", "server host2:/path/to/otherdir")
        self.assertEqual(problems(text), [
            "bad.conf:4: missing ':' after 'server' in 'server host2:/path/to/otherdir'"])
        worse = text.replace("copies: 1", "copies: none\ncolour: red")
        self.assertEqual([p.split(":")[1] for p in problems(worse)], ["4", "5", "6"])
        self.assertProblems(worse, 5, "copies: expected a whole number")
        self.assertProblems(worse, 6, "unknown key 'colour' in a server: block")

    def test_bad_head_without_colon_opens_a_block(self):
        text = SEED + "backup host5\nsize: 1g\nsize: 2g\n"
        self.assertEqual([p.split(":")[1] for p in problems(text)], ["10", "12"])
        self.assertProblems(text, 12, "'size' given twice in this block (first at line 11)")

    def test_ignored_source_in_an_unreadable_block_is_not_unknown(self):
        """Whether h1:/data is a source is unknown when its head is unreadable."""
        text = ("server h1 /data\ncopies: 2\nbackup: h2:/b\nsize: 1gallon\n"
                "ignore source: h1:/data\n")
        self.assertEqual([p.split(":")[1] for p in problems(text)], ["1", "4"])

    def test_bad_options_line_and_bad_values(self):
        text = "options PORT: 5005\noptions: BWLIMIT: fast\n" + SEED
        self.assertEqual([p.split(":")[1] for p in problems(text)], ["1", "2"])

    def test_yaml_syntax_error_has_line_and_column(self):
        text = "sources:\n  - server: h:/s\n    copies: [1\n"
        self.assertEqual(problems(text, "bad.yaml"), [
            "bad.yaml:4: YAML syntax error at column 1: expected ',' or ']', but got "
            "'<stream end>' (in the flow sequence that starts at line 3, column 13)"])
        tabs = "sources:\n  - server: h:/s\n\tcopies: 2\n"
        [problem] = problems(tabs, "bad.yaml")
        self.assertTrue(problem.startswith("bad.yaml:3: YAML syntax error at column 1: "),
                        problem)

    def test_yaml_shape_problems_hide_no_values(self):
        text = ("options:\n  PORT: 5005\n  BWLIMIT: [1, [2]]\nsources:\n"
                "  - server: h:/s\n    copies: 0\n  - copies: 2\n    colour: red\n"
                "backups:\n  - backup: b:/b\n    size: 1gallon\nwhatever: 1\n")
        self.assertEqual([p.split(":")[1] for p in problems(text, "bad.yaml")],
                         ["3", "6", "7", "8", "11", "12"])

    def assertProblems(self, text: str, line: int, words: str):
        found = problems(text)
        self.assertTrue(any(p.startswith(f"bad.conf:{line}: ") and words in p for p in found),
                        f"expected bad.conf:{line}: ...{words}... in {found}")


class SecretFileTests(SynchronousTestCase):
    """
    C{read_secret} reads a SECRET FILE as the server does at start: a
    regular file (or a symlink to one), at most L{MAX_SECRET_FILE} bytes;
    anything else is a L{ConfigError} naming the config and the path.
    """

    def cluster(self, path: str):
        return loads(f"SECRET FILE: {path}\nserver: h:/s\n", "c.conf")

    def path(self, data: bytes = b"s3cret\n") -> str:
        path = os.path.abspath(self.mktemp())
        with open(path, "wb") as f:
            f.write(data)
        return path

    def refused(self, path: str) -> str:
        with self.assertRaises(ConfigError) as raised:
            read_secret(self.cluster(path))
        [problem] = raised.exception.problems
        self.assertTrue(problem.startswith(f"c.conf: SECRET FILE {path}"), problem)
        return problem

    def test_first_line(self):
        self.assertEqual(read_secret(self.cluster(self.path(b"  s3cret \nmore\n"))), b"s3cret")

    def test_symlink_to_a_file(self):
        link = os.path.abspath(self.mktemp())
        os.symlink(self.path(), link)
        self.assertEqual(read_secret(self.cluster(link)), b"s3cret")

    def test_largest_allowed(self):
        data = b"s3cret\n" + b"#" * (MAX_SECRET_FILE - 7)
        self.assertEqual(read_secret(self.cluster(self.path(data))), b"s3cret")

    def test_too_big(self):
        path = self.path(b"s3cret\n" + b"#" * MAX_SECRET_FILE)
        self.assertIn("larger than 64 KiB", self.refused(path))

    def test_missing(self):
        self.assertIn("No such file or directory", self.refused(os.path.abspath(self.mktemp())))

    def test_folder(self):
        folder = os.path.abspath(self.mktemp())
        os.mkdir(folder)
        self.assertIn("not a regular file (a folder)", self.refused(folder))
        link = folder + ".link"
        os.symlink(folder, link)
        self.assertIn("not a regular file (a folder)", self.refused(link))

    def test_empty(self):
        self.assertIn("is empty", self.refused(self.path(b"\n\n")))

    def test_device_and_fifo_refused_without_reading(self):
        """
        /dev/zero (endless) and a FIFO (opening it waits for a writer) are
        refused at once; the read runs in a child with a deadline and a
        memory bound, so the old unbounded read fails instead of hanging.
        """
        fifo = os.path.abspath(self.mktemp())
        os.mkfifo(fifo)
        for path, kind in (("/dev/zero", "a character device"), (fifo, "a FIFO")):
            code = ("import resource, sys\n"
                    "resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))\n"
                    "from cluster_backup.config import ConfigError, loads, read_secret\n"
                    "try:\n"
                    f"    read_secret(loads('SECRET FILE: {path}\\n', 'c.conf'))\n"
                    "except ConfigError as e:\n"
                    "    print(e)\n")
            result = subprocess.run([sys.executable, "-c", code], capture_output=True,
                                    text=True, timeout=30, cwd=os.path.dirname(HERE))
            self.assertEqual(
                (result.returncode, result.stdout, result.stderr),
                (0, f"c.conf: SECRET FILE {path}: not a regular file ({kind})\n", ""))


# --- round trips -------------------------------------------------------------

_hosts = st.from_regex(r"\A[a-z][a-z0-9\-]{0,8}[a-z0-9]\Z")
_segment = st.text(string.ascii_letters + string.digits + "._-@+ ", min_size=1, max_size=8).filter(
    lambda s: s.strip() == s and s not in (".", ".."))
_paths = st.lists(_segment, min_size=1, max_size=4).map(lambda parts: "/" + "/".join(parts))
_durations = st.integers(1, 10**7).map(float)
_sizes = st.integers(1, 2**52)
_words = st.text(string.ascii_letters + string.digits + "!$%&*+-./:;<=>?@[]^_{|}~ ",
                 min_size=1, max_size=12).filter(lambda s: s.strip() == s and ": " not in s)


@st.composite
def clusters(draw) -> Cluster:
    port = draw(st.integers(1, 60000))
    options = Options(
        port=port,
        rsync_port=draw(st.integers(1, 65535).filter(lambda p: p != port)),
        secret=draw(st.none() | _words),
        bwlimit=draw(st.none() | _sizes),
        rescan=draw(_durations),
        report_interval=draw(_durations),
        dead_after=draw(_durations),
        transport=draw(st.sampled_from(["daemon", "ssh"])),
    )
    hosts = draw(st.lists(_hosts, min_size=1, max_size=4, unique=True))
    unique = draw(st.lists(st.ip_addresses(v=4).map(str), min_size=len(hosts),
                           max_size=len(hosts), unique=True))
    addresses = {h: a if draw(st.booleans()) else None for h, a in zip(hosts, unique)}

    def address(host):
        return addresses[host] if draw(st.booleans()) else None

    source_ids = draw(st.lists(st.tuples(st.sampled_from(hosts), _paths), max_size=4,
                               unique_by=lambda t: f"{t[0]}:{t[1]}"))
    sources = tuple(
        Source(host=h, path=p, copies=draw(st.integers(1, 9)),
               rescan=draw(st.none() | _durations),
               exclude=tuple(draw(st.lists(_words, max_size=3))),
               keep_deleted=draw(_durations), address=address(h))
        for h, p in source_ids)
    store_ids = draw(st.lists(st.tuples(st.sampled_from(hosts), _paths), max_size=4,
                              unique_by=lambda t: f"{t[0]}:{t[1]}"))
    stores = []
    for h, p in store_ids:
        sized = draw(st.booleans())
        stores.append(Store(
            host=h, path=p,
            size=draw(_sizes) if sized else None,
            reserve=None if sized else draw(st.integers(0, 2**50)),
            ignore_sources=tuple(draw(st.lists(st.sampled_from([s.id for s in sources]),
                                               unique=True)) if sources else ()),
            address=address(h)))
    return Cluster(options, sources, tuple(stores))


class RoundTripTests(SynchronousTestCase):
    """Line format and YAML describe the same clusters."""

    @given(clusters())
    def test_lines_round_trip(self, cluster):
        self.assertEqual(loads(to_lines(cluster), "gen.conf"), cluster)

    @given(clusters())
    def test_yaml_round_trip(self, cluster):
        self.assertEqual(loads(to_yaml(cluster), "gen.yaml"), cluster)

    @given(clusters())
    def test_yaml_and_lines_agree(self, cluster):
        self.assertEqual(loads(to_yaml(cluster), "gen.yaml"),
                         loads(to_lines(cluster), "gen.conf"))

    def test_writers_keep_the_seed_short(self):
        self.assertEqual(to_lines(loads(SEED)), SEED.replace("options: PORT: 5005\n", "")
                         .replace("size: 100gb", "size: 100g"))
