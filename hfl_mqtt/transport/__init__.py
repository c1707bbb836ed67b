"""MQTT links: QoS 1 publish/subscribe with chunking, reassembly and accounting."""

from hfl_mqtt.transport.base import Incoming, LinkBase, LinkStats
from hfl_mqtt.transport.memory import MemoryBroker, MemoryLink
from hfl_mqtt.transport.mqtt import MqttLink

__all__ = ["Incoming", "LinkBase", "LinkStats", "MemoryBroker", "MemoryLink", "MqttLink"]
