"""FedBuff: buffer K updates, then apply their staleness-weighted mean with a server step size.

``x <- x + lr * sum_i(s(t_i) * n_i * delta_i) / sum_i(n_i)`` over the K buffered updates, with
``n_i`` the update's example count (or 1 each, as in the FedBuff paper, when not weighting by
examples) and ``t_i`` its staleness on arrival. A stale update is discounted, not renormalised
away: its share of the step shrinks. The sum runs in float64 over the buffer sorted by sender
and update id, so one full buffer gives the same step whatever order its updates arrived in.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from hfl_mqtt.aggregation.base import Model, Update
from hfl_mqtt.aggregation.staleness import StalenessFunction

__all__ = ["FedBuff"]


@dataclass(frozen=True, slots=True)
class _Buffered:
    update: Update
    weight: float


class FedBuff:
    """The FedBuff buffer and step."""

    def __init__(
        self,
        buffer_size: int,
        staleness: StalenessFunction,
        server_lr: float = 1.0,
        *,
        weight_by_examples: bool = True,
    ) -> None:
        if buffer_size < 1:
            raise ValueError(f"buffer_size must be >= 1, got {buffer_size}")
        if not (math.isfinite(server_lr) and server_lr > 0):
            raise ValueError(f"server_lr must be finite and > 0, got {server_lr}")
        self.buffer_size = buffer_size
        self.staleness = staleness
        self.server_lr = server_lr
        self.weight_by_examples = weight_by_examples
        self._buffer: list[_Buffered] = []
        self.step_scale = server_lr

    def __len__(self) -> int:
        return len(self._buffer)

    @property
    def full(self) -> bool:
        return len(self._buffer) >= self.buffer_size

    def weight(self, staleness: int) -> float:
        return self.staleness(staleness)

    def add(self, update: Update, staleness: int) -> float:
        """Buffer one update; returns the staleness weight it was given."""
        weight = self.weight(staleness)
        self._buffer.append(_Buffered(update, weight))
        return weight

    def step(self, model: Mapping[str, np.ndarray]) -> Model:
        """Apply the buffered updates to ``model`` and empty the buffer."""
        buffered = sorted(self._buffer, key=lambda b: (b.update.sender, b.update.update_id))
        self._buffer = []
        if not buffered:
            return {k: v.copy() for k, v in model.items()}
        counts = [
            float(b.update.num_examples) if self.weight_by_examples else 1.0 for b in buffered
        ]
        total = sum(counts)
        if total <= 0:  # no update reports any example: count them equally
            counts, total = [1.0] * len(buffered), float(len(buffered))
        result: Model = {}
        for name, value in model.items():
            acc = np.zeros(value.shape, np.float64)
            for item, count in zip(buffered, counts, strict=True):
                acc += (item.weight * count / total) * item.update.delta[name]
            result[name] = (value + self.server_lr * acc).astype(value.dtype, copy=False)
        return result

    # --- the shared asynchronous interface (``AsyncStrategy``) -----------------------------------

    def can_take(self, base_version: int) -> bool:
        return True

    def take(self, model: Mapping[str, np.ndarray], update: Update, staleness: int) -> Model | None:
        """Buffer the update; a step once the buffer is full."""
        self.add(update, staleness)
        return self.step(model) if self.full else None

    def versioned(self, version: int, model: Mapping[str, np.ndarray]) -> None:
        """Nothing to keep: buffered deltas do not depend on the versions."""

    def shift(self, by: Mapping[str, np.ndarray]) -> None:
        """Nothing to move: buffered deltas are differences, which a rebase keeps."""

    @property
    def pending(self) -> int:
        return len(self._buffer)

    def state(self) -> tuple[dict[str, Any], dict[str, Model]]:
        """The buffered updates: their header fields and weights, and their deltas."""
        values = {
            "buffer": [
                {
                    "sender": b.update.sender,
                    "base_version": b.update.base_version,
                    "num_examples": b.update.num_examples,
                    "update_id": b.update.update_id,
                    "weight": b.weight,
                }
                for b in self._buffer
            ]
        }
        return values, {f"b{i}": dict(b.update.delta) for i, b in enumerate(self._buffer)}

    def load(self, values: Mapping[str, Any], models: Mapping[str, Model]) -> None:
        self._buffer = [
            _Buffered(
                Update(
                    item["sender"],
                    int(item["base_version"]),
                    models[f"b{i}"],
                    int(item["num_examples"]),
                    item["update_id"],
                ),
                float(item["weight"]),
            )
            for i, item in enumerate(values["buffer"])
        ]
