"""Privacy accounting: epsilon at a given delta after a number of Gaussian releases.

Backed by Google's ``dp-accounting`` library (its RDP accountant), an optional dependency:
``pip install 'hfl-mqtt[privacy]'``. Each round an aggregator with central DP releases one
noised sum in which one child's clipped delta (norm at most ``C``) may be added or removed: a
Gaussian mechanism of noise multiplier ``z``. A worker with local DP releases its own noised
delta, and any two of its deltas differ by up to ``2 C``: a Gaussian mechanism of multiplier
``z / 2``. No amplification by sampling is claimed (which children answer a round is not a
random sample), so the epsilon reported is an upper bound.
"""

from __future__ import annotations

import math
from typing import Any

from hfl_mqtt.errors import ConfigError

__all__ = ["PrivacyAccountant", "noise_for_epsilon", "require_accounting"]

_MISSING = "privacy accounting needs dp-accounting: pip install 'hfl-mqtt[privacy]'"


def require_accounting() -> Any:
    """The ``dp_accounting`` module; ``ConfigError`` saying how to install it if missing."""
    try:
        import dp_accounting
    except ImportError as exc:
        raise ConfigError(_MISSING) from exc
    return dp_accounting


def _epsilon(noise_multiplier: float, releases: int, delta: float) -> float:
    if releases == 0:
        return 0.0
    if noise_multiplier <= 0:
        return math.inf
    dp = require_accounting()
    accountant = dp.rdp.RdpAccountant()
    accountant.compose(dp.GaussianDpEvent(noise_multiplier), releases)
    return float(accountant.get_epsilon(delta))


class PrivacyAccountant:
    """Epsilon spent so far by one node's releases of one kind (central or local)."""

    def __init__(self, kind: str, noise_multiplier: float, delta: float) -> None:
        if kind not in ("central", "local"):
            raise ValueError(f"kind is central or local, got {kind!r}")
        require_accounting()  # at start, not at the first round: a missing library fails at once
        self.kind = kind
        self.noise_multiplier = noise_multiplier
        self.delta = delta
        self.releases = 0
        self.epsilon = 0.0

    @property
    def _per_release_multiplier(self) -> float:
        return self.noise_multiplier if self.kind == "central" else self.noise_multiplier / 2

    def spend(self, releases: int = 1) -> float:
        """Count ``releases`` more; the epsilon spent in all."""
        self.releases += releases
        self.epsilon = _epsilon(self._per_release_multiplier, self.releases, self.delta)
        return self.epsilon

    def to_dict(self, **extra: Any) -> dict[str, Any]:
        """What a node reports: kind, epsilon (None while unbounded), delta, releases, ``z``."""
        return {
            "kind": self.kind,
            "epsilon": None if math.isinf(self.epsilon) else round(self.epsilon, 4),
            "delta": self.delta,
            "releases": self.releases,
            "noise_multiplier": self.noise_multiplier,
            **extra,
        }


def noise_for_epsilon(
    epsilon: float, delta: float, releases: int, *, kind: str = "central"
) -> float:
    """The smallest noise multiplier ``z`` whose ``releases`` releases spend at most
    ``epsilon`` at ``delta`` (to choose ``noise_multiplier`` for a budget)."""
    if epsilon <= 0 or releases < 1:
        raise ValueError("epsilon must be > 0 and releases >= 1")
    dp = require_accounting()
    scale = 1.0 if kind == "central" else 0.5
    multiplier = dp.calibrate_dp_mechanism(
        dp.rdp.RdpAccountant,
        lambda z: dp.SelfComposedDpEvent(dp.GaussianDpEvent(z * scale), releases),
        epsilon,
        delta,
        bracket_interval=dp.LowerEndpointAndGuess(1e-3, 1.0),
    )
    return float(multiplier)
