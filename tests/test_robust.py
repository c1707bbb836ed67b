"""Robust aggregation: the free functions on small tables, the strategy, its configuration."""

from __future__ import annotations

import math

import numpy as np
import pytest
from pydantic import ValidationError

from hfl_mqtt.aggregation.base import Update
from hfl_mqtt.aggregation.robust import (
    RobustAggregation,
    RobustRule,
    clip_to_norm,
    coordinate_median,
    l2_norm,
    outliers,
    trimmed_mean,
)
from hfl_mqtt.config import FederationConfig, RoundConfig


def deltas(*rows: list[float]) -> list[dict[str, np.ndarray]]:
    return [{"w": np.asarray(row, np.float32)} for row in rows]


def updates(*rows: list[float], examples: int = 10) -> list[Update]:
    return [Update(f"w{i}", 0, d, examples, f"u{i}") for i, d in enumerate(deltas(*rows))]


@pytest.mark.parametrize(
    ("rows", "expected"),
    [
        ([[1.0, 5.0]], [1.0, 5.0]),
        ([[1.0, 0.0], [2.0, 10.0], [100.0, -3.0]], [2.0, 0.0]),
        ([[1.0], [2.0], [3.0], [1000.0]], [2.5]),  # even count: the middle two's mean
    ],
)
def test_coordinate_median(rows: list[list[float]], expected: list[float]) -> None:
    result = coordinate_median(deltas(*rows))
    assert result["w"].dtype == np.float32
    np.testing.assert_allclose(result["w"], expected)


@pytest.mark.parametrize(
    ("rows", "trim", "expected"),
    [
        ([[1.0], [2.0], [3.0], [4.0], [100.0]], 0.2, [3.0]),  # drops 1 and 100
        ([[1.0], [2.0], [3.0], [4.0], [100.0]], 0.0, [22.0]),  # the plain mean
        ([[1.0], [2.0], [30.0]], 0.4, [2.0]),  # 0.4 of 3 rounds down to 1 each end
        ([[1.0], [5.0]], 0.49, [3.0]),  # never drops everything
    ],
)
def test_trimmed_mean(rows: list[list[float]], trim: float, expected: list[float]) -> None:
    np.testing.assert_allclose(trimmed_mean(deltas(*rows), trim)["w"], expected)


def test_trim_out_of_range_is_refused() -> None:
    with pytest.raises(ValueError, match="trim"):
        trimmed_mean(deltas([1.0]), 0.5)


def test_norm_and_clip_take_every_tensor_as_one_vector() -> None:
    delta = {"a": np.asarray([3.0], np.float32), "b": np.asarray([[4.0]], np.float32)}
    assert l2_norm(delta) == pytest.approx(5.0)
    clipped = clip_to_norm(delta, 1.0)
    assert l2_norm(clipped) == pytest.approx(1.0)
    np.testing.assert_allclose(clipped["a"], [0.6])
    assert clipped["b"].shape == (1, 1)
    assert clip_to_norm(delta, 10.0)["a"] is not delta["a"]  # a copy, unchanged
    np.testing.assert_allclose(clip_to_norm(delta, 10.0)["a"], [3.0])


def test_a_sign_flipped_minority_cannot_turn_the_median() -> None:
    honest = [[1.0, 1.0]] * 4
    model = {"w": np.zeros(2, np.float32)}
    rule = RobustAggregation(RobustRule(rule="median", reject_factor=None))
    result = rule.aggregate(model, updates(*honest, [-50.0, -50.0]))
    np.testing.assert_allclose(result["w"], [1.0, 1.0])
    assert rule.outliers == {}


