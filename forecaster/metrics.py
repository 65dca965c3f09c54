"""Every Prometheus metric, declared against an injected registry, and the hooks that feed them.

Names follow Prometheus conventions: prefix ``forecaster_``, base units (seconds), ``_total`` on
counters. Per-stream series carry a ``stream`` label for the first ``stream_label_cap`` streams seen;
later streams are folded into ``stream="_other"`` so a fleet of sensors cannot explode the series
count. No metric is ever given a non-finite value: one NaN observed by a histogram makes its
``_sum`` NaN forever. The per-stream series and tick histograms are ``collectors``; the HTTP port
that serves them is ``web.HttpEndpoint``.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterable

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

from forecaster import __version__, ewm
from forecaster.collectors import (
    OTHER,
    LabelTable,
    StreamCollector,
    TickHistogram,
    bounded,
    finite,
)
from forecaster.combine import COMPONENTS
from forecaster.config import AnomalyConfig, MetricsConfig
from forecaster.mqtt import LinkEvents
from forecaster.reasons import DROP_REASONS, REASONS
from forecaster.records import Forecast, ForecastColumns

STORAGE_PARTS = ("journal", "checkpoint", "park_store")
LEARNER_TOTALS = ("updates", "skipped_nonfinite", "skipped_behind", "rollbacks", "failed")
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
        self._labels = LabelTable(stream_label_cap + 1)
        self._lock = threading.Lock()  # the engine thread writes _labels, scrapes read it
        r = registry
        self.messages_received = Counter(
            "forecaster_messages_received_total", "MQTT messages taken off the queue", registry=r
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
        self.promotions = Counter(
            "forecaster_model_promotions_total",
            "Swaps of the served model and the shadow challenger (model.challenger), by action"
            " (promote, rollback), trigger (manual, auto) and outcome (done, refused)",
            ["action", "trigger", "outcome"],
            registry=r,
        )
        self.config_reloads = Counter(
            "forecaster_config_reloads_total", "Config reloads (SIGHUP)", ["outcome"], registry=r
        )
        self.http_rejected = Counter(
            "forecaster_http_rejected_total",
            "HTTP requests answered 4xx (an unknown path, a malformed request), by status",
            ["code"],
            registry=r,
        )
        self.info = Info("forecaster_build", "Build information", registry=r)
        self.info.info({"version": __version__})
        # Per-stream series are read from ``_labels`` when Prometheus scrapes (a custom
        # collector): a tick of frames from a thousand streams would otherwise make 13,000
        # ``Gauge.set`` calls, each taking a lock, ~80 us per forecast measured.
        r.register(StreamCollector(self._labels, self._lock))
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
        now = tuple(getattr(stats, total) for total in LEARNER_TOTALS)
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
    def challenger_changed(self) -> None:
        """Another challenger or none (a reload): the comparison of the two starts afresh."""
        with self._lock:
            self._labels.forget_models()

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
            f.model_error,
            f.challenger_error,
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
        model_error: np.ndarray | None = None,
        challenger_error: np.ndarray | None = None,
    ) -> None:
        """Fold a tick's forecasts into each label's numbers (NaN error: none yet; NaN covered:
        no interval yet), in arrival order, as columns. ``StreamCollector`` exports them at
        scrape time. Errors are clamped so that squares stay finite too."""
        errors = bounded(error, 1e150)  # NaN stays NaN: skipped below
        naives = bounded(naive, 1e150)
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
            table.last[rows[latest]] = finite(lasts, 1e300)
            table.fold_errors(rows, scored, errors, naives, self.alpha, distinct)
            table.fold_intervals(
                rows, has_interval, covered, upper - lower, self.coverage_alpha, distinct
            )
            if model_error is not None and challenger_error is not None:
                own = np.column_stack([model_error, challenger_error])
                table.fold_models(rows, scored, own, self.alpha, distinct)
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
