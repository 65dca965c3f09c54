"""Gaps: a pause far longer than a stream's usual interval resets its hidden state, and the next
forecasts say ``warm: false``; through the engine, then the daemon over Mosquitto."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

from forecaster.combine import CombinerConfig
from forecaster.engine import Engine, GapPolicy
from forecaster.model import Forecaster
from forecaster.normalize import NormalizerConfig
from forecaster.records import Sample
from tests.conftest import Broker, Collector
from tests.helpers import RunningDaemon, daemon_config, metric_value, restarted, wait_until

# Gain off: the forecast must follow the hidden state, so a reset shows in it.
NORM = NormalizerConfig(halflife=50.0, gain_halflife=None)
POLICY = GapPolicy(factor=5.0, halflife=10.0, min_intervals=3, rewarm_samples=4)


RNN_ONLY = CombinerConfig(enabled=False)


def series(n: int, start: float = 0.0, step: float = 1.0) -> list[tuple[float, float]]:
    """(ts, value) of a sine sampled every ``step`` seconds."""
    return [(start + i * step, math.sin(0.3 * (start + i * step))) for i in range(n)]


def test_a_gap_resets_the_state_and_flags_the_next_forecasts(any_cell_model: Forecaster) -> None:
    before, after = series(30), series(12, start=200.0)  # 170 s of silence, usual interval 1 s
    # The RNN's path alone: a mixed forecast may give the (random) test model no weight.
    engine = Engine(any_cell_model, NORM, gaps=POLICY, combine=RNN_ONLY)
    reference = Engine(any_cell_model, NORM, combine=RNN_ONLY)  # the state is reset by hand
    for ts, value in before:
        got = engine.tick([Sample("a", value, ts)]).forecasts[0]
        want = reference.tick([Sample("a", value, ts)]).forecasts[0]
        assert got.warm and got.prediction == want.prediction
    assert engine.streams.interval[0] == 1.0 and engine.streams.intervals[0] == 29
    not_reset = Engine(any_cell_model, NORM, combine=RNN_ONLY)
    not_reset.streams.load(reference.streams.names, reference.streams.arrays())
    reference.streams.state[:, 0] = 0.0  # what the gap must do, and nothing else
    flags, differs = [], []
    for ts, value in after:
        got = engine.tick([Sample("a", value, ts)]).forecasts[0]
        want = reference.tick([Sample("a", value, ts)]).forecasts[0]
        plain = not_reset.tick([Sample("a", value, ts)]).forecasts[0]
        assert got.prediction == want.prediction and got.error == want.error
        flags.append(got.warm)
        differs.append(got.prediction != plain.prediction)
    assert flags == [False] * 4 + [True] * 8
    assert differs[0]  # the reset changed the forecast: the test can tell
    assert engine.gap_resets == 1
    assert engine.streams.interval[0] == 1.0  # the gap was not folded into the usual interval


def test_irregular_but_ordinary_intervals_are_not_gaps(tiny_model: Forecaster) -> None:
    rng = np.random.default_rng(0)
    engine = Engine(tiny_model, NORM, gaps=POLICY)
    ts = np.cumsum(rng.uniform(0.5, 2.5, 500))  # up to 2.5x the mean, never 5x
    for t in ts:
        assert engine.tick([Sample("a", float(np.sin(t)), float(t))]).forecasts[0].warm
    assert engine.gap_resets == 0
    assert 1.0 < engine.streams.interval[0] < 2.0
    # Without timestamps nothing is measured, so nothing is reset.
    for _ in range(50):
        assert engine.tick([Sample("b", 1.0)]).forecasts[0].warm
    assert engine.streams.intervals[1] == 0


def test_gaps_are_off_by_default(tiny_model: Forecaster) -> None:
    engine = Engine(tiny_model, NORM)
    for ts, value in [*series(30), *series(5, start=10_000.0)]:
        assert engine.tick([Sample("a", value, ts)]).forecasts[0].warm
    assert engine.gap_resets == 0


def test_interval_and_cold_count_travel_in_the_checkpoint(
    tiny_model: Forecaster, tmp_path: Path
) -> None:
    engine = Engine(tiny_model, NORM, gaps=POLICY)
    for ts, value in [*series(10), *series(2, start=100.0)]:  # mid re-warm: 2 cold ones left
        engine.tick([Sample("a", value, ts)])
    restored = restarted(engine, tmp_path / "c.safetensors", gaps=POLICY)
    assert restored.streams.cold[0] == 2 and restored.streams.interval[0] == 1.0
    rest = series(4, start=102.0)
    got = [restored.tick([Sample("a", v, t)]).forecasts[0] for t, v in rest]
    want = [engine.tick([Sample("a", v, t)]).forecasts[0] for t, v in rest]
    assert [f.warm for f in got] == [False, False, True, True]
    assert got == want
    assert torch.equal(restored.streams.state[:, :1], engine.streams.state[:, :1])


def test_daemon_publishes_warm_false_after_a_gap(
    broker: Broker, prefix: str, tmp_path: Path, publisher
) -> None:
    gaps = {"enabled": True, "factor": 5, "min_intervals": 3, "rewarm_samples": 3}
    config = daemon_config(broker, prefix, tmp_path / "state", engine={"gaps": gaps})
    with (
        Collector(broker, f"{prefix}/forecasts/+") as collector,
        RunningDaemon(config) as running,
    ):
        points = [*series(10), *series(6, start=500.0)]
        for ts, value in points:
            payload = json.dumps({"value": value, "ts": ts})
            publisher.publish(f"{prefix}/sensors/g1/value", payload, qos=1)
        got = collector.wait_for(len(points))
        assert [f["warm"] for f in got] == [True] * 10 + [False] * 3 + [True] * 3
        # the tick's forecasts leave before its metrics are updated: poll for the counter
        wait_until(
            lambda: metric_value(running.scrape(), "forecaster_gap_resets_total") == 1,
            "the gap counted",
        )
