"""
Tests for C{cbackup check}, host identity, the warnings, the twistd options
and the plugins.
"""

from __future__ import annotations

import importlib.metadata
import io
import json
import os
import socket
import subprocess
import sys

from twisted.application.service import IServiceMaker
from twisted.plugin import getPlugins
from twisted.python import usage
from twisted.python.procutils import which
from twisted.trial.unittest import SynchronousTestCase

from cluster_backup import checks, cli, client_tap, server_tap
from cluster_backup.cli import main
from cluster_backup.config import ConfigError, loads
from cluster_backup.identity import identify
from tests.test_config import SEED


def run(argv) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main(argv, out, err)
    return code, out.getvalue(), err.getvalue()


class CheckCommandTests(SynchronousTestCase):
    def write(self, text: str, name: str = "cluster.conf") -> str:
        folder = self.mktemp()
        os.makedirs(folder)
        path = os.path.join(folder, name)
        with open(path, "w") as f:
            f.write(text)
        return path

    def test_json(self):
        code, out, err = run(["check", "-c", self.write(SEED), "--json"])
        self.assertEqual((code, err), (0, ""))
        info = json.loads(out)
        self.assertEqual(
            [(s["host"], s["path"], s["copies"]) for s in info["sources"]],
            [("host1", "/path/to/directory", 2), ("host2", "/path/to/otherdir", 1)])
        self.assertEqual(
            [(s["host"], s["path"], s["size"], s["reserve"]) for s in info["stores"]],
            [("host3", "/path/for/backups", 100 * 2**30, None),
             ("host4", "/path/for/backups", 2**40, None)])
        self.assertEqual(info["options"]["port"], 5005)
        self.assertEqual(info["roles"], [])
        self.assertIsInstance(info["warnings"], list)

    def test_text_and_roles(self):
        path = self.write(SEED + "backup: host1:/backups\nreserve: 10g\n")
        code, out, err = run(["check", "-c", path, "--host", "host1"])
        self.assertEqual((code, err), (0, ""))
        self.assertIn("host1:/path/to/directory  copies 2", out)
        self.assertIn("host3:/path/for/backups  size 100G (107374182400 bytes)", out)
        self.assertIn("host1:/backups  reserve 10G", out)
        self.assertIn("this host: host1 (server and client)", out)

    def test_secret_never_printed(self):
        path = self.write("SECRET: correct-horse-battery\n" + SEED)
        for argv in (["check", "-c", path], ["check", "-c", path, "--json"]):
            code, out, err = run(argv)
            self.assertEqual(code, 0)
            self.assertNotIn("correct-horse", out + err)

    def test_bad_config_exit_2_one_line_per_problem(self):
        folder = self.mktemp()
        os.makedirs(folder)
        path = os.path.join(folder, "bad.conf")
        with open(path, "w") as f:
            f.write(SEED.replace("copies: 2", "copies: 0").replace("size: 1t", "size: huge"))
        code, out, err = run(["check", "-c", path])
        self.assertEqual(code, 2)
        self.assertEqual(out, "")
        self.assertEqual(err.splitlines(), [
            f"{path}:3: copies: must be at least 1, got 0",
            f"{path}:9: size: bad size 'huge': expected a number with an optional "
            "unit k, m, g, t or p (e.g. 100gb, 1t, 512m)"])
        self.assertEqual(os.listdir(folder), ["bad.conf"])  # nothing written

    def test_unknown_host(self):
        code, out, err = run(["check", "-c", self.write(SEED), "--host", "host9"])
        self.assertEqual(code, 2)
        self.assertIn("--host host9 is not a host of this config", err)

    def test_console_script_no_traceback(self):
        """The installed command, run as a process, gives the line and no traceback."""
        path = self.write(SEED + "colour: red\n")
        result = subprocess.run(
            [sys.executable, "-m", "cluster_backup.cli", "check", "-c", path],
            capture_output=True, text=True)
        self.assertEqual(result.returncode, 2)
        self.assertEqual(result.stderr.strip(),
                         f"{path}:10: unknown key 'colour' in a backup: block; "
                         "known keys: size, reserve, ignore source, address")
        self.assertNotIn("Traceback", result.stderr)


