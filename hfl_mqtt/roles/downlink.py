"""The model stream down: how a parent publishes its versions, and how a child follows them.

Without delta coding (``DownstreamConfig.delta_codec`` None) every version is a full model in
the downlink codec, retained on ``hfl/{fed}/{node}/model``: a child that subscribes gets the
current one at once.

With delta coding the parent publishes version v as a delta against v - 1 in the delta codec
(``q8``, ``topk0.05+q8+zstd``, ...), retained on slot ``v % K`` of
``hfl/{fed}/{node}/model/delta/{slot}`` (K = ``keyframe_every``). Every K versions it also
retains a keyframe, the whole model, losslessly, on ``.../model``. A child that joins takes the
keyframe and the deltas since it from the retained slots, as a video decoder takes a key frame
and the frames after it, then follows the slots alone: a child in step downloads deltas only.

No drift: the parent keeps ``reference``, the model its children hold, and codes each delta
against it rather than against its own model::

    delta_v = encode(model_v - reference_{v-1})
    reference_v = reference_{v-1} + decode(delta_v)

Both sides compute ``reference_v`` with the same float operations on the same bytes, so they
agree to the bit; what the codec leaves out stays in ``model - reference`` and goes out with
the next delta (error feedback). Every message names the SHA-256 of the model it yields; a child
whose result differs, or that misses a delta, goes back to the keyframe
(``DownlinkFollower.resync``). The keyframe and the delta of one version share one update id,
so a version that comes again is recognised in either form.

``DownlinkWriter`` and ``DownlinkReader`` are pure (no I/O); ``DownlinkFollower`` adds a child's
subscriptions.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from typing import Any, Literal

import numpy as np
import structlog

from hfl_mqtt.aggregation.base import Model
from hfl_mqtt.codec import (
    Compressor,
    DecodeLimits,
    Envelope,
    Header,
    ModelSpec,
    decode_tensor,
    encode_envelope,
)
from hfl_mqtt.errors import DigestMismatchError
from hfl_mqtt.roles.messages import decode_from, new_update_id
from hfl_mqtt.topics import model_delta_filter, model_delta_topic, model_topic
from hfl_mqtt.transport.base import Channel, Incoming

__all__ = [
    "KEYFRAME_EVERY_METRIC",
    "DownlinkFollower",
    "DownlinkReader",
    "DownlinkWriter",
    "Taken",
    "model_digest",
]

log = structlog.get_logger("hfl_mqtt.roles")

KEYFRAME_EVERY_METRIC = "keyframe_every"
"""Header metric of every message of a delta-coded stream: K (children then follow the slots)."""
DIGEST_METRIC = "model_digest"
"""Header metric: SHA-256 (hex) of the model the message yields (``model_digest``)."""

_OWN_OUTPUT = DecodeLimits(max_decoded_bytes=1 << 62)
"""Decoding what the writer encoded itself needs no size bound."""

MetricDict = dict[str, float | int | str | bool]

Taken = Literal["new", "again", "old", "waiting", "resync"]
"""What a message did to a reader: moved it to a newer version; was its current version again
(a parent putting its messages back after a reconnect); was older (history a subscription
replays); waits for the deltas or the keyframe before it; showed a gap (go back to the
keyframe)."""


def model_digest(model: Mapping[str, np.ndarray]) -> str:
    """SHA-256 (hex) over the tensors' names, dtypes, shapes and bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(model):
        array = np.ascontiguousarray(model[name])
        h.update(f"{name}\0{array.dtype.str}\0{array.shape}\0".encode())
        h.update(array.data)
    return h.hexdigest()


def _apply(reference: Model, delta: Mapping[str, np.ndarray]) -> Model:
    """``reference + delta``, tensor by tensor, in the reference's dtypes (both sides alike)."""
    return {
        name: np.add(value, delta[name], dtype=value.dtype, casting="unsafe")
        for name, value in reference.items()
    }


