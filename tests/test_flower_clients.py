"""Unmodified Flower clients as workers: the adapter, its configuration, and whole federations.

The adapter is checked against small ``NumPyClient`` s defined here (which record what Flower's
``fit``/``evaluate`` would be given); the shipped example (``examples/flower_clients``, a torch
MLP written as Flower's quickstarts write one) trains in a 3-level federation on real Mosquitto.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydantic import ValidationError

from hfl_mqtt.config import FederationConfig, LevelConfig, load_federation
from hfl_mqtt.errors import ConfigError
from hfl_mqtt.flower.client import FIT_CONFIG_KEYS, FlowerClientTask, fit_config
from hfl_mqtt.roles import run_node
from hfl_mqtt.sim import simulate
from hfl_mqtt.tasks import RoundAware, Task, TaskConfig, TaskError, TrainConfig, load_task
from hfl_mqtt.tasks.base import import_callable
from hfl_mqtt.transport.memory import MemoryBroker
from tests.fakes import memory_links, needs_mosquitto

flwr = pytest.importorskip("flwr")
from flwr.client import NumPyClient  # noqa: E402

pytestmark = pytest.mark.flower

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "flower_clients" / "federation.yaml"
HERE = __name__


# --- Flower clients as their users write them ---------------------------------------------------


CALLS: list[tuple[str, int, dict[str, Any]]] = []
"""(method, partition, config) of every fit/evaluate of the clients below, in any thread."""
_CALLS_LOCK = threading.Lock()


def record(method: str, partition: int, config: dict[str, Any]) -> None:
    with _CALLS_LOCK:
        CALLS.append((method, partition, dict(config)))


@pytest.fixture(autouse=True)
def _fresh_calls() -> None:
    CALLS.clear()


class StepClient(NumPyClient):
    """Adds ``config["lr"]`` to every weight in fit; a float64 matrix, an int64 counter."""

    def __init__(self, partition_id: int = 0, examples: int = 10) -> None:
        self.partition_id = partition_id
        self.examples = examples
        self.received: list[list[np.ndarray]] = []

    def get_parameters(self, config: dict[str, Any]) -> list[np.ndarray]:
        return [np.zeros((3, 2), dtype=np.float64), np.zeros(2), np.array(5, dtype=np.int64)]

    def fit(self, parameters: list[np.ndarray], config: dict[str, Any]) -> Any:
        record("fit", self.partition_id, config)
        self.received.append(parameters)
        w, b, count = parameters
        return [w + config["lr"], b - 1, count + 1], self.examples, {"loss": 0.5, "note": "text"}

    def evaluate(self, parameters: list[np.ndarray], config: dict[str, Any]) -> Any:
        record("evaluate", self.partition_id, config)
        return float(np.sum(parameters[0])), 7, {"accuracy": 0.25}


class PartitionClient(StepClient):
    def __init__(self, partition_id: int) -> None:
        super().__init__(partition_id)


def step_client(partition_id: int) -> StepClient:
    return StepClient(partition_id, examples=10 + partition_id)


def step_client_counted(partition_id: int, num_partitions: int) -> StepClient:
    return StepClient(partition_id, examples=100 * num_partitions + partition_id)


def step_client_flower(context: Any) -> Any:
    """Flower's own ``client_fn(context)``, returning a ``Client``."""
    node = context.node_config
    client = StepClient(node["partition-id"], examples=1000 + node["num-partitions"])
    client.examples += int(context.run_config.get("bonus", 0))
    return client.to_client()


def evaluate_fn(server_round: int, parameters_ndarrays: list[np.ndarray], config: Any) -> Any:
    """A strategy's evaluate_fn: the loss is the mean of the matrix, to see which model came."""
    record("evaluate_fn", -1, {"server_round": server_round, **config})
    return float(parameters_ndarrays[0].mean()), {"accuracy": 0.75, "num_examples": 3}


CONTEXTS: list[Any] = []


def context_client_fn(context: Any) -> StepClient:
    CONTEXTS.append(context)
    return StepClient()