class SecretFileCheckTests(SynchronousTestCase):
    """
    C{cbackup check} reads the SECRET FILE as the daemons will: a file it
    cannot use is an error (exit 2, naming the path); one that group or
    others can read or write is a warning.
    """

    def config(self, secret_path: str) -> str:
        folder = os.path.abspath(self.mktemp())
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, "cluster.conf")
        with open(path, "w") as f:
            f.write(f"SECRET FILE: {secret_path}\nserver: 127.0.0.7:/data\n"
                    "backup: 127.0.0.8:/b\nsize: 1g\n")
        return path

    def secret(self, mode: int, data: bytes = b"s3cret\n") -> str:
        path = os.path.abspath(self.mktemp())
        with open(path, "wb") as f:
            f.write(data)
        os.chmod(path, mode)
        return path

    def test_mode_warnings(self):
        for mode, words in [(0o644, "readable by its group and others (mode 0644)"),
                            (0o640, "readable by its group (mode 0640)"),
                            (0o602, "writable by others (mode 0602)"),
                            (0o666, "readable and writable by its group and others")]:
            path = self.secret(mode)
            code, out, err = run(["check", "-c", self.config(path)])
            self.assertEqual((code, err), (0, ""), mode)
            self.assertIn(f"  - SECRET FILE {path} is {words}", out)
            self.assertIn(f"chmod 600 {path}", out)
        path = self.secret(0o600)
        code, out, err = run(["check", "-c", self.config(path)])
        self.assertEqual((code, err), (0, ""))
        self.assertNotIn("SECRET FILE", out.split("warnings")[-1])

    def test_unusable_secret_file_exit_2(self):
        folder = os.path.abspath(self.mktemp())
        os.makedirs(folder)
        big = self.secret(0o600, b"s3cret\n" + b"#" * (64 * 1024))
        empty = self.secret(0o600, b"\n")
        for path, why in [(folder, "not a regular file (a folder)"),
                          (big, "larger than 64 KiB"),
                          (empty, "is empty"),
                          (folder + "/missing", "cannot read: No such file or directory")]:
            config = self.config(path)
            code, out, err = run(["check", "-c", config])
            self.assertEqual((code, out), (2, ""), path)
            self.assertTrue(err.startswith(f"{config}: SECRET FILE {path}"), err)
            self.assertIn(why, err)

    def test_fifo_and_device_refused_by_the_command(self):
        """The installed command: exit 2, the path, no traceback, no wait."""
        fifo = os.path.abspath(self.mktemp())
        os.mkfifo(fifo)
        for path in (fifo, "/dev/zero"):
            config = self.config(path)
            result = subprocess.run(
                [sys.executable, "-m", "cluster_backup.cli", "check", "-c", config],
                capture_output=True, text=True, timeout=30)
            self.assertEqual((result.returncode, result.stdout), (2, ""), result.stderr)
            self.assertIn(f"{config}: SECRET FILE {path}: not a regular file", result.stderr)
            self.assertNotIn("Traceback", result.stderr)

    def test_unreadable_secret_file_names_the_user(self):
        """
        A SECRET FILE this user may not read (an operator not root, a root-only
        file): exit 2, saying as whom.  As root the command runs without the
        capabilities that bypass file modes (setpriv).
        """
        path = self.secret(0o000)
        config = self.config(path)
        argv = [sys.executable, "-m", "cluster_backup.cli", "check", "-c", config]
        if os.geteuid() == 0:
            if not which("setpriv"):
                raise self.skipTest("root, and no setpriv to drop CAP_DAC_OVERRIDE")
            argv = ["setpriv", "--inh-caps=-all",
                    "--bounding-set=-dac_override,-dac_read_search", *argv]
        result = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        self.assertEqual((result.returncode, result.stdout), (2, ""), result.stderr)
        self.assertEqual(result.stderr, f"{config}: SECRET FILE {path}: cannot read: "
                         f"Permission denied (as uid {os.geteuid()}); run check as the "
                         "user the daemons run as\n")


