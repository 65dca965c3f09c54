"""The PNGs of ``forecaster evaluate --plot`` and ``forecaster plot``: readable at any run length.

A run of 10,000 samples drawn sample by sample is a solid block, and a per-sample error on a log
scale is noise. So each series gets three panels: the whole run (a min–max band per bucket once it
is longer than the figure has pixels for), the last samples up close (actual against forecast, where
a lag or an overshoot is visible), and the mean absolute error over a rolling window for the model
and for the naive last value (the model wins where its line is below naive's). Legends sit beside
the axes, never on the data.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from forecaster.errors import ForecasterError
from forecaster.evaluate import SeriesRun

ZOOM = 300  # samples in the close-up panel
OVERVIEW_POINTS = 1500  # above this many samples the overview draws per-bucket min–max bands


@dataclass
class Series:
    """One stream, aligned at the sample times ``x``: ``forecast[i]`` is the forecast made for
    ``x[i]`` (NaN when none was), ``model_error``/``naive_error`` the absolute errors there."""

    name: str
    x: np.ndarray
    actual: np.ndarray
    forecast: np.ndarray
    model_error: np.ndarray
    naive_error: np.ndarray
    scored_from: float | None = None  # x where scoring starts (the warm-up before it)
    x_label: str = "sample"


def series_from_run(run: SeriesRun, name: str, warmup: float = 0.1) -> Series:
    """``run.predictions[t]`` forecasts ``values[t + 1]``: shift it onto the time it is for."""
    n = len(run.values)
    forecast = np.concatenate([[np.nan], run.predictions[:-1]])
    naive = np.concatenate([[np.nan], run.values[:-1]])
    return Series(
        name,
        np.arange(n),
        run.values,
        forecast,
        np.abs(run.values - forecast),
        np.abs(run.values - naive),
        float(math.ceil(warmup * n)),
    )


def series_from_records(name: str, records: list[dict]) -> Series:
    """Forecast messages of one stream: message ``seq`` carries the value at ``seq`` and the
    forecast for ``seq + 1``. Naive's error needs the previous ``seq``; a gap leaves NaN."""
    items = sorted(records, key=lambda r: r["seq"])
    seq = np.array([r["seq"] for r in items], dtype=np.int64)
    value = np.array([r["value"] for r in items], dtype=float)
    made_for = {int(s) + 1: float(r["prediction"]) for s, r in zip(seq, items, strict=True)}
    forecast = np.array([made_for.get(int(s), np.nan) for s in seq])
    naive = np.full(len(seq), np.nan)
    follows = np.diff(seq) == 1
    naive[1:][follows] = np.abs(np.diff(value))[follows]
    error = np.array([abs(r["error"]) if r.get("error") is not None else np.nan for r in items])
    return Series(name, seq, value, forecast, error, naive, x_label="seq")


def rolling_mean(values: np.ndarray, window: int) -> np.ndarray:
    """Mean of the non-NaN values among the last ``window`` (NaN while there are none).

    >>> rolling_mean(np.array([1.0, np.nan, 3.0, 5.0]), 2).tolist()
    [1.0, 1.0, 3.0, 4.0]
    """
    ok = ~np.isnan(values)
    total = np.concatenate([[0.0], np.cumsum(np.where(ok, values, 0.0))])
    count = np.concatenate([[0], np.cumsum(ok)])
    lo = np.maximum(np.arange(1, len(values) + 1) - window, 0)
    hi = np.arange(1, len(values) + 1)
    n = count[hi] - count[lo]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, (total[hi] - total[lo]) / np.maximum(n, 1), np.nan)


