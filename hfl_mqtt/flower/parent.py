"""An aggregator whose parent is a stock Flower server (``NodeConfig.flower_parent``).

A Flower user keeps their server and strategy and puts MQTT edges beneath it. To the server,
an edge is one ordinary Flower client whose data is its whole subtree:

- ``fit(parameters)``: the parameters become the parent's model and the edge runs one cycle
  with its MQTT children exactly as a synchronous aggregator under an MQTT parent does
  (``Aggregator``: ``rounds`` rounds, deadlines, minimum participation), then answers with the
  aggregate, the model itself as Flower's fit results carry it, with the examples of its last
  round (the weight Flower's FedAvg gives it) and metrics: ``participants``, ``rounds``,
  ``loss`` (the children's mean training loss), ``tree_bytes`` and ``tree_messages``.
- ``evaluate(parameters)``: the edge's task evaluates them on its evaluation data (a task built
  with partition None, as the root's: for the built-in tasks the held-out test split; a custom
  factory can give the edge a validation set of its own), with ``accuracy`` as a metric.
  Workers only train, so a subtree has no evaluation to report; and an answer of zero examples
  from every client would make Flower's FedAvg divide by zero.
- ``get_parameters``: the current model; before the first fit, the task's initial weights (a
  server whose strategy has no initial parameters asks one client for them).

Flower's legacy ``Parameters`` carry no tensor names: tensors travel in the order of the task's
``get_weights()``, and what the server sends is checked against the task's model like any
peer's message (``hfl_mqtt.flower.codec``).

Two ways in:

- ``run_under_flower_server``: Flower's legacy gRPC client (``flwr.client.start_client``, for a
  server started with ``flwr.server.start_server``) runs in a thread of its own, as it blocks.
  Each call crosses onto the node's event loop (``asyncio.run_coroutine_threadsafe``) and runs
  there between two messages (``AggregatorBase.post``), so the MQTT side keeps running. When
  the server ends the run, the edge stops its children and ends. If the server cannot be
  reached within ``connect_timeout_s``, goes away, or sends parameters that are not the model,
  the edge ends with ``FlowerParentError`` and leaves its children running, as a crashed edge
  would: they go on once it is back.
- ``train_subtree``: one cycle on a connection of its own, for a Flower ``ClientApp`` that a
  SuperNode runs (``hfl_mqtt.flower.edge_app``, the Message API).

``flwr`` is imported only inside the functions that talk to Flower.
"""

from __future__ import annotations

import asyncio
import functools
import socket
import threading
import time
from collections.abc import Coroutine, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from hfl_mqtt.aggregation.base import Model, RoundStrategy
from hfl_mqtt.codec import Compressor, Header, ModelSpec, decode_tensor
from hfl_mqtt.config import FlowerParentConfig, NodeConfig
from hfl_mqtt.errors import ConfigError, DecodeError, FlowerParentError
from hfl_mqtt.flower.codec import from_parameters, to_parameters
from hfl_mqtt.roles.aggregator import Aggregator, EventCallback
from hfl_mqtt.roles.aggregator_base import MetricDict
from hfl_mqtt.roles.report import NodeReport
from hfl_mqtt.tasks.base import Task, load_task
from hfl_mqtt.topics import status_topic
from hfl_mqtt.transport.base import LinkBase

if TYPE_CHECKING:
    from flwr.client import Client
    from flwr.common import Parameters

    from hfl_mqtt.roles.node import LinkFactory

__all__ = [
    "CycleResult",
    "SubtreeAggregator",
    "beneath_flower_server",
    "run_under_flower_server",
    "train_subtree",
]

T = TypeVar("T")

_MAX_EXAMPLES = 2**53
_RETRY_MAX_S = 2.0
"""Longest pause between two attempts to reach a server that is not up yet."""


