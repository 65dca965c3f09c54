"""Helpers for end-to-end tests: a daemon in a thread, offline reference forecasts, scrapes."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

import paho.mqtt.client as paho
import yaml
from paho.mqtt.enums import CallbackAPIVersion
from prometheus_client.parser import text_string_to_metric_families

from forecaster.config import Config, MqttConfig
from forecaster.daemon import Daemon
from forecaster.engine import Engine
from forecaster.persist import load_checkpoint, save_checkpoint
from forecaster.records import Sample


def config_data(broker: Any, prefix: str, state_dir: Path, **sections: dict) -> dict[str, Any]:
    """A daemon's config as YAML data on the test's own topics (``{prefix}/in/{stream}`` ->
    ``{prefix}/out/{stream}``), state folder and a free metrics port; each of ``sections`` is
    merged over its section key by key. The one config writer of the suite."""
    data: dict[str, Any] = {
        "mqtt": {
            "host": broker.host,
            "port": broker.port,
            "client_id": f"{prefix}-fc",
            "input_topics": [f"{prefix}/in/{{stream}}"],
            "output_topic": f"{prefix}/out/{{stream}}",
            "status_topic": f"{prefix}/status",
            "reconnect_min_delay": 1,
            "reconnect_max_delay": 2,
        },
        "state": {"dir": str(state_dir), "checkpoint_interval": 3600},
        "metrics": {"port": 0},
    }
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
    return data


def write_config(path: Path, broker: Any, prefix: str, state_dir: Path, **sections: dict) -> Path:
    """``config_data`` as a YAML file at ``path``, for ``forecaster run -c``."""
    path.write_text(yaml.safe_dump(config_data(broker, prefix, state_dir, **sections)))
    return path


def daemon_config(broker: Any, prefix: str, state_dir: Path, **sections: dict) -> Config:
    """``config_data`` as a ``Config``, samples on ``{prefix}/sensors/{stream}/value``."""
    mqtt = {
        "client_id": f"{prefix}-forecaster",
        "input_topics": [f"{prefix}/sensors/{{stream}}/value"],
        "output_topic": f"{prefix}/forecasts/{{stream}}",
        **sections.pop("mqtt", {}),
    }
    return Config.model_validate(config_data(broker, prefix, state_dir, mqtt=mqtt, **sections))


def link_config(target: Any, prefix: str, **overrides: Any) -> MqttConfig:
    """An ``MqttLink``'s config on the test's own topics; ``target``: a Broker or a Relay."""
    return MqttConfig(
        host=target.host,
        port=target.port,
        client_id=f"{prefix}-link",
        input_topics=[f"{prefix}/in/{{stream}}"],
        output_topic=f"{prefix}/out/{{stream}}",
        status_topic=f"{prefix}/status",
        **overrides,
    )


@contextlib.contextmanager
def mqtt_client(broker: Any, client_id: str | None = None) -> Iterator[paho.Client]:
    """A connected paho client with its network loop running, disconnected however the test ends."""
    client = paho.Client(
        CallbackAPIVersion.VERSION2, client_id=client_id or f"pub-{uuid.uuid4().hex[:8]}"
    )
    client.connect(broker.host, broker.port)
    client.loop_start()
    try:
        yield client
    finally:
        client.loop_stop()
        client.disconnect()


class RunningDaemon:
    """``Daemon`` on a thread, as ``forecaster run`` drives it on its main thread.

    Use it as ``with RunningDaemon(config) as running:`` so that a failing test still stops it.
    """

    def __init__(self, config: Config, wait_ready: bool = True) -> None:
        self.daemon = Daemon(config)
        self.daemon.start()
        self.thread = threading.Thread(target=self.daemon.run, daemon=True)
        self.thread.start()
        if wait_ready:
            try:
                self.wait_ready()
            except BaseException:
                self.stop(check=False)  # no ``with`` block owns it yet: stop it here
                raise

    def __enter__(self) -> RunningDaemon:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # A failing test's own error is the one to see: check the thread ended only when it passed.
        self.stop(check=exc is None)

    def wait_ready(self, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.daemon.ready()[0]:
            assert time.monotonic() < deadline, f"daemon not ready: {self.daemon.ready()[1]}"
            time.sleep(0.05)

    @property
    def metrics_url(self) -> str:
        assert self.daemon.http is not None
        return f"http://127.0.0.1:{self.daemon.http.port}"

    def scrape(self) -> str:
        with urllib.request.urlopen(f"{self.metrics_url}/metrics", timeout=5) as response:
            return response.read().decode()

    def stop(self, check: bool = True) -> None:
        """Stop and join; safe to call again, so tests that restart a daemon can stop it early."""
        self.daemon.request_stop()
        self.thread.join(15)
        if check:
            assert not self.thread.is_alive(), "daemon thread still running 15 s after stop"


_MISSING = object()


def metric_value(text: str, name: str, default: Any = _MISSING, **labels: str) -> float:
    """One sample's value from a Prometheus text exposition, parsed by prometheus_client.

    A missing series fails the test (a renamed metric must not read as 0); pass ``default`` only
    where absent means a value (``default=0.0``: "never counted").
    """
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return float(sample.value)
    if default is _MISSING:
        raise AssertionError(f"no series {name}{labels or ''} in the scrape")
    return float(default)


def offline_predictions(values: list[float], stream: str = "s") -> list[float]:
    """What the shipped model predicts for ``values`` through a fresh Engine, one per tick."""
    checkpoint = load_checkpoint()
    engine = Engine(checkpoint.model, checkpoint.normalizer)
    return [engine.tick([Sample(stream, v)]).forecasts[0].prediction for v in values]


def restarted(engine: Engine, path: Path, **settings: Any) -> Engine:
    """``engine`` written to a checkpoint at ``path`` and read back into a fresh Engine (built
    with ``settings``), as a daemon's restart does."""
    table = engine.streams
    save_checkpoint(
        path,
        engine.model,
        engine.normalizer_config,
        stream_names=list(table.names),
        stream_arrays=table.arrays(),
    )
    saved = load_checkpoint(path)
    restored = Engine(saved.model, saved.normalizer, **settings)
    restored.streams.load(saved.stream_names, saved.stream_arrays)
    return restored


def forecaster_cli(*args: str) -> subprocess.CompletedProcess[str]:
    """``forecaster ARGS`` as a user runs it (a separate process), its output captured."""
    return subprocess.run(
        [sys.executable, "-m", "forecaster.cli", *args], capture_output=True, text=True, timeout=60
    )


def wait_until(condition: Callable[[], object], what: str, timeout: float = 10.0) -> None:
    """Poll ``condition`` until it holds; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)
