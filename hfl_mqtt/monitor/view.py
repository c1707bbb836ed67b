"""The federation as the broker shows it: statuses and metrics records folded into one state.

``FederationView`` is pure (no I/O, no clock): the caller hands it every ``hfl/{fed}/{node}/status``
and ``hfl/{fed}/{node}/metrics`` message with the time it arrived (``observe``) and asks for the
state at a given time (``snapshot``, the JSON of the web dashboard's ``/api/state``). The MQTT
source, the replay of a finished sim and the tests all drive it the same way.

It is built to keep up with large trees (a record per node per second from a thousand workers):
``observe`` parses one JSON object and updates a few counters in O(1); ``snapshot`` is linear in
the nodes and in the root's evaluations. Records come from devices: fields of the wrong type are
ignored, not trusted, and a malformed payload is logged and skipped.
"""

from __future__ import annotations

import bisect
import json
import math
import re
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import structlog

__all__ = ["MAX_REJECTIONS", "FederationView", "NodeState", "natural_key"]

log = structlog.get_logger("hfl_mqtt.monitor")

MAX_REJECTIONS = 50
"""Latest rejections kept (newest first in the snapshot)."""

_SERIES_SAMPLES = 4096
"""Samples of the federation's total bytes kept for the accuracy-against-bytes points; when
full, every other one is dropped and the spacing doubles (memory stays bounded on long runs)."""
_SERIES_SPACING_S = 0.5
_SERIES_TOLERANCE_S = 5.0
"""An evaluation takes the bytes of the nearest sample at most this far (or two spacings) away."""
_RATE_GRACE_S = 1.0
"""How late a node's next record may be before its byte rate starts to decay towards zero."""
_UP = ("online", "idle")


def _int(value: object) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and math.isfinite(value):
        return int(value)
    return None


def _float(value: object) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float) and math.isfinite(value):
        return float(value)
    return None


def _str(value: object) -> str | None:
    return value if isinstance(value, str) else None


def _evaluation(entry: object) -> dict[str, Any] | None:
    """``[seconds, version, accuracy, loss, tree bytes]`` of the root's record as a point (the
    last two optional); None if malformed."""
    if not isinstance(entry, list) or len(entry) < 3:
        return None
    seconds, accuracy = _float(entry[0]), _float(entry[2])
    if seconds is None or accuracy is None:
        return None
    return {
        "t": seconds,
        "version": _int(entry[1]),
        "accuracy": accuracy,
        "loss": _float(entry[3]) if len(entry) > 3 else None,
        "bytes": _int(entry[4]) if len(entry) > 4 else None,
    }


def natural_key(node_id: str) -> tuple[tuple[int, int | str], ...]:
    """Sorts ids as people read them: worker-8 before worker-10."""
    return tuple(
        (0, int(part)) if part.isdigit() else (1, part)
        for part in re.split(r"(\d+)", node_id)
        if part
    )


def _table(value: object) -> dict[str, Any] | None:
    return value if isinstance(value, dict) else None


def _names(value: object) -> tuple[str, ...]:
    """The strings of a list (a malformed one: none)."""
    return tuple(v for v in value if isinstance(v, str)) if isinstance(value, list) else ()


def _counters(value: object) -> dict[str, int]:
    """``{"reason": count}`` with only the well-formed entries."""
    if not isinstance(value, dict):
        return {}
    out: dict[str, int] = {}
    for key, count in value.items():
        number = _int(count)
        if isinstance(key, str) and number is not None:
            out[key] = number
    return out


def _traffic(value: object) -> tuple[dict[str, list[int]], int, int]:
    """The per-kind traffic ``{kind: [msgs_out, bytes_out, msgs_in, bytes_in]}`` (well-formed
    entries only) and its bytes out and in."""
    if not isinstance(value, dict):
        return {}, 0, 0
    out: dict[str, list[int]] = {}
    sent = received = 0
    for kind, row in value.items():
        if not isinstance(kind, str) or not isinstance(row, list) or len(row) != 4:
            continue
        numbers = [_int(x) for x in row]
        if any(x is None for x in numbers):
            continue
        clean: list[int] = numbers  # type: ignore[assignment]
        out[kind] = clean
        sent += clean[1]
        received += clean[3]
    return out, sent, received


