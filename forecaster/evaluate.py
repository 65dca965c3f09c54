"""Offline evaluation: replay a series through the same Engine the daemon serves with.

Progressive validation: each value is first used to score the forecast made before it arrived,
then fed to the model. The first ``warmup`` share of the series is not scored (the normaliser and
hidden state are still settling), for the model and the naive baseline alike. ``progressive``
scores the ``peers`` (baselines) the same way; ``EngineModel`` is the daemon's own path among them.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import json
import math
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from forecaster import ewm
from forecaster.progress import progress_bar

if TYPE_CHECKING:
    from tqdm import tqdm

from forecaster.combine import CombinerConfig
from forecaster.config import OnlineLearningConfig
from forecaster.engine import Engine
from forecaster.errors import ForecasterError
from forecaster.learner import Learner
from forecaster.model import Forecaster
from forecaster.normalize import NormalizerConfig
from forecaster.records import Sample


@dataclass
class SeriesRun:
    """``predictions[t]`` is the forecast of ``values[t + 1]`` made after seeing ``values[t]``."""

    values: np.ndarray
    predictions: np.ndarray
    versions: np.ndarray | None = None  # model_version of each forecast
    learner: Learner | None = None


@dataclass(frozen=True)
class Scores:
    mse: float
    mae: float
    naive_mse: float
    naive_mae: float
    skill: float  # 1 - mse / naive_mse
    samples: int

    def as_dict(self) -> dict[str, float | int]:
        return {
            "mse": self.mse,
            "mae": self.mae,
            "naive_mse": self.naive_mse,
            "naive_mae": self.naive_mae,
            "skill": self.skill,
            "samples": self.samples,
        }


def run_series(
    values: np.ndarray,
    model: Forecaster,
    normalizer: NormalizerConfig,
    *,
    device: str = "cpu",
    progress: bool = True,
    stream: str = "series",
    learn: OnlineLearningConfig | None = None,
    combine: CombinerConfig | None = None,
    timestamps: np.ndarray | None = None,
) -> SeriesRun:
    """Feed ``values`` one sample per tick through a fresh Engine (and, with ``learn``, the same
    Learner the daemon runs, driven synchronously: deterministic for its seed)."""
    peer = EngineModel(model, normalizer, learn, stream, device=device, combine=combine)
    peer.timestamps = timestamps
    predictions = np.empty(len(values))
    versions = np.zeros(len(values), dtype=np.int64)
    for t, value in enumerate(
        progress_bar(values, desc="evaluate", disable=not progress, leave=False)
    ):
        peer.learn_one(float(value))
        predictions[t] = peer.forecast()
        versions[t] = peer.version
    return SeriesRun(np.asarray(values, dtype=np.float64), predictions, versions, peer.learner)


def rolling_mse(run: SeriesRun, halflife: float = 100.0) -> np.ndarray:
    """EWMA of the squared error; element ``t`` scores the forecast of ``values[t]`` (t >= 1)."""
    error = run.values[1:] - run.predictions[:-1]
    alpha = ewm.alpha(halflife)
    out = np.empty(len(error))
    level = error[0] ** 2
    for t, e in enumerate(error):
        level += alpha * (e * e - level)
        out[t] = level
    return np.concatenate([[np.nan], out])


def score(run: SeriesRun, warmup: float = 0.1) -> Scores:
    """Score forecasts of values ``[start, n)``, ``start = max(1, warmup * n)``."""
    n = len(run.values)
    start = max(1, math.ceil(warmup * n))
    actual = run.values[start:]
    error = actual - run.predictions[start - 1 : n - 1]
    naive = actual - run.values[start - 1 : n - 1]
    mse, naive_mse = float(np.mean(error**2)), float(np.mean(naive**2))
    return Scores(
        mse=mse,
        mae=float(np.mean(np.abs(error))),
        naive_mse=naive_mse,
        naive_mae=float(np.mean(np.abs(naive))),
        skill=1.0 - mse / naive_mse if naive_mse > 0 else float("nan"),
        samples=len(actual),
    )


def parse_timestamps(stamps: list[str]) -> np.ndarray | None:
    """Unix seconds of ISO 8601 times (without a zone: UTC) or of plain numbers; None when any
    cannot be read (the series is then timed by its row numbers).

    >>> parse_timestamps(["2014-04-01 00:05:00", "2014-04-01 00:10:00"]).tolist()
    [1396310700.0, 1396311000.0]
    >>> parse_timestamps(["noon"]) is None
    True
    """
    out = np.empty(len(stamps))
    for i, text in enumerate(stamps):
        try:
            out[i] = float(text)
            continue
        except ValueError:
            pass
        try:
            when = datetime.fromisoformat(text)
        except ValueError:
            return None
        out[i] = (when if when.tzinfo else when.replace(tzinfo=timezone.utc)).timestamp()
    return out


def read_timestamps(path: Path, column: str = "timestamp") -> np.ndarray | None:
    """``parse_timestamps`` of a CSV's ``column``; None when it has none."""
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        if reader.fieldnames is None or column not in reader.fieldnames:
            return None
        return parse_timestamps([row[column] for row in reader])


