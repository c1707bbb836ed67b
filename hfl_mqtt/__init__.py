"""hfl-mqtt: hierarchical federated learning over MQTT.

The public API: a worker embedded in your own program (``Worker.connect``), a node run from
its config (``load_node``, ``run_node``), the ``Task`` plug-in interface, a model the root kept
(``load_model``, hfl_mqtt/registry.py), and the exception tree (``hfl_mqtt.errors``).
``import hfl_mqtt`` is light: it loads the errors only, and the rest (pydantic, numpy, the MQTT
client) when first used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from hfl_mqtt.errors import (
    AuthenticationError,
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
    ModelFileError,
    ModelMismatchError,
    NonFiniteError,
    PublishRefusedError,
    PublishTimeoutError,
    SchemaError,
    SizeLimitError,
    TaskError,
    TransportError,
    UnsupportedError,
)

if TYPE_CHECKING:
    from hfl_mqtt.api import Worker
    from hfl_mqtt.config import BrokerAddress, NodeConfig, TlsConfig, load_node
    from hfl_mqtt.registry import ModelCard, load_model
    from hfl_mqtt.roles.node import run_node
    from hfl_mqtt.roles.report import NodeReport
    from hfl_mqtt.tasks.base import EvalResult, Task, TrainConfig, TrainResult

__version__ = "0.1.0"

_LAZY = {
    "BrokerAddress": "hfl_mqtt.config",
    "EvalResult": "hfl_mqtt.tasks.base",
    "NodeConfig": "hfl_mqtt.config",
    "NodeReport": "hfl_mqtt.roles.report",
    "Task": "hfl_mqtt.tasks.base",
    "TlsConfig": "hfl_mqtt.config",
    "TrainConfig": "hfl_mqtt.tasks.base",
    "TrainResult": "hfl_mqtt.tasks.base",
    "Worker": "hfl_mqtt.api",
    "ModelCard": "hfl_mqtt.registry",
    "load_model": "hfl_mqtt.registry",
    "load_node": "hfl_mqtt.config",
    "run_node": "hfl_mqtt.roles.node",
}
"""Public names imported on first use, by the module that defines them."""

__all__ = [
    "AuthenticationError",
    "BrokerAddress",
    "BrokerError",
    "ChunkError",
    "CodecSpecError",
    "ConfigError",
    "DecodeError",
    "DigestMismatchError",
    "EncodeError",
    "EvalResult",
    "FlowerParentError",
    "FrameError",
    "HflError",
    "ModelCard",
    "ModelFileError",
    "ModelMismatchError",
    "NodeConfig",
    "NodeReport",
    "NonFiniteError",
    "PublishRefusedError",
    "PublishTimeoutError",
    "SchemaError",
    "SizeLimitError",
    "Task",
    "TaskError",
    "TlsConfig",
    "TrainConfig",
    "TrainResult",
    "TransportError",
    "UnsupportedError",
    "Worker",
    "__version__",
    "load_model",
    "load_node",
    "run_node",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # once imported, a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
