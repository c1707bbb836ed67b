"""The configuration of a Flower strategy on a synchronous level (``flower_strategy``).

Plain settings, checked when the configuration loads; the strategy itself is built by the
``flower`` plug-in (``hfl_mqtt.flower.strategy``), which this module does not import.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, JsonValue, model_validator

__all__ = ["FlowerStrategyConfig", "required_results"]


def required_results(strategy: str, options: Mapping[str, Any]) -> int:
    """The fewest results ``strategy`` (``Krum`` or ``Bulyan``) is meaningful with; 1 otherwise.

    Krum tolerates ``f = num_malicious_clients`` Byzantine clients among ``n > 2f + 2``
    (Blanchard et al., 2017), and Multi-Krum averages ``num_clients_to_keep`` of them; Bulyan
    needs ``n >= 4f + 3`` (El Mhamdi et al., 2018; Flower raises below it).
    """
    if strategy not in ("Krum", "Bulyan"):
        return 1
    f = int(options.get("num_malicious_clients", 0))
    if strategy == "Krum":
        return max(2 * f + 3, int(options.get("num_clients_to_keep", 0)))
    return 4 * f + 3


StrategyName = Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")]
ImportPath = Annotated[str, Field(pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")]


class FlowerStrategyConfig(BaseModel):
    """A Flower strategy for a synchronous level: a short name in ``flwr.server.strategy`` or
    an import path (``class: "module:Class"``, a user's own ``Strategy`` subclass), and the
    keyword arguments to build it with."""

    model_config = ConfigDict(
        frozen=True,
        extra="forbid",
        validate_by_name=True,
        validate_by_alias=True,
        serialize_by_alias=True,
    )

    name: StrategyName | None = None
    """A strategy of ``flwr.server.strategy``: FedAvg, FedAvgM, FedMedian, FedTrimmedAvg, Krum,
    Bulyan, FedAdam, FedYogi, FedAdagrad, ..."""
    class_path: ImportPath | None = Field(default=None, alias="class")
    """``module:Class``: a ``flwr.server.strategy.Strategy`` subclass."""
    options: dict[str, JsonValue] = Field(default_factory=dict)
    """Keyword arguments of the strategy's constructor (JSON-like values)."""

    @model_validator(mode="after")
    def _checked(self) -> FlowerStrategyConfig:
        if (self.name is None) == (self.class_path is None):
            raise ValueError("give exactly one of name (in flwr.server.strategy) and class")
        if "initial_parameters" in self.options:
            raise ValueError(
                "options.initial_parameters: the aggregator's model is the initial one"
            )
        if self.name in ("Krum", "Bulyan"):
            for key in ("num_malicious_clients", "num_clients_to_keep", "to_keep"):
                value = self.options.get(key, 0)
                if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                    raise ValueError(f"options.{key} must be an integer >= 0")
            if self.name == "Bulyan" and self.options.get("to_keep", 0) != 0:
                raise ValueError(
                    "options.to_keep: Bulyan's Krum must pick single models (to_keep: 0)"
                )
        return self

    @property
    def label(self) -> str:
        """The strategy as the configuration names it."""
        return self.name or self.class_path or ""

    def check_children(self, children: int, where: str) -> None:
        """Raise ``ValueError`` if ``children`` can never give the strategy enough results
        (``where`` names the field in the message)."""
        needed = required_results(self.name or "", self.options)
        if children < needed:
            raise ValueError(
                f"{where}: {self.name} with these options needs at least {needed} results a "
                f"round, and an aggregator here has {children} children"
            )
