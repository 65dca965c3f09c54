"""Atomic checkpoints: weights, optimizer and every stream's serving state in one safetensors file.

A checkpoint is a single ``.safetensors`` file (tensors cannot execute code when loaded, unlike a
pickle) whose header carries a JSON manifest: ``model_args`` (the architecture travels with the
weights, as in nanoGPT), the normaliser, the training recipe, the model version and the stream ids.
Writes go to a temporary file in the same folder, are fsynced, then renamed over the old file, so a
crash leaves either the old checkpoint or the new one, never half of one. Every tensor and the
manifest carry a CRC-32 checked at load, and the last few checkpoints are kept (``name.1.ext``, ...)
so a damaged one can fall back to the one before (docs/reliability.md).

The sample journal (``Journal``) is an SQLite database in WAL mode beside the checkpoint: every
accepted sample is appended (one row and one transaction per tick) before its MQTT message is
acknowledged. A checkpoint records the journal position it includes; on start the samples after it
are replayed through the engine, so a SIGKILL loses no sample and steps no state twice. Rows carry
a CRC-32, and an end marker beside the file records how far the journal went (and how far the
broker has confirmed its forecasts), so a journal that lost rows is found at start, not replayed over.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
import sqlite3
import tempfile
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import orjson
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from forecaster import __version__
from forecaster.errors import CheckpointError
from forecaster.model import Forecaster, ModelConfig
from forecaster.normalize import NormalizerConfig
from forecaster.records import Batch, Sample

FORMAT = "forecaster-checkpoint/1"
DEFAULT_CHECKPOINT = Path(__file__).resolve().parent / "models" / "default.safetensors"


@dataclass
class Checkpoint:
    """What a checkpoint file holds, loaded and checked."""

    model: Forecaster
    normalizer: NormalizerConfig
    manifest: dict[str, Any]
    optimizer: dict[str, Any] | None = None
    stream_names: list[str] = field(default_factory=list)
    stream_arrays: dict[str, np.ndarray] = field(default_factory=dict)
    extra: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def model_version(self) -> int:
        return int(self.manifest.get("model_version", 0))


def kept_path(path: Path, index: int) -> Path:
    """The ``index``-th older checkpoint kept beside ``path`` (0: ``path`` itself).

    >>> kept_path(Path("state/checkpoint.safetensors"), 2).as_posix()
    'state/checkpoint.2.safetensors'
    """
    return path if index == 0 else path.with_name(f"{path.stem}.{index}{path.suffix}")


def kept_paths(path: Path) -> list[Path]:
    """``path`` and the older checkpoints kept beside it that exist, newest first."""
    path = Path(path)
    older = []
    for other in path.parent.glob(f"{path.stem}.*{path.suffix}"):
        index = other.name[len(path.stem) + 1 : -len(path.suffix) or None]
        if index.isdigit():
            older.append((int(index), other))
    return [p for p in (path,) if p.exists()] + [p for _, p in sorted(older)]


def _rotate(path: Path, keep: int) -> None:
    """Make room for a new ``path``: ``.1`` becomes ``.2`` and so on (the oldest beyond ``keep``
    goes), and ``.1`` becomes a hard link to the current file, so ``path`` never disappears: a
    crash anywhere in here leaves a loadable newest checkpoint."""
    for index in range(keep - 1, 0, -1):
        older = kept_path(path, index)
        if not older.exists():
            continue
        if index + 1 >= keep:
            older.unlink()
        else:
            os.replace(older, kept_path(path, index + 1))
    if keep > 1 and path.exists():
        try:
            os.link(path, kept_path(path, 1))
        except OSError:  # a filesystem without hard links
            shutil.copyfile(path, kept_path(path, 1))


def write_atomic(path: Path, write: Callable[[str], None], keep: int = 1) -> None:
    """``write(temp_path)`` in the same folder, fsync, rename, fsync the folder; with ``keep`` >
    1 the ``keep - 1`` previous files stay as ``name.1.ext``, ``name.2.ext``, ..."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    umask = os.umask(0)
    os.umask(umask)
    os.fchmod(fd, 0o666 & ~umask)  # mkstemp makes 0600; a checkpoint is an ordinary file
    try:
        write(tmp)
        os.fsync(fd)
        os.close(fd)
        fd = -1
        _rotate(path, keep)
        os.replace(tmp, path)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


