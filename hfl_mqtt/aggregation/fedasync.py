"""FedAsync: fold each update into the model the moment it arrives, discounted by staleness.

``x <- (1 - a_t) x + a_t x_new`` with ``a_t = a * s(t - tau)``, where ``x_new`` is the child's
trained model: the model of version ``tau`` it started from plus its delta. So the strategy
keeps the models of the last ``max_staleness`` versions; an update whose base is older than
that is refused by the caller before it gets here.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import numpy as np

from hfl_mqtt.aggregation.base import Model, Update
from hfl_mqtt.aggregation.staleness import StalenessFunction

__all__ = ["FedAsync"]


class FedAsync:
    """The FedAsync step, with the model history it needs to rebuild ``x_new``."""

    def __init__(self, mixing: float, staleness: StalenessFunction, max_staleness: int) -> None:
        if not (math.isfinite(mixing) and 0 < mixing <= 1):
            raise ValueError(f"mixing must be in (0, 1], got {mixing}")
        if max_staleness < 0:
            raise ValueError(f"max_staleness must be >= 0, got {max_staleness}")
        self.mixing = mixing
        self.staleness = staleness
        self.max_staleness = max_staleness
        self._history: OrderedDict[int, Model] = OrderedDict()

    step_scale = 1.0

    def remember(self, version: int, model: Mapping[str, np.ndarray]) -> None:
        """Keep ``model`` as version ``version`` (versions only grow); forget the too old."""
        self._history[version] = {k: v.copy() for k, v in model.items()}
        while self._history and next(iter(self._history)) < version - self.max_staleness:
            self._history.popitem(last=False)

    def knows(self, version: int) -> bool:
        return version in self._history

    def shift(self, by: Mapping[str, np.ndarray]) -> None:
        """Move every remembered model by ``by`` (a rebase moves the whole frame: differences
        between versions, which is what a stale update is measured against, stay the same)."""
        for model in self._history.values():
            for name, value in model.items():
                np.add(value, by[name], out=value, casting="unsafe")

    def weight(self, staleness: int) -> float:
        """``a_t``: the share the new model gets."""
        return self.mixing * self.staleness(staleness)

    def step(
        self,
        model: Mapping[str, np.ndarray],
        base_version: int,
        delta: Mapping[str, np.ndarray],
        staleness: int,
    ) -> Model:
        """The next model after an update against ``base_version`` (which must be known)."""
        base = self._history[base_version]
        share = self.weight(staleness)
        return {
            name: ((1 - share) * value + share * (base[name] + delta[name])).astype(
                value.dtype, copy=False
            )
            for name, value in model.items()
        }

    # --- the shared asynchronous interface (``AsyncStrategy``) -----------------------------------

    def can_take(self, base_version: int) -> bool:
        return self.knows(base_version)

    def take(self, model: Mapping[str, np.ndarray], update: Update, staleness: int) -> Model:
        """Every update is a step."""
        return self.step(model, update.base_version, update.delta, staleness)

    def versioned(self, version: int, model: Mapping[str, np.ndarray]) -> None:
        self.remember(version, model)

    @property
    def pending(self) -> int:
        return 0

    def state(self) -> tuple[dict[str, Any], dict[str, Model]]:
        """The remembered versions."""
        return {"versions": list(self._history)}, {f"v{v}": m for v, m in self._history.items()}

    def load(self, values: Mapping[str, Any], models: Mapping[str, Model]) -> None:
        self._history = OrderedDict((int(v), models[f"v{v}"]) for v in values["versions"])
