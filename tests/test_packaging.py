"""
The sdist and the wheel, built as a user would and opened.

The sdist must hold the whole source tree as git has it (so its tests,
benchmarks and C{make test} run from it), less C{.gitignore}; the wheel the
package, the twistd plugin, the example configs and systemd units
(C{cluster_backup/conf}, which C{cbackup init} and the README point at) and
the LICENSE.  Both are built from a copy of the files git lists (tracked,
or new and not ignored), so the checkout gets no C{build/} or
C{*.egg-info}, and a file git does not know cannot hide a missing one.
"""

from __future__ import annotations

import atexit
import importlib.util
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from typing import Optional
from unittest import SkipTest

from twisted.trial.unittest import SynchronousTestCase

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONF_FILES = ("cbackup-client.service", "cbackup-server.service", "cluster.conf",
              "cluster.yaml", "reference.conf")
#: Files git lists that the sdist leaves out, and why.
NOT_IN_SDIST = {".gitignore": "only means something in a git checkout"}
CLASSIFIERS = (
    "Programming Language :: Python :: 3.11",
    "License :: OSI Approved :: MIT License",
    "Operating System :: POSIX :: Linux",
    "Topic :: System :: Archiving :: Backup",
    "Framework :: Twisted",
    "Environment :: No Input/Output (Daemon)",
)


def git_files() -> list[str]:
    """The files of the checkout as git sees them: tracked or new, not ignored."""
    if shutil.which("git") is None or not os.path.exists(os.path.join(REPO, ".git")):
        raise SkipTest("not a git checkout: the files to package are what git lists")
    listed = subprocess.run(
        ["git", "-C", REPO, "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        capture_output=True, check=True).stdout.decode("utf-8", "surrogateescape")
    # trial's lock file (_trial_temp.lock) escapes .gitignore's /_trial_temp*/
    return sorted({p for p in listed.split("\0")
                   if p and not p.startswith("_trial_temp")
                   and os.path.lexists(os.path.join(REPO, p))})


def expand(paths: list[str]) -> set[str]:
    """C{paths}, with a symlink to a folder (cluster_backup/conf) as the files in it."""
    files = set()
    for p in paths:
        full = os.path.join(REPO, p)
        if os.path.islink(full) and os.path.isdir(full):
            files.update(os.path.join(p, name) for name in os.listdir(full)
                         if os.path.isfile(os.path.join(full, name)))
        else:
            files.add(p)
    return files


def _run(argv: list[str], cwd: str) -> None:
    result = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, PIP_NO_INPUT="1",
                                     PIP_DISABLE_PIP_VERSION_CHECK="1"))
    if result.returncode:
        raise AssertionError(f"{argv} failed ({result.returncode}):\n"
                             f"{result.stdout[-3000:]}{result.stderr[-3000:]}")


def build_sdist(tree: str, out: str) -> str:
    _run([sys.executable, "-c",
          f"from setuptools import build_meta; build_meta.build_sdist({out!r})"], tree)
    [name] = [n for n in os.listdir(out) if n.endswith(".tar.gz")]
    return os.path.join(out, name)


def build_wheel(tree: str, out: str) -> str:
    """The wheel of C{tree}, built like C{pip install} does, offline."""
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
          "--no-index", "-w", out, "."], tree)
    [name] = [n for n in os.listdir(out) if n.endswith(".whl")]
    return os.path.join(out, name)


def can_build_wheel() -> Optional[str]:
    """Why this environment cannot build a wheel, or None when it can."""
    import setuptools
    version = tuple(int(x) for x in setuptools.__version__.split(".")[:2] if x.isdigit())
    if version < (70, 1) and importlib.util.find_spec("wheel") is None:
        return (f"setuptools {setuptools.__version__} needs the wheel package to build "
                "a wheel (it is in the test extra: pip install -e '.[test]')")
    return None


_built: dict[str, object] = {}


def built() -> dict[str, object]:
    """
    Build once per process: the sdist and the wheel of a copy of the
    checkout (about 4 s).
    """
    if _built:
        return _built
    files = git_files()
    scratch = tempfile.mkdtemp(prefix="cbackup-packaging-")
    atexit.register(shutil.rmtree, scratch, True)
    tree = os.path.join(scratch, "tree")
    for p in files:
        target = os.path.join(tree, p)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copy2(os.path.join(REPO, p), target, follow_symlinks=False)
    _built["files"] = files
    _built["sdist"] = build_sdist(tree, os.path.join(scratch, "sdist"))
    reason = can_build_wheel()
    if reason is None:
        _built["wheel"] = build_wheel(tree, os.path.join(scratch, "wheel"))
    else:
        _built["no_wheel"] = reason
    return _built


