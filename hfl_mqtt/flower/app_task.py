"""A stock Flower ``ClientApp`` (Message API) as a worker's task, called in process.

A worker under a ServerApp (``task.flower_app``) is told, per version, to ``train`` or
``evaluate`` it with a config (``hfl_mqtt.roles.instructions``). ``ClientAppTask.follow`` makes
the Message a SuperNode would hand the app: ``arrays`` (the version's tensors, an ArrayRecord of
``numpy.ndarray`` Arrays under the model's names) and ``config`` (the ServerApp's ConfigRecord),
with its ``Metadata`` given explicitly (outside a Flower runtime there is no task identity to
build it from), and calls ``app(message, context)``. The ``Context`` is the node's own for the
whole run, as a SuperNode keeps it: ``node_config`` holds ``partition-id`` and
``num-partitions`` as Flower's simulation sets them, ``run_config`` is the app's, and ``state``
persists from one message to the next.

The reply's MetricRecords give the reply: ``num-examples`` is its weight (and the delta's), the
other numbers travel up (a list-valued metric cannot, and is dropped with a warning). After
``train`` the reply's one ArrayRecord is the trained model, under the names it was sent with.
An app that raises or replies with an error fails the call with a ``TaskError`` that says so.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import structlog

from hfl_mqtt.errors import DecodeError
from hfl_mqtt.flower.codec import array_record_to_arrays, arrays_to_array_record
from hfl_mqtt.tasks.base import EvalResult, Reply, TaskError, TrainConfig, TrainResult

if TYPE_CHECKING:
    from flwr.app import Context, Message
    from flwr.clientapp import ClientApp

__all__ = ["WEIGHT_KEY", "ClientAppTask", "instruction_message"]

log = structlog.get_logger("hfl_mqtt.flower")

WEIGHT_KEY = "num-examples"
"""The metric that weighs a reply: what Flower's Message-API strategies weigh by default."""

SERVER_NODE_ID = 1
"""The sender of instructions, as Flower numbers its SuperLink (``SUPERLINK_NODE_ID``)."""


def instruction_message(
    do: str,
    arrays: Mapping[str, np.ndarray],
    config: Mapping[str, Any],
    *,
    run_id: int,
    dst_node_id: int,
) -> Message:
    """The Message a SuperNode would hand a ClientApp for ``do`` on ``arrays`` with ``config``."""
    from flwr.app import DEFAULT_TTL, ConfigRecord, Metadata, RecordDict
    from flwr.app.message import make_message

    server_round = config.get("server-round")
    metadata = Metadata(
        run_id=run_id,
        message_id=uuid.uuid4().hex,
        src_node_id=SERVER_NODE_ID,
        dst_node_id=dst_node_id,
        reply_to_message_id="",
        group_id="" if server_round is None else str(server_round),
        created_at=time.time(),
        ttl=DEFAULT_TTL,
        message_type=do,
    )
    content = RecordDict(
        {"arrays": arrays_to_array_record(arrays, "npy"), "config": ConfigRecord(dict(config))}
    )
    return make_message(metadata, content)


class ClientAppTask:
    """A ``Task`` that is ``Instructed``: a ClientApp (see the module docstring)."""

    def __init__(self, app: ClientApp, context: Context) -> None:
        self._app = app
        self.context = context
        self._weights: dict[str, np.ndarray] = {}
        self._num_examples = 0
        self._warned: set[str] = set()

    @property
    def num_examples(self) -> int:
        """The examples of the app's last reply."""
        return self._num_examples

    def get_weights(self) -> dict[str, np.ndarray]:
        """The model the app last returned (or was last given); empty before the first."""
        return {name: array.copy() for name, array in self._weights.items()}

    def set_weights(self, weights: Mapping[str, np.ndarray]) -> None:
        self._weights = {name: np.array(array, copy=True) for name, array in weights.items()}

    def train(self, config: TrainConfig) -> TrainResult:
        raise TaskError(
            "a ClientApp trains when its ServerApp says so (task.flower_app runs a ServerApp "
            "at the root), not on its own"
        )

    def evaluate(self) -> EvalResult:
        raise TaskError("a ClientApp evaluates when its ServerApp says so, not on its own")

    def follow(
        self, do: Literal["train", "evaluate"], config: Mapping[str, bool | int | float | str]
    ) -> Reply:
        message = instruction_message(
            do,
            self._weights,
            config,
            run_id=self.context.run_id,
            dst_node_id=self.context.node_id,
        )
        try:
            reply = self._app(message, self.context)
        except Exception as exc:
            raise TaskError(f"the ClientApp's {do} raised {type(exc).__name__}: {exc}") from exc
        if reply.has_error():
            raise TaskError(f"the ClientApp's {do} replied with an error: {reply.error.reason}")
        return self._take(do, reply)

    def _take(self, do: str, reply: Message) -> Reply:
        content = reply.content
        metrics: dict[str, Any] = {}
        for record in content.metric_records.values():
            metrics.update(record)
        weight = metrics.pop(WEIGHT_KEY, None)
        if not isinstance(weight, int) or isinstance(weight, bool) or weight < 0:
            raise TaskError(
                f"the ClientApp's {do} reply needs a MetricRecord with {WEIGHT_KEY!r}, a whole "
                f"number >= 0 (got {weight!r})"
            )
        numbers: dict[str, int | float] = {}
        for key, value in metrics.items():
            if isinstance(value, int | float) and not isinstance(value, bool):
                numbers[key] = value
            elif key not in self._warned:
                self._warned.add(key)
                log.warning("a list-valued metric cannot travel up: dropped", metric=key)
        if do == "train":
            self._weights = self._trained(content)
        self._num_examples = weight
        return Reply(weight, numbers)

    def _trained(self, content: Any) -> dict[str, np.ndarray]:
        records = list(content.array_records.values())
        if len(records) != 1:
            raise TaskError(
                f"the ClientApp's train reply needs one ArrayRecord (the model), got {len(records)}"
            )
        try:
            trained = array_record_to_arrays(records[0])
        except DecodeError as exc:
            raise TaskError(f"the ClientApp's trained arrays do not decode: {exc}") from None
        if set(trained) != set(self._weights):
            raise TaskError(
                f"the ClientApp returned arrays {', '.join(trained)}; it was sent "
                f"{', '.join(self._weights)}"
            )
        return {name: trained[name].astype(self._weights[name].dtype) for name in self._weights}