@dataclass
class CheckpointData:
    """A checkpoint's tensors and header, copied out of the live objects (``snapshot``), so it can
    be written from another thread while the engine and the learner go on changing theirs."""

    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]

    def write(self, path: Path | str, keep: int = 1) -> None:
        """Checksum, serialise and write atomically (``keep``: see ``write_atomic``).
        ``save_file`` releases the GIL while it works (measured: the engine thread's longest
        pause 1.7 ms beside it, 33 ms beside ``save``), and so does ``crc32`` past 5 KB."""
        metadata = {
            **self.metadata,
            "checksums": json.dumps(checksums(self.tensors, self.metadata)),
        }
        write_atomic(
            Path(path), lambda tmp: save_file(self.tensors, tmp, metadata=metadata), keep=keep
        )


def _crc(tensor: torch.Tensor) -> int:
    """CRC-32 of a tensor's bytes as stored (any dtype; a 0-d tensor too)."""
    data = tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
    return zlib.crc32(data)


def checksums(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> dict[str, Any]:
    """CRC-32 of every tensor and of the manifest: one flipped bit anywhere in them is found at
    load (safetensors itself checks only the header's offsets)."""
    return {
        "manifest": zlib.crc32(metadata.get("manifest", "").encode()),
        "tensors": {name: _crc(tensor) for name, tensor in tensors.items()},
    }


def verify(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Compare a loaded checkpoint with the checksums it was written with (none: written before
    checksums, or by another tool: taken as it is)."""
    if "checksums" not in metadata:
        return
    try:
        want = json.loads(metadata["checksums"])
    except ValueError as exc:
        raise CheckpointError(path, "checksums", f"not JSON ({exc})") from exc
    got = checksums(tensors, metadata)
    if got["manifest"] != want.get("manifest"):
        raise CheckpointError(path, "manifest", "checksum mismatch: the file is damaged")
    if set(got["tensors"]) != set(want.get("tensors", {})):
        raise CheckpointError(path, "checksums", "tensors differ from those checksummed")
    for name, crc in got["tensors"].items():
        if crc != want["tensors"][name]:
            raise CheckpointError(path, name, "checksum mismatch: the tensor data is damaged")


def _copy(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().to("cpu", copy=True).contiguous()


def snapshot(
    model: Forecaster,
    normalizer: NormalizerConfig,
    *,
    model_version: int = 0,
    recipe: dict[str, Any] | None = None,
    info: dict[str, Any] | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    stream_names: list[str] | None = None,
    stream_arrays: dict[str, np.ndarray] | None = None,
    extra: dict[str, torch.Tensor] | None = None,
) -> CheckpointData:
    """Everything needed to resume serving (and learning) exactly where it stopped, copied.

    ``stream_arrays`` are taken as they are: ``StreamTable.arrays()`` already gives copies.
    """
    tensors: dict[str, torch.Tensor] = {
        f"model.{k}": _copy(v) for k, v in model.state_dict().items()
    }
    manifest: dict[str, Any] = {
        "format": FORMAT,
        "forecaster_version": __version__,
        "model_args": model.config.to_dict(),
        "normalizer": {
            "kind": normalizer.kind,
            "halflife": normalizer.halflife,
            "clip": normalizer.clip,
            "gain_halflife": normalizer.gain_halflife,
        },
        "model_version": int(model_version),
        "recipe": recipe or {},
        "info": info or {},
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "streams": list(stream_names or []),
    }
    if optimizer is not None:
        state = optimizer.state_dict()
        manifest["optimizer"] = {
            "param_groups": copy.deepcopy(state["param_groups"]),
            "state_keys": {},
        }
        for index, entry in state["state"].items():
            keys = []
            for key, value in entry.items():
                tensors[f"optim.{index}.{key}"] = _copy(
                    value if torch.is_tensor(value) else torch.tensor(value)
                )
                keys.append(key)
            manifest["optimizer"]["state_keys"][str(index)] = keys
    for key, array in (stream_arrays or {}).items():
        tensors[f"streams.{key}"] = torch.from_numpy(np.ascontiguousarray(array))
    for key, tensor in (extra or {}).items():
        tensors[f"extra.{key}"] = _copy(tensor)
    return CheckpointData(tensors, {"format": FORMAT, "manifest": json.dumps(manifest)})


def save_checkpoint(
    path: Path | str, model: Forecaster, normalizer: NormalizerConfig, **kw: Any
) -> None:
    """``snapshot`` and write now (training, tests); the daemon writes its snapshots in the
    background."""
    snapshot(model, normalizer, **kw).write(path)


def load_checkpoint(
    path: Path | str | None = None, device: torch.device | str = "cpu"
) -> Checkpoint:
    """Load and check a checkpoint; any defect raises CheckpointError naming file and field."""
    path = Path(path) if path is not None else DEFAULT_CHECKPOINT
    if not path.is_file():
        raise CheckpointError(path, "file", "no such file")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(path, "header", f"not a readable safetensors file ({exc})") from exc
    verify(path, tensors, metadata)
    if metadata.get("format") != FORMAT:
        raise CheckpointError(
            path, "format", f"expected {FORMAT!r}, got {metadata.get('format')!r}"
        )
    try:
        manifest = json.loads(metadata["manifest"])
    except (KeyError, ValueError) as exc:
        raise CheckpointError(path, "manifest", f"missing or not JSON ({exc})") from exc
    try:
        config = ModelConfig.from_dict(dict(manifest["model_args"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(path, "model_args", str(exc)) from exc
    try:
        normalizer = NormalizerConfig(**manifest["normalizer"])
    except (KeyError, TypeError) as exc:
        raise CheckpointError(path, "normalizer", str(exc)) from exc

    model = Forecaster(config)
    expected = model.state_dict()
    weights = {}
    for name, want in expected.items():
        got = tensors.get(f"model.{name}")
        if got is None:
            raise CheckpointError(path, f"model.{name}", "missing")
        if tuple(got.shape) != tuple(want.shape):
            raise CheckpointError(
                path, f"model.{name}", f"shape {tuple(got.shape)}, expected {tuple(want.shape)}"
            )
        if not torch.isfinite(got).all():
            raise CheckpointError(path, f"model.{name}", "holds NaN or inf")
        weights[name] = got
    model.load_state_dict(weights)
    model.to(device)

    optimizer = None
    if "optimizer" in manifest:
        opt = manifest["optimizer"]
        state = {
            int(index): {key: tensors[f"optim.{index}.{key}"] for key in keys}
            for index, keys in opt["state_keys"].items()
        }
        optimizer = {"state": state, "param_groups": opt["param_groups"]}

    names = [str(n) for n in manifest.get("streams", [])]
    arrays = {
        k[len("streams.") :]: v.numpy() for k, v in tensors.items() if k.startswith("streams.")
    }
    for key, array in arrays.items():
        width = array.shape[1] if key == "state" else array.shape[0]
        if width != len(names):
            raise CheckpointError(
                path, f"streams.{key}", f"{width} streams, manifest names {len(names)}"
            )
    if names and "state" in arrays:
        want = (config.num_layers, len(names), model.state_width)
        if tuple(arrays["state"].shape) != want:
            raise CheckpointError(
                path, "streams.state", f"shape {arrays['state'].shape}, expected {want}"
            )
    extra = {k[len("extra.") :]: v for k, v in tensors.items() if k.startswith("extra.")}
    return Checkpoint(model, normalizer, manifest, optimizer, names, arrays, extra)


def read_manifest(path: Path | str) -> dict[str, Any]:
    """A checkpoint's manifest from its header alone (no tensor is read); {} if unreadable."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            return dict(json.loads((handle.metadata() or {})["manifest"]))
    except (SafetensorError, OSError, ValueError, KeyError, TypeError):
        return {}


def journal_position(checkpoint: Checkpoint) -> int:
    """The last journal row a checkpoint includes (0 for one written without a journal)."""
    return int(checkpoint.manifest.get("info", {}).get("journal_position", 0))


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
