"""Node roles: worker, aggregator (edge, region, ...) and root, all one program."""

from hfl_mqtt.roles.aggregator import Aggregator
from hfl_mqtt.roles.node import run_node
from hfl_mqtt.roles.report import NodeReport
from hfl_mqtt.roles.worker import Worker

__all__ = ["Aggregator", "NodeReport", "Worker", "run_node"]
