"""A shadow challenger (``model.challenger``): a second model stepped on the same samples with its
own hidden states, scored on every value, never published; its states are checkpointed and parked
with the served ones."""

from __future__ import annotations

import copy
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from forecaster.engine import Engine
from forecaster.persist import load_checkpoint, save_checkpoint
from forecaster.records import Sample
from forecaster.store import MemoryStore
from tests.conftest import Broker, Collector
from tests.helpers import (
    RunningDaemon,
    daemon_config,
    forecaster_cli,
    metric_value,
    offline_predictions,
    wait_until,
    write_config,
)
from tests.test_recovery import DaemonProcess, daemons, wait_forecasts

__all__ = ["daemons"]  # the fixture, shared with test_recovery


def scaled_model(scale: float = 0.8) -> torch.nn.Module:
    """The shipped model with its weights scaled: same architecture, other forecasts."""
    model = copy.deepcopy(load_checkpoint().model)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.mul_(scale)
    return model


def poor_served_shipped_challenging(poor: Path) -> dict[str, str]:
    """``model`` keys: the shipped model with its weights halved, saved at ``poor``, serves; the
    shipped model (saved beside it) is the challenger, which the evidence favours."""
    shipped = poor.with_name("shipped.safetensors")
    checkpoint = load_checkpoint()
    save_checkpoint(poor, scaled_model(0.5), checkpoint.normalizer)
    save_checkpoint(shipped, checkpoint.model, checkpoint.normalizer)
    return {"checkpoint": str(poor), "challenger": str(shipped)}


def ticks(n: int, streams: int = 5, seed: int = 0) -> list[list[Sample]]:
    rng = np.random.default_rng(seed)
    return [
        [
            Sample(f"s{i}", float(np.sin(t / 4 + i) + rng.normal(scale=0.1)), ts=float(t))
            for i in rng.permutation(streams)[: rng.integers(1, streams + 1)]
        ]
        for t in range(n)
    ]


def engine(challenger: torch.nn.Module | None = None, **kwargs: object) -> Engine:
    checkpoint = load_checkpoint()
    return Engine(
        copy.deepcopy(checkpoint.model), checkpoint.normalizer, challenger=challenger, **kwargs
    )


def test_a_challenger_never_changes_a_published_forecast() -> None:
    """With streams parked and restored (max_streams 2 of 5) so the challenger's states travel
    with the served ones."""
    plain = engine(max_streams=2, store=MemoryStore())
    shadowed = engine(scaled_model(), max_streams=2, store=MemoryStore())
    for samples in ticks(300):
        a, b = plain.tick(samples), shadowed.tick(samples)
        assert [(f.stream, f.prediction, f.lower, f.upper, f.anomaly) for f in a.forecasts] == [
            (f.stream, f.prediction, f.lower, f.upper, f.anomaly) for f in b.forecasts
        ]
        assert a.columns.challenger_error is None and b.columns.challenger_error is not None
    assert shadowed.evictions > 0 and shadowed.restores > 0


def test_the_same_model_as_challenger_scores_exactly_as_the_served_one() -> None:
    """Both are scored by their own forecast (the RNN reader's, before the mix); with the same
    weights the two agree bit for bit, and both differ from the published (mixed) forecast's."""
    shadowed = engine(copy.deepcopy(load_checkpoint().model))
    scored = 0
    for samples in ticks(200):
        columns = shadowed.tick(samples).columns
        assert columns.challenger_error is not None and columns.model_error is not None
        np.testing.assert_array_equal(columns.challenger_error, columns.model_error)
        scored += int(np.isfinite(columns.model_error).sum())
    assert scored > 300
    assert not np.allclose(columns.model_error, columns.error)


