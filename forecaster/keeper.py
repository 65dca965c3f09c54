"""The state keeper: what makes a restart exact - the engine built from the newest good
checkpoint, the journal replayed after it, and each tick journaled before it is acknowledged
(``Checkpoints`` writes the state this keeps).

A damaged checkpoint falls back to an older kept one; a journal missing positions refuses the
start unless the loss is accepted (docs/reliability.md). A journal write that fails is a state
(``StorageFault``): the tick is held, unacknowledged, until the journal takes it.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from forecaster import lifecycle
from forecaster.checkpoints import KeptCheckpoint
from forecaster.config import Config, combiner_config, scoring_config
from forecaster.engine import Batch, Engine, GapPolicy
from forecaster.errors import CheckpointError, ConfigError, StateLossError
from forecaster.faults import RateLimitedLog, StorageFault
from forecaster.metrics import Metrics
from forecaster.model import Forecaster
from forecaster.outbox import Outbox
from forecaster.persist import (
    Checkpoint,
    Journal,
    Messages,
    journal_position,
    kept_paths,
    load_checkpoint,
    read_manifest,
    source_id,
)
from forecaster.store import SqliteStore

log = logging.getLogger("forecaster.daemon")  # as before the split: one logger for its lines


def gap_policy(config: Config) -> GapPolicy | None:
    """The engine's gap handling from ``engine.gaps`` (None: off)."""
    gaps = config.engine.gaps
    if not gaps.enabled:
        return None
    return GapPolicy(gaps.factor, gaps.halflife, gaps.min_intervals, gaps.rewarm_samples)


