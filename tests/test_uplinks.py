"""Fallback parents on other brokers: the config, the routing of ``Uplinks`` (memory brokers),
and workers moving between bridged Mosquitto brokers, by Last Will and by hand."""

from __future__ import annotations

import asyncio
import json
import signal
from pathlib import Path
from typing import Any

import aiomqtt
import pytest

from hfl_mqtt.brokers import free_port
from hfl_mqtt.config import BrokerAddress, FederationConfig, UpstreamConfig, load_node
from hfl_mqtt.errors import TransportError
from hfl_mqtt.plan import OPERATOR, parse_address, write_plan
from hfl_mqtt.roles.messages import parse_status_parent, status_payload
from hfl_mqtt.roles.node import run_node
from hfl_mqtt.roles.parentage import Parentage
from hfl_mqtt.roles.uplinks import Uplinks
from hfl_mqtt.topics import ctl_topic, join_topic, model_topic, status_topic, up_topic
from hfl_mqtt.transport.base import LinkBase
from hfl_mqtt.transport.memory import MemoryBroker, MemoryLink
from tests.fakes import needs_mosquitto
from tests.test_e2e import Spawn, StartBroker, address, cli_run, federation, write_node_yaml
from tests.test_plan import started
from tests.test_reparenting import Watcher, senders, wait_for

FED = "fed"
HOME = BrokerAddress(host="home", port=1)
OTHER = BrokerAddress(host="other", port=2)

# --- the config ---------------------------------------------------------------------------------


def test_a_fallback_is_an_id_or_a_parent_with_its_broker() -> None:
    upstream = UpstreamConfig.model_validate(
        {
            "broker": {"host": "home", "port": 1},
            "parent": "edge-0",
            "fallbacks": ["cloud", {"parent": "edge-1", "broker": {"host": "other", "port": 2}}],
        }
    )
    assert upstream.fallback_ids == ["cloud", "edge-1"]
    assert upstream.broker_of("edge-1") == OTHER
    assert upstream.broker_of("cloud") == HOME  # a bare id: on the node's own broker
    assert upstream.broker_of("edge-9") == HOME  # a parent named by hand: the same
    dumped = upstream.model_dump(mode="json", exclude_defaults=True)
    assert dumped["fallbacks"][0] == "cloud"  # written back as it was given
    assert UpstreamConfig.model_validate(dumped) == upstream
    with pytest.raises(ValueError, match="fallbacks must differ"):
        UpstreamConfig.model_validate({"parent": "a", "fallbacks": ["b", {"parent": "b"}]})


def test_per_edge_fallbacks_name_the_broker_each_parent_is_on() -> None:
    config = federation("fill", rounds=(2, 1), fanout=(2, 2), brokers="per_edge").model_copy(
        update={"fallback_parents": True}
    )
    cloud, edge0, edge1 = (BrokerAddress(port=p) for p in (1883, 1884, 1885))
    nodes = {
        n.node: n for n in config.node_configs({"cloud": cloud, "edge-0": edge0, "edge-1": edge1})
    }
    up = nodes["worker-0"].upstream
    assert up is not None
    assert up.broker == edge0
    assert [(f.parent, f.broker) for f in up.fallbacks] == [("edge-1", edge1), ("cloud", cloud)]
    edge1_down = nodes["edge-1"].downstream
    assert edge1_down is not None
    assert edge1_down.adoptees == ["worker-0", "worker-1"]


# --- the routing, on memory brokers -------------------------------------------------------------


def upstream_config() -> UpstreamConfig:
    return UpstreamConfig(
        broker=HOME,
        parent="edge-0",
        fallbacks=[{"parent": "edge-1", "broker": OTHER}, "cloud"],  # type: ignore[list-item]
    )