class DownlinkWriter:
    """The parent's side: the messages (topic, payload; all retained) of each new version.

    ``codec`` encodes full models (the level's downlink codec: the first model, and every
    version without delta coding); ``delta`` (None: no delta coding) encodes the deltas;
    keyframes after the first travel losslessly (``npy``, with zstd if ``delta`` uses it).
    """

    def __init__(
        self,
        federation: str,
        node: str,
        codec: Compressor,
        delta: Compressor | None = None,
        keyframe_every: int = 20,
    ) -> None:
        if keyframe_every < 1:
            raise ValueError("keyframe_every must be at least 1")
        self.federation, self.node = federation, node
        self.codec, self.delta = codec, delta
        self.keyframe_every = keyframe_every
        lossless = "npy+zstd" if delta is not None and delta.spec.zstd else "npy"
        self._keyframe_codec = Compressor(lossless)
        self.reference: Model | None = None
        """What the children hold (None: nothing yet, the next version is a full model)."""
        self._keyframe_version = 0
        self.retained: dict[str, bytes] = {}
        """The message retained on each topic of the stream, as published last."""
        self.current: bytes | None = None
        """The message of the newest version (on the slot it went to, or the model topic)."""

    @property
    def topic(self) -> str:
        return model_topic(self.federation, self.node)

    def publish(
        self, version: int, model: Mapping[str, np.ndarray], metrics: MetricDict
    ) -> list[tuple[str, bytes]]:
        """The messages that carry ``version`` (``model``) to the children, in publishing
        order; the writer remembers each as what its topic retains."""
        update_id = new_update_id()
        if self.delta is None:
            payload, _ = self._frame(version, None, model, self.codec, metrics, update_id)
            self.retained, self.current = {self.topic: payload}, payload
            return [(self.topic, payload)]
        metrics = {**metrics, KEYFRAME_EVERY_METRIC: self.keyframe_every}
        slot = model_delta_topic(self.federation, self.node, version % self.keyframe_every)
        if self.reference is None:
            # A fresh stream: a full model, on the keyframe topic for those who join and on the
            # slot for those who follow the slots (children of a parent back without its state).
            payload, self.reference = self._frame(
                version, None, model, self.codec, metrics, update_id
            )
            self._keyframe_version = version
            out = [(self.topic, payload), (slot, payload)]
        else:
            reference = self.reference
            change = {k: np.subtract(model[k], v, dtype=v.dtype) for k, v in reference.items()}
            payload, self.reference = self._frame(
                version,
                version - 1,
                change,
                self.delta,
                metrics,
                update_id,
                lambda decoded: _apply(reference, decoded),
            )
            out = [(slot, payload)]
            if version - self._keyframe_version >= self.keyframe_every:
                keyframe, _ = self._frame(
                    version, None, self.reference, self._keyframe_codec, metrics, update_id
                )
                self._keyframe_version = version
                out.insert(0, (self.topic, keyframe))
        self.current = payload
        self.retained.update(out)
        return out

    def _frame(
        self,
        version: int,
        base: int | None,
        arrays: Mapping[str, np.ndarray],
        codec: Compressor,
        metrics: MetricDict,
        update_id: str,
        result: Callable[[Model], Model] | None = None,
    ) -> tuple[bytes, Model]:
        """One message of the stream and the model a child has once it took it: the decoded
        tensors themselves (a full model) or ``result`` of them (a delta)."""
        tensors = tuple(codec.encode(arrays))
        decoded = {t.name: decode_tensor(t, _OWN_OUTPUT) for t in tensors}
        yields = decoded if result is None else result(decoded)
        header = Header(
            federation=self.federation,
            sender=self.node,
            kind="model",
            version=version,
            base_version=base,
            metrics={**metrics, DIGEST_METRIC: model_digest(yields)},
            codec=str(codec.spec),
            update_id=update_id,
        )
        spec = codec.spec
        payload = encode_envelope(
            Envelope(header, tensors), zstd_level=spec.zstd_level if spec.zstd else None
        )
        return payload, yields

    # --- checkpoints ----------------------------------------------------------------------------

    def state(self) -> tuple[dict[str, Any], Model, dict[str, bytes]]:
        """Values, the reference and the retained messages (for a checkpoint)."""
        values: dict[str, Any] = {
            "keyframe_version": self._keyframe_version,
            "topics": list(self.retained),
            "has_reference": self.reference is not None,
        }
        if self.delta is not None:
            values["delta_rng"] = self.delta.state()[0]["rng"]
        blobs = {f"stream.{i}": payload for i, payload in enumerate(self.retained.values())}
        if self.current is not None:
            blobs["published"] = self.current
        return values, dict(self.reference or {}), blobs

    def load(self, values: Mapping[str, Any], reference: Model, blobs: Mapping[str, bytes]) -> None:
        """Restore what ``state`` gave."""
        self._keyframe_version = int(values["keyframe_version"])
        self.reference = dict(reference) if values["has_reference"] else None
        self.retained = {t: blobs[f"stream.{i}"] for i, t in enumerate(values["topics"])}
        self.current = blobs.get("published")
        if self.delta is not None and "delta_rng" in values:
            self.delta.load({"rng": values["delta_rng"]}, {})


