"""Checkpoints: an aggregator's learning state on disk, written atomically, read back checked.

A checkpoint holds plain values (JSON), named groups of named tensors (the model, the ledger's
models, a strategy's buffer or history, error-feedback residuals) and raw payloads (the last
model message published, the last report sent up), with the fingerprint of the config it
belongs to. It is one file, ``checkpoint.hfl`` in the node's state directory::

    b"HFLCKPT1" | sha256(body) (32 bytes) | body: msgpack {fingerprint, values, models, blobs}

Tensors are stored as ``np.save`` bytes (read back with ``allow_pickle=False``). A write goes
to a temporary file in the same directory, is fsynced, renamed over the old one, and the
directory is fsynced: a crash leaves the old checkpoint or the new one, never a mix.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgpack
import numpy as np

from hfl_mqtt.aggregation.base import Model
from hfl_mqtt.config import NodeConfig
from hfl_mqtt.errors import CheckpointError
from hfl_mqtt.files import atomic_write

if TYPE_CHECKING:
    from hfl_mqtt.registry import ModelRegistry

__all__ = [
    "CHECKPOINT_FILE",
    "Checkpoint",
    "CheckpointStore",
    "NodeState",
    "config_fingerprint",
    "default_state_dir",
    "read_checkpoint",
    "write_checkpoint",
]

CHECKPOINT_FILE = "checkpoint.hfl"
_MAGIC = b"HFLCKPT1"
_DIGEST = 32

_LEARNING_FIELDS = {
    "downstream": {
        "mode",
        "server_lr",
        "mixing",
        "buffer_size",
        "weight_by_examples",
        "staleness",
        "max_staleness",
        "flower_strategy",
        "codec",
    },
    "upstream": {"parent", "codec", "error_feedback"},
}
"""What a checkpoint's state depends on, besides the node's place and task. Brokers,
deadlines, participation, rounds, time budgets and fallbacks may change between runs."""


@dataclass
class Checkpoint:
    """One node's state: plain values, named models and raw payloads."""

    fingerprint: str
    values: dict[str, Any] = field(default_factory=dict)
    models: dict[str, Model] = field(default_factory=dict)
    blobs: dict[str, bytes] = field(default_factory=dict)


def config_fingerprint(config: NodeConfig) -> str:
    """A hash of what a node's checkpointed state depends on: federation, node, task (not its
    training settings), the aggregation settings and codecs, and the parent's id."""
    task = config.task.model_dump(mode="json", exclude={"train"})
    learning: dict[str, Any] = {
        "federation": config.federation,
        "node": config.node,
        "task": task,
    }
    for side, names in _LEARNING_FIELDS.items():
        link = getattr(config, side)
        if link is not None:
            learning[side] = link.model_dump(mode="json", include=names)
    text = json.dumps(learning, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def default_state_dir(config: NodeConfig) -> Path:
    """Where a node keeps its state: ``state_dir`` if set, else ``{federation}/{node}`` under
    ``$HFL_MQTT_STATE_DIR``, systemd's ``$STATE_DIRECTORY`` or ``~/.local/state/hfl-mqtt``."""
    if config.state_dir is not None:
        return config.state_dir
    base = os.environ.get("HFL_MQTT_STATE_DIR") or os.environ.get("STATE_DIRECTORY")
    root = Path(base.split(":")[0]) if base else Path.home() / ".local" / "state" / "hfl-mqtt"
    return root / config.federation / config.node


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def write_checkpoint(path: Path, checkpoint: Checkpoint) -> int:
    """Write ``checkpoint`` to ``path`` atomically; returns its size in bytes."""
    body = msgpack.packb(
        {
            "fingerprint": checkpoint.fingerprint,
            "values": json.dumps(checkpoint.values),
            "models": {
                group: {name: _npy(array) for name, array in model.items()}
                for group, model in checkpoint.models.items()
            },
            "blobs": checkpoint.blobs,
        },
        use_bin_type=True,
    )
    data = _MAGIC + hashlib.sha256(body).digest() + body
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, data)
    return len(data)


def read_checkpoint(path: Path) -> Checkpoint:
    """Read and check a checkpoint; ``CheckpointError`` says what is wrong with it."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"cannot read the checkpoint {path}: {exc.strerror}") from None
    if not data.startswith(_MAGIC):
        raise CheckpointError(f"{path} is not an hfl-mqtt checkpoint (or of a newer format)")
    digest, body = data[len(_MAGIC) : len(_MAGIC) + _DIGEST], data[len(_MAGIC) + _DIGEST :]
    if hashlib.sha256(body).digest() != digest:
        raise CheckpointError(f"the checkpoint {path} is corrupt (its digest does not match)")
    try:
        raw = msgpack.unpackb(body, raw=False)
        models = {
            group: {
                name: np.load(io.BytesIO(blob), allow_pickle=False) for name, blob in model.items()
            }
            for group, model in raw["models"].items()
        }
        return Checkpoint(raw["fingerprint"], json.loads(raw["values"]), models, raw["blobs"])
    except (ValueError, KeyError, TypeError, msgpack.UnpackException) as exc:
        raise CheckpointError(f"the checkpoint {path} cannot be read: {exc}") from None


class CheckpointStore:
    """The checkpoint of one node in its state directory: load (checked against the config's
    fingerprint), save, discard."""

    def __init__(self, directory: Path, fingerprint: str, *, every: int = 1) -> None:
        self.directory = directory
        self.path = directory / CHECKPOINT_FILE
        self.fingerprint = fingerprint
        self.every = every
        self.writes = 0
        self.bytes_written = 0

    @classmethod
    def for_node(cls, config: NodeConfig) -> CheckpointStore:
        every = config.downstream.checkpoint_every if config.downstream is not None else 0
        return cls(default_state_dir(config), config_fingerprint(config), every=every)

    def exists(self) -> bool:
        return self.path.exists()

    def load(self) -> Checkpoint | None:
        """The node's checkpoint, or None if there is none; ``CheckpointError`` if it cannot
        be used (unreadable, or written under another config)."""
        if not self.path.exists():
            return None
        checkpoint = read_checkpoint(self.path)
        if checkpoint.fingerprint != self.fingerprint:
            raise CheckpointError(
                f"the checkpoint {self.path} belongs to another config of this node (its task, "
                "aggregation, its own codecs or parent changed): start over (hfl-mqtt run "
                "--fresh; hfl-mqtt sim without --resume), or give the node another state_dir"
            )
        return checkpoint

    def save(self, values: Mapping[str, Any], models: Mapping[str, Model], **blobs: bytes) -> None:
        checkpoint = Checkpoint(self.fingerprint, dict(values), dict(models), dict(blobs))
        self.bytes_written = write_checkpoint(self.path, checkpoint)
        self.writes += 1

    def discard(self) -> bool:
        """Remove the checkpoint (start over); True if there was one."""
        if not self.path.exists():
            return False
        self.path.unlink()
        return True


@dataclass(frozen=True)
class NodeState:
    """What an aggregator keeps on disk: its checkpoints, the checkpoint it resumes from (if
    any) and, at the root, its models."""

    store: CheckpointStore
    resume_from: Checkpoint | None = None
    registry: ModelRegistry | None = None
