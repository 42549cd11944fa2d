"""Tests for the shared records: path checking and ranks."""

from hypothesis import given, strategies as st
from twisted.trial.unittest import SynchronousTestCase

from cluster_backup.records import MAX_PATH, FileRecord, bad_path, rank, relpath_problem


def reference_ok(path: bytes) -> bool:
    """The rule spelled out the slow way."""
    return (0 < len(path) <= 4096 and b"\0" not in path and not path.startswith(b"/")
            and all(part not in (b"", b".", b"..") for part in path.split(b"/")))


_pieces = st.sampled_from([b"a", b"/", b".", b"..", b"\0", b"b/c", b"\xe9", b"\n", b" "])


class RelpathTests(SynchronousTestCase):
    @given(st.lists(_pieces, max_size=8).map(b"".join) | st.binary(max_size=40))
    def test_fast_check_matches_rule(self, path):
        self.assertEqual(relpath_problem(path) is None, reference_ok(path), path)

    def test_limits(self):
        self.assertIsNone(relpath_problem(b"x" * 4096))
        self.assertEqual(relpath_problem(b"x" * 4097), "longer than 4096 bytes")
        self.assertEqual(relpath_problem("text"), "not bytes")

    @given(st.lists(st.lists(_pieces, max_size=6).map(b"".join)
                    | st.integers(MAX_PATH - 2, MAX_PATH + 2).map(lambda n: b"L" * n),
                    max_size=8))
    def test_bad_path_names_the_first_refused(self, paths):
        """The page-wide check finds what relpath_problem, path by path, finds first."""
        first = next(((p, relpath_problem(p)) for p in paths if relpath_problem(p)), None)
        self.assertEqual(bad_path(paths), first)

    def test_bad_path_of_odd_items(self):
        self.assertEqual(bad_path([b"a", "text"]), ("text", "not bytes"))
        self.assertEqual(bad_path([b"a", b"b\0c"]), (b"b\0c", "contains NUL"))
        self.assertIsNone(bad_path([]))
        self.assertIsNone(bad_path([b"a", b"x" * MAX_PATH]))

    def test_record_validates_but_unchecked_does_not(self):
        self.assertRaises(ValueError, FileRecord, b"../x", 1, 1)
        self.assertEqual(FileRecord.unchecked(b"a", 1, 2), FileRecord(b"a", 1, 2))


class RankTests(SynchronousTestCase):
    def test_order(self):
        order = [rank(0, 3), rank(1, 3), rank(2, 3), rank(3, 3), rank(4, 3)]
        self.assertEqual(order, sorted(order))
        # one copy of two wanted comes before a file already at its one copy
        self.assertLess(rank(1, 2), rank(1, 1))
        # below copies, the fraction decides: 2 of 4 before 2 of 3
        self.assertLess(rank(2, 4), rank(2, 3))