@pytest.mark.anyio
async def test_uplinks_route_a_parents_topics_to_its_broker_and_the_nodes_own_to_every_one() -> (
    None
):
    home_broker, other_broker = MemoryBroker(), MemoryBroker()
    status = status_topic(FED, "w")

    def open_link(broker: BrokerAddress) -> LinkBase:
        assert broker == OTHER
        return MemoryLink(other_broker, "w", status_topic=status)

    await other_broker.publish(model_topic(FED, "edge-1"), b"edge-1's model", True)
    async with (
        MemoryLink(home_broker, "w", status_topic=status) as home,
        Uplinks(home, upstream_config(), federation=FED, node="w", open_link=open_link) as links,
    ):
        await links.subscribe(ctl_topic(FED, "w"))
        await links.subscribe(model_topic(FED, "edge-1"))  # waits for a link there
        await links.subscribe(status_topic(FED, "cloud"))  # on the home broker
        assert links.receive_nowait() is None
        assert not links.connected_to("edge-1")
        assert links.connected_to("cloud")

        await links.connect("edge-1")
        first = await links.receive()
        assert (first.topic, first.payload) == (model_topic(FED, "edge-1"), b"edge-1's model")
        links.online_payload = status_payload("online", parent="edge-1")
        await links.publish(status, links.online_payload, retain=True)
        for broker in (home_broker, other_broker):  # the node's status: on both brokers
            assert parse_status_parent(broker.retained[status]) == "edge-1"
        await links.publish(join_topic(FED, "edge-1", "w"), b"join")
        await links.publish(up_topic(FED, "edge-0", "w"), b"leave")
        assert other_broker.published == 4  # edge-1's model, w online, w's status, the join
        # Control messages come from either broker, through one receive.
        await other_broker.publish(ctl_topic(FED, "w"), b"there", False)
        await home_broker.publish(ctl_topic(FED, "w"), b"here", False)
        got = {(await links.receive()).payload, (await links.receive()).payload}
        assert got == {b"there", b"here"}
    assert parse_status_parent(other_broker.retained[status]) is None  # offline, on leaving


@pytest.mark.anyio
async def test_a_message_that_reached_a_link_is_waiting_at_once_in_order() -> None:
    """What reached a link is seen by ``receive_nowait`` with no step of the pumps between (a
    worker asks the moment its training ends), and nothing is reordered or lost."""
    broker = MemoryBroker()
    async with (
        MemoryLink(broker, "w") as home,
        Uplinks(home, upstream_config(), federation=FED, node="w") as links,
    ):
        await links.subscribe(ctl_topic(FED, "w"))
        for n in range(5):
            await broker.publish(ctl_topic(FED, "w"), b"%d" % n, False)
        assert links.receive_nowait() is not None  # no await since: the pump has not run
        await asyncio.sleep(0)  # the pump moves some
        rest = [links.receive_nowait() for _ in range(4)]
        assert [m.payload for m in rest if m is not None] == [b"1", b"2", b"3", b"4"]
        assert links.receive_nowait() is None


@pytest.mark.anyio
async def test_an_unreachable_fallback_broker_sends_the_node_to_the_next_fallback() -> None:
    def open_link(broker: BrokerAddress) -> LinkBase:
        raise TransportError("connection refused")

    upstream = upstream_config()
    rules = Parentage(upstream, now=0.0)
    async with (
        MemoryLink(MemoryBroker(), "w") as home,
        Uplinks(home, upstream, federation=FED, node="w", open_link=open_link) as links,
    ):
        assert await links.reach("edge-1", rules, by_hand=False) == "cloud"
        rules.status("cloud", False)
        assert await links.reach("edge-1", rules, by_hand=True) is None  # by hand: stay


# --- on bridged Mosquitto brokers ---------------------------------------------------------------


