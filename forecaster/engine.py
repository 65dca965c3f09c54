"""One tick: validate, score, step every touched stream in one batched call, forecast.

The engine is pure and synchronous: it knows nothing of MQTT, threads or Prometheus. The daemon,
``forecaster evaluate`` and the tests all drive ``Engine.tick``; the same samples in the same order
give the same forecasts, whichever driver. Order per sample, as in River's progressive validation:
score the forecast made at t-1 against the arriving value, step the state, forecast t+1.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import repeat

import numpy as np
import torch

from forecaster import parking, shadow
from forecaster.admission import admit
from forecaster.combine import COMPONENTS, CombinerConfig
from forecaster.gaps import GapPolicy, detect_gaps
from forecaster.model import Forecaster
from forecaster.normalize import NormalizerConfig
from forecaster.records import (
    Admission,
    Batch,
    BatchResult,
    Forecast,
    ForecastColumns,
    Rejection,
    Sample,
    as_batch,
)
from forecaster.scoring import ScoringConfig
from forecaster.store import MemoryStore, StreamStore
from forecaster.streams import StreamTable


@dataclass(frozen=True, slots=True)
class StepRecord:
    """What one batched step saw, for the online learner (arrays indexed like ``slots``)."""

    slots: np.ndarray  # (B,)
    count: np.ndarray  # (B,) samples each stream had before this one (normaliser warm-up)
    z_in: np.ndarray  # (B,) normalised input fed to the model
    z_target: np.ndarray  # (B,) the arriving value in the frame its forecast was made in
    # (num_layers, B, width) state before stepping z_in: the engine's work block, valid during
    # the observer call only (clone what you keep)
    state_before: torch.Tensor


class TickResult:
    """What ``tick`` gives: ``forecasts`` (built on first use) and ``rejected``, in input order."""

    __slots__ = ("_forecasts", "columns", "rejected")

    def __init__(self, columns: ForecastColumns, rejected: list[Rejection]) -> None:
        self.columns = columns
        self.rejected = rejected
        self._forecasts: list[Forecast] | None = None

    @property
    def forecasts(self) -> list[Forecast]:
        if self._forecasts is None:
            self._forecasts = self.columns.to_list()
        return self._forecasts


class Engine:
    """Serves every stream with one model; ``tick`` is the only way state changes."""

    def __init__(
        self,
        model: Forecaster,
        normalizer: NormalizerConfig | None = None,
        *,
        device: torch.device | str = "cpu",
        max_abs_value: float = 1e15,
        model_version: int = 0,
        max_streams: int = 0,
        store: StreamStore | None = None,
        gaps: GapPolicy | None = None,
        scoring: ScoringConfig | None = None,
        horizon: int = 1,
        combine: CombinerConfig | None = None,
        challenger: Forecaster | None = None,
    ) -> None:
        self.horizon = horizon  # steps ahead published; the state never sees its own forecasts
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.normalizer_config = normalizer or NormalizerConfig()
        self.scoring_config = scoring or ScoringConfig()
        self.combine_config = combine or CombinerConfig()
        # A shadow challenger: stepped on the same samples with its own hidden states, scored,
        # never published (``_shadow``).
        self.challenger = None if challenger is None else challenger.to(self.device).eval()
        self.streams = StreamTable(
            self.model,
            self.normalizer_config,
            self.device,
            scoring=self.scoring_config,
            combine=self.combine_config,
            challenger=self.challenger,
        )
        self.max_abs_value = max_abs_value
        self.model_version = model_version
        # Called with a StepRecord after every batched step (the learner's window feed).
        self.observer: Callable[[StepRecord], None] | None = None
        # Stream bound: past ``max_streams`` (0: none) the least recently used streams are parked
        # in ``store`` and restored bit for bit when they send again.
        self.max_streams = max_streams
        self.gaps = gaps  # None: gaps are not detected, every forecast is warm
        self.gap_resets = 0  # hidden states reset by a gap so far
        self.store: StreamStore = store if store is not None else MemoryStore()
        self.evictions = 0  # streams parked so far (the daemon's counter reads it)
        self.restores = 0  # streams brought back so far
        # The last failure to park streams after a tick wider than the bound (the store could
        # not be written): the tick's forecasts stand, the next tick parks them; None: none.
        self.park_error: Exception | None = None
        self.ticks = 0  # LRU clock: ticks applied so far
        # Told (gone slots, moved src slots, their dst slots) when eviction compacts the slots.
        self.slot_listener: Callable[[np.ndarray, np.ndarray, np.ndarray], None] | None = None
        self._blocks: dict[str, torch.Tensor] = {}  # work blocks, see work_block
        # Model deployments so far (``deploy``): a stream whose ``epoch`` is older re-warms.
        self.model_epoch = 0
        self.rewarm_samples = 0
        # Some stream of this tick still owes warm=False forecasts: worked out at each tick from
        # its streams' ``cold`` counts (checkpointed and parked with them), so a restart keeps
        # flagging and the countdown costs nothing once they are warm.
        self.rewarming = False
        # Role swaps between the served model and the challenger so far (``promote``), and the
        # evidence since the last: each role's squared errors in the stream's scale on the values
        # both forecast (the frame the intervals use), exponentially weighted (half-life
        # ``shadow_halflife`` values: recent evidence counts, a regime change shows), and how many.
        self.promotions = 0
        self.shadow_sq = np.zeros(2)  # served, challenger
        self.shadow_n = 0
        self.shadow_halflife = 2000.0
        self.challenger_epoch = 0  # challengers loaded: a parked state from another is dropped

    def work_block(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        """A reused work tensor of ``shape`` (contents undefined), kept as large as the largest
        tick so far.

        A state-sized block is above glibc's mmap threshold (fixed at 128 KiB by ``forecaster
        run``) from ~1,000 streams on, so allocating them per tick mapped fresh pages and faulted
        every one in: ~680 page faults per 10,000-stream tick here, about half of its time.
        """
        size = math.prod(shape)
        flat = self._blocks.get(name)
        if flat is None or flat.numel() < size:
            state = self.streams.state
            flat = self._blocks[name] = torch.empty(size, dtype=state.dtype, device=state.device)
        return flat[:size].view(shape)

    def swap_weights(self, weights: dict[str, torch.Tensor], version: int) -> None:
        """Serve new weights from the next tick on (called between ticks only)."""
        with torch.no_grad():
            for name, tensor in self.model.state_dict().items():
                tensor.copy_(weights[name])
        self.model_version = version

    def deploy(self, weights: dict[str, torch.Tensor], version: int, rewarm: int) -> None:
        """Serve another model's weights (same architecture) from the next tick on: hidden states
        built under the old ones would mislead them, so each stream's starts afresh and its next
        ``rewarm`` forecasts say ``warm=False`` (a parked one when it returns: its ``epoch`` is
        older). The rest (normaliser, combiner, intervals, seq) does not depend on the weights."""
        self.swap_weights(weights, version)
        self.model_epoch += 1
        self.rewarm_samples = rewarm
        self.rewarm(np.arange(len(self.streams)))

    def promote(self) -> None:
        """The challenger serves from the next sample on (``forecaster.shadow.promote``)."""
        shadow.promote(self)

    def set_challenger(self, challenger: Forecaster | None) -> None:
        """Run ``challenger`` in the shadow from the next tick on (None: none), its hidden
        states afresh (``forecaster.shadow.attach``)."""
        shadow.attach(self, challenger)

    def rewarm(self, slots: np.ndarray) -> None:
        """Fresh hidden states for ``slots``, built under this model; their next
        ``rewarm_samples`` forecasts say ``warm=False``."""
        table = self.streams
        table.state[:, torch.from_numpy(slots).to(self.device)] = 0.0  # a fresh state
        table.cold[slots] = self.rewarm_samples
        table.epoch[slots] = self.model_epoch

    def admit(self, batch: Batch) -> Admission:
        """What ``tick_batch(batch)`` would accept, with each sequence number filled in.

        Touches no state. The daemon journals the admitted rows (with explicit ``seq``) before
        acknowledging them and then ticks this admission, so a replay assigns the same numbers
        and a redelivery is a duplicate.

        >>> from forecaster.model import ModelConfig
        >>> engine = Engine(Forecaster(ModelConfig("rnn", 4, 1)))
        >>> admission = engine.admit(Batch(["a"] * 3, np.ones(3), np.full(3, np.nan), np.array([-1, 7, 7])))
        >>> admission.batch.seq.tolist(), admission.rejected_reason
        ([1, 7], ['duplicate'])
        """
        return admit(self.streams, batch, self.last_seq, self.max_abs_value, self.ticks)

    def last_seq(self, stream: str) -> int:
        """The stream's last applied sequence number, resident or parked (-1: never seen, so a
        new stream's first ``seq`` is taken whatever it is, 0 included: senders count from 0 or 1)."""
        slot = self.streams.slots.get(stream)
        if slot is not None:
            return int(self.streams.seq[slot])
        if self.max_streams:
            row = self.store.get(stream)
            if row is not None:
                return int(row["seq"][0])
        return -1

    def tick(self, samples: Sequence[Sample]) -> TickResult:
        """Apply ``samples`` in arrival order: ``tick_batch`` for ``Sample`` objects.

        Anything that is not a number, a string id or an integer ``seq`` is refused here, before
        the samples become columns; the rest is checked by ``tick_batch``.
        """
        batch, keep, refused = as_batch(samples)
        result = self.tick_batch(batch)
        if refused:
            result.forecasts.index = keep[result.forecasts.index]
            rows = keep[result.rejected_index].tolist()
            refused += zip(rows, result.rejected_reason, strict=True)
            refused.sort(key=lambda pair: pair[0])
        else:
            refused = list(zip(result.rejected_index.tolist(), result.rejected_reason, strict=True))
        return TickResult(result.forecasts, [Rejection(samples[i], r) for i, r in refused])

    def tick_batch(self, batch: Batch | Admission) -> BatchResult:
        """Apply a tick's samples in arrival order; one batched model step per round.

        ``batch`` is the tick's samples, or ``admit``'s answer for them (what the daemon has,
        having journaled it); the engine admits a plain ``Batch`` itself. A round holds at most
        one sample per stream: several samples of one stream in a tick go into consecutive
        rounds, so each stream sees its values in order, and a stream's forecast never depends
        on which others share the tick. Refused samples touch no state.
        """
        admission = batch if isinstance(batch, Admission) else self.admit(batch)
        if admission.tick != self.ticks:
            raise ValueError("an admission is valid for the engine's next tick only")
        table = self.streams
        rows = admission.batch
        names = rows.streams
        # Only a tick with streams not resident can park or restore any: parked streams come
        # back, others may move, so slots are looked up again; else the admission's stand.
        if self.max_streams and bool((admission.slots < 0).any()):
            # Before the tick counts: should the store fail here, no state has changed and the
            # same admission can be ticked again once it can be written.
            parking.make_room(self, set(names))
            slots = np.fromiter(map(table.slots.get, names, repeat(-1)), np.int64, len(names))
        else:
            slots = admission.slots.copy()
        self.ticks += 1
        for i in np.flatnonzero(slots < 0).tolist():
            slots[i] = table.slot(names[i])  # a new stream: fresh state
            table.epoch[slots[i]] = self.model_epoch
            table.roles[slots[i]] = self.promotions
            table.shadow_epoch[slots[i]] = self.challenger_epoch
        if self.max_streams:
            table.last_used[slots] = self.ticks
        self.rewarming = bool(table.cold[slots].any())
        out = self._empty_columns(admission.index, names)
        out.seq = rows.seq
        values, ts, seq, level = rows.values, rows.ts, rows.seq, admission.level
        with torch.no_grad():
            if level is None:  # one round: every stream once
                self._step_round(out, slice(None), slots, values, ts, seq)
            else:
                order = np.argsort(level, kind="stable")
                bounds = np.flatnonzero(np.diff(level[order])) + 1
                for round_rows in np.split(order, bounds):
                    self._step_round(
                        out,
                        round_rows,
                        slots[round_rows],
                        values[round_rows],
                        ts[round_rows],
                        seq[round_rows],
                    )
        if self.max_streams:  # a tick wider than the bound: back under it before the next one
            try:
                parking.evict(self, len(table) - self.max_streams, set())
                self.park_error = None
            except Exception as exc:  # the store cannot be written: the next tick tries again
                self.park_error = exc
        return BatchResult(out, admission.rejected_index, admission.rejected_reason)

    def _empty_columns(self, index: np.ndarray, streams: list[str]) -> ForecastColumns:
        m = len(index)
        horizon = self.horizon if self.horizon > 1 else 0

        def floats() -> np.ndarray:
            return np.empty(m, dtype=np.float64)

        return ForecastColumns(
            streams=streams,
            index=index,
            seq=np.empty(m, dtype=np.int64),
            ts=floats(),
            value=floats(),
            prediction=floats(),
            error=floats(),
            naive_error=floats(),
            lower=floats(),
            upper=floats(),
            anomaly=floats(),
            covered=np.empty(m, dtype=bool),
            warm=np.ones(m, dtype=bool),
            model_version=self.model_version,
            path=np.empty((m, horizon)) if horizon else None,
            path_lower=np.empty((m, horizon)) if horizon else None,
            path_upper=np.empty((m, horizon)) if horizon else None,
            weights=np.empty((m, len(COMPONENTS))) if self.combine_config.enabled else None,
            challenger_error=floats() if self.challenger is not None else None,
            model_error=floats() if self.challenger is not None else None,
        )

    def _step_round(
        self,
        out: ForecastColumns,
        rows: slice | np.ndarray,
        slots: np.ndarray,
        values: np.ndarray,
        ts: np.ndarray,
        seq: np.ndarray,
    ) -> None:
        """Score, step and forecast one round (distinct ``slots``); fill ``out[rows]``."""
        table = self.streams
        error = values - table.last_prediction[slots]  # NaN where there was no forecast yet
        out.naive_error[rows] = values - table.last_value[slots]
        anomaly, covered = self._score(slots, values, error)
        if self.challenger is not None:
            shadow.weigh(self, out, rows, slots, values)
        observer = self.observer
        if observer is not None:  # the value in the frame its forecast was made in
            count = table.normalizer.count[slots].copy()
            z_target = table.normalizer.normalize(slots, values)
        z = table.normalizer.update(slots, values)
        index = torch.from_numpy(slots).to(self.device)
        shape = (table.state.shape[0], len(slots), table.state.shape[2])  # (num_layers, B, width)
        before = torch.index_select(table.state, 1, index, out=self.work_block("before", shape))
        if self.gaps is not None:
            out.warm[rows], resets = detect_gaps(self.gaps, self.streams, slots, ts, before)
            self.gap_resets += resets
        elif self.rewarming:  # after a new model: its first forecasts of each stream flagged
            cold = table.cold[slots]
            out.warm[rows] = cold == 0
            table.cold[slots] = np.maximum(cold - 1, 0)
        z_in = torch.from_numpy(z.astype(np.float32)).to(self.device)
        z_next, state = self.model.step(z_in, before, out=self.work_block("after", shape))
        if observer is not None:
            observer(StepRecord(slots, count, z, z_target, before))
        table.state.index_copy_(1, index, state)
        scale = table.normalizer.frame_scale(slots)  # after the update: the forecast's frame
        prediction = self._forecast(
            out, rows, slots, values, ts, z, z_next.double().cpu().numpy(), scale
        )
        if self.challenger is not None:
            shadow.step(self, slots, values, index, z_in, scale)
        table.last_prediction[slots] = prediction
        table.last_value[slots] = values
        half = table.scorer.halfwidth(slots) * scale
        lower, upper = prediction - half, prediction + half
        table.last_lower[slots] = lower
        table.last_upper[slots] = upper
        table.seq[slots] = seq
        known = ~np.isnan(ts)
        table.last_ts[slots[known]] = ts[known]
        out.ts[rows] = ts
        out.value[rows] = values
        out.prediction[rows] = prediction
        out.error[rows] = error
        out.lower[rows] = lower
        out.upper[rows] = upper
        out.anomaly[rows] = anomaly
        out.covered[rows] = covered
        if self.horizon > 1:
            paths = self._paths(slots, z_next, state, half, prediction)
            for key, path in paths.items():
                getattr(out, key)[rows] = path

    def _forecast(
        self,
        out: ForecastColumns,
        rows: slice | np.ndarray,
        slots: np.ndarray,
        values: np.ndarray,
        ts: np.ndarray,
        z: np.ndarray,
        z_next: np.ndarray,
        scale: np.ndarray,
    ) -> np.ndarray:
        """The published forecast: the RNN's, mixed with the AR path and the last value
        (``forecaster.combine``; their weights go to ``out.weights[rows]``), or the RNN's
        alone, shrunk by the normaliser's gain."""
        norm = self.streams.normalizer
        if not self.combine_config.enabled:
            return norm.forecast(slots, z_next, scale)
        # After a value the normaliser clipped, the RNN cannot tell how far it went: last value.
        rnn = np.where(norm.clipped[slots] > 0, values, norm.denormalize(slots, z_next, scale))
        prediction, weights = self.streams.combiner.step(slots, values, rnn, z, ts)
        assert out.weights is not None
        out.weights[rows] = weights
        return prediction

    def _paths(
        self,
        slots: np.ndarray,
        z_next: torch.Tensor,
        state: torch.Tensor,
        half: np.ndarray,
        prediction: np.ndarray,
    ) -> dict[str, np.ndarray]:
        """Forecasts for t+1 ... t+H: the RNN run forward on a copy of the state, fed its own
        forecasts. The first is the published ``prediction`` (the normaliser's gain applied); the
        half-width grows like sqrt(step), as for errors that add up like a random walk (a
        heuristic: only the first step is calibrated)."""
        z, h, steps = z_next, state, [z_next]
        for _ in range(self.horizon - 1):
            z, h = self.model.step(z, h)
            steps.append(z)
        z_path = torch.stack(steps, dim=1).double().cpu().numpy()  # (B, H)
        norm = self.streams.normalizer
        path = np.stack([norm.denormalize(slots, z_path[:, k]) for k in range(self.horizon)], 1)
        path[:, 0] = prediction
        widen = half[:, None] * np.sqrt(np.arange(1, self.horizon + 1))[None, :]  # (B, H)
        return {"path": path, "path_lower": path - widen, "path_upper": path + widen}

    def _score(
        self, slots: np.ndarray, values: np.ndarray, error: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Scoring stage: was each value inside its interval, and how surprising is its error.

        Runs before the normaliser sees the value, so the residual is measured in the frame its
        forecast was made in; the first ``warmup`` samples of a stream are not tracked.
        """
        table = self.streams
        covered = (values >= table.last_lower[slots]) & (values <= table.last_upper[slots])
        scored = ~np.isnan(error) & (table.normalizer.count[slots] >= self.scoring_config.warmup)
        scale = table.normalizer.frame_scale(slots)
        s = np.fmax(np.abs(error), 0.0) / scale  # NaN -> 0
        return table.scorer.observe(slots, s, covered, scored, values, scale), covered
