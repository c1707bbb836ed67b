"""Simulated device heterogeneity: the ``heterogeneity`` block and its seeded draws, the link
shaper's arithmetic, and a worker on the in-memory broker that trains slowly, sits behind a slow
link, and drops out and rejoins."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st
from structlog.testing import capture_logs

from hfl_mqtt.config import (
    DeviceConfig,
    FederationConfig,
    HeterogeneityConfig,
    LevelConfig,
    NodeConfig,
    load_federation,
    load_node,
)
from hfl_mqtt.errors import ConfigError
from hfl_mqtt.roles import NodeReport, Worker
from hfl_mqtt.roles.messages import STOP, parse_status, status_payload
from hfl_mqtt.topics import ctl_topic, status_topic
from hfl_mqtt.transport.base import Incoming
from hfl_mqtt.transport.memory import MemoryBroker, MemoryLink
from hfl_mqtt.transport.shaping import LinkShaper, ShapedLink
from tests.fakes import FED, W0, WAIT, FakeTask, Peer, filled, until, worker_config

# --- the configuration ---------------------------------------------------------------------

BASE = """\
federation: lab
levels: [{name: cloud}, {name: edge}, {name: worker}]
fanout: [4, 8]
"""


def federation_with(heterogeneity: str, tmp_path: Path) -> FederationConfig:
    path = tmp_path / "fed.yaml"
    path.write_text(BASE + heterogeneity)
    return load_federation(path)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", None),
        ("heterogeneity: {}\n", HeterogeneityConfig()),
        (
            """\
heterogeneity:
  seed: 1
  compute_s: 0.05
  stragglers: 0.25
  slowdown: 10
  latency_ms: [5, 50]
  bandwidth_kbps: [256, 2048]
  dropout: 0.02
  offline_s: [1, 5]
