"""``forecaster demo``: broker, simulator, daemon and a live terminal view, in one command.

A driver like ``evaluate``: it composes the real parts (the daemon, the sine simulator publishing
over MQTT, a subscriber reading the forecasts users would read) around a broker of its own —
Mosquitto when it is on PATH, else the pure-Python amqtt (MQTT 3.1.1 only, and it peaks near
1.8k msg/s, so the demo stays at a few hundred samples/s).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from forecaster import runtime
from forecaster.config import Config, load_config
from forecaster.daemon import Daemon
from forecaster.errors import ConfigError
from simulators.client import connected_client
from simulators.sine import SineSpec, SineStreams, publish_sine

log = logging.getLogger(__name__)
DEMO_CONFIG = Path(__file__).resolve().parent / "demo.yaml"


DEFAULT_METRICS_PORT = 9108  # the port configs/prometheus scrapes; another one when it is taken


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """True when ``host:port`` can be bound now (nothing listens there)."""
    with socket.socket() as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def _die_with_parent_hook() -> object:
    """A ``preexec_fn`` after which the kernel sends the child SIGTERM when the demo dies, however
    it dies (even SIGKILL), so no broker outlives it under PID 1. Linux only; elsewhere None.
    libc is loaded here, in the parent: the child between fork and exec only calls prctl."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    return lambda: prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


class Stop(Exception):
    """SIGTERM or SIGHUP reached the demo: leave the loop and clean up, as Ctrl-C does."""


class Signals:
    """While active, SIGINT raises KeyboardInterrupt and SIGTERM (``timeout``, ``kill``) and SIGHUP
    (the terminal closed) raise :class:`Stop` in the main thread, so the ``finally`` that stops the
    broker and removes the folder runs for all three. Once :meth:`stopping` is called, further
    signals are noted and ignored: a second Ctrl-C must not cut the cleanup short."""

    def __init__(self) -> None:
        self.wanted = [signal.SIGINT, signal.SIGTERM]
        if hasattr(signal, "SIGHUP"):
            self.wanted.append(signal.SIGHUP)
        self.previous: dict[int, object] = {}
        self._stopping = False

    def _handle(self, signum: int, frame: object) -> None:
        if self._stopping:
            return
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise Stop(signal.Signals(signum).name)

    def stopping(self) -> None:
        self._stopping = True

    def __enter__(self) -> Signals:
        if threading.current_thread() is threading.main_thread():
            self.previous = {sig: signal.signal(sig, self._handle) for sig in self.wanted}
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]


class Console:
    """The demo's output. When the reader goes away (``make demo | tee log`` and Ctrl-C kills
    ``tee`` too) a print raises BrokenPipeError; that must not skip the cleanup, so the console
    goes quiet instead, and stdout is pointed at /dev/null so the interpreter's last flush at exit
    does not fail either."""

    def __init__(self) -> None:
        self.open = True

    def say(self, text: str) -> None:
        if not self.open:
            return
        try:
            print(text, flush=True)
        except (BrokenPipeError, OSError):
            self.open = False
            with contextlib.suppress(OSError, ValueError):
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, sys.stdout.fileno())
                os.close(devnull)


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


def start_broker(
    folder: Path, kind: str = "auto", settings: str = "", attempts: int = 5
) -> tuple[subprocess.Popen, int, str]:
    """Mosquitto if installed (``kind="auto"``), else amqtt; returns (process, port, name).
    ``settings``: more lines for Mosquitto's configuration file.

    The port is a free one when chosen, but another process can take it before the broker
    binds it (two test suites or benches on one machine did): the broker then exits, or a
    connection reaches the other process's listener while ours fails. Either way another free
    port is tried, up to ``attempts`` times."""
    for _ in range(attempts - 1):
        with contextlib.suppress(PortTaken):
            return _start_broker(folder, kind, settings)
    return _start_broker(folder, kind, settings)


class PortTaken(RuntimeError):
    """The demo broker exited at start: its port was taken (or it cannot start at all)."""


