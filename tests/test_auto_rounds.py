"""rounds: auto: the choice on small tables (it moves as the bound says), the settings, and a
federation on Mosquitto that chooses and finishes within its deadline."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from pydantic import ValidationError

from hfl_mqtt.aggregation.auto_rounds import (
    AutoRounds,
    RoundsChooser,
    choose_rounds,
    quantizer_variance,
)
from hfl_mqtt.config import FederationConfig, NodeConfig
from hfl_mqtt.sim import simulate
from tests.fakes import needs_mosquitto

LONG = 1e6
"""A deadline far enough that whole cycles always fit (no rounding at the end)."""


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("npy", 0.0),
        ("fp16", 0.0),
        ("q8", 1024 / 255**2),
        ("q4", 32 / 15),  # sqrt(1024) / 15 < 1024 / 225
        ("q2", 32 / 3),
        ("topk0.1", 9.0),
        ("topk0.1+q8", (1 + 1024 / 255**2) / 0.1 - 1),
    ],
)
def test_quantizer_variance_bounds(spec: str, expected: float) -> None:
    assert quantizer_variance(spec) == pytest.approx(expected)


def test_free_communication_needs_no_local_rounds() -> None:
    assert choose_rounds(round_s=0.3, up_s=0.0, remaining_s=LONG, q=0.0, max_rounds=16) == 1


def test_slower_communication_means_more_rounds_before_a_report() -> None:
    chosen = [choose_rounds(0.3, up, LONG, 0.0, 16) for up in (0.03, 0.3, 1.0, 3.0, 10.0)]
    assert chosen == sorted(chosen)
    assert chosen[0] < chosen[-1] <= 16


def test_slower_computation_means_fewer_rounds() -> None:
    chosen = [choose_rounds(r, 1.0, LONG, 0.0, 16) for r in (0.05, 0.1, 0.3, 1.0, 3.0)]
    assert chosen == sorted(chosen, reverse=True)
    assert chosen[0] > chosen[-1]


def test_a_coarser_quantizer_means_fewer_rounds() -> None:
    chosen = [choose_rounds(0.3, 3.0, LONG, quantizer_variance(s), 16) for s in ("npy", "q4", "q2")]
    assert chosen == sorted(chosen, reverse=True)
    assert chosen[0] > chosen[-1]


def test_the_deadline_caps_a_cycle_so_that_its_report_fits() -> None:
    assert choose_rounds(0.3, 1.0, remaining_s=1.0, q=0.0, max_rounds=16) == 1  # none fits
    assert choose_rounds(0.3, 1.0, remaining_s=2.0, q=0.0, max_rounds=16) == 3  # 1 + 3 * 0.3
    assert choose_rounds(0.3, 1.0, remaining_s=LONG, q=0.0, max_rounds=4) <= 4


def test_the_chooser_measures_first_then_chooses() -> None:
    chooser = RoundsChooser(AutoRounds(deadline_s=100, smoothing=1.0))
    assert chooser.rounds(100) == 1  # nothing measured yet
    chooser.round_took(0.3)
    chooser.up_took(3.0)
    chooser.children_codec("q8")
    tau = chooser.rounds(LONG)
    assert tau == choose_rounds(0.3, 3.0, LONG, quantizer_variance("q8"), 16) > 1
    again = RoundsChooser(AutoRounds(deadline_s=100))
    again.load(chooser.state())
    assert again.chosen == [1, tau]
    assert again.rounds(LONG) == tau


def test_rounds_auto_settings_are_checked() -> None:
    with pytest.raises(ValidationError, match=r"levels\.1\.rounds: auto needs a deadline"):
        FederationConfig.model_validate(
            {
                "levels": [{"name": "c"}, {"name": "e", "rounds": "auto"}, {"name": "w"}],
                "fanout": [2, 2],
            }
        )
    with pytest.raises(ValidationError, match=r"levels\.0\.rounds: auto applies below the root"):
        FederationConfig.model_validate(
            {
                "levels": [{"name": "c", "rounds": "auto", "max_seconds": 9}, {"name": "w"}],
                "fanout": [2],
            }
        )
    with pytest.raises(ValidationError, match="rounds: auto works with mode: sync only"):
        FederationConfig.model_validate(
            {
                "levels": [
                    {"name": "c", "max_seconds": 9},
                    {"name": "e", "rounds": "auto", "mode": "fedbuff"},
                    {"name": "w"},
                ],
                "fanout": [2, 2],
            }
        )
    with pytest.raises(ValidationError, match=r"auto_rounds\.deadline_s"):
        NodeConfig.model_validate(
            {
                "federation": "f",
                "node": "e",
                "upstream": {"parent": "c"},
                "downstream": {"children": ["w"], "rounds": "auto"},
            }
        )


@needs_mosquitto
@pytest.mark.anyio
async def test_auto_levels_choose_their_rounds_and_the_run_keeps_its_deadline(
    tmp_path: Path,
) -> None:
    """Real Mosquitto, 4 levels: regions and edges both auto under a 6 s deadline; the edges'
    links to their regions are slow (300 ms each way), so edges run several rounds a report."""
    config = FederationConfig.model_validate(
        {
            "federation": "auto",
            "levels": [
                {"name": "cloud", "rounds": 1000, "max_seconds": 6},
                {"name": "region", "rounds": "auto"},
                {"name": "edge", "rounds": "auto", "uplink_codec": "q8", "link_latency_ms": 300},
                {"name": "worker", "uplink_codec": "q8"},
            ],
            "fanout": [2, 2, 2],
            "task": {"dataset": "digits", "model": "softmax", "partition": {"scheme": "iid"}},
        }
    )
    summary = await asyncio.wait_for(simulate(config, tmp_path / "out", processes=1), 60)
    assert summary["global_rounds"] >= 1
    aggregators = {n["node"]: n for n in summary["nodes"] if n["role"] == "aggregator"}
    for name in ("region-0", "region-1", "edge-0", "edge-3"):
        chosen = aggregators[name]["rounds_chosen"]
        assert chosen[:1] == [1]  # the first cycle measures
        assert all(1 <= tau <= 16 for tau in chosen)
    assert any(tau > 1 for tau in aggregators["edge-0"]["rounds_chosen"][1:])
    assert summary["final_accuracy"] > 0.5
