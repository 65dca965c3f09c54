"""Composition root: build the stages in order, run the engine loop, stop them in reverse.

Start: checkpoint (the state folder's, else the configured model) -> engine -> metrics endpoint ->
MQTT link. Each loop iteration drains whatever is queued (up to ``max_batch``) into one tick and
never waits to fill a batch: one sample at light load, large ticks under heavy load. Stop (SIGTERM):
stop intake, finish what is queued, checkpoint every stream, publish ``stopped``, disconnect.

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

import contextlib
import logging
import os
import queue
import sqlite3
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import orjson
import torch
from prometheus_client import CollectorRegistry

from forecaster.combine import COMPONENTS
from forecaster.config import Config, combiner_config, scoring_config
from forecaster.engine import (
    Admission,
    Batch,
    Engine,
    ForecastColumns,
    GapPolicy,
)
from forecaster.errors import CheckpointError, ConfigError, PayloadError, StateLossError
from forecaster.hass import Discovery
from forecaster.learner import Learner
from forecaster.limits import NewStreamLimit
from forecaster.live import LiveView
from forecaster.metrics import HttpEndpoint, Metrics
from forecaster.mqtt import MqttLink, RawMessage
from forecaster.parse import Parsed, PayloadParser, TopicTemplate
from forecaster.persist import (
    Checkpoint,
    Journal,
    Messages,
    journal_position,
    kept_paths,
    load_checkpoint,
    read_manifest,
    snapshot,
)
from forecaster.store import SqliteStore

log = logging.getLogger(__name__)


class RateLimitedLog:
    """At most one warning per key every ``interval`` seconds, with the count suppressed since."""

    def __init__(self, interval: float = 10.0) -> None:
        self.interval = interval
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def warning(self, key: str, message: str, *args: object) -> None:
        now = time.monotonic()
        if now - self._last.get(key, -1e9) < self.interval:
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            return
        suppressed = self._suppressed.pop(key, 0)
        self._last[key] = now
        if suppressed:
            message += " (%d more like this suppressed)"
            args = (*args, suppressed)
        log.warning(message, *args)


def forecast_bodies(columns: ForecastColumns) -> list[dict[str, object]]:
    """The documented forecast objects (docs/protocol.md, "Forecast messages"), one per row, built
    from the columns (no ``Forecast`` objects: they cost more than the dicts)."""
    version = columns.model_version
    bodies: list[dict[str, object]] = [
        {
            "stream": stream,
            "seq": seq,
            "ts": None if ts != ts else ts,  # NaN: not given
            "value": value,
            "prediction": prediction,
            "error": None if error != error else error,
            "lower": lower,
            "upper": upper,
            "anomaly": anomaly,
            "model_version": version,
            "warm": warm,
        }
        for stream, seq, ts, value, prediction, error, lower, upper, anomaly, warm in zip(
            columns.streams,
            columns.seq.tolist(),
            columns.ts.tolist(),
            columns.value.tolist(),
            columns.prediction.tolist(),
            columns.error.tolist(),
            columns.lower.tolist(),
            columns.upper.tolist(),
            columns.anomaly.tolist(),
            columns.warm.tolist(),
            strict=True,
        )
    ]
    if (
        columns.path is not None
        and columns.path_lower is not None
        and columns.path_upper is not None
    ):
        paths = zip(
            columns.path.tolist(),
            columns.path_lower.tolist(),
            columns.path_upper.tolist(),
            strict=True,
        )
        for body, (path, lower, upper) in zip(bodies, paths, strict=True):  # engine.horizon > 1
            body.update(horizon=path, horizon_lower=lower, horizon_upper=upper)
    if columns.weights is not None:  # which reader of the stream carries its forecast
        for body, shares in zip(bodies, columns.weights.round(3).tolist(), strict=True):
            body["weights"] = dict(zip(COMPONENTS, shares, strict=True))
    return bodies


def gap_policy(config: Config) -> GapPolicy | None:
    gaps = config.engine.gaps
    if not gaps.enabled:
        return None
    return GapPolicy(gaps.factor, gaps.halflife, gaps.min_intervals, gaps.rewarm_samples)


def timed(call: Callable[..., object], *args: object) -> float:
    """Seconds ``call(*args)`` took (a background job's duration, for its histogram)."""
    started = time.monotonic()
    call(*args)
    return time.monotonic() - started


class StorageFault:
    """One part of the state folder (journal, checkpoint) that cannot be written, as a state:
    since when and why, reported by a gauge, a counter and one log line per interval (a full
    disk failed every tick: 320 tracebacks a second before), and cleared by the next success."""

    def __init__(self, part: str, metrics: Metrics, log_interval: float) -> None:
        self.part = part
        self.metrics = metrics
        self.log_interval = log_interval
        self.since: float | None = None  # monotonic time of the first failure of this fault
        self.reason = ""
        self.errors = 0  # failed writes during this fault
        self._logged = 0.0

    @property
    def active(self) -> bool:
        return self.since is not None

    def failed(self, error: BaseException, effect: str) -> None:
        """Count a failed write; log it when the fault begins and once per interval after."""
        now = time.monotonic()
        self.reason = f"{type(error).__name__}: {error}"[:200]
        self.errors += 1
        self.metrics.storage_errors.labels(self.part).inc()
        if self.since is None:
            self.since = self._logged = now
            self.metrics.storage_fault.labels(self.part).set(1)
            log.error(
                "storage fault: the %s cannot be written (%s); %s", self.part, self.reason, effect
            )
        elif now - self._logged >= self.log_interval:
            self._logged = now
            log.error(
                "storage fault: the %s still cannot be written after %.0f s, %d failed writes (%s); %s",
                self.part,
                now - self.since,
                self.errors,
                self.reason,
                effect,
            )

    def succeeded(self) -> None:
        if self.since is None:
            return
        log.warning(
            "storage recovered: the %s is written again after %.1f s and %d failed writes",
            self.part,
            time.monotonic() - self.since,
            self.errors,
        )
        self.since, self.errors, self.reason = None, 0, ""
        self.metrics.storage_fault.labels(self.part).set(0)

    def describe(self) -> str:
        assert self.since is not None
        return (
            f"storage fault: {self.part} not written for {time.monotonic() - self.since:.0f}s"
            f" ({self.reason})"
        )


@dataclass(slots=True)
class HeldTick:
    """A tick admitted but not journaled (the journal write failed): kept, unacknowledged, and
    journaled, acknowledged and applied first once the journal takes writes again. Nothing else
    is taken meanwhile, so no newer sample of a stream overtakes it; no tick runs, so its
    admission stays valid."""

    admission: Admission
    messages: Messages | None
    origins: np.ndarray  # each input row's message in ``batch``
    batch: list[RawMessage]
    frames: list[str | None]


@dataclass(slots=True)
class KeptCheckpoint:
    """A durable checkpoint kept on disk (``state.keep_checkpoints``): what the journal and the
    evicted-stream store must still hold so that a start can fall back to it exactly."""

    position: int  # journal position it includes
    generation: int  # evicted-store generation it saw
    names: list[str]  # streams resident in it

    @classmethod
    def of(cls, manifest: dict) -> KeptCheckpoint:
        info = manifest.get("info", {})
        return cls(
            int(info.get("journal_position", 0)),
            int(info.get("evicted_generation", 0)),
            [str(n) for n in manifest.get("streams", [])],
        )


@dataclass(slots=True)
class PendingCheckpoint:
    """A checkpoint being written in the background, and what to trim once it is durable."""

    future: Future[float]  # the write's duration in seconds
    info: dict[str, int]  # its journal position and evicted generation, as in its manifest
    names: list[str]  # the streams it holds in memory (their evicted rows can go)


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
        payload = config.mqtt.payload
        self.parser = PayloadParser(
            config.mqtt.input_topics,
            frame_templates=config.mqtt.frame_topics,
            value_field=payload.value_field,
            ts_field=payload.ts_field,
            seq_field=payload.seq_field,
            max_bytes=payload.max_bytes,
        )
        self.output = TopicTemplate.compile(config.mqtt.output_topic)
        self.state_path = Path(config.state.dir) / "checkpoint.safetensors"
        self.store: SqliteStore | None = None  # evicted streams (engine.max_streams)
        self._evictions_seen = (0, 0)
        self._gap_resets_seen = 0
        self.link = MqttLink(config.mqtt, self.inbox, self.metrics, overload=config.engine.overload)
        self.journal_path = Path(config.state.dir) / "journal.sqlite"
        self.journal: Journal | None = None
        self._applied = 0  # journal position of the last sample applied to the engine
        # Messages not yet handed to the broker (replayed, or refused while disconnected), with
        # how many forecasts each carries (0: counted when first sent): retried in order, never
        # dropped; a checkpoint waits until this is empty so none is lost by a crash. With
        # ``mqtt.max_outgoing`` on their way, the engine takes no more input.
        self._unpublished: deque[tuple[str, str | bytes, int, int]] = deque()
        self.engine: Engine | None = None
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
        self.rate_limited = RateLimitedLog()
        new = config.engine.new_streams
        self.new_streams = (
            NewStreamLimit(new.per_s, new.burst, new.source_levels) if new.per_s > 0 else None
        )
        self._stop = threading.Event()
        self._stopped = threading.Event()
        self._shutdown_lock = threading.Lock()
        self._heartbeat = time.monotonic()
        self._last_checkpoint = time.monotonic()
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint")
        self._writing: PendingCheckpoint | None = None
        interval = config.state.fault_log_interval
        self.journal_fault = StorageFault("journal", self.metrics, interval)
        self.checkpoint_fault = StorageFault("checkpoint", self.metrics, interval)
        self.park_fault = StorageFault("park_store", self.metrics, interval)
        # A tick journaled and acknowledged whose parking of other streams failed (the park
        # store cannot be written): applied first, before any other input, once it can be.
        self._unapplied: HeldTick | None = None
        self._held: HeldTick | None = None  # a tick waiting for the journal (storage fault)
        self._retry_at = 0.0  # monotonic time of the next journal retry
        self._restored = False  # a checkpoint of the state folder was loaded
        self._kept: list[KeptCheckpoint] = []  # durable checkpoints on disk, newest first
        # A replay (or an accepted loss) is followed by a checkpoint as soon as its forecasts
        # have left, retried every retry_interval: a crash loop then replays only new work.
        self._checkpoint_soon = False
        self._next_expiry = 0.0  # monotonic time of the next parked-stream expiry

    # -- lifecycle ----------------------------------------------------------------------------
    def start(self) -> None:
        torch.set_num_threads(self.config.model.threads)
        self.engine, checkpoint = self._build_engine()
        if self.config.state.journal:
            self._replay_journal(checkpoint)
        if self.config.online_learning.enabled:
            self.learner = Learner(self.engine, self.config.online_learning, background=True)
            self.learner.load_state_tensors(checkpoint.extra)
            if checkpoint.optimizer is not None:
                self.learner.optimizer.load_state_dict(checkpoint.optimizer)
            log.info("online learning on (version %d)", self.learner.version)
        self.metrics.model_version.set(self.engine.model_version)
        self.metrics.streams_active.set(len(self.engine.streams))
        if self.config.metrics.enabled:
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
        self.link.start()

    def _build_engine(self) -> tuple[Engine, Checkpoint]:
        device = self.config.model.device
        restored = self._restore(device)
        if restored is not None:
            checkpoint = restored
        else:
            checkpoint = load_checkpoint(self.config.model.checkpoint, device)
            log.info(
                "no saved state in %s; starting from the model checkpoint", self.state_path.parent
            )
        max_streams = self.config.engine.max_streams
        parked = self.state_path.parent / "evicted.sqlite"
        if not max_streams and parked.exists():
            log.warning(
                "%s holds streams parked under engine.max_streams, now 0: they start afresh", parked
            )
        if max_streams:
            self.store = SqliteStore(parked)
            # The evicted streams must describe the same moment as the checkpoint's resident ones.
            self.store.rollback(
                int(checkpoint.manifest.get("info", {}).get("evicted_generation", 0))
            )
        engine = Engine(
            checkpoint.model,
            checkpoint.normalizer,
            device=device,
            max_abs_value=self.config.engine.max_abs_value,
            model_version=checkpoint.model_version,
            max_streams=max_streams,
            store=self.store,
            gaps=gap_policy(self.config),
            scoring=scoring_config(self.config),
            horizon=self.config.engine.horizon,
            combine=combiner_config(self.config),
        )
        if checkpoint.stream_names:
            engine.streams.load(checkpoint.stream_names, checkpoint.stream_arrays)
            engine.ticks = int(engine.streams.last_used.max(initial=0))  # the LRU clock goes on
        return engine, checkpoint

    def _restore(self, device: str) -> Checkpoint | None:
        """The newest good checkpoint of the state folder (None: there is none yet).

        A damaged one (checksum, header, shape) is set aside as ``*.damaged`` and the next
        older one kept (``state.keep_checkpoints``) restored instead, loudly; the journal goes
        back to the oldest kept one, so the replay from there is exact. None good: refused.
        """
        paths = kept_paths(self.state_path)
        damaged: list[tuple[Path, CheckpointError]] = []
        for index, path in enumerate(paths):
            try:
                checkpoint = load_checkpoint(path, device)
            except CheckpointError as exc:
                damaged.append((path, exc))
                continue
            for bad, error in damaged:
                aside = bad.with_name(bad.name + ".damaged")
                os.replace(bad, aside)
                self.metrics.checkpoint_fallbacks.inc()
                log.error(
                    "DAMAGED CHECKPOINT %s (%s: %s): set aside as %s; falling back to the older"
                    " %s and replaying the journal from its position %d",
                    bad,
                    error.field,
                    error.detail,
                    aside.name,
                    path.name,
                    journal_position(checkpoint),
                )
            log.info(
                "restored %s: %d streams, model version %d",
                path,
                len(checkpoint.stream_names),
                checkpoint.model_version,
            )
            self._restored = True
            self._kept = [KeptCheckpoint.of(checkpoint.manifest)]
            for older in paths[index + 1 :]:
                manifest = read_manifest(older)
                if manifest:
                    self._kept.append(KeptCheckpoint.of(manifest))
            return checkpoint
        if damaged:
            raise CheckpointError(
                self.state_path,
                "file",
                "every kept checkpoint is damaged: "
                + "; ".join(f"{p.name}: {e.field}: {e.detail}" for p, e in damaged),
            )
        return None

    def _check_journal(self, position: int) -> None:
        """Refuse to start over a journal that lacks positions after the checkpoint's (or, with
        ``state.accept_state_loss``, log and count them and go on)."""
        assert self.journal is not None
        gaps = self.journal.gaps(position)
        if not gaps:
            return
        named = ", ".join(
            f"{first}-{last}" if last is not None else f"{first} onward (how many unknown)"
            for first, last in gaps
        )
        lost = sum(last - first + 1 for first, last in gaps if last is not None)
        message = (
            f"journal {self.journal_path} lacks positions {named} after the checkpoint's position"
            f" {position}: {lost} journaled samples lost (the journal was truncated, replaced by"
            " an older copy, or lost its WAL file)"
        )
        if not self.config.state.accept_state_loss:
            raise StateLossError(
                f"{message}; start refused: restore the journal, or start with"
                " --accept-state-loss (state.accept_state_loss: true) to go on without them",
                gaps,
            )
        log.error("STATE LOSS ACCEPTED (state.accept_state_loss): %s", message)
        self.metrics.state_loss.inc(lost)
        self._checkpoint_soon = True

    def _damaged_row(self, first: int, last: int) -> None:
        """A journal row failed its checksum: refused, unless a loss is accepted (then skipped)."""
        if not self.config.state.accept_state_loss:
            raise StateLossError(
                f"journal {self.journal_path}: positions {first}-{last} are damaged (checksum);"
                " start refused: start with --accept-state-loss to go on without them",
                [(first, last)],
            )
        log.error("STATE LOSS ACCEPTED: journal positions %d-%d damaged, skipped", first, last)
        self.metrics.state_loss.inc(last - first + 1)
        self._checkpoint_soon = True

    def _replay_journal(self, checkpoint: Checkpoint) -> None:
        """Apply the journaled samples the restored checkpoint does not include, in order."""
        assert self.engine is not None
        position = journal_position(checkpoint) if self._restored else 0
        self.journal = Journal(self.journal_path, self.config.state.journal_sync)
        self._check_journal(position)
        self.journal.start_at(position)
        if self._checkpoint_soon:  # a loss accepted: the end marker starts again from here
            self.journal.mark_end()
        self._applied = position
        replayed = 0
        qos = self.config.mqtt.qos_out

        def queue(topic: str, payload: bytes, forecasts: int) -> bool:
            self._unpublished.append((topic, payload, qos, forecasts))
            return False  # sent once the link is up

        # Forecasts the broker confirmed before the crash are not published again (a crash loop
        # would otherwise send every replayed forecast once per restart).
        confirmed = (
            self.journal.confirmed if self.config.state.replay_publish == "unconfirmed" else 0
        )
        republished = 0
        ticks = self.journal.ticks_after(position, self._damaged_row)
        for last, batch, messages in ticks:  # as ticked live
            result = self.engine.tick_batch(batch)
            for reason in result.rejected_reason:  # rows overlapping the checkpoint: never again
                self.metrics.rejected.labels(reason).inc()
            forecasts = result.forecasts
            self._applied = last
            replayed += len(batch)
            if last <= confirmed:
                continue
            republished += len(forecasts)
            runs = messages or [(len(batch), None)]  # None: one message per forecast
            rows = np.repeat(np.arange(len(runs)), [count for count, _ in runs])  # row -> message
            frames = [frame for _, frame in runs]
            self._publish_forecasts(forecasts, rows[forecasts.index].tolist(), frames, queue)
        self.metrics.journal_replayed.inc(replayed)
        self.metrics.journal_pending.set(replayed)
        if replayed:
            log.info(
                "replayed %d journaled samples after position %d (%d forecasts published again;"
                " those up to position %d the broker had confirmed)",
                replayed,
                position,
                republished,
                confirmed,
            )
            self._checkpoint_soon = True

    def _publish_unpublished(self) -> None:
        lost = [(topic, payload, qos, 0) for topic, payload, qos in self.link.settle()]
        self._unpublished.extendleft(reversed(lost))  # lost unwritten: first again
        if not self._unpublished or not self.link.is_connected.is_set():
            return
        with self.link.corked():  # a backlog after an outage leaves as one burst
            while self._unpublished and self.link.is_connected.is_set():
                topic, payload, qos, forecasts = self._unpublished[0]
                if not self.link.publish(topic, payload, qos):
                    return
                self._unpublished.popleft()
                self.metrics.forecasts_published.inc(forecasts)

    @property
    def outgoing(self) -> int:
        """Forecasts not yet with the broker: unpublished here, or in paho and not yet settled."""
        return len(self._unpublished) + self.link.outgoing

    def _intake_held(self, timeout: float) -> bool:
        """Take no input while ``mqtt.max_outgoing`` forecasts are on their way to the broker.

        A forecast is data: rather than drop one, the daemon stops taking samples, so the
        back-pressure reaches the broker (unacknowledged QoS 1 samples stay there; the receive
        queue fills and ``engine.overload`` applies) until the link is back and they have left.
        Not while the MQTT reader waits for room in the queue: paho reads the broker's acks on
        that thread, so only taking input lets them in (measured: a deadlock otherwise).
        """
        deadline = time.monotonic() + timeout
        limit = self.config.mqtt.max_outgoing
        while True:
            self._publish_unpublished()
            waiting = self.outgoing
            if waiting < limit or self.link.blocked:
                return False
            if time.monotonic() >= deadline:
                self.rate_limited.warning(
                    "max_outgoing",
                    "%d forecasts waiting for the broker (mqtt.max_outgoing): input paused",
                    waiting,
                )
                return True
            time.sleep(0.002)

    def request_stop(self) -> None:
        self._stop.set()

    def run(self) -> None:
        """Engine loop; returns after a clean shutdown."""
        try:
            while not self._stop.is_set():
                self.step(timeout=0.2)
                self._housekeeping()
        finally:
            self.shutdown()

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
        self._writer.shutdown()
        if self.learner is not None:
            self.learner.close()
        self.link.close()
        if self.journal is not None:
            self.journal.close()
        if self.http is not None:
            self.http.close()
        if self.store is not None:
            self.store.close()
        self._stopped.set()
        log.info("stopped")

    # -- the loop -----------------------------------------------------------------------------
    def step(self, timeout: float) -> int:
        """One tick over whatever is queued (messages up to ``max_batch`` samples); returns the
        number of messages handled. A frame is never split: all its samples go into this tick."""
        self._heartbeat = time.monotonic()
        if self._held is not None:
            return self._retry_held(timeout)
        if self._unapplied is not None:
            return self._retry_unapplied(timeout)
        if self._intake_held(timeout):
            return 0
        if self.journal is not None and not self._unpublished and not self.link.outgoing:
            self.journal.confirm(self._applied)  # every forecast so far is with the broker
        try:
            raw = self.inbox.get(timeout=timeout) if timeout > 0 else self.inbox.get_nowait()
        except queue.Empty:
            return 0
        batch: list[RawMessage] = []
        frames: list[str | None] = []  # per message: the frame's output name, None: one sample
        tick = Parsed([], [], [], [])  # every reading of the tick, as columns
        origins: list[int] = []  # per reading: index in ``batch`` of the message it came in
        limit, max_rounds = self.config.engine.max_batch, self.config.engine.max_rounds
        per_stream: Counter[str] = Counter()  # samples of each stream in this tick
        rounds = 0
        taken = 0
        while True:
            taken += 1
            if not self.link.redelivered(raw):  # else the resent copy counts
                parsed = self._parse(raw)
                frames.append(parsed.frame if parsed is not None else None)
                if parsed is not None and parsed.streams:
                    tick.streams.extend(parsed.streams)
                    tick.values.extend(parsed.values)
                    tick.ts.extend(parsed.ts)
                    tick.seq.extend(parsed.seq)
                    origins.extend([len(batch)] * len(parsed.streams))
                    per_stream.update(parsed.streams)  # Counter.update, map and max run in C
                    rounds = max(rounds, max(map(per_stream.__getitem__, parsed.streams)))
                batch.append(raw)
            if len(tick.streams) >= limit or rounds >= max_rounds:
                break
            try:
                raw = self.inbox.get_nowait()
            except queue.Empty:
                break
        if not batch:
            return taken
        self.metrics.queue_depth.set(self.inbox.qsize())
        self.metrics.messages_received.inc(len(batch))
        self.metrics.samples_received.inc(len(tick.streams))
        # The parser hands out finite floats, str ids and seq in [0, 2**63) or NO_SEQ: columns
        # as they are (the engine's admit checks values and sequence numbers).
        columns = Batch(
            tick.streams,
            np.array(tick.values, dtype=np.float64),
            np.array(tick.ts, dtype=np.float64),
            np.array(tick.seq, dtype=np.int64),
        )
        assert self.engine is not None
        admission = self._limit_new_streams(self.engine.admit(columns), origins, batch)
        self._reject_rows(columns, admission.rejected_index, admission.rejected_reason)
        row_origins = np.asarray(origins, dtype=np.int64)
        messages = self._messages(row_origins, admission.index, frames)
        self._commit(HeldTick(admission, messages, row_origins, batch, frames))
        return len(batch)

    def _limit_new_streams(
        self, admission: Admission, origins: list[int], batch: list[RawMessage]
    ) -> Admission:
        """Refuse the rows of new stream ids past their source's allowance (``engine.new_streams``);
        a tick of resident streams only costs one comparison."""
        outside = np.flatnonzero(admission.slots < 0)
        if self.new_streams is None or not len(outside):
            return admission
        assert self.engine is not None
        names = admission.batch.streams
        refused = self.new_streams.refused(
            [names[i] for i in outside.tolist()],
            [batch[origins[row]].topic for row in admission.index[outside].tolist()],
            lambda stream: self.engine.last_seq(stream) >= 0,  # parked: seen before
        )
        if not refused.any():
            return admission
        return admission.without(outside[refused], "new_stream_limit")

    def _commit(self, held: HeldTick) -> bool:
        """Journal, acknowledge, apply and publish one admitted tick; when the journal cannot
        take it, hold it (unacknowledged) and take nothing else until it can."""
        if not self._journal(held.admission.batch, held.messages):
            self._held = held
            self._retry_at = time.monotonic() + self.config.state.retry_interval
            self.metrics.storage_held.set(len(held.admission.batch))
            return False
        self._held = None
        self.metrics.storage_held.set(0)
        self.link.ack(held.batch)  # one ack per message, once every sample of it is journaled
        if len(held.admission.batch):
            self._apply(held)
        if self.learner is not None:
            self.learner.after_tick()
        return True

    def _apply(self, held: HeldTick) -> bool:
        """Tick a journaled tick; when the park store cannot take the streams it must park
        first (nothing has changed then), keep it and take no other input until it can."""
        try:
            self._tick(held.admission, held.origins, held.batch, held.frames)
        except (OSError, sqlite3.Error) as exc:
            self._unapplied = held
            self._retry_at = time.monotonic() + self.config.state.retry_interval
            self.metrics.storage_held.set(len(held.admission.batch))
            self.park_fault.failed(
                exc,
                f"intake paused, {len(held.admission.batch)} journaled samples wait to be"
                f" applied, retried every {self.config.state.retry_interval:g} s",
            )
            return False
        self._unapplied = None
        self.metrics.storage_held.set(0)
        assert self.engine is not None
        if self.engine.park_error is not None:  # parking after a wide tick: the next one retries
            self.park_fault.failed(self.engine.park_error, "retried at the next tick")
        else:
            self.park_fault.succeeded()
        return True

    def _retry_unapplied(self, timeout: float) -> int:
        """Apply the tick the park store refused when its retry is due (else wait for it)."""
        assert self._unapplied is not None
        wait = self._retry_at - time.monotonic()
        if wait > 0:
            time.sleep(min(wait, max(timeout, 0.0)))
            return 0
        held = self._unapplied
        return len(held.batch) if self._apply(held) else 0

    def _retry_held(self, timeout: float) -> int:
        """Try the held tick's journal write again when its retry is due (else wait for it);
        the messages handled, 0 while the journal still refuses."""
        assert self._held is not None
        wait = self._retry_at - time.monotonic()
        if wait > 0:
            time.sleep(min(wait, max(timeout, 0.0)))
            return 0
        held = self._held
        return len(held.batch) if self._commit(held) else 0

    def _parse(self, raw: RawMessage) -> Parsed | None:
        """The message's readings; every refusal counted (whole message or one element)."""
        try:
            parsed = self.parser.parse_message(raw.topic, raw.payload, raw.received)
        except PayloadError as exc:
            self._reject(exc.reason, raw.topic, exc.detail)
            return None
        except Exception:
            log.exception("unexpected error parsing a message on %s", raw.topic)
            self._reject("internal_error", raw.topic, "parser")
            return None
        for error in parsed.errors:
            self._reject(error.reason, raw.topic, error.detail)
        return parsed

    def _messages(
        self, row_origins: np.ndarray, admitted: np.ndarray, frames: list[str | None]
    ) -> Messages | None:
        """The output messages of the ``admitted`` rows (``row_origins``: each row's message)
        as the journal keeps them: runs of (rows, frame); None when each forecast is its own
        message (then nothing is computed per tick)."""
        framed = self.config.mqtt.output_frames and any(frame is not None for frame in frames)
        if not framed or not len(admitted):
            return None
        origins = row_origins[admitted]
        bounds = np.concatenate([[0], np.flatnonzero(np.diff(origins)) + 1, [len(origins)]])
        starts, ends = bounds[:-1].tolist(), bounds[1:].tolist()
        return [
            (end - start, frames[origins[start]]) for start, end in zip(starts, ends, strict=True)
        ]

    def _journal(self, admitted: Batch, messages: Messages | None) -> bool:
        """Journal the admitted rows (seq filled in) durably before they are acknowledged;
        False when the journal cannot take them (nothing is acknowledged then)."""
        if self.journal is None:
            return True
        try:
            position = self.journal.append(admitted, messages)
        except Exception as exc:  # disk full, I/O error, a damaged file: a state, not a crash
            self.journal_fault.failed(
                exc,
                f"intake paused, {len(admitted)} samples held unacknowledged, retried every"
                f" {self.config.state.retry_interval:g} s",
            )
            return False
        self.journal_fault.succeeded()
        self._applied = position
        self.metrics.journal_pending.inc(len(admitted))
        return True

    def _tick(
        self,
        admission: Admission,
        origins: np.ndarray,
        batch: list[RawMessage],
        frames: list[str | None],
    ) -> None:
        """Tick the admitted rows (``origins``: each input row's message in ``batch``); publish."""
        assert self.engine is not None
        size = len(admission.batch)
        started = time.perf_counter()
        try:
            result = self.engine.tick_batch(admission)
        except (OSError, sqlite3.Error):
            raise  # the park store: the caller holds the tick (no state has changed)
        except Exception:
            log.exception("engine tick failed on %d samples", size)
            self.metrics.rejected.labels("internal_error").inc(size)
            return
        self.metrics.tick_duration.observe(time.perf_counter() - started)
        self.metrics.tick_batch.observe(size)
        forecasts = result.forecasts
        accepted = origins[forecasts.index].tolist()  # message of each forecast
        with self.link.corked():
            sent, published = self._publish_forecasts(forecasts, accepted, frames, self._send)
        now = time.time()  # per-tick metrics: one call each, not one per forecast
        self.metrics.latency.observe_many([max(0.0, now - batch[o].received) for o in sent])
        self.metrics.forecasts_published.inc(published)
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

    def _publish_forecasts(
        self,
        forecasts: ForecastColumns,
        origins: list[int],
        frames: list[str | None],
        send: Callable[[str, bytes, int], bool],
    ) -> tuple[list[int], int]:
        """Hand each forecast to ``send``: one message each, or with ``mqtt.output_frames`` one
        per input frame (``frames[origins[i]]``: the frame forecast ``i`` came in, None for a
        one-sample message). Returns the messages ``send`` took now (their origin) and the
        forecasts in them.

        A message's forecasts are consecutive (arrival order), so an output frame is a run of
        them; publishing run by run keeps each output topic in arrival order.
        """
        framed = self.config.mqtt.output_frames
        run: list[dict[str, object]] = []
        sent: list[int] = []
        published = 0
        bodies = zip(forecast_bodies(forecasts), forecasts.streams, origins, strict=True)
        for i, (body, stream, origin) in enumerate(bodies):
            frame = frames[origin] if framed else None
            if frame is None:
                if send(self.output.topic_for(stream), orjson.dumps(body), 1):
                    sent.append(origin)
                    published += 1
                continue
            run.append(body)
            if i + 1 == len(origins) or origins[i + 1] != origin:
                if send(self.output.topic_for(frame), orjson.dumps(run), len(run)):
                    sent.append(origin)
                    published += len(run)
                run = []
        return sent, published

    def _send(self, topic: str, payload: bytes, forecasts: int) -> bool:
        """Publish one output message (one forecast, or a frame of ``forecasts``); True when the
        link took it now. One it refuses waits in order for the broker instead of being
        dropped."""
        qos = self.config.mqtt.qos_out
        if not self._unpublished and self.link.publish(topic, payload, qos):
            return True
        self._unpublished.append((topic, payload, qos, forecasts))
        return False

    def _reject_rows(self, columns: Batch, rows: np.ndarray, reasons: list[str]) -> None:
        for i, reason in zip(rows.tolist(), reasons, strict=True):
            self._reject(reason, columns.streams[i], repr(float(columns.values[i])))

    def _reject(self, reason: str, where: str, detail: str) -> None:
        self.metrics.rejected.labels(reason).inc()
        self.rate_limited.warning(
            reason, "rejected sample (%s) on %s: %s", reason, where[:200], detail[:200]
        )

    def _housekeeping(self) -> None:
        self.link.watchdog()
        self._publish_unpublished()
        if self.discovery is not None:
            self.discovery.housekeeping(self.link.connects, self.link.is_connected.is_set())
        if self.learner is not None:
            self.learner.after_tick()
            self.metrics.observe_learner(self.learner.stats)
            self.metrics.model_version.set(self.learner.version)
        self._finish_checkpoint()
        state = self.config.state
        soon = self.checkpoint_fault.active or self._checkpoint_soon
        interval = state.retry_interval if soon else state.checkpoint_interval
        if time.monotonic() - self._last_checkpoint >= interval:
            self.checkpoint()

    def checkpoint(self, wait: bool = False) -> None:
        """Weights and every stream's state, written atomically.

        The engine thread only copies the state (``snapshot``); a background thread serialises,
        writes and fsyncs it (at 100,000 streams: 26 ms copy here, 88 ms write; ``bench
        journal``). The journal is trimmed, and evicted rows compacted, once the file is durable
        (``_finish_checkpoint``): a crash before then restarts from the previous checkpoint and
        the untrimmed journal. One write at a time; ``wait`` (shutdown) waits for it.
        """
        if self.engine is None:
            return
        if self._writing is not None:
            if not wait:
                return
            self._writing.future.exception()  # waits; a failure is counted just below
            self._finish_checkpoint()
        started = self._last_checkpoint = time.monotonic()
        info: dict[str, int] = {}
        if self.store is not None:
            info["evicted_generation"] = self.store.generation
        if self.journal is not None:
            # Only a checkpoint whose every forecast has left for the broker may trim the journal.
            self._publish_unpublished()
            if self._unpublished or not self.link.flush(timeout=2.0):
                log.info("checkpoint deferred: forecasts still waiting for the broker")
                self.metrics.checkpoint_duration.labels("engine_thread").observe(
                    time.monotonic() - started
                )  # the wait paused forecasting too
                return
            info["journal_position"] = self._applied
            self.journal.confirm(self._applied)  # flushed: the broker has every forecast so far
        table = self.engine.streams
        learner = self.learner
        # With learning on, hold the trainer's lock for a consistent optimizer state (one step).
        guard = learner.train_lock if learner is not None else contextlib.nullcontext()
        names = list(table.names)
        try:
            if self.store is not None:
                self.store.sync()  # rows the checkpoint refers to are durable before it is
            with guard:
                data = snapshot(
                    self.engine.model,
                    self.engine.normalizer_config,
                    model_version=self.engine.model_version,
                    stream_names=names,
                    stream_arrays=table.arrays(),
                    optimizer=learner.optimizer if learner is not None else None,
                    extra=learner.state_tensors() if learner is not None else None,
                    info=info,
                )
        except (OSError, sqlite3.Error) as exc:
            self.checkpoint_fault.failed(exc, self._checkpoint_effect)
            self.metrics.checkpointed(False)
            return
        future = self._writer.submit(
            timed, data.write, self.state_path, self.config.state.keep_checkpoints
        )
        self._writing = PendingCheckpoint(future, info, names)
        self.metrics.checkpoint_duration.labels("engine_thread").observe(time.monotonic() - started)
        if wait:
            future.exception()
            self._finish_checkpoint()

    @property
    def _checkpoint_effect(self) -> str:
        """What a failed checkpoint means for the samples, for its log line."""
        retry = f"retried every {self.config.state.retry_interval:g} s"
        if self.journal is None:
            return f"{retry}; without a journal a crash now loses what came since the last one"
        return f"{retry}; the journal keeps every sample meanwhile"

    def _finish_checkpoint(self) -> None:
        """Once a background write has ended: count it; if it is durable, trim what it includes."""
        pending = self._writing
        if pending is None or not pending.future.done():
            return
        self._writing = None
        error = pending.future.exception()
        if error is not None:
            self.checkpoint_fault.failed(error, self._checkpoint_effect)
            self.metrics.checkpointed(False)
            return
        self.checkpoint_fault.succeeded()
        self._checkpoint_soon = False
        self.metrics.checkpoint_duration.labels("write").observe(pending.future.result())
        written = KeptCheckpoint(
            pending.info.get("journal_position", 0),
            pending.info.get("evicted_generation", 0),
            pending.names,
        )
        self._kept = [written, *self._kept][: self.config.state.keep_checkpoints]
        oldest = self._kept[-1]  # what a fall back to the oldest kept checkpoint needs stays
        if self.journal is not None:
            try:
                self.journal.trim(oldest.position)
            except sqlite3.Error as exc:  # kept rows are only replayed again: try at the next
                self.metrics.storage_errors.labels("journal").inc()
                self.rate_limited.warning(
                    "journal_trim",
                    "journal not trimmed (%s); retried after the next checkpoint",
                    exc,
                )
            self.metrics.journal_pending.set(self._applied - written.position)
        if self.store is not None:
            self.store.compact(oldest.generation, oldest.names)
            self._expire_parked()
        self.metrics.checkpointed(True)
        log.debug("checkpoint: %d streams -> %s", len(pending.names), self.state_path)

    def _expire_parked(self) -> None:
        """Bound the parked-stream store (engine.park_expiry, engine.max_parked); after a
        durable checkpoint, so no kept checkpoint's replay needs what goes (``store.expire``)."""
        assert self.store is not None and self.engine is not None
        self.metrics.parked_bytes.set(self.store.size())
        now = time.monotonic()
        if now < self._next_expiry:  # 70-100 ms at 200,000 parked streams: not every checkpoint
            return
        engine = self.config.engine
        self._next_expiry = now + min(3600.0, engine.park_expiry / 10)
        try:
            expired, parked = self.store.expire(
                time.time() - engine.park_expiry, set(self.engine.streams.names), engine.max_parked
            )
        except sqlite3.Error as exc:
            self.metrics.storage_errors.labels("checkpoint").inc()
            self.rate_limited.warning("park_expiry", "parked streams not expired (%s)", exc)
            return
        if expired:
            log.info("forgot %d parked streams (engine.park_expiry, engine.max_parked)", expired)
        self.metrics.streams_expired.inc(expired)
        self.metrics.streams_parked.set(parked)

    # -- health -------------------------------------------------------------------------------
    def healthy(self) -> tuple[bool, str]:
        stalled = time.monotonic() - self._heartbeat
        if stalled > 10.0 and not self._stopped.is_set():
            return False, f"engine loop stalled for {stalled:.0f}s"
        return True, "engine loop running"

    def ready(self) -> tuple[bool, str]:
        if self.engine is None:
            return False, "model not loaded"
        if self.journal_fault.active:
            held = 0 if self._held is None else len(self._held.admission.batch)
            return False, f"{self.journal_fault.describe()}; intake paused, {held} samples held"
        if self.park_fault.active:
            held = 0 if self._unapplied is None else len(self._unapplied.admission.batch)
            return False, f"{self.park_fault.describe()}; intake paused, {held} samples held"
        if self.checkpoint_fault.active:
            return False, self.checkpoint_fault.describe()
        if not self.link.is_connected.is_set():
            return False, "broker not connected"
        if not self.link.is_subscribed.is_set():
            return False, "not subscribed"
        return True, "connected, subscribed, model loaded"
