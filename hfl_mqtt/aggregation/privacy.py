"""Differential privacy for the deltas: central (at an aggregator) and local (on a worker).

Central (DP-FedAvg, McMahan et al. 2018): each child's delta is clipped to norm ``C``, the
clipped deltas are summed, Gaussian noise of standard deviation ``z * C`` is added to the sum,
and the sum is divided by the number of children in the round. Every child counts the same
(an example count would let one child's share, so its sensitivity, grow without bound); the
number of children in a round is treated as public, as in DP-FedAvg with fixed-size rounds.
What leaves the aggregator (its model, its report up) is then differentially private with
respect to any one child's whole contribution.

Adaptive clipping (Andrew et al. 2021) moves ``C`` toward the ``target_quantile`` of the
children's delta norms: each round the share of deltas no longer than ``C`` is counted, with
noise of its own (``count_noise``), and ``C <- C * exp(-clip_lr * (share - target_quantile))``.
The delta sum's noise is raised so that both releases together cost what one Gaussian release
of noise multiplier ``z`` costs: ``z_sum = (z**-2 - (2 * count_noise)**-2) ** -0.5``.

Local: a worker clips its own delta to ``C`` and adds the noise before it leaves the device,
so an untrusted parent sees only noised deltas.

The accounting (epsilon at a given delta) is in ``hfl_mqtt.accounting``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Annotated, Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from hfl_mqtt.aggregation.base import Model, Update
from hfl_mqtt.aggregation.robust import clip_to_norm, l2_norm

__all__ = ["CentralPrivacy", "LocalPrivacy", "PrivateMean", "add_noise", "privatize"]

Positive = Annotated[float, Field(gt=0, allow_inf_nan=False)]
NonNegative = Annotated[float, Field(ge=0, allow_inf_nan=False)]
DeltaProbability = Annotated[float, Field(gt=0, lt=1)]


class _PrivacyBase(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    clip_norm: Positive
    """``C``: each delta is clipped to this L2 norm (the first round's, with adaptive clipping)."""
    noise_multiplier: NonNegative
    """``z``: the noise's standard deviation is ``z * C`` (0: clipping only, no privacy)."""
    delta: DeltaProbability = 1e-5
    """The delta at which epsilon is reported."""
    seed: Annotated[int, Field(ge=0)] | None = None
    """Seeds the noise (for repeatable experiments only); None: fresh entropy."""


class CentralPrivacy(_PrivacyBase):
    """Central DP at an aggregator (``privacy`` of a level or of a node's downstream)."""

    target_quantile: Annotated[float, Field(gt=0, lt=1)] | None = None
    """Adaptive clipping: the quantile of the children's delta norms ``C`` moves toward (0.5:
    the median); None: ``C`` stays ``clip_norm``."""
    clip_lr: Positive = 0.2
    """Adaptive clipping: how fast ``C`` moves (the geometric step)."""
    count_noise: Positive | None = None
    """Adaptive clipping: the noise on the count of unclipped deltas; None: the larger of
    children / 20 (the paper's choice) and ``noise_multiplier``."""

    def count_noise_for(self, children: int) -> float:
        """The count's noise with ``children`` children (0 without adaptive clipping)."""
        if self.target_quantile is None or self.noise_multiplier == 0:
            return 0.0
        return self.count_noise or max(children / 20, self.noise_multiplier)

    def budget_problem(self, children: int) -> str | None:
        """Why these settings leave the delta sum no privacy budget, if they do."""
        sigma = self.count_noise_for(children)
        if sigma and 2 * sigma <= self.noise_multiplier:
            return (
                f"count_noise {sigma:g} must exceed noise_multiplier / 2 "
                f"({self.noise_multiplier / 2:g}): the count's noise takes a share of the budget"
            )
        return None


class LocalPrivacy(_PrivacyBase):
    """Local DP on a worker (``local_privacy`` of the workers' level or of a worker's
    upstream): its delta is clipped and noised before it is encoded."""


def add_noise(values: Mapping[str, np.ndarray], std: float, rng: np.random.Generator) -> Model:
    """``values`` plus independent Gaussian noise of standard deviation ``std`` on every
    coordinate (drawn in float64, returned in each tensor's dtype)."""
    return {
        k: (v + rng.normal(0.0, std, v.shape)).astype(v.dtype, copy=False) if std > 0 else v.copy()
        for k, v in values.items()
    }


def privatize(
    delta: Mapping[str, np.ndarray], settings: LocalPrivacy, rng: np.random.Generator
) -> Model:
    """A worker's delta, clipped to ``clip_norm`` and noised: what local DP sends."""
    clipped = clip_to_norm(delta, settings.clip_norm)
    return add_noise(clipped, settings.noise_multiplier * settings.clip_norm, rng)


class PrivateMean:
    """The central-DP round strategy: ``x <- x + lr * (sum(clip(d_i)) + noise) / m``.

    ``clip_norm`` is the bound in force for the next round (it moves with adaptive clipping);
    ``rounds`` counts the noised releases, for the accountant.
    """

    def __init__(self, settings: CentralPrivacy, children: int, server_lr: float = 1.0) -> None:
        if not (math.isfinite(server_lr) and server_lr > 0):
            raise ValueError(f"server_lr must be finite and > 0, got {server_lr}")
        self.settings = settings
        self.server_lr = server_lr
        self.clip_norm = settings.clip_norm
        self.rounds = 0
        z = settings.noise_multiplier
        self.count_noise = settings.count_noise_for(children)
        self.sum_noise_multiplier = z
        if self.count_noise:
            problem = settings.budget_problem(children)
            if problem is not None:
                raise ValueError(f"privacy.{problem}")
            self.sum_noise_multiplier = (z**-2 - (2 * self.count_noise) ** -2) ** -0.5
        self._rng = np.random.default_rng(settings.seed)

    def aggregate(self, model: Mapping[str, np.ndarray], updates: Sequence[Update]) -> Model:
        if not updates:
            return {k: v.copy() for k, v in model.items()}
        bound = self.clip_norm
        total: dict[str, np.ndarray] = {k: np.zeros(v.shape, np.float64) for k, v in model.items()}
        unclipped = 0
        for update in updates:
            norm = l2_norm(update.delta)
            unclipped += norm <= bound
            scale = 1.0 if norm <= bound else bound / norm
            for name, value in update.delta.items():
                total[name] += scale * np.asarray(value, np.float64)
        noised = add_noise(total, self.sum_noise_multiplier * bound, self._rng)
        count = len(updates)
        self.rounds += 1
        quantile = self.settings.target_quantile
        if quantile is not None:
            # Centred bits (+-1/2) halve the count's sensitivity: its noise multiplier is 2 * sigma.
            centred = unclipped - count / 2 + self._rng.normal(0.0, self.count_noise)
            share = centred / count + 0.5
            self.clip_norm = bound * math.exp(-self.settings.clip_lr * (share - quantile))
        return {
            k: (v + self.server_lr * noised[k] / count).astype(v.dtype, copy=False)
            for k, v in model.items()
        }

    def state(self) -> tuple[dict[str, Any], dict[str, Model]]:
        """The clip bound, the releases so far and the noise generator's state."""
        values = {
            "clip_norm": self.clip_norm,
            "rounds": self.rounds,
            "rng": self._rng.bit_generator.state,
        }
        return values, {}

    def load(self, values: Mapping[str, Any], models: Mapping[str, Model]) -> None:
        self.clip_norm = float(values["clip_norm"])
        self.rounds = int(values["rounds"])
        self._rng.bit_generator.state = dict(values["rng"])
