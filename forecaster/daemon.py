"""Composition root: build the stages in order, run the engine loop, stop them in reverse.

Start: checkpoint (the state folder's, else the configured model) -> engine -> metrics endpoint ->
MQTT link. Each loop iteration drains whatever is queued (up to ``max_batch``) into one tick and
never waits to fill a batch: one sample at light load, large ticks under heavy load. Stop (SIGTERM):
stop intake, finish what is queued, checkpoint every stream, publish ``stopped``, disconnect.

The parts: ``Intake`` (receive queue -> admitted ticks; ticks held by a storage fault),
``Outbox`` (forecasts -> messages, never dropped; back-pressure), ``StateKeeper`` (engine
build, restore, journal, replay) and ``Checkpoints`` (background writes, trimming, parked-stream
expiry). This class wires them and runs each tick through them in order: take -> admit ->
journal -> ack -> tick -> publish -> learn.

Crash-exact recovery: each tick's admitted samples are journaled (one SQLite transaction) before
their messages are acknowledged, then applied. A checkpoint is written only once every forecast
it includes has left for the broker and records the journal position; the engine thread copies the
state, a background thread writes it, and the journal is trimmed once the file is durable. On start
the checkpoint is restored, the journal rows after its position are replayed through the engine
(their forecasts published again, with the same ``seq``, where the broker had not confirmed them),
and then the broker's queue is taken.

A write to the state folder that fails is a state (``StorageFault``, /readyz says why): a journal
or park-store failure holds its tick and takes no other input until the write succeeds; a failed
checkpoint is retried sooner while the journal keeps every sample. A damaged checkpoint falls back
to an older kept one; a journal missing positions refuses the start unless the loss is accepted
(docs/reliability.md).
"""

from __future__ import annotations

import logging
import queue
import sqlite3
import threading
import time
from pathlib import Path

import torch
from prometheus_client import CollectorRegistry

from forecaster import lifecycle
from forecaster.checkpoints import Checkpoints
from forecaster.config import Config
from forecaster.engine import Engine, ForecastColumns
from forecaster.errors import ConfigError
from forecaster.faults import RateLimitedLog
from forecaster.hass import Discovery
from forecaster.intake import HeldTick, Intake
from forecaster.keeper import StateKeeper
from forecaster.learner import Learner
from forecaster.live import LiveView
from forecaster.metrics import Metrics
from forecaster.mqtt import MqttLink, RawMessage
from forecaster.outbox import Outbox
from forecaster.persist import Journal
from forecaster.reload import reload_daemon
from forecaster.store import SqliteStore
from forecaster.web import HttpEndpoint

log = logging.getLogger(__name__)


