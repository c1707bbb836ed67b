"""The exception tree of hfl-mqtt.

Every exception the project raises on purpose is an ``HflError``::

    HflError
    ├── DecodeError            the peer sent bad data; the message is dropped, the node goes on
    │   ├── FrameError             bad magic, truncated or inconsistent framing
    │   ├── UnsupportedError       unknown format version, encoding (stype), dtype or flag
    │   ├── SizeLimitError         a declared or actual size over a configured limit
    │   ├── DigestMismatchError    content does not match its digest
    │   ├── SchemaError            a field is missing, of the wrong type or out of range
    │   ├── ModelMismatchError     tensors do not match the expected model (names, shapes, dtypes)
    │   ├── NonFiniteError         NaN or Inf in decoded values
    │   └── ChunkError             a chunk that cannot belong to its transfer
    ├── EncodeError            our own caller asked to encode something that cannot be encoded
    ├── CodecSpecError         a codec spec string or value is invalid (also a ValueError)
    ├── ConfigError            a configuration file or value is invalid (also a ValueError)
    ├── TaskError              a training task, its settings or its weights are invalid (ValueError)
    ├── BrokerError            a private Mosquitto broker (hfl_mqtt.brokers) failed to start or run
    ├── FlowerParentError      the Flower server above an aggregator failed, went away or sent junk
    ├── CheckpointError        a node's checkpoint is unreadable, or belongs to another config
    ├── ModelFileError         a registry's model file or card is missing, unreadable or corrupt
    └── TransportError         the MQTT link failed (the client library's errors, translated once)
        ├── AuthenticationError    the broker refused us for good: credentials, authorization, TLS
        ├── PublishRefusedError    the broker refused a publish (MQTT 5 PUBACK reason, e.g. 135)
        └── PublishTimeoutError    a publish was not acknowledged in time

``DecodeError`` is kept apart from everything else: it is the only exception a decoder lets
escape, whatever bytes it is given, and it always names the offending field.

Outside the tree, on purpose (catching ``HflError`` does not catch them):

- misuse of the API, which is a bug in the calling code to fix, not a condition to handle:
  ``TypeError`` for an argument of the wrong kind (a ``task`` that is not a ``Task``),
  ``ValueError`` for a value that cannot work (a root's config given to ``Worker``), and
  ``RuntimeError`` for a resource used out of order (a ``Worker`` or a link entered while
  already entered, ``Worker.run`` outside ``async with`` or twice);
- ``pydantic.ValidationError`` from building a config model directly in Python
  (``NodeConfig(...)``); the loaders and ``Worker.connect`` turn it into ``ConfigError``;
- exceptions raised by user code we call (a ``Task``'s methods, a task factory) pass through
  unchanged; a factory that returns something other than a ``Task`` gets a ``TaskError``;
- ``asyncio.CancelledError`` and ``KeyboardInterrupt``, which end a node as they end any task.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "AuthenticationError",
    "BrokerError",
    "CheckpointError",
    "ChunkError",
    "CodecSpecError",
    "ConfigError",
    "DecodeError",
    "DigestMismatchError",
    "EncodeError",
    "FlowerParentError",
    "FrameError",
    "HflError",
    "ModelFileError",
    "ModelMismatchError",
    "NonFiniteError",
    "PublishRefusedError",
    "PublishTimeoutError",
    "SchemaError",
    "SizeLimitError",
    "TaskError",
    "TransportError",
    "UnsupportedError",
]


class HflError(Exception):
    """Root of every exception hfl-mqtt raises on purpose."""


class DecodeError(HflError):
    """Bytes from a peer could not be decoded; ``field`` names where decoding failed."""

    def __init__(self, field: str, reason: str) -> None:
        self.field = field
        self.reason = reason
        super().__init__(f"{field}: {reason}")

    def __reduce__(self) -> tuple[type[DecodeError], tuple[str, str]]:
        return (type(self), (self.field, self.reason))


class FrameError(DecodeError):
    """Bad magic, truncation, or framing fields that contradict each other."""


class UnsupportedError(DecodeError):
    """A format version, encoding, dtype or flag this decoder does not know."""


class SizeLimitError(DecodeError):
    """A declared or actual size exceeds a configured limit (checked before allocating)."""


class DigestMismatchError(DecodeError):
    """The content does not match the digest it was sent with."""


class SchemaError(DecodeError):
    """A field is missing, has the wrong type, or holds a value out of range."""


class ModelMismatchError(DecodeError):
    """The tensors do not match the expected model: names, shapes or dtypes."""


class NonFiniteError(DecodeError):
    """Decoded values contain NaN or Inf."""


class ChunkError(DecodeError):
    """A chunk that cannot belong to its transfer (inconsistent header, conflicting duplicate)."""


class EncodeError(HflError):
    """The caller asked to encode something that cannot be encoded (a bug on our side)."""


class CodecSpecError(HflError, ValueError):
    """A codec spec string or value is invalid."""


class ConfigError(HflError, ValueError):
    """A configuration file or value is invalid; the message names the file and the field."""


class TaskError(HflError, ValueError):
    """A training task, its configuration or its weights are invalid."""


class CheckpointError(HflError):
    """A checkpoint that cannot be resumed from: unreadable, corrupt, of another format, or of
    a node whose config has changed since (``hfl-mqtt run --fresh`` starts over)."""


class ModelFileError(HflError):
    """A model of the registry (``hfl_mqtt.registry``) cannot be used: its ``.safetensors`` file
    or ``.json`` card is missing, unreadable, corrupt or not an hfl-mqtt model. The message names
    the file."""


class FlowerParentError(HflError):
    """The Flower server an aggregator serves as a client (``NodeConfig.flower_parent``) could
    not be reached, broke the connection, or asked for something the subtree cannot do."""


class ServerAppError(HflError):
    """The Flower ServerApp driving the root (``task.flower_app``) raised; the message names its
    error. The run ends, as Flower's own ends when its ServerApp fails."""


class TransportError(HflError):
    """The MQTT link failed: could not connect, lost the broker, or the broker refused."""


class AuthenticationError(TransportError):
    """The broker refused the connection for a reason no retry can fix: bad user name or
    password, not authorized, banned, or a TLS certificate that failed verification. The link
    fails at once instead of retrying."""


class PublishRefusedError(TransportError):
    """The broker acknowledged a publish with a failure reason (MQTT 5 PUBACK reason >= 128;
    135 when its ACL denies the topic): the message was not delivered. ``code`` is the reason."""

    def __init__(self, message: str, *, code: int) -> None:
        super().__init__(message)
        self.code = code

    def __reduce__(self) -> tuple[Any, ...]:
        return (_publish_refused, (str(self), self.code))


def _publish_refused(message: str, code: int) -> PublishRefusedError:
    return PublishRefusedError(message, code=code)


class PublishTimeoutError(TransportError):
    """A QoS 1 publish was not acknowledged within its timeout."""


class BrokerError(HflError):
    """A private Mosquitto broker could not be started, reached or observed (see its log tail)."""
