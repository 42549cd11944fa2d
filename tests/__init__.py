"""
Tests for cluster-backup.

Unit tests are C{SynchronousTestCase}s with fakes, L{Clock} and iosim, so they
run under both pytest and trial.  Tests that start real processes are marked
C{slow} for pytest (C{make test-fast} skips them); CI runs everything.

One hypothesis profile for the whole suite, chosen by C{HYPOTHESIS_PROFILE}
(default C{"default"}; C{"ci"} is the same but derandomized; C{"deep"}
tries 30 times as many examples, for changes to the ledger).
"""

import os

from hypothesis import HealthCheck, settings

settings.register_profile(
    "default",
    deadline=None,
    max_examples=100,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "ci",
    parent=settings.get_profile("default"),
    derandomize=True,
    print_blob=True,
)
settings.register_profile(  # HYPOTHESIS_PROFILE=deep: before changing the ledger
    "deep",
    parent=settings.get_profile("default"),
    max_examples=3000,
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


def slow(cls):
    """
    Mark a TestCase class as slow (it starts real processes): a C{slow}
    marker for pytest (C{make test-fast} deselects it), and a skip under
    trial when C{CBACKUP_SKIP_SLOW} is set (C{make test} runs them once,
    under pytest, not twice).
    """
    try:
        import pytest
    except ImportError:  # pragma: no cover - trial without pytest
        pass
    else:
        cls = pytest.mark.slow(cls)
    if os.environ.get("CBACKUP_SKIP_SLOW"):
        cls.skip = "slow (real processes): CBACKUP_SKIP_SLOW is set"
    return cls
