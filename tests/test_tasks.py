"""Training plug-ins: gradients, training runs, weights, data sets, load_task."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Mapping
from typing import Any

import numpy as np
import pytest
from pydantic import ValidationError

from hfl_mqtt.tasks import (
    EvalResult,
    NumpyTask,
    SyntheticConfig,
    Task,
    TaskConfig,
    TaskError,
    TrainConfig,
    TrainResult,
    load_digits_split,
    load_task,
    make_synthetic,
    partition_indices,
)
from hfl_mqtt.tasks.numpy_models import forward, init_params, loss_and_grads

# --- gradients ------------------------------------------------------------------------------


def _numeric_grads(
    params: dict[str, np.ndarray],
    x: np.ndarray,
    y: np.ndarray,
    mu: float,
    reference: Mapping[str, np.ndarray],
    eps: float = 1e-6,
) -> dict[str, np.ndarray]:
    grads = {}
    for name, w in params.items():
        g = np.zeros_like(w)
        for i in np.ndindex(w.shape):
            old = w[i]
            w[i] = old + eps
            up = loss_and_grads(params, x, y, proximal_mu=mu, reference=reference).loss
            w[i] = old - eps
            down = loss_and_grads(params, x, y, proximal_mu=mu, reference=reference).loss
            w[i] = old
            g[i] = (up - down) / (2 * eps)
        grads[name] = g
    return grads


@pytest.mark.parametrize("hidden", [(), (6,), (5, 4)], ids=["softmax", "mlp", "mlp2"])
@pytest.mark.parametrize("mu", [0.0, 0.7])
def test_gradients_match_finite_differences(hidden: tuple[int, ...], mu: float) -> None:
    rng = np.random.default_rng(1)
    sizes = [7, *hidden, 4]
    params = {k: v.astype(np.float64) for k, v in init_params(sizes, seed=2).items()}
    reference = {k: v + rng.normal(0, 0.3, v.shape) for k, v in params.items()}
    x = rng.normal(size=(9, 7))
    y = rng.integers(0, 4, size=9)
    out = loss_and_grads(params, x, y, proximal_mu=mu, reference=reference)
    numeric = _numeric_grads(params, x, y, mu, reference)
    assert out.grads.keys() == params.keys()
    for name in params:
        np.testing.assert_allclose(out.grads[name], numeric[name], rtol=1e-5, atol=1e-8)
    if mu == 0.0:
        assert out.loss == pytest.approx(out.cross_entropy)
    else:
        prox = sum(float(np.sum((params[k] - reference[k]) ** 2)) for k in params)
        assert out.loss == pytest.approx(out.cross_entropy + 0.5 * mu * prox)
    np.testing.assert_allclose(out.logits, forward(params, x))


def test_init_params_names_shapes_like_torch() -> None:
    params = init_params([64, 32, 10], seed=0)
    assert {k: v.shape for k, v in params.items()} == {
        "fc1.weight": (32, 64),
        "fc1.bias": (32,),
        "fc2.weight": (10, 32),
        "fc2.bias": (10,),
    }
    assert all(v.dtype == np.float32 for v in params.values())
    assert np.abs(params["fc1.weight"]).max() <= 1 / 8
    assert all(np.array_equal(params[k], init_params([64, 32, 10], seed=0)[k]) for k in params)


# --- training on digits ---------------------------------------------------------------------

FAST = TrainConfig(epochs=5, batch_size=32, learning_rate=0.5)


@pytest.mark.parametrize("model", ["softmax", "mlp"])
def test_numpy_models_learn_digits(model: str) -> None:
    task = load_task(TaskConfig(model=model), None, 1)  # type: ignore[arg-type]
    before = task.evaluate()
    result = task.train(FAST)
    after = task.evaluate()
    assert isinstance(result, TrainResult)
    assert result.num_examples == task.num_examples == 1438
    assert result.metrics["steps"] == 5 * 45
    assert before.accuracy < 0.3
    assert after.num_examples == 359
    assert after.accuracy >= 0.90
    assert after.loss < before.loss


def test_torch_mlp_learns_digits() -> None:
    pytest.importorskip("torch")
    task = load_task(TaskConfig(model="torch_mlp"), None, 1)
    task.train(FAST)
    assert task.evaluate().accuracy >= 0.90


def test_dp_sgd_learns_digits_and_counts_its_epsilon() -> None:
    pytest.importorskip("opacus")
    config = TaskConfig.model_validate(
        {"model": "torch_mlp", "dp_sgd": {"noise_multiplier": 1.0, "max_grad_norm": 1.0}}
    )
    task = load_task(config, 0, 4)
    names = set(task.get_weights())
    train = TrainConfig(epochs=1, batch_size=32, learning_rate=0.5)
    spent = [task.train(train).metrics["dp_epsilon"] for _ in range(6)]
    assert spent == sorted(spent)
    assert 1 < spent[0] < spent[-1] < 10  # z = 1, q = 32/360, 12 steps a run, delta 1e-5
    assert task.evaluate().accuracy >= 0.6
    assert set(task.get_weights()) == names  # Opacus's wrapper does not rename the weights
    with pytest.raises(ValueError, match="dp_sgd works with model: torch_mlp"):
        TaskConfig.model_validate({"model": "softmax", "dp_sgd": {}})


@pytest.mark.parametrize("mu", [0.0, 0.5])
def test_torch_and_numpy_mlp_are_the_same_model(mu: float) -> None:
    """Same seed, same weights, same batches: the two implementations train in lockstep."""
    pytest.importorskip("torch")
    config = TaskConfig(model="mlp", hidden=16)
    numpy_task = load_task(config, 2, 8)
    torch_task = load_task(config.model_copy(update={"model": "torch_mlp"}), 2, 8)
    for name, w in numpy_task.get_weights().items():
        np.testing.assert_array_equal(w, torch_task.get_weights()[name])
    train = TrainConfig(epochs=3, batch_size=16, learning_rate=0.3, proximal_mu=mu)
    r1, r2 = numpy_task.train(train), torch_task.train(train)
    assert r1.metrics == pytest.approx(r2.metrics, rel=1e-5)
    for name, w in numpy_task.get_weights().items():
        np.testing.assert_allclose(w, torch_task.get_weights()[name], atol=1e-5)
    e1, e2 = numpy_task.evaluate(), torch_task.evaluate()
    assert e1.accuracy == e2.accuracy
    assert e1.loss == pytest.approx(e2.loss, rel=1e-5)


@pytest.mark.parametrize("model", ["softmax", "mlp", "torch_mlp"])
def test_proximal_term_pulls_towards_the_start(model: str) -> None:
    if model == "torch_mlp":
        pytest.importorskip("torch")
    task = load_task(TaskConfig(model=model), 0, 4)  # type: ignore[arg-type]
    start = task.get_weights()

    def distance(mu: float) -> float:
        task.set_weights(start)
        task.train(TrainConfig(epochs=3, learning_rate=0.2, proximal_mu=mu))
        now = task.get_weights()
        return float(sum(np.sum((now[k] - start[k]) ** 2) for k in start))

    assert distance(5.0) < 0.5 * distance(0.0)


def test_max_steps_and_determinism() -> None:
    config = TaskConfig(model="mlp", hidden=8, partition={"scheme": "dirichlet"})  # type: ignore[arg-type]
    a, b = load_task(config, 3, 10), load_task(config, 3, 10)
    train = TrainConfig(epochs=50, batch_size=8, max_steps=7)
    assert a.train(train).metrics["steps"] == 7
    b.train(train)
    for name, w in a.get_weights().items():
        np.testing.assert_array_equal(w, b.get_weights()[name])
    # Workers shuffle differently, but start from the same model.
    other = load_task(config, 4, 10)
    for name, w in load_task(config, None, 10).get_weights().items():
        np.testing.assert_array_equal(w, other.get_weights()[name])


# --- weights --------------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["softmax", "mlp", "torch_mlp"])
def test_weights_round_trip_and_checks(model: str) -> None:
    if model == "torch_mlp":
        pytest.importorskip("torch")
    task = load_task(TaskConfig(model=model, hidden=12), 0, 2)  # type: ignore[arg-type]
    weights = task.get_weights()
    expected = {"fc1.weight": (10, 64), "fc1.bias": (10,)}
    if model != "softmax":
        expected = {"fc1.weight": (12, 64), "fc1.bias": (12,), "fc2.weight": (10, 12)}
        expected["fc2.bias"] = (10,)
    assert {k: v.shape for k, v in weights.items()} == expected
    assert all(v.dtype == np.float32 for v in weights.values())

    weights["fc1.bias"][:] = 123.0  # a copy: the task is unchanged
    assert not np.any(task.get_weights()["fc1.bias"] == 123.0)

    new = {k: np.random.default_rng(0).normal(size=v.shape) for k, v in weights.items()}
    task.set_weights(new)  # float64 is accepted and stored as float32
    for k, v in task.get_weights().items():
        assert v.dtype == np.float32
        np.testing.assert_array_equal(v, new[k].astype(np.float32))
    new["fc1.bias"][:] = 0.0  # set_weights copied too
    assert not np.all(task.get_weights()["fc1.bias"] == 0.0)

    with pytest.raises(TaskError, match=r"'fc1.weight' has shape \(64, 10\)"):
        task.set_weights({**new, "fc1.weight": np.zeros((64, 10))})
    with pytest.raises(ValueError, match=r"missing \['fc1.bias'\]"):
        task.set_weights({k: v for k, v in new.items() if k != "fc1.bias"})
    with pytest.raises(ValueError, match=r"unexpected \['fc9.weight'\]"):
        task.set_weights({**new, "fc9.weight": np.zeros(3)})


def test_numpy_task_rejects_bad_data() -> None:
    x, y = np.zeros((4, 3), np.float32), np.array([0, 1, 2, 1])
    with pytest.raises(TaskError, match=r"labels must be in \[0, 2\)"):
        NumpyTask(x, y, x, y, num_features=3, num_classes=2)
    with pytest.raises(TaskError, match=r"shape \(n, 5\)"):
        NumpyTask(x, y, x, y, num_features=5, num_classes=3)
    with pytest.raises(TaskError, match="evaluation data is empty"):
        NumpyTask(x, y, x[:0], y[:0], num_features=3, num_classes=3)


# --- data sets ------------------------------------------------------------------------------


def test_digits_split() -> None:
    split = load_digits_split(0.2, seed=0)
    assert split.x_train.shape == (1438, 64)
    assert split.x_test.shape == (359, 64)
    assert split.x_train.dtype == np.float32
    assert split.y_train.dtype == np.int64
    assert split.x_train.min() >= 0.0
    assert split.x_train.max() <= 1.0
    # Stratified: each class's test share is within one sample of 20%.
    all_counts = np.bincount(split.y_train) + np.bincount(split.y_test)
    assert np.all(np.abs(np.bincount(split.y_test) - 0.2 * all_counts) <= 1)
    again, other = load_digits_split(0.2, seed=0), load_digits_split(0.2, seed=1)
    np.testing.assert_array_equal(split.x_test, again.x_test)
    assert not np.array_equal(split.x_test, other.x_test)
    with pytest.raises(TaskError, match="test_fraction"):
        load_digits_split(1.0)


def test_digits_without_sklearn_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "sklearn", None)  # as if scikit-learn were not installed
    with pytest.raises(ImportError, match=r"hfl-mqtt\[sim\]"):
        load_digits_split()


def test_torch_models_without_torch_say_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torch", None)
    monkeypatch.delitem(sys.modules, "hfl_mqtt.tasks.torch_models", raising=False)
    with pytest.raises(ImportError, match=r"hfl-mqtt\[torch\]"):
        importlib.import_module("hfl_mqtt.tasks.torch_models")


def test_synthetic_shapes_and_determinism() -> None:
    data = make_synthetic(1.0, 1.0, 12, seed=5)
    assert len(data.devices) == 12
    for d in data.devices:
        assert d.x_train.shape[1] == d.x_test.shape[1] == 60
        assert d.x_train.dtype == np.float32
        assert d.y_train.dtype == np.int64
        n = d.y_train.size + d.y_test.size
        assert n >= 50
        assert d.y_test.size == max(1, round(0.2 * n))
        assert d.y_train.min() >= 0
        assert d.y_train.max() < 10
    sizes = [d.y_train.size + d.y_test.size for d in data.devices]
    assert len(set(sizes)) > 6  # lognormal sizes: heterogeneous
    again = make_synthetic(1.0, 1.0, 12, seed=5)
    np.testing.assert_array_equal(data.devices[3].x_train, again.devices[3].x_train)
    # Device k depends only on (seed, k): more devices leave the first ones unchanged.
    more = make_synthetic(1.0, 1.0, 20, seed=5)
    np.testing.assert_array_equal(data.devices[11].x_test, more.devices[11].x_test)
    assert not np.array_equal(data.devices[0].x_train, data.devices[1].x_train[:10])
    pooled = data.pooled()
    assert pooled.y_train.size == sum(d.y_train.size for d in data.devices)
    # Devices differ: label distributions are far apart (each device has its own model).
    hist = np.stack([np.bincount(d.y_train, minlength=10) / d.y_train.size for d in data.devices])
    assert np.abs(hist - hist.mean(axis=0)).sum(axis=1).mean() > 0.5


def test_model_on_pooled_synthetic_beats_chance() -> None:
    task = load_task(TaskConfig(dataset="synthetic"), None, 30)
    majority = np.bincount(make_synthetic(1.0, 1.0, 30, seed=0).pooled().y_test).max()
    chance = majority / task.evaluate().num_examples
    for _ in range(5):
        task.train(TrainConfig(learning_rate=0.05))
    accuracy = task.evaluate().accuracy
    assert accuracy > 0.6
    assert accuracy > chance + 0.3


def test_synthetic_workers_get_their_device() -> None:
    config = TaskConfig(dataset="synthetic", synthetic=SyntheticConfig(num_devices=6))
    data = make_synthetic(1.0, 1.0, 6, seed=0)
    for p in range(6):
        task = load_task(config, p, 6)
        assert task.num_examples == data.devices[p].y_train.size
        assert task.evaluate().num_examples == data.devices[p].y_test.size
    root = load_task(config, None, 1)  # num_devices fixes the data, whatever the root is told
    assert root.evaluate().num_examples == data.pooled().y_test.size
    with pytest.raises(TaskError, match="num_devices is 6 but there are 7 partitions"):
        load_task(config, 0, 7)


def test_digits_workers_partition_the_training_split() -> None:
    config = TaskConfig(partition={"scheme": "shards"})  # type: ignore[arg-type]
    tasks = [load_task(config, p, 32) for p in range(32)]
    assert sum(t.num_examples for t in tasks) == 1438
    expected = partition_indices(load_digits_split().y_train, 32, config.partition)
    assert [t.num_examples for t in tasks] == [p.size for p in expected]
    assert tasks[0].evaluate().num_examples == tasks[0].num_examples


# --- configuration and load_task ------------------------------------------------------------


@pytest.mark.parametrize(
    "bad",
    [
        {"dataset": "synthetic", "partition": {"scheme": "dirichlet"}},
        {"synthetic": {"alpha": 0.5}},
        {"test_fraction": 0.0},
        {"model": "resnet"},
        {"unknown": 1},
        {"train": {"epochs": 0}},
        {"train": {"lr": 0.1}},
        {"synthetic": {"samples_per_worker": 10}, "dataset": "synthetic"},
    ],
)
def test_task_config_validation(bad: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        TaskConfig.model_validate(bad)


class TinyTask:
    """A minimal custom Task, as a user would write one."""

    def __init__(self, scale: float, partition: int | None) -> None:
        self.w = np.full(3, scale, np.float32)
        self.partition = partition

    @property
    def num_examples(self) -> int:
        return 5

    def get_weights(self) -> dict[str, np.ndarray]:
        return {"w": self.w.copy()}

    def set_weights(self, weights: Mapping[str, np.ndarray]) -> None:
        self.w = np.array(weights["w"], np.float32)

    def train(self, config: TrainConfig) -> TrainResult:
        self.w += config.learning_rate
        return TrainResult(5, {"loss": 0.0})

    def evaluate(self) -> EvalResult:
        return EvalResult(5, 0.0, 1.0)


def tiny_factory(config: TaskConfig, partition: int | None, num_partitions: int) -> Task:
    return TinyTask(config.params["scale"] * num_partitions, partition)


def not_a_task_factory(config: TaskConfig, partition: int | None, num_partitions: int) -> Any:
    return object()


def test_load_task_with_a_custom_factory() -> None:
    config = TaskConfig(factory=f"{__name__}:tiny_factory", params={"scale": 2.0})
    task = load_task(config, 1, 3)
    assert isinstance(task, TinyTask)
    assert task.partition == 1
    np.testing.assert_array_equal(task.get_weights()["w"], [6.0, 6.0, 6.0])
    task.train(TrainConfig(learning_rate=1.0))
    assert task.get_weights()["w"][0] == 7.0
    assert isinstance(load_task(config, None, 3), TinyTask)


@pytest.mark.parametrize(
    ("factory", "match"),
    [
        ("no_such_module_hfl:make", r"cannot import module 'no_such_module_hfl'"),
        ("hfl_mqtt.tasks.builtin:nope", r"'hfl_mqtt.tasks.builtin:nope'.*no attribute 'nope'"),
        ("hfl_mqtt.tasks.builtin", r"not of the form 'module:callable'"),
        ("hfl_mqtt.tasks.builtin:__all__", r"'hfl_mqtt.tasks.builtin:__all__' is not callable"),
        (f"{__name__}:not_a_task_factory", r"returned object, which is not a Task"),
    ],
)
def test_load_task_with_a_bad_factory(factory: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        load_task(TaskConfig(factory=factory), 0, 2)


@pytest.mark.parametrize(("partition", "num_partitions"), [(2, 2), (-1, 2), (0, 0)])
def test_load_task_rejects_bad_partitions(partition: int, num_partitions: int) -> None:
    with pytest.raises(TaskError):
        load_task(TaskConfig(), partition, num_partitions)


def test_digits_are_scikit_learns_own_read_without_importing_it() -> None:
    """The digits come from scikit-learn's data file, read directly (importing scikit-learn
    takes seconds per worker process): the very arrays ``load_digits`` returns."""
    from sklearn.datasets import load_digits

    from hfl_mqtt.tasks.datasets import load_digits_split

    x, y = load_digits(return_X_y=True)
    split = load_digits_split(0.2, seed=3)
    features = np.concatenate([split.x_train, split.x_test])
    labels = np.concatenate([split.y_train, split.y_test])
    assert features.shape == (1797, 64)
    expected = sorted(map(tuple, np.column_stack([x / 16.0, y]).tolist()))
    got = sorted(map(tuple, np.column_stack([features.astype(np.float64), labels]).tolist()))
    assert np.allclose(np.array(got), np.array(expected), atol=1e-6)
