"""Unmodified Flower clients as hfl-mqtt workers (the ``flower`` extra).

A federation names a Flower client function instead of a task factory::

    task:
      flower_client: examples.flower_clients.client:client_fn      # -> a NumPyClient
      flower_evaluate: examples.flower_clients.client:evaluate_fn  # optional, at the root
      train: {epochs: 2, batch_size: 16, learning_rate: 0.1}       # what fit's config says

``FlowerClientTask`` makes a ``Task`` of the client by calling only its public methods
(``get_parameters``, ``fit``, ``evaluate``): the client is not changed. This module imports
``flwr`` only inside the functions that need it.

The client function
    ``fn(partition_id)`` or ``fn(partition_id, num_partitions)``, told apart by the number of
    required parameters; or Flower's ``client_fn(context)`` (one parameter named ``context`` or
    annotated ``Context``), which gets a ``flwr.app.Context`` whose ``node_config`` holds
    ``partition-id`` and ``num-partitions`` as Flower's simulation sets them and whose
    ``run_config`` is ``task.params``. It returns a ``NumPyClient``, or a ``Client`` (such as
    ``NumPyClient.to_client()``), which is called through Flower's legacy messages (``FitIns``,
    ``EvaluateIns``, ``GetParametersIns``).

Tensor names
    A Flower client exchanges a list of arrays: array ``i`` is named ``str(i)`` here (``"0"``,
    ``"1"``, ...: the keys ``flwr.app.ArrayRecord(numpy_ndarrays=...)`` gives the same list), and
    the list is rebuilt in that order. Arrays travel as float32 (the ``Task`` contract) and go
    back to the client in the dtypes of its first ``get_parameters`` (integers rounded: a
    BatchNorm's ``num_batches_tracked`` survives averaging as a number of batches).

fit's and evaluate's config (``fit_config``)
    ``server_round``, ``local_epochs`` and ``epochs``, ``learning_rate`` and ``lr``,
    ``batch_size``, ``proximal_mu`` (as Flower's FedProx sends it) and ``max_steps`` if set,
    from ``task.train``; then every entry of ``task.params`` (which may not redefine those).
    evaluate's config is ``server_round`` and ``task.params``.

``server_round``
    At a worker, the version of the parent's model it trains from (1, 2, ...). It grows with
    every model, but counts the parent's rounds (an edge's, in a 3-level tree), not the root's.
    At the root, the global round it evaluates.

Results
    fit's ``num_examples`` is the FedAvg weight and its numeric metrics are the
    ``TrainResult``'s. An evaluation (the client's ``evaluate``, or ``flower_evaluate``) gives
    the loss and ``metrics["accuracy"]``; one without ``accuracy`` is a ``TaskError``, as the
    root reports accuracy after every round.

The root
    Its evaluator is the client of partition 0: that client's ``get_parameters`` is the initial
    model. ``flower_evaluate``, a Flower strategy's ``evaluate_fn``
    (``fn(server_round, parameters_ndarrays, config) -> (loss, {"accuracy": ...})``), evaluates
    each global model; without it, partition 0's client's ``evaluate`` does, on that client's
    own evaluation data rather than a held-out test set.
"""

from __future__ import annotations

import inspect
import numbers
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, Protocol

import numpy as np

from hfl_mqtt.tasks.base import (
    EvalResult,
    Task,
    TaskConfig,
    TaskError,
    TrainConfig,
    TrainResult,
    check_weights,
    import_callable,
)

__all__ = [
    "FIT_CONFIG_KEYS",
    "FlowerClientTask",
    "NumPyClientLike",
    "fit_config",
    "make_flower_task",
    "tensor_name",
]

Scalar = bool | bytes | float | int | str
"""What a Flower config or metrics value may be (``flwr.common.Scalar``)."""

FIT_CONFIG_KEYS = frozenset(
    {
        "server_round",
        "local_epochs",
        "epochs",
        "learning_rate",
        "lr",
        "batch_size",
        "proximal_mu",
        "max_steps",
    }
)
"""The keys ``fit_config`` derives from ``TrainConfig``: ``task.params`` may not redefine them."""

EvaluateFn = Callable[[int, list[np.ndarray], dict[str, Scalar]], Any]
"""A Flower strategy's ``evaluate_fn``: ``(loss, metrics)``, or None."""


class NumPyClientLike(Protocol):
    """The methods of a ``flwr.client.NumPyClient`` this adapter calls."""

    def get_parameters(self, config: dict[str, Scalar]) -> list[np.ndarray]: ...

    def fit(
        self, parameters: list[np.ndarray], config: dict[str, Scalar]
    ) -> tuple[list[np.ndarray], int, dict[str, Scalar]]: ...

    def evaluate(
        self, parameters: list[np.ndarray], config: dict[str, Scalar]
    ) -> tuple[float, int, dict[str, Scalar]]: ...


