"""Overload over a real Mosquitto broker: offered load well above what the daemon sustains.

The daemon (``forecaster run`` in its own process, so its RSS can be read) serves a deliberately
heavy model (LSTM 384x2) so that a Python publisher can outrun it. A probe stream at 10 samples/s
runs throughout and measures receive-to-forecast latency before, during and after the overload.
What must hold: RSS stays under the stated bound, every message is either forecast or counted as a
drop (``drop_oldest``), or none is lost (``backpressure``), and probe latency is back to normal
within 10 s after the load falls. With back-pressure nothing is dropped, so the broker holds the
backlog and the daemon works it off at its own rate: there the 10 s count from the moment the
backlog is gone (the load and the probes queued behind it: when a probe is answered at normal
latency again), and the test checks that the backlog drains at no less than half the rate the
daemon sustained while overloaded (no stall, no slow drain).
"""

from __future__ import annotations

import contextlib
import json
import math
import queue
import signal
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import paho.mqtt.client as paho
import pytest
import torch
from paho.mqtt.enums import CallbackAPIVersion
from prometheus_client import CollectorRegistry

from forecaster.metrics import Metrics
from forecaster.model import Forecaster, ModelConfig
from forecaster.mqtt import MqttLink, RawMessage
from forecaster.normalize import NormalizerConfig
from forecaster.persist import save_checkpoint
from tests.conftest import Broker, free_port
from tests.helpers import link_config, metric_value, mqtt_client, wait_until, write_config

CALIBRATION_BURST = 600
MAX_OFFERED_RATE = 1500.0
# Offered load / the rate measured on the calibration burst. Once overloaded the daemon's ticks grow
# and it sustains more than on the burst, so every policy is offered 3x (at most MAX_OFFERED_RATE;
# check() verifies the offered rate is at least 1.5x what it then sustained). 2x fell short of that
# in a clean CI run: 730/s offered, 505/s sustained.
FACTOR = {"drop_oldest": 3.0, "drop_newest": 3.0, "backpressure": 3.0}
RSS_GROWTH_BOUND_MB = 100  # stated bound: RSS growth over the pre-load RSS during the whole run


class TimedCollector:
    """Records every forecast with the time it arrived."""

    def __init__(self, broker: Broker, topic_filter: str) -> None:
        self.got: list[tuple[float, dict]] = []
        self.lock = threading.Lock()
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2, client_id=f"c-{uuid.uuid4().hex[:8]}"
        )
        ready = threading.Event()
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *a: ready.set()
        self.client.on_connect = lambda c, *a: c.subscribe(topic_filter, 0)
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()
        assert ready.wait(10)

    def _on_message(self, client: paho.Client, userdata: object, msg: paho.MQTTMessage) -> None:
        now = time.time()
        with self.lock:
            self.got.append((now, json.loads(msg.payload)))

    def snapshot(self) -> list[tuple[float, dict]]:
        with self.lock:
            return list(self.got)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def sustainable_rate(pub: paho.Client, out: TimedCollector, prefix: str, burst: int = 600) -> float:
    """Forecasts per second while the daemon works off a burst on two calibration streams."""
    for k in range(burst):
        stream = "cal-a" if k % 2 == 0 else "cal-b"
        pub.publish(f"{prefix}/in/{stream}", str(float(np.sin(k / 7))), qos=1)
    deadline = time.monotonic() + 120
    last, still = -1, 0
    while time.monotonic() < deadline and still < 4:
        times = [t for t, f in out.snapshot() if f["stream"].startswith("cal")]
        still = still + 1 if len(times) == last else 0
        last = len(times)
        time.sleep(0.25)
    assert len(times) > burst / 10, "calibration burst not forecast"
    return len(times) / max(times[-1] - times[0], 1e-3)


@dataclass
class Run:
    sent: int  # load messages accepted by the broker
    others: int  # calibration and probe messages (they may be dropped too)
    offered_rate: float
    forecast_load: int  # distinct load samples forecast
    sustained_rate: float  # load forecasts per second while overloaded
    dropped: dict[str, float]
    rss_before: float
    rss_peak: float
    baseline_latency: float  # probe p50 before the load
    recovered_after: float  # s after the load fell (or the backlog was gone) until latency normal
    # s after the load fell until the last load sample was forecast (back-pressure: until the
    # whole backlog, probes included, was gone)
    drained_after: float
    drain_rate: float  # forecasts per second in that time (back-pressure: probes included)
    late_probes: list[tuple[float, float]]  # (s after that moment, latency s) of each slow probe