def test_a_challenger_is_scored_on_its_own_forecasts_and_its_states_survive_a_checkpoint() -> None:
    """Another model: other errors; stopping half-way and loading every stream's arrays (what a
    checkpoint carries) continues the challenger's errors exactly."""
    run = ticks(300)
    whole = engine(scaled_model())
    want = [whole.tick(s).columns for s in run]
    first = engine(scaled_model())
    for samples in run[:150]:
        first.tick(samples)
    arrays = first.streams.arrays()
    assert "challenger_state" in arrays
    second = engine(scaled_model())
    second.streams.load(list(first.streams.names), arrays)
    for samples, expected in zip(run[150:], want[150:], strict=True):
        got = second.tick(samples).columns
        np.testing.assert_array_equal(got.challenger_error, expected.challenger_error)
    errors = np.concatenate([c.model_error for c in want])  # type: ignore[misc]
    shadow = np.concatenate([c.challenger_error for c in want])  # type: ignore[misc]
    scored = np.isfinite(errors) & np.isfinite(shadow)
    assert not np.allclose(errors[scored], shadow[scored])


def test_the_daemon_runs_a_challenger_exports_both_and_keeps_its_states(
    broker: Broker, prefix: str, tmp_path: Path, publisher
) -> None:
    path = tmp_path / "challenger.safetensors"
    save_checkpoint(path, scaled_model(), load_checkpoint().normalizer)
    state = tmp_path / "state"
    config = daemon_config(broker, prefix, state, model={"challenger": str(path)})
    plain = daemon_config(broker, f"{prefix}-plain", tmp_path / "plain")
    values = [float(v) for v in 10 + 3 * np.sin(np.arange(80) / 3)]

    def send(topic_prefix: str, part: slice) -> None:
        for v in values[part]:
            publisher.publish(f"{topic_prefix}/sensors/s/value", repr(v), qos=1)

    with (
        Collector(broker, f"{prefix}/forecasts/+") as shadowed,
        Collector(broker, f"{prefix}-plain/forecasts/+") as alone,
    ):
        with RunningDaemon(plain):
            send(f"{prefix}-plain", slice(0, 80))
            want = alone.wait_for(80)
        with RunningDaemon(config) as running:
            send(prefix, slice(0, 40))
            shadowed.wait_for(40)
            text = running.scrape()
            rmse = metric_value(text, "forecaster_stream_model_rmse", stream="s", role="challenger")
            assert rmse > 0
            champion = metric_value(text, "forecaster_model_geo_rel_mse", role="champion")
            challenger = metric_value(text, "forecaster_model_geo_rel_mse", role="challenger")
            assert champion != challenger
            before = running.daemon.engine.streams.challenger_state[:, :1].clone()
        saved = load_checkpoint(state / "checkpoint.safetensors")
        assert torch.equal(torch.as_tensor(saved.stream_arrays["challenger_state"]), before)
        with RunningDaemon(config) as running:  # restored, not afresh
            restored = running.daemon.engine.streams.challenger_state[:, :1]
            assert torch.equal(restored, before)
            send(prefix, slice(40, 80))
            got = shadowed.wait_for(80)
    # published forecasts are those of the daemon without a challenger, restart included
    assert [f["prediction"] for f in got] == [f["prediction"] for f in want]


def test_after_a_promotion_the_challenger_forecasts_as_it_was_scored() -> None:
    """From the next sample the mix's RNN reader is the promoted model with the states it warmed:
    exactly the forecasts it was scored with in the shadow."""
    run = ticks(300)
    shadow_only, promoted = engine(scaled_model()), engine(scaled_model())
    for samples in run[:200]:
        shadow_only.tick(samples)
        promoted.tick(samples)
    promoted.promote()
    assert promoted.model_version == 1 and promoted.promotions == 1
    samples = run[200]
    shadow_only.tick(samples)
    got = promoted.tick(samples).columns
    slots = np.array([shadow_only.streams.slots[s] for s in got.streams])
    np.testing.assert_array_equal(
        promoted.streams.combiner.pred[slots, 1], shadow_only.streams.challenger_prediction[slots]
    )
    # no cold start: the served states are the ones the challenger warmed in the shadow
    n = len(promoted.streams)
    order = [shadow_only.streams.slots[name] for name in promoted.streams.names]
    shadow_states = shadow_only.streams.challenger_state[:, order]  # type: ignore[index]
    assert torch.equal(promoted.streams.state[:, :n], shadow_states)
    assert got.warm.all()