def task_of(client: Any, **kwargs: Any) -> FlowerClientTask:
    return FlowerClientTask(client, **kwargs)


# --- the adapter ------------------------------------------------------------------------------


def test_weights_are_named_by_list_index_as_float32_copies() -> None:
    task = task_of(StepClient())
    assert isinstance(task, Task)
    assert isinstance(task, RoundAware)
    weights = task.get_weights()
    assert list(weights) == ["0", "1", "2"]
    assert {k: (w.shape, w.dtype) for k, w in weights.items()} == {
        "0": ((3, 2), np.float32),
        "1": ((2,), np.float32),
        "2": ((), np.float32),
    }
    weights["0"][:] = 9.0  # a copy: the task's model is untouched
    assert not task.get_weights()["0"].any()
    # Flower's own naming of a list of arrays is the same.
    record_ = flwr.app.ArrayRecord(numpy_ndarrays=StepClient().get_parameters({}))
    assert list(record_) == list(weights)


def test_set_weights_checks_names_and_shapes() -> None:
    task = task_of(StepClient())
    new = {"0": np.ones((3, 2)), "1": np.full(2, 2.0), "2": np.array(7.6)}
    task.set_weights(new)
    assert {k: float(v.sum()) for k, v in task.get_weights().items()} == {
        "0": 6.0,
        "1": 4.0,
        "2": pytest.approx(7.6),
    }
    with pytest.raises(TaskError, match="missing \\['2'\\]"):
        task.set_weights({"0": new["0"], "1": new["1"]})
    with pytest.raises(TaskError, match="weight '1' has shape \\(3,\\)"):
        task.set_weights({**new, "1": np.zeros(3)})


def test_fit_gets_the_weights_in_the_clients_dtypes_and_returns_float32() -> None:
    client = StepClient(examples=42)
    task = task_of(client)
    task.set_weights({"0": np.ones((3, 2)), "1": np.zeros(2), "2": np.array(7.6)})
    result = task.train(TrainConfig(learning_rate=0.5))
    (w, b, count) = client.received[0]
    assert (w.dtype, b.dtype, count.dtype) == (np.float64, np.float64, np.int64)
    assert int(count) == 8  # rounded, not truncated
    assert result.num_examples == task.num_examples == 42
    assert result.metrics == {"loss": 0.5}  # numbers only
    after = task.get_weights()
    np.testing.assert_array_equal(after["0"], np.full((3, 2), 1.5, np.float32))
    np.testing.assert_array_equal(after["1"], np.full(2, -1.0, np.float32))
    assert after["2"] == 9.0
    assert all(a.dtype == np.float32 for a in after.values())


def test_fit_config_has_the_keys_flower_clients_read() -> None:
    train = TrainConfig(epochs=3, batch_size=8, learning_rate=0.05, proximal_mu=0.1, max_steps=7)
    assert fit_config(train, 4, {"custom": "x"}) == {
        "server_round": 4,
        "local_epochs": 3,
        "epochs": 3,
        "learning_rate": 0.05,
        "lr": 0.05,
        "batch_size": 8,
        "proximal_mu": 0.1,
        "max_steps": 7,
        "custom": "x",
    }
    assert set(fit_config(train, 1)) == FIT_CONFIG_KEYS
    assert "max_steps" not in fit_config(TrainConfig(), 1)


def test_server_round_is_the_announced_version_else_the_call_count() -> None:
    task = task_of(StepClient(), params={"custom": 1})
    task.train(TrainConfig())
    task.train(TrainConfig())
    task.begin_round(17)
    task.train(TrainConfig())
    task.train(TrainConfig())  # an announcement is for one call
    task.evaluate()
    task.begin_round(5)
    task.evaluate()
    assert [(m, c["server_round"]) for m, _, c in CALLS] == [
        ("fit", 1),
        ("fit", 2),
        ("fit", 17),
        ("fit", 4),
        ("evaluate", 1),
        ("evaluate", 5),
    ]
    assert CALLS[-1][2] == {"server_round": 5, "custom": 1}


