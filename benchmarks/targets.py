"""How every benchmark ends: its targets printed, met or missed, and its results as JSON."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["print_targets", "write_json"]


def print_targets(targets: Mapping[str, Mapping[str, Any]]) -> None:
    """One line per target: met or MISSED, its name and what was measured."""
    for name, verdict in targets.items():
        print(f"  {'met   ' if verdict['met'] else 'MISSED'} {name}: {json.dumps(verdict)}")


def write_json(path: str | Path | None, result: Mapping[str, Any]) -> None:
    """``result`` as indented JSON at ``path`` (its folder made), if a path is given."""
    if path is None:
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(result, indent=1))
