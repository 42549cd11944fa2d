"""
The service tree of C{cbackup-client}: one L{Agent} per store of this
host, and what a reloaded config (SIGHUP) changes in it.
"""

from __future__ import annotations

from typing import Optional

from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.logger import Logger

from cluster_backup.client import Agent
from cluster_backup.config import Cluster, ConfigError, Store as StoreConfig, read_secret
from cluster_backup.store import Store, StoreError

log = Logger()


def _agent_view(cluster: Cluster, config: StoreConfig, secret: Optional[bytes]) -> tuple:
    """
    Everything of a config one store's agent depends on: while it stays the
    same, a reload leaves the agent running.
    """
    sources = tuple(s for s in cluster.sources if cluster.backs_up(config, s))
    servers = tuple(sorted((s.host, cluster.address_of(s.host)) for s in sources))
    return (config, sources, servers, cluster.options, secret)


class Client(MultiService):
    """
    The service tree of C{cbackup-client} for one host: one L{Agent} per
    store.  L{reload} applies a new config: agents whose store, sources,
    servers, options or secret changed stop (their transfers in flight end;
    every copy stays on disk) and start again from the new config, counting
    their store as at start; new stores get an agent; the agents of
    removed stores stop; every other agent goes on untouched.
    """

    def __init__(self, cluster: Cluster, host: str, reactor):
        super().__init__()
        self.host = host
        self.reactor = reactor
        self.cluster = cluster
        self.secret = read_secret(cluster)
        self.busy: set = set()  # shared by the agents: see Agent.busy
        self.agents: list[Agent] = []
        #: store id -> the stop of its agent a reload ended, until it fires.
        self.stopping: dict[str, Deferred] = {}
        for config in cluster.stores_on(host):
            self._add(config)

    def _add(self, config: StoreConfig) -> None:
        agent = Agent(self.cluster, config, self.host, self.secret, self.reactor, self.busy)
        agent.setServiceParent(self)
        self.agents.append(agent)

    def _running(self, store_id: str) -> bool:
        return any(agent.id == store_id for agent in self.agents)

    def reload(self, cluster: Cluster) -> Optional[str]:
        """
        Apply C{cluster} (a new config); returns why not, or None once the
        change is under way.  A store's new agent starts only once its old
        one has stopped, so two never write one store.
        """
        if not cluster.stores_on(self.host):
            return (f"host {self.host} has no stores in the new config "
                    "(stop the client instead)")
        try:
            secret = read_secret(cluster)
            configs = {c.id: c for c in cluster.stores_on(self.host)}
            for config in configs.values():
                Store.from_config(config)  # a store that cannot be used: refuse all
        except (ConfigError, StoreError, OSError, ValueError) as e:
            return str(e)
        self.cluster, self.secret = cluster, secret
        for agent in list(self.agents):
            config = configs.get(agent.id)
            if config is not None and (_agent_view(cluster, config, secret)
                                       == _agent_view(agent.cluster, agent.config, agent.secret)):
                continue
            self.agents.remove(agent)
            log.info("{store}: {what}", store=agent.id,
                     what="no longer in the config; stopping" if config is None
                     else "its config changed; restarting it")
            stopped = maybeDeferred(agent.disownServiceParent)
            self.stopping[agent.id] = stopped
            stopped.addBoth(self._stopped, agent.id)
        for store_id, config in configs.items():
            if not self._running(store_id) and store_id not in self.stopping:
                log.info("{store}: new in the config; starting", store=store_id)
                self._add(config)
        return None

    def _stopped(self, _, store_id: str) -> None:
        """An agent a reload stopped is gone: start it again if its store stays."""
        del self.stopping[store_id]
        for config in self.cluster.stores_on(self.host):
            if config.id == store_id and not self._running(store_id):
                self._add(config)


def build(cluster: Cluster, host: str, reactor) -> Client:
    """The service tree of C{cbackup-client} for C{host} (L{Client})."""
    return Client(cluster, host, reactor)
