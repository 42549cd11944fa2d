"""
C{twistd -n cbackup-server -c cluster.conf [--host NAME]}: serve every source
of this host to the backup clients.
"""

from __future__ import annotations

from twisted.application.service import IService
from twisted.python import usage

from cluster_backup.config import Cluster
from cluster_backup.tapbase import ClusterOptions


class Options(ClusterOptions):
    """Options of C{cbackup-server}."""

    synopsis = "-c FILE [--host NAME] [--state-dir DIR]"
    optParameters = ClusterOptions.optParameters + [
        ["state-dir", None, "/var/lib/cluster-backup/server",
         "Where the server keeps its rsync daemon's config and secrets (mode 0700)."],
    ]
    longdesc = "Serve this host's sources (server: lines) to the backup clients."

    def check_role(self, cluster: Cluster, host: str) -> None:
        if not cluster.sources_on(host):
            raise usage.UsageError(
                f"host {host} has no sources (server: lines) in "
                f"{self['config']}: nothing to serve")


def makeService(options: Options) -> IService:
    """Build the server's service tree; nothing listens until it starts."""
    from twisted.internet import reactor

    from cluster_backup.config import ConfigError
    from cluster_backup.server import build

    try:
        return build(options["cluster"], options["host"], options["state-dir"], reactor)
    except (ConfigError, ValueError) as e:
        raise SystemExit(f"cbackup-server: {e}")