def test_evaluate_with_the_client_or_an_evaluate_fn() -> None:
    task = task_of(StepClient())
    task.set_weights({"0": np.ones((3, 2)), "1": np.zeros(2), "2": np.array(0.0)})
    result = task.evaluate()
    assert (result.num_examples, result.loss, result.accuracy) == (7, 6.0, 0.25)

    central = task_of(StepClient(), evaluate_fn=evaluate_fn, params={"custom": "y"})
    central.set_weights({"0": np.full((3, 2), 1.5), "1": np.zeros(2), "2": np.array(0.0)})
    central.begin_round(3)
    result = central.evaluate()
    assert (result.num_examples, result.loss, result.accuracy) == (0, 1.5, 0.75)
    assert CALLS[-1] == ("evaluate_fn", -1, {"server_round": 3, "custom": "y"})


class Broken(StepClient):
    """A client whose ``method`` returns ``value``."""

    def __init__(self, method: str, value: Any) -> None:
        super().__init__()
        self.method, self.value = method, value

    def get_parameters(self, config: dict[str, Any]) -> Any:
        return self.value if self.method == "get_parameters" else super().get_parameters(config)

    def fit(self, parameters: list[np.ndarray], config: dict[str, Any]) -> Any:
        return self.value if self.method == "fit" else super().fit(parameters, config)

    def evaluate(self, parameters: list[np.ndarray], config: dict[str, Any]) -> Any:
        return self.value if self.method == "evaluate" else super().evaluate(parameters, config)


GOOD = [np.zeros((3, 2)), np.zeros(2), np.array(5)]


@pytest.mark.parametrize(
    ("method", "value", "message"),
    [
        ("get_parameters", [], "get_parameters returned no arrays"),
        ("get_parameters", np.zeros(3), "returned ndarray, not a list of arrays"),
        ("get_parameters", [np.array(["a"])], "returned <U1 as array 0"),
        ("fit", (GOOD, 3), "fit returned tuple, not a tuple of 3"),
        ("fit", ([np.zeros((2, 3)), *GOOD[1:]], 3, {}), "fit returned arrays of shapes"),
        ("fit", (GOOD[:2], 3, {}), "fit returned arrays of shapes"),
        ("fit", ([[0.0], *GOOD[1:]], 3, {}), "returned list as array 0"),
        ("fit", (GOOD, 3.0, {}), "3.0 as num_examples"),
        ("fit", (GOOD, -1, {}), "-1 as num_examples"),
        ("fit", (GOOD, 3, None), "NoneType as metrics"),
        ("evaluate", (0.1, 3, {"acc": 0.5}), "no numeric 'accuracy' metric .*\\['acc'\\]"),
        ("evaluate", (0.1, 3, {"accuracy": "high"}), "no numeric 'accuracy'"),
        ("evaluate", ("low", 3, {"accuracy": 0.5}), "'low' as loss"),
        ("evaluate", (0.1, 3), "not a tuple of 3"),
    ],
)
def test_what_a_client_returns_is_checked(method: str, value: Any, message: str) -> None:
    def run() -> None:
        task = task_of(Broken(method, value), name="client 'x'")
        task.train(TrainConfig())
        task.evaluate()

    with pytest.raises(TaskError, match=message):
        run()


def test_an_evaluate_fn_returning_none_or_no_accuracy_is_refused() -> None:
    with pytest.raises(TaskError, match="flower_evaluate returned None"):
        task_of(StepClient(), evaluate_fn=lambda r, p, c: None).evaluate()
    with pytest.raises(TaskError, match="no numeric 'accuracy'"):
        task_of(StepClient(), evaluate_fn=lambda r, p, c: (0.1, {})).evaluate()


# --- configuration and load_task --------------------------------------------------------------


def flower_config(client: str = "step_client", **extra: Any) -> TaskConfig:
    return TaskConfig(flower_client=f"{HERE}:{client}", **extra)


