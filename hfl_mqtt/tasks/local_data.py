"""A task on a device's own data: a CSV (or ``.npy``) file of readings, numpy models only.

A board in a field logs sensor readings (soil moisture, temperature, ...) with a label column
into a file; its worker trains a numpy softmax regression or MLP on that file, and nothing
else: no scikit-learn, no torch. The root evaluates every global model on a held-out file of
the same layout. Point a node's task at this factory and describe the file in ``params``::

    task:
      factory: hfl_mqtt.tasks.local_data:make_task
      model: mlp                  # or softmax
      hidden: 16
      params:
        path: readings.csv        # a worker's own data; the root's: the held-out test file
        label: irrigation         # the label column (default "label"), integers 0..num_classes-1
        num_classes: 3            # every node must build the same model
        features: [soil_moisture, soil_temp_c]   # default: every column but the label
        mean: [25.0, 17.0]        # optional standardisation (x - mean) / std, per feature,
        std: [9.0, 5.0]           # the same on every node (not computed from local data)
        eval_path: recent.csv     # optional: a worker's own held-out readings

A relative ``path`` or ``eval_path`` is relative to the node's working directory (the systemd
unit of ``device_agents/`` runs in the node's state directory, ``/var/lib/hfl-mqtt/NODE``).

A CSV file has a header row naming its columns; values are numbers (a label may be written
``2`` or ``2.0``). A ``.npy`` file holds a 2-D numeric array; ``label`` and ``features`` are
then column indices (default: the last column is the label). Every problem with a file is a
``TaskError`` naming the file and, for a CSV value, its line and column.

A worker with ``eval_path`` evaluates on it; without, on its training data (as the digits
workers do). Its ``partition`` only seeds its batch order: the file is all its data.
"""

from __future__ import annotations

import array
import csv
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, NamedTuple

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from hfl_mqtt.tasks.base import Task, TaskConfig, TaskError
from hfl_mqtt.tasks.numpy_models import NumpyTask

__all__ = ["LocalData", "LocalDataParams", "load_local_data", "make_task"]

Column = str | int
"""A column by header name (CSV) or by 0-based index (negative from the end; CSV or npy)."""


