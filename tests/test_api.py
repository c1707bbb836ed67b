"""The public API: a worker embedded in a program of its own (``hfl_mqtt.Worker.connect``).

The worker trains a task object of its own (``Blobs``: logistic regression on points it makes
in memory), never built from a ``TaskConfig``; on a real Mosquitto it joins a root run with
``run_node``, and on memory links it plays against a scripted parent.
"""

from __future__ import annotations

import ast
import asyncio
import re
import socket
import subprocess
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import hfl_mqtt
from hfl_mqtt.brokers import MosquittoBroker
from hfl_mqtt.codec import decode_message
from hfl_mqtt.config import DownstreamConfig, NodeConfig, UpstreamConfig
from hfl_mqtt.roles.messages import STOP, parse_status
from hfl_mqtt.topics import ctl_topic, status_topic
from hfl_mqtt.transport.memory import MemoryBroker
from tests.fakes import FED, WAIT, Peer, aggregator_config, memory_links, needs_mosquitto

pytestmark = pytest.mark.anyio

StartBroker = Callable[..., MosquittoBroker]


class Blobs:
    """A ``Task`` on two Gaussian blobs in 2-D, made from ``seed``: logistic regression."""

    def __init__(self, seed: int, n: int = 200) -> None:
        rng = np.random.default_rng(seed)
        labels = rng.integers(0, 2, n)
        self.x = (rng.normal(size=(n, 2)) + np.where(labels[:, None] == 1, 1.5, -1.5)).astype(
            np.float32
        )
        self.y = labels.astype(np.float32)
        self.weights = {"w": np.zeros(2, np.float32), "b": np.zeros(1, np.float32)}

    @property
    def num_examples(self) -> int:
        return len(self.y)

    def get_weights(self) -> dict[str, np.ndarray]:
        return {k: v.copy() for k, v in self.weights.items()}

    def set_weights(self, weights: Mapping[str, np.ndarray]) -> None:
        self.weights = {k: np.asarray(weights[k], np.float32).copy() for k in self.weights}

    def _p(self) -> np.ndarray:
        z = self.x @ self.weights["w"] + self.weights["b"][0]
        p: np.ndarray = 1 / (1 + np.exp(-z))
        return p

    def train(self, config: hfl_mqtt.TrainConfig) -> hfl_mqtt.TrainResult:
        for _ in range(config.epochs):
            error = self._p() - self.y
            self.weights["w"] -= config.learning_rate * (self.x.T @ error) / len(self.y)
            self.weights["b"] -= config.learning_rate * error.mean()
        return hfl_mqtt.TrainResult(self.num_examples, {"loss": self.evaluate().loss})

    def evaluate(self) -> hfl_mqtt.EvalResult:
        p = np.clip(self._p(), 1e-7, 1 - 1e-7)
        loss = float(-np.mean(self.y * np.log(p) + (1 - self.y) * np.log(1 - p)))
        accuracy = float(np.mean((p > 0.5) == (self.y == 1)))
        return hfl_mqtt.EvalResult(self.num_examples, loss, accuracy)


def on_memory(broker: MemoryBroker, **options: object) -> hfl_mqtt.Worker:
    """``pi-7`` under ``edge`` on memory links, with a ``Blobs`` task unless told."""
    settings: dict[str, object] = {"task": Blobs(7), **options}
    return hfl_mqtt.Worker.connect(
        hfl_mqtt.BrokerAddress(),
        node="pi-7",
        parent="edge",
        federation=FED,
        links=memory_links(broker),
        **settings,  # type: ignore[arg-type]
    )


