"""hfl-mqtt: hierarchical federated learning over MQTT."""

from hfl_mqtt.errors import (
    BrokerError,
    ChunkError,
    CodecSpecError,
    ConfigError,
    DecodeError,
    DigestMismatchError,
    EncodeError,
    FlowerParentError,
    FrameError,
    HflError,
    ModelMismatchError,
    NonFiniteError,
    PublishTimeoutError,
    SchemaError,
    SizeLimitError,
    TaskError,
    TransportError,
    UnsupportedError,
)

__version__ = "0.1.0"

__all__ = [
    "BrokerError",
    "ChunkError",
    "CodecSpecError",
    "ConfigError",
    "DecodeError",
    "DigestMismatchError",
    "EncodeError",
    "FlowerParentError",
    "FrameError",
    "HflError",
    "ModelMismatchError",
    "NonFiniteError",
    "PublishTimeoutError",
    "SchemaError",
    "SizeLimitError",
    "TaskError",
    "TransportError",
    "UnsupportedError",
    "__version__",
]