@pytest.mark.parametrize(
    ("client", "partition", "examples"),
    [
        ("step_client", 2, 12),  # fn(partition_id)
        ("step_client_counted", 2, 402),  # fn(partition_id, num_partitions)
        ("step_client_flower", 2, 1004),  # Flower's client_fn(context) -> Client
        ("PartitionClient", 3, 10),  # a class is a function too
    ],
)
def test_the_client_function_is_called_by_its_signature(
    client: str, partition: int, examples: int
) -> None:
    task = load_task(flower_config(client), partition, 4)
    assert isinstance(task, FlowerClientTask)
    result = task.train(TrainConfig(learning_rate=0.25))
    assert result.num_examples == examples
    assert result.metrics == {"loss": 0.5}
    assert task.get_weights()["0"][0, 0] == 0.25
    assert [(m, p) for m, p, _ in CALLS] == [("fit", partition)]


def test_a_flower_client_fn_gets_the_node_and_run_config_flower_gives() -> None:
    CONTEXTS.clear()
    load_task(flower_config("context_client_fn", params={"bonus": 5}), 1, 3)
    (context,) = CONTEXTS
    assert isinstance(context, flwr.app.Context)
    assert context.node_config == {"partition-id": 1, "num-partitions": 3}
    assert context.run_config == {"bonus": 5}


def test_the_root_uses_partition_0_and_the_evaluate_fn() -> None:
    config = flower_config(flower_evaluate=f"{HERE}:evaluate_fn", params={"custom": 2})
    root = load_task(config, None, 4)
    assert root.get_weights().keys() == {"0", "1", "2"}
    assert root.evaluate().accuracy == 0.75
    assert CALLS == [("evaluate_fn", -1, {"server_round": 1, "custom": 2})]
    # A worker does not evaluate centrally; without flower_evaluate the root uses the client.
    assert load_task(config, 1, 4).evaluate().accuracy == 0.25
    assert load_task(flower_config(), None, 4).evaluate().accuracy == 0.25
    assert [(m, p) for m, p, _ in CALLS[1:]] == [("evaluate", 1), ("evaluate", 0)]


def takes_three(a: int, b: int, c: int) -> StepClient:
    return StepClient()


def takes_nothing() -> StepClient:
    return StepClient()


def takes_keyword(*, partition_id: int) -> StepClient:
    return StepClient()


def not_a_client(partition_id: int) -> object:
    return {"weights": []}


def evaluate_fn_two_args(server_round: int, parameters: list[np.ndarray]) -> Any:
    return 0.0, {}


NOT_CALLABLE = 3


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"flower_client": "no_such_module_xyz:fn"}, "cannot import module 'no_such_module_xyz'"),
        ({"flower_client": f"{HERE}:missing"}, "has no attribute 'missing'"),
        ({"flower_client": f"{HERE}:NOT_CALLABLE"}, "is not callable"),
        ({"flower_client": f"{HERE}:takes_three"}, "takes \\(a, b, c\\); it must"),
        ({"flower_client": f"{HERE}:takes_nothing"}, "takes \\(\\); it must take"),
        ({"flower_client": f"{HERE}:takes_keyword"}, "it must take \\(partition_id\\)"),
        ({"flower_client": f"{HERE}:not_a_client"}, "returned dict, not a flwr.client.NumPy"),
        (
            {"flower_client": f"{HERE}:step_client", "flower_evaluate": f"{HERE}:nope"},
            "task.flower_evaluate .* has no attribute 'nope'",
        ),
        (
            {"flower_client": f"{HERE}:step_client", "flower_evaluate": f"{HERE}:takes_nothing"},
            "it must take \\(server_round, parameters_ndarrays, config\\)",
        ),
        (
            {
                "flower_client": f"{HERE}:step_client",
                "flower_evaluate": f"{HERE}:evaluate_fn_two_args",
            },
            "it must take \\(server_round",
        ),
        (
            {"flower_client": f"{HERE}:step_client", "params": {"lr": 0.5, "x": 1}},
            "task.params \\['lr'\\]: these fit config keys come from task.train",
        ),
        (
            {"flower_client": f"{HERE}:step_client", "params": {"layers": [1, 2]}},
            "task.params\\['layers'\\] is list",
        ),
    ],
)
def test_bad_flower_settings_fail_with_a_clear_task_error(
    settings: dict[str, Any], message: str
) -> None:
    with pytest.raises(TaskError, match=message):
        load_task(TaskConfig.model_validate(settings), None, 4)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"flower_client": "module.without.callable"}, "is not of the form 'module:callable'"),
        ({"flower_client": "m:f", "flower_evaluate": ":f"}, "flower_evaluate\n.*not of the form"),
        ({"flower_evaluate": "m:f"}, "flower_evaluate needs flower_client"),
        ({"flower_client": "m:f", "model": "mlp"}, "model: not used with flower_client"),
        (
            {"flower_client": "m:f", "dataset": "synthetic", "factory": "a:b"},
            "factory, dataset: not used with flower_client",
        ),
    ],
)
def test_flower_settings_are_checked_when_the_config_loads(
    settings: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValidationError, match=message):
        TaskConfig.model_validate(settings)


