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
    streaming form folds each delta into a float64 sum while it is still in the CPU cache and
    keeps no delta, which is what lets an edge take a thousand 100k-parameter deltas a second.
    """

    def __init__(self, server_lr: float = 1.0) -> None:
        if not (math.isfinite(server_lr) and server_lr > 0):
            raise ValueError(f"server_lr must be finite and > 0, got {server_lr}")
        self.server_lr = server_lr
        self._base: Mapping[str, np.ndarray] = {}
        self._weighted: dict[str, np.ndarray] = {}
        self._plain: dict[str, np.ndarray] = {}
        self._weight = 0.0
        self._count = 0

    def start(self, model: Mapping[str, np.ndarray]) -> None:
        """Begin a round on ``model``."""
        self._base = model
        self._weighted = {k: np.zeros(v.shape, np.float64) for k, v in model.items()}
        self._plain = {}
        self._weight = 0.0
        self._count = 0

    def add(self, update: Update) -> None:
        """Fold in one update of the round."""
        _check_fits(update.delta, self._base, "the delta", "the model")
        weight = float(update.num_examples)
        if weight < 0 or not math.isfinite(weight):
            raise ValueError("weights must be finite and non-negative")
        if weight > 0:
            scale = np.float64(weight)
            for name, acc in self._weighted.items():
                np.add(acc, update.delta[name] * scale, out=acc)
        elif self._weight == 0:
            # Needed only if every weight of the round is zero (then all count equally).
            for name, base in self._base.items():
                plain = self._plain.setdefault(name, np.zeros(base.shape, np.float64))
                plain += update.delta[name]
        self._weight += weight
        self._count += 1

    def finish(self) -> Model:
        """The round's new model."""
        if self._count == 0:
            return {k: v.copy() for k, v in self._base.items()}
        if self._weight > 0:
            step = {k: acc / self._weight for k, acc in self._weighted.items()}
        else:
            step = {k: acc / self._count for k, acc in self._plain.items()}
        return {
            k: (v + self.server_lr * step[k]).astype(v.dtype, copy=False)
            for k, v in self._base.items()
        }

    def aggregate(self, model: Mapping[str, np.ndarray], updates: Sequence[Update]) -> Model:
        if not updates:
            return {k: v.copy() for k, v in model.items()}
        step = weighted_mean([u.delta for u in updates], [u.num_examples for u in updates])
        _check_fits(step, model, "the deltas", "the model")
        return {
            k: (v + self.server_lr * step[k]).astype(v.dtype, copy=False) for k, v in model.items()
        }
