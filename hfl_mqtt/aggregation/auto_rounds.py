"""Deadline-aware intra-level rounds (``rounds: auto``): how many rounds a synchronous
aggregator runs with its children before it reports up, chosen from what it measures.

The rule and its derivation are in docs/auto-rounds.md. In short, for a level whose children's
updates come through a quantizer of variance bound ``q``, a round taking ``r`` seconds, a report
up and the parent's next model taking ``u`` seconds, and ``D`` seconds left before the run's
deadline, the level runs the ``tau`` in ``1..max_rounds`` that maximises::

    progress(tau) = floor(D / (tau * r + u)) * tau * (1 - kappa * S(tau))
    S(tau)        = tau * (tau - 1) / 2 + q * tau
    kappa         = 1 / S(max_rounds)

the reports that fit before the deadline, times the rounds each carries, times what is left of
the learning-rate condition's margin once this level's drift and quantization terms take their
share (QMLHFL, arXiv 2505.08145). Pure: the aggregator feeds it measurements.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

from hfl_mqtt.codec.spec import CodecSpec, parse_spec

__all__ = ["AutoRounds", "RoundsChooser", "choose_rounds", "quantizer_variance"]


class AutoRounds(BaseModel):
    """``rounds: auto``: the run's deadline and the bound of the choice."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    deadline_s: Annotated[float, Field(gt=0, allow_inf_nan=False)] | None = None
    """Seconds from the start to the run's deadline; None: the root's ``max_seconds`` (set by
    the federation)."""
    max_rounds: Annotated[int, Field(ge=1, le=1000)] = 16
    """The drift horizon: the rounds at which this level's drift and quantization terms use up
    the learning-rate condition's margin (and the most it ever runs)."""
    smoothing: Annotated[float, Field(gt=0, le=1)] = 0.5
    """The weight of the newest measurement in the running averages."""


def quantizer_variance(spec: str | CodecSpec) -> float:
    """A bound ``q`` on ``E||Q(x) - x||^2 / ||x||^2`` for a codec: 0 for lossless and float16
    casts; ``min(B / s^2, sqrt(B) / s)`` for stochastic ``b``-bit quantization in blocks of
    ``B`` (``s = 2^b - 1`` levels; QSGD's bound per block); ``d / k - 1`` for keeping ``k`` of
    ``d`` values (the variance of random-k, an upper bound for top-k with error feedback).
    """
    codec = parse_spec(spec)
    q = 0.0
    if codec.values == "quant" and codec.bits is not None:
        levels = 2**codec.bits - 1
        block = codec.block_size
        q = min(block / levels**2, math.sqrt(block) / levels)
    if codec.topk_fraction is not None:
        q = (1 + q) / codec.topk_fraction - 1
    return q


def _drift(tau: int, q: float) -> float:
    return tau * (tau - 1) / 2 + q * tau


def choose_rounds(
    round_s: float, up_s: float, remaining_s: float, q: float, max_rounds: int
) -> int:
    """The ``tau`` that maximises ``progress`` (module docstring); 1 if no report fits."""
    kappa = 1.0 / max(_drift(max_rounds, q), 1e-12)
    best, best_progress = 1, 0.0
    for tau in range(1, max_rounds + 1):
        reports = math.floor(remaining_s / (tau * max(round_s, 1e-9) + max(up_s, 0.0)))
        progress = reports * tau * max(0.0, 1 - kappa * _drift(tau, q))
        if progress > best_progress:
            best, best_progress = tau, progress
    return best


class RoundsChooser:
    """One aggregator's running measurements and its choice for the next cycle."""

    def __init__(self, settings: AutoRounds) -> None:
        self.settings = settings
        self.round_s: float | None = None
        self.up_s: float | None = None
        self.q = 0.0
        self.chosen: list[int] = []

    def _smoothed(self, old: float | None, new: float) -> float:
        weight = self.settings.smoothing
        return new if old is None else (1 - weight) * old + weight * new

    def round_took(self, seconds: float) -> None:
        self.round_s = self._smoothed(self.round_s, seconds)

    def up_took(self, seconds: float) -> None:
        self.up_s = self._smoothed(self.up_s, seconds)

    def children_codec(self, spec: str) -> None:
        """The codec the children's updates came in (their header's ``codec``)."""
        self.q = quantizer_variance(spec)

    def rounds(self, remaining_s: float) -> int:
        """The rounds of the next cycle: 1 while nothing is measured (the first cycle measures
        a round); then ``choose_rounds`` (a round trip up not yet seen counts as a round)."""
        if self.round_s is None:
            tau = 1
        else:
            up = self.up_s if self.up_s is not None else self.round_s
            tau = choose_rounds(self.round_s, up, remaining_s, self.q, self.settings.max_rounds)
        self.chosen.append(tau)
        return tau

    def state(self) -> dict[str, Any]:
        return {"round_s": self.round_s, "up_s": self.up_s, "q": self.q, "chosen": self.chosen}

    def load(self, values: Mapping[str, Any]) -> None:
        self.round_s = values["round_s"]
        self.up_s = values["up_s"]
        self.q = float(values["q"])
        self.chosen = [int(t) for t in values["chosen"]]
