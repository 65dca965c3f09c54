"""``forecaster bench drift``: learning off vs on across a regime change (offline, then live)."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np

from forecaster.progress import progress_bar

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


def _drift_daemon_config(tag: str, learn: bool, folder: Path, port: int) -> Path:
    import yaml

    config = folder / f"drift-{tag}.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "mqtt": {
                    "port": port,
                    "client_id": f"bench-drift-{tag}",
                    "qos_in": 0,
                    "input_topics": [f"drift-{tag}/in/{{stream}}"],
                    "output_topic": f"drift-{tag}/out/{{stream}}",
                    "status_topic": f"drift-{tag}/status",
                },
                "online_learning": {"enabled": learn},
                "state": {"dir": str(folder / f"state-{tag}")},
                "metrics": {"enabled": False},
            }
        )
    )
    return config


def bench_drift_live(
    rounds: int, streams: int, rate: float, folder: Path, port: int, block: int = 250
) -> dict[str, dict[str, float]]:
    """Two daemon processes, learning off and on, both running the whole time over one real
    broker and fed the same drift signal in alternating blocks of ``block`` rounds, so the load
    of this shared machine falls on both alike. Latency is publisher -> forecast received, from
    the sample's own timestamp."""
    import signal
    import subprocess
    import sys

    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion

    from simulators.client import connected_client

    tags = ("off", "on")
    latencies: dict[str, list[float]] = {tag: [] for tag in tags}
    errors: dict[str, list[tuple[int, float]]] = {tag: [] for tag in tags}
    online = {tag: threading.Event() for tag in tags}

    def on_message(client: paho.Client, userdata: object, message: paho.MQTTMessage) -> None:
        tag, kind = message.topic.split("/")[0].removeprefix("drift-"), message.topic.split("/")[1]
        if kind == "status":
            if message.payload == b"online":
                online[tag].set()
            return
        now = time.time()
        body = json.loads(message.payload)
        latencies[tag].append(now - body["ts"])
        if body["error"] is not None:
            errors[tag].append((body["seq"], body["error"] ** 2))

    collector = paho.Client(CallbackAPIVersion.VERSION2)
    collector.on_connect = lambda c, *a: c.subscribe(
        [(f"drift-{tag}/{kind}", 0) for tag in tags for kind in ("out/+", "status")]
    )
    collector.on_message = on_message
    collector.connect("127.0.0.1", port)
    collector.loop_start()
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "forecaster.cli",
                "run",
                "-c",
                str(_drift_daemon_config(tag, tag == "on", folder, port)),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for tag in tags
    ]
    publisher = connected_client("127.0.0.1", port, "bench-drift-pub")
    try:
        for tag in tags:
            if not online[tag].wait(30):
                raise RuntimeError(f"the daemon with learning {tag} did not come online")
        time.sleep(0.5)
        values = drift_signal(rounds // 2, rounds - rounds // 2)
        schedule = [
            (tag, i)
            for b in range(0, rounds, block)
            for tag in tags
            for i in range(b, min(b + block, rounds))
        ]
        started = time.monotonic()
        for step, (tag, index) in enumerate(
            progress_bar(schedule, desc="live, off/on blocks", leave=False)
        ):
            delay = started + step / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            for s in range(streams):
                body = json.dumps({"value": float(values[index]), "ts": time.time()})
                publisher.publish(f"drift-{tag}/in/s{s}", body, qos=0)
        deadline = time.monotonic() + 10
        while (
            sum(map(len, latencies.values())) < 2 * rounds * streams and time.monotonic() < deadline
        ):
            time.sleep(0.05)
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            proc.wait(15)
        publisher.loop_stop()
        collector.loop_stop()
    result = {}
    for tag in tags:
        after = [e for seq, e in errors[tag] if seq > rounds // 2 + rounds // 6]
        result[tag] = {
            "forecasts": len(latencies[tag]),
            "p50_ms": 1000 * float(np.percentile(latencies[tag], 50)),
            "p99_ms": 1000 * float(np.percentile(latencies[tag], 99)),
            "mse_after": float(np.mean(after)) if after else float("nan"),
        }
    return result


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
        runs = bench_drift_live(rounds, streams, rate, folder, port)
    finally:
        broker.terminate()
        broker.wait(5)
        shutil.rmtree(folder, ignore_errors=True)
    off, on = runs["off"], runs["on"]
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
