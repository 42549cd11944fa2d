"""
Tests for C{cbackup init}: the starter config, the units filled in for a
host of a config, and never overwriting a file.
"""

from __future__ import annotations

import io
import os
import stat
import sys
import tempfile

from twisted.trial.unittest import SynchronousTestCase

from cluster_backup import init
from cluster_backup.cli import main
from cluster_backup.config import load
from tests.test_units import (
    MAX_EXPOSURE,
    NO_ANALYZE,
    SYSTEMD_ANALYZE,
    exposure,
    settings,
    verify,
)

TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")

CONFIG = """\
options: PORT: 5005
server: alpha:/srv/projects
copies: 1
server: alpha:/srv/my data%1
copies: 1
backup: alpha:/backups/one
size: 1g
backup: alpha:/home/backups
size: 1g
server: beta:/data
backup: beta:/backups
size: 1g
backup: gamma:/backups
size: 1g
"""


def run(argv) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main(argv, out, err)
    return code, out.getvalue(), err.getvalue()


def read(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


class InitTestsMixin:
    def config(self, text: str = CONFIG) -> str:
        folder = os.path.abspath(self.mktemp())
        os.makedirs(folder)
        path = os.path.join(folder, "cluster.conf")
        with open(path, "w") as f:
            f.write(text)
        return path

    def init(self, *argv: str) -> tuple[int, str, str, str]:
        out_dir = os.path.abspath(self.mktemp())
        code, out, err = run(["init", "--dir", out_dir, "--twistd", TWISTD, *argv])
        return code, out, err, out_dir


class StarterTests(InitTestsMixin, SynchronousTestCase):
    def test_writes_config_secret_units(self):
        code, out, err, d = self.init("--host", "myhost")
        self.assertEqual((code, err), (0, ""))
        names = sorted(os.listdir(d))
        self.assertEqual(names, ["cbackup-client.service", "cbackup-server.service",
                                 "cluster.conf", "secret"])
        for name in names:
            self.assertIn(f"wrote {os.path.join(d, name)}\n", out)
        self.assertIn("next:\n", out)
        self.assertIn("systemctl enable --now cbackup-server", out)
        self.assertEqual(stat.S_IMODE(os.stat(os.path.join(d, "secret")).st_mode), 0o600)
        self.assertEqual(len(read(os.path.join(d, "secret")).strip()), 64)
        config = os.path.join(d, "cluster.conf")
        cluster = load(config)
        self.assertEqual([s.id for s in cluster.sources], ["myhost:/srv/projects"])
        self.assertEqual(cluster.options.secret_file, os.path.join(d, "secret"))

    def test_units_are_the_packaged_ones(self):
        """Only ExecStart=, Documentation= and a first comment differ."""
        code, out, err, d = self.init("--host", "myhost")
        self.assertEqual(code, 0, err)
        for role, name in init.UNITS.items():
            written = read(os.path.join(d, name)).splitlines()
            packaged = init.template(role).splitlines()
            self.assertTrue(written[0].startswith("# Written by `cbackup init`"))
            keep = lambda lines: [ln for ln in lines
                                  if not ln.startswith(("ExecStart=", "Documentation="))]
            self.assertEqual(keep(written[1:]), keep(packaged))
            s = settings("\n".join(written))
            self.assertEqual(s["ExecStart"], [
                f"{TWISTD} -n --pidfile= cbackup-{role} -c {d}/cluster.conf --host myhost"])

    def test_host_name_default(self):
        code, out, err, d = self.init()
        self.assertEqual(code, 0, err)
        self.assertEqual(len(load(os.path.join(d, "cluster.conf")).sources), 1)


class FromConfigTests(InitTestsMixin, SynchronousTestCase):
    def test_both_roles(self):
        config = self.config()
        code, out, err, d = self.init("-c", config, "--host", "alpha")
        self.assertEqual((code, err), (0, ""))
        self.assertEqual(sorted(os.listdir(d)),
                         ["cbackup-client.service", "cbackup-server.service"])
        server = settings(read(os.path.join(d, "cbackup-server.service")))
        client = settings(read(os.path.join(d, "cbackup-client.service")))
        self.assertEqual(server["RequiresMountsFor"],
                         ['/srv/projects "/srv/my data%%1" /var/lib/cluster-backup'])
        self.assertEqual(server["ExecStart"], [
            f"{TWISTD} -n --pidfile= cbackup-server -c {config} --host alpha"])
        self.assertEqual(client["ReadWritePaths"], ["/backups/one /home/backups"])
        self.assertEqual(client["RequiresMountsFor"], ["/backups/one /home/backups"])
        self.assertEqual(client["ExecStart"], [
            f"{TWISTD} -n --pidfile= cbackup-client -c {config} --host alpha"])
        # a store under /home: visible, read-only but for ReadWritePaths=
        self.assertEqual(client["ProtectHome"], ["read-only"])
        self.assertEqual(client["PrivateTmp"], ["yes"])
        self.assertIn("mkdir -m 0700 /backups/one", out)
        self.assertIn(f"cbackup check -c {config} --host alpha", out)
        self.assertIn(f"install -m 0644 {d}/cbackup-client.service /etc/systemd/system/", out)

    def test_into_systemd_folder(self):
        """Written straight where systemd reads units: no install step."""
        steps = init._enable_steps({"/etc/systemd/system/cbackup-client.service": ""},
                                   "/etc/systemd/system")
        self.assertEqual(steps, ["systemctl daemon-reload",
                                 "systemctl enable --now cbackup-client",
                                 "journalctl -u cbackup-client -f"])

    def test_one_role(self):
        code, out, err, d = self.init("-c", self.config(), "--host", "gamma")
        self.assertEqual((code, err), (0, ""))
        self.assertEqual(os.listdir(d), ["cbackup-client.service"])
        self.assertIn("note: gamma has no sources (server: lines): no server unit", out)
        self.assertNotIn("cbackup-server", out)

    def test_tmp_store(self):
        code, out, err, d = self.init(
            "-c", self.config("backup: h:/tmp/store\nsize: 1g\nserver: x:/a\n"), "--host", "h")
        self.assertEqual(code, 0, err)
        client = settings(read(os.path.join(d, "cbackup-client.service")))
        self.assertEqual(client["PrivateTmp"], ["no"])
        self.assertEqual(client["ProtectHome"], ["yes"])

    def test_config_in_a_hidden_place(self):
        """A config under /tmp or /home would be hidden from the service: said."""
        fd, config = tempfile.mkstemp(prefix="cbackup-init-", suffix=".conf", dir="/tmp")
        self.addCleanup(os.unlink, config)
        with os.fdopen(fd, "w") as f:
            f.write(CONFIG)
        code, out, err, d = self.init("-c", config, "--host", "beta")
        self.assertEqual(code, 0, err)
        self.assertIn(f"note: {config} is under /home, /root, /run/user, /tmp, /var/tmp", out)

    def test_refuses_to_overwrite(self):
        config = self.config()
        d = os.path.abspath(self.mktemp())
        os.makedirs(d)
        existing = os.path.join(d, "cbackup-client.service")
        with open(existing, "w") as f:
            f.write("mine\n")
        code, out, err = run(["init", "--dir", d, "--twistd", TWISTD,
                              "-c", config, "--host", "alpha"])
        self.assertEqual(code, 2)
        self.assertEqual(out, "")
        self.assertIn(f"cbackup init: {existing} exists; not overwriting it", err)
        self.assertEqual(os.listdir(d), ["cbackup-client.service"])  # nothing written
        self.assertEqual(read(existing), "mine\n")

    def test_refuses_starter_over_a_config(self):
        d = os.path.abspath(self.mktemp())
        os.makedirs(d)
        with open(os.path.join(d, "cluster.conf"), "w") as f:
            f.write(CONFIG)
        code, out, err = run(["init", "--dir", d, "--twistd", TWISTD, "--host", "h"])
        self.assertEqual(code, 2)
        self.assertIn(os.path.join(d, "cluster.conf"), err)
        self.assertEqual(os.listdir(d), ["cluster.conf"])

    def test_unknown_host(self):
        code, out, err, d = self.init("-c", self.config(), "--host", "nobody")
        self.assertEqual(code, 2)
        self.assertIn("--host nobody is not a host of this config", err)
        self.assertFalse(os.path.exists(d))

    def test_bad_config(self):
        code, out, err, d = self.init("-c", self.config("server: nopath\n"), "--host", "a")
        self.assertEqual(code, 2)
        self.assertIn("cluster.conf:1:", err)
        self.assertFalse(os.path.exists(d))


class QuoteTests(SynchronousTestCase):
    def test_plain(self):
        self.assertEqual(init.quote("/srv/a_b-c.d/e+f@g:h"), "/srv/a_b-c.d/e+f@g:h")

    def test_quoted(self):
        self.assertEqual(init.quote('/a b/"c"\\d'), '"/a b/\\"c\\"\\\\d"')
        self.assertEqual(init.quote("/a%b"), '"/a%%b"')
        self.assertEqual(init.quote("/a$b", exec_line=True), '"/a$$b"')
        self.assertEqual(init.quote("/a$b"), '"/a$b"')

    def test_refused(self):
        for bad in ("/a\nb", "/a\tb", "/a\x7fb", "/a\udcffb"):
            self.assertRaises(init.InitError, init.quote, bad)


class SystemdReadsInitUnitsTests(InitTestsMixin, SynchronousTestCase):
    """The units init writes, as systemd-analyze reads them."""

    if SYSTEMD_ANALYZE is None:
        skip = NO_ANALYZE

    def test_exposure_and_verify(self):
        code, out, err, d = self.init("-c", self.config(), "--host", "alpha")
        self.assertEqual(code, 0, err)
        paths = [os.path.join(d, name) for name in init.UNITS.values()]
        for path in paths:
            self.assertLessEqual(exposure(path), MAX_EXPOSURE, path)
        result = verify(self.mktemp(), *paths)
        self.assertEqual((result.returncode, result.stdout + result.stderr), (0, ""))
