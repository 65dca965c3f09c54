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
