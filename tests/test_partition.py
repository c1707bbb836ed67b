"""Partitioners: every index once, sizes, skew, determinism, errors."""

from __future__ import annotations

from typing import Literal

import numpy as np
import pytest
from pydantic import ValidationError

from hfl_mqtt.tasks import PartitionConfig, TaskError, label_distribution, partition_indices

Scheme = Literal["iid", "dirichlet", "shards"]
SCHEMES: tuple[Scheme, ...] = ("iid", "dirichlet", "shards")
BALANCED = np.repeat(np.arange(10), 100)  # 10 classes x 100
IMBALANCED = np.random.default_rng(7).choice(10, size=1797, p=np.linspace(1, 10, 10) / 55)

CASES = [
    pytest.param(labels, p, cfg, id=f"{name}-{p}-{cfg.scheme}-{cfg.alpha}-{cfg.shards_per_worker}")
    for name, labels in [("balanced", BALANCED), ("imbalanced", IMBALANCED)]
    for p in (1, 3, 10, 32)
    for cfg in (
        PartitionConfig(scheme="iid"),
        PartitionConfig(scheme="dirichlet", alpha=0.05),
        PartitionConfig(scheme="dirichlet", alpha=1.0),
        PartitionConfig(scheme="dirichlet", alpha=100.0),
        PartitionConfig(scheme="shards", shards_per_worker=1),
        PartitionConfig(scheme="shards", shards_per_worker=3),
    )
]


@pytest.mark.parametrize(("labels", "num_partitions", "config"), CASES)
def test_every_index_exactly_once(
    labels: np.ndarray, num_partitions: int, config: PartitionConfig
) -> None:
    parts = partition_indices(labels, num_partitions, config)
    assert len(parts) == num_partitions
    assert all(p.dtype == np.int64 for p in parts)
    assert all(np.all(np.diff(p) > 0) for p in parts)  # sorted, no repeats
    np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(labels.size))
    sizes = np.array([p.size for p in parts])
    if config.scheme == "iid":
        assert sizes.max() - sizes.min() <= 1
    elif config.scheme == "dirichlet":
        assert sizes.min() >= min(config.min_samples, labels.size // num_partitions)
    else:
        shard = labels.size / (num_partitions * config.shards_per_worker)
        assert sizes.min() >= np.floor(shard) * config.shards_per_worker
        assert sizes.max() <= np.ceil(shard) * config.shards_per_worker


@pytest.mark.parametrize("scheme", SCHEMES)
def test_deterministic_given_the_seed(scheme: Scheme) -> None:
    config = PartitionConfig(scheme=scheme, seed=3)
    a = partition_indices(IMBALANCED, 8, config)
    b = partition_indices(IMBALANCED, 8, config)
    c = partition_indices(IMBALANCED, 8, config.model_copy(update={"seed": 4}))
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))


def _mean_tv_from_global(labels: np.ndarray, parts: list[np.ndarray]) -> float:
    counts = label_distribution(labels, parts).astype(float)
    local = counts / counts.sum(axis=1, keepdims=True)
    overall = counts.sum(axis=0) / counts.sum()
    return float(0.5 * np.abs(local - overall).sum(axis=1).mean())


def test_dirichlet_skew_grows_as_alpha_shrinks() -> None:
    skews = [
        np.mean(
            [
                _mean_tv_from_global(
                    BALANCED,
                    partition_indices(
                        BALANCED, 10, PartitionConfig(scheme="dirichlet", alpha=alpha, seed=s)
                    ),
                )
                for s in range(3)
            ]
        )
        for alpha in (100.0, 1.0, 0.1)
    ]
    assert skews[0] < 0.1
    assert skews[0] < skews[1] < skews[2]
    assert skews[2] > 0.6


def test_dirichlet_tops_up_small_partitions() -> None:
    config = PartitionConfig(scheme="dirichlet", alpha=0.01, min_samples=15)
    parts = partition_indices(BALANCED, 50, config)
    assert min(p.size for p in parts) >= 15
    np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(BALANCED.size))
    # More partitions than min_samples allows: the floor drops to n // partitions.
    parts = partition_indices(BALANCED[:100], 40, config)
    assert min(p.size for p in parts) >= 2


def test_shards_give_each_partition_few_labels() -> None:
    for per_worker in (1, 2, 3):
        config = PartitionConfig(scheme="shards", shards_per_worker=per_worker)
        parts = partition_indices(IMBALANCED, 20, config)
        labels_per_part = (label_distribution(IMBALANCED, parts) > 0).sum(axis=1)
        # A shard straddles at most two labels (shards are smaller than any class here).
        assert labels_per_part.max() <= 2 * per_worker
        assert labels_per_part.mean() <= per_worker + 1
    parts = partition_indices(BALANCED, 10, PartitionConfig(scheme="shards"))
    assert ((label_distribution(BALANCED, parts) > 0).sum(axis=1) <= 2).all()


def test_arbitrary_label_values() -> None:
    labels = np.array(["cat", "dog", "emu"] * 20)
    for scheme in SCHEMES:
        parts = partition_indices(labels, 4, PartitionConfig(scheme=scheme))
        assert sorted(np.concatenate(parts).tolist()) == list(range(60))
    counts = label_distribution(labels, [np.arange(3), np.arange(3, 60)])
    np.testing.assert_array_equal(counts, [[1, 1, 1], [19, 19, 19]])


@pytest.mark.parametrize(
    ("labels", "num_partitions", "config", "match"),
    [
        (np.arange(5), 6, PartitionConfig(), "5 samples into 6"),
        (np.arange(5), 0, PartitionConfig(), "num_partitions must be >= 1"),
        (np.arange(10), 4, PartitionConfig(scheme="shards", shards_per_worker=3), "4 x 3"),
        (np.zeros((4, 2)), 2, PartitionConfig(), "one-dimensional"),
    ],
)
def test_impossible_requests(
    labels: np.ndarray, num_partitions: int, config: PartitionConfig, match: str
) -> None:
    with pytest.raises(TaskError, match=match):
        partition_indices(labels, num_partitions, config)
    with pytest.raises(ValueError, match=match):  # TaskError is a ValueError
        partition_indices(labels, num_partitions, config)


def test_each_sample_in_its_own_partition_is_allowed() -> None:
    for scheme in SCHEMES:
        config = PartitionConfig(scheme=scheme, alpha=0.1, shards_per_worker=1)
        parts = partition_indices(np.arange(6) % 2, 6, config)
        assert sorted(p.size for p in parts) == [1] * 6


@pytest.mark.parametrize(
    "bad", [{"alpha": 0.0}, {"shards_per_worker": 0}, {"scheme": "zipf"}, {"seeds": 1}]
)
def test_config_validation(bad: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        PartitionConfig(**bad)  # type: ignore[arg-type]