class LocalDataParams(BaseModel):
    """``TaskConfig.params`` of a local-data task (see the module docstring)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    path: Path
    num_classes: Annotated[int, Field(ge=2)]
    label: Column | None = None
    """Default: the column named ``label`` of a CSV file, the last column of a ``.npy`` file."""
    features: tuple[Column, ...] | None = None
    """Default: every column but the label, in file order."""
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    eval_path: Path | None = None

    @model_validator(mode="after")
    def _consistent(self) -> LocalDataParams:
        if self.features is not None and not self.features:
            raise ValueError("features: give at least one column (or leave it out: all)")
        if (self.mean is None) != (self.std is None):
            raise ValueError("mean and std go together: give both or neither")
        if self.std is not None and not all(s > 0 and math.isfinite(s) for s in self.std):
            raise ValueError("std: every value must be a finite number > 0")
        if self.mean is not None and not all(math.isfinite(m) for m in self.mean):
            raise ValueError("mean: every value must be finite")
        if self.mean is not None and self.std is not None and len(self.mean) != len(self.std):
            raise ValueError(f"mean has {len(self.mean)} values, std {len(self.std)}")
        return self


class LocalData(NamedTuple):
    """Features (float32, standardised if asked) and labels (int64) of one file."""

    x: npt.NDArray[np.float32]
    y: npt.NDArray[np.int64]
    feature_names: tuple[str, ...]


def parse_params(config: TaskConfig) -> LocalDataParams:
    """``config.params`` checked; ``TaskError`` naming each problem."""
    try:
        return LocalDataParams.model_validate(config.params)
    except ValidationError as exc:
        problems = "; ".join(
            f"task.params.{'.'.join(str(p) for p in e['loc']) or '(top level)'}: {e['msg']}"
            for e in exc.errors()
        )
        raise TaskError(f"local data task: {problems}") from None


def _column_index(column: Column, names: Sequence[str], path: Path, what: str) -> int:
    if isinstance(column, int):
        if not -len(names) <= column < len(names):
            raise TaskError(
                f"{path}: {what} column {column} is out of range: the file has {len(names)} columns"
            )
        return column % len(names)
    if column not in names:
        raise TaskError(f"{path}: no {what} column {column!r}; the columns are {', '.join(names)}")
    return names.index(column)


def _header(row: list[str] | None, path: Path) -> list[str]:
    if not row or not any(cell.strip() for cell in row):
        raise TaskError(f"{path}: empty: expected a header row naming the columns")
    names = [cell.strip() for cell in row]
    if any(not name for name in names) or len(set(names)) != len(names):
        raise TaskError(f"{path}: line 1: the header needs distinct, non-empty column names")
    try:
        float(names[0])
    except ValueError:
        return names
    raise TaskError(f"{path}: line 1 holds numbers: expected a header row naming the columns")


def _read_csv(path: Path) -> tuple[list[str], npt.NDArray[np.float64]]:
    """Header and values of a CSV file; every value a finite number.

    Rows are parsed as they are read, into one flat buffer of doubles: a board's memory holds
    the numbers once, never the file's text or a Python object per value.
    """
    values = array.array("d")
    try:
        with path.open(newline="", encoding="utf8") as f:
            reader = csv.reader(f)
            names = _header(next(reader, None), path)
            for row in reader:
                if not row or not any(cell.strip() for cell in row):
                    continue  # blank lines, a trailing newline
                _parse_row(row, names, reader.line_num, path, values)
    except OSError as exc:
        raise TaskError(f"{path}: cannot read: {exc.strerror}") from None
    except (UnicodeDecodeError, csv.Error) as exc:
        raise TaskError(f"{path}: not a CSV text file: {exc}") from None
    table = np.frombuffer(values, dtype=np.float64) if values else np.empty(0)
    return names, table.reshape(-1, len(names))


def _parse_row(
    row: list[str], names: list[str], line: int, path: Path, out: array.array[float]
) -> None:
    if len(row) != len(names):
        raise TaskError(f"{path}: line {line}: {len(row)} values, the header has {len(names)}")
    for name, cell in zip(names, row, strict=True):
        try:
            value = float(cell)
        except ValueError:
            raise TaskError(
                f"{path}: line {line}, column {name!r}: {cell.strip()!r} is not a number"
            ) from None
        if not math.isfinite(value):
            raise TaskError(
                f"{path}: line {line}, column {name!r}: {cell.strip()!r} is not a finite number"
            )
        out.append(value)


def _read_npy(path: Path) -> tuple[list[str], npt.NDArray[np.float64]]:
    try:
        array = np.load(path, allow_pickle=False)
    except OSError as exc:
        raise TaskError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise TaskError(f"{path}: not a numeric .npy array: {exc}") from None
    if not isinstance(array, np.ndarray) or array.ndim != 2:
        shape = getattr(array, "shape", None)
        raise TaskError(f"{path}: expected a 2-D array (rows, columns), got shape {shape}")
    if not (np.issubdtype(array.dtype, np.number) or array.dtype == np.bool_):
        raise TaskError(f"{path}: expected a numeric array, got dtype {array.dtype}")
    values = array.astype(np.float64)
    if not np.isfinite(values).all():
        row = int(np.argwhere(~np.isfinite(values))[0][0])
        raise TaskError(f"{path}: row {row} holds a NaN or an infinity")
    return [str(i) for i in range(values.shape[1])], values


def load_local_data(path: Path, params: LocalDataParams) -> LocalData:
    """Read ``path`` (CSV, or ``.npy`` by its suffix) as ``params`` describe it."""
    is_npy = path.suffix.lower() == ".npy"
    names, values = _read_npy(path) if is_npy else _read_csv(path)
    if len(values) == 0:
        raise TaskError(f"{path}: no data rows")
    if len(names) < 2:
        raise TaskError(f"{path}: needs at least two columns (features and a label)")
    label = params.label if params.label is not None else (-1 if is_npy else "label")
    if is_npy and isinstance(label, str):
        raise TaskError(f"{path}: a .npy file has no column names: give label as an index")
    label_index = _column_index(label, names, path, "label")
    if params.features is None:
        feature_index = [i for i in range(len(names)) if i != label_index]
    else:
        feature_index = [_column_index(c, names, path, "feature") for c in params.features]
        if label_index in feature_index:
            raise TaskError(f"{path}: the label column {names[label_index]!r} is also a feature")
    labels = values[:, label_index]
    whole = labels == np.round(labels)
    if not whole.all():
        row = int(np.argmin(whole))
        raise TaskError(
            f"{path}: data row {row + 1}: label {labels[row]:g} is not a whole number "
            f"(column {names[label_index]!r})"
        )
    bad = (labels < 0) | (labels >= params.num_classes)
    if bad.any():
        row = int(np.argmax(bad))
        raise TaskError(
            f"{path}: data row {row + 1}: label {labels[row]:g} is outside "
            f"0..{params.num_classes - 1} (num_classes is {params.num_classes})"
        )
    x = values[:, feature_index]
    if params.mean is not None and params.std is not None:
        if len(params.mean) != x.shape[1]:
            raise TaskError(
                f"{path}: mean and std have {len(params.mean)} values for {x.shape[1]} features"
            )
        x = (x - np.asarray(params.mean)) / np.asarray(params.std)
    return LocalData(
        np.ascontiguousarray(x, dtype=np.float32),
        labels.astype(np.int64),
        tuple(names[i] for i in feature_index),
    )


def make_task(config: TaskConfig, partition: int | None, num_partitions: int) -> Task:
    """A ``TaskConfig.factory``: a numpy model on the file of ``config.params`` (module
    docstring). ``partition=None`` (the root) evaluates on ``path``, the held-out file."""
    params = parse_params(config)
    if config.model == "torch_mlp":
        raise TaskError(
            "local data task: model torch_mlp is not available (numpy models only: softmax or mlp)"
        )
    train = load_local_data(params.path, params)
    evaluation = train
    if partition is not None and params.eval_path is not None:
        evaluation = load_local_data(params.eval_path, params)
        if evaluation.feature_names != train.feature_names:
            raise TaskError(
                f"{params.eval_path}: features {', '.join(evaluation.feature_names)} differ "
                f"from {params.path}'s ({', '.join(train.feature_names)})"
            )
    stream = np.random.SeedSequence([config.seed, 0 if partition is None else partition + 1])
    return NumpyTask(
        train.x,
        train.y,
        evaluation.x,
        evaluation.y,
        num_features=train.x.shape[1],
        num_classes=params.num_classes,
        hidden=() if config.model == "softmax" else (config.hidden,),
        init_seed=config.seed,
        shuffle_seed=int(stream.generate_state(1)[0]),
    )
