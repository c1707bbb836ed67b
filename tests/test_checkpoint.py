"""Checkpoints: the file, its checks, every strategy's state, and nodes resuming on real brokers."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from hfl_mqtt.aggregation.base import Update
from hfl_mqtt.checkpoint import (
    CHECKPOINT_FILE,
    Checkpoint,
    CheckpointStore,
    config_fingerprint,
    default_state_dir,
    read_checkpoint,
    write_checkpoint,
)
from hfl_mqtt.codec import Compressor, decode_envelope
from hfl_mqtt.config import FederationConfig, NodeConfig
from hfl_mqtt.errors import CheckpointError
from hfl_mqtt.registry import ModelRegistry, load_model
from hfl_mqtt.roles.node import run_node
from hfl_mqtt.roles.report import NodeReport
from hfl_mqtt.topics import model_topic
from tests.fakes import needs_mosquitto
from tests.test_e2e import StartBroker, address, federation, recording, write_node_yaml

MODEL = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(3, np.float32)}


# --- the file ------------------------------------------------------------------------------------


def test_a_checkpoint_round_trips_values_models_and_payloads(tmp_path: Path) -> None:
    path = tmp_path / "node" / CHECKPOINT_FILE
    big = 2**100  # a random generator's state holds integers beyond 64 bits
    original = Checkpoint(
        "f1", {"version": 7, "rng": big, "ids": ["a", "b"]}, {"model": MODEL}, {"x": b"\0\1"}
    )
    size = write_checkpoint(path, original)
    assert size == path.stat().st_size
    assert [p.name for p in path.parent.iterdir()] == [CHECKPOINT_FILE]  # no temporary left
    back = read_checkpoint(path)
    assert (back.fingerprint, back.values, back.blobs) == ("f1", original.values, {"x": b"\0\1"})
    for name, array in MODEL.items():
        np.testing.assert_array_equal(back.models["model"][name], array)
        assert back.models["model"][name].dtype == array.dtype


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda data: b"NOTACKPT" + data[8:], "not an hfl-mqtt checkpoint"),
        (lambda data: data[:-1] + bytes([data[-1] ^ 1]), "corrupt"),
        (lambda data: data[:50], "corrupt"),
    ],
    ids=["magic", "flipped-bit", "truncated"],
)
def test_a_damaged_checkpoint_is_refused_clearly(tmp_path: Path, damage: Any, message: str) -> None:
    path = tmp_path / CHECKPOINT_FILE
    write_checkpoint(path, Checkpoint("f", {"v": 1}, {"model": MODEL}))
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(CheckpointError, match=message):
        read_checkpoint(path)


def test_a_missing_file_is_a_checkpoint_error(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="cannot read"):
        read_checkpoint(tmp_path / "nothing")


def root_config(**downstream: Any) -> NodeConfig:
    return NodeConfig.model_validate(
        {
            "federation": "f",
            "node": "cloud",
            "downstream": {"children": ["w0", "w1"], **downstream},
            "task": {"dataset": "digits", "model": "softmax"},
        }
    )


@pytest.mark.parametrize(
    ("change", "same"),
    [
        ({"deadline_s": 5.0, "min_fraction": 1.0, "rounds": 50, "checkpoint_every": 3}, True),
        ({"broker": {"host": "10.0.0.1", "port": 1884}}, True),
        ({"mode": "fedbuff"}, False),
        ({"codec": "fp16"}, False),
        ({"server_lr": 0.5}, False),
    ],
)
def test_the_fingerprint_follows_what_the_state_depends_on(
    change: dict[str, Any], same: bool
) -> None:
    assert (config_fingerprint(root_config(**change)) == config_fingerprint(root_config())) is same


def test_the_fingerprint_follows_the_task_but_not_its_training_settings() -> None:
    base = root_config()
    other_model = base.model_copy(update={"task": base.task.model_copy(update={"model": "mlp"})})
    train = base.task.train.model_copy(update={"epochs": 9})
    other_train = base.task.model_copy(update={"train": train})
    assert config_fingerprint(other_model) != config_fingerprint(base)
    assert config_fingerprint(base.model_copy(update={"task": other_train})) == (
        config_fingerprint(base)
    )


def test_a_checkpoint_of_another_config_is_refused(tmp_path: Path) -> None:
    CheckpointStore(tmp_path, "old").save({"version": 1}, {"model": MODEL})
    with pytest.raises(CheckpointError, match="--fresh"):
        CheckpointStore(tmp_path, "new").load()
    store = CheckpointStore(tmp_path, "new")
    assert store.discard()
    assert store.load() is None


def test_the_state_dir_defaults_under_the_environment_then_home(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    config = root_config()
    monkeypatch.setenv("HFL_MQTT_STATE_DIR", str(tmp_path / "a"))
    assert default_state_dir(config) == tmp_path / "a" / "f" / "cloud"
    monkeypatch.delenv("HFL_MQTT_STATE_DIR")
    monkeypatch.setenv("STATE_DIRECTORY", f"{tmp_path / 'b'}:{tmp_path / 'c'}")  # systemd
    assert default_state_dir(config) == tmp_path / "b" / "f" / "cloud"
    monkeypatch.delenv("STATE_DIRECTORY")
    assert default_state_dir(config).parts[-4:] == ("state", "hfl-mqtt", "f", "cloud")
    explicit = config.model_copy(update={"state_dir": tmp_path / "mine"})
    assert default_state_dir(explicit) == tmp_path / "mine"


def test_cli_run_refuses_a_checkpoint_of_another_config_before_connecting(
    tmp_path: Path,
) -> None:
    config = root_config().model_copy(update={"state_dir": tmp_path / "state"})
    CheckpointStore(tmp_path / "state", "another").save({"version": 3}, {"model": MODEL})
    path = write_node_yaml(tmp_path, config)
    command = [sys.executable, "-m", "hfl_mqtt.cli", "run", "--config", str(path)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2
    assert "CheckpointError" in done.stderr
    assert "--fresh" in done.stderr


# --- state that a checkpoint carries -------------------------------------------------------------


def test_a_compressor_goes_on_with_the_same_randomness_and_residuals() -> None:
    arrays = {"w": np.linspace(-1, 1, 1000, dtype=np.float32)}
    ours = Compressor("q4", error_feedback=True, seed=3)
    ours.encode(arrays)
    twin = Compressor("q4", error_feedback=True, seed=99)
    twin.load(*ours.state())
    assert [t.data for t in ours.encode(arrays)] == [t.data for t in twin.encode(arrays)]


@pytest.mark.flower
@pytest.mark.parametrize("name", ["FedAdam", "FedAvgM"])
def test_a_flower_server_optimizer_goes_on_with_its_moments(name: str) -> None:
    from hfl_mqtt.aggregation.flower_config import FlowerStrategyConfig
    from hfl_mqtt.flower.strategy import FlowerStrategy

    options = {"server_momentum": 0.9, "server_learning_rate": 0.5} if name == "FedAvgM" else {}
    config = FlowerStrategyConfig(name=name, options=options)
    model = {"w": np.zeros(4, np.float32)}

    def updates(step: int) -> list[Update]:
        return [
            Update(
                f"c{i}", 1, {"w": np.full(4, 0.1 * (i + step), np.float32)}, 10 + i, f"{step}{i}"
            )
            for i in range(3)
        ]

    ours = FlowerStrategy.from_config(config)
    for step in range(2):
        model = ours.aggregate(model, updates(step))
    twin = FlowerStrategy.from_config(config)
    twin.load(*ours.state())
    assert ours.state()[1], "the optimizer's arrays are in the state"
    np.testing.assert_array_equal(
        ours.aggregate(model, updates(2))["w"], twin.aggregate(model, updates(2))["w"]
    )


# --- nodes resuming on real brokers --------------------------------------------------------------


def report_model_names(node: NodeConfig) -> list[str]:
    from hfl_mqtt.tasks.builtin import make_task

    return list(make_task(node.task, None, 1).get_weights())


def models_of(received: list[tuple[str, bytes, bool]], topic: str) -> list[tuple[int, str]]:
    """(version, update id) of every model published on ``topic`` or its delta slots, in
    order (a version that went out as a keyframe and a delta counts once)."""
    out: list[tuple[int, str]] = []
    for got, payload, _ in received:
        if got == topic or got.startswith(f"{topic}/delta/"):
            header = decode_envelope(payload).header
            if (header.version, header.update_id) not in out[-2:]:
                out.append((header.version, header.update_id))
    return out


async def run_until(
    node: NodeConfig, events: list[dict[str, Any]], evaluations: int
) -> asyncio.Task[NodeReport]:
    """Start ``node``; return its task once ``events`` holds ``evaluations`` evaluations."""
    task = asyncio.create_task(run_node(node, on_event=events.append), name=node.node)
    async with asyncio.timeout(30):
        while len(events) < evaluations and not task.done():
            await asyncio.sleep(0.01)
    return task


async def crash(task: asyncio.Task[NodeReport]) -> None:
    """End a node the hard way: cancelled between two messages, no clean stop, no last
    checkpoint (its links close, as a killed process's connections would)."""
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


@needs_mosquitto
@pytest.mark.anyio
@pytest.mark.parametrize("mode", ["sync", "fedbuff", "sync-delta"])
async def test_a_crashed_root_resumes_at_the_same_version_and_finishes_the_run(
    start_broker: StartBroker, tmp_path: Path, mode: str
) -> None:
    """The root crashes after its second evaluation and comes back from its checkpoint: it
    publishes the same version again (same message; with delta coding, the same stream), its
    workers send what it lost again, and the run goes on to its last round with versions that
    only grow."""
    broker = start_broker()
    rounds = 6
    delta = "q8" if mode == "sync-delta" else None
    config = federation(
        f"resume-{mode}", rounds=(rounds,), fanout=(3,), min_fraction=1.0, delta=delta
    )
    if mode == "fedbuff":
        levels = [config.levels[0].model_copy(update={"mode": "fedbuff", "buffer_size": 3})]
        config = config.model_copy(update={"levels": levels + config.levels[1:]})
    nodes = config.node_configs({"cloud": address(broker)})
    root = nodes[0].model_copy(update={"state_dir": tmp_path / "cloud"})
    topic = model_topic(config.federation, "cloud")
    events: list[dict[str, Any]] = []
    async with recording(broker) as received, asyncio.TaskGroup() as group:
        workers = [group.create_task(run_node(n)) for n in nodes[1:]]
        first = await run_until(root, events, 2)
        await crash(first)
        before = models_of(received, topic)
        second = await run_until(root, events, rounds)
        report = await second
        await asyncio.gather(*workers)
    after = models_of(received, topic)[len(before) :]
    # The checkpointed version: the last one out, with the same message, or (the crash came
    # between writing its checkpoint and publishing it) the next one.
    assert after[0] == before[-1] or after[0][0] == before[-1][0] + 1
    versions = [v for v, _ in models_of(received, topic)]
    assert versions == sorted(versions)
    # A round whose result the crash caught before its checkpoint is played again.
    seen = [e["global_round"] for e in events]
    assert seen == sorted(seen)
    assert sorted(set(seen)) == list(range(1, rounds + 1))
    assert len(seen) <= rounds + 1
    assert report.rounds == rounds
    assert [e["global_round"] for e in report.evaluations] == list(range(1, rounds + 1))
    for worker in workers:
        assert "stale" not in worker.result().updates_rejected
    assert events[-1]["accuracy"] > 0.8
    checkpoint = read_checkpoint(tmp_path / "cloud" / CHECKPOINT_FILE)
    assert checkpoint.values["final"]
    assert checkpoint.values["version"] == versions[-1]
    # The registry kept the last models and the best, across the crash.
    registry = ModelRegistry(tmp_path / "cloud" / "models")
    latest, best = registry.latest(), registry.best()
    assert latest is not None
    assert best is not None
    assert latest.round == rounds
    assert len(registry.cards()) <= root.downstream.keep_models + 1  # type: ignore[union-attr]
    assert best.accuracy == max(e["accuracy"] for e in report.evaluations)
    model, card = load_model(tmp_path / "cloud" / "models")
    assert card == best
    assert set(model) == set(report_model_names(root))


@needs_mosquitto
@pytest.mark.anyio
async def test_a_crashed_edge_resumes_and_the_cloud_counts_its_reports_once(
    start_broker: StartBroker, tmp_path: Path
) -> None:
    """An edge crashes mid-run and resumes: the cloud gets one report per edge per round (a
    report sent again is refused as a duplicate), and every round has both edges."""
    broker = start_broker()
    rounds = 4
    config = federation("resume-edge", rounds=(rounds, 2), fanout=(2, 2), min_fraction=1.0)
    nodes = config.node_configs({"cloud": address(broker)})
    edge = next(n for n in nodes if n.node == "edge-0")
    edge = edge.model_copy(update={"state_dir": tmp_path / "edge-0"})
    others = [n for n in nodes if n.node != "edge-0"]
    events: list[dict[str, Any]] = []
    async with asyncio.timeout(60), asyncio.TaskGroup() as group:
        tasks = {n.node: group.create_task(run_node(n, on_event=events.append)) for n in others}
        first = group.create_task(run_node(edge))
        while not events:
            await asyncio.sleep(0.01)
        await crash(first)
        await asyncio.sleep(0.5)
        second = group.create_task(run_node(edge))
    cloud = tasks["cloud"].result()
    assert [e["participants"] for e in events] == [2] * rounds
    assert cloud.updates_accepted == 2 * rounds
    assert set(cloud.updates_rejected) <= {"duplicate"}
    assert second.result().rounds >= 1


@needs_mosquitto
@pytest.mark.anyio
async def test_sim_resume_goes_on_from_an_earlier_runs_checkpoints(tmp_path: Path) -> None:
    """Two rounds, then two more from the checkpoints (rounds may grow between runs)."""
    from hfl_mqtt.sim import read_evaluations, simulate

    def config(rounds: int) -> FederationConfig:
        return federation("sim-resume", rounds=(rounds, 1), fanout=(2, 2))

    async with asyncio.timeout(60):
        first = await simulate(config(2), tmp_path / "one", processes=1)
    assert first["global_rounds"] == 2
    async with asyncio.timeout(60):
        second = await simulate(config(4), tmp_path / "two", processes=1, resume=tmp_path / "one")
    events = read_evaluations(tmp_path / "two" / "metrics.jsonl")
    assert [event["global_round"] for event in events] == [3, 4]
    assert second["global_rounds"] == 4  # the summary covers the whole run
    assert second["final_accuracy"] >= first["final_accuracy"] - 0.05
    with pytest.raises(CheckpointError, match="no checkpoints"):
        await simulate(config(4), tmp_path / "three", resume=tmp_path / "nowhere")