class ResolveCheckTests(SynchronousTestCase):
    """C{cbackup check} warns of host names that do not resolve."""

    text = ("SECRET: x\nserver: alpha:/data\ncopies: 1\n"
            "server: nowhere:/data\n"
            "backup: 10.0.0.3:/b\nsize: 1g\n"
            "backup: [fd00::4]:/b\nsize: 1g\n"
            "backup: beta:/b\nsize: 1g\naddress: 10.0.0.5\n"
            "backup: lost:/b\nsize: 1g\n")

    def resolver(self, asked: list):
        def resolve(host: str) -> None:
            asked.append(host)
            if host in ("nowhere", "lost"):
                raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return resolve

    def test_names_without_address_are_resolved(self):
        asked: list = []
        found = checks.unresolved_warnings(loads(self.text, "c.conf"), self.resolver(asked))
        self.assertEqual(asked, ["alpha", "nowhere", "lost"])  # no address:, no IP literal
        self.assertEqual(found, [
            "c.conf:4: host nowhere does not resolve here (Name or service not known): "
            "clients cannot connect to its server; fix its name in DNS or /etc/hosts, "
            "or give it 'address: IP'",
            "c.conf:12: host lost does not resolve here (Name or service not known): "
            "cbackup restore cannot reach its stores over ssh; fix its name in DNS or "
            "/etc/hosts, or give it 'address: IP'"])

    def test_command_warns(self):
        path = os.path.abspath(self.mktemp())
        with open(path, "w") as f:
            f.write(self.text)
        asked: list = []
        out, err = io.StringIO(), io.StringIO()
        args = cli.parser().parse_args(["check", "-c", path])
        self.assertEqual(cli.cmd_check(args, out, err, resolve=self.resolver(asked)), 0)
        self.assertIn(f"  - {path}:4: host nowhere does not resolve here", out.getvalue())
        self.assertIn(f"  - {path}:12: host lost does not resolve here", out.getvalue())

    def test_real_resolver(self):
        """'.invalid' never resolves (RFC 6761); 'localhost' always does."""
        path = os.path.abspath(self.mktemp())
        with open(path, "w") as f:
            f.write("SECRET: x\nserver: localhost:/data\n"
                    "backup: cbackup-test.invalid:/b\nsize: 1g\n")
        code, out, err = run(["check", "-c", path])
        self.assertEqual((code, err), (0, ""))
        self.assertIn(f"  - {path}:3: host cbackup-test.invalid does not resolve here (", out)
        self.assertNotIn("host localhost", out)


class HelpAndVersionTests(SynchronousTestCase):
    def command(self, *argv) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "cluster_backup.cli", *argv],
                              capture_output=True, text=True, timeout=60)

    def test_version(self):
        result = self.command("--version")
        self.assertEqual((result.returncode, result.stderr), (0, ""))
        self.assertEqual(result.stdout, f"cbackup {importlib.metadata.version('cluster-backup')}\n")
        import cluster_backup
        self.assertEqual(cluster_backup.__version__, importlib.metadata.version("cluster-backup"))

    def test_check_and_demo_describe_themselves(self):
        for argv, words in [(("check", "--help"), "Read a cluster config, report every problem"),
                            (("demo", "--help"), "Run a real cluster on this machine")]:
            result = self.command(*argv)
            self.assertEqual(result.returncode, 0, result.stderr)
            usage, _, rest = result.stdout.partition("\n\n")
            self.assertTrue(rest.startswith(words), result.stdout)


