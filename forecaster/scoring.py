"""Per-stream calibration of the forecast: an online conformal interval and an anomaly score.

This is the engine's scoring stage, kept in its own pure module (the engine file holds the tick
logic; this holds per-slot statistics, like ``normalize.py``). Everything works on the stream's
absolute residual in the normalised frame, ``s = |x - y_hat| / scale``, vectorised over slots.

**Interval** (adaptive conformal inference by quantile tracking, Angelopoulos, Candès & Tibshirani,
"Conformal PID control", 2023, the P term; a relative of Gibbs & Candès' ACI): the half-width ``q``
is the tracked ``coverage`` quantile of ``s``. After each sample ``log q`` moves up by
``step * coverage`` on a miss and down by ``step * (1 - coverage)`` on a hit, so over any sequence
the miss rate converges to ``1 - coverage`` (the displacement of ``log q`` bounds the gap). In log
space the step is scale-free: the same ``step`` serves a clean sine and a noisy sensor.

**Anomaly score** (in the spirit of NAB's anomaly likelihood), the larger of two tail probabilities:

- *error*: a short EWMA of ``s`` compared with the mean and spread of ``s`` over a long half-life,
  ``Phi((short - mean) / std)``: the Gaussian probability that the recent error is *not* that large.
  Here ``s`` is measured in the larger of the frame's spread and the values' long-run spread: in a
  quiet stretch the normaliser's spread shrinks and would make an ordinary blip look large.
  The error's tails are as heavy as the stream makes them: where the residuals' kurtosis (an EWM
  over the same half-life) exceeds a Gaussian's 3, ``z`` is divided by ``(kurtosis / 3) ** 0.25``
  before ``Phi``. A bursty count (NAB's Twitter volumes) otherwise crosses any Gaussian threshold
  every few hundred samples; on NAB's 41 developer files this took the false alarms from 96 to 55
  at the same recall (``forecaster bench anomaly``, docs/accuracy.md);
- *level*: a short EWMA of the value itself compared with the mean and spread of the values over the
  same half-life, two-sided, ``2 Phi(|short - mean| / std) - 1``. A one-step forecaster follows a
  level shift or an out-of-range stretch within a few samples, so its error says little after the
  first one; the value stays far from its usual range for as long as the shift lasts.

So 0.5 means typical and values near 1 mean far in a tail. It is 0.5 ("don't know") during warm-up.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np
import torch

from forecaster import ewm
from forecaster.config import AnomalyConfig, IntervalsConfig
from forecaster.normalize import spread

# q never shrinks below a thousandth of the stream's spread. Without a floor, a stretch of exact
# forecasts (a constant start, which the normaliser's gain predicts exactly) drives log q towards
# -inf, and every step back up costs a miss: NAB's art_daily_* files spent their first ~500 scored
# samples climbing back from 1e-12 and ended at 0.865 coverage. A narrower interval says nothing
# more; an exactly constant stream is still covered (its errors are 0), as no interval can miss it.
LOG_FLOOR = math.log(1e-3)
S_CAP = 1e6  # residuals above this (normaliser warm-up) are capped before entering statistics

# Heavy tails: z is divided by (kurtosis / 3) ** TAIL_EXPONENT, the kurtosis capped at KURTOSIS_CAP
# (chosen on NAB's 41 developer files: 0.25 kept the recall and cut the false alarms most; 0.5 cost
# recall; the cap matters little between 20 and 200).
TAIL_EXPONENT = 0.25
KURTOSIS_CAP = 50.0

COLUMNS = (
    "tracked",
    "log_q",
    "seen",
    "mean",
    "var",
    "m4",
    "short",
    "level_mean",
    "level_var",
    "level",
)


_INTERVALS, _ANOMALY = IntervalsConfig(), AnomalyConfig()  # the one source of the defaults


@dataclass(frozen=True)
class ScoringConfig:
    """Hyper-parameters of both scorers, stored verbatim; defaults from the ``intervals`` and
    ``anomaly`` config sections (``config.scoring_config`` builds one from a loaded config)."""

    coverage: float = _INTERVALS.coverage  # target share of values inside [lower, upper]
    step: float = _INTERVALS.step  # log-step of the quantile tracker
    warmup: int = _INTERVALS.warmup  # normaliser samples before residuals are tracked
    anomaly_halflife: float = _ANOMALY.halflife  # samples; the "recent error distribution"
    anomaly_smoothing: float = _ANOMALY.smoothing  # weight of the newest residual, short average
    level_smoothing: float = _ANOMALY.level_smoothing  # weight of the newest value, its average
    anomaly_warmup: int = _ANOMALY.warmup  # tracked residuals before the score leaves 0.5

    @property
    def alpha(self) -> float:
        return ewm.alpha(self.anomaly_halflife)

    @property
    def initial_log_q(self) -> float:
        """Before any residual: the Gaussian quantile, i.e. the signal's own spread."""
        return math.log(NormalDist().inv_cdf(0.5 + self.coverage / 2))


def normal_cdf(x: np.ndarray) -> np.ndarray:
    """``Phi(x)`` elementwise in float64, through erfc: the far lower tail keeps its digits
    (``NormalDist.cdf`` goes through erf and loses them).

    NumPy has no erfc and scipy is not a runtime dependency; torch's is one vectorised call
    (one call for both tails: the former ``|x|`` and ``where`` around it were a third of its time).

    >>> normal_cdf(np.array([0.0, 1.6448536269514722, -3.7190164854556804])).round(6).tolist()
    [0.5, 0.95, 0.0001]
    """
    u = np.asarray(x, dtype=np.float64) / -math.sqrt(2.0)  # the one new array
    torch.from_numpy(u).erfc_()  # in place, through the shared memory
    u *= 0.5  # Phi(x) = erfc(-x/sqrt 2)/2
    return u