def free_port() -> int:
    """A local port nothing listens on (bound for a moment, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


# --- on a real broker ---------------------------------------------------------------------------


@needs_mosquitto
async def test_embedded_workers_train_under_a_root_until_it_stops_them(
    start_broker: StartBroker,
) -> None:
    broker = start_broker()
    address = hfl_mqtt.BrokerAddress(host=broker.host, port=broker.port)
    root = aggregator_config("cloud", ["pi-0", "pi-1"], rounds=3)
    root = root.model_copy(
        update={"downstream": root.downstream.model_copy(update={"broker": address})}  # type: ignore[union-attr]
    )
    train = hfl_mqtt.TrainConfig(epochs=5, learning_rate=0.5)

    async def worker(i: int) -> hfl_mqtt.NodeReport:
        async with hfl_mqtt.Worker.connect(
            address, node=f"pi-{i}", parent="cloud", federation=FED, task=Blobs(i), train=train
        ) as embedded:
            await embedded.run()
        return embedded.report

    evaluator = Blobs(99)
    async with asyncio.timeout(30), asyncio.TaskGroup() as group:
        running_root = group.create_task(hfl_mqtt.run_node(root, task=evaluator))
        workers = [group.create_task(worker(i)) for i in range(2)]
    report = running_root.result()

    assert report.rounds == 3
    assert report.updates_accepted == 2 * 3
    assert report.evaluations[-1]["accuracy"] > 0.9
    for i, running in enumerate(workers):
        worker_report = running.result()
        assert worker_report.node == f"pi-{i}"
        assert worker_report.trained == 3
        assert set(worker_report.sent_ids) <= set(report.accepted_ids)
        assert worker_report.updates_rejected == {}


@needs_mosquitto
async def test_the_default_uplink_codec_is_q8(start_broker: StartBroker) -> None:
    broker = start_broker()
    address = hfl_mqtt.BrokerAddress(host=broker.host, port=broker.port)
    worker = hfl_mqtt.Worker.connect(
        address, node="pi-7", parent="edge", federation=FED, task=Blobs(7)
    )
    assert worker.config.upstream is not None
    assert worker.config.upstream.codec == "q8"
    async with worker:
        assert worker.report.up is not None  # the link's counters, live


async def test_an_unreachable_broker_fails_with_a_transport_error_naming_it() -> None:
    port = free_port()
    worker = hfl_mqtt.Worker.connect(
        hfl_mqtt.BrokerAddress(host="127.0.0.1", port=port),
        node="pi-7",
        parent="edge",
        federation=FED,
        task=Blobs(7),
        connect_timeout=0.5,
    )
    with pytest.raises(hfl_mqtt.TransportError, match=f"127.0.0.1:{port}"):
        async with worker:
            pytest.fail("connected to nothing")


# --- against a scripted parent on memory links --------------------------------------------------


async def test_stop_ends_run_cleanly_and_the_status_goes_offline() -> None:
    broker = MemoryBroker()
    async with Peer(broker, "edge", serves=True) as parent, on_memory(broker) as worker:
        running = asyncio.create_task(worker.run())
        await parent.publish_model(Blobs(0).get_weights())
        _, delta = await parent.next_message()
        assert delta.header.kind == "delta"
        worker.stop()
        report = await asyncio.wait_for(running, WAIT)
    assert report is worker.report
    assert report.trained == 1
    assert report.sent_ids == [delta.header.update_id]
    assert parse_status(broker.retained[status_topic(FED, "pi-7")]) == "offline"


async def test_the_parent_s_stop_ends_run() -> None:
    broker = MemoryBroker()
    async with Peer(broker, "edge", serves=True) as parent, on_memory(broker) as worker:
        running = asyncio.create_task(worker.run())
        await parent.publish_model(Blobs(0).get_weights())
        await parent.next_message()  # the worker is subscribed: it answered
        await parent.link.publish(ctl_topic(FED, "pi-7"), STOP)
        report = await asyncio.wait_for(running, WAIT)
    assert report.trained == 1


async def test_stop_before_run_returns_at_once() -> None:
    async with on_memory(MemoryBroker()) as worker:
        worker.stop()
        report = await asyncio.wait_for(worker.run(), WAIT)
    assert report.trained == 0


async def test_a_task_factory_is_built_on_entering_in_a_thread() -> None:
    built: list[str] = []

    def factory() -> Blobs:
        with pytest.raises(RuntimeError):
            asyncio.get_running_loop()  # not on the event loop's thread
        built.append("built")
        return Blobs(3)

    worker = on_memory(MemoryBroker(), task=factory)
    assert built == []
    async with worker:
        assert built == ["built"]


async def test_a_class_is_taken_as_a_factory() -> None:
    class Seeded(Blobs):
        def __init__(self) -> None:
            super().__init__(5)

    async with on_memory(MemoryBroker(), task=Seeded) as worker:
        worker.stop()
        assert (await worker.run()).trained == 0


async def test_a_factory_that_returns_no_task_fails_with_task_error() -> None:
    with pytest.raises(hfl_mqtt.TaskError, match="returned int, which is not a Task"):
        async with on_memory(MemoryBroker(), task=lambda: 42):
            pytest.fail("entered with no task")


async def test_train_settings_reach_the_task() -> None:
    seen: list[hfl_mqtt.TrainConfig] = []

    class Recording(Blobs):
        def train(self, config: hfl_mqtt.TrainConfig) -> hfl_mqtt.TrainResult:
            seen.append(config)
            return super().train(config)

    broker = MemoryBroker()
    train = hfl_mqtt.TrainConfig(epochs=3, batch_size=8, learning_rate=0.05)
    async with (
        Peer(broker, "edge", serves=True) as parent,
        on_memory(broker, task=Recording(1), train=train, codec="npy") as worker,
    ):
        running = asyncio.create_task(worker.run())
        await parent.publish_model(Blobs(0).get_weights())
        await parent.next_message()
        worker.stop()
        await asyncio.wait_for(running, WAIT)
    assert seen == [train]


# --- misuse ---------------------------------------------------------------------------------------


async def test_entering_twice_is_a_runtime_error() -> None:
    async with on_memory(MemoryBroker()) as worker:
        with pytest.raises(RuntimeError, match="already connected"):
            async with worker:
                pytest.fail("entered twice")
        worker.stop()
        await worker.run()  # the first entry is unharmed


async def test_run_outside_async_with_is_a_runtime_error() -> None:
    worker = on_memory(MemoryBroker())
    with pytest.raises(RuntimeError, match="not connected"):
        await worker.run()
    async with worker:
        worker.stop()
        await worker.run()
        with pytest.raises(RuntimeError, match="once per connection"):
            await worker.run()
    with pytest.raises(RuntimeError, match="not connected"):
        await worker.run()


async def test_a_worker_can_connect_again_after_leaving() -> None:
    broker = MemoryBroker()
    worker = on_memory(broker)
    for _ in range(2):
        async with worker:
            assert parse_status(broker.retained[status_topic(FED, "pi-7")]) == "online"
            worker.stop()
            await worker.run()
        assert parse_status(broker.retained[status_topic(FED, "pi-7")]) == "offline"


def test_a_task_that_is_not_one_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="task must be a Task or a callable"):
        on_memory(MemoryBroker(), task="digits")


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"codec": "q3"}, "upstream.codec"),
        ({"chunk_size": 10}, "chunk_size"),
        ({"node": "a/b"}, "node"),
    ],
)
def test_invalid_settings_are_config_errors_naming_the_field(
    options: dict[str, object], field: str
) -> None:
    settings: dict[str, object] = {
        "node": "pi-7",
        "parent": "edge",
        "federation": FED,
        "task": Blobs(7),
        **options,
    }
    with pytest.raises(hfl_mqtt.ConfigError, match=f"^worker .*{field}: "):
        hfl_mqtt.Worker.connect(hfl_mqtt.BrokerAddress(), **settings)  # type: ignore[arg-type]


def test_only_a_worker_s_config_makes_a_worker() -> None:
    with pytest.raises(ValueError, match="is a root, not a worker"):
        hfl_mqtt.Worker(aggregator_config("cloud", ["pi-7"]), Blobs(7))


# --- a worker's partition, and a light import ----------------------------------------------------


async def test_a_worker_needs_its_partition_only_to_build_its_task() -> None:
    config = NodeConfig(federation=FED, node="pi-7", upstream=UpstreamConfig(parent="edge"))
    assert config.partition is None
    with pytest.raises(hfl_mqtt.ConfigError, match=r"pi-7: a worker .* needs its data partition"):
        await hfl_mqtt.run_node(config, links=memory_links(MemoryBroker()))
    stop = asyncio.Event()
    stop.set()
    report = await hfl_mqtt.run_node(
        config, links=memory_links(MemoryBroker()), task=Blobs(7), stop=stop
    )
    assert report.trained == 0


def test_import_hfl_mqtt_loads_no_heavy_dependency() -> None:
    heavy = ["torch", "flwr", "matplotlib", "sklearn", "rich", "aiomqtt", "pydantic", "numpy"]
    code = f"import sys, hfl_mqtt; print([m for m in {heavy!r} if m in sys.modules])"
    out = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True
    ).stdout
    assert out.strip() == "[]"


def test_the_public_names_are_all_there() -> None:
    for name in hfl_mqtt.__all__:
        assert getattr(hfl_mqtt, name) is not None, name
    assert hfl_mqtt.Worker.__module__ == "hfl_mqtt.api"
    assert isinstance(Blobs(0), hfl_mqtt.Task)
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        _ = hfl_mqtt.Nope  # type: ignore[attr-defined]


async def test_deltas_go_up_as_every_node_sends_them() -> None:
    """The embedded worker speaks the wire format of every node: a delta from its own model,
    against the version it received, weighted by its examples."""
    broker = MemoryBroker()
    task = Blobs(7)
    async with (
        Peer(broker, "edge", serves=True) as parent,
        on_memory(broker, task=task, codec="npy") as worker,
    ):
        running = asyncio.create_task(worker.run())
        start = Blobs(0).get_weights()
        version = await parent.publish_model(start)
        incoming, _ = await parent.next_message()
        worker.stop()
        await asyncio.wait_for(running, WAIT)
    message = decode_message(incoming.payload)
    assert message.header.sender == "pi-7"
    assert message.header.base_version == version
    assert message.header.num_examples == 200
    for name, value in task.get_weights().items():
        np.testing.assert_allclose(message.arrays[name], value - start[name], rtol=1e-6)


# --- the README's example, as written -------------------------------------------------------------


def readme_example() -> str:
    """The code of the README's "Embedding a worker in your own program" section."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme.split("## Embedding a worker in your own program", 1)[1]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


