"""A board that loses its network rejoins by itself and trains from its parent's newest model.

The worker reaches a real Mosquitto through a TCP proxy that can black-hole its traffic, as a
dead Wi-Fi link would: no reset, no answer, packets simply gone. The worker notices by its
keepalive, keeps trying to reconnect, and once the network is back it comes online again,
skips the models it missed and trains on the newest one, without anyone restarting it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import pytest

from hfl_mqtt.brokers import BrokerConfig, MosquittoBroker
from hfl_mqtt.config import BrokerAddress, FederationConfig
from hfl_mqtt.roles import NodeReport, run_node
from hfl_mqtt.roles.messages import STOP, status_payload
from hfl_mqtt.topics import ctl_topic
from hfl_mqtt.transport.base import LinkBase
from hfl_mqtt.transport.mqtt import MqttLink
from tests.fakes import needs_mosquitto

pytestmark = [pytest.mark.anyio, needs_mosquitto]

StartBroker = Callable[..., MosquittoBroker]


class BlackHoleProxy:
    """Forwards TCP to a target until ``cut()``: then every byte is dropped and new connections
    hang unanswered, until ``restore()`` (which also closes the connections that hung)."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.cut_off = False
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._held: set[asyncio.StreamWriter] = set()

    async def __aenter__(self) -> BlackHoleProxy:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for writer in self._writers | self._held:
            writer.close()
        await self._server.wait_closed()

    def cut(self) -> None:
        self.cut_off = True

    def restore(self) -> None:
        self.cut_off = False
        for writer in self._held:
            writer.close()
        self._held.clear()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.cut_off:
            self._held.add(writer)  # a SYN into the void: the client's attempt times out
            return
        up_reader, up_writer = await asyncio.open_connection(*self.target)
        self._writers |= {writer, up_writer}
        try:
            async with asyncio.TaskGroup() as pumps:
                pumps.create_task(self._pump(reader, up_writer))
                pumps.create_task(self._pump(up_reader, writer))
        except* (ConnectionError, OSError):
            pass
        finally:
            for w in (writer, up_writer):
                w.close()
                self._writers.discard(w)

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(1 << 16):
            if not self.cut_off:
                writer.write(data)
                await writer.drain()
        writer.close()


async def test_a_worker_cut_off_from_its_network_rejoins_and_trains_on_the_newest_model(
    start_broker: StartBroker,
) -> None:
    broker = start_broker(BrokerConfig())
    config = FederationConfig.model_validate(
        {
            "federation": "outage",
            "levels": [
                {"name": "cloud", "rounds": 10_000, "deadline_s": 1.0, "min_fraction": 0.5},
                {"name": "worker", "uplink_codec": "q8"},
            ],
            "fanout": [3],
            "task": {"dataset": "digits", "model": "softmax", "partition": {"scheme": "iid"}},
            "heterogeneity": {"compute_s": 0.2},  # a round takes a board's time, not a core's
        }
    )
    direct = BrokerAddress(host=broker.host, port=broker.port)
    nodes = config.node_configs({"cloud": direct})
    cut_off = "worker-2"
    events: list[dict[str, Any]] = []
    marks: dict[str, float] = {}

    async with BlackHoleProxy((broker.host, broker.port)) as proxy:

        def links(address: BrokerAddress, client_id: str, status: str | None) -> LinkBase:
            behind = client_id == cut_off
            return MqttLink(
                address.host,
                proxy.port if behind else address.port,
                client_id,
                status_topic=status,
                online_payload=status_payload("online"),
                offline_payload=status_payload("offline"),
                keepalive=2 if behind else 15,  # a short keepalive: the test need not wait long
                connect_timeout=60,
            )

        def on_event(event: dict[str, Any]) -> None:
            events.append({**event, "at": time.monotonic()})

        async def outage() -> None:
            while len(events) < 2:
                await asyncio.sleep(0.05)
            proxy.cut()
            marks["cut"] = time.monotonic()
            await asyncio.sleep(8.0)
            marks["version_at_restore"] = events[-1]["version"]
            proxy.restore()
            marks["restored"] = time.monotonic()
            while sum(e["participants"] == 3 for e in events if e["at"] > marks["restored"]) < 2:
                await asyncio.sleep(0.1)

        async with asyncio.timeout(90), asyncio.TaskGroup() as group:
            runs = {
                n.node: group.create_task(run_node(n, links=links, on_event=on_event))
                for n in nodes
            }
            await group.create_task(outage())
            await stop_node(direct, "outage", nodes[0].node)
        reports: dict[str, NodeReport] = {name: task.result() for name, task in runs.items()}

    during = [e for e in events if marks["cut"] + 4 < e["at"] < marks["restored"]]
    assert during, "no round closed while the worker was cut off"
    assert all(e["participants"] == 2 for e in during), "rounds went on without it"
    back = [e for e in events if e["at"] > marks["restored"] and e["participants"] == 3]
    assert len(back) >= 2, "the cut-off worker never took part again"
    # On its return it trained on the newest model, not on every model it missed.
    missed = int(marks["version_at_restore"]) - 2
    assert missed >= 3
    assert reports[cut_off].trained <= reports["worker-0"].trained - missed + 2
    taken = set(reports[cut_off].sent_ids) & set(reports["cloud"].accepted_ids)
    assert len(taken) >= sum(e["participants"] == 3 for e in events)


async def stop_node(broker: BrokerAddress, federation: str, node: str) -> None:
    """Stop a node as an operator would: ``stop`` on its control topic."""
    async with MqttLink(broker.host, broker.port, "operator") as operator:
        await operator.publish(ctl_topic(federation, node), STOP)
