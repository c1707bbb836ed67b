"""How every benchmark ends: accuracy over seeds summarized, its targets printed, met or
missed, and its results as JSON."""

from __future__ import annotations

import json
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["accuracy_spread", "print_targets", "write_json"]


def accuracy_spread(
    records: Sequence[Mapping[str, Any]], keys: Sequence[str], value: str
) -> list[dict[str, Any]]:
    """One row per distinct ``keys`` of ``records`` (in first-seen order): those keys and the
    median, least and most of ``value`` over its seeds (a missing value counts as 0)."""
    points: dict[tuple[Any, ...], list[float]] = {}
    for record in records:
        points.setdefault(tuple(record[k] for k in keys), []).append(record[value] or 0.0)
    return [
        dict(zip(keys, point, strict=True))
        | {
            "accuracy_median": round(statistics.median(values), 4),
            "accuracy_min": round(min(values), 4),
            "accuracy_max": round(max(values), 4),
            "seeds": len(values),
        }
        for point, values in points.items()
    ]


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