def test_a_bad_flower_setting_in_a_file_names_its_field(tmp_path: Path) -> None:
    text = EXAMPLE.read_text().replace(":client_fn ", " ")
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=r"bad\.yaml: task\.flower_client: .*'module:callable'"):
        load_federation(path)


def test_modules_are_found_in_the_current_directory_as_python_m_would(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``hfl-mqtt`` is a console script: the directory it runs in is not on ``sys.path``."""
    package = tmp_path / "hfl_cwd_probe"
    package.mkdir()
    (package / "clients.py").write_text("def client_fn(partition_id):\n    return partition_id\n")
    (package / "broken.py").write_text("import hfl_no_such_dependency\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    try:
        assert import_callable("hfl_cwd_probe.clients:client_fn")(3) == 3
        assert sys.path[0] == str(tmp_path)
        # A dependency missing from a module that is there is named as such.
        with pytest.raises(TaskError, match="No module named 'hfl_no_such_dependency'"):
            import_callable("hfl_cwd_probe.broken:x")
    finally:
        for name in [m for m in sys.modules if m.startswith("hfl_cwd_probe")]:
            del sys.modules[name]
    # Not there either: the path is left as it was.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    sys.path.remove(str(tmp_path))
    with pytest.raises(TaskError, match="No module named 'hfl_cwd_probe'"):
        import_callable("hfl_cwd_probe.clients:client_fn")
    assert str(elsewhere) not in sys.path


def test_the_current_directory_wins_over_an_installed_package_of_the_same_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Opacus installs a top-level ``examples`` package; ours must still be found."""
    installed = tmp_path / "site"
    (installed / "hfl_shadowed").mkdir(parents=True)
    (installed / "hfl_shadowed" / "__init__.py").write_text("")
    project = tmp_path / "project"
    (project / "hfl_shadowed" / "clients").mkdir(parents=True)
    (project / "hfl_shadowed" / "__init__.py").write_text("")  # as examples/__init__.py
    (project / "hfl_shadowed" / "clients" / "client.py").write_text(
        "def client_fn(p):\n    return p\n"
    )
    monkeypatch.chdir(project)
    monkeypatch.setattr(sys, "path", [str(installed)] + [p for p in sys.path if p != ""])
    try:
        assert import_callable("hfl_shadowed.clients.client:client_fn")(5) == 5
    finally:
        for name in [m for m in sys.modules if m.startswith("hfl_shadowed")]:
            del sys.modules[name]


def test_the_message_api_cannot_be_called_outside_a_flower_runtime() -> None:
    """Why ``flower_client_app`` is not offered (docs/flower-clients.md): in flwr 1.41 the
    public ``Message(content, dst_node_id, message_type)`` reads the process's run and node id
    from ``flwr.supercore.task_identity.TaskIdentity``, which only Flower's runtimes set. If
    this starts to pass, Flower has made it possible: revisit."""
    from flwr.app import ConfigRecord, Message, RecordDict

    content = RecordDict({"config": ConfigRecord({"lr": 0.1})})
    with pytest.raises(RuntimeError, match="TaskIdentity"):
        Message(content, 0, "train")


# --- whole federations ----------------------------------------------------------------------


@pytest.mark.anyio
async def test_server_round_follows_the_model_versions_in_a_federation() -> None:
    """Cloud (3 rounds) > 2 edges (tau 2) > 4 step clients, on the in-memory broker: a worker's
    server_round is its edge's version, the root's evaluate_fn gets the global round."""
    config = FederationConfig(
        federation="flower",
        levels=[
            LevelConfig(name="cloud", rounds=3),
            LevelConfig(name="edge", rounds=2),
            LevelConfig(name="worker"),
        ],
        fanout=[2, 2],
        task=flower_config(
            "step_client_counted",
            flower_evaluate=f"{HERE}:evaluate_fn",
            train=TrainConfig(learning_rate=0.5),
        ),
    )
    broker = MemoryBroker()
    async with asyncio.timeout(15):
        reports = await asyncio.gather(
            *(run_node(n, links=memory_links(broker)) for n in config.node_configs({}))
        )
    root = next(r for r in reports if r.node == "cloud")
    assert root.rounds == 3
    for partition in range(4):
        rounds = [c["server_round"] for m, p, c in CALLS if m == "fit" and p == partition]
        assert rounds == [1, 2, 3, 4, 5, 6]
    assert [c["server_round"] for m, _, c in CALLS if m == "evaluate_fn"] == [1, 2, 3]
    # Every fit adds lr to the matrix: 2 edge rounds of 0.5 per global round.
    assert [e["loss"] for e in root.evaluations] == pytest.approx([1.0, 2.0, 3.0])


@pytest.mark.anyio
@needs_mosquitto
async def test_the_example_flower_clients_train_in_a_3_level_federation(tmp_path: Path) -> None:
    """``examples/flower_clients/federation.yaml`` shrunk to a cloud, 2 edges and 6 workers for
    5 global rounds: torch NumPyClients in worker processes, real Mosquitto."""
    pytest.importorskip("torch")
    data = load_federation(EXAMPLE).model_dump()
    data["fanout"] = [2, 3]
    data["levels"][0]["rounds"] = 5
    config = FederationConfig.model_validate(data)
    started = time.monotonic()
    summary = await asyncio.wait_for(simulate(config, tmp_path / "out", processes=2), 60)
    elapsed = time.monotonic() - started
    assert summary["global_rounds"] == 5
    assert summary["workers"] == 6
    assert summary["final_accuracy"] >= 0.85
    assert not summary["updates_rejected"]
    assert elapsed < 45


def test_the_example_reads_what_fit_config_gives() -> None:
    """The example's client trains from fit_config's keys; its root evaluates on the test set."""
    pytest.importorskip("torch")
    config = load_federation(EXAMPLE).task
    worker = load_task(config, 0, 12)
    before = worker.get_weights()
    result = worker.train(config.train)
    assert result.num_examples > 0
    assert "train_loss" in result.metrics
    root = load_task(config, None, 12)
    root.set_weights(worker.get_weights())
    assert 0.0 <= root.evaluate().accuracy <= 1.0
    assert any(not np.array_equal(before[k], v) for k, v in worker.get_weights().items())


def test_without_flwr_a_flower_client_says_what_to_install() -> None:
    """The adapter imports flwr only when it needs it (the ``flower`` extra)."""
    script = (
        "import sys\n"
        "sys.modules['flwr'] = None\n"
        "import hfl_mqtt.flower.client\n"
        "from hfl_mqtt.tasks import TaskConfig, TaskError, load_task\n"
        "try:\n"
        "    load_task(TaskConfig(flower_client='builtins:abs'), 0, 2)\n"
        "except TaskError as e:\n"
        "    print(e)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=False, cwd=ROOT
    )
    assert result.returncode == 0, result.stderr
    assert "pip install 'hfl-mqtt[flower]'" in result.stdout