def test_a_second_promotion_is_a_rollback_and_parked_streams_follow_the_roles() -> None:
    """Three engines on the same ticks, promoting twice: unbounded, and with streams parked and
    restored across both promotions: the same forecasts; after the rollback the original model
    serves again with its states kept warm in the shadow."""
    run = ticks(400, streams=6)
    unbounded = engine(scaled_model())
    bounded = engine(scaled_model(), max_streams=2, store=MemoryStore())
    original = engine()
    for t, samples in enumerate(run):
        if t in (150, 250):
            unbounded.promote()
            bounded.promote()
        a, b = unbounded.tick(samples).columns, bounded.tick(samples).columns
        np.testing.assert_array_equal(a.prediction, b.prediction)
        np.testing.assert_array_equal(a.challenger_error, b.challenger_error)
        original.tick(samples)
    assert bounded.evictions > 0 and bounded.restores > 0
    assert unbounded.promotions == 2 and unbounded.model_version == 2
    # rolled back: the original model serves; its hidden states went on in the shadow
    served = unbounded.streams.state[:, : len(unbounded.streams)]
    slots = [original.streams.slots[name] for name in unbounded.streams.names]
    np.testing.assert_allclose(served, original.streams.state[:, slots], atol=1e-6)


def test_sigkill_after_a_promotion_replays_it_at_the_same_sample(
    broker: Broker, prefix: str, tmp_path: Path, publisher, daemons
) -> None:
    """``forecaster promote`` mid-stream, then SIGKILL before any checkpoint: the journal replay
    swaps the models after the same sample, so every forecast equals an uninterrupted run that
    promoted there; the restarted daemon goes on serving the promoted model."""
    challenger = tmp_path / "challenger.safetensors"
    save_checkpoint(challenger, scaled_model(), load_checkpoint().normalizer)
    path = write_config(
        tmp_path / "forecaster.yaml",
        broker,
        prefix,
        tmp_path / "state",
        mqtt={"qos_out": 1, "reconnect_min_delay": 0.5, "reconnect_max_delay": 1},
        state={"checkpoint_interval": 3600},
        model={"challenger": str(challenger), "promote": {"auto": False}},
    )
    values = [float(v) for v in 10 + 3 * np.sin(np.arange(100) / 4)]
    reference = engine(scaled_model())
    want = []
    for k, v in enumerate(values):
        if k == 40:
            reference.promote()
        want.append(reference.tick([Sample("s", v)]).forecasts[0].prediction)

    def send(part: slice) -> None:
        for v in values[part]:
            publisher.publish(f"{prefix}/in/s", repr(v), qos=1)

    daemon = DaemonProcess(path, tmp_path / "daemon.log")
    daemons.append(daemon)
    with Collector(broker, f"{prefix}/out/+") as out:
        daemon.start()
        wait_until(lambda: "subscribed to" in daemon.text(), "the daemon subscribed", 60)
        send(slice(0, 40))
        assert len(wait_forecasts(out, {("s", k) for k in range(1, 41)}, 30)) == 40
        done = forecaster_cli("promote", "-c", str(path))
        assert done.returncode == 0, done.stderr
        wait_until(lambda: "promote (manual)" in daemon.text(), "the promotion logged", 30)
        send(slice(40, 60))
        assert len(wait_forecasts(out, {("s", k) for k in range(1, 61)}, 30)) == 60
        daemon.kill()
        assert not (tmp_path / "state" / "checkpoint.safetensors").exists()
        daemon.start()
        send(slice(60, 90))
        wait_forecasts(out, {("s", k) for k in range(1, 91)}, 60)
        assert daemon.stop() == 0
        saved = load_checkpoint(tmp_path / "state" / "checkpoint.safetensors")
        assert saved.manifest["info"]["promotions"] == 1 and saved.model_version == 1
        daemon.start()  # from the checkpoint: the promoted model serves, nothing re-deployed
        send(slice(90, 100))
        got = wait_forecasts(out, {("s", k) for k in range(1, 101)}, 60)
        assert daemon.stop() == 0
    assert "replayed 60 journaled samples" in daemon.text()
    assert "is not the model the saved state was built with" not in daemon.text()
    for k in range(1, 101):
        assert got[("s", k)] and set(got[("s", k)]) == {want[k - 1]}, k


