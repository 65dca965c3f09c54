"""Shared fixtures: tiny models so the suite stays fast on 2 cores."""

from __future__ import annotations

import pytest
import torch

from forecaster.model import Forecaster, ModelConfig
from forecaster.runtime import tune_process

tune_process(1)  # the settings ``forecaster run`` serves under (allocator, one torch thread)


@pytest.fixture
def tiny_model() -> Forecaster:
    torch.manual_seed(0)
    return Forecaster(ModelConfig("rnn", 8, 1)).eval()


@pytest.fixture(params=["rnn", "gru", "lstm"])
def any_cell_model(request: pytest.FixtureRequest) -> Forecaster:
    torch.manual_seed(1)
    return Forecaster(ModelConfig(request.param, 8, 2)).eval()


# -- a real Mosquitto broker on a free port ----------------------------------------------------
import json  # noqa: E402
import shutil  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402
from collections.abc import Iterator  # noqa: E402
from pathlib import Path  # noqa: E402

import paho.mqtt.client as paho  # noqa: E402
from paho.mqtt.enums import CallbackAPIVersion  # noqa: E402

from tests.helpers import mqtt_client  # noqa: E402


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {port}")


def mosquitto_path() -> str:
    path = shutil.which("mosquitto") or (
        "/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None
    )
    if path is None:
        pytest.fail("mosquitto is not installed: run `make test` (it installs it with apt-get)")
    return path


class Broker:
    """A Mosquitto process with test-friendly limits; ``restart()`` keeps the port."""

    def __init__(self, folder: Path, port: int | None = None) -> None:
        self.host = "127.0.0.1"
        self.port = port or free_port()
        self.folder = folder
        self.conf = folder / "mosquitto.conf"
        self.conf.write_text(
            f"listener {self.port} 127.0.0.1\n"
            "allow_anonymous true\n"
            "set_tcp_nodelay true\n"
            "max_queued_messages 100000\n"
            "max_inflight_messages 1000\n"
            "persistence false\n"
        )
        self.proc: subprocess.Popen | None = None

    def start(self) -> Broker:
        self.proc = subprocess.Popen(
            [mosquitto_path(), "-c", str(self.conf)],
            stdout=subprocess.DEVNULL,
            stderr=open(self.folder / "mosquitto.log", "ab"),  # noqa: SIM115
        )
        wait_port(self.port)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(5)
            self.proc = None

    def restart(self, down_for: float = 0.5) -> None:
        self.stop()
        time.sleep(down_for)
        self.start()


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    folder = tmp_path / "broker"
    folder.mkdir()
    b = Broker(folder).start()
    yield b
    b.stop()


@pytest.fixture
def prefix() -> str:
    """A unique topic prefix per test."""
    return f"t{uuid.uuid4().hex[:10]}"


class Collector:
    """A real MQTT subscriber that records every message on a filter."""

    def __init__(self, broker: Broker, topic_filter: str, qos: int = 1) -> None:
        self.messages: list[tuple[str, bytes, bool]] = []
        self.lock = threading.Lock()
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2, client_id=f"collector-{uuid.uuid4().hex[:8]}"
        )
        subscribed = threading.Event()
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *a: subscribed.set()
        self.client.on_connect = lambda c, *a: c.subscribe(topic_filter, qos)
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()
        assert subscribed.wait(10), "collector could not subscribe"

    def _on_message(self, client: paho.Client, userdata: object, message: paho.MQTTMessage) -> None:
        with self.lock:
            self.messages.append((message.topic, message.payload, bool(message.retain)))

    def json(self) -> list[dict]:
        with self.lock:
            return [json.loads(p) for _, p, _ in self.messages]

    def wait_raw(self, count: int, timeout: float = 20.0) -> list[tuple[str, bytes, bool]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if len(self.messages) >= count:
                    break
            time.sleep(0.02)
        with self.lock:
            return list(self.messages)

    def wait_for(self, count: int, timeout: float = 20.0) -> list[dict]:
        self.wait_raw(count, timeout)
        return self.json()

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()

    def __enter__(self) -> Collector:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@pytest.fixture
def publisher(broker: Broker) -> Iterator[paho.Client]:
    with mqtt_client(broker) as client:
        yield client


# -- a link fault between a client and the broker ----------------------------------------------
import contextlib  # noqa: E402


class Relay:
    """A TCP relay between the daemon and the broker that the test stalls and cuts (a network fault).

    ``stall()`` stops carrying the daemon's bytes to the broker (its acks and forecasts wait in the
    socket buffers) while the broker's still come through; ``cut()`` closes every connection, and
    refuses new ones for a while, as a failed link would.
    """

    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        self.server = socket.create_server(("127.0.0.1", 0))
        self.host, self.port = "127.0.0.1", self.server.getsockname()[1]
        self.up, self.flowing = threading.Event(), threading.Event()
        self.up.set()
        self.flowing.set()
        self.lock = threading.Lock()
        self.sockets: list[socket.socket] = []
        self.reads = 0  # recv() calls that got the client's bytes (how many chunks they came in)
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                near, _ = self.server.accept()
            except OSError:
                return  # closed
            if not self.up.is_set():
                near.close()
                continue
            far = socket.create_connection((self.broker.host, self.broker.port))
            for sock in (near, far):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self.lock:
                self.sockets += [near, far]
            threading.Thread(target=self._pipe, args=(near, far, self.flowing), daemon=True).start()
            threading.Thread(target=self._pipe, args=(far, near, None), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, gate: threading.Event | None) -> None:
        with contextlib.suppress(OSError):
            while gate is None or gate.wait():
                data = src.recv(65536)
                if not data:
                    break
                if gate is not None:
                    self.reads += 1
                dst.sendall(data)
        for sock in (src, dst):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def stall(self) -> None:
        self.flowing.clear()

    def cut(self, down_for: float) -> None:
        self.up.clear()
        with self.lock:
            sockets, self.sockets = self.sockets, []
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        self.flowing.set()
        time.sleep(down_for)
        for sock in sockets:
            sock.close()
        self.up.set()

    def close(self) -> None:
        self.server.close()
        self.cut(0.0)
