"""Flower's legacy strategies (``flwr.server.strategy``) as the aggregation of a synchronous level.

``FlowerStrategy`` is a ``RoundStrategy``: each round it hands the strategy's ``aggregate_fit``
what a Flower server would, and takes back the new model. Our updates are deltas against the
current model ``x``; Flower's strategies expect the clients' *models*, so each child becomes

- a ``FitRes`` with ``parameters = x + delta`` (npy tensors in the model's key order, Flower's own
  layout), its ``num_examples`` and the scalar metrics of its header;
- a ``ClientProxy`` whose ``cid`` is the child's node id (nothing calls it);

sorted by sender, so a round's result does not depend on the order the deltas arrived in. The
round number is 1-based and counts this aggregator's rounds over its whole life (across cycles
of a non-root aggregator): server optimizers use it (FedAdam's bias correction, FedAvgM's
momentum start). The returned ``Parameters`` become the model again, with its names and dtypes.

Only ``aggregate_fit`` is driven. Who takes part in a round is the aggregator's business
(deadline, minimum, offline children), so the sampling and evaluation options of a strategy
(``fraction_fit``, ``min_fit_clients``, ``evaluate_fn``, ...) do nothing here, and strategies
whose ``aggregate_fit`` needs state from ``configure_fit`` (QFedAvg, the server-side
differential-privacy wrappers) are not supported.

A level names its strategy in the configuration (``FlowerStrategyConfig``)::

    flower_strategy: {name: FedAdam, options: {eta: 0.01, tau: 0.001}}
    flower_strategy: {class: "my_package.strategies:MyStrategy", options: {...}}

The strategy is built on the first round, with ``initial_parameters`` set to the model the
aggregator starts from (FedAdam, FedYogi and FedAdagrad require it at construction, and an edge
knows its model only once its parent has sent one). ``FlowerStrategy.from_config`` also builds
it once right away, on an empty model, so that a bad name or option fails when the node starts.

This module imports ``flwr`` only inside the functions that need it.
"""

from __future__ import annotations

import functools
import importlib
import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import structlog

from hfl_mqtt.aggregation.base import Model, Update
from hfl_mqtt.aggregation.flower_config import FlowerStrategyConfig, required_results
from hfl_mqtt.codec.compressor import Compressor
from hfl_mqtt.codec.limits import DecodeLimits
from hfl_mqtt.codec.tensor import decode_tensor
from hfl_mqtt.errors import ConfigError, DecodeError, NonFiniteError
from hfl_mqtt.flower.codec import from_parameters, to_parameters

if TYPE_CHECKING:
    from flwr.common import Parameters

__all__ = ["FlowerStrategy"]

log = structlog.get_logger("hfl_mqtt.aggregation")

_NPY = Compressor("npy")
_OWN_INPUT = DecodeLimits(max_decoded_bytes=1 << 62, max_tensors=1 << 31)
"""The parameters come from a strategy in this process, not from a peer: no size bounds (a
server optimizer's float64 result is twice the size of a float32 model)."""