class Scorer:
    """Interval and anomaly statistics for ``capacity`` stream slots.

    >>> scorer = Scorer(ScoringConfig(warmup=0, anomaly_warmup=2), capacity=1)
    >>> slot = np.array([0])
    >>> seen = np.array([True])
    >>> one = np.array([1.0])
    >>> [round(float(scorer.observe(slot, np.array([s]), seen, seen, one * 10, one)[0]), 3)
    ...  for s in (1.0, 1.2, 0.8, 5.0)]
    [0.5, 0.5, 0.11, 1.0]
    >>> float(scorer.halfwidth(slot)[0]) > 0
    True
    """

    def __init__(self, config: ScoringConfig | None = None, capacity: int = 0) -> None:
        self.config = config or ScoringConfig()
        self.tracked = np.zeros(capacity, dtype=np.int64)  # residuals folded in so far
        self.log_q = np.full(capacity, self.config.initial_log_q)
        self.seen = np.zeros(capacity, dtype=np.int64)  # residuals in the anomaly statistics
        self.mean = np.zeros(capacity)
        self.var = np.zeros(capacity)
        self.m4 = np.zeros(capacity)  # EWM of the residuals' fourth central moment
        self.short = np.zeros(capacity)
        self.level_mean = np.zeros(capacity)  # the values' long mean and variance
        self.level_var = np.zeros(capacity)
        self.level = np.zeros(capacity)  # short EWMA of the values

    @property
    def capacity(self) -> int:
        return len(self.tracked)

    def grow(self, capacity: int) -> None:
        extra = capacity - self.capacity
        if extra > 0:
            fresh = Scorer(self.config, extra)
            for name in COLUMNS:
                setattr(self, name, np.concatenate([getattr(self, name), getattr(fresh, name)]))

    def reset(self, slots: np.ndarray) -> None:
        """Fresh (never used) statistics in ``slots`` (slots freed by eviction)."""
        fresh = Scorer(self.config, 1)
        for name in COLUMNS:
            getattr(self, name)[slots] = getattr(fresh, name)[0]

    def halfwidth(self, slots: np.ndarray) -> np.ndarray:
        """Half-width of the interval in the normalised frame (multiply by the frame's scale)."""
        return np.exp(self.log_q[slots])

    def observe(
        self,
        slots: np.ndarray,
        s: np.ndarray,
        covered: np.ndarray,
        scored: np.ndarray,
        values: np.ndarray,
        scale: np.ndarray,
    ) -> np.ndarray:
        """Fold residuals ``s`` and ``values`` (where ``scored``) into the statistics; return each
        anomaly score.

        ``covered`` says whether the value fell inside the interval published with the forecast;
        ``scale`` is the frame's spread that ``s`` was divided by. The score compares ``s`` and the
        value with the statistics *before* they are folded in.
        """
        cfg = self.config
        score = np.full(len(slots), 0.5)
        if not scored.any():
            return score
        slots, s, covered = slots[scored], np.minimum(s[scored], S_CAP), covered[scored]
        values, scale = values[scored], scale[scored]
        # Interval: the first residual seeds q; then the quantile tracker's log-step.
        first = self.tracked[slots] == 0
        log_q = np.where(first, np.log(np.maximum(s, 1e-12)), self.log_q[slots])
        miss = ~covered & ~first
        log_q = log_q + cfg.step * (miss - (1.0 - cfg.coverage))
        self.log_q[slots] = np.maximum(log_q, LOG_FLOOR)
        self.tracked[slots] += 1
        # Anomaly: short EWMA of s against the long mean and spread of s before this sample.
        seen = self.seen[slots]
        level_mean, level_var = self.level_mean[slots], self.level_var[slots]
        level_spread = spread(level_mean, level_var)  # as the normaliser's
        s = s * np.minimum(1.0, scale / level_spread)  # in the larger of the two spreads
        short = np.where(seen == 0, s, self.short[slots])
        short = short + cfg.anomaly_smoothing * (s - short)
        mean, var = self.mean[slots], self.var[slots]
        m4 = self.m4[slots]
        z = (short - mean) / (np.sqrt(var) + 1e-12 * (1.0 + mean))
        kurtosis = np.minimum(m4 / np.where(var > 0.0, var * var, np.inf), KURTOSIS_CAP)
        z /= np.maximum(kurtosis / 3.0, 1.0) ** TAIL_EXPONENT
        # Level: the same comparison on the values, two-sided (a drop is as surprising as a rise).
        level = np.where(seen == 0, values, self.level[slots])
        level = level + cfg.level_smoothing * (values - level)
        z_level = np.abs(level - level_mean) / level_spread
        tails = normal_cdf(np.concatenate([z, z_level]))  # one call: (2n,)
        error_score, level_score = tails[: len(z)], 2.0 * tails[len(z) :] - 1.0
        ready = seen >= cfg.anomaly_warmup
        score[scored] = np.where(ready, np.maximum(error_score, level_score), 0.5)
        weight = np.maximum(1.0 / (seen + 1), cfg.alpha)
        deviation = s - mean
        self.m4[slots] = np.where(seen == 0, 0.0, (1.0 - weight) * (m4 + weight * deviation**4))
        self.mean[slots], self.var[slots] = ewm.mean_var(mean, var, s, weight)
        self.short[slots] = short
        self.level_mean[slots], self.level_var[slots] = ewm.mean_var(
            level_mean, level_var, values, weight
        )
        self.level[slots] = level
        self.seen[slots] = seen + 1
        return score

    def state_arrays(self) -> dict[str, np.ndarray]:
        return {name: getattr(self, name) for name in COLUMNS}