@pytest.mark.parametrize(
    ("rows", "expected"),
    [
        # Distances from the median [1, 1]: 0.1, 0.1, 0.2, 0.2 and 43 * sqrt(2) (median 0.2).
        ([[1.1, 1.0], [0.9, 1.0], [1.0, 1.2], [1.0, 0.8], [-42.0, -42.0]], {4: 43 * 2**0.5 / 0.2}),
        ([[1.0], [2.0], [3.0], [4.0]], {}),  # spread evenly: nobody is the odd one out
        ([[1.0], [1.0], [1.0], [5.0]], {3: math.inf}),  # identical others: any distance is odd
        ([[1.0], [-100.0]], {}),  # two: neither is the odd one out
    ],
)
def test_outliers_are_far_from_the_coordinate_median(
    rows: list[list[float]], expected: dict[int, float]
) -> None:
    found = outliers(deltas(*rows), 4.0)
    assert found.keys() == expected.keys()
    for index, ratio in expected.items():
        assert found[index] == pytest.approx(ratio, rel=1e-3)


def test_outliers_are_set_aside_before_the_rule() -> None:
    model = {"w": np.zeros(1, np.float32)}
    rows = [[1.0], [1.2], [0.8], [1.1], [0.9], [-40.0], [-40.0]]
    rule = RobustAggregation(RobustRule(rule="trimmed_mean", trim=0.0))
    np.testing.assert_allclose(rule.aggregate(model, updates(*rows))["w"], [1.0], rtol=1e-6)
    assert set(rule.outliers) == {"w5", "w6"}
    assert rule.aggregate(model, updates([1.0], [1.0]))["w"] == pytest.approx([1.0])
    assert rule.outliers == {}  # forgotten at the next round


def test_every_child_counts_the_same_whatever_examples_it_claims() -> None:
    model = {"w": np.zeros(1, np.float32)}
    honest = [Update(f"h{i}", 0, {"w": np.ones(1, np.float32)}, 10, f"h{i}") for i in range(3)]
    liar = Update("liar", 0, {"w": np.full(1, 100.0, np.float32)}, 10**9, "liar")
    for rule in (
        RobustRule(rule="median"),
        RobustRule(rule="trimmed_mean", trim=0.25),
    ):
        np.testing.assert_allclose(
            RobustAggregation(rule).aggregate(model, [*honest, liar])["w"], [1.0]
        )


def test_clipped_mean_bounds_a_scaled_delta_by_the_median_norm() -> None:
    model = {"w": np.zeros(1, np.float32)}
    rows = [[1.0], [1.0], [1.0], [1000.0]]
    unscreened = RobustRule(rule="clipped_mean", reject_factor=None)
    result = RobustAggregation(unscreened, server_lr=0.5).aggregate(model, updates(*rows))
    np.testing.assert_allclose(result["w"], [0.5])  # every delta clipped to norm 1
    fixed = RobustAggregation(unscreened.model_copy(update={"clip_norm": 2.0}))
    np.testing.assert_allclose(fixed.aggregate(model, updates(*rows))["w"], [1.25])


def test_no_updates_leave_the_model() -> None:
    model = {"w": np.ones(2, np.float32)}
    result = RobustAggregation(RobustRule(rule="median")).aggregate(model, [])
    np.testing.assert_array_equal(result["w"], model["w"])


def test_rules_exclude_each_other_and_need_sync_rounds() -> None:
    with pytest.raises(ValidationError, match="robust and privacy exclude each other"):
        RoundConfig.model_validate(
            {"robust": {"rule": "median"}, "privacy": {"clip_norm": 1, "noise_multiplier": 1}}
        )
    with pytest.raises(ValidationError, match="robust works with mode: sync only"):
        RoundConfig.model_validate({"mode": "fedbuff", "robust": {"rule": "median"}})
    with pytest.raises(ValidationError, match="trim"):
        RoundConfig.model_validate({"robust": {"rule": "trimmed_mean", "trim": 0.5}})
    with pytest.raises(ValidationError, match=r"levels\.1\.robust: the workers' level"):
        FederationConfig.model_validate(
            {"levels": [{"name": "c"}, {"name": "w", "robust": {"rule": "median"}}], "fanout": [2]}
        )