def tensor_name(index: int) -> str:
    """The name of the ``index``-th array of a Flower client's list: ``"0"``, ``"1"``, ..."""
    return str(index)


def fit_config(
    train: TrainConfig, server_round: int, params: Mapping[str, Scalar] | None = None
) -> dict[str, Scalar]:
    """The config dict a Flower client's ``fit`` gets (see the module docstring)."""
    config: dict[str, Scalar] = dict(params or {})
    config.update(
        server_round=server_round,
        local_epochs=train.epochs,
        epochs=train.epochs,
        learning_rate=train.learning_rate,
        lr=train.learning_rate,
        batch_size=train.batch_size,
        proximal_mu=train.proximal_mu,
    )
    if train.max_steps is not None:
        config["max_steps"] = train.max_steps
    return config


class FlowerClientTask:
    """A ``Task`` around a Flower client (a ``NumPyClient``, or anything with its methods).

    The weights live here; the client gets them with every ``fit`` and ``evaluate`` call, as
    Flower hands them over. ``num_examples`` is what the last ``fit`` reported (0 before).
    ``evaluate_fn``, if given, evaluates instead of the client's ``evaluate``. ``params`` are
    added to every config; ``name`` says in messages which client this is.
    """

    def __init__(
        self,
        client: NumPyClientLike,
        *,
        evaluate_fn: EvaluateFn | None = None,
        params: Mapping[str, Scalar] | None = None,
        name: str = "the Flower client",
    ) -> None:
        self._client = client
        self._evaluate_fn = evaluate_fn
        self._params = dict(params or {})
        self._name = name
        initial = self._arrays(client.get_parameters({}), "get_parameters")
        if not initial:
            raise TaskError(
                f"{name}: get_parameters returned no arrays; hfl-mqtt takes the initial model "
                "and its shapes from it, so the client must implement it"
            )
        self._dtypes = [a.dtype for a in initial]
        self._shapes = {tensor_name(i): tuple(a.shape) for i, a in enumerate(initial)}
        self._weights = [np.array(a, dtype=np.float32) for a in initial]
        self._num_examples = 0
        self._round: int | None = None
        self._trained = self._evaluated = 0

    @property
    def num_examples(self) -> int:
        return self._num_examples

    def begin_round(self, server_round: int) -> None:
        """The ``server_round`` of the next ``train`` or ``evaluate`` call (``RoundAware``);
        without it, they count their own calls."""
        self._round = server_round

    def get_weights(self) -> dict[str, np.ndarray]:
        return {tensor_name(i): w.copy() for i, w in enumerate(self._weights)}

    def set_weights(self, weights: Mapping[str, np.ndarray]) -> None:
        check_weights(self._shapes, weights)
        self._weights = [np.array(weights[name], dtype=np.float32) for name in self._shapes]

    def train(self, config: TrainConfig) -> TrainResult:
        self._trained += 1
        server_round = self._next_round(self._trained)
        result = self._client.fit(self._to_client(), fit_config(config, server_round, self._params))
        arrays, num_examples, metrics = _unpack(result, 3, f"{self._name}: fit")
        trained = self._arrays(arrays, "fit")
        shapes = [tuple(a.shape) for a in trained]
        if shapes != list(self._shapes.values()):
            raise TaskError(
                f"{self._name}: fit returned arrays of shapes {shapes}, "
                f"get_parameters gave {list(self._shapes.values())}"
            )
        if not isinstance(num_examples, int) or isinstance(num_examples, bool) or num_examples < 0:
            raise TaskError(
                f"{self._name}: fit returned {num_examples!r} as num_examples, not an int >= 0"
            )
        self._weights = [np.array(a, dtype=np.float32) for a in trained]
        self._num_examples = num_examples
        return TrainResult(num_examples, _numbers(metrics, f"{self._name}: fit"))

    def evaluate(self) -> EvalResult:
        self._evaluated += 1
        server_round = self._next_round(self._evaluated)
        config: dict[str, Scalar] = {**self._params, "server_round": server_round}
        if self._evaluate_fn is not None:
            where = f"{self._name}: flower_evaluate"
            result = self._evaluate_fn(server_round, self._to_client(), config)
            if result is None:
                raise TaskError(f"{where} returned None; the root needs a loss and an accuracy")
            loss, metrics = _unpack(result, 2, where)
            num_examples = 0  # an evaluate_fn does not say
        else:
            where = f"{self._name}: evaluate"
            result = self._client.evaluate(self._to_client(), config)
            loss, num_examples, metrics = _unpack(result, 3, where)
        values = _numbers(metrics, where)
        if "accuracy" not in values:
            raise TaskError(
                f"{where} returned no numeric 'accuracy' metric (it returned "
                f"{sorted(values)}); the root reports accuracy after every round"
            )
        if not isinstance(loss, numbers.Real):
            raise TaskError(f"{where} returned {loss!r} as loss, not a number")
        if not isinstance(num_examples, int):
            raise TaskError(f"{where} returned {num_examples!r} as num_examples, not an int")
        return EvalResult(num_examples, float(loss), values["accuracy"])

    def _next_round(self, calls: int) -> int:
        server_round, self._round = self._round, None
        return calls if server_round is None else server_round

    def _to_client(self) -> list[np.ndarray]:
        """The weights as the client knows them: fresh arrays in its own dtypes."""
        return [
            (np.rint(w) if dtype.kind in "iu" else w).astype(dtype)
            for w, dtype in zip(self._weights, self._dtypes, strict=True)
        ]

    def _arrays(self, value: object, method: str) -> list[np.ndarray]:
        if not isinstance(value, list | tuple):
            raise TaskError(
                f"{self._name}: {method} returned {type(value).__name__}, not a list of arrays"
            )
        arrays = []
        for i, a in enumerate(value):
            # A numpy scalar (``count + 1`` of a 0-d array) is an array to Flower too.
            if not isinstance(a, np.ndarray | np.generic) or a.dtype.kind not in "biuf":
                what = a.dtype if isinstance(a, np.ndarray | np.generic) else type(a).__name__
                raise TaskError(
                    f"{self._name}: {method} returned {what} as array {i}, "
                    "not a numeric numpy array"
                )
            arrays.append(np.asarray(a))
        return arrays


