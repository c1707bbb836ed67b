"""Re-parenting: the rules (pure), the config, and nodes moving on real Mosquitto brokers."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
from structlog.testing import capture_logs

from hfl_mqtt.config import FallbackParent, FederationConfig, NodeConfig, UpstreamConfig
from hfl_mqtt.roles.messages import JOIN, LEAVE, parse_status_parent
from hfl_mqtt.roles.node import run_node
from hfl_mqtt.roles.parentage import Parentage
from hfl_mqtt.roles.report import NodeReport
from hfl_mqtt.topics import ctl_topic, join_topic, up_topic
from tests.fakes import needs_mosquitto
from tests.test_e2e import (
    Spawn,
    StartBroker,
    address,
    cli_run,
    federation,
    write_node_yaml,
)

# --- the rules -----------------------------------------------------------------------------------


def parentage(**fields: Any) -> Parentage:
    upstream = UpstreamConfig.model_validate(
        {"parent": "edge-0", "fallbacks": ["edge-1", "cloud"], **fields}
    )
    return Parentage(upstream, now=0.0)


@pytest.mark.parametrize(
    ("seen", "offline", "expected"),
    [
        ({}, "edge-0", "edge-1"),  # nothing known: the first fallback
        ({"edge-1": False}, "edge-0", "cloud"),  # the first is down: the next
        ({"edge-1": False, "cloud": True}, "edge-0", "cloud"),
        ({"edge-1": False, "cloud": False}, "edge-0", None),  # nowhere to go
        ({}, "edge-1", None),  # a fallback going down moves nobody
    ],
)
def test_a_parent_going_offline_moves_the_node_to_the_first_reachable_fallback(
    seen: dict[str, bool], offline: str, expected: str | None
) -> None:
    rules = parentage()
    for node, online in seen.items():
        assert rules.status(node, online) is None
    assert rules.status(offline, False) == expected


@pytest.mark.parametrize(("return_to_parent", "expected"), [(True, "edge-0"), (False, None)])
def test_the_node_returns_home_when_its_parent_is_back_if_so_configured(
    return_to_parent: bool, expected: str | None
) -> None:
    rules = parentage(return_to_parent=return_to_parent)
    rules.move(rules.status("edge-0", False) or "", now=1.0)
    assert rules.current == "edge-1"
    assert rules.status("edge-0", True) == expected


def test_a_silent_parent_counts_as_gone_after_its_timeout() -> None:
    rules = parentage(parent_timeout_s=2.0)
    rules.model_came(10.0)
    assert rules.due_in(11.0) == 1.0
    assert rules.silent(11.0) is None
    assert rules.silent(12.5) == "edge-1"
    assert rules.due_in(12.5) == 2.0  # one move per timeout
    assert parentage().due_in(100.0) is None


def test_a_move_by_hand_makes_a_new_home() -> None:
    rules = parentage()
    rules.move("edge-7", now=0.0, by_hand=True)
    assert (rules.home, rules.current) == ("edge-7", "edge-7")
    assert "edge-7" in rules.candidates
    assert rules.status("edge-0", True) is None  # the old home coming back changes nothing


def test_fallbacks_must_differ_from_the_parent_and_each_other() -> None:
    with pytest.raises(ValueError, match="fallbacks must differ"):
        UpstreamConfig.model_validate({"parent": "edge-0", "fallbacks": ["edge-0"]})
    with pytest.raises(ValueError, match="fallbacks must differ"):
        UpstreamConfig.model_validate({"parent": "edge-0", "fallbacks": ["a", "a"]})


def test_fallback_parents_fill_a_sibling_then_the_grandparent_and_the_adoptees() -> None:
    config = federation("fill", rounds=(2, 1), fanout=(3, 2)).model_copy(
        update={"fallback_parents": True}
    )
    nodes = {n.node: n for n in config.node_configs({})}
    up = nodes["worker-5"].upstream
    assert up is not None
    assert (up.parent, up.fallback_ids) == ("edge-2", ["edge-0", "cloud"])  # wraps around
    assert all(entry.broker is None for entry in up.fallbacks)  # one broker: its own
    down = nodes["edge-0"].downstream
    assert down is not None
    assert down.adoptees == ["worker-4", "worker-5"]
    cloud = nodes["cloud"].downstream
    assert cloud is not None
    assert cloud.adoptees == [f"worker-{i}" for i in range(6)]
    edge_up = nodes["edge-0"].upstream
    assert edge_up is not None
    assert edge_up.fallbacks == []  # under the root: nobody to stand in for it


# --- on a real broker ----------------------------------------------------------------------------


class Watcher:
    """A plain MQTT client keeping the last status of every node (and what each says its
    parent is)."""

    def __init__(self) -> None:
        self.parents: dict[str, str | None] = {}

    @contextlib.asynccontextmanager
    async def watching(self, host: str, port: int, federation: str) -> AsyncIterator[Watcher]:
        async with aiomqtt.Client(host, port) as client:
            await client.subscribe(f"hfl/{federation}/+/status", qos=1)

            async def read() -> None:
                async for message in client.messages:
                    node = str(message.topic).split("/")[2]
                    assert isinstance(message.payload, bytes)
                    self.parents[node] = parse_status_parent(message.payload)

            reader = asyncio.create_task(read())
            try:
                yield self
            finally:
                reader.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await reader

    async def until(self, node: str, parent: str | None, timeout: float = 30.0) -> None:
        async with asyncio.timeout(timeout):
            while self.parents.get(node) != parent:
                await asyncio.sleep(0.02)


async def publish(host: str, port: int, topic: str, payload: bytes) -> None:
    async with aiomqtt.Client(host, port) as client:
        await client.publish(topic, payload, qos=1)


def senders(report: NodeReport) -> set[str]:
    return {arrival.sender for arrival in report.arrivals}


async def wait_for(events: list[dict[str, Any]], count: int, timeout: float = 30.0) -> None:
    async with asyncio.timeout(timeout):
        while len(events) < count:
            await asyncio.sleep(0.02)


@needs_mosquitto
@pytest.mark.anyio
@pytest.mark.parametrize("delta", [None, "q8"], ids=["whole-models", "delta-coded"])
async def test_workers_rehome_when_their_edge_is_killed_and_go_back_when_it_returns(
    start_broker: StartBroker, spawn: Spawn, tmp_path: Path, delta: str | None
) -> None:
    """edge-0 runs as its own process and is SIGKILLed: the broker publishes its Last Will,
    its workers move to edge-1 (their first fallback) and the federation goes on. edge-0 is
    started again (it resumes from its checkpoint) and its workers go back to it (with delta
    coding: each move starts from the new parent's keyframe)."""
    broker = start_broker()
    config = federation(
        "rehome", rounds=(60, 1), fanout=(2, 2), deadline_s=30.0, min_fraction=0.5, delta=delta
    ).model_copy(update={"fallback_parents": True})
    nodes = {n.node: n for n in config.node_configs({"cloud": address(broker)})}
    edge = nodes["edge-0"].model_copy(update={"state_dir": tmp_path / "edge-0"})
    path = write_node_yaml(tmp_path, edge)
    for run in ("first", "second"):
        (tmp_path / run).mkdir()
    events: list[dict[str, Any]] = []
    watcher = Watcher()
    async with (
        watcher.watching(broker.host, broker.port, config.federation),
        asyncio.timeout(90),
        asyncio.TaskGroup() as group,
    ):
        tasks = {
            name: group.create_task(run_node(node, on_event=events.append))
            for name, node in nodes.items()
            if name != "edge-0"
        }
        process = cli_run(spawn, path, tmp_path / "first")
        await wait_for(events, 3)
        process.send_signal(signal.SIGKILL)
        assert await asyncio.to_thread(process.wait, 10) == -signal.SIGKILL
        await watcher.until("worker-0", "edge-1")
        await watcher.until("worker-1", "edge-1")
        moved_at = len(events)
        await wait_for(events, moved_at + 3)  # rounds go on without edge-0
        again = cli_run(spawn, path, tmp_path / "second")
        await watcher.until("worker-0", "edge-0")
        await watcher.until("worker-1", "edge-0")
    assert await asyncio.to_thread(again.wait, 30) == 0  # stopped by the cloud at the end
    reports = {name: task.result() for name, task in tasks.items()}
    assert reports["cloud"].rounds == 60
    for worker in ("worker-0", "worker-1"):
        assert reports[worker].reparented == 2
        assert worker in senders(reports["edge-1"])
    assert "unknown_sender" not in reports["edge-1"].updates_rejected
    assert events[-1]["accuracy"] > 0.85


@needs_mosquitto
@pytest.mark.anyio
async def test_an_operator_moves_a_worker_and_a_stranger_is_refused(
    start_broker: StartBroker,
) -> None:
    """A ``reparent`` control message moves worker-0 from edge-0 to edge-1, which adopts it
    (it is among its adoptees); edge-0 counts it gone. A node edge-1 may not adopt is refused,
    its join and its delta alike."""
    broker = start_broker()
    config = federation(
        "by-hand", rounds=(40, 1), fanout=(2, 2), deadline_s=30.0, min_fraction=1.0
    ).model_copy(update={"fallback_parents": True})
    nodes = {n.node: n for n in config.node_configs({"cloud": address(broker)})}
    fed = config.federation
    events: list[dict[str, Any]] = []
    watcher = Watcher()
    async with (
        watcher.watching(broker.host, broker.port, fed),
        asyncio.timeout(60),
        asyncio.TaskGroup() as group,
    ):
        tasks = {
            name: group.create_task(run_node(node, on_event=events.append))
            for name, node in nodes.items()
        }
        await wait_for(events, 2)
        move = json.dumps({"cmd": "reparent", "parent": "edge-1"}).encode()
        await publish(broker.host, broker.port, ctl_topic(fed, "worker-0"), move)
        await watcher.until("worker-0", "edge-1")
        await publish(broker.host, broker.port, join_topic(fed, "edge-1", "stranger"), JOIN)
        await publish(broker.host, broker.port, up_topic(fed, "edge-1", "stranger"), b"x")
        moved_at = len(events)
        await wait_for(events, moved_at + 3)
    reports = {name: task.result() for name, task in tasks.items()}
    assert reports["worker-0"].reparented == 1
    assert "worker-0" in senders(reports["edge-1"])
    assert reports["edge-1"].updates_rejected["unknown_sender"] == 2
    # edge-0 closed its rounds with worker-1 alone, without waiting for its deadline.
    assert max(e["seconds"] for e in events) < 30
    assert reports["cloud"].rounds == 40


@needs_mosquitto
@pytest.mark.anyio
async def test_a_silent_parent_is_left_after_its_timeout(start_broker: StartBroker) -> None:
    """worker-0's parent never publishes a model (it is online but silent); after
    ``parent_timeout_s`` the worker moves to its fallback, the cloud, which adopts it."""
    broker = start_broker()
    config = federation("silent", rounds=(100_000,), fanout=(2,), min_fraction=0.5)
    cloud, worker0, worker1 = config.node_configs({"cloud": address(broker)})
    assert cloud.downstream is not None
    assert worker0.upstream is not None
    down = cloud.downstream.model_copy(
        update={"children": ["worker-1"], "adoptees": ["worker-0"], "max_seconds": 4.0}
    )
    up = worker0.upstream.model_copy(
        update={
            "parent": "ghost",
            "fallbacks": [FallbackParent(parent="cloud")],
            "parent_timeout_s": 1.0,
        }
    )
    nodes: list[NodeConfig] = [
        cloud.model_copy(update={"downstream": down}),
        worker0.model_copy(update={"upstream": up}),
        worker1,
    ]
    # The ghost looks alive: a retained status online, and never a model.
    async with aiomqtt.Client(broker.host, broker.port) as client:
        await client.publish(
            f"hfl/{config.federation}/ghost/status", b'{"state": "online"}', 1, True
        )
    events: list[dict[str, Any]] = []
    async with asyncio.timeout(60), asyncio.TaskGroup() as group:
        tasks = [group.create_task(run_node(n, on_event=events.append)) for n in nodes]
    root, moved, _ = (task.result() for task in tasks)
    assert moved.reparented == 1
    assert "worker-0" in senders(root)
    assert events[-1]["seconds"] < 10


@needs_mosquitto
@pytest.mark.anyio
async def test_an_edge_moves_up_to_the_cloud_and_keeps_training(start_broker: StartBroker) -> None:
    """Four levels: edge-0 is moved by hand from region-0 to the cloud (an edge whose region is
    gone goes up); the cloud adopts it and takes its reports beside the regions'."""
    broker = start_broker()
    config = FederationConfig.model_validate(
        {
            "federation": "edge-up",
            "levels": [
                {"name": "cloud", "rounds": 30, "deadline_s": 30, "min_fraction": 0.5},
                {"name": "region", "rounds": 1, "deadline_s": 30, "min_fraction": 0.5},
                {"name": "edge", "rounds": 1, "deadline_s": 30},
                {"name": "worker"},
            ],
            "fanout": [2, 1, 2],
            "fallback_parents": True,
            "task": {"dataset": "digits", "model": "softmax", "partition": {"scheme": "iid"}},
        }
    )
    nodes = {n.node: n for n in config.node_configs({"cloud": address(broker)})}
    edge_up = nodes["edge-0"].upstream
    assert edge_up is not None
    assert edge_up.fallback_ids == ["region-1", "cloud"]
    fed = config.federation
    events: list[dict[str, Any]] = []
    watcher = Watcher()
    async with (
        watcher.watching(broker.host, broker.port, fed),
        asyncio.timeout(60),
        asyncio.TaskGroup() as group,
    ):
        tasks = {
            name: group.create_task(run_node(node, on_event=events.append))
            for name, node in nodes.items()
        }
        await wait_for(events, 2)
        move = json.dumps({"cmd": "reparent", "parent": "cloud"}).encode()
        await publish(broker.host, broker.port, ctl_topic(fed, "edge-0"), move)
        await watcher.until("edge-0", "cloud")
    reports = {name: task.result() for name, task in tasks.items()}
    assert reports["edge-0"].reparented == 1
    assert "edge-0" in senders(reports["cloud"])
    assert reports["cloud"].rounds == 30
    assert events[-1]["accuracy"] > 0.85


@needs_mosquitto
@pytest.mark.anyio
async def test_a_stale_leave_is_ignored_when_the_childs_status_says_it_is_home(
    start_broker: StartBroker,
) -> None:
    """A leave that waited in a parent's broker session since an earlier run (here: published
    by hand) must not drop a child whose retained status says it is still there."""
    broker = start_broker()
    config = federation(
        "stale-leave", rounds=(12, 1), fanout=(2, 2), deadline_s=30.0, min_fraction=1.0
    ).model_copy(update={"fallback_parents": True})
    nodes = {n.node: n for n in config.node_configs({"cloud": address(broker)})}
    events: list[dict[str, Any]] = []
    with capture_logs() as logs:
        async with asyncio.timeout(60), asyncio.TaskGroup() as group:
            tasks = {
                name: group.create_task(run_node(node, on_event=events.append))
                for name, node in nodes.items()
            }
            await wait_for(events, 2)
            leave = join_topic(config.federation, "edge-0", "worker-0")
            await publish(broker.host, broker.port, leave, LEAVE)
    reports = {name: task.result() for name, task in tasks.items()}
    assert not [e for e in logs if e["event"] == "child left"]
    assert [e["participants"] for e in events] == [2] * 12
    assert reports["edge-0"].updates_accepted == 2 * 12
