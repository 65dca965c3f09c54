"""The records every stage passes along: samples in, forecasts out, and their column forms.

Torch-free (NumPy only), so parse, persist, metrics and config can name a ``Sample`` or a
``Forecast`` without loading the model's dependencies: ``forecaster check-config`` and
``import forecaster.parse`` stay light. The engine (``forecaster.engine``) makes and takes them.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

# A stream id becomes one level of an output topic and a metric label: ``^[A-Za-z0-9][A-Za-z0-9_.-]
# {0,63}$``. Always ``STREAM_ID.fullmatch`` (with ``re.match`` and ``$``, "a\n" would pass). The
# metrics' overflow label ``_other`` cannot collide with it. parse.py and the engine check it.
STREAM_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


# Sample and Forecast are made once per message, so they are plain slotted dataclasses: a frozen
# dataclass's __init__ goes through object.__setattr__ per field, ~7x slower to build. Treat them
# as values all the same.
@dataclass(slots=True)
class Sample:
    """One value of one stream; ``seq`` is the sender's sequence number when it gives one."""

    stream: str
    value: float
    ts: float | None = None
    seq: int | None = None


@dataclass(slots=True)
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


@dataclass(slots=True)
class Rejection:
    sample: Sample
    reason: str


NO_SEQ = -1  # in ``Batch.seq``: the sender gave none, the engine assigns the stream's next one
SEQ_LIMIT = 2**63  # sequence numbers live in int64 columns


@dataclass(slots=True)
class Batch:
    """One tick's samples as columns: what a drained queue or a frame becomes.

    The engine's own entry point (``Engine.tick_batch``); ``Engine.tick`` builds one from
    ``Sample`` objects. Columns cost one NumPy operation per tick where objects cost one Python
    loop per sample, which is most of a tick at a thousand streams.
    """

    streams: list[str]
    values: np.ndarray  # (N,) float64
    ts: np.ndarray  # (N,) float64; NaN where the sender gave none
    seq: np.ndarray  # (N,) int64; NO_SEQ where the sender gave none

    @classmethod
    def of(
        cls, streams: list[str], values: Sequence[float], ts: Sequence[float] | None = None
    ) -> Batch:
        """Samples with no sequence numbers (and no ``ts`` unless given).

        >>> Batch.of(["a", "b"], [1.0, 2.0]).seq.tolist()
        [-1, -1]
        """
        n = len(streams)
        stamps = np.full(n, np.nan) if ts is None else np.asarray(ts, dtype=np.float64)
        return cls(streams, np.asarray(values, dtype=np.float64), stamps, np.full(n, NO_SEQ))

    def __len__(self) -> int:
        return len(self.streams)

    def samples(self) -> list[Sample]:
        """The rows as ``Sample`` objects.

        >>> Batch.of(["a"], [1.5]).samples()
        [Sample(stream='a', value=1.5, ts=None, seq=None)]
        """
        return samples_of(self.streams, self.values.tolist(), self.ts.tolist(), self.seq.tolist())


def samples_of(
    streams: list[str], values: list[float], ts: list[float], seq: list[int]
) -> list[Sample]:
    """Columns as ``Sample`` objects: ``ts`` NaN and ``seq`` NO_SEQ become None (not given)."""
    return [
        Sample(stream, value, None if stamp != stamp else stamp, None if n == NO_SEQ else n)
        for stream, value, stamp, n in zip(streams, values, ts, seq, strict=True)
    ]


@dataclass(slots=True)
class ForecastColumns:
    """A tick's forecasts as columns, in the order their samples arrived.

    ``index[i]`` is forecast i's position in the tick's input. NaN stands for "none" in ``ts``,
    ``error`` and ``naive_error``; ``covered`` means nothing where ``error`` is NaN.
    """

    streams: list[str]
    index: np.ndarray  # (M,) int64
    seq: np.ndarray  # (M,) int64
    ts: np.ndarray  # (M,) float64
    value: np.ndarray
    prediction: np.ndarray
    error: np.ndarray
    naive_error: np.ndarray
    lower: np.ndarray
    upper: np.ndarray
    anomaly: np.ndarray
    covered: np.ndarray  # (M,) bool
    warm: np.ndarray  # (M,) bool
    model_version: int
    path: np.ndarray | None = None  # (M, H) with a horizon H > 1
    path_lower: np.ndarray | None = None
    path_upper: np.ndarray | None = None
    # (M, len(COMPONENTS)): each component's share of the prediction (``forecaster.combine``);
    # None when combination is off
    weights: np.ndarray | None = None
    # (M,): with a shadow challenger (``model.challenger``; else None), the error on each value
    # of each model's own forecast, the RNN reader's before the mix (``forecaster.shadow``):
    # the served model's and the challenger's (NaN: none yet). Never published.
    model_error: np.ndarray | None = None
    challenger_error: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.streams)

    def to_list(self) -> list[Forecast]:
        """One ``Forecast`` object per row (``tolist`` first: one C call per column)."""
        error, naive = self.error.tolist(), self.naive_error.tolist()
        paths = (
            [{}] * len(self)
            if self.path is None or self.path_lower is None or self.path_upper is None
            else [
                {"path": tuple(p), "path_lower": tuple(lo), "path_upper": tuple(up)}
                for p, lo, up in zip(
                    self.path.tolist(),
                    self.path_lower.tolist(),
                    self.path_upper.tolist(),
                    strict=True,
                )
            ]
        )
        version = self.model_version
        return [
            Forecast(
                stream=stream,
                seq=seq,
                ts=None if ts != ts else ts,  # NaN: not given
                value=value,
                prediction=prediction,
                error=None if err != err else err,
                naive_error=None if nai != nai else nai,
                model_version=version,
                warm=warm,
                lower=lower,
                upper=upper,
                anomaly=anomaly,
                covered=None if err != err else covered,
                **extra,
            )
            for stream, seq, ts, value, prediction, err, nai, warm, lower, upper, anomaly, covered, extra in zip(
                self.streams,
                self.seq.tolist(),
                self.ts.tolist(),
                self.value.tolist(),
                self.prediction.tolist(),
                error,
                naive,
                self.warm.tolist(),
                self.lower.tolist(),
                self.upper.tolist(),
                self.anomaly.tolist(),
                self.covered.tolist(),
                paths,
                strict=True,
            )
        ]


