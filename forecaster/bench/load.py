"""Load generation shared by the broker benches: paced publishers, the no-model relay, the
output collector, and starting a relay or daemon process over one Mosquitto broker."""

from __future__ import annotations

import json
import math
import os
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import orjson

LOAD_IN, LOAD_OUT = "load/in/{stream}", "load/out/{stream}"


def publish_load(
    port: int, streams: int, count: int, rate: float, seconds: float = 0.0, qos: int = 0
) -> int:
    """Publisher process: ``count`` JSON samples round-robin over ``streams`` streams, at ``rate``
    messages/s (0: as fast as paho takes them, and for at least ``seconds``); each carries its
    send time in ``ts``. Returns how many it sent (with ``qos`` 1: the broker acknowledged)."""

    def body(i: int) -> str:
        value = math.sin(0.157 * (i // streams))
        return json.dumps({"value": round(value, 6), "ts": time.time()})

    names = [f"s{i}" for i in range(streams)]
    return publish_paced(port, "bench-load", names, count, rate, body, seconds, qos)


def publish_paced(
    port: int,
    client_id: str,
    names: list[str],
    count: int,
    rate: float,
    body: Callable[[int], str],
    seconds: float = 0.0,
    qos: int = 0,
) -> int:
    """Publish ``body(i)`` for i < ``count`` round-robin to ``names``' input topics, at ``rate``
    messages/s (0: as fast as paho takes them, and on past ``count`` until ``seconds`` have
    passed: a saturating offer of a fixed length, whatever the target's speed). Returns how
    many it published."""
    import paho.mqtt.client as paho

    from simulators.client import connected_client

    # QoS 1: many acknowledgements in flight, not 20 at a time
    client = connected_client("127.0.0.1", port, client_id, inflight=1000)
    topics = [LOAD_IN.format(stream=name) for name in names]
    sending = None
    started = time.monotonic()
    until = started + (seconds if rate <= 0 else 0.0)
    i = 0
    while i < count or time.monotonic() < until:
        if rate > 0:
            delay = started + i / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        payload = body(i)
        while (sending := client.publish(topics[i % len(topics)], payload, qos=qos)).rc == (
            paho.MQTT_ERR_QUEUE_SIZE
        ):
            time.sleep(0.001)
        i += 1
    if qos and sending is not None:  # paho sends in order: the last acknowledged, all were
        sending.wait_for_publish(300)
    client.disconnect()
    client.loop_stop()
    return i


def device_frame(step: int, size: int) -> str:
    """A device's ``step``-th frame: ``size`` sine readings and the send time."""
    frame: dict[str, float] = {f"r{k}": round(math.sin(0.157 * step + k), 6) for k in range(size)}
    frame["ts"] = time.time()
    return json.dumps(frame)


def publish_frames(
    port: int, devices: int, count: int, rate: float, seconds: float = 0.0, size: int = 100
) -> int:
    """Publisher process: ``count`` device frames of ``size`` readings each (``{"r0": .., ...,
    "ts": send time}``), round-robin over ``devices`` devices, at ``rate`` frames/s (0: as fast
    as paho takes them, and for at least ``seconds``). Returns how many it sent."""

    def body(i: int) -> str:
        return device_frame(i // devices, size)

    names = [f"d{i}" for i in range(devices)]
    return publish_paced(port, "bench-frames", names, count, rate, body, seconds)


def run_relay(port: int) -> None:
    """The no-model relay, built from the daemon's own MqttLink: receive -> republish the payload
    to the output topic (no parsing, no model, no JSON work). Runs until SIGTERM."""
    import queue
    import signal

    from forecaster.config import MqttConfig
    from forecaster.mqtt import MqttLink, RawMessage

    config = MqttConfig(
        port=port,
        client_id="bench-relay",
        qos_in=0,
        input_topics=[LOAD_IN],
        output_topic=LOAD_OUT,
        status_topic="load/status/relay",
    )
    inbox: queue.Queue[RawMessage] = queue.Queue(maxsize=100_000)
    link = MqttLink(config, inbox)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    link.start()
    cut = len("load/in/")
    while not stop.is_set():
        try:
            raw = inbox.get(timeout=0.2)
        except queue.Empty:
            continue
        link.publish("load/out/" + raw.topic[cut:], raw.payload, 0)
    link.close()


def close_bench(collector: Collector, broker: subprocess.Popen, folder: Path) -> None:
    """End a broker bench: the collector, the bench's Mosquitto, its temporary folder."""
    import shutil

    collector.close()
    broker.terminate()
    broker.wait(5)
    shutil.rmtree(folder, ignore_errors=True)


def proc_figures(pid: int) -> tuple[float, float]:
    """(CPU seconds so far, peak RSS in MB) of a running process, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return cpu, int(line.split()[1]) / 1024
    return cpu, float("nan")


class Collector:
    """Receives the outputs and keeps (receive time, latency from the payload's ``ts``)."""

    def __init__(self, port: int) -> None:
        import paho.mqtt.client as paho
        from paho.mqtt.enums import CallbackAPIVersion

        self.times: list[float] = []
        self.latencies: list[float] = []
        self.online: set[str] = set()
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id="bench-collector")
        self.client.on_connect = lambda c, *a: c.subscribe(
            [("load/out/+", 0), ("load/status/+", 0), ("load/status", 0)]
        )
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def _on_message(self, client: object, userdata: object, message: object) -> None:
        now = time.time()
        topic, payload = message.topic, message.payload  # type: ignore[attr-defined]
        if topic.startswith("load/status"):
            if payload == b"online":
                self.online.add(topic)
            else:  # "offline" (a clean stop or the last will): the next start must say online
                self.online.discard(topic)
            return
        # orjson: the stdlib parser on 20 KB output frames cost the collector, which shares the
        # 2 cores with the daemon, about as much CPU as the daemon itself spent.
        body = orjson.loads(payload)
        for item in body if isinstance(body, list) else [body]:  # an output frame: each forecast
            ts = item.get("ts")
            self.times.append(time.monotonic())
            self.latencies.append(now - ts if ts is not None else math.nan)

    def reset(self) -> None:
        self.times, self.latencies = [], []

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def offer(
    collector: Collector,
    port: int,
    streams: int,
    count: int,
    rate: float,
    publisher: str = "publish_load",
    per_message: int = 1,
    seconds: float = 0.0,
) -> dict:
    """Offer ``count`` messages (``per_message`` outputs expected from each; with ``rate`` 0, as
    fast as they go for at least ``seconds``); rates are of outputs. Latency percentiles come
    with the number of samples behind them."""
    import subprocess
    import sys

    collector.reset()
    code = (
        f"from forecaster.bench.load import {publisher}; "
        f"print({publisher}({port}, {streams}, {count}, {rate}, {seconds}))"
    )
    done = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    sent = int(done.stdout.split()[-1])
    # Nothing new for 5 s: the rest was dropped (a daemon mid-way through one long tick is
    # silent for seconds; a 1 s window cut the one-stream runs short and inflated their CPU/1k).
    deadline, seen, quiet_since = time.monotonic() + 60, -1, time.monotonic()
    while len(collector.times) < sent * per_message and time.monotonic() < deadline:
        if len(collector.times) != seen:
            seen, quiet_since = len(collector.times), time.monotonic()
        elif time.monotonic() - quiet_since > 5.0:
            break
        time.sleep(0.25)
    times, latencies = list(collector.times), [x for x in collector.latencies if x == x]
    span = times[-1] - times[0] if len(times) > 1 else math.nan
    return {
        "sent": sent,
        "received": len(times),
        "per_s": (len(times) - 1) / span if span > 0 else math.nan,
        "p50_ms": 1000 * float(np.percentile(latencies, 50)) if latencies else math.nan,
        "p99_ms": 1000 * float(np.percentile(latencies, 99)) if latencies else math.nan,
        "latency_samples": len(latencies),  # a p99 over 2,000 samples rests on 20 of them
    }


def start_target(
    kind: str, port: int, folder: Path, collector: Collector, frames: bool = False, qos: int = 0
) -> object:
    import subprocess
    import sys

    import yaml

    if kind == "relay":
        cmd = [
            sys.executable,
            "-c",
            f"from forecaster.bench.load import run_relay; run_relay({port})",
        ]
        status = "load/status/relay"
    else:
        config = folder / "daemon.yaml"
        config.write_text(
            yaml.safe_dump(
                {
                    "mqtt": {
                        "port": port,
                        "client_id": "bench-daemon",
                        "qos_in": qos,
                        "output_topic": LOAD_OUT,
                        "status_topic": "load/status/daemon",
                        # frames: the same topics carry device frames, answered by output frames
                        **(
                            {
                                "input_topics": ["load/single/{stream}"],
                                "frame_topics": [LOAD_IN.replace("{stream}", "{device}")],
                                "output_frames": True,
                            }
                            if frames
                            else {"input_topics": [LOAD_IN]}
                        ),
                    },
                    "state": {"dir": str(folder / "state")},
                    "metrics": {"port": 0},
                }
            )
        )
        cmd = [sys.executable, "-m", "forecaster.cli", "run", "-c", str(config)]
        status = "load/status/daemon"
    # A target started before in this run said "online" too: only this start's word counts (the
    # second daemon of a run was once offered its load before it had subscribed, and got none).
    collector.online.discard(status)
    log = folder / f"{kind}.log"
    with open(log, "w") as sink:
        proc = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while status not in collector.online:
        if time.monotonic() > deadline or proc.poll() is not None:
            proc.kill()
            raise RuntimeError(f"the {kind} did not come online: {log.read_text()[-2000:]}")
        time.sleep(0.1)
    time.sleep(0.5)  # subscribed after online
    return proc
