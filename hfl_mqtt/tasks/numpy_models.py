"""Numpy-only models for boards without torch: softmax regression and ReLU MLPs.

A model is a stack of fully connected layers ``fc1, fc2, ...`` (ReLU between them, none after
the last), trained by mini-batch SGD on the mean cross-entropy with hand-written, vectorised
gradients. Weights are named and shaped like a torch state dict (``fc1.weight`` is (out, in)),
and initialised like ``torch.nn.Linear`` (uniform in +-1/sqrt(in)), so a numpy MLP and the torch
MLP of ``torch_models`` exchange weights and compute the same function.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Mapping, Sequence
from typing import NamedTuple

import numpy as np
import numpy.typing as npt

from hfl_mqtt.tasks.base import (
    EvalResult,
    TaskError,
    TrainConfig,
    TrainResult,
    check_weights,
    train_result,
)

__all__ = [
    "LossAndGrads",
    "NumpyTask",
    "batch_indices",
    "cross_entropy",
    "forward",
    "init_params",
    "loss_and_grads",
]

FloatArray = npt.NDArray[np.floating]
Params = dict[str, FloatArray]

# Evaluation runs in chunks of this many rows, to bound memory on small boards.
EVAL_CHUNK = 4096


def init_params(layer_sizes: Sequence[int], seed: int) -> dict[str, npt.NDArray[np.float32]]:
    """float32 weights ``fc{i}.weight`` (out, in) and ``fc{i}.bias`` for the given layer widths
    (input first, classes last), uniform in +-1/sqrt(fan_in) like ``torch.nn.Linear``."""
    if len(layer_sizes) < 2 or min(layer_sizes) < 1:
        raise TaskError(f"need at least an input and an output width >= 1, got {layer_sizes}")
    rng = np.random.default_rng(seed)
    params: dict[str, npt.NDArray[np.float32]] = {}
    for i, (fan_in, fan_out) in enumerate(itertools.pairwise(layer_sizes)):
        bound = 1.0 / np.sqrt(fan_in)
        params[f"fc{i + 1}.weight"] = rng.uniform(-bound, bound, (fan_out, fan_in)).astype(
            np.float32
        )
        params[f"fc{i + 1}.bias"] = rng.uniform(-bound, bound, fan_out).astype(np.float32)
    return params


def _num_layers(params: Mapping[str, FloatArray]) -> int:
    return len(params) // 2


def forward(params: Mapping[str, FloatArray], x: FloatArray) -> FloatArray:
    """Logits of a batch ``x`` (rows are examples)."""
    a = x
    layers = _num_layers(params)
    for i in range(1, layers + 1):
        a = a @ params[f"fc{i}.weight"].T + params[f"fc{i}.bias"]
        if i < layers:
            a = np.maximum(a, 0)
    return a


def cross_entropy(logits: FloatArray, y: npt.NDArray[np.integer]) -> tuple[FloatArray, FloatArray]:
    """Per-example cross-entropy and softmax probabilities, computed stably."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_norm = np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    log_probs = shifted - log_norm
    losses = -log_probs[np.arange(y.size), y]
    return losses, np.exp(log_probs)


class LossAndGrads(NamedTuple):
    """The objective on one batch, its gradient by name, the mean cross-entropy, the logits."""

    loss: float
    grads: Params
    cross_entropy: float
    logits: FloatArray


def loss_and_grads(
    params: Mapping[str, FloatArray],
    x: FloatArray,
    y: npt.NDArray[np.integer],
    *,
    proximal_mu: float = 0.0,
    reference: Mapping[str, FloatArray] | None = None,
) -> LossAndGrads:
    """Mean cross-entropy plus, if ``proximal_mu``, ``mu/2 * ||w - reference||^2``, and its
    gradient. Works in the dtype of ``params`` and ``x`` (float64 for gradient checks)."""
    layers = _num_layers(params)
    activations = [x]
    for i in range(1, layers + 1):
        z = activations[-1] @ params[f"fc{i}.weight"].T + params[f"fc{i}.bias"]
        activations.append(np.maximum(z, 0) if i < layers else z)
    logits = activations[-1]
    losses, probs = cross_entropy(logits, y)
    data_loss = float(losses.mean())
    loss = data_loss

    delta = probs
    delta[np.arange(y.size), y] -= 1
    delta /= y.size
    grads: Params = {}
    for i in range(layers, 0, -1):
        a_prev = activations[i - 1]
        grads[f"fc{i}.weight"] = delta.T @ a_prev
        grads[f"fc{i}.bias"] = delta.sum(axis=0)
        if i > 1:
            # a_prev = relu(z_prev): the ReLU passes gradient exactly where a_prev > 0.
            delta = (delta @ params[f"fc{i}.weight"]) * (a_prev > 0)

    if proximal_mu:
        if reference is None:
            raise TaskError("the proximal term needs reference weights")
        for name, w in params.items():
            diff = w - reference[name]
            loss += 0.5 * proximal_mu * float(np.sum(diff * diff))
            grads[name] = grads[name] + proximal_mu * diff
    return LossAndGrads(loss, grads, data_loss, logits)


