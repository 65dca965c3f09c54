"""Online fine-tuning off the hot path: windows, truncated BPTT, clipping, rollback guard.

The engine reports every batched step (``StepRecord``); the learner cuts each stream's normalised
inputs into windows of ``window`` samples, each with the hidden state the engine had at its start
and the targets the engine later scored. Every ``update_every`` samples it trains a copy of the
model on a minibatch of recent windows — on a background thread in the daemon, inline in
``forecaster evaluate --learn`` — and hands the new weights over; the engine swaps them between
ticks, so a forecast never waits for a backward pass.

With ``refresh_states`` on, before each step the trainer recomputes every chosen window's start
state with the weights it is about to train: it runs the ``refresh_windows`` kept windows before
it (no gradient) from the state stored with the first of them, a burn-in as in R2D2's recurrent
replay (Kapturowski et al., 2019). The stored states were made by older weights; training from
them teaches the model to continue states it no longer produces, and after a drift, while the
weights move fast, that mismatch kept the rolling error above twice its earlier level for ~2,900
samples, against ~1,700 with the states refreshed (docs/online-learning.md).

Guards: a step whose loss or gradient is not finite is skipped before the optimizer touches
anything (weights stay byte-identical); an update after which the error grows beyond
``rollback_factor`` times its earlier level for ``rollback_samples`` samples is rolled back to the
last good weights and the learning rate is cut; when training falls behind, updates are skipped
(at most one is ever in flight) and counted.
"""

from __future__ import annotations

import copy
import logging
import math
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from forecaster.config import OnlineLearningConfig
from forecaster.engine import Engine, StepRecord
from forecaster.runtime import tune_learner_thread

log = logging.getLogger(__name__)


@dataclass
class Window:
    """One stream's inputs, the targets scored for them, and the state at the window's start."""

    start_state: torch.Tensor  # (num_layers, width)
    inputs: list[float] = field(default_factory=list)
    targets: list[float] = field(default_factory=list)


@dataclass
class LearnerStats:
    updates: int = 0
    skipped_nonfinite: int = 0
    skipped_behind: int = 0
    failed: int = 0  # a step raised (a bug or a device error): logged with its traceback
    rollbacks: int = 0
    last_loss: float = math.nan


@dataclass
class Pick:
    """Windows chosen from one stream: its kept windows up to the last chosen one (oldest
    first, contiguous) and the chosen ones' indices in that list."""

    chain: list[Window]
    chosen: list[int]


@dataclass
class Batch:
    x: torch.Tensor  # (B, window, 1)
    y: torch.Tensor  # (B, window, 1)
    h0: torch.Tensor  # (num_layers, B, width): the states stored with the chosen windows
    burn_x: torch.Tensor  # (B, K * window, 1): the K windows before each chosen one (zeros: none)
    burn_h0: torch.Tensor  # (num_layers, B, width): the stored state at the first of them
    burn_mask: torch.Tensor  # (B, K): which of the K windows exist
    at: tuple[list[int], list[int]]  # (stream, window index) of each of the B chosen windows


