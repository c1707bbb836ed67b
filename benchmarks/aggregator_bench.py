"""Aggregator and transport benchmark: q8 deltas folded in per second, MqttLink vs bare aiomqtt.

Part 1, the aggregator. A real edge ``Aggregator`` (a parent, ``--children`` children,
``--rounds`` rounds before it reports up) runs in its own process pinned to one core, connected
through two real ``MqttLink`` s to a private Mosquitto. A second process, pinned to the other
core with the broker, plays the parent and every child: it pre-encodes valid q8 deltas of a
~100k-parameter float32 CNN (a distinct delta per child, a distinct update id per message, the
right base version), publishes the parent's model, and each time the edge publishes a new model
version publishes that round's deltas as fast as the broker takes them (QoS 1,
``--publish-window`` awaiting their PUBACK at a time, as that many devices uploading at once).
``updates_per_s`` is accepted updates per second at the aggregator, from the first accepted
update to the last (best of ``--agg-repeats`` runs). The aggregator's time in that window is
split per update into decoding and checking, aggregating (FedAvg), the rest of closing a round
(encoding and publishing the next model), the rest of its CPU (MQTT reading, queues, event loop)
and idle time; the time between rounds is split into milestones.

Part 2, the transport. ``--transport-count`` messages of ``--transport-size`` bytes (1 MiB: one
whole chunk) go from a publisher to a subscriber on a fresh broker, once through two
``MqttLink`` s and once through two bare ``aiomqtt.Client`` s (MQTT 5, TCP_NODELAY, QoS 1), in
one process, with the same payload and the same pattern (each publish awaits its PUBACK;
``--window`` in flight), after a warm-up, alternating, best of ``--repeats``.

    python benchmarks/aggregator_bench.py --json aggregator.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import dataclasses
import json
import logging
import math
import multiprocessing
import multiprocessing.connection
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
import traceback
import uuid
from collections import Counter
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from multiprocessing.connection import Connection
from typing import Any

import aiomqtt
import numpy as np
import structlog

from hfl_mqtt.aggregation.base import Model, Update
from hfl_mqtt.aggregation.fedavg import FedAvg
from hfl_mqtt.brokers import BrokerConfig, MosquittoBroker, find_mosquitto
from hfl_mqtt.codec import (
    Compressor,
    Envelope,
    Header,
    decode_envelope,
    encode_envelope,
    encode_message,
    parse_spec,
)
from hfl_mqtt.config import BrokerAddress, DownstreamConfig, NodeConfig, UpstreamConfig
from hfl_mqtt.roles import Aggregator
from hfl_mqtt.roles.messages import STOP, status_payload
from hfl_mqtt.topics import ctl_topic, model_topic, status_topic, up_topic
from hfl_mqtt.transport.base import Incoming, LinkBase
from hfl_mqtt.transport.mqtt import MqttLink

FEDERATION = "bench"
EDGE = "edge"
PARENT = "cloud"
TARGET_UPDATES_PER_S = 1000.0
TARGET_TRANSPORT_RATIO = 0.8
PROCESS_TIMEOUT_S = 300.0
NODELAY = [(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)]


# --- the model ----------------------------------------------------------------------------------


def cnn_100k() -> dict[str, tuple[int, ...]]:
    """A small CNN for 28x28 images (two 5x5 convolutions, three dense layers): 100,810 params."""
    return {
        "conv1.weight": (16, 1, 5, 5),
        "conv1.bias": (16,),
        "conv2.weight": (32, 16, 5, 5),
        "conv2.bias": (32,),
        "fc1.weight": (160, 32 * 4 * 4),
        "fc1.bias": (160,),
        "fc2.weight": (32, 160),
        "fc2.bias": (32,),
        "head.weight": (10, 32),
        "head.bias": (10,),
    }


def scaled_to(shapes: dict[str, tuple[int, ...]], params: int) -> dict[str, tuple[int, ...]]:
    """Shrink a model's dimensions so it has about ``params`` parameters (for smoke runs)."""
    total = sum(math.prod(s) for s in shapes.values())
    if params >= total:
        return shapes
    factor = math.sqrt(params / total)
    return {k: tuple(max(1, round(d * factor)) for d in s) for k, s in shapes.items()}


