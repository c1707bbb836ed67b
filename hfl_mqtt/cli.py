"""The ``hfl-mqtt`` command.

- ``hfl-mqtt run --config NODE.yaml``: one node, one process (the deployment path: a device).
  ``--config a.yaml --config b.yaml`` (or ``--config nodes/*.yaml``): several nodes in one
  process, as one lab machine standing in for many devices. SIGTERM or SIGINT stops them
  cleanly (exit code 0); a second one stops them at once.
- ``hfl-mqtt sim FEDERATION.yaml --out DIR``: a whole federation on this machine; with
  ``--web HOST:PORT`` its live dashboard (hfl_mqtt/monitor/web.py), ``--web-linger S`` seconds
  beyond the run's end.
- ``hfl-mqtt demo``: a small 3-level federation on digits, no arguments needed (``--web`` too).
- ``hfl-mqtt plan FEDERATION.yaml --out DIR``: everything a fleet needs (node configs, brokers
  with passwords and ACLs, with ``--tls`` a CA and certificates, START.md); hfl_mqtt/plan.py.
- ``hfl-mqtt export MODEL --format torch|flower|npz --out FILE``: a model the root kept, for
  other tools (hfl_mqtt/export.py, docs/registry.md).
- ``hfl-mqtt monitor --broker HOST:PORT``: the live tree of a running federation, from what its
  broker carries (hfl_mqtt/monitor/): in the terminal, ``--prometheus HOST:PORT`` and
  ``--web HOST:PORT`` (the dashboard); ``--replay FILE --web HOST:PORT`` serves a finished sim's
  dashboard from its metrics.jsonl, without a broker.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hfl_mqtt.config import FederationConfig, NodeConfig, load_federation, load_node
from hfl_mqtt.errors import ConfigError, HflError
from hfl_mqtt.logs import LOG_FORMATS, LogFormat, configure_logging, log_format_from_env
from hfl_mqtt.runner import NodeOutcome, SignalStop, run_nodes

if TYPE_CHECKING:
    from hfl_mqtt.sim import Progress

# The simulator (brokers, process pools, plots) is imported by `sim` and `demo` only: a device
# running `hfl-mqtt run` loads what a node needs and nothing more.

__all__ = ["DEMO", "main"]

DEMO = FederationConfig.model_validate(
    {
        "federation": "demo",
        "levels": [
            {"name": "cloud", "rounds": 15, "downlink_codec": "fp16"},
            {"name": "edge", "rounds": 2, "uplink_codec": "q8", "downlink_codec": "fp16"},
            {"name": "worker", "uplink_codec": "q8"},
        ],
        "fanout": [2, 4],
        "task": {
            "dataset": "digits",
            "model": "mlp",
            "partition": {"scheme": "dirichlet", "alpha": 1.0},
            "train": {"epochs": 2, "batch_size": 16, "learning_rate": 0.1},
        },
    }
)
"""Cloud, 2 edges, 8 workers; digits split non-IID; fp16 down, 8-bit deltas up."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hfl-mqtt", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run a node (one process per device), or several")
    run.add_argument(
        "--config",
        required=True,
        type=Path,
        nargs="+",
        action="extend",
        help="a node's YAML file; several (repeated, or after one --config) run in one process",
    )
    run.add_argument(
        "--fresh",
        action="store_true",
        help="start over: remove the aggregators' checkpoints instead of resuming from them",
    )
    run.add_argument(
        "--log-format",
        choices=LOG_FORMATS,
        help="console (default) or json: one JSON object per line, for journald "
        "(default from HFL_MQTT_LOG_FORMAT)",
    )
    sim = commands.add_parser("sim", help="run a whole federation on this machine")
    sim.add_argument("config", type=Path, help="the federation's YAML file")
    sim.add_argument("--out", required=True, type=Path, help="directory for the results")
    sim.add_argument("--processes", type=int, help="worker processes (default: one per core)")
    sim.add_argument(
        "--resume",
        type=Path,
        metavar="DIR",
        help="go on from the aggregators' checkpoints of an earlier run's --out DIR",
    )
    demo = commands.add_parser("demo", help="a small 3-level federation on digits")
    demo.add_argument("--out", type=Path, default=Path("hfl-demo"), help="default: hfl-demo/")
    for command in (sim, demo):
        command.add_argument(
            "--web",
            metavar="HOST:PORT",
            help="serve the live dashboard there during the run (needs the monitor extra)",
        )
        command.add_argument(
            "--web-linger",
            type=float,
            default=0.0,
            metavar="S",
            help="with --web: keep serving S seconds after the run ends (default 0)",
        )
    plan = commands.add_parser("plan", help="write a fleet's node configs, brokers and secrets")
    plan.add_argument("config", type=Path, help="the federation's YAML file")
    plan.add_argument("--out", required=True, type=Path, help="directory for the plan")
    plan.add_argument(
        "--broker",
        metavar="HOST:PORT",
        help="where nodes reach the root's broker (default: 127.0.0.1:1883, 8883 with --tls)",
    )
    plan.add_argument("--tls", action="store_true", help="TLS everywhere, with a private CA")
    plan.add_argument(
        "--client-certs", action="store_true", help="a client certificate per user (implies --tls)"
    )
    plan.add_argument(
        "--broker-dir",
        type=Path,
        help="absolute directory of brokers/ on the broker hosts (default: DIR/brokers here)",
    )
    plan.add_argument(
        "--broker-user",
        help="user Mosquitto runs as when started as root (default: you; with --broker-dir: "
        "mosquitto)",
    )
    plan.add_argument("--force", action="store_true", help="replace the plan in a non-empty DIR")
    export = commands.add_parser("export", help="write a model the root kept for other tools")
    export.add_argument(
        "model", type=Path, help="a registry directory, a .safetensors model or its .json card"
    )
    export.add_argument(
        "--format",
        required=True,
        choices=("torch", "flower", "npz"),
        help="a torch state_dict, a Flower ArrayRecord, or npz",
    )
    export.add_argument("--out", required=True, type=Path, help="the file to write")
    which = export.add_mutually_exclusive_group()
    which.add_argument("--version", type=int, help="this version of a registry directory")
    which.add_argument(
        "--latest", action="store_true", help="the newest of a registry directory (default: best)"
    )
    _add_monitor(commands)
    return parser


