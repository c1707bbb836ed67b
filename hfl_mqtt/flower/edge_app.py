"""A Flower ``ClientApp`` (Message API) whose ``train`` runs an hfl-mqtt subtree.

For Flower's deployment engine: a ServerApp with its strategy on the SuperLink, and an edge
as a SuperNode that runs this ClientApp. The SuperNode says which edge it is in its node
config, the path of the edge's node YAML (``hfl-mqtt run``'s format, with ``flower_parent: {}``
and its ``downstream`` children)::

    flower-supernode --insecure --superlink 127.0.0.1:9092 \\
        --node-config 'hfl-config="edges/edge-0.yaml"'

and the Flower app's ``pyproject.toml`` names ``hfl_mqtt.flower.edge_app:app`` as its client app.

- ``train``: the message's ``arrays`` become the parent's model; the edge connects to its
  broker, runs one cycle of ``rounds`` rounds with its children (``train_subtree``), and
  replies with the aggregate under the same keys, and ``metrics``: ``num-examples`` (the
  weight of Flower's Message-API FedAvg), ``train_loss`` (the children's mean), ``participants``,
  ``rounds``, ``tree_bytes``, ``tree_messages``. Its versions number on from the config's
  ``server-round``. The workers keep running between messages (and after the run: nothing
  tells a SuperNode that a run has ended).
- ``evaluate``: the edge's task evaluates the arrays: ``eval_loss``, ``eval_acc``,
  ``num-examples``.

Tensors are matched to the task's model by name, or, if the ServerApp built its ``ArrayRecord``
from a plain list, by position. ``flwr`` is imported when Flower asks for ``app`` (a module
``__getattr__``), so the module itself imports without it.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from hfl_mqtt.aggregation.base import Model
from hfl_mqtt.config import NodeConfig, load_node
from hfl_mqtt.errors import ConfigError, DecodeError, FlowerParentError
from hfl_mqtt.flower.codec import array_record_to_arrays, arrays_to_array_record
from hfl_mqtt.tasks.base import Task, load_task

if TYPE_CHECKING:
    from flwr.app import Context, Message
    from flwr.clientapp import ClientApp

# ``app`` is built on first use (``__getattr__``); Flower's check of an app reference looks
# for it among the module's assignments or here.
__all__ = ["NODE_CONFIG_KEY", "app", "evaluate", "make_client_app", "train"]  # noqa: F822

NODE_CONFIG_KEY = "hfl-config"
"""The SuperNode's node-config entry naming the edge's YAML file."""


def make_client_app() -> ClientApp:
    """A ClientApp with ``train`` and ``evaluate`` (what ``hfl_mqtt.flower.edge_app:app`` is)."""
    from flwr.clientapp import ClientApp

    client_app = ClientApp()
    client_app.train()(train)
    client_app.evaluate()(evaluate)
    return client_app


def __getattr__(name: str) -> Any:
    if name == "app":  # built on first use, so that importing this module needs no flwr
        globals()["app"] = client_app = make_client_app()
        return client_app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def train(message: Message, context: Context) -> Message:
    """Run one cycle of the edge's subtree from the message's arrays; reply the aggregate."""
    from flwr.app import Message, MetricRecord, RecordDict

    from hfl_mqtt.flower.parent import train_subtree

    config = _node_config(context)
    task = load_task(config.task, None, config.num_partitions)
    model, keys = _model_of(message, task)
    server_round = message.content["config"].get("server-round", 1)
    if not isinstance(server_round, int) or isinstance(server_round, bool) or server_round < 1:
        server_round = 1
    result = asyncio.run(train_subtree(config, model, parent_version=server_round, task=task))
    metrics = MetricRecord(
        {
            "num-examples": result.num_examples,
            **{
                ("train_loss" if name == "loss" else name): value
                for name, value in result.metrics.items()
                if isinstance(value, int | float) and not isinstance(value, bool)
            },
        }
    )
    arrays = arrays_to_array_record(dict(zip(keys, result.model.values(), strict=True)))
    return Message(RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=message)


def evaluate(message: Message, context: Context) -> Message:
    """Evaluate the message's arrays with the edge's task."""
    from flwr.app import Message, MetricRecord, RecordDict

    config = _node_config(context)
    task = load_task(config.task, None, config.num_partitions)
    model, _ = _model_of(message, task)
    task.set_weights(model)
    scores = task.evaluate()
    metrics = MetricRecord(
        {
            "eval_loss": float(scores.loss),
            "eval_acc": float(scores.accuracy),
            "num-examples": scores.num_examples,
        }
    )
    return Message(RecordDict({"metrics": metrics}), reply_to=message)


def _node_config(context: Context) -> NodeConfig:
    path = context.node_config.get(NODE_CONFIG_KEY)
    if not isinstance(path, str):
        raise ConfigError(
            f"the SuperNode's node config needs {NODE_CONFIG_KEY}: the path of the edge's YAML "
            f"(flower-supernode --node-config '{NODE_CONFIG_KEY}=\"edge-0.yaml\"')"
        )
    config = load_node(path)
    if config.flower_parent is None:
        raise ConfigError(
            f"{path}: an edge under Flower needs flower_parent (an empty map will do)"
        )
    return config


def _model_of(message: Message, task: Task) -> tuple[Model, list[str]]:
    """The message's arrays as the task's model (in its order), and the keys to reply under."""
    try:
        received = array_record_to_arrays(message.content["arrays"])
    except DecodeError as exc:
        raise FlowerParentError(f"the ServerApp's arrays do not decode: {exc}") from None
    reference = task.get_weights()
    names = list(reference)
    if set(received) == set(names):
        keys, model = names, {name: received[name] for name in names}
    elif len(received) == len(names):  # built from a plain list: by position
        keys, model = list(received), dict(zip(names, received.values(), strict=True))
    else:
        raise FlowerParentError(
            f"the ServerApp sent arrays {', '.join(received)}; the model's are {', '.join(names)}"
        )
    return model, keys  # train_subtree checks shapes and dtypes; evaluate's task does too
