"""Benchmarks: figures measured side by side in one run (not tests; these machines are noisy)."""

from __future__ import annotations

import json
import math
import os
import statistics
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import orjson
from prometheus_client import CollectorRegistry

from forecaster.engine import Forecast
from forecaster.errors import ForecasterError
from forecaster.metrics import HttpEndpoint, Metrics
from forecaster.progress import progress_bar
from forecaster.runtime import tune_process


def bench_scrape(streams: int = 5000, cap: int = 100, scrapes: int = 50) -> dict[str, float]:
    """Size and latency of one ``/metrics`` scrape with ``streams`` streams and a label cap."""
    registry = CollectorRegistry()
    metrics = Metrics(registry, stream_label_cap=cap)
    rng = np.random.default_rng(0)
    for _ in progress_bar(range(3), desc=f"feeding {streams} streams", leave=False):
        metrics.observe_forecasts(
            # Every per-stream series is present: error, interval, coverage and anomaly ones.
            Forecast(
                f"sensor-{i:05d}",
                1,
                None,
                v,
                v,
                e,
                e,
                0,
                lower=v - 1,
                upper=v + 1,
                anomaly=0.5,
                covered=abs(e) < 1,
            )
            for i, (v, e) in enumerate(
                zip(
                    rng.normal(size=streams).tolist(),
                    rng.normal(size=streams).tolist(),
                    strict=True,
                )
            )
        )
    endpoint = HttpEndpoint(registry, "127.0.0.1", 0, lambda: (True, ""), lambda: (True, ""))
    endpoint.start()
    url = f"http://127.0.0.1:{endpoint.port}/metrics"
    times, size = [], 0
    try:
        for _ in progress_bar(range(scrapes), desc="scraping", leave=False):
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