def test_the_daemon_promotes_on_evidence_and_rolls_back_on_request(
    broker: Broker, prefix: str, tmp_path: Path, publisher
) -> None:
    """A served model made poor (weights halved) and the shipped one as challenger: once
    ``model.promote.samples`` values show the challenger ahead by the margin, it serves (auto);
    ``rollback`` puts the poor one back; each swap counted."""
    poor = tmp_path / "poor.safetensors"
    config = daemon_config(
        broker,
        prefix,
        tmp_path / "state",
        model={**poor_served_shipped_challenging(poor), "promote": {"samples": 60}},
    )
    values = [float(v) for v in 10 + 3 * np.sin(np.arange(400) * np.pi / 20)]

    def promotions(running: RunningDaemon, action: str, trigger: str) -> float:
        labels = {"action": action, "trigger": trigger, "outcome": "done"}
        return metric_value(running.scrape(), "forecaster_model_promotions_total", 0.0, **labels)

    with Collector(broker, f"{prefix}/forecasts/+") as out, RunningDaemon(config) as running:
        for v in values[:200]:
            publisher.publish(f"{prefix}/sensors/s/value", repr(v), qos=1)
        out.wait_for(200)
        wait_until(lambda: promotions(running, "promote", "auto") == 1, "the auto promotion")
        engine = running.daemon.engine
        assert engine.model_version == 1 and engine.promotions == 1
        running.daemon.request_swap("rollback")
        wait_until(lambda: promotions(running, "rollback", "manual") == 1, "the rollback")
        assert engine.model_version == 2
        served = engine.model.state_dict()  # the poor weights again
        for name, tensor in load_checkpoint(poor).model.state_dict().items():
            assert torch.equal(served[name], tensor), name


