"""A new model by restart: with another ``model.checkpoint`` than the one the saved state was built
under, the daemon serves the new weights (never silently the old ones), re-warms every hidden state
(forecasts say ``warm: false`` meanwhile, parked streams too when they return) and keeps the rest;
another architecture is refused with a message naming both."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch

from forecaster.engine import Engine
from forecaster.errors import ConfigError
from forecaster.model import Forecaster, ModelConfig
from forecaster.persist import load_checkpoint, save_checkpoint
from forecaster.records import Batch
from forecaster.store import MemoryStore
from tests.conftest import Broker, Collector
from tests.helpers import RunningDaemon, daemon_config, offline_predictions, restarted

REWARM = 20  # engine.gaps.rewarm_samples' default


def other_weights(path: Path, scale: float = 0.9) -> Path:
    """The shipped model with its weights scaled: same architecture, other forecasts."""
    checkpoint = load_checkpoint()
    with torch.no_grad():
        for parameter in checkpoint.model.parameters():
            parameter.mul_(scale)
    save_checkpoint(path, checkpoint.model, checkpoint.normalizer)
    return path


def test_a_restart_with_another_model_serves_it_and_rewarms(
    broker: Broker, prefix: str, tmp_path: Path, publisher, caplog
) -> None:
    state = tmp_path / "state"
    values = [float(v) for v in 10 + 3 * np.sin(np.arange(60) / 3)]
    first = daemon_config(broker, prefix, state)
    second = daemon_config(
        broker, prefix, state, model={"checkpoint": str(other_weights(tmp_path / "b.safetensors"))}
    )

    def send(part: slice) -> None:
        for v in values[part]:
            publisher.publish(f"{prefix}/sensors/s/value", repr(v), qos=1)

    with Collector(broker, f"{prefix}/forecasts/+") as out:
        with RunningDaemon(first):
            send(slice(0, 30))
            out.wait_for(30)
        with RunningDaemon(second) as running:
            engine = running.daemon.engine
            assert engine is not None and engine.model_epoch == 1
            assert "is not the model the saved state was built with" in caplog.text
            send(slice(30, 60))
            got = out.wait_for(60)
        caplog.clear()
        with RunningDaemon(second) as running:  # the same model again: nothing to deploy
            assert running.daemon.engine.model_epoch == 1
            assert "is not the model" not in caplog.text
    assert [f["seq"] for f in got] == list(range(1, 61))
    assert [f["warm"] for f in got] == [True] * 30 + [False] * REWARM + [True] * (30 - REWARM)
    served = [f["prediction"] for f in got[30:]]
    assert not np.allclose(served, offline_predictions(values, "s")[30:], atol=1e-3)


def test_another_architecture_is_refused_naming_both(
    broker: Broker, prefix: str, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    with RunningDaemon(daemon_config(broker, prefix, state)):
        pass  # a state folder built with the shipped RNN
    gru = tmp_path / "gru.safetensors"
    save_checkpoint(gru, Forecaster(ModelConfig("gru", 8, 1)), load_checkpoint().normalizer)
    config = daemon_config(broker, prefix, state, model={"checkpoint": str(gru)})
    with pytest.raises(ConfigError, match="another architecture"):
        RunningDaemon(config)


def test_a_parked_stream_rewarms_when_it_returns_after_a_new_model() -> None:
    checkpoint = load_checkpoint()
    engine = Engine(checkpoint.model, checkpoint.normalizer, max_streams=1, store=MemoryStore())
    engine.tick_batch(Batch.of(["a", "b"], [1.0, 2.0]))  # b stays, a is parked
    weights = {k: v * 0.9 for k, v in checkpoint.model.state_dict().items()}
    engine.deploy(weights, version=1, rewarm=2)
    warm = [engine.tick_batch(Batch.of(["a"], [1.5])).forecasts.warm[0] for _ in range(3)]
    assert warm == [False, False, True]
    assert engine.streams.epoch[engine.streams.slots["a"]] == 1


def test_a_restart_mid_rewarm_flags_what_an_uninterrupted_run_does(tmp_path: Path) -> None:
    checkpoint = load_checkpoint()
    engine = Engine(copy.deepcopy(checkpoint.model), checkpoint.normalizer)
    engine.tick_batch(Batch.of(["a"], [1.0]))
    weights = {k: v * 0.9 for k, v in checkpoint.model.state_dict().items()}
    engine.deploy(weights, version=1, rewarm=4)
    for value in (1.1, 1.2):  # two of the four still owed
        engine.tick_batch(Batch.of(["a"], [value]))
    restored = restarted(engine, tmp_path / "c.safetensors")
    rest = [1.3, 1.4, 1.5, 1.6]
    got = [restored.tick_batch(Batch.of(["a"], [v])).forecasts.warm[0] for v in rest]
    want = [engine.tick_batch(Batch.of(["a"], [v])).forecasts.warm[0] for v in rest]
    assert want == [False, False, True, True]
    assert got == want
