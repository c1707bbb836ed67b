"""The roles on the in-memory broker: a whole federation on digits, and one aggregator or worker
at a time driven by scripted peers (hostile updates, deadlines, offline children, a new parent
model mid-cycle, a worker overtaken by a newer model)."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from contextlib import AbstractAsyncContextManager
from typing import Any

import numpy as np
import pytest

from hfl_mqtt.codec import (
    NPY_STYPE,
    Compressor,
    EncodedTensor,
    Envelope,
    Header,
    Message,
    decode_envelope,
    encode_envelope,
    encode_message,
    npy_bytes,
)
from hfl_mqtt.config import FederationConfig, LevelConfig
from hfl_mqtt.roles import Worker, run_node
from hfl_mqtt.roles.messages import (
    STOP,
    model_message,
    parse_ctl,
    parse_status,
    status_payload,
)
from hfl_mqtt.tasks.base import TaskConfig, TrainConfig, load_task
from hfl_mqtt.topics import chunk_topic, ctl_topic, model_topic, parse_topic, status_topic, up_topic
from hfl_mqtt.transport.memory import MemoryBroker, MemoryLink
from tests.fakes import (
    FED,
    W0,
    WAIT,
    FakeTask,
    Peer,
    Running,
    assert_model,
    delta_bytes,
    filled,
    memory_links,
    rejected,
    running_aggregator,
    shifted,
    until,
    worker_config,
)

pytestmark = pytest.mark.anyio


def running_root(children: list[str], **rounds: Any) -> AbstractAsyncContextManager[Running]:
    return running_aggregator("root", children, **rounds)


# --- a whole federation -----------------------------------------------------------------------


async def test_federation_on_digits_runs_to_the_end() -> None:
    """1 root + 2 edges + 4 workers, real numpy training, lossy codecs, chunked models."""
    config = FederationConfig(
        federation=FED,
        levels=[
            LevelConfig(name="cloud", rounds=4, downlink_codec="fp16"),
            LevelConfig(name="edge", rounds=2, uplink_codec="q8", downlink_codec="fp16"),
            LevelConfig(name="worker", uplink_codec="q4", error_feedback=True),
        ],
        fanout=[2, 2],
        task=TaskConfig(model="softmax", train=TrainConfig(epochs=1, batch_size=16)),
        chunk_size=1024,  # a softmax model in fp16 is ~1.3 kB: every model travels in chunks
    )
    broker = MemoryBroker()
    async with MemoryLink(broker, "spy") as spy:
        await spy.subscribe(f"hfl/{FED}/+/model", chunked_retained=True)
        nodes = config.node_configs({})
        events: list[dict[str, object]] = []
        async with asyncio.timeout(15):
            reports = await asyncio.gather(
                *(
                    run_node(n, links=memory_links(broker, n.chunk_size), on_event=events.append)
                    for n in nodes
                )
            )
        models_seen: Counter[str] = Counter()
        versions: dict[str, list[int]] = {}
        while (message := spy.receive_nowait()) is not None:
            topic = parse_topic(message.topic)
            assert topic is not None
            models_seen[topic.node] += 1
            versions.setdefault(topic.node, []).append(
                decode_envelope(message.payload).header.version
            )

        # Every node said goodbye: its status is retained as offline.
        statuses = {n.node: broker.retained[status_topic(FED, n.node)] for n in nodes}
        assert set(statuses.values()) == {status_payload("offline")}
        # The models are retained chunk by chunk, as a late joiner would find them.
        for aggregator in ("cloud", "edge-0", "edge-1"):
            assert chunk_topic(model_topic(FED, aggregator), 0) in broker.retained

    by_name = {r.node: r for r in reports}
    root, edges = by_name["cloud"], [by_name["edge-0"], by_name["edge-1"]]
    workers = [by_name[f"worker-{i}"] for i in range(4)]
    # Everyone stopped (gather returned); the root ran its rounds, each edge tau per global round.
    assert root.rounds == 4
    assert [e.rounds for e in edges] == [8, 8]
    assert [w.trained for w in workers] == [8] * 4
    assert all(not r.updates_rejected for r in reports)
    assert root.updates_accepted == 4 * 2
    assert [e.updates_accepted for e in edges] == [8 * 2] * 2
    assert all(r.down is None or r.down.chunks_rejected == 0 for r in reports)
    # The root's accuracy rises well above the initial model's.
    initial = load_task(config.task, None, config.num_workers).evaluate()
    accuracy = [e["accuracy"] for e in root.evaluations]
    loss = [e["loss"] for e in root.evaluations]
    assert len(accuracy) == 4
    assert events == root.evaluations
    assert initial.accuracy < 0.3
    assert accuracy[-1] > initial.accuracy + 0.5
    assert accuracy[-1] >= accuracy[0]
    assert loss == sorted(loss, reverse=True)
    # One publish per model version: the broker fans it out to the children.
    for report in [root, *edges]:
        assert report.down is not None
        published = report.down.by_topic_kind["model"][0]
        assert published == models_seen[report.node] == len(versions[report.node])
        assert versions[report.node] == list(range(1, published + 1))
    assert models_seen["cloud"] == 4
    assert models_seen["edge-0"] == models_seen["edge-1"] == 8
    # Each worker received every version of its edge once, and sent one delta per version.
    for worker in workers:
        assert worker.up is not None
        assert worker.up.by_topic_kind["model"][2] == 8
        assert worker.up.by_topic_kind["up"][0] == 8


# --- an aggregator refuses bad updates and goes on ----------------------------------------------


def forged_delta(sender: str, base: int, arrays: Mapping[str, np.ndarray]) -> bytes:
    """A delta built from the codec's low-level pieces: npy tensors as given, NaN included,
    in a correctly framed and digested envelope, so it reaches the tensor decoder."""
    header = Header(
        federation=FED,
        sender=sender,
        kind="delta",
        version=base + 1,
        base_version=base,
        num_examples=10,
    )
    tensors = tuple(
        EncodedTensor(name, NPY_STYPE, a.dtype.name, tuple(a.shape), npy_bytes(a))
        for name, a in arrays.items()
    )
    return encode_envelope(Envelope(header, tensors))


def flip_last_byte(payload: bytes) -> bytes:
    return payload[:-1] + bytes([payload[-1] ^ 1])


ONES = filled(W0, 1.0)
BAD_UPDATES: list[tuple[str, Callable[[int], bytes], str, str]] = [
    # (case, payload from the current version, sent as child, expected reason)
    ("garbage", lambda v: b"\x00 certainly not an envelope", "a", "malformed"),
    ("truncated", lambda v: delta_bytes("a", v, ONES)[:-7], "a", "malformed"),
    ("corrupt", lambda v: flip_last_byte(delta_bytes("a", v, ONES)), "a", "corrupt"),
    ("unknown-sender", lambda v: delta_bytes("stranger", v, ONES), "stranger", "unknown_sender"),
    ("sender-not-topic", lambda v: delta_bytes("b", v, ONES), "a", "malformed"),
    ("other-federation", lambda v: delta_bytes("a", v, ONES, federation="xyz"), "a", "malformed"),
    ("stale-base", lambda v: delta_bytes("a", v - 1, ONES), "a", "stale"),
    ("future-base", lambda v: delta_bytes("a", v + 1, ONES), "a", "stale"),
    (
        "wrong-shape",
        lambda v: delta_bytes("a", v, {"w": np.ones((3, 2), np.float32), "b": ONES["b"]}),
        "a",
        "wrong_shape",
    ),
    ("missing-tensor", lambda v: delta_bytes("a", v, {"w": ONES["w"]}), "a", "wrong_shape"),
    (
        "extra-tensor",
        lambda v: delta_bytes("a", v, {**ONES, "x": np.ones(1, np.float32)}),
        "a",
        "wrong_shape",
    ),
    (
        "wrong-dtype",
        lambda v: delta_bytes("a", v, {k: a.astype(np.float64) for k, a in ONES.items()}),
        "a",
        "wrong_shape",
    ),
    (
        "nan",
        lambda v: forged_delta("a", v, {**ONES, "b": np.full(3, np.nan, np.float32)}),
        "a",
        "non_finite",
    ),
    (
        "inf",
        lambda v: forged_delta("a", v, {**ONES, "w": np.full((2, 3), -np.inf, np.float32)}),
        "a",
        "non_finite",
    ),
    (
        "model-on-up-topic",
        lambda v: model_message(FED, "a", v, ONES, Compressor("npy")),
        "a",
        "malformed",
    ),
]


@pytest.mark.parametrize(
    ("build", "as_child", "reason"),
    [pytest.param(b, c, r, id=name) for name, b, c, r in BAD_UPDATES],
)
async def test_aggregator_rejects_counts_and_goes_on(
    build: Callable[[int], bytes], as_child: str, reason: str
) -> None:
    async with running_root(["a", "b"]) as run:
        a, b = run.peers["a"], run.peers["b"]
        model = await a.next_model()
        await b.next_model()
        assert_model(model.arrays, W0)
        await a.send(build(model.header.version), as_child=as_child)
        await run.until(lambda: rejected(run.report) == 1)
        assert run.report.updates_rejected == {reason: 1}
        assert run.report.updates_accepted == 0
        # The aggregator goes on: both children answer and the round closes as usual.
        await a.answer(model, filled(W0, 0.5))
        await b.answer(model, filled(W0, 1.5))
        after = await a.next_model()
        assert after.header.version == model.header.version + 1
        assert_model(after.arrays, shifted(W0, 1.0))
        assert run.report.rounds == 1
        assert run.report.updates_accepted == 2


async def test_duplicate_delivery_is_idempotent() -> None:
    """QoS 1 may deliver an update twice: the second copy changes nothing."""
    results = []
    for copies in (1, 2):
        async with running_root(["a", "b"]) as run:
            a, b = run.peers["a"], run.peers["b"]
            model = await a.next_model()
            await b.next_model()
            payload = delta_bytes("a", model.header.version, filled(W0, 0.5), 30)
            for _ in range(copies):
                await a.send(payload)
            await b.answer(model, filled(W0, 2.5), 10)
            after = await b.next_model()
            # A late copy, after the round closed, is still a duplicate (not a stale update).
            await a.send(payload)
            await run.until(lambda: rejected(run.report) == copies)  # noqa: B023
            assert run.report.updates_rejected == {"duplicate": copies}
            assert run.report.updates_accepted == 2
            results.append(after.arrays)
    assert_model(results[1], results[0])
    assert_model(results[0], shifted(W0, 1.0))  # (30 * 0.5 + 10 * 2.5) / 40


async def test_second_update_in_a_round_is_refused() -> None:
    async with running_root(["a", "b"]) as run:
        a, b = run.peers["a"], run.peers["b"]
        model = await a.next_model()
        await a.answer(model, filled(W0, 0.5))
        await a.answer(model, filled(W0, 100.0))  # a new update id, same child, same round
        await run.until(lambda: rejected(run.report) == 1)
        assert run.report.updates_rejected == {"duplicate": 1}
        await b.answer(model, filled(W0, 1.5))
        after = await a.next_model()
        assert_model(after.arrays, shifted(W0, 1.0))  # the first update counted, not the second


# A finite delta that would take the model beyond what the downlink codec can carry (fp16:
# |x| > 65504; npy: float32 overflow to Inf) is refused as out_of_range.
@pytest.mark.parametrize(
    ("codec", "deltas"),
    [("fp16", [1e5]), ("npy", [6e37, 6e37])],
    ids=["fp16-range", "float32-overflow"],
)
async def test_delta_beyond_the_codec_range_is_refused(codec: str, deltas: list[float]) -> None:
    async with running_root(["a"], down_codec=codec) as run:
        a = run.peers["a"]
        for value in deltas:
            model = await a.next_model()
            await a.answer(model, filled(W0, value))
        await run.until(lambda: rejected(run.report) >= 1)
        await run.settle()


@pytest.mark.parametrize(
    ("payload", "state", "cmd"),
    [
        (b'{"state": "online"}', "online", None),
        (b'{"state": "offline", "version": 3}', "offline", None),
        (b'{"cmd": "stop"}', None, "stop"),
        (b'{"state": 5, "cmd": ["stop"]}', None, None),
        (b'["state", "online"]', None, None),
        (b'"offline"', None, None),
        (b"NaN", None, None),
        (b"", None, None),
        (b"\xff\xfe", None, None),
        (b'{"state": "online"', None, None),
        (b"[" * 100_000, None, None),  # deeper than the JSON parser's recursion limit
        (b'{"state": ' * 100_000, None, None),
    ],
    ids=lambda v: repr(v[:20]) if isinstance(v, bytes) else None,
)
def test_status_and_ctl_parsing(payload: bytes, state: str | None, cmd: str | None) -> None:
    assert parse_status(payload) == state
    assert parse_ctl(payload) == cmd


async def test_hostile_status_does_not_crash_the_aggregator() -> None:
    """A child may write its own (retained) status topic: whatever it writes there is ignored."""
    async with running_root(["a", "b"], min_fraction=0.5) as run:
        a, b = run.peers["a"], run.peers["b"]
        model = await a.next_model()
        for payload in [b"[" * 100_000, b"\x00junk", b'{"state": ["offline"]}']:
            await b.link.publish(status_topic(FED, "b"), payload, retain=True)
        await run.settle()
        await a.answer(model, filled(W0, 1.0))
        await run.settle()
        assert run.report.rounds == 0  # b is still taken to be online
        await b.kill()
        after = await a.next_model()
        assert_model(after.arrays, shifted(W0, 1.0))


# Counts a child reports are summed into the edge's report up: huge ones must not crash it
# (tree_bytes beyond 2**53 is ignored; num_examples beyond 2**53 cannot be built, see below).
@pytest.mark.parametrize(
    ("num_examples", "metrics"),
    [(1, {"tree_bytes": 2**64 - 1}), (2**53, {"tree_messages": -1})],
    ids=["tree_bytes", "num_examples"],
)
async def test_huge_counts_from_children_do_not_crash_the_edge(
    num_examples: int, metrics: dict[str, int]
) -> None:
    async with running_aggregator("edge", ["a", "b"], parent="cloud", rounds=1) as run:
        cloud = run.peers["cloud"]
        await cloud.publish_model(W0)
        for child in ("a", "b"):
            model = await run.peers[child].next_model()
            header = Header(
                federation=FED,
                sender=child,
                kind="delta",
                version=model.header.version + 1,
                base_version=model.header.version,
                num_examples=num_examples,
                metrics=dict(metrics),
            )
            await run.peers[child].send(encode_message(header, filled(W0, 1.0)))
        await run.until(lambda: run.report.rounds == 1)
        await run.settle()
        _, report = await cloud.next_message()
        assert report.header.base_version == 1


# --- when a round closes ------------------------------------------------------------------------


async def test_round_closes_at_the_deadline_once_the_minimum_answered() -> None:
    async with running_root(["a", "b", "c"], deadline_s=0.2, min_fraction=0.5) as run:
        a, b = run.peers["a"], run.peers["b"]
        model = await a.next_model()
        started = time.monotonic()
        await a.answer(model, filled(W0, 0.5))
        await b.answer(model, filled(W0, 1.5))  # c stays silent
        await run.until(lambda: run.report.updates_accepted == 2)
        await run.settle()
        assert run.report.rounds == 0  # the minimum (2) answered, but c may still come
        after = await a.next_model()
        waited = time.monotonic() - started
        assert 0.1 < waited < 2.0
        assert after.header.version == 2
        assert_model(after.arrays, shifted(W0, 1.0))


async def test_past_the_deadline_a_round_waits_for_the_minimum() -> None:
    async with running_root(["a", "b", "c"], deadline_s=0.1, min_fraction=0.5) as run:
        a, b = run.peers["a"], run.peers["b"]
        model = await a.next_model()
        await a.answer(model, filled(W0, 0.5))
        await asyncio.sleep(0.25)  # well past the deadline, with one answer of the two needed
        await run.settle()
        assert run.report.rounds == 0
        await b.answer(model, filled(W0, 1.5))
        async with asyncio.timeout(0.5):  # closes on b's answer, not at some later deadline
            after = await a.next_model()
        assert_model(after.arrays, shifted(W0, 1.0))


@pytest.mark.parametrize("kill_first", [False, True], ids=["killed-last", "killed-first"])
async def test_offline_child_closes_the_round_without_waiting(kill_first: bool) -> None:
    async with running_root(["a", "b", "c"], deadline_s=30.0, min_fraction=0.5) as run:
        a, b, c = run.peers["a"], run.peers["b"], run.peers["c"]
        model = await a.next_model()
        started = time.monotonic()
        if kill_first:
            await c.kill()
        await a.answer(model, filled(W0, 0.5))
        await b.answer(model, filled(W0, 1.5))
        if not kill_first:
            await run.until(lambda: run.report.updates_accepted == 2)
            await run.settle()
            assert run.report.rounds == 0  # c is still online: the round waits for it
            await c.kill()  # its Will says offline
        after = await a.next_model(timeout=1.0)
        assert time.monotonic() - started < 1.0
        assert_model(after.arrays, shifted(W0, 1.0))


async def test_offline_child_below_the_minimum_does_not_close_the_round() -> None:
    async with running_root(["a", "b", "c"], deadline_s=30.0, min_fraction=1.0) as run:
        a, b, c = run.peers["a"], run.peers["b"], run.peers["c"]
        model = await a.next_model()
        await a.answer(model, filled(W0, 0.5))
        await b.answer(model, filled(W0, 1.5))
        await c.kill()
        await run.until(lambda: "c" in run.agg._offline)
        await run.settle()
        assert run.report.rounds == 0  # every child is needed: offline or not
        # Its metrics record says so, for a monitor that cannot hear c's Last Will.
        assert run.agg._metrics_now().children_down == ("c",)


# --- a new parent model mid-cycle --------------------------------------------------------------


async def test_new_parent_model_restarts_the_cycle() -> None:
    async with running_aggregator("edge", ["a", "b"], parent="cloud", rounds=2) as run:
        cloud, a, b = run.peers["cloud"], run.peers["a"], run.peers["b"]

        async def both_next() -> Message:
            model = await a.next_model()
            assert (await b.next_model()).header.version == model.header.version
            return model

        assert await cloud.publish_model(W0) == 1
        first = await both_next()
        assert first.header.version == 1
        assert_model(first.arrays, W0)
        await a.answer(first, filled(W0, 1.0))
        await b.answer(first, filled(W0, 1.0))
        second = await both_next()
        assert second.header.version == 2
        assert_model(second.arrays, shifted(W0, 1.0))

        # Mid-cycle (round 2 of 2), the cloud publishes a newer model: the edge restarts.
        newer = filled(W0, 10.0)
        assert await cloud.publish_model(newer) == 2
        restart = await both_next()
        assert restart.header.version == 3
        assert_model(restart.arrays, newer)
        await a.answer(second, filled(W0, 5.0))  # computed on the abandoned cycle
        await run.until(lambda: rejected(run.report) == 1)
        assert run.report.updates_rejected == {"stale": 1}

        # Two full rounds from the new model, then one report up, against the cloud's v2.
        await a.answer(restart, filled(W0, 1.0))
        await b.answer(restart, filled(W0, 1.0))
        third = await both_next()
        assert_model(third.arrays, filled(W0, 11.0))
        await a.answer(third, filled(W0, 2.0), 30)
        await b.answer(third, filled(W0, 2.0), 10)
        incoming, report = await cloud.next_message()
        assert incoming.topic == up_topic(FED, "cloud", "edge")
        assert (report.header.kind, report.header.sender) == ("delta", "edge")
        assert report.header.base_version == 2
        assert report.header.num_examples == 40
        assert_model(report.arrays, filled(W0, 3.0))  # (10 + 1 + 2) - 10
        await run.settle()
        assert cloud.pending() == []  # nothing was sent for the abandoned cycle
        assert (run.report.rounds, run.agg.version) == (3, 4)
        assert run.report.down is not None
        assert run.report.down.by_topic_kind["model"][0] == 4

        # The cloud says stop: the edge stops its children and ends.
        await cloud.link.publish(ctl_topic(FED, "edge"), STOP)
        async with asyncio.timeout(WAIT):
            await run.task
        assert [m.topic for m in a.pending()] == [ctl_topic(FED, "a")]
        assert [m.topic for m in b.pending()] == [ctl_topic(FED, "b")]


# --- a worker overtaken by a newer model -------------------------------------------------------


async def test_worker_drops_a_result_overtaken_by_a_newer_model() -> None:
    broker = MemoryBroker()
    gate = threading.Event()
    task = FakeTask(step=0.25, gate=gate)
    async with (
        Peer(broker, "edge", serves=True) as edge,
        MemoryLink(broker, "w", status_topic=status_topic(FED, "w")) as link,
    ):
        worker = Worker(worker_config("w", "edge"), link, task)
        running = asyncio.create_task(worker.run(), name="w")
        try:
            await until(lambda: len(link.filters) == 3)  # the model, its chunks, the ctl topic
            await edge.link.publish(model_topic(FED, "edge"), b"junk")
            assert await edge.publish_model(W0) == 1
            assert await asyncio.to_thread(task.started.wait, WAIT)  # training on v1 now
            newer = filled(W0, 7.0)
            assert await edge.publish_model(newer) == 2
            gate.set()
            _, delta = await edge.next_message()
            assert delta.header.base_version == 2
            assert_model(delta.arrays, filled(W0, 0.25))
            assert len(task.trained_from) == 2
            assert_model(task.trained_from[0], W0)
            assert_model(task.trained_from[1], newer)
            await link.publish(ctl_topic(FED, "w"), STOP)
            async with asyncio.timeout(WAIT):
                report = await running
            assert report.trained == 2
            assert report.up is not None
            assert report.up.by_topic_kind["up"][0] == 1  # the v1 result was never sent
            assert report.updates_rejected == {"malformed": 1}
            assert edge.pending() == []
        finally:
            gate.set()
            running.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await running


async def test_worker_keeps_its_result_when_a_spoofed_model_arrives_during_training() -> None:
    """A valid model envelope from another sender on the parent's model topic is not a newer
    model: the worker sends what it trained (and the spoof is refused when its turn comes)."""
    broker = MemoryBroker()
    gate = threading.Event()
    task = FakeTask(step=0.25, gate=gate)
    async with (
        Peer(broker, "edge", serves=True) as edge,
        MemoryLink(broker, "w", status_topic=status_topic(FED, "w")) as link,
    ):
        worker = Worker(worker_config("w", "edge"), link, task)
        running = asyncio.create_task(worker.run(), name="w")
        try:
            await until(lambda: len(link.filters) == 3)
            assert await edge.publish_model(W0) == 1
            assert await asyncio.to_thread(task.started.wait, WAIT)
            spoof = model_message(FED, "intruder", 9, filled(W0, 5.0), Compressor("npy"))
            await edge.link.publish(model_topic(FED, "edge"), spoof)
            await asyncio.sleep(0.05)  # the spoof is there before training ends
            gate.set()
            _, delta = await edge.next_message()
            assert delta.header.base_version == 1
            await link.publish(ctl_topic(FED, "w"), STOP)
            async with asyncio.timeout(WAIT):
                report = await running
            assert report.trained == 1
            assert report.updates_rejected == {"malformed": 1}
        finally:
            gate.set()
            running.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await running
