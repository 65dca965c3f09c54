"""Online learning, driven synchronously as `forecaster evaluate --learn` drives it."""

from __future__ import annotations

import math

import numpy as np
import torch

from forecaster.combine import CombinerConfig
from forecaster.config import OnlineLearningConfig
from forecaster.engine import Engine
from forecaster.evaluate import SeriesRun, rolling_mse, run_series, score
from forecaster.learner import Learner
from forecaster.model import Forecaster, ModelConfig
from forecaster.normalize import NormalizerConfig
from forecaster.records import Sample
from forecaster.train import train_seed
from simulators.signals import sine_wave

LEARN = OnlineLearningConfig(enabled=True)


def test_fine_tunes_the_seed_model_to_three_times_its_frequency() -> None:
    seed = train_seed(steps=100, seed=0, progress=False)
    values = sine_wave(5000, freq_scale=3.0)
    rnn_only = CombinerConfig(enabled=False)  # the RNN's own forecasts: what learning changes
    off = rolling_mse(
        run_series(values, seed.model, seed.normalizer, progress=False, combine=rnn_only)
    )
    run = run_series(
        values, seed.model, seed.normalizer, progress=False, learn=LEARN, combine=rnn_only
    )
    on = rolling_mse(run)
    assert on[300] > 0.01  # the seed model does not know this frequency ...
    assert on[-1] <= on[300] / 10  # ... and learns it: the rolling MSE falls at least 10x
    assert off[-1] > 10 * on[-1]
    assert run.versions is not None and run.versions[-1] > run.versions[0] == 0
    stats = run.learner.stats if run.learner else None
    assert stats is not None and stats.updates + stats.rollbacks == run.versions[-1]


def test_random_weights_learn_a_sine_online() -> None:
    torch.manual_seed(0)
    model = Forecaster(ModelConfig())
    values = sine_wave(20_000)
    run = run_series(values, model, NormalizerConfig(), progress=False, learn=LEARN)
    tail = SeriesRun(run.values[-2000:], run.predictions[-2000:])
    assert score(tail, warmup=0.0).skill >= 0.9


def test_learning_is_deterministic_for_a_seed() -> None:
    seed = train_seed(steps=30, seed=0, progress=False)
    values = sine_wave(1500, freq_scale=2.0, noise=0.05)
    a = run_series(values, seed.model, seed.normalizer, progress=False, learn=LEARN)
    b = run_series(values, seed.model, seed.normalizer, progress=False, learn=LEARN)
    assert np.array_equal(a.predictions, b.predictions)


def _learner_with_windows(tiny_model: Forecaster) -> tuple[Engine, Learner]:
    engine = Engine(tiny_model, NormalizerConfig())
    learner = Learner(
        engine, OnlineLearningConfig(enabled=True, window=8, update_every=10**9, warmup=2)
    )
    for v in sine_wave(200):
        engine.tick([Sample("a", float(v))])
    return engine, learner


