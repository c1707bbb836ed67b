"""``hfl-mqtt plan``: what it writes loads back, and the brokers it writes start as written and
let each node's user do exactly what its node needs, over TLS, across a bridge."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
import ssl
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
import structlog
import yaml

from hfl_mqtt import pki
from hfl_mqtt.brokers import find_mosquitto, free_port
from hfl_mqtt.cli import main
from hfl_mqtt.config import FederationConfig, load_federation, load_node
from hfl_mqtt.errors import AuthenticationError, ConfigError, PublishRefusedError
from hfl_mqtt.plan import OPERATOR, Plan, write_plan
from hfl_mqtt.roles.node import mqtt_link_factory
from hfl_mqtt.topics import ctl_topic, metrics_filter, metrics_topic, model_topic, up_topic
from hfl_mqtt.transport.base import LinkBase
from tests.fakes import needs_mosquitto

FED = "lab"
WAIT = 10.0


def federation(cloud_port: int = 1883, site_port: int = 1884, **extra: Any) -> dict[str, Any]:
    """Cloud, 2 edges, 4 workers; edge-0's subtree on its own broker, bridged to the cloud's."""
    return {
        "federation": FED,
        "levels": [
            {"name": "cloud", "rounds": 2, "deadline_s": 20},
            {"name": "edge", "rounds": 1, "deadline_s": 20},
            {"name": "worker"},
        ],
        "fanout": [2, 2],
        "task": {"dataset": "digits", "model": "softmax"},
        "deployment": {
            "brokers": {
                "cloud": {"host": "127.0.0.1", "port": cloud_port},
                "site-a": {"host": "127.0.0.1", "port": site_port, "bridge_to": "cloud"},
            },
            "sites": {"edge-0": "site-a"},
            "hosts": {"vm": ["cloud", "edge-1"], "pi-lab": ["worker-0", "worker-1"]},
        },
        **extra,
    }


def make(tmp_path: Path, *, tls: bool = False, client_certs: bool = False) -> tuple[Plan, Path]:
    out = tmp_path / "plan"
    config = FederationConfig.model_validate(federation(free_port(), free_port()))
    return write_plan(config, out, tls=tls, client_certs=client_certs), out


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# --- what plan writes -------------------------------------------------------------------------


def test_every_file_loads_back_with_its_secrets_private(tmp_path: Path) -> None:
    plan, out = make(tmp_path, tls=True, client_certs=True)
    secrets = out / "secrets"
    assert mode(secrets) == 0o700
    assert mode(out / "pki") == 0o700
    assert mode(out / "pki" / "ca.key") == 0o600
    passwords = {}
    for node in plan.nodes:
        loaded = load_node(out / "nodes" / f"{node.node}.yaml")
        assert loaded.node == node.node
        for link in (loaded.upstream, loaded.downstream):
            if link is None:
                continue
            address = link.broker
            assert address.username == node.node
            assert address.tls is not None
            for path in (address.password_file, address.tls.ca_file, address.tls.key_file):
                assert path is not None
                assert path.is_absolute()
                assert path.exists()
            assert address.password_file is not None
            assert address.tls.key_file is not None
            assert mode(address.password_file) == 0o600
            assert mode(address.tls.key_file) == 0o600
            passwords[node.node] = address.password()
    assert set(passwords) == {"cloud", "edge-0", "edge-1", *(f"worker-{i}" for i in range(4))}
    assert len(set(passwords.values())) == len(passwords)  # one random password each
    edge0 = load_node(out / "nodes" / "edge-0.yaml")
    assert edge0.upstream is not None
    assert edge0.downstream is not None
    assert edge0.upstream.broker == edge0.downstream.broker  # one link: its site's broker
    assert edge0.upstream.broker.port == plan.brokers["site-a"].port
    for name, broker in plan.brokers.items():
        here = out / "brokers" / name
        assert mode(here / "passwd") == 0o600
        assert mode(here / "server.key") == 0o600
        users = pki.parse_password_file((here / "passwd").read_text())
        assert list(users) == plan.users(broker)
        for user, hashed in users.items():
            secret = (secrets / f"{user}.password").read_text().strip()
            assert pki.check_password(hashed, secret)
            assert not pki.check_password(hashed, secret + "x")
        acl_users = [
            line.split()[1]
            for line in (here / "acl").read_text().splitlines()
            if line[:5] == "user "
        ]
        assert acl_users == list(users)
    # Workers 2 and 3 (under edge-1, on the cloud's broker) may move to edge-0 on site-a.
    assert plan.brokers["site-a"].users == ("edge-0", *(f"worker-{i}" for i in range(4)))
    assert "bridge-site-a" in plan.users(plan.brokers["cloud"])
    assert mode(out / "brokers" / "site-a" / "mosquitto.conf") == 0o600  # holds a password
    start = (out / "START.md").read_text()
    assert "### pi-lab: worker-0, worker-1" in start
    assert "secrets/worker-0.password" in start
    assert "pki/ca.key" in start


def test_a_fallback_on_another_broker_has_the_nodes_credentials_there(tmp_path: Path) -> None:
    """Workers 0 and 1 (edge-0's, on site-a) may move to edge-1 and the cloud, on the cloud's
    broker: they are users there, logging in as themselves."""
    plan, out = make(tmp_path, tls=True, client_certs=True)
    assert {"worker-0", "worker-1"} <= set(plan.brokers["cloud"].users)
    worker0 = load_node(out / "nodes" / "worker-0.yaml").upstream
    assert worker0 is not None
    assert worker0.fallback_ids == ["edge-1", "cloud"]
    password = worker0.broker.password()
    for entry in worker0.fallbacks:
        assert entry.broker is not None
        assert entry.broker.port == plan.brokers["cloud"].port
        assert entry.broker.username == "worker-0"
        assert entry.broker.tls is not None
        assert entry.broker.password() == password


def test_the_password_hash_is_mosquitto_passwds(tmp_path: Path) -> None:
    line = pki.password_line("edge-0", "s3cret")
    user, hashed = line.split(":", 1)
    assert user == "edge-0"
    assert hashed.startswith("$7$101$")
    assert pki.check_password(hashed, "s3cret")
    tool = Path("/usr/bin/mosquitto_passwd")
    if tool.exists():  # and the other way round: what mosquitto_passwd writes, we read
        passwd = tmp_path / "passwd"
        subprocess.run([tool, "-b", "-c", passwd, "edge-0", "s3cret"], check=True)
        theirs = pki.parse_password_file(passwd.read_text())["edge-0"]
        assert pki.check_password(theirs, "s3cret")
        assert len(theirs) == len(hashed)


def test_the_acl_pins_users_by_name_and_lets_parents_stop_children(tmp_path: Path) -> None:
    _, out = make(tmp_path)
    acl = (out / "brokers" / "cloud" / "acl").read_text().splitlines()
    assert f"pattern write hfl/{FED}/+/up/%u" in acl
    assert f"pattern read hfl/{FED}/%u/ctl" in acl
    assert not [line for line in acl if "%c" in line]  # a client id is not a credential
    blocks: dict[str, list[str]] = {}
    for line in acl:
        if line.startswith("user "):
            current = blocks.setdefault(line.split()[1], [])
        elif line.startswith("topic "):
            current.append(line)
    assert f"topic write {ctl_topic(FED, 'edge-1')}" in blocks["cloud"]
    assert f"topic write {ctl_topic(FED, 'worker-2')}" in blocks["edge-1"]
    assert f"topic read {model_topic(FED, 'edge-1')}/#" in blocks["worker-2"]
    assert blocks[OPERATOR] == ["topic readwrite hfl/#", "topic read $SYS/#"]
    assert f"topic write {up_topic(FED, 'cloud', 'edge-0')}" in blocks["bridge-site-a"]


def test_every_node_may_write_its_metrics_and_bridges_carry_every_record_out(
    tmp_path: Path,
) -> None:
    _, out = make(tmp_path)
    for broker in ("cloud", "site-a"):
        acl = (out / "brokers" / broker / "acl").read_text().splitlines()
        assert f"pattern write hfl/{FED}/%u/metrics" in acl
    cloud_acl = (out / "brokers" / "cloud" / "acl").read_text()
    bridge = cloud_acl.split("user bridge-site-a\n")[1].split("\n\n")[0].splitlines()
    # The bridge brings the records of the site's nodes, workers' included, to the cloud.
    assert f"topic write {metrics_filter(FED)}" in bridge
    conf = (out / "brokers" / "site-a" / "mosquitto.conf").read_text().splitlines()
    assert conf.count(f"topic {metrics_filter(FED)} out 1") == 1
    assert not [line for line in conf if "metrics" in line and " in " in line]  # out only


def test_plan_refuses_a_non_empty_directory_unless_forced(tmp_path: Path) -> None:
    config = FederationConfig.model_validate(federation())
    out = tmp_path / "plan"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not empty"):
        write_plan(config, out)
    write_plan(config, out, force=True)
    first = (out / "secrets" / "edge-0.password").read_text()
    write_plan(config, out, force=True)
    assert (out / "secrets" / "edge-0.password").read_text() != first  # new secrets
    assert (out / "notes.txt").read_text() == "mine"  # what is not the plan's stays


@pytest.fixture
def cli() -> Iterator[Callable[[list[str]], int]]:
    """``hfl-mqtt`` in this process; the logging it configures (onto this test's captured
    stderr) is undone afterwards."""
    saved = structlog.get_config()
    yield main
    structlog.configure(**saved)


def test_cli_plan_writes_a_plan_and_broker_sets_the_root_address(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], cli: Callable[[list[str]], int]
) -> None:
    source = tmp_path / "fed.yaml"
    config = federation()
    del config["deployment"]
    source.write_text(yaml.safe_dump(config))
    out = tmp_path / "plan"
    assert cli(["plan", str(source), "--out", str(out), "--broker", "10.1.2.3:9883"]) == 0
    assert "START.md" in capsys.readouterr().out
    worker = load_node(out / "nodes" / "worker-0.yaml")
    assert worker.upstream is not None
    assert (worker.upstream.broker.host, worker.upstream.broker.port) == ("10.1.2.3", 9883)
    out2 = tmp_path / "certs"
    assert cli(["plan", str(source), "--out", str(out2), "--client-certs"]) == 0
    capsys.readouterr()
    worker = load_node(out2 / "nodes" / "worker-0.yaml")  # client certificates imply TLS
    assert worker.upstream is not None
    assert worker.upstream.broker.port == 8883
    assert worker.upstream.broker.tls is not None
    assert worker.upstream.broker.tls.cert_file.resolve() == out2 / "certs" / "worker-0.crt"
    conf = (out / "brokers" / "cloud" / "mosquitto.conf").read_text()
    assert "listener 9883 0.0.0.0" in conf  # a routable address: every interface
    assert cli(["plan", str(source), "--out", str(out)]) == 2  # not empty
    assert "--force" in capsys.readouterr().err
    assert cli(["plan", str(source), "--out", str(out), "--broker", "nohost", "--force"]) == 2
    assert "HOST:PORT" in capsys.readouterr().err


def test_broker_dir_says_where_the_brokers_live_on_their_hosts(tmp_path: Path) -> None:
    config = FederationConfig.model_validate(federation())
    installed = Path("/etc/hfl-mqtt/brokers")
    write_plan(config, tmp_path / "plan", tls=True, broker_dir=installed)
    here = tmp_path / "plan" / "brokers" / "site-a"
    conf = (here / "mosquitto.conf").read_text().splitlines()
    assert "user mosquitto" in conf  # started as root by systemd, it runs as mosquitto
    for directive in ("password_file", "acl_file", "cafile", "certfile", "keyfile"):
        (path,) = [line.split()[1] for line in conf if line.startswith(directive + " ")]
        assert Path(path).parent == installed / "site-a"
        assert (here / Path(path).name).exists()
    assert f"persistence_location {installed}/site-a/data/" in conf
    unit = (here / "hfl-mqtt-broker-site-a.service").read_text()
    assert f"ExecStart=/usr/sbin/mosquitto -c {installed}/site-a/mosquitto.conf" in unit
    start = (tmp_path / "plan" / "START.md").read_text()
    assert f"rsync -a brokers/site-a/ root@127.0.0.1:{installed}/site-a/" in start
    assert f"chown -R mosquitto: {installed}/site-a" in start
    with pytest.raises(ConfigError, match="absolute"):
        write_plan(config, tmp_path / "other", broker_dir=Path("relative/dir"))


def test_per_edge_brokers_get_a_bridged_broker_each(tmp_path: Path) -> None:
    config = federation(brokers="per_edge")
    del config["deployment"]
    plan = write_plan(FederationConfig.model_validate(config), tmp_path / "plan")
    assert [(b.name, b.port, b.bridge_to) for b in plan.brokers.values()] == [
        ("cloud", 1883, None),
        ("edge-0", 1884, "cloud"),
        ("edge-1", 1885, "cloud"),
    ]
    # edge-0's workers may move to edge-1 (and the cloud): users there too.
    assert plan.brokers["edge-1"].users == (
        "edge-1",
        "worker-0",
        "worker-1",
        "worker-2",
        "worker-3",
    )
    assert plan.brokers["cloud"].users == ("cloud", *(f"worker-{i}" for i in range(4)))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"hosts": {"pi": ["worker-9"]}}, "deployment.hosts.pi: no such node: worker-9"),
        (
            {"hosts": {"a": ["worker-0"], "b": ["worker-0"]}},
            "hosts.b: node 'worker-0' is listed also on 'a'",
        ),
        ({"sites": {"edge-0": "nowhere"}}, "sites.edge-0: no broker 'nowhere'"),
        ({"sites": {"worker-0": "site-a"}}, "deployment.sites.worker-0: a worker"),
        ({"sites": {}}, "deployment.brokers: site-a serve(s) no aggregator"),
        (
            {
                "brokers": {
                    "cloud": {"port": 1},
                    "a": {"port": 2, "bridge_to": "b"},
                    "b": {"port": 3, "bridge_to": "a"},
                }
            },
            "a bridge loop: a -> b -> a",
        ),
        (
            {
                "brokers": {
                    "cloud": {"port": 1},
                    "site-a": {"port": 2, "bridge_to": "site-b"},
                    "site-b": {"port": 3, "bridge_to": "cloud"},
                },
                "sites": {"edge-0": "site-a", "edge-1": "site-b"},
            },
            "deployment.sites.edge-0: edge-0's parent cloud is on broker 'cloud', so 'site-a' must",
        ),
        (
            {"brokers": {"cloud": {"port": 1}, "site-a": {"port": 1, "bridge_to": "cloud"}}},
            "same host and port as brokers.cloud",
        ),
        ({"colour": "blue"}, "deployment.colour: Extra inputs are not permitted"),
    ],
)
def test_a_bad_deployment_section_names_its_field(
    tmp_path: Path, change: dict[str, Any], message: str
) -> None:
    config = federation()
    config["deployment"] = {**config["deployment"], **change}
    path = tmp_path / "fed.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_federation(path)


# --- the brokers it writes, started as written ----------------------------------------------


@contextlib.contextmanager
def started(conf: Path, port: int) -> Iterator[subprocess.Popen[bytes]]:
    """``mosquitto -c conf``, until it logs 'running' and accepts TCP on ``port``; ended (by
    its pid) on leaving."""
    executable = find_mosquitto()
    assert executable is not None
    log = conf.parent / "mosquitto.log"
    with (conf.parent / "stderr.txt").open("ab") as stderr:
        process = subprocess.Popen(
            [executable, "-c", str(conf)], stdin=subprocess.DEVNULL, stdout=stderr, stderr=stderr
        )
    try:
        deadline = time.monotonic() + WAIT
        while not (log.exists() and b" running\n" in log.read_bytes() and accepts(port)):
            assert process.poll() is None, (conf.parent / "stderr.txt").read_text()
            assert time.monotonic() < deadline, log.read_text() if log.exists() else "no log"
            time.sleep(0.01)
        yield process
    finally:
        process.terminate()
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), 0.2):
            return True
    except OSError:
        return False


def link(out: Path, node: str, *, client_id: str | None = None, **changes: Any) -> LinkBase:
    """A real MQTT link with ``node``'s own broker address and credentials (from its file)."""
    config = load_node(out / "nodes" / f"{node}.yaml")
    side = config.upstream or config.downstream
    assert side is not None
    address = side.broker.model_copy(update=changes)
    return mqtt_link_factory(1 << 20, connect_timeout=WAIT)(address, client_id or node, None)


def tls_params(out: Path, ca: Path | None = None) -> aiomqtt.TLSParameters:
    return aiomqtt.TLSParameters(
        ca_certs=str(ca or out / "certs" / "ca.crt"), tls_version=ssl.PROTOCOL_TLS_CLIENT
    )


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@needs_mosquitto
@pytest.mark.anyio
async def test_a_node_logs_in_over_tls_and_strangers_do_not(tmp_path: Path) -> None:
    plan, out = make(tmp_path, tls=True)
    cloud = plan.brokers["cloud"]
    with started(out / "brokers" / "cloud" / "mosquitto.conf", cloud.port):
        password = (out / "secrets" / "edge-1.password").read_text().strip()
        client = aiomqtt.Client(
            cloud.host,
            cloud.port,
            username="edge-1",
            password=password,
            tls_params=tls_params(out),
            protocol=aiomqtt.ProtocolVersion.V5,
        )
        async with client:  # its own password, the fleet's CA: in, and may send its delta
            await client.publish(up_topic(FED, "cloud", "edge-1"), b"delta", qos=1)
        for user, secret in (("edge-1", password + "x"), ("nobody", password)):
            wrong = aiomqtt.Client(
                cloud.host,
                cloud.port,
                username=user,
                password=secret,
                tls_params=tls_params(out),
                protocol=aiomqtt.ProtocolVersion.V5,
            )
            with pytest.raises(aiomqtt.MqttCodeError) as refused:
                async with wrong:
                    pass
            # Mosquitto 2.0.11 answers a wrong password or an unknown user with 135 (not
            # authorized), not 134 (bad user name or password).
            assert refused.value.rc == 135
        anonymous = aiomqtt.Client(
            cloud.host, cloud.port, tls_params=tls_params(out), protocol=aiomqtt.ProtocolVersion.V5
        )
        with pytest.raises(aiomqtt.MqttCodeError) as refused:
            async with anonymous:
                pass
        assert refused.value.rc == 135  # not authorized: no anonymous clients
        other_ca = tmp_path / "other-ca.crt"
        other_ca.write_bytes(pki.new_ca("someone else").cert_pem)
        edge1 = load_node(out / "nodes" / "edge-1.yaml").upstream
        assert edge1 is not None
        assert edge1.broker.tls is not None
        other = edge1.broker.tls.model_copy(update={"ca_file": other_ca})
        with pytest.raises(AuthenticationError, match="failed verification"):
            async with link(out, "edge-1", tls=other):
                pass


@needs_mosquitto
@pytest.mark.anyio
async def test_a_device_cannot_send_as_another_and_its_parent_never_sees_it(
    tmp_path: Path,
) -> None:
    plan, out = make(tmp_path, tls=True)
    cloud = plan.brokers["cloud"]
    with started(out / "brokers" / "cloud" / "mosquitto.conf", cloud.port):
        async with (
            link(out, "edge-1", client_id="edge-1.down") as parent,
            link(out, "worker-2") as device,
        ):
            await parent.subscribe(up_topic(FED, "edge-1", "+"))
            with pytest.raises(PublishRefusedError) as refused:
                await device.publish(up_topic(FED, "edge-1", "worker-3"), b"spoofed")
            assert refused.value.code == 135
            with pytest.raises(PublishRefusedError):  # nor write another node's model
                await device.publish(model_topic(FED, "edge-1"), b"junk", retain=True)
            with pytest.raises(PublishRefusedError):  # nor stop its sibling
                await device.publish(ctl_topic(FED, "worker-3"), b'{"cmd": "stop"}')
            await device.publish(up_topic(FED, "edge-1", "worker-2"), b"mine")
            async with asyncio.timeout(WAIT):
                message = await parent.receive()
            assert message.topic == up_topic(FED, "edge-1", "worker-2")
            assert message.payload == b"mine"  # the spoofed one never arrived
            await parent.publish(ctl_topic(FED, "worker-2"), b'{"cmd": "stop"}')  # a parent may


@needs_mosquitto
@pytest.mark.anyio
async def test_a_site_broker_bridges_to_the_cloud_over_tls_with_client_certificates(
    tmp_path: Path,
) -> None:
    plan, out = make(tmp_path, tls=True, client_certs=True)
    cloud, site = plan.brokers["cloud"], plan.brokers["site-a"]
    with (
        started(out / "brokers" / "cloud" / "mosquitto.conf", cloud.port),
        started(out / "brokers" / "site-a" / "mosquitto.conf", site.port),
    ):
        async with (
            link(out, "cloud") as root,
            link(out, "edge-0") as edge,
            link(out, "worker-0") as worker,
        ):
            await root.subscribe(up_topic(FED, "cloud", "+"))
            await worker.subscribe(model_topic(FED, "edge-0"))
            await edge.subscribe(model_topic(FED, "cloud"))
            await root.publish(model_topic(FED, "cloud"), b"model-1", retain=True)
            async with asyncio.timeout(WAIT):  # the cloud's retained model reaches the site
                message = await edge.receive()
            assert (message.topic, message.payload) == (model_topic(FED, "cloud"), b"model-1")
            await edge.publish(up_topic(FED, "cloud", "edge-0"), b"edge-delta")
            async with asyncio.timeout(WAIT):  # and the edge's delta reaches the cloud
                message = await root.receive()
            assert (message.topic, message.payload) == (
                up_topic(FED, "cloud", "edge-0"),
                b"edge-delta",
            )
            # A worker's delta to its edge stays on the site.
            await worker.publish(up_topic(FED, "edge-0", "worker-0"), b"worker-delta")
        log = (out / "brokers" / "cloud" / "mosquitto.log").read_text()
        assert "u'bridge-site-a'" in log  # the bridge logged in as its own user
    # Without a client certificate, even the right password is not enough.
    password = (out / "secrets" / "worker-0.password").read_text().strip()
    bare = aiomqtt.Client(
        site.host,
        site.port,
        username="worker-0",
        password=password,
        tls_params=tls_params(out),
        protocol=aiomqtt.ProtocolVersion.V5,
        # TLS 1.3: the handshake ends before the broker checks for a certificate, so its
        # refusal (an alert) comes only while the client waits for the CONNACK.
        timeout=2,
    )
    with (
        started(out / "brokers" / "site-a" / "mosquitto.conf", site.port),
        pytest.raises(aiomqtt.MqttError),
    ):
        async with bare:
            pass


@needs_mosquitto
@pytest.mark.anyio
async def test_a_plans_brokers_take_each_nodes_metrics_and_bridge_them_to_the_cloud(
    tmp_path: Path,
) -> None:
    plan, out = make(tmp_path)
    cloud, site = plan.brokers["cloud"], plan.brokers["site-a"]
    operator = (out / "secrets" / f"{OPERATOR}.password").read_text().strip()
    with (
        started(out / "brokers" / "cloud" / "mosquitto.conf", cloud.port),
        started(out / "brokers" / "site-a" / "mosquitto.conf", site.port),
    ):
        async with link(out, "worker-0") as worker, link(out, "edge-0") as edge:
            mine = b'{"node":"worker-0"}'
            await worker.publish(metrics_topic(FED, "worker-0"), mine, retain=True)
            await edge.publish(metrics_topic(FED, "edge-0"), b'{"node":"edge-0"}', retain=True)
            with pytest.raises(PublishRefusedError):  # nobody writes another node's record
                await worker.publish(metrics_topic(FED, "edge-0"), b"{}", retain=True)
        watcher = aiomqtt.Client(
            cloud.host,
            cloud.port,
            username=OPERATOR,
            password=operator,
            protocol=aiomqtt.ProtocolVersion.V5,
        )
        seen: dict[str, bytes] = {}
        async with watcher, asyncio.timeout(WAIT):
            await watcher.subscribe(metrics_filter(FED), qos=1)
            async for message in watcher.messages:  # retained, bridged from the site
                seen[str(message.topic)] = bytes(message.payload)
                if len(seen) == 2:
                    break
        assert seen == {
            metrics_topic(FED, "worker-0"): b'{"node":"worker-0"}',
            metrics_topic(FED, "edge-0"): b'{"node":"edge-0"}',
        }


async def until_closed(client: aiomqtt.Client) -> None:
    async with asyncio.timeout(WAIT):
        async for _ in client.messages:
            pass


@needs_mosquitto
@pytest.mark.anyio
async def test_a_revoked_user_is_out_after_sighup(tmp_path: Path) -> None:
    plan, out = make(tmp_path)
    cloud = plan.brokers["cloud"]
    passwd = out / "brokers" / "cloud" / "passwd"
    password = (out / "secrets" / "worker-2.password").read_text().strip()

    def client() -> aiomqtt.Client:
        return aiomqtt.Client(
            cloud.host,
            cloud.port,
            username="worker-2",
            password=password,
            protocol=aiomqtt.ProtocolVersion.V5,
        )

    with started(out / "brokers" / "cloud" / "mosquitto.conf", cloud.port) as broker:
        async with client() as connected:
            await connected.subscribe(model_topic(FED, "edge-1"), qos=1)
            kept = [
                line for line in passwd.read_text().splitlines() if not line.startswith("worker-2:")
            ]
            passwd.write_text("\n".join(kept) + "\n")
            os.kill(broker.pid, signal.SIGHUP)
            with pytest.raises(aiomqtt.MqttError):  # its connection is closed
                await until_closed(connected)
        with pytest.raises(aiomqtt.MqttCodeError) as refused:
            async with client():
                pass
        assert refused.value.rc == 135


def test_the_shipped_fleet_example_plans_a_bridged_site_per_edge(tmp_path: Path) -> None:
    config = load_federation(Path(__file__).parent.parent / "configs" / "fleet.yaml")
    plan = write_plan(config, tmp_path / "fleet", broker_dir=Path("/etc/hfl-mqtt/brokers"))
    assert {name: b.bridge_to for name, b in plan.brokers.items()} == {
        "cloud": None,
        "lab": "cloud",
        "greenhouse": "cloud",
    }
    assert plan.brokers["lab"].bind == "0.0.0.0"
    start = (tmp_path / "fleet" / "START.md").read_text()
    for host in config.deployment.hosts if config.deployment else {}:
        assert f"### {host}: " in start
    worker = load_node(tmp_path / "fleet" / "nodes" / "worker-5.yaml").upstream
    assert worker is not None
    assert (worker.broker.host, worker.broker.port) == ("192.168.20.2", 8883)


@needs_mosquitto
@pytest.mark.anyio
async def test_the_operator_monitors_a_planned_broker_over_tls(tmp_path: Path) -> None:
    """``hfl-mqtt monitor`` with the plan's CA and the operator's password sees a node's
    record; a wrong password fails at once, naming the broker."""
    plan, out = make(tmp_path, tls=True)
    cloud = plan.brokers["cloud"]
    with started(out / "brokers" / "cloud" / "mosquitto.conf", cloud.port):
        password = (out / "secrets" / "edge-1.password").read_text().strip()
        edge = aiomqtt.Client(
            cloud.host,
            cloud.port,
            username="edge-1",
            password=password,
            tls_params=tls_params(out),
            protocol=aiomqtt.ProtocolVersion.V5,
        )
        record = b'{"node":"edge-1","role":"aggregator","level":1,"parent":"cloud","version":7}'
        async with edge:
            await edge.publish(metrics_topic(FED, "edge-1"), record, qos=1, retain=True)
        command = ["monitor", "--broker", f"{cloud.host}:{cloud.port}", "--federation", FED]
        command += ["--ca", str(out / "certs" / "ca.crt"), "--username", OPERATOR, "--once"]
        secret = out / "secrets" / f"{OPERATOR}.password"
        seen = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "hfl_mqtt.cli", *command, "--password-file", str(secret)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert seen.returncode == 0, seen.stderr
        assert "edge-1" in seen.stdout
        assert "v7" in seen.stdout
        wrong = tmp_path / "wrong.password"
        wrong.write_text("not it\n")
        started_at = time.monotonic()
        refused = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "hfl_mqtt.cli", *command, "--password-file", str(wrong)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert refused.returncode == 2
        assert "AuthenticationError" in refused.stderr
        assert f"{cloud.port}" in refused.stderr
        assert time.monotonic() - started_at < 15  # at once, not after retries