class Learner:
    """Fine-tunes ``engine``'s model from what the engine serves; see the module docstring."""

    def __init__(
        self, engine: Engine, config: OnlineLearningConfig, *, background: bool = False
    ) -> None:
        self.engine = engine
        self.config = config
        self.background = background
        self.model = copy.deepcopy(engine.model).eval()
        self.lr = config.lr
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=self.lr)
        self.rng = np.random.default_rng(config.seed)
        self.open: dict[int, Window] = {}  # slot -> window being filled
        self.ready: dict[int, deque[Window]] = {}  # slot -> recent complete windows
        self.samples_since_update = 0
        self.samples_seen = 0
        self.stats = LearnerStats()
        self.version = engine.model_version
        # Rollback guard: the weights last known to be good, kept as a model so each training
        # step can score them on the same fresh windows as the weights being served.
        self.good_weights = _copy_weights(engine.model)
        self.good_model = copy.deepcopy(engine.model).eval()
        self._promote: dict[str, torch.Tensor] | None = None  # new good weights, for the trainer
        self.probation: dict[str, float] | None = None
        self._last_update_at = 0.0
        self._handover: tuple[dict[str, torch.Tensor], float, float] | None = None
        self._handover_lock = threading.Lock()
        self.train_lock = threading.Lock()  # held during a step; checkpoints take it too
        self._restore_to: dict[str, torch.Tensor] | None = None  # applied by the trainer
        self._jobs: queue.Queue[list[Pick] | None] = queue.Queue(maxsize=1)
        self._thread: threading.Thread | None = None
        engine.observer = self.observe
        engine.slot_listener = self.slots_moved
        if background:
            self._thread = threading.Thread(target=self._work, name="learner", daemon=True)
            self._thread.start()

    # -- fed by the engine (engine thread) ------------------------------------------------------
    def observe(self, record: StepRecord) -> None:
        window = self.config.window
        for i, slot in enumerate(record.slots.tolist()):
            if record.count[i] < self.config.warmup:
                self.open.pop(slot, None)  # nothing learnable yet: the normaliser is settling
                continue
            current = self.open.get(slot)
            if current is not None and len(current.targets) < len(current.inputs):
                current.targets.append(float(record.z_target[i]))
                if len(current.targets) == window:
                    self.ready.setdefault(
                        slot, deque(maxlen=self.config.windows_per_stream)
                    ).append(current)
                    current = None
            if current is None:
                current = Window(record.state_before[:, i].detach().clone())
                self.open[slot] = current
            current.inputs.append(float(record.z_in[i]))
        self.samples_since_update += len(record.slots)
        self.samples_seen += len(record.slots)

    def slots_moved(self, gone: np.ndarray, src: np.ndarray, dst: np.ndarray) -> None:
        """Eviction compacted the engine's slots: drop the evicted streams' windows (they start
        afresh when they return) and let the moved streams' windows follow their slots."""
        for slot in gone.tolist():
            self.open.pop(slot, None)
            self.ready.pop(slot, None)
        for s, d in zip(src.tolist(), dst.tolist(), strict=True):
            if s in self.open:
                self.open[d] = self.open.pop(s)
            if s in self.ready:
                self.ready[d] = self.ready.pop(s)

    # -- between ticks (engine thread) ----------------------------------------------------------
    def after_tick(self) -> None:
        """Swap in finished weights, judge the last update, start the next one when due."""
        self._apply_handover()
        self._judge_probation()
        if self.samples_since_update < self.config.update_every:
            return
        now = time.monotonic()
        if self.background and now - self._last_update_at < 1.0 / self.config.max_updates_per_s:
            return  # rate cap: wait, the windows keep filling
        batch = self.pick_windows()
        if not batch:
            return
        self.samples_since_update = 0
        self._last_update_at = now
        if not self.background:
            losses = self.train_step(batch)
            if losses is not None:
                self._offer(losses)
                self._apply_handover()
            return
        try:
            self._jobs.put_nowait(batch)
        except queue.Full:
            self.stats.skipped_behind += 1  # one update in flight at most; never queue more

    def pick_windows(self) -> list[Pick]:
        """Up to ``streams_per_update`` recent complete windows, with the windows before them
        (complete windows never change, and the lists are copies, so the trainer may read them
        while the engine goes on)."""
        chains = [list(ready) for ready in self.ready.values() if ready]
        where = [(c, i) for c, chain in enumerate(chains) for i in range(len(chain))]
        if len(where) > self.config.streams_per_update:
            chosen = self.rng.choice(len(where), self.config.streams_per_update, replace=False)
            where = [where[i] for i in sorted(chosen)]
        picks: dict[int, list[int]] = {}
        for c, i in where:
            picks.setdefault(c, []).append(i)
        return [Pick(chains[c][: indices[-1] + 1], indices) for c, indices in picks.items()]

    def make_batch(self, picks: list[Pick]) -> Batch:
        """Tensors for a minibatch; built on the trainer's thread, off the forecasting path."""
        windows = [p.chain[i] for p in picks for i in p.chosen]
        x = torch.from_numpy(np.array([w.inputs for w in windows], dtype=np.float32)).unsqueeze(-1)
        y = torch.from_numpy(np.array([w.targets for w in windows], dtype=np.float32)).unsqueeze(-1)
        h0 = torch.stack([w.start_state for w in windows], dim=1)
        at = (
            [s for s, p in enumerate(picks) for _ in p.chosen],
            [i for p in picks for i in p.chosen],
        )
        # The K windows before each chosen one, from each stream's kept windows padded with K
        # empty ones in front; built with numpy, a few calls per stream (this thread holds the
        # GIL, which the forecasting thread needs, through every Python-level loop).
        k = self.config.refresh_windows if self.config.refresh_states else 0
        if k:
            burn: list[np.ndarray] = []
            firsts: list[torch.Tensor] = []
            for p in picks:
                chain = np.zeros((k + len(p.chain), self.config.window), dtype=np.float32)
                chain[k:] = [w.inputs for w in p.chain]
                chosen = np.asarray(p.chosen)
                burn.append(chain[chosen[:, None] + np.arange(k)].reshape(len(chosen), -1))
                firsts.extend(p.chain[max(0, i - k)].start_state for i in p.chosen)
            burn_x = torch.from_numpy(np.concatenate(burn))  # (B, K * window)
            burn_h0 = torch.stack(firsts, dim=1)  # (num_layers, B, width)
        else:  # no burn-in: nothing to run, the stored states stand
            burn_x = torch.zeros((len(windows), 0), dtype=torch.float32)  # (B, 0)
            burn_h0 = h0
        burn_mask = torch.tensor(at[1]).unsqueeze(1) - k + torch.arange(k) >= 0
        device = self.engine.device
        return Batch(
            x.to(device),
            y.to(device),
            h0.to(device),
            burn_x.unsqueeze(-1).to(device),
            burn_h0.to(device),
            burn_mask.to(device),
            at,
        )

    def start_states(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """Each chosen window's start state under ``model``'s weights (see the module docstring):
        the ``refresh_windows`` windows before it run from the stored state at their start (a
        burn-in, as in R2D2's recurrent replay). With ``refresh_states`` off, the stored states."""
        if not self.config.refresh_states:
            return batch.h0
        window = self.config.window
        state = batch.burn_h0
        with torch.no_grad():
            for j in range(batch.burn_mask.shape[1]):
                _, moved = model(batch.burn_x[:, j * window : (j + 1) * window], state)
                state = torch.where(batch.burn_mask[:, j].view(1, -1, 1), moved, state)
        return state

    def _apply_handover(self) -> None:
        with self._handover_lock:
            handover, self._handover = self._handover, None
        if handover is None:
            return
        weights, loss, good_loss = handover
        if self.probation is not None:  # the served weights vs the good ones, same windows
            self.probation["served"] += loss
            self.probation["good"] += good_loss
        self.version += 1
        self.engine.swap_weights(weights, self.version)
        self.stats.updates += 1
        self.stats.last_loss = loss
        if self.probation is None:
            self.probation = {"served": 0.0, "good": 0.0, "since": self.samples_seen}

    def _judge_probation(self) -> None:
        """After ``rollback_samples`` samples, keep the new weights or go back to the good ones."""
        probation = self.probation
        if (
            probation is None
            or self.samples_seen - probation["since"] < self.config.rollback_samples
        ):
            return
        if probation["good"] <= 0:
            return  # no training step has scored both yet
        self.probation = None
        if probation["served"] > self.config.rollback_factor * probation["good"]:
            self.rollback(probation["served"], probation["good"])
        else:
            self.good_weights = _copy_weights(self.engine.model)
            with self._handover_lock:
                self._promote = _clone(self.good_weights)
            if not self.background:
                self._sync_good()

    def rollback(self, after: float, before: float) -> None:
        """Serve the last good weights again; the trainer restarts from them at a lower lr."""
        self.stats.rollbacks += 1
        self.lr *= self.config.rollback_lr_factor
        log.warning(
            "online update rolled back: loss %.4g vs %.4g for the last good weights (x%.1f); lr now %.3g",
            after,
            before,
            after / max(before, 1e-12),
            self.lr,
        )
        self.version += 1
        self.engine.swap_weights(self.good_weights, self.version)
        with self._handover_lock:
            self._handover = None
            self._restore_to = _clone(self.good_weights)
        if not self.background:
            self._restore()

    # -- training (background thread, or inline) ------------------------------------------------
    def train_step(self, picks: list[Pick]) -> tuple[float, float] | None:
        """One TBPTT step. Returns the batch's loss for the weights before the step and for the
        last good weights; ``None`` (and nothing changed) when a loss or gradient is not finite."""
        batch = self.make_batch(picks)
        with self.train_lock:
            return self._train_step(batch)

    def _train_step(self, batch: Batch) -> tuple[float, float] | None:
        self._restore()
        self._sync_good()
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr
        with torch.no_grad():  # each weights from the states they make themselves
            good_prediction, _ = self.good_model(batch.x, self.start_states(self.good_model, batch))
            good_loss = float(nn.functional.mse_loss(good_prediction, batch.y))
        h0 = self.start_states(self.model, batch)
        self.model.train()
        try:
            prediction, _ = self.model(batch.x, h0)
            loss = nn.functional.mse_loss(prediction, batch.y)
            if not torch.isfinite(loss):
                self.stats.skipped_nonfinite += 1
                return None
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            norm = nn.utils.clip_grad_norm_(self.model.parameters(), self.config.clip)
            if not torch.isfinite(norm):
                self.optimizer.zero_grad(set_to_none=True)
                self.stats.skipped_nonfinite += 1
                return None
            self.optimizer.step()
            return float(loss.detach()), good_loss
        finally:
            self.model.eval()

    def _restore(self) -> None:
        with self._handover_lock:
            weights, self._restore_to = self._restore_to, None
        if weights is not None:
            self.model.load_state_dict(weights)
            self.optimizer = torch.optim.Adam(self.model.parameters(), lr=self.lr)

    def _sync_good(self) -> None:
        with self._handover_lock:
            weights, self._promote = self._promote, None
        if weights is not None:
            self.good_model.load_state_dict(weights)

    def _offer(self, losses: tuple[float, float]) -> None:
        with self._handover_lock:
            self._handover = (_copy_weights(self.model), *losses)

    def _work(self) -> None:
        tune_learner_thread()  # one intra-op thread, nice 19: the forecasting thread goes first
        while True:
            batch = self._jobs.get()
            if batch is None:
                return
            try:
                losses = self.train_step(batch)
                if losses is not None:
                    self._offer(losses)
            except Exception:
                log.exception("online update failed; skipped")
                self.stats.failed += 1

    def close(self) -> None:
        if self._thread is not None:
            self._jobs.put(None)
            self._thread.join(5)

    # -- persistence ----------------------------------------------------------------------------
    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Windows and guard state as tensors for the checkpoint (``extra.learner.*``)."""
        window = self.config.window
        rows: list[tuple[int, int, Window]] = []  # (slot, kind 0=open 1=ready, window)
        for slot, ready in self.ready.items():
            rows.extend((slot, 1, w) for w in ready)
        rows.extend((slot, 0, w) for slot, w in self.open.items())
        n = len(rows)
        width = self.engine.model.state_width
        layers = self.engine.model.config.num_layers
        inputs = torch.full((n, window), math.nan, dtype=torch.float64)
        targets = torch.full((n, window), math.nan, dtype=torch.float64)
        states = torch.zeros(layers, n, width)
        for i, (_, _, w) in enumerate(rows):
            inputs[i, : len(w.inputs)] = torch.tensor(w.inputs, dtype=torch.float64)
            targets[i, : len(w.targets)] = torch.tensor(w.targets, dtype=torch.float64)
            states[:, i] = w.start_state.cpu()
        return {
            "learner.slot": torch.tensor([r[0] for r in rows], dtype=torch.int64),
            "learner.kind": torch.tensor([r[1] for r in rows], dtype=torch.int64),
            "learner.inputs": inputs,
            "learner.targets": targets,
            "learner.start_state": states,
            "learner.scalars": torch.tensor(
                [
                    self.samples_since_update,
                    self.version,
                    self.lr,
                    self.stats.updates,
                    self.stats.rollbacks,
                ],
                dtype=torch.float64,
            ),
        }

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        if "learner.slot" not in tensors:
            return
        self.open.clear()
        self.ready.clear()
        for i, (slot, kind) in enumerate(
            zip(tensors["learner.slot"].tolist(), tensors["learner.kind"].tolist(), strict=True)
        ):
            inputs = [v for v in tensors["learner.inputs"][i].tolist() if not math.isnan(v)]
            targets = [v for v in tensors["learner.targets"][i].tolist() if not math.isnan(v)]
            window = Window(
                tensors["learner.start_state"][:, i].to(self.engine.device), inputs, targets
            )
            if kind == 1:
                self.ready.setdefault(slot, deque(maxlen=self.config.windows_per_stream)).append(
                    window
                )
            else:
                self.open[slot] = window
        scalars = tensors["learner.scalars"].tolist()
        self.samples_since_update = int(scalars[0])
        self.version = int(scalars[1])
        self.lr = float(scalars[2])
        self.stats.updates, self.stats.rollbacks = int(scalars[3]), int(scalars[4])


def _copy_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _clone(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in weights.items()}
