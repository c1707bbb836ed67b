"""``hfl-mqtt export``: a model of the registry in a format other tools load.

- ``torch``: a ``state_dict`` (tensor names as the model's, e.g. ``fc1.weight``) written with
  ``torch.save``; ``torch.load(path, weights_only=True)`` reads it and ``load_state_dict`` puts it
  into the task's torch model. Needs the ``torch`` extra.
- ``flower``: a Flower ``ArrayRecord`` (one ``numpy.ndarray`` ``Array`` per tensor, keyed by name),
  serialized as Flower's own protobuf message ``flwr.proto.recorddict_pb2.ArrayRecord``, the
  form it takes inside Flower's messages; ``hfl_mqtt.flower.codec.read_array_record`` reads
  it back. Needs the ``flower`` extra (its plug-in writes it).
- ``npz``: what ``np.savez`` writes, the tensor names as keys (``np.load(path)[name]``).

Files are written atomically, at exactly the path given.
"""

from __future__ import annotations

import io
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal, get_args

import numpy as np

from hfl_mqtt.aggregation.base import Model
from hfl_mqtt.files import atomic_write
from hfl_mqtt.plugins import flower
from hfl_mqtt.registry import ModelCard, load_model

__all__ = ["FORMATS", "ExportFormat", "encode", "export"]

ExportFormat = Literal["torch", "flower", "npz"]
FORMATS: tuple[ExportFormat, ...] = get_args(ExportFormat)


@contextmanager
def _extra(extra: str, fmt: str) -> Iterator[None]:
    """Turn a failed import of an optional dependency into a message saying what to install."""
    try:
        yield
    except ImportError as exc:
        raise ImportError(
            f"{exc.name or 'a dependency'} is not installed, and exporting to {fmt} needs it: "
            f"pip install 'hfl-mqtt[{extra}]'"
        ) from exc


def encode(model: Model, fmt: ExportFormat) -> bytes:
    """The bytes of ``model`` in the format ``fmt``."""
    buffer = io.BytesIO()
    if fmt == "torch":
        with _extra("torch", "torch"):
            import torch

        state_dict = {name: torch.from_numpy(np.array(a)) for name, a in model.items()}
        torch.save(state_dict, buffer)
        return buffer.getvalue()
    if fmt == "flower":
        with _extra("flower", "flower"):
            return flower().encode_model(model)
    if fmt == "npz":
        # np.savez's layout (one uncompressed NAME.npy member per tensor), written here because
        # np.savez takes the names as keyword arguments, where "file" would collide.
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
            for name, array in model.items():
                with archive.open(f"{name}.npy", "w", force_zip64=True) as member:
                    np.lib.format.write_array(member, np.asarray(array), allow_pickle=False)
        return buffer.getvalue()
    raise ValueError(f"unknown export format {fmt!r}: one of {', '.join(FORMATS)}")


def export(
    source: Path,
    fmt: ExportFormat,
    out: Path,
    *,
    version: int | None = None,
    latest: bool = False,
) -> ModelCard:
    """Write the model at ``source`` (see ``load_model``) to ``out`` in ``fmt``; its card."""
    model, card = load_model(source, version=version, latest=latest)
    data = encode(model, fmt)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, data)
    return card
