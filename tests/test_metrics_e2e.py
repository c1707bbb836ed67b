"""Metrics records on real Mosquitto: after a simulation every node of the tree has left its
record, retained, on the root's broker (through the bridges, with per-edge brokers)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from hfl_mqtt.brokers import BrokerConfig, MosquittoBroker
from hfl_mqtt.sim import simulate
from hfl_mqtt.topics import metrics_filter, parse_topic
from hfl_mqtt.transport.mqtt import MqttLink
from tests.fakes import needs_mosquitto
from tests.test_e2e import RUN_TIMEOUT_S, federation

pytestmark = [pytest.mark.anyio, needs_mosquitto]

WAIT = 10.0


async def retained_records(broker: MosquittoBroker, fed: str, count: int) -> dict[str, Any]:
    """The metrics records retained on ``broker``, by node, once ``count`` have come."""
    records: dict[str, Any] = {}
    async with MqttLink(broker.host, broker.port, "metrics-reader") as link:
        await link.subscribe(metrics_filter(fed))
        async with asyncio.timeout(WAIT):
            while len(records) < count:
                message = await link.receive()
                topic = parse_topic(message.topic)
                assert topic is not None
                assert message.retain
                records[topic.node] = json.loads(message.payload)
    return records


async def records_after(tmp_path: Path, brokers: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Simulate cloud, 2 edges, 4 workers; then start the root's broker again on its database
    (the simulation stopped it) and read what it retained."""
    config = federation(f"metrics-{brokers}", rounds=(3, 2), fanout=(2, 2), brokers=brokers)
    out = tmp_path / "out"
    summary = await asyncio.wait_for(simulate(config, out, processes=2), RUN_TIMEOUT_S)
    async with MosquittoBroker(BrokerConfig(), out / "run" / "broker-cloud") as cloud:
        records = await retained_records(cloud, config.federation, len(summary["nodes"]))
    return summary, records


def check_records(summary: dict[str, Any], records: dict[str, Any]) -> None:
    reports = {r["node"]: r for r in summary["nodes"]}
    assert set(records) == set(reports)
    for node, record in records.items():
        report = reports[node]
        assert record["node"] == node
        assert (record["role"], record["level"]) == (report["role"], report["level"])
        assert record["status"] in ("online", "idle")
        assert record["rss"] > 1 << 20
        assert record["cpu_s"] > 0
        assert record["uptime_s"] > 0
        assert record["traffic"]["metrics"][0] >= 1  # its own records, counted too
        if record["role"] != "root":
            assert record["traffic"]["up"][1] > 0  # deltas or reports sent up
    root = records["cloud"]
    assert root["parent"] is None
    accuracy = root["accuracy"]
    assert len(accuracy) == summary["global_rounds"]
    assert accuracy[-1][2] == pytest.approx(summary["final_accuracy"], abs=1e-4)
    assert accuracy[-1][3] == pytest.approx(summary["final_loss"], abs=1e-4)
    assert root["version"] == accuracy[-1][1]
    assert [a[0] for a in accuracy] == sorted(a[0] for a in accuracy)
    for edge in ("edge-0", "edge-1"):
        assert records[edge]["parent"] == "cloud"
        staleness = records[edge]["staleness"]
        assert staleness["n"] == sum(staleness["hist"]) > 0
        assert staleness["max"] >= staleness["p95"] >= staleness["p50"] >= 0
    for worker in (n for n, r in records.items() if r["role"] == "worker"):
        assert records[worker]["parent"] in ("edge-0", "edge-1")
        assert records[worker]["trained"] > 0
        assert records[worker]["version"] >= 1
        assert "staleness" not in records[worker]


async def test_every_node_leaves_its_record_on_the_broker(tmp_path: Path) -> None:
    summary, records = await records_after(tmp_path, "single")
    check_records(summary, records)
    reports = {r["node"]: r for r in summary["nodes"]}
    # One broker, no race with a bridge: the final records hold the final counts.
    for node, record in records.items():
        assert record.get("trained", 0) == reports[node]["trained"]
        assert record.get("accepted", 0) == reports[node]["updates_accepted"]
        assert record["round"] == reports[node]["rounds"]
    assert records["edge-0"]["staleness"]["n"] == reports["edge-0"]["updates_accepted"]


async def test_with_per_edge_brokers_the_root_broker_has_every_record(tmp_path: Path) -> None:
    summary, records = await records_after(tmp_path, "per_edge")
    assert summary["brokers"] == 3
    check_records(summary, records)
