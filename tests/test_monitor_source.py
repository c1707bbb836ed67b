"""MonitorSource on a real Mosquitto: retained records of a hand-made tree reach the view."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from hfl_mqtt.brokers import BrokerConfig, MosquittoBroker
from hfl_mqtt.config import BrokerAddress
from hfl_mqtt.errors import AuthenticationError
from hfl_mqtt.monitor.source import MonitorSource, monitor_filters
from hfl_mqtt.monitor.view import FederationView
from hfl_mqtt.transport.mqtt import MqttLink
from tests.fakes import WAIT, needs_mosquitto

StartBroker = Callable[..., MosquittoBroker]


def record(node: str, role: str, level: int, parent: str | None, **fields: Any) -> bytes:
    value = {"node": node, "role": role, "level": level, "parent": parent, "status": "online"}
    value.update(t=time.time(), **fields)
    return json.dumps(value).encode()


async def publish_tree(host: str, port: int, fed: str = "demo") -> None:
    async with MqttLink(host, port, "publisher") as link:
        for node, role, level, parent in [
            ("cloud", "root", 0, None),
            ("edge-0", "aggregator", 1, "cloud"),
            ("w0", "worker", 2, "edge-0"),
        ]:
            payload = record(node, role, level, parent, version=4, traffic={"up": [1, 10, 0, 0]})
            await link.publish(f"hfl/{fed}/{node}/metrics", payload, retain=True)
            await link.publish(f"hfl/{fed}/{node}/status", b'{"state": "online"}', retain=True)
        await link.publish(f"hfl/{fed}/w0/status", b'{"state": "offline"}', retain=True)
        await link.publish(f"hfl/{fed}/w0/model", b"\x00not json", retain=True)
        await link.publish("hfl/other/w7/metrics", record("w7", "worker", 2, "x"), retain=True)


def test_filters() -> None:
    assert monitor_filters(None) == ["hfl/+/+/status", "hfl/+/+/metrics"]
    assert monitor_filters("demo") == ["hfl/demo/+/status", "hfl/demo/+/metrics"]
    with pytest.raises(ValueError, match="federation"):
        monitor_filters("a/#")


@pytest.mark.anyio
@needs_mosquitto
@pytest.mark.parametrize("federation", ["demo", None])
async def test_retained_records_reach_the_view(
    start_broker: StartBroker, federation: str | None
) -> None:
    broker = start_broker(BrokerConfig())
    await publish_tree(broker.host, broker.port)
    if federation is None:  # the first federation seen is taken: make it ours
        async with MqttLink(broker.host, broker.port, "other") as link:
            await link.publish("hfl/other/w7/metrics", b"", retain=True)
    view = FederationView(federation)
    address = BrokerAddress(host=broker.host, port=broker.port)
    async with MonitorSource(address, view) as source:
        assert source.link.client_id.startswith("monitor-")
        seen: list[int] = []
        source.listeners.append(lambda: seen.append(view.changes))
        reader = asyncio.create_task(source.run())
        try:
            async with asyncio.timeout(WAIT):
                while len(view.nodes) < 3 or view.nodes["w0"].status != "offline":
                    await source.changed.wait()
                    source.changed.clear()
            # a live record arrives too
            async with MqttLink(broker.host, broker.port, "edge") as link:
                update = record("edge-0", "aggregator", 1, "cloud", version=5)
                await link.publish("hfl/demo/edge-0/metrics", update, retain=True)
            async with asyncio.timeout(WAIT):
                while view.nodes["edge-0"].version != 5:
                    source.changed.clear()
                    await source.changed.wait()
        finally:
            reader.cancel()
    snap = view.snapshot(time.time())
    assert snap["federation"] == "demo"
    assert [(n["id"], n["status"]) for n in snap["nodes"]] == [
        ("cloud", "online"),
        ("edge-0", "online"),
        ("w0", "offline"),
    ]
    assert seen
    assert source.messages >= 6


@pytest.mark.anyio
@needs_mosquitto
async def test_a_refused_password_fails_at_once(
    start_broker: StartBroker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("HFL_MQTT_PASSWORD", raising=False)
    broker = start_broker(BrokerConfig(allow_anonymous=False))
    secret = tmp_path / "password"
    secret.write_text("wrong\n")
    address = BrokerAddress(
        host=broker.host, port=broker.port, username="watcher", password_file=secret
    )
    started = time.monotonic()
    with pytest.raises(AuthenticationError) as refused:
        async with MonitorSource(address, FederationView("demo"), connect_timeout=20):
            pass
    assert time.monotonic() - started < 5, "a refusal was retried"
    assert f"watcher@{broker.host}:{broker.port}" in str(refused.value)
