"""Private Mosquitto brokers for runs and tests: render mosquitto.conf, start, crash, restart.

A federation needs a broker per site (or one shared); tests need many short-lived ones that never
touch a system Mosquitto. ``BrokerConfig`` describes one broker (optionally bridged to a parent
broker), ``render_config`` turns it into mosquitto.conf text (both live in
``hfl_mqtt.mosquitto_conf`` and are re-exported here), and ``MosquittoBroker`` runs it on a free
loopback port in a private work directory::

    async with MosquittoBroker(BrokerConfig()) as broker:
        async with aiomqtt.Client(broker.host, broker.port) as client:
            ...

Every directive rendered here was checked against Mosquitto 2.0.11 (``man mosquitto.conf``) and
its behaviour on this machine; the quirks found are the comments in the rendered text.
"""

from __future__ import annotations

import asyncio
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Self

import aiomqtt

from hfl_mqtt.errors import BrokerError
from hfl_mqtt.mosquitto_conf import (
    BridgeConfig,
    BridgeTopic,
    BrokerConfig,
    edge_bridge_topics,
    example_files,
    render_acl,
    render_config,
)

__all__ = [
    "BridgeConfig",
    "BridgeTopic",
    "BrokerConfig",
    "MosquittoBroker",
    "edge_bridge_topics",
    "example_files",
    "find_mosquitto",
    "free_port",
    "read_sys_bytes",
    "render_acl",
    "render_config",
]

_LOG_TAIL_LINES = 30
_SYS_TOPICS = (
    "bytes/received",
    "bytes/sent",
    "messages/received",
    "messages/sent",
    "publish/bytes/received",
    "publish/bytes/sent",
    "publish/messages/received",
    "publish/messages/sent",
    "publish/messages/dropped",
)


