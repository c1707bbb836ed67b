"""The training plug-in interface: ``Task``, its configuration, and ``load_task``.

A worker holds one ``Task`` for its data partition and calls it in a thread, off the event loop;
the root holds one on the held-out test split and evaluates each global model with it. Weights
cross this interface as named float32 numpy arrays, named like a torch state dict
(``fc1.weight`` of shape (out, in), ``fc1.bias``, ...).

``TaskConfig.factory`` names the callable that builds a task (``"module:callable"``), so a user
can point it at their own code; the built-in factory is ``hfl_mqtt.tasks.builtin:make_task``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, Protocol, cast, runtime_checkable

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from hfl_mqtt.errors import TaskError

__all__ = [
    "EvalResult",
    "PartitionConfig",
    "SyntheticConfig",
    "Task",
    "TaskConfig",
    "TaskError",
    "TaskFactory",
    "TrainConfig",
    "TrainResult",
    "check_weights",
    "load_task",
]


@dataclass(frozen=True)
class TrainResult:
    """What one ``Task.train`` call reports.

    ``num_examples`` is the size of the local training set (the FedAvg weight), not the number of
    examples processed. The built-in tasks report ``metrics`` ``loss`` and ``accuracy`` (mean
    cross-entropy and accuracy on each batch before its step, without the proximal term) and
    ``steps``.
    """

    num_examples: int
    metrics: dict[str, float] = field(default_factory=dict)


def train_result(
    num_examples: int, steps: int, loss_sum: float, correct: int, seen: int
) -> TrainResult:
    """A ``TrainResult`` from the running sums of a training loop: mean loss, accuracy, steps."""
    return TrainResult(
        num_examples,
        {
            "loss": loss_sum / steps if steps else 0.0,
            "accuracy": correct / seen if seen else 0.0,
            "steps": float(steps),
        },
    )


@dataclass(frozen=True)
class EvalResult:
    """Mean cross-entropy loss and accuracy over ``num_examples`` evaluation examples."""

    num_examples: int
    loss: float
    accuracy: float


class TrainConfig(BaseModel):
    """Local training settings for one ``Task.train`` call (mini-batch SGD)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    epochs: Annotated[int, Field(ge=1)] = 1
    batch_size: Annotated[int, Field(ge=1)] = 32
    learning_rate: Annotated[float, Field(gt=0.0)] = 0.1
    # FedProx: adds mu/2 * ||w - w_start||^2, w_start = the weights when train() was called.
    proximal_mu: Annotated[float, Field(ge=0.0)] = 0.0
    # Caps the SGD steps of one train() call, across epochs (None: no cap).
    max_steps: Annotated[int, Field(ge=1)] | None = None


class PartitionConfig(BaseModel):
    """How a labelled data set is split across workers (see ``partition_indices``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    scheme: Literal["iid", "dirichlet", "shards"] = "iid"
    alpha: Annotated[float, Field(gt=0.0)] = 0.5
    shards_per_worker: Annotated[int, Field(ge=1)] = 2
    # Dirichlet only: partitions below this size are topped up (capped at n // partitions).
    min_samples: Annotated[int, Field(ge=0)] = 10
    seed: Annotated[int, Field(ge=0)] = 0


class SyntheticConfig(BaseModel):
    """The LEAF / FedProx Synthetic(alpha, beta) benchmark (see ``make_synthetic``).

    Device sample counts are ``min_samples + lognormal``, the lognormal scaled so that the mean
    count is ``samples_per_worker`` (the reference generator uses ``50 + lognormal(4, 2)``). The
    distribution is heavy-tailed: with the defaults the median device has about 70 samples and a
    few have thousands, so the average over a few dozen devices is usually below the mean.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    alpha: Annotated[float, Field(ge=0.0)] = 1.0
    beta: Annotated[float, Field(ge=0.0)] = 1.0
    num_classes: Annotated[int, Field(ge=2)] = 10
    dim: Annotated[int, Field(ge=1)] = 60
    samples_per_worker: Annotated[int, Field(ge=2)] = 200
    samples_sigma: Annotated[float, Field(ge=0.0)] = 2.0
    min_samples: Annotated[int, Field(ge=2)] = 50
    # Devices generated; None: one per partition. Set it when the root may be started with a
    # different partition count than the workers, so that both see the same data.
    num_devices: Annotated[int, Field(ge=1)] | None = None

    @model_validator(mode="after")
    def _consistent(self) -> SyntheticConfig:
        if self.samples_per_worker < self.min_samples:
            raise ValueError("samples_per_worker (a mean) must be >= min_samples")
        return self


