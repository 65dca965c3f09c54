"""Offline training on sine signals: the seed's experiment, and the recipe behind the shipped model.

``seed`` reproduces the tutorial exactly: one sine, 20 samples per half period, 20-sample windows
advancing by pi, hidden state carried (detached) from window to window, MSE, Adam lr 0.01, 100 steps,
raw values (no normalisation). ``default`` generalises it: many random sine-like streams per batch,
each passed through the same online normaliser the engine serves with, so that the model learns the
``z`` frame it will be fed live; truncated BPTT over long streams with the state carried across
windows, so the model learns to run indefinitely from a zero state.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from forecaster.model import Forecaster, ModelConfig
from forecaster.normalize import NormalizerConfig, normalize_series
from forecaster.persist import save_checkpoint
from forecaster.progress import progress_bar
from simulators.signals import random_sines

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Recipe:
    """Every knob of a training run; stored verbatim in the checkpoint's manifest."""

    name: str = "default"
    seed: int = 0
    episodes: int = 1000  # fresh random streams per episode
    streams: int = 64  # streams per batch
    length: int = 2400  # samples per stream and episode
    window: int = 200  # truncated-BPTT window (long: noise filtering needs a long memory)
    warmup: int = 20  # first samples of each stream not scored (normaliser warm-up)
    lr: float = 0.01
    lr_final: float = 5e-5  # cosine decay target
    clip: float = 1.0
    freq_low: float = 0.4  # x the seed's frequency
    freq_high: float = 2.5
    max_noise: float = 0.3
    clean_share: float = 0.2
    switch_share: float = 0.1


@dataclass
class TrainResult:
    model: Forecaster
    normalizer: NormalizerConfig
    recipe: dict[str, Any]
    losses: list[float]


def train_seed(steps: int = 100, seed: int = 0, progress: bool = True) -> TrainResult:
    """The tutorial, step for step: window i covers [i*pi, (i+1)*pi] in 21 points."""
    torch.manual_seed(seed)
    model = Forecaster(ModelConfig("rnn", 32, 1))
    criterion = nn.MSELoss()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    hidden = None
    losses = []
    for step in progress_bar(range(steps), desc="train seed", disable=not progress):
        data = np.sin(np.linspace(step * np.pi, (step + 1) * np.pi, 21))
        x = torch.tensor(data[:-1], dtype=torch.float32).view(1, 20, 1)  # (B=1, T=20, 1)
        y = torch.tensor(data[1:], dtype=torch.float32).view(1, 20, 1)
        prediction, hidden = model(x, hidden)
        hidden = hidden.detach()
        loss = criterion(prediction, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    recipe = {"name": "seed", "seed": seed, "steps": steps, "lr": 0.01, "window": 20}
    return TrainResult(model.eval(), NormalizerConfig(kind="none"), recipe, losses)


def train_default(
    recipe: Recipe | None = None,
    model_config: ModelConfig | None = None,
    normalizer: NormalizerConfig | None = None,
    progress: bool = True,
    steps: int | None = None,
) -> TrainResult:
    """Random sine-like streams, normalised online, truncated BPTT with a carried state.

    One optimizer step per window, ``length // window`` per episode. ``steps`` stops after that
    many optimizer steps (the learning rate decays over them), for a run shorter than an episode
    or not a whole number of them; the recipe then records the episodes begun.
    """
    recipe = recipe or Recipe()
    windows = recipe.length // recipe.window
    if steps is not None:
        recipe = replace(recipe, episodes=math.ceil(steps / windows))
    normalizer = normalizer or NormalizerConfig()
    torch.manual_seed(recipe.seed)
    rng = np.random.default_rng(recipe.seed)
    model = Forecaster(model_config or ModelConfig())
    optimizer = torch.optim.Adam(model.parameters(), lr=recipe.lr)
    total = recipe.episodes * windows if steps is None else steps
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, total, eta_min=recipe.lr_final)
    losses: list[float] = []
    bar = progress_bar(total=total, desc="train", disable=not progress)
    for _ in range(recipe.episodes):
        raw = random_sines(
            recipe.streams,
            recipe.length + 1,
            rng,
            freq_range=(recipe.freq_low, recipe.freq_high),
            max_noise=recipe.max_noise,
            clean_share=recipe.clean_share,
            switch_share=recipe.switch_share,
        )
        z, target = normalize_series(raw, normalizer)  # (B, T + 1) each
        x = torch.tensor(z[:, :-1], dtype=torch.float32).unsqueeze(-1)  # (B, T, 1)
        y = torch.tensor(target[:, :-1], dtype=torch.float32).unsqueeze(-1)  # (B, T, 1)
        mask = torch.ones_like(y)  # (B, T, 1): 0 during the normaliser's warm-up
        mask[:, : recipe.warmup] = 0.0
        state = None
        for w in range(min(windows, total - len(losses))):
            span = slice(w * recipe.window, (w + 1) * recipe.window)
            prediction, state = model(x[:, span], state)
            state = state.detach()
            loss = ((prediction - y[:, span]) ** 2 * mask[:, span]).sum() / mask[:, span].sum()
            optimizer.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), recipe.clip)
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
            bar.update()
            bar.set_postfix(loss=f"{np.mean(losses[-windows:]):.4g}")
    bar.close()
    return TrainResult(model.eval(), normalizer, asdict(recipe), losses)


def save_result(result: TrainResult, path: Path) -> None:
    save_checkpoint(
        path,
        result.model,
        result.normalizer,
        recipe=result.recipe,
        info={"final_loss": float(np.mean(result.losses[-20:])), "steps": len(result.losses)},
    )


def plot_training(result: TrainResult, path: Path) -> None:
    """Loss curve, and prediction vs actual on the seed's sine after training."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from forecaster.evaluate import run_series
    from simulators.signals import sine_wave

    values = sine_wave(200)
    run = run_series(values, result.model, result.normalizer, progress=False)
    fig, (ax_loss, ax_fit) = plt.subplots(2, 1, figsize=(10, 7))
    ax_loss.semilogy(result.losses, lw=0.8)
    r = result.recipe
    if r.get("name") == "seed":
        per_step, unit = "one 20-sample window of the sine", "MSE"
    else:
        per_step = f"one {r.get('window')}-sample window of {r.get('streams')} streams"
        unit = "MSE (normalised units)"
    ax_loss.set(
        title=f"training loss ({r.get('name')}): {len(result.losses)} optimizer steps",
        xlabel=f"optimizer step ({per_step})",
        ylabel=unit,
    )
    ax_fit.plot(values, label="actual", lw=1.5)
    ax_fit.plot(np.arange(1, len(values) + 1), run.predictions, "--", label="prediction", lw=1.2)
    ax_fit.set(
        title="one-step-ahead prediction on the seed's sine", xlabel="sample", ylabel="value"
    )
    ax_fit.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
