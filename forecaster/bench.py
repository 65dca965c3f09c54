"""Benchmarks: figures measured side by side in one run (not tests; these machines are noisy)."""

from __future__ import annotations

import json
import statistics
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
from prometheus_client import CollectorRegistry
from tqdm import tqdm

from forecaster.engine import Forecast
from forecaster.metrics import HttpEndpoint, Metrics


def bench_scrape(streams: int = 5000, cap: int = 100, scrapes: int = 50) -> dict[str, float]:
    """Size and latency of one ``/metrics`` scrape with ``streams`` streams and a label cap."""
    registry = CollectorRegistry()
    metrics = Metrics(registry, stream_label_cap=cap)
    rng = np.random.default_rng(0)
    for _ in tqdm(range(3), desc=f"feeding {streams} streams", leave=False):
        metrics.observe_forecasts(
            Forecast(f"sensor-{i:05d}", 1, None, float(v), float(v), float(e), float(e), 0)
            for i, (v, e) in enumerate(
                zip(rng.normal(size=streams), rng.normal(size=streams), strict=True)
            )
        )
    endpoint = HttpEndpoint(registry, "127.0.0.1", 0, lambda: (True, ""), lambda: (True, ""))
    endpoint.start()
    url = f"http://127.0.0.1:{endpoint.port}/metrics"
    times, size = [], 0
    try:
        for _ in tqdm(range(scrapes), desc="scraping", leave=False):
            started = time.perf_counter()
            with urllib.request.urlopen(url, timeout=10) as response:
                size = len(response.read())
            times.append(time.perf_counter() - started)
    finally:
        endpoint.close()
    return {
        "streams": streams,
        "stream_label_cap": cap,
        "scrape_bytes": size,
        "scrape_ms_median": 1000 * statistics.median(times),
        "scrape_ms_max": 1000 * max(times),
    }


def print_scrape(result: dict[str, float], as_json: bool) -> None:
    if as_json:
        print(json.dumps(result))
        return
    print(f"/metrics with {result['streams']} streams (label cap {result['stream_label_cap']}):")
    print(
        f"  size   {result['scrape_bytes'] / 1024:.1f} KB   (goal < 200 KB: {result['scrape_bytes'] / 204800:.2f} of it)"
    )
    print(
        f"  time   median {result['scrape_ms_median']:.1f} ms, max {result['scrape_ms_max']:.1f} ms   (goal < 50 ms)"
    )


# -- drift: learning off vs on ---------------------------------------------------------------------
DRIFT_SIGNAL = (
    "a sine (amplitude 1, 20 samples per half period) that switches to the sum of two sines of "
    "unrelated frequencies (0.7x and 1.9x the first, amplitude 1.5 each: peak 3, i.e. tripled), "
    "with Gaussian sensor noise sigma 0.1 throughout"
)


def drift_signal(before: int, after: int, seed: int = 0) -> np.ndarray:
    """The drift benchmark's series: outside the shipped model's training distribution after."""
    from simulators.signals import SEED_STEP

    t = np.arange(before + after, dtype=np.float64)
    clean = np.where(
        t < before,
        np.sin(t * SEED_STEP),
        1.5 * np.sin(0.7 * t * SEED_STEP) + 1.5 * np.sin(1.9 * t * SEED_STEP + 1.0),
    )
    return clean + 0.1 * np.random.default_rng(seed).standard_normal(len(t))


