from __future__ import annotations

import os
from pathlib import Path

import pytest

from forecaster.bench.engine import bench_engine, bench_memory


@pytest.mark.slow  # a 20,000-stream run in a fresh process: a benchmark's size, not a unit's
def test_memory_bench_serves_every_stream_and_splits_out_mapped_library_pages() -> None:
    memory = bench_memory(streams=20_000)
    assert memory["streams"] == 20_000
    # 20,000 streams of hidden size 32 need at least their float32 states (2.4 MB) on top
    assert memory["rss_mb_peak"] >= memory["rss_mb_idle"] + 2.4
    # torch's libraries are mapped: part of the RSS, never all of it
    assert 10 < memory["rss_mb_file"] < memory["rss_mb_peak"]


def children() -> set[str]:
    pid = os.getpid()
    return set(Path(f"/proc/{pid}/task/{pid}/children").read_text().split())


def test_engine_bench_times_every_size_beside_spinners_it_stops() -> None:
    before = children()
    result = bench_engine(sizes=(1, 7), busy=1)
    assert result["busy"] == 1 and [row["streams"] for row in result["sizes"]] == [1, 7]
    for row in result["sizes"]:
        assert row["engine_ns_per_step"] > 0 and row["plain_rnn_ns_per_step"] > 0
    assert children() <= before  # the spinning process was killed and reaped
