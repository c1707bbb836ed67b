"""FedAvg math as tables: inputs and the expected outputs worked out by hand."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pytest

from hfl_mqtt.aggregation import FedAvg, Update, weighted_mean


def arrays(**values: object) -> dict[str, np.ndarray]:
    return {k: np.asarray(v, np.float32) for k, v in values.items()}


def update(delta: Mapping[str, np.ndarray], n: int, sender: str = "c") -> Update:
    return Update(sender, 1, delta, n, f"id-{sender}-{n}")


A = arrays(w=[1, 2], m=[[0, 4], [8, 0]])
B = arrays(w=[3, 6], m=[[4, 0], [0, 8]])


@pytest.mark.parametrize(
    ("inputs", "weights", "expected"),
    [
        pytest.param([A, B], [1, 1], arrays(w=[2, 4], m=[[2, 2], [4, 4]]), id="equal"),
        pytest.param([A, B], [1, 3], arrays(w=[2.5, 5], m=[[3, 1], [2, 6]]), id="weighted"),
        pytest.param([A, B], [10, 30], arrays(w=[2.5, 5], m=[[3, 1], [2, 6]]), id="scale-free"),
        pytest.param([A, B], [0, 0], arrays(w=[2, 4], m=[[2, 2], [4, 4]]), id="zero-equal"),
        pytest.param([A, B], [0, 7], B, id="one-zero"),
        pytest.param([A], [5], A, id="single"),
        pytest.param([A], [0], A, id="single-zero"),
        pytest.param(
            [arrays(w=[0]), arrays(w=[3]), arrays(w=[6])], [1, 1, 1], arrays(w=[3]), id="three"
        ),
    ],
)
def test_weighted_mean(
    inputs: Sequence[Mapping[str, np.ndarray]],
    weights: list[float],
    expected: Mapping[str, np.ndarray],
) -> None:
    result = weighted_mean(inputs, weights)
    assert result.keys() == expected.keys()
    for name, value in expected.items():
        np.testing.assert_allclose(result[name], value, rtol=1e-6)
        assert result[name].dtype == np.float32


@pytest.mark.parametrize(
    ("first", "second", "dtype"),
    [
        (np.float16, np.float32, np.float16),
        (np.float32, np.float16, np.float32),
        (np.float64, np.float32, np.float64),
    ],
)
def test_weighted_mean_keeps_the_first_dtype(first: type, second: type, dtype: type) -> None:
    result = weighted_mean(
        [{"w": np.array([1, 2], first)}, {"w": np.array([3, 4], second)}], [1, 1]
    )
    assert result["w"].dtype == dtype
    np.testing.assert_array_equal(result["w"], np.array([2, 3], dtype))


def test_weighted_mean_accumulates_in_float64() -> None:
    # 1e8 + 1 is not a float32: summing in float32 would lose the 1s before the division.
    big, one = {"w": np.array([1e8], np.float64)}, {"w": np.array([1.0], np.float64)}
    result = weighted_mean([big, one, one, {"w": np.array([-1e8], np.float64)}], [1, 1, 1, 1])
    assert result["w"][0] == 0.5


@pytest.mark.parametrize(
    ("inputs", "weights", "message"),
    [
        ([], [], "no arrays"),
        ([A, B], [1], "1 weights for 2 arrays"),
        ([A], [1, 1], "2 weights for 1 arrays"),
        ([A, B], [1, -1], "non-negative"),
        ([A, B], [1, float("nan")], "finite"),
        ([A, B], [1, float("inf")], "finite"),
        ([A, arrays(w=[1, 2])], [1, 1], "names and shapes"),
        ([A, {**B, "extra": np.zeros(1, np.float32)}], [1, 1], "names and shapes"),
        ([A, {**B, "w": np.zeros(1, np.float32)}], [1, 1], "names and shapes"),
        ([A, {**B, "w": np.zeros((2, 2), np.float32)}], [1, 1], "names and shapes"),
    ],
    ids=[
        "none",
        "few-weights",
        "many-weights",
        "negative",
        "nan",
        "inf",
        "missing-name",
        "extra-name",
        "shorter",
        "broadcastable",
    ],
)
def test_weighted_mean_errors(
    inputs: list[Mapping[str, np.ndarray]], weights: list[float], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        weighted_mean(inputs, weights)


MODEL = arrays(w=[1, 1], b=[10])


@pytest.mark.parametrize(
    ("updates", "server_lr", "expected"),
    [
        pytest.param([update(arrays(w=[2, 0], b=[4]), 1)], 1.0, arrays(w=[3, 1], b=[14]), id="one"),
        pytest.param(
            [update(arrays(w=[2, 0], b=[4]), 1, "a"), update(arrays(w=[0, 4], b=[0]), 3, "b")],
            1.0,
            arrays(w=[1.5, 4], b=[11]),
            id="example-weighted",
        ),
        pytest.param(
            [update(arrays(w=[2, 0], b=[4]), 0, "a"), update(arrays(w=[0, 4], b=[0]), 0, "b")],
            1.0,
            arrays(w=[2, 3], b=[12]),
            id="zero-examples-equal",
        ),
        pytest.param(
            [update(arrays(w=[2, 0], b=[4]), 1, "a"), update(arrays(w=[0, 4], b=[0]), 3, "b")],
            0.5,
            arrays(w=[1.25, 2.5], b=[10.5]),
            id="server-lr",
        ),
        pytest.param(
            [update(arrays(w=[2, 0], b=[4]), 5)], 2.0, arrays(w=[5, 1], b=[18]), id="lr-above-1"
        ),
        pytest.param([], 1.0, MODEL, id="no-updates"),
    ],
)
def test_fedavg(
    updates: list[Update], server_lr: float, expected: Mapping[str, np.ndarray]
) -> None:
    before = {k: v.copy() for k, v in MODEL.items()}
    result = FedAvg(server_lr).aggregate(MODEL, updates)
    assert result.keys() == expected.keys()
    for name, value in expected.items():
        np.testing.assert_allclose(result[name], value, rtol=1e-6)
        assert result[name].dtype == MODEL[name].dtype
        assert result[name] is not MODEL[name]
    for name, value in before.items():  # the input model is never modified
        np.testing.assert_array_equal(MODEL[name], value)


def test_fedavg_no_updates_returns_a_copy() -> None:
    result = FedAvg().aggregate(MODEL, [])
    result["w"][0] = 99
    assert MODEL["w"][0] == 1


def test_fedavg_keeps_the_model_dtype() -> None:
    model = {"w": np.array([1, 2], np.float16)}
    result = FedAvg().aggregate(model, [update({"w": np.array([0.5, 0.25], np.float32)}, 1)])
    assert result["w"].dtype == np.float16
    np.testing.assert_array_equal(result["w"], np.array([1.5, 2.25], np.float16))


@pytest.mark.parametrize("server_lr", [0.0, -1.0, float("nan"), float("inf")])
def test_fedavg_refuses_a_bad_server_lr(server_lr: float) -> None:
    with pytest.raises(ValueError, match="server_lr"):
        FedAvg(server_lr)


@pytest.mark.parametrize(
    "delta",
    [
        pytest.param(arrays(w=[1, 1]), id="missing-name"),
        pytest.param(arrays(w=[1, 1], b=[1], x=[1]), id="extra-name"),
        pytest.param(arrays(w=[1], b=[1]), id="broadcastable-shape"),
        pytest.param(arrays(w=[[1, 1], [1, 1]], b=[1]), id="larger-shape"),
    ],
)
def test_fedavg_refuses_deltas_that_do_not_fit_the_model(delta: dict[str, np.ndarray]) -> None:
    with pytest.raises(ValueError, match="names and shapes"):
        FedAvg().aggregate(MODEL, [update(delta, 1)])
