"""Benchmarks: figures measured side by side in one run (not tests; these machines are noisy)."""

from __future__ import annotations

import json
import math
import statistics
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
from prometheus_client import CollectorRegistry
from tqdm import tqdm

from forecaster.engine import Forecast
from forecaster.errors import ForecasterError
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
    of a small grid on the NAB developer set (README), so the peers get their best shot."""
    import torch

    from forecaster.config import OnlineLearningConfig
    from forecaster.evaluate import DoubleExponentialSmoothing, EngineModel, LastValue, OnlineAR
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
    import torch

    from forecaster.evaluate import progressive, read_csv, score, warmup_zscore

    torch.set_num_threads(1)
    paths = sorted(data.rglob("*.csv"))
    if not paths:
        raise ForecasterError(f"{data}: no CSV files")
    factories = accuracy_models(seed, models_dir)
    if only:
        factories = {k: v for k, v in factories.items() if k in only or k == "naive"}
    series = {str(p.relative_to(data)): warmup_zscore(read_csv(p), warmup) for p in paths}
    files: dict[str, dict[str, dict[str, float]]] = {name: {} for name in factories}
    predictions: dict[str, dict[str, np.ndarray]] = {}
    total = sum(len(v) for v in series.values()) * len(factories)
    with tqdm(total=total, desc="bench accuracy", unit="sample", leave=False) as bar:
        for name, values in series.items():
            predictions[name] = {}
            for model, factory in factories.items():
                bar.set_postfix_str(f"{model} on {Path(name).name}")
                run = progressive(factory(), values, bar)  # type: ignore[operator]
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
        print(f"  {name[-44:]:<44}{cells}")
    for name in result["skipped_files"]:  # type: ignore[union-attr]
        print(f"  {name[-44:]:<44} skipped: naive has zero error")
    for model, why in dict(result.get("skipped_models", {})).items():  # type: ignore[call-overload]
        print(f"  {model}: skipped, {why}")