@needs_mosquitto
@pytest.mark.anyio
async def test_workers_move_to_an_edge_on_another_broker_when_theirs_is_killed(
    start_broker: StartBroker, spawn: Spawn, tmp_path: Path
) -> None:
    """Each edge serves its workers on its own broker, bridged to the cloud's. edge-0 runs as a
    process and is SIGKILLed: its broker publishes its Last Will, and its workers connect to
    edge-1's broker, join edge-1 there and train on; edge-0 comes back and they return."""
    from tests.test_e2e import start_bridged

    config = federation(
        "cross", rounds=(60, 1), fanout=(2, 2), brokers="per_edge", deadline_s=30.0
    ).model_copy(update={"fallback_parents": True})
    cloud, edges = await start_bridged(start_broker, config)
    brokers = {"cloud": address(cloud), **{name: address(b) for name, b in edges.items()}}
    nodes = {n.node: n for n in config.node_configs(brokers)}
    edge = nodes["edge-0"].model_copy(update={"state_dir": tmp_path / "edge-0"})
    path = write_node_yaml(tmp_path, edge)
    for run in ("first", "second"):
        (tmp_path / run).mkdir()
    events: list[dict[str, Any]] = []
    home = edges["edge-0"]
    on_edge1 = Watcher()
    at_home = Watcher()
    async with (
        at_home.watching(home.host, home.port, config.federation),
        on_edge1.watching(edges["edge-1"].host, edges["edge-1"].port, config.federation),
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
        for worker in ("worker-0", "worker-1"):
            await at_home.until(worker, "edge-1")  # what their home broker says
            await on_edge1.until(worker, "edge-1")  # and edge-1's
        moved_at = len(events)
        await wait_for(events, moved_at + 3)  # rounds go on without edge-0
        again = cli_run(spawn, path, tmp_path / "second")
        for worker in ("worker-0", "worker-1"):
            await at_home.until(worker, "edge-0")
    assert await asyncio.to_thread(again.wait, 30) == 0
    reports = {name: task.result() for name, task in tasks.items()}
    assert reports["cloud"].rounds == 60
    for worker in ("worker-0", "worker-1"):
        assert reports[worker].reparented == 2
        assert worker in senders(reports["edge-1"])
    assert "unknown_sender" not in reports["edge-1"].updates_rejected  # a stale one may be
    assert events[-1]["accuracy"] > 0.85


@needs_mosquitto
@pytest.mark.anyio
async def test_the_plans_acl_lets_a_worker_move_to_an_edge_on_another_broker(
    tmp_path: Path,
) -> None:
    """From ``hfl-mqtt plan`` alone: edge-0's subtree is on site-a (bridged to the cloud's
    broker), edge-1's on the cloud's. The operator moves worker-0 to edge-1: it logs in to the
    cloud's broker as itself, and its join, status and deltas there pass the ACL."""
    from tests.test_plan import federation as planned

    spec = planned(free_port(), free_port())
    spec["federation"] = "acl-cross"
    spec["levels"][0].update({"rounds": 30, "min_fraction": 1.0})
    spec["levels"][1]["min_fraction"] = 1.0
    spec["task"] = {"dataset": "digits", "model": "softmax", "partition": {"scheme": "iid"}}
    out = tmp_path / "plan"
    cloud_port = spec["deployment"]["brokers"]["cloud"]["port"]
    plan = write_plan(
        FederationConfig.model_validate(spec), out, broker=parse_address(f"127.0.0.1:{cloud_port}")
    )
    nodes = {path.stem: load_node(path) for path in sorted((out / "nodes").glob("*.yaml"))}
    site = plan.brokers["site-a"]
    operator = (out / "secrets" / f"{OPERATOR}.password").read_text().strip()
    events: list[dict[str, object]] = []
    with (
        started(out / "brokers" / "cloud" / "mosquitto.conf", cloud_port),
        started(out / "brokers" / "site-a" / "mosquitto.conf", site.port),
    ):
        async with asyncio.timeout(90), asyncio.TaskGroup() as group:
            tasks = {
                name: group.create_task(run_node(node, on_event=events.append))
                for name, node in nodes.items()
            }
            while len(events) < 2:
                await asyncio.sleep(0.02)
            async with aiomqtt.Client(
                "127.0.0.1", site.port, username=OPERATOR, password=operator
            ) as client:
                move = json.dumps({"cmd": "reparent", "parent": "edge-1"}).encode()
                await client.publish("hfl/acl-cross/worker-0/ctl", move, qos=1)
    reports = {name: task.result() for name, task in tasks.items()}
    assert reports["worker-0"].reparented == 1
    assert "worker-0" in senders(reports["edge-1"])
    assert "unknown_sender" not in reports["edge-1"].updates_rejected  # a stale one may be
    assert reports["cloud"].rounds == 30
