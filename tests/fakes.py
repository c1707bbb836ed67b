"""Helpers for the runtime tests: memory links, tiny tasks, scripted peers, node configs.

A scripted peer (``Peer``) is a hand-driven node on its own ``MemoryLink``: it reads the models
an aggregator publishes and sends whatever bytes a test wants, so tests can play a well-behaved
child, a hostile one or a parent.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from types import TracebackType
from typing import Any

import numpy as np
import pytest

from hfl_mqtt.brokers import find_mosquitto
from hfl_mqtt.codec import Compressor, Header, Message, decode_message, encode_message
from hfl_mqtt.config import BrokerAddress, DownstreamConfig, NodeConfig, UpstreamConfig
from hfl_mqtt.roles.aggregator import Aggregator
from hfl_mqtt.roles.aggregator_base import AggregatorBase
from hfl_mqtt.roles.async_aggregator import AsyncAggregator
from hfl_mqtt.roles.messages import model_message, status_payload
from hfl_mqtt.roles.node import LinkFactory
from hfl_mqtt.roles.report import NodeReport
from hfl_mqtt.tasks.base import EvalResult, TrainConfig, TrainResult
from hfl_mqtt.topics import ctl_topic, model_topic, parse_topic, status_topic, up_filter, up_topic
from hfl_mqtt.transport.base import Incoming, LinkBase
from hfl_mqtt.transport.memory import MemoryBroker, MemoryLink

needs_mosquitto = pytest.mark.skipif(find_mosquitto() is None, reason="mosquitto not installed")
"""For tests on real brokers (CI installs Mosquitto, so they run there)."""

FED = "fed"
WAIT = 5.0
"""Upper bound of any wait in a test: reached only when something is broken."""


def memory_links(broker: MemoryBroker, chunk_size: int = 1 << 20) -> LinkFactory:
    """A ``run_node`` link factory: every link is a ``MemoryLink`` on ``broker``."""

    def make(address: BrokerAddress, client_id: str, status: str | None) -> LinkBase:
        return MemoryLink(
            broker,
            client_id,
            status_topic=status,
            online_payload=status_payload("online"),
            offline_payload=status_payload("offline"),
            chunk_size=chunk_size,
        )

    return make


async def until(predicate: Callable[[], bool], timeout: float = WAIT) -> None:
    """Let the event loop run until ``predicate()`` holds; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.001)


def assert_model(
    actual: Mapping[str, np.ndarray], expected: Mapping[str, np.ndarray], *, tol: float = 0.0
) -> None:
    """Same tensor names and values (exactly, or within ``tol`` absolute and relative)."""
    assert actual.keys() == expected.keys()
    for name, value in expected.items():
        np.testing.assert_allclose(actual[name], value, rtol=tol, atol=tol, err_msg=name)


def rejected(report: NodeReport) -> int:
    return sum(report.updates_rejected.values())


# --- tasks ----------------------------------------------------------------------------------

W0 = {
    "w": np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], np.float32),
    "b": np.array([0.5, -0.5, 0.0], np.float32),
}
"""The initial model of ``FakeTask``: small numbers, so sums are exact in float32."""


class FakeTask:
    """A ``Task`` on no data: ``train`` adds ``step`` to every weight; ``evaluate`` is fixed.

    With ``gate`` set, ``train`` signals ``started`` and then blocks until ``gate`` is set, so
    a test can act while the worker is busy training.
    """

    def __init__(self, step: float = 0.25, gate: threading.Event | None = None) -> None:
        self.weights = {k: v.copy() for k, v in W0.items()}
        self.step = step
        self.gate = gate
        self.started = threading.Event()
        self.trained_from: list[dict[str, np.ndarray]] = []

    @property
    def num_examples(self) -> int:
        return 10

    def get_weights(self) -> dict[str, np.ndarray]:
        return {k: v.copy() for k, v in self.weights.items()}

    def set_weights(self, weights: Mapping[str, np.ndarray]) -> None:
        self.weights = {k: np.array(v, np.float32) for k, v in weights.items()}

    def train(self, config: TrainConfig) -> TrainResult:
        self.trained_from.append(self.get_weights())
        self.started.set()
        if self.gate is not None:
            assert self.gate.wait(WAIT), "the test never opened the gate"
        self.weights = {k: v + np.float32(self.step) for k, v in self.weights.items()}
        return TrainResult(self.num_examples, {"loss": 1.0})

    def evaluate(self) -> EvalResult:
        return EvalResult(10, 1.0, 0.5)