class WarningTests(SynchronousTestCase):
    def test_more_copies_than_store_hosts(self):
        cluster = loads("server: a:/s\ncopies: 3\nbackup: b:/x\nsize: 1g\n"
                        "backup: b:/y\nsize: 1g\nbackup: c:/z\nsize: 1g\n")
        found = checks.warnings(cluster)
        self.assertIn("source a:/s wants 3 copies but only 2 distinct backup host(s) "
                      "back it up; copies are counted per host, so at most 2 can exist",
                      found)

    def test_no_warning_when_enough_hosts(self):
        cluster = loads("SECRET: x\nserver: a:/s\ncopies: 2\nbackup: b:/x\nsize: 1g\n"
                        "backup: c:/z\nsize: 1g\n")
        self.assertEqual(checks.warnings(cluster), [])

    def test_own_host_stores_do_not_count(self):
        """
        The own-host rule: a store on the source's host (same name, or same
        address) does not back it up, and check says so when that leaves
        fewer hosts than copies.
        """
        cluster = loads("SECRET: x\nserver: h2:/srv/media\ncopies: 2\naddress: 10.0.0.2\n"
                        "backup: h2:/srv/backup\nsize: 1g\n"
                        "backup: 10.0.0.2:/mnt/usb\nsize: 1g\n"
                        "backup: h3:/b\nsize: 1g\n")
        source = cluster.sources[0]
        self.assertEqual([st.id for st in cluster.stores_for(source)], ["h3:/b"])
        self.assertEqual(checks.warnings(cluster), [
            "source h2:/srv/media wants 2 copies but only 1 distinct backup host(s) back "
            "it up (not counting h2:/srv/backup, 10.0.0.2:/mnt/usb on the source's own "
            "host: a copy there dies with it); copies are counted per host, so at most "
            "1 can exist"])
        more = loads("SECRET: x\nserver: h2:/srv/media\ncopies: 2\n"
                     "backup: h2:/srv/backup\nsize: 1g\n"
                     "backup: h3:/b\nsize: 1g\nbackup: h4:/b\nsize: 1g\n")
        self.assertEqual(checks.warnings(more), [])
        self.assertEqual([st.host for st in more.stores_for(more.sources[0])], ["h3", "h4"])

    def test_measure_names_a_file_too_big_for_its_copies(self):
        """
        check --measure walks this host's sources (excludes applied, stores
        inside skipped) and warns of a file that fits in the quota of fewer
        backup hosts than its copies, and of quotas too small in all.
        """
        base = os.path.abspath(self.mktemp())
        src = os.path.join(base, "data")
        os.makedirs(os.path.join(src, "skip.tmp"))
        for name, size in (("big.img", 3 << 20), ("small", 1000),
                           ("skip.tmp/huge", 50 << 20)):
            with open(os.path.join(src, name), "wb") as f:
                f.truncate(size)
        config = os.path.join(base, "cluster.conf")
        with open(config, "w") as f:
            f.write(f"SECRET: x\nserver: lab:{src}\ncopies: 2\nexclude: *.tmp\n"
                    "backup: b:/x\nsize: 10m\nbackup: c:/x\nsize: 2m\n")
        code, out, err = run(["check", "-c", config, "--host", "lab", "--measure"])
        self.assertEqual((code, err), (0, ""))
        self.assertIn(f"measured lab:{src}: 2 files, 3M, largest 'big.img' (3M)\n", out)
        self.assertIn(f"source lab:{src}: its largest file 'big.img' (3M) fits in the quota "
                      "of 1 backup host(s), so it can never have 2 copies", out)
        self.assertNotIn("of quota in all", out)  # 6M of copies, 12M of quota
        info = json.loads(run(["check", "-c", config, "--host", "lab", "--measure",
                               "--json"])[1])
        self.assertEqual(info["measured"][f"lab:{src}"],
                         {"files": 2, "bytes": (3 << 20) + 1000, "largest": ["big.img", 3 << 20]})
        # This machine is none of the config's hosts: --measure needs --host.
        self.assertEqual(run(["check", "-c", config, "--measure"])[::2], (
            2, "--measure walks the sources of this host: name it with --host\n"))

    def test_store_overlapping_source(self):
        cluster = loads("SECRET: x\nserver: a:/data\nbackup: a:/data/backups\nsize: 1g\n"
                        "backup: b:/data\nsize: 1g\n")
        found = checks.warnings(cluster)
        self.assertEqual(len(found), 1)
        self.assertIn("backup a:/data/backups overlaps source a:/data", found[0])

    def test_quota_too_small_when_measured(self):
        cluster = loads("SECRET: x\nserver: a:/s\ncopies: 2\nbackup: b:/x\nsize: 1g\n"
                        "backup: c:/z\nsize: 1g\n")
        self.assertEqual(checks.warnings(cluster, {"a:/s": 2**29}), [])
        found = checks.warnings(cluster, {"a:/s": 2**30 + 1})
        self.assertEqual(len(found), 2, found)
        self.assertIn("2 copies need 2G but its backups have 2G", found[0])

    def test_ssh_transport_not_built(self):
        found = checks.warnings(loads("TRANSPORT: ssh\nSECRET: x\n" + SEED))
        self.assertTrue(any("TRANSPORT ssh is not built yet" in w for w in found), found)

    def test_no_secret(self):
        self.assertTrue(any("no SECRET" in w for w in checks.warnings(loads(SEED))))


class IdentityTests(SynchronousTestCase):
    cluster = loads(SEED + "backup: lab:/b\nsize: 1g\naddress: 127.0.0.9\n")

    def test_named(self):
        self.assertEqual(identify(self.cluster, "host2"), "host2")

    def test_named_unknown(self):
        self.assertRaises(ConfigError, identify, self.cluster, "nope")

    def test_by_hostname(self):
        found = identify(self.cluster, names={"host3.example.org", "host3"},
                         resolve=lambda h: [], is_local=lambda a: False)
        self.assertEqual(found, "host3")

    def test_by_address(self):
        local = {"127.0.0.9"}
        found = identify(self.cluster, names={"elsewhere"}, resolve=lambda h: [],
                         is_local=local.__contains__)
        self.assertEqual(found, "lab")

    def test_by_resolved_name(self):
        found = identify(self.cluster, names={"elsewhere"},
                         resolve=lambda h: ["192.0.2.4"] if h == "host4" else [],
                         is_local=lambda a: a == "192.0.2.4")
        self.assertEqual(found, "host4")

    def test_ambiguous(self):
        with self.assertRaises(ConfigError) as raised:
            identify(self.cluster, names=set(), resolve=lambda h: ["127.0.0.1"],
                     is_local=lambda a: True)
        self.assertIn("choose one with --host NAME", str(raised.exception))

    def test_none(self):
        self.assertIsNone(identify(self.cluster, names=set(), resolve=lambda h: [],
                                   is_local=lambda a: False))

    def test_real_loopback_address(self):
        """127.0.0.9 really is an address of this machine (all of 127/8 is)."""
        self.assertEqual(identify(loads("server: lab:/s\naddress: 127.0.0.9\n"),
                                  names=set()), "lab")


