"""A whole federation trains over TLS from ``hfl-mqtt plan``'s output alone: its brokers started
as written (a site broker bridged to the cloud's), every node from its own file, each logging
in as its own user with its own password and client certificate."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import aiomqtt
import pytest

from hfl_mqtt.brokers import free_port
from hfl_mqtt.config import FederationConfig, load_node
from hfl_mqtt.plan import OPERATOR, parse_address, write_plan
from hfl_mqtt.roles import run_node
from tests.fakes import needs_mosquitto
from tests.test_plan import federation, started

pytestmark = [pytest.mark.anyio, needs_mosquitto]

TARGET_ACCURACY = 0.85


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def test_a_federation_trains_over_tls_from_the_plan_alone(tmp_path: Path) -> None:
    spec = federation(free_port(), free_port())
    spec["levels"][0]["rounds"] = 5
    spec["task"] = {
        "dataset": "digits",
        "model": "softmax",
        "partition": {"scheme": "iid"},
        "train": {"epochs": 2, "learning_rate": 0.3},
    }
    out = tmp_path / "plan"
    plan = write_plan(FederationConfig.model_validate(spec), out, tls=True, client_certs=True)
    cloud, site = plan.brokers["cloud"], plan.brokers["site-a"]
    nodes = [load_node(path) for path in sorted((out / "nodes").glob("*.yaml"))]
    assert all(
        link.broker.tls is not None and link.broker.username == node.node
        for node in nodes
        for link in (node.upstream, node.downstream)
        if link is not None
    )
    with (
        started(out / "brokers" / "cloud" / "mosquitto.conf", cloud.port),
        started(out / "brokers" / "site-a" / "mosquitto.conf", site.port),
    ):
        async with asyncio.timeout(120):
            reports = await asyncio.gather(*(run_node(node) for node in nodes))
    root = next(r for r, n in zip(reports, nodes, strict=True) if n.node == "cloud")
    assert root.rounds == 5
    assert root.evaluations[-1]["accuracy"] >= TARGET_ACCURACY
    # Every node stayed within its ACL: a publish the broker refuses (PUBACK 135) fails the
    # node, and a subscription it may not read would have starved the rounds.
    assert all(not report.updates_rejected for report in reports)
    assert "hfl-mqtt run --config nodes/*.yaml" in (out / "START.md").read_text()


async def test_the_plans_acl_lets_a_node_move_to_its_fallback(tmp_path: Path) -> None:
    """One broker, as planned (users, passwords, the ACL): the operator moves worker-0 from
    edge-0 to edge-1 with a ``reparent`` control message; its join, its status and its deltas
    to edge-1 all pass the ACL (a refused publish would fail the node) and the run finishes."""
    spec = {
        "federation": "acl-move",
        "levels": [
            {"name": "cloud", "rounds": 30, "deadline_s": 20, "min_fraction": 1.0},
            {"name": "edge", "rounds": 1, "deadline_s": 20, "min_fraction": 1.0},
            {"name": "worker"},
        ],
        "fanout": [2, 2],
        "task": {"dataset": "digits", "model": "softmax", "partition": {"scheme": "iid"}},
    }
    port = free_port()
    out = tmp_path / "plan"
    plan = write_plan(
        FederationConfig.model_validate(spec), out, broker=parse_address(f"127.0.0.1:{port}")
    )
    nodes = {path.stem: load_node(path) for path in sorted((out / "nodes").glob("*.yaml"))}
    worker = nodes["worker-0"].upstream
    assert worker is not None
    assert worker.fallback_ids == ["edge-1", "cloud"]
    (broker,) = plan.brokers.values()
    operator = (out / "secrets" / f"{OPERATOR}.password").read_text().strip()
    events: list[dict[str, object]] = []
    with started(out / "brokers" / broker.name / "mosquitto.conf", port):
        async with asyncio.timeout(90), asyncio.TaskGroup() as group:
            tasks = {
                name: group.create_task(run_node(node, on_event=events.append))
                for name, node in nodes.items()
            }
            while len(events) < 2:
                await asyncio.sleep(0.02)
            async with aiomqtt.Client(
                "127.0.0.1", port, username=OPERATOR, password=operator
            ) as client:
                move = json.dumps({"cmd": "reparent", "parent": "edge-1"}).encode()
                await client.publish("hfl/acl-move/worker-0/ctl", move, qos=1)
    reports = {name: task.result() for name, task in tasks.items()}
    assert reports["worker-0"].reparented == 1
    assert "worker-0" in {a.sender for a in reports["edge-1"].arrivals}
    assert reports["cloud"].rounds == 30
