"""``forecaster bench journal``: journaling a tick beside the tick, and a checkpoint on and off
the engine thread."""

from __future__ import annotations

import json
import statistics
import threading
import time
from pathlib import Path

import numpy as np

from forecaster.progress import progress_bar
from forecaster.runtime import tune_process


def bench_journal(
    batches: tuple[int, ...] = (1, 16, 256, 4096),
    repeats: int = 50,
    checkpoint_streams: tuple[int, ...] = (1000, 100_000),
) -> dict[str, object]:
    """Cost of journaling one tick (one SQLite transaction) beside the engine tick it guards, and
    of a checkpoint on and off the engine thread."""
    import tempfile

    from forecaster.engine import Engine, Sample, as_batch
    from forecaster.journal import Journal
    from forecaster.persist import load_checkpoint

    tune_process(1)  # the daemon's setting, under which the engine tick beside it runs
    checkpoint = load_checkpoint()
    engine = Engine(checkpoint.model, checkpoint.normalizer)
    rows = []
    with tempfile.TemporaryDirectory(prefix="forecaster-bench-") as folder:
        journals = {
            sync: Journal(Path(folder) / f"{sync}.sqlite", sync) for sync in ("full", "normal")
        }
        seq = 0
        for size in progress_bar(batches, desc="journal", leave=False):
            figures: dict[str, list[float]] = {"full": [], "normal": [], "tick": []}
            for _ in range(repeats):
                seq += 1
                samples = [Sample(f"s{i}", float(np.sin(seq + i)), None, seq) for i in range(size)]
                batch = as_batch(samples)[0]
                for sync, journal in journals.items():
                    started = time.perf_counter()
                    journal.append(batch)
                    figures[sync].append(time.perf_counter() - started)
                started = time.perf_counter()
                engine.tick(samples)
                figures["tick"].append(time.perf_counter() - started)
            median = {k: 1000 * statistics.median(v) for k, v in figures.items()}
            rows.append(
                {
                    "batch": size,
                    "journal_full_ms": median["full"],
                    "journal_normal_ms": median["normal"],
                    "tick_ms": median["tick"],
                }
            )
        for journal in journals.values():
            journal.close()
        checkpoints = [
            bench_checkpoint(n, Path(folder))
            for n in progress_bar(checkpoint_streams, desc="checkpoint", leave=False)
        ]
    return {"repeats": repeats, "rows": rows, "checkpoint": checkpoints}


def bench_checkpoint(streams: int, folder: Path, repeats: int = 3) -> dict[str, float]:
    """A daemon checkpoint of ``streams`` streams: the copy on the engine thread, the write behind
    it, and the longest the engine thread waited for the GIL while the write ran (best of
    ``repeats``)."""

    from forecaster.engine import Batch, Engine
    from forecaster.persist import load_checkpoint, snapshot

    checkpoint = load_checkpoint()
    engine = Engine(checkpoint.model, checkpoint.normalizer)
    names = [f"s{i}" for i in range(streams)]
    engine.tick_batch(Batch.of(names, np.sin(np.arange(streams))))
    copy_s, write_s, pause_s = [], [], []
    for _ in range(repeats):
        started = time.perf_counter()
        table = engine.streams
        data = snapshot(
            engine.model,
            engine.normalizer_config,
            stream_names=list(table.names),
            stream_arrays=table.arrays(),
        )
        copy_s.append(time.perf_counter() - started)
        writer = threading.Thread(target=data.write, args=(folder / "checkpoint.safetensors",))
        started = last = time.perf_counter()
        writer.start()
        longest = 0.0
        while writer.is_alive():  # the engine thread's view: ~1 ms of work between looks
            time.sleep(0.001)
            now = time.perf_counter()
            longest, last = max(longest, now - last), now
        writer.join()
        write_s.append(time.perf_counter() - started)
        pause_s.append(longest)
    return {
        "streams": streams,
        "copy_ms": 1000 * min(copy_s),
        "write_ms": 1000 * min(write_s),
        "longest_pause_ms": 1000 * min(pause_s),
        "mb": (folder / "checkpoint.safetensors").stat().st_size / 1e6,
    }


def print_journal(result: dict[str, object], as_json: bool) -> None:
    if as_json:
        print(json.dumps(result))
        return
    print("journal: median ms per tick (one transaction), beside the engine tick it guards")
    print(f"  {'batch':>6} {'sync=full':>10} {'sync=normal':>12} {'engine tick':>12}")
    for row in result["rows"]:  # type: ignore[union-attr]
        print(
            f"  {row['batch']:>6} {row['journal_full_ms']:>10.3f} {row['journal_normal_ms']:>12.3f}"
            f" {row['tick_ms']:>12.3f}"
        )
    print("checkpoint: copy on the engine thread, write (and fsync) on a background thread")
    print(
        f"  {'streams':>8} {'MB':>6} {'copy ms':>8} {'write ms':>9} {'longest engine pause ms':>24}"
    )
    for row in result["checkpoint"]:  # type: ignore[union-attr]
        print(
            f"  {row['streams']:>8} {row['mb']:>6.1f} {row['copy_ms']:>8.1f} {row['write_ms']:>9.1f}"
            f" {row['longest_pause_ms']:>24.1f}"
        )
