"""The texts of a plan (``hfl-mqtt plan``) for people: START.md (what to copy to which host,
the commands to run there), the comment headers of broker files, a broker's systemd unit.

Written from the plan itself, so every path, host, port and user in it is the plan's.
"""

from __future__ import annotations

import shlex
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from hfl_mqtt import topics
from hfl_mqtt.deployment import OPERATOR, DeploymentConfig

if TYPE_CHECKING:
    from hfl_mqtt.plan import BrokerPlan, Plan

__all__ = ["acl_header", "conf_header", "files_of", "hosts_of", "start_md", "systemd_unit"]

_LOOPBACK = ("127.0.0.1", "localhost", "::1")


def hosts_of(plan: Plan) -> dict[str | None, list[str]]:
    """Nodes by the host that runs them (``deployment.hosts``); None: placed nowhere."""
    deployment = plan.config.deployment or DeploymentConfig()
    placed: dict[str | None, list[str]] = {host: [] for host in deployment.hosts}
    for node in plan.nodes:
        placed.setdefault(deployment.host_of(node.node), []).append(node.node)
    return placed


def files_of(plan: Plan, nodes: Iterable[str]) -> list[str]:
    """The files (relative to the plan's directory) a host running ``nodes`` needs, once each."""
    return list(dict.fromkeys(f for node in nodes for f in plan.node_files(node)))


def _block(*lines: str) -> list[str]:
    return ["```", *lines, "```", ""]


def _client_options(plan: Plan, broker: BrokerPlan) -> str:
    """mosquitto_sub/pub options to log in as the operator on ``broker``."""
    password = f'"$(cat secrets/{OPERATOR}.password)"'
    options = f"-h {broker.host} -p {broker.port} -u {OPERATOR} -P {password}"
    if plan.tls:
        options += " --cafile certs/ca.crt"
    if plan.client_certs:
        options += f" --cert certs/{OPERATOR}.crt --key secrets/{OPERATOR}.key"
    return options


def _files_table(plan: Plan) -> list[str]:
    rows = [
        ("`nodes/NODE.yaml`", "a node's config (`hfl-mqtt run --config`)", "the node's host"),
        ("`secrets/USER.password`", "a broker user's password (0600)", "that user's host only"),
    ]
    if plan.tls:
        rows.append(("`certs/ca.crt`", "the fleet's private CA (public)", "every host"))
    if plan.client_certs:
        rows += [
            ("`certs/USER.crt`", "a user's client certificate", "that user's host"),
            ("`secrets/USER.key`", "its private key (0600)", "that user's host only"),
        ]
    if plan.tls:
        rows.append(("`pki/ca.key`", "the CA's private key", "nowhere: keep it offline"))
    rows.append(("`brokers/NAME/`", "a broker: config, users, ACL, keys", "the broker's host"))
    return [
        "| path | what | copy to |",
        "|---|---|---|",
        *(f"| {path} | {what} | {where} |" for path, what, where in rows),
        "",
    ]


def _broker_section(
    plan: Plan, broker: BrokerPlan, installed: Path, local: bool, user: str
) -> list[str]:
    role = f"bridged to {broker.bridge_to}" if broker.bridge_to else "the root's broker"
    conf = installed / broker.name / "mosquitto.conf"
    unit = f"hfl-mqtt-broker-{broker.name}"
    lines = [
        f"### {broker.name}: {role}, at {broker.host}:{broker.port}",
        "",
        f"Listens on {broker.bind}:{broker.port}"
        + (" (TLS 1.2 or later)" if plan.tls else " (plain TCP)")
        + ("; clients must present a certificate of the fleet's CA" if plan.client_certs else "")
        + f". Users: {', '.join(plan.users(broker))}.",
        "",
    ]
    if broker.bridged:
        crossing = ", ".join(f"{node} (to {parent})" for node, parent in broker.bridged)
        lines += [
            f"Its bridge logs in to {broker.bridge_to} as `{broker.bridge_user}` and carries the "
            f"traffic of {crossing}; workers' deltas stay on this broker.",
            "",
        ]
    if local:
        lines += ["Start it on this machine, as written:", "", *_block(f"mosquitto -c {conf}")]
        return lines
    lines += [
        f"On {broker.host}, with Mosquitto 2.0 installed (`apt-get install mosquitto`; its "
        "packaged service listens on 1883: `systemctl disable --now mosquitto` if that is in "
        "the way), put this broker's directory where its config names its files, "
        f"{installed / broker.name}:",
        "",
        *_block(
            "# from this directory",
            f"rsync -a brokers/{broker.name}/ root@{broker.host}:{installed / broker.name}/",
            f"# on {broker.host}",
            f"chown -R {user}: {installed / broker.name}",
            f"cp {installed / broker.name / unit}.service /etc/systemd/system/",
            f"systemctl daemon-reload && systemctl enable --now {unit}",
        ),
        f"Mosquitto starts as root and switches to user `{user}`, which must own the directory. "
        f"Its log: `{installed / broker.name / 'mosquitto.log'}`; by hand: `mosquitto -c {conf}`.",
        "",
    ]
    return lines


