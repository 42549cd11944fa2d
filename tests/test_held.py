"""
Tests for L{cluster_backup.held} (the MAX CHANGE rule, rule 8), its config
key and L{cluster_backup.accepted} (the baseline kept across restarts).
"""

from __future__ import annotations

import json
import os

from hypothesis import given, strategies as st
from twisted.trial.unittest import SynchronousTestCase

from cluster_backup import accepted
from cluster_backup.config import ConfigError, loads
from cluster_backup.config_write import to_lines, to_yaml
from cluster_backup.held import HOLD_FLOOR, ScanChange, parse_max_change, too_big

SEED = """options: PORT: 5005
server: host1:/data
copies: 2
backup: host3:/b
size: 1g
"""


def change(deleted=0, deleted_bytes=0, changed=0, base=100, base_bytes=1000):
    return ScanChange(deleted, deleted_bytes, changed, changed * 10, base, base_bytes)


class TooBigTests(SynchronousTestCase):
    def test_files_deleted_or_rewritten(self):
        self.assertFalse(too_big(change(deleted=20), 0.2))
        self.assertTrue(too_big(change(deleted=21), 0.2))
        self.assertTrue(too_big(change(changed=21), 0.2))
        self.assertTrue(too_big(change(deleted=11, changed=10), 0.2))

    def test_bytes_deleted(self):
        self.assertTrue(too_big(change(deleted=10, deleted_bytes=201), 0.2))
        self.assertFalse(too_big(change(deleted=10, deleted_bytes=200), 0.2))

    def test_rewritten_bytes_do_not_count(self):
        """A VM image rewritten is still there: only its file counts."""
        c = ScanChange(0, 0, 10, 10**12, 1000, 10**12)
        self.assertFalse(too_big(c, 0.2))

    def test_floor(self):
        self.assertFalse(too_big(change(deleted=HOLD_FLOOR - 1, deleted_bytes=900, base=20), 0.2))
        self.assertTrue(too_big(change(deleted=HOLD_FLOOR, base=20), 0.2))

    def test_everything_gone_is_held_whatever_the_number(self):
        self.assertTrue(too_big(change(deleted=3, deleted_bytes=30, base=3, base_bytes=30), 0.2))
        self.assertFalse(too_big(change(deleted=3, base=3), 1.0))  # off

    def test_no_baseline_no_limit(self):
        self.assertFalse(too_big(change(deleted=0, base=0, base_bytes=0), 0.2))
        self.assertFalse(too_big(change(deleted=100), None))

    @given(st.integers(0, 1000), st.integers(0, 1000), st.integers(1, 1000))
    def test_off_never_holds(self, deleted, changed, base):
        deleted = min(deleted, base)
        changed = min(changed, base - deleted)
        c = ScanChange(deleted, deleted, changed, changed, base, base)
        self.assertFalse(too_big(c, parse_max_change("off")))


class ParseTests(SynchronousTestCase):
    def test_values(self):
        self.assertEqual(parse_max_change("20%"), 0.2)
        self.assertEqual(parse_max_change(" 0.05 "), 0.05)
        self.assertEqual(parse_max_change("150%"), 1.0)
        self.assertEqual(parse_max_change("OFF"), 1.0)

    def test_refused(self):
        for text in ("0%", "-5%", "20", "lots", "%", ""):
            self.assertRaises(ValueError, parse_max_change, text)

    def test_config_global_and_per_source(self):
        cluster = loads("options: MAX CHANGE: 35%\n"
                        + SEED.replace("copies: 2", "copies: 2\nmax change: off"))
        self.assertEqual(cluster.options.max_change, 0.35)
        self.assertEqual(cluster.sources[0].max_change, 1.0)
        self.assertEqual(loads(SEED).options.max_change, 0.2)
        self.assertIsNone(loads(SEED).sources[0].max_change)
        for written in (to_lines(cluster), to_yaml(cluster)):
            self.assertEqual(loads(written), cluster)

    def test_in_a_backup_block(self):
        e = self.assertRaises(ConfigError, loads, SEED + "max change: 5%\n", "c.conf")
        self.assertEqual(e.problems, ["c.conf:6: 'max change' is not a key of a backup: block"])

    def test_config_error_names_the_line(self):
        e = self.assertRaises(ConfigError, loads, SEED.replace("copies: 2", "copies: 2\n"
                                                               "max change: 20"), "c.conf")
        self.assertEqual(len(e.problems), 1)
        self.assertIn("c.conf:4: max change: a fraction must be at most 1", e.problems[0])


class AcceptedStateTests(SynchronousTestCase):
    def test_round_trip_and_nothing_yet(self):
        d = self.mktemp()
        os.makedirs(d)
        self.assertEqual(accepted.load(d), {})
        accepted.save(d, {"h:/a": (5, 50), "h:/b": None})
        self.assertEqual(accepted.load(d), {"h:/a": (5, 50)})

    def test_unreadable_file_is_no_baseline(self):
        d = self.mktemp()
        os.makedirs(d)
        for junk in (b"{not json", json.dumps({"h:/a": "x"}).encode(), b"[1, 2]"):
            with open(os.path.join(d, accepted.FILENAME), "wb") as f:
                f.write(junk)
            self.assertEqual(accepted.load(d), {}, junk)
