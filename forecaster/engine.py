"""One tick: validate, score, step every touched stream in one batched call, forecast.

The engine is pure and synchronous: it knows nothing of MQTT, threads or Prometheus. The daemon,
``forecaster evaluate`` and the tests all drive ``Engine.tick``; the same samples in the same order
give the same forecasts, whichever driver. Order per sample, as in River's progressive validation:
score the forecast made at t-1 against the arriving value, step the state, forecast t+1.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from forecaster.model import Forecaster
from forecaster.normalize import NormalizerConfig
from forecaster.scoring import ScoringConfig
from forecaster.store import MemoryStore, StreamStore
from forecaster.streams import StreamTable

# Bounded set of reasons a sample is refused by the engine (``parse`` adds the payload ones).
REJECT_REASONS = ("not_a_number", "non_finite", "out_of_range", "bad_stream", "duplicate")
# A stream id becomes one level of an output topic and a metric label: ``^[A-Za-z0-9][A-Za-z0-9_.-]
# {0,63}$``. Always ``STREAM_ID.fullmatch`` (with ``re.match`` and ``$``, "a\n" would pass). The
# metrics' overflow label ``_other`` cannot collide with it. parse.py checks the same rule.
STREAM_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


@dataclass(frozen=True, slots=True)
class Sample:
    """One value of one stream; ``seq`` is the sender's sequence number when it gives one."""

    stream: str
    value: float
    ts: float | None = None
    seq: int | None = None


@dataclass(frozen=True, slots=True)
class Forecast:
    """What the engine says after seeing ``value``: ``prediction`` is for the next sample."""

    stream: str
    seq: int
    ts: float | None
    value: float
    prediction: float
    error: float | None  # value - previous prediction (None for a stream's first sample)
    naive_error: float | None  # value - previous value: the last-value baseline's error
    model_version: int
    warm: bool = True  # False for the first forecasts after a gap reset the hidden state
    lower: float = math.nan  # calibrated interval for the next sample (see forecaster.scoring)
    upper: float = math.nan
    anomaly: float = 0.5  # how surprising this value's error is, in [0, 1]; 0.5 = don't know
    covered: bool | None = None  # value inside the interval published before it (None: first)
    # With a horizon H > 1: forecasts for t+1 ... t+H (the first is ``prediction``) and their
    # intervals, which widen with the step; None when H = 1.
    path: tuple[float, ...] | None = None
    path_lower: tuple[float, ...] | None = None
    path_upper: tuple[float, ...] | None = None


@dataclass(frozen=True, slots=True)
class GapPolicy:
    """Re-warm a stream after a gap in its ``ts``.

    A gap is an inter-arrival time above ``factor`` x the stream's usual interval (an EWM of its
    inter-arrival times, half-life ``halflife`` intervals, trusted after ``min_intervals`` of
    them). It resets the stream's hidden state (the normaliser keeps its level and scale), and
    the first ``rewarm_samples`` forecasts from then on say ``warm=False``. Gaps are not folded
    into the usual interval; neither are zero or negative intervals (same or older ``ts``).
    """

    factor: float = 10.0
    halflife: float = 20.0
    min_intervals: int = 5
    rewarm_samples: int = 20

    @property
    def alpha(self) -> float:
        return 1.0 - math.pow(0.5, 1.0 / self.halflife)


@dataclass(frozen=True, slots=True)
class Rejection:
    sample: Sample
    reason: str


@dataclass(frozen=True, slots=True)
class StepRecord:
    """What one batched step saw, for the online learner (arrays indexed like ``slots``)."""

    slots: np.ndarray  # (B,)
    count: np.ndarray  # (B,) samples each stream had before this one (normaliser warm-up)
    z_in: np.ndarray  # (B,) normalised input fed to the model
    z_target: np.ndarray  # (B,) the arriving value in the frame its forecast was made in
    state_before: torch.Tensor  # (num_layers, B, width) state before stepping z_in


