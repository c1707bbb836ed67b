"""Robust aggregation: rules a minority of poisoned children cannot drag far.

==================  ===================================================  =====================
rule                the round's step                                     holds while poisoned
==================  ===================================================  =====================
``median``          the coordinate-wise median of the deltas             < half the children
``trimmed_mean``    per coordinate, the mean once the ``trim`` share     <= ``trim`` of them
                    of highest and of lowest values is dropped
``clipped_mean``    the mean of the deltas, each scaled down to norm     any share, each one's
                    at most ``clip_norm`` (None: the round's median      pull bounded by the
                    norm)                                                norm
==================  ===================================================  =====================

Every child counts the same: an example count is the child's own claim, and a poisoner could
claim a million. Before the rule, a round's deltas are screened: one much farther from the
coordinate-wise median than the others are (``reject_factor`` times the median distance) is set
aside as an outlier, for the aggregator to refuse and log, and the rule runs on the rest. A
poisoner that sends a large delta loses its vote instead of merely being outvoted; one that
stays close to the others is left to the rule. The math is in free functions;
``RobustAggregation`` is the round strategy.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Annotated, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from hfl_mqtt.aggregation.base import Model, Update

__all__ = [
    "RobustAggregation",
    "RobustRule",
    "clip_to_norm",
    "coordinate_median",
    "l2_norm",
    "outliers",
    "trimmed_mean",
]


def l2_norm(delta: Mapping[str, np.ndarray]) -> float:
    """The Euclidean norm of all of a delta's tensors taken as one vector."""
    return math.sqrt(sum(float(np.dot(v.ravel(), v.ravel())) for v in delta.values()))


def clip_to_norm(delta: Mapping[str, np.ndarray], max_norm: float) -> Model:
    """``delta`` scaled down to norm ``max_norm`` if it is longer (a copy either way)."""
    norm = l2_norm(delta)
    scale = 1.0 if norm <= max_norm else max_norm / norm
    return {k: (v * scale).astype(v.dtype, copy=False) for k, v in delta.items()}


def _stacked(deltas: Sequence[Mapping[str, np.ndarray]], name: str) -> np.ndarray:
    return np.stack([np.asarray(d[name], np.float64) for d in deltas])


def coordinate_median(deltas: Sequence[Mapping[str, np.ndarray]]) -> Model:
    """The median of each coordinate across ``deltas`` (the mean of the middle two for an
    even count), in the first delta's dtypes."""
    if not deltas:
        raise ValueError("coordinate_median of no deltas")
    return {
        name: np.median(_stacked(deltas, name), axis=0).astype(first.dtype)
        for name, first in deltas[0].items()
    }


def outliers(deltas: Sequence[Mapping[str, np.ndarray]], factor: float) -> dict[int, float]:
    """Indexes of the deltas farther than ``factor`` times the median distance from the
    coordinate-wise median, each with its distance over that median distance."""
    if len(deltas) < 3:
        return {}  # with two, neither is the odd one out
    center = coordinate_median(deltas)
    distances = [
        l2_norm({k: np.asarray(v, np.float64) - center[k] for k, v in d.items()}) for d in deltas
    ]
    typical = float(np.median(distances))
    if typical <= 0:
        return {i: math.inf for i, d in enumerate(distances) if d > 0}
    return {i: d / typical for i, d in enumerate(distances) if d > factor * typical}


def trimmed_count(count: int, trim: float) -> int:
    """How many values ``trim`` drops at each end of ``count`` (always leaving one)."""
    return min(math.floor(trim * count + 1e-9), (count - 1) // 2)


def trimmed_mean(deltas: Sequence[Mapping[str, np.ndarray]], trim: float) -> Model:
    """Per coordinate, the mean of ``deltas`` without the ``trim`` share of highest and of
    lowest values (``trim`` 0: the plain mean)."""
    if not deltas:
        raise ValueError("trimmed_mean of no deltas")
    if not 0 <= trim < 0.5:
        raise ValueError(f"trim must be in [0, 0.5), got {trim}")
    cut = trimmed_count(len(deltas), trim)
    result: Model = {}
    for name, first in deltas[0].items():
        values = np.sort(_stacked(deltas, name), axis=0)
        result[name] = values[cut : len(deltas) - cut].mean(axis=0).astype(first.dtype)
    return result


class RobustRule(BaseModel):
    """Which robust rule an aggregator uses, with its parameter."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    rule: Literal["median", "trimmed_mean", "clipped_mean"]
    trim: Annotated[float, Field(ge=0, lt=0.5)] = 0.2
    """``trimmed_mean``: the share of values dropped at each end of every coordinate."""
    clip_norm: Annotated[float, Field(gt=0, allow_inf_nan=False)] | None = None
    """``clipped_mean``: the norm each delta is clipped to; None: the round's median norm."""
    reject_factor: Annotated[float, Field(gt=1, allow_inf_nan=False)] | None = 4.0
    """A delta farther from the round's coordinate-wise median than this many times the median
    distance is refused as an outlier before the rule runs; None: no screening."""


class RobustAggregation:
    """A round strategy: ``x <- x + lr * rule(deltas)``, the outliers set aside first. After
    each round ``outliers`` maps the children set aside to how far off they were (their distance
    over the median distance), for the aggregator to refuse and log."""

    def __init__(self, rule: RobustRule, server_lr: float = 1.0) -> None:
        if not (math.isfinite(server_lr) and server_lr > 0):
            raise ValueError(f"server_lr must be finite and > 0, got {server_lr}")
        self.rule = rule
        self.server_lr = server_lr
        self.outliers: dict[str, float] = {}

    def aggregate(self, model: Mapping[str, np.ndarray], updates: Sequence[Update]) -> Model:
        self.outliers = {}
        if not updates:
            return {k: v.copy() for k, v in model.items()}
        deltas = [u.delta for u in updates]
        if self.rule.reject_factor is not None:
            odd = outliers(deltas, self.rule.reject_factor)
            self.outliers = {updates[i].sender: ratio for i, ratio in odd.items()}
            deltas = [d for i, d in enumerate(deltas) if i not in odd]
        match self.rule.rule:
            case "median":
                step = coordinate_median(deltas)
            case "trimmed_mean":
                step = trimmed_mean(deltas, self.rule.trim)
            case "clipped_mean":
                typical = float(np.median([l2_norm(d) for d in deltas]))
                bound = self.rule.clip_norm if self.rule.clip_norm is not None else typical
                step = trimmed_mean([clip_to_norm(d, bound) for d in deltas], 0.0)
        return {
            k: (v + self.server_lr * step[k]).astype(v.dtype, copy=False) for k, v in model.items()
        }
