"""The MQTT topic scheme: every topic of a federation lives under ``hfl/{federation}/``.

==================================  ==================  ===  ========  =============================
topic                               direction           QoS  retained  payload
==================================  ==================  ===  ========  =============================
``hfl/{fed}/{node}/model``          node -> children    1    yes       the node's current model
``hfl/{fed}/{node}/model/chunk/{i}``  node -> children  1    yes       chunk i of a large model
``hfl/{fed}/{node}/model/delta/{s}``  node -> children  1    yes       delta coding: the version
                                                                       v with v % K == s, as a
                                                                       delta (``roles/downlink``)
``hfl/{fed}/{node}/up/{child}``     child -> node       1    no        the child's delta (chunked
                                                                       on the same topic if large)
``hfl/{fed}/{node}/status``         node -> anyone      1    yes       JSON: online/offline (also
                                                                       the Last Will), its parent
``hfl/{fed}/{node}/ctl``            parent -> node      1    no        JSON: control (stop,
                                                                       reparent)
``hfl/{fed}/{node}/join/{child}``   child -> node       1    no        JSON: the child joins (or
                                                                       leaves) ``node``
``hfl/{fed}/{node}/metrics``        node -> anyone      1    yes       JSON: the node's metrics
                                                                       record (``metrics.py``)
==================================  ==================  ===  ========  =============================

The sender's id is always in the topic, so a broker ACL can pin each device to its own topics
(``pattern write hfl/+/+/up/%c``). Ids are checked to be safe topic levels.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

__all__ = [
    "NODE_ID",
    "ParsedTopic",
    "check_id",
    "chunk_topic",
    "ctl_topic",
    "join_filter",
    "join_topic",
    "metrics_filter",
    "metrics_topic",
    "model_delta_filter",
    "model_delta_topic",
    "model_topic",
    "parse_topic",
    "status_topic",
    "up_filter",
    "up_topic",
]

NODE_ID = re.compile(r"^[A-Za-z0-9_.\-]{1,128}$")
"""Federation and node ids: safe as MQTT topic levels (no ``/``, ``+``, ``#``, spaces)."""

ROOT = "hfl"
Kind = Literal["model", "up", "status", "ctl", "join", "metrics"]


def check_id(value: str, what: str = "id") -> str:
    """Return ``value`` if it is a valid federation or node id, else raise ValueError."""
    if not NODE_ID.fullmatch(value):
        raise ValueError(f"{what} {value!r} must be 1-128 of A-Z a-z 0-9 _ . -")
    return value


def model_topic(federation: str, node: str) -> str:
    return f"{ROOT}/{federation}/{node}/model"


def model_delta_topic(federation: str, node: str, slot: int) -> str:
    """Where ``node`` retains the delta of each version ``v`` with ``v % K == slot``."""
    return f"{ROOT}/{federation}/{node}/model/delta/{slot}"


def model_delta_filter(federation: str, node: str) -> str:
    """Subscription for every delta slot of ``node``'s model stream."""
    return f"{ROOT}/{federation}/{node}/model/delta/+"


def chunk_topic(topic: str, index: int) -> str:
    """Where chunk ``index`` of a large retained message on ``topic`` is retained."""
    return f"{topic}/chunk/{index}"


def up_topic(federation: str, parent: str, child: str) -> str:
    return f"{ROOT}/{federation}/{parent}/up/{child}"


def up_filter(federation: str, parent: str) -> str:
    """Subscription for every child's deltas to ``parent``."""
    return f"{ROOT}/{federation}/{parent}/up/+"


def status_topic(federation: str, node: str) -> str:
    return f"{ROOT}/{federation}/{node}/status"


def metrics_topic(federation: str, node: str) -> str:
    """Where ``node`` keeps its metrics record (retained; ``hfl_mqtt.metrics``)."""
    return f"{ROOT}/{federation}/{node}/metrics"


def metrics_filter(federation: str) -> str:
    """Subscription for every node's metrics record of ``federation`` (``+``: of any)."""
    return f"{ROOT}/{federation}/+/metrics"


def ctl_topic(federation: str, node: str) -> str:
    return f"{ROOT}/{federation}/{node}/ctl"


def join_topic(federation: str, parent: str, child: str) -> str:
    """Where ``child`` announces that it joins (or leaves) ``parent`` (re-parenting)."""
    return f"{ROOT}/{federation}/{parent}/join/{child}"


def join_filter(federation: str, parent: str) -> str:
    return f"{ROOT}/{federation}/{parent}/join/+"


@dataclass(frozen=True, slots=True)
class ParsedTopic:
    federation: str
    node: str
    kind: Kind
    child: str | None = None


def parse_topic(topic: str) -> ParsedTopic | None:
    """Split one of the scheme's topics (chunk and delta-slot topics are the node's ``model``
    kind); else None."""
    parts = topic.split("/")
    if len(parts) < 4 or parts[0] != ROOT:
        return None
    _, federation, node, kind, *rest = parts
    if kind in ("up", "join") and len(rest) == 1:
        return ParsedTopic(federation, node, kind, rest[0])  # type: ignore[arg-type]
    if kind == "model" and (not rest or (len(rest) == 2 and rest[0] in ("chunk", "delta"))):
        return ParsedTopic(federation, node, "model")
    if kind in ("status", "ctl", "metrics") and not rest:
        return ParsedTopic(federation, node, kind)  # type: ignore[arg-type]
    return None