def error_window(n: int) -> int:
    """Rolling window for the error panel: about 1/50 of the run, between 20 and 500 samples."""
    return int(min(500, max(20, n // 50)))


def buckets(x: np.ndarray, y: np.ndarray, points: int) -> tuple[np.ndarray, ...]:
    """(x, min, mean, max) of ``y`` over ``points`` equal buckets (NaNs ignored)."""
    edges = np.linspace(0, len(y), points + 1).astype(int)
    parts = [(lo, hi) for lo, hi in itertools.pairwise(edges) if hi > lo]
    cut = [y[lo:hi] for lo, hi in parts]
    with np.errstate(all="ignore"):
        mid = np.array([x[(lo + hi - 1) // 2] for lo, hi in parts])
        low = np.array([np.nanmin(c) if np.isfinite(c).any() else np.nan for c in cut])
        mean = np.array([np.nanmean(c) if np.isfinite(c).any() else np.nan for c in cut])
        high = np.array([np.nanmax(c) if np.isfinite(c).any() else np.nan for c in cut])
    return mid, low, mean, high


def draw_series(axes: list, s: Series, zoom: int = ZOOM, legends: bool = True) -> list:
    """Overview, close-up and rolling error of one series on three axes; returns the handles
    (for a figure legend when the caller draws several series)."""
    ax_all, ax_zoom, ax_err = axes
    n = len(s.x)
    start = max(0, n - zoom)
    handles = []
    if n > OVERVIEW_POINTS:
        mid, low, mean, high = buckets(s.x, s.actual, OVERVIEW_POINTS // 2)
        ax_all.fill_between(mid, low, high, color="C0", alpha=0.3, lw=0, label="actual (min–max)")
        ax_all.plot(mid, mean, lw=0.8, color="C0", label="actual (bucket mean)")
    else:
        ax_all.plot(s.x, s.actual, lw=1.0, color="C0", label="actual")
    if start > 0:
        ax_all.axvspan(s.x[start], s.x[-1], color="C2", alpha=0.12, label=f"last {zoom}: close-up")
    if s.scored_from:
        ax_all.axvspan(
            s.x[0], s.scored_from, color="grey", alpha=0.15, label="warm-up (not scored)"
        )
    ax_all.set(title=f"{s.name}: all {n:,} samples", xlabel=s.x_label, ylabel="value")

    ax_zoom.plot(s.x[start:], s.actual[start:], lw=1.2, color="C0", label="actual")
    ax_zoom.plot(
        s.x[start:], s.forecast[start:], "--", lw=1.0, color="C1", label="forecast (made 1 earlier)"
    )
    ax_zoom.set(title=f"last {n - start} samples", xlabel=s.x_label, ylabel="value")

    window = error_window(n)
    model = rolling_mean(s.model_error, window)
    naive = rolling_mean(s.naive_error, window)
    scored = s.x >= (s.scored_from or s.x[0])
    overall = {
        name: float(np.nanmean(e[scored])) if np.isfinite(e[scored]).any() else math.nan
        for name, e in (("model", s.model_error), ("naive", s.naive_error))
    }
    # The model under naive: drawn first and wider, so naive's line stays visible on top of it
    # where the two are equal.
    ax_err.plot(s.x, model, lw=2.0, color="C3", label="model's error")
    ax_err.plot(s.x, naive, lw=0.9, color="black", alpha=0.7, label="naive's error (last value)")
    if s.scored_from:
        ax_err.axvspan(s.x[0], s.scored_from, color="grey", alpha=0.15)
    ax_err.set(
        title=f"MAE over the last {window} samples (lower is better)\n"
        f"all samples{' after the warm-up' if s.scored_from else ''}: "
        f"model {overall['model']:.4g}, naive {overall['naive']:.4g}",
        xlabel=s.x_label,
        ylabel="MAE",
        ylim=(0, None),
    )
    for ax in axes:
        ax.grid(alpha=0.3)
        found, _ = ax.get_legend_handles_labels()
        handles.extend(found)
        if legends:
            ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
    return handles


def plot_run(run: SeriesRun, path: Path, title: str, warmup: float = 0.1) -> None:
    """``forecaster evaluate --plot``: the three panels of one replayed series."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 1, figsize=(12, 9.5), layout="constrained")
    draw_series(list(axes), series_from_run(run, title, warmup))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def choose_streams(
    by_stream: dict[str, list[dict]], wanted: list[str] | None, limit: int = 4
) -> tuple[list[str], str]:
    """The streams to draw and a line saying which were kept (``plot`` never drops silently)."""
    have = sorted(by_stream)
    if wanted:
        missing = [s for s in wanted if s not in by_stream]
        if missing:
            raise ForecasterError(f"no forecasts for {missing}; have {have[:10]}")
        return wanted, f"{len(wanted)} of {len(have)} streams, as asked"
    if not have:
        raise ForecasterError("no forecasts recorded (is the daemon publishing to that topic?)")
    kept = have[:limit]
    note = f"{len(kept)} of {len(have)} streams"
    if len(have) > limit:
        note += f" (the first {limit} by name; choose others with --streams a,b,...)"
    return kept, note


def plot_forecasts(
    records: list[dict], streams: list[str] | None, path: Path
) -> tuple[list[str], str]:
    """``forecaster plot``: one row of three panels per stream. Returns the streams drawn and a
    line saying which of all recorded streams they are."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_stream: dict[str, list[dict]] = {}
    for record in records:
        by_stream.setdefault(str(record.get("stream")), []).append(record)
    chosen, note = choose_streams(by_stream, streams)
    fig, axes = plt.subplots(
        len(chosen), 3, figsize=(18, 3.4 * len(chosen) + 0.8), squeeze=False, layout="constrained"
    )
    handles: dict[str, object] = {}
    for row, stream in enumerate(chosen):
        found = draw_series(
            list(axes[row]), series_from_records(stream, by_stream[stream]), legends=False
        )
        handles.update({h.get_label(): h for h in found})
    fig.legend(list(handles.values()), list(handles), loc="outside upper center", ncol=len(handles))
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return chosen, note