@dataclass(slots=True)
class NodeState:
    """What the view knows of one node: its last record's fields, and what it needs of the
    record before it (for the byte rates)."""

    id: str
    role: str | None = None
    level: int | None = None
    parent: str | None = None
    status: str = "unknown"
    announced: str | None = None
    """The state of the node's last status message (``offline`` wins over any record)."""
    version: int | None = None
    round: int | None = None
    t: float | None = None
    """Wall time of the last record (the node's clock), or when its status arrived."""
    seen: float | None = None
    """When the last record arrived (the caller's clock): ``t`` when a record has none."""
    accepted: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    staleness: dict[str, Any] | None = None
    traffic: dict[str, list[int]] = field(default_factory=dict)
    bytes_out: int = 0
    bytes_in: int = 0
    previous: tuple[float, int, int] | None = None
    """``(t, bytes_out, bytes_in)`` of the record before the last one."""
    reconnects: int = 0
    last_error: str | None = None
    trained: int | None = None
    pid: int | None = None
    rss: int | None = None
    cpu_s: float | None = None
    uptime_s: float | None = None
    records: int = 0
    children_down: tuple[str, ...] = ()
    """The children its last record says are down (an aggregator's)."""
    privacy: dict[str, Any] | None = None
    """Differential privacy spent, where the node has it on (``kind``, ``epsilon``, ...)."""

    def rates(self, now: float) -> tuple[float, float]:
        """Bytes per second out and in between the last two records; once the next record is
        late (records come only on change), the same bytes spread up to ``now``."""
        if self.previous is None or self.t is None or self.status == "offline":
            return 0.0, 0.0
        before, sent, received = self.previous
        spacing = self.t - before
        if spacing <= 0 or self.bytes_out < sent or self.bytes_in < received:
            return 0.0, 0.0  # same instant, or counters that restarted
        span = max(spacing, now - before - spacing - _RATE_GRACE_S)
        return (self.bytes_out - sent) / span, (self.bytes_in - received) / span

    def to_dict(self, now: float) -> dict[str, Any]:
        rate_out, rate_in = self.rates(now)
        age = None if self.seen is None else round(max(0.0, now - self.seen), 3)
        return {
            "id": self.id,
            "role": self.role,
            "level": self.level,
            "parent": self.parent,
            "status": self.status,
            "version": self.version,
            "round": self.round,
            "age_s": age,
            "accepted": self.accepted,
            "rejected": self.rejected,
            "staleness": self.staleness,
            "privacy": self.privacy,
            "bytes_out": self.bytes_out,
            "bytes_in": self.bytes_in,
            "rate_out": round(rate_out, 1),
            "rate_in": round(rate_in, 1),
            "traffic": self.traffic,
            "reconnects": self.reconnects,
            "last_error": self.last_error,
            "rss": self.rss,
            "cpu_s": self.cpu_s,
            "uptime_s": self.uptime_s,
            "trained": self.trained,
        }