def read_csv(path: Path, column: str = "value") -> np.ndarray:
    """Values of ``column`` from a CSV with a header (NAB format: ``timestamp,value``)."""
    try:
        handle = open(path, newline="")  # noqa: SIM115 (closed by the with below)
    except OSError as exc:
        raise ForecasterError(f"{path}: cannot read: {exc.strerror}") from exc
    with handle:
        reader = csv.DictReader(handle)
        if reader.fieldnames is None or column not in reader.fieldnames:
            raise ForecasterError(f"{path}: no column {column!r} (have {reader.fieldnames})")
        values = []
        for line, row in enumerate(reader, start=2):
            try:
                values.append(float(row[column]))
            except (TypeError, ValueError) as exc:
                raise ForecasterError(
                    f"{path}:{line}: {column}={row[column]!r} is not a number"
                ) from exc
    array = np.asarray(values)
    if not np.isfinite(array).all():
        raise ForecasterError(f"{path}: column {column!r} holds NaN or inf")
    return array


def read_forecast_records(path: Path) -> list[dict]:
    """Forecast messages recorded one JSON object per line (``forecaster plot --record``)."""
    records = []
    with open(path) as handle:
        for line_no, line in enumerate(handle, start=1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except ValueError as exc:
                    raise ForecasterError(f"{path}:{line_no}: not a JSON forecast ({exc})") from exc
    return records


def collect_forecasts(
    host: str, port: int, topic: str, duration: float, protocol: str = "5"
) -> list[dict]:
    """Subscribe to the daemon's forecast topic for ``duration`` seconds and keep every message."""
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion

    records: list[dict] = []
    client = paho.Client(
        CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5 if protocol == "5" else paho.MQTTv311
    )
    client.on_connect = lambda c, *a: c.subscribe(topic, 1)

    def on_message(c: paho.Client, userdata: object, message: paho.MQTTMessage) -> None:
        with contextlib.suppress(ValueError):
            records.append(json.loads(message.payload))

    client.on_message = on_message
    client.connect(host, port)
    client.loop_start()
    for _ in progress_bar(range(int(duration * 10)), desc=f"recording {topic}", leave=False):
        time.sleep(0.1)
    client.loop_stop()
    client.disconnect()
    return records


class EngineModel:
    """The daemon's own path as a peer: every ``learn_one`` is one ``Engine.tick`` (and, with
    ``learn``, one synchronous ``Learner.after_tick``, as ``forecaster evaluate --learn``)."""

    def __init__(
        self,
        model: Forecaster,
        normalizer: NormalizerConfig,
        learn: OnlineLearningConfig | None = None,
        stream: str = "series",
        *,
        device: str = "cpu",
        combine: CombinerConfig | None = None,
    ) -> None:
        if learn is not None:
            model = copy.deepcopy(model)  # the learner changes the weights it serves
        self.engine = Engine(model, normalizer, device=device, combine=combine)
        # The series' times (Unix seconds) when it has them, as a sender's ``ts``; else row numbers
        self.timestamps: np.ndarray | None = None
        self.learner = Learner(self.engine, learn) if learn is not None else None
        self.stream = stream
        self.t = 0
        self.prediction = 0.0
        self.version = 0  # model_version of the last forecast

    def forecast(self) -> float:
        return self.prediction

    def learn_one(self, y: float) -> None:
        stamp = float(self.t) if self.timestamps is None else float(self.timestamps[self.t])
        result = self.engine.tick([Sample(self.stream, y, ts=stamp)])
        if result.rejected:
            raise ForecasterError(f"sample {self.t} rejected: {result.rejected[0].reason}")
        self.t += 1
        self.prediction = result.forecasts[0].prediction
        self.version = result.forecasts[0].model_version
        if self.learner is not None:
            self.learner.after_tick()


def progressive(model: object, values: np.ndarray, progress: tqdm | None = None) -> SeriesRun:
    """Progressive validation of any ``forecast``/``learn_one`` model: ``predictions[t]`` is
    asked for after ``values[t]`` was learned and before ``values[t + 1]`` exists for it.

    >>> from forecaster.peers import LastValue
    >>> run = progressive(LastValue(), np.array([1.0, 2.0, 4.0]))
    >>> run.predictions.tolist()
    [1.0, 2.0, 4.0]
    """
    predictions = np.empty(len(values))
    for t, value in enumerate(values.tolist()):
        model.learn_one(value)  # type: ignore[attr-defined]
        predictions[t] = model.forecast()  # type: ignore[attr-defined]
        if progress is not None:
            progress.update()
    return SeriesRun(np.asarray(values, dtype=np.float64), predictions)


def warmup_zscore(values: np.ndarray, warmup: float = 0.1) -> np.ndarray:
    """Values in units of the warm-up block's mean and standard deviation (1 where it is 0).

    The statistics come from the unscored warm-up only, so every scored value is mapped with
    figures from its past: errors in these units are comparable across streams.

    >>> warmup_zscore(np.array([1.0, 3.0, 5.0, 7.0]), warmup=0.5).tolist()
    [-1.0, 1.0, 3.0, 5.0]
    """
    head = values[: max(1, math.ceil(warmup * len(values)))]
    std = float(np.std(head))
    return (values - float(np.mean(head))) / (std if std > 0 else 1.0)