def _log_level(verbose: int) -> int:
    return [logging.WARNING, logging.INFO, logging.DEBUG][min(verbose, 2)]


def _simulate(
    config: FederationConfig,
    out: Path,
    processes: int | None,
    verbose: int,
    resume: Path | None,
    web: str | None = None,
    linger: float = 0.0,
) -> int:
    from hfl_mqtt.sim import Progress, simulate

    if linger < 0 or (linger > 0 and web is None):
        raise ConfigError(f"--web-linger {linger:g}: want S >= 0 seconds, with --web HOST:PORT")
    if web is not None:
        try:
            from hfl_mqtt.monitor.sim_dashboard import SimDashboard
            from hfl_mqtt.monitor.web import parse_web_address
        except ImportError as exc:
            print(
                f"hfl-mqtt: --web needs the monitor extra (hfl-mqtt[monitor]): {exc}",
                file=sys.stderr,
            )
            return 2
        host, port = parse_web_address(web)
    root = config.levels[0]
    # A Flower app's ServerApp counts its own rounds.
    total = None if config.task.flower_app is not None else root.rounds
    progress = Progress(total, max_seconds=root.max_seconds)

    async def run() -> None:
        # SIGTERM ends the run as Ctrl-C does: the workers are stopped, the brokers and the
        # dashboard's process ended (by default it killed only this process, and left them).
        task = asyncio.current_task()
        assert task is not None
        with contextlib.suppress(NotImplementedError):
            asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
        async with contextlib.AsyncExitStack() as stack:
            dashboard = None
            if web is not None:  # in a process of its own (hfl_mqtt/monitor/sim_dashboard.py)
                dashboard = await stack.enter_async_context(
                    SimDashboard(host, port, log_level=_log_level(verbose))
                )
                progress.say(f"dashboard: {dashboard.url}")
            summary = await simulate(
                config,
                out,
                progress=progress,
                processes=processes,
                log_level=_log_level(verbose),
                resume=resume,
                watcher=dashboard,
            )
            _say_summary(progress, summary, out)
            if dashboard is not None and linger > 0:
                progress.say(
                    f"dashboard stays at {dashboard.url} for {linger:g} s (Ctrl-C ends it)"
                )
                await asyncio.sleep(linger)

    try:
        asyncio.run(run())
    except asyncio.CancelledError:  # SIGTERM, after the run was stopped and cleaned up
        return 128 + signal.SIGTERM
    return 0


