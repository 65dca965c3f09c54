from __future__ import annotations

import numpy as np
import pytest
import torch

from forecaster.combine import CombinerConfig
from forecaster.engine import Engine, TickResult
from forecaster.model import Forecaster
from forecaster.normalize import NormalizerConfig, normalize_series
from forecaster.records import Batch, Sample, as_batch

NORM = NormalizerConfig(halflife=40.0)


RNN_ONLY = CombinerConfig(enabled=False)


def _state_bytes(engine: Engine) -> dict[str, bytes]:
    return {k: v.tobytes() for k, v in engine.streams.arrays().items()}


def test_engine_equals_forward_over_whole_normalised_sequence(any_cell_model: Forecaster) -> None:
    rng = np.random.default_rng(0)
    values = 1000 * np.sin(np.arange(300) * 0.2) + 5000 + rng.normal(0, 30, 300)
    engine = Engine(any_cell_model, NORM, combine=RNN_ONLY)  # the RNN's path, unmixed
    predictions = [engine.tick([Sample("a", float(v))]).forecasts[0].prediction for v in values]

    z, _ = normalize_series(values[None, :], NORM)  # (1, T)
    with torch.no_grad():
        z_hat, _ = any_cell_model(torch.tensor(z, dtype=torch.float32).unsqueeze(-1))  # (1, T, 1)
    # Map the whole-sequence outputs back with the statistics each step had.
    from forecaster.normalize import Normalizer

    norm = Normalizer(NORM, 1)
    expected = []
    for t, v in enumerate(values):
        norm.update(np.array([0]), np.array([v]))
        expected.append(norm.forecast(np.array([0]), z_hat[0, t, 0].double().numpy()[None])[0])
    scale = np.array([norm.scale(np.array([0]))[0]])
    assert np.max(np.abs(np.array(predictions) - np.array(expected)) / scale) < 1e-5


def test_interleaved_uneven_streams_equal_each_stream_alone(tiny_model: Forecaster) -> None:
    rng = np.random.default_rng(1)
    n_streams = 1000
    lengths = rng.integers(1, 12, n_streams)
    series = {f"s{i}": rng.normal(i, 1 + i % 7, lengths[i]) for i in range(n_streams)}
    # Interleave in a random arrival order that keeps each stream's own order.
    arrivals = [s for s, vals in series.items() for _ in vals]
    rng.shuffle(arrivals)
    cursor = dict.fromkeys(series, 0)
    samples = []
    for stream in arrivals:
        samples.append(Sample(stream, float(series[stream][cursor[stream]])))
        cursor[stream] += 1
    together = Engine(tiny_model, NORM)
    got: dict[str, list[float]] = {s: [] for s in series}
    position = 0
    while position < len(samples):  # uneven ticks, several samples of a stream per tick
        size = int(rng.integers(1, 400))
        for forecast in together.tick(samples[position : position + size]).forecasts:
            got[forecast.stream].append(forecast.prediction)
        position += size
    for stream in list(series)[::25]:  # alone: every 25th stream, to stay fast
        alone = Engine(tiny_model, NORM)
        want = [
            alone.tick([Sample(stream, float(v))]).forecasts[0].prediction for v in series[stream]
        ]
        np.testing.assert_allclose(got[stream], want, rtol=1e-5, atol=1e-5)
    assert all(len(got[s]) == len(series[s]) for s in series)


def test_samples_of_one_stream_in_one_tick_are_stepped_in_order(tiny_model: Forecaster) -> None:
    values = [1.0, 4.0, 2.0, 8.0, 5.0]
    batched = Engine(tiny_model, NORM).tick([Sample("x", v) for v in values]).forecasts
    single = Engine(tiny_model, NORM)
    one_by_one = [single.tick([Sample("x", v)]).forecasts[0] for v in values]
    assert [f.seq for f in batched] == [1, 2, 3, 4, 5]
    np.testing.assert_allclose(
        [f.prediction for f in batched], [f.prediction for f in one_by_one], rtol=1e-6
    )


