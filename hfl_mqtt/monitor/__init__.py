"""The live view of a running federation, built only from what its broker carries.

``FederationView`` (pure) folds the nodes' status and metrics messages into one state; around it
``source`` (an MQTT subscriber), ``terminal`` (rich), ``prometheus`` (an exporter) and ``web``
(the dashboard). Needs the ``monitor`` extra (aiohttp, prometheus-client, rich) for all but the
view; the core never imports this package.
"""

from hfl_mqtt.monitor.view import FederationView

__all__ = ["FederationView"]
