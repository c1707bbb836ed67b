"""Private Mosquitto brokers for runs and tests: render mosquitto.conf, start, crash, restart.

A federation needs a broker per site (or one shared); tests need many short-lived ones that never
touch a system Mosquitto. ``BrokerConfig`` describes one broker (optionally bridged to a parent
broker), ``render_config`` turns it into mosquitto.conf text, and ``MosquittoBroker`` runs it on a
free loopback port in a private work directory::

    async with MosquittoBroker(BrokerConfig()) as broker:
        async with aiomqtt.Client(broker.host, broker.port) as client:
            ...

Every directive rendered here was checked against Mosquitto 2.0.11 (``man mosquitto.conf``) and
its behaviour on this machine; the quirks found are the comments in the rendered text.
"""

from __future__ import annotations

import asyncio
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Annotated, Literal, Self

import aiomqtt
from pydantic import BaseModel, ConfigDict, Field, field_validator

from hfl_mqtt import topics
from hfl_mqtt.errors import BrokerError

__all__ = [
    "BridgeConfig",
    "BridgeTopic",
    "BrokerConfig",
    "MosquittoBroker",
    "edge_bridge_topics",
    "example_files",
    "find_mosquitto",
    "free_port",
    "read_sys_bytes",
    "render_acl",
    "render_config",
]

