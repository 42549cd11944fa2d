"""
C{twistd -n cbackup-client -c cluster.conf [--host NAME]}: fill every store
of this host from the servers.
"""

from __future__ import annotations

from twisted.application.service import IService
from twisted.python import usage

from cluster_backup.config import Cluster
from cluster_backup.tapbase import ClusterOptions, reload_on_sighup


class Options(ClusterOptions):
    """Options of C{cbackup-client}."""

    synopsis = "-c FILE [--host NAME]"
    longdesc = ("Fill this host's stores (backup: lines) from the servers. "
                "SIGHUP reloads the config.")

    def check_role(self, cluster: Cluster, host: str) -> None:
        if not cluster.stores_on(host):
            raise usage.UsageError(
                f"host {host} has no stores (backup: lines) in "
                f"{self['config']}: nothing to fill")


def makeService(options: Options) -> IService:
    """
    Build the client's service tree; nothing connects until it starts.
    SIGHUP reloads the config (L{reload_on_sighup}).
    """
    from twisted.internet import reactor

    from cluster_backup.client_service import build
    from cluster_backup.config import ConfigError
    from cluster_backup.store import StoreError

    try:
        client = build(options["cluster"], options["host"], reactor)
    except (ConfigError, StoreError, OSError, ValueError) as e:
        raise SystemExit(f"cbackup-client: {e}")
    reload_on_sighup(reactor, options["config"], client, "cbackup-client")
    return client