def find_mosquitto() -> str | None:
    """Path of the ``mosquitto`` binary: ``PATH`` first, then /usr/sbin (not on users' PATH)."""
    found = shutil.which("mosquitto")
    if found:
        return found
    fallback = "/usr/sbin/mosquitto"
    return fallback if os.access(fallback, os.X_OK) else None


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` right now (another process may still take it first)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def _tail(path: Path, lines: int = _LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


class MosquittoBroker:
    """A private ``mosquitto`` process: started, stopped, crashed and restarted on demand.

    Its config, database and logs live in ``workdir`` (a temporary directory by default, removed
    by ``close()`` or on leaving the context). ``restart()`` keeps the port and the database, so
    a test can kill the broker mid-run and bring it back. The methods block for at most their
    timeouts; the async context manager runs them in a thread.
    """

    def __init__(
        self,
        config: BrokerConfig | None = None,
        workdir: Path | None = None,
        *,
        executable: str | None = None,
        start_timeout: float = 10.0,
        stop_timeout: float = 5.0,
    ) -> None:
        self.config = config or BrokerConfig()
        self._executable = executable
        self._owns_workdir = workdir is None
        self._workdir = workdir.resolve() if workdir is not None else None
        self._start_timeout = start_timeout
        self._stop_timeout = stop_timeout
        self._port = self.config.port
        self._process: subprocess.Popen[bytes] | None = None

    # -- properties -------------------------------------------------------------------------

    @property
    def host(self) -> str:
        return self.config.host

    @property
    def port(self) -> int:
        if not self._port:
            msg = "the broker has no port yet: start() it first"
            raise BrokerError(msg)
        return self._port

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def workdir(self) -> Path:
        if self._workdir is None:
            self._workdir = Path(tempfile.mkdtemp(prefix="hfl-mosquitto-"))
        return self._workdir

    @property
    def log_path(self) -> Path:
        return self.workdir / "mosquitto.log"

    @property
    def config_path(self) -> Path:
        return self.workdir / "mosquitto.conf"

    @property
    def persistence_dir(self) -> Path:
        return self.config.persistence_dir or self.workdir / "data"

    def log_tail(self, lines: int = _LOG_TAIL_LINES) -> str:
        """The last lines of the broker's log and of its stderr (errors before the log opens)."""
        stderr = _tail(self.workdir / "stderr.txt", lines)
        log = _tail(self.log_path, lines)
        return "\n".join(part for part in (stderr, log) if part)

    # -- lifecycle --------------------------------------------------------------------------

    def start(self) -> None:
        """Render the config, spawn ``mosquitto -c``, and wait until the port accepts TCP."""
        if self.running:
            msg = f"broker already running (pid {self.pid})"
            raise BrokerError(msg)
        executable = self._executable or find_mosquitto()
        if executable is None:
            msg = "mosquitto not found on PATH nor at /usr/sbin/mosquitto"
            raise BrokerError(msg)
        # A port picked by free_port() may be taken before mosquitto binds it: pick again.
        attempts = 3 if self._port == 0 else 1
        for attempt in range(attempts):
            if self._port == 0 or (attempt and self.config.port == 0):
                self._port = free_port(self.host)
            try:
                self._spawn(executable)
                return
            except BrokerError:
                if attempt + 1 == attempts or "Address already in use" not in self.log_tail():
                    raise

    def _spawn(self, executable: str) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)  # again, after a close()
        self.persistence_dir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(self._render())
        log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with (self.workdir / "stderr.txt").open("ab") as stderr:
            process = subprocess.Popen(
                [executable, "-c", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=stderr,
                stderr=stderr,
                cwd=self.workdir,
            )
        self._process = process
        deadline = time.monotonic() + self._start_timeout
        # The port alone proves nothing: another process may hold it while ours fails to bind.
        while not (self._logged_running(log_offset) and self._accepts_tcp()):
            if process.poll() is not None:
                self._process = None
                msg = (
                    f"mosquitto exited with code {process.returncode} at start; "
                    f"log tail:\n{self.log_tail()}"
                )
                raise BrokerError(msg)
            if time.monotonic() > deadline:
                self._signal_and_wait(signal.SIGKILL, None)
                msg = (
                    f"mosquitto did not accept connections on {self.host}:{self.port} within "
                    f"{self._start_timeout} s; log tail:\n{self.log_tail()}"
                )
                raise BrokerError(msg)
            time.sleep(0.005)

    def _logged_running(self, offset: int) -> bool:
        try:
            with self.log_path.open("rb") as log:
                log.seek(offset)
                return b" running\n" in log.read()
        except FileNotFoundError:
            return False

    def _accepts_tcp(self) -> bool:
        try:
            with socket.create_connection((self._connect_host, self.port), 0.5):
                return True
        except OSError:
            return False

    def _render(self) -> str:
        config = self.config
        if config.user is None and os.geteuid() == 0:
            # Run as root, mosquitto switches to user "mosquitto", who cannot write our workdir.
            config = config.model_copy(update={"user": pwd.getpwuid(os.geteuid()).pw_name})
        return render_config(
            config, port=self.port, persistence_dir=self.persistence_dir, log_file=self.log_path
        )

    @property
    def _connect_host(self) -> str:
        return "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host

    def stop(self) -> None:
        """SIGTERM (the broker saves its database), then SIGKILL after ``stop_timeout``."""
        if self._process is None:
            return
        try:
            self._signal_and_wait(signal.SIGTERM, self._stop_timeout)
        except subprocess.TimeoutExpired:
            self._signal_and_wait(signal.SIGKILL, None)

    def kill(self) -> None:
        """SIGKILL: a crash, nothing saved since the last autosave."""
        if self._process is not None:
            self._signal_and_wait(signal.SIGKILL, None)

    def _signal_and_wait(self, sig: signal.Signals, timeout: float | None) -> None:
        process = self._process
        assert process is not None
        if process.poll() is None:
            process.send_signal(sig)
        process.wait(timeout)
        self._process = None

    def restart(self) -> None:
        """Stop (if running) and start again on the same port with the same database."""
        self.stop()
        self.start()

    def close(self) -> None:
        """Stop the broker and remove the work directory if it is ours."""
        self.stop()
        if self._owns_workdir and self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    async def __aenter__(self) -> Self:
        await asyncio.to_thread(self.__enter__)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await asyncio.to_thread(self.close)

    # -- observation ------------------------------------------------------------------------

    async def wait_bridge_connected(self, timeout: float = 10.0) -> None:
        """Wait until this broker's bridge reports itself connected (its ``$SYS`` state is 1)."""
        if self.config.bridge is None:
            msg = "this broker has no bridge"
            raise BrokerError(msg)
        name, topic = self.config.bridge.name, self.config.bridge.state_topic
        try:
            async with (
                asyncio.timeout(timeout),
                aiomqtt.Client(self._connect_host, self.port) as client,
            ):
                await client.subscribe(topic, qos=1)
                async for message in client.messages:
                    if message.payload == b"1":
                        return
        except TimeoutError:
            pass
        except aiomqtt.MqttError as exc:
            msg = f"cannot watch bridge {name} on {self.host}:{self.port}: {exc}"
            raise BrokerError(msg) from exc
        msg = f"bridge {name} not connected after {timeout} s; log tail:\n{self.log_tail()}"
        raise BrokerError(msg)


async def read_sys_bytes(host: str, port: int, *, timeout: float = 5.0) -> dict[str, int]:
    """The broker's ``$SYS`` traffic counters, e.g. ``bytes_received``, ``publish_bytes_sent``.

    The values are those of the broker's last ``$SYS`` update (every ``sys_interval`` seconds)
    and include this reader's own connection once the next update has happened.
    """
    prefix = "$SYS/broker/"
    wanted = {t: t.replace("/", "_") for t in _SYS_TOPICS}
    found: dict[str, int] = {}
    try:
        async with asyncio.timeout(timeout), aiomqtt.Client(host, port) as client:
            await client.subscribe([(prefix + name, 0) for name in _SYS_TOPICS])
            async for message in client.messages:
                key = str(message.topic).removeprefix(prefix)
                if key in wanted and isinstance(message.payload, bytes):
                    found[wanted[key]] = int(message.payload)
                if len(found) == len(wanted):
                    return found
    except TimeoutError:
        pass
    except aiomqtt.MqttError as exc:
        msg = f"cannot read $SYS from {host}:{port}: {exc}"
        raise BrokerError(msg) from exc
    missing = sorted(set(wanted.values()) - found.keys())
    msg = f"$SYS counters missing after {timeout} s (is sys_interval 0?): {missing}"
    raise BrokerError(msg)


def _main(argv: list[str] | None = None) -> int:
    """``python -m hfl_mqtt.brokers DIR``: write the example files into DIR."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m hfl_mqtt.brokers", description=_main.__doc__)
    parser.add_argument("directory", type=Path)
    args = parser.parse_args(argv)
    for name, text in example_files().items():
        (args.directory / name).write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
