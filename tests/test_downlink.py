"""The model stream down with delta coding (``roles/downlink.py``): parent and child agree to the
bit over hundreds of versions, a late joiner takes the keyframe and the deltas since, a missed
delta sends a child back to the keyframe, a tampered result is caught, a child in step downloads
deltas only, and whole federations train through it (in memory, and on Mosquitto with bridged
edge brokers)."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from hfl_mqtt.codec import Compressor, decode_envelope
from hfl_mqtt.config import FederationConfig, LevelConfig
from hfl_mqtt.errors import DigestMismatchError
from hfl_mqtt.roles import run_node
from hfl_mqtt.roles.downlink import (
    KEYFRAME_EVERY_METRIC,
    DownlinkFollower,
    DownlinkReader,
    DownlinkWriter,
    model_digest,
)
from hfl_mqtt.sim import simulate
from hfl_mqtt.tasks.base import TaskConfig, TrainConfig
from hfl_mqtt.topics import model_delta_topic, model_topic
from hfl_mqtt.transport.base import Incoming
from hfl_mqtt.transport.memory import MemoryBroker, MemoryLink
from tests.fakes import FED, memory_links

pytestmark = pytest.mark.anyio

Model = dict[str, np.ndarray]


def drifting_models(versions: int, seed: int = 0) -> Iterator[Model]:
    """A model that moves a little each version, as training moves it (with a bias tensor)."""
    rng = np.random.default_rng(seed)
    model = {
        "w": rng.normal(0, 0.1, (64, 48)).astype(np.float32),
        "b": np.zeros(48, np.float32),
    }
    for v in range(versions):
        step = 0.02 / np.sqrt(1 + v)
        model = {k: (a + rng.normal(0, step, a.shape)).astype(np.float32) for k, a in model.items()}
        yield model


def writer(delta: str | None, keyframe_every: int = 10) -> DownlinkWriter:
    return DownlinkWriter(
        FED,
        "edge",
        Compressor("fp16", seed=1),
        Compressor(delta, seed=2) if delta is not None else None,
        keyframe_every,
    )


def take(reader: DownlinkReader, payload: bytes) -> str:
    return reader.take(decode_envelope(payload))


def same_bits(a: Model, b: Model) -> bool:
    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype and a[k].tobytes() == b[k].tobytes() for k in a
    )


# --- writer and reader, pure -------------------------------------------------------------------


@pytest.mark.parametrize("delta", ["q8", "q4", "q2", "topk0.05+q8+zstd", "fp16", "npy"])
def test_parent_and_child_hold_the_same_bits_after_every_one_of_300_versions(delta: str) -> None:
    stream, child = writer(delta), DownlinkReader()
    gaps = []
    for version, model in enumerate(drifting_models(300), start=1):
        messages = stream.publish(version, model, {"round": version})
        slot = dict(messages)[model_delta_topic(FED, "edge", version % 10)]
        assert take(child, slot) == "new"
        assert stream.reference is not None
        assert child.model is not None
        assert same_bits(child.model, stream.reference), f"drift at version {version}"
        assert child.version == version
        gaps.append(max(float(np.abs(model[k] - stream.reference[k]).max()) for k in model))
    # Error feedback: what the codec leaves out goes out later, so the gap does not grow.
    assert max(gaps[200:]) <= max(gaps[:100]) * 1.5
    if delta == "npy":
        assert gaps[-1] < 1e-6  # lossless deltas: the parent's model, but for float rounding


def test_deltas_are_small_and_keyframes_come_every_k_versions_losslessly() -> None:
    stream = writer("q8", keyframe_every=10)
    sizes: dict[str, list[int]] = {"keyframe": [], "delta": []}
    keyframe_versions = []
    for version, model in enumerate(drifting_models(40), start=1):
        for topic, payload in stream.publish(version, model, {}):
            header = decode_envelope(payload).header
            assert header.metrics[KEYFRAME_EVERY_METRIC] == 10
            if topic == model_topic(FED, "edge"):
                keyframe_versions.append(version)
                if version > 1:
                    sizes["keyframe"].append(len(payload))
                    assert header.codec == "npy"
                    assert header.base_version is None
            elif version > 1:
                sizes["delta"].append(len(payload))
                assert header.base_version == version - 1
    assert keyframe_versions == [1, 11, 21, 31]
    # A q8 delta is about a quarter of the float32 keyframe.
    assert max(sizes["delta"]) < 0.3 * min(sizes["keyframe"])


def test_without_delta_coding_every_version_is_one_whole_model() -> None:
    stream, child = writer(None), DownlinkReader()
    for version, model in enumerate(drifting_models(5), start=1):
        messages = stream.publish(version, model, {})
        assert [t for t, _ in messages] == [model_topic(FED, "edge")]
        header = decode_envelope(messages[0][1]).header
        assert header.base_version is None
        assert KEYFRAME_EVERY_METRIC not in header.metrics
        assert take(child, messages[0][1]) == "new"
    assert not child.streaming


@pytest.mark.parametrize("joins_at", [1, 2, 9, 10, 11, 17, 20, 33])
def test_a_late_joiner_takes_the_keyframe_and_the_retained_deltas_in_any_order(
    joins_at: int,
) -> None:
    stream = writer("q8", keyframe_every=10)
    for version, model in enumerate(drifting_models(joins_at), start=1):
        stream.publish(version, model, {})
    retained = list(stream.retained.values())
    random.Random(joins_at).shuffle(retained)  # a broker replays retained topics in any order
    joiner = DownlinkReader()
    for payload in retained:
        take(joiner, payload)
    assert joiner.version == joins_at
    assert joiner.model is not None
    assert stream.reference is not None
    assert same_bits(joiner.model, stream.reference)
    assert not joiner.behind


def test_a_missed_delta_sends_the_child_back_to_the_keyframe_and_it_catches_up() -> None:
    stream, child = writer("q8", keyframe_every=10), DownlinkReader()
    slots = []
    for version, model in enumerate(drifting_models(25), start=1):
        messages = dict(stream.publish(version, model, {}))
        slots.append(messages[model_delta_topic(FED, "edge", version % 10)])
    for payload in slots[:12]:
        assert take(child, payload) == "new"
    assert take(child, slots[13]) == "resync"  # 13 lost on the way: 14 cannot apply
    assert child.behind
    assert child.version == 12
    for payload in stream.retained.values():  # the keyframe (21) and the slots, replayed
        take(child, payload)
    assert child.version == 25
    assert child.model is not None
    assert stream.reference is not None
    assert same_bits(child.model, stream.reference)
    assert not child.behind


def test_the_same_version_again_and_older_versions_are_told_apart() -> None:
    stream, child = writer("q8", keyframe_every=4), DownlinkReader()
    payloads = []
    for version, model in enumerate(drifting_models(6), start=1):
        messages = dict(stream.publish(version, model, {}))
        payloads.append(messages[model_delta_topic(FED, "edge", version % 4)])
        take(child, payloads[-1])
    assert take(child, payloads[-1]) == "again"  # the parent put it back after a reconnect
    assert take(child, payloads[2]) == "old"
    # The keyframe of version 5 shares the delta's update id: the same version in either form.
    keyframe = stream.retained[model_topic(FED, "edge")]
    assert decode_envelope(keyframe).header.version == 5
    assert take(child, keyframe) == "old"
    assert take(child, stream.retained[model_delta_topic(FED, "edge", 5 % 4)]) == "old"


def test_a_result_that_differs_from_the_parents_is_caught_and_the_child_starts_over() -> None:
    stream, child = writer("q8"), DownlinkReader()
    models = list(drifting_models(3))
    assert take(child, stream.publish(1, models[0], {})[0][1]) == "new"
    assert child.model is not None
    child.model = {k: v + np.float32(1e-3) for k, v in child.model.items()}  # drifted somehow
    delta = dict(stream.publish(2, models[1], {}))[model_delta_topic(FED, "edge", 2)]
    with pytest.raises(DigestMismatchError, match="does not yield the model its parent named"):
        take(child, delta)
    assert child.model is None
    assert child.behind
    for payload in stream.publish(3, models[2], {}):
        take(child, payload[1])
    assert child.version is None  # a delta alone cannot start it: it waits for a keyframe
    for version, model in enumerate(drifting_models(10, seed=1), start=4):
        stream.publish(version, model, {})
    take(child, stream.retained[model_topic(FED, "edge")])
    for payload in stream.retained.values():
        take(child, payload)
    assert child.version == 13
    assert child.model is not None
    assert stream.reference is not None
    assert same_bits(child.model, stream.reference)


def test_a_checkpointed_writer_goes_on_with_the_same_reference() -> None:
    models = list(drifting_models(30))
    stream = writer("q8")
    child = DownlinkReader()
    for version, model in enumerate(models[:15], start=1):
        for _, payload in stream.publish(version, model, {}):
            take(child, payload)
    values, reference, blobs = stream.state()
    again = writer("q8")
    again.load(values, reference, blobs)
    assert again.retained == stream.retained
    for version, model in enumerate(models[15:], start=16):
        a, b = stream.publish(version, model, {}), again.publish(version, model, {})
        # The quantizer's random state went along too: byte for byte the same deltas but ids.
        assert [decode_envelope(p).tensors for _, p in a] == [
            decode_envelope(p).tensors for _, p in b
        ]
        for _, payload in b:
            take(child, payload)
    assert child.model is not None
    assert again.reference is not None
    assert same_bits(child.model, again.reference)
    assert model_digest(child.model) == model_digest(again.reference)


# --- a child's subscriptions, on the in-memory broker ------------------------------------------


async def test_a_child_in_step_downloads_deltas_only() -> None:
    broker = MemoryBroker()
    stream = writer("q8", keyframe_every=5)
    models = list(drifting_models(30))
    async with MemoryLink(broker, "edge") as parent, MemoryLink(broker, "worker") as link:
        received: list[Incoming] = []

        async def publish(version: int) -> None:
            for topic, payload in stream.publish(version, models[version - 1], {}):
                await parent.publish(topic, payload, retain=True)

        await publish(1)
        follower = DownlinkFollower(link, FED)
        await follower.follow("edge")
        for version in range(2, 31):
            while (message := link.receive_nowait()) is not None:
                received.append(message)
                await follower.take(message)
            await publish(version)
        while (message := link.receive_nowait()) is not None:
            received.append(message)
            await follower.take(message)
        assert follower.header is not None
        assert follower.header.version == 30
        assert follower.model is not None
        assert stream.reference is not None
        assert same_bits(follower.model, stream.reference)
        keyframes = [m for m in received if m.topic == model_topic(FED, "edge")]
        assert len(keyframes) == 1  # the first; the keyframes of versions 6, 11, ... not
        assert "hfl/test/edge/model" not in link.filters


async def test_a_federation_with_delta_coding_trains_in_memory_and_children_hold_the_bits() -> None:
    config = FederationConfig(
        federation=FED,
        levels=[
            LevelConfig(
                name="cloud",
                rounds=6,
                downlink_codec="fp16",
                downlink_delta_codec="q8",
                keyframe_every=3,
            ),
            LevelConfig(
                name="edge",
                rounds=2,
                uplink_codec="q8",
                downlink_codec="fp16",
                downlink_delta_codec="topk0.2+q8",
                keyframe_every=4,
            ),
            LevelConfig(name="worker", uplink_codec="q8"),
        ],
        fanout=[2, 2],
        task=TaskConfig(model="softmax", train=TrainConfig(epochs=1, batch_size=16)),
        chunk_size=1024,
    )
    broker = MemoryBroker()
    async with asyncio.timeout(30):
        reports = await asyncio.gather(
            *(
                run_node(n, links=memory_links(broker, n.chunk_size))
                for n in config.node_configs({})
            )
        )
    by_name = {r.node: r for r in reports}
    assert by_name["cloud"].rounds == 6
    assert all(not r.updates_rejected for r in reports)
    accuracy = [e["accuracy"] for e in by_name["cloud"].evaluations]
    assert accuracy[-1] > 0.8


# --- on Mosquitto, through bridged edge brokers ------------------------------------------------


async def test_delta_coding_through_bridged_edge_brokers_cuts_what_workers_download(
    tmp_path: Path,
) -> None:
    def federation(delta: str | None) -> FederationConfig:
        return FederationConfig(
            federation="dl",
            brokers="per_edge",
            levels=[
                LevelConfig(
                    name="cloud",
                    rounds=8,
                    downlink_codec="fp16",
                    downlink_delta_codec=delta,
                    keyframe_every=4,
                ),
                LevelConfig(
                    name="edge",
                    rounds=2,
                    uplink_codec="q8",
                    downlink_codec="fp16",
                    downlink_delta_codec=delta,
                    keyframe_every=4,
                ),
                LevelConfig(name="worker", uplink_codec="q8"),
            ],
            fanout=[2, 3],
            task=TaskConfig(
                model="mlp",
                partition={"scheme": "iid"},
                train=TrainConfig(epochs=1, batch_size=16, learning_rate=0.1),
            ),
        )

    downloaded = {}
    for delta in (None, "q8"):
        out = tmp_path / str(delta)
        summary = await asyncio.wait_for(simulate(federation(delta), out, processes=2), 120)
        assert summary["global_rounds"] == 8
        assert summary["updates_rejected"] == {}
        assert summary["final_accuracy"] > 0.85
        workers = [n for n in summary["nodes"] if n["role"] == "worker"]
        downloaded[delta] = sum(n["up"]["by_kind"]["model"]["bytes_received"] for n in workers)
    # fp16 whole models against q8 deltas: about half, keyframes not downloaded at all.
    assert downloaded["q8"] < 0.7 * downloaded[None]
