"""What a strategy is given: checked updates from children, each against a named base version."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np

__all__ = ["Model", "RoundStrategy", "StreamingStrategy", "Update"]

Model = dict[str, np.ndarray]


@dataclass(frozen=True, slots=True)
class Update:
    """One child's delta, already decoded and checked against the model's shapes."""

    sender: str
    base_version: int
    delta: Mapping[str, np.ndarray]
    num_examples: int
    update_id: str
    metrics: Mapping[str, object] = field(default_factory=dict)


class RoundStrategy(Protocol):
    """A synchronous strategy: pure math, no I/O; the role owns the loop and the network."""

    def aggregate(self, model: Mapping[str, np.ndarray], updates: Sequence[Update]) -> Model:
        """The next model from the current one and one round of updates against it."""
        ...


@runtime_checkable
class StreamingStrategy(Protocol):
    """A strategy that folds updates in as they arrive, keeping none of them."""

    def start(self, model: Mapping[str, np.ndarray]) -> None: ...

    def add(self, update: Update) -> None: ...

    def finish(self) -> Model: ...
