"""``forecaster bench challenger``: a challenger trained on a new regime runs in the shadow across
the drift benchmark's regime change and is promoted automatically on the live evidence
(``model.promote``'s defaults); and what running a challenger costs per tick."""

from __future__ import annotations

import copy
import json
import time

import numpy as np

from forecaster.progress import progress_bar


def train_for_new_regime(seed: int, samples: int = 20_000) -> object:
    """The shipped model fine-tuned by the daemon's own learner on the post-switch regime (a run
    of it with another noise seed): what a user would train offline for the new regime."""
    from forecaster.bench.drift import drift_signal
    from forecaster.config import OnlineLearningConfig
    from forecaster.evaluate import run_series
    from forecaster.persist import load_checkpoint

    shipped = load_checkpoint()
    run = run_series(
        drift_signal(0, samples, seed + 1),
        shipped.model,
        shipped.normalizer,
        learn=OnlineLearningConfig(enabled=True, seed=seed),
    )
    assert run.learner is not None
    return run.learner.engine.model


def bench_challenger(
    before: int = 4000, after: int = 6000, seed: int = 0, streams: int = 1000, ticks: int = 200
) -> dict[str, float | int | None]:
    from forecaster.bench.drift import drift_signal
    from forecaster.config import PromoteConfig
    from forecaster.engine import Engine
    from forecaster.evaluate import run_series
    from forecaster.lifecycle import due
    from forecaster.persist import load_checkpoint
    from forecaster.records import Sample

    shipped = load_checkpoint()
    challenger = train_for_new_regime(seed)
    values = drift_signal(before, after, seed)
    rule = PromoteConfig()
    engine = Engine(copy.deepcopy(shipped.model), shipped.normalizer, challenger=challenger)
    engine.shadow_halflife = float(rule.samples)
    promoted: int | None = None
    served = np.empty(len(values))
    for t, value in enumerate(progress_bar(values, desc="shadow", leave=False)):
        if promoted is None and due(engine, rule):
            engine.promote()
            promoted = t
        served[t] = engine.tick([Sample("s", float(value), ts=float(t))]).forecasts[0].prediction
    alone = run_series(values, challenger, shipped.normalizer, progress=False).predictions  # type: ignore[arg-type]

    def mse(predictions: np.ndarray, start: int) -> float:
        return float(np.mean((values[start + 1 :] - predictions[start:-1]) ** 2))

    start = promoted if promoted is not None else len(values) - 1
    return {
        "switch_at": before,
        "promoted_at": promoted,
        "promoted_after_samples": None if promoted is None else promoted - before,
        "mse_after_promotion": None if promoted is None else mse(served, start),
        "mse_challenger_alone": mse(alone, start),
        "cost_ratio": tick_cost_ratio(shipped, challenger, streams, ticks),
    }


def tick_cost_ratio(shipped: object, challenger: object, streams: int, ticks: int) -> float:
    """Tick time with a challenger / without, ``streams`` streams a tick, timed side by side
    (alternating ticks, so the machine's load falls on both alike); median of each."""
    from forecaster.engine import Engine
    from forecaster.records import Batch

    rng = np.random.default_rng(0)
    engines = [
        Engine(copy.deepcopy(shipped.model), shipped.normalizer),  # type: ignore[attr-defined]
        Engine(
            copy.deepcopy(shipped.model),  # type: ignore[attr-defined]
            shipped.normalizer,  # type: ignore[attr-defined]
            challenger=copy.deepcopy(challenger),  # type: ignore[arg-type]
        ),
    ]
    names = [f"s{i}" for i in range(streams)]
    times: list[list[float]] = [[], []]
    for t in range(ticks + 20):
        values = np.sin(t / 5 + np.arange(streams)) + 0.1 * rng.standard_normal(streams)
        batch = Batch(names, values, np.full(streams, float(t)), np.full(streams, -1))
        for i, engine in enumerate(engines):
            started = time.perf_counter()
            engine.tick_batch(batch)
            if t >= 20:  # past the warm-up (allocation, first forecasts)
                times[i].append(time.perf_counter() - started)
    return float(np.median(times[1]) / np.median(times[0]))


def print_challenger(result: dict[str, object], as_json: bool) -> None:
    if as_json:
        print(json.dumps(result))
        return
    for key, value in result.items():
        print(f"{key:>24}: {value}")
