"""A stock Flower server: the legacy ``start_server`` with FedAvg, evaluated centrally.

Nothing here knows about MQTT: the hfl-mqtt edges (``edges.py``) join as ordinary Flower
clients, each standing for its subtree of workers. The model is the one the edges' task
builds (``federation.yaml``), so that names, shapes and order agree.

    python server.py --address 127.0.0.1:8080 --rounds 10
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np
from flwr.common import Metrics, ndarrays_to_parameters
from flwr.server import ServerConfig, start_server
from flwr.server.strategy import FedAvg

from hfl_mqtt.config import load_federation
from hfl_mqtt.tasks.base import load_task

HERE = Path(__file__).resolve().parent


def weighted_accuracy(results: list[tuple[int, Metrics]]) -> Metrics:
    """The edges' evaluations, weighted by their examples."""
    total = sum(n for n, _ in results)
    return {"accuracy": sum(n * float(m["accuracy"]) for n, m in results) / max(total, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--address", default="127.0.0.1:8080")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--edges", type=int, default=2, help="clients to wait for")
    parser.add_argument("--federation", type=Path, default=HERE / "federation.yaml")
    args = parser.parse_args()

    evaluator = load_task(load_federation(args.federation).task, None, 1)  # the test split
    names = list(evaluator.get_weights())

    def evaluate(
        server_round: int, arrays: list[np.ndarray], config: dict[str, Any]
    ) -> tuple[float, dict[str, float]]:
        evaluator.set_weights(dict(zip(names, arrays, strict=True)))
        result = evaluator.evaluate()
        return result.loss, {"accuracy": result.accuracy}

    strategy = FedAvg(
        fraction_fit=1.0,
        fraction_evaluate=1.0,
        min_fit_clients=args.edges,
        min_evaluate_clients=args.edges,
        min_available_clients=args.edges,
        evaluate_fn=evaluate,
        evaluate_metrics_aggregation_fn=weighted_accuracy,
        # Without initial parameters Flower asks one client (an edge) for its model.
        initial_parameters=ndarrays_to_parameters(list(evaluator.get_weights().values())),
    )
    history = start_server(
        server_address=args.address,
        config=ServerConfig(num_rounds=args.rounds),
        strategy=strategy,
    )
    for server_round, accuracy in history.metrics_centralized["accuracy"]:
        print(f"round {server_round:>3}  centralized accuracy {accuracy:.4f}")


if __name__ == "__main__":
    main()
