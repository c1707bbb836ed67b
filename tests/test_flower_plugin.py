"""Flower is a plug-in: the core never imports ``hfl_mqtt.flower``, and runs without ``flwr``."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import hfl_mqtt
from hfl_mqtt.errors import ConfigError
from hfl_mqtt.plugins import FlowerPlugin, flower

PACKAGE = Path(hfl_mqtt.__file__).parent

_WITHOUT_FLWR = """
import importlib, pathlib, sys
sys.modules["flwr"] = None  # any "import flwr..." now fails
package = pathlib.Path("{package}")
def modules(paths):
    for path in sorted(paths):
        parts = path.relative_to(package.parent).with_suffix("").parts
        if parts[-1] != "__main__":
            yield ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
flower = package / "flower"
core = list(modules(p for p in package.rglob("*.py") if flower not in p.parents))
for name in core:
    importlib.import_module(name)
loaded = sorted(m for m in sys.modules if m.startswith("hfl_mqtt.flower"))
assert not loaded, f"the core imported {loaded}"
print(len(core))
for name in modules(flower.rglob("*.py")):
    importlib.import_module(name)
sys.modules["torch"] = None
import numpy as np
from hfl_mqtt.codec import Compressor
from hfl_mqtt.flower import codec
tensors = Compressor().encode({"w": np.zeros(2)})
for call, extra in [
    (lambda: codec.to_array_record(tensors), "flower"),
    (lambda: codec.to_parameters(tensors), "flower"),
    (lambda: codec.tensors_to_state_dict(tensors), "torch"),
]:
    try:
        call()
    except ImportError as exc:
        assert f"pip install 'hfl-mqtt[{extra}]'" in str(exc), exc
    else:
        raise AssertionError("no ImportError")
print("ok")
"""


def test_the_core_imports_without_flwr_and_never_loads_the_flower_package() -> None:
    script = _WITHOUT_FLWR.replace("{package}", str(PACKAGE))
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    count, ok = result.stdout.split()
    assert int(count) > 50
    assert ok == "ok"


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports, at any depth of its code (lazy imports too)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names |= {f"{node.module}.{alias.name}" for alias in node.names}
    return names


def test_no_core_module_names_the_flower_package_or_flwr_even_lazily() -> None:
    offenders = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        if (PACKAGE / "flower") in path.parents:
            continue
        bad = sorted(
            name
            for name in _imports(path)
            if name == "flwr" or name.startswith(("flwr.", "hfl_mqtt.flower"))
        )
        if bad:
            offenders[str(path.relative_to(PACKAGE))] = bad
    assert offenders == {}


def test_the_flower_plugin_is_found_by_its_entry_point() -> None:
    plugin: FlowerPlugin = flower()
    from hfl_mqtt.flower import plugin as registered

    assert plugin is registered


def test_a_missing_plugin_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    from hfl_mqtt import plugins

    monkeypatch.setattr(plugins, "entry_points", lambda **_: [])
    with pytest.raises(ConfigError, match=r"pip install 'hfl-mqtt\[flower\]'"):
        plugins.flower()