class DownlinkReader:
    """A child's side, pure: the model it holds, from the messages of its parent's stream.

    ``model`` is the reader's own: copy it before changing it. ``spec`` (None: the first full
    model's) is what every model and delta must fit.
    """

    def __init__(self, spec: ModelSpec | None = None, *, max_waiting: int = 256) -> None:
        self.spec = spec
        self.model: Model | None = None
        self.header: Header | None = None
        """The header of the message that gave ``model``."""
        self.streaming = False
        """The parent codes deltas (its messages name ``keyframe_every``)."""
        self._waiting: dict[int, Envelope] = {}
        """Deltas ahead of the model, by the version they apply to."""
        self._max_waiting = max_waiting

    @property
    def version(self) -> int | None:
        return None if self.header is None else self.header.version

    @property
    def behind(self) -> bool:
        """Deltas are waiting for one that has not come (or for a keyframe)."""
        return bool(self._waiting) or (self.streaming and self.model is None)

    def take(self, envelope: Envelope) -> Taken:
        """Take one message of the parent's stream (checked to be the parent's model kind).

        Raises ``DecodeError`` for tensors that do not fit, and ``DigestMismatchError`` when
        the model a message yields is not the one it names (the reader then holds nothing:
        the next keyframe starts it again).
        """
        header = envelope.header
        if KEYFRAME_EVERY_METRIC in header.metrics:
            self.streaming = True
        if self.header is not None and header.version <= self.header.version:
            return "again" if header.update_id == self.header.update_id else "old"
        if header.base_version is None:
            self._hold(header, envelope.arrays(expect=self.spec))
        elif self.header is not None and header.base_version == self.header.version:
            assert self.model is not None
            self._hold(header, _apply(self.model, envelope.arrays(expect=self.spec)))
        else:
            self._wait(envelope)
            return "waiting" if self.model is None else "resync"
        self._catch_up()
        return "new"

    def _hold(self, header: Header, model: Model) -> None:
        named = header.metrics.get(DIGEST_METRIC)
        if isinstance(named, str) and model_digest(model) != named:
            self.model = self.header = None
            raise DigestMismatchError(
                "header.metrics.model_digest",
                f"version {header.version} does not yield the model its parent named",
            )
        if self.spec is None:
            self.spec = ModelSpec.from_arrays(model)
        self.model, self.header = model, header

    def _wait(self, envelope: Envelope) -> None:
        base = envelope.header.base_version
        assert base is not None
        self._waiting[base] = envelope
        # A keyframe is never more than K versions back: 2 K deltas are plenty to wait for.
        k = envelope.header.metrics.get(KEYFRAME_EVERY_METRIC)
        limit = min(self._max_waiting, 2 * k) if isinstance(k, int) and k > 0 else 2
        while len(self._waiting) > limit:
            del self._waiting[min(self._waiting)]

    def _catch_up(self) -> None:
        """Apply the waiting deltas that now follow on; forget those behind the model."""
        assert self.header is not None
        while (following := self._waiting.pop(self.header.version, None)) is not None:
            self.take(following)
        for base in [b for b in self._waiting if b < self.header.version]:
            del self._waiting[base]


