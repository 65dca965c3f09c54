"""Checkpoints: when the state is written, how, and what its durability lets go.

The engine thread only copies the state; a background thread writes it. Only once the file is
durable are the journal trimmed and the parked streams compacted (and expired) to what the
oldest kept checkpoint still needs, so a crash at any moment restarts exactly from a kept one.
A failed write is a state (``StorageFault``): retried every ``state.retry_interval`` while the
journal keeps every sample.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

from forecaster.config import Config
from forecaster.faults import RateLimitedLog, StorageFault, timed
from forecaster.learner import Learner
from forecaster.metrics import Metrics
from forecaster.persist import snapshot

if TYPE_CHECKING:  # the keeper imports KeptCheckpoint from here
    from forecaster.keeper import StateKeeper

log = logging.getLogger("forecaster.daemon")  # as before the split: one logger for its lines


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


class Checkpoints:
    """Writes the keeper's state (engine, parked streams, journal position) in the background
    and trims what a durable checkpoint makes unneeded."""

    def __init__(
        self, config: Config, metrics: Metrics, keeper: StateKeeper, rate_limited: RateLimitedLog
    ) -> None:
        self.config = config
        self.metrics = metrics
        self.keeper = keeper
        self.rate_limited = rate_limited
        self.checkpoint_fault = StorageFault("checkpoint", metrics, config.state.fault_log_interval)
        self.writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint")
        self.writing: PendingCheckpoint | None = None
        self._last_checkpoint = time.monotonic()
        self._next_expiry = 0.0  # monotonic time of the next parked-stream expiry

    def housekeeping(self, learner: Learner | None) -> None:
        """Count a finished write; checkpoint when one is due (sooner after a failure or replay)."""
        self._finish_checkpoint()
        state = self.config.state
        soon = self.checkpoint_fault.active or self.keeper.checkpoint_soon
        interval = state.retry_interval if soon else state.checkpoint_interval
        if time.monotonic() - self._last_checkpoint >= interval:
            self.checkpoint(learner)

    def checkpoint(self, learner: Learner | None, wait: bool = False) -> None:
        """Weights and every stream's state, written atomically.

        The engine thread only copies the state (``snapshot``); a background thread serialises,
        writes and fsyncs it (at 100,000 streams: 26 ms copy here, 88 ms write; ``bench
        journal``). The journal is trimmed, and evicted rows compacted, once the file is durable
        (``_finish_checkpoint``): a crash before then restarts from the previous checkpoint and
        the untrimmed journal. One write at a time; ``wait`` (shutdown) waits for it.
        """
        keeper = self.keeper
        engine, store, journal = keeper.engine, keeper.store, keeper.journal
        if engine is None:
            return
        if self.writing is not None:
            if not wait:
                return
            self.writing.future.exception()  # waits; a failure is counted just below
            self._finish_checkpoint()
        started = self._last_checkpoint = time.monotonic()
        info: dict[str, int | str | float] = {
            "model_source": keeper.model_source,
            "model_epoch": engine.model_epoch,
            "challenger_source": keeper.challenger_source,
            "promotions": engine.promotions,
            "challenger_epoch": engine.challenger_epoch,
            "shadow_served_sq": float(engine.shadow_sq[0]),
            "shadow_challenger_sq": float(engine.shadow_sq[1]),
            "shadow_n": engine.shadow_n,
        }
        if store is not None:
            info["evicted_generation"] = store.generation
        if journal is not None:
            # Only a checkpoint whose every forecast has left for the broker may trim the journal.
            if not keeper.outbox.drain(timeout=2.0):
                log.info("checkpoint deferred: forecasts still waiting for the broker")
                self.metrics.checkpoint_duration.labels("engine_thread").observe(
                    time.monotonic() - started
                )  # the wait paused forecasting too
                return
            info["journal_position"] = keeper.applied
            journal.confirm(keeper.applied)  # flushed: the broker has every forecast so far
        table = engine.streams
        # With learning on, hold the trainer's lock for a consistent optimizer state (one step).
        guard = learner.train_lock if learner is not None else contextlib.nullcontext()
        names = list(table.names)
        try:
            if store is not None:
                store.sync()  # rows the checkpoint refers to are durable before it is
            with guard:
                data = snapshot(
                    engine.model,
                    engine.normalizer_config,
                    model_version=engine.model_version,
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
        future = self.writer.submit(
            timed, data.write, keeper.state_path, self.config.state.keep_checkpoints
        )
        self.writing = PendingCheckpoint(future, info, names)
        self.metrics.checkpoint_duration.labels("engine_thread").observe(time.monotonic() - started)
        if wait:
            future.exception()
            self._finish_checkpoint()

    @property
    def _checkpoint_effect(self) -> str:
        """What a failed checkpoint means for the samples, for its log line."""
        retry = f"retried every {self.config.state.retry_interval:g} s"
        if self.keeper.journal is None:
            return f"{retry}; without a journal a crash now loses what came since the last one"
        return f"{retry}; the journal keeps every sample meanwhile"

    def _finish_checkpoint(self) -> None:
        """Once a background write has ended: count it; if it is durable, trim what it includes."""
        pending = self.writing
        if pending is None or not pending.future.done():
            return
        self.writing = None
        error = pending.future.exception()
        if error is not None:
            self.checkpoint_fault.failed(error, self._checkpoint_effect)
            self.metrics.checkpointed(False)
            return
        self.checkpoint_fault.succeeded()
        self.keeper.checkpoint_soon = False
        self.metrics.checkpoint_duration.labels("write").observe(pending.future.result())
        written = KeptCheckpoint(
            pending.info.get("journal_position", 0),
            pending.info.get("evicted_generation", 0),
            pending.names,
        )
        self.keeper.kept = [written, *self.keeper.kept][: self.config.state.keep_checkpoints]
        oldest = self.keeper.kept[-1]  # what a fall back to the oldest kept checkpoint needs stays
        if self.keeper.journal is not None:
            try:
                self.keeper.journal.trim(oldest.position)
            except sqlite3.Error as exc:  # kept rows are only replayed again: try at the next
                self.metrics.storage_errors.labels("journal").inc()
                self.rate_limited.warning(
                    "journal_trim",
                    "journal not trimmed (%s); retried after the next checkpoint",
                    exc,
                )
            self.metrics.journal_pending.set(self.keeper.applied - written.position)
        if self.keeper.store is not None:
            self.keeper.store.compact(oldest.generation, oldest.names)
            self._expire_parked()
        self.metrics.checkpointed(True)
        log.debug("checkpoint: %d streams -> %s", len(pending.names), self.keeper.state_path)

    def _expire_parked(self) -> None:
        """Bound the parked-stream store (engine.park_expiry, engine.max_parked); after a
        durable checkpoint, so no kept checkpoint's replay needs what goes (``store.expire``)."""
        store, engine = self.keeper.store, self.keeper.engine
        assert store is not None and engine is not None
        self.metrics.parked_bytes.set(store.size())
        now = time.monotonic()
        if now < self._next_expiry:  # 70-100 ms at 200,000 parked streams: not every checkpoint
            return
        limits = self.config.engine
        self._next_expiry = now + min(3600.0, limits.park_expiry / 10)
        try:
            expired, parked = store.expire(
                time.time() - limits.park_expiry, set(engine.streams.names), limits.max_parked
            )
        except sqlite3.Error as exc:
            self.metrics.storage_errors.labels("checkpoint").inc()
            self.rate_limited.warning("park_expiry", "parked streams not expired (%s)", exc)
            return
        if expired:
            log.info("forgot %d parked streams (engine.park_expiry, engine.max_parked)", expired)
        self.metrics.streams_expired.inc(expired)
        self.metrics.streams_parked.set(parked)

    def close(self) -> None:
        """After the last checkpoint: no more writes."""
        self.writer.shutdown()