class Daemon:
    """The long-running service; ``run()`` blocks until ``request_stop()`` (SIGTERM/SIGINT)."""

    def __init__(self, config: Config, registry: CollectorRegistry | None = None) -> None:
        self.config = config
        self.registry = registry or CollectorRegistry()
        self.metrics = Metrics(
            self.registry,
            stream_label_cap=config.metrics.stream_label_cap,
            error_halflife=config.metrics.error_halflife,
            coverage_halflife=config.metrics.coverage_halflife,
            anomaly_threshold=config.anomaly.threshold,
        )
        self.inbox: queue.Queue[RawMessage] = queue.Queue(maxsize=config.engine.queue_size)
        self._evictions_seen = (0, 0)
        self._gap_resets_seen = 0
        self.link = MqttLink(config.mqtt, self.inbox, self.metrics, overload=config.engine.overload)
        self.rate_limited = RateLimitedLog()
        self.intake = Intake(config, self.inbox, self.link, self.metrics, self.rate_limited)
        self.outbox = Outbox(config, self.link, self.metrics, self.rate_limited)
        self.keeper = StateKeeper(config, self.metrics, self.outbox, self.rate_limited)
        self.checkpoints = Checkpoints(config, self.metrics, self.keeper, self.rate_limited)
        self.learner: Learner | None = None
        self.http: HttpEndpoint | None = None
        self.live: LiveView | None = None  # the live page's per-stream rings (live.enabled)
        if config.live.enabled:
            self.live = LiveView(
                max_streams=config.live.max_streams,
                history=config.live.history,
                anomaly_threshold=config.anomaly.threshold,
                coverage_target=config.intervals.coverage,
            )
        self.discovery: Discovery | None = None  # Home Assistant (home_assistant.enabled)
        if config.home_assistant.enabled:
            self.discovery = Discovery(config, self.link.publish_retained)
        self._stop = threading.Event()
        self._reload = threading.Event()
        self._reload_from: Path | None = None
        self._swap: str | None = None  # "promote" or "rollback" asked for (SIGUSR1, SIGUSR2)
        self._stopped = threading.Event()
        self._shutdown_lock = threading.Lock()
        self._heartbeat = time.monotonic()

    # The keeper's state, as the daemon's callers (tests, benches, the demo) read it.
    @property
    def engine(self) -> Engine | None:
        return self.keeper.engine

    @property
    def journal(self) -> Journal | None:
        return self.keeper.journal

    @property
    def store(self) -> SqliteStore | None:
        return self.keeper.store

    @property
    def outgoing(self) -> int:
        """Forecasts not yet with the broker: unpublished here, or in paho and not yet settled."""
        return self.outbox.outgoing

    # -- lifecycle ----------------------------------------------------------------------------
    def start(self) -> None:
        torch.set_num_threads(self.config.model.threads)
        checkpoint = self.keeper.build_engine()
        engine = self.keeper.engine
        assert engine is not None
        if self.config.state.journal:
            self.keeper.replay_journal(checkpoint)
        deployed = self.keeper.deploy_new_model()  # another model.checkpoint than the state's
        if self.config.online_learning.enabled:
            self.learner = Learner(engine, self.config.online_learning, background=True)
            if not deployed:  # the trainer's state belongs to the weights it trained
                self.learner.load_state_tensors(checkpoint.extra)
                if checkpoint.optimizer is not None:
                    self.learner.optimizer.load_state_dict(checkpoint.optimizer)
            log.info("online learning on (version %d)", self.learner.version)
        self.metrics.model_version.set(engine.model_version)
        self.metrics.streams_active.set(len(engine.streams))
        if self.config.metrics.enabled:
            self._start_http()
        self.link.start()

    def _start_http(self) -> None:
        """Bind the metrics endpoint (and the live page) and start serving it."""
        m = self.config.metrics
        try:  # the pool binds before it starts a thread
            self.http = HttpEndpoint(
                self.registry,
                m.host,
                m.port,
                self.healthy,
                self.ready,
                routes=self.live.routes() if self.live is not None else None,
                workers=m.http_workers,
                timeout=m.http_timeout,
                on_refused=self.metrics.http_refused.inc,
                on_rejected=lambda code: self.metrics.http_rejected.labels(str(code)).inc(),
            )
        except OSError as exc:  # a second daemon or demo on the port: say which setting
            raise ConfigError(
                f"metrics.port: cannot listen on {m.host}:{m.port} ({exc.strerror}); choose "
                "another port (FORECASTER_METRICS__PORT=... or metrics.port; 0 = any free)"
            ) from exc
        self.http.start()
        log.info("metrics on http://%s:%d/metrics", m.host, self.http.port)
        if self.live is not None:
            log.info("live page on http://%s:%d/live/", m.host, self.http.port)

    def request_stop(self) -> None:
        self._stop.set()

    def request_reload(self, path: Path | None) -> None:
        """Re-read the config file between two ticks (SIGHUP; ``forecaster.reload``)."""
        self._reload_from = path
        self._reload.set()

    def request_swap(self, action: str) -> None:
        """Promote the challenger or roll back between two ticks (``forecaster.lifecycle``)."""
        self._swap = action

    def run(self) -> None:
        """Engine loop; returns after a clean shutdown."""
        try:
            while not self._stop.is_set():
                self.step(timeout=0.2)
                self._housekeeping()
                if self._reload.is_set():
                    self._reload.clear()
                    reload_daemon(self, self._reload_from)
                self._lifecycle()
        finally:
            self.shutdown()

    def _lifecycle(self) -> None:
        """A swap asked for, or one the evidence calls for (``model.promote``)."""
        action, self._swap = self._swap, None
        if action is not None:
            lifecycle.swap(self.keeper, action, "manual")
        elif self.engine is not None and lifecycle.due(self.engine, self.config.model.promote):
            lifecycle.swap(self.keeper, "promote", "auto")

    def shutdown(self, drain_s: float = 3.0) -> None:
        with self._shutdown_lock:
            if not self._stopped.is_set():
                self._shutdown(drain_s)

    def _shutdown(self, drain_s: float) -> None:
        log.info("stopping: intake off, finishing queued samples")
        self.link.stop_intake()
        deadline = time.monotonic() + drain_s
        while not self.inbox.empty() and time.monotonic() < deadline:
            self.step(timeout=0.05)  # the queue is not empty: no wait unless intake is held
        self.checkpoint(wait=True)
        self.checkpoints.close()
        if self.learner is not None:
            self.learner.close()
        self.link.close()
        if self.http is not None:
            self.http.close()
        self.keeper.close()  # the journal and the park store, last: nothing writes them now
        self._stopped.set()
        log.info("stopped")

    # -- the loop -----------------------------------------------------------------------------
    def step(self, timeout: float) -> int:
        """One tick over whatever is queued (messages up to ``max_batch`` samples); returns the
        number of messages handled. A frame is never split: all its samples go into this tick.

        take -> admit -> journal -> ack -> tick -> publish -> learn (``_commit``). A tick the
        state folder refused goes first; no input is taken while forecasts back up."""
        self._heartbeat = time.monotonic()
        if self.intake.waiting:
            return self._retry(timeout)
        if self.outbox.held(timeout):
            return 0
        self.keeper.confirm_settled()  # the journal notes when the broker has every forecast
        taken = self.intake.take(timeout)
        if taken is None or not taken.batch:
            return 0 if taken is None else taken.count
        assert self.engine is not None
        tick = self.intake.admit(self.engine, taken)
        self._commit(tick)
        return len(tick.batch)

    def _commit(self, tick: HeldTick) -> bool:
        """Journal, acknowledge, apply and publish one admitted tick; when the journal cannot
        take it, hold it (unacknowledged) and take nothing else until it can."""
        if not self.keeper.journal_tick(tick.admission.batch, tick.messages):
            self.intake.hold(tick, journaled=False)
            return False
        self.intake.release(journaled=False)
        self.link.ack(tick.batch)  # one ack per message, once every sample of it is journaled
        if len(tick.admission.batch):
            self._apply(tick)
        if self.learner is not None:
            self.learner.after_tick()
        return True

    def _retry(self, timeout: float) -> int:
        """Once its retry is due (else wait for it), journal and apply the tick the journal
        refused, or apply the one the park store refused; the messages handled, 0 while the
        state folder still refuses."""
        if not self.intake.retry_due(timeout):
            return 0
        if self.intake.held is not None:
            tick = self.intake.held
            return len(tick.batch) if self._commit(tick) else 0
        tick = self.intake.unapplied
        assert tick is not None
        return len(tick.batch) if self._apply(tick) else 0

    def _apply(self, tick: HeldTick) -> bool:
        """Tick a journaled tick; when the park store cannot take the streams it must park
        first (nothing has changed then), keep it and take no other input until it can."""
        try:
            self._tick(tick)
        except (OSError, sqlite3.Error) as exc:
            self.intake.hold(tick, journaled=True)
            self.keeper.park_fault.failed(
                exc,
                f"intake paused, {len(tick.admission.batch)} journaled samples wait to be"
                f" applied, retried every {self.config.state.retry_interval:g} s",
            )
            return False
        self.intake.release(journaled=True)
        assert self.engine is not None
        if self.engine.park_error is not None:  # parking after a wide tick: the next one retries
            self.keeper.park_fault.failed(self.engine.park_error, "retried at the next tick")
        else:
            self.keeper.park_fault.succeeded()
        return True

    def _tick(self, tick: HeldTick) -> None:
        """Tick the admitted rows (``tick.origins``: each input row's message); publish."""
        assert self.engine is not None
        size = len(tick.admission.batch)
        started = time.perf_counter()
        try:
            result = self.engine.tick_batch(tick.admission)
        except (OSError, sqlite3.Error):
            raise  # the park store: the caller holds the tick (no state has changed)
        except Exception:
            log.exception("engine tick failed on %d samples", size)
            self.metrics.rejected.labels("internal_error").inc(size)
            return
        self.metrics.tick_duration.observe(time.perf_counter() - started)
        self.metrics.tick_batch.observe(size)
        forecasts = result.forecasts
        accepted = tick.origins[forecasts.index].tolist()  # message of each forecast
        now = self.outbox.publish_tick(forecasts, accepted, tick.batch, tick.frames)
        self._observe(forecasts, now)

    def _observe(self, forecasts: ForecastColumns, now: float) -> None:
        """Per-tick metrics, the live page and Home Assistant, after the forecasts have left."""
        assert self.engine is not None
        self.metrics.observe_columns(forecasts)
        if self.live is not None:
            self.live.observe(forecasts, now)
        if self.discovery is not None:
            self.discovery.after_tick(self.metrics)
        self.metrics.streams_active.set(len(self.engine.streams))
        seen, self._evictions_seen = (
            self._evictions_seen,
            (self.engine.evictions, self.engine.restores),
        )
        self.metrics.streams_evicted.inc(self._evictions_seen[0] - seen[0])
        self.metrics.streams_restored.inc(self._evictions_seen[1] - seen[1])
        self.metrics.gap_resets.inc(self.engine.gap_resets - self._gap_resets_seen)
        self._gap_resets_seen = self.engine.gap_resets

    def _housekeeping(self) -> None:
        self.link.watchdog()
        self.outbox.publish_unpublished()
        if self.discovery is not None:
            self.discovery.housekeeping(self.link.connects, self.link.is_connected.is_set())
        if self.learner is not None:
            self.learner.after_tick()
            self.metrics.observe_learner(self.learner.stats)
            self.metrics.model_version.set(self.learner.version)
        self.checkpoints.housekeeping(self.learner)

    def checkpoint(self, wait: bool = False) -> None:
        """Weights and every stream's state, written atomically in the background
        (``Checkpoints.checkpoint``); ``wait`` (shutdown) waits for the write."""
        self.checkpoints.checkpoint(self.learner, wait)

    # -- health -------------------------------------------------------------------------------
    def healthy(self) -> tuple[bool, str]:
        stalled = time.monotonic() - self._heartbeat
        if stalled > 10.0 and not self._stopped.is_set():
            return False, f"engine loop stalled for {stalled:.0f}s"
        return True, "engine loop running"

    def ready(self) -> tuple[bool, str]:
        if self.engine is None:
            return False, "model not loaded"
        keeper = self.keeper
        if keeper.journal_fault.active:
            held = self.intake.held_samples(journaled=False)
            return False, f"{keeper.journal_fault.describe()}; intake paused, {held} samples held"
        if keeper.park_fault.active:
            held = self.intake.held_samples(journaled=True)
            return False, f"{keeper.park_fault.describe()}; intake paused, {held} samples held"
        if self.checkpoints.checkpoint_fault.active:
            return False, self.checkpoints.checkpoint_fault.describe()
        if not self.link.is_connected.is_set():
            return False, "broker not connected"
        if not self.link.is_subscribed.is_set():
            return False, "not subscribed"
        return True, "connected, subscribed, model loaded"
