"""
C{twistd -n cbackup-server -c cluster.conf [--host NAME]}: serve every source
of this host to the backup clients.
"""

from __future__ import annotations

from twisted.application.service import IService
from twisted.python import usage

from cluster_backup.config import Cluster
from cluster_backup.tapbase import ClusterOptions, reload_on_sighup


class Options(ClusterOptions):
    """Options of C{cbackup-server}."""

    synopsis = "-c FILE [--host NAME] [--state-dir DIR]"
    optParameters = ClusterOptions.optParameters + [
        ["state-dir", None, None,
         "Where the server keeps its rsync daemon's config and secrets, and the "
         "accepted scans (mode 0700; default /var/lib/cluster-backup/server/HOST)."],
    ]
    longdesc = ("Serve this host's sources (server: lines) to the backup clients. "
                "SIGHUP reloads the config.")

    def check_role(self, cluster: Cluster, host: str) -> None:
        if not cluster.sources_on(host):
            raise usage.UsageError(
                f"host {host} has no sources (server: lines) in "
                f"{self['config']}: nothing to serve")


def makeService(options: Options) -> IService:
    """
    Build the server's service tree; nothing listens until it starts.  A
    fatal failure ends the process with status 1 (L{Fatal}); SIGHUP
    reloads the config (L{reload_on_sighup}).
    """
    from twisted.internet import reactor

    from cluster_backup.config import ConfigError
    from cluster_backup.lifecycle import Fatal, exit_process
    from cluster_backup.server import STATE_ROOT, build, default_state_dir

    host = options["host"]
    state_dir = options["state-dir"] or default_state_dir(host)
    try:
        server = build(options["cluster"], host, state_dir, reactor,
                       Fatal(reactor, "cbackup-server", exit_process),
                       legacy_state_dir=None if options["state-dir"] else STATE_ROOT)
    except (ConfigError, ValueError) as e:
        raise SystemExit(f"cbackup-server: {e}")
    reload_on_sighup(reactor, options["config"], server, "cbackup-server")
    return server
