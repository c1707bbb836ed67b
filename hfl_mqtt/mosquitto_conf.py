"""mosquitto.conf and ACL text for a broker of the ``hfl/`` topic scheme (Mosquitto 2.0).

``BrokerConfig`` describes one broker: its listener (plain, or TLS with a CA, a server
certificate and optionally required client certificates), who may connect (anonymous, or the
users of a password file) and what they may do (an ACL file), persistence, and optionally a
bridge (``BridgeConfig``) to a parent broker, over TLS and with its own credentials if asked.
``render_config`` turns it into mosquitto.conf text, ``render_acl`` writes the client-id ACL of
the example files. ``hfl_mqtt.brokers`` re-exports all of it and runs brokers.

Every directive rendered here was checked against Mosquitto 2.0.11 (``man mosquitto.conf``) and
its behaviour on this machine; the quirks found are the comments in the rendered text.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

from hfl_mqtt import topics

__all__ = [
    "BridgeConfig",
    "BridgeTls",
    "BridgeTopic",
    "BrokerConfig",
    "ListenerTls",
    "edge_bridge_topics",
    "example_files",
    "render_acl",
    "render_config",
    "render_user_acl",
]

MiB = 1 << 20
GiB = 1 << 30
# Mosquitto sends max_packet_size to MQTT 5 clients in CONNACK, and paho-mqtt 2.2 drops a CONNACK
# whose Maximum Packet Size exceeds 268435455 as malformed (the connect then times out): 256 MiB
# itself is one byte too many.
_MAX_PACKET_SIZE = 256 * MiB - 1
# A token of mosquitto.conf: the parser splits on spaces and has no quoting.
_Token = Annotated[str, Field(min_length=1, pattern=r"^[^\s\"]+$")]
_Name = Annotated[str, Field(min_length=1, pattern=r"^[^\s/+#$\"]+$")]
_Port = Annotated[int, Field(ge=0, le=65535)]


def _one_token(path: Path) -> Path:
    if not path.parts or any(c.isspace() or c == '"' for c in str(path)):
        raise ValueError(f"{str(path)!r}: mosquitto.conf cannot hold a path with spaces or quotes")
    return path


# A file named in mosquitto.conf: relative ones are relative to the broker's working directory.
_File = Annotated[Path, AfterValidator(_one_token)]
_TlsVersion = Literal["tlsv1.2", "tlsv1.3"]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class BridgeTopic(_Frozen):
    """One ``topic PATTERN DIRECTION QOS`` line of a bridge: what crosses it, which way."""

    pattern: _Token
    direction: Literal["in", "out", "both"] = "out"
    qos: Literal[0, 1, 2] = 1


class BridgeTls(_Frozen):
    """TLS toward the remote broker: the CA that signed its certificate (whose host name must
    match ``address``), and this bridge's own certificate if the remote asks for one."""

    cafile: _File
    certfile: _File | None = None
    keyfile: _File | None = None
    version: _TlsVersion = "tlsv1.2"
    """``bridge_tls_version``: the TLS version of the bridge's connection (Mosquitto's default
    is tlsv1.2)."""

    @model_validator(mode="after")
    def _cert_with_key(self) -> BridgeTls:
        if (self.certfile is None) != (self.keyfile is None):
            raise ValueError("certfile and keyfile go together: give both or neither")
        return self


class ListenerTls(_Frozen):
    """A TLS listener: the broker's certificate and key, the CA its clients' certificates (if
    required) are checked against, and the oldest TLS version it accepts."""

    cafile: _File
    certfile: _File
    keyfile: _File
    require_certificate: bool = False
    """Clients must present a certificate signed by ``cafile`` (their password still counts)."""
    min_version: _TlsVersion = "tlsv1.2"


