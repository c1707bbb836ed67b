"""Poisoned workers on real Mosquitto: a fifth of the workers send sign-flipped deltas, 4 or 50
times as long as their own.

FedAvg edges are dragged off; robust edges (coordinate median, trimmed mean, clipped mean) end
within 2 points of the clean run, with the screening that refuses outliers and without it.
Digits, softmax, IID, 10 workers under 2 edges (one poisoned worker under each), 20 cloud
rounds, one process per run. (A delta scaled up without a flip
only takes a longer step on this convex model: FedAvg edges still reach the clean accuracy.)
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from hfl_mqtt.config import FederationConfig
from hfl_mqtt.sim import simulate
from tests.fakes import needs_mosquitto

pytestmark = [pytest.mark.anyio, needs_mosquitto]

RUN_TIMEOUT_S = 60.0


def federation(robust: dict[str, Any] | None, poison: dict[str, Any] | None) -> FederationConfig:
    return FederationConfig.model_validate(
        {
            "federation": "poison",
            "levels": [
                {"name": "cloud", "rounds": 20, "deadline_s": 60},
                {"name": "edge", "rounds": 1, "deadline_s": 60, "robust": robust},
                {"name": "worker", "uplink_codec": "q8"},
            ],
            "fanout": [2, 5],
            "heterogeneity": poison,
            "task": {
                "dataset": "digits",
                "model": "softmax",
                "partition": {"scheme": "iid"},
                "train": {"epochs": 1, "batch_size": 16, "learning_rate": 0.1},
            },
        }
    )


async def run(tmp_path: Path, name: str, config: FederationConfig) -> dict[str, Any]:
    summary = await asyncio.wait_for(simulate(config, tmp_path / name, processes=1), RUN_TIMEOUT_S)
    assert summary["global_rounds"] == 20
    return summary


@pytest.mark.parametrize(
    ("attack", "rule"),
    [
        pytest.param(
            {"poison": "sign_flip", "poison_scale": 4.0}, {"rule": "median"}, id="flip-median"
        ),
        pytest.param(
            {"poison": "sign_flip", "poison_scale": 4.0},
            {"rule": "trimmed_mean", "trim": 0.2},
            id="flip-trimmed",
        ),
        pytest.param(
            {"poison": "sign_flip", "poison_scale": 50.0},
            {"rule": "clipped_mean"},
            id="flip50-clipped",
        ),
    ],
)
async def test_robust_edges_hold_where_fedavg_edges_do_not(
    tmp_path: Path, attack: dict[str, Any], rule: dict[str, Any]
) -> None:
    poison = {"poisoned": 0.2, **attack}
    clean = (await run(tmp_path, "clean", federation(None, None)))["final_accuracy"]
    fedavg = (await run(tmp_path, "fedavg", federation(None, poison)))["final_accuracy"]
    screened = await run(tmp_path, "robust", federation(rule, poison))
    unscreened = await run(
        tmp_path, "rule-only", federation({**rule, "reject_factor": None}, poison)
    )
    assert clean >= 0.85
    assert fedavg < clean - 0.02, (clean, fedavg)
    # The rule alone holds; with the screening, the poisoned deltas are refused and logged.
    assert unscreened["final_accuracy"] >= clean - 0.02, (clean, unscreened["final_accuracy"])
    assert screened["final_accuracy"] >= clean - 0.02, (clean, screened["final_accuracy"])
    assert "outlier" not in unscreened["updates_rejected"]
    # Two poisoned workers a round for 20 rounds; an honest one now and then too, at most.
    assert 2 * 20 <= screened["updates_rejected"]["outlier"] <= 2 * 20 + 10
