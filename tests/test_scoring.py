"""Calibrated intervals and anomaly scores: coverage, adaptation, spikes, restarts, the daemon."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import orjson
import pytest
from prometheus_client import CollectorRegistry

from forecaster.bench.anomaly import alarm_starts, bench_anomaly
from forecaster.engine import Engine
from forecaster.metrics import OTHER, Metrics
from forecaster.outbox import forecast_bodies
from forecaster.persist import load_checkpoint
from forecaster.records import Forecast, Sample
from forecaster.scoring import ScoringConfig, normal_cdf
from simulators.signals import sine_wave
from tests.conftest import Broker, Collector
from tests.helpers import RunningDaemon, daemon_config, metric_value, restarted, wait_until

ROOT = Path(__file__).resolve().parents[1]
WARMUP = 500  # samples per stream not judged (normaliser, hidden state and tracker settling)


def replay(series: np.ndarray, engine: Engine | None = None) -> dict[str, np.ndarray]:
    """Run ``series (streams, T)`` through the shipped model, all streams in each tick."""
    if engine is None:
        checkpoint = load_checkpoint()
        engine = Engine(checkpoint.model, checkpoint.normalizer)
    n_streams, length = series.shape
    out = {k: np.full((n_streams, length), np.nan) for k in ("lower", "upper", "anomaly", "pred")}
    out["covered"] = np.zeros((n_streams, length), dtype=bool)
    for t in range(length):
        forecasts = engine.tick([Sample(f"s{i}", float(series[i, t])) for i in range(n_streams)])
        for i, f in enumerate(forecasts.forecasts):
            out["lower"][i, t], out["upper"][i, t] = f.lower, f.upper
            out["anomaly"][i, t], out["pred"][i, t] = f.anomaly, f.prediction
            out["covered"][i, t] = bool(f.covered)
    return out


def coverage_by_hand(series: np.ndarray, out: dict[str, np.ndarray]) -> np.ndarray:
    """Whether each value fell inside the interval published one step before it."""
    inside = (series[:, 1:] >= out["lower"][:, :-1]) & (series[:, 1:] <= out["upper"][:, :-1])
    return np.concatenate([np.zeros((len(series), 1), dtype=bool), inside], axis=1)


def test_stationary_noisy_sine_is_covered_at_the_target_rate() -> None:
    series = np.stack([sine_wave(4000, noise=0.1, seed=seed) for seed in range(4)])
    out = replay(series)
    covered = coverage_by_hand(series, out)
    np.testing.assert_array_equal(covered[:, 1:], out["covered"][:, 1:])
    rates = covered[:, WARMUP:].mean(axis=1)
    assert np.all((rates >= 0.88) & (rates <= 0.92)), rates
    assert np.all(out["lower"] <= out["pred"]) and np.all(out["pred"] <= out["upper"])
    # Calibrated, not just wide: the half-width is close to the Gaussian 90% quantile of the noise.
    half = (out["upper"] - out["lower"])[:, WARMUP:] / 2
    assert 0.12 < float(np.median(half)) < 0.25  # 1.645 x sigma 0.1 (plus the model's own error)


def test_a_constant_start_does_not_leave_the_interval_too_narrow() -> None:
    # The first tracked errors are exactly 0 (a constant is forecast exactly), as at the start of
    # NAB's art_daily_* files; the interval must still be calibrated 500 samples into the signal.
    series = np.stack(
        [
            np.concatenate([np.full(50, 5.0), 5.0 + sine_wave(3000, noise=0.1, seed=seed)])
            for seed in range(3)
        ]
    )
    rates = replay(series)["covered"][:, 50 + WARMUP :].mean(axis=1)
    assert np.all((rates >= 0.88) & (rates <= 0.92)), rates


def test_normal_cdf_matches_the_standard_library_in_both_tails() -> None:
    x = np.linspace(-8.0, 8.0, 1601)
    # Phi(-|x|) from math.erfc (NormalDist.cdf goes through erf and loses the far lower tail).
    lower = np.array([0.5 * math.erfc(abs(v) / math.sqrt(2.0)) for v in x])
    for got in (normal_cdf(x), np.concatenate([normal_cdf(v[None]) for v in x])):
        tail = np.where(x >= 0, 1.0 - got, got)
        inner = np.abs(x) < 5  # 1 - Phi keeps ~11 digits at most above 5 sigma
        np.testing.assert_allclose(got[x <= 0], lower[x <= 0], rtol=1e-12)
        np.testing.assert_allclose(tail[inner], lower[inner], rtol=1e-9)


@pytest.mark.parametrize(("before", "after"), [(0.1, 0.3), (0.3, 0.1)])
def test_coverage_returns_to_the_band_within_1000_samples_of_a_noise_change(
    before: float, after: float
) -> None:
    switch, length = 2000, 5000
    series = np.stack(
        [
            np.concatenate(
                [
                    sine_wave(length, noise=before, seed=seed)[:switch],
                    sine_wave(length, noise=after, seed=seed + 10)[switch:],
                ]
            )
            for seed in range(3)
        ]
    )
    covered = replay(series)["covered"]
    settled = covered[:, switch + 1000 :].mean(axis=1)
    assert np.all((settled >= 0.88) & (settled <= 0.92)), settled
    # The change did disturb it (so the test is not trivially passed by a too-wide interval).
    disturbed = covered[:, switch : switch + 100].mean(axis=1)
    assert np.all(np.abs(disturbed - 0.9) > 0.04), disturbed


@pytest.mark.parametrize("at", [3000, 3010, 3030])  # a zero crossing, a peak, a trough
def test_an_8_sigma_spike_scores_above_099(at: int) -> None:
    sigma = 0.1
    series = np.stack([sine_wave(3100, noise=sigma, seed=s) for s in range(3)])
    series[:, at] += 8 * sigma
    anomaly = replay(series)["anomaly"]
    assert np.all(anomaly[:, at] > 0.99), anomaly[:, at]
    assert np.all(anomaly[:, at - 1] < 0.99)  # the score reacts to the spike, not before it


def test_clean_sines_stay_below_09_for_99_percent_after_warmup() -> None:
    series = np.stack(
        [
            sine_wave(3000),
            sine_wave(3000, freq_scale=0.5),
            sine_wave(3000, freq_scale=2.0),
            sine_wave(3000, amplitude=1000, offset=5000),
        ]
    )
    anomaly = replay(series)["anomaly"]
    calm = (anomaly[:, WARMUP:] < 0.9).mean(axis=1)
    assert np.all(calm >= 0.99), calm


def test_a_level_shift_keeps_scoring_after_the_forecaster_has_followed_it() -> None:
    """The one-step error is back to normal a few samples after a shift; the level is not."""
    series = np.stack([sine_wave(3000, noise=0.1, seed=s) for s in range(2)])
    series[:, 2500:] += 5.0  # the level moves by 7 standard deviations of the stream and stays
    out = replay(series)
    after = slice(2550, 2600)  # 50 samples after the shift, for 50 samples
    error = np.abs(series[:, after] - out["pred"][:, 2549:2599])
    assert np.all(error.mean(axis=1) < 0.3)  # the forecaster follows the new level...
    assert np.all(out["anomaly"][:, after] > 0.99)  # ...the score stays up (error part alone: ~0.4)


def test_warmup_score_is_half_and_everything_stays_finite() -> None:
    config = ScoringConfig()
    checkpoint = load_checkpoint()
    engine = Engine(checkpoint.model, checkpoint.normalizer, scoring=config)
    values = np.concatenate([[5.0] * 50, sine_wave(400, amplitude=100, seed=1)])
    forecasts = [engine.tick([Sample("x", float(v))]).forecasts[0] for v in values]
    assert forecasts[0].covered is None and forecasts[1].covered is not None
    warm = config.warmup + config.anomaly_warmup  # untracked samples, then tracked ones
    assert all(f.anomaly == 0.5 for f in forecasts[:warm])
    assert any(f.anomaly != 0.5 for f in forecasts[warm:])
    for f in forecasts:
        assert all(math.isfinite(x) for x in (f.lower, f.upper, f.anomaly))
        assert f.lower <= f.prediction <= f.upper and 0.0 <= f.anomaly <= 1.0


def test_checkpoint_restart_continues_intervals_and_scores_exactly(tmp_path: Path) -> None:
    series = np.stack([sine_wave(900, noise=0.1, seed=s) for s in range(2)])
    series[0, 800] += 1.0
    whole = replay(series)
    checkpoint = load_checkpoint()
    first = Engine(checkpoint.model, checkpoint.normalizer)
    replay(series[:, :600], first)
    second = restarted(first, tmp_path / "c.safetensors")
    rest = replay(series[:, 600:], second)
    for key in ("lower", "upper", "anomaly", "covered"):
        np.testing.assert_array_equal(rest[key][:, 1:], whole[key][:, 601:], err_msg=key)


def _forecast(stream: str, covered: bool | None, width: float, anomaly: float) -> Forecast:
    half = width / 2
    return Forecast(
        stream,
        1,
        None,
        1.0,
        1.0,
        0.1,
        0.1,
        0,
        lower=1.0 - half,
        upper=1.0 + half,
        anomaly=anomaly,
        covered=covered,
    )


def test_interval_and_anomaly_metrics_respect_the_label_cap() -> None:
    registry = CollectorRegistry()
    metrics = Metrics(registry, stream_label_cap=1, coverage_halflife=1e9, anomaly_threshold=0.99)
    metrics.observe_forecasts(
        [
            _forecast("a", None, 2.0, 0.5),
            _forecast("a", True, 2.0, 0.5),
            _forecast("a", True, 4.0, 0.999),
            _forecast("a", False, 6.0, 0.2),
            _forecast("b", True, 1.0, 0.995),
            _forecast("c", False, 3.0, 0.995),
        ]
    )

    def value(name: str, stream: str) -> float | None:
        return registry.get_sample_value(name, {"stream": stream})

    assert value("forecaster_stream_interval_coverage", "a") == pytest.approx(2 / 3)
    assert value("forecaster_stream_interval_width", "a") == pytest.approx(4.0)
    assert value("forecaster_stream_anomaly_score", "a") == 0.2
    assert value("forecaster_stream_last_lower", "a") == pytest.approx(-2.0)
    assert value("forecaster_stream_last_upper", "a") == pytest.approx(4.0)
    assert value("forecaster_stream_anomalies_total", "a") == 1
    # b and c are folded into _other: aggregated, no last-value gauges.
    assert value("forecaster_stream_interval_coverage", OTHER) == pytest.approx(0.5)
    assert value("forecaster_stream_anomalies_total", OTHER) == 2
    assert value("forecaster_stream_anomaly_score", OTHER) is None
    assert value("forecaster_stream_interval_coverage", "b") is None


def _write_nab(folder: Path, spike_at: int, length: int = 1500) -> dict:
    """Two NAB-format files: one with a labelled window around a big jump, one with none."""
    (folder / "labels").mkdir(parents=True)
    (folder / "cat").mkdir()
    stamps = [
        f"2014-01-{1 + t // 288:02d} {t % 288 // 12:02d}:{t % 12 * 5:02d}:00" for t in range(length)
    ]  # 5-minute samples
    labels = {}
    for name, jump in (("cat/jump.csv", True), ("cat/calm.csv", False)):
        values = sine_wave(length, amplitude=10, offset=50, noise=0.5, seed=len(name))
        if jump:
            values[spike_at:] += 60.0
        rows = "".join(f"{s},{v}\n" for s, v in zip(stamps, values, strict=True))
        (folder / name).write_text("timestamp,value\n" + rows)
        labels[name] = (
            [[stamps[spike_at - 50] + ".000000", stamps[spike_at + 50] + ".000000"]] if jump else []
        )
    (folder / "labels" / "combined_windows.json").write_text(json.dumps(labels))
    return labels


def test_bench_anomaly_scores_a_labelled_jump_and_writes_nab_results(tmp_path: Path) -> None:
    _write_nab(tmp_path / "nab", spike_at=1200)
    result = bench_anomaly(tmp_path / "nab", tmp_path / "results")
    jump, calm = result["files"]["cat/jump.csv"], result["files"]["cat/calm.csv"]
    assert (jump["windows"], jump["detected"]) == (1, 1)
    assert calm["windows"] == 0
    assert result["recall"] == 1.0
    assert result["precision"] == 1 / (1 + result["false_alarms"])
    assert 0.85 < calm["coverage"] < 0.95
    written = (tmp_path / "results" / "forecaster" / "cat" / "forecaster_jump.csv").read_text()
    lines = written.splitlines()
    assert lines[0] == "timestamp,value,anomaly_score" and len(lines) == 1501
    scores = np.array([float(line.split(",")[2]) for line in lines[1:]])
    assert scores[:100].tolist() == [0.5] * 100 and scores[1200] > result["threshold"]


def test_bench_anomaly_leaves_an_exactly_forecast_file_out_of_the_coverage(tmp_path: Path) -> None:
    labels = _write_nab(tmp_path / "nab", spike_at=900, length=1000)
    stamps = (tmp_path / "nab" / "cat" / "calm.csv").read_text().splitlines()[1:]
    rows = "".join(f"{line.split(',')[0]},45.0\n" for line in stamps)
    (tmp_path / "nab" / "cat" / "flat.csv").write_text("timestamp,value\n" + rows)
    labels["cat/flat.csv"] = []
    (tmp_path / "nab" / "labels" / "combined_windows.json").write_text(json.dumps(labels))
    result = bench_anomaly(tmp_path / "nab")
    flat, calm = result["files"]["cat/flat.csv"], result["files"]["cat/calm.csv"]
    assert flat["coverage"] == 1.0 and not flat["coverage_scored"]
    assert calm["coverage_scored"] and result["coverage_unscored"] == ["cat/flat.csv"]
    scored = [result["files"][name] for name in ("cat/calm.csv", "cat/jump.csv")]
    pooled = sum(f["coverage"] * f["samples"] for f in scored) / sum(f["samples"] for f in scored)
    assert result["coverage"] == pytest.approx(pooled)
    assert result["coverage_range"] == [
        min(f["coverage"] for f in scored),
        max(f["coverage"] for f in scored),
    ]


def test_bench_anomaly_command_prints_json(tmp_path: Path) -> None:
    _write_nab(tmp_path / "nab", spike_at=1000, length=1100)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "forecaster.cli",
            "bench",
            "anomaly",
            "--data",
            str(tmp_path / "nab"),
            "--json",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert {"coverage", "precision", "recall", "files"} <= set(result)
    assert set(result["files"]) == {"cat/jump.csv", "cat/calm.csv"}


def test_alarm_starts_merge_flicker_and_skip_probation() -> None:
    score = np.zeros(1000)
    score[[10, 400, 402, 405, 900]] = 1.0
    assert alarm_starts(score, 0.5, start=0, gap=300) == [10, 400, 900]
    assert alarm_starts(score, 0.5, start=100, gap=300) == [400, 900]
    assert alarm_starts(score, 0.5, start=0, gap=1) == [10, 400, 402, 405, 900]


def test_live_forecasts_carry_interval_and_anomaly_and_metrics_export_them(
    broker: Broker, prefix: str, tmp_path: Path, publisher
) -> None:
    with (
        Collector(broker, f"{prefix}/forecasts/+") as collector,
        RunningDaemon(
            daemon_config(broker, prefix, tmp_path / "state", anomaly={"warmup": 20})
        ) as running,
    ):
        values = sine_wave(120, amplitude=5, offset=20, noise=0.2, seed=3)
        values[100] += 10.0  # a 50-sigma spike
        for v in values:
            publisher.publish(
                f"{prefix}/sensors/pump/value", json.dumps({"value": float(v)}), qos=1
            )
        forecasts = sorted(collector.wait_for(len(values)), key=lambda f: f["seq"])
        assert {"lower", "upper", "anomaly"} <= set(forecasts[0])
        for f in forecasts:
            assert f["lower"] <= f["prediction"] <= f["upper"]
            assert 0.0 <= f["anomaly"] <= 1.0
        assert forecasts[5]["anomaly"] == 0.5  # warm-up: don't know
        assert forecasts[100]["anomaly"] > 0.99
        wait_until(lambda: "forecaster_stream_interval_coverage{" in running.scrape(), "the series")
        text = running.scrape()
        coverage = metric_value(text, "forecaster_stream_interval_coverage", stream="pump")
        assert 0.5 < coverage <= 1.0
        assert metric_value(text, "forecaster_stream_interval_width", stream="pump") > 0
        assert metric_value(text, "forecaster_stream_anomalies_total", stream="pump") >= 1
        last = forecasts[-1]
        assert metric_value(text, "forecaster_stream_last_upper", stream="pump") == pytest.approx(
            last["upper"]
        )
        assert metric_value(
            text, "forecaster_stream_anomaly_score", stream="pump"
        ) == pytest.approx(last["anomaly"])


def test_horizon_runs_ahead_on_a_copy_of_the_state() -> None:
    checkpoint = load_checkpoint()
    one = Engine(checkpoint.model, checkpoint.normalizer)
    five = Engine(checkpoint.model, checkpoint.normalizer, horizon=5)
    values = sine_wave(1200, amplitude=3, offset=10)
    got_one = [one.tick([Sample("x", float(v))]).forecasts[0] for v in values]
    got_five = [five.tick([Sample("x", float(v))]).forecasts[0] for v in values]
    # Looking ahead changes nothing of what the state sees.
    for a, b in zip(got_one, got_five, strict=True):
        assert (a.prediction, a.lower, a.upper, a.anomaly) == (
            b.prediction,
            b.lower,
            b.upper,
            b.anomaly,
        )
        assert a.path is None and b.path is not None and len(b.path) == 5
        assert b.path[0] == b.prediction
        assert (b.path_lower[0], b.path_upper[0]) == (b.lower, b.upper)
        widths = np.subtract(b.path_upper, b.path_lower)
        assert np.all(np.diff(widths) > 0)  # intervals widen with the step
    # On a clean sine the run-ahead forecasts are forecasts: step k predicts the value k ahead.
    errors = [
        abs(got_five[t].path[k] - values[t + 1 + k]) for t in range(500, 1190) for k in range(5)
    ]
    assert np.mean(errors) < 0.05 * 3  # within 5 % of the amplitude on average
    naive = np.mean([abs(values[t] - values[t + 5]) for t in range(500, 1190)])
    step5 = np.mean([abs(got_five[t].path[4] - values[t + 5]) for t in range(500, 1190)])
    assert step5 < 0.1 * naive  # far better than holding the last value for 5 steps
    last_one, last_five = (engine.tick([Sample("x", 0.0)]) for engine in (one, five))
    assert "horizon" not in forecast_bodies(last_one.columns)[0]
    body = json.loads(orjson.dumps(forecast_bodies(last_five.columns)[0]))
    assert body["horizon"] == list(last_five.forecasts[0].path) and len(body["horizon_upper"]) == 5