def overload_run(
    broker: Broker,
    tmp_path: Path,
    prefix: str,
    policy: str,
    seconds: float,
    rate: float = 0.0,
    factor: float = 2.0,
) -> Run:
    torch.manual_seed(0)
    model_path = tmp_path / "heavy.safetensors"
    # Heavy enough that the daemon, however fast its own code gets, sustains well under the
    # publisher's MAX_OFFERED_RATE: with 256 units it reached 1,093/s in CI and was not overloaded.
    model = Forecaster(ModelConfig("lstm", 384, 2)).eval()
    save_checkpoint(model_path, model, NormalizerConfig())
    port = free_port()
    config = write_config(
        tmp_path / "c.yaml",
        broker,
        prefix,
        tmp_path / "state",
        model={"checkpoint": str(model_path)},
        engine={"queue_size": 200, "overload": policy},
        # No periodic checkpoint in the run (the helper's 3600 s): this model's is 7 MB, written
        # and fsynced on the engine thread (25-37 ms for the write and fsync alone on this disk);
        # every 5 s in the 12 s probe window after a 60 s overload, that most likely read as "not
        # recovered" (12.1 s in a fresh-clone CI run). Checkpoints under load: test_recovery.py.
        metrics={"port": port},
        logging={"level": "WARNING"},
    )
    out = TimedCollector(broker, f"{prefix}/out/+")
    proc = subprocess.Popen(
        [sys.executable, "-m", "forecaster.cli", "run", "-c", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=open(tmp_path / "daemon.log", "w"),  # noqa: SIM115
    )
    pub = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"p-{uuid.uuid4().hex[:8]}")
    pub.max_inflight_messages_set(1000)  # paho's 20 would make the publisher the bottleneck
    pub.connect(broker.host, broker.port)
    pub.loop_start()
    stop_probe = threading.Event()

    probes_sent: list[int] = []

    def probe() -> None:
        while not stop_probe.is_set():
            probes_sent.append(1)
            k = len(probes_sent)
            payload = json.dumps({"value": float(np.sin(k / 5)), "ts": time.time()})
            pub.publish(f"{prefix}/in/probe", payload, qos=1)
            time.sleep(0.1)

    def scrape() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            return response.read().decode()

    rss: list[float] = []
    stop_rss = threading.Event()

    def watch_rss() -> None:
        while not stop_rss.is_set() and proc.poll() is None:
            rss.append(rss_mb(proc.pid))
            time.sleep(0.2)

    try:
        deadline = time.monotonic() + 30
        while True:  # ready: connected, subscribed, model loaded
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, (tmp_path / "daemon.log").read_text()
            time.sleep(0.1)
        if rate <= 0:  # twice what this daemon sustains, measured now on a burst
            rate = factor * sustainable_rate(pub, out, prefix, CALIBRATION_BURST)
            # Past ~1,500/s the Python publisher and the broker, on these 2 shared cores, fall
            # behind themselves (paho's 65,535 outstanding ids run out): the run would test them.
            rate = min(rate, MAX_OFFERED_RATE)
        threading.Thread(target=probe, daemon=True).start()
        time.sleep(3.0)  # baseline latency
        rss_before = rss_mb(proc.pid)
        threading.Thread(target=watch_rss, daemon=True).start()
        began = time.time()
        infos = []
        sent = 0
        while time.time() - began < seconds:
            stream = "load-a" if sent % 2 == 0 else "load-b"
            # The sender's seq (rising per stream): should the daemon's link drop and the broker
            # redeliver a message whose ack it lost, the copy is refused as a duplicate, so
            # "none lost" can be checked exactly (without seq that case is at-least-once).
            body = {"value": float(np.sin(sent / 7)), "ts": time.time(), "seq": sent // 2 + 1}
            payload = json.dumps(body)
            infos.append(pub.publish(f"{prefix}/in/{stream}", payload, qos=1))
            sent += 1
            ahead = began + sent / rate - time.time()
            if ahead > 0:
                time.sleep(ahead)
        fell = time.time()
        offered = sent / (fell - began)
        while not all(i.is_published() for i in infos):
            time.sleep(0.05)
        # Wait for the load to be worked off (back-pressure) or dropped, then 12 s of probes.
        settle = time.monotonic() + 3 * seconds + 60
        last_count, still = -1, 0.0
        while time.monotonic() < settle:
            count = sum(1 for _, f in out.snapshot() if f["stream"].startswith("load"))
            if count == last_count:
                still += 0.5
                if still >= 2.0:
                    break
            else:
                last_count, still = count, 0.0
            time.sleep(0.5)
        # With back-pressure, the probes queued behind the load are the rest of the backlog: wait
        # until one is answered at normal latency (see below), then 12 s of probes.
        while policy == "backpressure" and time.monotonic() < settle:
            probes = [(t - f["ts"], f["ts"]) for t, f in out.snapshot() if f["stream"] == "probe"]
            normal = max(3 * float(np.median([lat for lat, ts in probes if ts < began])), 0.05)
            if probes[-1][0] <= normal:
                break
            time.sleep(0.5)
        time.sleep(12.0)
        stop_probe.set()
        time.sleep(0.5)
        metrics = scrape()
        stop_rss.set()
    finally:
        stop_probe.set()
        pub.loop_stop()
        pub.disconnect()
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        out.close()
    assert proc.returncode == 0, (tmp_path / "daemon.log").read_text()[-3000:]

    got = out.snapshot()
    load = [(t, f) for t, f in got if f["stream"].startswith("load")]
    during = [t for t, _ in load if t <= fell]
    sustained = len(during) / (fell - began)
    load_keys = {(f["stream"], f["seq"]) for _, f in load}
    last_load = max(t for t, _ in load) if load else fell
    probes = [(f["ts"], t - f["ts"]) for t, f in got if f["stream"] == "probe"]
    baseline = float(np.median([lat for ts, lat in probes if ts < began]))
    normal = max(3 * baseline, 0.05)
    start = fell
    if policy == "backpressure":
        # The broker holds the backlog: the load, and the probes published while the load was
        # worked off. Those are one stream, one model step each (~12 ms with this model in CI:
        # 1,100 of them took 13 s after the last load forecast), so the backlog is gone when a
        # probe is answered at normal latency again.
        caught_up = [ts + lat for ts, lat in probes if ts + lat >= last_load and lat <= normal]
        start = min(caught_up, default=math.inf)
    drained = start - fell if policy == "backpressure" else last_load - fell
    backlog = sum(1 for t, f in got if fell < t <= start and not f["stream"].startswith("cal"))
    # Recovery: from the moment the load fell (or the backlog was gone), the first probe from
    # which every later probe is back under the normal latency.
    after = [(ts, lat) for ts, lat in probes if ts >= start]
    bad = [ts for ts, lat in after if lat > normal]
    recovered = (max(bad) - start + 0.1) if bad else 0.0
    if not after:
        recovered = float("inf")  # no probe forecast after the load fell
    return Run(
        sent=sent,
        others=CALIBRATION_BURST + len(probes_sent),
        offered_rate=offered,
        forecast_load=len(load_keys),
        sustained_rate=sustained,
        dropped={
            r: metric_value(metrics, "forecaster_messages_dropped_total", reason=r)
            for r in ("queue_full", "queue_full_oldest")
        },
        rss_before=rss_before,
        rss_peak=max(rss) if rss else rss_before,
        baseline_latency=baseline,
        recovered_after=recovered,
        drained_after=drained,
        drain_rate=(
            backlog / max(drained, 1e-3)
            if policy == "backpressure"
            else (len(load) - len(during)) / max(drained, 1e-3)
        ),
        late_probes=[(round(ts - start, 2), round(lat, 3)) for ts, lat in after if lat > normal],
    )


def check(run: Run, policy: str) -> None:
    print(run)  # the figures, for the report (pytest -s)
    assert run.offered_rate >= 1.5 * run.sustained_rate, "the load did not overload the daemon"
    assert run.rss_peak - run.rss_before < RSS_GROWTH_BOUND_MB
    if policy == "backpressure":
        assert run.forecast_load == run.sent  # none lost: the broker held what the daemon could not
        assert run.dropped["queue_full"] == run.dropped["queue_full_oldest"] == 0
        assert run.drain_rate >= 0.5 * run.sustained_rate, "the backlog drained too slowly"
    else:
        reason = "queue_full_oldest" if policy == "drop_oldest" else "queue_full"
        assert run.dropped[reason] > 0
        # Every load message is either forecast or counted as dropped (probes may be dropped too).
        assert run.forecast_load + run.dropped[reason] >= run.sent
        assert run.forecast_load + run.dropped[reason] <= run.sent + run.others
    assert run.recovered_after < 10.0, f"probes still slow: {run.late_probes}"


@pytest.mark.slow  # its recovery, drain and offered-rate bounds are timings: not in ``make test``
@pytest.mark.parametrize("policy", ["drop_oldest", "backpressure"])
def test_overload_short(broker: Broker, tmp_path: Path, prefix: str, policy: str) -> None:
    check(overload_run(broker, tmp_path, prefix, policy, seconds=5, factor=FACTOR[policy]), policy)


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("policy", ["drop_oldest", "drop_newest", "backpressure"])
def test_overload_60s(broker: Broker, tmp_path: Path, prefix: str, policy: str) -> None:
    check(overload_run(broker, tmp_path, prefix, policy, seconds=60, factor=FACTOR[policy]), policy)


@pytest.mark.parametrize(
    ("policy", "protocol"),
    [
        ("drop_newest", "5"),
        ("drop_oldest", "5"),
        ("backpressure", "5"),
        ("backpressure", "3.1.1"),
    ],
)
def test_full_queue_policy(broker: Broker, prefix: str, policy: str, protocol: str) -> None:
    """A receive queue of 3 that nobody drains, 10 QoS 1 messages: what each policy keeps."""
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    inbox: queue.Queue[RawMessage] = queue.Queue(maxsize=3)
    link = MqttLink(link_config(broker, prefix, protocol=protocol), inbox, metrics, overload=policy)
    link.start()
    assert link.is_subscribed.wait(10)
    with mqtt_client(broker) as pub:
        for k in range(10):
            pub.publish(f"{prefix}/in/s", str(k), qos=1).wait_for_publish(5)

    def dropped(reason: str) -> float:
        return registry.get_sample_value("forecaster_messages_dropped_total", {"reason": reason})

    if policy != "backpressure":  # all ten reached the link: three queued, the rest dropped
        wait_until(
            lambda: (
                inbox.qsize() == 3 and dropped("queue_full") + dropped("queue_full_oldest") == 7
            ),
            "the link to take all ten messages",
        )

    first = [inbox.get_nowait() for _ in range(3 if policy != "backpressure" else 0)]
    kept = [int(raw.payload) for raw in first]
    if policy == "drop_newest":
        assert kept == [0, 1, 2] and dropped("queue_full") == 7
    elif policy == "drop_oldest":
        assert kept == [7, 8, 9] and dropped("queue_full_oldest") == 7
    else:
        # MQTT 5: the broker sends few unacknowledged (Receive Maximum: half the queue), so the
        # reader never waits; 3.1.1: the reader waits for room. Either way the rest
        # arrives in order as the queue is worked off, and nothing is dropped.
        taken = first
        deadline = time.monotonic() + 10
        while len(kept) < 10 and time.monotonic() < deadline:
            link.ack(taken)  # handled: acknowledge them, as the daemon does after journaling
            taken = []
            time.sleep(0.2)
            if protocol == "5":  # the queue never fills: the broker holds the rest
                assert inbox.qsize() < 3
            with contextlib.suppress(queue.Empty):
                while True:
                    raw = inbox.get(timeout=0.3)
                    kept.append(int(raw.payload))
                    taken.append(raw)
        assert kept == list(range(10))
        assert dropped("queue_full") == dropped("queue_full_oldest") == 0
        waits = registry.get_sample_value("forecaster_backpressure_waits_total")
        assert (waits == 0) if protocol == "5" else (waits >= 1), waits
    link.close()
