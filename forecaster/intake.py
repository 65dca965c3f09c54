"""The intake: the MQTT receive queue drained into one admitted tick, and ticks the state folder
refused held for a retry.

Each step drains whatever is queued (up to ``engine.max_batch`` samples, ``engine.max_rounds``
per stream) and never waits to fill a batch: one sample at light load, large ticks under heavy
load. A frame is never split: all its samples go into one tick. A tick the journal (or the park
store) cannot take is held here, unacknowledged (or unapplied), and nothing else is taken until
it goes through, so no newer sample of a stream overtakes it.
"""

from __future__ import annotations

import logging
import queue
import time
from collections import Counter
from dataclasses import dataclass

import numpy as np

from forecaster.config import Config
from forecaster.engine import Admission, Batch, Engine
from forecaster.errors import PayloadError
from forecaster.faults import RateLimitedLog
from forecaster.limits import NewStreamLimit
from forecaster.metrics import Metrics
from forecaster.mqtt import MqttLink, RawMessage
from forecaster.parse import Parsed, PayloadParser
from forecaster.persist import Messages

log = logging.getLogger("forecaster.daemon")  # as before the split: one logger for its lines


@dataclass(slots=True)
class Taken:
    """The messages drained for one tick and their readings as columns."""

    count: int  # messages taken off the queue (redelivered copies included)
    batch: list[RawMessage]  # the messages handled (each acknowledged once journaled)
    frames: list[str | None]  # per message: the frame's output name, None: one sample
    tick: Parsed  # every reading of the tick, as columns
    origins: list[int]  # per reading: index in ``batch`` of the message it came in


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


def new_stream_limit(config: Config) -> NewStreamLimit | None:
    """The allowance of new stream ids per source (``engine.new_streams``; None: no limit)."""
    new = config.engine.new_streams
    return NewStreamLimit(new.per_s, new.burst, new.source_levels) if new.per_s > 0 else None


class Intake:
    """Takes samples off the receive queue into admitted ticks; holds a refused one."""

    def __init__(
        self,
        config: Config,
        inbox: queue.Queue[RawMessage],
        link: MqttLink,
        metrics: Metrics,
        rate_limited: RateLimitedLog,
    ) -> None:
        self.config = config
        self.inbox = inbox
        self.link = link
        self.metrics = metrics
        self.rate_limited = rate_limited
        payload = config.mqtt.payload
        self.parser = PayloadParser(
            config.mqtt.input_topics,
            frame_templates=config.mqtt.frame_topics,
            value_field=payload.value_field,
            ts_field=payload.ts_field,
            seq_field=payload.seq_field,
            max_bytes=payload.max_bytes,
        )
        self.held: HeldTick | None = None  # a tick waiting for the journal (storage fault)
        # A tick journaled and acknowledged whose parking of other streams failed (the park
        # store cannot be written): applied first, before any other input, once it can be.
        self.unapplied: HeldTick | None = None
        self.retry_at = 0.0  # monotonic time of the next retry of either
        self.new_streams = new_stream_limit(config)

    # -- take and admit -----------------------------------------------------------------------
    def take(self, timeout: float) -> Taken | None:
        """Drain the queue into one tick's messages (None: nothing came within ``timeout``)."""
        try:
            raw = self.inbox.get(timeout=timeout) if timeout > 0 else self.inbox.get_nowait()
        except queue.Empty:
            return None
        taken = Taken(0, [], [], Parsed([], [], [], []), [])
        batch, frames, tick, origins = taken.batch, taken.frames, taken.tick, taken.origins
        limit, max_rounds = self.config.engine.max_batch, self.config.engine.max_rounds
        per_stream: Counter[str] = Counter()  # samples of each stream in this tick
        rounds = 0
        while True:
            taken.count += 1
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
        if batch:
            self.metrics.queue_depth.set(self.inbox.qsize())
            self.metrics.messages_received.inc(len(batch))
            self.metrics.samples_received.inc(len(tick.streams))
        return taken

    def admit(self, engine: Engine, taken: Taken) -> HeldTick:
        """The engine's admission of the tick's readings (refusals counted) and its output
        messages as the journal keeps them."""
        tick = taken.tick
        # The parser hands out finite floats, str ids and seq in [0, 2**63) or NO_SEQ: columns
        # as they are (the engine's admit checks values and sequence numbers).
        columns = Batch(
            tick.streams,
            np.array(tick.values, dtype=np.float64),
            np.array(tick.ts, dtype=np.float64),
            np.array(tick.seq, dtype=np.int64),
        )
        admission = self._limit_new_streams(engine, engine.admit(columns), taken)
        self._reject_rows(columns, admission.rejected_index, admission.rejected_reason)
        row_origins = np.asarray(taken.origins, dtype=np.int64)
        messages = self._messages(row_origins, admission.index, taken.frames)
        return HeldTick(admission, messages, row_origins, taken.batch, taken.frames)

    def _limit_new_streams(self, engine: Engine, admission: Admission, taken: Taken) -> Admission:
        """Refuse the rows of new stream ids past their source's allowance (``engine.new_streams``);
        a tick of resident streams only costs one comparison."""
        outside = np.flatnonzero(admission.slots < 0)
        if self.new_streams is None or not len(outside):
            return admission
        names, batch, origins = admission.batch.streams, taken.batch, taken.origins
        refused = self.new_streams.refused(
            [names[i] for i in outside.tolist()],
            [batch[origins[row]].topic for row in admission.index[outside].tolist()],
            admission.parked.__contains__,  # seen before: admit read the park store once
        )
        if not refused.any():
            return admission
        return admission.without(outside[refused], "new_stream_limit")

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

    def _reject_rows(self, columns: Batch, rows: np.ndarray, reasons: list[str]) -> None:
        for i, reason in zip(rows.tolist(), reasons, strict=True):
            self._reject(reason, columns.streams[i], repr(float(columns.values[i])))

    def _reject(self, reason: str, where: str, detail: str) -> None:
        self.metrics.rejected.labels(reason).inc()
        self.rate_limited.warning(
            reason, "rejected sample (%s) on %s: %s", reason, where[:200], detail[:200]
        )

    # -- held ticks ---------------------------------------------------------------------------
    @property
    def waiting(self) -> bool:
        """A refused tick waits for its retry: nothing else is taken until it goes through."""
        return self.held is not None or self.unapplied is not None

    def hold(self, tick: HeldTick, journaled: bool) -> None:
        """Keep a tick the journal (``journaled`` False) or the park store refused for a retry
        after ``state.retry_interval``."""
        if journaled:
            self.unapplied = tick
        else:
            self.held = tick
        self.retry_at = time.monotonic() + self.config.state.retry_interval
        self.metrics.storage_held.set(len(tick.admission.batch))

    def release(self, journaled: bool) -> None:
        """The journal (``journaled`` False) or the park store took the held tick."""
        if journaled:
            self.unapplied = None
        else:
            self.held = None
        self.metrics.storage_held.set(0)

    def retry_due(self, timeout: float) -> bool:
        """Whether the held tick's retry is due; else wait for it (up to ``timeout``)."""
        wait = self.retry_at - time.monotonic()
        if wait > 0:
            time.sleep(min(wait, max(timeout, 0.0)))
            return False
        return True

    def held_samples(self, journaled: bool) -> int:
        """Samples of the tick held for the journal (``journaled`` False) or the park store."""
        tick = self.unapplied if journaled else self.held
        return 0 if tick is None else len(tick.admission.batch)
