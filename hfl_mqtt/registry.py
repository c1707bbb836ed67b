"""The model registry: the models a root produced, kept on disk with a card each.

A registry is a directory (the root's ``models/``) holding, per kept version::

    v12.safetensors   the tensors (safetensors format), named as the model's, in its order
    v12.json          the card: version, test accuracy and loss, round, wall time, config hash,
                      codecs, the tensors' names, shapes and dtypes, and the sha256 of the file

The tensor file also carries the card (without file name and digest) in its safetensors
metadata, so a copied ``.safetensors`` alone still says what it is. The registry keeps the last
``keep_last`` versions and the best by accuracy (on a tie, the newer), and deletes the others.

Every file is written atomically (a temporary file in the same directory, fsync, rename, fsync of
the directory), the tensors before the card and a card deleted before its tensors: a crash
leaves at most a tensor file without a card, which the next registry opened there removes.
``safetensors`` is imported only when a model is written or read, so a worker never loads it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import structlog

from hfl_mqtt.aggregation.base import Model
from hfl_mqtt.errors import EncodeError, ModelFileError
from hfl_mqtt.files import atomic_write

__all__ = [
    "CARD_FORMAT",
    "ModelCard",
    "ModelRegistry",
    "TensorInfo",
    "load_model",
    "read_cards",
]

log = structlog.get_logger("hfl_mqtt.registry")

CARD_FORMAT = 1
"""The layout of a card; a reader refuses any other (a later layout gets a new number)."""

_METADATA_KEY = "hfl_mqtt.card"
_NAME = re.compile(r"v(0|[1-9][0-9]*)\.(json|safetensors)")
_TEMPORARY = re.compile(r"\.v[0-9]+\.(json|safetensors)\..*\.tmp")
_MAX_HEADER = 100 * 2**20  # safetensors' own bound on the JSON header
_STORABLE_KINDS = frozenset("biuf")  # bool, signed and unsigned integers, floats


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a model: its name, shape and numpy dtype name (``"float32"``)."""

    name: str
    shape: tuple[int, ...]
    dtype: str


@dataclass(frozen=True)
class ModelCard:
    """What the registry knows about one model; ``file`` is relative to the card's directory."""

    version: int
    accuracy: float
    loss: float
    round: int
    seconds: float
    """Wall time since the root started, when the model was recorded."""
    time: str
    """When the model was recorded: ISO 8601, UTC."""
    config_hash: str
    codecs: Mapping[str, str]
    tensors: tuple[TensorInfo, ...]
    file: str
    sha256: str

    def to_json(self) -> dict[str, Any]:
        """The card as written to ``v{version}.json`` (non-finite numbers as ``null``)."""
        data = dataclasses.asdict(self)
        data["codecs"] = dict(self.codecs)
        data["tensors"] = [
            {"name": t.name, "shape": list(t.shape), "dtype": t.dtype} for t in self.tensors
        ]
        for key in ("accuracy", "loss", "seconds"):
            data[key] = data[key] if math.isfinite(data[key]) else None
        return {"format": CARD_FORMAT, **data}

    @classmethod
    def from_json(cls, data: object, source: str) -> ModelCard:
        """A card from its JSON value; ``ModelFileError`` names ``source`` and the bad field."""
        try:
            return _parse_card(data)
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelFileError(f"{source} is not a valid model card: {exc}") from None

    def best_key(self) -> tuple[float, int]:
        """Orders cards by accuracy (non-finite lowest), then by version."""
        return (self.accuracy if math.isfinite(self.accuracy) else -math.inf, self.version)


