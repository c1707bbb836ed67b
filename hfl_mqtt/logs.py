"""Log output of a process: structlog's console renderer for people, or JSON lines for
journald and log shippers.

``hfl-mqtt run --log-format json`` (or ``HFL_MQTT_LOG_FORMAT=json`` in the environment, as the
systemd unit sets it) writes one JSON object per line to stderr, with ``timestamp`` (ISO 8601,
UTC), ``level``, ``event`` and the bound context (``node``, ``role``, ``round``, ...), so
``journalctl -u hfl-mqtt@pi-7 -o cat`` prints lines that ``jq`` reads.
"""

from __future__ import annotations

import os
import sys
from typing import Literal

import structlog

__all__ = ["LOG_FORMATS", "LOG_FORMAT_ENV", "LogFormat", "configure_logging", "log_format_from_env"]

LogFormat = Literal["console", "json"]
LOG_FORMATS: tuple[LogFormat, ...] = ("console", "json")
LOG_FORMAT_ENV = "HFL_MQTT_LOG_FORMAT"
"""Environment variable naming the log format when no ``--log-format`` is given."""


def log_format_from_env() -> LogFormat:
    """``HFL_MQTT_LOG_FORMAT`` if it names a format, else ``console``; ``ValueError`` for an
    unknown name (a typo in a unit file should not pass silently)."""
    value = os.environ.get(LOG_FORMAT_ENV, "").strip().lower() or "console"
    if value not in LOG_FORMATS:
        raise ValueError(f"{LOG_FORMAT_ENV}={value!r}: expected one of {', '.join(LOG_FORMATS)}")
    return value


def configure_logging(level: int, log_format: LogFormat = "console") -> None:
    """Log at ``level`` and above to stderr, rendered for a terminal or as JSON lines."""
    if log_format == "json":
        structlog.configure(
            processors=[
                structlog.contextvars.merge_contextvars,
                structlog.processors.add_log_level,
                structlog.processors.TimeStamper(fmt="iso", utc=True),
                structlog.processors.StackInfoRenderer(),
                structlog.processors.format_exc_info,
                structlog.processors.JSONRenderer(),
            ],
            wrapper_class=structlog.make_filtering_bound_logger(level),
            logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        )
        return
    # The processors are left as they are (structlog's default ends in its console renderer),
    # so that a caller's own configuration, or structlog.testing.capture_logs, keeps working.
    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
    )