class BridgeConfig(_Frozen):
    """A bridge from this broker to a parent broker (an edge site to the cloud).

    ``name`` is the connection name and, unless ``remote_clientid`` says otherwise, the client id
    the bridge uses on the remote broker: name it after the edge node so the remote ACL's ``%c``
    patterns pin the bridge to that node's topics.
    """

    name: _Name
    address: _Token
    port: _Port = 1883
    topics: tuple[BridgeTopic, ...] = Field(min_length=1)
    remote_clientid: _Token | None = None
    local_clientid: _Token | None = None
    protocol_version: Literal["mqttv50", "mqttv311", "mqttv31"] = "mqttv50"
    cleansession: bool = False
    attempt_unsubscribe: bool = True
    keepalive_interval: int = Field(default=10, ge=5)
    restart_timeout_base: int = Field(default=1, ge=1)
    restart_timeout_cap: int = Field(default=10, ge=1)
    tls: BridgeTls | None = None
    """None: plain TCP to the remote broker."""
    remote_username: _Token | None = None
    remote_password: _Token | None = None
    """Written into mosquitto.conf as is (Mosquitto reads it from nowhere else): keep that
    file readable by the broker's user only."""

    @model_validator(mode="after")
    def _password_needs_user(self) -> BridgeConfig:
        if self.remote_password is not None and self.remote_username is None:
            raise ValueError("remote_password needs a remote_username")
        return self

    @property
    def remote_id(self) -> str:
        """Client id of the bridge on the remote broker (and in its notification topic)."""
        return self.remote_clientid or self.name

    @property
    def state_topic(self) -> str:
        """Retained ``1``/``0`` the bridge publishes locally when it connects/disconnects."""
        return f"$SYS/broker/connection/{self.remote_id}/state"


class BrokerConfig(_Frozen):
    """One Mosquitto broker. ``port=0`` picks a free port when ``MosquittoBroker`` starts it."""

    host: _Token = "127.0.0.1"
    port: _Port = 0
    persistence: bool = True
    persistence_dir: Path | None = None
    autosave_interval: int = Field(default=10, ge=0)
    autosave_on_changes: bool = False
    max_packet_size: int = Field(default=_MAX_PACKET_SIZE, ge=20, le=_MAX_PACKET_SIZE)
    max_queued_messages: int = Field(default=100_000, ge=0)
    max_queued_bytes: int = Field(default=1 * GiB, ge=0)
    persistent_client_expiration: str | None = "1h"
    sys_interval: int = Field(default=1, ge=0)
    allow_anonymous: bool = True
    password_file: _File | None = None
    """Users and their password hashes (mosquitto_passwd format); reloaded on SIGHUP."""
    acl_file: _File | None = None
    tls: ListenerTls | None = None
    """None: plain TCP."""
    user: _Token | None = None
    bridge: BridgeConfig | None = None

    @field_validator("persistent_client_expiration")
    @classmethod
    def _check_expiration(cls, value: str | None) -> str | None:
        # 2.0.11 knows h, d, w, m (month!) and y only: "60s" or "30min" stop the broker.
        if value is not None and not re.fullmatch(r"[1-9][0-9]*[hdwmy]", value):
            msg = f"{value!r}: want an integer and one of h d w m y (m is months), e.g. '1h'"
            raise ValueError(msg)
        return value


def edge_bridge_topics(federation: str, edge: str, parent: str) -> list[BridgeTopic]:
    """What a bridged edge broker forwards: edge ``E`` under parent ``P`` in federation ``F``.

    Out: ``E``'s delta to ``P``, ``E``'s status, and the metrics record of every node on the
    edge broker (``hfl/F/+/metrics``: a monitor on the root's broker sees the whole tree, workers
    included). In: ``P``'s model (with its retained chunks, ``model/#`` also matches ``model``
    itself) and control messages for ``E``. Workers' deltas under ``hfl/F/E/`` stay on the edge
    broker.

    The metrics pattern cannot loop: it only goes out, each broker bridges to one parent broker
    (bridges form a tree rooted at the root's broker), and no bridge takes metrics in, so a
    record only ever moves toward the root's broker, one hop per bridge.
    """
    for value, what in ((federation, "federation"), (edge, "edge"), (parent, "parent")):
        topics.check_id(value, what)
    return [
        BridgeTopic(pattern=topics.up_topic(federation, parent, edge), direction="out"),
        BridgeTopic(pattern=topics.model_topic(federation, parent) + "/#", direction="in"),
        BridgeTopic(pattern=topics.status_topic(federation, edge), direction="out"),
        BridgeTopic(pattern=topics.ctl_topic(federation, edge), direction="in"),
        BridgeTopic(pattern=topics.metrics_filter(federation), direction="out"),
    ]