# --- configs --------------------------------------------------------------------------------


def aggregator_config(
    node: str,
    children: list[str],
    *,
    parent: str | None = None,
    rounds: int = 100,
    deadline_s: float = 30.0,
    min_fraction: float = 1.0,
    down_codec: str = "npy",
    up_codec: str = "npy",
    **settings: Any,
) -> NodeConfig:
    """A root (no ``parent``) or an aggregator; lossless codecs unless told. ``settings`` go to
    ``DownstreamConfig`` (``mode``, ``buffer_size``, ...)."""
    return NodeConfig(
        federation=FED,
        node=node,
        upstream=None if parent is None else UpstreamConfig(parent=parent, codec=up_codec),
        downstream=DownstreamConfig(
            children=children,
            codec=down_codec,
            rounds=rounds,
            deadline_s=deadline_s,
            min_fraction=min_fraction,
            **settings,
        ),
        level=0 if parent is None else 1,
    )


def worker_config(node: str, parent: str, codec: str = "npy") -> NodeConfig:
    return NodeConfig(
        federation=FED,
        node=node,
        upstream=UpstreamConfig(parent=parent, codec=codec),
        partition=0,
        level=1,
    )


# --- scripted peers -------------------------------------------------------------------------


def delta_bytes(
    sender: str,
    base_version: int,
    delta: Mapping[str, np.ndarray],
    num_examples: int = 10,
    *,
    update_id: str | None = None,
    federation: str = FED,
) -> bytes:
    """A delta as a well-behaved child sends it (npy: lossless), optionally with a fixed id."""
    header = Header(
        federation=federation,
        sender=sender,
        kind="delta",
        version=base_version + 1,
        base_version=base_version,
        num_examples=num_examples,
        update_id=update_id or uuid.uuid4().hex,
    )
    return encode_message(header, delta, "npy")


def shifted(model: Mapping[str, np.ndarray], by: float) -> dict[str, np.ndarray]:
    """``model`` with ``by`` added everywhere (a delta or a model of the same shapes)."""
    return {k: (v + np.float32(by)).astype(v.dtype) for k, v in model.items()}


def filled(model: Mapping[str, np.ndarray], value: float) -> dict[str, np.ndarray]:
    return {k: np.full_like(v, value) for k, v in model.items()}


