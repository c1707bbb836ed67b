"""Federated averaging: the example-weighted mean of the children's deltas."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from hfl_mqtt.aggregation.base import Model, Update

__all__ = ["FedAvg", "weighted_mean"]


def weighted_mean(arrays: Sequence[Mapping[str, np.ndarray]], weights: Sequence[float]) -> Model:
    """``sum(w_i * a_i) / sum(w_i)`` per tensor; equal weights if they sum to zero.

    Accumulates in float64 and returns each tensor in the dtype of the first input.
    """
    if not arrays:
        raise ValueError("weighted_mean of no arrays")
    if len(weights) != len(arrays):
        raise ValueError(f"{len(weights)} weights for {len(arrays)} arrays")
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


class FedAvg:
    """``x <- x + lr * weighted_mean(deltas, num_examples)`` (FedAvg with a server step size)."""

    def __init__(self, server_lr: float = 1.0) -> None:
        if server_lr <= 0:
            raise ValueError("server_lr must be > 0")
        self.server_lr = server_lr

    def aggregate(self, model: Mapping[str, np.ndarray], updates: Sequence[Update]) -> Model:
        if not updates:
            return {k: v.copy() for k, v in model.items()}
        step = weighted_mean([u.delta for u in updates], [u.num_examples for u in updates])
        return {
            k: (v + self.server_lr * step[k]).astype(v.dtype, copy=False) for k, v in model.items()
        }
