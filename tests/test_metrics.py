"""Metrics: exact values against a fresh registry, and end to end through a real Prometheus."""

from __future__ import annotations

import json
import math
import subprocess
import time
import urllib.parse
import urllib.request
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import yaml
from prometheus_client import CollectorRegistry

from forecaster.collectors import fold
from forecaster.metrics import OTHER, Metrics
from forecaster.records import Forecast

ROOT = Path(__file__).resolve().parents[1]


def forecast(
    stream: str, value: float, prediction: float, error: float | None, naive: float | None
) -> Forecast:
    return Forecast(stream, 1, None, value, prediction, error, naive, 0)


def test_exact_values_for_known_forecasts() -> None:
    registry = CollectorRegistry()
    metrics = Metrics(registry, stream_label_cap=2, error_halflife=1.0)  # alpha = 0.5
    metrics.observe_forecasts(
        [
            forecast("a", 1.0, 1.5, None, None),
            forecast("a", 2.0, 2.5, 0.5, 1.0),
            forecast("a", 2.0, 2.0, -0.5, 0.0),
            forecast("b", 7.0, 7.0, 2.0, 4.0),
            forecast("c", 9.0, 9.0, 3.0, 3.0),  # beyond the cap of 2: folded into _other
            forecast("d", 9.0, 9.0, 1.0, 1.0),
        ]
    )
    get = registry.get_sample_value
    assert get("forecaster_stream_samples_total", {"stream": "a"}) == 3
    assert get("forecaster_stream_samples_total", {"stream": OTHER}) == 2
    assert get("forecaster_stream_last_value", {"stream": "a"}) == 2.0
    assert get("forecaster_stream_last_prediction", {"stream": "a"}) == 2.0
    assert get("forecaster_stream_last_value", {"stream": "c"}) is None
    # a: first error 0.5 (plain average), then weight max(0.5, 1/2) = 0.5: 0.5 + 0.5 * (0.5 - 0.5)
    assert get("forecaster_stream_mae", {"stream": "a"}) == 0.5
    assert get("forecaster_stream_rmse", {"stream": "a"}) == 0.5
    assert get("forecaster_stream_naive_mae", {"stream": "a"}) == 0.5  # 1.0, then 1 + 0.5 * (0 - 1)
    assert get("forecaster_stream_skill", {"stream": "b"}) == 1 - 4.0 / 16.0
    assert get("forecaster_stream_mae", {"stream": OTHER}) == 2.0  # 3, then 3 + 0.5 * (1 - 3)
    assert get("forecaster_abs_error_count") == 5
    assert get("forecaster_abs_error_sum") == 0.5 + 0.5 + 2 + 3 + 1


def test_link_events_and_fixed_reason_labels() -> None:
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    metrics.connected(True)
    metrics.reconnected()
    metrics.dropped("queue_full")
    metrics.callback_error("on_message")
    get = registry.get_sample_value
    assert get("forecaster_broker_connected") == 1
    assert get("forecaster_reconnects_total") == 1
    assert get("forecaster_messages_dropped_total", {"reason": "queue_full"}) == 1
    assert get("forecaster_callback_errors_total", {"callback": "on_message"}) == 1
    assert get("forecaster_samples_rejected_total", {"reason": "non_finite"}) == 0  # pre-declared
    metrics.connected(False)
    assert get("forecaster_broker_connected") == 0


def test_no_metric_ever_takes_a_non_finite_value() -> None:
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    metrics.observe_forecasts([forecast("a", 1.0, float("inf"), float("nan"), 1.0)])
    metrics.observe_forecasts([forecast("a", 1.0, 1e308, 1e308, 1e308)])
    for family in registry.collect():
        for sample in family.samples:
            assert math.isfinite(sample.value), sample


def rolling_mean(values: list[float], alpha: float, mean: float = 0.0, seen: int = 0) -> float:
    """The rolling statistics' definition, one value at a time: a plain average while 1/n is
    above alpha, then an EWMA."""
    for n, x in enumerate(values, seen + 1):
        mean += max(alpha, 1.0 / n) * (x - mean)
    return mean


@pytest.mark.parametrize("alpha", [0.5, 0.05, 0.001])
def test_fold_of_a_tick_equals_one_value_at_a_time(alpha: float) -> None:
    """Ticks fold each label's rows at once (labels repeat within a tick, as _other does);
    the result is the one-at-a-time definition's, tick after tick."""
    rng = np.random.default_rng(7)
    labels = 5
    means, counts = np.zeros((labels, 2)), np.zeros(labels, dtype=np.int64)
    history: list[list[np.ndarray]] = [[] for _ in range(labels)]
    for _ in range(30):
        size = int(rng.integers(1, 40))
        rows = rng.integers(0, labels, size)
        x = rng.normal(3.0, 2.0, (size, 2))
        fold(means, counts, rows, x, alpha)
        for row, values in zip(rows.tolist(), x, strict=True):
            history[row].append(values)
        for row in range(labels):
            assert counts[row] == len(history[row])
            for column in range(2):
                want = rolling_mean([v[column] for v in history[row]], alpha)
                assert means[row, column] == pytest.approx(want, rel=1e-9, abs=1e-12)


# -- the shipped Prometheus files and a real Prometheus server -----------------------------------
def test_promtool_accepts_the_shipped_files() -> None:
    folder = ROOT / "configs" / "prometheus"
    for args in (
        ["check", "config", str(folder / "prometheus.yml")],
        ["check", "rules", str(folder / "alerts.yml")],
    ):
        result = subprocess.run(["promtool", *args], capture_output=True, text=True)
        assert result.returncode == 0, result.stdout + result.stderr


