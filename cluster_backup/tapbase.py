"""
The twistd options both plugins share: C{-c/--config FILE} and
C{--host NAME}.

Parsing the options loads and checks the config and finds this host in it,
so an operator's typo stops twistd before anything starts, with the
C{FILE:LINE} message and no traceback.
"""

from __future__ import annotations

from twisted.logger import Logger
from twisted.python import usage

from cluster_backup.config import Cluster, ConfigError, load
from cluster_backup.identity import identify

log = Logger()


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


def reload_config(path: str, daemon, what: str) -> bool:
    """
    Read the config at C{path} again and hand it to C{daemon.reload}
    (which returns why it cannot apply it, or None).  A config that does
    not load, or that the daemon refuses, is logged with its reasons and
    changes nothing: the old config stays.
    """
    try:
        cluster = load(path)
    except ConfigError as e:
        log.error("{what}: reload refused, the old config stays: {path} has "
                  "problems:\n{problems}", what=what, path=path,
                  problems="\n".join(e.problems))
        return False
    try:
        problem = daemon.reload(cluster)
    except Exception:
        log.failure("{what}: reload of {path} failed", what=what, path=path)
        return False
    if problem:
        log.error("{what}: reload refused, the old config stays: {problem}",
                  what=what, problem=problem)
        return False
    log.info("{what}: reloaded {path}", what=what, path=path)
    return True


def reload_on_sighup(reactor, path: str, daemon, what: str) -> None:
    """SIGHUP: L{reload_config}, logged either way."""
    from cluster_backup.lifecycle import on_sighup

    def reload():
        log.info("{what}: SIGHUP: reloading {path}", what=what, path=path)
        reload_config(path, daemon, what)

    on_sighup(reactor, reload)
