"""Streams beyond ``engine.max_streams``: the least recently used are parked in the engine's store
and brought back, bit for bit, when they send again (with their states as any promotion or new
challenger since would have left them, ``forecaster.shadow.follow_roles``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from forecaster import shadow
from forecaster.store import stack_rows, stream_row

if TYPE_CHECKING:
    from forecaster.engine import Engine


def make_room(engine: Engine, needed: set[str]) -> None:
    """Bring back parked streams this tick needs, parking least recently used others first."""
    table = engine.streams
    new = sorted(s for s in needed if s not in table)
    parked = {s: row for s in new if (row := engine.store.get(s)) is not None}
    evict(engine, len(table) + len(new) - engine.max_streams, needed)
    if parked:
        names = list(parked)
        for row in parked.values():  # parked before a promotion: its states swap roles
            shadow.follow_roles(row, engine.promotions, engine.challenger_epoch)
        kinds: dict[frozenset[str], list[str]] = {}  # rows of one layout stack together
        for name in names:
            kinds.setdefault(frozenset(parked[name]), []).append(name)
        for group in kinds.values():
            table.put(group, stack_rows([parked[name] for name in group]))
        engine.restores += len(names)
        back = np.fromiter(map(table.slots.__getitem__, names), np.int64, len(names))
        stale = back[table.epoch[back] != engine.model_epoch]
        if len(stale):  # parked before a new model: built under the old weights
            engine.rewarm(stale)


def evict(engine: Engine, excess: int, keep: set[str]) -> None:
    """Park the ``excess`` least recently used streams, except those in ``keep``."""
    table = engine.streams
    if excess <= 0:
        return
    idle = np.array([name not in keep for name in table.names], dtype=bool)
    candidates = np.flatnonzero(idle)
    order = np.argsort(table.last_used[candidates], kind="stable")  # oldest first
    chosen = candidates[order[:excess]]
    if not len(chosen):
        return
    names = [table.names[i] for i in chosen.tolist()]
    arrays = table.arrays(chosen)
    # Parked first, then removed: a store that cannot be written leaves the table as it was.
    engine.store.put({name: stream_row(arrays, i) for i, name in enumerate(names)})
    _, src, dst = table.take(names)
    engine.evictions += len(names)
    if engine.slot_listener is not None:
        engine.slot_listener(chosen, src, dst)
