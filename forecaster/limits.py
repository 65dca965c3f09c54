"""Bounds that hold by default: how many streams live in memory, and how fast new ones may come.

Anyone who can publish under the input topics can invent stream ids. Each resident stream costs
about 4 KB (hidden state, normaliser, the combiner's AR path and time-of-day profile, the
interval and anomaly trackers: the memory row of ``forecaster bench engine``), so without a bound a stray or hostile
publisher grows the daemon until the machine swaps. ``auto_max_streams`` sizes the default bound
to the machine; ``NewStreamLimit`` keeps one source from pushing every known stream out of memory
(and into the park store) faster than an operator can notice.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

# Resident bytes per stream at the defaults (``forecaster bench engine``, memory row: the combiner
# adds ~3.9 KB a stream to the RNN alone's figure).
STREAM_BYTES = 4096
MEMORY_SHARE = 16  # resident streams take at most 1/16 of the memory the process may use
AUTO_MIN, AUTO_MAX = 10_000, 1_000_000


def memory_limit() -> int:
    """Bytes this process may use: physical memory, or the cgroup's limit where one is lower."""
    physical = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            return min(physical, int(text))
    return physical


def auto_max_streams(memory: int | None = None) -> int:
    """The default ``engine.max_streams``: 1/16 of the memory at ~4 KB a stream, kept within
    10,000 .. 1,000,000 (2 GB: 32,768 streams in memory; 24 GB: 393,216).

    >>> auto_max_streams(24 * 2**30), auto_max_streams(2 * 2**30), auto_max_streams(2**29)
    (393216, 32768, 10000)
    """
    budget = (memory_limit() if memory is None else memory) // MEMORY_SHARE
    return max(AUTO_MIN, min(AUTO_MAX, budget // STREAM_BYTES))


def source_of(topic: str, levels: int) -> str:
    """The source a topic's new streams are counted against: its first ``levels`` levels.

    >>> source_of("plant1/line4/sensor9/value", 2)
    'plant1/line4'
    """
    return "/".join(topic.split("/", levels)[:levels])


class NewStreamLimit:
    """A token bucket per source: ``burst`` new stream ids at once, then ``rate`` per second.

    Only ids the daemon has never seen (neither in memory nor parked) take a token; every sample
    of a refused id in the tick is refused with it (counted as ``new_stream_limit``), and the id
    may try again with its next sample. Refusal happens before the journal, so a replay after a
    crash never meets it: the admitted streams and their forecasts stay exactly reproducible.
    """

    def __init__(
        self,
        rate: float,
        burst: int,
        levels: int,
        clock: Callable[[], float] = time.monotonic,
        max_sources: int = 10_000,
    ) -> None:
        self.rate, self.burst, self.levels, self.clock = rate, float(burst), levels, clock
        self.max_sources = max_sources  # the table of buckets is itself bounded
        self.buckets: dict[str, tuple[float, float]] = {}  # source -> (tokens, when)

    def refused(
        self, streams: list[str], topics: list[str], known: Callable[[str], bool]
    ) -> np.ndarray:
        """Which of ``streams`` (the tick's rows not resident in memory, with each row's message
        ``topics``) are new and find their source's bucket empty: a bool mask.

        ``known(stream)`` says whether the engine has seen the stream (parked counts as seen).
        """
        now = self.clock()
        verdict: dict[str, bool] = {}  # stream -> refused
        for stream, topic in zip(streams, topics, strict=True):
            if stream not in verdict:
                verdict[stream] = not known(stream) and not self._take(
                    source_of(topic, self.levels), now
                )
        return np.fromiter(map(verdict.__getitem__, streams), bool, len(streams))

    def _take(self, source: str, now: float) -> bool:
        tokens, when = self.buckets.pop(source, (self.burst, now))
        tokens = min(self.burst, tokens + (now - when) * self.rate)
        if len(self.buckets) >= self.max_sources:  # forget the least recently active source
            del self.buckets[next(iter(self.buckets))]
        taken = tokens >= 1.0
        self.buckets[source] = (tokens - 1.0 if taken else tokens, now)  # most recent last
        return taken