class DownlinkFollower:
    """A child following its parent's stream on ``link``: a ``DownlinkReader`` and the
    subscriptions it needs (the keyframe topic until in step, the delta slots after)."""

    def __init__(self, link: Channel, federation: str, spec: ModelSpec | None = None) -> None:
        self.link, self.federation, self.spec = link, federation, spec
        self.parent: str | None = None
        self.reader = DownlinkReader(spec)
        self._keyframes = False
        self._slots = False
        self._joined_at: int | None = None
        """The version held when the slots were subscribed: their replay of it is no news."""

    @property
    def model(self) -> Model | None:
        return self.reader.model

    @property
    def header(self) -> Header | None:
        return self.reader.header

    def carries(self, topic: str) -> bool:
        """``topic`` is one of the parent's stream topics (the keyframe or a slot)."""
        if self.parent is None:
            return False
        keyframes = model_topic(self.federation, self.parent)
        return topic == keyframes or topic.startswith(f"{keyframes}/delta/")

    async def follow(self, parent: str) -> None:
        """Follow ``parent`` from its keyframe (a new parent: start over)."""
        if self.parent is not None:
            await self._leave()
        self.parent = parent
        self.reader = DownlinkReader(self.spec if self.spec is not None else self.reader.spec)
        await self._subscribe_keyframes()

    async def take(self, message: Incoming) -> Taken:
        """Read one message of the stream (``carries(message.topic)``); raises
        ``DecodeError`` for one that is not a model of the parent's or does not fit."""
        assert self.parent is not None
        envelope = decode_from(
            message.payload, kind="model", sender=self.parent, federation=self.federation
        )
        try:
            taken = self.reader.take(envelope)
        except DigestMismatchError:
            await self.resync()
            raise
        if taken == "again" and message.retain and self.reader.version == self._joined_at:
            taken = "old"  # the slot of the keyframe's version, replayed as we subscribed
        if taken == "resync":
            log.info("a delta is missing: back to the keyframe", parent=self.parent)
            await self.resync()
        await self._settle()
        return taken

    async def resync(self) -> None:
        """Take the keyframe and the retained deltas again (a subscription replays them)."""
        await self._subscribe_keyframes()
        if self._slots:
            assert self.parent is not None
            await self.link.subscribe(
                model_delta_filter(self.federation, self.parent), chunked_retained=True
            )

    async def _settle(self) -> None:
        """In step with a delta-coding parent: on the slots, off the keyframes."""
        if not self.reader.streaming or self.reader.behind or self.reader.model is None:
            return
        assert self.parent is not None
        if not self._slots:
            self._slots = True
            self._joined_at = self.reader.version
            await self.link.subscribe(
                model_delta_filter(self.federation, self.parent), chunked_retained=True
            )
        if self._keyframes:
            self._keyframes = False
            await self.link.unsubscribe(
                model_topic(self.federation, self.parent), chunked_retained=True
            )

    async def _subscribe_keyframes(self) -> None:
        assert self.parent is not None
        self._keyframes = True
        await self.link.subscribe(model_topic(self.federation, self.parent), chunked_retained=True)

    async def _leave(self) -> None:
        assert self.parent is not None
        if self._keyframes:
            await self.link.unsubscribe(
                model_topic(self.federation, self.parent), chunked_retained=True
            )
        if self._slots:
            await self.link.unsubscribe(
                model_delta_filter(self.federation, self.parent), chunked_retained=True
            )
        self._keyframes = self._slots = False
