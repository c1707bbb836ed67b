"""Split a labelled data set across workers: IID, Dirichlet label skew, or label shards.

Every scheme is deterministic given ``PartitionConfig.seed``, uses every index exactly once and
leaves no partition empty.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from hfl_mqtt.tasks.base import PartitionConfig, TaskError

__all__ = ["label_distribution", "partition_indices"]

Indices = npt.NDArray[np.int64]


def partition_indices(
    labels: npt.ArrayLike, num_partitions: int, config: PartitionConfig | None = None
) -> list[Indices]:
    """Indices (sorted, int64) of each partition of the samples whose labels are ``labels``.

    - ``iid``: shuffle and split evenly (sizes differ by at most one).
    - ``dirichlet``: for each class, proportions over partitions drawn from Dir(alpha); small
      alpha gives each partition few dominant classes and uneven sizes. A partition left with
      fewer than ``min(min_samples, n // num_partitions)`` samples is topped up with random
      samples taken from the largest partitions, which keeps the skew of all the others.
    - ``shards``: sort by label, cut into ``num_partitions * shards_per_worker`` shards of
      (nearly) equal size, give each partition ``shards_per_worker`` random shards (the FedAvg
      paper's pathological non-IID split: about ``shards_per_worker`` labels per partition).
    """
    config = config or PartitionConfig()
    y = np.asarray(labels)
    if y.ndim != 1:
        raise TaskError(f"labels must be one-dimensional, got shape {y.shape}")
    n = y.size
    if num_partitions < 1:
        raise TaskError(f"num_partitions must be >= 1, got {num_partitions}")
    if num_partitions > n:
        raise TaskError(f"cannot split {n} samples into {num_partitions} non-empty partitions")
    rng = np.random.default_rng(config.seed)
    if config.scheme == "iid":
        parts = np.array_split(rng.permutation(n), num_partitions)
    elif config.scheme == "dirichlet":
        min_size = min(config.min_samples, n // num_partitions)
        parts = _dirichlet(y, num_partitions, config.alpha, max(min_size, 1), rng)
    else:
        parts = _shards(y, num_partitions, config.shards_per_worker, rng)
    return [np.sort(p).astype(np.int64) for p in parts]


def _dirichlet(
    y: npt.NDArray[np.generic],
    num_partitions: int,
    alpha: float,
    min_size: int,
    rng: np.random.Generator,
) -> list[Indices]:
    _, classes = np.unique(y, return_inverse=True)
    owner = np.empty(y.size, dtype=np.int64)
    for cls in range(int(classes.max()) + 1):
        idx = rng.permutation(np.flatnonzero(classes == cls))
        proportions = rng.dirichlet(np.full(num_partitions, alpha))
        cuts = np.round(np.cumsum(proportions)[:-1] * idx.size).astype(np.int64)
        counts = np.diff(np.concatenate([[0], cuts, [idx.size]]))
        owner[idx] = np.repeat(np.arange(num_partitions), counts)

    # Top up: n >= num_partitions * min_size, so while one partition is short another has
    # more than min_size to give, and the loop ends.
    sizes = np.bincount(owner, minlength=num_partitions)
    for part in np.flatnonzero(sizes < min_size):
        while sizes[part] < min_size:
            donor = int(np.argmax(sizes))
            take = min(min_size - sizes[part], sizes[donor] - min_size)
            moved = rng.choice(np.flatnonzero(owner == donor), size=take, replace=False)
            owner[moved] = part
            sizes[donor] -= take
            sizes[part] += take
    order = np.argsort(owner, kind="stable")
    return np.split(order, np.cumsum(sizes)[:-1])


def _shards(
    y: npt.NDArray[np.generic],
    num_partitions: int,
    shards_per_worker: int,
    rng: np.random.Generator,
) -> list[Indices]:
    num_shards = num_partitions * shards_per_worker
    if num_shards > y.size:
        raise TaskError(
            f"cannot cut {y.size} samples into {num_partitions} x {shards_per_worker} "
            "non-empty shards"
        )
    # Shuffle first so that samples of one label are in random order within the sort.
    order = rng.permutation(y.size)
    order = order[np.argsort(y[order], kind="stable")]
    shards = np.array_split(order, num_shards)
    assignment = rng.permutation(num_shards).reshape(num_partitions, shards_per_worker)
    return [np.concatenate([shards[s] for s in row]) for row in assignment]


def label_distribution(labels: npt.ArrayLike, parts: Sequence[Indices]) -> npt.NDArray[np.int64]:
    """Counts of each label (columns, in sorted label order) in each partition (rows)."""
    _, classes = np.unique(np.asarray(labels), return_inverse=True)
    num_classes = int(classes.max()) + 1 if classes.size else 0
    return np.stack([np.bincount(classes[p], minlength=num_classes) for p in parts]).astype(
        np.int64
    )