@dataclass(slots=True)
class BatchResult:
    """What ``tick_batch`` gives: forecasts as columns, and the refused samples' positions."""

    forecasts: ForecastColumns
    rejected_index: np.ndarray  # (K,) int64, ascending
    rejected_reason: list[str]  # (K,) one of ENGINE_REASONS


@dataclass(slots=True)
class Admission:
    """What ``admit`` gives: the rows ``tick_batch`` will accept, with their sequence numbers.

    It also carries what ``tick_batch`` would otherwise work out again (each row's slot and
    round), so it is valid for the engine's next tick only.
    """

    batch: Batch
    index: np.ndarray  # (M,) int64: each admitted row's position in the input batch
    rejected_index: np.ndarray  # (K,) int64, ascending
    rejected_reason: list[str]  # (K,) one of ENGINE_REASONS
    slots: np.ndarray  # (M,) int64: each admitted row's slot when admitted; -1: not resident
    level: np.ndarray | None  # (M,) each row's round in the tick; None: every stream once
    tick: int  # ``Engine.ticks`` when admitted
    # Streams not resident that were seen before (parked): looked up once, by ``admit``
    parked: frozenset[str] = frozenset()

    def without(self, rows: np.ndarray, reason: str) -> Admission:
        """The admission less the admitted ``rows`` (positions in ``batch``), now refused for
        ``reason``. Take every row of a stream or none: the others' rounds stay as they are.
        """
        keep = np.ones(len(self.index), dtype=bool)
        keep[rows] = False
        kept = np.flatnonzero(keep)
        rows_of = self.batch
        batch = Batch(
            [rows_of.streams[i] for i in kept.tolist()],
            rows_of.values[kept],
            rows_of.ts[kept],
            rows_of.seq[kept],
        )
        refused = np.concatenate([self.rejected_index, self.index[rows]])
        order = np.argsort(refused, kind="stable")
        reasons = [*self.rejected_reason, *[reason] * len(rows)]
        return Admission(
            batch,
            self.index[kept],
            refused[order],
            [reasons[i] for i in order.tolist()],
            self.slots[kept],
            None if self.level is None else self.level[kept],
            self.tick,
            self.parked,
        )


def as_batch(samples: Sequence[Sample]) -> tuple[Batch, np.ndarray, list[tuple[int, str]]]:
    """``Sample`` objects as columns: the batch of those that can be rows, their positions in
    ``samples``, and (position, reason) for the others (a value that is not a number, ...)."""
    keep: list[int] = []
    refused: list[tuple[int, str]] = []
    for i, sample in enumerate(samples):
        reason = _object_reason(sample)
        if reason is None:
            keep.append(i)
        else:
            refused.append((i, reason))
    kept = [samples[i] for i in keep] if refused else samples
    batch = Batch(
        [s.stream for s in kept],
        np.fromiter((s.value for s in kept), np.float64, len(kept)),
        np.fromiter((np.nan if s.ts is None else s.ts for s in kept), np.float64, len(kept)),
        np.fromiter((NO_SEQ if s.seq is None else s.seq for s in kept), np.int64, len(kept)),
    )
    return batch, np.asarray(keep, dtype=np.int64), refused


def _object_reason(sample: Sample) -> str | None:
    """Why ``sample`` cannot become a row of a ``Batch`` (its values checked by ``tick_batch``)."""
    if not isinstance(sample.stream, str):
        return "bad_stream"
    value = sample.value
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating)):
        return "not_a_number"
    try:
        float(value)
    except OverflowError:  # an int too large for a float
        return "out_of_range"
    seq = sample.seq
    if seq is not None and (isinstance(seq, bool) or not isinstance(seq, (int, np.integer))):
        return "bad_seq"
    if seq is not None and not 0 <= seq < SEQ_LIMIT:
        return "duplicate" if seq < 0 else "bad_seq"  # below every stream's last: seen before
    return None
