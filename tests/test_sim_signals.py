"""``hfl-mqtt sim`` ended by a signal leaves nothing running: its worker processes, its brokers
and its dashboard's process end with it (SIGTERM used to kill the simulator alone)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from hfl_mqtt.cli import DEMO
from tests.fakes import needs_mosquitto

pytestmark = needs_mosquitto

ROOT = Path(__file__).resolve().parent.parent


def descendants(pid: int) -> set[int]:
    """Every process below ``pid`` (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # it ended meanwhile
        children.setdefault(int(fields[1]), []).append(int(entry.name))
    found: set[int] = set()
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.parametrize("web", [False, True], ids=["plain", "with-dashboard"])
def test_sigterm_ends_the_simulation_and_everything_it_started(
    tmp_path: Path, spawn: Callable[..., subprocess.Popen[bytes]], web: bool
) -> None:
    config = DEMO.model_dump(mode="json") | {"federation": "signalled"}
    config["levels"][0]["rounds"] = 500
    path = tmp_path / "federation.yaml"
    path.write_text(yaml.safe_dump(config))
    log = tmp_path / "sim.log"
    command = [sys.executable, "-m", "hfl_mqtt.cli", "sim", str(path), "--out", str(tmp_path)]
    command += ["--processes", "2", *(["--web", "127.0.0.1:0"] if web else [])]
    sim = spawn(command, stdout=log.open("wb"), stderr=subprocess.STDOUT, cwd=ROOT)
    deadline = time.monotonic() + 60
    while not re.search(rb"round +3/", log.read_bytes()):
        assert sim.poll() is None, log.read_text()
        assert time.monotonic() < deadline, "the run never reached round 3"
        time.sleep(0.1)
    started = descendants(sim.pid)
    assert len(started) >= 3  # the broker and the two worker processes, at least
    sim.send_signal(signal.SIGTERM)
    try:
        code = sim.wait(30)
        deadline = time.monotonic() + 10
        while [pid for pid in started if alive(pid)] and time.monotonic() < deadline:
            time.sleep(0.1)
        left = [pid for pid in started if alive(pid)]
    finally:
        for pid in [pid for pid in started if alive(pid)]:  # not ours to leave behind
            os.kill(pid, signal.SIGKILL)
    assert code == 128 + signal.SIGTERM, log.read_text()
    assert left == [], log.read_text()