def _say_summary(progress: Progress, summary: dict[str, Any], out: Path) -> None:
    brief = {k: summary[k] for k in ("final_accuracy", "global_rounds", "wall_seconds", "bytes")}
    brief["staleness"] = {
        level: {k: stats[k] for k in ("count", "mean", "p95", "max")}
        for level, stats in summary["staleness"].items()
    }
    progress.say(json.dumps(brief, indent=1))
    files = ["summary.json", "metrics.jsonl", "accuracy.png", "staleness.png"]
    progress.say("results: " + ", ".join(str(out / f) for f in files if (out / f).exists()))


async def _run_nodes(
    configs: list[NodeConfig], signals: SignalStop, fresh: bool
) -> list[NodeOutcome]:
    with signals:
        return await run_nodes(
            configs, stop=signals.stop, checkpoints="fresh" if fresh else "resume"
        )


def _run(paths: list[Path], *, fresh: bool = False) -> int:
    """Run the nodes until they end; print their reports (one node: its report; several: a
    list, a failed node as ``{"node", "error"}``). 2 if any failed, 128 + signal if stopped
    hard by a second signal."""
    configs = [load_node(path) for path in paths]  # every file checked before anything starts
    signals = SignalStop(asyncio.Event())
    try:
        outcomes = asyncio.run(_run_nodes(configs, signals, fresh))
    except asyncio.CancelledError:
        if not signals.signals:
            raise
        return 128 + signals.signals[-1]
    if len(outcomes) == 1:
        if outcomes[0].report is not None:
            print(json.dumps(outcomes[0].to_dict(), indent=1))
    else:
        print(json.dumps([outcome.to_dict() for outcome in outcomes], indent=1))
    failed = [outcome for outcome in outcomes if outcome.error is not None]
    for outcome in failed:
        error = outcome.error
        print(f"hfl-mqtt: node {outcome.node}: {type(error).__name__}: {error}", file=sys.stderr)
    return 2 if failed else 0