def _start_broker(folder: Path, kind: str, settings: str) -> tuple[subprocess.Popen, int, str]:
    port = free_port()
    mosquitto = shutil.which("mosquitto") or (
        "/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None
    )
    if kind == "mosquitto" and not mosquitto:
        raise RuntimeError("mosquitto is not installed")
    if mosquitto and kind != "amqtt":
        conf = folder / "mosquitto.conf"
        # Started as root, Mosquitto switches to the "mosquitto" user, and the kernel forgets the
        # die-with-parent signal on that switch: stay the user the demo runs as (a local broker
        # on 127.0.0.1 that keeps nothing on disk).
        stay = "user root\n" if hasattr(os, "geteuid") and os.geteuid() == 0 else ""
        conf.write_text(
            f"listener {port} 127.0.0.1\nallow_anonymous true\nset_tcp_nodelay true\n{stay}"
            + settings
        )
        cmd, name = [mosquitto, "-c", str(conf)], "mosquitto"
    else:
        code = f"from forecaster.demo import serve_amqtt; serve_amqtt({port})"
        cmd, name = [sys.executable, "-c", code], "amqtt (embedded)"
    # Own session: Ctrl-C reaches the demo, which stops the daemon (publishing "stopped") before
    # it stops the broker, instead of killing the broker first. And the broker dies with the
    # demo if the demo is killed before it can stop it.
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        preexec_fn=_die_with_parent_hook(),  # type: ignore[arg-type]
    )
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
        except OSError:
            if proc.poll() is not None:
                raise PortTaken(
                    f"the demo broker ({name}) exited at start on port {port}"
                ) from None
            time.sleep(0.1)
            continue
        # Someone listens; a broker that could not bind exits within milliseconds.
        time.sleep(0.2)
        if proc.poll() is not None:
            raise PortTaken(f"port {port} was taken by another process before {name} bound it")
        return proc, port, name
    proc.kill()
    proc.wait(5)
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
                f"{'stream':<10} {'seq':>6} {'value':>10} {'MAE':>9} {'naive MAE':>10}  "
                f"{'winning':<7} | {'forecast of seq+1':>17}",
            ]
            for name in sorted(self.rows):
                r = self.rows[name]
                if "last" not in r:
                    continue
                winning = "-" if math.isnan(r["mae"]) else "yes" if r["mae"] < r["naive"] else "no"
                lines.append(
                    f"{name:<10} {int(r['seq']):>6} {r['last']:>10.3f} {r['mae']:>9.4f} "
                    f"{r['naive']:>10.4f}  {winning:<7} | {r['prediction']:>17.3f}"
                )
            lines.append(
                "MAE: the model's recent mean absolute error; naive MAE: that of repeating the last"
                " value. MAE below naive MAE means the model is winning."
            )
        return "\n".join(lines)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def choose_metrics_port(requested: int | None) -> int:
    """The port asked for, else 9108 when free, else any free port (a second demo runs beside
    the first; the URL it prints says which)."""
    if requested is not None:
        return requested  # taken: the daemon's start says so and names metrics.port
    return DEFAULT_METRICS_PORT if port_is_free(DEFAULT_METRICS_PORT) else 0


def start_daemon(overrides: dict[str, str], metrics_port: int | None) -> tuple[Config, Daemon]:
    """The demo's daemon, started. When 9108 was free on looking and taken on binding (two demos
    starting at once did that), the daemon's start says so and the demo takes any free port; a
    port the user asked for stays an error."""
    chosen = choose_metrics_port(metrics_port)
    while True:
        environ = {**overrides, "FORECASTER_METRICS__PORT": str(chosen)}
        config = load_config(DEMO_CONFIG, environ=environ)
        runtime.tune_process(config.model.threads)  # as ``forecaster run``
        daemon = Daemon(config)
        try:
            daemon.start()
        except ConfigError as exc:
            if metrics_port is not None or chosen == 0 or not str(exc).startswith("metrics.port"):
                raise
            chosen = 0
            continue
        return config, daemon


def run_demo(
    duration: float | None,
    streams: int,
    rate: float,
    metrics_port: int | None = None,
    broker: str = "auto",
) -> int:
    """Run until ``duration`` or Ctrl-C/SIGTERM/SIGHUP; then stop the daemon, the broker and
    remove the temporary folder, whatever happened to stdout."""
    console = Console()
    folder = Path(tempfile.mkdtemp(prefix="forecaster-demo-"))
    proc: subprocess.Popen | None = None
    daemon: Daemon | None = None
    stop = threading.Event()
    view: LiveView | None = None
    threads: list[threading.Thread] = []
    engine: threading.Thread | None = None
    try:
        with Signals() as signals:
            try:
                proc, port, name = start_broker(folder, broker)
                console.say(f"broker: {name} on 127.0.0.1:{port} (files in {folder})")
                overrides = {
                    "FORECASTER_MQTT__PORT": str(port),
                    "FORECASTER_STATE__DIR": str(folder / "state"),
                }
                config, daemon = start_daemon(overrides, metrics_port)
                runtime.settle(learner=config.online_learning.enabled)
                metrics_url = None
                if daemon.http is not None:
                    metrics_url = f"http://127.0.0.1:{daemon.http.port}/metrics"
                    if config.live.enabled:  # the page people without Grafana look at
                        console.say(f"live page: http://127.0.0.1:{daemon.http.port}/live/")
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
                    console.say(("\033[2J\033[H" if tty else "") + text + ("" if tty else "\n"))
            except (KeyboardInterrupt, Stop) as exc:
                signals.stopping()
                console.say(f"\nstopping ({exc or 'SIGINT'})…")
            finally:
                signals.stopping()  # from here on a second signal cannot cut the cleanup short
                _clean_up(console, stop, threads, daemon, engine, view)
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        shutil.rmtree(folder, ignore_errors=True)
    return 0


def _clean_up(
    console: Console,
    stop: threading.Event,
    threads: list[threading.Thread],
    daemon: Daemon | None,
    engine: threading.Thread | None,
    view: LiveView | None,
) -> None:
    """Stop the simulator, then the daemon (it publishes "stopped" while the broker is up)."""
    stop.set()
    for t in threads:
        t.join(5)
    if daemon is not None:
        daemon.request_stop()
        if engine is not None:
            engine.join(10)
        else:
            daemon.shutdown()
    if view is not None:
        console.say(f"done: {view.count} forecasts received")
        view.close()
