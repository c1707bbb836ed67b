"""A Flower ServerApp (Message API) with FedAvg, evaluated centrally, over hfl-mqtt edges.

Each edge is a SuperNode whose ClientApp is ``hfl_mqtt.flower.edge_app:app``: a ``train`` message
runs the edge's MQTT subtree for its ``rounds`` rounds and replies with the aggregate.
"""

from __future__ import annotations

from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from hfl_mqtt.flower.codec import array_record_to_arrays, arrays_to_array_record
from hfl_mqtt.tasks.base import TaskConfig, load_task

TASK = TaskConfig(dataset="digits", model="mlp")
"""The edges' model (federation.yaml's task): the same names, shapes and order."""

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    rounds = int(context.run_config["num-server-rounds"])
    edges = int(context.run_config["edges"])
    evaluator = load_task(TASK, None, 1)  # the held-out test split

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        evaluator.set_weights(array_record_to_arrays(arrays))
        result = evaluator.evaluate()
        return MetricRecord({"accuracy": result.accuracy, "loss": result.loss})

    strategy = FedAvg(min_train_nodes=edges, min_evaluate_nodes=edges, min_available_nodes=edges)
    result = strategy.start(
        grid=grid,
        initial_arrays=arrays_to_array_record(evaluator.get_weights()),
        num_rounds=rounds,
        evaluate_fn=evaluate,
    )
    for server_round, metrics in sorted(result.evaluate_metrics_serverapp.items()):
        print(f"round {server_round:>3}  centralized accuracy {metrics['accuracy']:.4f}")