def recovery_samples(
    rolling: np.ndarray, switch: int, threshold: float, sustained: bool = False
) -> int | None:
    """Samples after ``switch`` until the rolling MSE is back within ``threshold`` (with
    ``sustained``: from when on it stays there); None if it never is."""
    after = rolling[switch:]
    if sustained:
        above = np.flatnonzero(after > threshold)
        if len(above) == 0:
            return 0
        last = int(above[-1]) + 1
        return None if last >= len(after) else last
    peak = int(np.argmax(after[: max(1, len(after) // 4)]))  # first let the switch register
    back = np.flatnonzero(after[peak:] <= threshold)
    return int(peak + back[0]) if len(back) else None


def bench_drift_offline(
    before: int = 4000, after: int = 6000, seed: int = 0, learn: dict | None = None
) -> dict[str, float | None]:
    from forecaster.config import OnlineLearningConfig
    from forecaster.evaluate import rolling_mse, run_series
    from forecaster.persist import load_checkpoint

    values = drift_signal(before, after, seed)
    checkpoint = load_checkpoint()
    off = run_series(values, checkpoint.model, checkpoint.normalizer, progress=True)
    on = run_series(
        values,
        checkpoint.model,
        checkpoint.normalizer,
        progress=True,
        learn=OnlineLearningConfig(enabled=True, seed=seed, **(learn or {})),
    )

    def mse(run: object, lo: int, hi: int) -> float:
        error = run.values[lo:hi] - run.predictions[lo - 1 : hi - 1]  # type: ignore[attr-defined]
        return float(np.mean(error**2))

    mse_before = mse(off, before - 1000, before)
    tail = before + after // 3
    return {
        "mse_before": mse_before,
        "mse_before_on": mse(on, before - 1000, before),
        "mse_after_off": mse(off, tail, before + after),
        "mse_after_on": mse(on, tail, before + after),
        "recovery_samples": recovery_samples(rolling_mse(on), before, 2 * mse_before),
        "recovery_samples_sustained": recovery_samples(
            rolling_mse(on), before, 2 * mse_before, sustained=True
        ),
        "recovery_samples_off": recovery_samples(rolling_mse(off), before, 2 * mse_before),
        "updates": on.learner.stats.updates if on.learner else 0,
        "rollbacks": on.learner.stats.rollbacks if on.learner else 0,
    }


def bench_drift_live(
    learn: bool, rounds: int, streams: int, rate: float, folder: Path, port: int
) -> dict[str, float]:
    """One daemon process (learning off or on) fed the drift signal over a real broker; latency
    is publisher -> forecast received, from the sample's own timestamp."""
    import signal
    import subprocess
    import sys

    import paho.mqtt.client as paho
    import yaml
    from paho.mqtt.enums import CallbackAPIVersion

    from simulators.client import connected_client

    tag = "on" if learn else "off"
    config = folder / f"drift-{tag}.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "mqtt": {
                    "port": port,
                    "client_id": f"bench-drift-{tag}",
                    "qos_in": 0,
                    "input_topics": ["drift/in/{stream}"],
                    "output_topic": "drift/out/{stream}",
                    "status_topic": "drift/status",
                },
                "online_learning": {"enabled": learn},
                "state": {"dir": str(folder / f"state-{tag}")},
                "metrics": {"enabled": False},
            }
        )
    )
    latencies: list[float] = []
    errors: list[tuple[int, float]] = []
    online = threading.Event()

    def on_message(client: paho.Client, userdata: object, message: paho.MQTTMessage) -> None:
        if message.topic == "drift/status":
            if message.payload == b"online":
                online.set()
            return
        now = time.time()
        body = json.loads(message.payload)
        latencies.append(now - body["ts"])
        if body["error"] is not None:
            errors.append((body["seq"], body["error"] ** 2))

    collector = paho.Client(CallbackAPIVersion.VERSION2)
    collector.on_connect = lambda c, *a: c.subscribe([("drift/out/+", 0), ("drift/status", 0)])
    collector.on_message = on_message
    collector.connect("127.0.0.1", port)
    collector.loop_start()
    proc = subprocess.Popen(
        [sys.executable, "-m", "forecaster.cli", "run", "-c", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    publisher = connected_client("127.0.0.1", port, "bench-drift-pub")
    try:
        if not online.wait(30):
            raise RuntimeError("the daemon did not come online")
        time.sleep(0.5)
        values = drift_signal(rounds // 2, rounds - rounds // 2)
        started = time.monotonic()
        for index in tqdm(range(rounds), desc=f"live, learning {tag}", leave=False):
            delay = started + index / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            for s in range(streams):
                body = json.dumps({"value": float(values[index]), "ts": time.time()})
                publisher.publish(f"drift/in/s{s}", body, qos=0)
        deadline = time.monotonic() + 10
        while len(latencies) < rounds * streams and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(15)
        publisher.loop_stop()
        collector.loop_stop()
    after = [e for seq, e in errors if seq > rounds // 2 + rounds // 6]
    return {
        "forecasts": len(latencies),
        "p50_ms": 1000 * float(np.percentile(latencies, 50)),
        "p99_ms": 1000 * float(np.percentile(latencies, 99)),
        "mse_after": float(np.mean(after)) if after else float("nan"),
    }


def bench_drift(
    live: bool = True, rounds: int = 3000, streams: int = 10, rate: float = 100.0
) -> dict[str, object]:
    """Offline figures through the Engine, then the same signal live, learning off and on."""
    import shutil
    import tempfile

    from forecaster.demo import start_broker

    result: dict[str, object] = dict(bench_drift_offline())
    result["signal"] = DRIFT_SIGNAL
    if not live:
        return result
    folder = Path(tempfile.mkdtemp(prefix="forecaster-bench-"))
    broker, port, name = start_broker(folder, "auto")
    try:
        off = bench_drift_live(False, rounds, streams, rate, folder, port)
        on = bench_drift_live(True, rounds, streams, rate, folder, port)
    finally:
        broker.terminate()
        broker.wait(5)
        shutil.rmtree(folder, ignore_errors=True)
    result.update(
        {
            "p99_latency_ms_off": off["p99_ms"],
            "p99_latency_ms_on": on["p99_ms"],
            "p50_latency_ms_off": off["p50_ms"],
            "p50_latency_ms_on": on["p50_ms"],
            "live": {
                "broker": name,
                "streams": streams,
                "samples_per_s": streams * rate,
                "rounds": rounds,
                "off": off,
                "on": on,
            },
        }
    )
    return result


def print_drift(result: dict[str, object], as_json: bool) -> None:
    if as_json:
        print(json.dumps(result))
        return
    r = result
    print(f"drift: {r['signal']}")
    print(f"  offline, MSE before the switch          {r['mse_before']:.4g}")
    print(
        f"  offline, MSE after, learning off        {r['mse_after_off']:.4g}  ({r['mse_after_off'] / r['mse_before']:.1f}x before)"
    )
    print(
        f"  offline, MSE after, learning on         {r['mse_after_on']:.4g}  ({r['mse_after_on'] / r['mse_before']:.2f}x before)"
    )
    print(
        f"  samples until the rolling MSE is back within 2x of before: {r['recovery_samples']}"
        f" (stays there from {r['recovery_samples_sustained']}; learning off: {r['recovery_samples_off']})"
    )
    if "live" in r:
        live = r["live"]
        print(
            f"  live ({live['broker']}, {live['streams']} streams, {live['samples_per_s']:.0f} samples/s):"
        )
        print(
            f"    p99 latency off {r['p99_latency_ms_off']:.2f} ms, on {r['p99_latency_ms_on']:.2f} ms "
            f"(ratio {r['p99_latency_ms_on'] / r['p99_latency_ms_off']:.2f})"
        )


def bench_journal(
    batches: tuple[int, ...] = (1, 16, 256, 4096), repeats: int = 50
) -> dict[str, object]:
    """Cost of journaling one tick (one SQLite transaction) beside the engine tick it guards."""
    import tempfile

    from forecaster.engine import Engine, Sample
    from forecaster.persist import Journal, load_checkpoint

    checkpoint = load_checkpoint()
    engine = Engine(checkpoint.model, checkpoint.normalizer)
    rows = []
    with tempfile.TemporaryDirectory(prefix="forecaster-bench-") as folder:
        journals = {
            sync: Journal(Path(folder) / f"{sync}.sqlite", sync) for sync in ("full", "normal")
        }
        seq = 0
        for size in tqdm(batches, desc="journal", leave=False):
            figures: dict[str, list[float]] = {"full": [], "normal": [], "tick": []}
            for _ in range(repeats):
                seq += 1
                samples = [Sample(f"s{i}", float(np.sin(seq + i)), None, seq) for i in range(size)]
                for sync, journal in journals.items():
                    started = time.perf_counter()
                    journal.append(samples)
                    figures[sync].append(time.perf_counter() - started)
                started = time.perf_counter()
                engine.tick(samples)
                figures["tick"].append(time.perf_counter() - started)
            median = {k: 1000 * statistics.median(v) for k, v in figures.items()}
            rows.append(
                {
                    "batch": size,
                    "journal_full_ms": median["full"],
                    "journal_normal_ms": median["normal"],
                    "tick_ms": median["tick"],
                }
            )
        for journal in journals.values():
            journal.close()
    return {"repeats": repeats, "rows": rows}


def print_journal(result: dict[str, object], as_json: bool) -> None:
    if as_json:
        print(json.dumps(result))
        return
    print("journal: median ms per tick (one transaction), beside the engine tick it guards")
    print(f"  {'batch':>6} {'sync=full':>10} {'sync=normal':>12} {'engine tick':>12}")
    for row in result["rows"]:  # type: ignore[union-attr]
        print(
            f"  {row['batch']:>6} {row['journal_full_ms']:>10.3f} {row['journal_normal_ms']:>12.3f}"
            f" {row['tick_ms']:>12.3f}"
        )