""",
            HeterogeneityConfig(
                seed=1,
                compute_s=0.05,
                stragglers=0.25,
                slowdown=10,
                latency_ms=(5, 50),
                bandwidth_kbps=(256, 2048),
                dropout=0.02,
                offline_s=(1, 5),
            ),
        ),
        (
            "heterogeneity: {latency_ms: 20, bandwidth_kbps: 512, offline_s: 3}\n",
            HeterogeneityConfig(latency_ms=(20, 20), bandwidth_kbps=(512, 512), offline_s=(3, 3)),
        ),
        ("heterogeneity: {bandwidth_kbps: null}\n", HeterogeneityConfig(bandwidth_kbps=None)),
    ],
)
def test_heterogeneity_parses(
    tmp_path: Path, text: str, expected: HeterogeneityConfig | None
) -> None:
    assert federation_with(text, tmp_path).heterogeneity == expected


def test_the_default_device_is_the_machine_as_it_is() -> None:
    device = HeterogeneityConfig().devices(1)[0]
    assert (device.slowdown, device.compute_s, device.latency_s, device.dropout) == (1, 0, 0, 0)
    assert device.up_bytes_per_s is None
    assert device.down_bytes_per_s is None


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("{stragglers: 1.5}", "heterogeneity.stragglers: Input should be less than or equal to 1"),
        ("{stragglers: -0.1}", "heterogeneity.stragglers: Input should be greater"),
        ("{slowdown: 0.5}", "heterogeneity.slowdown: Input should be greater than or equal to 1"),
        ("{slowdown: .inf}", "heterogeneity.slowdown: Input should be a finite number"),
        ("{compute_s: -1}", "heterogeneity.compute_s: Input should be greater"),
        ("{latency_ms: [50, 5]}", "heterogeneity.latency_ms: Value error, a range is [low, high]"),
        ("{latency_ms: -1}", "heterogeneity.latency_ms.0: Input should be greater"),
        ("{latency_ms: fast}", "heterogeneity.latency_ms: Input should be a valid tuple"),
        ("{latency_ms: [1, 2, 3]}", "heterogeneity.latency_ms: Tuple should have at most 2"),
        ("{bandwidth_kbps: [0, 10]}", "heterogeneity.bandwidth_kbps.0: Input should be greater"),
        ("{dropout: 2}", "heterogeneity.dropout: Input should be less than or equal to 1"),
        ("{offline_s: [1, .nan]}", "heterogeneity.offline_s.1: Input should be a finite number"),
        ("{seed: -1}", "heterogeneity.seed: Input should be greater than or equal to 0"),
        ("{jitter_ms: 3}", "heterogeneity.jitter_ms: Extra inputs are not permitted"),
        ("7", "heterogeneity: Input should be a valid dictionary"),
    ],
)
def test_heterogeneity_errors_name_the_field(tmp_path: Path, text: str, expected: str) -> None:
    with pytest.raises(ConfigError) as caught:
        federation_with(f"heterogeneity: {text}\n", tmp_path)
    assert str(caught.value).startswith(f"{tmp_path / 'fed.yaml'}: ")
    assert expected in str(caught.value)


WORKER: dict[str, Any] = {"federation": "lab", "node": "w", "upstream": {"parent": "e"}}


@pytest.mark.parametrize(
    ("node", "expected"),
    [
        ({**WORKER, "partition": 0, "device": {"slowdown": 0}}, "device.slowdown: Input should be"),
        ({**WORKER, "partition": 0, "device": {"dropout": -1}}, "device.dropout: Input should be"),
        ({**WORKER, "partition": 0, "device": {"offline_s": [2, 1]}}, "device.offline_s: Value"),
        ({**WORKER, "partition": 0, "device": {"up_bytes_per_s": 0}}, "device.up_bytes_per_s"),
        ({**WORKER, "partition": 0, "device": {"latency": 1}}, "device.latency: Extra inputs"),
        (
            {**WORKER, "downstream": {"children": ["a"]}, "device": {}},
            "(top level): Value error, device applies to workers only",
        ),
    ],
)
def test_node_device_errors(tmp_path: Path, node: dict[str, Any], expected: str) -> None:
    path = tmp_path / "node.yaml"
    path.write_text(yaml.safe_dump(node))
    with pytest.raises(ConfigError) as caught:
        load_node(path)
    assert expected in str(caught.value)


def test_node_file_with_a_device_loads(tmp_path: Path) -> None:
    path = tmp_path / "node.yaml"
    device = {"seed": 3, "slowdown": 4, "latency_s": 0.02, "offline_s": 2}
    path.write_text(yaml.safe_dump({**WORKER, "partition": 0, "device": device}))
    assert load_node(path).device == DeviceConfig(
        seed=3, slowdown=4, latency_s=0.02, offline_s=(2, 2)
    )


# --- the seeded draws ----------------------------------------------------------------------

SPREAD = HeterogeneityConfig(
    seed=1,
    compute_s=0.05,
    stragglers=0.25,
    slowdown=10,
    latency_ms=(5, 50),
    bandwidth_kbps=(256, 2048),
    dropout=0.02,
    offline_s=(1, 5),
)


def test_same_seed_same_devices_other_seed_other_devices() -> None:
    assert SPREAD.devices(32) == SPREAD.devices(32)
    other = SPREAD.model_copy(update={"seed": 2}).devices(32)
    assert other != SPREAD.devices(32)
    assert SPREAD.stragglers_of(32) != SPREAD.model_copy(update={"seed": 2}).stragglers_of(32)


@pytest.mark.parametrize(
    ("share", "workers", "count"),
    [(0.25, 32, 8), (0.1, 30, 3), (0.0, 10, 0), (1.0, 7, 7), (0.5, 3, 2), (0.01, 10, 0)],
)
def test_exact_share_of_stragglers(share: float, workers: int, count: int) -> None:
    config = SPREAD.model_copy(update={"stragglers": share})
    devices = config.devices(workers)
    slow = [i for i, d in enumerate(devices) if d.slowdown > 1]
    assert len(slow) == count
    assert set(slow) == config.stragglers_of(workers)
    assert {d.slowdown for d in devices} <= {1.0, 10.0}


def test_draws_respect_the_ranges_and_units() -> None:
    devices = SPREAD.devices(200)
    latency = np.array([d.latency_s for d in devices])
    rates = np.array([d.up_bytes_per_s for d in devices], dtype=float)
    assert latency.min() >= 0.005
    assert latency.max() <= 0.050
    assert rates.min() >= 256 * 1000 / 8
    assert rates.max() <= 2048 * 1000 / 8
    assert len(set(latency.tolist())) == 200  # drawn per worker, not shared
    assert all(d.down_bytes_per_s == d.up_bytes_per_s for d in devices)
    assert all((d.compute_s, d.dropout, d.offline_s) == (0.05, 0.02, (1, 5)) for d in devices)
    assert len({d.seed for d in devices}) == 200


def test_a_number_is_the_same_for_every_worker() -> None:
    config = HeterogeneityConfig(latency_ms=20, bandwidth_kbps=800)  # type: ignore[arg-type]
    assert {(d.latency_s, d.up_bytes_per_s) for d in config.devices(5)} == {(0.02, 100_000.0)}


def test_more_workers_leave_the_first_workers_links_alone() -> None:
    def links(devices: list[DeviceConfig]) -> list[tuple[float, float | None, int]]:
        return [(d.latency_s, d.up_bytes_per_s, d.seed) for d in devices]

    assert links(SPREAD.devices(64))[:32] == links(SPREAD.devices(32))
    without_caps = SPREAD.model_copy(update={"bandwidth_kbps": None})
    assert [d.seed for d in without_caps.devices(8)] == [d.seed for d in SPREAD.devices(8)]


def test_node_configs_give_workers_their_devices() -> None:
    config = FederationConfig(
        federation="lab",
        levels=[LevelConfig(name="cloud"), LevelConfig(name="edge"), LevelConfig(name="worker")],
        fanout=[4, 8],
        heterogeneity=SPREAD,
    )
    nodes = config.node_configs({})
    workers = [n for n in nodes if n.role == "worker"]
    assert all(n.device is None for n in nodes if n.role != "worker")
    assert [n.device for n in workers] == SPREAD.devices(32)
    # What ``hfl-mqtt sim`` hands its worker processes: the device survives the JSON.
    assert [NodeConfig.model_validate_json(n.model_dump_json()) for n in workers] == workers
    plain = config.model_copy(update={"heterogeneity": None}).node_configs({})
    assert all(n.device is None for n in plain)


# --- the link shaper's arithmetic ----------------------------------------------------------


def test_latency_alone_overlaps() -> None:
    shaper = LinkShaper(latency_s=0.05)
    assert shaper.send(1_000_000, now=10.0) == pytest.approx(10.05)
    assert shaper.send(1_000_000, now=10.0) == pytest.approx(10.05)  # no cap: no queue
    assert shaper.receive(10, arrived_at=3.0) == pytest.approx(3.05)
    assert shaper.shapes


def test_bandwidth_serializes_sends() -> None:
    shaper = LinkShaper(up_bytes_per_s=1000)
    assert shaper.send(500, now=0.0) == pytest.approx(0.5)
    assert shaper.send(500, now=0.1) == pytest.approx(1.0)  # waits for the first to go through
    assert shaper.send(250, now=1.0) == pytest.approx(1.25)
    assert shaper.send(100, now=5.0) == pytest.approx(5.1)  # the link was idle since 1.25


def test_bandwidth_and_latency_both_directions_each_with_its_own_clock() -> None:
    shaper = LinkShaper(latency_s=0.1, up_bytes_per_s=1000, down_bytes_per_s=500)
    assert shaper.send(500, now=0.0) == pytest.approx(0.6)
    assert shaper.send(500, now=0.0) == pytest.approx(1.1)  # transmission queues, latency overlaps
    assert shaper.receive(500, arrived_at=0.0) == pytest.approx(1.1)  # the send queue is apart
    assert shaper.receive(100, arrived_at=0.5) == pytest.approx(1.3)
    assert shaper.receive(0, arrived_at=9.0) == pytest.approx(9.1)


@given(
    latency=st.floats(0, 1),
    rate=st.floats(1, 1e6),
    traffic=st.lists(st.tuples(st.integers(0, 10**6), st.floats(0, 5)), min_size=1, max_size=30),
)
def test_a_serial_link_never_delivers_early_or_out_of_order(
    latency: float, rate: float, traffic: list[tuple[int, float]]
) -> None:
    shaper = LinkShaper(latency_s=latency, down_bytes_per_s=rate)
    arrived, delivered = 0.0, []
    for size, gap in traffic:
        arrived += gap
        delivered.append(shaper.receive(size, arrived))
        assert delivered[-1] >= arrived + latency + size / rate - 1e-9
    assert delivered == sorted(delivered)
    busy = sum(size for size, _ in traffic) / rate  # the link carries one message at a time
    assert delivered[-1] >= traffic[0][1] + busy + latency - 1e-6


def test_an_unshaped_link() -> None:
    shaper = LinkShaper()
    assert not shaper.shapes
    assert shaper.send(10**9, now=2.0) == 2.0
    assert shaper.receive(10**9, arrived_at=2.0) == 2.0


# --- a shaped link on the in-memory broker --------------------------------------------------


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.mark.anyio
async def test_shaped_link_delays_both_directions() -> None:
    broker = MemoryBroker()
    async with (
        MemoryLink(broker, "peer") as peer,
        MemoryLink(broker, "device") as raw,
        ShapedLink(raw, LinkShaper(latency_s=0.1)) as link,
    ):
        await link.subscribe("t/down")
        await peer.subscribe("t/up")
        sent = time.monotonic()
        await peer.publish("t/down", b"x")
        assert link.receive_nowait() is None  # arrived, not yet due
        assert (await link.receive()).payload == b"x"
        assert time.monotonic() - sent >= 0.1
        sent = time.monotonic()
        await link.publish("t/up", b"y")
        assert time.monotonic() - sent >= 0.1
        assert peer.receive_nowait() == Incoming("t/up", b"y")
        await peer.publish("t/down", b"z")
        await until(lambda: link.receive_nowait() is not None)


# --- a worker with a device ------------------------------------------------------------------


@dataclass
class DeviceWorker:
    """A worker with a device, its parent (a scripted peer) and what the test watches."""

    worker: Worker
    task: FakeTask
    edge: Peer
    broker: MemoryBroker
    running: asyncio.Task[NodeReport]
    statuses: list[str]

    async def next_delta_base(self) -> int:
        _, delta = await self.edge.next_message()
        return delta.header.base_version


@contextlib.asynccontextmanager
async def device_worker(device: DeviceConfig) -> AsyncIterator[DeviceWorker]:
    broker = MemoryBroker()
    task = FakeTask(step=0.25)
    config = worker_config("w", "edge").model_copy(update={"device": device})
    async with (
        Peer(broker, "edge", serves=True) as edge,
        MemoryLink(broker, "spy") as spy,
        MemoryLink(broker, "w", status_topic=status_topic(FED, "w")) as link,
    ):
        statuses: list[str] = []
        spy_reader = asyncio.create_task(_read_statuses(spy, statuses), name="spy")
        await spy.subscribe(status_topic(FED, "w"))
        worker = Worker(config, link, task)
        running = asyncio.create_task(worker.run(), name="w")
        try:
            await until(lambda: len(link.filters) == 3)  # the model, its chunks, the ctl topic
            yield DeviceWorker(worker, task, edge, broker, running, statuses)
        finally:
            for background in (running, spy_reader):
                background.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await background


async def _read_statuses(spy: MemoryLink, into: list[str]) -> None:
    while True:
        message = await spy.receive()
        state = parse_status(message.payload)
        assert state is not None
        into.append(state)


async def stop(run: DeviceWorker) -> NodeReport:
    await run.edge.link.publish(ctl_topic(FED, "w"), STOP)
    async with asyncio.timeout(WAIT):
        return await run.running


@pytest.mark.anyio
async def test_a_slow_device_takes_at_least_its_time_to_train() -> None:
    async with device_worker(DeviceConfig(compute_s=0.05, slowdown=4)) as run:
        for _ in range(2):
            started = time.monotonic()
            version = await run.edge.publish_model(W0)
            assert await run.next_delta_base() == version
            assert time.monotonic() - started >= 4 * 0.05
        report = await stop(run)
    assert report.trained == 2
    assert report.dropouts == 0
    assert report.to_dict()["dropouts"] == 0


@pytest.mark.anyio
async def test_a_newer_model_while_the_slow_device_trains_wins() -> None:
    async with device_worker(DeviceConfig(compute_s=0.1, slowdown=3)) as run:
        await run.edge.publish_model(W0)
        await until(lambda: len(run.task.trained_from) == 1)  # now waiting out the device time
        newer = filled(W0, 7.0)
        assert await run.edge.publish_model(newer) == 2
        assert await run.next_delta_base() == 2  # the v1 result was dropped, not sent
        report = await stop(run)
    assert report.trained == 2
    assert report.up is not None
    assert report.up.by_topic_kind["up"][0] == 1


@pytest.mark.anyio
async def test_a_slow_link_delays_the_models_down_and_the_deltas_up() -> None:
    device = DeviceConfig(latency_s=0.1, up_bytes_per_s=100_000, down_bytes_per_s=100_000)
    async with device_worker(device) as run:
        started = time.monotonic()
        await run.edge.publish_model(W0)
        assert await run.next_delta_base() == 1
        assert time.monotonic() - started >= 2 * 0.1
        report = await stop(run)
    assert report.trained == 1


@pytest.mark.anyio
async def test_dropout_goes_offline_and_rejoins_on_the_newest_model() -> None:
    async with device_worker(DeviceConfig(dropout=1.0, offline_s=(0.2, 0.2))) as run:
        await run.edge.publish_model(W0)
        assert await run.next_delta_base() == 1
        await until(lambda: run.statuses[-1:] == ["offline"])
        # While it is away: two new versions, neither trained on.
        await run.edge.publish_model(filled(W0, 2.0))
        newest = filled(W0, 3.0)
        assert await run.edge.publish_model(newest) == 3
        assert len(run.task.trained_from) == 1
        assert await run.next_delta_base() == 3  # back, and on from the newest
        await until(lambda: run.statuses[:3] == ["online", "offline", "online"])
        assert len(run.task.trained_from) == 2
        np.testing.assert_array_equal(run.task.trained_from[1]["w"], newest["w"])
        await until(lambda: run.worker.report.dropouts == 2)  # dropout=1: after every run
        report = await stop(run)
    assert report.trained == 2
    assert report.dropouts == 2
    assert report.to_dict()["dropouts"] == 2
    assert run.edge.pending() == []


@pytest.mark.anyio
async def test_rejoining_waits_for_the_next_model_if_none_came() -> None:
    async with device_worker(DeviceConfig(dropout=1.0, offline_s=(0.05, 0.05))) as run:
        await run.edge.publish_model(W0)
        assert await run.next_delta_base() == 1
        await until(lambda: run.statuses[-2:] == ["offline", "online"])
        assert len(run.task.trained_from) == 1
        assert await run.edge.publish_model(filled(W0, 2.0)) == 2
        assert await run.next_delta_base() == 2
        report = await stop(run)
    assert report.trained == 2


@pytest.mark.anyio
async def test_stop_while_offline_ends_the_worker_promptly() -> None:
    with capture_logs() as logs:
        async with device_worker(DeviceConfig(dropout=1.0, offline_s=(60, 60))) as run:
            await run.edge.publish_model(W0)
            assert await run.next_delta_base() == 1
            await until(lambda: run.statuses[-1:] == ["offline"])
            offline = status_payload("offline")
            assert run.broker.retained[status_topic(FED, "w")] == offline  # as its Will would
            report = await stop(run)  # within WAIT, far short of the 60 s away
    assert report.dropouts == 1
    assert run.statuses == ["online", "offline"]
    events = [(e["event"], e.get("node")) for e in logs if e["log_level"] == "info"]
    assert events == [("dropping out", "w"), ("stopping on request while offline", "w")]
    assert next(e for e in logs if e["event"] == "dropping out")["offline_s"] == 60


@pytest.mark.anyio
async def test_the_same_device_drops_out_as_often() -> None:
    async def dropouts_over(runs: int, seed: int) -> int:
        device = DeviceConfig(seed=seed, dropout=0.5, offline_s=(0, 0))
        async with device_worker(device) as run:
            for version in range(1, runs + 1):
                await run.edge.publish_model(filled(W0, version))
                assert await run.next_delta_base() == version
            # Each run's draw is made before the worker reads its next message: the stop too.
            report = await stop(run)
        assert report.trained == runs
        return report.dropouts

    counts = [await dropouts_over(12, seed) for seed in (7, 7, 8, 8)]
    assert counts[0] == counts[1]
    assert counts[2] == counts[3]
    assert all(0 < count < 12 for count in counts)


@pytest.mark.parametrize(
    ("share", "workers", "expected"), [(0.2, 10, {2, 7}), (0.5, 4, {1, 3}), (0.0, 8, set())]
)
def test_poisoned_workers_are_spread_evenly(share: float, workers: int, expected: set[int]) -> None:
    config = HeterogeneityConfig(poisoned=share, poison="scale", poison_scale=3.0)
    assert config.poisoned_of(workers) == expected
    devices = config.devices(workers)
    assert {i for i, d in enumerate(devices) if d.poison == "scale"} == expected
    assert all(d.poison_scale == 3.0 for d in devices)
