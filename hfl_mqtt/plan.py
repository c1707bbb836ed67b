"""``hfl-mqtt plan``: everything a fleet needs to run a federation, in one directory.

``make_plan`` decides what goes where (pure): the brokers (the root's, and a bridged one per
site of the ``deployment:`` section or per edge with ``brokers: per_edge``), each node's config
with its own broker user, and what each user may do. ``write_plan`` writes it::

    DIR/START.md                    what to copy to which host, and the command to run there
    DIR/nodes/{node}.yaml           one node config each (hfl-mqtt run --config)
    DIR/secrets/{user}.password     one password per broker user (0600; the directory 0700)
    DIR/secrets/{user}.key          with client certificates: the user's private key (0600)
    DIR/certs/ca.crt, {user}.crt    with TLS: the fleet's CA, the users' client certificates
    DIR/pki/ca.key                  with TLS: the CA's key (0600): keep it off every host
    DIR/brokers/{broker}/           mosquitto.conf, passwd, acl, TLS files, data/, a systemd unit

Paths in a node file are relative to it (``../secrets/edge-0.password``), so ``DIR`` (or a
host's part of it, keeping the layout) can be copied anywhere. Mosquitto resolves paths in its
config against its working directory, so a mosquitto.conf names its files by absolute path:
under ``DIR/brokers`` by default (it starts as written here), or under ``broker_dir`` (e.g.
``/etc/hfl-mqtt/brokers``), where START.md says to copy it.

Broker users: one per node (named after it; the ACL pins it to its own topics with ``%u``),
``hfl-operator`` (reads and writes everything under ``hfl/``: to watch and stop nodes), and one
``bridge-{broker}`` per bridged broker, in the password file of the broker it bridges to.
"""

from __future__ import annotations

import os
import pwd
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from hfl_mqtt import pki, topics
from hfl_mqtt.config import BrokerAddress, FederationConfig, NodeConfig, TlsConfig
from hfl_mqtt.deployment import OPERATOR, DeploymentBroker, DeploymentConfig
from hfl_mqtt.errors import ConfigError
from hfl_mqtt.mosquitto_conf import (
    AclRule,
    BridgeConfig,
    BridgeTls,
    BridgeTopic,
    BrokerConfig,
    ListenerTls,
    edge_bridge_topics,
    render_config,
    render_user_acl,
)
from hfl_mqtt.plan_docs import acl_header, conf_header, start_md, systemd_unit

__all__ = ["OPERATOR", "BrokerPlan", "Plan", "make_plan", "parse_address", "write_plan"]

DEFAULT_PORT, DEFAULT_TLS_PORT = 1883, 8883
_LOOPBACK = ("127.0.0.1", "localhost", "::1")
_OUTPUTS = ("START.md", "nodes", "secrets", "certs", "pki", "brokers")
_PRIVATE, _PUBLIC, _PRIVATE_DIR = 0o600, 0o644, 0o700


@dataclass(frozen=True, slots=True)
class BrokerPlan:
    """One broker of the fleet: where clients reach it, what it bridges to, who uses it."""

    name: str
    host: str
    port: int
    bind: str
    bridge_to: str | None
    users: tuple[str, ...]
    """Node users with a link to this broker (node ids)."""
    bridged: tuple[tuple[str, str], ...]
    """(node, parent) of each aggregator whose up link crosses this broker's bridge."""

    @property
    def bridge_user(self) -> str:
        """The user this broker's bridge logs in as on ``bridge_to`` (also its client id)."""
        return f"bridge-{self.name}"


@dataclass(frozen=True, slots=True)
class Plan:
    """Everything ``write_plan`` writes, decided: brokers (the root's first) and node configs
    (their secret paths relative to ``DIR/nodes``)."""

    config: FederationConfig
    brokers: dict[str, BrokerPlan]
    nodes: tuple[NodeConfig, ...]
    tls: bool
    client_certs: bool

    @property
    def federation(self) -> str:
        return self.config.federation

    @property
    def root_broker(self) -> BrokerPlan:
        return next(iter(self.brokers.values()))

    def users(self, broker: BrokerPlan) -> list[str]:
        """Every user of ``broker``'s password file: its nodes, bridges into it, the operator."""
        bridges = [b.bridge_user for b in self.brokers.values() if b.bridge_to == broker.name]
        return [*broker.users, *bridges, OPERATOR]

    def node_files(self, node: str) -> list[str]:
        """The files (relative to DIR) a host needs to run ``node``."""
        files = [f"nodes/{node}.yaml", f"secrets/{node}.password"]
        if self.tls:
            files.append("certs/ca.crt")
        if self.client_certs:
            files += [f"certs/{node}.crt", f"secrets/{node}.key"]
        return files


