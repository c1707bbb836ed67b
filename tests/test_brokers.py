"""Private Mosquitto brokers: rendered configs, and real brokers started, crashed and bridged."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiomqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from pydantic import ValidationError

from hfl_mqtt.brokers import (
    BridgeConfig,
    BridgeTopic,
    BrokerConfig,
    MosquittoBroker,
    edge_bridge_topics,
    example_files,
    free_port,
    read_sys_bytes,
    render_acl,
    render_config,
)
from hfl_mqtt.errors import BrokerError, HflError
from tests.fakes import needs_mosquitto

BROKERS_DIR = Path(__file__).resolve().parent.parent / "brokers"
Received = list[tuple[str, bytes, bool]]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def receive_until(client: aiomqtt.Client, last: str, timeout: float = 5.0) -> Received:
    """Messages in arrival order up to and including the first one on topic ``last``."""
    received: Received = []
    async with asyncio.timeout(timeout):
        async for message in client.messages:
            assert isinstance(message.payload, bytes)
            received.append((str(message.topic), message.payload, message.retain))
            if message.topic.matches(last):
                return received
    raise AssertionError("unreachable")


async def until_disconnected(client: aiomqtt.Client, timeout: float = 5.0) -> None:
    """Iterate messages until the broker drops the client: aiomqtt then raises ``MqttError``."""
    async with asyncio.timeout(timeout):
        async for _ in client.messages:
            pass


def session_client(broker: MosquittoBroker, identifier: str) -> aiomqtt.Client:
    """An MQTT 5 client that resumes its session (clean start off, 5 min session expiry)."""
    properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    properties.SessionExpiryInterval = 300
    return aiomqtt.Client(
        broker.host,
        broker.port,
        identifier=identifier,
        protocol=aiomqtt.ProtocolVersion.V5,
        clean_start=False,
        properties=properties,
    )


@pytest.fixture
async def broker() -> AsyncIterator[MosquittoBroker]:
    async with MosquittoBroker(BrokerConfig()) as running:
        yield running


# -- rendering ------------------------------------------------------------------------------


def test_example_files_are_what_render_config_produces() -> None:
    files = example_files()
    assert sorted(files) == ["acl.conf", "cloud.conf", "edge-bridged.conf", "single.conf"]
    for name, text in files.items():
        assert (BROKERS_DIR / name).read_text() == text, (
            f"brokers/{name} is stale: python -m hfl_mqtt.brokers brokers/"
        )


def test_render_config_writes_each_directive_on_its_own_line() -> None:
    bridge = BridgeConfig(
        name="edge-1",
        address="10.0.0.1",
        port=1884,
        topics=(BridgeTopic(pattern="a/#", direction="both", qos=2),),
    )
    config = BrokerConfig(max_queued_bytes=5, acl_file=Path("/etc/acl"), bridge=bridge)
    text = render_config(config, port=4242, persistence_dir="/data", log_file="/l.log", header="x")
    lines = [line for line in text.splitlines() if line and not line.startswith("#")]
    assert text.startswith("# x\n")
    for expected in (
        "listener 4242 127.0.0.1",
        "allow_anonymous true",
        "acl_file /etc/acl",
        "set_tcp_nodelay true",
        f"max_packet_size {256 * 2**20 - 1}",
        "max_queued_messages 100000",
        "max_queued_bytes 5",
        "persistent_client_expiration 1h",
        "sys_interval 1",
        "persistence true",
        "persistence_location /data/",
        "log_dest file /l.log",
        "log_type error",
        "log_type information",
    ):
        assert expected in lines
    # Every line after `connection` belongs to the bridge.
    assert lines[lines.index("connection edge-1") :] == [
        "connection edge-1",
        "address 10.0.0.1:1884",
        "bridge_protocol_version mqttv50",
        "remote_clientid edge-1",
        "local_clientid local.edge-1",
        "cleansession false",
        "bridge_attempt_unsubscribe true",
        "notifications true",
        "keepalive_interval 10",
        "restart_timeout 1 10",
        "topic a/# both 2",
    ]
    no_persistence = render_config(
        BrokerConfig(persistence=False), port=1, persistence_dir="/d", log_file="/l"
    )
    assert "persistence false" in no_persistence
    assert "persistence_location" not in no_persistence


@pytest.mark.parametrize(
    "bad",
    [
        {"unknown": 1},
        {"persistent_client_expiration": "60s"},  # 2.0.11 refuses to start on it
        {"max_packet_size": 256 * 2**20},  # paho rejects it in CONNACK
        {"max_packet_size": 10},
        {"port": 70000},
        {"host": "a b"},
    ],
)
def test_broker_config_rejects_bad_settings(bad: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        BrokerConfig.model_validate(bad)


def test_configs_are_frozen() -> None:
    with pytest.raises(ValidationError):
        BrokerConfig().port = 1


def test_edge_bridge_topics() -> None:
    assert [(t.pattern, t.direction, t.qos) for t in edge_bridge_topics("F", "E", "P")] == [
        ("hfl/F/P/up/E", "out", 1),
        ("hfl/F/P/model/#", "in", 1),
        ("hfl/F/E/status", "out", 1),
        ("hfl/F/E/ctl", "in", 1),
        ("hfl/F/+/metrics", "out", 1),  # every node's record on the edge broker, workers' too
    ]
    with pytest.raises(ValueError, match="edge"):
        edge_bridge_topics("F", "e/+", "P")


# -- running brokers -----------------------------------------------------------------------


@needs_mosquitto
@pytest.mark.anyio
async def test_qos1_round_trip(broker: MosquittoBroker) -> None:
    assert broker.running
    assert broker.host == "127.0.0.1"
    assert broker.port > 0
    async with (
        aiomqtt.Client(broker.host, broker.port) as sub,
        aiomqtt.Client(broker.host, broker.port) as pub,
    ):
        await sub.subscribe("t/a", qos=1)
        await pub.publish("t/a", b"hello", qos=1)
        async with asyncio.timeout(5):
            message = await anext(aiter(sub.messages))
    assert (str(message.topic), message.payload, message.qos) == ("t/a", b"hello", 1)


@needs_mosquitto
@pytest.mark.anyio
async def test_persistent_session_survives_crash_and_restart() -> None:
    config = BrokerConfig(autosave_interval=1, autosave_on_changes=True)
    async with MosquittoBroker(config) as broker:
        async with session_client(broker, "sub-1") as sub:
            await sub.subscribe("q/1", qos=1)
        async with aiomqtt.Client(broker.host, broker.port) as pub:
            await pub.publish("q/1", b"queued-while-offline", qos=1)
        # Wait until an autosave holds the queued message, then crash: no save at exit.
        database = broker.persistence_dir / "mosquitto.db"
        deadline = time.monotonic() + 5
        while not (database.exists() and b"queued-while-offline" in database.read_bytes()):
            assert time.monotonic() < deadline, "the message never reached the database"
            await asyncio.sleep(0.01)
        port, pid = broker.port, broker.pid
        broker.kill()
        assert not broker.running
        await asyncio.to_thread(broker.restart)
        assert (broker.port, broker.running) == (port, True)
        assert broker.pid != pid
        async with session_client(broker, "sub-1") as sub:
            received = await receive_until(sub, "q/1")
    assert received == [("q/1", b"queued-while-offline", False)]


@needs_mosquitto
@pytest.mark.anyio
async def test_bridge_forwards_only_the_edge_topics() -> None:
    async with MosquittoBroker(BrokerConfig()) as cloud:
        bridge = BridgeConfig(
            name="edge-1",
            address=cloud.host,
            port=cloud.port,
            topics=tuple(edge_bridge_topics("F", "edge-1", "cloud")),
        )
        async with MosquittoBroker(BrokerConfig(bridge=bridge)) as edge:
            await edge.wait_bridge_connected(timeout=10)
            async with (
                aiomqtt.Client(cloud.host, cloud.port) as at_cloud,
                aiomqtt.Client(edge.host, edge.port) as at_edge,
            ):
                await at_cloud.subscribe("hfl/#", qos=1)
                await at_edge.subscribe("hfl/#", qos=1)
                # Local-only topics first: had they crossed, they would arrive before the last.
                for topic in ("hfl/F/edge-1/up/w1", "hfl/F/edge-1/model", "hfl/F/cloud/up/edge-1"):
                    await at_edge.publish(topic, b"from-edge", qos=1)
                await at_edge.publish("hfl/F/edge-1/status", b"online", qos=1, retain=True)
                from_edge = await receive_until(at_cloud, "hfl/F/edge-1/status")
                assert [t for t, _, _ in from_edge] == [
                    "hfl/F/cloud/up/edge-1",
                    "hfl/F/edge-1/status",
                ]

                await receive_until(at_edge, "hfl/F/edge-1/status")  # its own publishes
                for topic in ("hfl/F/edge-2/ctl", "hfl/F/cloud/up/edge-2"):
                    await at_cloud.publish(topic, b"from-cloud", qos=1)
                await at_cloud.publish("hfl/F/cloud/model", b"model-v1", qos=1, retain=True)
                await at_cloud.publish("hfl/F/cloud/model/chunk/0", b"chunk-0", qos=1, retain=True)
                await at_cloud.publish("hfl/F/edge-1/ctl", b"stop", qos=1)
                from_cloud = await receive_until(at_edge, "hfl/F/edge-1/ctl")
                assert [t for t, _, _ in from_cloud] == [
                    "hfl/F/cloud/model",
                    "hfl/F/cloud/model/chunk/0",
                    "hfl/F/edge-1/ctl",
                ]
                # No echo back over the bridge: the cloud saw each of its messages once.
                at_cloud_later = await receive_until(at_cloud, "hfl/F/edge-1/ctl")
                assert len(at_cloud_later) == 5

            # A late joiner at the edge gets the cloud's model at once: retained across the bridge.
            async with aiomqtt.Client(edge.host, edge.port) as late:
                await late.subscribe("hfl/F/cloud/model", qos=1)
                assert await receive_until(late, "hfl/F/cloud/model") == [
                    ("hfl/F/cloud/model", b"model-v1", True)
                ]


@needs_mosquitto
@pytest.mark.anyio
async def test_sys_byte_counters_increase_after_traffic(broker: MosquittoBroker) -> None:
    before = await read_sys_bytes(broker.host, broker.port)
    async with aiomqtt.Client(broker.host, broker.port) as client:
        await client.subscribe("load", qos=1)
        await client.publish("load", b"x" * 10_000, qos=1)
        await receive_until(client, "load")
    deadline = time.monotonic() + 5  # the counters are republished every sys_interval (1 s)
    while True:
        after = await read_sys_bytes(broker.host, broker.port)
        if after["publish_bytes_received"] > before["publish_bytes_received"]:
            break
        assert time.monotonic() < deadline, after
        await asyncio.sleep(0.1)
    assert after["bytes_received"] >= before["bytes_received"] + 10_000
    assert after["bytes_sent"] >= before["bytes_sent"] + 10_000
    assert after["publish_messages_received"] > before["publish_messages_received"]


@needs_mosquitto
@pytest.mark.anyio
async def test_publish_over_max_packet_size_is_refused_and_broker_lives() -> None:
    async with (
        MosquittoBroker(BrokerConfig(max_packet_size=1024)) as broker,
        aiomqtt.Client(broker.host, broker.port) as sub,
    ):
        await sub.subscribe("big/#", qos=1)
        async with aiomqtt.Client(
            broker.host, broker.port, protocol=aiomqtt.ProtocolVersion.V5
        ) as pub:
            await pub.publish("big/ok", b"x" * 900, qos=1)
            publishing = asyncio.create_task(pub.publish("big/too", b"x" * 4096, qos=1))
            # The broker drops the connection; the pending QoS 1 publish is never acknowledged.
            with pytest.raises(aiomqtt.MqttError, match="Disconnected"):
                await until_disconnected(pub)
            publishing.cancel()
        async with aiomqtt.Client(broker.host, broker.port) as other:
            await other.publish("big/after", b"still-up", qos=1)
        received = await receive_until(sub, "big/after")
        assert [t for t, _, _ in received] == ["big/ok", "big/after"]
        assert broker.running
        assert "disconnected due to oversize packet" in broker.log_path.read_text()


@needs_mosquitto
@pytest.mark.anyio
async def test_acl_pins_each_client_to_its_own_topics(tmp_path: Path) -> None:
    acl = tmp_path / "acl.conf"
    acl.write_text(render_acl())
    async with (
        MosquittoBroker(BrokerConfig(acl_file=acl)) as broker,
        aiomqtt.Client(broker.host, broker.port, identifier="edge-1") as aggregator,
        aiomqtt.Client(broker.host, broker.port, identifier="w1") as worker,
    ):
        await aggregator.subscribe("hfl/F/edge-1/up/+", qos=1)
        await worker.subscribe("hfl/F/edge-1/model", qos=1)
        await worker.subscribe("hfl/F/edge-1/up/+", qos=1)  # not its to read: nothing arrives
        await aggregator.publish("hfl/F/edge-1/model", b"m1", qos=1, retain=True)
        await worker.publish("hfl/F/edge-1/up/w2", b"spoofed", qos=1)  # denied
        await worker.publish("hfl/F/edge-1/up/w1", b"delta", qos=1)
        assert await receive_until(aggregator, "hfl/F/edge-1/up/+") == [
            ("hfl/F/edge-1/up/w1", b"delta", False)
        ]
        assert await receive_until(worker, "hfl/F/edge-1/model") == [
            ("hfl/F/edge-1/model", b"m1", False)
        ]
        await aggregator.publish("hfl/F/edge-1/model", b"m2", qos=1, retain=True)
        assert [p for _, p, _ in await receive_until(worker, "hfl/F/edge-1/model")] == [b"m2"]


@needs_mosquitto
def test_broken_config_raises_broker_error_with_log_tail() -> None:
    broker = MosquittoBroker(BrokerConfig(acl_file=Path("/nonexistent/hfl-acl.conf")))
    started = time.monotonic()
    with pytest.raises(BrokerError, match="Unable to open acl_file") as caught, broker:
        pass
    assert time.monotonic() - started < 5
    assert isinstance(caught.value, HflError)
    assert "exited with code" in str(caught.value)
    assert not broker.running


@needs_mosquitto
def test_port_held_by_another_process_is_an_error_not_a_false_start() -> None:
    with MosquittoBroker() as first:
        second = MosquittoBroker(BrokerConfig(port=first.port))
        with pytest.raises(BrokerError, match="Address already in use"):
            second.start()
        second.close()
        assert first.running


@needs_mosquitto
def test_stop_leaves_no_process_and_close_removes_the_workdir() -> None:
    broker = MosquittoBroker(BrokerConfig(port=free_port()))
    with broker:
        pid = broker.pid
        assert pid is not None
        workdir = broker.workdir
        assert broker.log_path.exists()
        broker.stop()
        assert (broker.running, broker.pid) == (False, None)
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
        broker.restart()
        pid = broker.pid
        assert pid is not None
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert not workdir.exists()


@needs_mosquitto
def test_a_relative_workdir_works(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # hfl-mqtt sim --out out/demo gives a relative path; mosquitto runs in the workdir.
    monkeypatch.chdir(tmp_path)
    with MosquittoBroker(BrokerConfig(), Path("relative/broker")) as broker:
        assert broker.running
        assert broker.workdir == tmp_path / "relative" / "broker"
