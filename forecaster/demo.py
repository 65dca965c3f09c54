"""``forecaster demo``: broker, simulator, daemon and a live terminal view, in one command.

A driver like ``evaluate``: it composes the real parts (the daemon, the sine simulator publishing
over MQTT, a subscriber reading the forecasts users would read) around a broker of its own —
Mosquitto when it is on PATH, else the pure-Python amqtt (MQTT 3.1.1 only, and it peaks near
1.8k msg/s, so the demo stays at a few hundred samples/s).
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from forecaster.config import load_config
from forecaster.daemon import Daemon
from simulators.client import connected_client
from simulators.sine import SineSpec, SineStreams, publish_sine

log = logging.getLogger(__name__)
DEMO_CONFIG = Path(__file__).resolve().parent / "demo.yaml"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def serve_amqtt(port: int) -> None:
    """Run an amqtt broker on 127.0.0.1:port until killed (the demo's fallback broker)."""
    import asyncio

    from amqtt.broker import Broker

    async def serve() -> None:
        broker = Broker({"listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{port}"}}})
        await broker.start()
        await asyncio.Event().wait()

    logging.basicConfig(level=logging.ERROR)
    asyncio.run(serve())


def start_broker(folder: Path, kind: str = "auto") -> tuple[subprocess.Popen, int, str]:
    """Mosquitto if installed (``kind="auto"``), else amqtt; returns (process, port, name)."""
    port = free_port()
    mosquitto = shutil.which("mosquitto") or (
        "/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None
    )
    if kind == "mosquitto" and not mosquitto:
        raise RuntimeError("mosquitto is not installed")
    if mosquitto and kind != "amqtt":
        conf = folder / "mosquitto.conf"
        conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\nset_tcp_nodelay true\n")
        cmd, name = [mosquitto, "-c", str(conf)], "mosquitto"
    else:
        code = f"from forecaster.demo import serve_amqtt; serve_amqtt({port})"
        cmd, name = [sys.executable, "-c", code], "amqtt (embedded)"
    # Own session: Ctrl-C reaches the demo, which stops the daemon (publishing "stopped") before
    # it stops the broker, instead of killing the broker first.
    proc = subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc, port, name
        except OSError:
            if proc.poll() is not None:
                break
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"the demo broker ({name}) did not start on port {port}")


class LiveView:
    """Subscribes to the forecast topic and keeps, per stream, the last forecast and rolling error."""

    def __init__(self, host: str, port: int, topic_filter: str) -> None:
        self.rows: dict[str, dict[str, float]] = {}
        self.count = 0
        self.lock = threading.Lock()
        self.client = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv311)
        self.client.on_connect = lambda c, *a: c.subscribe(topic_filter, 0)
        self.client.on_message = self._on_message
        self.client.connect(host, port)
        self.client.loop_start()

    def _on_message(self, client: paho.Client, userdata: object, message: paho.MQTTMessage) -> None:
        try:
            f = json.loads(message.payload)
        except ValueError:
            return
        with self.lock:
            self.count += 1
            row = self.rows.setdefault(f["stream"], {"mae": math.nan, "naive": math.nan, "n": 0})
            if f.get("error") is not None and "last" in row:
                row["n"] += 1
                w = max(1 / row["n"], 0.02)
                naive = abs(f["value"] - row["last"])
                row["mae"] = (
                    abs(f["error"])
                    if row["n"] == 1
                    else row["mae"] + w * (abs(f["error"]) - row["mae"])
                )
                row["naive"] = naive if row["n"] == 1 else row["naive"] + w * (naive - row["naive"])
            row.update(last=f["value"], prediction=f["prediction"], seq=f["seq"])

    def render(self, elapsed: float, metrics_url: str | None) -> str:
        with self.lock:
            lines = [
                f"forecaster demo — {elapsed:5.1f}s, {self.count} forecasts received"
                + (f" — metrics: {metrics_url}" if metrics_url else ""),
                f"{'stream':<10} {'seq':>6} {'value':>10} {'next (pred.)':>13} {'MAE':>9} {'naive MAE':>10}",
            ]
            for name in sorted(self.rows):
                r = self.rows[name]
                if "last" not in r:
                    continue
                lines.append(
                    f"{name:<10} {int(r['seq']):>6} {r['last']:>10.3f} {r['prediction']:>13.3f} "
                    f"{r['mae']:>9.4f} {r['naive']:>10.4f}"
                )
        return "\n".join(lines)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def run_demo(
    duration: float | None, streams: int, rate: float, metrics_port: int, broker: str = "auto"
) -> int:
    folder = Path(tempfile.mkdtemp(prefix="forecaster-demo-"))
    proc, port, name = start_broker(folder, broker)
    print(f"broker: {name} on 127.0.0.1:{port}", flush=True)
    overrides = {
        "FORECASTER_MQTT__PORT": str(port),
        "FORECASTER_STATE__DIR": str(folder / "state"),
        "FORECASTER_METRICS__PORT": str(metrics_port),
    }
    config = load_config(DEMO_CONFIG, environ=overrides)
    daemon = Daemon(config)
    stop = threading.Event()
    view: LiveView | None = None
    threads: list[threading.Thread] = []
    engine: threading.Thread | None = None
    try:
        daemon.start()
        metrics_url = None
        if daemon.http is not None:
            metrics_url = f"http://127.0.0.1:{daemon.http.port}/metrics"
        engine = threading.Thread(target=daemon.run, name="engine", daemon=True)
        engine.start()
        view = LiveView("127.0.0.1", port, "demo/forecasts/+")
        sim_client = connected_client("127.0.0.1", port, "forecaster-demo-sim")
        sim = threading.Thread(
            target=publish_sine,
            args=(sim_client, SineStreams(SineSpec(streams=streams, seed=0))),
            kwargs={
                "rate": rate,
                "count": None,
                "topic": "demo/sensors/{stream}/value",
                "stop": stop,
            },
            name="simulator",
            daemon=True,
        )
        sim.start()
        threads = [sim]
        started = time.monotonic()
        tty = sys.stdout.isatty()
        while duration is None or time.monotonic() - started < duration:
            time.sleep(1.0)
            text = view.render(time.monotonic() - started, metrics_url)
            print(("\033[2J\033[H" if tty else "") + text + ("" if tty else "\n"), flush=True)
    except KeyboardInterrupt:
        print("\nstopping…", flush=True)
    finally:
        stop.set()
        for t in threads:
            t.join(5)
        daemon.request_stop()
        if engine is not None:
            engine.join(10)
        else:
            daemon.shutdown()
        if view is not None:
            print(f"done: {view.count} forecasts received", flush=True)
            view.close()
        proc.terminate()
        proc.wait(5)
        shutil.rmtree(folder, ignore_errors=True)
    return 0