def _bool(value: bool) -> str:
    return "true" if value else "false"


def _commented(text: str) -> list[str]:
    return [f"# {line}".rstrip() for line in text.strip("\n").splitlines()]


def render_config(
    config: BrokerConfig,
    *,
    port: int,
    persistence_dir: Path | str,
    log_file: Path | str,
    header: str = "",
) -> str:
    """mosquitto.conf text for ``config``; ``header`` becomes a leading comment block."""
    lines = [*_commented(header), ""] if header else []
    lines += [
        "# Rendered by hfl_mqtt.brokers.render_config from a BrokerConfig.",
        *(["", f"user {config.user}"] if config.user else []),
        "",
        f"listener {port} {config.host}",
        *(_render_listener_tls(config.tls) if config.tls else []),
        f"allow_anonymous {_bool(config.allow_anonymous)}",
        *([f"password_file {config.password_file}"] if config.password_file else []),
        *([f"acl_file {config.acl_file}"] if config.acl_file else []),
        "",
        "# Without it a small QoS 1 round trip takes ~40 ms (Nagle's algorithm vs delayed ACKs).",
        "set_tcp_nodelay true",
        "# Larger packets (payload + topic + header) make the broker disconnect the sender.",
        f"max_packet_size {config.max_packet_size}",
        "# The default queue is 1000 QoS 1/2 messages of any size per client, then silent drops.",
        f"max_queued_messages {config.max_queued_messages}",
        f"max_queued_bytes {config.max_queued_bytes}",
    ]
    if config.persistent_client_expiration:
        lines += [
            "# Caps every session's expiry, MQTT 5 ones included (the smaller wins); without",
            "# it an MQTT 3.1.1 clean-session-false session never expires. Units: h d w m(onth) y.",
            f"persistent_client_expiration {config.persistent_client_expiration}",
        ]
    lines += [
        f"sys_interval {config.sys_interval}",
        "",
        f"persistence {_bool(config.persistence)}",
    ]
    if config.persistence:
        lines += [
            f"persistence_location {str(persistence_dir).rstrip('/')}/",
            "# The database is written only at these saves and on a clean exit: a crash loses",
            "# what changed since the last save.",
            f"autosave_interval {config.autosave_interval}",
            f"autosave_on_changes {_bool(config.autosave_on_changes)}",
        ]
    lines += [
        "",
        f"log_dest file {log_file}",
        "# One type per line: 2.0.11 reads only the first word of a log_type line.",
        "log_type error",
        "log_type warning",
        "log_type notice",
        "log_type information",
        "log_timestamp_format %Y-%m-%dT%H:%M:%S",
    ]
    if config.bridge:
        lines += ["", *_render_bridge(config.bridge)]
    return "\n".join(lines) + "\n"


def _render_listener_tls(tls: ListenerTls) -> list[str]:
    return [
        f"cafile {tls.cafile}",
        f"certfile {tls.certfile}",
        f"keyfile {tls.keyfile}",
        f"require_certificate {_bool(tls.require_certificate)}",
        "# The oldest version accepted (since 2.0; 1.6 took it as the only one).",
        f"tls_version {tls.min_version}",
    ]


def _render_bridge_auth(bridge: BridgeConfig) -> list[str]:
    lines = []
    if bridge.remote_username:
        lines.append(f"remote_username {bridge.remote_username}")
    if bridge.remote_password:
        lines.append(f"remote_password {bridge.remote_password}")
    tls = bridge.tls
    if tls is not None:
        lines += [
            f"bridge_cafile {tls.cafile}",
            *([f"bridge_certfile {tls.certfile}"] if tls.certfile else []),
            *([f"bridge_keyfile {tls.keyfile}"] if tls.keyfile else []),
            "# Check that the remote certificate names the host in 'address'.",
            "bridge_insecure false",
            f"bridge_tls_version {tls.version}",
        ]
    return lines


