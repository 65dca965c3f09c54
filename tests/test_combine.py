"""forecaster.combine: the RNN, the AR path and the last value mixed per stream, causally."""

from __future__ import annotations

import numpy as np
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from forecaster.combine import COMPONENTS, Combiner, CombinerConfig
from forecaster.engine import Engine
from forecaster.metrics import Metrics
from forecaster.model import Forecaster
from forecaster.outbox import forecast_bodies
from forecaster.records import Batch


def run(
    values: np.ndarray, rnn: np.ndarray, config: CombinerConfig | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Forecasts and weights of one stream fed ``values``, the RNN saying ``rnn[t]`` at t."""
    combiner = Combiner(config or CombinerConfig(), capacity=1)
    slot = np.array([0])
    out, weights = np.empty(len(values)), np.empty((len(values), len(COMPONENTS)))
    for t in range(len(values)):
        forecast, w = combiner.step(slot, values[t : t + 1], rnn[t : t + 1], np.zeros(1))
        out[t], weights[t] = forecast[0], w[0]
    return out, weights


def test_forecasts_use_past_values_only() -> None:
    rng = np.random.default_rng(0)
    values = np.cumsum(rng.normal(size=300))
    changed = values.copy()
    changed[200:] += rng.normal(scale=50.0, size=100)  # a different future
    before, _ = run(values, values)
    after, _ = run(changed, changed)
    np.testing.assert_array_equal(before[:200], after[:200])  # bit for bit up to the change
    assert not np.array_equal(before[200:], after[200:])


def test_an_ar2_stream_is_read_by_the_ar_path_and_beats_the_last_value() -> None:
    rng = np.random.default_rng(1)
    x = np.zeros(3000)
    for t in range(2, len(x)):  # a noisy oscillation the last value reads badly
        x[t] = 1.6 * x[t - 1] - 0.8 * x[t - 2] + rng.normal()
    forecasts, weights = run(x, x)  # an RNN that says "last value": nothing to add
    errors = x[1001:] - forecasts[1000:-1]
    naive = x[1001:] - x[1000:-1]
    assert np.mean(errors**2) < 0.6 * np.mean(naive**2)
    assert weights[-1, COMPONENTS.index("ar")] > 0.8
    np.testing.assert_allclose(weights.sum(axis=1), 1.0)


def test_an_rnn_that_reads_the_stream_carries_its_forecast() -> None:
    rng = np.random.default_rng(2)
    x = np.cumsum(rng.normal(size=2000))  # a random walk: no linear reader can do better than naive
    rnn = np.append(x[1:], x[-1]) + rng.normal(scale=0.1, size=len(x))  # an RNN that nearly knows
    forecasts, weights = run(x, rnn)
    assert weights[-1, COMPONENTS.index("rnn")] > 0.9
    assert np.mean((x[1001:] - forecasts[1000:-1]) ** 2) < 0.05


def test_the_guard_falls_back_to_the_last_value_when_the_mix_keeps_missing() -> None:
    """An RNN that read the stream perfectly goes wrong. The stack turns away from it, but its
    moments still credit the RNN's long good run; the guard's out-of-sample record of the mix
    against the last value closes sooner and the forecast is the last value."""
    rng = np.random.default_rng(3)
    values = np.cumsum(rng.normal(size=600))
    oracle = np.append(values[1:], values[-1])  # the next value, known in advance
    rnn = oracle.copy()
    rnn[400:] = values[400:] - 3.0 * (oracle[400:] - values[400:])  # now three times wrong
    guarded, weights = run(values, rnn)
    unguarded, unguarded_weights = run(values, rnn, CombinerConfig(guard=np.inf))
    assert weights[399, 1] > 0.9  # the RNN carried the stream
    assert weights[470, 0] == 1.0 and unguarded_weights[470, 0] < 0.95
    after = slice(440, 500)
    guarded_mse = np.mean((guarded[after] - oracle[after]) ** 2)
    assert guarded_mse < 0.9 * np.mean((unguarded[after] - oracle[after]) ** 2)


def test_a_young_stream_earns_its_mix() -> None:
    """The guard's record starts against the mix: the first forecast the stack would hand to
    the RNN is the last value; once the mix has beaten the last value, it serves."""
    rng = np.random.default_rng(4)
    values = np.cumsum(rng.normal(size=50))
    oracle = np.append(values[1:], values[-1])
    rnn = values + 0.5 * (oracle - values) + rng.normal(scale=0.5, size=50)  # informative
    _, weights = run(values, rnn)
    _, unguarded = run(values, rnn, CombinerConfig(guard=np.inf))
    assert unguarded[1, 1] > 0.9 and weights[1, 0] == 1.0
    assert weights[10, 1] > 0.9


def test_a_flat_stream_keeps_finite_state() -> None:
    forecasts, weights = run(np.full(5000, 3.0), np.full(5000, 3.0))
    combiner = Combiner(CombinerConfig(), 1)
    for _ in range(5000):  # no feature moves: the AR path's equations stay solvable
        combiner.step(np.array([0]), np.array([3.0]), np.array([3.0]), np.zeros(1))
    assert np.isfinite(combiner.gram).all() and np.isfinite(combiner.coef).all()
    assert np.all(forecasts == 3.0) and np.isfinite(weights).all()


def test_weights_reach_the_forecast_message_and_the_metrics(tiny_model: Forecaster) -> None:
    engine = Engine(tiny_model)
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    for t in range(50):
        columns = engine.tick_batch(Batch.of(["a", "b"], [np.sin(t), float(t)])).forecasts
        metrics.observe_columns(columns)
    body = forecast_bodies(columns)[0]
    assert set(body["weights"]) == set(COMPONENTS)
    assert abs(sum(body["weights"].values()) - 1.0) < 0.01
    text = "\n".join(
        f"{s.labels.get('stream')},{s.labels.get('component')},{s.value}"
        for family in text_string_to_metric_families(generate_latest(registry).decode())
        if family.name == "forecaster_stream_weight"
        for s in family.samples
    )
    rows = [line.split(",") for line in text.splitlines()]
    assert {(stream, component) for stream, component, _ in rows} == {
        (s, c) for s in ("a", "b") for c in COMPONENTS
    }
    for stream in ("a", "b"):
        shares = [float(v) for s, _, v in rows if s == stream]
        assert abs(sum(shares) - 1.0) < 1e-9


def test_mixing_off_serves_the_rnn_alone(tiny_model: Forecaster) -> None:
    engine = Engine(tiny_model, combine=CombinerConfig(enabled=False))
    columns = engine.tick_batch(Batch.of(["a"], [1.0])).forecasts
    assert columns.weights is None and "weights" not in forecast_bodies(columns)[0]