class TapOptionsTests(SynchronousTestCase):
    def write(self, text: str) -> str:
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(text)
        return path

    def test_server_options(self):
        options = server_tap.Options()
        options.parseOptions(["-c", self.write(SEED), "--host", "host1"])
        self.assertEqual(options["host"], "host1")
        self.assertEqual(len(options["cluster"].sources), 2)

    def test_server_host_without_sources(self):
        options = server_tap.Options()
        with self.assertRaises(usage.UsageError) as raised:
            options.parseOptions(["-c", self.write(SEED), "--host", "host3"])
        self.assertIn("host host3 has no sources", str(raised.exception))

    def test_client_host_without_stores(self):
        options = client_tap.Options()
        with self.assertRaises(usage.UsageError) as raised:
            options.parseOptions(["-c", self.write(SEED), "--host", "host1"])
        self.assertIn("host host1 has no stores", str(raised.exception))

    def test_bad_config_names_line(self):
        path = self.write(SEED.replace("size: 100gb", "size: 100 gallons"))
        for tap in (server_tap, client_tap):
            with self.assertRaises(usage.UsageError) as raised:
                tap.Options().parseOptions(["-c", path, "--host", "host1"])
            self.assertIn(f"{path}:7: size: bad size", str(raised.exception))

    def test_config_required(self):
        self.assertRaises(usage.UsageError, server_tap.Options().parseOptions, [])


class PluginTests(SynchronousTestCase):
    def test_plugins_discovered(self):
        names = {p.tapname for p in getPlugins(IServiceMaker)}
        self.assertTrue({"cbackup-server", "cbackup-client"} <= names, names)

    def twistd(self, *args) -> subprocess.CompletedProcess:
        twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
        cwd = self.mktemp()
        os.makedirs(cwd)
        return subprocess.run([twistd, *args], capture_output=True, text=True, timeout=60,
                              cwd=cwd)

    def test_twistd_help_lists_plugins(self):
        result = self.twistd("--help")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn("cbackup-server", result.stdout)
        self.assertIn("cbackup-client", result.stdout)

    def test_twistd_bad_config_no_traceback(self):
        path = self.write_bad()
        result = self.twistd("-n", "cbackup-server", "-c", path, "--host", "host1")
        self.assertNotEqual(result.returncode, 0)
        self.assertIn(f"{path}:3: copies: must be at least 1", result.stdout + result.stderr)
        self.assertNotIn("Traceback", result.stdout + result.stderr)

    def write_bad(self) -> str:
        path = os.path.abspath(self.mktemp())
        with open(path, "w") as f:
            f.write(SEED.replace("copies: 2", "copies: 0"))
        return path


class ListenCheckTests(SynchronousTestCase):
    """check says where this host's server listens, and when it cannot."""

    CONFIG = ("options: SECRET: 0123456789abcdef\n{listen}"
              "server: {host}:/srv\ncopies: 1\n"
              "backup: 127.0.0.3:/backup\nsize: 1g\n")

    def check(self, host: str, listen: str = "") -> tuple[int, str, dict]:
        folder = self.mktemp()
        os.makedirs(folder)
        path = os.path.join(folder, "cluster.conf")
        with open(path, "w") as f:
            f.write(self.CONFIG.format(host=host, listen=listen))
        code, out, _ = run(["check", "-c", path, "--host", host])
        _, js, _ = run(["check", "-c", path, "--host", host, "--json"])
        return code, out, json.loads(js)

    def test_ip_named_host_listens_on_its_address(self):
        code, out, info = self.check("127.0.0.2")
        self.assertEqual(code, 0)
        self.assertIn("this host: 127.0.0.2 (server); its server listens on 127.0.0.2", out)
        self.assertEqual(info["listen"], "127.0.0.2")

    def test_listen_star_is_said(self):
        code, out, info = self.check("127.0.0.2", "options: LISTEN: *\n")
        self.assertIn("its server listens on every interface", out)
        self.assertIn("LISTEN *: every server listens on all its interfaces", out)
        self.assertEqual(info["listen"], "*")

    def test_address_not_this_machine(self):
        code, out, info = self.check("192.0.2.44")
        self.assertIn("the server of 192.0.2.44 cannot start: host 192.0.2.44's address "
                      "192.0.2.44 is not an address of this machine", out)
