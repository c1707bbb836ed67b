"""The byte-counting proxy, in front of a real Mosquitto."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from pathlib import Path

import pytest

from hfl_mqtt.brokers import MosquittoBroker
from hfl_mqtt.config import FederationConfig
from hfl_mqtt.linkmeter import LinkMeter
from hfl_mqtt.sim import read_evaluations, simulate
from hfl_mqtt.transport.mqtt import MqttLink
from tests.fakes import needs_mosquitto

pytestmark = [
    pytest.mark.anyio,
    needs_mosquitto,
]


async def test_the_meter_counts_what_crosses_it_each_way(
    start_broker: Callable[..., MosquittoBroker],
) -> None:
    broker = start_broker()
    payload = b"x" * 100_000
    with LinkMeter(broker.host, broker.port) as meter:
        assert meter.counts().total == 0
        async with (
            MqttLink(meter.host, meter.port, "through-meter") as remote,
            MqttLink(broker.host, broker.port, "direct") as local,
        ):
            await local.subscribe("t/down")
            await remote.subscribe("t/up")
            await asyncio.sleep(0.1)
            for _ in range(3):
                await remote.publish("t/down", payload)  # up the link, to the broker
            await local.publish("t/up", payload)  # down the link, to the remote client
            for _ in range(3):
                assert (await local.receive()).payload == payload
            assert (await remote.receive()).payload == payload
            await asyncio.sleep(0.1)
        counts = meter.counts()
    # The payloads plus MQTT framing: CONNECT, SUBSCRIBE, PUBLISH/PUBACK headers.
    assert 3 * len(payload) < counts.up < 3 * len(payload) + 2000
    assert len(payload) < counts.down < len(payload) + 2000
    assert counts.connections == 1


def test_a_meter_tells_its_cpu_time_while_it_runs() -> None:
    meter = LinkMeter("127.0.0.1", 1)
    assert meter.cpu_seconds() is None  # not started
    with meter:
        used = meter.cpu_seconds()
        if Path("/proc").is_dir():
            assert used is not None
            assert 0 <= used < 60
    assert meter.cpu_seconds() is None  # stopped


def test_a_meter_in_front_of_nothing_refuses_connections_and_keeps_running() -> None:
    with LinkMeter("127.0.0.1", 1) as meter:  # port 1: nothing listens there
        with socket.create_connection((meter.host, meter.port), timeout=5) as sock:
            assert sock.recv(10) == b""  # closed at once
        assert meter.counts().connections == 0


async def test_sim_meters_every_network_link(tmp_path: Path) -> None:
    """Per-edge brokers: the cloud link carries the edges' deltas up and one model per edge
    down; the worker links carry everything else. On the wire, so a little above the payload."""
    config = FederationConfig.model_validate(
        {
            "federation": "metered",
            "brokers": "per_edge",
            "levels": [
                {"name": "cloud", "rounds": 3, "downlink_codec": "fp16"},
                {"name": "edge", "rounds": 2, "uplink_codec": "q8", "downlink_codec": "fp16"},
                {"name": "worker", "uplink_codec": "q8"},
            ],
            "fanout": [2, 2],
            "task": {"dataset": "digits", "model": "softmax"},
        }
    )
    summary = await simulate(config, tmp_path, meter_links=True, processes=1)
    links, payload = summary["links"], summary["bytes"]
    assert set(links) == {"cloud", "edge-0", "edge-1"}
    assert links["cloud"]["connections"] == 2  # the two bridges
    cloud_up, cloud_down = payload["edge"]["up"], 2 * payload["cloud"]["down"]
    assert cloud_up < links["cloud"]["up"] < 1.1 * cloud_up + 20_000
    assert cloud_down < links["cloud"]["down"] < 1.1 * cloud_down + 20_000
    workers_up = payload["worker"]["up"]
    assert workers_up < links["edge-0"]["up"] + links["edge-1"]["up"] < 1.1 * workers_up + 40_000
    events = read_evaluations(tmp_path / "metrics.jsonl")
    crossed = [event["cloud_link_bytes"] for event in events]
    assert len(crossed) == 3
    assert crossed == sorted(crossed)
    assert crossed[-1] <= links["cloud"]["up"] + links["cloud"]["down"]
    # Every meter's count at each evaluation, on the wall clock; and what each meter cost.
    assert [event["link_bytes"]["cloud"] for event in events] == crossed
    assert all(set(event["link_bytes"]) == set(links) for event in events)
    walls = [event["wall"] for event in events]
    assert walls == sorted(walls)
    assert all(link["cpu_seconds"] is None or link["cpu_seconds"] > 0 for link in links.values())