def _unpack(result: object, size: int, where: str) -> Sequence[Any]:
    if not isinstance(result, tuple | list) or len(result) != size:
        raise TaskError(f"{where} returned {type(result).__name__}, not a tuple of {size}")
    return result


def _numbers(metrics: object, where: str) -> dict[str, float]:
    """The numeric entries of a Flower metrics dict, as floats (others are left out)."""
    if not isinstance(metrics, Mapping):
        raise TaskError(f"{where} returned {type(metrics).__name__} as metrics, not a dict")
    return {str(k): float(v) for k, v in metrics.items() if isinstance(v, numbers.Real)}


# --- building the task from the configuration ---------------------------------------------------


def make_flower_task(config: TaskConfig, partition: int | None, num_partitions: int) -> Task:
    """The ``FlowerClientTask`` of ``config.flower_client`` for ``partition``.

    ``partition=None`` asks for the root's evaluator: the client of partition 0, evaluating
    with ``config.flower_evaluate`` if set.
    """
    path = config.flower_client
    if path is None:
        raise TaskError("task.flower_client is not set")
    params = _flower_params(config.params)
    build = _client_call(import_callable(path, "task.flower_client"), path)
    evaluate_fn = None
    if partition is None and config.flower_evaluate is not None:
        evaluate_fn = import_callable(config.flower_evaluate, "task.flower_evaluate")
        _check_evaluate_fn(evaluate_fn, config.flower_evaluate)
    if partition is None:
        partition, where = 0, f"task.flower_client {path!r} (partition 0, the root's evaluator)"
    else:
        where = f"task.flower_client {path!r} (partition {partition})"
    client = _as_numpy_client(build(partition, num_partitions, params), where)
    return FlowerClientTask(client, evaluate_fn=evaluate_fn, params=params, name=where)


ClientCall = Callable[[int, int, Mapping[str, bool | float | int | str]], object]


def _client_call(fn: Callable[..., Any], path: str) -> ClientCall:
    """How to call the client function, by its signature (see the module docstring)."""
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError) as e:
        raise TaskError(f"task.flower_client {path!r}: cannot read its signature ({e})") from None
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    required = [
        p
        for p in signature.parameters.values()
        if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    ]
    if all(p.kind in positional for p in required):
        if len(required) == 1 and _is_context(required[0]):
            return lambda partition, count, run_config: fn(_context(partition, count, run_config))
        if len(required) == 1:
            return lambda partition, count, run_config: fn(partition)
        if len(required) == 2:
            return lambda partition, count, run_config: fn(partition, count)
    raise TaskError(
        f"task.flower_client {path!r} takes {_parameters(signature)}; it must take "
        "(partition_id), (partition_id, num_partitions) or Flower's (context: Context)"
    )


