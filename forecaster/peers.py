"""Peers: the forecasts a user would get without this daemon, to score it against.

Small River-style estimators with two verbs: ``learn_one(y)`` folds in the value that just arrived,
``forecast()`` says what the next one will be. ``evaluate.progressive`` drives any of them (and the
Engine, through ``evaluate.EngineModel``) in the one order that makes look-ahead impossible.
"""

from __future__ import annotations

import numpy as np


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
