"""hfl-mqtt: hierarchical federated learning over MQTT."""

from hfl_mqtt.errors import (
    ChunkError,
    CodecSpecError,
    DecodeError,
    DigestMismatchError,
    EncodeError,
    FrameError,
    HflError,
    ModelMismatchError,
    NonFiniteError,
    SchemaError,
    SizeLimitError,
    UnsupportedError,
)

__version__ = "0.1.0"

__all__ = [
    "ChunkError",
    "CodecSpecError",
    "DecodeError",
    "DigestMismatchError",
    "EncodeError",
    "FrameError",
    "HflError",
    "ModelMismatchError",
    "NonFiniteError",
    "SchemaError",
    "SizeLimitError",
    "UnsupportedError",
    "__version__",
]
