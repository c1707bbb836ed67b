"""Federated averaging: the example-weighted mean of the children's deltas."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from hfl_mqtt.aggregation.base import Model, Update

__all__ = ["FedAvg", "weighted_mean"]


def weighted_mean(arrays: Sequence[Mapping[str, np.ndarray]], weights: Sequence[float]) -> Model:
    """``sum(w_i * a_i) / sum(w_i)`` per tensor; equal weights if they sum to zero.

    Accumulates in float64 and returns each tensor in the dtype of the first input. Every input
    must have the names and shapes of the first (numpy would otherwise broadcast silently).
    """
    if not arrays:
        raise ValueError("weighted_mean of no arrays")
    if len(weights) != len(arrays):
        raise ValueError(f"{len(weights)} weights for {len(arrays)} arrays")
    for index, item in enumerate(arrays[1:], start=1):
        _check_fits(item, arrays[0], f"arrays[{index}]", "arrays[0]")
    w = np.asarray(weights, dtype=np.float64)
    if (w < 0).any() or not np.isfinite(w).all():
        raise ValueError("weights must be finite and non-negative")
    total = float(w.sum())
    w = w / total if total > 0 else np.full(len(arrays), 1.0 / len(arrays))
    result: Model = {}
    for name, first in arrays[0].items():
        acc = np.zeros(first.shape, np.float64)
        for weight, item in zip(w, arrays, strict=True):
            acc += weight * item[name]
        result[name] = acc.astype(first.dtype)
    return result


def _check_fits(
    item: Mapping[str, np.ndarray], like: Mapping[str, np.ndarray], what: str, of: str
) -> None:
    if item.keys() != like.keys() or any(np.shape(item[k]) != np.shape(v) for k, v in like.items()):
        raise ValueError(f"{what} does not have the names and shapes of {of}")


class FedAvg:
    """``x <- x + lr * weighted_mean(deltas, num_examples)`` (FedAvg with a server step size).

    Use it whole (``aggregate``) or streaming (``start``, ``add`` per update, ``finish``): the
    streaming form folds each delta into a running weighted mean while it is still in the CPU
    cache and keeps no delta, which is what lets an edge take a thousand 100k-parameter deltas
    a second. The running mean has the model's float dtype (float32 for a float32 model): mixing
    float32 into float64 costs numpy twice the time, the rounding (~1e-7 relative) is far below
    any lossy codec's error, and a mean, unlike a sum, cannot overflow.
    """

    def __init__(self, server_lr: float = 1.0) -> None:
        if not (math.isfinite(server_lr) and server_lr > 0):
            raise ValueError(f"server_lr must be finite and > 0, got {server_lr}")
        self.server_lr = server_lr
        self._base: Mapping[str, np.ndarray] = {}
        self._mean: dict[str, np.ndarray] = {}
        self._scratch: dict[str, np.ndarray] = {}
        self._weight = 0.0
        self._unweighted = 0

    def aggregate(self, model: Mapping[str, np.ndarray], updates: Sequence[Update]) -> Model:
        if not updates:
            return {k: v.copy() for k, v in model.items()}
        step = weighted_mean([u.delta for u in updates], [u.num_examples for u in updates])
        _check_fits(step, model, "the deltas", "the model")
        return {
            k: (v + self.server_lr * step[k]).astype(v.dtype, copy=False) for k, v in model.items()
        }

    def start(self, model: Mapping[str, np.ndarray]) -> None:
        """Begin a round on ``model``."""
        self._base = model
        dtypes = {k: np.result_type(v.dtype, np.float32) for k, v in model.items()}
        self._mean = {k: np.zeros(v.shape, dtypes[k]) for k, v in model.items()}
        self._scratch = {k: np.empty(v.shape, dtypes[k]) for k, v in model.items()}
        self._weight = 0.0
        self._unweighted = 0

    def add(self, update: Update) -> None:
        """Fold in one update of the round."""
        _check_fits(update.delta, self._base, "the delta", "the model")
        weight = float(update.num_examples)
        if weight < 0 or not math.isfinite(weight):
            raise ValueError("weights must be finite and non-negative")
        if weight > 0:
            if self._weight == 0:
                self._mean = {k: np.zeros_like(v) for k, v in self._mean.items()}
            self._weight += weight
            share = weight / self._weight
        elif self._weight == 0:
            # Until some update has a weight, all count equally (as in weighted_mean).
            self._unweighted += 1
            share = 1.0 / self._unweighted
        else:
            return  # a zero weight beside positive ones changes nothing
        for name, mean in self._mean.items():
            scratch = self._scratch[name]
            np.subtract(update.delta[name], mean, out=scratch)
            scratch *= share
            np.add(mean, scratch, out=mean)

    def finish(self) -> Model:
        """The round's new model."""
        return {
            k: (v + self.server_lr * self._mean[k]).astype(v.dtype, copy=False)
            for k, v in self._base.items()
        }
