"""The custom Prometheus collectors fed a whole tick at a time: the per-stream series and the
tick histograms.

prometheus-client's own metrics take a lock per ``set``/``observe``; a tick of frames from a
thousand streams would make thousands of such calls. Here a tick is folded into arrays with a few
NumPy calls, and the series are built from them when Prometheus scrapes. Per-stream series carry a
``stream`` label for the first ``stream_label_cap`` streams seen; later streams are folded into
``stream="_other"``.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import repeat

import numpy as np
from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from forecaster.combine import COMPONENTS

OTHER = "_other"


class LabelTable:
    """Each label's numbers as rows of arrays (the cap bounds them), so a tick folds in its
    forecasts with a few NumPy calls instead of a Python loop per forecast."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.names: list[str] = []
        self.index: dict[str, int] = {}  # label -> row
        self.samples = np.zeros(capacity, dtype=np.int64)
        self.anomalies = np.zeros(capacity, dtype=np.int64)
        # value, prediction, lower, upper, anomaly, then each component's weight
        self.last = np.full((capacity, 5 + len(COMPONENTS)), np.nan)
        self.rolling = np.zeros((capacity, 4))  # EWMA of |e|, e^2, |naive|, naive^2
        self.rolling_n = np.zeros(capacity, dtype=np.int64)
        self.interval = np.zeros((capacity, 2))  # EWMA of covered (0/1) and width
        self.interval_n = np.zeros(capacity, dtype=np.int64)
        # EWMA of each model's own e^2 (served, shadow challenger; ``forecaster.shadow``)
        self.models = np.zeros((capacity, 2))
        self.models_n = np.zeros(capacity, dtype=np.int64)

    def fold_errors(
        self,
        rows: np.ndarray,
        scored: np.ndarray,
        errors: np.ndarray,
        naives: np.ndarray,
        alpha: float,
        distinct: bool,
    ) -> None:
        """Fold the ``scored`` forecasts' errors and the last value's into the rolling means."""
        e, n = errors[scored], naives[scored]
        x = np.stack([np.abs(e), e * e, np.abs(n), n * n], axis=1)
        fold(self.rolling, self.rolling_n, rows[scored], x, alpha, distinct)

    def fold_intervals(
        self,
        rows: np.ndarray,
        has_interval: np.ndarray,
        covered: np.ndarray,
        width: np.ndarray,
        alpha: float,
        distinct: bool,
    ) -> None:
        """Fold whether each value was covered, and the interval's width, where one existed."""
        widths = finite(width[has_interval], 1e150)
        x = np.stack([covered[has_interval], widths], axis=1)
        fold(self.interval, self.interval_n, rows[has_interval], x, alpha, distinct)

    def fold_models(
        self, rows: np.ndarray, scored: np.ndarray, own: np.ndarray, alpha: float, distinct: bool
    ) -> None:
        """Fold each model's own error ``(m, 2)``: served, challenger (``forecaster.shadow``),
        where both forecast a scored value."""
        own = bounded(own, 1e150)
        both = scored & ~np.isnan(own).any(axis=1)
        fold(self.models, self.models_n, rows[both], own[both] ** 2, alpha, distinct)

    def forget_models(self) -> None:
        """The challenger changed or left: the comparison starts afresh (none is exported until
        both models have scored again)."""
        self.models[:] = 0.0
        self.models_n[:] = 0

    def rows(self, streams: list[str], cap: int) -> np.ndarray:
        """Each stream's row: its own label while fewer than ``cap`` streams have one, else
        ``_other``'s."""
        index = self.index
        rows = np.fromiter(map(index.get, streams, repeat(-1)), np.int64, len(streams))
        missing = np.flatnonzero(rows < 0)
        for i in missing.tolist():
            if len(self.names) - (OTHER in index) >= cap:
                break
            rows[i] = self._row(streams[i])
        missing = missing[rows[missing] < 0]
        if len(missing):  # beyond the cap, or a stream labelled just now and seen again
            found = map(index.get, [streams[i] for i in missing.tolist()], repeat(-1))
            again = np.fromiter(found, np.int64, len(missing))
            if (again < 0).any():
                again[again < 0] = self._row(OTHER)
            rows[missing] = again
        return rows

    def _row(self, label: str) -> int:
        row = self.index.get(label)
        if row is None:
            row = self.index[label] = len(self.names)
            self.names.append(label)
        return row

    def snapshot(self) -> list[tuple[str, Numbers]]:
        """Every label's numbers now (copies: the engine thread goes on writing)."""
        return [
            (
                label,
                Numbers(
                    int(self.samples[row]),
                    int(self.anomalies[row]),
                    None
                    if label == OTHER or math.isnan(self.last[row, 0])
                    else self.last[row].tolist(),
                    int(self.rolling_n[row]),
                    *self.rolling[row].tolist(),
                    int(self.interval_n[row]),
                    *self.interval[row].tolist(),
                    int(self.models_n[row]),
                    *self.models[row].tolist(),
                ),
            )
            for row, label in enumerate(self.names)
        ]


