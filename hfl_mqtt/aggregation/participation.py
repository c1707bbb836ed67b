"""Adaptive participation: which children a synchronous aggregator asks to train each round.

==============  ===========================================================================
policy          each round picks
==============  ===========================================================================
``all``         every child (the default)
``random``      ``fraction`` of the children, uniformly at random (seeded)
``loss``        the ``fraction`` with the highest recent training loss (power of choice)
``contribution`` the ``fraction`` whose recent deltas moved the model most (their norm)
``deadline``    every child not predicted to miss the round's deadline, from its recent
                response times
==============  ===========================================================================

Children never heard from come first (nothing is known of them), but those picked and never
heard from in time (stragglers) come last; ties go to the child picked longest ago. With
``every_rounds`` = k, a child left out for k - 1 rounds in a row is picked in the next whatever
the policy says: each takes part at least once every k rounds.
"Recent" is an exponential average (``smoothing``). Pure: the aggregator reports what it sees
and asks for a pick; nothing here does I/O.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

__all__ = ["Participation", "ParticipationConfig"]

DEADLINE_MARGIN = 0.9
"""``deadline``: a child whose expected response takes more than this share of the deadline is
predicted to miss it."""


class ParticipationConfig(BaseModel):
    """How a synchronous aggregator picks the children that train each round."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    policy: Literal["all", "random", "loss", "contribution", "deadline"] = "all"
    fraction: Annotated[float, Field(gt=0, le=1)] = 0.5
    """``random``, ``loss``, ``contribution``: the share of the children picked (at least 1)."""
    every_rounds: Annotated[int, Field(ge=1)] | None = None
    """Fairness: every child is picked at least once every this many rounds."""
    smoothing: Annotated[float, Field(gt=0, le=1)] = 0.5
    """The weight of the newest observation in the recent averages."""
    seed: Annotated[int, Field(ge=0)] = 0


def _smoothed(old: float | None, new: float, weight: float) -> float:
    return new if old is None else (1 - weight) * old + weight * new


class Participation:
    """The picks of one aggregator: what it learned of each child, and the rule."""

    def __init__(self, config: ParticipationConfig, children: Iterable[str]) -> None:
        self.config = config
        self.children = list(children)
        self.seconds: dict[str, float] = {}
        self.loss: dict[str, float] = {}
        self.contribution: dict[str, float] = {}
        self.last_picked: dict[str, int] = {}
        self._rng = np.random.default_rng(config.seed)

    def count(self, among: int) -> int:
        """How many of ``among`` children a fraction policy picks."""
        return max(1, math.ceil(self.config.fraction * among - 1e-9))

    def pick(self, round_no: int, deadline_s: float, offline: Iterable[str] = ()) -> list[str]:
        """The children to train in round ``round_no`` (children known offline are left out
        unless nobody else is left), in the children's order."""
        away = set(offline)
        candidates = [c for c in self.children if c not in away] or list(self.children)
        policy = self.config.policy
        if policy == "all":
            chosen = set(candidates)
        elif policy == "deadline":
            limit = DEADLINE_MARGIN * deadline_s
            chosen = {c for c in candidates if self.seconds.get(c, 0.0) <= limit}
        else:
            chosen = set(self._ranked(candidates, policy)[: self.count(len(candidates))])
        if self.config.every_rounds is not None:
            due = round_no - self.config.every_rounds  # left out since: k rounds without it
            chosen |= {c for c in candidates if self.last_picked.get(c, 0) <= due}
        if not chosen:  # every child predicted late (a slow start?): the predictions are off
            chosen = set(candidates)
        for child in chosen:
            self.last_picked[child] = round_no
        return [c for c in self.children if c in chosen]

    def _ranked(self, candidates: list[str], policy: str) -> list[str]:
        """Candidates best first: nothing known of them, then heard from (by the policy's
        score), then picked and never heard from in time; ties: picked longest ago first."""
        if policy == "random":
            order = self._rng.permutation(len(candidates))
            return [candidates[int(i)] for i in order]
        scores: Mapping[str, float] = self.loss if policy == "loss" else self.contribution

        def tier(child: str) -> int:
            if child in scores:
                return 1
            # Picked and never heard from: its updates came too late (a straggler).
            return 2 if child in self.last_picked else 0

        return sorted(
            candidates,
            key=lambda c: (tier(c), -scores.get(c, 0.0), self.last_picked.get(c, 0)),
        )

    def answered(
        self,
        child: str,
        seconds: float,
        loss: float | None = None,
        contribution: float | None = None,
    ) -> None:
        """``child`` answered ``seconds`` after the model went out, with its training loss and
        the norm of its delta where known."""
        weight = self.config.smoothing
        self.seconds[child] = _smoothed(self.seconds.get(child), seconds, weight)
        if loss is not None and math.isfinite(loss):
            self.loss[child] = _smoothed(self.loss.get(child), loss, weight)
        if contribution is not None and math.isfinite(contribution):
            self.contribution[child] = _smoothed(self.contribution.get(child), contribution, weight)

    def missed(self, child: str, deadline_s: float) -> None:
        """``child`` was picked and had not answered when the round closed at its deadline: it
        counts as taking at least the deadline."""
        weight = self.config.smoothing
        self.seconds[child] = _smoothed(self.seconds.get(child), deadline_s, weight)

    def state(self) -> dict[str, Any]:
        """What was learned, for a checkpoint."""
        return {
            "seconds": self.seconds,
            "loss": self.loss,
            "contribution": self.contribution,
            "last_picked": self.last_picked,
            "rng": self._rng.bit_generator.state,
        }

    def load(self, values: Mapping[str, Any]) -> None:
        self.seconds = {k: float(v) for k, v in values["seconds"].items()}
        self.loss = {k: float(v) for k, v in values["loss"].items()}
        self.contribution = {k: float(v) for k, v in values["contribution"].items()}
        self.last_picked = {k: int(v) for k, v in values["last_picked"].items()}
        self._rng.bit_generator.state = dict(values["rng"])