@dataclass(frozen=True)
class CycleResult:
    """What one cycle of the subtree gives its Flower parent: the aggregate model (in the
    task's tensor order), the examples of the cycle's last round, and metrics."""

    model: Model
    num_examples: int
    metrics: MetricDict = field(default_factory=dict)


class SubtreeAggregator(Aggregator):
    """A synchronous aggregator driven cycle by cycle from outside: ``fit(model)`` takes
    ``model`` as the parent's and runs one cycle of ``rounds`` rounds with the children, as
    ``Aggregator`` does under an MQTT parent; the cycle's report up resolves the fit."""

    def __init__(
        self,
        config: NodeConfig,
        down: LinkBase,
        *,
        task: Task,
        strategy: RoundStrategy | None = None,
        on_event: EventCallback | None = None,
        first_version: int = 0,
    ) -> None:
        if config.flower_parent is None:
            raise ValueError(f"{config.node}: a subtree aggregator needs flower_parent")
        super().__init__(config, down, None, evaluator=task, strategy=strategy, on_event=on_event)
        self.model = task.get_weights()
        self.spec = ModelSpec.from_arrays(self.model)
        self.version = first_version
        """Versions this node publishes start after this one (a ClientApp runs a node per
        message: numbering on from the server's round keeps old deltas stale)."""
        self._cycles = 0
        self._pending: asyncio.Future[CycleResult] | None = None
        self._ended = False
        self._error: FlowerParentError | None = None

    @property
    def tensor_order(self) -> list[str]:
        """The names of the model's tensors, in the order Flower's ``Parameters`` carry them."""
        assert self.spec is not None
        return list(self.spec.tensors)

    async def fit(self, model: Model, parent_version: int | None = None) -> CycleResult:
        """Run one cycle from ``model``; ``parent_version`` names it (default: 1, 2, ...)."""
        if self._ended:
            raise FlowerParentError(f"{self.config.node} has ended: it runs no more cycles")
        if self._pending is not None:
            raise FlowerParentError("a fit came while the last one is still running")
        self._check(model)
        result: asyncio.Future[CycleResult] = asyncio.get_running_loop().create_future()
        self._pending = result
        try:
            await self.post(functools.partial(self._take_parent_model, model, parent_version))
            return await result
        finally:
            self._pending = None

    async def current_model(self) -> Model:
        """The model now: the last cycle's aggregate, or the task's initial weights."""
        assert self.model is not None
        return {name: self.model[name].copy() for name in self.tensor_order}

    async def end(self, *, stop_children: bool) -> None:
        """End the node after what it is doing now; tell the children to stop, or not."""

        async def step() -> None:
            if stop_children:
                self._log.info("the Flower parent is done: stopping")
                await self._finish()
            else:
                self._finished = True

        await self.post(step)

    async def fail(self, error: FlowerParentError) -> None:
        """End the node with ``error`` (from ``run``); the children are left running."""

        async def step() -> None:
            self._log.error("the Flower parent failed", error=str(error))
            self._error = error
            self._finished = True

        await self.post(step)

    async def run(self, stop: asyncio.Event | None = None) -> NodeReport:
        try:
            report = await super().run(stop)
        finally:
            self._ended = True
            if self._pending is not None and not self._pending.done():
                self._pending.set_exception(
                    FlowerParentError(f"{self.config.node} ended in the middle of a cycle")
                )
        if self._error is not None:
            raise self._error
        return report

    def _check(self, model: Model) -> None:
        """``model`` must be the task's: the same names, shapes and dtypes."""
        assert self.spec is not None
        expected = self.spec.tensors
        if set(model) != set(expected):
            raise FlowerParentError(
                f"the Flower parent's model has tensors {', '.join(model)}; "
                f"{self.config.node}'s has {', '.join(expected)}"
            )
        for name, spec in expected.items():
            array = model[name]
            if array.shape != spec.shape or array.dtype.name != spec.dtype:
                raise FlowerParentError(
                    f"the Flower parent's {name!r} is {array.dtype.name}{list(array.shape)}; "
                    f"{self.config.node}'s is {spec.dtype}{list(spec.shape)}"
                )

    async def _take_parent_model(self, model: Model, parent_version: int | None) -> None:
        self._cycles += 1
        header = Header(
            federation=self.config.federation,
            sender="flower",
            kind="model",
            version=self._cycles if parent_version is None else parent_version,
        )
        await self._parent_model({k: v.copy() for k, v in model.items()}, header)

    async def _report_up(
        self,
        participants: int,
        loss: float | None,
        reply: MetricDict | None = None,
        *,
        codec: Compressor | None = None,
    ) -> None:
        """The cycle is done: its aggregate answers the pending fit (instead of a delta up)."""
        tree_bytes, tree_messages = self.tree_traffic()
        metrics: MetricDict = {
            "participants": participants,
            "rounds": self.rounds_config.rounds,
            "tree_bytes": tree_bytes,
            "tree_messages": tree_messages,
        }
        if loss is not None:
            metrics["loss"] = loss
        result = CycleResult(
            await self.current_model(), min(self.ledger.examples, _MAX_EXAMPLES), metrics
        )
        self._log.info(
            "cycle done: answering the Flower parent",
            examples=result.num_examples,
            participants=participants,
        )
        if self._pending is not None and not self._pending.done():
            self._pending.set_result(result)


