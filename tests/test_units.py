"""
The systemd units in conf/: hardened to at most 4.0 ("OK") in
C{systemd-analyze security}, and valid for C{systemd-analyze verify}.

Both run offline (no systemd as pid 1 needed); the tests skip when
systemd-analyze is not installed (C{make test} installs it when apt has it).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from unittest import SkipTest

from twisted.trial.unittest import SynchronousTestCase

HERE = os.path.dirname(os.path.abspath(__file__))
CONF = os.path.join(os.path.dirname(HERE), "conf")
UNITS = ("cbackup-server.service", "cbackup-client.service")
#: The most exposure systemd-analyze may give a unit: its "OK" band ends here.
MAX_EXPOSURE = 4.0
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
NO_ANALYZE = ("systemd-analyze is not installed (Debian package systemd; "
              "`make test` installs it when apt has it)")
_LEVEL = re.compile(r"Overall exposure level for (\S+): (\d+(?:\.\d+)?)")


def read_unit(name: str) -> str:
    with open(os.path.join(CONF, name), encoding="utf-8") as f:
        return f.read()


def settings(text: str) -> dict[str, list[str]]:
    """Every C{Key=value} of a unit file (comments skipped), by key."""
    found: dict[str, list[str]] = {}
    for line in text.splitlines():
        if line.startswith(("#", ";", "[")) or "=" not in line:
            continue
        key, value = line.split("=", 1)
        found.setdefault(key.strip(), []).append(value.strip())
    return found


def exposure(path: str) -> float:
    """The overall exposure level C{systemd-analyze security} gives the unit at C{path}."""
    result = subprocess.run(
        [SYSTEMD_ANALYZE, "security", "--offline=yes", "--no-pager", path],
        capture_output=True, text=True, timeout=60)
    match = _LEVEL.search(result.stdout + result.stderr)
    if match is None:
        raise AssertionError(f"no exposure level from systemd-analyze (exit "
                             f"{result.returncode}):\n{result.stdout}{result.stderr}")
    return float(match.group(2))


def runnable_copy(text: str, folder: str, name: str) -> str:
    """
    C{text} written to C{folder/name} with ExecStart='s twistd replaced by
    this environment's, since C{verify} checks that the command exists.
    """
    twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
    text = re.sub(r"(?m)^(ExecStart=)\S+/twistd ", rf"\g<1>{twistd} ", text)
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, name)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return path


def verify(scratch: str, *paths: str) -> subprocess.CompletedProcess:
    """
    C{systemd-analyze verify PATHS}; raises C{SkipTest} when verify cannot
    work on this machine (it fails even a minimal unit, written in the new
    folder C{scratch}).
    """
    if not os.access(os.path.join(os.path.dirname(sys.executable), "twistd"), os.X_OK):
        raise SkipTest("no twistd beside this Python to put in ExecStart=")
    os.makedirs(scratch)
    minimal = os.path.join(scratch, "cbackup-minimal.service")
    with open(minimal, "w") as f:
        f.write(f"[Service]\nExecStart={sys.executable} -c pass\n")
    probe = subprocess.run([SYSTEMD_ANALYZE, "verify", minimal],
                           capture_output=True, text=True, timeout=60)
    if probe.returncode or probe.stdout or probe.stderr:
        raise SkipTest("systemd-analyze verify does not work offline here: "
                       f"{(probe.stdout + probe.stderr).strip()[:300]}")
    return subprocess.run([SYSTEMD_ANALYZE, "verify", *paths],
                          capture_output=True, text=True, timeout=60)


def unprivileged_client(text: str) -> str:
    """The client unit with its documented unprivileged alternative switched on."""
    out = []
    for line in text.splitlines():
        if line in ("User=root",) or line.startswith("CapabilityBoundingSet=CAP_"):
            continue
        for key in ("User=", "Group=", "CapabilityBoundingSet="):
            if line.startswith("#" + key):
                line = line[1:]
        out.append(line)
    return "\n".join(out) + "\n"


class UnitContentTests(SynchronousTestCase):
    """What the units must say, whether or not systemd-analyze is here."""

    def test_both_units(self):
        for name in UNITS:
            s = settings(read_unit(name))
            role = name.split(".")[0]
            self.assertEqual(len(s["ExecStart"]), 1, name)
            self.assertRegex(s["ExecStart"][0], rf"/twistd -n --pidfile= {role} -c /etc/",
                             name)
            self.assertEqual(s["ExecReload"], ["/bin/kill -HUP $MAINPID"], name)
            self.assertEqual(s["Restart"], ["always"], name)
            self.assertEqual(s["ProtectSystem"], ["strict"], name)
            self.assertEqual(s["NoNewPrivileges"], ["yes"], name)
            self.assertEqual(s["PrivateTmp"], ["yes"], name)
            self.assertEqual(s["RestrictAddressFamilies"], ["AF_INET AF_INET6 AF_UNIX"], name)
            self.assertEqual(len(s["RequiresMountsFor"]), 1, name)

    def test_capabilities(self):
        """The least each needs: see the comments in the units."""
        server = settings(read_unit(UNITS[0]))
        client = settings(read_unit(UNITS[1]))
        self.assertEqual(set(server["CapabilityBoundingSet"][0].split()),
                         {"CAP_DAC_READ_SEARCH", "CAP_SYS_CHROOT", "CAP_SETGID"})
        self.assertEqual(set(client["CapabilityBoundingSet"][0].split()),
                         {"CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FOWNER", "CAP_FSETID"})
        self.assertEqual(server["ProtectHome"], ["read-only"])  # sources may live there
        self.assertEqual(client["ProtectHome"], ["yes"])
        self.assertEqual(client["ReadWritePaths"], client["RequiresMountsFor"])
        self.assertEqual(server["StateDirectory"], ["cluster-backup"])

    def test_unprivileged_alternative(self):
        s = settings(unprivileged_client(read_unit(UNITS[1])))
        self.assertEqual(s["User"], ["cbackup"])
        self.assertEqual(s["CapabilityBoundingSet"], [""])


class SystemdAnalyzeTests(SynchronousTestCase):
    """The units as systemd itself reads them."""

    if SYSTEMD_ANALYZE is None:
        skip = NO_ANALYZE

    def test_security_exposure(self):
        for name in UNITS:
            level = exposure(os.path.join(CONF, name))
            self.assertLessEqual(level, MAX_EXPOSURE, f"{name}: exposure {level}")

    def test_unprivileged_client_exposure(self):
        path = runnable_copy(unprivileged_client(read_unit(UNITS[1])), self.mktemp(),
                             UNITS[1])
        self.assertLessEqual(exposure(path), MAX_EXPOSURE)

    def test_verify(self):
        """
        No warning from C{systemd-analyze verify}: every key known, every
        value parsed, the commands present (twistd: this environment's).
        """
        folder = self.mktemp()
        paths = [runnable_copy(read_unit(name), folder, name) for name in UNITS]
        paths.append(runnable_copy(unprivileged_client(read_unit(UNITS[1])),
                                   os.path.join(folder, "unprivileged"), UNITS[1]))
        result = verify(self.mktemp(), *paths)
        self.assertEqual((result.returncode, result.stdout + result.stderr), (0, ""))

    def test_verify_catches_mistakes(self):
        """The check above can fail: a typo and a broken quote are reported."""
        text = read_unit(UNITS[1]).replace(
            "NoNewPrivileges=yes", 'NoNewPrivilege=yes\nReadWritePaths="/a b')
        result = verify(self.mktemp(), runnable_copy(text, self.mktemp(), UNITS[1]))
        self.assertIn("Unknown key", result.stderr)
        self.assertIn("NoNewPrivilege", result.stderr)
        self.assertIn("/a b", result.stderr)
