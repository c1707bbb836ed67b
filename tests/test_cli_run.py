"""``hfl-mqtt run`` as a real process on a private Mosquitto: several nodes in one process, a
failing node named, and SIGTERM / SIGINT ending the nodes cleanly (a second signal: at once).

The nodes train ``Blobs`` (tests/test_api.py) through the task factory ``blobs_task`` below,
which the process imports by name; its ``params`` can slow training down and leave a line in
a file each time training starts, so a test can send its signal mid-training.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
import yaml

from hfl_mqtt.brokers import MosquittoBroker
from hfl_mqtt.config import BrokerAddress, DownstreamConfig, NodeConfig, UpstreamConfig
from hfl_mqtt.errors import TaskError
from hfl_mqtt.roles.messages import parse_status
from hfl_mqtt.roles.node import run_node
from hfl_mqtt.roles.report import NodeReport
from hfl_mqtt.tasks.base import Task, TaskConfig, TrainConfig, TrainResult
from hfl_mqtt.topics import status_topic
from tests.fakes import FED, needs_mosquitto
from tests.test_api import Blobs

pytestmark = [pytest.mark.anyio, needs_mosquitto]

REPO = Path(__file__).resolve().parent.parent
StartBroker = Callable[..., MosquittoBroker]
Spawn = Callable[..., "subprocess.Popen[bytes]"]
TIMEOUT_S = 30.0


class SlowBlobs(Blobs):
    """``Blobs`` whose training takes at least ``train_s`` and appends a line to ``marker``
    when it starts."""

    def __init__(self, seed: int, train_s: float, marker: str | None) -> None:
        super().__init__(seed)
        self.train_s = train_s
        self.marker = marker

    def train(self, config: TrainConfig) -> TrainResult:
        if self.marker is not None:
            with Path(self.marker).open("a") as f:
                f.write("training\n")
        time.sleep(self.train_s)
        return super().train(config)


def blobs_task(config: TaskConfig, partition: int | None, num_partitions: int) -> Task:
    """The task factory of these nodes: ``Blobs`` seeded by partition (99: the root's)."""
    seed = 99 if partition is None else partition
    return SlowBlobs(seed, config.params.get("train_s", 0.0), config.params.get("marker"))


def no_data(config: TaskConfig, partition: int | None, num_partitions: int) -> Task:
    raise TaskError(f"partition {partition}: the data is not there")


def task(factory: str = "blobs_task", **params: Any) -> TaskConfig:
    return TaskConfig(factory=f"tests.test_cli_run:{factory}", params=params)


def root_config(broker: BrokerAddress, children: list[str], **rounds: Any) -> NodeConfig:
    return NodeConfig(
        federation=FED,
        node="cloud",
        downstream=DownstreamConfig(broker=broker, children=children, codec="npy", **rounds),
        task=task(),
        num_partitions=len(children),
    )


def worker_config(
    broker: BrokerAddress, name: str, partition: int, task_config: TaskConfig | None = None
) -> NodeConfig:
    return NodeConfig(
        federation=FED,
        node=name,
        upstream=UpstreamConfig(broker=broker, parent="cloud", codec="npy"),
        task=task_config or task(),
        partition=partition,
        num_partitions=2,
        level=1,
    )


def write(directory: Path, node: NodeConfig) -> Path:
    path = directory / f"{node.node}.yaml"
    path.write_text(yaml.safe_dump(node.model_dump(mode="json"), sort_keys=False))
    return path


def cli_run(spawn: Spawn, tmp_path: Path, *args: str) -> subprocess.Popen[bytes]:
    """``python -m hfl_mqtt.cli run ARGS`` from the repository; output to run.out / run.err."""
    with (tmp_path / "run.out").open("wb") as out, (tmp_path / "run.err").open("wb") as err:
        return spawn(
            [sys.executable, "-m", "hfl_mqtt.cli", "run", *args],
            cwd=REPO,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
        )


async def exit_code(process: subprocess.Popen[bytes], timeout: float = TIMEOUT_S) -> int:
    deadline = time.monotonic() + timeout
    while (code := process.poll()) is None:
        if time.monotonic() > deadline:
            raise AssertionError(f"{process.args} still running after {timeout} s")
        await asyncio.sleep(0.05)
    return code


async def until(predicate: Callable[[], bool], timeout: float = TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.02)


def lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


async def retained_status(broker: MosquittoBroker, node: str) -> str | None:
    """The state the broker keeps on ``node``'s status topic."""
    async with aiomqtt.Client(broker.host, broker.port) as client:
        await client.subscribe(status_topic(FED, node), qos=1)
        async with asyncio.timeout(5):
            async for message in client.messages:
                assert isinstance(message.payload, bytes)
                assert message.retain
                return parse_status(message.payload)
    return None


# --- several nodes in one process --------------------------------------------------------------


async def test_several_configs_run_in_one_process(
    start_broker: StartBroker, spawn: Spawn, tmp_path: Path
) -> None:
    broker = start_broker()
    address = BrokerAddress(host=broker.host, port=broker.port)
    root = write(tmp_path, root_config(address, ["pi-0", "pi-1"], rounds=2))
    workers = [write(tmp_path, worker_config(address, f"pi-{i}", i)) for i in range(2)]
    # Both ways of naming several files: --config repeated, and several after one --config.
    process = cli_run(spawn, tmp_path, "--config", str(root), "--config", *map(str, workers))

    code = await exit_code(process)
    assert code == 0, (tmp_path / "run.err").read_text()
    printed = json.loads((tmp_path / "run.out").read_text())
    assert [(r["node"], r["role"]) for r in printed] == [
        ("cloud", "root"),
        ("pi-0", "worker"),
        ("pi-1", "worker"),
    ]
    assert printed[0]["rounds"] == 2
    assert printed[0]["updates_accepted"] == 2 * 2
    assert [r["trained"] for r in printed[1:]] == [2, 2]
    sent = {i for r in printed[1:] for i in r["sent_ids"]}
    assert sent == set(printed[0]["accepted_ids"])


async def test_a_failing_node_is_named_and_the_others_finish(
    start_broker: StartBroker, spawn: Spawn, tmp_path: Path
) -> None:
    broker = start_broker()
    address = BrokerAddress(host=broker.host, port=broker.port)
    configs = [
        root_config(address, ["pi-0", "pi-1"], rounds=1, deadline_s=2.0, min_fraction=0.5),
        worker_config(address, "pi-0", 0),
        worker_config(address, "pi-1", 1, task("no_data")),
    ]
    process = cli_run(spawn, tmp_path, "--config", *(str(write(tmp_path, c)) for c in configs))

    assert await exit_code(process) == 2
    err = (tmp_path / "run.err").read_text()
    assert "hfl-mqtt: node pi-1: TaskError: partition 1: the data is not there" in err
    printed = json.loads((tmp_path / "run.out").read_text())
    assert printed[0]["rounds"] == 1
    assert printed[1]["trained"] == 1
    assert printed[2] == {"node": "pi-1", "error": "TaskError: partition 1: the data is not there"}


async def test_the_same_node_twice_is_refused(
    start_broker: StartBroker, spawn: Spawn, tmp_path: Path
) -> None:
    broker = start_broker()
    path = write(tmp_path, worker_config(BrokerAddress(host=broker.host, port=broker.port), "w", 0))
    process = cli_run(spawn, tmp_path, "--config", str(path), str(path))
    assert await exit_code(process) == 2
    assert "node w is given twice" in (tmp_path / "run.err").read_text()


# --- signals -------------------------------------------------------------------------------------


class RunningRoot:
    """A root over ``pi-0`` run in this process, until ``stop``."""

    def __init__(self, broker: MosquittoBroker) -> None:
        self.address = BrokerAddress(host=broker.host, port=broker.port)
        self.config = root_config(self.address, ["pi-0"], rounds=1000)
        self.stop = asyncio.Event()
        self.rounds: list[dict[str, Any]] = []
        """One event per global round: with one child, one per delta it took."""

    async def run(self) -> NodeReport:
        return await run_node(
            self.config, task=Blobs(99), stop=self.stop, on_event=self.rounds.append
        )


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_a_signal_ends_the_worker_cleanly(
    start_broker: StartBroker, spawn: Spawn, tmp_path: Path, sig: signal.Signals
) -> None:
    """Sent mid-training: the worker finishes the run, sends its delta (the root takes it),
    publishes its status offline, prints its report and exits 0."""
    broker = start_broker()
    root = RunningRoot(broker)
    marker = tmp_path / "training"
    worker = worker_config(root.address, "pi-0", 0, task(train_s=0.5, marker=str(marker)))
    async with asyncio.TaskGroup() as group:
        running_root = group.create_task(root.run())
        process = cli_run(spawn, tmp_path, "--config", str(write(tmp_path, worker)))
        await until(lambda: lines(marker) >= 2)  # the second training run has started
        process.send_signal(sig)
        code = await exit_code(process)
        assert code == 0, (tmp_path / "run.err").read_text()
        printed = json.loads((tmp_path / "run.out").read_text())
        sent = printed["sent_ids"]
        assert printed["trained"] == len(sent) == 2  # nothing trained was dropped
        await until(lambda: len(root.rounds) >= len(sent))
        assert not running_root.done(), "the worker's signal must not end its parent"
        root.stop.set()
    # The delta sent on the way out reached the parent.
    assert running_root.result().accepted_ids == sent
    assert await retained_status(broker, "pi-0") == "offline"
    assert f"signal={sig.name}" in (tmp_path / "run.err").read_text()


async def test_a_second_signal_stops_at_once(
    start_broker: StartBroker, spawn: Spawn, tmp_path: Path
) -> None:
    """Two signals: the nodes are cancelled, the delta in training is never sent, exit code
    128 + the signal; the status still goes offline."""
    broker = start_broker()
    root = RunningRoot(broker)
    marker = tmp_path / "training"
    worker = worker_config(root.address, "pi-0", 0, task(train_s=2.0, marker=str(marker)))
    async with asyncio.TaskGroup() as group:
        running_root = group.create_task(root.run())
        process = cli_run(spawn, tmp_path, "--config", str(write(tmp_path, worker)))
        await until(lambda: lines(marker) >= 1)
        process.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.3)
        assert process.poll() is None, "the first signal waits for the training run"
        process.send_signal(signal.SIGTERM)
        assert await exit_code(process) == 128 + signal.SIGTERM
        assert (tmp_path / "run.out").read_text() == ""
        root.stop.set()
    assert running_root.result().updates_accepted == 0
    assert await retained_status(broker, "pi-0") == "offline"
    assert "stopping now" in (tmp_path / "run.err").read_text()
