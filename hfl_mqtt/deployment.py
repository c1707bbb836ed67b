"""Where a federation runs: its brokers, which broker serves which subtree, which host runs what.

The optional ``deployment:`` section of a federation file, read by ``hfl-mqtt plan``::

    deployment:
      brokers:                      # every broker of the fleet, by name
        cloud: {host: cloud.example.net, port: 8883}           # no bridge_to: the root's broker
        site-a: {host: 10.0.0.5, port: 8883, bridge_to: cloud}
      sites:                        # aggregator -> the broker its subtree uses
        edge-0: site-a              # edge-0 and its workers talk to site-a, bridged to cloud
      hosts:                        # machine -> the nodes it runs (START.md says what goes where)
        cloud-vm: [cloud]
        pi-lab: [worker-0, worker-1]

Without ``brokers``, there is one root broker named after the root node; ``--broker HOST:PORT``
sets its address either way. An aggregator not in ``sites`` keeps its subtree on the root's
broker (with ``brokers: per_edge`` and no ``sites``, every lowest aggregator gets a broker of its
own, named after it). A site broker is bridged to the broker its aggregator's parent uses.
``check_tree`` checks the section against the federation's tree.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = ["OPERATOR", "DeploymentBroker", "DeploymentConfig"]

OPERATOR = "hfl-operator"
"""The broker user that may read and write every topic under ``hfl/`` (watch and stop nodes)."""

NodeId = Annotated[str, Field(pattern=r"^[A-Za-z0-9_.\-]{1,128}$")]
# A broker's name is a directory name and part of its bridge user's name.
BrokerName = Annotated[str, Field(pattern=r"^[A-Za-z0-9_.\-]{1,64}$")]
HostName = Annotated[str, Field(pattern=r"^[A-Za-z0-9_.:\[\]\-]{1,253}$")]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class DeploymentBroker(_Frozen):
    """One broker: where clients reach it, and the broker it bridges to (none: the root's)."""

    host: HostName = "127.0.0.1"
    """Host name or address clients (and bridges) connect to; also in its TLS certificate."""
    port: Annotated[int, Field(ge=1, le=65535)] | None = None
    """None: 1883, or 8883 with TLS."""
    bind: HostName | None = None
    """Address the broker listens on; None: 127.0.0.1 for a loopback host, else every
    interface (0.0.0.0)."""
    bridge_to: BrokerName | None = None
    """The broker this one forwards its aggregators' traffic to (their parent's broker)."""


class DeploymentConfig(_Frozen):
    """The ``deployment:`` section: brokers, sites and hosts (see the module docstring)."""

    brokers: dict[BrokerName, DeploymentBroker] = {}
    sites: dict[NodeId, BrokerName] = {}
    hosts: dict[HostName, list[NodeId]] = {}

    @model_validator(mode="after")
    def _consistent(self) -> DeploymentConfig:
        if self.brokers:
            roots = [name for name, broker in self.brokers.items() if broker.bridge_to is None]
            if len(roots) != 1:
                raise ValueError(
                    f"brokers: exactly one broker has no bridge_to (the root's), not {roots}"
                )
        for name, broker in self.brokers.items():
            if broker.bridge_to is not None and broker.bridge_to not in self.brokers:
                raise ValueError(
                    f"brokers.{name}.bridge_to: no broker {broker.bridge_to!r} in brokers"
                )
        for name in self.brokers:
            seen = [name]
            while (target := self.brokers[seen[-1]].bridge_to) is not None:
                if target in seen:
                    loop = " -> ".join([*seen[seen.index(target) :], target])
                    raise ValueError(f"brokers.{name}.bridge_to: a bridge loop: {loop}")
                seen.append(target)
        addresses: dict[tuple[str, int | None], str] = {}
        for name, broker in self.brokers.items():
            if broker.port is not None and (broker.host, broker.port) in addresses:
                other = addresses[broker.host, broker.port]
                raise ValueError(f"brokers.{name}: same host and port as brokers.{other}")
            addresses[broker.host, broker.port] = name
        for node, broker_name in self.sites.items():
            if broker_name not in self.brokers:
                raise ValueError(f"sites.{node}: no broker {broker_name!r} in brokers")
            if self.brokers[broker_name].bridge_to is None:
                raise ValueError(
                    f"sites.{node}: {broker_name!r} is the root's broker; list only the "
                    "aggregators whose subtree uses another broker"
                )
        placed: dict[str, str] = {}
        for host, nodes in self.hosts.items():
            for node in nodes:
                if node in placed:
                    where = "twice" if placed[node] == host else f"also on {placed[node]!r}"
                    raise ValueError(f"hosts.{host}: node {node!r} is listed {where}")
                placed[node] = host
        return self

    @property
    def root_broker(self) -> str | None:
        """Name of the broker without ``bridge_to``; None when ``brokers`` is empty."""
        return next((n for n, b in self.brokers.items() if b.bridge_to is None), None)

    def host_of(self, node: str) -> str | None:
        return next((host for host, nodes in self.hosts.items() if node in nodes), None)

    def check_tree(self, tree: Mapping[str, list[str]], root: str) -> None:
        """``ValueError`` naming the field if a node named here is not in ``tree`` (children
        by aggregator, as ``FederationConfig.tree``), a site is not an aggregator, or a site
        broker does not bridge to the broker its aggregator's parent uses."""
        nodes = {root, *(kid for kids in tree.values() for kid in kids)}
        for host, listed in self.hosts.items():
            unknown = [node for node in listed if node not in nodes]
            if unknown:
                raise ValueError(f"deployment.hosts.{host}: no such node: {', '.join(unknown)}")
        parents = {kid: parent for parent, kids in tree.items() for kid in kids}
        for node, broker in self.sites.items():
            field = f"deployment.sites.{node}"
            if node not in nodes:
                raise ValueError(f"{field}: no such node")
            if node == root:
                raise ValueError(f"{field}: the root uses the root's broker ({self.root_broker})")
            if node not in tree:
                raise ValueError(f"{field}: a worker has no subtree; name an aggregator")
            parent_broker = self.sites.get(parents[node], self.root_broker)
            bridge_to = self.brokers[broker].bridge_to
            if parent_broker not in (broker, bridge_to):
                raise ValueError(
                    f"{field}: {node}'s parent {parents[node]} is on broker {parent_broker!r}, "
                    f"so {broker!r} must bridge to it (bridge_to: {bridge_to!r})"
                )
        used = {self.root_broker, *self.sites.values()}
        unused = [name for name in self.brokers if name not in used]
        if unused:
            raise ValueError(
                f"deployment.brokers: {', '.join(unused)} serve(s) no aggregator: "
                "name it in deployment.sites or remove it"
            )
