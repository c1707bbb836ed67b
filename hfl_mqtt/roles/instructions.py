"""Instructions from above the root: what a version asks of the workers, and their replies.

Normally the root's own loop decides every version and workers just train. A driver above the
root (a Flower ServerApp through the ``flower`` plug-in's Grid) instead says, per version, what
to do with it and with which settings, and wants the workers' replies back. Both ride in the
headers, as plain entries, so aggregators need to understand neither:

- down, in a model header: ``do`` (``train`` or ``evaluate``) and ``cfg.<key>`` for each setting.
  Every aggregator copies them into the versions it publishes for that cycle; an ``evaluate``
  cycle is one round that leaves the model as it is.
- up, in a delta header: ``reply.<key>`` for each number the task replied with. An aggregator
  replies with the examples-weighted mean of its children's replies (the weight being each
  reply's ``num_examples``, which it sums), as Flower's ``aggregate_metricrecords`` averages
  metric records; a worker's reply to ``evaluate`` carries a zero delta.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

from hfl_mqtt.codec.compressor import Compressor
from hfl_mqtt.codec.envelope import MetricValue

__all__ = [
    "CONFIG_PREFIX",
    "DO",
    "REPLY_PREFIX",
    "ZERO_DELTA",
    "Action",
    "Instruction",
    "combine_replies",
    "instruction_of",
    "reply_entries",
    "reply_of",
]

DO = "do"
CONFIG_PREFIX = "cfg."
REPLY_PREFIX = "reply."

ZERO_DELTA = Compressor("npy+zstd")
"""The codec of a reply to ``evaluate``: its delta is zero, and compresses to next to nothing."""

Action = Literal["train", "evaluate"]
ReplyValue = int | float


@dataclass(frozen=True)
class Instruction:
    """What one version asks of the workers below: ``do`` it, with ``config``."""

    do: Action
    config: Mapping[str, MetricValue] = field(default_factory=dict)

    def header_entries(self) -> dict[str, MetricValue]:
        """The model header entries that carry this instruction."""
        return {DO: self.do, **{CONFIG_PREFIX + k: v for k, v in self.config.items()}}


def instruction_of(metrics: Mapping[str, MetricValue]) -> Instruction | None:
    """The instruction a model header carries; None if it carries none (or an unknown one)."""
    do = metrics.get(DO)
    if do not in ("train", "evaluate"):
        return None
    config = {k[len(CONFIG_PREFIX) :]: v for k, v in metrics.items() if k.startswith(CONFIG_PREFIX)}
    return Instruction("train" if do == "train" else "evaluate", config)


def reply_entries(reply: Mapping[str, ReplyValue]) -> dict[str, MetricValue]:
    """The delta header entries that carry a task's reply (finite numbers only)."""
    return {
        REPLY_PREFIX + k: v
        for k, v in reply.items()
        if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
    }


def reply_of(metrics: Mapping[str, object]) -> dict[str, ReplyValue]:
    """The reply a delta header carries (its ``reply.`` entries, without the prefix)."""
    return {
        k[len(REPLY_PREFIX) :]: v
        for k, v in metrics.items()
        if k.startswith(REPLY_PREFIX) and isinstance(v, int | float) and not isinstance(v, bool)
    }


def combine_replies(
    replies: Iterable[tuple[int, Mapping[str, object]]],
) -> dict[str, MetricValue]:
    """The header entries of a subtree's reply: each key's mean over the children that sent it,
    weighted by their examples (a plain mean if none has any)."""
    sums: dict[str, float] = {}
    weights: dict[str, float] = {}
    parts = [(n, reply_of(metrics)) for n, metrics in replies]
    total = sum(n for n, _ in parts)
    for examples, reply in parts:
        weight = float(examples) if total > 0 else 1.0
        for key, value in reply.items():
            sums[key] = sums.get(key, 0.0) + weight * float(value)
            weights[key] = weights.get(key, 0.0) + weight
    return reply_entries({k: sums[k] / weights[k] if weights[k] > 0 else 0.0 for k in sums})
