"""The MQTT Grid (``hfl_mqtt.flower.grid``) over scripted children on a memory broker: what a
strategy's messages become, the replies, the refusals; and the Flower internals it leans on."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import numpy as np
import pytest

pytest.importorskip("flwr")

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from hfl_mqtt.flower.app import node_id
from hfl_mqtt.flower.codec import array_record_to_arrays, arrays_to_array_record
from hfl_mqtt.flower.grid import make_grid, server_identity
from hfl_mqtt.roles.driven_root import DrivenRoot
from hfl_mqtt.roles.instructions import instruction_of
from hfl_mqtt.topics import status_topic
from hfl_mqtt.transport.memory import MemoryBroker, MemoryLink
from tests.fakes import W0, Peer, aggregator_config, assert_model, filled, shifted
from tests.test_instructions import answer_bytes

pytestmark = pytest.mark.anyio

RUN_ID = 42


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class Driven:
    """A driven root over scripted children, its Grid, and a way to call the Grid from a
    thread of its own (as a ServerApp does)."""

    def __init__(self, root: DrivenRoot, peers: dict[str, Peer]) -> None:
        self.root = root
        self.peers = peers
        self.grid = make_grid(root, asyncio.get_running_loop(), RUN_ID)

    async def call(self, fn: Callable[[], Any]) -> Any:
        def in_server_app() -> Any:
            with server_identity(RUN_ID):
                return fn()

        return await asyncio.to_thread(in_server_app)

    def messages(self, kind: str, children: list[str], **config: Any) -> list[Message]:
        """One content for ``children``, as a strategy makes it (needs the server identity)."""
        content = RecordDict(
            {"arrays": arrays_to_array_record(W0), "config": ConfigRecord(dict(config))}
        )
        with server_identity(RUN_ID):
            return [Message(content, node_id(c), kind) for c in children]


@contextlib.asynccontextmanager
async def driven(children: list[str], **rounds: Any) -> AsyncIterator[Driven]:
    broker = MemoryBroker()
    config = aggregator_config("cloud", children, **rounds)
    async with contextlib.AsyncExitStack() as stack:
        peers = {
            c: await stack.enter_async_context(Peer(broker, c, parent="cloud")) for c in children
        }
        down = await stack.enter_async_context(
            MemoryLink(broker, "cloud.down", status_topic=status_topic("fed", "cloud"))
        )
        root = DrivenRoot(config, down)
        running = asyncio.create_task(root.run())
        try:
            yield Driven(root, peers)
        finally:
            await root.end()
            async with asyncio.timeout(5):
                await running


async def test_a_strategys_train_messages_become_one_version_and_one_reply_each() -> None:
    async with driven(["a", "b", "c"]) as run:
        assert sorted(await run.call(lambda: list(run.grid.get_node_ids()))) == sorted(
            node_id(c) for c in "abc"
        )
        sent = run.messages("train", ["a", "b"], lr=0.3, **{"server-round": 1})
        replies = asyncio.create_task(
            run.call(lambda: list(run.grid.send_and_receive(sent, timeout=10)))
        )
        model = await run.peers["a"].next_model()
        assert (await run.peers["b"].next_model()).header.version == model.header.version
        assert model.header.metrics["skip"] == "c"  # a and b train this version, c not
        instruction = instruction_of(model.header.metrics)
        assert instruction is not None
        assert (instruction.do, dict(instruction.config)) == (
            "train",
            {"lr": 0.3, "server-round": 1},
        )
        assert_model(model.arrays, W0)
        base = model.header.version
        await run.peers["a"].send(answer_bytes("a", base, filled(W0, 1.0), 30, {"loss": 0.5}))
        await run.peers["b"].send(answer_bytes("b", base, filled(W0, 2.0), 10, {"loss": 1.5}))
        got = {r.metadata.src_node_id: r for r in await replies}
        assert set(got) == {node_id("a"), node_id("b")}
        for message in sent:
            assert message.metadata.message_id == ""  # the strategy's own are untouched
        for child, step, examples, loss in (("a", 1.0, 30, 0.5), ("b", 2.0, 10, 1.5)):
            reply = got[node_id(child)]
            assert not reply.has_error()
            assert reply.metadata.message_type == "train"
            assert reply.metadata.reply_to_message_id != ""
            assert_model(array_record_to_arrays(reply.content["arrays"]), shifted(W0, step))
            metrics = reply.content["metrics"]
            assert isinstance(metrics, MetricRecord)
            assert dict(metrics) == {"loss": loss, "num-examples": examples}


async def test_evaluate_replies_carry_metrics_only() -> None:
    async with driven(["a"]) as run:
        sent = run.messages("evaluate", ["a"])
        replies = asyncio.create_task(run.call(lambda: list(run.grid.send_and_receive(sent))))
        model = await run.peers["a"].next_model()
        zero = filled(W0, 0.0)
        await run.peers["a"].send(
            answer_bytes("a", model.header.version, zero, 4, {"eval_acc": 0.75, "eval_loss": 1.0})
        )
        (reply,) = await replies
        assert list(reply.content.keys()) == ["metrics"]
        assert dict(reply.content["metrics"]) == {
            "eval_acc": 0.75,
            "eval_loss": 1.0,
            "num-examples": 4,
        }
        # Recorded as the run's evaluation, so the summary and the monitor show it.
        (event,) = run.root.report.evaluations
        assert (event["accuracy"], event["loss"], event["examples"]) == (0.75, 1.0, 4)


async def test_a_child_that_does_not_answer_in_time_gets_an_error_reply() -> None:
    async with driven(["a", "b"], deadline_s=0.3, min_fraction=0.5) as run:
        sent = run.messages("train", ["a", "b"])
        replies = asyncio.create_task(run.call(lambda: list(run.grid.send_and_receive(sent))))
        model = await run.peers["a"].next_model()
        await run.peers["a"].send(answer_bytes("a", model.header.version, filled(W0, 1.0), 5, {}))
        got = {r.metadata.src_node_id: r for r in await replies}
        assert not got[node_id("a")].has_error()
        assert got[node_id("b")].has_error()
        assert "did not answer" in got[node_id("b")].error.reason


@pytest.mark.parametrize(
    ("kind", "config", "reason"),
    [
        ("query", {}, "message type 'query'"),
        ("train", {"blob": b"\x00"}, "config 'blob' is a bytes"),
        ("train", {"sizes": [1, 2]}, "config 'sizes' is a list"),
    ],
)
async def test_what_the_tree_cannot_carry_gets_an_error_reply_and_nothing_is_sent(
    kind: str, config: dict[str, Any], reason: str
) -> None:
    async with driven(["a"]) as run:
        sent = run.messages(kind, ["a"], **config)
        (reply,) = await run.call(lambda: list(run.grid.send_and_receive(sent, timeout=10)))
        assert reply.has_error()
        assert reason in reply.error.reason
        assert run.peers["a"].pending() == []
        assert run.root.version == 0


async def test_arrays_of_other_records_or_nodes_are_refused() -> None:
    async with driven(["a"]) as run:
        odd = RecordDict({"weights": ArrayRecord([np.zeros(2, np.float32)])})

        def push_odd() -> list[Message]:
            return list(run.grid.send_and_receive([Message(odd, node_id("a"), "train")]))

        (reply,) = await run.call(push_odd)
        assert "an ArrayRecord 'arrays'" in reply.error.reason

        def push_to_a_stranger() -> list[Message]:
            content = RecordDict({"arrays": arrays_to_array_record(W0)})
            return list(run.grid.send_and_receive([Message(content, 12345, "train")]))

        (reply,) = await run.call(push_to_a_stranger)
        assert "node 12345 is not a child of the root" in reply.error.reason


async def test_the_grid_pulls_what_it_pushed() -> None:
    async with driven(["a"]) as run:
        sent = run.messages("evaluate", ["a"])
        ids = await run.call(lambda: list(run.grid.push_messages(sent)))
        assert await run.call(lambda: list(run.grid.pull_messages(ids))) == []
        model = await run.peers["a"].next_model()
        await run.peers["a"].send(
            answer_bytes("a", model.header.version, filled(W0, 0.0), 2, {"x": 1.0})
        )
        for _ in range(100):
            pulled = await run.call(lambda: list(run.grid.pull_messages(ids)))
            if pulled:
                break
            await asyncio.sleep(0.02)
        assert [r.metadata.reply_to_message_id for r in pulled] == ids
        assert await run.call(lambda: list(run.grid.pull_messages(ids))) == []


# --- the Flower internals the Grid and the ClientApp task lean on ---------------------------------


def test_flowers_internals_the_message_api_path_uses_are_where_they_were() -> None:
    """If one of these moves in a Flower release, this fails first, and says which."""
    from flwr.app import DEFAULT_TTL, Metadata
    from flwr.app.message import make_message
    from flwr.common.config import flatten_dict, fuse_dicts, get_project_config
    from flwr.supercore.object_ref import load_app
    from flwr.supercore.run import Run
    from flwr.supercore.task_identity import TaskIdentity

    assert {"_task_id", "_run_id", "_node_id"} <= set(vars(TaskIdentity))
    assert callable(load_app)
    assert callable(get_project_config)
    assert fuse_dicts(flatten_dict({"a": {"b": 1}}), {"a.b": 2}) == {"a.b": 2}
    assert Run.create_empty(7).run_id == 7
    metadata = Metadata(7, "m", 1, 2, "", "1", 0.0, DEFAULT_TTL, "train")
    message = make_message(metadata, RecordDict())
    assert message.metadata.message_id == "m"
    reply = Message(RecordDict(), reply_to=message)
    assert (reply.metadata.reply_to_message_id, reply.metadata.dst_node_id) == ("m", 1)


def test_the_server_identity_is_the_processes_and_is_put_back() -> None:
    from flwr.supercore.task_identity import TaskIdentity

    before = TaskIdentity._run_id
    with server_identity(RUN_ID):
        message = Message(RecordDict(), 5, "train")
        assert (message.metadata.run_id, message.metadata.dst_node_id) == (RUN_ID, 5)
    assert TaskIdentity._run_id == before
