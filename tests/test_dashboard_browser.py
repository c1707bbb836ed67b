"""A real browser on the dashboard of a real simulation: Debian's headless chromium, driven by
selenium through the system chromedriver (nothing is downloaded: SE_OFFLINE, explicit paths).

``hfl-mqtt sim --web`` runs a small federation on Mosquitto; once the run has written its summary
(the dashboard lingers), the page must show every node of the tree and the run's final accuracy,
select a node clicked on its circle or its label, and list ids in natural order; the same run
replayed (``hfl-mqtt monitor --replay``) must say "replay", not "live".
A screenshot is kept in ``$HFL_MQTT_TEST_ARTIFACTS`` (default ``out/test-artifacts/``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from hfl_mqtt.cli import DEMO

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
ROOT = Path(__file__).resolve().parent.parent

# Skipped on a developer's machine without a browser; in CI (which installs it) never skipped.
pytestmark = pytest.mark.skipif(
    (CHROMIUM is None or CHROMEDRIVER is None) and not os.environ.get("CI"),
    reason="needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)",
)


def artifacts() -> Path:
    directory = Path(os.environ.get("HFL_MQTT_TEST_ARTIFACTS") or ROOT / "out" / "test-artifacts")
    directory.mkdir(parents=True, exist_ok=True)
    return directory


@pytest.fixture
def browser(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    monkeypatch.setenv("SE_OFFLINE", "true")  # selenium-manager must never fetch a browser
    options = webdriver.ChromeOptions()
    assert CHROMIUM is not None
    options.binary_location = CHROMIUM
    for argument in (
        "--headless=new",
        "--no-sandbox",  # CI runs as root
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1600,1700",
        "--force-device-scale-factor=1",
    ):
        options.add_argument(argument)
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    driver.set_page_load_timeout(15)
    try:
        yield driver
    finally:
        driver.quit()


def wait_for(what: str, check: Callable[[], bool], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def test_the_dashboard_of_a_simulation_shows_the_tree_and_its_accuracy(
    tmp_path: Path, spawn: Callable[..., subprocess.Popen[bytes]], browser: Any
) -> None:
    config = DEMO.model_dump(mode="json")
    config["levels"][0]["rounds"] = 3
    config["federation"] = "browser"
    path = tmp_path / "federation.yaml"
    path.write_text(yaml.safe_dump(config))
    out = tmp_path / "out"
    log = (tmp_path / "sim.log").open("wb")
    command = [sys.executable, "-m", "hfl_mqtt.cli", "sim", str(path), "--out", str(out)]
    command += ["--processes", "2", "--web", "127.0.0.1:0", "--web-linger", "60"]
    sim = spawn(command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)

    def url() -> str | None:
        found = re.search(rb"dashboard: (http://\S+)", (tmp_path / "sim.log").read_bytes())
        return found.group(1).decode() if found else None

    wait_for("the dashboard's address", lambda: url() is not None or sim.poll() is not None)
    assert sim.poll() is None, (tmp_path / "sim.log").read_text()
    wait_for("the run's summary", (out / "summary.json").exists, timeout=25)
    time.sleep(0.2)  # its last bytes
    summary = json.loads((out / "summary.json").read_text())
    final = summary["final_accuracy"]
    nodes = {report["node"] for report in summary["nodes"]}
    assert len(nodes) == 11
    assert sim.poll() is None  # lingering

    address = url()
    assert address is not None
    browser.get(address)

    def accuracy() -> str:
        value: str = browser.find_element("id", "accuracy-value").get_attribute("data-value")
        return value

    wait_for("every node", lambda: shown_nodes(browser) == nodes)
    # The root's metrics record carries its accuracy to 4 decimals.
    wait_for(
        "the final accuracy", lambda: accuracy() != "" and abs(float(accuracy()) - final) < 5e-5
    )
    assert browser.find_element("id", "accuracy-value").text == f"{final:.4f}"
    assert browser.find_element("id", "federation").text == "browser"
    edges = browser.find_elements("css selector", "#tree path.edge")
    assert len(edges) == len(nodes) - 1  # the tree's shape came through: every node's parent
    statuses = {
        e.get_attribute("data-status")
        for e in browser.find_elements("css selector", "#tree g.node")
    }
    assert statuses <= {"online", "idle", "offline"}
    assert browser.find_element("id", "connection").text == "live"
    clicks_select_nodes_and_ids_sort_naturally(browser, nodes)
    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert errors == []
    shot = artifacts() / "dashboard.png"
    assert browser.save_screenshot(str(shot))
    assert shot.stat().st_size > 10_000
    replay_says_it_is_one(browser, spawn, out / "metrics.jsonl", tmp_path / "replay.log", nodes)


def shown_nodes(browser: Any) -> set[str]:
    found = browser.find_elements("css selector", "#tree [data-node]")
    return {element.get_attribute("data-node") for element in found}


def clicks_select_nodes_and_ids_sort_naturally(browser: Any, nodes: set[str]) -> None:
    def panel_shows(node: str) -> Callable[[], bool]:
        return lambda: browser.find_element("css selector", "#node-panel h3").text.startswith(node)

    # A node's label is part of it: a click on the label selects the node (it once fell through
    # to the link under it: "element click intercepted ... path class=edge").
    browser.find_element("css selector", '#tree [data-node="edge-0"] text').click()
    wait_for("edge-0's panel", panel_shows("edge-0"))
    for worker in sorted(n for n in nodes if n.startswith("worker"))[:2]:
        browser.find_element("css selector", f'#tree [data-node="{worker}"]').click()
        wait_for(f"{worker}'s panel", panel_shows(worker))
    rows = [
        row.get_attribute("data-node-row")
        for row in browser.find_elements("css selector", "#node-list tr")
    ]
    assert rows[:3] == ["cloud", "edge-0", "edge-1"]
    numbers = [int(row.rsplit("-", 1)[1]) for row in rows if row.startswith("worker-")]
    assert numbers == sorted(numbers)  # natural order: worker-8 before worker-10


def replay_says_it_is_one(
    browser: Any,
    spawn: Callable[..., subprocess.Popen[bytes]],
    metrics: Path,
    log: Path,
    nodes: set[str],
) -> None:
    """The same run replayed: the page says "replay", not "live", and no age is one from now."""
    command = [sys.executable, "-m", "hfl_mqtt.cli", "monitor", "--replay", str(metrics)]
    spawn(
        [*command, "--web", "127.0.0.1:0"],
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        cwd=ROOT,
    )

    def url() -> str | None:
        found = re.search(rb"(http://\S+)", log.read_bytes())
        return found.group(1).decode() if found else None

    wait_for("the replay's address", lambda: url() is not None)
    browser.get(url())
    wait_for("every node replayed", lambda: shown_nodes(browser) == nodes)
    connection = browser.find_element("id", "connection")
    wait_for("the replay badge", lambda: connection.text == "replay")
    assert connection.get_attribute("data-state") == "replay"
    assert " ago" not in browser.find_element("id", "node-panel").text
    assert "replay" in browser.find_element("id", "updated").text
