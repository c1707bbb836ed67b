"""The local-data task (a board's own CSV or .npy readings), the example data generator, the
device agent's installer and unit file (static checks; the install itself runs in
tests/test_device.py on an emulated board)."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
import yaml

from benchmarks import emulated_device as board
from hfl_mqtt.config import load_node
from hfl_mqtt.tasks.base import TaskConfig, TaskError, TrainConfig, load_task
from hfl_mqtt.tasks.local_data import make_task

REPO = Path(__file__).resolve().parent.parent
AGENT = REPO / "device_agents"
FACTORY = "hfl_mqtt.tasks.local_data:make_task"


def _readings_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "make_readings", AGENT / "example" / "make_readings.py"
    )
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


readings = _readings_module()


def farm_params(path: Path, **extra: Any) -> dict[str, Any]:
    return {
        "path": str(path),
        "label": readings.LABEL,
        "num_classes": readings.NUM_CLASSES,
        "mean": list(readings.MEAN),
        "std": list(readings.STD),
        **extra,
    }


def task_config(params: dict[str, Any], model: str = "mlp") -> TaskConfig:
    return TaskConfig(factory=FACTORY, model=model, hidden=16, params=params)  # type: ignore[arg-type]


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.fixture
def plot_csv(tmp_path: Path) -> Path:
    x, y = readings.readings(300, 2, seed=2)
    path = tmp_path / "readings.csv"
    readings.write_csv(path, x, y)
    return path


@pytest.fixture
def holdout_csv(tmp_path: Path) -> Path:
    x, y = readings.readings(600, None, seed=100)
    path = tmp_path / "holdout.csv"
    readings.write_csv(path, x, y)
    return path


# --- training and evaluating ---------------------------------------------------------------------


@pytest.mark.parametrize("model", ["softmax", "mlp"])
def test_a_worker_trains_on_its_csv_and_the_root_evaluates_on_the_holdout(
    plot_csv: Path, holdout_csv: Path, model: str
) -> None:
    worker = load_task(task_config(farm_params(plot_csv), model), 0, 2)
    root = load_task(task_config(farm_params(holdout_csv), model), None, 2)
    assert worker.num_examples == 300
    assert root.evaluate().num_examples == 600
    before = root.evaluate().accuracy
    for _ in range(15):
        worker.train(TrainConfig(epochs=2, batch_size=16, learning_rate=0.1))
    root.set_weights(worker.get_weights())
    after = root.evaluate()
    assert after.accuracy > max(before + 0.2, 0.7)
    # Every node starts from the same weights (config.seed), whatever its file.
    other = load_task(task_config(farm_params(holdout_csv), model), 1, 2)
    fresh = load_task(task_config(farm_params(plot_csv), model), 0, 2)
    for name, w in fresh.get_weights().items():
        np.testing.assert_array_equal(w, other.get_weights()[name])


def test_a_worker_with_eval_path_evaluates_there(plot_csv: Path, holdout_csv: Path) -> None:
    task = make_task(task_config(farm_params(plot_csv, eval_path=str(holdout_csv))), 0, 1)
    assert task.num_examples == 300
    assert task.evaluate().num_examples == 600


def test_features_are_chosen_and_standardised(tmp_path: Path) -> None:
    path = write(tmp_path / "r.csv", "a,b,c,label\n1,10,100,0\n3,30,300,1\n")
    params = {"path": str(path), "num_classes": 2, "features": ["c", "a"],
              "mean": [200, 2], "std": [100, 1]}  # fmt: skip
    task = make_task(task_config(params, "softmax"), 0, 1)
    assert task.get_weights()["fc1.weight"].shape == (2, 2)
    assert task.evaluate().num_examples == 2


def test_an_npy_file_takes_its_last_column_as_the_label(tmp_path: Path) -> None:
    path = tmp_path / "r.npy"
    x, y = readings.readings(50, 0, seed=0)
    np.save(path, np.column_stack([x, y]))
    task = make_task(task_config(farm_params(path, label=None), "softmax"), 0, 1)
    assert task.num_examples == 50
    assert task.get_weights()["fc1.weight"].shape == (3, 5)


def test_the_csv_path_imports_no_scikit_learn(plot_csv: Path) -> None:
    """A board has numpy only: building and training the task must not need scikit-learn."""
    settings = task_config(farm_params(plot_csv)).model_dump()
    code = (
        "import sys\n"
        "from hfl_mqtt.tasks.base import TaskConfig, TrainConfig, load_task\n"
        f"t = load_task(TaskConfig.model_validate({settings!r}), 0, 1)\n"
        "t.train(TrainConfig()); t.evaluate()\n"
        "import hfl_mqtt.cli, hfl_mqtt.roles.node\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
        "('sklearn', 'scipy', 'torch', 'matplotlib', 'flwr'))\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def test_the_example_configs_load_and_agree(tmp_path: Path) -> None:
    worker = load_node(AGENT / "example" / "pi-7.yaml")
    cloud = load_node(AGENT / "example" / "cloud.yaml")
    assert worker.role == "worker"
    assert cloud.role == "root"
    assert worker.task.model_dump(exclude={"params"}) == cloud.task.model_dump(exclude={"params"})
    assert {k: v for k, v in worker.task.params.items() if k != "path"} == {
        k: v for k, v in cloud.task.params.items() if k != "path"
    }
    assert list(worker.task.params["mean"]) == list(readings.MEAN)
    example = AGENT / "example"
    task = make_task(worker.task.model_copy(update={"params": {
        **worker.task.params, "path": str(example / "readings.csv")}}), 0, 1)  # fmt: skip
    assert task.num_examples == 400
    holdout = make_task(
        cloud.task.model_copy(
            update={"params": {**cloud.task.params, "path": str(example / "holdout.csv")}}
        ),
        None,
        2,
    )
    assert holdout.evaluate().num_examples == 1000


def test_the_generator_writes_what_it_says(tmp_path: Path) -> None:
    out = tmp_path / "x.csv"
    assert readings.main([str(out), "--rows", "30", "--plot", "mixed"]) == 0
    lines = out.read_text().splitlines()
    assert lines[0] == ",".join([*readings.COLUMNS, readings.LABEL])
    assert len(lines) == 31
    a, _ = readings.readings(30, 4, seed=1)
    b, _ = readings.readings(30, 4, seed=1)
    np.testing.assert_array_equal(a, b)


# --- bad files and settings: one TaskError naming the file and the problem ---------------------


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("", "empty: expected a header row"),
        ("1,2,0\n3,4,1\n", "line 1 holds numbers"),
        ("a,b,label\n", "no data rows"),
        ("a,b,label\n1,2,0\n1,2\n", "line 3: 2 values, the header has 3"),
        ("a,b,label\n1,2,0\n1,x,1\n", "line 3, column 'b': 'x' is not a number"),
        ("a,b,label\n1,,0\n", "line 2, column 'b': '' is not a number"),
        ("a,b,label\n1,nan,0\n", "line 2, column 'b': 'nan' is not a finite number"),
        ("a,b,label\n1,2,0.5\n", "label 0.5 is not a whole number"),
        ("a,b,label\n1,2,3\n", "label 3 is outside 0..2"),
        ("a,b,label\n1,2,-1\n", "label -1 is outside 0..2"),
        ("a,b,kind\n1,2,0\n", "no label column 'label'; the columns are a, b, kind"),
        ("a,a,label\n1,2,0\n", "distinct, non-empty column names"),
    ],
)
def test_a_bad_csv_names_the_file_and_the_problem(tmp_path: Path, text: str, problem: str) -> None:
    path = write(tmp_path / "bad.csv", text)
    with pytest.raises(TaskError) as caught:
        make_task(task_config({"path": str(path), "num_classes": 3}), 0, 1)
    assert str(path) in str(caught.value)
    assert problem in str(caught.value)


def test_a_missing_or_binary_file_is_a_task_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope.csv"
    with pytest.raises(TaskError, match=f"{missing}: cannot read: No such file"):
        make_task(task_config({"path": str(missing), "num_classes": 3}), 0, 1)
    binary = tmp_path / "bin.csv"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(TaskError, match=f"{binary}: not a CSV text file"):
        make_task(task_config({"path": str(binary), "num_classes": 3}), 0, 1)
    npy = tmp_path / "one.npy"
    np.save(npy, np.zeros(5))
    with pytest.raises(TaskError, match="expected a 2-D array"):
        make_task(task_config({"path": str(npy), "num_classes": 3}), 0, 1)


@pytest.mark.parametrize(
    ("params", "problem"),
    [
        ({}, "task.params.path: Field required"),
        ({"path": "x.csv"}, "task.params.num_classes: Field required"),
        ({"path": "x.csv", "num_classes": 3, "mean": [1]}, "mean and std go together"),
        ({"path": "x.csv", "num_classes": 3, "mean": [1], "std": [0]}, "std: every value"),
        ({"path": "x.csv", "num_classes": 3, "colour": "red"}, "task.params.colour"),
    ],
)
def test_bad_params_are_named(params: dict[str, Any], problem: str) -> None:
    with pytest.raises(TaskError, match="local data task") as caught:
        make_task(task_config(params), 0, 1)
    assert problem in str(caught.value)


def test_columns_that_do_not_fit_are_named(plot_csv: Path, tmp_path: Path) -> None:
    with pytest.raises(TaskError, match="mean and std have 5 values for 2 features"):
        make_task(task_config(farm_params(plot_csv, features=["air_temp_c", 0])), 0, 1)
    with pytest.raises(TaskError, match="no feature column 'wind'"):
        make_task(task_config(farm_params(plot_csv, features=["wind"])), 0, 1)
    with pytest.raises(TaskError, match="is also a feature"):
        make_task(task_config(farm_params(plot_csv, features=["irrigation"])), 0, 1)
    with pytest.raises(TaskError, match="torch_mlp is not available"):
        make_task(task_config(farm_params(plot_csv), "torch_mlp"), 0, 1)
    other = write(tmp_path / "other.csv", "x,irrigation\n1,0\n")
    with pytest.raises(TaskError, match="features x differ"):
        make_task(task_config(farm_params(plot_csv, eval_path=str(other), mean=None, std=None)),
                  0, 1)  # fmt: skip


# --- the installer and the unit -----------------------------------------------------------------


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed")
def test_the_shell_scripts_pass_shellcheck() -> None:
    scripts = [AGENT / "install.sh", AGENT / "emulated_rootfs.sh"]
    subprocess.run(["shellcheck", *map(str, scripts)], check=True)


def test_install_sh_helps_and_refuses_bad_arguments(tmp_path: Path) -> None:
    script = str(AGENT / "install.sh")
    shown = subprocess.run(["bash", script, "--help"], capture_output=True, text=True, check=True)
    assert "Usage:" in shown.stdout
    assert "--from SPEC" in shown.stdout
    no_args = subprocess.run(["bash", script], capture_output=True, text=True, check=False)
    assert no_args.returncode == 2
    assert "Usage:" in no_args.stderr
    unknown = subprocess.run(
        ["bash", script, "--colour"], capture_output=True, text=True, check=False
    )
    assert unknown.returncode == 2
    assert "unknown option --colour" in unknown.stderr
    missing = subprocess.run(
        ["bash", script, str(tmp_path / "nope.yaml")], capture_output=True, text=True, check=False
    )
    assert missing.returncode == 1
    assert "not a readable file" in missing.stderr


def test_the_unit_runs_the_node_hardened_and_restarts_it() -> None:
    unit = (AGENT / "hfl-mqtt@.service").read_text()
    d = {key: values[-1] for key, values in board.unit_directives(unit).items()}
    assert d["User"] == "hfl-mqtt"
    assert d["Restart"] == "on-failure"
    assert d["RestartSec"]
    assert d["KillSignal"] == "SIGTERM"
    assert d["TimeoutStopSec"]
    assert d["MemoryMax"]
    assert d["StateDirectory"] == "hfl-mqtt/%i"
    for key in ("NoNewPrivileges", "ProtectHome", "PrivateTmp", "PrivateDevices"):
        assert d[key] == "yes", key
    assert d["ProtectSystem"] == "strict"
    service = board.exec_start("pi-7", unit)
    assert service.argv == [
        "/opt/hfl-mqtt/bin/hfl-mqtt", "run", "--config", "/etc/hfl-mqtt/pi-7.yaml",
        "--log-format", "json",
    ]  # fmt: skip
    assert service.user == "hfl-mqtt"
    assert service.cwd == "/var/lib/hfl-mqtt/pi-7"
    # systemd 252 (bookworm) has no RestartSteps=: install.sh adds it as a drop-in on >= 254.
    assert "RestartSteps" not in d


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze missing")
def test_the_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    """``systemd-analyze verify`` on an instance; the only complaint allowed is the venv
    missing on this machine."""
    (tmp_path / "hfl-mqtt@.service").write_text((AGENT / "hfl-mqtt@.service").read_text())
    instance = tmp_path / "hfl-mqtt@pi-7.service"
    instance.symlink_to(tmp_path / "hfl-mqtt@.service")
    out = subprocess.run(
        ["systemd-analyze", "verify", str(instance)], capture_output=True, text=True, check=False
    )
    complaints = [
        line
        for line in (out.stdout + out.stderr).splitlines()
        if line.strip() and "/opt/hfl-mqtt/bin/hfl-mqtt is not executable" not in line
    ]
    assert not complaints, complaints


def test_the_install_plan_reads_the_node_file_as_the_service_will(tmp_path: Path) -> None:
    """The example worker's secrets resolve next to the node file, as install.sh places them."""
    example = yaml.safe_load((AGENT / "example" / "pi-7.yaml").read_text())
    example["upstream"]["broker"]["password_file"] = "pi-7/password"
    example["upstream"]["broker"]["tls"]["ca_file"] = "pi-7/ca.crt"
    (tmp_path / "pi-7").mkdir()
    write(tmp_path / "pi-7" / "password", "secret\n")
    node = tmp_path / "pi-7.yaml"
    node.write_text(yaml.safe_dump(example))
    broker = load_node(node).upstream.broker  # type: ignore[union-attr]
    assert broker.password() == "secret"
    assert broker.tls is not None
    assert broker.tls.ca_file == tmp_path / "pi-7" / "ca.crt"