@dataclass(slots=True)
class TickResult:
    forecasts: list[Forecast] = field(default_factory=list)
    rejected: list[Rejection] = field(default_factory=list)


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
    ) -> None:
        self.horizon = horizon  # steps ahead published; the state never sees its own forecasts
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.normalizer_config = normalizer or NormalizerConfig()
        self.scoring_config = scoring or ScoringConfig()
        self.streams = StreamTable(
            self.model, self.normalizer_config, self.device, scoring=self.scoring_config
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
        self.ticks = 0  # LRU clock: ticks applied so far
        # Told (gone slots, moved src slots, their dst slots) when eviction compacts the slots.
        self.slot_listener: Callable[[np.ndarray, np.ndarray, np.ndarray], None] | None = None

    def swap_weights(self, weights: dict[str, torch.Tensor], version: int) -> None:
        """Serve new weights from the next tick on (called between ticks only)."""
        with torch.no_grad():
            for name, tensor in self.model.state_dict().items():
                tensor.copy_(weights[name])
        self.model_version = version

    def reject_reason(self, sample: Sample) -> str | None:
        """Why ``sample`` must not touch any state, or None when it may."""
        stream = sample.stream
        if not isinstance(stream, str) or not STREAM_ID.fullmatch(stream):
            return "bad_stream"
        value = sample.value
        if isinstance(value, bool) or not isinstance(value, (int, float, np.floating)):
            return "not_a_number"
        try:
            value = float(value)
        except OverflowError:  # an int too large for a float
            return "out_of_range"
        if not math.isfinite(value):
            return "non_finite"
        if abs(value) > self.max_abs_value:
            return "out_of_range"
        return None

    def admit(self, samples: Sequence[Sample]) -> tuple[list[Sample], list[Rejection]]:
        """What ``tick(samples)`` would accept, each with its sequence number filled in.

        Touches no state. The daemon journals the admitted samples (with explicit ``seq``) before
        acknowledging them, so a replay assigns the same numbers and a redelivery is a duplicate.

        >>> from forecaster.model import ModelConfig
        >>> engine = Engine(Forecaster(ModelConfig("rnn", 4, 1)))
        >>> ok, bad = engine.admit([Sample("a", 1.0), Sample("a", 2.0, seq=7), Sample("a", 3.0, seq=7)])
        >>> [s.seq for s in ok], [r.reason for r in bad]
        ([1, 7], ['duplicate'])
        """
        admitted: list[Sample] = []
        rejected: list[Rejection] = []
        pending: dict[str, int] = {}
        for sample in samples:
            reason = self.reject_reason(sample)
            if reason is None:
                last = pending.get(sample.stream)
                if last is None:
                    last = self.last_seq(sample.stream)
                seq = last + 1 if sample.seq is None else int(sample.seq)
                if seq <= last:
                    reason = "duplicate"
            if reason is not None:
                rejected.append(Rejection(sample, reason))
                continue
            pending[sample.stream] = seq
            admitted.append(Sample(sample.stream, sample.value, sample.ts, seq))
        return admitted, rejected

    def last_seq(self, stream: str) -> int:
        """The stream's last applied sequence number, resident or parked (0: never seen)."""
        slot = self.streams.slots.get(stream)
        if slot is not None:
            return int(self.streams.seq[slot])
        if self.max_streams:
            row = self.store.get(stream)
            if row is not None:
                return int(row["seq"][0])
        return 0

    def tick(self, samples: Sequence[Sample]) -> TickResult:
        """Apply ``samples`` in arrival order; one batched model step per round of distinct streams.

        Several samples of one stream in a tick go into consecutive rounds, so each stream sees its
        values in order, and a stream's forecast never depends on which others share the tick.
        """
        result = TickResult()
        rounds: list[list[tuple[int, int, float, int]]] = []  # (order, slot, value, seq)
        pending_seq: dict[int, int] = {}
        depth: dict[int, int] = {}
        accepted: list[Sample] = []
        reasons = [self.reject_reason(sample) for sample in samples]
        self.ticks += 1
        if self.max_streams:
            self._make_room({s.stream for s, r in zip(samples, reasons, strict=True) if r is None})
        for sample, reason in zip(samples, reasons, strict=True):
            slot = -1
            if reason is None:
                slot = self.streams.slot(sample.stream)
                last = pending_seq.get(slot, int(self.streams.seq[slot]))
                seq = last + 1 if sample.seq is None else int(sample.seq)
                if seq <= last:
                    reason = "duplicate"
            if reason is not None:
                result.rejected.append(Rejection(sample, reason))
                continue
            pending_seq[slot] = seq
            level = depth.get(slot, 0)
            depth[slot] = level + 1
            if level == len(rounds):
                rounds.append([])
            rounds[level].append((len(accepted), slot, float(sample.value), seq))
            accepted.append(sample)
        out: list[Forecast | None] = [None] * len(accepted)
        if self.max_streams and pending_seq:
            self.streams.last_used[np.fromiter(pending_seq, dtype=np.int64)] = self.ticks
        with torch.no_grad():
            for batch in rounds:
                self._step_round(batch, accepted, out)
        result.forecasts = [f for f in out if f is not None]
        if self.max_streams:  # a tick wider than the bound: back under it before the next one
            self._evict(len(self.streams) - self.max_streams, set())
        return result

    def _make_room(self, needed: set[str]) -> None:
        """Bring back parked streams this tick needs, parking least recently used others first."""
        table = self.streams
        new = sorted(s for s in needed if s not in table)
        parked = {s: row for s in new if (row := self.store.get(s)) is not None}
        self._evict(len(table) + len(new) - self.max_streams, needed)
        if parked:
            names = list(parked)
            table.put(names, _stack([parked[name] for name in names]))
            self.restores += len(names)

    def _evict(self, excess: int, keep: set[str]) -> None:
        """Park the ``excess`` least recently used streams, except those in ``keep``."""
        table = self.streams
        if excess <= 0:
            return
        idle = np.array([name not in keep for name in table.names], dtype=bool)
        candidates = np.flatnonzero(idle)
        order = np.argsort(table.last_used[candidates], kind="stable")  # oldest first
        chosen = candidates[order[:excess]]
        if not len(chosen):
            return
        names = [table.names[i] for i in chosen.tolist()]
        arrays, src, dst = table.take(names)
        self.store.put({name: _row(arrays, i) for i, name in enumerate(names)})
        self.evictions += len(names)
        if self.slot_listener is not None:
            self.slot_listener(chosen, src, dst)

    def _gaps(
        self,
        slots: np.ndarray,
        batch: list[tuple[int, int, float, int]],
        accepted: list[Sample],
        before: torch.Tensor,
    ) -> np.ndarray:
        """Detect gaps, reset those streams' state in ``before``; return each forecast's warm."""
        policy = self.gaps
        assert policy is not None
        table = self.streams
        ts = np.fromiter(
            (np.nan if (t := accepted[b[0]].ts) is None else t for b in batch),
            dtype=np.float64,
            count=len(batch),
        )
        usual = table.interval[slots]
        with np.errstate(invalid="ignore", over="ignore"):  # NaN/inf only where ts is unknown
            dt = ts - table.last_ts[slots]  # NaN where either is unknown
            gap = (table.intervals[slots] >= policy.min_intervals) & (dt > policy.factor * usual)
            ordinary = (dt > 0) & np.isfinite(dt) & ~gap
            weight = np.maximum(1.0 / (table.intervals[slots] + 1), policy.alpha)
            folded = np.where(np.isnan(usual), dt, usual + weight * (dt - usual))
        table.interval[slots[ordinary]] = folded[ordinary]
        table.intervals[slots[ordinary]] += 1
        if gap.any():
            before[:, torch.from_numpy(gap).to(before.device)] = 0.0  # a fresh state
            table.cold[slots[gap]] = policy.rewarm_samples
            self.gap_resets += int(gap.sum())
        cold = table.cold[slots]
        table.cold[slots] = np.maximum(cold - 1, 0)
        return cold == 0

    def _step_round(
        self,
        batch: list[tuple[int, int, float, int]],
        accepted: list[Sample],
        out: list[Forecast | None],
    ) -> None:
        table = self.streams
        slots = np.fromiter((b[1] for b in batch), dtype=np.int64, count=len(batch))
        values = np.fromiter((b[2] for b in batch), dtype=np.float64, count=len(batch))
        error = values - table.last_prediction[slots]  # NaN where there was no forecast yet
        naive_error = values - table.last_value[slots]
        anomaly, covered = self._score(slots, values, error)
        observer = self.observer
        if observer is not None:  # the value in the frame its forecast was made in
            count = table.normalizer.count[slots].copy()
            z_target = table.normalizer.normalize(slots, values)
        z = table.normalizer.update(slots, values)
        index = torch.from_numpy(slots).to(self.device)
        before = table.state.index_select(1, index)  # (num_layers, B, width): a copy
        warm = None
        if self.gaps is not None:
            warm = self._gaps(slots, batch, accepted, before)
        z_next, state = self.model.step(
            torch.from_numpy(z.astype(np.float32)).to(self.device), before
        )
        if observer is not None:
            observer(StepRecord(slots, count, z, z_target, before))
        table.state.index_copy_(1, index, state)
        prediction = table.normalizer.forecast(slots, z_next.double().cpu().numpy())
        table.last_prediction[slots] = prediction
        table.last_value[slots] = values
        half = table.scorer.halfwidth(slots) * table.normalizer.frame_scale(slots)
        lower, upper = prediction - half, prediction + half
        table.last_lower[slots] = lower
        table.last_upper[slots] = upper
        paths = self._paths(slots, z_next, state, half, prediction) if self.horizon > 1 else None
        for i, (position, slot, value, seq) in enumerate(batch):
            sample = accepted[position]
            table.seq[slot] = seq
            if sample.ts is not None:
                table.last_ts[slot] = sample.ts
            err, naive = float(error[i]), float(naive_error[i])
            out[position] = Forecast(
                stream=sample.stream,
                seq=seq,
                ts=sample.ts,
                value=value,
                prediction=float(prediction[i]),
                error=None if math.isnan(err) else err,
                naive_error=None if math.isnan(naive) else naive,
                model_version=self.model_version,
                warm=True if warm is None else bool(warm[i]),
                lower=float(lower[i]),
                upper=float(upper[i]),
                anomaly=float(anomaly[i]),
                covered=None if math.isnan(err) else bool(covered[i]),
                **({} if paths is None else {k: tuple(v[i].tolist()) for k, v in paths.items()}),
            )

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
        s = np.abs(np.nan_to_num(error)) / table.normalizer.frame_scale(slots)
        return table.scorer.observe(slots, s, covered, scored), covered


def _row(arrays: dict[str, np.ndarray], i: int) -> dict[str, np.ndarray]:
    """Stream ``i`` of a ``StreamTable.arrays()`` result, keeping the axes (state: (L, 1, W))."""
    return {k: (v[:, i : i + 1] if k == "state" else v[i : i + 1]) for k, v in arrays.items()}


def _stack(rows: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Inverse of ``_row`` for several streams (columns all of them have: older rows may lack
    newer columns, which then start fresh)."""
    keys = set(rows[0]).intersection(*rows[1:])
    return {k: np.concatenate([r[k] for r in rows], axis=1 if k == "state" else 0) for k in keys}
