"""Adaptive participation: the pure picker on small tables, then a federation on Mosquitto."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from hfl_mqtt.aggregation.participation import Participation, ParticipationConfig
from hfl_mqtt.codec import Header
from hfl_mqtt.config import RoundConfig
from hfl_mqtt.roles.worker import picked
from hfl_mqtt.sim import simulate
from tests.fakes import needs_mosquitto

CHILDREN = [f"w{i}" for i in range(8)]


def picker(**settings: Any) -> Participation:
    return Participation(ParticipationConfig.model_validate(settings), CHILDREN)


def test_all_picks_everyone_online_and_everyone_if_nobody_is() -> None:
    p = picker()
    assert p.pick(1, 10.0) == CHILDREN
    assert p.pick(2, 10.0, offline={"w1", "w2"}) == [c for c in CHILDREN if c not in ("w1", "w2")]
    assert p.pick(3, 10.0, offline=set(CHILDREN)) == CHILDREN


@pytest.mark.parametrize(("fraction", "count"), [(0.5, 4), (0.3, 3), (0.01, 1), (1.0, 8)])
def test_random_picks_its_fraction_seeded(fraction: float, count: int) -> None:
    one, other = (picker(policy="random", fraction=fraction, seed=3) for _ in range(2))
    first = [one.pick(r, 10.0) for r in range(1, 6)]
    again = [other.pick(r, 10.0) for r in range(1, 6)]
    assert first == again
    assert all(len(p) == count for p in first)
    if count < 8:
        assert len({tuple(p) for p in first}) > 1  # not the same children every round


def test_loss_picks_the_highest_recent_loss_after_the_unknown() -> None:
    p = picker(policy="loss", fraction=0.25, smoothing=1.0)
    for i, child in enumerate(CHILDREN[:6]):
        p.answered(child, 1.0, loss=float(i))
    assert p.pick(1, 10.0) == ["w6", "w7"]  # never heard from: first
    p.answered("w6", 1.0, loss=0.1)
    p.answered("w7", 1.0, loss=0.2)
    assert p.pick(2, 10.0) == ["w4", "w5"]  # then the highest losses


def test_a_child_picked_and_never_heard_from_ranks_last() -> None:
    p = picker(policy="loss", fraction=0.25, smoothing=1.0)
    assert p.pick(1, 10.0) == ["w0", "w1"]  # nothing known: in order
    for child in CHILDREN[2:]:
        p.answered(child, 1.0, loss=1.0)
    # w0 and w1 never answered in time (a straggler's updates are refused as stale).
    assert p.pick(2, 10.0) == ["w2", "w3"]


def test_contribution_picks_the_largest_recent_deltas() -> None:
    p = picker(policy="contribution", fraction=0.25, smoothing=1.0)
    for i, child in enumerate(CHILDREN):
        p.answered(child, 1.0, contribution=float(10 - i))
    assert p.pick(1, 10.0) == ["w0", "w1"]


def test_deadline_skips_the_children_predicted_late() -> None:
    p = picker(policy="deadline", smoothing=1.0)
    for child in CHILDREN:
        p.answered(child, 0.5)
    p.answered("w3", 9.5)  # over 0.9 of the 10 s deadline
    p.missed("w5", 10.0)
    assert p.pick(1, 10.0) == [c for c in CHILDREN if c not in ("w3", "w5")]
    slow = picker(policy="deadline", smoothing=1.0)
    for child in CHILDREN:
        slow.answered(child, 20.0 + CHILDREN.index(child))
    assert slow.pick(1, 10.0) == CHILDREN  # all late (a slow start): the predictions are off


@pytest.mark.parametrize("policy", ["random", "loss", "contribution", "deadline"])
def test_every_child_takes_part_at_least_once_every_k_rounds(policy: str) -> None:
    p = picker(policy=policy, fraction=0.125, every_rounds=3, smoothing=1.0)
    for child in CHILDREN:
        p.answered(child, 50.0 if child == "w0" else 1.0, loss=1.0, contribution=1.0)
    last = dict.fromkeys(CHILDREN, 0)
    for round_no in range(1, 13):
        for child in p.pick(round_no, 10.0):
            last[child] = round_no
        assert all(round_no - r < 3 for r in last.values()), (round_no, last)


def test_what_was_learned_survives_a_checkpoint() -> None:
    p = picker(policy="random", fraction=0.5, seed=1)
    p.answered("w1", 2.0, loss=0.3, contribution=0.1)
    p.pick(1, 10.0)
    again = picker(policy="random", fraction=0.5, seed=99)
    again.load(p.state())
    assert again.pick(2, 10.0) == p.pick(2, 10.0)
    assert again.seconds == p.seconds


@pytest.mark.parametrize(
    ("metrics", "node", "expected"),
    [
        ({}, "w1", True),
        ({"train": "w1,w2"}, "w1", True),
        ({"train": "w10,w2"}, "w1", False),
        ({"skip": "w3"}, "w1", True),
        ({"skip": "w0,w1"}, "w1", False),
    ],
)
def test_a_worker_reads_whether_it_was_picked(
    metrics: dict[str, str], node: str, expected: bool
) -> None:
    header = Header(federation="f", sender="edge", kind="model", version=1, metrics=metrics)
    assert picked(header, node) is expected


def test_participation_needs_sync_rounds() -> None:
    with pytest.raises(ValidationError, match="participation works with mode: sync only"):
        RoundConfig.model_validate({"mode": "fedbuff", "participation": {"policy": "random"}})
    with pytest.raises(ValidationError, match="fraction"):
        RoundConfig.model_validate({"participation": {"policy": "random", "fraction": 0}})


@needs_mosquitto
@pytest.mark.anyio
async def test_workers_left_out_do_not_train_and_the_run_still_learns(tmp_path: Path) -> None:
    """Real Mosquitto: edges pick half their workers a round (random, every worker at least
    every 3 rounds); the others take the model and neither train nor send."""
    from hfl_mqtt.config import FederationConfig

    config = FederationConfig.model_validate(
        {
            "federation": "pick",
            "levels": [
                {"name": "cloud", "rounds": 8},
                {
                    "name": "edge",
                    "rounds": 1,
                    "participation": {"policy": "random", "fraction": 0.5, "every_rounds": 3},
                },
                {"name": "worker", "uplink_codec": "q8"},
            ],
            "fanout": [2, 4],
            "task": {"dataset": "digits", "model": "softmax", "partition": {"scheme": "iid"}},
        }
    )
    summary = await asyncio.wait_for(simulate(config, tmp_path / "out", processes=1), 60)
    workers = [n for n in summary["nodes"] if n["role"] == "worker"]
    trained = sum(w["trained"] for w in workers)
    assert trained + sum(w["skipped"] for w in workers) == 8 * 8  # every model taken
    # 2 of 4 a round under each edge, and a worker left out twice in a row is picked.
    assert 8 * 2 * 2 <= trained <= 8 * 2 * 3
    assert all(w["trained"] >= 2 for w in workers)  # once every 3 rounds at least
    assert summary["updates_accepted"] == trained + 8 * 2  # and the edges' reports
    assert summary["final_accuracy"] >= 0.8