# --- the legacy gRPC client (start_server / start_client) ---------------------------------------


async def run_under_flower_server(
    config: NodeConfig,
    down: LinkBase,
    *,
    task: Task,
    strategy: RoundStrategy | None = None,
    on_event: EventCallback | None = None,
) -> NodeReport:
    """Serve the Flower server of ``config.flower_parent`` until it ends the run."""
    parent = config.flower_parent
    if parent is None or parent.server_address is None:
        raise ConfigError(
            f"{config.node}: flower_parent.server_address is needed to join a Flower server "
            "(without it the node runs only as the ClientApp of a SuperNode)"
        )
    aggregator = SubtreeAggregator(config, down, task=task, strategy=strategy, on_event=on_event)
    bridge = _Bridge(aggregator, asyncio.get_running_loop(), task)
    client = bridge.flower_client()
    thread = threading.Thread(
        target=bridge.serve, args=(client, parent), name=f"{config.node}:flower", daemon=True
    )
    # A daemon thread: a node that ends first (told to stop) cannot interrupt Flower's
    # blocking receive; the thread then ends with the server's next message or the process.
    thread.start()
    try:
        return await aggregator.run()
    finally:
        bridge.closed.set()


class _Bridge:
    """Flower's thread on one side, the node's event loop on the other."""

    def __init__(
        self, aggregator: SubtreeAggregator, loop: asyncio.AbstractEventLoop, task: Task
    ) -> None:
        self.aggregator = aggregator
        self.loop = loop
        self.task = task
        """Used by Flower's thread only (evaluate), once the aggregator has its weights."""
        self.served = 0
        self.closed = threading.Event()
        self._node = aggregator.config.node

    def call(self, coroutine: Coroutine[Any, Any, T]) -> T:
        """Run ``coroutine`` on the node's loop and wait for its result (Flower's thread)."""
        if self.closed.is_set():
            coroutine.close()
            raise FlowerParentError(f"{self._node} has ended: it answers no more calls")
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result()

    def model_of(self, parameters: Parameters) -> Model:
        """The server's parameters as the task's model, checked like a peer's message."""
        assert self.aggregator.spec is not None
        try:
            tensors = from_parameters(parameters, self.aggregator.spec)
            return {t.name: decode_tensor(t) for t in tensors}
        except DecodeError as exc:
            raise FlowerParentError(
                f"the Flower server's parameters are not {self._node}'s model "
                f"({', '.join(self.aggregator.tensor_order)}): {exc}"
            ) from None

    def parameters_of(self, model: Model) -> Parameters:
        return to_parameters(Compressor("npy").encode(model))

    def flower_client(self) -> Client:
        """A ``flwr.client.Client`` whose calls run on the node."""
        try:
            from flwr.client import Client
            from flwr.common import (
                Code,
                EvaluateIns,
                EvaluateRes,
                FitIns,
                FitRes,
                GetParametersIns,
                GetParametersRes,
                Status,
            )
        except ImportError as exc:
            raise ImportError("a Flower parent needs flwr: pip install 'hfl-mqtt[flower]'") from exc

        bridge = self
        ok = Status(code=Code.OK, message="")

        class SubtreeClient(Client):
            def get_parameters(self, ins: GetParametersIns) -> GetParametersRes:
                bridge.served += 1
                model = bridge.call(bridge.aggregator.current_model())
                return GetParametersRes(status=ok, parameters=bridge.parameters_of(model))

            def fit(self, ins: FitIns) -> FitRes:
                bridge.served += 1
                result = bridge.call(bridge.aggregator.fit(bridge.model_of(ins.parameters)))
                return FitRes(
                    status=ok,
                    parameters=bridge.parameters_of(result.model),
                    num_examples=result.num_examples,
                    metrics=dict(result.metrics),
                )

            def evaluate(self, ins: EvaluateIns) -> EvaluateRes:
                bridge.served += 1
                bridge.task.set_weights(bridge.model_of(ins.parameters))
                scores = bridge.task.evaluate()
                return EvaluateRes(
                    status=ok,
                    loss=float(scores.loss),
                    num_examples=scores.num_examples,
                    metrics={"accuracy": float(scores.accuracy)},
                )

        return SubtreeClient()

    def serve(self, client: Client, parent: FlowerParentConfig) -> None:
        """Flower's thread: serve the server until it ends the run, then end the node."""
        try:
            self._start_client(client, parent)
        except FlowerParentError as exc:
            self._end(self.aggregator.fail(exc))
        except BaseException as exc:  # Flower may also exit (flwr_exit: SystemExit)
            error = FlowerParentError(
                f"the Flower client of {self._node} failed: {type(exc).__name__}: {exc}"
            )
            error.__cause__ = exc
            self._end(self.aggregator.fail(error))
        else:
            self._end(self.aggregator.end(stop_children=True))

    def _end(self, step: Coroutine[Any, Any, None]) -> None:
        if self.closed.is_set():
            step.close()  # the node has ended already
            return
        try:
            asyncio.run_coroutine_threadsafe(step, self.loop)
        except RuntimeError:  # the loop has closed meanwhile
            step.close()

    def _start_client(self, client: Client, parent: FlowerParentConfig) -> None:
        """``start_client`` until the server ends the run; retried while the server is not up
        yet (Flower's legacy gRPC client does not retry by itself)."""
        import grpc  # type: ignore[import-untyped]
        from flwr.client import start_client

        address = parent.server_address
        assert address is not None
        certificates = parent.root_certificates.read_bytes() if parent.root_certificates else None
        deadline = time.monotonic() + parent.connect_timeout_s
        while True:
            self._wait_until_listening(address, deadline, parent.connect_timeout_s)
            try:
                start_client(
                    server_address=address,
                    client=client,
                    insecure=certificates is None,
                    root_certificates=certificates,
                )
                return
            except grpc.RpcError as exc:
                code = exc.code() if isinstance(exc, grpc.Call) else None
                details = exc.details() if isinstance(exc, grpc.Call) else str(exc)
                if self.served == 0 and code == grpc.StatusCode.UNAVAILABLE:
                    if time.monotonic() < deadline and not self.closed.is_set():
                        time.sleep(_RETRY_MAX_S / 4)  # listening, not serving yet
                        continue
                    raise FlowerParentError(
                        f"no Flower server at {address} after {parent.connect_timeout_s:g} s: "
                        f"{details}"
                    ) from None
                raise FlowerParentError(
                    f"the Flower server at {address} broke the connection: {code}: {details}"
                ) from None

    def _wait_until_listening(self, address: str, deadline: float, timeout_s: float) -> None:
        """Wait until something accepts TCP connections at ``address``. Probed with a plain
        socket, not with gRPC: a gRPC channel closed right after a refused connection can make
        grpc's connectivity thread fail ("Cannot monitor channel state: Channel closed!")."""
        host, _, port = address.rpartition(":")
        pause = 0.1
        while True:
            left = deadline - time.monotonic()
            try:
                with socket.create_connection((host.strip("[]"), int(port)), max(0.1, left)):
                    return
            except OSError as exc:
                if time.monotonic() + pause >= deadline or self.closed.is_set():
                    reason = exc.strerror or str(exc) or type(exc).__name__
                    raise FlowerParentError(
                        f"no Flower server at {address} after {timeout_s:g} s: {reason}"
                    ) from None
                time.sleep(pause)
                pause = min(2 * pause, _RETRY_MAX_S)