def parse_address(value: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:8883`` for IPv6) as (host, port); ``ConfigError`` otherwise."""
    host, sep, port = value.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ConfigError(f"--broker {value!r}: want HOST:PORT, e.g. 127.0.0.1:1883")
    return host, int(port)


def _brokers_and_sites(
    config: FederationConfig, broker: tuple[str, int] | None, tls: bool
) -> tuple[dict[str, DeploymentBroker], dict[str, str]]:
    """The brokers (root's first, ports filled in) and the aggregators using each site's."""
    deployment = config.deployment or DeploymentConfig()
    root = config.levels[0].name
    root_name = deployment.root_broker or root
    default_port = DEFAULT_TLS_PORT if tls else DEFAULT_PORT
    given = deployment.brokers or {root_name: DeploymentBroker()}
    root_broker = given[root_name]
    if broker is not None:
        root_broker = root_broker.model_copy(update={"host": broker[0], "port": broker[1]})
    root_broker = root_broker.model_copy(update={"port": root_broker.port or default_port})
    brokers = {root_name: root_broker}
    brokers.update({n: b for n, b in given.items() if n != root_name})
    sites = dict(deployment.sites)
    if config.brokers == "per_edge" and not sites:
        tree = config.tree()
        edges = [n for n, kids in tree.items() if n != root and all(k not in tree for k in kids)]
        for index, edge in enumerate(edges, start=1):
            if edge in brokers:
                raise ConfigError(f"deployment.brokers: {edge!r} is also an edge's broker name")
            brokers[edge] = DeploymentBroker(
                host=root_broker.host, port=(root_broker.port or 0) + index, bridge_to=root_name
            )
            sites[edge] = edge
    seen: dict[tuple[str, int], str] = {}
    for name, given_broker in list(brokers.items()):
        b = given_broker.model_copy(update={"port": given_broker.port or default_port})
        brokers[name] = b
        address = (b.host, b.port or default_port)
        if address in seen:
            raise ConfigError(
                f"deployment.brokers: {seen[address]} and {name} are both at "
                f"{b.host}:{b.port}: give one another port"
            )
        seen[address] = name
    return brokers, sites


def make_plan(
    config: FederationConfig,
    *,
    broker: tuple[str, int] | None = None,
    tls: bool = False,
    client_certs: bool = False,
) -> Plan:
    """Decide the brokers and every node's config (no files, no secrets yet). Client
    certificates imply TLS."""
    tls = tls or client_certs
    brokers, sites = _brokers_and_sites(config, broker, tls)
    root = config.levels[0].name
    root_name = next(iter(brokers))
    at = {name: BrokerAddress(host=b.host, port=b.port or 0) for name, b in brokers.items()}
    addresses = {root: at[root_name], **{node: at[name] for node, name in sites.items()}}
    # The per-edge wiring of node_configs is the per-site one. Every node gets the fallback
    # parents it can reach on its broker, and the ACL lets it use them.
    wiring = "per_edge" if sites else "single"
    config_for_nodes = config.model_copy(update={"brokers": wiring, "fallback_parents": True})
    broker_at = {(a.host, a.port): name for name, a in at.items()}
    users: dict[str, list[str]] = {name: [] for name in brokers}
    nodes = []
    for node in config_for_nodes.node_configs(addresses):
        for name in dict.fromkeys(broker_at[b.host, b.port] for b in _brokers_used(node)):
            users[name].append(node.node)
        nodes.append(_with_credentials(node, tls=tls, client_certs=client_certs))
    _check_user_names([n.node for n in nodes], brokers)
    parents = {kid: parent for parent, kids in config.tree().items() for kid in kids}
    bridged: dict[str, list[tuple[str, str]]] = {name: [] for name in brokers}
    for site, name in sites.items():
        if sites.get(parents[site], root_name) != name:
            bridged[name].append((site, parents[site]))
    plans = {
        name: BrokerPlan(
            name=name,
            host=b.host,
            port=b.port or 0,
            bind=b.bind or ("127.0.0.1" if b.host in _LOOPBACK else "0.0.0.0"),
            bridge_to=b.bridge_to if name != root_name else None,
            users=tuple(users[name]),
            bridged=tuple(bridged[name]),
        )
        for name, b in brokers.items()
    }
    return Plan(config, plans, tuple(nodes), tls=tls, client_certs=client_certs)


def _brokers_used(node: NodeConfig) -> list[BrokerAddress]:
    """Every broker ``node`` may connect to: its links', and its fallback parents'."""
    used = [link.broker for link in (node.upstream, node.downstream) if link is not None]
    if node.upstream is not None:
        used += [f.broker for f in node.upstream.fallbacks if f.broker is not None]
    return used


def _check_user_names(nodes: list[str], brokers: dict[str, DeploymentBroker]) -> None:
    reserved = {f"bridge-{b}": f"broker {b}'s bridge" for b in brokers}
    reserved[OPERATOR] = "the operator"
    for node in nodes:
        if node in reserved:
            raise ConfigError(f"node {node!r}: that broker user is {reserved[node]}'s: rename it")


def _with_credentials(node: NodeConfig, *, tls: bool, client_certs: bool) -> NodeConfig:
    """``node`` with its user, password file and TLS files on both links and every fallback's
    broker (paths relative to ``DIR/nodes``, where its file is written)."""
    me = node.node
    tls_config = None
    if tls or client_certs:
        tls_config = TlsConfig(
            ca_file=Path("../certs/ca.crt"),
            cert_file=Path(f"../certs/{me}.crt") if client_certs else None,
            key_file=Path(f"../secrets/{me}.key") if client_certs else None,
        )
    secure = {"username": me, "password_file": Path(f"../secrets/{me}.password")}
    secure["tls"] = tls_config
    update: dict[str, object] = {}
    for side in ("upstream", "downstream"):
        link = getattr(node, side)
        if link is not None:
            changes: dict[str, object] = {"broker": link.broker.model_copy(update=secure)}
            if side == "upstream":
                changes["fallbacks"] = [
                    f
                    if f.broker is None
                    else f.model_copy(update={"broker": f.broker.model_copy(update=secure)})
                    for f in link.fallbacks
                ]
            update[side] = link.model_copy(update=changes)
    return node.model_copy(update=update)


def acl_rules(plan: Plan, broker: BrokerPlan) -> tuple[list[AclRule], dict[str, list[AclRule]]]:
    """The ACL of ``broker``: patterns for every user, and each user's own topics."""
    fed = plan.federation
    prefix = f"{topics.ROOT}/{fed}"
    patterns: list[AclRule] = [
        ("write", f"{prefix}/+/up/%u"),  # a delta to a parent, only under one's own name
        ("write", f"{prefix}/%u/status"),  # one's status and Last Will
        ("write", f"{prefix}/%u/metrics"),  # one's metrics record
        ("read", f"{prefix}/%u/ctl"),  # one's control messages
        ("write", f"{prefix}/%u/model/#"),  # an aggregator's model and its chunks
        ("read", f"{prefix}/%u/up/+"),  # an aggregator's children's deltas
        ("write", f"{prefix}/+/join/%u"),  # joining or leaving a parent, under one's own name
        ("read", f"{prefix}/%u/join/+"),  # who joins or leaves an aggregator
    ]
    by_id = {node.node: node for node in plan.nodes}
    users: dict[str, list[AclRule]] = {}
    for user in broker.users:
        node = by_id[user]
        rules: list[AclRule] = []
        upstream = node.upstream
        if upstream is not None:
            for parent in [upstream.parent, *upstream.fallback_ids]:
                there = upstream.broker_of(parent)
                if (there.host, there.port) != (broker.host, broker.port):
                    continue  # that parent's topics are on another broker
                rules.append(("read", topics.model_topic(fed, parent) + "/#"))
                if upstream.fallbacks:  # to see it go offline (its Last Will)
                    rules.append(("read", topics.status_topic(fed, parent)))
        downstream = node.downstream
        adoptees = downstream.adoptees if downstream is not None else []
        for child in [*(downstream.children if downstream is not None else []), *adoptees]:
            rules += [
                ("read", topics.status_topic(fed, child)),
                ("write", topics.ctl_topic(fed, child)),  # a parent stops its children
            ]
        users[user] = rules
    for source in plan.brokers.values():
        if source.bridge_to == broker.name:
            users[source.bridge_user] = [
                ("write" if t.direction == "out" else "read", t.pattern)
                for t in bridge_topics(plan, source)
            ] + [("write", f"$SYS/broker/connection/{source.bridge_user}/state")]
    users[OPERATOR] = [("readwrite", f"{topics.ROOT}/#"), ("read", "$SYS/#")]
    return patterns, users


def bridge_topics(plan: Plan, broker: BrokerPlan) -> tuple[BridgeTopic, ...]:
    """What ``broker``'s bridge forwards: each of its aggregators' topics toward its parent."""
    wanted = (
        topic
        for node, parent in broker.bridged
        for topic in edge_bridge_topics(plan.federation, node, parent)
    )
    return tuple(dict.fromkeys(wanted))  # each aggregator's bridge names all metrics: once


def broker_config(
    plan: Plan,
    broker: BrokerPlan,
    directory: Path,
    *,
    user: str | None = None,
    bridge_password: str | None = None,
) -> BrokerConfig:
    """The Mosquitto settings of ``broker``, its files under ``directory`` (absolute: Mosquitto
    resolves relative paths against its working directory)."""
    tls = None
    if plan.tls:
        tls = ListenerTls(
            cafile=directory / "ca.crt",
            certfile=directory / "server.crt",
            keyfile=directory / "server.key",
            require_certificate=plan.client_certs,
        )
    bridge = None
    if broker.bridge_to is not None:
        target = plan.brokers[broker.bridge_to]
        bridge_tls = None
        if plan.tls:
            bridge_tls = BridgeTls(
                cafile=directory / "ca.crt",
                certfile=directory / "bridge.crt" if plan.client_certs else None,
                keyfile=directory / "bridge.key" if plan.client_certs else None,
            )
        bridge = BridgeConfig(
            name=broker.bridge_user,
            address=target.host,
            port=target.port,
            topics=bridge_topics(plan, broker),
            tls=bridge_tls,
            remote_username=broker.bridge_user,
            remote_password=bridge_password,
        )
    return BrokerConfig(
        host=broker.bind,
        port=broker.port,
        allow_anonymous=False,
        password_file=directory / "passwd",
        acl_file=directory / "acl",
        tls=tls,
        user=user,
        bridge=bridge,
    )


def write_plan(
    config: FederationConfig,
    out: Path,
    *,
    broker: tuple[str, int] | None = None,
    tls: bool = False,
    client_certs: bool = False,
    broker_dir: Path | None = None,
    broker_user: str | None = None,
    force: bool = False,
) -> Plan:
    """Write the plan for ``config`` into ``out`` (see the module docstring) and return it.

    ``broker_dir``: where ``brokers/`` will be on the broker hosts (absolute; default: ``out``'s,
    to start them here). ``broker_user``: the ``user`` Mosquitto switches to when started as
    root (default: whoever runs this, or ``mosquitto`` with a ``broker_dir``). ``ConfigError``
    if ``out`` holds anything and not ``force`` (which replaces only what a plan writes).
    """
    plan = make_plan(config, broker=broker, tls=tls, client_certs=client_certs)
    out = out.absolute()
    if broker_dir is not None and not broker_dir.is_absolute():
        raise ConfigError(f"--broker-dir {broker_dir}: must be absolute (where brokers/ goes)")
    installed = broker_dir or out / "brokers"
    if broker_user is None:
        broker_user = "mosquitto" if broker_dir else pwd.getpwuid(os.geteuid()).pw_name
    _prepare(out, force)
    passwords = {user: pki.new_password() for user in _all_users(plan)}
    for user, password in passwords.items():
        _write(out / "secrets" / f"{user}.password", password + "\n", _PRIVATE)
    ca = _write_pki(plan, out) if plan.tls else None
    for node in plan.nodes:
        text = yaml.safe_dump(_node_document(node), sort_keys=False)
        run = f"hfl-mqtt run --config nodes/{node.node}.yaml"
        header = f"# Node {node.node} of federation {plan.federation} ({node.role}): {run}\n"
        _write(out / "nodes" / f"{node.node}.yaml", header + text, _PUBLIC)
    for b in plan.brokers.values():
        here = out / "brokers" / b.name
        _mkdir(here / "data", _PRIVATE_DIR)
        if ca is not None:
            _write_broker_pki(plan, b, ca, here)
        bridge_password = passwords[b.bridge_user] if b.bridge_to else None
        settings = broker_config(
            plan, b, installed / b.name, user=broker_user, bridge_password=bridge_password
        )
        lines = [pki.password_line(user, passwords[user]) for user in plan.users(b)]
        _write(here / "passwd", "\n".join(lines) + "\n", _PRIVATE)
        patterns, users = acl_rules(plan, b)
        _write(here / "acl", render_user_acl(patterns, users, acl_header(plan, b)), _PUBLIC)
        conf = render_config(
            settings,
            port=b.port,
            persistence_dir=installed / b.name / "data",
            log_file=installed / b.name / "mosquitto.log",
            header=conf_header(plan, b, installed),
        )
        _write(here / "mosquitto.conf", conf, _PRIVATE if bridge_password else _PUBLIC)
        _write(
            here / f"hfl-mqtt-broker-{b.name}.service", systemd_unit(plan, b, installed), _PUBLIC
        )
    _write(out / "START.md", start_md(plan, out, installed, broker_user), _PUBLIC)
    return plan


def _node_document(node: NodeConfig) -> dict[str, Any]:
    """``node`` as YAML data: what differs from the defaults, and always the brokers' address."""
    data = node.model_dump(mode="json", exclude_defaults=True)
    for side in ("upstream", "downstream"):
        link = getattr(node, side)
        if link is not None:
            address = {"host": link.broker.host, "port": link.broker.port}
            data[side]["broker"] = {**address, **data[side].get("broker", {})}
    if node.upstream is not None:
        for entry, dumped in zip(
            node.upstream.fallbacks, data["upstream"].get("fallbacks", []), strict=True
        ):
            if entry.broker is not None:
                address = {"host": entry.broker.host, "port": entry.broker.port}
                dumped["broker"] = {**address, **dumped.get("broker", {})}
    return data


def _all_users(plan: Plan) -> list[str]:
    bridges = [b.bridge_user for b in plan.brokers.values() if b.bridge_to]
    return [*(node.node for node in plan.nodes), *bridges, OPERATOR]


def _prepare(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: not a directory")
    if out.exists() and any(out.iterdir()):
        if not force:
            raise ConfigError(f"--out {out}: not empty; pass --force to replace a plan in it")
        for name in _OUTPUTS:
            path = out / name
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            elif path.exists() or path.is_symlink():
                path.unlink()
    out.mkdir(parents=True, exist_ok=True)
    _mkdir(out / "secrets", _PRIVATE_DIR)


def _mkdir(path: Path, mode: int) -> None:
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(mode)


def _write(path: Path, data: str | bytes, mode: int) -> None:
    """Write ``path`` with ``mode`` from the start (a secret is never readable by others)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    raw = data.encode() if isinstance(data, str) else data
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as file:
        os.fchmod(file.fileno(), mode)  # the umask may have taken bits away
        file.write(raw)


def _write_pki(plan: Plan, out: Path) -> pki.KeyPair:
    ca = pki.new_ca(f"hfl-mqtt {plan.federation} CA")
    _mkdir(out / "pki", _PRIVATE_DIR)
    _write(out / "pki" / "ca.key", ca.key_pem, _PRIVATE)
    _write(out / "certs" / "ca.crt", ca.cert_pem, _PUBLIC)
    if plan.client_certs:
        for user in [node.node for node in plan.nodes] + [OPERATOR]:
            pair = pki.issue(ca, user, usage="client")
            _write(out / "certs" / f"{user}.crt", pair.cert_pem, _PUBLIC)
            _write(out / "secrets" / f"{user}.key", pair.key_pem, _PRIVATE)
    return ca


def _write_broker_pki(plan: Plan, broker: BrokerPlan, ca: pki.KeyPair, here: Path) -> None:
    hosts = (broker.host, "localhost", "127.0.0.1")
    server = pki.issue(ca, broker.host, usage="server", hosts=hosts)
    _write(here / "ca.crt", ca.cert_pem, _PUBLIC)
    _write(here / "server.crt", server.cert_pem, _PUBLIC)
    _write(here / "server.key", server.key_pem, _PRIVATE)
    if plan.client_certs and broker.bridge_to:
        bridge = pki.issue(ca, broker.bridge_user, usage="client")
        _write(here / "bridge.crt", bridge.cert_pem, _PUBLIC)
        _write(here / "bridge.key", bridge.key_pem, _PRIVATE)
