"""The MQTT link's own failure modes, on real Mosquitto processes started by the tests.

A broker that refuses us for good, a publish the ACL denies, a broker that dies while we
subscribe, one that stops answering, one that comes back with no memory: each has one expected
outcome, and none leaves a caller waiting forever.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest

import hfl_mqtt.transport.mqtt as mqtt_module
from hfl_mqtt.brokers import BrokerConfig, MosquittoBroker, render_acl
from hfl_mqtt.errors import (
    AuthenticationError,
    PublishRefusedError,
    PublishTimeoutError,
    TransportError,
)
from hfl_mqtt.topics import model_topic, up_topic
from hfl_mqtt.transport.mqtt import MqttLink
from tests.fakes import needs_mosquitto

pytestmark = [pytest.mark.anyio, needs_mosquitto]

StartBroker = Callable[..., MosquittoBroker]


def acl_broker(start_broker: StartBroker, tmp_path: Path) -> MosquittoBroker:
    acl = tmp_path / "acl.conf"
    acl.write_text(render_acl())
    return start_broker(BrokerConfig(acl_file=acl))


async def test_a_publish_the_acl_denies_raises_with_reason_135_and_is_not_delivered(
    start_broker: StartBroker, tmp_path: Path
) -> None:
    broker = acl_broker(start_broker, tmp_path)
    async with (
        MqttLink(broker.host, broker.port, "edge-1") as parent,
        MqttLink(broker.host, broker.port, "pi-7") as device,
    ):
        await parent.subscribe(up_topic("farm", "edge-1", "+"))
        with pytest.raises(PublishRefusedError) as refused:
            await device.publish(up_topic("farm", "edge-1", "pi-8"), b"spoofed")
        assert refused.value.code == 135
        assert "pi-7" in str(refused.value)
        assert "not authori" in str(refused.value).lower()
        assert device.stats.publishes_refused == 1
        await device.publish(up_topic("farm", "edge-1", "pi-7"), b"mine")
        async with asyncio.timeout(5):
            message = await parent.receive()
        assert message.topic.endswith("/up/pi-7")  # the spoofed one never arrived
        assert message.payload == b"mine"
        assert parent.receive_nowait() is None


async def test_a_broker_that_refuses_us_for_good_fails_the_link_at_once_for_every_caller(
    start_broker: StartBroker,
) -> None:
    """Connected anonymously, then the broker comes back refusing anonymous clients: the
    reconnect is refused (not authorized), so ``receive`` and ``publish`` raise at once instead
    of waiting for a connection that will never come."""
    broker = start_broker(BrokerConfig())
    async with MqttLink(broker.host, broker.port, "pi-7") as link:
        waiting = asyncio.create_task(link.receive())
        await asyncio.to_thread(broker.stop)
        broker.config = broker.config.model_copy(update={"allow_anonymous": False})
        await asyncio.to_thread(broker.start)
        async with asyncio.timeout(10):
            with pytest.raises(AuthenticationError, match="not authorized"):
                await waiting
        started = time.monotonic()
        with pytest.raises(AuthenticationError):
            await link.publish("hfl/farm/pi-7/status", b"x")
        assert time.monotonic() - started < 1


async def test_connecting_with_no_right_to_fails_at_once(start_broker: StartBroker) -> None:
    broker = start_broker(BrokerConfig(allow_anonymous=False))
    started = time.monotonic()
    with pytest.raises(AuthenticationError) as refused:
        async with MqttLink(broker.host, broker.port, "pi-7", connect_timeout=20):
            pass
    assert time.monotonic() - started < 5, "a refusal was retried"
    assert f"{broker.host}:{broker.port}" in str(refused.value)
    assert "reason code 135" in str(refused.value)


async def test_a_subscribe_made_while_the_broker_is_down_is_replayed_on_reconnect(
    start_broker: StartBroker,
) -> None:
    broker = start_broker(BrokerConfig(persistence=False))
    async with (
        MqttLink(broker.host, broker.port, "reader", max_backoff=0.5) as reader,
        MqttLink(broker.host, broker.port, "writer", max_backoff=0.5) as writer,
    ):
        await asyncio.to_thread(broker.kill)
        subscribing = asyncio.create_task(reader.subscribe(up_topic("farm", "edge-1", "+")))
        await asyncio.sleep(0.5)
        await asyncio.to_thread(broker.start)
        async with asyncio.timeout(10):
            await subscribing
        await writer.publish(up_topic("farm", "edge-1", "pi-7"), b"delta")
        async with asyncio.timeout(5):
            message = await reader.receive()
        assert message.payload == b"delta"


async def test_a_publish_the_broker_never_acknowledges_is_a_timeout_by_type(
    start_broker: StartBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The broker freezes (SIGSTOP): connected as far as TCP knows, but no PUBACK comes."""
    monkeypatch.setattr(mqtt_module, "PUBLISH_TIMEOUT_S", 0.5)
    broker = start_broker(BrokerConfig())
    async with MqttLink(broker.host, broker.port, "pi-7") as link:
        assert broker.pid is not None
        os.kill(broker.pid, signal.SIGSTOP)
        try:
            with pytest.raises(PublishTimeoutError, match="not acknowledged"):
                await link.publish("hfl/farm/pi-7/status", b"x")
        finally:
            os.kill(broker.pid, signal.SIGCONT)