# --- one cycle on its own (a ClientApp under a SuperNode) ----------------------------------------


async def train_subtree(
    config: NodeConfig,
    model: Model,
    *,
    parent_version: int,
    task: Task | None = None,
    strategy: RoundStrategy | None = None,
    links: LinkFactory | None = None,
) -> CycleResult:
    """Connect, run one cycle of the subtree from ``model``, disconnect (the children go on).

    ``parent_version`` is the parent's round (1, 2, ...): this node's versions number on from
    ``(parent_version - 1) * rounds``, so deltas left from an earlier cycle stay stale.
    """
    from hfl_mqtt.roles.node import mqtt_link_factory, round_strategy

    downstream = config.downstream
    if downstream is None:
        raise ConfigError(f"{config.node}: a subtree needs a downstream link")
    if task is None:
        task = await asyncio.to_thread(load_task, config.task, None, config.num_partitions)
    if strategy is None:
        strategy = round_strategy(config)
    make = links or mqtt_link_factory(config.chunk_size)
    status = status_topic(config.federation, config.node)
    first_version = max(0, parent_version - 1) * downstream.rounds
    link: Any = make(downstream.broker, config.node, status)  # an async context manager
    async with link as down:
        aggregator = SubtreeAggregator(
            config, down, task=task, strategy=strategy, first_version=first_version
        )
        async with asyncio.TaskGroup() as tasks:
            running = tasks.create_task(aggregator.run(), name=f"{config.node}:subtree")
            try:
                result = await aggregator.fit(model, parent_version)
            finally:
                await aggregator.end(stop_children=False)
        running.result()
    return result


# --- configuration ------------------------------------------------------------------------------


def beneath_flower_server(
    nodes: Iterable[NodeConfig], flower_parent: FlowerParentConfig
) -> list[NodeConfig]:
    """A federation's nodes with a Flower server in place of its root.

    ``nodes`` are a federation's (``FederationConfig.node_configs``): the root's config is
    dropped (its level stands for the Flower server; its rounds are the server's business) and
    the root's children get ``flower_parent`` instead of their upstream.
    """
    nodes = list(nodes)
    roots = [n.node for n in nodes if n.role == "root"]
    if len(roots) != 1:
        raise ValueError(f"expected one root among the nodes, found {len(roots)}")
    (root,) = roots
    beneath = []
    for node in nodes:
        if node.node == root:
            continue
        if node.upstream is not None and node.upstream.parent == root:
            if node.downstream is None:
                raise ValueError(
                    f"{node.node} is a worker: under a Flower server it would be a Flower "
                    "client, not an hfl-mqtt node (add an edge level)"
                )
            fields = {**node.model_dump(), "upstream": None, "flower_parent": flower_parent}
            beneath.append(NodeConfig.model_validate(fields))
        else:
            beneath.append(node)
    return beneath
