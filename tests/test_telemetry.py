"""Staleness telemetry: the ``staleness`` object of ``summary.json`` and ``staleness.png``."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from structlog.testing import capture_logs

from hfl_mqtt.config import FederationConfig
from hfl_mqtt.sim import SUMMARY_VERSION, _plot, _summary
from hfl_mqtt.telemetry import load_pyplot, plot_staleness, staleness_summary

PNG = b"\x89PNG\r\n\x1a\n"


def three_levels() -> FederationConfig:
    """cloud -> 2 edges -> 2 workers each."""
    return FederationConfig.model_validate(
        {
            "levels": [{"name": "cloud"}, {"name": "edge"}, {"name": "worker"}],
            "fanout": [2, 2],
        }
    )


def report(
    node: str,
    level: int,
    staleness: Sequence[int] = (),
    *,
    weights: list[float] | None = None,
    rejected: dict[str, int] | None = None,
) -> dict[str, Any]:
    """A node report as ``NodeReport.to_dict`` writes it; arrivals one second apart."""
    role = {0: "root", 1: "aggregator"}.get(level, "worker")
    weights = weights if weights is not None else [1.0] * len(staleness)
    return {
        "node": node,
        "role": role,
        "level": level,
        "rounds": 0,
        "updates_accepted": len(staleness),
        "updates_rejected": rejected or {},
        "trained": 0,
        "arrivals": [
            [float(i), f"child-{i % 3}", s, w]
            for i, (s, w) in enumerate(zip(staleness, weights, strict=True))
        ],
        "up": None,
        "down": None,
    }


def federation_reports() -> list[dict[str, Any]]:
    return [
        report("cloud", 0, [0, 1, 0], weights=[1.0, 0.5, 1.0], rejected={"too_stale": 1}),
        report("edge-0", 1, [0, 2, 5], rejected={"stale": 2, "too_stale": 1}),
        report("edge-1", 1, [1, 0, 3], rejected={"too_stale": 3, "corrupt": 1}),
        *(report(f"worker-{i}", 2, rejected={"malformed": 1}) for i in range(4)),
    ]


# --- staleness_summary ----------------------------------------------------------------------------


def test_one_entry_per_receiving_level_over_its_aggregators() -> None:
    stats = staleness_summary(three_levels(), federation_reports())

    assert list(stats) == ["cloud", "edge"]  # the workers receive no updates
    assert stats["cloud"] == {
        "count": 3,
        "mean": pytest.approx(1 / 3),
        "p50": 0.0,
        "p95": pytest.approx(0.9),
        "max": 1,
        "weight_mean": pytest.approx(2.5 / 3),
        "histogram": {"0": 2, "1": 1},
        "rejected": {"too_stale": 1},
    }
    edge = stats["edge"]
    assert edge["count"] == 6  # both edges' arrivals pooled
    assert edge["histogram"] == {"0": 2, "1": 1, "2": 1, "3": 1, "5": 1}
    assert edge["max"] == 5
    assert edge["weight_mean"] == 1.0


def test_rejections_by_reason_summed_over_the_level_and_workers_left_out() -> None:
    stats = staleness_summary(three_levels(), federation_reports())

    assert stats["edge"]["rejected"] == {"corrupt": 1, "stale": 2, "too_stale": 4}
    assert stats["cloud"]["rejected"] == {"too_stale": 1}


@pytest.mark.parametrize(
    "staleness",
    [[0], [3, 3, 3], [0, 1, 2, 3, 10], list(range(20)), [7, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 40]],
)
def test_percentiles_are_numpys_linear_ones(staleness: list[int]) -> None:
    stats = staleness_summary(three_levels(), [report("cloud", 0, staleness)])["cloud"]

    assert stats["p50"] == pytest.approx(np.percentile(staleness, 50, method="linear"))
    assert stats["p95"] == pytest.approx(np.percentile(staleness, 95, method="linear"))
    assert stats["mean"] == pytest.approx(np.mean(staleness))
    assert stats["max"] == max(staleness)
    assert sum(stats["histogram"].values()) == stats["count"] == len(staleness)


def test_percentiles_worked_example() -> None:
    stats = staleness_summary(three_levels(), [report("cloud", 0, [0, 1, 2, 3, 10])])["cloud"]
    # Linear: rank 0.95 * (5 - 1) = 3.8, between 3 and 10: 3 + 0.8 * 7.
    assert (stats["p50"], stats["p95"], stats["mean"]) == (2.0, pytest.approx(8.6), 3.2)


def test_an_empty_level_has_nulls_not_nan() -> None:
    reports = [
        report("cloud", 0, [1, 2]),
        report("edge-0", 1, rejected={"too_stale": 2}),
        report("edge-1", 1),
    ]
    stats = staleness_summary(three_levels(), reports)

    assert stats["edge"] == {
        "count": 0,
        "mean": None,
        "p50": None,
        "p95": None,
        "max": None,
        "weight_mean": None,
        "histogram": {},
        "rejected": {"too_stale": 2},
    }
    assert staleness_summary(three_levels(), [])["cloud"]["count"] == 0


def test_histogram_keys_are_strings_in_numeric_order() -> None:
    stats = staleness_summary(three_levels(), [report("cloud", 0, [10, 2, 2, 0, 10, 10])])

    assert list(stats["cloud"]["histogram"].items()) == [("0", 1), ("2", 2), ("10", 3)]


@pytest.mark.parametrize(
    "reports",
    [
        pytest.param(federation_reports(), id="full"),
        pytest.param([], id="no-reports"),
        pytest.param([report("cloud", 0, [0, 1], weights=[float("nan"), 1.0])], id="nan-weight"),
    ],
)
def test_strict_json_that_reads_back_equal(reports: list[dict[str, Any]]) -> None:
    """``simulate`` writes the summary and tests compare it with what is read back."""
    stats = staleness_summary(three_levels(), reports)

    text = json.dumps(stats, allow_nan=False)
    assert json.loads(text) == stats


def test_a_non_finite_weight_mean_is_null() -> None:
    reports = [report("cloud", 0, [0, 1], weights=[float("inf"), 1.0])]
    assert staleness_summary(three_levels(), reports)["cloud"]["weight_mean"] is None


def test_summary_carries_the_staleness_object_and_version_2() -> None:
    config = three_levels()
    summary = _summary(config, federation_reports(), [], 1.0, {})

    assert summary["summary_version"] == SUMMARY_VERSION == 2
    assert summary["staleness"] == staleness_summary(config, federation_reports())
    json.dumps(summary, allow_nan=False)


# --- staleness.png --------------------------------------------------------------------------------


def test_plot_is_written_for_thousands_of_arrivals(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    reports = [
        report("cloud", 0, rng.poisson(1.0, 300).tolist()),
        report("edge-0", 1, rng.poisson(3.0, 3000).tolist(), weights=rng.random(3000).tolist()),
        report("edge-1", 1, rng.poisson(2.0, 3000).tolist()),
    ]
    path = plot_staleness(load_pyplot(), three_levels(), reports, tmp_path)

    assert path == tmp_path / "staleness.png"
    png = path.read_bytes()
    assert png.startswith(PNG)
    assert len(png) > 1000


def test_plot_skips_a_level_without_arrivals(tmp_path: Path) -> None:
    reports = [report("cloud", 0), report("edge-0", 1, [0, 0, 1])]
    path = plot_staleness(load_pyplot(), three_levels(), reports, tmp_path)

    assert path is not None
    assert path.read_bytes().startswith(PNG)


def test_no_plot_without_arrivals(tmp_path: Path) -> None:
    reports = [report("cloud", 0), report("edge-0", 1, rejected={"too_stale": 4})]

    assert plot_staleness(load_pyplot(), three_levels(), reports, tmp_path) is None
    _plot(three_levels(), [], reports, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_sim_writes_both_plots(tmp_path: Path) -> None:
    events = [
        {"global_round": r, "accuracy": 0.5 + r / 10, "loss": 1.0 / r, "tree_bytes": r * 1e5}
        for r in (1, 2, 3)
    ]
    _plot(three_levels(), events, federation_reports(), tmp_path)

    for name in ("accuracy.png", "staleness.png"):
        assert (tmp_path / name).read_bytes().startswith(PNG), name


def test_without_matplotlib_a_warning_and_no_plot(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    with capture_logs() as logs:
        _plot(three_levels(), [], federation_reports(), tmp_path)

    assert list(tmp_path.iterdir()) == []
    assert [e["event"] for e in logs if e["log_level"] == "warning"] == [
        "matplotlib is not installed: no plot (pip install 'hfl-mqtt[sim]')"
    ]