def make_arrays(shapes: Mapping[str, tuple[int, ...]], seed: int, scale: float) -> Model:
    """Gaussian values scaled by ``scale``/sqrt(fan-in) per layer, as weights and deltas are."""
    rng = np.random.default_rng(seed)
    arrays: Model = {}
    for name, shape in shapes.items():
        fan_in = math.prod(shape[1:]) if len(shape) > 1 else shape[0]
        std = scale / math.sqrt(fan_in)
        arrays[name] = rng.standard_normal(shape, dtype=np.float32) * np.float32(std)
    return arrays


def child_ids(count: int) -> list[str]:
    return [f"worker-{i}" for i in range(count)]


@dataclass(frozen=True, slots=True)
class AggregatorParams:
    """What both processes of part 1 need to agree on (sent to them pickled)."""

    params: int
    children: int
    rounds: int
    codec: str
    publish_window: int = 16
    seed: int = 0
    profile: str | None = None

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return scaled_to(cnn_100k(), self.params)


# --- part 1: the aggregator process -------------------------------------------------------------


@dataclass(slots=True)
class Timing:
    """Time the aggregator spends where, accumulated (seconds) and snapshotted at accepts."""

    update_s: float = 0.0
    """In ``_on_update`` (decode, checks, bookkeeping), not counting a round it closes."""
    close_s: float = 0.0
    """In ``_close_round``: aggregate, then publish the next model (or report up)."""
    aggregate_s: float = 0.0
    """In FedAvg: folding each delta in (``add``, within the update step) and ``finish``."""
    add_s: float = 0.0
    """In FedAvg's ``add`` alone."""
    handled: int = 0
    close_spans: list[tuple[float, float, float]] = field(default_factory=list)
    """(start, aggregate done, end) of every ``_close_round``."""
    accept_times: list[float] = field(default_factory=list)
    accept_versions: list[int] = field(default_factory=list)
    first: tuple[float, ...] | None = None
    last: tuple[float, ...] | None = None

    def snapshot(self, when: float) -> tuple[float, ...]:
        return (
            when,
            time.process_time(),
            self.update_s,
            self.close_s,
            self.aggregate_s,
            self.add_s,
        )


class TimedStrategy:
    """Wraps FedAvg and adds the time its aggregation takes to ``timing``.

    The aggregator folds each delta in as it arrives (``add``), so the aggregation time is that
    of ``add`` (counted inside the update step too) plus ``finish`` at the round's close.
    """

    def __init__(self, inner: FedAvg, timing: Timing) -> None:
        self.inner, self.timing = inner, timing
        self.done = 0.0

    def aggregate(self, model: Mapping[str, np.ndarray], updates: Sequence[Update]) -> Model:
        start = time.perf_counter()
        try:
            return self.inner.aggregate(model, updates)
        finally:
            self.done = time.perf_counter()
            self.timing.aggregate_s += self.done - start

    def start(self, model: Mapping[str, np.ndarray]) -> None:
        self.inner.start(model)

    def add(self, update: Update) -> None:
        start = time.perf_counter()
        try:
            self.inner.add(update)
        finally:
            spent = time.perf_counter() - start
            self.timing.aggregate_s += spent
            self.timing.add_s += spent

    def finish(self) -> Model:
        start = time.perf_counter()
        try:
            return self.inner.finish()
        finally:
            self.done = time.perf_counter()
            self.timing.aggregate_s += self.done - start


class TimedAggregator(Aggregator):
    """The real ``Aggregator`` with stopwatches around its update and round-closing steps.

    It overrides two private methods only to time them and calls them unchanged: nothing the
    aggregator does is replaced.
    """

    def __init__(self, config: NodeConfig, down: LinkBase, up: LinkBase, *, timing: Timing) -> None:
        assert config.downstream is not None
        self.timed_strategy = TimedStrategy(FedAvg(config.downstream.server_lr), timing)
        super().__init__(config, down, up, strategy=self.timed_strategy)
        self.timing = timing

    async def _on_update(self, child: str, message: Incoming) -> None:
        timing = self.timing
        version = self.version
        accepted = self.report.updates_accepted
        closing = timing.close_s
        start = time.perf_counter()
        await super()._on_update(child, message)
        end = time.perf_counter()
        in_close = timing.close_s - closing
        timing.update_s += end - start - in_close
        timing.handled += 1
        if self.report.updates_accepted > accepted:
            when = end - in_close  # accepted before the round it completed was closed
            timing.accept_times.append(when)
            timing.accept_versions.append(version)
            snap = timing.snapshot(when)
            if timing.first is None:
                timing.first = snap
            timing.last = snap

    async def _close_round(self, updates: list[Update]) -> None:
        start = time.perf_counter()
        try:
            await super()._close_round(updates)
        finally:
            end = time.perf_counter()
            self.timing.close_s += end - start
            self.timing.close_spans.append((start, self.timed_strategy.done, end))