@needs_mosquitto
async def test_the_readme_example_runs_as_written(start_broker: StartBroker) -> None:
    """Only the broker address changes: a root named as the example's parent runs here."""
    broker = start_broker()
    code = readme_example()
    address = f"    broker = hfl_mqtt.BrokerAddress(host={broker.host!r}, port={broker.port})\n"
    code, replaced = re.subn(r"^    broker = .*?^    \)\n", address, code, flags=re.M | re.S)
    assert replaced == 1
    example: dict[str, Any] = {}
    exec(code.replace("asyncio.run(main())", ""), example)  # its task is the root's too
    root = NodeConfig(
        federation="farm",
        node="edge-1",
        downstream=DownstreamConfig(
            broker=hfl_mqtt.BrokerAddress(host=broker.host, port=broker.port),
            children=["pi-7"],
            rounds=2,
        ),
    )
    async with asyncio.timeout(30):
        running = asyncio.create_task(
            hfl_mqtt.run_node(root, task=example["MeanTask"]([20.0, 21.0]))
        )
        worker = await asyncio.create_subprocess_exec(
            sys.executable, "-c", code, stdout=asyncio.subprocess.PIPE
        )
        out, _ = await worker.communicate()
        report = await running
    assert worker.returncode == 0
    printed = ast.literal_eval(out.decode().splitlines()[-1])  # after structlog's default output
    assert printed["node"] == "pi-7"
    assert printed["trained"] == 2
    assert report.updates_accepted == 2