def _plan(args: argparse.Namespace) -> int:
    from hfl_mqtt.plan import parse_address, write_plan

    plan = write_plan(
        load_federation(args.config),
        args.out,
        broker=parse_address(args.broker) if args.broker else None,
        tls=args.tls,
        client_certs=args.client_certs,
        broker_dir=args.broker_dir,
        broker_user=args.broker_user,
        force=args.force,
    )
    brokers = ", ".join(f"{b.name} at {b.host}:{b.port}" for b in plan.brokers.values())
    print(f"{len(plan.nodes)} nodes, brokers: {brokers}; next: {args.out / 'START.md'}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from hfl_mqtt.export import export

    try:
        card = export(args.model, args.format, args.out, version=args.version, latest=args.latest)
    except ImportError as exc:  # the message names the extra to install
        print(f"hfl-mqtt: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"hfl-mqtt: cannot write {args.out}: {exc.strerror}", file=sys.stderr)
        return 2
    print(
        f"wrote {args.out} ({args.format}): version {card.version}, round {card.round}, "
        f"accuracy {card.accuracy:.4f}"
    )
    return 0


def _add_monitor(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    monitor = commands.add_parser("monitor", help="watch a running federation live")
    monitor.add_argument(
        "--broker", metavar="HOST:PORT", help="a broker the nodes' records reach (or --replay)"
    )
    monitor.add_argument("--federation", help="which federation (default: the first seen)")
    monitor.add_argument(
        "--prometheus", metavar="HOST:PORT", help="serve Prometheus metrics on /metrics there"
    )
    monitor.add_argument("--tls", action="store_true", help="TLS (the system's CAs, or --ca)")
    monitor.add_argument("--ca", type=Path, metavar="FILE", help="CA of the broker (implies --tls)")
    monitor.add_argument(
        "--cert", type=Path, metavar="FILE", help="client certificate (with --key)"
    )
    monitor.add_argument("--key", type=Path, metavar="FILE", help="its private key")
    monitor.add_argument("--username", help="broker user")
    monitor.add_argument(
        "--password-file",
        type=Path,
        metavar="FILE",
        help="its first line is the password (HFL_MQTT_PASSWORD overrides it)",
    )
    monitor.add_argument("--no-terminal", action="store_true", help="no live tree (servers only)")
    monitor.add_argument("--once", action="store_true", help="print the tree after ~2 s and exit")
    monitor.add_argument("--web", metavar="HOST:PORT", help="serve the web dashboard there")
    monitor.add_argument(
        "--replay",
        type=Path,
        metavar="FILE",
        help="with --web, no broker: a finished sim's metrics.jsonl (its end, or --replay-speed)",
    )
    monitor.add_argument(
        "--replay-speed", type=float, metavar="X", help="replay the run at X times its pace"
    )


def _monitor(args: argparse.Namespace) -> int:
    try:
        from hfl_mqtt.monitor.command import monitor_options, run_command
    except ImportError as exc:
        print(
            f"hfl-mqtt: monitor needs the monitor extra (hfl-mqtt[monitor]): {exc}", file=sys.stderr
        )
        return 2
    from hfl_mqtt.monitor.web import parse_web_address, web_server

    if args.replay is not None:
        if args.broker is not None:
            raise ConfigError("monitor: --replay FILE or --broker HOST:PORT, not both")
        return _replay(args.replay, args.web, args.replay_speed)
    if args.broker is None:
        raise ConfigError("monitor: --broker HOST:PORT (or --replay FILE --web HOST:PORT)")
    options = monitor_options(args)  # then options.servers.append(...) for more servers
    if args.web is not None:
        options.servers.append(web_server(*parse_web_address(args.web), say=_say_now))
    return run_command(options)


def _say_now(text: str) -> None:
    print(text, flush=True)


def _replay(path: Path, web: str | None, speed: float | None) -> int:
    from hfl_mqtt.monitor.replay import serve_replay
    from hfl_mqtt.monitor.web import parse_web_address

    if web is None:
        raise ConfigError("monitor --replay serves the dashboard: give --web HOST:PORT")
    if not path.is_file():
        raise ConfigError(f"--replay {path}: no such file")
    if speed is not None and speed <= 0:
        raise ConfigError(f"--replay-speed {speed:g}: want a positive factor")
    with contextlib.suppress(KeyboardInterrupt):  # it serves until Ctrl-C: a normal end
        asyncio.run(serve_replay(path, *parse_web_address(web), speed=speed))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    log_format: LogFormat | None = getattr(args, "log_format", None)
    if log_format is None:
        try:
            log_format = log_format_from_env()
        except ValueError as exc:
            parser.error(str(exc))
    configure_logging(_log_level(args.verbose + (1 if args.command == "run" else 0)), log_format)
    try:
        if args.command == "run":
            return _run(args.config, fresh=args.fresh)
        if args.command == "plan":
            return _plan(args)
        if args.command == "monitor":
            return _monitor(args)
        if args.command == "export":
            return _export(args)
        if args.command == "sim":
            return _simulate(
                load_federation(args.config),
                args.out,
                args.processes,
                args.verbose,
                args.resume,
                args.web,
                args.web_linger,
            )
        return _simulate(DEMO, args.out, None, args.verbose, None, args.web, args.web_linger)
    except HflError as exc:
        print(f"hfl-mqtt: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
