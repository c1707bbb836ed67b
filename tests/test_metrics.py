"""The metrics record: what it holds, when it is published (a controllable clock), the
process sampler, and whole federations on memory brokers leaving a record per node."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import numpy as np
import pytest

from hfl_mqtt import metrics
from hfl_mqtt.config import (
    BrokerAddress,
    FederationConfig,
    LevelConfig,
    TaskConfig,
    UpstreamConfig,
)
from hfl_mqtt.errors import PublishRefusedError
from hfl_mqtt.metrics import (
    ACCURACY_HISTORY,
    MetricsPublisher,
    NodeNow,
    StalenessTally,
    process_usage,
)
from hfl_mqtt.roles.node import run_node
from hfl_mqtt.roles.report import Arrival, NodeReport
from hfl_mqtt.roles.uplinks import Uplinks
from hfl_mqtt.tasks.base import TrainConfig
from hfl_mqtt.topics import metrics_topic, status_topic
from hfl_mqtt.transport.base import Incoming, LinkBase, LinkStats
from hfl_mqtt.transport.memory import MemoryBroker, MemoryLink
from tests.fakes import FED, aggregator_config, memory_links, worker_config

pytestmark = pytest.mark.anyio


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def stale(*values: int) -> NodeReport:
    report = NodeReport("edge-0", "aggregator", 1)
    for value in values:
        report.accept(Arrival(0.0, "w", value, 1.0), f"id-{len(report.arrivals)}")
    return report


# --- the staleness summary ----------------------------------------------------------------------


def test_staleness_summary_matches_numpy_and_buckets_16_and_more() -> None:
    values = [0] * 30 + [1] * 8 + [2] * 2 + [5, 17, 40]
    tally = StalenessTally()
    report = stale(*values[:20])
    tally.update(report)
    for value in values[20:]:  # read incrementally: each arrival once
        report.accept(Arrival(0.0, "w", value, 1.0), "x")
    tally.update(report)
    summary = tally.summary()
    assert summary is not None
    p50, p95 = np.percentile(values, [50, 95])
    assert summary["n"] == len(values)
    assert summary["p50"] == pytest.approx(p50, abs=1e-3)
    assert summary["p95"] == pytest.approx(p95, abs=1e-3)
    assert summary["mean"] == pytest.approx(np.mean(values), abs=1e-3)
    assert summary["max"] == 40
    hist = summary["hist"]
    assert len(hist) == metrics.STALENESS_BUCKETS
    assert hist[:3] == [30, 8, 2]
    assert hist[5] == 1
    assert hist[16] == 2  # 17 and 40: 16 and more


def test_staleness_histogram_drops_trailing_zeros_and_nothing_means_none() -> None:
    assert StalenessTally().summary() is None
    tally = StalenessTally()
    tally.update(stale(0, 0, 1))
    summary = tally.summary()
    assert summary == {"n": 3, "mean": 0.333, "p50": 0, "p95": 0.9, "max": 1, "hist": [2, 1]}


# --- the process --------------------------------------------------------------------------------


def test_process_usage_is_read_from_proc_and_cached_for_half_a_second() -> None:
    first = process_usage(now=5000.0)
    assert first.rss > 1 << 20
    assert first.cpu_s > 0
    assert process_usage(now=5000.4) is first
    sum(i * i for i in range(200_000))  # some CPU time
    later = process_usage(now=5000.6)
    assert later is not first
    assert later.cpu_s >= first.cpu_s


def test_process_usage_falls_back_to_resource_without_proc(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(metrics, "_read_proc", lambda: None)
    usage = process_usage(now=-1e9)  # older than any cached reading
    assert usage.rss > 1 << 20
    assert usage.cpu_s > 0


# --- publishing ---------------------------------------------------------------------------------


class Node:
    """What a publisher reads of a node, changed by hand."""

    def __init__(self, role: str = "aggregator") -> None:
        self.report = NodeReport("edge-0", role, 1)
        self.stats = LinkStats()
        self.now = NodeNow("cloud", "online", 3)

    def publisher(
        self, channel: Any, clock: Clock, interval: float = 1.0, **settings: Any
    ) -> MetricsPublisher:
        config = aggregator_config("edge-0", ["w"], parent="cloud").model_copy(
            update={"metrics_interval_s": interval, **settings}
        )
        return MetricsPublisher(
            config,
            self.report,
            channel,
            links=lambda: [self.stats, self.stats],  # one connection for both sides
            now=lambda: self.now,
            clock=clock,
            wall=lambda: 1.7e9 + clock.now,
        )


def retained(broker: MemoryBroker, node: str = "edge-0") -> dict[str, Any]:
    value: dict[str, Any] = json.loads(broker.retained[metrics_topic(FED, node)])
    return value


async def test_record_holds_the_spec_fields_and_leaves_out_empty_ones() -> None:
    broker, clock, node = MemoryBroker(), Clock(), Node()
    node.stats.count_sent("model", 1000)
    node.stats.count_received("up", 300)
    node.stats.reconnects = 2
    node.report.rounds = 4
    node.report.reject("stale", "hfl/fed/edge-0/up/w", "base 1, version 3")
    node.report.accept(Arrival(0.1, "w", 2, 0.5), "u1")
    async with MemoryLink(broker, "edge-0") as link:
        publisher = node.publisher(link, clock)
        assert await publisher.publish_if_due()
    record = retained(broker)
    assert record["node"] == "edge-0"
    assert (record["role"], record["level"], record["parent"]) == ("aggregator", 1, "cloud")
    assert (record["status"], record["version"], record["round"]) == ("online", 3, 4)
    assert record["t"] == pytest.approx(1.7e9 + 1000.0)
    assert record["accepted"] == 1
    assert record["rejected"] == {"stale": 1}
    assert record["last_error"] == "stale: base 1, version 3"
    assert record["staleness"] == {
        "n": 1,
        "mean": 2,
        "p50": 2,
        "p95": 2,
        "max": 2,
        "hist": [0, 0, 1],
    }
    assert record["traffic"] == {"model": [1, 1000, 0, 0], "up": [0, 0, 1, 300]}  # counted once
    assert record["reconnects"] == 2
    assert record["pid"] > 0
    assert record["rss"] > 0
    assert "trained" not in record  # zero: left out
    assert "accuracy" not in record  # not the root
    assert "children_down" not in record  # none down: left out


async def test_the_record_names_the_children_that_are_down() -> None:
    broker, clock, node = MemoryBroker(), Clock(), Node()
    node.now = NodeNow("cloud", "online", 3, ("w-2", "w-7"))
    async with MemoryLink(broker, "edge-0") as link:
        assert await node.publisher(link, clock).publish_if_due()
    assert retained(broker)["children_down"] == ["w-2", "w-7"]


async def test_a_worker_record_has_no_staleness_and_the_root_has_its_evaluations() -> None:
    broker, clock = MemoryBroker(), Clock()
    worker = Node("worker")
    worker.report.trained = 5
    root = Node("root")
    root.now = NodeNow(None, "online", 7)
    root.report.evaluations = [
        {"version": v, "accuracy": 0.5, "loss": 1.0, "seconds": v / 10, "tree_bytes": v * 100}
        for v in range(1, 6 + ACCURACY_HISTORY - 2)
    ] + [
        {"version": 6, "accuracy": 0.81234567, "loss": 0.5, "seconds": 1.23456, "tree_bytes": 999},
        {"version": 7, "accuracy": 0.9, "loss": 0.25, "seconds": 2.5, "tree_bytes": 1234},
    ]
    async with MemoryLink(broker, "x") as link:
        worker_record = worker.publisher(link, clock).record()
        root_record = root.publisher(link, clock).record()
    assert worker_record["trained"] == 5
    assert "staleness" not in worker_record
    assert root_record["parent"] is None
    # Its latest evaluations only, each with the bytes the tree had carried.
    assert len(root_record["accuracy"]) == ACCURACY_HISTORY
    assert root_record["accuracy"][-2:] == [[1.23, 6, 0.8123, 0.5, 999], [2.5, 7, 0.9, 0.25, 1234]]


async def test_publishes_at_most_once_per_interval_and_only_on_a_change() -> None:
    broker, clock, node = MemoryBroker(), Clock(), Node()
    async with MemoryLink(broker, "edge-0") as link:
        publisher = node.publisher(link, clock, interval=1.0)
        assert await publisher.publish_if_due()
        node.report.rounds = 1
        clock.now += 0.5
        assert not await publisher.publish_if_due()  # a change, but too soon
        assert publisher.due_in() == pytest.approx(0.5)
        clock.now += 0.5
        assert await publisher.publish_if_due()
        assert retained(broker)["round"] == 1
        # Time, uptime, memory, CPU and the records' own bytes move by themselves: no change.
        clock.now += 5.0
        process_usage(now=clock.now + 100)  # a fresh reading
        assert not await publisher.publish_if_due()
        assert link.stats.by_topic_kind["metrics"][0] == 2
        # Any other traffic is a change.
        node.stats.count_received("model", 10)
        assert await publisher.publish_if_due()
        assert publisher.published == 3
        # A clean stop: the final record goes out whatever the interval, if it says anything new.
        node.now = NodeNow("cloud", "idle", 3)
        assert await publisher.publish_if_due(final=True)
        assert retained(broker)["status"] == "idle"
        assert not await publisher.publish_if_due(final=True)


async def test_a_node_that_dropped_out_publishes_nothing_until_back() -> None:
    broker, clock, node = MemoryBroker(), Clock(), Node("worker")
    node.now = NodeNow("edge-0", "offline", 2)
    async with MemoryLink(broker, "edge-0") as link:
        publisher = node.publisher(link, clock)
        assert not await publisher.publish_if_due()
        node.now = NodeNow("edge-0", "online", 2)
        assert await publisher.publish_if_due()


async def test_a_node_back_from_a_dropout_says_so_within_a_second() -> None:
    """A node's turn comes every interval (a worker's: 5 s); one that was away at its turn
    looks again every second (dropouts are frequent: its record used to wait 20 s or more)."""
    broker, node = MemoryBroker(), Node("worker")
    config = worker_config("w", "edge-0").model_copy(update={"metrics_interval_s": 3.0})
    async with MemoryLink(broker, "w") as link, asyncio.TaskGroup() as tasks:
        publisher = MetricsPublisher(
            config, node.report, link, links=lambda: [node.stats], now=lambda: node.now
        )
        task = publisher.start(tasks)
        await asyncio.sleep(0.05)
        assert publisher.published == 1  # at start
        node.now = NodeNow("edge-0", "offline", 2)
        node.report.trained += 1  # something to say, once back
        async with asyncio.timeout(8):  # its next turn: within 2 intervals (its phase): away
            while not publisher._away:
                await asyncio.sleep(0.05)
        node.now = NodeNow("edge-0", "online", 2)
        back = time.monotonic()
        async with asyncio.timeout(3):
            while publisher.published == 1:
                await asyncio.sleep(0.05)
        assert time.monotonic() - back < 1.5  # not at its next turn, 3 s on
        task.cancel()


async def test_a_refused_publish_is_the_last_error_not_a_crash() -> None:
    class Refusing:
        async def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
            raise PublishRefusedError(f"not authorized to publish to {topic}", code=135)

        async def subscribe(self, topic_filter: str, *, chunked_retained: bool = False) -> None:
            raise AssertionError("not used")

        async def receive(self) -> Incoming:
            raise AssertionError("not used")

        def receive_nowait(self) -> Incoming | None:
            return None

    clock, node = Clock(), Node()
    publisher = node.publisher(Refusing(), clock)
    assert not await publisher.publish_if_due()
    assert node.report.last_error is not None
    assert "not authorized" in node.report.last_error
    assert publisher.due_in() == pytest.approx(1.0)  # no retry storm


async def test_run_publishes_on_the_interval_and_stop_sends_the_final_record() -> None:
    broker, node = MemoryBroker(), Node()
    async with MemoryLink(broker, "edge-0") as link, asyncio.TaskGroup() as tasks:
        config = aggregator_config("edge-0", ["w"], parent="cloud").model_copy(
            update={"metrics_interval_s": 0.02}
        )
        publisher = MetricsPublisher(
            config, node.report, link, links=lambda: [node.stats], now=lambda: node.now
        )
        task = publisher.start(tasks)
        assert task.get_name() == "edge-0:metrics"
        for rounds in range(1, 4):
            node.report.rounds = rounds
            await asyncio.sleep(0.05)
            assert retained(broker)["round"] == rounds
        published = publisher.published
        await asyncio.sleep(0.1)
        assert publisher.published == published  # nothing changed: nothing sent
        node.report.trained = 9
        await publisher.stop(task)
        assert task.cancelled()
    assert retained(broker)["trained"] == 9


async def test_the_record_follows_the_node_to_a_parent_on_another_broker() -> None:
    home_broker, other_broker = MemoryBroker(), MemoryBroker()
    home_address, other_address = BrokerAddress(host="home"), BrokerAddress(host="other")
    upstream = UpstreamConfig(
        broker=home_address,
        parent="edge-0",
        fallbacks=[{"parent": "edge-1", "broker": other_address}],  # type: ignore[list-item]
    )

    def open_link(broker: BrokerAddress) -> LinkBase:
        return MemoryLink(other_broker, "w", status_topic=status_topic(FED, "w"))

    clock, node = Clock(), Node("worker")
    async with (
        MemoryLink(home_broker, "w") as home,
        Uplinks(home, upstream, federation=FED, node="w", open_link=open_link) as links,
    ):
        config = worker_config("w", "edge-0")
        publisher = MetricsPublisher(
            config,
            node.report,
            links,
            links=lambda: [link.stats for link in links.links],
            now=lambda: node.now,
            clock=clock,
        )
        await links.connect("edge-1")
        node.now = NodeNow("edge-1", "online", None)
        assert await publisher.publish_if_due()
    for broker in (home_broker, other_broker):
        assert retained(broker, "w")["parent"] == "edge-1"


# --- whole federations, memory brokers ----------------------------------------------------------


def small_federation(interval: float) -> FederationConfig:
    return FederationConfig(
        federation=FED,
        levels=[
            LevelConfig(name="cloud", rounds=3),
            LevelConfig(name="edge", mode="fedbuff", buffer_size=2),
            LevelConfig(name="worker"),
        ],
        fanout=[2, 2],
        task=TaskConfig(model="softmax", train=TrainConfig(epochs=1, batch_size=32)),
        metrics_interval_s=interval,
        worker_metrics_interval_s=interval,
    )


async def test_every_node_of_a_federation_leaves_its_record() -> None:
    config = small_federation(0.05)
    broker = MemoryBroker()
    nodes = config.node_configs({})
    async with asyncio.timeout(30):
        reports = await asyncio.gather(*(run_node(n, links=memory_links(broker)) for n in nodes))
    by_name = {r.node: r for r in reports}
    records = {n.node: retained(broker, n.node) for n in nodes}
    root = records["cloud"]
    assert root["role"] == "root"
    assert root["parent"] is None
    assert [a[2] for a in root["accuracy"]] == pytest.approx(
        [e["accuracy"] for e in by_name["cloud"].evaluations], abs=1e-4
    )
    assert root["version"] == by_name["cloud"].evaluations[-1]["version"]
    for edge in ("edge-0", "edge-1"):
        record = records[edge]
        assert record["parent"] == "cloud"
        assert record["accepted"] == by_name[edge].updates_accepted
        assert record["staleness"]["n"] == by_name[edge].updates_accepted
        assert record["traffic"]["up"][1] > 0  # its reports up
    for worker in (n.node for n in nodes if n.role == "worker"):
        record = records[worker]
        assert record["role"] == "worker"
        assert record["trained"] == by_name[worker].trained
        assert record["traffic"]["up"][1] > 0
        assert "staleness" not in record


async def test_metrics_off_publishes_no_record() -> None:
    config = small_federation(0.0)
    broker = MemoryBroker()
    async with asyncio.timeout(30):
        reports = await asyncio.gather(
            *(run_node(n, links=memory_links(broker)) for n in config.node_configs({}))
        )
    assert not [t for t in broker.retained if t.endswith("/metrics")]
    assert all("metrics" not in (r.up or r.down or LinkStats()).by_topic_kind for r in reports)


def test_a_worker_reports_less_often_than_an_aggregator_unless_told() -> None:
    """By default an aggregator's record may go every second, a worker's every 5 s."""
    nodes = {n.node: n for n in small_federation(1.0).node_configs({})}
    default = FederationConfig.model_validate(
        small_federation(1.0).model_dump(
            exclude={"metrics_interval_s", "worker_metrics_interval_s"}
        )
    )
    by_default = {n.node: n for n in default.node_configs({})}
    assert by_default["cloud"].metrics_every_s == 1.0
    assert by_default["worker-0"].metrics_every_s == 5.0
    assert nodes["worker-0"].metrics_every_s == 1.0
    hand_written = nodes["worker-0"].model_copy(update={"metrics_interval_s": None})
    assert hand_written.metrics_every_s == 5.0
