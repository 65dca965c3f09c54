"""The PNGs of ``evaluate --plot`` and ``plot``: aligned, thinned on long runs, honest about
which streams they show."""

from __future__ import annotations

from pathlib import Path

import matplotlib
import numpy as np
import pytest

from forecaster.errors import ForecasterError
from forecaster.evaluate import SeriesRun
from forecaster.plots import (
    OVERVIEW_POINTS,
    ZOOM,
    draw_series,
    plot_forecasts,
    plot_run,
    series_from_records,
    series_from_run,
)

matplotlib.use("Agg")
PNG = b"\x89PNG"


def records(stream: str, seqs: list[int]) -> list[dict]:
    """Forecast messages as the daemon publishes them: value at seq, prediction for seq + 1."""
    out = []
    for seq in seqs:
        value = float(np.sin(seq / 5))
        out.append(
            {
                "stream": stream,
                "seq": seq,
                "value": value,
                "prediction": value + 0.01,
                "error": 0.02 if seq > seqs[0] else None,
            }
        )
    return out


def test_records_align_each_forecast_with_the_sample_it_is_for() -> None:
    s = series_from_records("a", records("a", [1, 2, 3, 5, 6]))
    assert s.x.tolist() == [1, 2, 3, 5, 6]
    assert np.isnan(s.forecast[0]) and np.isnan(s.forecast[3])  # none made for 1, nor for 5
    assert s.forecast[1] == pytest.approx(np.sin(1 / 5) + 0.01)
    assert np.isnan(s.naive_error[3])  # seq 4 missing: no last value to repeat
    assert s.naive_error[4] == pytest.approx(abs(np.sin(6 / 5) - np.sin(5 / 5)))


def test_a_long_run_is_thinned_and_zoomed() -> None:
    import matplotlib.pyplot as plt

    values = np.sin(np.arange(10_000) / 7)
    run = SeriesRun(values, np.roll(values, -1))
    fig, axes = plt.subplots(3, 1)
    draw_series(list(axes), series_from_run(run, "long"))
    overview, zoom, error = axes
    assert all(len(line.get_xdata()) <= OVERVIEW_POINTS for line in overview.lines)
    assert all(len(line.get_xdata()) == ZOOM for line in zoom.lines)
    assert overview.get_legend() is not None and zoom.get_legend() is not None
    assert "model 0, naive" in error.get_title()  # a perfect forecast after warm-up
    plt.close(fig)


def test_evaluate_plot_writes_a_png(tmp_path: Path) -> None:
    values = np.sin(np.arange(3000) / 9)
    plot_run(SeriesRun(values, np.roll(values, -1)), tmp_path / "run.png", "sine")
    assert (tmp_path / "run.png").read_bytes()[:4] == PNG


def test_plot_says_which_streams_it_kept(tmp_path: Path) -> None:
    recorded = [r for name in "fedcba" for r in records(name, list(range(1, 200)))]
    drawn, note = plot_forecasts(recorded, None, tmp_path / "all.png")
    assert drawn == ["a", "b", "c", "d"]
    assert note.startswith("4 of 6 streams") and "--streams" in note
    drawn, note = plot_forecasts(recorded, ["f"], tmp_path / "f.png")
    assert drawn == ["f"] and note == "1 of 6 streams, as asked"
    assert (tmp_path / "f.png").read_bytes()[:4] == PNG
    with pytest.raises(ForecasterError, match="no forecasts for \\['x'\\]"):
        plot_forecasts(recorded, ["x"], tmp_path / "x.png")
