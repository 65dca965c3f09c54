"""Stream bound: past ``engine.max_streams`` the least recently used streams are parked in the
store and come back bit for bit; through the engine, then the daemon over Mosquitto."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from forecaster.engine import Engine
from forecaster.model import Forecaster
from forecaster.normalize import NormalizerConfig
from forecaster.records import Batch, Sample
from forecaster.store import MemoryStore, SqliteStore
from tests.conftest import Broker, Collector
from tests.helpers import (
    RunningDaemon,
    daemon_config,
    metric_value,
    offline_predictions,
    wait_until,
)

NORM = NormalizerConfig(halflife=50.0)


def traffic(n_streams: int, ticks: int, seed: int) -> list[list[Sample]]:
    """Ticks of 1-8 samples from random streams (some repeated within a tick), some with ts."""
    rng = np.random.default_rng(seed)
    level = rng.normal(0, 100, n_streams)
    out = []
    for t in range(ticks):
        size = int(rng.integers(1, 9))
        streams = rng.integers(0, n_streams, size)
        out.append(
            [
                Sample(f"s{k}", float(level[k] + rng.normal(0, 5)), float(t) if k % 2 else None)
                for k in streams.tolist()
            ]
        )
    return out


def test_ten_times_max_streams_stay_bounded_and_continue_exactly(
    any_cell_model: Forecaster,
) -> None:
    max_streams = 10
    store = MemoryStore()
    bounded = Engine(any_cell_model, NORM, max_streams=max_streams, store=store)
    free = Engine(any_cell_model, NORM)
    ticks = traffic(10 * max_streams, 600, seed=1)
    for samples in ticks:
        got, want = bounded.tick(samples), free.tick(samples)
        assert len(bounded.streams) <= max_streams
        assert bounded.streams.capacity <= 16
        assert [(f.stream, f.seq, f.error) for f in got.forecasts] == [
            (f.stream, f.seq, f.error) for f in want.forecasts
        ]
        assert [f.prediction for f in got.forecasts] == [f.prediction for f in want.forecasts]
    assert len(free.streams) == 10 * max_streams
    assert bounded.evictions >= 90 and bounded.restores > 100
    assert len(store) >= 90
    # Every stream's state, wherever it lives now, equals the unbounded engine's, bit for bit.
    for name in free.streams.names:
        want = free.streams.arrays(np.array([free.streams.slots[name]]))
        if name in bounded.streams:
            have = bounded.streams.arrays(np.array([bounded.streams.slots[name]]))
        else:
            have = store.get(name)
        assert have is not None
        for key, value in want.items():
            if key != "last_used":
                np.testing.assert_array_equal(have[key], value, err_msg=f"{name}.{key}")


def test_take_and_put_round_trip_bit_for_bit(any_cell_model: Forecaster) -> None:
    engine = Engine(any_cell_model, NORM)
    for samples in traffic(20, 100, seed=2):
        engine.tick(samples)
    table = engine.streams
    before = {name: table.arrays(np.array([table.slots[name]])) for name in table.names}
    gone = {table.slots[name] for name in ("s3", "s0", "s17")}
    taken, src, dst = table.take(["s3", "s0", "s17"])
    assert len(table) == 17 and sorted(table.slots.values()) == list(range(17))
    assert len(src) == len(dst) and set(dst.tolist()) <= gone and min(src, default=17) >= 17
    table.put(["s3", "s0", "s17"], taken)
    for name, want in before.items():
        have = table.arrays(np.array([table.slots[name]]))
        for key in want:
            np.testing.assert_array_equal(have[key], want[key], err_msg=f"{name}.{key}")


def test_sqlite_store_rolls_back_to_the_checkpoint_generation(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "evicted.sqlite")
    row = {"seq": np.array([1]), "state": np.zeros((1, 1, 4), np.float32)}
    store.put({"a": row, "b": row})  # generation 1: a checkpoint saw this
    store.put({"a": {**row, "seq": np.array([2])}})  # generation 2: after it
    store.close()
    reopened = SqliteStore(tmp_path / "evicted.sqlite")
    assert reopened.generation == 2 and reopened.get("a")["seq"].tolist() == [2]
    reopened.rollback(1)  # restart from the checkpoint of generation 1
    assert reopened.get("a")["seq"].tolist() == [1] and len(reopened) == 2
    reopened.compact(1, resident=["b"])  # b is in memory at that checkpoint
    assert reopened.get("b") is None and reopened.get("a") is not None


def test_daemon_bounds_streams_and_restores_them_after_a_restart(
    broker: Broker, prefix: str, tmp_path: Path, publisher
) -> None:
    state = tmp_path / "state"
    config = daemon_config(broker, prefix, state, engine={"max_streams": 5})
    rng = np.random.default_rng(5)
    series = {f"s{i}": [float(v) for v in rng.normal(i, 1, 12)] for i in range(50)}

    def send(collector: Collector, part: slice) -> list[dict]:
        """One round of every stream at a time, each answered before the next is sent: a
        tick never holds two rounds, so every round brings back the streams parked after the
        one before (however the daemon's ticks fall on a loaded machine)."""
        got = collector.json()
        for t in range(12)[part]:
            for stream, values in series.items():
                publisher.publish(f"{prefix}/sensors/{stream}/value", repr(values[t]), qos=1)
            got = collector.wait_for(len(got) + len(series))
        return got

    with Collector(broker, f"{prefix}/forecasts/+") as collector:
        with RunningDaemon(config) as running:
            send(collector, slice(0, 6))
            wait_until(
                lambda: metric_value(running.scrape(), "forecaster_streams_restored_total") >= 45,
                "the counters caught up with the forecasts",
            )
            metrics = running.scrape()
            assert metric_value(metrics, "forecaster_streams_active") <= 5
            assert metric_value(metrics, "forecaster_streams_evicted_total") >= 45
            assert metric_value(metrics, "forecaster_streams_restored_total") >= 45
        # stopped, so checkpointed: 5 streams in memory, 45 in evicted.sqlite
        assert (state / "evicted.sqlite").exists()
        with RunningDaemon(config) as running:
            got = send(collector, slice(6, 12))
            assert len(got) == 600
            metrics = running.scrape()
            assert metric_value(metrics, "forecaster_streams_active") <= 5
    for stream in list(series)[::7]:
        mine = [f for f in got if f["stream"] == stream]
        assert [f["seq"] for f in mine] == list(range(1, 13))
        np.testing.assert_allclose(
            [f["prediction"] for f in mine], offline_predictions(series[stream]), atol=1e-5
        )


@pytest.mark.parametrize("max_streams", [1, 3])
def test_a_tick_wider_than_the_bound_still_serves_every_stream(
    tiny_model: Forecaster, max_streams: int
) -> None:
    bounded = Engine(tiny_model, NORM, max_streams=max_streams)
    free = Engine(tiny_model, NORM)
    for t in range(5):
        samples = [Sample(f"s{k}", float(t * k)) for k in range(6)]
        got, want = bounded.tick(samples), free.tick(samples)
        assert [f.prediction for f in got.forecasts] == [f.prediction for f in want.forecasts]
        assert len(bounded.streams) <= max_streams  # trimmed right after the wide tick


def test_learner_windows_follow_their_streams_through_eviction(tiny_model: Forecaster) -> None:
    from forecaster.config import OnlineLearningConfig
    from forecaster.learner import Learner

    engine = Engine(tiny_model, NORM, max_streams=4)
    learner = Learner(engine, OnlineLearningConfig(enabled=True, window=4, warmup=2))
    for samples in traffic(12, 300, seed=3):
        engine.tick(samples)
        learner.after_tick()
        assert set(learner.open) | set(learner.ready) <= set(range(len(engine.streams)))
    assert engine.evictions > 0 and learner.stats.updates > 0


def test_a_parked_stream_is_admitted_with_its_next_sequence_number(tiny_model: Forecaster) -> None:
    """The daemon numbers samples (``admit``) before journaling them: a parked stream must get
    the number after its last one, or its return would be refused as a duplicate."""
    engine = Engine(tiny_model, NORM, max_streams=2)
    for value in (1.0, 2.0, 3.0):
        engine.tick([Sample("a", value)])
    engine.tick([Sample("b", 1.0), Sample("c", 1.0)])  # "a" is parked
    assert "a" not in engine.streams and engine.evictions >= 1
    admission = engine.admit(Batch.of(["a", "a"], [4.0, 5.0]))
    assert admission.batch.seq.tolist() == [4, 5] and not admission.rejected_reason
    result = engine.tick_batch(admission)
    assert result.forecasts.seq.tolist() == [4, 5] and not result.rejected_reason


def test_parked_streams_expire_and_the_store_is_bounded(tmp_path: Path) -> None:
    """Streams parked longer than the expiry, then the longest parked past ``max_parked``, are
    forgotten; a stream in memory never is (a replay may still need its row)."""
    now = [1000.0]
    store = SqliteStore(tmp_path / "evicted.sqlite", clock=lambda: now[0])
    row = {"seq": np.array([1]), "state": np.zeros((1, 1, 4), dtype=np.float32)}
    store.put({"old": row, "back": row})
    for i in range(4):
        now[0] += 1
        store.put({f"new{i}": row})
    assert store.expire(1000.5, resident={"back"}) == (1, 5)  # "old" goes, "back" is in memory
    assert store.get("old") is None and store.get("back") is not None
    assert store.expire(1000.5, resident={"back"}, max_parked=3) == (2, 3)
    assert store.get("new0") is None and store.get("new1") is None and store.get("new3") is not None
    assert store.size() > 0
    store.close()
    reopened = SqliteStore(tmp_path / "evicted.sqlite")
    assert reopened.expire(0.0, resident=set(), max_parked=0) == (0, 3)  # kept across a reopen
    reopened.close()


class FullStore(MemoryStore):
    """A park store that refuses writes while ``full`` (a disk that cannot be written)."""

    full = False

    def put(self, rows: dict[str, dict[str, np.ndarray]]) -> None:
        if self.full:
            raise OSError(28, "No space left on device")
        super().put(rows)


def test_a_park_store_that_cannot_be_written_changes_nothing(tiny_model: Forecaster) -> None:
    """The tick that must park a stream first fails before touching any state, and the same
    admission ticks afterwards exactly as it would have."""
    store, twin_store = FullStore(), MemoryStore()
    engine = Engine(tiny_model, NORM, max_streams=2, store=store)
    twin = Engine(tiny_model, NORM, max_streams=2, store=twin_store)
    for e in (engine, twin):
        e.tick_batch(Batch.of(["a", "b"], [1.0, 2.0]))
    before = engine.streams.arrays()
    admission = engine.admit(Batch.of(["c"], [3.0]))
    store.full = True
    with pytest.raises(OSError):
        engine.tick_batch(admission)
    assert sorted(engine.streams.names) == ["a", "b"] and engine.evictions == 0
    for key, array in engine.streams.arrays().items():
        np.testing.assert_array_equal(array, before[key])
    store.full = False
    got = engine.tick_batch(admission).forecasts.prediction
    want = twin.tick_batch(Batch.of(["c"], [3.0])).forecasts.prediction
    np.testing.assert_array_equal(got, want)
    assert engine.evictions == twin.evictions == 1