def _render_bridge(bridge: BridgeConfig) -> list[str]:
    lines = ["# Everything below belongs to the bridge: keep it last."]
    if bridge.protocol_version == "mqttv50" and not bridge.cleansession:
        lines += [
            "# 2.0.11 sends no Session Expiry Interval on an MQTT 5 bridge, so the remote broker",
            "# ends the bridge's session at each disconnect: 'in' messages published meanwhile",
            "# are lost (retained ones come back on resubscribe). mqttv311 keeps the session.",
        ]
    return [
        *lines,
        f"connection {bridge.name}",
        f"address {bridge.address}:{bridge.port}",
        f"bridge_protocol_version {bridge.protocol_version}",
        f"remote_clientid {bridge.remote_id}",
        f"local_clientid {bridge.local_clientid or 'local.' + bridge.remote_id}",
        f"cleansession {_bool(bridge.cleansession)}",
        f"bridge_attempt_unsubscribe {_bool(bridge.attempt_unsubscribe)}",
        "notifications true",
        f"keepalive_interval {bridge.keepalive_interval}",
        f"restart_timeout {bridge.restart_timeout_base} {bridge.restart_timeout_cap}",
        *_render_bridge_auth(bridge),
        *(f"topic {t.pattern} {t.direction} {t.qos}" for t in bridge.topics),
    ]


def render_acl(header: str = "") -> str:
    """An ACL file pinning each client id to its own topics of the ``hfl/`` scheme.

    ``%c`` is the client id: a device may publish only as itself. Client ids are not a
    credential, so on an untrusted network add a ``password_file`` and use ``%u`` instead.
    """
    lines = [*_commented(header), ""] if header else []
    lines += [
        "# Rendered by hfl_mqtt.brokers.render_acl.",
        "# Anonymous clients (topic lines before any user line): read the models, statuses and",
        "# metrics records of the federation and the broker's $SYS counters.",
        "topic read hfl/+/+/model/#",
        "topic read hfl/+/+/status",
        "topic read hfl/+/+/metrics",
        "topic read $SYS/broker/#",
        "# A parent stops its children through their control topics; an ACL cannot name a",
        "# node's parent, so any client may write them. On an untrusted network, give the",
        "# aggregators a password_file user with this right instead.",
        "topic write hfl/+/+/ctl",
        "",
        "# A child sends its delta to any parent only under its own id.",
        "pattern write hfl/+/+/up/%c",
        "# A node publishes its own status (and Last Will) and reads its own control topic.",
        "pattern write hfl/+/%c/status",
        "pattern read hfl/+/%c/ctl",
        "# A node keeps its own metrics record (retained). A bridge named after its edge brings",
        "# its own; for the workers' too, give the bridge a password_file user with",
        "# `topic write hfl/+/+/metrics` (hfl-mqtt plan does).",
        "pattern write hfl/+/%c/metrics",
        "# An aggregator publishes its own model (and its retained chunks, model/chunk/{i})",
        "# and reads its children's deltas.",
        "pattern write hfl/+/%c/model/#",
        "pattern read hfl/+/%c/up/+",
        "# A bridge named after its edge node reports its connection state.",
        "pattern write $SYS/broker/connection/%c/state",
        "",
        "# The operator (a password_file user) may control and watch every node.",
        "user hfl-operator",
        "topic readwrite hfl/#",
    ]
    return "\n".join(lines) + "\n"


AclAccess = Literal["read", "write", "readwrite", "deny"]
AclRule = tuple[AclAccess, str]
"""``(access, topic filter)``: one ``topic`` (or ``pattern``) line of an ACL file."""


def render_user_acl(
    patterns: Sequence[AclRule],
    users: Mapping[str, Sequence[AclRule]],
    header: str = "",
) -> str:
    """An ACL file for a broker with a password file: ``patterns`` (with ``%u``) apply to
    every user, ``users`` adds each user's own ``topic`` lines. No line comes before the first
    ``user`` line, so anonymous clients (if allowed at all) may do nothing."""
    lines = [*_commented(header), ""] if header else []
    for user, rules in (("(patterns)", patterns), *users.items()):
        if not user or any(c.isspace() for c in user):
            raise ValueError(f"ACL user {user!r}: empty or with spaces")
        for _, topic in rules:
            if not topic or any(c.isspace() for c in topic):
                raise ValueError(f"ACL topic {topic!r} of {user}: empty or with spaces")
    for _, topic in patterns:
        if "%u" not in topic and "%c" not in topic:
            # 2.0.11 warns at start for such a line: it is the same for everyone.
            raise ValueError(f"ACL pattern {topic!r} has no %u or %c")
    lines += [
        "# Rendered by hfl_mqtt.mosquitto_conf.render_user_acl.",
        "# Every user, its own topics (%u: the user name; a node's user is named after it).",
        *(f"pattern {access} {topic}" for access, topic in patterns),
    ]
    for user, rules in users.items():
        lines += ["", f"user {user}", *(f"topic {access} {topic}" for access, topic in rules)]
    return "\n".join(lines) + "\n"


