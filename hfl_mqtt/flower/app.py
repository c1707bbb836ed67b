"""A Flower app directory, as Flower's own templates lay it out, read with Flower's own means.

The directory holds a ``pyproject.toml`` with ``[tool.flwr.app.components]`` (``serverapp``
and ``clientapp``, each ``module:attribute``) and ``[tool.flwr.app.config]`` (the run config's
defaults). ``flwr.common.config`` reads and checks it and fuses the overrides (``task.params``)
into the run config, refusing a key the app does not declare, as ``flwr run --run-config``
does; ``flwr.supercore.object_ref.load_app`` imports the components with the directory on the
path, as a SuperLink or SuperNode does. Node ids are ours made into Flower's 64-bit ids.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hfl_mqtt.errors import ConfigError

if TYPE_CHECKING:
    from flwr.clientapp import ClientApp
    from flwr.serverapp import ServerApp

__all__ = ["FlowerApp", "load_flower_app", "node_id"]


@dataclass(frozen=True)
class FlowerApp:
    """A Flower app: where it is, its two components, and the run config (defaults fused with
    the overrides)."""

    directory: Path
    serverapp: str
    clientapp: str
    run_config: dict[str, Any]

    def server_app(self) -> ServerApp:
        from flwr.serverapp import ServerApp

        app = self._load(self.serverapp, "serverapp")
        if not isinstance(app, ServerApp):
            raise ConfigError(f"{self.serverapp}: not a flwr.serverapp.ServerApp")
        return app

    def client_app(self) -> ClientApp:
        from flwr.clientapp import ClientApp

        app = self._load(self.clientapp, "clientapp")
        if not isinstance(app, ClientApp):
            raise ConfigError(f"{self.clientapp}: not a flwr.clientapp.ClientApp")
        return app

    def _load(self, reference: str, component: str) -> Any:
        from flwr.supercore.object_ref import load_app

        try:
            return load_app(reference, ConfigError, self.directory)
        except ImportError as exc:
            raise ConfigError(
                f"{self.directory}: the {component} {reference!r} does not import: {exc}"
            ) from exc


def load_flower_app(directory: Path, overrides: dict[str, Any]) -> FlowerApp:
    """The Flower app in ``directory``; ``ConfigError`` if it is not one."""
    try:
        from flwr.common.config import flatten_dict, fuse_dicts, get_project_config
    except ImportError as exc:
        raise ConfigError("task.flower_app needs Flower: pip install 'hfl-mqtt[flower]'") from exc
    directory = Path(directory).absolute()
    try:
        project = get_project_config(directory)
    except (FileNotFoundError, ValueError) as exc:
        raise ConfigError(f"task.flower_app {directory}: not a Flower app: {exc}") from None
    app = project["tool"]["flwr"]["app"]
    components = app.get("components", {})
    missing = [c for c in ("serverapp", "clientapp") if not isinstance(components.get(c), str)]
    if missing:
        raise ConfigError(
            f"{directory / 'pyproject.toml'}: [tool.flwr.app.components] needs "
            f"{' and '.join(missing)}"
        )
    try:
        run_config = fuse_dicts(flatten_dict(app.get("config", {})), dict(overrides))
    except ValueError as exc:
        raise ConfigError(
            f"task.params for the Flower app {directory.name}: {exc} "
            "(its [tool.flwr.app.config] declares the keys a run may set)"
        ) from None
    return FlowerApp(directory, components["serverapp"], components["clientapp"], run_config)


def node_id(name: str) -> int:
    """The Flower id of node ``name`` (or of a run, named by its federation): stable, 63 bits
    (Flower's ids are unsigned 64-bit)."""
    digest = hashlib.sha256(name.encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1 or 1
