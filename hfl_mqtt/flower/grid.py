"""Flower's ``Grid`` over the MQTT tree: a stock ServerApp at the root drives the hierarchy.

``run_server_app`` runs the root as a ``DrivenRoot`` and the Flower app's ServerApp in a thread
of its own (its strategy blocks), with an ``MqttGrid`` as its grid:

- ``get_node_ids``: the root's children not known to be offline, as Flower node ids
  (``hfl_mqtt.flower.app.node_id``). An edge stands for its whole subtree.
- ``push_messages``: each message gets its id; messages of one push that share their content
  (a strategy sends one ``RecordDict`` to every node it sampled) become one version: its
  ``arrays`` are the model, its ``config`` entries and its type (``train`` or ``evaluate``) the
  instruction, and the sampled children train (the others skip it). Messages of different
  content become versions one after another.
- Workers run the Flower app's ClientApp in process (``ClientAppTask``); edges aggregate the
  subtree's answers as they aggregate any round, weighted by examples, and the replies' numbers
  likewise (``hfl_mqtt.roles.instructions``): the ServerApp sees one reply per child of the root,
  as flat Flower would give it for a client holding the whole subtree's data.
- ``pull_messages`` gives the replies that are in, ``send_and_receive`` waits for them all or
  its timeout. A child that did not answer before the round closed (deadline, minimum,
  offline), or whose subtree had no examples, gets an error reply, as a node that failed would.

Messages are built with Flower's own means: the strategy's ``Message(...)`` needs a task
identity, which ``run_server_app`` sets as Flower's own simulation does
(``flwr.supercore.task_identity.TaskIdentity``); an instruction gets its message id through a
new ``Metadata`` (``flwr.app.message.make_message``, as Flower's own servicers rebuild
messages); replies are ``Message(content, reply_to=instruction)``. The private routes, and
Flower's project config and app loader (``flwr.common.config``,
``flwr.supercore.object_ref.load_app``), are pinned by tests.

What a version can carry: ``arrays`` (one ArrayRecord of float tensors, under that key) and
``config`` (one ConfigRecord of numbers, strings and booleans, under that key), the keys every
strategy of ``flwr.serverapp.strategy`` uses. Anything else fails the message with an error
reply that says what.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import structlog

from hfl_mqtt.config import NodeConfig
from hfl_mqtt.errors import ConfigError, DecodeError, ServerAppError
from hfl_mqtt.flower.app import FlowerApp, load_flower_app, node_id
from hfl_mqtt.flower.app_task import WEIGHT_KEY
from hfl_mqtt.flower.codec import array_record_to_arrays, arrays_to_array_record
from hfl_mqtt.roles.aggregator_base import EventCallback
from hfl_mqtt.roles.driven_root import Answer, DrivenRoot, DrivenRootError
from hfl_mqtt.roles.instructions import Instruction
from hfl_mqtt.roles.report import NodeReport
from hfl_mqtt.transport.base import LinkBase

if TYPE_CHECKING:
    from flwr.app import Message, RecordDict
    from flwr.proto.node_pb2 import NodeInfo
    from flwr.supercore.run import Run

__all__ = ["MqttGrid", "make_grid", "run_server_app", "server_identity"]

log = structlog.get_logger("hfl_mqtt.flower")

_POLL_S = 0.05
_ACTIONS = ("train", "evaluate")


class _RefusedError(Exception):
    """A message the tree cannot carry: its error reply says why."""


def _grid_base() -> type:
    from flwr.serverapp import Grid

    return cast("type", Grid)


def make_grid(root: DrivenRoot, loop: asyncio.AbstractEventLoop, run_id: int) -> Any:
    """An ``MqttGrid`` (a ``flwr.serverapp.Grid``) for ``root``, whose loop is ``loop``."""
    grid_class = type("MqttGrid", (_MqttGrid, _grid_base()), {})
    return grid_class(root, loop, run_id)


class _MqttGrid:
    """The Grid's methods (``make_grid`` mixes in Flower's abstract ``Grid``)."""

    def __init__(self, root: DrivenRoot, loop: asyncio.AbstractEventLoop, run_id: int) -> None:
        from flwr.supercore.run import Run

        self._root = root
        self._loop = loop
        self._run: Run = Run.create_empty(run_id)
        self._ids = {node_id(child): child for child in root.children}
        self._replies: dict[str, Message] = {}
        self._lock = threading.Lock()
        self._arrived = threading.Condition(self._lock)
        self._log = log.bind(node=root.config.node)

    # --- Flower's Grid ---------------------------------------------------------------------------

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        from flwr.app import Message

        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        online = self._call(self._online())
        return [node_id(child) for child in online]

    def get_nodes(self) -> Iterable[NodeInfo]:
        from flwr.proto.node_pb2 import NodeInfo

        return [NodeInfo(node_id=n) for n in self.get_node_ids()]

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        batch = [self._with_id(m) for m in messages]
        groups: dict[int, list[Message]] = {}
        for message in batch:
            groups.setdefault(id(message.content), []).append(message)
        asyncio.run_coroutine_threadsafe(self._send(list(groups.values())), self._loop)
        return [m.metadata.message_id for m in batch]

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        with self._lock:
            return [self._replies.pop(i) for i in list(message_ids) if i in self._replies]

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        waiting = set(self.push_messages(messages))
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        while waiting:
            with self._arrived:
                ready = [i for i in waiting if i in self._replies]
                if not ready:
                    left = None if deadline is None else deadline - time.monotonic()
                    if left is not None and left <= 0:
                        break
                    self._arrived.wait(_POLL_S if left is None else min(_POLL_S, left))
                    continue
                for i in ready:
                    replies.append(self._replies.pop(i))
                    waiting.discard(i)
        return replies

    # --- the bridge to the node's loop ----------------------------------------------------------

    def _call(self, coroutine: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    async def _online(self) -> list[str]:
        if self._root.ended:
            raise DrivenRootError(f"{self._root.config.node} has ended: no nodes are left")
        return self._root.online_children()

    def _with_id(self, message: Message) -> Message:
        """``message`` with a message id of its own (replies name it)."""
        from flwr.app import Metadata
        from flwr.app.message import make_message

        meta = message.metadata
        metadata = Metadata(
            run_id=meta.run_id,
            message_id=uuid.uuid4().hex,
            src_node_id=meta.src_node_id,
            dst_node_id=meta.dst_node_id,
            reply_to_message_id="",
            group_id=meta.group_id,
            created_at=meta.created_at,
            ttl=meta.ttl,
            message_type=meta.message_type,
            src_task_id=meta.src_task_id,
            dst_task_id=meta.dst_task_id,
        )
        return make_message(metadata, message.content)

    async def _send(self, groups: list[list[Message]]) -> None:
        """Each group as one version, one after the other; every message gets a reply."""
        for group in groups:
            try:
                instruction, model, children = self._version_of(group)
                answers = await self._root.ask(model, instruction, children)
                replies = [
                    self._reply(m, answers.get(self._ids[m.metadata.dst_node_id])) for m in group
                ]
            except (_RefusedError, DrivenRootError) as exc:
                self._log.error("a message the tree cannot carry", error=str(exc))
                replies = [_error_reply(m, str(exc)) for m in group]
            except Exception as exc:  # every message must get a reply, or the strategy waits
                self._log.exception("sending a version failed")
                replies = [_error_reply(m, f"{type(exc).__name__}: {exc}") for m in group]
            with self._arrived:
                for message, reply in zip(group, replies, strict=True):
                    self._replies[message.metadata.message_id] = reply
                self._arrived.notify_all()

    def _version_of(
        self, group: Sequence[Message]
    ) -> tuple[Instruction, dict[str, np.ndarray], list[str]]:
        first = group[0]
        do = first.metadata.message_type
        if do not in _ACTIONS:
            raise _RefusedError(f"message type {do!r}: the tree carries 'train' and 'evaluate'")
        if any(m.metadata.message_type != do for m in group):
            raise _RefusedError("messages of one content with different types")
        children = []
        for message in group:
            child = self._ids.get(message.metadata.dst_node_id)
            if child is None:
                raise _RefusedError(
                    f"node {message.metadata.dst_node_id} is not a child of the root"
                )
            children.append(child)
        content = first.content
        unknown = sorted(set(content.keys()) - {"arrays", "config"})
        if "arrays" not in content.array_records or unknown:
            raise _RefusedError(
                "a version carries an ArrayRecord 'arrays' and a ConfigRecord 'config' "
                f"(found {', '.join(sorted(content.keys())) or 'nothing'})"
            )
        try:
            model = array_record_to_arrays(content.array_records["arrays"])
        except DecodeError as exc:
            raise _RefusedError(f"the arrays do not decode: {exc}") from None
        not_float = [n for n, a in model.items() if a.dtype.kind != "f"]
        if not_float:
            raise _RefusedError(f"the tree carries float tensors; {', '.join(not_float)} are not")
        config: dict[str, bool | int | float | str] = {}
        for key, value in content.config_records.get("config", {}).items():
            if not isinstance(value, bool | int | float | str):
                raise _RefusedError(
                    f"config {key!r} is a {type(value).__name__}: the tree carries numbers, "
                    "strings and booleans"
                )
            config[key] = value
        return Instruction("train" if do == "train" else "evaluate", config), model, children

    def _reply(self, message: Message, answer: Answer | None) -> Message:
        from flwr.app import Message, MetricRecord, RecordDict

        child = self._ids[message.metadata.dst_node_id]
        if answer is None:
            return _error_reply(message, f"{child} did not answer before the round closed")
        if answer.num_examples <= 0:
            return _error_reply(message, f"{child}: no examples answered (its subtree failed?)")
        metrics = MetricRecord({**answer.reply, WEIGHT_KEY: answer.num_examples})
        if answer.model is None:
            return Message(RecordDict({"metrics": metrics}), reply_to=message)
        arrays = arrays_to_array_record(answer.model, "npy")
        return Message(RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=message)


def _error_reply(message: Message, reason: str) -> Message:
    from flwr.app import Error, Message

    return Message(Error(code=0, reason=reason), reply_to=message)


MqttGrid = _MqttGrid
"""The Grid's implementation (an instance from ``make_grid`` is a ``flwr.serverapp.Grid``)."""