class Prometheus:
    def __init__(self, folder: Path, target: str) -> None:
        from tests.conftest import free_port, wait_port

        shipped = yaml.safe_load((ROOT / "configs" / "prometheus" / "prometheus.yml").read_text())
        shipped["global"]["scrape_interval"] = "1s"
        shipped["global"]["evaluation_interval"] = "1s"
        job = shipped["scrape_configs"][0]
        job["scrape_interval"] = "1s"
        job["static_configs"][0]["targets"] = [target]
        (folder / "alerts.yml").write_text(
            (ROOT / "configs" / "prometheus" / "alerts.yml").read_text()
        )
        (folder / "prometheus.yml").write_text(yaml.safe_dump(shipped))
        self.port = free_port()
        self.proc = subprocess.Popen(
            [
                "prometheus",
                f"--config.file={folder / 'prometheus.yml'}",
                f"--storage.tsdb.path={folder / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=open(folder / "prometheus.log", "wb"),  # noqa: SIM115
        )
        wait_port(self.port, timeout=30)
        # The port opens before the server is ready (queries answer 503 until then).
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/-/ready", timeout=5):
                    break
            except (urllib.error.URLError, ConnectionError):
                assert time.monotonic() < deadline, "Prometheus never became ready"
                time.sleep(0.2)

    def query(self, expr: str, at: float | None = None) -> dict:
        params = {"query": expr}
        if at is not None:
            params["time"] = f"{at:.3f}"
        url = f"http://127.0.0.1:{self.port}/api/v1/query?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as exc:
            return json.loads(exc.read())

    def by_stream(self, expr: str, at: float | None = None) -> dict[str, float]:
        result = self.query(expr, at)
        assert result["status"] == "success", result
        return {
            r["metric"].get("stream", ""): float(r["value"][1]) for r in result["data"]["result"]
        }

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def test_end_to_end_through_a_real_prometheus(
    broker, prefix: str, tmp_path: Path, publisher
) -> None:
    import threading

    from simulators.sine import SineSpec, SineStreams, publish_sine
    from tests.conftest import Collector
    from tests.helpers import RunningDaemon, daemon_config, wait_until

    with (
        Collector(broker, f"{prefix}/forecasts/+") as collector,
        RunningDaemon(
            daemon_config(broker, prefix, tmp_path / "state", metrics={"error_halflife": 20})
        ) as running,
    ):
        prom = Prometheus(tmp_path, f"127.0.0.1:{running.daemon.http.port}")
        try:
            deadline = time.monotonic() + 30
            while prom.by_stream('up{job="forecaster"}').get("") != 1.0:
                assert time.monotonic() < deadline, "Prometheus never scraped the daemon"
                time.sleep(0.2)
            rate = 20.0
            stop = threading.Event()
            sim = threading.Thread(
                target=publish_sine,
                args=(publisher, SineStreams(SineSpec(streams=3, seed=2))),
                kwargs={
                    "rate": rate,
                    "count": None,
                    "topic": f"{prefix}/sensors/{{stream}}/value",
                    "qos": 1,
                    "stop": stop,
                },
            )
            sim.start()
            # 8 s of samples at the nominal rate have been forecast (a loaded machine takes longer)
            wait_until(
                lambda: len(collector.json()) >= 3 * 8 * rate, "8 s of forecasts", timeout=60
            )
            mid_run = time.time() - 1.0
            stop.set()
            sim.join(5)

            def scraped_all() -> bool:  # Prometheus has a scrape taken after the last forecast
                counts = prom.by_stream("forecaster_stream_samples_total")
                seen = Counter(f["stream"] for f in collector.json())
                return len(seen) == 3 and all(counts.get(k) == n for k, n in seen.items())

            wait_until(scraped_all, "a scrape after the last sample", timeout=30)
            forecasts = collector.json()
            streams = sorted({f["stream"] for f in forecasts})
            assert len(streams) == 3

            mae = prom.by_stream("forecaster_stream_mae")
            # A rate over a window of the run evaluates per stream (its value is a timing: the
            # rates themselves are not checked here, ``forecaster bench`` measures those).
            rates = prom.by_stream("rate(forecaster_stream_samples_total[8s])", at=mid_run)
            for stream in streams:
                mine = [f for f in forecasts if f["stream"] == stream]
                alpha = 1 - 0.5 ** (1 / 20)
                errors = [abs(f["error"]) for f in mine[1:]]  # the first had no forecast before
                assert mae[stream] == pytest.approx(rolling_mean(errors, alpha), rel=0.10)
                assert rates[stream] > 0

            # Every PromQL expression of the dashboard evaluates without error against this server.
            dashboard = json.loads((ROOT / "configs" / "grafana" / "forecaster.json").read_text())
            exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
            assert len(exprs) >= 10
            for expr in exprs:
                concrete = expr.replace("$stream", ".*").replace("$__rate_interval", "1m")
                result = prom.query(concrete)
                assert result["status"] == "success", (expr, result)
            # The alert rules load and evaluate (the rules API lists them as healthy).
            with urllib.request.urlopen(
                f"http://127.0.0.1:{prom.port}/api/v1/rules", timeout=10
            ) as r:
                rules = json.loads(r.read())["data"]["groups"][0]["rules"]
            assert {rule["name"] for rule in rules} >= {
                "ForecasterDown",
                "ForecasterSkillBelowZero",
            }
            assert all(rule["health"] in ("ok", "unknown") for rule in rules), rules
        finally:
            prom.stop()