def _node_section(plan: Plan, host: str | None, nodes: list[str]) -> list[str]:
    if host is None:  # one archive per node, made by a loop over the nodes
        files = " ".join(f.replace("NODE", "$n") for f in plan.node_files("NODE"))
        return [
            "### Nodes placed on no host (`deployment.hosts`)",
            "",
            f"{', '.join(nodes)}: an archive each (its own files only, the layout kept so the "
            "relative paths in its node file still hold); copy `NODE.tgz` to the node's host "
            "and start it there:",
            "",
            *_block(
                "# from this directory",
                f"for n in {' '.join(nodes)}; do tar -czf $n.tgz {files}; done",
                "# on the node's host",
                "mkdir -p hfl-plan && tar -xzf NODE.tgz -C hfl-plan && chmod 700 hfl-plan/secrets",
                "hfl-mqtt run --config hfl-plan/nodes/NODE.yaml",
            ),
        ]
    files = " ".join(shlex.quote(f) for f in files_of(plan, nodes))
    configs = " ".join(f"--config hfl-plan/nodes/{node}.yaml" for node in nodes)
    return [
        f"### {host}: {', '.join(nodes)}",
        "",
        "Copy its files (the archive keeps the layout, so the relative paths in the node files "
        "still hold) and start:",
        "",
        *_block(
            "# from this directory",
            f"tar -czf {host}.tgz {files}",
            f"scp {host}.tgz {host}:",
            f"# on {host}",
            f"mkdir -p hfl-plan && tar -xzf {host}.tgz -C hfl-plan && chmod 700 hfl-plan/secrets",
            f"hfl-mqtt run {configs}",
        ),
    ]


def _watch_section(plan: Plan) -> list[str]:
    fed = plan.federation
    root = plan.root_broker
    lines = [
        "## 3. Watch and stop",
        "",
        f"As the operator (`{OPERATOR}`, may read and write everything under `hfl/`), from "
        f"this directory: the status (retained) of every node on {root.name}'s broker, then "
        "stop a node (an aggregator stops its children first; stopping the root ends the "
        "federation):",
        "",
        *_block(
            f"mosquitto_sub {_client_options(plan, root)} -v -t '{topics.status_topic(fed, '+')}'",
            f"mosquitto_pub {_client_options(plan, root)} -q 1 "
            f'-t {topics.ctl_topic(fed, "NODE")} -m \'{{"cmd": "stop"}}\'',
        ),
    ]
    sites = [b for b in plan.brokers.values() if b.bridge_to is not None]
    if sites:
        lines += [
            "A site's workers talk to their site's broker only: watch or stop them there "
            "(the same commands with its host and port): "
            + "; ".join(f"{b.name} ({b.host}:{b.port}): {', '.join(b.users)}" for b in sites)
            + ".",
            "",
        ]
    return lines


