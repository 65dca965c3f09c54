"""Benchmarks: figures measured side by side in one run (not tests; these machines are noisy)."""

from __future__ import annotations

import json
import statistics
import time
import urllib.request

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


def recovery_samples(rolling: np.ndarray, switch: int, threshold: float) -> int | None:
    """Samples after ``switch`` from which the rolling MSE stays within ``threshold``."""
    above = np.flatnonzero(rolling[switch:] > threshold)
    if len(above) == 0:
        return 0
    last = int(above[-1]) + 1
    return None if switch + last >= len(rolling) else last


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
        "recovery_samples_off": recovery_samples(rolling_mse(off), before, 2 * mse_before),
        "updates": on.learner.stats.updates if on.learner else 0,
        "rollbacks": on.learner.stats.rollbacks if on.learner else 0,
    }