def batch_indices(
    num_examples: int, config: TrainConfig, rng: np.random.Generator
) -> Iterator[npt.NDArray[np.int64]]:
    """Mini-batches of indices: a fresh shuffle per epoch, stopping after ``max_steps``."""
    steps = 0
    for _ in range(config.epochs):
        order = rng.permutation(num_examples)
        for start in range(0, num_examples, config.batch_size):
            if config.max_steps is not None and steps >= config.max_steps:
                return
            yield order[start : start + config.batch_size]
            steps += 1


def check_data(
    x: npt.ArrayLike, y: npt.ArrayLike, num_features: int, num_classes: int, what: str
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    """``x`` as C-contiguous float32 (rows, num_features) and ``y`` as int64 labels in range."""
    xa = np.ascontiguousarray(x, dtype=np.float32)
    ya = np.ascontiguousarray(y, dtype=np.int64)
    if xa.ndim != 2 or xa.shape[1] != num_features:
        raise TaskError(f"{what} features must have shape (n, {num_features}), got {xa.shape}")
    if ya.shape != (xa.shape[0],):
        raise TaskError(f"{what} labels must have shape ({xa.shape[0]},), got {ya.shape}")
    if ya.size == 0:
        raise TaskError(f"{what} data is empty")
    if ya.min() < 0 or ya.max() >= num_classes:
        raise TaskError(f"{what} labels must be in [0, {num_classes})")
    return xa, ya


class NumpyTask:
    """A ``Task``: a numpy softmax regression (``hidden=()``) or ReLU MLP on local data.

    ``init_seed`` fixes the initial weights (use the same on every node), ``shuffle_seed`` the
    batch order (different per worker).
    """

    def __init__(
        self,
        x_train: npt.ArrayLike,
        y_train: npt.ArrayLike,
        x_eval: npt.ArrayLike,
        y_eval: npt.ArrayLike,
        *,
        num_features: int,
        num_classes: int,
        hidden: Sequence[int] = (),
        init_seed: int = 0,
        shuffle_seed: int = 0,
    ) -> None:
        self._x, self._y = check_data(x_train, y_train, num_features, num_classes, "training")
        self._x_eval, self._y_eval = check_data(
            x_eval, y_eval, num_features, num_classes, "evaluation"
        )
        self._params = init_params([num_features, *hidden, num_classes], init_seed)
        self._rng = np.random.default_rng(shuffle_seed)

    @property
    def num_examples(self) -> int:
        return int(self._y.size)

    def get_weights(self) -> dict[str, np.ndarray]:
        return {name: w.copy() for name, w in self._params.items()}

    def set_weights(self, weights: Mapping[str, np.ndarray]) -> None:
        check_weights({name: w.shape for name, w in self._params.items()}, weights)
        self._params = {name: np.array(weights[name], dtype=np.float32) for name in self._params}

    def train(self, config: TrainConfig) -> TrainResult:
        params = self._params
        reference = {name: w.copy() for name, w in params.items()} if config.proximal_mu else None
        lr = np.float32(config.learning_rate)
        steps, loss_sum, correct, seen = 0, 0.0, 0, 0
        for idx in batch_indices(self.num_examples, config, self._rng):
            y = self._y[idx]
            out = loss_and_grads(
                params, self._x[idx], y, proximal_mu=config.proximal_mu, reference=reference
            )
            for name, g in out.grads.items():
                params[name] -= lr * g.astype(np.float32, copy=False)
            steps += 1
            loss_sum += out.cross_entropy
            correct += int(np.count_nonzero(out.logits.argmax(axis=1) == y))
            seen += y.size
        return train_result(self.num_examples, steps, loss_sum, correct, seen)

    def evaluate(self) -> EvalResult:
        loss_sum, correct = 0.0, 0
        for start in range(0, self._y_eval.size, EVAL_CHUNK):
            x = self._x_eval[start : start + EVAL_CHUNK]
            y = self._y_eval[start : start + EVAL_CHUNK]
            logits = forward(self._params, x)
            losses, _ = cross_entropy(logits, y)
            loss_sum += float(losses.sum(dtype=np.float64))
            correct += int(np.count_nonzero(logits.argmax(axis=1) == y))
        n = int(self._y_eval.size)
        return EvalResult(n, loss_sum / n, correct / n)