class StateKeeper:
    """The state folder's contents in use: the engine, the journal and the parked-stream store,
    and the kept checkpoints a start can fall back to."""

    def __init__(
        self, config: Config, metrics: Metrics, outbox: Outbox, rate_limited: RateLimitedLog
    ) -> None:
        self.config = config
        self.metrics = metrics
        self.outbox = outbox
        self.rate_limited = rate_limited
        self.state_path = Path(config.state.dir) / "checkpoint.safetensors"
        self.journal_path = Path(config.state.dir) / "journal.sqlite"
        self.engine: Engine | None = None
        self.store: SqliteStore | None = None  # evicted streams (engine.max_streams)
        self.journal: Journal | None = None
        self.applied = 0  # journal position of the last sample applied to the engine
        interval = config.state.fault_log_interval
        self.journal_fault = StorageFault("journal", metrics, interval)
        self.park_fault = StorageFault("park_store", metrics, interval)
        self._restored = False  # a checkpoint of the state folder was loaded
        # The configured model file's identity, and its weights when they are not the ones the
        # restored state was built under (``deploy_new_model`` serves them after the replay).
        self.model_source = ""
        self.challenger_source = ""  # source_id of model.challenger ("": none)
        self.challenger_changed = False  # the saved state had another challenger
        self.new_model: Checkpoint | None = None
        self.kept: list[KeptCheckpoint] = []  # durable checkpoints on disk, newest first
        # A replay (or an accepted loss) is followed by a checkpoint as soon as its forecasts
        # have left, retried every retry_interval: a crash loop then replays only new work.
        self.checkpoint_soon = False

    # -- start --------------------------------------------------------------------------------
    def build_engine(self) -> Checkpoint:
        """The engine (``self.engine``) from the state folder's checkpoint, else the model's."""
        device = self.config.model.device
        restored = self._restore(device)
        self.model_source = source_id(self.config.model.checkpoint)
        challenger = self._challenger(restored, device)
        if restored is not None:
            checkpoint = restored
            self._check_model_source(restored, device)
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
            challenger=challenger,
        )
        info = checkpoint.manifest.get("info", {})
        engine.model_epoch = int(info.get("model_epoch", 0))
        engine.challenger_epoch = int(info.get("challenger_epoch", 0)) + self.challenger_changed
        engine.streams.shadow_epoch[:] = engine.challenger_epoch  # resident: as loaded above
        if challenger is not None:  # the roles and the evidence for the next swap
            engine.promotions = int(info.get("promotions", 0))
            engine.shadow_sq[:] = (
                float(info.get("shadow_served_sq", 0.0)),
                float(info.get("shadow_challenger_sq", 0.0)),
            )
            engine.shadow_n = int(info.get("shadow_n", 0))
            engine.shadow_halflife = float(self.config.model.promote.samples)
        if checkpoint.stream_names:
            engine.streams.load(checkpoint.stream_names, checkpoint.stream_arrays)
            engine.ticks = int(engine.streams.last_used.max(initial=0))  # the LRU clock goes on
        self.engine = engine
        return checkpoint

    def _challenger(self, restored: Checkpoint | None, device: str) -> Forecaster | None:
        """``model.challenger``'s model; its hidden states from the saved state only when they
        were built by the same file (else they start afresh). After a promotion the saved state
        serves the challenger's weights and ``model.checkpoint`` runs in the shadow."""
        path = self.config.model.challenger
        self.challenger_source = "" if path is None else source_id(path)
        info = {} if restored is None else restored.manifest.get("info", {})
        if (
            path is not None
            and info.get("model_source") == self.challenger_source
            and info.get("challenger_source") == self.model_source
        ):  # promoted: the roles as they were
            path = self.config.model.checkpoint
            self.model_source, self.challenger_source = self.challenger_source, self.model_source
        # Another challenger than the saved state's: its states and forecasts start afresh
        # (parked streams' too when they return: a new challenger epoch).
        self.challenger_changed = info.get("challenger_source", "") != self.challenger_source
        if restored is not None and self.challenger_changed:
            restored.stream_arrays.pop("challenger_state", None)
            restored.stream_arrays.pop("challenger_prediction", None)
        if self.config.model.challenger is None:
            return None
        model = load_checkpoint(path, device).model
        log.info(
            "challenger %s runs in the shadow (scored, never published)",
            path or "(the shipped model)",
        )
        return model

    def _check_model_source(self, restored: Checkpoint, device: str) -> None:
        """A restart with another ``model.checkpoint`` deploys it (same architecture) instead of
        silently serving the state folder's weights; another architecture is refused."""
        recorded = restored.manifest.get("info", {}).get("model_source")
        if recorded is None or recorded == self.model_source:
            return  # the same file (or a state from before sources were recorded)
        new = load_checkpoint(self.config.model.checkpoint, device)
        old_args, new_args = restored.model.config.to_dict(), new.model.config.to_dict()
        if old_args != new_args:
            raise ConfigError(
                f"model.checkpoint is another architecture ({new_args}) than the one the state in"
                f" {self.state_path.parent} was built with ({old_args}): start with an empty"
                " state.dir, or with the model it was built with"
            )
        self.new_model = new

    def set_challenger(self, path: Path | None) -> None:
        """Run another challenger (None: none) from the next tick on (a reload of
        ``model.challenger``): its states start afresh (``Engine.set_challenger``)."""
        assert self.engine is not None
        model = None if path is None else load_checkpoint(path, self.config.model.device).model
        self.engine.set_challenger(model)
        self.challenger_source = "" if path is None else source_id(path)
        log.info("challenger now %s (its hidden states start afresh)", path or "none")

    def deploy_new_model(self) -> bool:
        """After the replay (under the old weights, exactly as served): serve the configured
        model's weights; every hidden state re-warms (``Engine.deploy``). True when it did."""
        new, engine = self.new_model, self.engine
        if new is None or engine is None:
            return False
        rewarm = self.config.engine.gaps.rewarm_samples
        engine.deploy(new.model.state_dict(), engine.model_version + 1, rewarm)
        self.new_model = None
        self.checkpoint_soon = True  # the next checkpoint records the new source
        log.warning(
            "model.checkpoint %s is not the model the saved state was built with: serving it"
            " (model version %d); every stream's hidden state starts afresh and its next %d"
            " forecasts say warm: false (normaliser, intervals and readers go on)",
            self.config.model.checkpoint or "(the shipped model)",
            engine.model_version,
            rewarm,
        )
        return True

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
            self.kept = [KeptCheckpoint.of(checkpoint.manifest)]
            for older in paths[index + 1 :]:
                manifest = read_manifest(older)
                if manifest:
                    self.kept.append(KeptCheckpoint.of(manifest))
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
        self._lose(lost, "STATE LOSS ACCEPTED (state.accept_state_loss): %s", message)

    def _damaged_row(self, first: int, last: int) -> None:
        """A journal row failed its checksum: refused, unless a loss is accepted (then skipped)."""
        if not self.config.state.accept_state_loss:
            raise StateLossError(
                f"journal {self.journal_path}: positions {first}-{last} are damaged (checksum);"
                " start refused: start with --accept-state-loss to go on without them",
                [(first, last)],
            )
        self._lose(
            last - first + 1,
            "STATE LOSS ACCEPTED: journal positions %d-%d damaged, skipped",
            first,
            last,
        )

    def _lose(self, samples: int, message: str, *args: object) -> None:
        """Go on without journaled samples (a loss accepted): loudly, counted, and with a
        checkpoint soon, so a restart does not meet the loss again."""
        log.error(message, *args)
        self.metrics.state_loss.inc(samples)
        self.checkpoint_soon = True

    def replay_journal(self, checkpoint: Checkpoint) -> None:
        """Apply the journaled samples the restored checkpoint does not include, in order."""
        assert self.engine is not None
        position = journal_position(checkpoint) if self._restored else 0
        self.journal = Journal(self.journal_path, self.config.state.journal_sync)
        self._check_journal(position)
        self.journal.start_at(position)
        if self.checkpoint_soon:  # a loss accepted: the end marker starts again from here
            self.journal.mark_end()
        self.applied = position
        replayed = 0
        # Forecasts the broker confirmed before the crash are not published again (a crash loop
        # would otherwise send every replayed forecast once per restart).
        confirmed = (
            self.journal.confirmed if self.config.state.replay_publish == "unconfirmed" else 0
        )
        republished = 0
        ticks = self.journal.ticks_after(position, self._damaged_row)
        swaps = self.journal.promotions_after(self.engine.promotions)
        swaps = swaps if self.engine.challenger is not None else []
        for last, batch, messages in ticks:  # as ticked live
            while swaps and swaps[0][1] <= last - len(batch):  # a swap before this tick
                lifecycle.apply(self)
                swaps.pop(0)
            result = self.engine.tick_batch(batch)
            for reason in result.rejected_reason:  # rows overlapping the checkpoint: never again
                self.metrics.rejected.labels(reason).inc()
            forecasts = result.forecasts
            self.applied = last
            replayed += len(batch)
            if last <= confirmed:
                continue
            republished += len(forecasts)
            runs = messages or [(len(batch), None)]  # None: one message per forecast
            rows = np.repeat(np.arange(len(runs)), [count for count, _ in runs])  # row -> message
            frames = [frame for _, frame in runs]
            origins = rows[forecasts.index].tolist()
            self.outbox.publish_forecasts(forecasts, origins, frames, self.outbox.later)
        for _ in swaps:  # swapped after the last journaled tick
            lifecycle.apply(self)
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
            self.checkpoint_soon = True

    # -- each tick ----------------------------------------------------------------------------
    def confirm_settled(self) -> None:
        """Record in the journal that the broker has every forecast so far, when it has."""
        if self.journal is not None and self.outbox.settled:
            self.journal.confirm(self.applied)

    def journal_tick(self, admitted: Batch, messages: Messages | None) -> bool:
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
        self.applied = position
        self.metrics.journal_pending.inc(len(admitted))
        return True

    def close(self) -> None:
        """After the last checkpoint: close the journal and the park store."""
        if self.journal is not None:
            self.journal.close()
        if self.store is not None:
            self.store.close()
