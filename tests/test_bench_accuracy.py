"""``forecaster bench accuracy``: one protocol for every model, no look-ahead, reproducible."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from forecaster.bench.accuracy import (
    FORECASTER_MODELS,
    RIVER_MODELS,
    bench_accuracy,
    river_available,
)
from forecaster.evaluate import progressive, score
from forecaster.peers import SeasonalPeriod


def write_csv(path: Path, values: np.ndarray) -> None:
    rows = [
        f"2020-01-01 {i // 3600:02d}:{i // 60 % 60:02d}:{i % 60:02d},{v:.9f}"
        for i, v in enumerate(values)
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("timestamp,value\n" + "\n".join(rows) + "\n")


class PeekingModel:
    """A model that cheats: it reads the next value from the series. The chance check must catch it."""

    def __init__(self, values: np.ndarray) -> None:
        self.values = values
        self.t = -1

    def forecast(self) -> float:
        return float(self.values[min(self.t + 1, len(self.values) - 1)])

    def learn_one(self, y: float) -> None:
        self.t += 1


# For i.i.d. noise of variance s², a forecast f made from the past is independent of the next value
# x, so E(x - f)² = s² + E(f - mean)² >= s², while the naive error x_t+1 - x_t has variance 2 s²: no
# honest model's MSE can fall below half of naive's, up to sampling error. With n scored samples the
# two MSE estimates have a relative standard error of about sqrt(2 / n) each; allow four of them.
N = 1500


def chance_floor(n_scored: int) -> float:
    return 0.5 * (1 - 4 * math.sqrt(2 / n_scored))


def test_nobody_beats_chance_on_unguessable_noise(tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    write_csv(tmp_path / "noise_a.csv", 10 + 3 * rng.standard_normal(N))
    write_csv(tmp_path / "sub" / "noise_b.csv", -2 + 0.5 * rng.standard_normal(N))
    result = bench_accuracy(tmp_path, seed=0)
    models = result["models"]
    expected = {"naive", "ar8_rls", "prometheus_des", *FORECASTER_MODELS}
    assert expected <= set(models)
    assert (
        set(RIVER_MODELS) <= set(models)
        if river_available()
        else set(result["skipped_models"]) == set(RIVER_MODELS)
    )
    floor = chance_floor(N - math.ceil(0.1 * N))
    for name, model in models.items():
        for file, scores in model["files"].items():
            assert scores["rel_mse"] >= floor, (name, file, scores, floor)
        assert model["geo_rel_mse"] >= floor, (name, model["geo_rel_mse"])

    # The check bites: a model that sees the next value scores far below the floor.
    values = rng.standard_normal(N)
    cheat = score(progressive(PeekingModel(values), values))
    assert cheat.mse / cheat.naive_mse < floor / 10


def run_cli(*args: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "forecaster.cli", "bench", "accuracy", *args],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_same_data_and_seed_give_the_same_table_twice(tmp_path: Path) -> None:
    t = np.arange(600)
    rng = np.random.default_rng(3)
    data = tmp_path / "data"
    write_csv(data / "wave.csv", 50 + 5 * np.sin(t / 6) + 0.3 * rng.standard_normal(len(t)))
    write_csv(data / "walk.csv", np.cumsum(rng.standard_normal(len(t))))
    write_csv(data / "flat.csv", np.full(len(t), 4.0))  # naive is exact: skipped from the summary
    first = run_cli("--data", str(data), "--seed", "5")
    assert first == run_cli("--data", str(data), "--seed", "5")
    assert "forecaster_learn" in first and "flat.csv" in first and "skipped" in first

    plots = tmp_path / "plots"
    out = json.loads(run_cli("--data", str(data), "--seed", "5", "--json", "--plot", str(plots)))
    assert set(out["models"]) >= {"naive", *FORECASTER_MODELS}
    for model in out["models"].values():
        assert set(model) >= {"geo_rel_mse", "mean_rank", "files"}
        assert set(model["files"]) == {"wave.csv", "walk.csv", "flat.csv"}
        assert set(model["files"]["wave.csv"]) == {"mse", "mae", "rel_mse"}
        assert model["files"]["flat.csv"]["rel_mse"] is None
    assert out["models"]["naive"]["geo_rel_mse"] == pytest.approx(1.0)
    for line in first.splitlines():  # the table shows what the JSON holds
        if line.strip().startswith("forecaster_learn "):
            assert f"{out['models']['forecaster_learn']['geo_rel_mse']:.4f}" in line
    assert sorted(p.name for p in plots.iterdir()) == ["flat.png", "walk.png", "wave.png"]
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in plots.iterdir())


def test_the_period_detector_reads_past_values_only() -> None:
    t = np.arange(2000)
    daily = np.sin(2 * np.pi * t / 24)
    weekly_later = daily.copy()
    weekly_later[1024:] = np.sin(2 * np.pi * t[1024:] / 168)  # a different future
    seen = []
    for values in (daily, weekly_later):
        detector = SeasonalPeriod(every=64, window=512)
        periods = []
        for y in values.tolist():
            detector.learn_one(y)
            periods.append(detector.period)
        seen.append(periods)
    assert seen[0][:1024] == seen[1][:1024]  # the same past, the same periods
    assert seen[0][1023] == 24 and seen[1][-1] != 24  # and the detector does follow the data
