"""The daemon as users run it: ``forecaster run -c FILE`` in its own process, stopped by signals."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from tests.conftest import Broker, Collector
from tests.helpers import offline_predictions, write_config

DEFAULT_STATE = {"checkpoint_interval": 60}  # the shipped default: the periodic checkpoint on


def start(config: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "forecaster.cli", "run", "-c", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def wait_status(collector: Collector, status: bytes, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(payload == status for _, payload, _ in collector.messages[-1:]):
            return
        time.sleep(0.05)
    raise AssertionError(f"status {status!r} not seen; got {collector.messages}")


def test_sigterm_restart_continue_equals_uninterrupted(
    broker: Broker, prefix: str, tmp_path: Path, publisher
) -> None:
    config = write_config(
        tmp_path / "c.yaml", broker, prefix, tmp_path / "state", state=DEFAULT_STATE
    )
    status = Collector(broker, f"{prefix}/status")
    forecasts = Collector(broker, f"{prefix}/out/+")
    rng = np.random.default_rng(5)
    values = {
        s: [float(v) for v in 50 + 10 * np.sin(np.arange(40) / 3) + rng.normal(0, 1, 40)]
        for s in "ab"
    }

    proc = start(config)
    # The daemon subscribes before it publishes "online" on the same connection, and the broker
    # takes a connection's packets in order: once "online" is seen, the subscription stands.
    wait_status(status, b"online")
    for i in range(20):
        for s in "ab":
            publisher.publish(f"{prefix}/in/{s}", str(values[s][i]), qos=1)
    forecasts.wait_for(40)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=15)  # a stuck shutdown fails here
    assert proc.returncode == 0, output
    wait_status(status, b"stopped")
    assert (tmp_path / "state" / "checkpoint.safetensors").exists()

    proc = start(config)
    wait_status(status, b"online")
    for i in range(20, 40):
        for s in "ab":
            publisher.publish(f"{prefix}/in/{s}", str(values[s][i]), qos=1)
    got = forecasts.wait_for(80)
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=15)
    assert proc.returncode == 0
    for s in "ab":
        mine = [f for f in got if f["stream"] == s]
        assert [f["seq"] for f in mine] == list(range(1, 41))
        np.testing.assert_allclose(
            [f["prediction"] for f in mine], offline_predictions(values[s]), atol=1e-5
        )
    status.close()
    forecasts.close()


def test_sigkill_leaves_offline_last_will(broker: Broker, prefix: str, tmp_path: Path) -> None:
    config = write_config(
        tmp_path / "c.yaml", broker, prefix, tmp_path / "state", state=DEFAULT_STATE
    )
    status = Collector(broker, f"{prefix}/status")
    proc = start(config)
    wait_status(status, b"online")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(5)
    wait_status(status, b"offline", timeout=30)  # the broker publishes the will on socket close
    status.close()


def test_demo_runs_bounded_on_the_embedded_python_broker() -> None:
    """What `make demo` does on a machine without mosquitto (the amqtt path), bounded."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "forecaster.cli",
            "demo",
            "--duration",
            "20",
            "--broker",
            "amqtt",
            "--metrics-port",
            "0",
        ],
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "broker: amqtt" in result.stdout
    assert "sine-000" in result.stdout and "sine-003" in result.stdout
    received = int(result.stdout.rsplit("done: ", 1)[1].split()[0])
    assert received > 4 * 20 * 10  # 4 streams at 20/s for most of 20 s


def test_a_taken_metrics_port_is_one_line_naming_the_setting(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "forecaster.cli", "run"],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=tmp_path,
            env={
                **os.environ,
                "FORECASTER_METRICS__PORT": str(port),
                "FORECASTER_STATE__DIR": str(tmp_path / "state"),
            },
        )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [
        f"error: metrics.port: cannot listen on 127.0.0.1:{port} (Address already in use); choose "
        "another port (FORECASTER_METRICS__PORT=... or metrics.port; 0 = any free)"
    ]
