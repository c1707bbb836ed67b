"""Staleness weights: how much an update computed ``staleness`` versions ago still counts.

``staleness`` is the aggregator's version when the update arrives minus the version the update
was computed against (0 for a fresh one). Every function gives 1 at staleness 0 and decreases:

==============  ==========================================  ====================================
function        s(t)                                        from
==============  ==========================================  ====================================
``constant``    1                                           FedAsync
``polynomial``  (t + 1) ** -a                               FedAsync
``hinge``       1 if t <= b else 1 / (a (t - b) + 1)        FedAsync
``fedbuff``     1 / sqrt(1 + t)                             FedBuff
``flare``       1 / (1 + sqrt(t))                           NVIDIA FLARE's FedBuff
==============  ==========================================  ====================================
"""

from __future__ import annotations

import math
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["StalenessFunction"]

NonNegative = Annotated[float, Field(ge=0, allow_inf_nan=False)]


class StalenessFunction(BaseModel):
    """A staleness weight, chosen by name, with its parameters (``a``, ``b``) where it has any."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    function: Literal["constant", "polynomial", "hinge", "fedbuff", "flare"] = "polynomial"
    a: NonNegative = 0.5
    """The decay of ``polynomial`` and ``hinge``."""
    b: NonNegative = 4.0
    """How stale an update may be before ``hinge`` starts to discount it."""

    def __call__(self, staleness: int) -> float:
        if staleness < 0:
            raise ValueError(f"staleness must be >= 0, got {staleness}")
        t = float(staleness)
        match self.function:
            case "constant":
                return 1.0
            case "polynomial":
                return float((t + 1.0) ** -self.a)
            case "hinge":
                return 1.0 if t <= self.b else 1.0 / (self.a * (t - self.b) + 1.0)
            case "fedbuff":
                return 1.0 / math.sqrt(1.0 + t)
            case "flare":
                return 1.0 / (1.0 + math.sqrt(t))