class TaskConfig(BaseModel):
    """Which task a node builds: factory, data set, partitioning, model, training defaults."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    factory: str = "hfl_mqtt.tasks.builtin:make_task"
    dataset: Literal["digits", "synthetic"] = "digits"
    model: Literal["softmax", "mlp", "torch_mlp"] = "softmax"
    hidden: Annotated[int, Field(ge=1)] = 64
    partition: PartitionConfig = PartitionConfig()
    train: TrainConfig = TrainConfig()
    test_fraction: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.2
    seed: Annotated[int, Field(ge=0)] = 0
    synthetic: SyntheticConfig = SyntheticConfig()
    # Passed through untouched to custom factories.
    params: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _consistent(self) -> TaskConfig:
        # Settings that would do nothing are refused rather than silently ignored.
        if self.dataset == "synthetic" and self.partition != PartitionConfig():
            raise ValueError(
                "partition does not apply to dataset 'synthetic': it is naturally partitioned "
                "(one device per worker)"
            )
        if self.dataset != "synthetic" and self.synthetic != SyntheticConfig():
            raise ValueError("synthetic settings apply only to dataset 'synthetic'")
        return self


@runtime_checkable
class Task(Protocol):
    """One node's training plug-in: a model plus its local data.

    Methods are blocking and may take seconds: call them off the event loop. One task is used
    by one thread at a time.
    """

    @property
    def num_examples(self) -> int:
        """Number of local training examples (the FedAvg weight)."""
        ...

    def get_weights(self) -> dict[str, np.ndarray]:
        """A copy of the current weights, float32, by name."""
        ...

    def set_weights(self, weights: Mapping[str, np.ndarray]) -> None:
        """Replace the weights; raises ``TaskError`` if names or shapes differ from the model's."""
        ...

    def train(self, config: TrainConfig) -> TrainResult:
        """Train on the local data, starting from the current weights."""
        ...

    def evaluate(self) -> EvalResult:
        """Loss and accuracy of the current weights on the task's evaluation data."""
        ...


TaskFactory = Callable[[TaskConfig, int | None, int], Task]


def check_weights(
    expected: Mapping[str, tuple[int, ...]], weights: Mapping[str, np.ndarray]
) -> None:
    """Raise ``TaskError`` unless ``weights`` has exactly the expected names and shapes."""
    missing = sorted(set(expected) - set(weights))
    extra = sorted(set(weights) - set(expected))
    if missing or extra:
        raise TaskError(f"weights do not match the model: missing {missing}, unexpected {extra}")
    for name, shape in expected.items():
        got = np.shape(weights[name])
        if got != shape:
            raise TaskError(f"weight {name!r} has shape {got}, the model expects {shape}")


def _import_factory(path: str) -> Callable[..., Any]:
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise TaskError(f"task factory {path!r} is not of the form 'module:callable'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise TaskError(f"task factory {path!r}: cannot import module {module_name!r}: {e}") from e
    obj: Any = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise TaskError(
                f"task factory {path!r}: module {module_name!r} has no attribute {attr!r}"
            ) from None
    if not callable(obj):
        raise TaskError(f"task factory {path!r} is not callable")
    return cast("Callable[..., Any]", obj)


def load_task(config: TaskConfig, partition: int | None, num_partitions: int) -> Task:
    """Build the task named by ``config.factory``.

    ``partition=None`` asks for the evaluator task, whose ``evaluate()`` uses the held-out test
    split (the root's); otherwise ``partition`` in ``[0, num_partitions)`` selects a worker's
    training partition.
    """
    if num_partitions < 1:
        raise TaskError(f"num_partitions must be >= 1, got {num_partitions}")
    if partition is not None and not 0 <= partition < num_partitions:
        raise TaskError(f"partition {partition} is outside [0, {num_partitions})")
    factory = _import_factory(config.factory)
    task = factory(config, partition, num_partitions)
    if not isinstance(task, Task):
        raise TaskError(
            f"task factory {config.factory!r} returned {type(task).__name__}, which is not a Task"
        )
    return task
