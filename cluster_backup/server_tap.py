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

    synopsis = "-c FILE [--host NAME]"
    longdesc = "Serve this host's sources (server: lines) to the backup clients."

    def check_role(self, cluster: Cluster, host: str) -> None:
        if not cluster.sources_on(host):
            raise usage.UsageError(
                f"host {host} has no sources (server: lines) in "
                f"{self['config']}: nothing to serve")


def makeService(options: Options) -> IService:
    """Build the server's service tree; nothing listens until it starts."""
    raise SystemExit(
        "cbackup-server: the server is not built yet in this version "
        "(the config is valid; see `cbackup check`)")