class FlowerStrategy:
    """A ``RoundStrategy`` around a legacy Flower strategy (see the module docstring).

    ``FlowerStrategy(make)`` builds the strategy on the first round with ``make(initial)``,
    ``initial`` being the current model as Flower ``Parameters``; ``FlowerStrategy.wrap`` takes
    one already built. ``strategy`` is the Flower object (None before the first round),
    ``server_round`` the last round number given to it, ``metrics`` what it last returned.
    """

    def __init__(
        self, make: Callable[[Parameters], Any], *, label: str = "flower", node: str | None = None
    ) -> None:
        self._make = make
        self.label = label
        self.strategy: Any = None
        self.server_round = 0
        self.metrics: dict[str, Any] = {}
        self._restore: dict[str, list[np.ndarray]] | None = None
        """Array lists from a checkpoint, set on the strategy once it is built."""
        self._log = log.bind(strategy=label)
        if node is not None:
            self._log = self._log.bind(node=node)

    @classmethod
    def wrap(cls, strategy: Any, *, node: str | None = None) -> FlowerStrategy:
        """Around a strategy already built (its ``initial_parameters`` are then the caller's)."""
        return cls(lambda _: strategy, label=type(strategy).__name__, node=node)

    @classmethod
    def from_config(
        cls, config: FlowerStrategyConfig, *, node: str | None = None
    ) -> FlowerStrategy:
        """Resolve the class and check the options now; raises ``ConfigError``."""
        strategy_class = _resolve(config)
        options: dict[str, Any] = dict(config.options)
        from flwr.server.strategy import Bulyan

        if issubclass(strategy_class, Bulyan):
            # Flower's Bulyan() calls its first rule, Krum, without the to_keep Krum requires
            # (a TypeError on the first round); 0 is the only value that works (Krum must
            # return one of the models).
            options.setdefault("to_keep", 0)
        takes_initial = _accepts(strategy_class, "initial_parameters")

        def make(initial: Parameters) -> Any:
            if takes_initial:
                return strategy_class(initial_parameters=initial, **options)
            return strategy_class(**options)

        try:
            make(to_parameters([]))
        except (TypeError, ValueError) as exc:
            raise ConfigError(
                f"flower_strategy {config.label}: the options were refused: "
                f"{type(exc).__name__}: {exc}"
            ) from None
        return cls(make, label=config.label, node=node)

    def aggregate(self, model: Mapping[str, np.ndarray], updates: Sequence[Update]) -> Model:
        self.server_round += 1
        names = list(model)
        current = _as_parameters(model, names)
        if self.strategy is None:
            self.strategy = self._make(current)
            for name, arrays in (self._restore or {}).items():
                setattr(self.strategy, name, arrays)
            self._restore = None
        round_log = self._log.bind(round=self.server_round)
        if not updates:
            return _copy(model)
        needed = _needed(self.strategy)
        if len(updates) < needed:
            round_log.warning(
                "too few updates for the strategy: the model stays",
                updates=len(updates),
                needed=needed,
            )
            return _copy(model)
        _point_at(self.strategy, model, names, current)
        proxy = _proxy_class()
        from flwr.common import Code, FitRes, Status

        ok = Status(code=Code.OK, message="")
        results = [
            (
                proxy(u.sender),
                FitRes(
                    status=ok,
                    parameters=_as_parameters({k: model[k] + u.delta[k] for k in names}, names),
                    num_examples=u.num_examples,
                    metrics=_scalars(u.metrics),
                ),
            )
            for u in sorted(updates, key=lambda u: u.sender)
        ]
        parameters, metrics = self.strategy.aggregate_fit(self.server_round, results, [])
        self.metrics = dict(metrics or {})
        if parameters is None:
            round_log.warning("the strategy returned no parameters: the model stays")
            return _copy(model)
        try:
            return _to_model(parameters, model, names)
        except NonFiniteError as exc:
            round_log.error("the strategy's model has NaN or Inf: the model stays", reason=str(exc))
            return _copy(model)

    def state(self) -> tuple[dict[str, Any], dict[str, Model]]:
        """The round number and the strategy's lists of arrays (a server optimizer's moments
        and weights: FedAdam's ``m_t``, ``v_t``, ``current_weights``; FedAvgM's momentum)."""
        models: dict[str, Model] = {}
        if self.strategy is not None:
            for name, value in vars(self.strategy).items():
                if (
                    isinstance(value, list)
                    and value
                    and all(isinstance(v, np.ndarray) for v in value)
                ):
                    models[name] = {str(i): v for i, v in enumerate(value)}
        elif self._restore:
            models = {k: {str(i): v for i, v in enumerate(a)} for k, a in self._restore.items()}
        return {"server_round": self.server_round}, models

    def load(self, values: Mapping[str, Any], models: Mapping[str, Model]) -> None:
        """Restore what ``state`` gave (set on the strategy when it is built)."""
        self.server_round = int(values["server_round"])
        self._restore = {
            name: [group[str(i)] for i in range(len(group))] for name, group in models.items()
        }


def _copy(model: Mapping[str, np.ndarray]) -> Model:
    return {k: v.copy() for k, v in model.items()}


def _resolve(config: FlowerStrategyConfig) -> type[Any]:
    """The strategy class the configuration names; ``ConfigError`` if there is none."""
    where = f"flower_strategy {config.label}"
    try:
        import flwr.server.strategy as strategies
    except ImportError as exc:
        raise ConfigError(
            f"{where}: flwr is not installed ({exc}): pip install 'hfl-mqtt[flower]'"
        ) from None
    if config.name is not None:
        found = getattr(strategies, config.name, None)
        if not isinstance(found, type) or not issubclass(found, strategies.Strategy):
            raise ConfigError(f"{where}: flwr.server.strategy has no strategy of that name")
        return found
    assert config.class_path is not None
    module_name, _, attr = config.class_path.partition(":")
    try:
        found = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"{where}: cannot import module {module_name!r}: {exc}") from None
    for part in attr.split("."):
        found = getattr(found, part, None)
        if found is None:
            raise ConfigError(f"{where}: module {module_name!r} has no attribute {attr!r}")
    if not isinstance(found, type) or not issubclass(found, strategies.Strategy):
        raise ConfigError(f"{where}: not a subclass of flwr.server.strategy.Strategy")
    return found


