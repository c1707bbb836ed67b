"""Aggregation strategies: pure, synchronous, no I/O."""

from hfl_mqtt.aggregation.base import Model, RoundStrategy, StreamingStrategy, Update
from hfl_mqtt.aggregation.fedavg import FedAvg, weighted_mean

__all__ = ["FedAvg", "Model", "RoundStrategy", "StreamingStrategy", "Update", "weighted_mean"]
