"""What a node counts while it runs: updates taken and refused (with reasons), traffic, rounds."""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import structlog

from hfl_mqtt.errors import (
    DecodeError,
    DigestMismatchError,
    ModelMismatchError,
    NonFiniteError,
    SizeLimitError,
)
from hfl_mqtt.transport.base import LinkStats

__all__ = ["Arrival", "NodeReport", "reject_reason"]

_MAX_ERROR = 160
_KIND_FIELDS = ("messages_sent", "bytes_sent", "messages_received", "bytes_received")

log = structlog.get_logger("hfl_mqtt.roles")


def reject_reason(exc: DecodeError) -> str:
    """A short, countable reason for a message that failed to decode."""
    if isinstance(exc, ModelMismatchError):
        return "wrong_shape"
    if isinstance(exc, NonFiniteError):
        return "non_finite"
    if isinstance(exc, SizeLimitError):
        return "oversized"
    if isinstance(exc, DigestMismatchError):
        return "corrupt"
    return "malformed"


@dataclass(frozen=True, slots=True)
class Arrival:
    """One accepted update: when (seconds since the node started), from whom, how stale (the
    aggregator's version minus the update's base version) and the weight it was given."""

    seconds: float
    sender: str
    staleness: int
    weight: float


@dataclass
class NodeReport:
    """Counters of one node, merged into ``summary.json`` by the simulator."""

    node: str
    role: str
    level: int
    rounds: int = 0
    updates_accepted: int = 0
    updates_rejected: Counter[str] = field(default_factory=Counter)
    trained: int = 0
    skipped: int = 0
    rounds_chosen: list[int] = field(default_factory=list)
    """An aggregator with ``rounds: auto``: the rounds it chose for each cycle."""
    """Models a worker was not picked to train on (the parent's participation policy)."""
    dropouts: int = 0
    """Times a worker's simulated device dropped out (``NodeConfig.device``)."""
    up: LinkStats | None = None
    down: LinkStats | None = None
    evaluations: list[dict[str, Any]] = field(default_factory=list)
    arrivals: list[Arrival] = field(default_factory=list)
    sent_ids: list[str] = field(default_factory=list)
    """Update ids of the deltas this node sent up (each once, however often re-sent)."""
    accepted_ids: list[str] = field(default_factory=list)
    """Update ids of the children's updates this node accepted."""
    resent: int = 0
    """Deltas sent again after a reconnect, in case the broker had lost them."""
    reparented: int = 0
    """Times the node moved to another parent (docs/reparenting.md)."""
    started: float = field(default_factory=time.monotonic)
    """When the node started (``time.monotonic``): ``Arrival.seconds`` count from here."""
    last_error: str | None = None
    """The last refused message or link error, with its reason (the node's metrics record)."""
    privacy: dict[str, Any] | None = None
    """Differential privacy spent so far (``PrivacyAccountant.to_dict``), where it is on."""

    def accept(self, arrival: Arrival, update_id: str) -> None:
        """Count an accepted update and keep its staleness for the telemetry."""
        self.updates_accepted += 1
        self.arrivals.append(arrival)
        self.accepted_ids.append(update_id)
        # One line per update id, so accounting survives a node that is killed (chaos bench).
        log.info(
            "update accepted",
            node=self.node,
            sender=arrival.sender,
            update_id=update_id,
            staleness=arrival.staleness,
        )

    def reject_decode(self, topic: str, exc: DecodeError) -> None:
        """Count a message that failed to decode (also what a link's reassembler refused)."""
        self.reject(reject_reason(exc), topic, str(exc))

    def reject(self, reason: str, topic: str, detail: str = "") -> None:
        """Count and log a refused message; the node goes on."""
        self.updates_rejected[reason] += 1
        self.error(f"{reason}: {detail}" if detail else reason)
        log.warning("update rejected", node=self.node, reason=reason, topic=topic, detail=detail)

    def error(self, text: str) -> None:
        """Remember ``text`` as the node's last error (cut short: it travels in every record)."""
        self.last_error = text if len(text) <= _MAX_ERROR else text[: _MAX_ERROR - 3] + "..."

    def _links(self) -> list[LinkStats]:
        links = [s for s in (self.up, self.down) if s is not None]
        return links[:1] if len(links) == 2 and links[0] is links[1] else links

    @property
    def bytes_sent(self) -> int:
        return sum(s.bytes_sent for s in self._links())

    @property
    def messages_sent(self) -> int:
        return sum(s.messages_sent for s in self._links())

    def to_dict(self) -> dict[str, Any]:
        def link(stats: LinkStats | None) -> dict[str, Any] | None:
            if stats is None:
                return None
            return {
                "messages_sent": stats.messages_sent,
                "bytes_sent": stats.bytes_sent,
                "messages_received": stats.messages_received,
                "bytes_received": stats.bytes_received,
                "chunks_rejected": stats.chunks_rejected,
                "by_kind": {
                    kind: dict(zip(_KIND_FIELDS, values, strict=True))
                    for kind, values in stats.by_topic_kind.items()
                },
            }

        return {
            "node": self.node,
            "role": self.role,
            "level": self.level,
            "rounds": self.rounds,
            "updates_accepted": self.updates_accepted,
            "updates_rejected": dict(self.updates_rejected),
            "trained": self.trained,
            "skipped": self.skipped,
            "rounds_chosen": self.rounds_chosen,
            "dropouts": self.dropouts,
            "arrivals": [
                [round(a.seconds, 4), a.sender, a.staleness, a.weight] for a in self.arrivals
            ],
            "sent_ids": self.sent_ids,
            "accepted_ids": self.accepted_ids,
            "resent": self.resent,
            "reparented": self.reparented,
            "privacy": self.privacy,
            "up": link(self.up),
            "down": link(self.down),
        }