@contextmanager
def server_identity(run_id: int) -> Iterator[None]:
    """The task identity of a ServerApp of run ``run_id``, as a SuperLink gives its ServerApp
    process and Flower's simulation sets it (a strategy's ``Message(...)`` reads it); the one
    before is back after (it is the process's)."""
    from flwr.supercore.task_identity import TaskIdentity

    from hfl_mqtt.flower.app_task import SERVER_NODE_ID

    before = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, run_id, SERVER_NODE_ID
    try:
        yield
    finally:
        TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = before


async def run_server_app(
    config: NodeConfig,
    down: LinkBase,
    *,
    on_event: EventCallback | None = None,
    stop: asyncio.Event | None = None,
) -> NodeReport:
    """Run the root under the ServerApp of ``config.task.flower_app`` until the app returns;
    then stop the children and end."""
    from flwr.app import Context, RecordDict

    from hfl_mqtt.flower.app_task import SERVER_NODE_ID

    if config.task.flower_app is None:
        raise ConfigError(f"{config.node}: run_server_app needs task.flower_app")
    app: FlowerApp = await asyncio.to_thread(
        load_flower_app, config.task.flower_app, config.task.params
    )
    server_app = await asyncio.to_thread(app.server_app)
    run_id = node_id(config.federation)
    root = DrivenRoot(config, down, on_event=on_event)
    children = len(config.downstream.children) if config.downstream is not None else 0
    if children < 2:
        # The ServerApp sees the root's children as its nodes; Flower's strategies wait for
        # min_available_nodes of them (2 by default), which would look like a hang.
        log.warning(
            "the ServerApp will see fewer than 2 nodes: Flower's strategies wait for "
            "min_available_nodes (2 by default); give the root 2 or more children",
            node=config.node,
            nodes=children,
        )
    context = Context(
        run_id=run_id,
        node_id=SERVER_NODE_ID,
        node_config={},
        state=RecordDict(),
        run_config=dict(app.run_config),
    )
    grid = make_grid(root, asyncio.get_running_loop(), run_id)
    failure: list[BaseException] = []

    def serve() -> None:
        try:
            with server_identity(run_id):
                server_app(grid, context)
        except BaseException as exc:  # the app's failure ends the run; it is raised below
            failure.append(exc)

    async def drive() -> None:
        try:
            await asyncio.to_thread(serve)
        finally:
            await root.end()

    async with asyncio.TaskGroup() as tasks:
        running = tasks.create_task(root.run(stop), name=f"{config.node}:root")
        driving = tasks.create_task(drive(), name=f"{config.node}:serverapp")
        report = await running
        if not driving.done():
            # The root ended first (told to stop, or its time budget spent): the app's
            # pending calls fail, and it returns.
            await driving
    if failure and not (stop is not None and stop.is_set()):
        exc = failure[0]
        raise ServerAppError(f"the ServerApp failed: {type(exc).__name__}: {exc}") from exc
    return cast("NodeReport", report)
