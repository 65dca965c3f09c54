"""``model.device: cuda``: the engine, the learner and the daemon on a GPU, against the CPU.

Runs where torch sees a CUDA device (``make test`` on a GPU machine); skipped elsewhere, so the
suite stays the same on CPU-only machines.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch

from forecaster.combine import CombinerConfig
from forecaster.config import OnlineLearningConfig
from forecaster.engine import Engine
from forecaster.evaluate import rolling_mse, run_series
from forecaster.persist import load_checkpoint
from forecaster.records import Batch
from forecaster.train import train_seed
from simulators.signals import sine_wave
from simulators.sine import SineSpec, SineStreams, publish_sine
from tests.conftest import Broker, Collector
from tests.helpers import RunningDaemon, daemon_config, metric_value, wait_until

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def test_an_engine_on_cuda_forecasts_what_the_cpu_does() -> None:
    checkpoint = load_checkpoint()
    cpu = Engine(copy.deepcopy(checkpoint.model), checkpoint.normalizer)
    gpu = Engine(copy.deepcopy(checkpoint.model), checkpoint.normalizer, device="cuda")
    assert gpu.streams.state.is_cuda
    rng = np.random.default_rng(0)
    names = [f"s{i}" for i in range(64)]
    phase = rng.uniform(0, 2 * np.pi, len(names))
    worst = 0.0
    for t in range(300):
        values = np.sin(np.pi * t / 20 + phase) + 0.05 * rng.standard_normal(len(names))
        a = cpu.tick_batch(Batch.of(names, values)).forecasts.prediction
        b = gpu.tick_batch(Batch.of(names, values)).forecasts.prediction
        assert np.isfinite(b).all()
        worst = max(worst, float(np.max(np.abs(a - b))))
    assert worst < 1e-4, worst  # float rounding of a different device only (2.4e-6 on an H200)


def test_online_learning_on_cuda_fine_tunes_the_seed_model() -> None:
    seed = train_seed(steps=100, seed=0, progress=False)
    values = sine_wave(5000, freq_scale=3.0)
    rnn_only = CombinerConfig(enabled=False)  # the RNN's own forecasts: what learning changes
    run = run_series(
        values,
        seed.model,
        seed.normalizer,
        device="cuda",
        progress=False,
        learn=OnlineLearningConfig(enabled=True),
        combine=rnn_only,
    )
    on = rolling_mse(run)
    assert on[300] > 0.01 and on[-1] <= on[300] / 10
    assert run.learner is not None and run.learner.stats.updates > 0


def test_a_daemon_on_cuda_serves_learns_and_checkpoints_for_the_cpu(
    broker: Broker, prefix: str, tmp_path: Path, publisher
) -> None:
    learn = {"enabled": True, "update_every": 8, "window": 16, "warmup": 5}
    config = daemon_config(
        broker, prefix, tmp_path / "state", model={"device": "cuda"}, online_learning=learn
    )
    streams = SineStreams(SineSpec(streams=2, seed=7, freq_scale=(2.5, 3.0)))
    topic = f"{prefix}/sensors/{{stream}}/value"
    with Collector(broker, f"{prefix}/forecasts/+") as collector:
        with RunningDaemon(config) as running:
            assert running.daemon.keeper.engine is not None
            assert running.daemon.keeper.engine.streams.state.is_cuda
            publish_sine(publisher, streams, rate=200, count=300, topic=topic, qos=1)
            forecasts = collector.wait_for(600)
            assert all(np.isfinite(f["prediction"]) for f in forecasts)
            wait_until(
                lambda: metric_value(running.scrape(), "forecaster_learning_updates_total") >= 1,
                "a learning update on the GPU",
            )
        saved = load_checkpoint(tmp_path / "state" / "checkpoint.safetensors")  # on the CPU
        assert saved.model_version == running.daemon.learner.version > 0
        with RunningDaemon(config) as again:  # resumes on the GPU where it stopped
            assert again.daemon.learner is not None
            assert again.daemon.learner.version == saved.model_version
            publish_sine(publisher, streams, rate=200, count=50, topic=topic, qos=1)
            more = collector.wait_for(700)
            assert min(f["model_version"] for f in more[600:]) >= saved.model_version
