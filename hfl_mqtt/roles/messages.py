"""Building and reading the messages nodes exchange: models down, deltas up, status, control."""

from __future__ import annotations

import json
import uuid
from collections import deque
from collections.abc import Iterable, Mapping

import numpy as np

from hfl_mqtt.codec import (
    Compressor,
    Envelope,
    Header,
    decode_envelope,
    encode_message,
)
from hfl_mqtt.errors import SchemaError
from hfl_mqtt.topics import NODE_ID

__all__ = [
    "JOIN",
    "LEAVE",
    "STOP",
    "RecentIds",
    "decode_from",
    "delta_message",
    "model_message",
    "new_update_id",
    "parse_ctl",
    "parse_reparent",
    "parse_status",
    "parse_status_parent",
    "status_payload",
]

STOP = json.dumps({"cmd": "stop"}).encode()
JOIN = json.dumps({"cmd": "join"}).encode()
LEAVE = json.dumps({"cmd": "leave"}).encode()


def new_update_id() -> str:
    """A fresh, unique update id (as ``Header`` makes by default)."""
    return uuid.uuid4().hex


def model_message(
    federation: str,
    sender: str,
    version: int,
    model: Mapping[str, np.ndarray],
    compressor: Compressor,
    metrics: Mapping[str, float | int | str | bool] | None = None,
) -> bytes:
    header = Header(
        federation=federation,
        sender=sender,
        kind="model",
        version=version,
        metrics=dict(metrics or {}),
    )
    return encode_message(header, model, compressor)


def delta_message(
    federation: str,
    sender: str,
    base_version: int,
    delta: Mapping[str, np.ndarray],
    num_examples: int,
    compressor: Compressor,
    metrics: Mapping[str, float | int | str | bool] | None = None,
    *,
    update_id: str | None = None,
) -> bytes:
    """A delta against ``base_version``; ``update_id`` names it (default: a fresh one)."""
    header = Header(
        federation=federation,
        sender=sender,
        kind="delta",
        version=base_version + 1,
        base_version=base_version,
        num_examples=num_examples,
        metrics=dict(metrics or {}),
        update_id=update_id or new_update_id(),
    )
    return encode_message(header, delta, compressor)


def decode_from(payload: bytes, *, kind: str, sender: str, federation: str) -> Envelope:
    """Decode an envelope and check it is a ``kind`` message from ``sender`` in ``federation``.

    Raises ``DecodeError`` (SchemaError for a header that does not fit where it arrived).
    """
    envelope = decode_envelope(payload)
    header = envelope.header
    if header.kind != kind:
        raise SchemaError("header.kind", f"expected a {kind}, got a {header.kind}")
    if header.sender != sender:
        raise SchemaError("header.sender", f"{header.sender!r} arrived on {sender!r}'s topic")
    if header.federation != federation:
        raise SchemaError("header.federation", f"{header.federation!r} is not {federation!r}")
    return envelope


class RecentIds:
    """The last ``size`` update ids seen: QoS 1 may deliver a message twice."""

    def __init__(self, size: int = 4096, ids: Iterable[str] = ()) -> None:
        self._order: deque[str] = deque()
        self._ids: set[str] = set()
        self._size = size
        for update_id in ids:
            self.seen(update_id)

    def ids(self) -> list[str]:
        """The ids remembered, oldest first."""
        return list(self._order)

    def known(self, update_id: str) -> bool:
        """True if ``update_id`` was seen before (without remembering it)."""
        return update_id in self._ids

    def seen(self, update_id: str) -> bool:
        """True if ``update_id`` was seen before; remembers it either way."""
        if update_id in self._ids:
            return True
        self._ids.add(update_id)
        self._order.append(update_id)
        if len(self._order) > self._size:
            self._ids.discard(self._order.popleft())
        return False


def status_payload(state: str, **fields: object) -> bytes:
    return json.dumps({"state": state, **fields}).encode()


def _json(payload: bytes) -> dict[str, object] | None:
    try:
        value = json.loads(payload)
    # RecursionError: a peer's deeply nested JSON ("[[[[..."), which would crash the reader.
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


def parse_status(payload: bytes) -> str | None:
    """``online`` / ``offline`` from a status message, or None if it is not one."""
    value = _json(payload)
    state = value.get("state") if value else None
    return state if isinstance(state, str) else None


def parse_ctl(payload: bytes) -> str | None:
    """The command of a control message (``stop``), or None."""
    value = _json(payload)
    cmd = value.get("cmd") if value else None
    return cmd if isinstance(cmd, str) else None


def parse_reparent(payload: bytes) -> str | None:
    """The new parent of a ``{"cmd": "reparent", "parent": ID}`` control message, or None."""
    value = _json(payload)
    if not value or value.get("cmd") != "reparent":
        return None
    parent = value.get("parent")
    return parent if isinstance(parent, str) and NODE_ID.fullmatch(parent) else None


def parse_status_parent(payload: bytes) -> str | None:
    """The parent a node's status names (where it is attached now), or None."""
    value = _json(payload)
    parent = value.get("parent") if value else None
    return parent if isinstance(parent, str) and NODE_ID.fullmatch(parent) else None
