"""The sample journal: every accepted sample, appended to SQLite before its message is acknowledged.

``Journal`` is an SQLite database in WAL mode beside the checkpoint: every accepted sample is
appended (one row and one transaction per tick) before its MQTT message is acknowledged. A
checkpoint records the journal position it includes; on start the samples after it are replayed
through the engine, so a SIGKILL loses no sample and steps no state twice. Rows carry a CRC-32, and
an end marker beside the file records how far the journal went (and how far the broker has
confirmed its forecasts), so a journal that lost rows is found at start, not replayed over.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np
import orjson

from forecaster.errors import CheckpointError
from forecaster.records import Batch, Sample

EMPTY_BATCH = Batch([], np.zeros(0), np.zeros(0), np.zeros(0, np.int64))
Messages = list[tuple[int, str | None]]  # output messages of a tick: runs of (rows, frame)


class JournalTick(NamedTuple):
    """One journaled tick: the position of its last sample, the samples, their messages."""

    last: int
    batch: Batch
    messages: Messages | None  # None: one output message per forecast


def _cut_runs(runs: list[list], skip: int) -> Messages:
    """``runs`` without their first ``skip`` rows (those a checkpoint already includes)."""
    out: Messages = []
    for rows, frame in runs:
        taken = min(skip, rows)
        skip -= taken
        if rows > taken:
            out.append((rows - taken, frame))
    return out


def _row_crc(position: int, streams: bytes, columns: bytes, messages: bytes | None) -> int:
    """CRC-32 of a journal row (its position included: a row moved to another key is damage)."""
    crc = zlib.crc32(position.to_bytes(8, "little", signed=True))
    crc = zlib.crc32(streams, crc)
    crc = zlib.crc32(columns, crc)
    return zlib.crc32(messages or b"", crc)


class EndMarker:
    """Two journal positions in a 20-byte file beside it, overwritten in place: the last one
    appended, and the last one whose forecasts the broker has confirmed (CRC-32 after them).

    The first is the one record of how far the journal went that survives the journal being
    truncated, replaced by an older copy, or losing its WAL file; the second spares a replay
    from publishing again what subscribers already have. Written after SQLite's commit (and
    after the broker's acknowledgement) and never fsynced: both may lag (harmless: a loss not
    seen, a forecast published twice), neither runs ahead. Overwriting 20 bytes in place needs
    no new block, so a full disk does not stop it.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def read(self) -> tuple[int | None, int]:
        """(last appended position or None when unknown, last confirmed position or 0)."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return None, 0
        if len(data) != 20 or zlib.crc32(data[:16]) != int.from_bytes(data[16:], "little"):
            return None, 0  # damaged marker: no claim either way
        return (
            int.from_bytes(data[:8], "little", signed=True),
            int.from_bytes(data[8:16], "little", signed=True),
        )

    def write(self, position: int, confirmed: int) -> None:
        """Best effort: the append it follows has committed, so a failure here (the file cannot
        be created on a full disk) must not fail that append; the marker then lags."""
        data = position.to_bytes(8, "little", signed=True) + confirmed.to_bytes(
            8, "little", signed=True
        )
        with contextlib.suppress(OSError):
            if self._fd is None:
                self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            os.pwrite(self._fd, data + zlib.crc32(data).to_bytes(4, "little"), 0)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class Journal:
    """Append-only sample log in SQLite (WAL mode): one row per tick, samples numbered by a
    position that only grows.

    A row holds a whole tick as columns (stream ids as a JSON list; values, ts and seq as
    little-endian arrays), keyed by the position of its last sample: one insert per tick instead
    of one per sample, which was a fifth of the daemon's time on frames of 100 readings.
    ``trim`` leaves an empty row at the newest position, so a position recorded in a checkpoint
    never names a different sample later, even after every row it held is gone. A journal of the earlier
    one-row-per-sample format is converted when opened, its positions kept.

    >>> import tempfile
    >>> j = Journal(Path(tempfile.mkdtemp()) / "journal.sqlite")
    >>> j.append(Batch(["a", "b"], np.array([1.0, 2.5]), np.array([np.nan, 9.0]), np.array([1, 1])))
    2
    >>> [s for _, s in j.after(1)]
    [Sample(stream='b', value=2.5, ts=9.0, seq=1)]
    >>> j.trim(2); j.append(Batch(["a"], np.array([3.0]), np.array([np.nan]), np.array([2]))); j.close()
    3
    """

    def __init__(self, path: Path | str, sync: str = "full") -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute(f"PRAGMA synchronous={'FULL' if sync == 'full' else 'NORMAL'}")
        self.db.execute(
            "CREATE TABLE IF NOT EXISTS ticks (pos INTEGER PRIMARY KEY, count INTEGER NOT NULL,"
            " streams BLOB NOT NULL, columns BLOB NOT NULL, messages BLOB)"
        )
        columns = {row[1] for row in self.db.execute("PRAGMA table_info(ticks)")}
        if "messages" not in columns:
            self.db.execute("ALTER TABLE ticks ADD COLUMN messages BLOB")  # a journal before it
        if "crc" not in columns:
            self.db.execute("ALTER TABLE ticks ADD COLUMN crc INTEGER")  # NULL: not checked
        # Role swaps of the served model and the challenger (``forecaster.lifecycle``): swap
        # ``number`` happened after the sample at ``pos``, so a replay swaps at the same place.
        self.db.execute(
            "CREATE TABLE IF NOT EXISTS promotions (number INTEGER PRIMARY KEY, pos INTEGER NOT NULL)"
        )
        self._convert_sample_rows()
        row = self.db.execute("SELECT MAX(pos) FROM ticks").fetchone()
        self.position = int(row[0] or 0)
        self.end = EndMarker(self.path.with_name(self.path.name + "-end"))
        # The last position appended (None: unknown) and the last whose forecasts the broker
        # confirmed, by the marker.
        self.recorded, self.confirmed = self.end.read()

    def _convert_sample_rows(self) -> None:
        """Rows of the one-row-per-sample format become tick rows (runs of consecutive
        positions), in one transaction; their last position is kept even if no row is left."""
        old = "SELECT 1 FROM sqlite_master WHERE type='table' AND name='samples'"
        if self.db.execute(old).fetchone() is None:
            return
        self.db.execute("BEGIN IMMEDIATE")
        try:
            rows = self.db.execute(
                "SELECT pos, stream, value, ts, seq FROM samples ORDER BY pos"
            ).fetchall()
            last = self.db.execute(
                "SELECT seq FROM sqlite_sequence WHERE name='samples'"
            ).fetchone()
            runs: list[list[tuple]] = []
            for row in rows:
                if not runs or row[0] != runs[-1][-1][0] + 1 or len(runs[-1]) >= 4096:
                    runs.append([])
                runs[-1].append(row)
            for run in runs:
                batch = Batch(
                    [r[1] for r in run],
                    np.array([r[2] for r in run], dtype=np.float64),
                    np.array([np.nan if r[3] is None else r[3] for r in run], dtype=np.float64),
                    np.array([r[4] for r in run], dtype=np.int64),
                )
                self._insert(run[-1][0], batch)
            position = max(int(last[0]) if last else 0, rows[-1][0] if rows else 0)
            if position and (not rows or rows[-1][0] < position):
                self._insert(position, EMPTY_BATCH)
            self.db.execute("DROP TABLE samples")
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise

    def _insert(self, position: int, batch: Batch, messages: Messages | None = None) -> None:
        columns = b"".join(
            np.ascontiguousarray(column, dtype=dtype).tobytes()
            for column, dtype in ((batch.values, "<f8"), (batch.ts, "<f8"), (batch.seq, "<i8"))
        )
        streams = orjson.dumps(batch.streams)
        runs = None if messages is None else orjson.dumps(messages)
        self.db.execute(
            "INSERT INTO ticks(pos, count, streams, columns, messages, crc)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (
                position,
                len(batch),
                streams,
                columns,
                runs,
                _row_crc(position, streams, columns, runs),
            ),
        )

    def start_at(self, position: int) -> None:
        """Never hand out positions at or below ``position`` (a checkpoint's, if the file is new)."""
        self.position = max(self.position, position)

    def append(self, batch: Batch, messages: Messages | None = None) -> int:
        """One durable transaction for the whole batch (every ``seq`` given); returns the
        position of its last row. ``messages``: the output messages the rows are published in,
        as runs of ``(rows, frame)`` (a frame None: one message per forecast of its rows), so a
        replay publishes them as the live run did; None: one message per forecast."""
        if not len(batch):
            return self.position
        # One statement in autocommit mode is one transaction: no BEGIN and COMMIT around it
        # (each SQLite call is a GIL handoff to the MQTT thread).
        self._insert(self.position + len(batch), batch, messages)
        self.position += len(batch)
        self.end.write(self.position, self.confirmed)
        return self.position

    def record_promotion(self, number: int, position: int) -> None:
        """Durably note that role swap ``number`` follows the sample at ``position``."""
        self.db.execute("INSERT OR REPLACE INTO promotions VALUES (?, ?)", (number, position))

    def promotions_after(self, number: int) -> list[tuple[int, int]]:
        """Role swaps after the ``number``-th, as ``(number, position)``, in order."""
        rows = self.db.execute(
            "SELECT number, pos FROM promotions WHERE number > ? ORDER BY number", (number,)
        )
        return [(int(n), int(p)) for n, p in rows]

    def confirm(self, position: int) -> None:
        """Every forecast of the samples up to ``position`` has been confirmed by the broker: a
        replay need not publish them again."""
        if position > self.confirmed:
            self.confirmed = min(position, self.position)
            self.end.write(self.position, self.confirmed)

    def mark_end(self) -> None:
        """Record the current position as the last appended (after a loss was accepted)."""
        self.confirmed = min(self.confirmed, self.position)
        self.end.write(self.position, self.confirmed)
        self.recorded = self.position

    def gaps(self, position: int) -> list[tuple[int, int | None]]:
        """Positions after ``position`` (a checkpoint's) that a replay needs and this journal
        lacks, as inclusive ranges; ``(first, None)``: an unknown number from ``first`` on.

        Rows must continue one another from ``position`` up to the last position appended
        (the end marker beside the file). A journal truncated, older than the checkpoint, or
        whose WAL file was lost, ends early or has holes: reported here, never replayed over.
        """
        gaps: list[tuple[int, int | None]] = []
        expected = position + 1
        rows = self.db.execute(
            "SELECT pos, count FROM ticks WHERE pos > ? ORDER BY pos", (position,)
        )
        for pos, count in rows:
            first = pos - count + 1
            if first > expected:
                gaps.append((expected, first - 1))
            expected = max(expected, pos + 1)
        end = max(self.position, position)
        if self.recorded is not None and self.recorded > end:
            gaps.append((end + 1, self.recorded))
        elif self.recorded is None and position > 0 and self.position < position:
            gaps.append((position + 1, None))  # journal behind the checkpoint, no marker
        return gaps

    def ticks_after(
        self, position: int, damaged: Callable[[int, int], None] | None = None
    ) -> Iterator[JournalTick]:
        """The journaled ticks with samples after ``position``, in order: the position of each
        one's last sample, its samples after ``position``, and their output messages. A row
        whose checksum or shape is wrong raises CheckpointError, or with ``damaged`` is
        reported to it (first and last position) and skipped."""
        cursor = self.db.execute(
            "SELECT pos, count, streams, columns, messages, crc FROM ticks WHERE pos > ?"
            " ORDER BY pos",
            (position,),
        )
        for pos, count, streams, columns, messages, crc in cursor:
            try:
                names = orjson.loads(streams)
                runs = None if messages is None else orjson.loads(messages)
                whole = runs is None or sum(rows for rows, _ in runs) == count
                if crc is not None and crc != _row_crc(pos, streams, columns, messages):
                    whole = False
            except (ValueError, TypeError):
                whole = False
            if not whole or len(names) != count or len(columns) != 24 * count:
                if damaged is None:
                    raise CheckpointError(
                        self.path,
                        f"journal row {pos}",
                        f"positions {pos - count + 1}-{pos} damaged",
                    )
                damaged(pos - count + 1, pos)
                continue
            values, ts, seq = (
                np.frombuffer(columns, dtype, count, offset)
                for dtype, offset in (("<f8", 0), ("<f8", 8 * count), ("<i8", 16 * count))
            )
            skip = max(0, position - (pos - count))  # samples at or before ``position``
            batch = Batch(names[skip:], values[skip:], ts[skip:], seq[skip:])
            yield JournalTick(pos, batch, None if runs is None else _cut_runs(runs, skip))

    def after(self, position: int) -> Iterator[tuple[int, Sample]]:
        """Samples after ``position`` in order, as ``(position, Sample)``."""
        for last, batch, _ in self.ticks_after(position):
            first = last - len(batch) + 1
            for i, sample in enumerate(batch.samples()):
                yield first + i, sample

    def pending(self, position: int) -> int:
        """Samples after ``position`` (what a restart would replay)."""
        row = self.db.execute(
            "SELECT SUM(MIN(count, pos - ?)) FROM ticks WHERE pos > ?", (position, position)
        ).fetchone()
        return int(row[0] or 0)

    def trim(self, position: int) -> None:
        """Drop ticks a checkpoint already includes. Should that be every row, an empty one
        stays at the newest position: positions then go on from there after a restart."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            self.db.execute("DELETE FROM ticks WHERE pos <= ?", (position,))
            if position >= self.position > 0:
                self._insert(self.position, EMPTY_BATCH)
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise

    def close(self) -> None:
        self.end.close()
        self.db.close()
