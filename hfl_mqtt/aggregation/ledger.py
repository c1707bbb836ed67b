"""The upstream ledger: what a non-root aggregator has reported to its parent, and what not.

A non-root aggregator holds a model ``x`` based on a parent version ``c`` with model ``M_c``.
The ``anchor`` is the model at its last confirmed report (or at the last rebase), so
``x - anchor`` is what it has not reported yet, with the weight of ``examples`` examples and
``updates`` children's updates behind it.

- ``report(x)``: the delta ``x - anchor`` to send against ``c``. Under a parent that takes late
  reports (asynchronous), the anchor moves to ``x`` at once. Under a synchronous parent, which
  may refuse a report that misses its round, the report is kept as ``sent`` until the parent's
  next model says whether it was taken (its ``participants``).
- ``rebase(x, M', c', participants)``: the parent published ``M'``: ``x <- M' + (x - from)``,
  with ``from`` the sent model if the parent took the report, else the anchor. What was reported
  is in ``M'`` and is not counted twice; what was not is kept.
- ``adopt(M', c')``: start over from ``M'`` (a synchronous aggregator under a synchronous parent
  restarts its cycle from each new parent model).
- ``rehome()``: the node moved to another parent (docs/reparenting.md); the next model it takes
  is of that parent's versions.

Pure: no I/O, no clock. The aggregators use it, and checkpoints persist it (``state``/``load``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from hfl_mqtt.aggregation.base import Model, subtract

__all__ = ["Rebase", "Report", "UpstreamLedger"]


def _copy(model: Mapping[str, np.ndarray]) -> Model:
    return {k: v.copy() for k, v in model.items()}


@dataclass(frozen=True, slots=True)
class Report:
    """A report to send up: ``delta`` against ``base_version``, weighted by ``examples``."""

    base_version: int
    delta: Model
    examples: int
    updates: int


@dataclass(frozen=True, slots=True)
class Rebase:
    """The model moved onto the parent's new one, and how far it moved (``shift``).

    ``taken``: whether the parent took the report sent against the previous version (None: no
    report was waiting for its verdict)."""

    model: Model
    shift: Model
    taken: bool | None


@dataclass(frozen=True, slots=True)
class _Sent:
    model: Model
    examples: int
    updates: int


class UpstreamLedger:
    """The version bookkeeping of a non-root aggregator toward its parent."""

    def __init__(self, node: str) -> None:
        self.node = node
        self.parent_version: int | None = None
        self.parent_model: Model | None = None
        self.parent_async = False
        """The parent takes late reports: a report moves the anchor at once."""
        self.anchor: Model | None = None
        self.examples = 0
        """Examples behind ``x - anchor`` (the weight of the next report)."""
        self.updates = 0
        """Children's updates folded into ``x - anchor``."""
        self._sent: _Sent | None = None

    @property
    def based(self) -> bool:
        """A parent model has come: there is something to report against."""
        return self.parent_version is not None and self.anchor is not None

    @property
    def awaiting_verdict(self) -> bool:
        """A report sent to a synchronous parent waits for its next model (which says whether
        it was taken); such a parent takes one report per version."""
        return self._sent is not None

    def adopt(self, model: Model, version: int, *, parent_async: bool) -> Model:
        """Start over from the parent's model ``version``; returns a copy to work on."""
        self.parent_model = model
        self.parent_version = version
        self.parent_async = parent_async
        self.anchor = model
        self._sent = None
        return _copy(model)

    def rehome(self) -> None:
        """The node moved to another parent: the next parent model is of a new line of
        versions. What was not reported stays in ``x - anchor`` to be rebased onto it; a report
        to the old parent awaiting its verdict is counted as not taken."""
        self.parent_version = None
        self._sent = None

    def fold(self, updates: int, examples: int) -> None:
        """Children's updates went into ``x``."""
        self.updates += updates
        self.examples += examples

    def weigh(self, examples: int) -> None:
        """The next report stands for ``examples`` examples (a synchronous cycle: its last
        round's)."""
        self.examples = examples

    def report(self, model: Mapping[str, np.ndarray], *, max_examples: int) -> Report:
        """The report of ``model - anchor``; records it as sent."""
        anchor, version = self.anchor, self.parent_version
        assert anchor is not None, "no parent model yet"
        assert version is not None, "no parent model yet"
        delta = subtract(model, anchor)
        report = Report(version, delta, min(self.examples, max_examples), self.updates)
        sent = _copy(model)
        if self.parent_async:
            self.anchor = sent
            self.examples = self.updates = 0
        else:
            self._sent = _Sent(sent, self.examples, self.updates)
        return report

    def rebase(
        self,
        model: Mapping[str, np.ndarray],
        parent_model: Model,
        parent_version: int,
        *,
        participants: object,
        parent_async: bool,
    ) -> Rebase:
        """Move ``model`` onto the parent's new model, keeping what is not reported yet.

        ``participants``: the parent's list of the children it took (a comma-separated string);
        anything else (left out for a long list) counts as taken.
        """
        assert self.anchor is not None, "no parent model yet"
        unreported_from = self.anchor
        taken: bool | None = None
        if self._sent is not None:
            taken = not isinstance(participants, str) or self.node in participants.split(",")
            if taken:
                unreported_from = self._sent.model
                self.examples -= self._sent.examples
                self.updates -= self._sent.updates
        rebased = {k: parent_model[k] + (v - unreported_from[k]) for k, v in model.items()}
        shift = subtract(rebased, model)
        self.parent_model = parent_model
        self.parent_version = parent_version
        self.parent_async = parent_async
        self.anchor = parent_model
        self._sent = None
        return Rebase(rebased, shift, taken)

    # --- checkpoints ----------------------------------------------------------------------------

    def state(self) -> tuple[dict[str, Any], dict[str, Model]]:
        """The ledger as plain values and named models (for a checkpoint)."""
        values: dict[str, Any] = {
            "parent_version": self.parent_version,
            "parent_async": self.parent_async,
            "examples": self.examples,
            "updates": self.updates,
            "sent": None if self._sent is None else [self._sent.examples, self._sent.updates],
        }
        models: dict[str, Model] = {}
        for name, value in (
            ("parent_model", self.parent_model),
            ("anchor", self.anchor),
            ("sent", None if self._sent is None else self._sent.model),
        ):
            if value is not None:
                models[name] = value
        return values, models

    def load(self, values: Mapping[str, Any], models: Mapping[str, Model]) -> None:
        """Restore what ``state`` gave."""
        self.parent_version = values["parent_version"]
        self.parent_async = bool(values["parent_async"])
        self.examples = int(values["examples"])
        self.updates = int(values["updates"])
        self.parent_model = models.get("parent_model")
        self.anchor = models.get("anchor")
        sent = values["sent"]
        self._sent = None if sent is None else _Sent(models["sent"], int(sent[0]), int(sent[1]))
