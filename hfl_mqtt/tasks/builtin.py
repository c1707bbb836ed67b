"""The built-in task factory: digits or Synthetic data, softmax, MLP or torch MLP.

Data sets and partitions are cached per process, keyed by the settings they depend on, because a
simulation runs many workers in one process that all load the same data. Cached arrays are made
read-only; tasks copy what they keep.
"""

from __future__ import annotations

import functools

import numpy as np

from hfl_mqtt.tasks.base import PartitionConfig, SyntheticConfig, Task, TaskConfig, TaskError
from hfl_mqtt.tasks.datasets import TrainTestSplit, load_digits_split, make_synthetic
from hfl_mqtt.tasks.numpy_models import NumpyTask
from hfl_mqtt.tasks.partition import Indices, partition_indices

__all__ = ["clear_caches", "make_task"]


def _read_only(split: TrainTestSplit) -> TrainTestSplit:
    for array in split:
        array.flags.writeable = False
    return split


@functools.lru_cache(maxsize=8)
def _digits(test_fraction: float, seed: int) -> TrainTestSplit:
    return _read_only(load_digits_split(test_fraction, seed))


@functools.lru_cache(maxsize=8)
def _digits_partitions(
    test_fraction: float, seed: int, num_partitions: int, config: PartitionConfig
) -> tuple[Indices, ...]:
    parts = partition_indices(_digits(test_fraction, seed).y_train, num_partitions, config)
    for p in parts:
        p.flags.writeable = False
    return tuple(parts)


@functools.lru_cache(maxsize=8)
def _synthetic(
    config: SyntheticConfig, num_devices: int, test_fraction: float, seed: int
) -> tuple[TrainTestSplit, ...]:
    data = make_synthetic(
        config.alpha,
        config.beta,
        num_devices,
        num_classes=config.num_classes,
        dim=config.dim,
        samples_per_worker=config.samples_per_worker,
        samples_sigma=config.samples_sigma,
        min_samples=config.min_samples,
        test_fraction=test_fraction,
        seed=seed,
    )
    return (*(_read_only(d) for d in data.devices), _read_only(data.pooled()))


def clear_caches() -> None:
    """Forget the cached data sets and partitions (they are kept for the process's lifetime)."""
    for cached in (_digits, _digits_partitions, _synthetic):
        cached.cache_clear()


def _data(
    config: TaskConfig, partition: int | None, num_partitions: int
) -> tuple[TrainTestSplit, int, int]:
    """Training and evaluation arrays, number of features, number of classes."""
    if config.dataset == "digits":
        full = _digits(config.test_fraction, config.seed)
        num_features, num_classes = 64, 10
        if partition is None:
            return full, num_features, num_classes
        idx = _digits_partitions(
            config.test_fraction, config.seed, num_partitions, config.partition
        )[partition]
        x, y = full.x_train[idx], full.y_train[idx]
        return TrainTestSplit(x, y, x, y), num_features, num_classes

    synthetic = config.synthetic
    num_devices = synthetic.num_devices or num_partitions
    if partition is not None and num_partitions != num_devices:
        raise TaskError(
            f"synthetic.num_devices is {num_devices} but there are {num_partitions} partitions: "
            "Synthetic is naturally partitioned, one device per worker"
        )
    devices = _synthetic(synthetic, num_devices, config.test_fraction, config.seed)
    split = devices[-1] if partition is None else devices[partition]
    return split, synthetic.dim, synthetic.num_classes


def make_task(config: TaskConfig, partition: int | None, num_partitions: int) -> Task:
    """Build the task that ``config`` describes (the default ``TaskConfig.factory``).

    - ``partition=None`` (the root's evaluator): trains on the whole training set (a centralised
      baseline) and evaluates on the held-out test set (pooled over devices for Synthetic).
    - a worker of ``digits``: its partition of the training split, by ``config.partition``;
      ``evaluate()`` reports on that same local data (training loss and accuracy).
    - a worker of ``synthetic``: device ``partition``'s data; ``evaluate()`` uses that device's
      own test samples.

    Every node draws the same initial weights from ``config.seed``; batch order differs per
    worker.
    """
    if num_partitions < 1:
        raise TaskError(f"num_partitions must be >= 1, got {num_partitions}")
    if partition is not None and not 0 <= partition < num_partitions:
        raise TaskError(f"partition {partition} is outside [0, {num_partitions})")
    split, num_features, num_classes = _data(config, partition, num_partitions)
    hidden = () if config.model == "softmax" else (config.hidden,)
    stream = np.random.SeedSequence([config.seed, 0 if partition is None else partition + 1])
    shuffle_seed = int(stream.generate_state(1)[0])
    if config.model == "torch_mlp":
        from hfl_mqtt.tasks.torch_models import TorchTask

        return TorchTask(
            *split,
            num_features=num_features,
            num_classes=num_classes,
            hidden=hidden,
            init_seed=config.seed,
            shuffle_seed=shuffle_seed,
            dp_sgd=config.dp_sgd,
        )
    return NumpyTask(
        *split,
        num_features=num_features,
        num_classes=num_classes,
        hidden=hidden,
        init_seed=config.seed,
        shuffle_seed=shuffle_seed,
    )