def wheel_names(key: str) -> list[str]:
    b = built()
    if key not in b:
        raise SkipTest(b["no_wheel"])
    with zipfile.ZipFile(b[key]) as z:
        return z.namelist()


class SdistTests(SynchronousTestCase):
    def test_complete(self):
        """Every file git lists is in the sdist, but for NOT_IN_SDIST."""
        b = built()
        with tarfile.open(b["sdist"]) as tar:
            members = [m.name.split("/", 1)[1] for m in tar.getmembers()
                       if "/" in m.name and m.isfile()]
        expected = expand(b["files"]) - set(NOT_IN_SDIST)
        self.assertEqual(sorted(expected - set(members)), [])
        extra = {m for m in members if m not in expected
                 and m != "PKG-INFO" and not m.startswith("cluster_backup.egg-info/")}
        self.assertEqual(sorted(extra), [])
        for p in NOT_IN_SDIST:
            self.assertNotIn(p, members)

    def test_has_the_test_support(self):
        """The files the old sdist lacked, so its tests could not run."""
        with tarfile.open(built()["sdist"]) as tar:
            names = {m.name.split("/", 1)[1] for m in tar.getmembers() if "/" in m.name}
        for p in ("tests/__init__.py", "tests/conftest.py", "tests/harness.py",
                  "tests/wire.py", "Makefile", "LICENSE", "MANIFEST.in",
                  "conf/reference.conf", "cluster_backup/conf/cbackup-server.service"):
            self.assertIn(p, names)


class WheelTests(SynchronousTestCase):
    def check_wheel(self, names: list[str]) -> None:
        modules = {p for p in built()["files"]
                   if p.startswith("cluster_backup/") and p.endswith(".py")}
        self.assertEqual(sorted(modules - set(names)), [])
        self.assertIn("twisted/plugins/cluster_backup_plugins.py", names)
        self.assertNotIn("twisted/__init__.py", names)
        self.assertNotIn("twisted/plugins/__init__.py", names)
        for conf in CONF_FILES:
            self.assertIn(f"cluster_backup/conf/{conf}", names)
        self.assertEqual([n for n in names if n.startswith("tests/")], [])
        self.assertEqual([n for n in names if "__pycache__" in n or n.endswith(".pyc")], [])
        self.assertEqual(len([n for n in names if n.endswith(".dist-info/LICENSE")]), 1)

    def test_wheel(self):
        names = wheel_names("wheel")
        self.check_wheel(names)
        with zipfile.ZipFile(built()["wheel"]) as z:
            for conf in CONF_FILES:
                with open(os.path.join(REPO, "conf", conf), "rb") as f:
                    self.assertEqual(z.read(f"cluster_backup/conf/{conf}"), f.read(), conf)
            [meta] = [n for n in names if n.endswith(".dist-info/METADATA")]
            metadata = z.read(meta).decode("utf-8")
            [lic] = [n for n in names if n.endswith(".dist-info/LICENSE")]
            self.assertIn("MIT License", z.read(lic).decode("utf-8"))
            [entry] = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
            self.assertIn("cbackup = cluster_backup.cli:main", z.read(entry).decode("utf-8"))
        for classifier in CLASSIFIERS:
            self.assertIn(f"Classifier: {classifier}\n", metadata)
        self.assertIn("License: MIT\n", metadata)
        self.assertIn("License-File: LICENSE\n", metadata)

    def test_sdist_holds_the_wheel(self):
        """
        Every file of the wheel is in the sdist (cluster_backup/conf as
        files, not a symlink), so a wheel built from the sdist (pip install
        of it) is this one.
        """
        names = [n for n in wheel_names("wheel") if ".dist-info/" not in n]
        with tarfile.open(built()["sdist"]) as tar:
            members = {m.name.split("/", 1)[1] for m in tar.getmembers()
                       if "/" in m.name and m.isfile()}
        self.assertEqual(sorted(set(names) - members), [])