# -- engine: the cost of one tick per stream, against a bare nn.RNN call ---------------------------
def _timed(call: object, repeats: int) -> float:
    """Median seconds of ``call()`` over ``repeats`` runs (after one warm-up run)."""
    call()  # type: ignore[operator]
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        call()  # type: ignore[operator]
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def bench_engine(sizes: tuple[int, ...] = (1, 10, 100, 1000, 10_000, 100_000)) -> dict[str, object]:
    """ns per stream-step of ``Engine.tick_batch`` (columns in and out: validation, gather,
    normalise, step, scatter, scoring) and of ``Engine.tick`` (``Sample`` objects in, ``Forecast``
    objects out) for ticks of ``n`` distinct streams, beside a plain ``nn.RNN`` + ``Linear`` call
    over the same batch, so the engine's own overhead is visible."""
    import torch

    from forecaster.engine import Batch, Engine, Sample
    from forecaster.persist import load_checkpoint

    # The daemon's thread count; glibc's mmap threshold stays dynamic: the engine's figure is the
    # same either way, the bare call's is best this way (see ``runtime.tune_process``).
    tune_process(1, allocator=False)
    checkpoint = load_checkpoint()
    model = checkpoint.model.eval()
    rows = []
    for n in progress_bar(sizes, desc="engine sizes", leave=False):
        rng = np.random.default_rng(0)
        names = [f"s{i}" for i in range(n)]
        repeats = max(3, min(200, 200_000 // n))
        # Inputs are built beforehand: the figure is the engine's, not the driver's.
        values = [rng.standard_normal(n) for _ in range(repeats + 1)]
        batches = iter([Batch.of(names, v) for v in values])
        samples = iter(
            [[Sample(s, x) for s, x in zip(names, v.tolist(), strict=True)] for v in values]
        )
        columns, objects = (
            Engine(model, checkpoint.normalizer),
            Engine(model, checkpoint.normalizer),
        )

        def tick_batch(engine: Engine = columns, batches: Iterator[Batch] = batches) -> None:
            engine.tick_batch(next(batches))

        def tick(engine: Engine = objects, samples: Iterator[list[Sample]] = samples) -> None:
            _ = engine.tick(next(samples)).forecasts

        state = model.init_state(n)
        x = torch.randn(n, 1, 1)

        def plain(state: torch.Tensor = state, x: torch.Tensor = x) -> None:
            with torch.inference_mode():
                model(x, state)  # nn.RNN + Linear, nothing else

        batch_s, plain_s = _timed(tick_batch, repeats), _timed(plain, repeats)
        objects_s = _timed(tick, repeats)
        rows.append(
            {
                "streams": n,
                "engine_ns_per_step": 1e9 * batch_s / n,
                "plain_rnn_ns_per_step": 1e9 * plain_s / n,
                "overhead": batch_s / plain_s,
                "stream_steps_per_s": n / batch_s,
                "objects_ns_per_step": 1e9 * objects_s / n,
            }
        )
    return {"cell": model.config.cell, "hidden_size": model.config.hidden_size, "sizes": rows}


def bench_memory(streams: int = 100_000) -> dict[str, float]:
    """Peak RSS of a fresh process that serves ``streams`` active streams through the Engine,
    in ticks of the daemon's largest size (``engine.max_batch``)."""
    import subprocess
    import sys

    from forecaster.config import EngineConfig

    tick = EngineConfig().max_batch

    # VmHWM, not ru_maxrss: Linux carries the parent's ru_maxrss over fork and exec, so a child
    # of a big bench process would report the parent's peak.
    code = (
        "import numpy as np\n"
        "from forecaster.runtime import tune_process; tune_process()  # as run does\n"
        "from forecaster.engine import Batch, Engine\n"
        "from forecaster.persist import load_checkpoint\n"
        "def kb(key='VmHWM'):\n"
        "    return next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith(key))\n"
        "ck = load_checkpoint(); base = kb()\n"
        "e = Engine(ck.model, ck.normalizer)\n"
        f"names = [f's{{i}}' for i in range({streams})]\n"
        "for t in range(3):\n"
        f"    for lo in range(0, len(names), {tick}):\n"
        f"        chunk = names[lo:lo + {tick}]\n"
        "        e.tick_batch(Batch.of(chunk, np.full(len(chunk), float(t))))\n"
        "print(base / 1024, kb() / 1024, len(e.streams), kb('RssFile') / 1024)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split()
    return {
        "streams": int(out[2]),
        "rss_mb_idle": float(out[0]),
        "rss_mb_peak": float(out[1]),
        "rss_mb_file": float(out[3]),  # mapped library pages: clean, shared with the page cache
        "tick": tick,
    }


def print_engine(result: dict[str, object], memory: dict[str, float], as_json: bool) -> None:
    if as_json:
        print(json.dumps({"engine": result, "memory": memory}))
        return
    print(f"engine tick, {result['cell']} hidden {result['hidden_size']}, one thread:")
    print(
        f"  {'streams':>8} {'engine ns/step':>15} {'nn.RNN ns/step':>15} {'overhead':>9}"
        f" {'steps/s':>12} {'objects ns/step':>16}"
    )
    for row in result["sizes"]:  # type: ignore[attr-defined]
        print(
            f"  {row['streams']:>8} {row['engine_ns_per_step']:>15.0f} {row['plain_rnn_ns_per_step']:>15.0f}"
            f" {row['overhead']:>8.1f}x {row['stream_steps_per_s']:>12.0f} {row['objects_ns_per_step']:>16.0f}"
        )
    print(
        f"memory: {memory['streams']} active streams in ticks of {memory['tick']},"
        f" peak RSS {memory['rss_mb_peak']:.0f} MB"
        f" (after loading the model: {memory['rss_mb_idle']:.0f} MB; at the end, mapped library"
        f" files: {memory['rss_mb_file']:.0f} MB)"
    )


# -- throughput: the daemon against a no-model relay on the same broker, same load ---------------
LOAD_IN, LOAD_OUT = "load/in/{stream}", "load/out/{stream}"


def publish_load(port: int, streams: int, count: int, rate: float) -> None:
    """Publisher process: ``count`` JSON samples round-robin over ``streams`` streams, at ``rate``
    messages/s (0: as fast as paho takes them); each carries its send time in ``ts``."""

    def body(i: int) -> str:
        value = math.sin(0.157 * (i // streams))
        return json.dumps({"value": round(value, 6), "ts": time.time()})

    _publish_paced(port, "bench-load", [f"s{i}" for i in range(streams)], count, rate, body)


def _publish_paced(
    port: int, client_id: str, names: list[str], count: int, rate: float, body: Callable[[int], str]
) -> None:
    """Publish ``body(i)`` for i < ``count`` round-robin to ``names``' input topics, at ``rate``
    messages/s (0: as fast as paho takes them)."""
    import paho.mqtt.client as paho

    from simulators.client import connected_client

    client = connected_client("127.0.0.1", port, client_id)
    topics = [LOAD_IN.format(stream=name) for name in names]
    started = time.monotonic()
    for i in range(count):
        if rate > 0:
            delay = started + i / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        payload = body(i)
        while (
            client.publish(topics[i % len(topics)], payload, qos=0).rc == paho.MQTT_ERR_QUEUE_SIZE
        ):
            time.sleep(0.001)
    client.disconnect()
    client.loop_stop()


def device_frame(step: int, size: int) -> str:
    """A device's ``step``-th frame: ``size`` sine readings and the send time."""
    frame: dict[str, float] = {f"r{k}": round(math.sin(0.157 * step + k), 6) for k in range(size)}
    frame["ts"] = time.time()
    return json.dumps(frame)


def profile_frames(frames: int = 1000, size: int = 100, devices: int = 100) -> dict[str, float]:
    """Where the engine thread's time goes on device frames: ``Daemon.step`` under cProfile, fed
    straight from its inbox (no broker; publish and ack are no-ops). Returns microseconds per
    sample spent in each stage (cumulative, profiler overhead included) and in all of ``step``."""
    import cProfile
    import pstats
    import tempfile

    from forecaster.config import Config
    from forecaster.daemon import Daemon
    from forecaster.mqtt import RawMessage

    folder = tempfile.mkdtemp(prefix="forecaster-profile-")
    mqtt = {"frame_topics": ["load/in/{device}"], "output_frames": True, "qos_in": 0}
    config = Config.model_validate(
        {"mqtt": mqtt, "state": {"dir": folder}, "metrics": {"enabled": False}}
    )
    daemon = Daemon(config)
    tune_process(1)
    daemon.engine, checkpoint = daemon._build_engine()
    daemon._replay_journal(checkpoint)
    daemon.link.publish = lambda *args, **kwargs: True  # type: ignore[method-assign]
    daemon.link.ack = lambda batch: None  # type: ignore[method-assign]

    def offer(first: int, count: int) -> None:
        for i in range(first, first + count):
            topic, payload = f"load/in/d{i % devices}", device_frame(i // devices, size)
            daemon.inbox.put(RawMessage(topic, payload.encode(), time.time(), 0))

    def drain() -> None:
        while daemon.step(0.0):
            pass

    offer(0, devices)
    drain()  # every stream exists before the profile
    offer(devices, frames)
    profile = cProfile.Profile()
    profile.runcall(drain)
    stages = {
        "Daemon.step (all)": ("daemon.py", "step"),
        "metrics.observe_columns": ("metrics.py", "observe_columns"),
        "engine.tick_batch": ("engine.py", "tick_batch"),
        "orjson.dumps (forecasts)": ("~", "<orjson.dumps>"),
        "journal append (SQLite)": ("persist.py", "append"),
        "engine.admit (journal seq)": ("engine.py", "admit"),
        "parse_message": ("parse.py", "parse_message"),
        "forecast_bodies": ("daemon.py", "forecast_bodies"),
    }
    cumulative = {
        (Path(file).name, name): ct
        for (file, _, name), (_, _, _, ct, _) in pstats.Stats(profile).stats.items()  # type: ignore[attr-defined]
    }
    daemon.journal.close()  # type: ignore[union-attr]
    samples = frames * size
    return {label: 1e6 * cumulative.get(key, 0.0) / samples for label, key in stages.items()}


def publish_frames(port: int, devices: int, count: int, rate: float, size: int = 100) -> None:
    """Publisher process: ``count`` device frames of ``size`` readings each (``{"r0": .., ...,
    "ts": send time}``), round-robin over ``devices`` devices, at ``rate`` frames/s (0: as fast
    as paho takes them)."""

    def body(i: int) -> str:
        return device_frame(i // devices, size)

    _publish_paced(port, "bench-frames", [f"d{i}" for i in range(devices)], count, rate, body)


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


def _proc_figures(pid: int) -> tuple[float, float]:
    """(CPU seconds so far, peak RSS in MB) of a running process, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return cpu, int(line.split()[1]) / 1024
    return cpu, float("nan")


class _Collector:
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


def _offer(
    collector: _Collector,
    port: int,
    streams: int,
    count: int,
    rate: float,
    publisher: str = "publish_load",
    per_message: int = 1,
) -> dict:
    """Offer ``count`` messages (``per_message`` outputs expected from each); rates are of outputs."""
    import subprocess
    import sys

    collector.reset()
    code = (
        f"from forecaster.bench import {publisher}; {publisher}({port}, {streams}, {count}, {rate})"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    # Nothing new for 5 s: the rest was dropped (a daemon mid-way through one long tick is
    # silent for seconds; a 1 s window cut the one-stream runs short and inflated their CPU/1k).
    deadline, seen, quiet_since = time.monotonic() + 60, -1, time.monotonic()
    while len(collector.times) < count * per_message and time.monotonic() < deadline:
        if len(collector.times) != seen:
            seen, quiet_since = len(collector.times), time.monotonic()
        elif time.monotonic() - quiet_since > 5.0:
            break
        time.sleep(0.25)
    times, latencies = list(collector.times), [x for x in collector.latencies if x == x]
    span = times[-1] - times[0] if len(times) > 1 else math.nan
    return {
        "received": len(times),
        "per_s": (len(times) - 1) / span if span > 0 else math.nan,
        "p50_ms": 1000 * float(np.percentile(latencies, 50)) if latencies else math.nan,
        "p99_ms": 1000 * float(np.percentile(latencies, 99)) if latencies else math.nan,
    }


def _start_target(
    kind: str, port: int, folder: Path, collector: _Collector, frames: bool = False
) -> object:
    import subprocess
    import sys

    import yaml

    if kind == "relay":
        cmd = [sys.executable, "-c", f"from forecaster.bench import run_relay; run_relay({port})"]
        status = "load/status/relay"
    else:
        config = folder / "daemon.yaml"
        config.write_text(
            yaml.safe_dump(
                {
                    "mqtt": {
                        "port": port,
                        "client_id": "bench-daemon",
                        "qos_in": 0,
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
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while status not in collector.online:
        if time.monotonic() > deadline or proc.poll() is not None:
            proc.kill()
            raise RuntimeError(f"the {kind} did not come online")
        time.sleep(0.1)
    time.sleep(0.5)  # subscribed after online
    return proc


def bench_frames(
    port: int, folder: Path, collector: _Collector, size: int = 100, count: int = 1500
) -> dict[str, object]:
    """Device frames of ``size`` readings (100 devices, so 100 x ``size`` streams) offered as fast
    as the publisher goes, to the relay (payload republished) and to the daemon (output frames)."""
    import shutil
    import signal

    figures: dict[str, dict] = {}
    for kind in ("relay", "forecaster"):
        proc = _start_target(kind, port, folder, collector, frames=True)
        try:
            cpu0, _ = _proc_figures(proc.pid)  # type: ignore[attr-defined]
            per = size if kind == "forecaster" else 1
            got = _offer(collector, port, 100, count, 0, "publish_frames", per)
            cpu1, rss = _proc_figures(proc.pid)  # type: ignore[attr-defined]
        finally:
            proc.send_signal(signal.SIGTERM)  # type: ignore[attr-defined]
            proc.wait(30)  # type: ignore[attr-defined]
            shutil.rmtree(folder / "state", ignore_errors=True)
        figures[kind] = {**got, "cpu_s": cpu1 - cpu0, "rss_mb": rss}
    daemon, relay = figures["forecaster"], figures["relay"]
    relay_samples = relay["per_s"] * size
    return {
        "samples_per_frame": size,
        "streams": 100 * size,
        "frames_offered": count,
        "samples_per_s": daemon["per_s"],
        "relay_samples_per_s": relay_samples,
        "ratio": daemon["per_s"] / relay_samples,
        "p50_ms_saturated": daemon["p50_ms"],
        "p99_ms_saturated": daemon["p99_ms"],
        "cpu_s_per_1000": 1000 * daemon["cpu_s"] / max(1, daemon["received"]),
        "rss_mb": daemon["rss_mb"],
        "received": daemon["received"],
        "relay_received": relay["received"] * size,
    }


def bench_throughput(
    sizes: tuple[int, ...] = (1, 100, 1000, 10_000),
    count: int = 20_000,
    seconds: float = 5.0,
    frame_size: int = 100,
    repeats: int = 1,
) -> dict[str, object]:
    """For each stream count: the relay's and the daemon's sustained rate at saturation (and the
    p99 latency there), then p50/p99 latency at half the relay's peak rate, CPU per 1,000 samples
    and peak RSS; the two run one after the other over the same Mosquitto broker.

    With ``repeats`` > 1 the relay-then-daemon pair runs that many times per stream count and
    each figure is the median over the pairs (the ratio: of each pair's own ratio, all listed in
    ``ratios``): on a shared 2-core machine one pair's ratio moved between 0.69 and 1.09."""
    import shutil
    import signal
    import tempfile

    from forecaster.demo import start_broker

    folder = Path(tempfile.mkdtemp(prefix="forecaster-bench-"))
    broker, port, name = start_broker(folder, "mosquitto")
    collector = _Collector(port)
    runs = []
    try:
        for streams in progress_bar(sizes, desc="stream counts", leave=False):
            pairs = []
            for _ in progress_bar(
                range(repeats), desc=f"{streams} streams", leave=False, disable=repeats < 2
            ):
                figures: dict[str, dict] = {}
                for kind in ("relay", "forecaster"):
                    proc = _start_target(kind, port, folder, collector)
                    try:
                        cpu0, _ = _proc_figures(proc.pid)  # type: ignore[attr-defined]
                        broker0, _ = _proc_figures(broker.pid)
                        saturated = _offer(collector, port, streams, max(count, 2 * streams), 0)
                        cpu1, _ = _proc_figures(proc.pid)  # type: ignore[attr-defined]
                        broker1, _ = _proc_figures(broker.pid)
                        peak = (
                            figures["relay"]["saturated"]["per_s"]
                            if kind == "forecaster"
                            else saturated["per_s"]
                        )
                        rate = peak / 2
                        fixed = _offer(collector, port, streams, int(rate * seconds), rate)
                        _, rss = _proc_figures(proc.pid)  # type: ignore[attr-defined]
                    finally:
                        proc.send_signal(signal.SIGTERM)  # type: ignore[attr-defined]
                        proc.wait(30)  # type: ignore[attr-defined]
                        shutil.rmtree(folder / "state", ignore_errors=True)
                    figures[kind] = {
                        "saturated": saturated,
                        "half_peak": fixed,
                        "cpu_s_per_1000": 1000 * (cpu1 - cpu0) / max(1, saturated["received"]),
                        "broker_cpu_s_per_1000": (
                            1000 * (broker1 - broker0) / max(1, saturated["received"])
                        ),
                        "rss_mb": rss,
                    }
                pairs.append(_pair_figures(streams, figures["relay"], figures["forecaster"]))
            run = {
                key: float(np.median([p[key] for p in pairs]))
                for key in pairs[0]
                if key != "streams"
            }
            runs.append({"streams": streams, **run, "ratios": [p["ratio"] for p in pairs]})
        frames = bench_frames(port, folder, collector, frame_size) if frame_size else None
    finally:
        collector.close()
        broker.terminate()
        broker.wait(5)
        shutil.rmtree(folder, ignore_errors=True)
    return {
        "broker": name,
        "messages_per_run": count,
        "repeats": repeats,
        "runs": runs,
        "frames": frames,
    }


def _pair_figures(streams: int, relay: dict, daemon: dict) -> dict[str, float]:
    """One relay run and the daemon run after it, side by side."""
    return {
        "streams": streams,
        "forecaster_per_s": daemon["saturated"]["per_s"],
        "relay_per_s": relay["saturated"]["per_s"],
        "ratio": daemon["saturated"]["per_s"] / relay["saturated"]["per_s"],
        "offered_per_s": relay["saturated"]["per_s"] / 2,
        "p50_ms": daemon["half_peak"]["p50_ms"],
        "p99_ms": daemon["half_peak"]["p99_ms"],
        "p99_ms_saturated": daemon["saturated"]["p99_ms"],
        "relay_p50_ms": relay["half_peak"]["p50_ms"],
        "relay_p99_ms": relay["half_peak"]["p99_ms"],
        "cpu_s_per_1000": daemon["cpu_s_per_1000"],
        "relay_cpu_s_per_1000": relay["cpu_s_per_1000"],
        # Mosquitto's CPU for the same messages: in with the load, out with the daemon's forecasts
        "broker_cpu_s_per_1000": daemon["broker_cpu_s_per_1000"],
        "relay_broker_cpu_s_per_1000": relay["broker_cpu_s_per_1000"],
        "rss_mb": daemon["rss_mb"],
        "relay_rss_mb": relay["rss_mb"],
        "received": daemon["saturated"]["received"],
        "relay_received": relay["saturated"]["received"],
    }


def print_throughput(result: dict[str, object], as_json: bool) -> None:
    if as_json:
        print(json.dumps(result))
        return
    repeats = result.get("repeats", 1)
    medians = f", medians of {repeats} relay-then-daemon pairs" if repeats != 1 else ""
    print(
        f"one sample per message over {result['broker']}; forecaster vs the no-model relay{medians}:"
    )
    print(
        f"  {'streams':>7} {'forecaster/s':>12} {'relay/s':>8} {'ratio':>6} {'p50 ms':>7} {'p99 ms':>7}"
        f" {'p99 sat':>8} {'cpu s/1k':>9} {'relay cpu':>9} {'broker':>7} {'(relay)':>7}"
        f" {'RSS MB':>7}"
    )
    for r in result["runs"]:  # type: ignore[attr-defined]
        print(
            f"  {r['streams']:>7} {r['forecaster_per_s']:>12.0f} {r['relay_per_s']:>8.0f} {r['ratio']:>6.2f}"
            f" {r['p50_ms']:>7.2f} {r['p99_ms']:>7.2f} {r['p99_ms_saturated']:>8.1f}"
            f" {r['cpu_s_per_1000']:>9.3f} {r['relay_cpu_s_per_1000']:>9.3f}"
            f" {r['broker_cpu_s_per_1000']:>7.3f} {r['relay_broker_cpu_s_per_1000']:>7.3f}"
            f" {r['rss_mb']:>7.0f}"
            + (f"  ratios {', '.join(f'{x:.2f}' for x in r['ratios'])}" if repeats != 1 else "")
        )
    print(
        "  (p50/p99 at half the relay's peak rate; p99 sat at saturation; CPU s per 1,000 messages"
        " at saturation: the daemon, the relay, Mosquitto beside each)"
    )
    frames = result.get("frames")
    if frames:
        print(
            f"frames of {frames['samples_per_frame']} samples ({frames['streams']} streams), output"
            f" frames: forecaster {frames['samples_per_s']:.0f} samples/s, relay"
            f" {frames['relay_samples_per_s']:.0f} (ratio {frames['ratio']:.2f}); p50/p99"
            f" {frames['p50_ms_saturated']:.0f}/{frames['p99_ms_saturated']:.0f} ms saturated,"
            f" {frames['cpu_s_per_1000']:.3f} CPU s per 1k samples, {frames['rss_mb']:.0f} MB RSS"
        )


# -- accuracy: the forecaster against the tools a user would pick instead -------------------------
RIVER_MODELS = ("river_snarimax", "river_holtwinters")
FORECASTER_MODELS = ("forecaster", "forecaster_learn", "forecaster_gru", "forecaster_lstm")


class RiverModel:
    """A River forecaster behind the bench's verbs; the last value until it can forecast
    (River's HoltWinters has no level before its first values)."""

    def __init__(self, model: object) -> None:
        self.model = model
        self.last = 0.0

    def forecast(self) -> float:
        try:
            value = float(self.model.forecast(horizon=1)[0])  # type: ignore[attr-defined]
        except (IndexError, TypeError, ZeroDivisionError):
            return self.last
        return value if np.isfinite(value) else self.last

    def learn_one(self, y: float) -> None:
        self.model.learn_one(y)  # type: ignore[attr-defined]
        self.last = y


def river_available() -> bool:
    try:
        import river  # noqa: F401
    except ImportError:
        return False
    return True


def accuracy_models(seed: int = 0, models_dir: Path | None = None) -> dict[str, object]:
    """Name -> factory of a fresh model per file. Every peer's settings are fixed here, the same
    for every file (nothing is tuned per file); those of the smoothers and SNARIMAX are the best
    of a small grid on the NAB developer set (docs/accuracy.md), so the peers get their best shot."""
    import torch

    from forecaster.config import OnlineLearningConfig
    from forecaster.evaluate import (
        DoubleExponentialSmoothing,
        EngineModel,
        LastValue,
        OnlineAR,
        SeasonalHoltWinters,
        SeasonalNaive,
    )
    from forecaster.persist import DEFAULT_CHECKPOINT, load_checkpoint

    folder = models_dir or DEFAULT_CHECKPOINT.parent
    loaded: dict[str, object] = {}

    def engine(file: str, learn: bool = False) -> object:
        def make() -> EngineModel:
            if file not in loaded:  # loaded once, on first use
                loaded[file] = load_checkpoint(folder / file)
            checkpoint = loaded[file]
            torch.manual_seed(seed)
            return EngineModel(
                checkpoint.model,  # type: ignore[attr-defined]
                checkpoint.normalizer,  # type: ignore[attr-defined]
                OnlineLearningConfig(enabled=True, seed=seed) if learn else None,
            )

        return make

    factories: dict[str, object] = {
        "naive": LastValue,
        "ar8_rls": lambda: OnlineAR(p=8, forgetting=0.999),
        "prometheus_des": lambda: DoubleExponentialSmoothing(sf=0.9, tf=0.5),
        # the season found causally (evaluate.SeasonalPeriod), the same way for both peers
        "seasonal_naive": SeasonalNaive,
        "holtwinters_seasonal": SeasonalHoltWinters,
    }
    if river_available():
        from river import linear_model, optim, preprocessing, time_series

        # River's default SGD step (0.01) diverges on several NAB files; 0.001 does not.
        factories["river_snarimax"] = lambda: RiverModel(
            time_series.SNARIMAX(
                p=8,
                d=1,
                q=2,
                regressor=preprocessing.StandardScaler()
                | linear_model.LinearRegression(optimizer=optim.SGD(0.001)),
            )
        )
        factories["river_holtwinters"] = lambda: RiverModel(
            time_series.HoltWinters(alpha=0.7, beta=0.01)
        )
    factories.update(
        {
            "forecaster": engine("default.safetensors"),
            "forecaster_learn": engine("default.safetensors", learn=True),
            "forecaster_gru": engine("gru.safetensors"),
            "forecaster_lstm": engine("lstm.safetensors"),
        }
    )
    return factories


def mean_ranks(mse: dict[str, dict[str, float]], files: list[str]) -> dict[str, float]:
    """Average over ``files`` of each model's rank by MSE (1 = best; ties share the mean rank).

    >>> mean_ranks({"a": {"f": 1.0, "g": 2.0}, "b": {"f": 2.0, "g": 2.0}}, ["f", "g"])
    {'a': 1.25, 'b': 1.75}
    """
    totals = dict.fromkeys(mse, 0.0)
    for name in files:
        for model in mse:
            below = sum(mse[other][name] < mse[model][name] for other in mse)
            tied = sum(mse[other][name] == mse[model][name] for other in mse)
            totals[model] += below + (tied + 1) / 2
    return {model: total / max(1, len(files)) for model, total in totals.items()}


def bench_accuracy(
    data: Path,
    seed: int = 0,
    warmup: float = 0.1,
    plot_dir: Path | None = None,
    only: list[str] | None = None,
    models_dir: Path | None = None,
) -> dict[str, object]:
    """Every model on every CSV under ``data``, one protocol: each series in units of its warm-up
    block (``warmup_zscore``), progressive validation, the warm-up not scored."""

    from forecaster.evaluate import (
        EngineModel,
        progressive,
        read_csv,
        read_timestamps,
        score,
        warmup_zscore,
    )

    tune_process(1)
    paths = sorted(data.rglob("*.csv"))
    if not paths:
        raise ForecasterError(f"{data}: no CSV files")
    factories = accuracy_models(seed, models_dir)
    if only:
        factories = {k: v for k, v in factories.items() if k in only or k == "naive"}
    series = {str(p.relative_to(data)): warmup_zscore(read_csv(p), warmup) for p in paths}
    # The rows' times reach the engine as a sender's ts would (its time-of-day feature reads them)
    stamps = {str(p.relative_to(data)): read_timestamps(p) for p in paths}
    files: dict[str, dict[str, dict[str, float]]] = {name: {} for name in factories}
    predictions: dict[str, dict[str, np.ndarray]] = {}
    total = sum(len(v) for v in series.values()) * len(factories)
    with progress_bar(total=total, desc="bench accuracy", unit="sample", leave=False) as bar:
        for name, values in series.items():
            predictions[name] = {}
            for model, factory in factories.items():
                bar.set_postfix_str(f"{model} on {Path(name).name}")
                peer = factory()  # type: ignore[operator]
                if isinstance(peer, EngineModel):
                    peer.timestamps = stamps[name]
                run = progressive(peer, values, bar)
                scores = score(run, warmup)
                files[model][name] = {
                    "mse": scores.mse,
                    "mae": scores.mae,
                    "rel_mse": scores.mse / scores.naive_mse if scores.naive_mse > 0 else None,
                }
                predictions[name][model] = run.predictions
    scored = [name for name in series if files["naive"][name]["mse"] > 0]
    mse = {model: {name: per[name]["mse"] for name in series} for model, per in files.items()}
    ranks = mean_ranks(mse, scored)
    result: dict[str, object] = {
        "models": {
            model: {
                "geo_rel_mse": float(
                    np.exp(np.mean([np.log(per[name]["rel_mse"]) for name in scored]))
                )
                if scored
                else None,
                "mean_rank": ranks[model],
                "beats_naive": sum(per[name]["rel_mse"] < 1 for name in scored),
                "files": per,
            }
            for model, per in files.items()
        },
        "scored_files": scored,
        "skipped_files": [name for name in series if name not in scored],
        "seed": seed,
        "warmup": warmup,
    }
    if not river_available():
        result["skipped_models"] = {
            name: "river is not installed (pip install 'forecaster[bench]')"
            for name in RIVER_MODELS
        }
    if plot_dir is not None:
        plot_dir.mkdir(parents=True, exist_ok=True)
        for name, values in series.items():
            best = sorted(mse, key=lambda m: mse[m][name])[:2]
            plot_accuracy(values, {m: predictions[name][m] for m in best}, warmup, name, plot_dir)
    return result


def plot_accuracy(
    values: np.ndarray, forecasts: dict[str, np.ndarray], warmup: float, name: str, folder: Path
) -> Path:
    """Actual vs the forecasts of the best models: the whole series and its last 300 samples."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(values)
    t = np.arange(n)
    fig, axes = plt.subplots(2, 1, figsize=(13, 7))
    for ax, lo in zip(axes, (0, max(0, n - 300)), strict=True):
        ax.plot(t[lo:], values[lo:], lw=1.2, color="black", label="actual")
        for model, prediction in forecasts.items():  # forecast of t + 1, drawn at t + 1
            ax.plot(t[lo + 1 :], prediction[lo : n - 1], "--", lw=0.9, label=model)
        ax.set(xlabel="sample", ylabel="value (warm-up z units)")
    start = math.ceil(warmup * n)
    axes[0].axvspan(0, start, color="grey", alpha=0.15, label="warm-up (not scored)")
    axes[0].set_title(f"{name}: actual vs the two best forecasts (lowest MSE)")
    axes[1].set_title("last 300 samples")
    axes[0].legend(loc="upper right")
    fig.tight_layout()
    path = folder / (name.replace("/", "__").removesuffix(".csv") + ".png")
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def shorten(name: str, width: int = 44) -> str:
    """A file's path cut to ``width`` characters, keeping the file name whole where it fits:
    the folder is cut, not the start of the name (``…_utilization_5f5533.csv`` says nothing).

    >>> shorten("realKnownCause/nyc_taxi.csv")
    'realKnownCause/nyc_taxi.csv'
    >>> shorten("realAWSCloudwatch/ec2_cpu_utilization_5f5533.csv", 40)
    'realAWSC…/ec2_cpu_utilization_5f5533.csv'
    >>> shorten("a_very_long_file_name_with_no_folder_at_all.csv", 24)
    'a_very_long_file_na….csv'
    """
    if len(name) <= width:
        return name
    folder, _, base = name.rpartition("/")
    if folder and len(base) + 2 < width:
        return folder[: width - len(base) - 2] + "…/" + base
    stem, dot, ext = base.rpartition(".")
    if not dot or len(ext) + 2 >= width:
        return base[: width - 1] + "…"
    return stem[: width - len(ext) - 2] + "…." + ext


def print_accuracy(result: dict[str, object], as_json: bool) -> None:
    if as_json:
        print(json.dumps(result))
        return
    models: dict[str, dict] = result["models"]  # type: ignore[assignment]
    scored: list[str] = result["scored_files"]  # type: ignore[assignment]
    order = sorted(models, key=lambda m: models[m]["geo_rel_mse"] or math.inf)
    print(
        f"one-step-ahead accuracy on {len(scored)} files (relative MSE = MSE / naive MSE; "
        f"first {result['warmup']:.0%} of each file not scored)"
    )
    print(f"  {'model':<20} {'geo_rel_mse':>11} {'mean_rank':>9} {'beats naive':>11}")
    for model in order:
        m = models[model]
        print(
            f"  {model:<20} {m['geo_rel_mse']:>11.4f} {m['mean_rank']:>9.2f} "
            f"{m['beats_naive']:>6}/{len(scored):<4}"
        )
    print("\nrelative MSE per file (* = lowest MSE on the file)")
    short = {m: m.replace("forecaster", "fc").replace("river_", "r_")[:10] for m in order}
    print(f"  {'file':<44}" + "".join(f" {short[m]:>10}" for m in order))
    for name in scored:
        best = min(order, key=lambda m: models[m]["files"][name]["mse"])
        cells = "".join(
            f" {models[m]['files'][name]['rel_mse']:>9.3f}{'*' if m == best else ' '}"
            for m in order
        )
        print(f"  {shorten(name):<44}{cells}")
    for name in result["skipped_files"]:  # type: ignore[union-attr]
        print(f"  {shorten(name):<44} skipped: naive has zero error")
    for model, why in dict(result.get("skipped_models", {})).items():  # type: ignore[call-overload]
        print(f"  {model}: skipped, {why}")


# -- anomaly: interval coverage and event-level detection on labelled NAB files ----------------------
NAB_PROBATION = 0.15  # NAB's probationary period: the start of each file is not scored
ALARM_GAP = 300  # samples below threshold that separate two alarms (one incident, one alarm)


def alarm_starts(
    score: np.ndarray, threshold: float, start: int, gap: int = ALARM_GAP
) -> list[int]:
    """Samples where an alarm begins: above ``threshold`` after at least ``gap`` samples not
    above it (a flickering incident is one alarm), at or after ``start``.

    >>> alarm_starts(np.array([0.1, 0.99, 0.1, 0.99, 0.1, 0.1, 0.1, 0.99]), 0.9, 0, gap=3)
    [1, 7]
    """
    starts, last = [], -(10**18)
    for t in np.flatnonzero(score > threshold):
        if t - last > gap and t >= start:
            starts.append(int(t))
        last = t
    return starts


def window_index(timestamps: list[str], windows: list[list[str]]) -> np.ndarray:
    """For each sample, the index of the labelled window holding it, else -1 (NAB timestamps
    compare as text: ``YYYY-MM-DD hh:mm:ss``).

    >>> window_index(["2014-01-01 00:00:00", "2014-01-02 00:00:00"],
    ...              [["2014-01-01 12:00:00.000000", "2014-01-03 00:00:00.000000"]]).tolist()
    [-1, 0]
    """
    inside = np.full(len(timestamps), -1)
    stamps = np.array([t[:19] for t in timestamps])
    for index, (begin, end) in enumerate(windows):
        inside[(stamps >= begin[:19]) & (stamps <= end[:19])] = index
    return inside


def read_nab(path: Path) -> tuple[list[str], np.ndarray]:
    import csv

    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    return [r["timestamp"] for r in rows], np.array([float(r["value"]) for r in rows])


def bench_anomaly(
    data: Path,
    out: Path | None = None,
    threshold: float | None = None,
    gap: int = ALARM_GAP,
) -> dict[str, object]:
    """Every labelled NAB file through one Engine (one stream each, stepped together): coverage
    of the interval and event-level precision/recall of ``anomaly > threshold`` after NAB's
    probationary period; with ``out``, NAB-format results files (timestamp,value,anomaly_score).

    A file whose forecasts were exact on every scored sample (NAB's ``art_flatline``: one value
    4,032 times) is listed with its coverage but left out of the coverage figures, the way
    ``bench accuracy`` skips files where naive has zero error: no interval, even of width 0, can
    miss a value forecast exactly, so its 100 % says nothing about calibration."""
    from forecaster.config import Config, scoring_config
    from forecaster.engine import Engine, Sample
    from forecaster.evaluate import parse_timestamps
    from forecaster.persist import load_checkpoint

    config = Config()
    threshold = config.anomaly.threshold if threshold is None else threshold
    labels = json.loads((Path(data) / "labels" / "combined_windows.json").read_text())
    names = sorted(labels)
    series = {name: read_nab(Path(data) / name) for name in names}
    checkpoint = load_checkpoint()
    engine = Engine(checkpoint.model, checkpoint.normalizer, scoring=scoring_config(config))
    streams = {name: f"f{i}" for i, name in enumerate(names)}  # ids may not hold "/"
    covered = {name: np.zeros(len(series[name][1]), dtype=bool) for name in names}
    anomaly = {name: np.zeros(len(series[name][1])) for name in names}
    width = {name: np.zeros(len(series[name][1])) for name in names}
    error = {name: np.zeros(len(series[name][1])) for name in names}
    length = max(len(v) for _, v in series.values())
    # each row's time, as the sender's ts (the time-of-day feature reads it)
    times = {n: parse_timestamps(series[n][0]) for n in names}
    times = {
        n: np.arange(len(series[n][1]), dtype=float) if v is None else v for n, v in times.items()
    }
    by_stream = {s: n for n, s in streams.items()}
    for t in progress_bar(range(length), desc=f"NAB, {len(names)} files", leave=False):
        batch = [
            Sample(streams[n], float(series[n][1][t]), float(times[n][t]))
            for n in names
            if t < len(series[n][1])
        ]
        for forecast in engine.tick(batch).forecasts:
            name = by_stream[forecast.stream]
            covered[name][t] = bool(forecast.covered)
            anomaly[name][t] = forecast.anomaly
            width[name][t] = forecast.upper - forecast.lower
            error[name][t] = forecast.error or 0.0
    files: dict[str, dict[str, object]] = {}
    hits = misses = windows_total = detected_total = false_total = 0
    for name in names:
        stamps, values = series[name]
        start = int(np.ceil(NAB_PROBATION * len(values)))
        inside = window_index(stamps, labels[name])
        scored_windows = sorted(set(inside[start:].tolist()) - {-1})
        detected, false_alarms = set(), 0
        for t in alarm_starts(anomaly[name], threshold, start, gap):
            if inside[t] >= 0:
                detected.add(int(inside[t]))
            else:
                false_alarms += 1
        hit = int(covered[name][start:].sum())
        exact = not np.any(error[name][start:])
        if not exact:
            hits, misses = hits + hit, misses + len(values) - start - hit
        windows_total += len(scored_windows)
        detected_total += len(detected)
        false_total += false_alarms
        files[name] = {
            "samples": len(values) - start,
            "coverage": hit / (len(values) - start),
            "coverage_scored": not exact,
            "mean_width": float(np.mean(width[name][start:])),
            "windows": len(scored_windows),
            "detected": len(detected),
            "false_alarms": false_alarms,
        }
        if out is not None:
            folder = Path(out) / "forecaster" / Path(name).parent
            folder.mkdir(parents=True, exist_ok=True)
            rows = "".join(
                f"{s},{float(v)!r},{float(a)!r}\n"
                for s, v, a in zip(stamps, values, anomaly[name], strict=True)
            )
            target = folder / f"forecaster_{Path(name).name}"
            target.write_text("timestamp,value,anomaly_score\n" + rows)
    found = detected_total + false_total
    scored = [f["coverage"] for f in files.values() if f["coverage_scored"]]
    return {
        "coverage": hits / (hits + misses) if scored else float("nan"),
        "coverage_range": [min(scored), max(scored)] if scored else None,
        "coverage_unscored": [name for name, f in files.items() if not f["coverage_scored"]],
        "precision": detected_total / found if found else float("nan"),
        "recall": detected_total / windows_total if windows_total else float("nan"),
        "threshold": threshold,
        "alarm_gap": gap,
        "target_coverage": config.intervals.coverage,
        "windows": windows_total,
        "detected": detected_total,
        "false_alarms": false_total,
        "files": files,
    }


def print_anomaly(result: dict[str, object], as_json: bool) -> None:
    if as_json:
        print(json.dumps(result))
        return
    r = result
    print(
        f"NAB: coverage of the {r['target_coverage']:.0%} interval and alarms "
        f"(anomaly > {r['threshold']}, one alarm per incident: {r['alarm_gap']} samples apart)"
    )
    for name, f in r["files"].items():  # type: ignore[union-attr]
        note = "" if f["coverage_scored"] else " (not scored: every forecast exact)"
        print(
            f"  {name:58s} coverage {f['coverage']:.3f}  windows {f['detected']}/{f['windows']}"
            f"  false alarms {f['false_alarms']}{note}"
        )
    low, high = r["coverage_range"] or (float("nan"), float("nan"))  # type: ignore[misc]
    print(
        f"  overall coverage {r['coverage']:.3f} (per file {low:.3f}-{high:.3f}); "
        f"recall {r['recall']:.3f} "
        f"({r['detected']}/{r['windows']} windows), precision {r['precision']:.3f} "
        f"({r['false_alarms']} false alarms)"
    )


def bench_journal(
    batches: tuple[int, ...] = (1, 16, 256, 4096),
    repeats: int = 50,
    checkpoint_streams: tuple[int, ...] = (1000, 100_000),
) -> dict[str, object]:
    """Cost of journaling one tick (one SQLite transaction) beside the engine tick it guards, and
    of a checkpoint on and off the engine thread."""
    import tempfile

    from forecaster.engine import Engine, Sample, as_batch
    from forecaster.persist import Journal, load_checkpoint

    tune_process(1)  # the daemon's setting, under which the engine tick beside it runs
    checkpoint = load_checkpoint()
    engine = Engine(checkpoint.model, checkpoint.normalizer)
    rows = []
    with tempfile.TemporaryDirectory(prefix="forecaster-bench-") as folder:
        journals = {
            sync: Journal(Path(folder) / f"{sync}.sqlite", sync) for sync in ("full", "normal")
        }
        seq = 0
        for size in progress_bar(batches, desc="journal", leave=False):
            figures: dict[str, list[float]] = {"full": [], "normal": [], "tick": []}
            for _ in range(repeats):
                seq += 1
                samples = [Sample(f"s{i}", float(np.sin(seq + i)), None, seq) for i in range(size)]
                batch = as_batch(samples)[0]
                for sync, journal in journals.items():
                    started = time.perf_counter()
                    journal.append(batch)
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
        checkpoints = [
            bench_checkpoint(n, Path(folder))
            for n in progress_bar(checkpoint_streams, desc="checkpoint", leave=False)
        ]
    return {"repeats": repeats, "rows": rows, "checkpoint": checkpoints}


def bench_checkpoint(streams: int, folder: Path, repeats: int = 3) -> dict[str, float]:
    """A daemon checkpoint of ``streams`` streams: the copy on the engine thread, the write behind
    it, and the longest the engine thread waited for the GIL while the write ran (best of
    ``repeats``)."""
    import threading

    from forecaster.engine import Batch, Engine
    from forecaster.persist import load_checkpoint, snapshot

    checkpoint = load_checkpoint()
    engine = Engine(checkpoint.model, checkpoint.normalizer)
    names = [f"s{i}" for i in range(streams)]
    engine.tick_batch(Batch.of(names, np.sin(np.arange(streams))))
    copy_s, write_s, pause_s = [], [], []
    for _ in range(repeats):
        started = time.perf_counter()
        table = engine.streams
        data = snapshot(
            engine.model,
            engine.normalizer_config,
            stream_names=list(table.names),
            stream_arrays=table.arrays(),
        )
        copy_s.append(time.perf_counter() - started)
        writer = threading.Thread(target=data.write, args=(folder / "checkpoint.safetensors",))
        started = last = time.perf_counter()
        writer.start()
        longest = 0.0
        while writer.is_alive():  # the engine thread's view: ~1 ms of work between looks
            time.sleep(0.001)
            now = time.perf_counter()
            longest, last = max(longest, now - last), now
        writer.join()
        write_s.append(time.perf_counter() - started)
        pause_s.append(longest)
    return {
        "streams": streams,
        "copy_ms": 1000 * min(copy_s),
        "write_ms": 1000 * min(write_s),
        "longest_pause_ms": 1000 * min(pause_s),
        "mb": (folder / "checkpoint.safetensors").stat().st_size / 1e6,
    }


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
    print("checkpoint: copy on the engine thread, write (and fsync) on a background thread")
    print(
        f"  {'streams':>8} {'MB':>6} {'copy ms':>8} {'write ms':>9} {'longest engine pause ms':>24}"
    )
    for row in result["checkpoint"]:  # type: ignore[union-attr]
        print(
            f"  {row['streams']:>8} {row['mb']:>6.1f} {row['copy_ms']:>8.1f} {row['write_ms']:>9.1f}"
            f" {row['longest_pause_ms']:>24.1f}"
        )
