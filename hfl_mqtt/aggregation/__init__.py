"""Aggregation strategies: pure math, no I/O. Synchronous (FedAvg; a Flower strategy comes
from the ``flower`` plug-in, ``hfl_mqtt.flower.strategy``) and asynchronous (FedAsync,
FedBuff), with the staleness weights the asynchronous ones use."""

from hfl_mqtt.aggregation.base import Model, RoundStrategy, StreamingStrategy, Update
from hfl_mqtt.aggregation.fedasync import FedAsync
from hfl_mqtt.aggregation.fedavg import FedAvg, weighted_mean
from hfl_mqtt.aggregation.fedbuff import FedBuff
from hfl_mqtt.aggregation.staleness import StalenessFunction

__all__ = [
    "FedAsync",
    "FedAvg",
    "FedBuff",
    "Model",
    "RoundStrategy",
    "StalenessFunction",
    "StreamingStrategy",
    "Update",
    "weighted_mean",
]
