from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from forecaster.engine import Engine
from forecaster.errors import CheckpointError
from forecaster.journal import Journal
from forecaster.model import Forecaster, ModelConfig
from forecaster.normalize import NormalizerConfig
from forecaster.persist import (
    DEFAULT_CHECKPOINT,
    FORMAT,
    kept_paths,
    load_checkpoint,
    save_checkpoint,
    snapshot,
    source_id,
)
from forecaster.records import Sample, as_batch


def _predictions(model: Forecaster, norm: NormalizerConfig, values: np.ndarray) -> list[float]:
    engine = Engine(model, norm)
    return [engine.tick([Sample("s", float(v))]).forecasts[0].prediction for v in values]


def test_round_trip_gives_identical_predictions(any_cell_model: Forecaster, tmp_path: Path) -> None:
    norm = NormalizerConfig(halflife=50.0)
    path = tmp_path / "m.safetensors"
    save_checkpoint(path, any_cell_model, norm, model_version=7, recipe={"name": "test"})
    loaded = load_checkpoint(path)
    assert loaded.model_version == 7
    assert loaded.manifest["model_args"] == any_cell_model.config.to_dict()
    assert loaded.normalizer == norm
    values = np.sin(np.arange(100) / 3) * 40 + 7
    assert _predictions(loaded.model, loaded.normalizer, values) == _predictions(
        any_cell_model, norm, values
    )


def test_shipped_model_loads() -> None:
    checkpoint = load_checkpoint(DEFAULT_CHECKPOINT)
    assert checkpoint.manifest["model_args"] == {"cell": "rnn", "hidden_size": 32, "num_layers": 1}
    assert checkpoint.manifest["recipe"]["name"] == "default"
    assert DEFAULT_CHECKPOINT.stat().st_size < 64 * 1024


def test_missing_file_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"nope\.safetensors.*'file'"):
        load_checkpoint(tmp_path / "nope.safetensors")


@pytest.mark.parametrize("damage", ["truncate", "garbage", "flip_header"])
def test_corrupt_file_is_a_checkpoint_error(
    tiny_model: Forecaster, tmp_path: Path, damage: str
) -> None:
    path = tmp_path / "m.safetensors"
    save_checkpoint(path, tiny_model, NormalizerConfig())
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        path.write_bytes(b"\x00" * 100)
    else:
        path.write_bytes(data[:8] + b"{" * 20 + data[28:])
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    assert str(path) in str(info.value)
    assert info.value.field == "header"


