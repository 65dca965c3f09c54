from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from forecaster.combine import CombinerConfig
from forecaster.evaluate import run_series, score
from forecaster.model import ModelConfig
from forecaster.persist import load_checkpoint
from forecaster.train import Recipe, train_default, train_seed
from simulators.signals import sine_wave


def test_seed_recipe_is_the_tutorials_experiment() -> None:
    result = train_seed(steps=100, seed=0, progress=False)
    assert len(result.losses) == 100
    assert result.normalizer.kind == "none"
    assert np.mean(result.losses[-10:]) < np.mean(result.losses[:10]) / 10
    assert result.recipe == {"name": "seed", "seed": 0, "steps": 100, "lr": 0.01, "window": 20}


def test_train_command_writes_checkpoint_and_plot(tmp_path: Path) -> None:
    out, plot = tmp_path / "seed.safetensors", tmp_path / "seed.png"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "forecaster.cli",
            "train",
            "--recipe",
            "seed",
            "--out",
            str(out),
            "--plot",
            str(plot),
            "--progress",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "train seed" in result.stderr  # the progress bar, asked for (stderr is not a terminal)
    checkpoint = load_checkpoint(out)
    assert checkpoint.manifest["recipe"]["name"] == "seed"
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_train_steps_counts_optimizer_steps(tmp_path: Path) -> None:
    """``--steps 5`` runs 5 optimizer steps, also for the default recipe (12 windows an
    episode): it used to count episodes there (60 steps). Piped, no progress bar."""
    out = tmp_path / "m.safetensors"
    result = subprocess.run(
        [
            *(sys.executable, "-m", "forecaster.cli", "train", "--steps", "5"),
            *("--hidden-size", "4", "--out", str(out)),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "(5 optimizer steps," in result.stdout
    assert "train:" not in result.stderr
    checkpoint = load_checkpoint(out)
    assert checkpoint.manifest["info"]["steps"] == 5
    assert checkpoint.manifest["recipe"]["episodes"] == 1


def test_steps_stop_mid_episode_and_across_episodes() -> None:
    recipe = Recipe(streams=4, length=120, window=30)  # 4 windows an episode
    for steps, episodes in [(3, 1), (4, 1), (9, 3)]:
        result = train_default(recipe, ModelConfig("rnn", 4, 1), progress=False, steps=steps)
        assert len(result.losses) == steps
        assert result.recipe["episodes"] == episodes


def test_default_recipe_learns_on_a_tiny_budget() -> None:
    recipe = Recipe(episodes=6, streams=16, length=240, window=40)
    result = train_default(recipe, ModelConfig("gru", 8, 1), progress=False)
    assert all(np.isfinite(result.losses))
    assert np.mean(result.losses[-6:]) < np.mean(result.losses[:6])
    assert result.recipe["episodes"] == 6


def test_training_is_deterministic_for_a_seed() -> None:
    recipe = Recipe(episodes=2, streams=8, length=120, window=30)
    a = train_default(recipe, ModelConfig("rnn", 8, 1), progress=False)
    b = train_default(recipe, ModelConfig("rnn", 8, 1), progress=False)
    assert a.losses == b.losses


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_default_recipe_trains_a_model_that_meets_the_sine_goals() -> None:
    """`forecaster train --seed 1` (~6 min) trains a model that, served alone (no readers beside
    it), meets the sine goals the shipped one meets (docs/accuracy.md). It checks quality, not
    bytes: the shipped weights came from an earlier version of the training code, and seed 1
    no longer reproduces them (clean 9.5e-5 against the shipped 4.2e-5, noisy 0.01192 against
    0.01194)."""
    result = train_default(Recipe(seed=1), progress=False)
    shipped = load_checkpoint()
    assert shipped.manifest["recipe"] == result.recipe
    alone = CombinerConfig(enabled=False)
    clean = score(
        run_series(sine_wave(2000), result.model, result.normalizer, progress=False, combine=alone)
    )
    noisy = score(
        run_series(
            sine_wave(2000, noise=0.1),
            result.model,
            result.normalizer,
            progress=False,
            combine=alone,
        )
    )
    assert clean.mse <= 1e-4
    assert noisy.mse <= 0.012