@dataclass(frozen=True, slots=True)
class Numbers:
    """One label's numbers behind its per-stream series, as one scrape sees them."""

    samples: int
    anomalies: int
    last: list[float] | None  # value, prediction, lower, upper, anomaly, weights; None: _other
    rolling_n: int
    abs: float
    sq: float
    naive_abs: float
    naive_sq: float
    interval_n: int
    coverage: float
    width: float
    models_n: int = 0
    served_sq: float = 0.0  # the served model's own forecast (before the mix)
    challenger_sq: float = 0.0

    @property
    def skill(self) -> float:
        return 1.0 - self.sq / self.naive_sq if self.naive_sq > 0 else 0.0


def fold(
    means: np.ndarray,
    counts: np.ndarray,
    rows: np.ndarray,
    x: np.ndarray,
    alpha: float,
    distinct: bool = False,
) -> None:
    """Fold ``x`` (m, c) into the running means of ``rows`` (m,), in order, exactly as the
    one-at-a-time update ``n += 1; mean += max(alpha, 1/n) * (x - mean)`` would (up to rounding):
    a plain average until the half-life takes over, then an EWMA. ``distinct``: no row repeats.

    Per row the update is ``mean = (1 - w) mean + w x``, so after a label's k rows of a tick
    ``mean = prod(1 - w) mean_0 + sum_j w_j x_j prod_{i>j} (1 - w_i)``; the products are
    exponentials of sums of ``log(1 - w)`` within each label.

    >>> means, counts = np.zeros((2, 1)), np.zeros(2, dtype=np.int64)
    >>> fold(means, counts, np.array([0, 1, 0, 0]), np.array([[1.0], [5.0], [2.0], [6.0]]), 0.1)
    >>> means.ravel().round(12).tolist(), counts.tolist()  # label 0: (1 + 2 + 6) / 3
    ([3.0, 5.0], [3, 1])
    """
    if not len(rows):
        return
    if distinct:  # one update per label: the definition itself
        weight = np.maximum(alpha, 1.0 / (counts[rows] + 1))
        means[rows] += weight[:, None] * (x - means[rows])
        counts[rows] += 1
        return
    order = np.argsort(rows, kind="stable")
    rows, x = rows[order], x[order]
    starts = np.flatnonzero(np.diff(rows, prepend=-1))
    sizes = np.diff(starts, append=len(rows))
    labels = rows[starts]
    rank = np.arange(len(rows)) - np.repeat(starts, sizes)
    weight = np.maximum(alpha, 1.0 / (counts[rows] + rank + 1))
    # A label's very first value sets its mean outright (weight 1, the only weight that makes
    # 1 - w zero): start the recurrence from it instead.
    fresh = weight == 1.0
    means[rows[fresh]] = x[fresh]
    weight[fresh] = 0.0
    log_keep = np.cumsum(np.log1p(-weight))  # (m,) running sum of log(1 - w)
    ends = starts + sizes - 1
    after = log_keep[np.repeat(ends, sizes)] - log_keep  # sum over the label's later rows
    whole = log_keep[ends] - log_keep[starts] + np.log1p(-weight[starts])
    added = np.add.reduceat((weight * np.exp(after))[:, None] * x, starts, axis=0)
    means[labels] = np.exp(whole)[:, None] * means[labels] + added
    counts[labels] += sizes


