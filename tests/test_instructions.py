"""Instructions from a driver above the root: down in model headers, replies up in deltas."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Mapping

import numpy as np
import pytest

from hfl_mqtt.codec import Header, encode_message
from hfl_mqtt.roles.instructions import (
    Instruction,
    combine_replies,
    instruction_of,
    reply_entries,
    reply_of,
)
from hfl_mqtt.roles.worker import Worker
from hfl_mqtt.tasks.base import Reply, TaskError
from hfl_mqtt.transport.memory import MemoryBroker, MemoryLink
from tests.fakes import (
    FED,
    W0,
    FakeTask,
    Peer,
    assert_model,
    filled,
    running_aggregator,
    shifted,
    worker_config,
)

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


# --- the header entries ---------------------------------------------------------------------------


def test_an_instruction_travels_as_header_entries_and_back() -> None:
    told = Instruction("evaluate", {"server-round": 3, "lr": 0.1, "name": "x", "on": True})
    entries = told.header_entries()
    assert entries == {
        "do": "evaluate",
        "cfg.server-round": 3,
        "cfg.lr": 0.1,
        "cfg.name": "x",
        "cfg.on": True,
    }
    assert instruction_of({**entries, "round": 7, "participants": "a,b"}) == told


@pytest.mark.parametrize("do", [None, "query", 1, ""])
def test_a_header_without_a_known_action_carries_no_instruction(do: object) -> None:
    metrics = {"cfg.lr": 0.1} if do is None else {"do": do, "cfg.lr": 0.1}
    assert instruction_of(metrics) is None  # type: ignore[arg-type]


def test_replies_are_finite_numbers_only() -> None:
    entries = reply_entries({"acc": 0.5, "n": 3, "bad": math.nan, "inf": math.inf})
    assert entries == {"reply.acc": 0.5, "reply.n": 3}
    assert reply_of({**entries, "loss": 1.0, "reply.flag": True, "reply.s": "x"}) == {
        "acc": 0.5,
        "n": 3,
    }


def test_replies_combine_into_the_examples_weighted_mean() -> None:
    combined = combine_replies(
        [
            (30, {"reply.acc": 0.9, "reply.loss": 1.0, "loss": 5.0}),
            (10, {"reply.acc": 0.5, "reply.loss": 3.0}),
            (0, {"reply.acc": 0.0}),
        ]
    )
    assert combined == {"reply.acc": pytest.approx(0.8), "reply.loss": pytest.approx(1.5)}


def test_replies_without_examples_combine_into_the_plain_mean() -> None:
    assert combine_replies([(0, {"reply.a": 1.0}), (0, {"reply.a": 3.0})]) == {"reply.a": 2.0}
    assert combine_replies([]) == {}


# --- an aggregator passes instructions on ---------------------------------------------------------


def answer_bytes(
    sender: str, base: int, delta: Mapping[str, np.ndarray], n: int, reply: dict[str, float]
) -> bytes:
    header = Header(
        federation=FED,
        sender=sender,
        kind="delta",
        version=base + 1,
        base_version=base,
        num_examples=n,
        metrics=reply_entries(reply),
    )
    return encode_message(header, delta, "npy")


async def test_an_edge_passes_instructions_down_and_combines_the_replies_up() -> None:
    async with running_aggregator("edge", ["a", "b"], parent="cloud", rounds=2) as run:
        cloud, a, b = run.peers["cloud"], run.peers["a"], run.peers["b"]
        train = Instruction("train", {"lr": 0.3, "server-round": 1})
        await cloud.publish_model(W0, **train.header_entries())
        for _ in range(2):  # a train cycle is the edge's own rounds
            model = await a.next_model()
            await b.next_model()
            assert instruction_of(model.header.metrics) == train
            base = model.header.version
            await a.send(answer_bytes("a", base, filled(W0, 1.0), 30, {"loss": 1.0}))
            await b.send(answer_bytes("b", base, filled(W0, 1.0), 10, {"loss": 3.0}))
        _, report = await cloud.next_message()
        assert_model(report.arrays, filled(W0, 2.0))
        assert report.header.num_examples == 40
        assert reply_of(report.header.metrics) == {"loss": pytest.approx(1.5)}

        # An evaluate cycle: one round, the model left as it is, zero deltas up.
        moved = shifted(W0, 2.0)
        evaluate = Instruction("evaluate", {"server-round": 1})
        await cloud.publish_model(moved, **evaluate.header_entries())
        model = await a.next_model()
        await b.next_model()
        assert instruction_of(model.header.metrics) == evaluate
        zero = filled(W0, 0.0)
        await a.send(answer_bytes("a", model.header.version, zero, 5, {"acc": 1.0}))
        await b.send(answer_bytes("b", model.header.version, zero, 15, {"acc": 0.6}))
        _, report = await cloud.next_message()
        assert report.header.codec == "npy+zstd"
        assert_model(report.arrays, zero)
        assert report.header.num_examples == 20
        assert reply_of(report.header.metrics) == {"acc": pytest.approx(0.7)}
        assert_model(run.agg.model or {}, moved)
        assert run.report.rounds == 3


# --- a worker follows them ------------------------------------------------------------------------


class Obedient(FakeTask):
    """A FakeTask that is ``Instructed``: it trains by ``config["step"]`` and fails on
    ``config["fail"]``."""

    def __init__(self) -> None:
        super().__init__()
        self.told: list[tuple[str, dict[str, object]]] = []

    def follow(self, do: str, config: Mapping[str, bool | int | float | str]) -> Reply:
        self.told.append((do, dict(config)))
        if config.get("fail"):
            raise TaskError("the app broke")
        if do == "train":
            step = np.float32(config["step"])
            self.weights = {k: v + step for k, v in self.weights.items()}
            return Reply(7, {"train_loss": 0.25})
        return Reply(3, {"eval_acc": 0.75})


async def run_worker(task: FakeTask, versions: list[tuple[dict[str, np.ndarray], Instruction]]):
    """A worker under a scripted parent that publishes ``versions`` one by one and collects
    the answer to each (None: the worker sent nothing within a second)."""
    broker = MemoryBroker()
    answers = []
    async with Peer(broker, "edge", serves=True) as edge:
        link = MemoryLink(broker, "w")
        worker = Worker(worker_config("w", "edge"), link, task)
        stop = asyncio.Event()
        async with link:
            running = asyncio.create_task(worker.run(stop))
            for model, instruction in versions:
                await edge.publish_model(model, **instruction.header_entries())
                try:
                    _, message = await edge.next_message(timeout=1.0)
                except TimeoutError:
                    message = None
                answers.append(message)
            stop.set()
            await asyncio.wait_for(running, 5)
    return answers, worker.report


async def test_a_worker_follows_instructions_and_replies() -> None:
    task = Obedient()
    answers, report = await run_worker(
        task,
        [
            (W0, Instruction("train", {"step": 0.5})),
            (W0, Instruction("evaluate", {"server-round": 1})),
            (W0, Instruction("train", {"fail": True})),
            (W0, Instruction("train", {"step": 1.0})),
        ],
    )
    trained, evaluated, failed, again = answers
    assert trained is not None
    assert_model(trained.arrays, filled(W0, 0.5))
    assert trained.header.num_examples == 7
    assert reply_of(trained.header.metrics) == {"train_loss": 0.25}
    assert evaluated is not None
    assert evaluated.header.codec == "npy+zstd"
    assert_model(evaluated.arrays, filled(W0, 0.0))
    assert reply_of(evaluated.header.metrics) == {"eval_acc": 0.75}
    assert failed is None  # the app broke: nothing sent, the worker stays
    assert report.last_error == "the app broke"
    assert again is not None
    assert_model(again.arrays, filled(W0, 1.0))
    assert [do for do, _ in task.told] == ["train", "evaluate", "train", "train"]
    assert report.trained == 2  # neither the evaluation nor the failed run counts


async def test_a_plain_task_evaluates_when_told_and_trains_as_usual() -> None:
    """Federated evaluation needs nothing of a task: its own ``evaluate()`` replies."""
    answers, _ = await run_worker(
        FakeTask(step=0.25),
        [(W0, Instruction("evaluate", {})), (W0, Instruction("train", {"lr": 1.0}))],
    )
    evaluated, trained = answers
    assert evaluated is not None
    assert evaluated.header.num_examples == 10
    assert reply_of(evaluated.header.metrics) == {"loss": 1.0, "accuracy": 0.5}
    assert trained is not None
    assert_model(trained.arrays, filled(W0, 0.25))
    assert reply_of(trained.header.metrics) == {"loss": 1.0}


def test_the_obedient_fake_is_instructed() -> None:
    from hfl_mqtt.tasks.base import Instructed, Task

    assert isinstance(Obedient(), Instructed)
    assert isinstance(Obedient(), Task)
    assert not isinstance(FakeTask(), Instructed)
