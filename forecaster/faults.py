"""Failures of the state folder as states, and warnings that cannot flood the log.

Shared by the daemon's parts (intake, outbox, state keeper): a full disk or a stream of bad
samples is reported by a gauge, a counter and one log line per interval, not one per event.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from forecaster.metrics import Metrics

# The daemon's parts log under its name, as before the split: one logger for its lines.
log = logging.getLogger("forecaster.daemon")


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
