"""Shared test settings."""

import os
import signal
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import structlog
from hypothesis import HealthCheck, settings

from hfl_mqtt.brokers import BrokerConfig, MosquittoBroker

# The machine is shared and noisy: no per-example deadlines. In CI, fixed examples.
settings.register_profile("default", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile(
    "ci",
    parent=settings.get_profile("default"),
    derandomize=True,
    print_blob=True,
)
settings.load_profile("ci" if os.environ.get("CI") else "default")


# --- real Mosquitto brokers and subprocesses for the end-to-end tests ---------------------------


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    """A test that runs ``hfl_mqtt.cli.main`` in process points structlog at its captured
    stderr; later tests must not log into that closed file."""
    saved = structlog.get_config()
    yield
    structlog.configure(**saved)


@pytest.fixture(autouse=True)
def state_dir(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Each test's nodes (and the processes it starts) keep their checkpoints apart: a node
    run by ``hfl-mqtt run`` resumes from its state directory by default."""
    directory = tmp_path_factory.mktemp("state")
    monkeypatch.setenv("HFL_MQTT_STATE_DIR", str(directory))
    return directory


@pytest.fixture
def start_broker(tmp_path: Path) -> Iterator[Callable[..., MosquittoBroker]]:
    """Start private Mosquitto brokers (free port, own workdir under tmp_path); all are stopped
    at teardown, even if the test failed or killed one of them."""
    started: list[MosquittoBroker] = []

    def start(config: BrokerConfig | None = None, name: str | None = None) -> MosquittoBroker:
        workdir = tmp_path / (name or f"broker-{len(started)}")
        broker = MosquittoBroker(config or BrokerConfig(), workdir)
        started.append(broker)
        broker.start()
        return broker

    yield start
    for broker in reversed(started):
        broker.close()


@pytest.fixture
def spawn() -> Iterator[Callable[..., subprocess.Popen[bytes]]]:
    """Start subprocesses (``subprocess.Popen`` arguments); any still running at teardown is
    terminated, then killed."""
    started: list[subprocess.Popen[bytes]] = []

    def run(args: list[str], **kwargs: object) -> subprocess.Popen[bytes]:
        process = subprocess.Popen(args, **kwargs)  # type: ignore[call-overload]
        started.append(process)
        return process

    yield run
    for process in started:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    for process in started:
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