def test_wrong_shapes_name_the_field(tiny_model: Forecaster, tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    save_checkpoint(path, tiny_model, NormalizerConfig())
    loaded = load_checkpoint(path)
    # Same manifest, but weights of a wider model.
    wide = Forecaster(ModelConfig("rnn", 16, 1))
    tensors = {f"model.{k}": v.contiguous() for k, v in wide.state_dict().items()}
    metadata = {"format": FORMAT, "manifest": json.dumps(loaded.manifest)}
    save_file(tensors, str(path), metadata=metadata)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    assert info.value.field.startswith("model.rnn.weight") or info.value.field.startswith("model.")
    assert "shape" in str(info.value) and str(path) in str(info.value)


def test_bad_manifest_names_the_field(tiny_model: Forecaster, tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    tensors = {f"model.{k}": v.contiguous() for k, v in tiny_model.state_dict().items()}
    manifest = {"model_args": {"cell": "rnn", "hidden_size": 8, "num_layers": 1, "dropout": 1}}
    save_file(tensors, str(path), metadata={"format": FORMAT, "manifest": json.dumps(manifest)})
    with pytest.raises(CheckpointError, match="model_args"):
        load_checkpoint(path)


def test_non_finite_weights_are_refused(tiny_model: Forecaster, tmp_path: Path) -> None:
    with torch.no_grad():
        tiny_model.fc.bias.fill_(float("nan"))
    path = tmp_path / "m.safetensors"
    save_checkpoint(path, tiny_model, NormalizerConfig())
    with pytest.raises(CheckpointError, match=r"model\.fc\.bias"):
        load_checkpoint(path)


def test_write_is_atomic_and_leaves_no_temp_files(tiny_model: Forecaster, tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    for version in range(3):
        save_checkpoint(path, tiny_model, NormalizerConfig(), model_version=version)
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]
    assert load_checkpoint(path).model_version == 2


def test_journal_survives_reopen_and_positions_only_grow(tmp_path: Path) -> None:
    path = tmp_path / "journal.sqlite"
    journal = Journal(path)
    assert journal.append(as_batch([Sample("a", 1.0, None, 1), Sample("a", 2.0, 5.0, 2)])[0]) == 2
    journal.close()  # no checkpoint, as after a SIGKILL: the rows are all there
    journal = Journal(path)
    assert [(p, s.seq) for p, s in journal.after(0)] == [(1, 1), (2, 2)]
    journal.trim(2)
    assert journal.pending(0) == 0
    journal.close()
    journal = Journal(path, sync="normal")
    assert (
        journal.append(as_batch([Sample("b", 3.0, None, 1)])[0]) == 3
    )  # never reuses a trimmed position
    journal.close()


def test_journal_lost_file_never_reuses_a_checkpointed_position(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "fresh.sqlite")
    journal.start_at(1000)  # the checkpoint says 1000 rows are in it
    assert journal.append(as_batch([Sample("a", 1.0, None, 1)])[0]) == 1001
    assert [p for p, _ in journal.after(1000)] == [1001]
    journal.close()


def test_journal_of_the_sample_row_format_is_converted_with_its_positions(tmp_path: Path) -> None:
    path = tmp_path / "journal.sqlite"
    db = sqlite3.connect(path)  # the format before tick rows: one row per sample, AUTOINCREMENT
    db.execute(
        "CREATE TABLE samples (pos INTEGER PRIMARY KEY AUTOINCREMENT,"
        " stream TEXT NOT NULL, value REAL NOT NULL, ts REAL, seq INTEGER NOT NULL)"
    )
    rows = [("a", 1.0, None, 1), ("b", 2.0, 7.0, 1), ("a", 3.0, None, 2), ("b", 4.0, 8.0, 2)]
    db.executemany("INSERT INTO samples(stream, value, ts, seq) VALUES (?, ?, ?, ?)", rows)
    db.execute("DELETE FROM samples WHERE pos <= 1")  # trimmed by a checkpoint at position 1
    db.commit()
    db.close()
    journal = Journal(path)
    assert journal.position == 4
    assert [(p, s) for p, s in journal.after(1)] == [
        (2, Sample("b", 2.0, 7.0, 1)),
        (3, Sample("a", 3.0, None, 2)),
        (4, Sample("b", 4.0, 8.0, 2)),
    ]
    assert [p for p, _ in journal.after(3)] == [4]  # a position inside a converted run
    assert journal.pending(2) == 2
    journal.trim(4)  # every row: the position stays
    journal.close()
    journal = Journal(path)
    assert journal.pending(0) == 0 and journal.position == 4
    assert journal.append(as_batch([Sample("c", 5.0, None, 1)])[0]) == 5
    journal.close()


def test_journal_tick_rows_replay_from_a_position_inside_a_tick(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "journal.sqlite")
    samples = [Sample(f"s{i}", float(i), None if i % 2 else 1.5 * i, i + 1) for i in range(5)]
    assert journal.append(as_batch(samples)[0]) == 5
    assert journal.append(as_batch([Sample("s9", 9.0, None, 1)])[0]) == 6
    assert [s for _, s in journal.after(0)] == [*samples, Sample("s9", 9.0, None, 1)]
    ticks = list(journal.ticks_after(3))
    assert [(t.last, t.batch.streams) for t in ticks] == [(5, ["s3", "s4"]), (6, ["s9"])]
    assert journal.pending(3) == 3
    journal.trim(5)
    assert [p for p, _ in journal.after(0)] == [6]
    journal.close()


def test_journal_keeps_a_ticks_output_messages_and_cuts_them_with_its_rows(
    tmp_path: Path,
) -> None:
    path = tmp_path / "journal.sqlite"
    db = sqlite3.connect(path)  # a journal from before output messages were kept
    db.execute(
        "CREATE TABLE ticks (pos INTEGER PRIMARY KEY, count INTEGER NOT NULL,"
        " streams BLOB NOT NULL, columns BLOB NOT NULL)"
    )
    db.commit()
    db.close()
    journal = Journal(path)
    samples = [Sample(s, float(i), None, i + 1) for i, s in enumerate("abcde")]
    journal.append(as_batch(samples[:2])[0])  # one message per forecast
    runs = [(2, "dev"), (1, None), (2, "list")]
    journal.append(as_batch(samples)[0], runs)
    assert [t.messages for t in journal.ticks_after(0)] == [None, runs]
    # a checkpoint inside the tick: the rows it includes leave their messages too
    assert [t.messages for t in journal.ticks_after(3)] == [[(1, "dev"), (1, None), (2, "list")]]
    assert [t.messages for t in journal.ticks_after(4)] == [[(1, None), (2, "list")]]
    journal.db.execute("UPDATE ticks SET messages = ? WHERE pos = 7", (b'[[9, "dev"]]',))
    with pytest.raises(CheckpointError, match="journal row 7"):  # not the tick's row count
        list(journal.ticks_after(0))
    journal.close()


def test_journal_corrupt_tick_row_is_refused_with_its_position(tmp_path: Path) -> None:
    path = tmp_path / "journal.sqlite"
    journal = Journal(path)
    journal.append(as_batch([Sample("a", 1.0, None, 1), Sample("b", 2.0, None, 1)])[0])
    journal.db.execute("UPDATE ticks SET columns = ? WHERE pos = 2", (b"\x00" * 40,))
    with pytest.raises(CheckpointError, match="journal row 2"):
        list(journal.after(0))
    journal.close()


def flip_bit(path: Path, tensor: str, byte: int = 3, bit: int = 7) -> None:
    """Flip one bit inside ``tensor``'s data in a safetensors file (default: the sign bit of its
    first float32), as a disk or a copy would damage it."""
    data = bytearray(path.read_bytes())
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + size])
    start = 8 + size + header[tensor]["data_offsets"][0]
    data[start + byte] ^= 1 << bit
    path.write_bytes(bytes(data))


