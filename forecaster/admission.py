"""Admission: which of a tick's samples the engine will take, with each sequence number filled in.

Kept apart from the engine's stepping so it reads on its own: the daemon admits, journals the
admitted rows and only then ticks them, so a replay assigns the same numbers and a redelivery is a
duplicate. It touches no state (the table's ``scratch`` column is a work area).
"""

from __future__ import annotations

from collections.abc import Callable
from itertools import repeat

import numpy as np

from forecaster.reasons import ENGINE_REASONS as REJECT_REASONS
from forecaster.records import NO_SEQ, STREAM_ID, Admission, Batch
from forecaster.streams import StreamTable


def admit(
    table: StreamTable,
    batch: Batch,
    last_seq: Callable[[str], int],
    max_abs_value: float,
    tick: int,
) -> Admission:
    """``Engine.admit``: ``last_seq(stream)`` gives a stream not in ``table`` its last applied
    seq (parked) or -1 (never seen); ``tick`` is the engine's next tick."""
    names = batch.streams
    values = np.asarray(batch.values, dtype=np.float64)
    reason = value_reasons(values, max_abs_value)
    slots = np.fromiter(map(table.slots.get, names, repeat(-1)), np.int64, len(names))
    last = np.where(slots >= 0, table.seq[slots], 0)
    # Streams not resident (new, or parked by eviction): checked, their last seq looked up
    # once, and numbered by a key of their own below every slot (-2, -3, ...).
    keys = slots.copy()
    outside: dict[str, tuple[int, int]] = {}  # stream -> (key, last seq)
    for i in np.flatnonzero((slots < 0) & (reason == 0)).tolist():
        name = names[i]
        known = outside.get(name)
        if known is None:
            if not valid_stream(name):
                reason[i] = 1 + REJECT_REASONS.index("bad_stream")
                continue
            known = outside[name] = (-2 - len(outside), last_seq(name))
        keys[i], last[i] = known
    candidates = np.flatnonzero(reason == 0)
    keys = keys[candidates]
    resident = keys[keys >= 0]
    rank = np.arange(len(resident))
    table.scratch[resident] = rank  # where a slot comes twice, the later position wins
    distinct = len(keys) - len(resident) == len(outside) and bool(
        (table.scratch[resident] == rank).all()
    )
    accepted, seq, level = number_rows(keys, last[candidates], batch.seq[candidates], distinct)
    reason[candidates[~accepted]] = 1 + REJECT_REASONS.index("duplicate")
    index = candidates[accepted]
    if len(index) == len(names):  # the usual tick: every row, no copies
        admitted, slots = Batch(names, values, batch.ts, seq), slots
    else:
        admitted, slots = (
            Batch(
                [names[i] for i in index.tolist()],
                values[index],
                batch.ts[index],
                seq[accepted],
            ),
            slots[index],
        )
        level = None if level is None else level[accepted]
    bad = np.flatnonzero(reason)
    refused = [REJECT_REASONS[r - 1] for r in reason[bad].tolist()]
    parked = frozenset(name for name, (_, last_seen) in outside.items() if last_seen >= 0)
    return Admission(admitted, index, bad, refused, slots, level, tick, parked)


def value_reasons(values: np.ndarray, max_abs_value: float) -> np.ndarray:
    """Per value: 0 when fine, else 1 + its index in ``REJECT_REASONS``."""
    reason = np.zeros(len(values), dtype=np.int8)
    with np.errstate(invalid="ignore"):
        reason[np.abs(values) > max_abs_value] = 1 + REJECT_REASONS.index("out_of_range")
        reason[~np.isfinite(values)] = 1 + REJECT_REASONS.index("non_finite")
    return reason


def number_rows(
    keys: np.ndarray, last: np.ndarray, given: np.ndarray, distinct: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Sequence numbers: (accepted, seq, level) for samples of streams ``keys`` in arrival order.

    ``last``: each sample's stream's last applied seq; ``given``: the sender's, or NO_SEQ for the
    stream's next (from 1). One at or below the stream's last is a duplicate; a stream never
    seen has ``last`` -1, so its first ``seq`` is taken whatever it is. ``level`` is each sample's
    round in a tick (None when every stream comes once: ``distinct``, done without a Python loop).

    >>> ok, seq, level = number_rows(np.array([0, 0, 0]), np.array([4, 4, 4]), np.array([-1, 5, 9]), False)
    >>> ok.tolist(), seq[ok].tolist(), level[ok].tolist()
    ([True, False, True], [5, 9], [0, 1])
    """
    if distinct:
        seq = np.where(given == NO_SEQ, np.maximum(last + 1, 1), given)  # unnumbered: from 1
        return seq > last, seq, None
    accepted = np.zeros(len(keys), dtype=bool)
    seq = np.zeros(len(keys), dtype=np.int64)
    level = np.zeros(len(keys), dtype=np.int64)
    pending: dict[int, tuple[int, int]] = {}  # key -> (last seq, rounds used)
    for i, (key, before, wanted) in enumerate(
        zip(keys.tolist(), last.tolist(), given.tolist(), strict=True)
    ):
        prev, depth = pending.get(key, (before, 0))
        number = max(prev + 1, 1) if wanted == NO_SEQ else wanted
        if number > prev:
            accepted[i], seq[i], level[i] = True, number, depth
            pending[key] = (number, depth + 1)
    return accepted, seq, level


def valid_stream(stream: str) -> bool:
    return isinstance(stream, str) and STREAM_ID.fullmatch(stream) is not None
