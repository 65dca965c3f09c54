"""One tick: validate, score, step every touched stream in one batched call, forecast.

The engine is pure and synchronous: it knows nothing of MQTT, threads or Prometheus. The daemon,
``forecaster evaluate`` and the tests all drive ``Engine.tick``; the same samples in the same order
give the same forecasts, whichever driver. Order per sample, as in River's progressive validation:
score the forecast made at t-1 against the arriving value, step the state, forecast t+1.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from forecaster.model import Forecaster
from forecaster.normalize import NormalizerConfig
from forecaster.streams import StreamTable

# Bounded set of reasons a sample is refused by the engine (``parse`` adds the payload ones).
REJECT_REASONS = ("not_a_number", "non_finite", "out_of_range", "bad_stream", "duplicate")


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
    ) -> None:
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.normalizer_config = normalizer or NormalizerConfig()
        self.streams = StreamTable(self.model, self.normalizer_config, self.device)
        self.max_abs_value = max_abs_value
        self.model_version = model_version
        # Called with a StepRecord after every batched step (the learner's window feed).
        self.observer: Callable[[StepRecord], None] | None = None

    def swap_weights(self, weights: dict[str, torch.Tensor], version: int) -> None:
        """Serve new weights from the next tick on (called between ticks only)."""
        with torch.no_grad():
            for name, tensor in self.model.state_dict().items():
                tensor.copy_(weights[name])
        self.model_version = version

    def reject_reason(self, sample: Sample) -> str | None:
        """Why ``sample`` must not touch any state, or None when it may."""
        stream = sample.stream
        if not isinstance(stream, str) or not stream or any(c in stream for c in "#+/\0"):
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
                slot = self.streams.slots.get(sample.stream)
                known = 0 if slot is None else int(self.streams.seq[slot])
                last = pending.get(sample.stream, known)
                seq = last + 1 if sample.seq is None else int(sample.seq)
                if seq <= last:
                    reason = "duplicate"
            if reason is not None:
                rejected.append(Rejection(sample, reason))
                continue
            pending[sample.stream] = seq
            admitted.append(Sample(sample.stream, sample.value, sample.ts, seq))
        return admitted, rejected

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
        for sample in samples:
            reason = self.reject_reason(sample)
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
        with torch.no_grad():
            for batch in rounds:
                self._step_round(batch, accepted, out)
        result.forecasts = [f for f in out if f is not None]
        return result

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
        observer = self.observer
        if observer is not None:  # the value in the frame its forecast was made in
            count = table.normalizer.count[slots].copy()
            z_target = table.normalizer.normalize(slots, values)
        z = table.normalizer.update(slots, values)
        index = torch.from_numpy(slots).to(self.device)
        before = table.state.index_select(1, index)  # (num_layers, B, width): a copy
        z_next, state = self.model.step(
            torch.from_numpy(z.astype(np.float32)).to(self.device), before
        )
        if observer is not None:
            observer(StepRecord(slots, count, z, z_target, before))
        table.state.index_copy_(1, index, state)
        prediction = table.normalizer.denormalize(slots, z_next.double().cpu().numpy())
        table.last_prediction[slots] = prediction
        table.last_value[slots] = values
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
            )
