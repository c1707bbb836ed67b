"""What a strategy is given: checked updates from children, each against a named base version."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np

__all__ = [
    "AsyncStrategy",
    "Model",
    "RoundStrategy",
    "Stateful",
    "StreamingStrategy",
    "Update",
    "load_strategy_state",
    "strategy_state",
    "subtract",
]

Model = dict[str, np.ndarray]


def subtract(new: Mapping[str, np.ndarray], old: Mapping[str, np.ndarray]) -> Model:
    """``new - old`` per tensor, in the dtype both share (float32 for float32 models)."""
    return {k: np.subtract(v, old[k], dtype=np.result_type(v, old[k])) for k, v in new.items()}


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


class AsyncStrategy(Protocol):
    """An asynchronous strategy (FedAsync, FedBuff): updates are folded in as they come, each
    weighted by its staleness; every step makes a new version. Pure math, like the others."""

    step_scale: float
    """At most how much of one delta a step adds to the model (to check a delta's range)."""

    def weight(self, staleness: int) -> float:
        """The weight an update this stale is given."""
        ...

    def can_take(self, base_version: int) -> bool:
        """Whether an update against ``base_version`` can be folded in (FedAsync needs the
        model of that version)."""
        ...

    def take(self, model: Mapping[str, np.ndarray], update: Update, staleness: int) -> Model | None:
        """Fold ``update`` in: the next model if the strategy steps now, else None."""
        ...

    def versioned(self, version: int, model: Mapping[str, np.ndarray]) -> None:
        """``model`` is published as ``version``."""
        ...

    def shift(self, by: Mapping[str, np.ndarray]) -> None:
        """The aggregator rebased its model by ``by`` onto its parent's new model."""
        ...

    @property
    def pending(self) -> int:
        """Updates taken and not yet in a step."""
        ...

    def state(self) -> tuple[dict[str, Any], dict[str, Model]]:
        """Plain values and named models, for a checkpoint."""
        ...

    def load(self, values: Mapping[str, Any], models: Mapping[str, Model]) -> None:
        """Restore what ``state`` gave."""
        ...


@runtime_checkable
class Stateful(Protocol):
    """A strategy with state across rounds (a server optimizer's moments, say), which a
    checkpoint keeps: plain values and named models."""

    def state(self) -> tuple[dict[str, Any], dict[str, Model]]: ...

    def load(self, values: Mapping[str, Any], models: Mapping[str, Model]) -> None: ...


def strategy_state(strategy: object) -> tuple[dict[str, Any], dict[str, Model]]:
    """A strategy's state for a checkpoint (nothing for a stateless one)."""
    return strategy.state() if isinstance(strategy, Stateful) else ({}, {})


def load_strategy_state(
    strategy: object, values: Mapping[str, Any], models: Mapping[str, Model]
) -> None:
    """Restore what ``strategy_state`` gave."""
    if isinstance(strategy, Stateful):
        strategy.load(values, models)