async def test_a_broker_without_persistence_gets_our_retained_model_back(
    start_broker: StartBroker,
) -> None:
    """After a restart with no database the broker has no retained model: the link that owns
    it publishes it again, so a child that joins afterwards still gets it at once."""
    broker = start_broker(BrokerConfig(persistence=False))
    topic = model_topic("farm", "edge-1")
    big = os.urandom(3 << 20)  # chunked: three retained chunks and the marker
    async with MqttLink(broker.host, broker.port, "edge-1", max_backoff=0.5) as edge:
        await edge.publish(topic, big, retain=True)
        await asyncio.to_thread(broker.kill)
        await asyncio.to_thread(broker.start)
        async with asyncio.timeout(10):
            while edge.reconnects == 0 or not edge.connected:
                await asyncio.sleep(0.05)
        async with MqttLink(broker.host, broker.port, "late-child") as child:
            await child.subscribe(topic, chunked_retained=True)
            async with asyncio.timeout(10):
                message = await child.receive()
    assert message.payload == big


async def test_using_a_link_that_is_not_open_is_an_error() -> None:
    link = MqttLink("127.0.0.1", 1, "nobody")
    with pytest.raises(TransportError, match="not open"):
        await link.publish("hfl/x/y/status", b"x")
    with pytest.raises(TransportError, match="not open"):
        await link.receive()


async def test_a_link_cannot_be_entered_twice(start_broker: StartBroker) -> None:
    broker = start_broker(BrokerConfig())
    link = MqttLink(broker.host, broker.port, "once")
    async with link:
        with pytest.raises(RuntimeError, match="only once"):
            await link.__aenter__()
        assert link.connected


@pytest.mark.parametrize("persistent", [True, False])
async def test_only_a_persistent_session_has_messages_kept_for_it_while_away(
    start_broker: StartBroker, persistent: bool
) -> None:
    """A reader without a persistent session (the monitor) leaves nothing at the broker: what
    is published while it is away is not queued for it."""
    broker = start_broker(BrokerConfig())
    topic = up_topic("farm", "edge-1", "w-1")
    async with MqttLink(broker.host, broker.port, "reader", persistent_session=persistent) as r:
        await r.subscribe(topic)
    async with MqttLink(broker.host, broker.port, "sender") as sender:
        await sender.publish(topic, b"while away")
    async with MqttLink(broker.host, broker.port, "reader") as reader:
        try:
            async with asyncio.timeout(1.5):
                message = await reader.receive()
        except TimeoutError:
            message = None
    assert (message is not None) == persistent
    if message is not None:
        assert message.payload == b"while away"
