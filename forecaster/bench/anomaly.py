"""``forecaster bench anomaly``: interval coverage and event-level detection on labelled NAB files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from forecaster.progress import progress_bar

NAB_PROBATION = 0.15  # NAB's probationary period: the start of each file is not scored
ALARM_GAP = 300  # samples below threshold that separate two alarms (one incident, one alarm)


def alarm_starts(
    score: np.ndarray, threshold: float, start: int, gap: int = ALARM_GAP
) -> list[int]:
    """Samples where an alarm begins: above ``threshold`` after at least ``gap`` samples not
    above it (a flickering incident is one alarm), at or after ``start``.

    >>> alarm_starts(np.array([0.1, 0.99, 0.1, 0.99, 0.1, 0.1, 0.1, 0.99]), 0.9, 0, gap=3)
    [1, 7]
    """
    starts, last = [], -(10**18)
    for t in np.flatnonzero(score > threshold):
        if t - last > gap and t >= start:
            starts.append(int(t))
        last = t
    return starts


def window_index(timestamps: list[str], windows: list[list[str]]) -> np.ndarray:
    """For each sample, the index of the labelled window holding it, else -1 (NAB timestamps
    compare as text: ``YYYY-MM-DD hh:mm:ss``).

    >>> window_index(["2014-01-01 00:00:00", "2014-01-02 00:00:00"],
    ...              [["2014-01-01 12:00:00.000000", "2014-01-03 00:00:00.000000"]]).tolist()
    [-1, 0]
    """
    inside = np.full(len(timestamps), -1)
    stamps = np.array([t[:19] for t in timestamps])
    for index, (begin, end) in enumerate(windows):
        inside[(stamps >= begin[:19]) & (stamps <= end[:19])] = index
    return inside


def read_nab(path: Path) -> tuple[list[str], np.ndarray]:
    import csv

    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    return [r["timestamp"] for r in rows], np.array([float(r["value"]) for r in rows])


def bench_anomaly(
    data: Path,
    out: Path | None = None,
    threshold: float | None = None,
    gap: int = ALARM_GAP,
) -> dict[str, object]:
    """Every labelled NAB file through one Engine (one stream each, stepped together): coverage
    of the interval and event-level precision/recall of ``anomaly > threshold`` after NAB's
    probationary period; with ``out``, NAB-format results files (timestamp,value,anomaly_score).

    A file whose forecasts were exact on every scored sample (NAB's ``art_flatline``: one value
    4,032 times) is listed with its coverage but left out of the coverage figures, the way
    ``bench accuracy`` skips files where naive has zero error: no interval, even of width 0, can
    miss a value forecast exactly, so its 100 % says nothing about calibration."""
    from forecaster.config import Config, scoring_config
    from forecaster.engine import Engine, Sample
    from forecaster.evaluate import parse_timestamps
    from forecaster.persist import load_checkpoint

    config = Config()
    threshold = config.anomaly.threshold if threshold is None else threshold
    labels = json.loads((Path(data) / "labels" / "combined_windows.json").read_text())
    names = sorted(labels)
    series = {name: read_nab(Path(data) / name) for name in names}
    checkpoint = load_checkpoint()
    engine = Engine(checkpoint.model, checkpoint.normalizer, scoring=scoring_config(config))
    streams = {name: f"f{i}" for i, name in enumerate(names)}  # ids may not hold "/"
    covered = {name: np.zeros(len(series[name][1]), dtype=bool) for name in names}
    anomaly = {name: np.zeros(len(series[name][1])) for name in names}
    width = {name: np.zeros(len(series[name][1])) for name in names}
    error = {name: np.zeros(len(series[name][1])) for name in names}
    length = max(len(v) for _, v in series.values())
    # each row's time, as the sender's ts (the time-of-day feature reads it)
    times = {n: parse_timestamps(series[n][0]) for n in names}
    times = {
        n: np.arange(len(series[n][1]), dtype=float) if v is None else v for n, v in times.items()
    }
    by_stream = {s: n for n, s in streams.items()}
    for t in progress_bar(range(length), desc=f"NAB, {len(names)} files", leave=False):
        batch = [
            Sample(streams[n], float(series[n][1][t]), float(times[n][t]))
            for n in names
            if t < len(series[n][1])
        ]
        for forecast in engine.tick(batch).forecasts:
            name = by_stream[forecast.stream]
            covered[name][t] = bool(forecast.covered)
            anomaly[name][t] = forecast.anomaly
            width[name][t] = forecast.upper - forecast.lower
            error[name][t] = forecast.error or 0.0
    files: dict[str, dict[str, object]] = {}
    hits = misses = windows_total = detected_total = false_total = 0
    for name in names:
        stamps, values = series[name]
        start = int(np.ceil(NAB_PROBATION * len(values)))
        inside = window_index(stamps, labels[name])
        scored_windows = sorted(set(inside[start:].tolist()) - {-1})
        detected, false_alarms = set(), 0
        for t in alarm_starts(anomaly[name], threshold, start, gap):
            if inside[t] >= 0:
                detected.add(int(inside[t]))
            else:
                false_alarms += 1
        hit = int(covered[name][start:].sum())
        exact = not np.any(error[name][start:])
        if not exact:
            hits, misses = hits + hit, misses + len(values) - start - hit
        windows_total += len(scored_windows)
        detected_total += len(detected)
        false_total += false_alarms
        files[name] = {
            "samples": len(values) - start,
            "coverage": hit / (len(values) - start),
            "coverage_scored": not exact,
            "mean_width": float(np.mean(width[name][start:])),
            "windows": len(scored_windows),
            "detected": len(detected),
            "false_alarms": false_alarms,
        }
        if out is not None:
            folder = Path(out) / "forecaster" / Path(name).parent
            folder.mkdir(parents=True, exist_ok=True)
            rows = "".join(
                f"{s},{float(v)!r},{float(a)!r}\n"
                for s, v, a in zip(stamps, values, anomaly[name], strict=True)
            )
            target = folder / f"forecaster_{Path(name).name}"
            target.write_text("timestamp,value,anomaly_score\n" + rows)
    found = detected_total + false_total
    scored = [f["coverage"] for f in files.values() if f["coverage_scored"]]
    return {
        "coverage": hits / (hits + misses) if scored else float("nan"),
        "coverage_range": [min(scored), max(scored)] if scored else None,
        "coverage_unscored": [name for name, f in files.items() if not f["coverage_scored"]],
        "precision": detected_total / found if found else float("nan"),
        "recall": detected_total / windows_total if windows_total else float("nan"),
        "threshold": threshold,
        "alarm_gap": gap,
        "target_coverage": config.intervals.coverage,
        "windows": windows_total,
        "detected": detected_total,
        "false_alarms": false_total,
        "files": files,
    }


def print_anomaly(result: dict[str, object], as_json: bool) -> None:
    if as_json:
        print(json.dumps(result))
        return
    r = result
    print(
        f"NAB: coverage of the {r['target_coverage']:.0%} interval and alarms "
        f"(anomaly > {r['threshold']}, one alarm per incident: {r['alarm_gap']} samples apart)"
    )
    for name, f in r["files"].items():  # type: ignore[union-attr]
        note = "" if f["coverage_scored"] else " (not scored: every forecast exact)"
        print(
            f"  {name:58s} coverage {f['coverage']:.3f}  windows {f['detected']}/{f['windows']}"
            f"  false alarms {f['false_alarms']}{note}"
        )
    low, high = r["coverage_range"] or (float("nan"), float("nan"))  # type: ignore[misc]
    print(
        f"  overall coverage {r['coverage']:.3f} (per file {low:.3f}-{high:.3f}); "
        f"recall {r['recall']:.3f} "
        f"({r['detected']}/{r['windows']} windows), precision {r['precision']:.3f} "
        f"({r['false_alarms']} false alarms)"
    )