def _quiet_logs() -> None:
    # Round closes are logged at info; a deployment would log them too, but not to a terminal.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))


def _quiet_logger(name: str) -> logging.Logger:
    logger = logging.getLogger(name)
    logger.setLevel(logging.ERROR)
    return logger


def _pin(cpu: int | None) -> None:
    if cpu is not None and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {cpu})


def _child_process(target: Callable[..., dict[str, Any]], conn: Connection, *args: Any) -> None:
    try:
        conn.send(("ok", target(*args)))
    except BaseException:
        conn.send(("error", traceback.format_exc()))
        raise
    finally:
        conn.close()


def aggregator_main(
    host: str, port: int, p: AggregatorParams, cpu: int | None, conn: Connection
) -> None:
    """Entry point of the aggregator process."""
    _pin(cpu)
    _quiet_logs()
    _child_process(lambda: asyncio.run(_run_aggregator(host, port, p)), conn)


async def _run_aggregator(host: str, port: int, p: AggregatorParams) -> dict[str, Any]:
    broker = BrokerAddress(host=host, port=port)
    config = NodeConfig(
        federation=FEDERATION,
        node=EDGE,
        upstream=UpstreamConfig(broker=broker, parent=PARENT, codec=p.codec),
        downstream=DownstreamConfig(
            broker=broker, children=child_ids(p.children), rounds=p.rounds, deadline_s=600
        ),
        level=1,
    )
    timing = Timing()
    up = MqttLink(
        host,
        port,
        EDGE,
        status_topic=status_topic(FEDERATION, EDGE),
        online_payload=status_payload("online"),
        offline_payload=status_payload("offline"),
    )
    down = MqttLink(host, port, f"{EDGE}.down")
    profiler = cProfile.Profile() if p.profile else None
    async with up, down:
        aggregator = TimedAggregator(config, down, up, timing=timing)
        if profiler is not None:
            profiler.enable()
        report = await aggregator.run()
        if profiler is not None:
            profiler.disable()
    if profiler is not None and p.profile:
        profiler.dump_stats(p.profile)
    return {
        "accepted": report.updates_accepted,
        "rejected": dict(report.updates_rejected),
        "rounds": report.rounds,
        "handled": timing.handled,
        "accept_times": timing.accept_times,
        "accept_versions": timing.accept_versions,
        "close_spans": timing.close_spans,
        "first": timing.first,
        "last": timing.last,
        "down_codec": config.downstream.codec if config.downstream else None,
    }


# --- part 1: the process playing the parent and the children ------------------------------------


def _encode_rounds(p: AggregatorParams) -> tuple[bytes, dict[int, list[tuple[str, bytes]]]]:
    """The parent's model, and every round's deltas keyed by the base version they name.

    Each child's tensors are quantized once (a real q8 ``Compressor``); every round gets its own
    header (base version, update id) and frame (digest), as a worker's next delta would.
    """
    shapes = p.shapes()
    model = make_arrays(shapes, p.seed, 1.0)
    parent_header = Header(federation=FEDERATION, sender=PARENT, kind="model", version=1)
    parent_model = encode_message(parent_header, model, "npy")
    spec = parse_spec(p.codec)
    rounds: dict[int, list[tuple[str, bytes]]] = {}
    for index, child in enumerate(child_ids(p.children)):
        delta = make_arrays(shapes, p.seed + 1 + index, 0.01)
        tensors = tuple(Compressor(spec, seed=p.seed + index).encode(delta))
        topic = up_topic(FEDERATION, EDGE, child)
        # The edge's version is 1 once it has the parent's model, one more per round.
        for base in range(1, p.rounds + 1):
            header = Header(
                federation=FEDERATION,
                sender=child,
                kind="delta",
                version=base + 1,
                base_version=base,
                num_examples=100 + index,
                metrics={"loss": 0.5, "tree_bytes": 0, "tree_messages": base - 1},
                codec=str(spec),
                update_id=uuid.uuid4().hex,
            )
            rounds.setdefault(base, []).append((topic, encode_envelope(Envelope(header, tensors))))
    return parent_model, rounds


