"""Where streams evicted by ``engine.max_streams`` wait, bit for bit, until they send again.

Part of the checkpoint store: the daemon keeps evicted streams in ``state/evicted.sqlite`` (SQLite
in WAL mode, one row per eviction: a JSON header naming each array's dtype and shape, then the raw
bytes; decoding is ``np.frombuffer`` over a whitelist of dtypes, so it cannot run code); tests
and ``forecaster evaluate`` use ``MemoryStore``. Rows carry a generation number, one per batch of
evictions. A checkpoint records the generation it saw; restoring it drops the rows written after
it (``rollback``), so the resident streams of the checkpoint and the evicted ones in the store
always describe the same moment, even after a crash (the journal replay then evicts again).
"""

from __future__ import annotations

import json
import math
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import numpy as np

# Hidden-state arrays (num_layers, streams, width): the served model's, and the shadow
# challenger's (``model.challenger``) beside it, warmed on the same samples.
STATE_KEYS = ("state", "challenger_state")

# Only plain numbers: an evicted row holds float32 states, float64 and int64 columns.
DTYPES = frozenset({"<f4", "<f8", "<i8", "|b1"})


class StreamStore(Protocol):
    """What the engine needs: park some streams' arrays, get one back."""

    def put(self, rows: dict[str, dict[str, np.ndarray]]) -> None: ...
    def get(self, stream: str) -> dict[str, np.ndarray] | None: ...


class MemoryStore:
    """Evicted streams in a dict (tests, evaluate): the same semantics, no file.

    >>> store = MemoryStore()
    >>> store.put({"a": {"seq": np.array([3])}})
    >>> store.get("a")["seq"].tolist(), store.get("b")
    ([3], None)
    """

    def __init__(self) -> None:
        self.rows: dict[str, dict[str, np.ndarray]] = {}

    def __len__(self) -> int:
        return len(self.rows)

    def put(self, rows: dict[str, dict[str, np.ndarray]]) -> None:
        self.rows.update({k: {n: a.copy() for n, a in v.items()} for k, v in rows.items()})

    def get(self, stream: str) -> dict[str, np.ndarray] | None:
        row = self.rows.get(stream)
        return None if row is None else {n: a.copy() for n, a in row.items()}