class _BytesSeries:
    """The federation's total bytes sent over time (wall seconds), thinned to stay bounded."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.values: list[int] = []
        self.spacing = _SERIES_SPACING_S

    def add(self, t: float, total: int) -> None:
        if self.times and t < self.times[-1]:
            t = self.times[-1]  # records out of order (retained ones at subscribe): keep sorted
        if len(self.times) > 1 and t - self.times[-2] < self.spacing:
            self.times[-1], self.values[-1] = t, total  # the last sample moves forward
            return
        if len(self.times) >= _SERIES_SAMPLES:
            del self.times[1::2], self.values[1::2]
            self.spacing *= 2
        self.times.append(t)
        self.values.append(total)

    def at(self, t: float) -> int | None:
        """Total bytes at the sample nearest ``t``, or None if no sample is near enough."""
        if not self.times:
            return None
        index = bisect.bisect_left(self.times, t)
        near = [i for i in (index - 1, index) if 0 <= i < len(self.times)]
        best = min(near, key=lambda i: abs(self.times[i] - t))
        if abs(self.times[best] - t) > max(_SERIES_TOLERANCE_S, 2 * self.spacing):
            return None
        return self.values[best]


class FederationView:
    """The live state of one federation, from its status and metrics messages.

    ``federation`` None: the first federation seen is taken, messages of others are ignored.
    """

    def __init__(self, federation: str | None = None) -> None:
        self.federation = federation
        self.nodes: dict[str, NodeState] = {}
        self.changes = 0
        """Messages that changed the state so far (a cheap "anything new?" for pollers)."""
        self._bytes_out = 0
        """Sum of every node's ``bytes_out`` (kept as records arrive)."""
        self._series = _BytesSeries()
        self._rejections: deque[dict[str, Any]] = deque(maxlen=MAX_REJECTIONS)
        self._root: str | None = None
        self._root_start: float | None = None
        """Wall time the root started (its record's ``t - uptime_s``)."""
        self._accuracy: list[dict[str, Any]] = []

    # --- input ----------------------------------------------------------------------------------

    def observe(self, topic: str, payload: bytes, now: float) -> bool:
        """Take one message (any topic; only status and metrics ones count). True if it changed
        the state."""
        parts = topic.split("/")
        if len(parts) != 4 or parts[0] != "hfl" or parts[3] not in ("status", "metrics"):
            return False
        _, federation, node, kind = parts
        if self.federation is None:
            self.federation = federation
        elif federation != self.federation:
            return False
        if not payload:
            return False  # a cleared retained topic
        try:
            value = json.loads(payload)
        # RecursionError: deeply nested JSON from a hostile peer.
        except (ValueError, UnicodeDecodeError, RecursionError):
            value = None
        if not isinstance(value, dict):
            log.warning("malformed message ignored", topic=topic, size=len(payload))
            return False
        state = self.nodes.get(node)
        if state is None:
            state = self.nodes[node] = NodeState(node)
        if kind == "status":
            changed = self._status(state, value)
        else:
            changed = self._record(state, value, now)
        if changed:
            self.changes += 1
        return changed

    def _status(self, node: NodeState, value: dict[str, Any]) -> bool:
        announced = _str(value.get("state"))
        parent = _str(value.get("parent"))
        if announced is None:
            return False
        before = (node.status, node.parent)
        node.announced = announced
        node.status = announced
        if parent is not None:
            node.parent = parent
        return (node.status, node.parent) != before

    def _record(self, node: NodeState, value: dict[str, Any], now: float) -> bool:
        t = _float(value.get("t"))
        if t is None:
            t = now
        if node.t is not None and t < node.t:
            return False  # older than what we have (a late duplicate)
        role = _str(value.get("role"))
        if role is not None:
            node.role = role
        level = _int(value.get("level"))
        if level is not None:
            node.level = level
        if "parent" in value:
            node.parent = _str(value.get("parent"))
        status = _str(value.get("status"))
        if status is not None and node.announced != "offline":
            node.status = status
        node.version = _int(value.get("version"))
        node.round = _int(value.get("round"))
        node.accepted = _int(value.get("accepted")) or 0
        node.reconnects = _int(value.get("reconnects")) or 0
        node.last_error = _str(value.get("last_error"))
        node.trained = _int(value.get("trained"))
        node.pid = _int(value.get("pid"))
        node.rss = _int(value.get("rss"))
        node.cpu_s = _float(value.get("cpu_s"))
        node.uptime_s = _float(value.get("uptime_s"))
        node.staleness = _table(value.get("staleness"))
        node.children_down = _names(value.get("children_down"))
        node.privacy = _table(value.get("privacy"))

        rejected = _counters(value.get("rejected"))
        for reason, count in rejected.items():
            old = node.rejected.get(reason, 0)
            increment = count - old if count >= old else count  # lower: the node restarted
            if increment > 0:
                self._rejections.appendleft(
                    {
                        "t": t,
                        "node": node.id,
                        "reason": reason,
                        "count": increment,
                        "detail": node.last_error,
                    }
                )
        node.rejected = rejected

        traffic, sent, received = _traffic(value.get("traffic"))
        if node.records:
            assert node.t is not None
            node.previous = (node.t, node.bytes_out, node.bytes_in)
        self._bytes_out += sent - node.bytes_out
        node.traffic, node.bytes_out, node.bytes_in = traffic, sent, received
        node.t, node.seen = t, now
        node.records += 1
        self._series.add(t, self._bytes_out)

        if node.role == "root" or (node.level == 0 and node.parent is None):
            self._root = node.id
            if node.uptime_s is not None:
                self._root_start = t - node.uptime_s
            evaluations = value.get("accuracy")
            if isinstance(evaluations, list):
                self._evaluations_seen(evaluations)
        return True

    def _evaluations_seen(self, evaluations: list[Any]) -> None:
        """Take the root's evaluations that are newer than the last one taken (its record
        carries only its latest: a view watching from the start keeps them all)."""
        points = [point for point in map(_evaluation, evaluations) if point is not None]
        last = self._accuracy[-1]["t"] if self._accuracy else None
        if points and last is not None and points[-1]["t"] < last:
            self._accuracy, last = [], None  # another history (the root started over)
        for point in points:
            if last is None or point["t"] > last:
                if point["bytes"] is None:  # a record without the tree's bytes
                    point["bytes"] = self._bytes_at(point["t"])
                self._accuracy.append(point)

    def _bytes_at(self, seconds: float) -> int | None:
        if self._root_start is None:
            return None
        return self._series.at(self._root_start + seconds)

    # --- output ---------------------------------------------------------------------------------

    def snapshot(self, now: float) -> dict[str, Any]:
        """The state at ``now`` (the caller's clock, as given to ``observe``), as JSON-ready
        dicts (``/api/state``)."""
        ordered = sorted(
            self.nodes.values(),
            key=lambda n: (n.level is None, n.level or 0, natural_key(n.id)),
        )
        nodes = [node.to_dict(now) for node in ordered]
        for entry in nodes:
            if self._down_says_parent(entry["id"]):
                entry["status"] = "offline"
        online = sum(1 for node in nodes if node["status"] in _UP)
        newest = max((n.t for n in ordered if n.t is not None), default=None)
        for point in self._accuracy:
            if point["bytes"] is None:  # its time had no sample yet when it arrived
                point["bytes"] = self._bytes_at(point["t"])
        return {
            "federation": self.federation,
            "t": now,
            "nodes": nodes,
            "accuracy": [dict(point) for point in self._accuracy],
            "staleness": self._staleness_by_level(),
            "rejections": list(self._rejections),
            "totals": {
                "nodes": len(nodes),
                "online": online,
                "bytes_out": sum(node["bytes_out"] for node in nodes),
                "bytes_in": sum(node["bytes_in"] for node in nodes),
                "rate_out": round(sum(node["rate_out"] for node in nodes), 1),
                "rate_in": round(sum(node["rate_in"] for node in nodes), 1),
                # How far behind the view runs: now minus the newest record's own time (the
                # sender's clock). It grows if records arrive faster than they are taken.
                "lag_s": None if newest is None else round(max(0.0, now - newest), 3),
            },
        }

    def _down_says_parent(self, node_id: str) -> bool:
        """Whether the node's parent says it is down, and nothing from the node itself says
        otherwise: a worker behind a site broker, whose status (and Last Will) the monitor on
        the root's broker never hears, is known to be down from its parent's record."""
        node = self.nodes[node_id]
        if node.announced is not None or node.parent is None:
            return False
        parent = self.nodes.get(node.parent)
        return parent is not None and node_id in parent.children_down

    def _staleness_by_level(self) -> dict[str, dict[str, Any]]:
        """The aggregators' staleness summaries merged per receiving level."""
        levels: dict[int, list[dict[str, Any]]] = {}
        for node in self.nodes.values():
            if node.staleness is not None and node.level is not None:
                levels.setdefault(node.level, []).append(node.staleness)
        return {str(level): _merge_staleness(levels[level]) for level in sorted(levels)}


