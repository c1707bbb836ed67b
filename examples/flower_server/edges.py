"""The hfl-mqtt side: edges that join a Flower server as clients, and their MQTT workers.

Runs every node of ``federation.yaml`` but its top level (the Flower server) in this process,
on a private Mosquitto broker it starts (or on ``--broker HOST:PORT``), until the server ends
the run; or, with ``--write-configs DIR``, writes one YAML per node for ``hfl-mqtt run``
(one process per device) and exits. With ``--supernodes DIR`` (the Message API: a SuperLink,
and one SuperNode per edge running hfl-mqtt's ClientApp) it writes the edges' YAMLs for the
SuperNodes and runs only the workers, until interrupted.

    python edges.py --server 127.0.0.1:8080
    python edges.py --server 10.0.0.5:8080 --broker 127.0.0.1:1883 --write-configs nodes/
    python edges.py --broker 127.0.0.1:1883 --supernodes edges/
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import tempfile
from collections.abc import Iterator
from pathlib import Path

import yaml

from hfl_mqtt.brokers import BrokerConfig, MosquittoBroker
from hfl_mqtt.config import (
    BrokerAddress,
    FederationConfig,
    FlowerParentConfig,
    NodeConfig,
    load_federation,
)
from hfl_mqtt.flower.parent import beneath_flower_server
from hfl_mqtt.roles import NodeReport, run_node
from hfl_mqtt.sim import configure_logging

HERE = Path(__file__).resolve().parent


@contextlib.contextmanager
def broker(address: str | None) -> Iterator[BrokerAddress]:
    """The given broker, or a private Mosquitto on a free port for as long as we run."""
    if address is not None:
        host, _, port = address.rpartition(":")
        yield BrokerAddress(host=host, port=int(port))
        return
    with (
        tempfile.TemporaryDirectory() as workdir,
        MosquittoBroker(BrokerConfig(), Path(workdir)) as b,
    ):
        yield BrokerAddress(host=b.host, port=b.port)


async def run_all(nodes: list[NodeConfig]) -> list[NodeReport]:
    async with asyncio.TaskGroup() as group:
        running = [group.create_task(run_node(node), name=node.node) for node in nodes]
    return [task.result() for task in running]


def supernodes(config: FederationConfig, broker_address: str | None, out: Path) -> None:
    """Write the edges' YAMLs for SuperNodes (``flower_parent: {}``); run the workers."""
    configure_logging(20)
    top = config.levels[0].name
    with broker(broker_address) as address:
        nodes = beneath_flower_server(config.node_configs({top: address}), FlowerParentConfig())
        out.mkdir(parents=True, exist_ok=True)
        for edge in (n for n in nodes if n.role == "aggregator"):
            path = (out / f"{edge.node}.yaml").resolve()
            path.write_text(yaml.safe_dump(edge.model_dump(mode="json"), sort_keys=False))
            print(f"flower-supernode --insecure --node-config 'hfl-config=\"{path}\"' ...")
        workers = [n for n in nodes if n.role == "worker"]
        print(f"{len(workers)} workers on the broker at {address.host}:{address.port}: Ctrl-C ends")
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(run_all(workers))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--server", default="127.0.0.1:8080", help="the Flower server")
    parser.add_argument("--federation", type=Path, default=HERE / "federation.yaml")
    parser.add_argument("--broker", help="HOST:PORT of a running broker (default: start one)")
    parser.add_argument("--write-configs", type=Path, metavar="DIR")
    parser.add_argument("--supernodes", type=Path, metavar="DIR")
    args = parser.parse_args()
    if args.supernodes is not None:
        supernodes(load_federation(args.federation), args.broker, args.supernodes)
        return

    config = load_federation(args.federation)
    top = config.levels[0].name
    parent = FlowerParentConfig(server_address=args.server)
    if args.write_configs is not None:
        if args.broker is None:
            parser.error("--write-configs needs --broker: the nodes must know where it is")
        with broker(args.broker) as address:
            nodes = beneath_flower_server(config.node_configs({top: address}), parent)
        args.write_configs.mkdir(parents=True, exist_ok=True)
        for node in nodes:
            path = args.write_configs / f"{node.node}.yaml"
            path.write_text(yaml.safe_dump(node.model_dump(mode="json"), sort_keys=False))
            print(f"hfl-mqtt run --config {path}")
        return

    configure_logging(20)  # INFO: rounds and cycles as they close
    with broker(args.broker) as address:
        nodes = beneath_flower_server(config.node_configs({top: address}), parent)
        print(
            f"{len(nodes)} nodes on the broker at {address.host}:{address.port}; "
            f"edges join the Flower server at {args.server}"
        )
        reports = asyncio.run(run_all(nodes))
    for report in reports:
        if report.role == "aggregator":
            print(
                json.dumps({k: report.to_dict()[k] for k in ("node", "rounds", "updates_accepted")})
            )


if __name__ == "__main__":
    main()