def test_a_challenger_loads_and_changes_on_sighup(
    broker: Broker, prefix: str, tmp_path: Path, publisher
) -> None:
    """``model.challenger`` is a live key: set by a reload it runs from the next tick, its states
    afresh; a file that cannot be loaded changes nothing (``invalid``); while the challenger
    serves (promoted) a change is refused. Published forecasts never move."""
    from forecaster.config import load_config
    from tests.test_reload import edit, reloads

    good = tmp_path / "good.safetensors"
    save_checkpoint(good, scaled_model(), load_checkpoint().normalizer)
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"not a model")
    path = write_config(tmp_path / "c.yaml", broker, prefix, tmp_path / "state")
    values = [float(v) for v in 20 + 5 * np.sin(np.arange(90) / 4)]

    def send(part: slice) -> None:
        for v in values[part]:
            publisher.publish(f"{prefix}/in/s", repr(v), qos=1)

    with (
        Collector(broker, f"{prefix}/out/+") as out,
        RunningDaemon(load_config(path)) as running,
    ):
        send(slice(0, 30))
        out.wait_for(30)
        edit(path, "model", challenger=str(good))
        running.daemon.request_reload(path)
        wait_until(lambda: reloads(running, "applied") == 1, "the challenger loaded")
        engine = running.daemon.engine
        assert engine.challenger is not None and engine.challenger_epoch == 1
        send(slice(30, 60))
        out.wait_for(60)
        text = running.scrape()
        assert metric_value(text, "forecaster_stream_model_rmse", stream="s", role="challenger") > 0
        edit(path, "model", challenger=str(broken))
        running.daemon.request_reload(path)
        wait_until(lambda: reloads(running, "invalid") == 1, "the broken file refused")
        assert engine.challenger_epoch == 1 and running.daemon.config.model.challenger == good
        running.daemon.request_swap("promote")
        wait_until(lambda: engine.promotions == 1, "the promotion")
        edit(path, "model", challenger=None)
        running.daemon.request_reload(path)
        wait_until(lambda: reloads(running, "refused") == 1, "a change refused while promoted")
        running.daemon.request_swap("rollback")
        wait_until(lambda: engine.promotions == 2, "the rollback")
        running.daemon.request_reload(path)
        wait_until(lambda: reloads(running, "applied") == 2, "the challenger dropped")
        assert engine.challenger is None
        send(slice(60, 90))
        got = out.wait_for(90)
        text = running.scrape()  # no challenger: no model comparison left standing
        for role in ("champion", "challenger"):
            with pytest.raises(AssertionError, match="no series"):
                metric_value(text, "forecaster_stream_model_rmse", stream="s", role=role)
            with pytest.raises(AssertionError, match="no series"):
                metric_value(text, "forecaster_model_geo_rel_mse", role=role)
    # the two swaps aside (the challenger served for no sample), the forecasts are those of the
    # shipped model alone
    np.testing.assert_allclose(
        [f["prediction"] for f in got], offline_predictions(values, "s"), atol=1e-5
    )


def test_a_new_challenger_starts_afresh_for_parked_streams_too() -> None:
    """Another challenger set mid-run: resident streams' challenger states start afresh at once,
    parked ones' when they return, so a bounded engine scores it exactly as an unbounded one."""
    run = ticks(300, streams=6)
    unbounded = engine(scaled_model())
    bounded = engine(scaled_model(), max_streams=2, store=MemoryStore())
    for t, samples in enumerate(run):
        if t == 150:
            for e in (unbounded, bounded):
                e.set_challenger(scaled_model(0.7))
        a, b = unbounded.tick(samples).columns, bounded.tick(samples).columns
        np.testing.assert_array_equal(a.challenger_error, b.challenger_error)
        np.testing.assert_array_equal(a.prediction, b.prediction)
    assert bounded.restores > 0 and bounded.challenger_epoch == 1


def test_a_refused_automatic_promotion_waits_for_new_evidence(
    broker: Broker, prefix: str, tmp_path: Path, publisher
) -> None:
    """With online learning on a swap is refused; the automatic rule then gathers
    ``model.promote.samples`` values again before it tries (and logs) once more."""
    poor = tmp_path / "poor.safetensors"
    config = daemon_config(
        broker,
        prefix,
        tmp_path / "state",
        model={**poor_served_shipped_challenging(poor), "promote": {"samples": 40}},
        online_learning={"enabled": True},
    )
    values = [float(v) for v in 10 + 3 * np.sin(np.arange(200) * np.pi / 20)]
    labels = {"action": "promote", "trigger": "auto", "outcome": "refused"}
    with Collector(broker, f"{prefix}/forecasts/+") as out, RunningDaemon(config) as running:
        for v in values:
            publisher.publish(f"{prefix}/sensors/s/value", repr(v), qos=1)
        out.wait_for(200)

        def refused() -> float:
            text = running.scrape()
            return metric_value(text, "forecaster_model_promotions_total", 0.0, **labels)

        wait_until(lambda: refused() >= 1, "a refused automatic promotion")
        first = refused()
        time.sleep(1.0)  # several loop turns with no new values: no new try
        assert refused() == first <= 200 / 40
        assert running.daemon.engine.promotions == 0