def test_scoring_uses_the_forecast_made_before_the_value(tiny_model: Forecaster) -> None:
    engine = Engine(tiny_model, NORM)
    first = engine.tick([Sample("x", 3.0)]).forecasts[0]
    assert first.error is None and first.naive_error is None
    second = engine.tick([Sample("x", 5.0)]).forecasts[0]
    assert second.error == pytest.approx(5.0 - first.prediction)
    assert second.naive_error == pytest.approx(2.0)


BAD_VALUES = [
    (float("nan"), "non_finite"),
    (float("inf"), "non_finite"),
    (float("-inf"), "non_finite"),
    ("0.5", "not_a_number"),
    (None, "not_a_number"),
    (True, "not_a_number"),
    (10**400, "out_of_range"),
    (1e300, "out_of_range"),
]


@pytest.mark.parametrize(("value", "reason"), BAD_VALUES)
def test_bad_values_are_rejected_and_touch_no_state(
    any_cell_model: Forecaster, value: object, reason: str
) -> None:
    engine = Engine(any_cell_model, NORM)
    for v in (1.0, 2.0, 3.0):
        engine.tick([Sample("x", v)])
    before = _state_bytes(engine)
    result = engine.tick([Sample("x", value), Sample("new", value)])  # type: ignore[arg-type]
    assert [r.reason for r in result.rejected] == [reason, reason]
    assert result.forecasts == []
    assert _state_bytes(engine) == before
    assert "new" not in engine.streams
    # The stream keeps serving as if the bad sample never came.
    clean = Engine(any_cell_model, NORM)
    for v in (1.0, 2.0, 3.0):
        clean.tick([Sample("x", v)])
    assert engine.tick([Sample("x", 4.0)]).forecasts == clean.tick([Sample("x", 4.0)]).forecasts


def test_bad_stream_ids_and_duplicates_are_rejected(tiny_model: Forecaster) -> None:
    engine = Engine(tiny_model, NORM)
    result = engine.tick(
        [Sample("", 1.0), Sample("a/b", 1.0), Sample("a#", 1.0), Sample("a+", 1.0)]
    )
    assert {r.reason for r in result.rejected} == {"bad_stream"}
    assert len(engine.streams) == 0
    assert engine.tick([Sample("a", 1.0, seq=5)]).forecasts[0].seq == 5
    result = engine.tick([Sample("a", 2.0, seq=5), Sample("a", 2.0, seq=3), Sample("a", 2.0)])
    assert [r.reason for r in result.rejected] == ["duplicate", "duplicate"]
    assert [f.seq for f in result.forecasts] == [6]


def _mixed_tick() -> list[Sample]:
    """Repeated streams, explicit and missing seqs, a duplicate, bad values and ids, in one tick."""
    return [
        Sample("a", 1.0, ts=1.0),
        Sample("b", 2.0, seq=10),
        Sample("a", 1.5, ts=2.0),
        Sample("b", 2.5, seq=10),  # duplicate of the one just before
        Sample("c", float("nan")),
        Sample("bad/id", 1.0),
        Sample("b", 3.0, seq=12),
        Sample("a", 1e300),
        Sample("c", 4.0),
        Sample("a", 2.0),
    ]


def test_tick_batch_columns_equal_tick_objects(tiny_model: Forecaster) -> None:
    """The columnar entry point and the ``Sample`` one give the same forecasts and refusals."""
    from forecaster.records import NO_SEQ, Batch

    objects, columns = Engine(tiny_model, NORM), Engine(tiny_model, NORM)
    for _ in range(3):
        samples = _mixed_tick()
        expected = objects.tick(samples)
        batch = Batch(
            [s.stream for s in samples],
            np.array([s.value for s in samples]),
            np.array([np.nan if s.ts is None else s.ts for s in samples]),
            np.array([NO_SEQ if s.seq is None else s.seq for s in samples]),
        )
        got = columns.tick_batch(batch)
        assert got.forecasts.to_list() == expected.forecasts
        assert got.forecasts.index.tolist() == [
            i for i, s in enumerate(samples) if all(r.sample is not s for r in expected.rejected)
        ]
        assert got.rejected_reason == [r.reason for r in expected.rejected]
    # The third time round, b's explicit 10 and 12 are at or below its last: duplicates too.
    assert [r.reason for r in expected.rejected] == [
        "duplicate",
        "duplicate",
        "non_finite",
        "bad_stream",
        "duplicate",
        "out_of_range",
    ]
    assert _state_bytes(objects) == _state_bytes(columns)