def test_windows_start_from_the_states_the_trained_weights_make(any_cell_model: Forecaster) -> None:
    engine = Engine(any_cell_model, NormalizerConfig())
    config = OnlineLearningConfig(
        enabled=True,
        window=8,
        update_every=10**9,
        warmup=2,
        streams_per_update=10**6,
        refresh_states=True,
    )
    learner = Learner(engine, config)
    for a, b in zip(sine_wave(200), sine_wave(200, freq_scale=2.0, noise=0.1), strict=True):
        engine.tick([Sample("a", float(a)), Sample("b", float(b))])
    picks = learner.pick_windows()
    assert len(picks) == 2 and all(p.chosen == list(range(len(p.chain))) for p in picks)
    batch = learner.make_batch(picks)
    stored = torch.stack([p.chain[i].start_state for p in picks for i in p.chosen], dim=1)
    # Same weights as served: running the chains reproduces the engine's states, window by window.
    assert torch.allclose(learner.start_states(learner.model, batch), stored, atol=1e-5)
    with torch.no_grad():
        for weight in learner.model.rnn.parameters():
            weight.mul_(1.5)
    moved = learner.start_states(learner.model, batch)
    first = torch.tensor([i == 0 for i in batch.at[1]])
    assert torch.equal(moved[:, first], stored[:, first])  # a chain's start: the stored state
    assert not torch.allclose(moved[:, ~first], stored[:, ~first], atol=1e-3)  # then the new ones'
    # A burn-in of one window: window i's state is window i-1 run from its own stored state.
    learner.config = config.model_copy(update={"refresh_windows": 1})
    one = learner.start_states(learner.model, learner.make_batch(picks))
    chain = picks[0].chain
    with torch.no_grad():
        _, expected = learner.model(
            torch.tensor(chain[4].inputs).view(1, -1, 1), chain[4].start_state.unsqueeze(1)
        )
    assert torch.allclose(one[:, 5], expected[:, 0], atol=1e-6)
    learner.config = config.model_copy(update={"refresh_states": False})
    assert torch.equal(learner.start_states(learner.model, batch), stored)  # off: the stored ones


def test_without_refreshed_states_a_batch_has_no_burn_in(tiny_model: Forecaster) -> None:
    """``refresh_states`` off: no windows to re-run, so the burn-in tensors are empty."""
    engine = Engine(tiny_model, NormalizerConfig())
    config = OnlineLearningConfig(
        enabled=True, window=8, update_every=10**9, warmup=2, refresh_states=False
    )
    learner = Learner(engine, config)
    for v in sine_wave(200):
        engine.tick([Sample("a", float(v))])
    batch = learner.make_batch(learner.pick_windows())
    n = batch.x.shape[0]
    assert n > 0
    assert batch.burn_x.shape == (n, 0, 1) and batch.burn_x.dtype == torch.float32
    assert batch.burn_mask.shape == (n, 0)
    assert torch.equal(batch.burn_h0, batch.h0)
    assert torch.equal(learner.start_states(learner.model, batch), batch.h0)


def test_nan_in_a_training_window_never_changes_the_weights(tiny_model: Forecaster) -> None:
    _engine, learner = _learner_with_windows(tiny_model)
    learner.ready[0][-1].inputs[3] = math.nan
    learner.ready[0][-1].targets[5] = math.inf
    before = {k: v.clone() for k, v in learner.model.state_dict().items()}
    optimizer_before = str(learner.optimizer.state_dict())
    for _ in range(5):
        windows = learner.pick_windows()
        assert not torch.isfinite(learner.make_batch(windows).x).all()
        assert learner.train_step(windows) is None
    after = learner.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # byte-identical
    assert str(learner.optimizer.state_dict()) == optimizer_before
    assert learner.stats.skipped_nonfinite == 5 and learner.stats.updates == 0


def test_a_bad_update_is_rolled_back_and_the_error_recovers() -> None:
    seed = train_seed(steps=100, seed=0, progress=False)
    engine = Engine(seed.model, seed.normalizer)
    learner = Learner(engine, OnlineLearningConfig(enabled=True, lr=1e-3, rollback_samples=200))
    values = sine_wave(6000)
    errors = np.full(len(values), np.nan)
    injected_at = None
    for t, value in enumerate(values):
        forecast = engine.tick([Sample("a", float(value))]).forecasts[0]
        errors[t] = (forecast.error or 0.0) ** 2
        if t == 2000:  # one deliberately bad update: learning rate 10
            learner.lr, injected_at = 10.0, learner.version
        learner.after_tick()
        if injected_at is not None and learner.version == injected_at + 1 and learner.lr == 10.0:
            learner.lr = 1e-3  # back to normal for the updates after the bad one
    earlier = errors[1500:2000].mean()
    assert learner.stats.rollbacks >= 1
    assert errors[2000:2600].max() > 100 * earlier  # the bad update did hurt ...
    assert errors[-500:].mean() <= 2 * earlier  # ... and the error is back to its earlier level
