"""
The twistd options both plugins share: C{-c/--config FILE} and
C{--host NAME}.

Parsing the options loads and checks the config and finds this host in it,
so an operator's typo stops twistd before anything starts, with the
C{FILE:LINE} message and no traceback.
"""

from __future__ import annotations

from twisted.python import usage

from cluster_backup.config import Cluster, ConfigError, load
from cluster_backup.identity import identify


class ClusterOptions(usage.Options):
    """Base for C{cbackup-server} and C{cbackup-client} options."""

    #: "source" or "store": the role this plugin serves, for messages.
    role = ""

    optParameters = [
        ["config", "c", None, "The cluster config file (line format or YAML)."],
        ["host", None, None,
         "Which host of the config this is (default: match this machine's "
         "names and addresses)."],
    ]

    def postOptions(self) -> None:
        if not self["config"]:
            raise usage.UsageError("--config FILE is required")
        try:
            cluster = load(self["config"])
            host = identify(cluster, self["host"])
        except ConfigError as e:
            raise usage.UsageError("\n" + str(e))
        if host is None:
            raise usage.UsageError(
                f"this machine is none of the hosts in {self['config']} "
                f"({', '.join(cluster.hosts())}); use --host NAME")
        self["cluster"]: Cluster = cluster
        self["host"] = host
        self.check_role(cluster, host)

    def check_role(self, cluster: Cluster, host: str) -> None:
        """Refuse a host that has nothing to do in this role."""