def bounded(x: np.ndarray, limit: float) -> np.ndarray:
    """``x`` within +-``limit``, NaN kept (``np.clip``'s own overhead is most of a small tick's
    metrics)."""
    return np.minimum(np.maximum(x, -limit), limit)


def finite(x: np.ndarray, limit: float) -> np.ndarray:
    """``x`` within +-``limit``, NaN as 0 (for gauges and widths that must be finite)."""
    out = bounded(x, limit)
    out[np.isnan(out)] = 0.0
    return out


def rolling(attribute: str, transform: Callable[[float], float] = float) -> Callable:
    """A rolling error statistic, exported from the label's first error on."""
    return lambda n: transform(getattr(n, attribute)) if n.rolling_n else None


def interval(attribute: str) -> Callable:
    """A rolling interval statistic, exported from the label's first scored interval on."""
    return lambda n: getattr(n, attribute) if n.interval_n else None


def last(field_index: int) -> Callable:
    """A field of the label's last forecast; ``_other`` aggregates streams: it has no last."""
    return lambda n: None if n.last is None else n.last[field_index]


# Per-stream gauges: name, help, and the value for one label (None: not exported for it yet).
STREAM_GAUGES: tuple[tuple[str, str, Callable[[Numbers], float | None]], ...] = (
    ("mae", "Rolling (EWMA) MAE of the model", rolling("abs")),
    ("rmse", "Rolling (EWMA) RMSE of the model", rolling("sq", math.sqrt)),
    ("naive_mae", "Rolling MAE of the last-value forecast", rolling("naive_abs")),
    ("naive_rmse", "Rolling RMSE of the last-value forecast", rolling("naive_sq", math.sqrt)),
    ("skill", "1 - MSE/naive MSE (rolling); below 0 the model loses", rolling("skill")),
    (
        "interval_coverage",
        "Rolling (EWMA) share of values inside the interval published before them",
        interval("coverage"),
    ),
    (
        "interval_width",
        "Rolling (EWMA) mean width of the published interval (stream units)",
        interval("width"),
    ),
    ("last_value", "Last value received", last(0)),
    ("last_prediction", "Last prediction made (for the next value)", last(1)),
    ("last_lower", "Lower bound of the calibrated interval for the next value", last(2)),
    ("last_upper", "Upper bound of the calibrated interval for the next value", last(3)),
    (
        "anomaly_score",
        "Anomaly score of the last value, in [0, 1] (0.5 during warm-up)",
        last(4),
    ),
)
STREAM_COUNTERS: tuple[tuple[str, str, Callable[[Numbers], int]], ...] = (
    ("samples", "Samples accepted per stream", lambda n: n.samples),
    ("anomalies", "Values whose anomaly score exceeded anomaly.threshold", lambda n: n.anomalies),
)