def _parse_card(data: object) -> ModelCard:
    if not isinstance(data, dict):
        raise TypeError("not a JSON object")
    if data.get("format") != CARD_FORMAT:
        raise ValueError(f"format is {data.get('format')!r}, this version reads {CARD_FORMAT}")
    fields = {f.name for f in dataclasses.fields(ModelCard)}
    if set(data) != fields | {"format"}:
        missing, extra = sorted(fields - set(data)), sorted(set(data) - fields - {"format"})
        raise KeyError(f"missing {missing}, unknown {extra}")

    def number(key: str) -> float:
        value = data[key]
        if value is None:
            return math.nan
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise TypeError(f"{key} must be a number, got {value!r}")
        return float(value)

    def integer(key: str) -> int:
        value = data[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise TypeError(f"{key} must be an integer >= 0, got {value!r}")
        return value

    def string(key: str, value: object = None) -> str:
        value = data[key] if value is None else value
        if not isinstance(value, str):
            raise TypeError(f"{key} must be a string, got {value!r}")
        return value

    codecs, tensors = data["codecs"], data["tensors"]
    if not isinstance(codecs, dict):
        raise TypeError("codecs must be an object")
    if not isinstance(tensors, list) or not all(isinstance(t, dict) for t in tensors):
        raise TypeError("tensors must be a list of objects")
    infos = []
    for t in tensors:
        shape = t["shape"]
        if not isinstance(shape, list) or not all(
            isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape
        ):
            raise TypeError(f"tensors: shape must be a list of sizes, got {shape!r}")
        infos.append(
            TensorInfo(string("tensors", t["name"]), tuple(shape), string("tensors", t["dtype"]))
        )
    file = string("file")
    if Path(file).name != file:
        raise ValueError(f"file must be a file name in the card's directory, got {file!r}")
    return ModelCard(
        version=integer("version"),
        accuracy=number("accuracy"),
        loss=number("loss"),
        round=integer("round"),
        seconds=number("seconds"),
        time=string("time"),
        config_hash=string("config_hash"),
        codecs={string("codecs", k): string("codecs", v) for k, v in codecs.items()},
        tensors=tuple(infos),
        file=file,
        sha256=string("sha256"),
    )


def read_cards(directory: Path) -> list[ModelCard]:
    """The cards of a registry directory, oldest version first; ``ModelFileError`` if one cannot
    be read, or names a version or file other than its own."""
    try:
        paths = [p for p in directory.iterdir() if _NAME.fullmatch(p.name) and p.suffix == ".json"]
    except OSError as exc:
        raise ModelFileError(
            f"cannot read the model registry {directory}: {exc.strerror}"
        ) from None
    cards = [_read_card(path) for path in paths]
    return sorted(cards, key=lambda card: card.version)


def _read_card(path: Path) -> ModelCard:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ModelFileError(f"cannot read the model card {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ModelFileError(f"the model card {path} is not UTF-8 text") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ModelFileError(f"the model card {path} is not valid JSON: {exc}") from None
    card = ModelCard.from_json(data, str(path))
    match = _NAME.fullmatch(path.name)
    if match is not None and (
        int(match[1]) != card.version or card.file != f"v{card.version}.safetensors"
    ):
        raise ModelFileError(
            f"the model card {path} is of version {card.version} with file {card.file!r}: "
            "a card must keep its own name"
        )
    return card


class ModelRegistry:
    """The models of one root in ``directory``: ``record`` each new global model, then ask for
    the ``best`` or the ``latest``. Opened on a directory that already holds cards (a resumed
    root), it goes on with them; a card it cannot read is a ``ModelFileError``."""

    def __init__(
        self,
        directory: Path,
        *,
        keep_last: int = 5,
        config_hash: str = "",
        codecs: Mapping[str, str] | None = None,
    ) -> None:
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {keep_last}")
        self.directory = Path(directory)
        self.keep_last = keep_last
        self.config_hash = config_hash
        self.codecs = dict(codecs or {})
        self.directory.mkdir(parents=True, exist_ok=True)
        self._cards = {card.version: card for card in read_cards(self.directory)}
        self._remove_leftovers()

    def cards(self) -> list[ModelCard]:
        """The kept models' cards, oldest version first."""
        return [self._cards[v] for v in sorted(self._cards)]

    def best(self) -> ModelCard | None:
        """The card of the most accurate kept model (on a tie, the newer); None if empty."""
        return max(self._cards.values(), key=ModelCard.best_key, default=None)

    def latest(self) -> ModelCard | None:
        """The card of the newest kept model; None if empty."""
        return self._cards[max(self._cards)] if self._cards else None

    def path(self, card: ModelCard) -> Path:
        """Where a card's tensors are."""
        return self.directory / card.file

    def record(
        self,
        version: int,
        model: Mapping[str, np.ndarray],
        *,
        accuracy: float,
        loss: float,
        round: int,
        seconds: float,
    ) -> ModelCard:
        """Write ``model`` as ``v{version}`` with its card, then drop what is no longer kept.

        Versions only grow: recording a version the registry already holds, or an older one,
        replaces the cards from that version on (a root resumed from an earlier checkpoint
        produces those versions again). It blocks on the disk (fsync): an event loop calls it
        through ``asyncio.to_thread``."""
        from safetensors.numpy import save

        if isinstance(version, bool) or version < 0 or round < 0:
            raise ValueError(f"version and round must be >= 0, got {version} and {round}")
        arrays = {name: _storable(name, array) for name, array in model.items()}
        tensors = tuple(
            TensorInfo(n, tuple(map(int, a.shape)), a.dtype.name) for n, a in arrays.items()
        )
        card = ModelCard(
            version=version,
            accuracy=float(accuracy),
            loss=float(loss),
            round=round,
            seconds=float(seconds),
            time=datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            config_hash=self.config_hash,
            codecs=dict(self.codecs),
            tensors=tensors,
            file=f"v{version}.safetensors",
            sha256="",
        )
        metadata = card.to_json()
        del metadata["file"], metadata["sha256"]
        data = save(arrays, metadata={_METADATA_KEY: json.dumps(metadata)})
        card = dataclasses.replace(card, sha256=hashlib.sha256(data).hexdigest())
        replaced = [v for v in self._cards if v >= version]
        for v in replaced:
            self._delete(self._cards.pop(v))
        if replaced:
            log.info("registry_replaced", versions=sorted(replaced), by=version)
        atomic_write(self.directory / card.file, data)
        atomic_write(
            self.directory / f"v{version}.json",
            (json.dumps(card.to_json(), indent=1) + "\n").encode(),
        )
        self._cards[version] = card
        self._prune()
        return card

    def _prune(self) -> None:
        keep = set(sorted(self._cards)[-self.keep_last :])
        best = self.best()
        if best is not None:
            keep.add(best.version)
        for version in [v for v in self._cards if v not in keep]:
            self._delete(self._cards.pop(version))

    def _delete(self, card: ModelCard) -> None:
        # The card first: a crash in between leaves a tensor file without a card, never the
        # reverse; the next registry opened here removes it.
        (self.directory / f"v{card.version}.json").unlink(missing_ok=True)
        (self.directory / card.file).unlink(missing_ok=True)

    def _remove_leftovers(self) -> None:
        """Remove what a crash can leave: temporary files and tensor files without a card."""
        for path in self.directory.iterdir():
            name = _NAME.fullmatch(path.name)
            orphan = (
                name is not None and name[2] == "safetensors" and int(name[1]) not in self._cards
            )
            if orphan or _TEMPORARY.fullmatch(path.name):
                log.info("registry_leftover_removed", path=str(path))
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()


def _storable(name: str, array: np.ndarray) -> np.ndarray:
    array = np.asarray(array)
    if array.dtype.kind not in _STORABLE_KINDS:
        raise EncodeError(f"tensor {name!r}: a {array.dtype} array cannot be stored in a registry")
    return np.ascontiguousarray(array).astype(array.dtype.newbyteorder("="), copy=False)


def load_model(
    path: Path, *, version: int | None = None, latest: bool = False
) -> tuple[Model, ModelCard]:
    """A model and its card, from a ``.safetensors`` file, its ``.json`` card, or a registry
    directory (its best model; ``latest=True`` for the newest, ``version=N`` for that one).

    The file's digest is checked against its card, and the tensors against the card's list;
    the model's tensors come in the order they were recorded. Anything wrong with the files is
    a ``ModelFileError`` naming the file.
    """
    path = Path(path)
    if version is not None and latest:
        raise ValueError("give version or latest, not both")
    if path.is_dir():
        cards = read_cards(path)
        if not cards:
            raise ModelFileError(f"the model registry {path} holds no model")
        if version is not None:
            chosen = next((c for c in cards if c.version == version), None)
            if chosen is None:
                kept = ", ".join(str(c.version) for c in cards)
                raise ModelFileError(f"{path} has no version {version} (it keeps {kept})")
        else:
            chosen = cards[-1] if latest else max(cards, key=ModelCard.best_key)
        return _load_tensors(path / chosen.file, chosen), chosen
    if version is not None or latest:
        raise ModelFileError(
            f"{path} is one model, not a registry directory: a version or the latest can only "
            "be chosen in a directory"
        )
    if path.suffix == ".json":
        card = _read_card(path)
        return _load_tensors(path.parent / card.file, card), card
    if path.suffix == ".safetensors":
        sibling = path.with_suffix(".json")
        if _NAME.fullmatch(path.name) and sibling.is_file():
            card = _read_card(sibling)
            return _load_tensors(path, card), card
        return _load_bare(path)
    if not path.exists():
        raise ModelFileError(f"no model at {path}: no such file or directory")
    raise ModelFileError(
        f"{path} is not a model: give a .safetensors file, its .json card or a registry directory"
    )


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ModelFileError(f"cannot read the model file {path}: {exc.strerror}") from None


def _load_tensors(path: Path, card: ModelCard) -> Model:
    data = _read_bytes(path)
    if hashlib.sha256(data).hexdigest() != card.sha256:
        raise ModelFileError(f"the model file {path} does not match its card's sha256 (corrupt?)")
    model = _decode(path, data)
    expected = [(t.name, t.shape, t.dtype) for t in card.tensors]
    if sorted(expected) != sorted((n, a.shape, a.dtype.name) for n, a in model.items()):
        raise ModelFileError(f"the tensors of {path} are not the ones its card lists")
    return {t.name: model[t.name] for t in card.tensors}


def _load_bare(path: Path) -> tuple[Model, ModelCard]:
    """A ``.safetensors`` without its card: the card comes from the file's metadata."""
    data = _read_bytes(path)
    metadata = _metadata(path, data)
    if _METADATA_KEY not in metadata:
        raise ModelFileError(f"{path} has no hfl-mqtt model card in its metadata")
    try:
        raw = json.loads(metadata[_METADATA_KEY])
    except json.JSONDecodeError as exc:
        raise ModelFileError(f"the model card in {path}'s metadata is not JSON: {exc}") from None
    if isinstance(raw, dict):
        raw = {**raw, "file": path.name, "sha256": hashlib.sha256(data).hexdigest()}
    card = ModelCard.from_json(raw, f"the metadata of {path}")
    return _load_tensors(path, card), card


def _metadata(path: Path, data: bytes) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors header (8-byte little-endian length, then JSON)."""
    if len(data) < 8:
        raise ModelFileError(f"{path} is not a safetensors file (too short)")
    (size,) = struct.unpack("<Q", data[:8])
    if size > min(_MAX_HEADER, len(data) - 8):
        raise ModelFileError(f"{path} is not a safetensors file (bad header length)")
    try:
        header = json.loads(data[8 : 8 + size])
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ModelFileError(f"{path} is not a safetensors file (bad header)") from None
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(metadata, dict):
        return {}
    return {str(k): str(v) for k, v in metadata.items()}


def _decode(path: Path, data: bytes) -> Model:
    from safetensors import SafetensorError
    from safetensors.numpy import load

    try:
        return load(data)
    except (SafetensorError, ValueError, TypeError) as exc:
        raise ModelFileError(f"{path} is not a readable safetensors file: {exc}") from None