def _merge_staleness(summaries: list[dict[str, Any]]) -> dict[str, Any]:
    """One summary from several nodes': histograms added, percentiles read from the sum (the
    bucket index: staleness counts are small integers), mean weighted by counts."""
    if len(summaries) == 1:
        return dict(summaries[0])
    hist: list[int] = []
    total = 0
    weighted = 0.0
    largest: int | None = None
    for summary in summaries:
        n = _int(summary.get("n")) or 0
        mean = _float(summary.get("mean"))
        total += n
        if mean is not None:
            weighted += mean * n
        top = _int(summary.get("max"))
        if top is not None:
            largest = top if largest is None else max(largest, top)
        counts = summary.get("hist")
        if isinstance(counts, list):
            if len(counts) > len(hist):
                hist.extend([0] * (len(counts) - len(hist)))
            for i, count in enumerate(counts):
                hist[i] += _int(count) or 0
    merged: dict[str, Any] = {
        "n": total,
        "mean": round(weighted / total, 4) if total else None,
        "p50": _hist_quantile(hist, 0.5),
        "p95": _hist_quantile(hist, 0.95),
        "max": largest,
        "hist": hist,
    }
    return merged


def _hist_quantile(hist: list[int], q: float) -> int | None:
    """The smallest staleness whose cumulative count reaches ``q`` of all."""
    total = sum(hist)
    if total <= 0:
        return None
    target = q * total
    running = 0
    for index, count in enumerate(hist):
        running += count
        if running >= target:
            return index
    return len(hist) - 1