def test_admit_then_tick_equals_tick_alone(tiny_model: Forecaster) -> None:
    """The daemon's path (admit, journal, tick the admitted) refuses and forecasts exactly what
    one tick of the raw samples would."""
    daemon_path, direct = Engine(tiny_model, NORM), Engine(tiny_model, NORM)
    for _ in range(3):
        samples = _mixed_tick()
        batch, keep, refused = as_batch(samples)  # the daemon's path, as columns
        admission = daemon_path.admit(batch)
        result = daemon_path.tick_batch(admission)
        assert result.rejected_reason == admission.rejected_reason
        assert result.forecasts.index.tolist() == admission.index.tolist()
        expected = direct.tick(samples)
        rejected = refused + [
            (int(keep[i]), reason)
            for i, reason in zip(admission.rejected_index, admission.rejected_reason, strict=True)
        ]
        assert sorted(rejected) == [(samples.index(r.sample), r.reason) for r in expected.rejected]
        assert TickResult(result.forecasts, []).forecasts == expected.forecasts


def test_an_admission_is_good_for_the_next_tick_only(tiny_model: Forecaster) -> None:
    """An admission carries slots and sequence numbers worked out against the engine's state
    when it was made; after another tick they may be wrong, so it is refused, not applied."""
    engine = Engine(tiny_model, NORM)
    stale = engine.admit(Batch.of(["a"], [1.0]))
    engine.tick_batch(Batch.of(["a"], [2.0]))
    with pytest.raises(ValueError, match="next tick only"):
        engine.tick_batch(stale)
    assert engine.last_seq("a") == 1


def test_ticks_reuse_the_engine_work_blocks_and_leave_other_streams_alone(
    tiny_model: Forecaster,
) -> None:
    rng = np.random.default_rng(4)
    names = [f"s{i}" for i in range(300)]
    engine = Engine(tiny_model, NORM)
    engine.tick_batch(Batch.of(names, rng.normal(size=300)))

    def addresses() -> dict[str, int]:  # a block asked for at any size is the same storage
        return {name: engine.work_block(name, (1,)).data_ptr() for name in ("before", "after")}

    blocks = addresses()
    row = engine.streams.state[:, :1].numel() * engine.streams.state.element_size()
    for name in ("before", "after"):  # the tick sized them: one state row per stream
        assert engine.work_block(name, (1,)).untyped_storage().nbytes() >= 300 * row
    untouched = engine.streams.state[:, 100:300].clone()  # (num_layers, 200, width)
    for size in (100, 60, 100):  # smaller ticks: the blocks' tails hold the first tick's rows
        before = engine.streams.state[:, :size].clone()
        engine.tick_batch(Batch.of(names[:size], rng.normal(size=size)))
        assert not torch.equal(engine.streams.state[:, :size], before)  # these streams stepped
    assert addresses() == blocks
    assert torch.equal(engine.streams.state[:, 100:300], untouched)


def test_a_new_streams_first_seq_is_taken_whatever_it_is(tiny_model: Forecaster) -> None:
    """Senders count from 0 or 1: a new stream's first ``seq`` 0 is a sample, not a duplicate;
    after it the usual rule holds (0 again is a duplicate) and unnumbered samples go on from it."""
    engine = Engine(tiny_model, NORM)
    result = engine.tick_batch(Batch(["a", "b"], np.ones(2), np.full(2, np.nan), np.array([0, 5])))
    assert result.forecasts.seq.tolist() == [0, 5]
    assert (engine.last_seq("a"), engine.last_seq("b"), engine.last_seq("new")) == (0, 5, -1)
    again = engine.tick_batch(Batch(["a", "a"], np.ones(2), np.full(2, np.nan), np.array([0, -1])))
    assert (again.rejected_reason, again.forecasts.seq.tolist()) == (["duplicate"], [1])
    unnumbered = engine.tick_batch(Batch.of(["c"], [1.0]))  # the first unnumbered seq is still 1
    assert unnumbered.forecasts.seq.tolist() == [1]