def publisher_main(
    host: str, port: int, p: AggregatorParams, cpu: int | None, conn: Connection
) -> None:
    """Entry point of the process that plays the parent and every child."""
    _pin(cpu)
    _child_process(lambda: _run_publisher(host, port, p), conn)


def _run_publisher(host: str, port: int, p: AggregatorParams) -> dict[str, Any]:
    start = time.perf_counter()
    parent_model, rounds = _encode_rounds(p)
    encode_s = time.perf_counter() - start
    result = asyncio.run(_publish_rounds(host, port, p, parent_model, rounds))
    sizes = [len(payload) for _, payload in rounds[1]]
    return result | {"encode_s": encode_s, "delta_bytes": sum(sizes) // len(sizes)}


async def _publish_rounds(
    host: str,
    port: int,
    p: AggregatorParams,
    parent_model: bytes,
    rounds: dict[int, list[tuple[str, bytes]]],
) -> dict[str, Any]:
    edge_model = model_topic(FEDERATION, EDGE)
    edge_report = up_topic(FEDERATION, PARENT, EDGE)
    client = aiomqtt.Client(
        host,
        port,
        identifier=f"bench-children-{uuid.uuid4().hex[:8]}",
        protocol=aiomqtt.ProtocolVersion.V5,
        max_inflight_messages=max(64, p.children),
        socket_options=NODELAY,
        timeout=60,
        # aiomqtt warns on every publish beyond 10 pending; here all of a round are, on purpose.
        logger=_quiet_logger("bench.children"),
    )
    published: set[int] = set()
    publish_s = 0.0
    seen_at: dict[int, float] = {}
    started_at: dict[int, float] = {}
    async with client:
        await client.subscribe(edge_model, qos=1)
        await client.subscribe(edge_report, qos=1)
        await client.publish(model_topic(FEDERATION, PARENT), parent_model, qos=1, retain=True)
        async for message in client.messages:
            payload = message.payload
            if not isinstance(payload, bytes) or not payload:
                continue
            if message.topic.matches(edge_model):
                arrived = time.perf_counter()
                version = decode_envelope(payload).header.version
                if version in published or version not in rounds:
                    continue
                published.add(version)
                start = time.perf_counter()
                seen_at[version], started_at[version] = arrived, start
                await _publish_window(client, rounds[version], p.publish_window)
                publish_s += time.perf_counter() - start
            elif message.topic.matches(edge_report):
                await client.publish(ctl_topic(FEDERATION, EDGE), STOP, qos=1)
                break
        await client.publish(model_topic(FEDERATION, PARENT), b"", qos=1, retain=True)
    return {
        "rounds_published": len(published),
        "publish_s": publish_s,
        "seen_at": seen_at,
        "started_at": started_at,
    }


async def _publish_window(
    client: aiomqtt.Client, messages: list[tuple[str, bytes]], window: int
) -> None:
    """Publish every message at QoS 1 with at most ``window`` awaiting their PUBACK.

    Not all at once: then paho builds every packet of the round (a copy of each payload) before
    it writes the first, and the first delta reached the aggregator ~14 ms after the model
    instead of ~3 ms (measured with 100 children here).
    """
    gate = asyncio.Semaphore(window)

    async def one(topic: str, payload: bytes) -> None:
        async with gate:
            await client.publish(topic, payload, qos=1, timeout=60)

    await asyncio.gather(*(one(topic, payload) for topic, payload in messages))


def _collect(
    children: dict[str, tuple[Connection, multiprocessing.process.BaseProcess]],
) -> dict[str, Any]:
    """Each child process's result, failing as soon as one fails or the time is up."""
    results: dict[str, Any] = {}
    names = {id(conn): name for name, (conn, _) in children.items()}
    waiting = [conn for conn, _ in children.values()]
    deadline = time.monotonic() + PROCESS_TIMEOUT_S
    while waiting:
        ready = multiprocessing.connection.wait(waiting, max(0.0, deadline - time.monotonic()))
        if not ready:
            raise RuntimeError(f"no result within {PROCESS_TIMEOUT_S:.0f} s")
        for conn in ready:
            assert isinstance(conn, Connection)
            name = names[id(conn)]
            waiting.remove(conn)
            process = children[name][1]
            try:
                status, value = conn.recv()
            except EOFError:
                process.join(10)
                raise RuntimeError(
                    f"the {name} process exited (code {process.exitcode}) without a result"
                ) from None
            if status != "ok":
                raise RuntimeError(f"the {name} process failed:\n{value}")
            process.join(10)
            results[name] = value
    return results


def bench_aggregator(p: AggregatorParams) -> dict[str, Any]:
    """Part 1: run the edge and its simulated children and parent; summarise the timings."""
    cpus = _cpus()
    agg_cpu = cpus[0] if len(cpus) > 1 else None
    other_cpu = cpus[1] if len(cpus) > 1 else None
    ctx = multiprocessing.get_context("spawn")
    with MosquittoBroker(BrokerConfig(persistence=False)) as broker:
        if other_cpu is not None and broker.pid is not None:
            os.sched_setaffinity(broker.pid, {other_cpu})
        agg_conn, agg_end = ctx.Pipe(duplex=False)
        pub_conn, pub_end = ctx.Pipe(duplex=False)
        args = (broker.host, broker.port, p)
        aggregator = ctx.Process(target=aggregator_main, args=(*args, agg_cpu, agg_end))
        publisher = ctx.Process(target=publisher_main, args=(*args, other_cpu, pub_end))
        processes = [aggregator, publisher]
        for process in processes:
            process.start()
        agg_end.close()
        pub_end.close()
        try:
            results = _collect(
                {"aggregator": (agg_conn, aggregator), "publisher": (pub_conn, publisher)}
            )
        finally:
            for process in processes:
                if process.is_alive():
                    process.kill()
                    process.join()
    agg, pub = results["aggregator"], results["publisher"]
    if len(agg["accept_times"]) < 2:
        raise RuntimeError(f"the aggregator accepted {agg['accepted']}, refused {agg['rejected']}")
    return summarise_aggregator(p, agg, pub, agg_cpu, other_cpu)


def summarise_aggregator(
    p: AggregatorParams,
    agg: dict[str, Any],
    pub: dict[str, Any],
    agg_cpu: int | None,
    other_cpu: int | None,
) -> dict[str, Any]:
    times: list[float] = agg["accept_times"]
    versions: list[int] = agg["accept_versions"]
    accepted = len(times)
    first, last = agg["first"], agg["last"]
    window = last[0] - first[0] if accepted > 1 else 0.0
    intervals = max(accepted - 1, 1)
    rate = (accepted - 1) / window if window > 0 else 0.0
    cpu = last[1] - first[1]
    update = last[2] - first[2]
    close = last[3] - first[3]
    aggregate = last[4] - first[4]
    add = last[5] - first[5]
    per_round: dict[int, list[float]] = {}
    for when, version in zip(times, versions, strict=True):
        per_round.setdefault(version, []).append(when)
    spans = [(min(ts), max(ts), len(ts)) for _, ts in sorted(per_round.items())]
    in_round = sum(n - 1 for *_, n in spans) / sum(b - a for a, b, _ in spans) if spans else 0.0
    gaps = [spans[i + 1][0] - spans[i][1] for i in range(len(spans) - 1)]
    rounds = sorted(per_round)
    close_spans: list[tuple[float, float, float]] = agg["close_spans"]
    seen_at: dict[int, float] = pub["seen_at"]
    started_at: dict[int, float] = pub["started_at"]
    milestones: dict[str, list[float]] = {
        "aggregated": [],
        "round_closed_next_model_acked": [],
        "children_saw_next_model": [],
        "children_started_publishing": [],
        "first_update_accepted": [],
    }
    for i in range(len(spans) - 1):
        closed_at = spans[i][1]
        _, aggregated, closed = close_spans[i]
        following = rounds[i] + 1
        for name, when in zip(
            milestones,
            (aggregated, closed, seen_at[following], started_at[following], spans[i + 1][0]),
            strict=True,
        ):
            milestones[name].append(1000 * (when - closed_at))

    def ms(seconds: float) -> float:
        return 1000 * seconds / intervals

    return {
        "updates_per_s": rate,
        "accepted": accepted,
        "expected": p.children * p.rounds,
        "rejected": agg["rejected"],
        "rounds_closed": agg["rounds"],
        "window_s": window,
        "cpu_busy_fraction": cpu / window if window else 0.0,
        "in_round_updates_per_s": in_round,
        "mean_round_gap_ms": 1000 * sum(gaps) / len(gaps) if gaps else 0.0,
        "round_gaps_ms": [1000 * gap for gap in gaps],
        "round_gap_timeline_ms": {
            name: statistics.median(values) if values else 0.0
            for name, values in milestones.items()
        },
        "ms_per_update": {
            "wall": ms(window),
            "cpu": ms(cpu),
            "decode_and_check": ms(update - add),
            "aggregate_fedavg": ms(aggregate),
            "close_round_rest": ms(close - (aggregate - add)),
            "transport_and_loop": ms(cpu - update - close),
            "idle": ms(window - cpu),
        },
        "delta_bytes": pub["delta_bytes"],
        "publisher_encode_s": pub["encode_s"],
        "publisher_publish_s": pub["publish_s"],
        "aggregator_cpu": agg_cpu,
        "publisher_and_broker_cpu": other_cpu,
        "down_codec": agg["down_codec"],
    }


# --- part 2: the transport ----------------------------------------------------------------------


Send = Callable[[], Coroutine[Any, Any, None]]
Receive = Callable[[int], Coroutine[Any, Any, int]]


@dataclass(frozen=True, slots=True)
class _Pair:
    """A connected publisher and subscriber: ``send`` one message, ``receive`` n (their bytes)."""

    kind: str
    send: Send
    receive: Receive


async def _publish_all(send: Send, count: int, window: int) -> None:
    """``count`` sends, ``window`` of them in flight at a time (1: each awaits its PUBACK)."""
    if window <= 1:
        for _ in range(count):
            await send()
        return
    gate = asyncio.Semaphore(window)

    async def one() -> None:
        async with gate:
            await send()

    async with asyncio.TaskGroup() as tasks:
        for _ in range(count):
            tasks.create_task(one())


async def _timed(pair: _Pair, count: int, window: int) -> tuple[float, int]:
    """Seconds from the first publish to the last message received, and the bytes received."""
    start = time.perf_counter()
    async with asyncio.TaskGroup() as tasks:
        received = tasks.create_task(pair.receive(count))
        await _publish_all(pair.send, count, window)
    return time.perf_counter() - start, received.result()


async def _link_pair(
    stack: contextlib.AsyncExitStack, host: str, port: int, topic: str, payload: bytes
) -> _Pair:
    tag = uuid.uuid4().hex[:8]
    sub = await stack.enter_async_context(MqttLink(host, port, f"bench-sub-{tag}"))
    pub = await stack.enter_async_context(MqttLink(host, port, f"bench-pub-{tag}"))
    await sub.subscribe(topic)

    async def send() -> None:
        await pub.publish(topic, payload)

    async def receive(count: int) -> int:
        total = 0
        for _ in range(count):
            total += len((await sub.receive()).payload)
        return total

    return _Pair("link", send, receive)


async def _bare_pair(
    stack: contextlib.AsyncExitStack, host: str, port: int, topic: str, payload: bytes
) -> _Pair:
    tag = uuid.uuid4().hex[:8]

    def client(identifier: str) -> aiomqtt.Client:
        # MqttLink's client minus its persistent session: MQTT 5, TCP_NODELAY, 64 in flight.
        return aiomqtt.Client(
            host,
            port,
            identifier=identifier,
            protocol=aiomqtt.ProtocolVersion.V5,
            max_inflight_messages=64,
            socket_options=NODELAY,
            timeout=60,
        )

    sub = await stack.enter_async_context(client(f"bench-bare-sub-{tag}"))
    pub = await stack.enter_async_context(client(f"bench-bare-pub-{tag}"))
    await sub.subscribe(topic, qos=1)

    async def send() -> None:
        await pub.publish(topic, payload, qos=1, timeout=60)

    async def receive(count: int) -> int:
        total = received = 0
        async for message in sub.messages:
            assert isinstance(message.payload, bytes)
            total += len(message.payload)
            received += 1
            if received == count:
                break
        return total

    return _Pair("bare", send, receive)


async def _bench_transport_async(
    host: str, port: int, size: int, count: int, repeats: int, window: int
) -> dict[str, Any]:
    payload = os.urandom(size)
    topic = f"hfl/{FEDERATION}/transport/up"
    runs: dict[str, list[float]] = {"link": [], "bare": []}
    async with contextlib.AsyncExitStack() as stack:
        pairs = (
            await _link_pair(stack, host, port, f"{topic}/link", payload),
            await _bare_pair(stack, host, port, f"{topic}/bare", payload),
        )
        for pair in pairs:  # warm-up
            await _timed(pair, max(2, count // 4), window)
        for repeat in range(repeats):
            for pair in pairs if repeat % 2 == 0 else pairs[::-1]:
                seconds, received = await _timed(pair, count, window)
                if received != count * size:
                    raise RuntimeError(f"{pair.kind}: {received} bytes of {count * size} arrived")
                runs[pair.kind].append(count * size / seconds / 1e6)
    return {
        "transport_mb_s": max(runs["link"]),
        "bare_aiomqtt_mb_s": max(runs["bare"]),
        "transport_runs_mb_s": runs["link"],
        "bare_runs_mb_s": runs["bare"],
    }


def bench_transport(size: int, count: int, repeats: int, window: int) -> dict[str, Any]:
    """Part 2: MqttLink and bare aiomqtt pairs through one fresh broker, same run."""
    saved = structlog.get_config()
    _quiet_logs()
    # aiomqtt's own logger warns on every publish beyond 10 pending (window > 10), both kinds.
    mqtt_logger = logging.getLogger("mqtt")
    level = mqtt_logger.level
    mqtt_logger.setLevel(logging.ERROR)
    try:
        with MosquittoBroker(BrokerConfig(persistence=False)) as broker:
            result = asyncio.run(
                _bench_transport_async(broker.host, broker.port, size, count, repeats, window)
            )
    finally:
        structlog.configure(**saved)
        mqtt_logger.setLevel(level)
    result["transport_ratio"] = result["transport_mb_s"] / result["bare_aiomqtt_mb_s"]
    return result


# --- the run ------------------------------------------------------------------------------------


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _cpus() -> list[int]:
    return sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []


def machine_info() -> dict[str, Any]:
    mosquitto = find_mosquitto()
    mosquitto_version = None
    if mosquitto is not None:
        out = subprocess.run([mosquitto, "-h"], capture_output=True, text=True, check=False)
        lines = (out.stdout or out.stderr).splitlines()
        mosquitto_version = lines[0] if lines else None
    return {
        "python": sys.version.split()[0],
        "numpy": np.__version__,
        "aiomqtt": _version("aiomqtt"),
        "paho_mqtt": _version("paho-mqtt"),
        "mosquitto": mosquitto_version,
        "machine": platform.machine(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "cpus_available": len(_cpus()),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", metavar="FILE", help="write the results as JSON to FILE")
    parser.add_argument("--params", type=int, default=100_000, help="model size (default 100k)")
    parser.add_argument("--children", type=int, default=100, help="children of the edge")
    parser.add_argument("--rounds", type=int, default=20, help="rounds the edge runs")
    parser.add_argument("--codec", default="q8", help="the children's uplink codec")
    parser.add_argument(
        "--publish-window", type=int, default=16, help="deltas in flight from the children"
    )
    parser.add_argument("--transport-size", type=int, default=1 << 20, help="message bytes")
    parser.add_argument("--transport-count", type=int, default=200, help="messages per run")
    parser.add_argument("--agg-repeats", type=int, default=3, help="aggregator runs, best kept")
    parser.add_argument("--repeats", type=int, default=5, help="transport runs, best is kept")
    parser.add_argument("--window", type=int, default=1, help="publishes in flight (transport)")
    parser.add_argument("--profile", metavar="FILE", help="cProfile the aggregator into FILE")
    parser.add_argument("--skip-aggregator", action="store_true")
    parser.add_argument("--skip-transport", action="store_true")
    args = parser.parse_args(argv)

    p = AggregatorParams(
        params=args.params,
        children=args.children,
        rounds=args.rounds,
        codec=args.codec,
        publish_window=args.publish_window,
        profile=os.path.abspath(args.profile) if args.profile else None,
    )
    params = sum(math.prod(s) for s in p.shapes().values())
    result: dict[str, Any] = {
        "benchmark": "aggregator",
        "updates_per_s": None,
        "transport_mb_s": None,
        "bare_aiomqtt_mb_s": None,
        "transport_ratio": None,
        "parameters": dataclasses.asdict(p)
        | {
            "model_params": params,
            "model_tensors": len(p.shapes()),
            "transport_size": args.transport_size,
            "transport_count": args.transport_count,
            "agg_repeats": args.agg_repeats,
            "repeats": args.repeats,
            "window": args.window,
        },
        "machine": machine_info(),
    }
    if not args.skip_aggregator:
        print(
            f"aggregator: {args.children} children x {args.rounds} rounds of {args.codec} deltas, "
            f"{params:,} params",
            flush=True,
        )
        runs = []
        for _ in range(args.agg_repeats):
            runs.append(bench_aggregator(p))
            print(f"  run {len(runs)}: {runs[-1]['updates_per_s']:.0f} updates/s", flush=True)
        agg = max(runs, key=lambda run: float(run["updates_per_s"]))
        agg["updates_per_s_runs"] = [run["updates_per_s"] for run in runs]
        result["updates_per_s"] = agg["updates_per_s"]
        result["aggregator"] = agg
        print_aggregator(agg)
    if not args.skip_transport:
        print(
            f"transport: {args.transport_count} x {args.transport_size:,} B, QoS 1, "
            f"window {args.window}, best of {args.repeats}",
            flush=True,
        )
        transport = bench_transport(
            args.transport_size, args.transport_count, args.repeats, args.window
        )
        result |= transport
        print(
            f"  MqttLink        {transport['transport_mb_s']:8.0f} MB/s\n"
            f"  bare aiomqtt    {transport['bare_aiomqtt_mb_s']:8.0f} MB/s\n"
            f"  ratio           {transport['transport_ratio']:8.2f}"
            f"   (target >= {TARGET_TRANSPORT_RATIO})"
        )
    result["targets"] = {
        "updates_per_s": TARGET_UPDATES_PER_S,
        "transport_ratio": TARGET_TRANSPORT_RATIO,
        "updates_per_s_met": _at_least(result["updates_per_s"], TARGET_UPDATES_PER_S),
        "transport_ratio_met": _at_least(result["transport_ratio"], TARGET_TRANSPORT_RATIO),
    }
    if args.json:
        with open(args.json, "w", encoding="utf8") as fh:
            json.dump(result, fh, indent=1)
        print(f"wrote {args.json}")
    return 0


def _at_least(value: float | None, target: float) -> bool | None:
    return None if value is None else value >= target


def print_aggregator(agg: dict[str, Any]) -> None:
    split = agg["ms_per_update"]
    rejected = Counter(agg["rejected"])
    print(
        f"  accepted {agg['accepted']}/{agg['expected']}, rejected {sum(rejected.values())}"
        f" {dict(rejected) or ''}, {agg['rounds_closed']} rounds, {agg['delta_bytes']:,} B/delta\n"
        f"  updates/s       {agg['updates_per_s']:8.0f}   (target >= {TARGET_UPDATES_PER_S:.0f})\n"
        f"  in-round /s     {agg['in_round_updates_per_s']:8.0f}   "
        f"(mean gap between rounds {agg['mean_round_gap_ms']:.1f} ms)\n"
        f"  aggregator core busy {100 * agg['cpu_busy_fraction']:.0f} % of the window\n"
        "  ms per update:"
    )
    for name, value in split.items():
        print(f"    {name:<20}{value:8.3f}")
    print("  between rounds, ms after the last update of a round (median):")
    for name, value in agg["round_gap_timeline_ms"].items():
        print(f"    {name:<31}{value:8.1f}")


if __name__ == "__main__":
    raise SystemExit(main())