def _parameters(signature: inspect.Signature) -> str:
    """``(a, b=1, *, c)``: the parameters without their annotations (which may be strings)."""
    bare = signature.replace(
        parameters=[p.replace(annotation=p.empty) for p in signature.parameters.values()],
        return_annotation=signature.empty,
    )
    return str(bare)


def _is_context(parameter: inspect.Parameter) -> bool:
    annotation = parameter.annotation
    name = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", "")
    return parameter.name == "context" or name.rpartition(".")[2] == "Context"


def _context(
    partition: int, num_partitions: int, run_config: Mapping[str, bool | float | int | str]
) -> Any:
    """A ``flwr.app.Context`` as Flower's simulation gives a ``client_fn``."""
    with _flower():
        from flwr.app import Context, RecordDict

    return Context(
        run_id=0,
        node_id=partition,
        node_config={"partition-id": partition, "num-partitions": num_partitions},
        state=RecordDict(),
        run_config=dict(run_config),
    )


def _check_evaluate_fn(fn: Callable[..., Any], path: str) -> None:
    try:
        inspect.signature(fn).bind(0, [], {})
    except TypeError:
        raise TaskError(
            f"task.flower_evaluate {path!r} takes {_parameters(inspect.signature(fn))}; it must "
            "take (server_round, parameters_ndarrays, config), as a Flower strategy's evaluate_fn"
        ) from None
    except ValueError:
        pass  # no signature to read (a builtin): let the call tell


def _flower_params(params: Mapping[str, Any]) -> dict[str, bool | float | int | str]:
    """``task.params`` checked as Flower config entries."""
    clash = sorted(FIT_CONFIG_KEYS & set(params))
    if clash:
        raise TaskError(
            f"task.params {clash}: these fit config keys come from task.train "
            "(see hfl_mqtt.flower.client)"
        )
    for key, value in params.items():
        # Both a config value and a run_config value (which may not be bytes).
        if not isinstance(value, bool | float | int | str):
            raise TaskError(
                f"task.params[{key!r}] is {type(value).__name__}; with flower_client, params "
                "are Flower config values: bool, float, int or str"
            )
    return dict(params)


@contextmanager
def _flower() -> Iterator[None]:
    """Turn a missing ``flwr`` into a ``TaskError`` saying what to install."""
    try:
        yield
    except ImportError as exc:
        raise TaskError("task.flower_client needs Flower: pip install 'hfl-mqtt[flower]'") from exc


def _as_numpy_client(obj: object, where: str) -> NumPyClientLike:
    """A ``NumPyClient`` as it is; a ``Client`` behind legacy messages; anything else refused."""
    with _flower():
        from flwr.client import Client, NumPyClient

    if isinstance(obj, NumPyClient):
        return obj
    if isinstance(obj, Client):
        return _LegacyClient(obj, where)
    raise TaskError(
        f"{where} returned {type(obj).__name__}, not a flwr.client.NumPyClient or Client"
    )


class _LegacyClient:
    """A ``flwr.client.Client`` called through Flower's public legacy messages."""

    def __init__(self, client: Any, where: str) -> None:
        self._client = client
        self._where = where

    def get_parameters(self, config: dict[str, Scalar]) -> list[np.ndarray]:
        from flwr.common import GetParametersIns, parameters_to_ndarrays

        res = self._checked(self._client.get_parameters(GetParametersIns(config=config)))
        return list(parameters_to_ndarrays(res.parameters))

    def fit(
        self, parameters: list[np.ndarray], config: dict[str, Scalar]
    ) -> tuple[list[np.ndarray], int, dict[str, Scalar]]:
        from flwr.common import FitIns, ndarrays_to_parameters, parameters_to_ndarrays

        res = self._checked(self._client.fit(FitIns(ndarrays_to_parameters(parameters), config)))
        return list(parameters_to_ndarrays(res.parameters)), res.num_examples, dict(res.metrics)

    def evaluate(
        self, parameters: list[np.ndarray], config: dict[str, Scalar]
    ) -> tuple[float, int, dict[str, Scalar]]:
        from flwr.common import EvaluateIns, ndarrays_to_parameters

        res = self._checked(
            self._client.evaluate(EvaluateIns(ndarrays_to_parameters(parameters), config))
        )
        return res.loss, res.num_examples, dict(res.metrics)

    def _checked(self, res: Any) -> Any:
        from flwr.common import Code

        if res.status.code != Code.OK:
            raise TaskError(f"{self._where}: {res.status.code.name}: {res.status.message}")
        return res