def start_md(plan: Plan, out: Path, installed: Path, broker_user: str) -> str:
    """The text of START.md for ``plan`` written to ``out``, its brokers installed under
    ``installed`` (``out/brokers`` unless ``--broker-dir``), run as ``broker_user``."""
    fed = plan.federation
    local = installed == out / "brokers"
    security = "TLS with a private CA" if plan.tls else "plain TCP (no TLS: a trusted network only)"
    if plan.client_certs:
        security += " and client certificates"
    lines = [
        f"# Running federation {fed}",
        "",
        f"Written by `hfl-mqtt plan`: {len(plan.nodes)} nodes, {len(plan.brokers)} broker(s), "
        f"{security}, a password per broker user. Paths are relative to this directory "
        f"({out}). See docs/deployment.md for the whole procedure.",
        "",
        *_files_table(plan),
        "A host gets only its own nodes' secrets: never copy `secrets/` whole.",
        "",
        "## 1. Brokers (start them first)",
        "",
    ]
    if local:
        lines += [
            "The broker configs name their files by absolute path under "
            f"{installed}, so they start as written on this machine. To install them "
            "elsewhere, plan again with `--broker-dir /etc/hfl-mqtt/brokers` (and copy "
            "`brokers/NAME/` there).",
            "",
        ]
    for broker in plan.brokers.values():
        lines += _broker_section(plan, broker, installed, local, broker_user)
    lines += [
        "## 2. Nodes",
        "",
        "Each host needs Python 3.11 or later and hfl-mqtt (`pip install` a checkout or a wheel "
        "of it). Start order does not matter within a run: a worker trains on its parent's "
        "retained model whenever it arrives; the root ends the federation after its rounds and "
        "every node stops. Aggregators checkpoint into their state directory and `hfl-mqtt run` "
        "resumes from it: one restarted after a crash goes on where it was "
        "(docs/durability.md). A finished root started again stops its subtree again; raise "
        "`rounds` to train further, or start over with `hfl-mqtt run --fresh` on every "
        "aggregator, root first (an edge that still holds the last run's model refuses a "
        "fresh root's first versions as stale).",
        "",
        "To run a node as a systemd service instead of `hfl-mqtt run` (from an hfl-mqtt "
        "checkout on the host; it copies the secrets the node file names, see "
        "device_agents/README.md):",
        "",
        *_block(
            "sudo device_agents/install.sh hfl-plan/nodes/NODE.yaml",
            "journalctl -u hfl-mqtt@NODE -o cat -f",
        ),
    ]
    for host, nodes in hosts_of(plan).items():
        if nodes:
            lines += _node_section(plan, host, nodes)
    if local and all(b.host in _LOOPBACK for b in plan.brokers.values()):
        lines += [
            "### Everything on this machine",
            "",
            "With the brokers started as above, from this directory:",
            "",
            *_block("hfl-mqtt run --config nodes/*.yaml"),
        ]
    lines += _watch_section(plan)
    lines += [
        "## 4. A lost device",
        "",
        "Its password is what lets it in: delete its user from the password file of each "
        "broker it uses, then make the broker reread it (SIGHUP; a connected session of that "
        "user is closed):",
        "",
        *_block(
            f"mosquitto_passwd -D {installed}/BROKER/passwd NODE",
            "systemctl reload hfl-mqtt-broker-BROKER     # or: kill -HUP <mosquitto's pid>",
        ),
        "For a replacement, add the user again with a new password (`mosquitto_passwd "
        f"{installed}/BROKER/passwd NODE`), put that password in the new device's "
        "`secrets/NODE.password`, reload; or plan again (new secrets for everyone).",
        "",
    ]
    return "\n".join(lines)


def conf_header(plan: Plan, broker: BrokerPlan, installed: Path) -> str:
    where = f"{broker.host}:{broker.port}" + (" (TLS)" if plan.tls else "")
    role = f"bridged to {broker.bridge_to}" if broker.bridge_to else "the root's broker"
    return (
        f"Broker {broker.name} of federation {plan.federation}, {role}; clients reach it at "
        f"{where}.\nWritten by hfl-mqtt plan; every path below is where this directory is on "
        f"the broker's host.\nStart: mosquitto -c {installed / broker.name / 'mosquitto.conf'}"
    )


def acl_header(plan: Plan, broker: BrokerPlan) -> str:
    return (
        f"Who may do what on broker {broker.name} of federation {plan.federation} (hfl-mqtt "
        "plan).\nEvery user must log in (allow_anonymous false); a node's user is its node id."
    )


def systemd_unit(plan: Plan, broker: BrokerPlan, installed: Path) -> str:
    conf = installed / broker.name / "mosquitto.conf"
    return (
        "[Unit]\n"
        f"Description=hfl-mqtt broker {broker.name} of federation {plan.federation} (Mosquitto)\n"
        "After=network-online.target\nWants=network-online.target\n\n"
        "[Service]\n"
        f"ExecStart=/usr/sbin/mosquitto -c {conf}\n"
        "# SIGHUP: reread the password file and the ACL (a revoked user is out at once).\n"
        "ExecReload=/bin/kill -HUP $MAINPID\n"
        "Restart=on-failure\nRestartSec=2\n\n"
        "[Install]\nWantedBy=multi-user.target\n"
    )