def _with_streams(model: Forecaster) -> dict:
    width = model.state_width
    return {
        "stream_names": ["a", "b"],
        "stream_arrays": {
            "state": np.full((model.config.num_layers, 2, width), 0.5, dtype=np.float32),
            "seq": np.array([100, 7], dtype=np.int64),
        },
    }


@pytest.mark.parametrize(
    ("tensor", "byte"), [("streams.state", 3), ("streams.seq", 1), ("model.rnn.weight_hh_l0", 0)]
)
def test_one_flipped_bit_in_tensor_data_is_found_at_load(
    tiny_model: Forecaster, tmp_path: Path, tensor: str, byte: int
) -> None:
    """The sign of one hidden-state value, a bit of a ``seq`` (100 -> 356), a weight: each loaded
    silently before checksums."""
    path = tmp_path / "checkpoint.safetensors"
    save_checkpoint(path, tiny_model, NormalizerConfig(), **_with_streams(tiny_model))
    load_checkpoint(path)
    flip_bit(path, tensor, byte, 0 if tensor == "streams.seq" else 7)
    with pytest.raises(CheckpointError, match="checksum mismatch") as caught:
        load_checkpoint(path)
    assert caught.value.field == tensor


def test_a_flipped_bit_in_the_manifest_is_found(tiny_model: Forecaster, tmp_path: Path) -> None:
    path = tmp_path / "checkpoint.safetensors"
    save_checkpoint(path, tiny_model, NormalizerConfig(), **_with_streams(tiny_model))
    data = path.read_bytes()
    at = data.index(b'\\"a\\"')  # stream id "a" inside the manifest (JSON in JSON)
    path.write_bytes(data[: at + 2] + b"c" + data[at + 3 :])  # "a" -> "c": still valid JSON
    with pytest.raises(CheckpointError, match="manifest"):
        load_checkpoint(path)


def test_the_last_n_checkpoints_are_kept_newest_first(
    tiny_model: Forecaster, tmp_path: Path
) -> None:
    path = tmp_path / "checkpoint.safetensors"
    for version in range(5):
        snapshot(tiny_model, NormalizerConfig(), model_version=version).write(path, keep=3)
    kept = kept_paths(path)
    assert [p.name for p in kept] == [
        "checkpoint.safetensors",
        "checkpoint.1.safetensors",
        "checkpoint.2.safetensors",
    ]
    assert [load_checkpoint(p).model_version for p in kept] == [4, 3, 2]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in kept)


