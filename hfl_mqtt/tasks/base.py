"""The training plug-in interface: ``Task``, its configuration, and ``load_task``.

A worker holds one ``Task`` for its data partition and calls it in a thread, off the event loop;
the root holds one on the held-out test split and evaluates each global model with it. Weights
cross this interface as named float32 numpy arrays, named like a torch state dict
(``fc1.weight`` of shape (out, in), ``fc1.bias``, ...).

``TaskConfig.factory`` names the callable that builds a task (``"module:callable"``), so a user
can point it at their own code; the built-in factory is ``hfl_mqtt.tasks.builtin:make_task``.
``TaskConfig.flower_client`` instead names a function returning an unmodified Flower client
(the ``flower`` plug-in: ``hfl_mqtt.flower.client``). A module not found on ``sys.path`` is
looked for in the current directory, as ``python -m`` would, so ``hfl-mqtt sim`` run from a
project's root finds the project's modules (its worker processes inherit the path).
"""

from __future__ import annotations

import importlib
import os
import sys
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, Protocol, cast, runtime_checkable

import numpy as np
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from hfl_mqtt.errors import TaskError

__all__ = [
    "EvalResult",
    "Instructed",
    "PartitionConfig",
    "Reply",
    "RoundAware",
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


class DpSgdConfig(BaseModel):
    """DP-SGD on a worker (Opacus): every example's gradient clipped to ``max_grad_norm``,
    Gaussian noise of ``noise_multiplier * max_grad_norm`` added to each batch's sum."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    noise_multiplier: Annotated[float, Field(ge=0.0, allow_inf_nan=False)] = 1.0
    max_grad_norm: Annotated[float, Field(gt=0.0, allow_inf_nan=False)] = 1.0
    delta: Annotated[float, Field(gt=0.0, lt=1.0)] = 1e-5
    """The delta at which the worker's epsilon is reported."""


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


_FLOWER_UNUSED = (
    "factory",
    "dataset",
    "model",
    "hidden",
    "partition",
    "test_fraction",
    "synthetic",
)
"""``TaskConfig`` settings a Flower client brings itself: refused next to ``flower_client``."""


def _check_import_path(path: str | None) -> str | None:
    if path is not None:
        module, sep, attr = path.partition(":")
        if not (sep and module and attr):
            raise ValueError(f"{path!r} is not of the form 'module:callable'")
    return path


ImportPath = Annotated[str | None, AfterValidator(_check_import_path)]


class TaskConfig(BaseModel):
    """Which task a node builds: factory, data set, partitioning, model, training defaults.

    ``flower_client`` (``"module:fn"``, ``fn(partition_id)``, ``fn(partition_id,
    num_partitions)`` or Flower's ``fn(context)``, returning a Flower client) replaces the
    factory, data set and model settings; ``flower_evaluate`` (a Flower strategy's
    ``evaluate_fn``) is then the root's evaluation. See ``hfl_mqtt.flower.client``.
    """

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
    dp_sgd: DpSgdConfig | None = None
    """``torch_mlp`` only: train with DP-SGD through Opacus (the ``dpsgd`` extra); each
    training run's metrics then carry ``dp_epsilon`` (the worker's record-level epsilon)."""
    # Passed through untouched to custom factories. With flower_client: the run_config of a
    # client_fn(context), and added to every fit and evaluate config.
    params: dict[str, Any] = Field(default_factory=dict)
    flower_client: ImportPath = None
    flower_evaluate: ImportPath = None
    flower_app: Path | None = None
    """A Flower app's directory (``pyproject.toml`` with ``[tool.flwr.app]``): its ServerApp
    drives the run from the root, its ClientApp is every worker's task, ``params`` override its
    run config (``hfl_mqtt.flower.grid``). Relative to the current directory."""

    @model_validator(mode="after")
    def _consistent(self) -> TaskConfig:
        # Settings that would do nothing are refused rather than silently ignored.
        if self.dp_sgd is not None and self.model != "torch_mlp":
            raise ValueError("dp_sgd works with model: torch_mlp (Opacus trains torch models)")
        if self.flower_app is not None:
            given = [
                name
                for name in (*_FLOWER_UNUSED, "train", "dp_sgd", "flower_client", "flower_evaluate")
                if getattr(self, name) != TaskConfig.model_fields[name].default
            ]
            if given:
                raise ValueError(
                    f"{', '.join(given)}: not used with flower_app (the Flower app brings its "
                    "own model, data and training)"
                )
        elif self.flower_client is not None:
            given = [
                name
                for name in _FLOWER_UNUSED
                if getattr(self, name) != TaskConfig.model_fields[name].default
            ]
            if given:
                raise ValueError(
                    f"{', '.join(given)}: not used with flower_client (the Flower client brings "
                    "its own model and data)"
                )
        elif self.flower_evaluate is not None:
            raise ValueError("flower_evaluate needs flower_client")
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


@runtime_checkable
class RoundAware(Protocol):
    """Optional, for a task that wants to know which model it works on (Flower's
    ``server_round``).

    A worker calls ``begin_round(version)`` before each ``train()``, with the version of the
    parent's model it trains from (1, 2, ...: it counts the parent's rounds, not the root's);
    the root calls ``begin_round(global_round)`` before each ``evaluate()``.
    """

    def begin_round(self, server_round: int) -> None: ...


@dataclass(frozen=True)
class Reply:
    """What an ``Instructed`` task answers: its examples (the weight of its reply and, after
    training, of its delta) and numbers."""

    num_examples: int
    metrics: dict[str, int | float] = field(default_factory=dict)


@runtime_checkable
class Instructed(Protocol):
    """Optional, for a task that takes instructions from a driver above the root (a Flower
    ``ClientApp``: ``hfl_mqtt.roles.instructions``).

    A worker sets the weights of the version, then calls ``follow(do, config)``; after
    ``train``, ``get_weights()`` is the trained model. A task without this method trains as
    usual when told to train, and answers ``evaluate`` with its ``evaluate()``.
    """

    def follow(
        self, do: Literal["train", "evaluate"], config: Mapping[str, bool | int | float | str]
    ) -> Reply: ...


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


def import_callable(path: str, what: str = "task factory") -> Callable[..., Any]:
    """The callable named ``"module:attr"`` (``attr`` may be dotted); ``TaskError`` if there is
    none. ``what`` names the setting in messages. A module not on ``sys.path`` is looked for in
    the current directory too."""
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise TaskError(f"{what} {path!r} is not of the form 'module:callable'")
    try:
        module = _import_module(module_name)
    except ImportError as e:
        raise TaskError(f"{what} {path!r}: cannot import module {module_name!r}: {e}") from e
    obj: Any = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise TaskError(
                f"{what} {path!r}: module {module_name!r} has no attribute {attr!r}"
            ) from None
    if not callable(obj):
        raise TaskError(f"{what} {path!r} is not callable")
    return cast("Callable[..., Any]", obj)


_PATH_LOCK = threading.Lock()


def _import_module(name: str) -> Any:
    """``importlib.import_module``, but a module or package in the current directory is found
    first, as under ``python -m``: console scripts do not put the current directory on the
    path. It also wins over an installed package of the same name (Opacus installs a top-level
    ``examples``), even one imported already."""
    top = name.partition(".")[0]
    cwd = os.getcwd()
    here = os.path.join(cwd, top)
    if os.path.isdir(here) or os.path.isfile(here + ".py"):
        with _PATH_LOCK:  # workers of one process load their tasks in threads
            if cwd not in sys.path:
                sys.path.insert(0, cwd)
                importlib.invalidate_caches()
            loaded = sys.modules.get(top)
            where = getattr(loaded, "__file__", None) or next(
                iter(getattr(loaded, "__path__", None) or []), None
            )
            if loaded is not None and where is not None and not where.startswith(here):
                for module in [m for m in sys.modules if m == top or m.startswith(top + ".")]:
                    del sys.modules[module]
    return importlib.import_module(name)


def load_task(
    config: TaskConfig,
    partition: int | None,
    num_partitions: int,
    *,
    federation: str = "hfl",
    node: str = "",
) -> Task:
    """Build the task named by ``config.factory`` (or the Flower client of ``flower_client``,
    or the ClientApp of ``flower_app``, for node ``node`` of ``federation``).

    ``partition=None`` asks for the evaluator task, whose ``evaluate()`` uses the held-out test
    split (the root's); otherwise ``partition`` in ``[0, num_partitions)`` selects a worker's
    training partition.
    """
    if num_partitions < 1:
        raise TaskError(f"num_partitions must be >= 1, got {num_partitions}")
    if partition is not None and not 0 <= partition < num_partitions:
        raise TaskError(f"partition {partition} is outside [0, {num_partitions})")
    if config.flower_client is not None or config.flower_app is not None:
        from hfl_mqtt.plugins import flower  # the plug-ins' interface imports this module

        return flower().load_task(
            config, partition, num_partitions, federation=federation, node=node
        )
    factory = import_callable(config.factory)
    task = factory(config, partition, num_partitions)
    if not isinstance(task, Task):
        raise TaskError(
            f"task factory {config.factory!r} returned {type(task).__name__}, which is not a Task"
        )
    return task
