"""Offline evaluation: replay a series through the same Engine the daemon serves with.

Progressive validation: each value is first used to score the forecast made before it arrived,
then fed to the model. The first ``warmup`` share of the series is not scored (the normaliser and
hidden state are still settling), for the model and the naive baseline alike.
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
    if learn is not None:
        model = copy.deepcopy(model)  # the learner changes the weights it serves
    engine = Engine(model, normalizer, device=device, combine=combine)
    learner = Learner(engine, learn) if learn is not None else None
    predictions = np.empty(len(values))
    versions = np.zeros(len(values), dtype=np.int64)
    for t, value in enumerate(
        progress_bar(values, desc="evaluate", disable=not progress, leave=False)
    ):
        stamp = float(t) if timestamps is None else float(timestamps[t])
        result = engine.tick([Sample(stream, float(value), ts=stamp)])
        if result.rejected:
            raise ForecasterError(f"sample {t} rejected: {result.rejected[0].reason}")
        predictions[t] = result.forecasts[0].prediction
        versions[t] = result.forecasts[0].model_version
        if learner is not None:
            learner.after_tick()
    return SeriesRun(np.asarray(values, dtype=np.float64), predictions, versions, learner)


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


# -- peers: the forecasts a user would get without this daemon ------------------------------------
# Small River-style estimators with two verbs: ``learn_one(y)`` folds in the value that just
# arrived, ``forecast()`` says what the next one will be. ``progressive`` drives any of them (and
# the Engine, through ``EngineModel``) in the one order that makes look-ahead impossible.


class LastValue:
    """Naive forecast: the next value equals the last one.

    >>> model = LastValue()
    >>> model.learn_one(3.0)
    >>> model.forecast()
    3.0
    """

    def __init__(self) -> None:
        self.last = 0.0

    def forecast(self) -> float:
        return self.last

    def learn_one(self, y: float) -> None:
        self.last = y


class OnlineAR:
    """AR(``p``) with an intercept, fitted by recursive least squares with a forgetting factor.

    Until ``p`` values have arrived it forecasts the last value. A sine is an exact AR(2), so
    after a few dozen samples the forecast is right:

    >>> model = OnlineAR(p=2)
    >>> wave = np.sin(0.3 * np.arange(61))
    >>> for y in wave[:60]:
    ...     model.learn_one(float(y))
    >>> bool(abs(model.forecast() - wave[60]) < 0.01)
    True
    """

    def __init__(self, p: int = 8, forgetting: float = 0.999, delta: float = 100.0) -> None:
        self.p = p
        self.forgetting = forgetting
        self.delta = delta  # initial P = delta * I: a weak prior on the zero coefficients
        self.weights = np.zeros(p + 1)
        self.cov = delta * np.eye(p + 1)
        self.lags: list[float] = []  # most recent first

    def _features(self) -> np.ndarray:
        return np.array([1.0, *self.lags])

    def forecast(self) -> float:
        if len(self.lags) < self.p:
            return self.lags[0] if self.lags else 0.0
        return float(self.weights @ self._features())

    def learn_one(self, y: float) -> None:
        if len(self.lags) == self.p:
            phi = self._features()
            gain = self.cov @ phi / (self.forgetting + phi @ self.cov @ phi)
            self.weights = self.weights + gain * (y - self.weights @ phi)
            self.cov = (self.cov - np.outer(gain, phi @ self.cov)) / self.forgetting
        self.lags = [y, *self.lags][: self.p]


PERIODS = (4, 7, 12, 24, 48, 52, 96, 144, 168, 288, 336, 672, 1008, 2016)


class SeasonalPeriod:
    """A season length found causally: after 16, 32, 64, ... and every ``every`` values, the candidate period whose lag
    best correlates the series' recent changes (at least ``min_corr``; a longer one must beat a
    shorter by 0.05, or every multiple of a season would tie with it), among those that fit
    three times in what has been seen. Only values already learned are read.

    >>> detector = SeasonalPeriod(every=50)
    >>> for t in range(400):
    ...     detector.learn_one(float(np.sin(2 * np.pi * t / 24)))
    >>> detector.period
    24
    """

    def __init__(self, every: int = 256, window: int = 4032, min_corr: float = 0.2) -> None:
        self.every = every
        self.window = window  # recent values the correlation is measured over
        self.min_corr = min_corr
        self.history: list[float] = []
        self.period: int | None = None

    def learn_one(self, y: float) -> None:
        self.history.append(y)
        n = len(self.history)
        if n % self.every == 0 or (n >= 16 and n & (n - 1) == 0):  # also at 16, 32, 64, ...
            self.period = self.detect(np.asarray(self.history[-self.window :]))

    def detect(self, values: np.ndarray) -> int | None:
        changes = np.diff(values)
        best, best_corr = None, self.min_corr
        for period in PERIODS:
            if 3 * period > len(changes):
                break
            a, b = changes[period:], changes[:-period]
            denominator = float(
                np.sqrt(np.dot(a - a.mean(), a - a.mean()) * np.dot(b - b.mean(), b - b.mean()))
            )
            corr = (
                float(np.dot(a - a.mean(), b - b.mean())) / denominator if denominator > 0 else 0.0
            )
            if corr > best_corr + (0.05 if best else 0.0):  # a multiple must do clearly better
                best, best_corr = period, corr
        return best


class SeasonalNaive:
    """The value one season back, at the period ``SeasonalPeriod`` has found so far (the last
    value until it finds one)."""

    def __init__(self) -> None:
        self.detector = SeasonalPeriod()

    def forecast(self) -> float:
        history, period = self.detector.history, self.detector.period
        if not history:
            return 0.0
        if period is None or len(history) < period:
            return history[-1]
        return history[-period]  # x[t + 1 - P]

    def learn_one(self, y: float) -> None:
        self.detector.learn_one(y)


class SeasonalHoltWinters:
    """Additive Holt-Winters (level, trend, one seasonal term per phase) at the period
    ``SeasonalPeriod`` has found so far; Holt's linear trend until it finds one. Re-initialised
    from the last two seasons already seen when the period changes.

    Written here rather than taken from River: River 0.26's ``HoltWinters`` initialises an
    additive season as ``y / level`` (the multiplicative formula), which diverges on a series
    whose level is near zero.

    >>> model = SeasonalHoltWinters()
    >>> wave = 5 + np.sin(2 * np.pi * np.arange(1200) / 24)
    >>> for y in wave[:1199]:
    ...     model.learn_one(float(y))
    >>> bool(abs(model.forecast() - wave[1199]) < 0.05)
    True
    """

    # The best of a small grid (alpha 0.3/0.7, beta 0.01/0.1, gamma 0.1/0.3) over the NAB and
    # macro developer sets together (docs/accuracy.md)
    def __init__(self, alpha: float = 0.7, beta: float = 0.1, gamma: float = 0.3) -> None:
        self.alpha, self.beta, self.gamma = alpha, beta, gamma
        self.detector = SeasonalPeriod()
        self.period: int | None = None
        self.level: float | None = None
        self.trend = 0.0
        self.season: list[float] = []  # by phase: t mod period
        self.t = 0  # values learned

    def _restart(self) -> None:
        """Level and season from the last two seasons seen (the last value without a season)."""
        history, period = self.detector.history, self.period
        if period is None:
            self.level, self.trend, self.season = history[-1], 0.0, []
            return
        recent = np.asarray(history[-2 * period :])
        first, second = recent[:period].mean(), recent[period:].mean()
        self.level = float(second)
        self.trend = float(second - first) / period
        self.season = [0.0] * period
        for i, y in enumerate(recent[period:]):  # phases of the last season seen
            self.season[(self.t - period + i) % period] = float(y - second)

    def forecast(self) -> float:
        if self.level is None:
            return 0.0
        season = self.season[self.t % self.period] if self.period else 0.0
        return self.level + self.trend + season

    def learn_one(self, y: float) -> None:
        self.detector.learn_one(y)
        if self.level is None:
            self.level = y
        else:
            phase = (self.t % self.period) if self.period else 0
            seasonal = self.season[phase] if self.period else 0.0
            level = self.alpha * (y - seasonal) + (1 - self.alpha) * (self.level + self.trend)
            self.trend = self.beta * (level - self.level) + (1 - self.beta) * self.trend
            self.level = level
            if self.period:
                self.season[phase] = self.gamma * (y - level) + (1 - self.gamma) * seasonal
        self.t += 1
        if self.detector.period != self.period and (
            self.detector.period is None or self.t >= 2 * self.detector.period
        ):
            self.period = self.detector.period
            self._restart()


class DoubleExponentialSmoothing:
    """PromQL's ``double_exponential_smoothing(v[range], sf, tf)`` (``holt_winters`` before
    Prometheus 3), run over an ever-growing range: the recurrence of ``funcDoubleExponentialSmoothing``
    and ``calcTrendValue`` in ``promql/functions.go``. Like PromQL, the forecast is the smoothed
    value ``s1`` itself (the trend enters the smoothing but is not added on top).

    >>> model = DoubleExponentialSmoothing(sf=0.5, tf=0.5)
    >>> for y in [1.0, 2.0, 3.0, 4.0]:
    ...     model.learn_one(y)
    >>> model.forecast()
    4.0
    """

    def __init__(self, sf: float = 0.5, tf: float = 0.5) -> None:
        if not (0 < sf < 1 and 0 < tf < 1):
            raise ValueError("Prometheus requires 0 < sf < 1 and 0 < tf < 1")
        self.sf = sf
        self.tf = tf
        self.seen = 0
        self.first = 0.0
        self.s0 = 0.0
        self.s1 = 0.0
        self.b = 0.0

    def forecast(self) -> float:
        return self.s1

    def learn_one(self, y: float) -> None:
        self.seen += 1
        if self.seen == 1:  # s1 = samples[0]
            self.s1 = y
            return
        if self.seen == 2:  # b = samples[1] - samples[0]; calcTrendValue(0, ...) returns b
            self.b = y - self.s1
        else:
            self.b = self.tf * (self.s1 - self.s0) + (1 - self.tf) * self.b
        self.s0, self.s1 = self.s1, self.sf * y + (1 - self.sf) * (self.s1 + self.b)


class EngineModel:
    """The daemon's own path as a peer: every ``learn_one`` is one ``Engine.tick`` (and, with
    ``learn``, one synchronous ``Learner.after_tick``, as ``forecaster evaluate --learn``)."""

    def __init__(
        self,
        model: Forecaster,
        normalizer: NormalizerConfig,
        learn: OnlineLearningConfig | None = None,
        stream: str = "series",
    ) -> None:
        if learn is not None:
            model = copy.deepcopy(model)  # the learner changes the weights it serves
        self.engine = Engine(model, normalizer)
        # The series' times (Unix seconds) when it has them, as a sender's ``ts``; else row numbers
        self.timestamps: np.ndarray | None = None
        self.learner = Learner(self.engine, learn) if learn is not None else None
        self.stream = stream
        self.t = 0
        self.prediction = 0.0

    def forecast(self) -> float:
        return self.prediction

    def learn_one(self, y: float) -> None:
        stamp = float(self.t) if self.timestamps is None else float(self.timestamps[self.t])
        result = self.engine.tick([Sample(self.stream, y, ts=stamp)])
        if result.rejected:
            raise ForecasterError(f"sample {self.t} rejected: {result.rejected[0].reason}")
        self.t += 1
        self.prediction = result.forecasts[0].prediction
        if self.learner is not None:
            self.learner.after_tick()


def progressive(model: object, values: np.ndarray, progress: tqdm | None = None) -> SeriesRun:
    """Progressive validation of any ``forecast``/``learn_one`` model: ``predictions[t]`` is
    asked for after ``values[t]`` was learned and before ``values[t + 1]`` exists for it.

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
