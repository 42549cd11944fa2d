"""
pytest only: run the suite from a scratch folder, as trial does
(C{_trial_temp}), so C{TestCase.mktemp()} paths land there and not in the
checkout.
"""

import os

import pytest


@pytest.fixture(autouse=True, scope="session")
def _scratch_cwd(tmp_path_factory):
    old = os.getcwd()
    os.chdir(tmp_path_factory.mktemp("cwd"))
    yield
    os.chdir(old)
