"""
Abuse of the config (DESIGN.md rule 8): any text, random or mutated from the
reference configs in both spellings, either loads or raises L{ConfigError}
whose every problem starts with C{FILE:LINE: }; a config that loads can be
described by C{cbackup check}; and C{cbackup check} run on nasty files
prints no traceback.  Figures go to L{tests.abuse_harness.FIGURES}.
"""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from collections import Counter

from hypothesis import HealthCheck, given, settings, strategies as st
from twisted.trial.unittest import SynchronousTestCase

from cluster_backup import cli
from cluster_backup.config import ConfigError, load, loads
from tests import slow
from tests.abuse_harness import REPO, record

CONF = os.path.join(REPO, "conf")


def _read(name: str) -> str:
    with open(os.path.join(CONF, name)) as f:
        return f.read()


LINE_CONFIGS = [_read("cluster.conf"), _read("reference.conf")]
YAML_CONFIGS = [_read("cluster.yaml")]

#: Fragments that tend to upset parsers: YAML syntax, anchors, tags,
#: control and odd Unicode characters, numbers out of range, traversal.
NASTY = [
    ":", "::", "-", "- ", "#", "[", "]", "{", "}", "&a", "*a", "<<: *a", "? ", "!!python/object",
    "!!binary", "|", ">", "'", '"', "%YAML 1.1", "---", "...", "\t", "\r", "\n", "\x00",
    "\ufeff", "\u2028", "\x85", "\ud7ff", "\U0001f600", "0", "-1", "1e999", "nan", "inf",
    "9" * 60, "9" * 5000, "0x10", "1.5.5", "size: ", "copies: ", "server: ", "backup: ",
    "options: ", "PORT: ", "address: ", "::1", "[::1]:/x", "h:/a/../b", "h:relative",
    "h:/", "/", "..", "%PATH%", "\\", "exclude: ", "ignore source: ", "keep deleted: ",
    "reserve: ", "RSYNC PORT: ", "SECRET FILE: /nonexistent", "TRANSPORT: ssh",
]

PROBLEM = re.compile(r"^(?P<file>[^\n]*?):(?P<line>\d+): \S")


@st.composite
def mutated(draw, bases):
    """A reference config with a few line and character mutations."""
    lines = draw(st.sampled_from(bases)).splitlines(keepends=True)
    for _ in range(draw(st.integers(1, 6))):
        op = draw(st.sampled_from(["del", "dup", "swap", "insert", "chars", "nest"]))
        i = draw(st.integers(0, max(0, len(lines) - 1)))
        if op == "del" and lines:
            del lines[i]
        elif op == "dup" and lines:
            lines.insert(i, lines[i])
        elif op == "swap" and len(lines) > 1:
            j = draw(st.integers(0, len(lines) - 1))
            lines[i], lines[j] = lines[j], lines[i]
        elif op == "insert":
            piece = draw(st.lists(st.one_of(st.sampled_from(NASTY), st.text(max_size=8)),
                                  max_size=6))
            lines.insert(i, "".join(piece) + draw(st.sampled_from(["\n", ""])))
        elif op == "nest":
            depth = draw(st.integers(1, 3000))
            lines.insert(i, draw(st.sampled_from(["[", "{a: ", "- ", "  "])) * depth + "\n")
        elif lines:
            line = list(lines[i])
            for _ in range(draw(st.integers(1, 4))):
                k = draw(st.integers(0, len(line)))
                line[k:k + draw(st.integers(0, 2))] = draw(
                    st.one_of(st.sampled_from(NASTY), st.characters()))
            lines[i] = "".join(line)
    return "".join(lines)


TEXTS = st.one_of(
    st.text(),
    st.lists(st.sampled_from(list(":-#[]{}&*!|>'\" \n\tab1") + NASTY), max_size=40).map("".join),
    mutated(LINE_CONFIGS),
    mutated(YAML_CONFIGS),
)


