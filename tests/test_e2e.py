"""End to end on real Mosquitto processes: whole federations, crashes, garbage, accounting, CLI.

Every test starts its own brokers (``start_broker``: free ports, own work directories) and stops
them, and every subprocess it starts, at teardown. Nodes run in this process with ``run_node``
(one event loop, workers training in threads) unless the pipeline itself is under test
(``simulate``, ``hfl-mqtt run`` subprocesses). The task (but for the shipped example configs) is
digits with a softmax model on an IID split: five global rounds reach ~0.90 test accuracy.
The asynchronous runs add stragglers (``STRAGGLERS``) and stop on a time or version budget.

The slow ones (``-m slow``): the example configs and a cloud broker crash behind bridged edges.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import time
import zlib
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiomqtt
import numpy as np
import pytest
import yaml
from structlog.testing import capture_logs

from hfl_mqtt.brokers import (
    BridgeConfig,
    BrokerConfig,
    MosquittoBroker,
    edge_bridge_topics,
    read_sys_bytes,
)
from hfl_mqtt.codec import (
    NPY_STYPE,
    Compressor,
    EncodedTensor,
    Envelope,
    Header,
    decode_envelope,
    encode_envelope,
    npy_bytes,
)
from hfl_mqtt.codec.chunking import CHUNK_MAGIC, ChunkHeader
from hfl_mqtt.config import BrokerAddress, FederationConfig, NodeConfig, load_federation
from hfl_mqtt.errors import TaskError
from hfl_mqtt.roles import NodeReport, run_node
from hfl_mqtt.roles.messages import delta_message, parse_ctl, parse_status, status_payload
from hfl_mqtt.roles.node import mqtt_link_factory
from hfl_mqtt.sim import read_evaluations, simulate
from hfl_mqtt.tasks.base import Task, TaskConfig
from hfl_mqtt.tasks.builtin import make_task
from hfl_mqtt.topics import ctl_topic, metrics_topic, model_topic, status_topic, up_topic
from hfl_mqtt.transport.base import LinkBase
from hfl_mqtt.transport.memory import MemoryBroker, MemoryLink
from hfl_mqtt.transport.mqtt import MqttLink
from tests.fakes import needs_mosquitto

pytestmark = [
    pytest.mark.anyio,
    needs_mosquitto,
]

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
StartBroker = Callable[..., MosquittoBroker]
Spawn = Callable[..., "subprocess.Popen[bytes]"]

TARGET_ACCURACY = 0.85
"""Digits, softmax, IID, 1 local epoch at lr 0.1: 0.85 by round 2-3, ~0.90 after round 5."""
RUN_TIMEOUT_S = 45.0
"""Upper bound for any one federation run here; a hang fails the test instead of the suite."""
SAVE_EVERY_CHANGE = BrokerConfig(autosave_on_changes=True, autosave_interval=1)
"""Persistence that survives a SIGKILL: the database is written after every change."""
SUMMARY_KEYS = {
    "final_accuracy",
    "global_rounds",
    "wall_seconds",
    "levels",
    "workers",
    "bytes",
    "messages",
    "updates_accepted",
    "updates_rejected",
    "staleness",
    "config",
}


# --- helpers --------------------------------------------------------------------------------------


def federation(
    name: str,
    *,
    rounds: tuple[int, ...] = (5,),
    fanout: tuple[int, ...] = (4,),
    brokers: str = "single",
    epochs: int = 1,
    deadline_s: float = 60.0,
    min_fraction: float = 0.5,
    chunk_size: int = 1 << 20,
    delta: str | None = None,
) -> FederationConfig:
    """A federation on digits: ``rounds`` per aggregator level (root first), then the workers;
    ``delta``: the aggregators' downlink delta codec (a keyframe every 2 versions).

    The deadline is long on purpose: a round that closes here closed because everyone still
    online answered, never because time ran out.
    """
    names = ["cloud", "edge"][: len(rounds)]
    levels: list[dict[str, Any]] = [
        {
            "name": level,
            "rounds": r,
            "deadline_s": deadline_s,
            "min_fraction": min_fraction,
            "downlink_codec": "fp16" if depth == 0 else "npy",
            "downlink_delta_codec": delta,
            "keyframe_every": 2,
        }
        for depth, (level, r) in enumerate(zip(names, rounds, strict=True))
    ]
    levels.append({"name": "worker", "uplink_codec": "q8"})
    return FederationConfig.model_validate(
        {
            "federation": name,
            "levels": levels,
            "fanout": list(fanout),
            "brokers": brokers,
            "chunk_size": chunk_size,
            "task": {
                "dataset": "digits",
                "model": "softmax",
                "partition": {"scheme": "iid"},
                "train": {"epochs": epochs, "batch_size": 16, "learning_rate": 0.1},
            },
        }
    )


def sent_kind(report: NodeReport, kind: str) -> int:
    """Payload bytes ``report``'s node published on topics of ``kind`` (model, up, ctl...).

    (An aggregator whose parent and children share a broker has one link for both sides.)
    """
    links = {id(s): s for s in (report.up, report.down) if s is not None}
    return sum(s.by_topic_kind.get(kind, [0, 0])[1] for s in links.values())


def address(broker: MosquittoBroker) -> BrokerAddress:
    return BrokerAddress(host=broker.host, port=broker.port)


def with_epochs(node: NodeConfig, epochs: int) -> NodeConfig:
    """``node`` training ``epochs`` local epochs per model (to make it slow on purpose)."""
    train = node.task.train.model_copy(update={"epochs": epochs})
    return node.model_copy(update={"task": node.task.model_copy(update={"train": train})})


def expected_versions(config: FederationConfig, depth: int) -> int:
    """Model versions one aggregator at ``depth`` publishes in a run where nothing fails: every
    version of its parent starts ``rounds`` rounds, and each round is one new version."""
    return math.prod(level.rounds for level in config.levels[: depth + 1])


def nodes_at(config: FederationConfig, depth: int) -> int:
    return math.prod(config.fanout[:depth])


class Links:
    """A ``run_node`` link factory that keeps every ``MqttLink`` it makes, by client id."""

    def __init__(self, chunk_size: int = 1 << 20) -> None:
        self._make = mqtt_link_factory(chunk_size)
        self.made: dict[str, LinkBase] = {}

    def __call__(self, broker: BrokerAddress, client_id: str, status: str | None) -> LinkBase:
        link = self._make(broker, client_id, status)
        self.made[client_id] = link
        return link


async def run_nodes(
    nodes: list[NodeConfig],
    *,
    on_event: Callable[[dict[str, Any]], None] | None = None,
    links: Links | None = None,
    timeout: float = RUN_TIMEOUT_S,
) -> dict[str, NodeReport]:
    """Run ``nodes`` in this process until the root is done and has stopped everyone."""
    async with asyncio.timeout(timeout), asyncio.TaskGroup() as group:
        tasks = {
            node.node: group.create_task(
                run_node(node, links=links, on_event=on_event), name=node.node
            )
            for node in nodes
        }
    return {name: task.result() for name, task in tasks.items()}


@contextlib.asynccontextmanager
async def recording(
    broker: MosquittoBroker, topic_filter: str = "hfl/#"
) -> AsyncIterator[list[tuple[str, bytes, bool]]]:
    """A plain MQTT client recording (topic, payload, retain) of everything on ``topic_filter``.

    On leaving, it publishes a marker to itself and waits for it, so every message the broker
    had routed before that moment is in the list.
    """
    received: list[tuple[str, bytes, bool]] = []
    marker = f"e2e-marker/{os.getpid()}/{id(received)}"
    done = asyncio.Event()
    async with aiomqtt.Client(broker.host, broker.port) as client:
        await client.subscribe(topic_filter, qos=1)
        await client.subscribe(marker, qos=1)

        async def read() -> None:
            async for message in client.messages:
                assert isinstance(message.payload, bytes)
                if str(message.topic) == marker:
                    done.set()
                    continue
                received.append((str(message.topic), message.payload, message.retain))

        reader = asyncio.create_task(read())
        try:
            yield received
            await client.publish(marker, b"x", qos=1)
            async with asyncio.timeout(5):
                await done.wait()
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader


async def sys_counters_after_quiet(*brokers: MosquittoBroker) -> list[dict[str, int]]:
    """``$SYS`` byte counters of each broker once they include everything sent so far.

    Mosquitto refreshes ``$SYS`` every ``sys_interval`` (1 s) and a subscriber gets the last
    retained values, so wait two intervals after the traffic stopped before reading.
    """
    await asyncio.sleep(2.2)
    return list(await asyncio.gather(*(read_sys_bytes(b.host, b.port) for b in brokers)))


def write_node_yaml(directory: Path, node: NodeConfig) -> Path:
    path = directory / f"{node.node}.yaml"
    path.write_text(yaml.safe_dump(node.model_dump(mode="json"), sort_keys=False))
    return path


def cli_run(spawn: Spawn, config_path: Path, logs: Path) -> subprocess.Popen[bytes]:
    """``python -m hfl_mqtt.cli run --config config_path``; stdout and stderr go to files."""
    name = config_path.stem
    with (logs / f"{name}.out").open("wb") as out, (logs / f"{name}.err").open("wb") as err:
        return spawn(
            [sys.executable, "-m", "hfl_mqtt.cli", "run", "--config", str(config_path)],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
        )


async def wait_process(process: subprocess.Popen[bytes], timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while (code := process.poll()) is None:
        if time.monotonic() > deadline:
            raise TimeoutError(f"process {process.args} still running after {timeout} s")
        await asyncio.sleep(0.05)
    return code


def assert_results(
    config: FederationConfig, summary: dict[str, Any], out: Path, elapsed: float
) -> None:
    """What ``simulate`` must have written for a run of ``config`` in which nothing failed."""
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk == summary
    assert summary.keys() >= SUMMARY_KEYS
    rounds = config.levels[0].rounds
    assert summary["global_rounds"] == rounds
    assert summary["levels"] == len(config.levels)
    assert summary["workers"] == math.prod(config.fanout)
    assert 0 < summary["wall_seconds"] <= elapsed
    assert summary["config"] == config.model_dump(mode="json")

    # Per level: "down" is what the level's aggregators published to their children, "up" what
    # its nodes sent to their parents. Nothing fails here, so the counts are exact: one publish
    # per model version per aggregator (the broker fans it out), one delta per parent version.
    names = [level.name for level in config.levels]
    assert set(summary["bytes"]) == set(summary["messages"]) == set(names)
    for depth, name in enumerate(names):
        down = nodes_at(config, depth) * expected_versions(config, depth)
        up = nodes_at(config, depth) * expected_versions(config, depth - 1) if depth else 0
        if depth == len(names) - 1:
            down = 0
        assert summary["messages"][name] == {"up": up, "down": down}, name
        for direction, count in (("up", up), ("down", down)):
            volume = summary["bytes"][name][direction]
            assert volume > 0 if count else volume == 0, (name, direction)
    sent_up = sum(summary["messages"][name]["up"] for name in names)
    assert summary["updates_accepted"] == sent_up
    assert summary["updates_rejected"] == {}
    assert list(summary["staleness"]) == names[:-1]
    assert sum(level["count"] for level in summary["staleness"].values()) == sent_up

    events = read_evaluations(out / "metrics.jsonl")
    assert [e["global_round"] for e in events] == list(range(1, rounds + 1))
    assert events[-1]["accuracy"] == summary["final_accuracy"]
    assert all(e["participants"] == config.fanout[0] for e in events)
    png = (out / "accuracy.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    assert len(png) > 1000
    assert (out / "staleness.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


# --- 1, 2: whole federations through simulate() ---------------------------------------------------


@pytest.mark.parametrize(
    ("rounds", "fanout", "brokers"),
    [
        pytest.param((5,), (4,), "single", id="2-level"),
        pytest.param((5, 2), (2, 4), "single", id="3-level"),
        pytest.param((5, 2), (2, 4), "per_edge", id="3-level-bridged-edges"),
    ],
)
async def test_simulate_reaches_target_and_writes_the_summary_contract(
    tmp_path: Path, rounds: tuple[int, ...], fanout: tuple[int, ...], brokers: str
) -> None:
    config = federation("sim", rounds=rounds, fanout=fanout, brokers=brokers)
    out = tmp_path / "out"
    started = time.monotonic()
    summary = await asyncio.wait_for(simulate(config, out, processes=2), RUN_TIMEOUT_S)
    elapsed = time.monotonic() - started

    assert_results(config, summary, out, elapsed)
    assert summary["final_accuracy"] >= TARGET_ACCURACY
    assert summary["brokers"] == (1 if brokers == "single" else 1 + fanout[0])


@pytest.mark.slow
@pytest.mark.parametrize("name", ["two_level", "three_level", "four_level"])
async def test_shipped_example_configs_run_to_their_accuracy(tmp_path: Path, name: str) -> None:
    """``configs/*.yaml`` as ``hfl-mqtt sim`` runs them: 32 workers, non-IID, 15-30 rounds."""
    config = load_federation(CONFIGS / f"{name}.yaml")
    started = time.monotonic()
    summary = await asyncio.wait_for(simulate(config, tmp_path, processes=2), 120)
    assert_results(config, summary, tmp_path, time.monotonic() - started)
    assert summary["final_accuracy"] >= 0.90


def failing_worker_task(config: TaskConfig, partition: int | None, partitions: int) -> Task:
    """A task factory whose workers cannot load their data (the root's evaluator can)."""
    if partition is not None:
        raise TaskError(f"partition {partition}: the data is not there")
    return make_task(config, partition, partitions)


async def test_simulate_fails_fast_when_the_worker_processes_fail(tmp_path: Path) -> None:
    """Workers whose task cannot load never send a delta: simulate must say so, not wait for
    them forever (the root waits for its minimum of children by design)."""
    config = federation("broken", rounds=(3,), fanout=(4,))
    task = config.task.model_copy(update={"factory": f"{__name__}:failing_worker_task"})
    config = config.model_copy(update={"task": task})
    started = time.monotonic()
    with pytest.raises(ExceptionGroup) as raised:  # the worker processes' TaskGroup's
        await asyncio.wait_for(simulate(config, tmp_path / "out", processes=2), 30)
    assert raised.group_contains(TaskError, match="the data is not there")
    assert time.monotonic() - started < 15


# --- 1b: asynchronous aggregators with stragglers, through simulate() -----------------------------


STRAGGLERS = {"seed": 0, "compute_s": 0.05, "stragglers": 0.25, "slowdown": 10}
"""A quarter of the workers (2 of 8: worker-2 and worker-4, one per edge) take at least 10 times
(training + 50 ms) per model, some 0.6 s against the others' 0.06 s."""
ASYNC_EDGE = {"mode": "fedbuff", "buffer_size": 2, "report_every_updates": 4, "max_staleness": 60}
"""FedBuff edges: a step every 2 updates, a report every 4. A straggler's update is some 20-30
versions behind: the bound leaves room for a loaded machine."""


def with_levels(
    config: FederationConfig, *levels: dict[str, Any], heterogeneity: dict[str, Any]
) -> FederationConfig:
    """``config`` with each level's settings updated (root first) and simulated devices."""
    data = config.model_dump()
    for level, extra in zip(data["levels"], levels, strict=False):
        level.update(extra)
    data["heterogeneity"] = heterogeneity
    return FederationConfig.model_validate(data)


def assert_async_results(
    config: FederationConfig, summary: dict[str, Any], out: Path, elapsed: float
) -> list[dict[str, Any]]:
    """What ``simulate`` must have written for an asynchronous run that stopped on its own;
    returns the root's evaluations."""
    assert json.loads((out / "summary.json").read_text()) == summary
    assert summary.keys() >= SUMMARY_KEYS
    assert 0 < summary["wall_seconds"] <= elapsed
    assert summary["config"] == config.model_dump(mode="json")
    events = read_evaluations(out / "metrics.jsonl")
    assert len(events) == summary["global_rounds"] > 0
    assert events[-1]["accuracy"] == summary["final_accuracy"]
    assert summary["final_accuracy"] >= TARGET_ACCURACY
    # Refused: at most updates too far behind (none are expected with this bound).
    assert set(summary["updates_rejected"]) <= {"too_stale"}
    for name in ("accuracy.png", "staleness.png"):
        assert (out / name).read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    return events


def assert_staleness_adds_up(config: FederationConfig, summary: dict[str, Any]) -> None:
    """Each level's staleness entry agrees with its aggregators' arrivals, with its own
    histogram, with the messages its children sent and with the run's totals."""
    names = [level.name for level in config.levels]
    staleness = summary["staleness"]
    assert list(staleness) == names[:-1]
    assert sum(level["count"] for level in staleness.values()) == summary["updates_accepted"]
    rejected: Counter[str] = Counter()
    for depth, name in enumerate(names[:-1]):
        level = staleness[name]
        arrivals = [
            arrival
            for node in summary["nodes"]
            if node["role"] != "worker" and node["level"] == depth
            for arrival in node["arrivals"]
        ]
        histogram = {int(s): count for s, count in level["histogram"].items()}
        assert level["count"] == len(arrivals) == sum(histogram.values()) > 0, name
        assert histogram == Counter(arrival[2] for arrival in arrivals), name
        assert level["max"] == max(histogram), name
        mean = sum(s * count for s, count in histogram.items()) / level["count"]
        assert level["mean"] == pytest.approx(mean, abs=1e-6), name
        assert 0 < level["weight_mean"] <= 1, name
        # Accepted or refused, every update was sent by a child; some were still on their way
        # when the run stopped.
        sent = summary["messages"][names[depth + 1]]["up"]
        assert level["count"] + sum(level["rejected"].values()) <= sent, name
        rejected.update(level["rejected"])
    assert rejected == summary["updates_rejected"]


def assert_stragglers_were_late_and_taken(
    config: FederationConfig, summary: dict[str, Any]
) -> None:
    """The slow workers trained less, and their updates arrived many versions behind and were
    folded in all the same."""
    assert config.heterogeneity is not None
    slow = {f"worker-{i}" for i in config.heterogeneity.stragglers_of(config.num_workers)}
    assert slow
    trained = {n["node"]: n["trained"] for n in summary["nodes"] if n["role"] == "worker"}
    assert max(trained[w] for w in slow) < min(t for w, t in trained.items() if w not in slow)
    edge_depth = len(config.levels) - 2  # the workers' parents
    arrivals = [
        arrival
        for node in summary["nodes"]
        if node["role"] != "worker" and node["level"] == edge_depth
        for arrival in node["arrivals"]
    ]
    late = [staleness for _, sender, staleness, _ in arrivals if sender in slow]
    fast = [staleness for _, sender, staleness, _ in arrivals if sender not in slow]
    assert {sender for _, sender, _, _ in arrivals} >= slow, "a straggler never got in"
    assert min(late) > 0
    assert np.mean(late) > 2 * np.mean(fast)
    assert summary["staleness"][config.levels[edge_depth].name]["max"] > 0


async def test_async_edges_with_stragglers_reach_the_target_and_take_late_updates(
    tmp_path: Path,
) -> None:
    """Asynchronous edges, synchronous cloud: the edges never wait for their stragglers, whose
    late updates are folded in weighted by staleness; the cloud's rounds (both edges each) go
    on until its time budget is spent."""
    config = with_levels(
        federation("async-edges", rounds=(1000, 1), fanout=(2, 4)),
        {"max_seconds": 4.0},
        ASYNC_EDGE,
        heterogeneity=STRAGGLERS,
    )
    out = tmp_path / "out"
    started = time.monotonic()
    summary = await asyncio.wait_for(simulate(config, out, processes=2), RUN_TIMEOUT_S)
    events = assert_async_results(config, summary, out, time.monotonic() - started)

    rounds = summary["global_rounds"]
    assert rounds < 1000, "the time budget, not the rounds, ends this run"
    assert [e["global_round"] for e in events] == list(range(1, rounds + 1))
    assert all(e["participants"] == 2 for e in events)
    # Synchronous rounds: staleness 0, weight 1; both edges in every round closed, and maybe
    # one in the round the budget cut short.
    cloud = summary["staleness"]["cloud"]
    assert (cloud["max"], cloud["weight_mean"]) == (0, 1.0)
    assert 2 * rounds <= cloud["count"] <= 2 * rounds + 1
    assert_staleness_adds_up(config, summary)
    assert_stragglers_were_late_and_taken(config, summary)


async def test_async_everywhere_with_stragglers_reaches_the_target(tmp_path: Path) -> None:
    """A FedBuff root (a step per edge report) over FedBuff edges: nobody waits; the root
    stops after its model versions and evaluates every few of them."""
    versions, every = 40, 4
    config = with_levels(
        federation("async-all", rounds=(versions, 1), fanout=(2, 4)),
        {"mode": "fedbuff", "buffer_size": 1, "eval_every": every, "max_seconds": 30.0},
        ASYNC_EDGE,
        heterogeneity=STRAGGLERS,
    )
    out = tmp_path / "out"
    started = time.monotonic()
    summary = await asyncio.wait_for(simulate(config, out, processes=2), RUN_TIMEOUT_S)
    events = assert_async_results(config, summary, out, time.monotonic() - started)

    assert [e["global_round"] for e in events] == list(range(every, versions + 1, every))
    (root,) = [n for n in summary["nodes"] if n["role"] == "root"]
    assert root["rounds"] == versions
    assert summary["messages"]["cloud"]["down"] == versions + 1  # the first model, then 1/step
    assert summary["staleness"]["cloud"]["count"] == versions  # one report per step
    assert_staleness_adds_up(config, summary)
    assert_stragglers_were_late_and_taken(config, summary)


@pytest.mark.slow
@pytest.mark.parametrize(
    "name", ["async_edges_fedbuff", "async_edges_fedasync", "async_everywhere"]
)
async def test_shipped_async_configs_run_to_their_accuracy(tmp_path: Path, name: str) -> None:
    """``configs/async_*.yaml`` as ``hfl-mqtt sim`` runs them: 32 workers, 8 of them 10x
    slower, non-IID; each stops within its minute."""
    config = load_federation(CONFIGS / f"{name}.yaml")
    started = time.monotonic()
    summary = await asyncio.wait_for(simulate(config, tmp_path, processes=2), 120)
    assert_async_results(config, summary, tmp_path, time.monotonic() - started)
    assert summary["final_accuracy"] >= 0.90
    assert_staleness_adds_up(config, summary)
    assert_stragglers_were_late_and_taken(config, summary)


# --- 2: one publish per model version, seen on the wire -------------------------------------------


@pytest.mark.parametrize("chunk_size", [1 << 20, 1024], ids=["whole", "chunked"])
async def test_downlink_is_one_publish_per_model_version_per_aggregator(
    start_broker: StartBroker, chunk_size: int
) -> None:
    """A spy on the broker sees each aggregator publish each version once, whatever the number
    of children; with a small chunk size the model travels as retained chunks and still
    arrives once per version."""
    broker = start_broker()
    config = federation("wire", rounds=(3, 2), fanout=(2, 3), chunk_size=chunk_size)
    nodes = config.node_configs({"cloud": address(broker)})
    fed = config.federation
    spy = MqttLink(broker.host, broker.port, "spy", chunk_size=chunk_size)
    async with spy:
        for aggregator in ("cloud", "edge-0", "edge-1"):
            await spy.subscribe(model_topic(fed, aggregator), chunked_retained=True)
        reports = await run_nodes(nodes, links=Links(chunk_size))
        await asyncio.sleep(0.2)
        published: dict[str, list[int]] = {}
        while (message := spy.receive_nowait()) is not None:
            header = decode_envelope(message.payload).header
            published.setdefault(header.sender, []).append(header.version)

    for depth, aggregator in ((0, "cloud"), (1, "edge-0"), (1, "edge-1")):
        versions = expected_versions(config, depth)
        assert published[aggregator] == list(range(1, versions + 1)), aggregator
        stats = reports[aggregator].down
        assert stats is not None
        assert stats.by_topic_kind["model"][0] == versions
    assert spy.stats.chunks_rejected == 0
    if chunk_size == 1024:
        # Each model is larger than a chunk: it really travelled as retained chunks.
        model_bytes = reports["cloud"].down.by_topic_kind["model"][1]  # type: ignore[union-attr]
        assert model_bytes / expected_versions(config, 0) > 1024


# --- 3: an edge broker bridged to the cloud broker ------------------------------------------------


async def start_bridged(
    start_broker: StartBroker, config: FederationConfig, cloud_config: BrokerConfig | None = None
) -> tuple[MosquittoBroker, dict[str, MosquittoBroker]]:
    """A cloud broker and one broker per edge (the root's children), bridged to it."""
    cloud = start_broker(cloud_config, name="cloud")
    edges = {
        edge: start_broker(
            BrokerConfig(
                bridge=BridgeConfig(
                    name=edge,
                    address=cloud.host,
                    port=cloud.port,
                    topics=tuple(edge_bridge_topics(config.federation, edge, "cloud")),
                )
            ),
            name=edge,
        )
        for edge in config.tree()["cloud"]
    }
    await asyncio.gather(*(edge.wait_bridge_connected() for edge in edges.values()))
    return cloud, edges


async def test_bridged_edge_brokers_keep_worker_traffic_local(start_broker: StartBroker) -> None:
    config = federation("bridged", rounds=(4, 2), fanout=(2, 3), brokers="per_edge")
    fed = config.federation
    cloud, edges = await start_bridged(start_broker, config)
    nodes = config.node_configs(
        {"cloud": address(cloud), **{name: address(b) for name, b in edges.items()}}
    )
    workers = [n for n in nodes if n.role == "worker"]
    assert {n.upstream.broker.port for n in workers if n.upstream} == {
        b.port for b in edges.values()
    }

    events: list[dict[str, Any]] = []
    async with (
        recording(cloud) as on_cloud,
        recording(edges["edge-0"]) as on_edge0,
        recording(edges["edge-1"]) as on_edge1,
    ):
        reports = await run_nodes(nodes, on_event=events.append)
    assert events[-1]["accuracy"] >= TARGET_ACCURACY
    assert reports["cloud"].updates_accepted == 2 * 4

    # What crossed to the cloud broker: the cloud's model, the edges' deltas, statuses, control,
    # and every node's metrics record (bridged out for a monitor on the cloud broker).
    cloud_topics = {topic for topic, _, _ in on_cloud}
    records = {metrics_topic(fed, node.node) for node in nodes}
    allowed = {model_topic(fed, "cloud"), status_topic(fed, "cloud"), *records}
    for edge in edges:
        allowed |= {up_topic(fed, "cloud", edge), status_topic(fed, edge), ctl_topic(fed, edge)}
    assert up_topic(fed, "cloud", "edge-0") in cloud_topics
    assert cloud_topics <= allowed, cloud_topics - allowed
    assert not any("worker" in topic for topic in cloud_topics - records)
    # ... while each edge broker carried its own workers' deltas and its own model.
    for edge, seen in (("edge-0", on_edge0), ("edge-1", on_edge1)):
        topics = {topic for topic, _, _ in seen}
        kids = config.tree()[edge]
        assert {up_topic(fed, edge, kid) for kid in kids} <= topics
        assert model_topic(fed, edge) in topics
        other = "edge-1" if edge == "edge-0" else "edge-0"
        assert not any(f"/{other}/up/" in topic for topic in topics)

    # The brokers' own counters agree. Publish payloads reaching the cloud broker are the
    # root's models and stop messages, the edges' deltas, every other node's metrics records
    # (all counted by our links), and a few status messages and bridge notifications of some
    # 20 bytes each: nothing else of the workers'.
    worker_bytes = sum(r.bytes_sent for r in reports.values() if r.role == "worker")
    crossing = reports["cloud"].bytes_sent + sum(sent_kind(reports[edge], "up") for edge in edges)
    crossing += sum(sent_kind(r, "metrics") for name, r in reports.items() if name != "cloud")
    cloud_sys, *edge_sys = await sys_counters_after_quiet(cloud, *edges.values())
    assert crossing <= cloud_sys["publish_bytes_received"] <= crossing + 512
    assert cloud_sys["publish_bytes_received"] < worker_bytes / 2
    for edge, counters in zip(edges, edge_sys, strict=True):
        mine = sum(reports[kid].bytes_sent for kid in config.tree()[edge])
        assert counters["publish_bytes_received"] > mine
        assert counters["bytes_received"] > 2 * cloud_sys["bytes_received"] / len(edges)


# --- 4: a worker killed mid-round -----------------------------------------------------------------


async def test_worker_killed_mid_round_is_seen_offline_and_the_run_finishes(
    start_broker: StartBroker, spawn: Spawn, tmp_path: Path
) -> None:
    """One worker runs as ``hfl-mqtt run`` and trains slowly; it is SIGKILLed while training
    for round 2. Its connection drops without a DISCONNECT, the broker publishes its Last Will,
    the root sees it offline and closes the round with the other three long before the deadline.
    """
    broker = start_broker()
    config = federation("kill", rounds=(5,), deadline_s=120.0)
    nodes = config.node_configs({"cloud": address(broker)})
    root, *workers = nodes
    victim = with_epochs(workers[-1], 2000)  # ~1.5 s per model on this machine
    process = cli_run(spawn, write_node_yaml(tmp_path, victim), tmp_path)

    events: list[dict[str, Any]] = []
    first_round = asyncio.Event()

    def on_event(event: dict[str, Any]) -> None:
        events.append(event)
        first_round.set()

    killed_at = 0.0
    with capture_logs() as logs:
        async with asyncio.timeout(RUN_TIMEOUT_S), asyncio.TaskGroup() as group:
            running = group.create_task(run_node(root, on_event=on_event))
            for worker in workers[:-1]:
                group.create_task(run_node(worker))
            await first_round.wait()
            await asyncio.sleep(0.3)  # the victim has round 2's model and is training
            assert process.poll() is None
            process.send_signal(signal.SIGKILL)
            killed_at = time.monotonic()
    report = running.result()
    assert process.wait(5) == -signal.SIGKILL

    assert [e["participants"] for e in events] == [4, 3, 3, 3, 3]
    round_two_closed = events[1]["seconds"] - events[0]["seconds"]
    assert round_two_closed < 10, "round 2 waited for the deadline, not for the Last Will"
    assert time.monotonic() - killed_at < 30
    offline = [e for e in logs if e["event"] == "child offline"]
    assert [(e["node"], e["child"]) for e in offline] == [("cloud", victim.node)]
    assert report.rounds == 5
    assert report.updates_accepted == 4 + 4 * 3
    assert events[-1]["accuracy"] >= TARGET_ACCURACY
    async with recording(broker, status_topic(config.federation, victim.node)) as status:
        pass
    assert [parse_status(payload) for _, payload, _ in status] == ["offline"]


# --- 5: the broker crashes and comes back ---------------------------------------------------------


async def crash_in_round_two(
    broker: MosquittoBroker, events: list[dict[str, Any]], rounds: int, *, saved: bool = False
) -> None:
    """SIGKILL ``broker`` just after the root's first evaluation lands in ``events`` (the
    workers are then training for round 2) and restart it a second later, same port and
    database. ``saved``: check that it had written a database to come back with."""
    while not events:
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.05)
    if saved:
        assert (broker.persistence_dir / "mosquitto.db").exists()
    assert len(events) < rounds, "the run is over: the crash comes too late"
    await asyncio.to_thread(broker.kill)
    await asyncio.sleep(1.0)
    await asyncio.to_thread(broker.restart)


async def test_broker_killed_and_restarted_mid_run_loses_no_update(
    start_broker: StartBroker,
) -> None:
    """SIGKILL the broker while the workers train, restart it on the same port and database.

    Every round needs every worker (min_fraction 1.0, long deadline), so a lost model or delta
    would stall the run into the timeout. The broker saves its database at every change, so
    after the crash it still has every session (the root's subscription to the deltas): deltas
    published before the root is back are queued for it. (With the default autosave every
    10 s and nothing saved yet, a worker that reconnects first publishes into the void.)
    """
    broker = start_broker(SAVE_EVERY_CHANGE)
    rounds = 5
    config = federation("crash", rounds=(rounds,), epochs=60, min_fraction=1.0)
    nodes = config.node_configs({"cloud": address(broker)})
    links = Links()
    events: list[dict[str, Any]] = []
    async with asyncio.TaskGroup() as group:
        group.create_task(crash_in_round_two(broker, events, rounds, saved=True))
        reports = await run_nodes(nodes, on_event=events.append, links=links)

    assert [e["participants"] for e in events] == [4] * rounds
    assert reports["cloud"].updates_accepted == 4 * rounds
    # At least once: a delta in flight at the crash may arrive twice; it is refused as such.
    assert set(reports["cloud"].updates_rejected) <= {"duplicate"}
    for node, report in reports.items():
        if report.role == "worker":
            assert report.trained == rounds, node
    for client_id, link in links.made.items():
        assert isinstance(link, MqttLink)
        assert link.reconnects >= 1, f"{client_id} never lost its connection?"
    assert events[-1]["accuracy"] >= TARGET_ACCURACY


@pytest.mark.parametrize("delta", [None, "q8"], ids=["whole-models", "delta-coded"])
async def test_broker_restarted_without_persistence_loses_no_update_and_waits_no_deadline(
    start_broker: StartBroker, delta: str | None
) -> None:
    """SIGKILL a broker that keeps nothing on disk, mid-run, and restart it: it comes back with
    no session, no subscription and no retained model. Every node re-subscribes, puts its
    retained model back (with delta coding: the keyframe and the delta slots) and re-sends the
    delta its parent has not taken, so every update sent is accepted (by update id) and no
    round waits for its 60 s deadline."""
    broker = start_broker(BrokerConfig(persistence=False))
    rounds = 4
    config = federation(
        "amnesia", rounds=(rounds, 1), fanout=(2, 3), epochs=60, min_fraction=1.0, delta=delta
    )
    nodes = config.node_configs({"cloud": address(broker)})
    events: list[dict[str, Any]] = []
    started = time.monotonic()
    async with asyncio.TaskGroup() as group:
        group.create_task(crash_in_round_two(broker, events, rounds))
        reports = await run_nodes(nodes, on_event=events.append)
    assert time.monotonic() - started < config.levels[0].deadline_s

    assert [e["participants"] for e in events] == [2] * rounds
    parents = {n.node: n.upstream.parent for n in nodes if n.upstream is not None}
    for node, parent in parents.items():
        sent = reports[node].sent_ids
        assert sent, node
        assert set(sent) <= set(reports[parent].accepted_ids), f"{node}'s update lost"
    assert sum(r.resent for r in reports.values()) >= 1, "nothing needed re-sending?"
    for report in reports.values():
        assert set(report.updates_rejected) <= {"duplicate"}, report.updates_rejected
    assert events[-1]["accuracy"] >= TARGET_ACCURACY


@pytest.mark.slow
async def test_cloud_broker_crash_behind_bridged_edges_loses_no_update(
    start_broker: StartBroker,
) -> None:
    """The cloud broker dies and comes back while edges run on their own bridged brokers.

    Only the root and the bridges lose their connection: edges and workers go on locally,
    the bridges queue the edges' deltas and reconnect, and every global round still gets
    both edges (min_fraction 1.0: a lost delta or model stalls the run into the timeout).
    """
    rounds = 6
    config = federation(
        "bcrash", rounds=(rounds, 2), fanout=(2, 3), brokers="per_edge", epochs=80, min_fraction=1.0
    )
    cloud, edges = await start_bridged(start_broker, config, SAVE_EVERY_CHANGE)
    nodes = config.node_configs(
        {"cloud": address(cloud), **{name: address(b) for name, b in edges.items()}}
    )
    links = Links()
    events: list[dict[str, Any]] = []
    first_round = asyncio.Event()

    def on_event(event: dict[str, Any]) -> None:
        events.append(event)
        first_round.set()

    async def crash() -> None:
        await first_round.wait()
        await asyncio.sleep(0.05)  # into round 2: the edges are running their rounds
        assert (cloud.persistence_dir / "mosquitto.db").exists()
        assert len(events) < rounds, "the run is over: the crash comes too late"
        await asyncio.to_thread(cloud.kill)
        await asyncio.sleep(1.0)
        await asyncio.to_thread(cloud.restart)

    async with asyncio.TaskGroup() as group:
        group.create_task(crash())
        reports = await run_nodes(nodes, on_event=on_event, links=links, timeout=90)

    assert [e["participants"] for e in events] == [2] * rounds
    assert reports["cloud"].updates_accepted == 2 * rounds
    assert all(not report.updates_rejected for report in reports.values())
    reconnected = {
        cid for cid, link in links.made.items() if isinstance(link, MqttLink) and link.reconnects
    }
    assert reconnected == {"cloud"}
    assert events[-1]["accuracy"] >= TARGET_ACCURACY


# --- 6: garbage on an aggregator's up topic -------------------------------------------------------


def nan_delta(fed: str, sender: str, base: int, model: dict[str, np.ndarray]) -> bytes:
    """A well-formed delta whose first tensor holds a NaN (the encoder refuses to make one)."""
    tensors = []
    for index, (name, array) in enumerate(model.items()):
        values = np.zeros(array.shape, np.float32)
        if index == 0:
            values.flat[0] = np.nan
        tensors.append(EncodedTensor(name, NPY_STYPE, "float32", values.shape, npy_bytes(values)))
    header = Header(
        federation=fed,
        sender=sender,
        kind="delta",
        version=base + 1,
        base_version=base,
        num_examples=10,
    )
    return encode_envelope(Envelope(header, tuple(tensors)))


def huge_chunk() -> bytes:
    """A chunk header claiming a 2**40-byte message in 2**20 chunks of 1 MiB, then 64 bytes."""
    data = b"\0" * 64
    header = ChunkHeader(
        transfer_id=b"e2e-huge-chunk!!",
        index=0,
        count=1 << 20,
        total_size=1 << 40,
        chunk_size=1 << 20,
        crc32=zlib.crc32(data),
        message_digest=b"\0" * 32,
    )
    return header.pack() + data


def random_bytes(size: int, seed: int) -> bytes:
    data = np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8).tobytes()
    assert not data.startswith(CHUNK_MAGIC)
    return data


async def scripted_child(
    broker: MosquittoBroker,
    fed: str,
    parent: str,
    me: str,
    garbage: Callable[[int, dict[str, np.ndarray], bytes], list[tuple[str, bytes]]],
) -> int:
    """A child played by a plain MQTT client: for each model version of ``parent`` it first
    publishes ``garbage(version, model, last_valid_delta)`` (topic, payload pairs), then a valid
    zero delta of weight 1 (which the round waits for). Returns the models it answered."""
    compressor = Compressor("npy")
    answered: set[int] = set()
    last = b""
    async with aiomqtt.Client(broker.host, broker.port, identifier=me) as client:
        await client.subscribe(ctl_topic(fed, me), qos=1)
        await client.subscribe(model_topic(fed, parent), qos=1)
        async for message in client.messages:
            assert isinstance(message.payload, bytes)
            if str(message.topic) == ctl_topic(fed, me):
                if parse_ctl(message.payload) == "stop":
                    return len(answered)
                continue
            envelope = decode_envelope(message.payload)
            version = envelope.header.version
            if version in answered:
                continue
            model = envelope.arrays()
            for topic, payload in garbage(version, model, last):
                await client.publish(topic, payload, qos=1)
            zeros = {k: np.zeros_like(v, dtype=np.float32) for k, v in model.items()}
            last = delta_message(fed, me, version, zeros, 1, compressor)
            await client.publish(up_topic(fed, parent, me), last, qos=1)
            answered.add(version)
    raise AssertionError("unreachable")


async def test_garbage_on_an_up_topic_is_refused_with_reasons_and_the_run_completes(
    start_broker: StartBroker,
) -> None:
    broker = start_broker()
    config = federation("garbage", rounds=(5,))
    fed = config.federation
    root, *workers = config.node_configs({"cloud": address(broker)})
    me = workers[-1].node  # played by the test
    mine = up_topic(fed, "cloud", me)

    def garbage(version: int, model: dict[str, np.ndarray], last: bytes) -> list[tuple[str, bytes]]:
        zeros = {k: np.zeros_like(v, dtype=np.float32) for k, v in model.items()}
        valid = delta_message(fed, me, version, zeros, 1, Compressor("npy"))
        if version == 1:
            return [
                (mine, random_bytes(512, seed=1)),
                (mine, valid[: len(valid) // 2]),
                (mine, nan_delta(fed, me, version, model)),
                (mine, huge_chunk()),
                # A valid delta of another child, on this child's topic.
                (mine, delta_message(fed, "worker-0", version, zeros, 1, Compressor("npy"))),
                (up_topic(fed, "cloud", "intruder"), valid),
            ]
        if version == 2:
            stale = delta_message(fed, me, version - 1, zeros, 1, Compressor("npy"))
            return [(mine, last), (mine, stale)]  # a replay, then a delta against version 1
        return []

    events: list[dict[str, Any]] = []
    async with asyncio.TaskGroup() as group:
        child = group.create_task(scripted_child(broker, fed, "cloud", me, garbage))
        reports = await run_nodes([root, *workers[:-1]], on_event=events.append)
    assert child.result() == 5

    report = reports["cloud"]
    # The chunk claiming 2**40 bytes is refused by the link's reassembler, and counted.
    assert report.updates_rejected == Counter(
        malformed=3, non_finite=1, unknown_sender=1, duplicate=1, stale=1, oversized=1
    )
    assert report.down is not None
    assert report.down.chunks_rejected == 1
    assert report.updates_accepted == 4 * 5
    assert [e["participants"] for e in events] == [4] * 5
    assert events[-1]["accuracy"] >= TARGET_ACCURACY


async def test_oversized_chunk_header_counts_as_a_rejected_update(
    start_broker: StartBroker,
) -> None:
    broker = start_broker()
    config = federation("oversized", rounds=(1,), fanout=(1,))
    fed = config.federation
    (root, worker) = config.node_configs({"cloud": address(broker)})

    def garbage(version: int, model: dict[str, np.ndarray], last: bytes) -> list[tuple[str, bytes]]:
        return [(up_topic(fed, "cloud", worker.node), huge_chunk())]

    async with asyncio.TaskGroup() as group:
        group.create_task(scripted_child(broker, fed, "cloud", worker.node, garbage))
        reports = await run_nodes([root])
    assert reports["cloud"].updates_rejected == Counter(oversized=1)


# --- 7: our byte counts against the broker's ------------------------------------------------------


async def test_link_byte_accounting_agrees_with_the_brokers_sys_counters(
    start_broker: StartBroker,
) -> None:
    broker = start_broker()
    config = federation("acct", rounds=(4,))
    nodes = config.node_configs({"cloud": address(broker)})
    links = Links()
    await run_nodes(nodes, links=links)
    (counters,) = await sys_counters_after_quiet(broker)

    stats = [link.stats for link in links.made.values()]
    sent = sum(s.bytes_sent for s in stats)
    received = sum(s.bytes_received for s in stats)
    # Each node's status link also publishes "online" at connect and "offline" at a clean exit,
    # outside the accounting (they are not models or deltas).
    status_links = len(nodes)
    status_bytes = status_links * (len(status_payload("online")) + len(status_payload("offline")))
    published = sum(s.messages_sent for s in stats) + 2 * status_links
    delivered = sum(s.messages_received for s in stats)
    connections = len(links.made) + 1  # and the $SYS reader

    # Payloads: the broker's publish counters are payload bytes too; they see what our links
    # count plus the status messages (and, sent, possibly the $SYS reader's few values).
    assert sent <= counters["publish_bytes_received"] <= sent + status_bytes
    assert received <= counters["publish_bytes_sent"] <= received + 1024
    # Whole packets: the broker's byte counters add MQTT framing to the payloads. Per PUBLISH:
    # fixed header <= 5, topic 2 + <= 30, packet id 2, MQTT 5 property length 1: < 50; per
    # PUBACK: 4. Per connection: CONNECT with its Will and session expiry (< 200), up to 5
    # SUBSCRIBEs (< 50 each), CONNACK/SUBACKs, DISCONNECT, a PINGREQ/PINGRESP pair: < 512.
    # These bounds hold whatever the payload sizes; they are 2-3x what is measured here.
    assert sent <= counters["bytes_received"]
    assert received <= counters["bytes_sent"]
    framing_in = 50 * published + 4 * delivered + 512 * connections
    framing_out = 50 * delivered + 4 * published + 512 * connections
    assert counters["bytes_received"] <= counters["publish_bytes_received"] + framing_in
    assert counters["bytes_sent"] <= counters["publish_bytes_sent"] + framing_out
    # With payloads of 1-3 KB and topics of ~25 bytes the framing is a small part of the total.
    assert counters["bytes_received"] < 1.25 * sent
    assert counters["bytes_sent"] < 1.25 * received


# --- 8: hfl-mqtt run as real processes ------------------------------------------------------------


async def test_cli_run_processes_complete_a_federation(
    start_broker: StartBroker, spawn: Spawn, tmp_path: Path
) -> None:
    broker = start_broker()
    config = federation("cli", rounds=(3,), fanout=(2,))
    nodes = config.node_configs({"cloud": address(broker)})
    processes = {
        node.node: cli_run(spawn, write_node_yaml(tmp_path, node), tmp_path) for node in nodes
    }

    codes = {}
    for name in ("cloud", "worker-0", "worker-1"):
        codes[name] = await wait_process(processes[name], RUN_TIMEOUT_S)
    logs = {name: (tmp_path / f"{name}.err").read_text() for name in processes}
    assert codes == dict.fromkeys(processes, 0), logs

    printed = {name: json.loads((tmp_path / f"{name}.out").read_text()) for name in processes}
    assert printed["cloud"]["role"] == "root"
    assert printed["cloud"]["rounds"] == 3
    assert printed["cloud"]["updates_accepted"] == 2 * 3
    assert printed["cloud"]["updates_rejected"] == {}
    assert printed["cloud"]["down"]["by_kind"]["model"]["messages_sent"] == 3
    for worker in ("worker-0", "worker-1"):
        assert printed[worker]["role"] == "worker"
        assert printed[worker]["trained"] == 3
        assert printed[worker]["up"]["by_kind"]["up"]["messages_sent"] == 3
    assert logs["cloud"].count("global round") == 3


async def test_a_federation_named_chunk_gets_its_messages(start_broker: StartBroker) -> None:
    broker = start_broker()
    topic = up_topic("chunk", "cloud", "worker-0")
    async with (
        MqttLink(broker.host, broker.port, "a") as a,
        MqttLink(broker.host, broker.port, "b") as b,
    ):
        await b.subscribe(up_topic("chunk", "cloud", "+"))
        await a.publish(topic, b"delta")
        async with asyncio.timeout(5):
            message = await b.receive()
    assert message.topic == topic


async def test_a_link_cancelled_while_connecting_leaves_no_task_behind() -> None:
    """A node cancelled while its link connects (its TaskGroup failed, say) must not leave the
    link's connection task running: a server that accepts TCP and never answers MQTT."""

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # until the client goes away
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        link = MqttLink("127.0.0.1", port, "never-connected", connect_timeout=30)
        entering = asyncio.create_task(link.__aenter__())
        await asyncio.sleep(0.3)
        entering.cancel()
        with pytest.raises(asyncio.CancelledError):
            await entering
        await asyncio.sleep(0.1)
        left = [t for t in asyncio.all_tasks() if t.get_name() == "mqtt-link:never-connected"]
        assert left == []


async def test_cancelling_an_aggregator_is_never_lost() -> None:
    """Cancel a root a few event-loop steps after a message reaches it: it must end every time.
    (Deterministic: the memory broker delivers in the same task, so the steps are fixed.)"""
    config = federation("cancel", rounds=(3,), fanout=(1,))
    root = config.node_configs({})[0]
    lost = []
    for steps in range(8):
        broker = MemoryBroker()

        def links(_: BrokerAddress, client_id: str, status: str | None) -> LinkBase:
            return MemoryLink(broker, client_id, status_topic=status)  # noqa: B023

        running = asyncio.create_task(run_node(root, links=links))
        await asyncio.sleep(0.2)  # the root has published its model and waits for its child
        async with MemoryLink(broker, "peer") as peer:
            await peer.publish(status_topic("cancel", "worker-0"), status_payload("online"))
        for _ in range(steps):
            await asyncio.sleep(0)
        running.cancel()
        done, _ = await asyncio.wait({running}, timeout=0.5)
        if not done:
            lost.append(steps)
            running.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await running
    assert lost == [], f"cancellation lost when it came these loop steps after a message: {lost}"