class StreamCollector(Collector):
    """``forecaster_stream_*{stream}``, built from a ``LabelTable`` at scrape time."""

    def __init__(self, table: LabelTable, lock: threading.Lock) -> None:
        self.table, self.lock = table, lock  # the lock: the one the engine thread writes under

    def describe(self) -> list[Metric]:
        return self._families()  # names only: the registry checks them for clashes

    def collect(self) -> list[Metric]:
        with self.lock:  # a consistent view: no tick half-way through
            snapshot = self.table.snapshot()
        return self._families(snapshot)

    @staticmethod
    def _families(snapshot: list[tuple[str, Numbers]] | None = None) -> list[Metric]:
        families: list[Metric] = []
        for name, doc, read in STREAM_GAUGES:
            gauge = GaugeMetricFamily(f"forecaster_stream_{name}", doc, labels=["stream"])
            for label, numbers in snapshot or ():
                value = read(numbers)
                if value is not None:
                    gauge.add_metric([label], value)
            families.append(gauge)
        weight = GaugeMetricFamily(
            "forecaster_stream_weight",
            "Share of the last forecast that each component gave (naive, rnn, ar; sums to 1)",
            labels=["stream", "component"],
        )
        for label, numbers in snapshot or ():
            if numbers.last is not None and not math.isnan(numbers.last[5]):
                for i, component in enumerate(COMPONENTS):
                    weight.add_metric([label, component], numbers.last[5 + i])
        families.append(weight)
        for name, doc, count in STREAM_COUNTERS:
            counter = CounterMetricFamily(f"forecaster_stream_{name}", doc, labels=["stream"])
            for label, numbers in snapshot or ():
                counter.add_metric([label], count(numbers))
            families.append(counter)
        families.extend(StreamCollector._models(snapshot or []))
        return families

    @staticmethod
    def _models(snapshot: list[tuple[str, Numbers]]) -> list[Metric]:
        """The served model against the shadow challenger (``model.challenger``), each by its
        own forecast (``forecaster.shadow``): per stream, and over every labelled stream both
        have scored as the geometric mean of rolling MSE / naive MSE (``bench accuracy``'s)."""
        roles = (("champion", "served_sq"), ("challenger", "challenger_sq"))
        rmse = GaugeMetricFamily(
            "forecaster_stream_model_rmse",
            "Rolling RMSE of each model's own forecast (the RNN reader's, before the mix), by"
            " role: champion (served), challenger (model.challenger, never published)",
            labels=["stream", "role"],
        )
        overall = GaugeMetricFamily(
            "forecaster_model_geo_rel_mse",
            "Geometric mean over streams of each model's rolling MSE / naive MSE, by role"
            " (champion, challenger); lower is better, 1 = the last value",
            labels=["role"],
        )
        scored = [(label, n) for label, n in snapshot if n.models_n and n.rolling_n]
        for label, numbers in scored:
            for role, sq in roles:
                rmse.add_metric([label, role], math.sqrt(getattr(numbers, sq)))
        both = [n for label, n in scored if label != OTHER and n.naive_sq > 0]
        for role, sq in roles if both else ():
            ratios = np.array([getattr(n, sq) / n.naive_sq for n in both])
            overall.add_metric([role], float(np.exp(np.mean(np.log(np.maximum(ratios, 1e-300))))))
        return [rmse, overall]


class TickHistogram(Collector):
    """A histogram fed a whole tick's values at once (one NumPy binning, one lock).

    prometheus-client's ``Histogram.observe`` takes one value and a lock per call: with the
    per-forecast error and latency histograms that was ~15 % of the engine thread's time on
    ticks of 100 messages. Exported through the client's own ``HistogramMetricFamily``.
    """

    def __init__(
        self, name: str, documentation: str, buckets: tuple[float, ...], registry: CollectorRegistry
    ) -> None:
        self.name, self.documentation = name, documentation
        self.bounds = np.array(buckets, dtype=np.float64)
        self.counts = np.zeros(len(buckets) + 1, dtype=np.int64)  # the last one: above all (+Inf)
        self.sum = 0.0
        self.lock = threading.Lock()
        registry.register(self)

    def observe_many(self, values: Sequence[float]) -> None:
        """Count finite values (each in the first bucket whose bound it does not exceed)."""
        if not len(values):
            return
        array = np.asarray(values, dtype=np.float64)
        bins = np.bincount(np.searchsorted(self.bounds, array), minlength=len(self.counts))
        with self.lock:
            self.counts += bins
            self.sum += float(array.sum())

    def describe(self) -> list[Metric]:
        return [HistogramMetricFamily(self.name, self.documentation)]

    def collect(self) -> list[Metric]:
        with self.lock:
            cumulative, total = np.cumsum(self.counts).tolist(), self.sum
        bounds = [*(floatToGoString(b) for b in self.bounds.tolist()), "+Inf"]
        family = HistogramMetricFamily(self.name, self.documentation)
        family.add_metric([], list(zip(bounds, cumulative, strict=True)), total)
        return [family]