def test_journal_row_checksum_names_the_damaged_positions(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "journal.sqlite")
    journal.append(as_batch([Sample("a", 1.0, None, 1), Sample("b", 2.0, None, 1)])[0])
    journal.append(as_batch([Sample("a", 3.0, None, 2)])[0])
    row = journal.db.execute("SELECT columns FROM ticks WHERE pos = 2").fetchone()[0]
    damaged = bytearray(row)
    damaged[7] ^= 0x80  # the sign of the first value: still a well-formed row
    journal.db.execute("UPDATE ticks SET columns = ? WHERE pos = 2", (bytes(damaged),))
    with pytest.raises(CheckpointError, match="positions 1-2 damaged"):
        list(journal.ticks_after(0))
    skipped: list[tuple[int, int]] = []
    ticks = list(journal.ticks_after(0, lambda first, last: skipped.append((first, last))))
    assert skipped == [(1, 2)] and [t.last for t in ticks] == [3]
    journal.close()


def _journal_to(path: Path, rows: int) -> None:
    journal = Journal(path)
    for i in range(rows):
        journal.append(as_batch([Sample("a", float(i), None, i + 1)])[0])
    journal.close()


def gaps_of(path: Path, position: int) -> list[tuple[int, int | None]]:
    journal = Journal(path)
    try:
        return journal.gaps(position)
    finally:
        journal.close()


def test_journal_gaps_truncated_file_names_the_missing_positions(tmp_path: Path) -> None:
    path = tmp_path / "journal.sqlite"
    _journal_to(path, 30)  # positions 1-30; a checkpoint includes 1-20
    assert gaps_of(path, 20) == []
    path.write_bytes(b"")  # truncated to 0 bytes
    assert gaps_of(path, 20) == [(21, 30)]


def test_journal_gaps_lost_wal_names_the_missing_positions(tmp_path: Path) -> None:
    path = tmp_path / "journal.sqlite"
    _journal_to(path, 20)  # closed: checkpointed into the main file
    journal = Journal(path)
    for i in range(20, 26):
        journal.append(as_batch([Sample("a", float(i), None, i + 1)])[0])
    saved = path.read_bytes()  # the main file alone: rows 21-26 are only in the WAL
    journal.close()
    path.write_bytes(saved)
    for suffix in ("-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    assert gaps_of(path, 20) == [(21, 26)]
    assert gaps_of(path, 10) == [(21, 26)]  # an older checkpoint: the same rows missing


def test_journal_gaps_hole_and_unknown_tail(tmp_path: Path) -> None:
    path = tmp_path / "journal.sqlite"
    _journal_to(path, 10)
    journal = Journal(path)
    journal.db.execute("DELETE FROM ticks WHERE pos IN (4, 5)")
    assert journal.gaps(2) == [(4, 5)]
    journal.close()
    Path(f"{path}-end").unlink()  # no end marker (a journal from before it): tail unknown
    path.write_bytes(b"")
    assert gaps_of(path, 8) == [(9, None)]


def test_a_checkpoint_of_no_streams_writes_and_loads(tmp_path: Path) -> None:
    """A daemon stopped before any sample came checkpoints an empty table (its CRCs included)."""
    checkpoint = load_checkpoint()
    engine = Engine(checkpoint.model, checkpoint.normalizer)
    path = tmp_path / "empty.safetensors"
    save_checkpoint(
        path,
        engine.model,
        engine.normalizer_config,
        stream_names=[],
        stream_arrays=engine.streams.arrays(),
    )
    loaded = load_checkpoint(path)
    assert loaded.stream_names == []
    assert loaded.stream_arrays["seq"].shape == (0,)


def test_a_missing_model_file_is_a_checkpoint_error_naming_it(tmp_path: Path) -> None:
    """Its identity is read at every start (a saved state too): a clear error, not a traceback."""
    with pytest.raises(CheckpointError, match=r"missing\.safetensors"):
        source_id(tmp_path / "missing.safetensors")