MiB = 1 << 20
GiB = 1 << 30
# Mosquitto sends max_packet_size to MQTT 5 clients in CONNACK, and paho-mqtt 2.2 drops a CONNACK
# whose Maximum Packet Size exceeds 268435455 as malformed (the connect then times out): 256 MiB
# itself is one byte too many.
_MAX_PACKET_SIZE = 256 * MiB - 1
_LOG_TAIL_LINES = 30
# A token of mosquitto.conf: the parser splits on spaces and has no quoting.
_Token = Annotated[str, Field(min_length=1, pattern=r"^[^\s\"]+$")]
_Name = Annotated[str, Field(min_length=1, pattern=r"^[^\s/+#$\"]+$")]
_Port = Annotated[int, Field(ge=0, le=65535)]
_SYS_TOPICS = (
    "bytes/received",
    "bytes/sent",
    "messages/received",
    "messages/sent",
    "publish/bytes/received",
    "publish/bytes/sent",
    "publish/messages/received",
    "publish/messages/sent",
    "publish/messages/dropped",
)


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class BridgeTopic(_Frozen):
    """One ``topic PATTERN DIRECTION QOS`` line of a bridge: what crosses it, which way."""

    pattern: _Token
    direction: Literal["in", "out", "both"] = "out"
    qos: Literal[0, 1, 2] = 1


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
    acl_file: Path | None = None
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

    Out: ``E``'s delta to ``P`` and ``E``'s status. In: ``P``'s model (with its retained chunks,
    ``model/#`` also matches ``model`` itself) and control messages for ``E``. Workers' traffic
    under ``hfl/F/E/`` stays on the edge broker.
    """
    for value, what in ((federation, "federation"), (edge, "edge"), (parent, "parent")):
        topics.check_id(value, what)
    return [
        BridgeTopic(pattern=topics.up_topic(federation, parent, edge), direction="out"),
        BridgeTopic(pattern=topics.model_topic(federation, parent) + "/#", direction="in"),
        BridgeTopic(pattern=topics.status_topic(federation, edge), direction="out"),
        BridgeTopic(pattern=topics.ctl_topic(federation, edge), direction="in"),
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
        f"allow_anonymous {_bool(config.allow_anonymous)}",
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
        "# Anonymous clients (topic lines before any user line): read the models and statuses",
        "# of the federation and the broker's $SYS counters.",
        "topic read hfl/+/+/model/#",
        "topic read hfl/+/+/status",
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
  out: hfl/demo/cloud/up/edge-1   hfl/demo/edge-1/status
  in:  hfl/demo/cloud/model/#     hfl/demo/edge-1/ctl
(model/# is the model and its retained chunks model/chunk/{i})
so workers' deltas under hfl/demo/edge-1/ never leave the site.
Regenerate: python -m hfl_mqtt.brokers brokers/""",
    "acl.conf": """\
ACL for a broker of the hfl/{federation}/{node}/... topic scheme (acl_file).
  hfl/F/N/model       retained, N's current model, read by N's children
  hfl/F/N/up/C        child C's delta to parent N
  hfl/F/N/status      retained, N's status and Last Will
  hfl/F/N/ctl         control messages for N
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


def find_mosquitto() -> str | None:
    """Path of the ``mosquitto`` binary: ``PATH`` first, then /usr/sbin (not on users' PATH)."""
    found = shutil.which("mosquitto")
    if found:
        return found
    fallback = "/usr/sbin/mosquitto"
    return fallback if os.access(fallback, os.X_OK) else None


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` right now (another process may still take it first)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def _tail(path: Path, lines: int = _LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


class MosquittoBroker:
    """A private ``mosquitto`` process: started, stopped, crashed and restarted on demand.

    Its config, database and logs live in ``workdir`` (a temporary directory by default, removed
    by ``close()`` or on leaving the context). ``restart()`` keeps the port and the database, so
    a test can kill the broker mid-run and bring it back. The methods block for at most their
    timeouts; the async context manager runs them in a thread.
    """

    def __init__(
        self,
        config: BrokerConfig | None = None,
        workdir: Path | None = None,
        *,
        executable: str | None = None,
        start_timeout: float = 10.0,
        stop_timeout: float = 5.0,
    ) -> None:
        self.config = config or BrokerConfig()
        self._executable = executable
        self._owns_workdir = workdir is None
        self._workdir = workdir.resolve() if workdir is not None else None
        self._start_timeout = start_timeout
        self._stop_timeout = stop_timeout
        self._port = self.config.port
        self._process: subprocess.Popen[bytes] | None = None

    # -- properties -------------------------------------------------------------------------

    @property
    def host(self) -> str:
        return self.config.host

    @property
    def port(self) -> int:
        if not self._port:
            msg = "the broker has no port yet: start() it first"
            raise BrokerError(msg)
        return self._port

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def workdir(self) -> Path:
        if self._workdir is None:
            self._workdir = Path(tempfile.mkdtemp(prefix="hfl-mosquitto-"))
        return self._workdir

    @property
    def log_path(self) -> Path:
        return self.workdir / "mosquitto.log"

    @property
    def config_path(self) -> Path:
        return self.workdir / "mosquitto.conf"

    @property
    def persistence_dir(self) -> Path:
        return self.config.persistence_dir or self.workdir / "data"

    def log_tail(self, lines: int = _LOG_TAIL_LINES) -> str:
        """The last lines of the broker's log and of its stderr (errors before the log opens)."""
        stderr = _tail(self.workdir / "stderr.txt", lines)
        log = _tail(self.log_path, lines)
        return "\n".join(part for part in (stderr, log) if part)

    # -- lifecycle --------------------------------------------------------------------------

    def start(self) -> None:
        """Render the config, spawn ``mosquitto -c``, and wait until the port accepts TCP."""
        if self.running:
            msg = f"broker already running (pid {self.pid})"
            raise BrokerError(msg)
        executable = self._executable or find_mosquitto()
        if executable is None:
            msg = "mosquitto not found on PATH nor at /usr/sbin/mosquitto"
            raise BrokerError(msg)
        # A port picked by free_port() may be taken before mosquitto binds it: pick again.
        attempts = 3 if self._port == 0 else 1
        for attempt in range(attempts):
            if self._port == 0 or (attempt and self.config.port == 0):
                self._port = free_port(self.host)
            try:
                self._spawn(executable)
                return
            except BrokerError:
                if attempt + 1 == attempts or "Address already in use" not in self.log_tail():
                    raise

    def _spawn(self, executable: str) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)  # again, after a close()
        self.persistence_dir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(self._render())
        log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with (self.workdir / "stderr.txt").open("ab") as stderr:
            process = subprocess.Popen(
                [executable, "-c", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=stderr,
                stderr=stderr,
                cwd=self.workdir,
            )
        self._process = process
        deadline = time.monotonic() + self._start_timeout
        # The port alone proves nothing: another process may hold it while ours fails to bind.
        while not (self._logged_running(log_offset) and self._accepts_tcp()):
            if process.poll() is not None:
                self._process = None
                msg = (
                    f"mosquitto exited with code {process.returncode} at start; "
                    f"log tail:\n{self.log_tail()}"
                )
                raise BrokerError(msg)
            if time.monotonic() > deadline:
                self._signal_and_wait(signal.SIGKILL, None)
                msg = (
                    f"mosquitto did not accept connections on {self.host}:{self.port} within "
                    f"{self._start_timeout} s; log tail:\n{self.log_tail()}"
                )
                raise BrokerError(msg)
            time.sleep(0.005)

    def _logged_running(self, offset: int) -> bool:
        try:
            with self.log_path.open("rb") as log:
                log.seek(offset)
                return b" running\n" in log.read()
        except FileNotFoundError:
            return False

    def _accepts_tcp(self) -> bool:
        try:
            with socket.create_connection((self._connect_host, self.port), 0.5):
                return True
        except OSError:
            return False

    def _render(self) -> str:
        config = self.config
        if config.user is None and os.geteuid() == 0:
            # Run as root, mosquitto switches to user "mosquitto", who cannot write our workdir.
            config = config.model_copy(update={"user": pwd.getpwuid(os.geteuid()).pw_name})
        return render_config(
            config, port=self.port, persistence_dir=self.persistence_dir, log_file=self.log_path
        )

    @property
    def _connect_host(self) -> str:
        return "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host

    def stop(self) -> None:
        """SIGTERM (the broker saves its database), then SIGKILL after ``stop_timeout``."""
        if self._process is None:
            return
        try:
            self._signal_and_wait(signal.SIGTERM, self._stop_timeout)
        except subprocess.TimeoutExpired:
            self._signal_and_wait(signal.SIGKILL, None)

    def kill(self) -> None:
        """SIGKILL: a crash, nothing saved since the last autosave."""
        if self._process is not None:
            self._signal_and_wait(signal.SIGKILL, None)

    def _signal_and_wait(self, sig: signal.Signals, timeout: float | None) -> None:
        process = self._process
        assert process is not None
        if process.poll() is None:
            process.send_signal(sig)
        process.wait(timeout)
        self._process = None

    def restart(self) -> None:
        """Stop (if running) and start again on the same port with the same database."""
        self.stop()
        self.start()

    def close(self) -> None:
        """Stop the broker and remove the work directory if it is ours."""
        self.stop()
        if self._owns_workdir and self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    async def __aenter__(self) -> Self:
        await asyncio.to_thread(self.__enter__)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await asyncio.to_thread(self.close)

    # -- observation ------------------------------------------------------------------------

    async def wait_bridge_connected(self, timeout: float = 10.0) -> None:
        """Wait until this broker's bridge reports itself connected (its ``$SYS`` state is 1)."""
        if self.config.bridge is None:
            msg = "this broker has no bridge"
            raise BrokerError(msg)
        name, topic = self.config.bridge.name, self.config.bridge.state_topic
        try:
            async with (
                asyncio.timeout(timeout),
                aiomqtt.Client(self._connect_host, self.port) as client,
            ):
                await client.subscribe(topic, qos=1)
                async for message in client.messages:
                    if message.payload == b"1":
                        return
        except TimeoutError:
            pass
        except aiomqtt.MqttError as exc:
            msg = f"cannot watch bridge {name} on {self.host}:{self.port}: {exc}"
            raise BrokerError(msg) from exc
        msg = f"bridge {name} not connected after {timeout} s; log tail:\n{self.log_tail()}"
        raise BrokerError(msg)


async def read_sys_bytes(host: str, port: int, *, timeout: float = 5.0) -> dict[str, int]:
    """The broker's ``$SYS`` traffic counters, e.g. ``bytes_received``, ``publish_bytes_sent``.

    The values are those of the broker's last ``$SYS`` update (every ``sys_interval`` seconds)
    and include this reader's own connection once the next update has happened.
    """
    prefix = "$SYS/broker/"
    wanted = {t: t.replace("/", "_") for t in _SYS_TOPICS}
    found: dict[str, int] = {}
    try:
        async with asyncio.timeout(timeout), aiomqtt.Client(host, port) as client:
            await client.subscribe([(prefix + name, 0) for name in _SYS_TOPICS])
            async for message in client.messages:
                key = str(message.topic).removeprefix(prefix)
                if key in wanted and isinstance(message.payload, bytes):
                    found[wanted[key]] = int(message.payload)
                if len(found) == len(wanted):
                    return found
    except TimeoutError:
        pass
    except aiomqtt.MqttError as exc:
        msg = f"cannot read $SYS from {host}:{port}: {exc}"
        raise BrokerError(msg) from exc
    missing = sorted(set(wanted.values()) - found.keys())
    msg = f"$SYS counters missing after {timeout} s (is sys_interval 0?): {missing}"
    raise BrokerError(msg)


def _main(argv: list[str] | None = None) -> int:
    """``python -m hfl_mqtt.brokers DIR``: write the example files into DIR."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m hfl_mqtt.brokers", description=_main.__doc__)
    parser.add_argument("directory", type=Path)
    args = parser.parse_args(argv)
    for name, text in example_files().items():
        (args.directory / name).write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
