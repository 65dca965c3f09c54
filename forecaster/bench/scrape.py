"""``forecaster bench scrape``: size and latency of one /metrics scrape."""

from __future__ import annotations

import json
import statistics
import time
import urllib.request

import numpy as np
from prometheus_client import CollectorRegistry

from forecaster.metrics import Metrics
from forecaster.progress import progress_bar
from forecaster.records import Forecast
from forecaster.web import HttpEndpoint


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
