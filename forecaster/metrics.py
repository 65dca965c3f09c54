"""Every Prometheus metric, built against an injected registry; ``/metrics``, ``/healthz``, ``/readyz``.

Names follow Prometheus conventions: prefix ``forecaster_``, base units (seconds), ``_total`` on
counters. Per-stream series carry a ``stream`` label for the first ``stream_label_cap`` streams seen;
later streams are folded into ``stream="_other"`` so a fleet of sensors cannot explode the series
count. No metric is ever given a non-finite value: one NaN observed by a histogram makes its
``_sum`` NaN forever.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from itertools import repeat

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, make_wsgi_app
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from forecaster import __version__, ewm
from forecaster.combine import COMPONENTS
from forecaster.config import AnomalyConfig, MetricsConfig
from forecaster.mqtt import LinkEvents
from forecaster.reasons import DROP_REASONS, REASONS
from forecaster.records import Forecast, ForecastColumns
from forecaster.web import PooledWSGIServer, WsgiApp, router

OTHER = "_other"
STORAGE_PARTS = ("journal", "checkpoint", "park_store")
# Defaults: the config models' (one source; the daemon passes the configured values).
_METRICS, _ANOMALY = MetricsConfig(), AnomalyConfig()
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
CHECKPOINT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
TICK_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
ERROR_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
    25,
    50,
    100,
    250,
    1000,
)


class Metrics(LinkEvents):
    """The daemon's metrics; the MQTT link reports through the ``LinkEvents`` hooks."""

    def __init__(
        self,
        registry: CollectorRegistry,
        *,
        stream_label_cap: int = _METRICS.stream_label_cap,
        error_halflife: float = _METRICS.error_halflife,
        coverage_halflife: float = _METRICS.coverage_halflife,
        anomaly_threshold: float = _ANOMALY.threshold,
    ) -> None:
        self.registry = registry
        self.stream_label_cap = stream_label_cap
        self.alpha = ewm.alpha(error_halflife)
        self.coverage_alpha = ewm.alpha(coverage_halflife)
        self.anomaly_threshold = anomaly_threshold
        # Per label (at most the cap, plus _other): the numbers behind its per-stream series.
        self._labels = _LabelTable(stream_label_cap + 1)
        self._lock = threading.Lock()  # the engine thread writes _labels, scrapes read it
        r = registry
        self.messages_received = Counter(
            "forecaster_messages_received_total",
            "MQTT messages taken off the receive queue",
            registry=r,
        )
        self.samples_received = Counter(
            "forecaster_samples_received_total",
            "Samples read out of those messages (a frame carries several)",
            registry=r,
        )
        self.forecasts_published = Counter(
            "forecaster_forecasts_published_total", "Forecasts handed to the broker", registry=r
        )
        self.rejected = Counter(
            "forecaster_samples_rejected_total",
            "Samples refused before touching any state, by reason",
            ["reason"],
            registry=r,
        )
        for reason in REASONS:
            self.rejected.labels(reason)
        self.messages_dropped = Counter(
            "forecaster_messages_dropped_total",
            "Messages lost by the daemon (queue full, publish refused), by reason",
            ["reason"],
            registry=r,
        )
        for reason in DROP_REASONS:
            self.messages_dropped.labels(reason)
        self.backpressure_waits = Counter(
            "forecaster_backpressure_waits_total",
            "Times the MQTT reader found the receive queue full and waited for room",
            registry=r,
        )
        self.journal_replayed = Counter(
            "forecaster_journal_replayed_total",
            "Journaled samples replayed through the engine after a restart",
            registry=r,
        )
        self.journal_pending = Gauge(
            "forecaster_journal_pending",
            "Journaled samples a restart would replay (applied since the last checkpoint)",
            registry=r,
        )
        self.callback_errors = Counter(
            "forecaster_callback_errors_total",
            "Exceptions caught in MQTT callbacks (the network loop keeps running)",
            ["callback"],
            registry=r,
        )
        self.loop_restarts = Counter(
            "forecaster_mqtt_loop_restarts_total",
            "Network loop restarts by the watchdog",
            registry=r,
        )
        self.broker_connected = Gauge(
            "forecaster_broker_connected", "1 while connected to the broker", registry=r
        )
        self.reconnects = Counter(
            "forecaster_reconnects_total", "Successful reconnections after the first", registry=r
        )
        self.abs_error = TickHistogram(
            "forecaster_abs_error",
            "Absolute one-step prediction error over all streams (stream units)",
            ERROR_BUCKETS,
            registry=r,
        )
        self.latency = TickHistogram(
            "forecaster_latency_seconds",
            "Receive to publish, per output message",
            LATENCY_BUCKETS,
            registry=r,
        )
        self.tick_duration = Histogram(
            "forecaster_tick_duration_seconds",
            "Engine tick duration",
            buckets=TICK_BUCKETS,
            registry=r,
        )
        self.tick_batch = Histogram(
            "forecaster_tick_batch_size",
            "Samples per engine tick",
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge(
            "forecaster_queue_depth", "Messages waiting in the receive queue", registry=r
        )
        self.streams_active = Gauge(
            "forecaster_streams_active", "Streams with serving state", registry=r
        )
        self.streams_evicted = Counter(
            "forecaster_streams_evicted_total",
            "Least recently used streams parked in the state store (engine.max_streams)",
            registry=r,
        )
        self.streams_restored = Counter(
            "forecaster_streams_restored_total",
            "Parked streams brought back, exactly, when they sent again",
            registry=r,
        )
        self.streams_parked = Gauge(
            "forecaster_streams_parked",
            "Streams parked in the state store (engine.max_streams), after the last expiry",
            registry=r,
        )
        self.parked_bytes = Gauge(
            "forecaster_parked_bytes", "Bytes of the parked-stream store on disk", registry=r
        )
        self.streams_expired = Counter(
            "forecaster_streams_expired_total",
            "Parked streams forgotten (engine.park_expiry, engine.max_parked)",
            registry=r,
        )
        self.gap_resets = Counter(
            "forecaster_gap_resets_total",
            "Hidden states reset after a gap in a stream's timestamps (engine.gaps)",
            registry=r,
        )
        self.checkpoint_age = Gauge(
            "forecaster_checkpoint_age_seconds", "Seconds since the last checkpoint", registry=r
        )
        self.checkpoints = Counter(
            "forecaster_checkpoints_total", "Checkpoints written", ["result"], registry=r
        )
        self.checkpoint_duration = Histogram(
            "forecaster_checkpoint_duration_seconds",
            "Checkpoint time by stage: engine_thread (forecasting paused: waiting for forecasts"
            " to leave, copying the state), write (serialise, write, fsync; in the background)",
            ["stage"],
            buckets=CHECKPOINT_BUCKETS,
            registry=r,
        )
        self.storage_fault = Gauge(
            "forecaster_storage_fault",
            "1 while a part of the state folder cannot be written (journal: intake paused,"
            " samples held unacknowledged; checkpoint: the journal grows until one succeeds)",
            ["part"],
            registry=r,
        )
        self.storage_errors = Counter(
            "forecaster_storage_errors_total",
            "Failed writes to the state folder, by part (journal, checkpoint)",
            ["part"],
            registry=r,
        )
        self.storage_held = Gauge(
            "forecaster_storage_held_samples",
            "Samples held unacknowledged until the journal can take them again",
            registry=r,
        )
        for part in STORAGE_PARTS:
            self.storage_fault.labels(part)
            self.storage_errors.labels(part)
        self.checkpoint_fallbacks = Counter(
            "forecaster_checkpoint_fallbacks_total",
            "Damaged checkpoints set aside at start, an older good one restored instead",
            registry=r,
        )
        self.state_loss = Counter(
            "forecaster_state_loss_positions_total",
            "Journal positions found missing at start and accepted as lost"
            " (state.accept_state_loss or --accept-state-loss)",
            registry=r,
        )
        self.model_version = Gauge(
            "forecaster_model_version", "Version of the weights serving now", registry=r
        )
        self.learn_updates = Counter(
            "forecaster_learning_updates_total", "Online-learning updates served", registry=r
        )
        self.learn_skipped = Counter(
            "forecaster_learning_skipped_total",
            "Online-learning updates skipped, by reason (non_finite, behind, failed)",
            ["reason"],
            registry=r,
        )
        self.learn_rollbacks = Counter(
            "forecaster_learning_rollbacks_total",
            "Updates rolled back by the error guard",
            registry=r,
        )
        self.learn_loss = Gauge(
            "forecaster_learning_loss",
            "Training loss (normalised MSE) of the last update",
            registry=r,
        )
        self._learn_seen = (0, 0, 0, 0, 0)
        self.http_refused = Counter(
            "forecaster_http_refused_total",
            "HTTP connections refused because every worker was busy and the queue full",
            registry=r,
        )
        self.info = Info("forecaster_build", "Build information", registry=r)
        self.info.info({"version": __version__})
        # Per-stream series are read from ``_labels`` when Prometheus scrapes (a custom
        # collector): a tick of frames from a thousand streams would otherwise make 13,000
        # ``Gauge.set`` calls, each taking a lock, ~80 us per forecast measured.
        r.register(_StreamCollector(self))
        self._checkpoint_at = time.monotonic()
        self.checkpoint_age.set_function(lambda: time.monotonic() - self._checkpoint_at)

    # -- LinkEvents ---------------------------------------------------------------------------
    def connected(self, up: bool) -> None:
        self.broker_connected.set(1 if up else 0)

    def reconnected(self) -> None:
        self.reconnects.inc()

    def dropped(self, reason: str) -> None:
        self.messages_dropped.labels(reason).inc()

    def backpressure(self) -> None:
        self.backpressure_waits.inc()

    def callback_error(self, callback: str) -> None:
        self.callback_errors.labels(callback).inc()

    def loop_restarted(self) -> None:
        self.loop_restarts.inc()

    def observe_learner(self, stats: object) -> None:
        """Fold the learner's running totals into counters (increments since the last call)."""
        now = (
            stats.updates,
            stats.skipped_nonfinite,
            stats.skipped_behind,
            stats.rollbacks,
            stats.failed,
        )  # type: ignore[attr-defined]
        before, self._learn_seen = self._learn_seen, now
        self.learn_updates.inc(max(0, now[0] - before[0]))
        self.learn_skipped.labels("non_finite").inc(max(0, now[1] - before[1]))
        self.learn_skipped.labels("behind").inc(max(0, now[2] - before[2]))
        self.learn_rollbacks.inc(max(0, now[3] - before[3]))
        self.learn_skipped.labels("failed").inc(max(0, now[4] - before[4]))
        loss = stats.last_loss  # type: ignore[attr-defined]
        if math.isfinite(loss):
            self.learn_loss.set(loss)

    # -- engine side --------------------------------------------------------------------------
    def checkpointed(self, ok: bool) -> None:
        self.checkpoints.labels("ok" if ok else "error").inc()
        if ok:
            self._checkpoint_at = time.monotonic()

    def observe_columns(self, forecasts: ForecastColumns) -> None:
        """Error metrics for a tick's forecasts, as the engine gives them."""
        # covered means nothing where there was no forecast: NaN there
        covered = np.where(np.isnan(forecasts.error), np.nan, forecasts.covered)
        f = forecasts
        self._observe(
            f.streams,
            f.value,
            f.prediction,
            f.error,
            f.naive_error,
            f.lower,
            f.upper,
            f.anomaly,
            covered,
            f.weights,
        )

    def observe_forecasts(self, forecasts: Iterable[Forecast]) -> None:
        """``observe_columns`` for ``Forecast`` objects (None for "no error" and "no interval")."""
        rows = list(forecasts)

        def column(read: Callable[[Forecast], float | None]) -> np.ndarray:
            return np.array([read(f) for f in rows], dtype=np.float64)  # None -> NaN

        self._observe(
            [f.stream for f in rows],
            *(
                column(lambda f, key=key: getattr(f, key))
                for key in (
                    "value",
                    "prediction",
                    "error",
                    "naive_error",
                    "lower",
                    "upper",
                    "anomaly",
                    "covered",
                )
            ),
        )

    def _observe(
        self,
        streams: list[str],
        value: np.ndarray,
        prediction: np.ndarray,
        error: np.ndarray,
        naive: np.ndarray,
        lower: np.ndarray,
        upper: np.ndarray,
        anomaly: np.ndarray,
        covered: np.ndarray,
        weights: np.ndarray | None = None,
    ) -> None:
        """Fold a tick's forecasts into each label's numbers (NaN error: none yet; NaN covered:
        no interval yet), in arrival order, as columns. ``_StreamCollector`` exports them at
        scrape time. Errors are clamped so that squares stay finite too."""
        errors = _bounded(error, 1e150)  # NaN stays NaN: skipped below
        naives = _bounded(naive, 1e150)
        scored = ~(np.isnan(errors) | np.isnan(naives))
        has_interval = ~np.isnan(covered)
        with self._lock:
            table = self._labels
            rows = table.rows(streams, self.stream_label_cap)
            per_label = np.bincount(rows, minlength=table.capacity)
            table.samples += per_label
            table.anomalies += np.bincount(
                rows, anomaly > self.anomaly_threshold, minlength=table.capacity
            ).astype(np.int64)
            distinct = bool(per_label.max() <= 1)  # each label once: the usual small tick
            # each label's last row
            latest = (
                slice(None)
                if distinct
                else len(rows) - 1 - np.unique(rows[::-1], return_index=True)[1]
            )
            shares = np.full((len(value), len(COMPONENTS)), np.nan) if weights is None else weights
            lasts = np.column_stack([value, prediction, lower, upper, anomaly, shares])[latest]
            table.last[rows[latest]] = _finite(lasts, 1e300)
            e, n = errors[scored], naives[scored]
            _fold(
                table.rolling,
                table.rolling_n,
                rows[scored],
                np.stack([np.abs(e), e * e, np.abs(n), n * n], axis=1),
                self.alpha,
                distinct,
            )
            widths = _finite(upper[has_interval] - lower[has_interval], 1e150)
            _fold(
                table.interval,
                table.interval_n,
                rows[has_interval],
                np.stack([covered[has_interval], widths], axis=1),
                self.coverage_alpha,
                distinct,
            )
        self.abs_error.observe_many(np.abs(errors[scored]))

    def labelled(self, start: int = 0) -> list[str]:
        """Streams given their own label, in the order they got it, from the ``start``-th label
        on (``_other`` left out): at most ``stream_label_cap`` ever."""
        with self._lock:
            return [name for name in self._labels.names[start:] if name != OTHER]

    @property
    def labels_given(self) -> int:
        """How many labels exist (``_other`` included): ``labelled``'s next ``start``."""
        return len(self._labels.names)


class _LabelTable:
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

    def snapshot(self) -> list[tuple[str, _Numbers]]:
        """Every label's numbers now (copies: the engine thread goes on writing)."""
        return [
            (
                label,
                _Numbers(
                    int(self.samples[row]),
                    int(self.anomalies[row]),
                    None
                    if label == OTHER or math.isnan(self.last[row, 0])
                    else self.last[row].tolist(),
                    int(self.rolling_n[row]),
                    *self.rolling[row].tolist(),
                    int(self.interval_n[row]),
                    *self.interval[row].tolist(),
                ),
            )
            for row, label in enumerate(self.names)
        ]


@dataclass(frozen=True, slots=True)
class _Numbers:
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

    @property
    def skill(self) -> float:
        return 1.0 - self.sq / self.naive_sq if self.naive_sq > 0 else 0.0


def _fold(
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
    >>> _fold(means, counts, np.array([0, 1, 0, 0]), np.array([[1.0], [5.0], [2.0], [6.0]]), 0.1)
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


def _bounded(x: np.ndarray, limit: float) -> np.ndarray:
    """``x`` within +-``limit``, NaN kept (``np.clip``'s own overhead is most of a small tick's
    metrics)."""
    return np.minimum(np.maximum(x, -limit), limit)


def _finite(x: np.ndarray, limit: float) -> np.ndarray:
    """``x`` within +-``limit``, NaN as 0 (for gauges and widths that must be finite)."""
    out = _bounded(x, limit)
    out[np.isnan(out)] = 0.0
    return out


def _rolling(attribute: str, transform: Callable[[float], float] = float) -> Callable:
    """A rolling error statistic, exported from the label's first error on."""
    return lambda n: transform(getattr(n, attribute)) if n.rolling_n else None


def _interval(attribute: str) -> Callable:
    """A rolling interval statistic, exported from the label's first scored interval on."""
    return lambda n: getattr(n, attribute) if n.interval_n else None


def _last(field_index: int) -> Callable:
    """A field of the label's last forecast; ``_other`` aggregates streams: it has no last."""
    return lambda n: None if n.last is None else n.last[field_index]


# Per-stream gauges: name, help, and the value for one label (None: not exported for it yet).
STREAM_GAUGES: tuple[tuple[str, str, Callable[[_Numbers], float | None]], ...] = (
    ("mae", "Rolling (EWMA) MAE of the model", _rolling("abs")),
    ("rmse", "Rolling (EWMA) RMSE of the model", _rolling("sq", math.sqrt)),
    ("naive_mae", "Rolling MAE of the last-value forecast", _rolling("naive_abs")),
    ("naive_rmse", "Rolling RMSE of the last-value forecast", _rolling("naive_sq", math.sqrt)),
    ("skill", "1 - MSE/naive MSE (rolling); below 0 the model loses", _rolling("skill")),
    (
        "interval_coverage",
        "Rolling (EWMA) share of values inside the interval published before them",
        _interval("coverage"),
    ),
    (
        "interval_width",
        "Rolling (EWMA) mean width of the published interval (stream units)",
        _interval("width"),
    ),
    ("last_value", "Last value received", _last(0)),
    ("last_prediction", "Last prediction made (for the next value)", _last(1)),
    ("last_lower", "Lower bound of the calibrated interval for the next value", _last(2)),
    ("last_upper", "Upper bound of the calibrated interval for the next value", _last(3)),
    (
        "anomaly_score",
        "Anomaly score of the last value, in [0, 1] (0.5 during warm-up)",
        _last(4),
    ),
)
STREAM_COUNTERS: tuple[tuple[str, str, Callable[[_Numbers], int]], ...] = (
    ("samples", "Samples accepted per stream", lambda n: n.samples),
    ("anomalies", "Values whose anomaly score exceeded anomaly.threshold", lambda n: n.anomalies),
)


class _StreamCollector(Collector):
    """``forecaster_stream_*{stream}``, built from ``Metrics._labels`` at scrape time."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def describe(self) -> list[Metric]:
        return self._families()  # names only: the registry checks them for clashes

    def collect(self) -> list[Metric]:
        with self.metrics._lock:  # a consistent view: no tick half-way through
            snapshot = self.metrics._labels.snapshot()
        return self._families(snapshot)

    @staticmethod
    def _families(snapshot: list[tuple[str, _Numbers]] | None = None) -> list[Metric]:
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
        return families


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


class HttpEndpoint:
    """``/metrics`` (prometheus-client), ``/healthz`` (alive), ``/readyz`` (connected and serving),
    and any extra ``routes`` (the live page); other paths 404. A fixed pool of ``workers`` threads
    answers (``web.PooledWSGIServer``)."""

    def __init__(
        self,
        registry: CollectorRegistry,
        host: str,
        port: int,
        healthy: Callable[[], tuple[bool, str]],
        ready: Callable[[], tuple[bool, str]],
        *,
        routes: dict[str, WsgiApp] | None = None,
        workers: int = 4,
        timeout: float = 10.0,
        on_refused: Callable[[], None] | None = None,
    ) -> None:
        def probe(check: Callable[[], tuple[bool, str]]) -> WsgiApp:
            def app(environ: dict, start_response: Callable) -> list[bytes]:
                ok, detail = check()
                status = "200 OK" if ok else "503 Service Unavailable"
                start_response(status, [("Content-Type", "text/plain; charset=utf-8")])
                return [f"{'ok' if ok else 'not ok'}: {detail}\n".encode()]

            return app

        app = router(
            {
                "/metrics": make_wsgi_app(registry),
                "/healthz": probe(healthy),
                "/readyz": probe(ready),
                **(routes or {}),
            }
        )
        self.server = PooledWSGIServer(
            (host, port), app, workers=workers, timeout=timeout, on_refused=on_refused
        )
        self.port = self.server.server_port
        self.thread = threading.Thread(target=self.server.serve_forever, name="http", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