_EXAMPLE_HEADERS = {
    "single.conf": """\
One broker for a whole federation on one machine (a local run, a demo, a lab).
Loopback only, anonymous, persistent. Port 1884 so it can run beside a system
Mosquitto on 1883. Start it as a normal user (as root, Mosquitto switches to the
"mosquitto" user, who cannot write here):
    mkdir -p /tmp/hfl-mqtt/single && mosquitto -c brokers/single.conf
Regenerate: python -m hfl_mqtt.brokers brokers/""",
    "cloud.conf": """\
The cloud (root) broker: every interface, port 1883, persistent, ACL from acl.conf.
Edge brokers bridge into it (see edge-bridged.conf); each bridge connects with
its edge node's name as client id, so the ACL's %c rules pin it to its topics.
Install acl.conf as /etc/hfl-mqtt/acl.conf.
Regenerate: python -m hfl_mqtt.brokers brokers/""",
    "edge-bridged.conf": """\
An edge site's broker, bridged to the cloud broker at cloud.example.net:1883.
Edge node "edge-1" (parent "cloud", federation "demo") and its workers talk to
this broker; the bridge (MQTT 5) forwards only
  out: hfl/demo/cloud/up/edge-1   hfl/demo/edge-1/status   hfl/demo/+/metrics
  in:  hfl/demo/cloud/model/#     hfl/demo/edge-1/ctl
(model/# is the model and its retained chunks model/chunk/{i}; +/metrics: every
node's metrics record, for a monitor on the cloud broker)
so workers' deltas under hfl/demo/edge-1/ never leave the site.
Regenerate: python -m hfl_mqtt.brokers brokers/""",
    "acl.conf": """\
ACL for a broker of the hfl/{federation}/{node}/... topic scheme (acl_file).
  hfl/F/N/model       retained, N's current model, read by N's children
  hfl/F/N/up/C        child C's delta to parent N
  hfl/F/N/status      retained, N's status and Last Will
  hfl/F/N/ctl         control messages for N
  hfl/F/N/metrics     retained, N's metrics record (read by anyone)
%c is the client id: each device must connect with its node name as client id.
Regenerate: python -m hfl_mqtt.brokers brokers/""",
}


def example_files() -> dict[str, str]:
    """The documented example files of ``brokers/``, by file name (a test keeps them in sync)."""
    edge = BrokerConfig(
        host="0.0.0.0",
        port=1883,
        bridge=BridgeConfig(
            name="edge-1",
            address="cloud.example.net",
            topics=tuple(edge_bridge_topics("demo", "edge-1", "cloud")),
        ),
    )
    cloud = BrokerConfig(host="0.0.0.0", port=1883, acl_file=Path("/etc/hfl-mqtt/acl.conf"))
    single_dir = "/tmp/hfl-mqtt/single"
    rendered = {
        "single.conf": (BrokerConfig(port=1884), single_dir, f"{single_dir}/mosquitto.log"),
        "cloud.conf": (cloud, "/var/lib/hfl-mqtt/cloud", "/var/log/hfl-mqtt/cloud.log"),
        "edge-bridged.conf": (edge, "/var/lib/hfl-mqtt/edge-1", "/var/log/hfl-mqtt/edge-1.log"),
    }
    files = {
        name: render_config(
            config,
            port=config.port,
            persistence_dir=data,
            log_file=log,
            header=_EXAMPLE_HEADERS[name],
        )
        for name, (config, data, log) in rendered.items()
    }
    files["acl.conf"] = render_acl(_EXAMPLE_HEADERS["acl.conf"])
    return files