def _accepts(strategy_class: type[Any], keyword: str) -> bool:
    try:
        parameters = inspect.signature(strategy_class).parameters
    except (TypeError, ValueError):
        return False
    return keyword in parameters or any(
        p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()
    )


def _needed(strategy: Any) -> int:
    from flwr.server.strategy import Bulyan, Krum

    if isinstance(strategy, Bulyan | Krum):
        options = {
            "num_malicious_clients": strategy.num_malicious_clients,
            "num_clients_to_keep": getattr(strategy, "num_clients_to_keep", 0),
        }
        return required_results("Bulyan" if isinstance(strategy, Bulyan) else "Krum", options)
    return 1


def _point_at(
    strategy: Any, model: Mapping[str, np.ndarray], names: list[str], current: Parameters
) -> None:
    """Make a server optimizer step from our current model.

    FedOpt (FedAdam, FedYogi, FedAdagrad) keeps the model it last produced in
    ``current_weights``, and FedAvgM with server learning rate or momentum in
    ``initial_parameters``; each computes its pseudo-gradient against that model. Ours can
    change between rounds outside the strategy: a non-root aggregator takes each new model of
    its parent (or rebases onto it), and our model is the strategy's result cast back to the
    model's dtype (FedOpt's is float64). Left alone, the strategy would step from a model that
    is no longer ours and undo the parent's progress. Their other state (FedOpt's moments
    ``m_t``/``v_t``, FedAvgM's momentum vector) is kept across rounds, as in Flower.
    """
    from flwr.server.strategy import FedAvgM, FedOpt

    if isinstance(strategy, FedOpt):
        strategy.current_weights = [np.array(model[k]) for k in names]
    elif isinstance(strategy, FedAvgM):
        strategy.initial_parameters = current


def _as_parameters(arrays: Mapping[str, np.ndarray], names: list[str]) -> Parameters:
    """Flower ``Parameters`` (npy, ``numpy.ndarray``) of ``arrays`` in the order of ``names``."""
    return to_parameters(_NPY.encode({k: arrays[k] for k in names}))


def _to_model(parameters: Parameters, model: Mapping[str, np.ndarray], names: list[str]) -> Model:
    """The strategy's result as a model with our names, shapes and dtypes.

    A result that is not the model's tensors is a bug in the strategy: ``ValueError``. NaN or
    Inf (also from narrowing float64 to float32) raise ``NonFiniteError``.
    """
    try:
        tensors = from_parameters(parameters, names, limits=_OWN_INPUT)
        result: Model = {}
        for tensor in tensors:
            like = model[tensor.name]
            if tensor.shape != like.shape:
                raise ValueError(
                    f"tensor {tensor.name!r} has shape {tensor.shape}, the model {like.shape}"
                )
            array = decode_tensor(tensor, _OWN_INPUT)
            with np.errstate(over="ignore"):
                array = array.astype(like.dtype, copy=False)
            if array.dtype.kind == "f" and not np.isfinite(array).all():
                raise NonFiniteError(f"tensors[{tensor.name!r}]", f"Inf as {like.dtype}")
            result[tensor.name] = array
    except NonFiniteError:
        raise
    except (DecodeError, ValueError) as exc:
        raise ValueError(
            f"the Flower strategy returned something else than the model: {exc}"
        ) from None
    return result


def _scalars(metrics: Mapping[str, object]) -> dict[str, Any]:
    """The metrics Flower can carry (``Scalar``: bool, bytes, float, int, str)."""
    return {k: v for k, v in metrics.items() if isinstance(v, bool | bytes | float | int | str)}


def _not_driven() -> NotImplementedError:
    return NotImplementedError("an hfl-mqtt child is not driven through Flower's client API")


@functools.cache
def _proxy_class() -> type[Any]:
    """A ``ClientProxy`` that only names a child (``cid``): built on first use, so that this
    module loads without flwr."""
    from flwr.server.client_proxy import ClientProxy

    # (ClientProxy is Any to mypy when flwr is not installed)
    class ChildProxy(ClientProxy):  # type: ignore[misc,unused-ignore]
        """A child of the aggregator, as a strategy's results name it."""

        def get_properties(self, ins: Any, timeout: float | None, group_id: int | None) -> Any:
            raise _not_driven()

        def get_parameters(self, ins: Any, timeout: float | None, group_id: int | None) -> Any:
            raise _not_driven()

        def fit(self, ins: Any, timeout: float | None, group_id: int | None) -> Any:
            raise _not_driven()

        def evaluate(self, ins: Any, timeout: float | None, group_id: int | None) -> Any:
            raise _not_driven()

        def reconnect(self, ins: Any, timeout: float | None, group_id: int | None) -> Any:
            raise _not_driven()

    return ChildProxy