class Peer:
    """A hand-driven node on its own link.

    As a child of ``parent`` it reads ``parent``'s models and sends deltas on its up topic; as a
    parent (``serves=True``) it publishes models on its own model topic and reads the deltas
    sent to it.
    """

    def __init__(
        self,
        broker: MemoryBroker,
        name: str,
        *,
        parent: str | None = None,
        serves: bool = False,
        chunk_size: int = 1 << 20,
    ) -> None:
        self.name = name
        self.parent = parent
        self.serves = serves
        self.link = MemoryLink(
            broker,
            name if not serves else f"{name}.down",
            status_topic=status_topic(FED, name),
            online_payload=status_payload("online"),
            offline_payload=status_payload("offline"),
            chunk_size=chunk_size,
        )
        self._version = 0
        self._compressor = Compressor("npy")

    async def __aenter__(self) -> Peer:
        await self.link.__aenter__()
        if self.parent is not None:
            await self.link.subscribe(model_topic(FED, self.parent), chunked_retained=True)
            await self.link.subscribe(ctl_topic(FED, self.name))
        if self.serves:
            await self.link.subscribe(up_filter(FED, self.name))
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.link.__aexit__(exc_type, exc, tb)

    async def next_message(self, timeout: float = WAIT) -> tuple[Incoming, Message]:
        """The next model (as a child) or delta (as a parent) sent to this peer, decoded."""
        async with asyncio.timeout(timeout):
            while True:
                incoming = await self.link.receive()
                topic = parse_topic(incoming.topic)
                if topic is not None and topic.kind in ("model", "up"):
                    return incoming, decode_message(incoming.payload)

    async def next_model(self, timeout: float = WAIT) -> Message:
        _, message = await self.next_message(timeout)
        assert message.header.kind == "model"
        return message

    def pending(self) -> list[Incoming]:
        """Whatever has arrived and not been read yet."""
        items = []
        while (item := self.link.receive_nowait()) is not None:
            items.append(item)
        return items

    async def send(self, payload: bytes, *, as_child: str | None = None) -> None:
        """Publish ``payload`` on the up topic of ``as_child`` (this peer by default)."""
        assert self.parent is not None
        await self.link.publish(up_topic(FED, self.parent, as_child or self.name), payload)

    async def answer(self, model: Message, delta: Mapping[str, np.ndarray], n: int = 10) -> bytes:
        """Send ``delta`` against ``model``'s version; returns the bytes sent."""
        payload = delta_bytes(self.name, model.header.version, delta, n)
        await self.send(payload)
        return payload

    async def publish_model(
        self, model: Mapping[str, np.ndarray], **metrics: float | int | str | bool
    ) -> int:
        """As a parent: publish the next version of our model, retained; returns the version.
        ``metrics`` go in its header (``async=True`` plays an asynchronous parent)."""
        self._version += 1
        payload = model_message(FED, self.name, self._version, model, self._compressor, metrics)
        await self.link.publish(model_topic(FED, self.name), payload, retain=True)
        return self._version

    async def kill(self) -> None:
        await self.link.kill()


# --- an aggregator among scripted peers ------------------------------------------------------


class Running:
    """An aggregator running in a task, and the scripted peers around it."""

    def __init__(self, aggregator: AggregatorBase, task: asyncio.Task[NodeReport]) -> None:
        self.agg = aggregator
        self.task = task
        self.peers: dict[str, Peer] = {}

    @property
    def report(self) -> NodeReport:
        return self.agg.report

    async def until(self, predicate: Callable[[], bool], timeout: float = WAIT) -> None:
        """Let the aggregator work until ``predicate()``; its crash fails the test at once."""
        deadline = time.monotonic() + timeout
        while not predicate():
            if self.task.done():
                self.task.result()
                raise AssertionError("the aggregator stopped")
            if time.monotonic() > deadline:
                raise AssertionError(f"condition not reached in {timeout} s")
            await asyncio.sleep(0.001)

    async def model(self, child: str) -> Message:
        """The next model ``child`` sees."""
        return await self.peers[child].next_model()

    async def settle(self) -> None:
        """Give the aggregator the chance to handle whatever was sent (and do nothing more)."""
        for _ in range(20):
            await asyncio.sleep(0)
        assert not self.task.done()


@contextlib.asynccontextmanager
async def running_aggregator(
    name: str, children: list[str], *, parent: str | None = None, **rounds: Any
) -> AsyncIterator[Running]:
    """An aggregator over scripted children (and under a scripted parent, if it has one),
    synchronous or asynchronous as ``rounds`` (``DownstreamConfig`` settings) say.

    A root's model starts at ``W0``; a non-root one waits for its parent's.
    """
    broker = MemoryBroker()
    config = aggregator_config(name, children, parent=parent, **rounds)
    status = status_topic(FED, name)
    async with contextlib.AsyncExitStack() as stack:
        peers = {c: await stack.enter_async_context(Peer(broker, c, parent=name)) for c in children}
        up = None
        if parent is not None:
            peers[parent] = await stack.enter_async_context(Peer(broker, parent, serves=True))
            up = await stack.enter_async_context(MemoryLink(broker, name, status_topic=status))
        down = await stack.enter_async_context(
            MemoryLink(broker, f"{name}.down", status_topic=None if up else status)
        )
        assert config.downstream is not None
        mode = AsyncAggregator if config.downstream.is_async else Aggregator
        agg = mode(config, down, up, evaluator=None if up else FakeTask())
        run = Running(agg, asyncio.create_task(agg.run(), name=name))
        run.peers = peers
        try:
            yield run
        finally:
            if run.task.done():
                run.task.result()
            run.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await run.task