class ConfigFuzzTests(SynchronousTestCase):
    """Any text loads or is refused with FILE:LINE problems, never a crash."""

    examples = 1500

    def check_text(self, text: str, filename: str, yaml_format, stats: Counter) -> None:
        try:
            cluster = loads(text, filename=filename, yaml_format=yaml_format)
        except ConfigError as e:
            stats["refused"] += 1
            self.assertTrue(e.problems, "a ConfigError with no problem")
            for problem in e.problems:
                match = PROBLEM.match(problem)
                self.assertIsNotNone(match, f"problem without FILE:LINE: {problem!r}")
                self.assertEqual(match.group("file"), filename)
                # A syntax error at the very end names the line after the last
                # newline, where an editor puts the cursor.
                self.assertLessEqual(int(match.group("line")), len(text.splitlines()) + 1,
                                     problem)
            stats["problems"] += len(e.problems)
            return
        stats["loaded"] += 1
        # What `cbackup check` prints of a config that loads must print too.
        info = cli.describe(cluster, None, "fuzzing")
        cli.print_text(info, io.StringIO())

    def test_any_text(self):
        stats: Counter = Counter()

        @settings(max_examples=self.examples, deadline=None,
                  suppress_health_check=list(HealthCheck))
        @given(TEXTS, st.sampled_from([None, True, False]),
               st.sampled_from(["cluster.conf", "c.yaml", "weird name:7.conf"]))
        def run(text, yaml_format, filename):
            stats["examples"] += 1
            self.check_text(text, filename, yaml_format, stats)

        run()
        self.record("config_text", stats)

    def test_any_bytes_from_a_file(self):
        """C{load} of any bytes (not UTF-8, NUL, BOM) refuses with FILE:LINE."""
        stats: Counter = Counter()
        path = os.path.abspath(self.mktemp())

        @settings(max_examples=self.examples // 3, deadline=None,
                  suppress_health_check=list(HealthCheck))
        @given(st.one_of(st.binary(), TEXTS.map(lambda t: t.encode("utf-8", "surrogatepass")),
                         st.tuples(TEXTS, st.binary(max_size=4), TEXTS).map(
                             lambda t: t[0].encode("utf-8", "replace") + t[1]
                             + t[2].encode("utf-8", "replace"))))
        def run(data):
            stats["examples"] += 1
            with open(path, "wb") as f:
                f.write(data)
            try:
                load(path)
            except ConfigError as e:
                stats["refused"] += 1
                stats["problems"] += len(e.problems)
                for problem in e.problems:
                    match = PROBLEM.match(problem)
                    self.assertIsNotNone(match, f"problem without FILE:LINE: {problem!r}")
                    self.assertEqual(match.group("file"), path)
            else:
                stats["loaded"] += 1

        run()
        self.record("config_bytes", stats)

    def record(self, name: str, stats: Counter) -> None:
        record(name, examples=stats["examples"], loaded=stats["loaded"],
               refused=stats["refused"], problems=stats.get("problems", 0), violations=0)


#: Files `cbackup check` is run on: (name, bytes or None for a directory).
NASTY_FILES = [
    ("binary.conf", bytes(range(256)) * 4),
    ("nul.conf", b"options: PORT: 5005\0\nserver: h:/a\n"),
    ("latin1.conf", b"server: h:/caf\xe9\ncopies: 1\n"),
    ("empty.conf", b""),
    ("bom.conf", b"\xef\xbb\xbfoptions: PORT: 5005\n"),
    ("deep.yaml", b"sources: " + b"[" * 20000 + b"]" * 20000 + b"\n"),
    ("deep-map.yaml", b"options:\n  PORT: " + b"{a: " * 5000 + b"\n"),
    ("bomb.yaml", b"a: &a [x,x,x,x,x,x,x,x,x]\nb: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]\n"
                  b"c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]\nsources: *c\n"),
    ("tag.yaml", b"options:\n  PORT: !!python/object/apply:os.system [\"true\"]\n"),
    ("huge-version.yaml", b"%YAML " + b"1" * 5000 + b".1\n---\nsources: []\n"),
    ("huge-duration.conf", b"options: RESCAN: " + b"9" * 5000 + b"\n"),
    ("huge-size.conf", b"backup: h:/b\nsize: " + b"9" * 400 + b"p\n"),
    ("huge-keep.conf", b"server: h:/a\nkeep deleted: " + b"9" * 400 + b"d\n"),
    ("huge-port.conf", b"options: PORT: " + b"9" * 5000 + b"\n"),
    ("long-line.conf", b"server: h:/" + b"a" * (1 << 20) + b"\n"),
    ("many-blocks.conf", b"".join(b"server: h:/s%d\ncopies: 0\n" % i for i in range(3000))),
    ("crlf.conf", b"options: PORT: 5005\r\nserver: h:/a\r\ncopies: 2\r\n"),
    ("directory.conf", None),
]


@slow
class CheckCommandTests(SynchronousTestCase):
    """C{cbackup check} as a subprocess: a message, never a traceback."""

    def test_nasty_files(self):
        base = os.path.abspath(self.mktemp())
        os.makedirs(base)
        results = {}
        for name, data in NASTY_FILES:
            path = os.path.join(base, name)
            if data is None:
                os.mkdir(path)
            else:
                with open(path, "wb") as f:
                    f.write(data)
            proc = subprocess.run(
                [sys.executable, "-m", "cluster_backup.cli", "check", "-c", path],
                capture_output=True, timeout=60, cwd=base)
            out = proc.stdout + proc.stderr
            self.assertNotIn(b"Traceback", out, f"{name}:\n{out[-3000:].decode(errors='replace')}")
            self.assertIn(proc.returncode, (0, 2), f"{name}: exit {proc.returncode}")
            if proc.returncode:
                for line in proc.stderr.decode().splitlines():
                    self.assertTrue(line.startswith(path + ":"), f"{name}: {line[:300]}")
            results[name] = proc.returncode
        record("check_command", files=len(NASTY_FILES),
               refused=sum(1 for c in results.values() if c),
               accepted=sorted(n for n, c in results.items() if not c), tracebacks=0)
