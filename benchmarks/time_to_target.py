"""Time to target as the benchmarks count it: the target reached, and held.

A run that touches the target and falls back has not reached it, and the first evaluation at
the target alone would favour whatever evaluates more often (DESIGN.md section 8).
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["STAYS_FOR", "reached_at"]

STAYS_FOR = 3
"""Evaluations after the first one at the target that must stay at or above it."""


def reached_at(
    accuracies: Sequence[float], target: float, stays_for: int = STAYS_FOR
) -> int | None:
    """Index of the first evaluation at or above ``target`` whose next ``stays_for`` evaluations
    are too; None if there is none. A run must go on ``stays_for`` evaluations after it to be
    counted at all."""
    for at in range(len(accuracies) - stays_for):
        if all(a >= target for a in accuracies[at : at + stays_for + 1]):
            return at
    return None
