"""Data sets that need no download: scikit-learn's digits, and the LEAF Synthetic benchmark.

Features are float32, labels int64. Everything is deterministic given the seed.
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import numpy.typing as npt

from hfl_mqtt.tasks.base import TaskError

__all__ = [
    "SyntheticData",
    "TrainTestSplit",
    "load_digits_split",
    "make_synthetic",
    "stratified_split",
]

Features = npt.NDArray[np.float32]
Labels = npt.NDArray[np.int64]


class TrainTestSplit(NamedTuple):
    """Training and test arrays of one data set (or of one device)."""

    x_train: Features
    y_train: Labels
    x_test: Features
    y_test: Labels


def _check_fraction(test_fraction: float) -> None:
    if not 0.0 < test_fraction < 1.0:
        raise TaskError(f"test_fraction must be in (0, 1), got {test_fraction}")


def stratified_split(
    labels: npt.ArrayLike, test_fraction: float, seed: int
) -> tuple[Labels, Labels]:
    """Train and test indices (sorted), each class split in the ratio ``test_fraction``."""
    _check_fraction(test_fraction)
    y = np.asarray(labels)
    rng = np.random.default_rng(seed)
    train: list[Labels] = []
    test: list[Labels] = []
    for cls in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == cls))
        n_test = round(test_fraction * idx.size)
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def _digits_file() -> Path:
    """scikit-learn's copy of the digits (``sklearn/datasets/data/digits.csv.gz``), found
    without importing scikit-learn: its import (scipy.stats and all) takes seconds, every
    worker process loads the digits, and the file is all ``load_digits`` reads."""
    try:
        spec = importlib.util.find_spec("sklearn")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "the digits data set needs scikit-learn: install the 'sim' extra "
            "(pip install 'hfl-mqtt[sim]')"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data" / "digits.csv.gz"
    if not path.is_file():
        raise TaskError(f"the digits data set is missing from scikit-learn: {path}")
    return path


def load_digits_split(test_fraction: float = 0.2, seed: int = 0) -> TrainTestSplit:
    """scikit-learn's 8x8 digits (1797 images, 64 features in [0, 1], 10 classes), split
    stratified by class into train and test."""
    _check_fraction(test_fraction)
    data = np.loadtxt(_digits_file(), delimiter=",")
    x, y = data[:, :-1], data[:, -1].astype(np.int64)
    features = (np.asarray(x, dtype=np.float32) / np.float32(16.0)).astype(np.float32)
    labels = np.asarray(y, dtype=np.int64)
    train, test = stratified_split(labels, test_fraction, seed)
    return TrainTestSplit(features[train], labels[train], features[test], labels[test])


@dataclass(frozen=True)
class SyntheticData:
    """Synthetic(alpha, beta): one train/test split per device."""

    devices: tuple[TrainTestSplit, ...]

    def pooled(self) -> TrainTestSplit:
        """All devices' training data, and all devices' test data, concatenated."""
        return TrainTestSplit(
            np.concatenate([d.x_train for d in self.devices]),
            np.concatenate([d.y_train for d in self.devices]),
            np.concatenate([d.x_test for d in self.devices]),
            np.concatenate([d.y_test for d in self.devices]),
        )


def make_synthetic(
    alpha: float,
    beta: float,
    num_workers: int,
    *,
    num_classes: int = 10,
    dim: int = 60,
    samples_per_worker: int = 200,
    samples_sigma: float = 2.0,
    min_samples: int = 50,
    test_fraction: float = 0.2,
    seed: int = 0,
) -> SyntheticData:
    """The Synthetic(alpha, beta) benchmark of LEAF and FedProx (Li et al. 2020, section 5.1).

    Device k has its own softmax model ``W_k ~ N(u_k, 1)``, ``b_k ~ N(u_k, 1)``, ``u_k ~ N(0,
    alpha)``, and its own features ``x ~ N(v_k, Sigma)``, ``v_k ~ N(B_k, 1)``, ``B_k ~ N(0,
    beta)``, ``Sigma = diag(j^-1.2)``; labels are ``argmax(W_k x + b_k)``. alpha controls how
    much the local models differ, beta how much the local data differ. As in the reference
    generator, alpha and beta are used as standard deviations (the paper writes variances; the
    two agree for the usual (0, 0) and (1, 1), not for (0.5, 0.5)).

    Device k draws from its own stream seeded by ``(seed, k)``, so adding devices does not change
    the existing ones. Sample counts are ``min_samples + floor(lognormal)``, with the lognormal's
    mean set so that counts average ``samples_per_worker``. Each device keeps a fraction
    ``test_fraction`` (at least one sample) as its test data.
    """
    _check_fraction(test_fraction)
    if num_workers < 1:
        raise TaskError(f"num_workers must be >= 1, got {num_workers}")
    if min_samples < 2 or samples_per_worker < min_samples:
        raise TaskError("need 2 <= min_samples <= samples_per_worker")
    extra_mean = samples_per_worker - min_samples
    # Mean of lognormal(mu, sigma) is exp(mu + sigma^2 / 2).
    mu = math.log(extra_mean) - samples_sigma**2 / 2 if extra_mean > 0 else -math.inf
    scale = np.sqrt(np.arange(1, dim + 1, dtype=np.float64) ** -1.2)

    devices = []
    for k in range(num_workers):
        rng = np.random.default_rng([seed, k])
        extra = int(rng.lognormal(mu, samples_sigma)) if extra_mean > 0 else 0
        n = min_samples + extra
        u = rng.normal(0.0, alpha)
        b_mean = rng.normal(0.0, beta)
        v = rng.normal(b_mean, 1.0, dim)
        w = rng.normal(u, 1.0, (num_classes, dim))
        b = rng.normal(u, 1.0, num_classes)
        x = v + rng.standard_normal((n, dim)) * scale
        y = np.argmax(x @ w.T + b, axis=1).astype(np.int64)
        x32 = x.astype(np.float32)
        order = rng.permutation(n)
        n_test = max(1, round(test_fraction * n))
        test, train = order[:n_test], order[n_test:]
        devices.append(TrainTestSplit(x32[train], y[train], x32[test], y[test]))
    return SyntheticData(tuple(devices))