class SqliteStore:
    """Evicted streams in SQLite, versioned by generation so checkpoints stay consistent.

    >>> import tempfile, pathlib
    >>> store = SqliteStore(pathlib.Path(tempfile.mkdtemp()) / "evicted.sqlite")
    >>> store.put({"a": {"seq": np.array([3])}}); store.generation
    1
    >>> store.put({"a": {"seq": np.array([4])}}); store.get("a")["seq"].tolist()
    [4]
    >>> store.rollback(1); store.get("a")["seq"].tolist()
    [3]
    """

    def __init__(self, path: Path | str, clock: Callable[[], float] = time.time) -> None:
        self.path = Path(path)
        self.clock = clock  # when a row is parked (park expiry); a test's own clock
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(self.path, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")  # a process crash loses no commit
        self.db.execute(
            "CREATE TABLE IF NOT EXISTS evicted ("
            " stream TEXT NOT NULL, generation INTEGER NOT NULL, data BLOB NOT NULL,"
            " parked_at REAL, PRIMARY KEY (stream, generation))"
        )
        if "parked_at" not in {row[1] for row in self.db.execute("PRAGMA table_info(evicted)")}:
            self.db.execute("ALTER TABLE evicted ADD COLUMN parked_at REAL")  # a store before it
        self.db.execute("CREATE INDEX IF NOT EXISTS evicted_parked ON evicted(stream, parked_at)")
        # Rows of a store from before parked_at: their idle time counts from now.
        self.db.execute("UPDATE evicted SET parked_at = ? WHERE parked_at IS NULL", (clock(),))
        self.db.commit()
        row = self.db.execute("SELECT MAX(generation) FROM evicted").fetchone()
        self.generation = int(row[0] or 0)

    def __len__(self) -> int:
        return int(self.db.execute("SELECT COUNT(DISTINCT stream) FROM evicted").fetchone()[0])

    def put(self, rows: dict[str, dict[str, np.ndarray]]) -> None:
        """One generation, one transaction."""
        if not rows:
            return
        self.generation += 1
        now = self.clock()
        with self.db:
            self.db.executemany(
                "INSERT OR REPLACE INTO evicted(stream, generation, data, parked_at)"
                " VALUES (?, ?, ?, ?)",
                [(s, self.generation, encode(arrays), now) for s, arrays in rows.items()],
            )

    def expire(self, before: float, resident: set[str], max_parked: int = 0) -> tuple[int, int]:
        """Forget streams parked since before ``before`` (unix time), and past ``max_parked``
        (0: no bound) the longest parked ones: they start afresh if they ever send again.
        Returns (streams forgotten, streams still parked).

        Streams in memory (``resident``) are never forgotten: one restored since its last
        parking may still need its row, should a crash replay from a checkpoint that had it
        parked. Any other stream has not sent since it was parked, so no replay needs it. The
        scans run in SQLite over the (stream, parked_at) index: only forgotten ids reach Python.
        """
        count = self.db.execute("SELECT COUNT(DISTINCT stream) FROM evicted").fetchone()[0]
        grouped = "SELECT stream FROM evicted GROUP BY stream HAVING MAX(parked_at)"
        old = [s for (s,) in self.db.execute(f"{grouped} < ?", (before,)) if s not in resident]
        gone = old
        excess = count - len(old) - max_parked
        if max_parked and excess > 0:
            longest = self.db.execute(
                f"{grouped} >= ? ORDER BY MAX(parked_at) LIMIT ?", (before, excess + len(resident))
            )
            gone = old + [s for (s,) in longest if s not in resident][:excess]
        if gone:
            with self.db:
                self.db.executemany("DELETE FROM evicted WHERE stream = ?", [(s,) for s in gone])
        return len(gone), count - len(gone)

    def size(self) -> int:
        """Bytes the store takes on disk (its file and WAL)."""
        return sum(
            p.stat().st_size
            for p in (self.path, self.path.with_name(self.path.name + "-wal"))
            if p.exists()
        )

    def get(self, stream: str) -> dict[str, np.ndarray] | None:
        row = self.db.execute(
            "SELECT data FROM evicted WHERE stream = ? ORDER BY generation DESC LIMIT 1", (stream,)
        ).fetchone()
        return None if row is None else decode(row[0])

    def sync(self) -> None:
        """Make every row written so far durable (before a checkpoint that refers to them)."""
        self.db.execute("PRAGMA wal_checkpoint(FULL)")

    def rollback(self, generation: int) -> None:
        """Forget what was written after ``generation`` (restoring a checkpoint that saw it)."""
        with self.db:
            self.db.execute("DELETE FROM evicted WHERE generation > ?", (generation,))
        self.generation = generation

    def compact(self, generation: int, resident: list[str]) -> None:
        """After a checkpoint at ``generation`` is durable: drop the rows it no longer needs
        (superseded ones, and those of streams the checkpoint holds in memory)."""
        with self.db:
            self.db.execute(
                "DELETE FROM evicted WHERE generation <= ? AND generation < "
                "(SELECT MAX(generation) FROM evicted AS e WHERE e.stream = evicted.stream"
                " AND e.generation <= ?)",
                (generation, generation),
            )
            self.db.executemany(
                "DELETE FROM evicted WHERE stream = ? AND generation <= ?",
                [(stream, generation) for stream in resident],
            )

    def close(self) -> None:
        self.db.close()


def encode(arrays: dict[str, np.ndarray]) -> bytes:
    """A JSON header line (name, dtype, shape of each array), then their bytes, in that order.

    >>> row = {"seq": np.array([7]), "state": np.ones((1, 1, 2), np.float32)}
    >>> back = decode(encode(row))
    >>> back["seq"].tolist(), back["state"].shape, back["state"].dtype
    ([7], (1, 1, 2), dtype('float32'))
    """
    parts = {k: np.ascontiguousarray(v) for k, v in arrays.items()}
    header = [[k, v.dtype.str, list(v.shape)] for k, v in parts.items()]
    return json.dumps(header).encode() + b"\n" + b"".join(v.tobytes() for v in parts.values())


def decode(data: bytes) -> dict[str, np.ndarray]:
    r"""Inverse of ``encode``; refuses any dtype outside ``DTYPES`` (no object arrays).

    >>> decode(b'[["x", "|O", [1]]]\n' + bytes(8))
    Traceback (most recent call last):
    ...
    ValueError: evicted row: dtype '|O' not allowed
    """
    line, _, body = data.partition(b"\n")
    out, offset = {}, 0
    for name, dtype, shape in json.loads(line):
        if dtype not in DTYPES:
            raise ValueError(f"evicted row: dtype {dtype!r} not allowed")
        count = math.prod(shape)
        array = np.frombuffer(body, dtype=np.dtype(dtype), count=count, offset=offset)
        out[str(name)] = array.reshape(shape).copy()
        offset += array.nbytes
    return out


def stream_row(arrays: dict[str, np.ndarray], i: int) -> dict[str, np.ndarray]:
    """Stream ``i`` of a ``StreamTable.arrays()`` result, keeping the axes (state: (L, 1, W))."""
    return {k: (v[:, i : i + 1] if k in STATE_KEYS else v[i : i + 1]) for k, v in arrays.items()}


def stack_rows(rows: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Inverse of ``stream_row`` for several streams (columns all of them have: older rows may lack
    newer columns, which then start fresh)."""
    keys = set(rows[0]).intersection(*rows[1:])
    return {k: np.concatenate([r[k] for r in rows], axis=1 if k in STATE_KEYS else 0) for k in keys}
