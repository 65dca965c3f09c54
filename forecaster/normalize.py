"""Per-stream online normalisation with no look-ahead, vectorised over stream slots.

A model trained on unit sines must serve a stream of amplitude 1000 around 5000, so every value is
mapped to ``z = (x - mean) / scale`` with an exponentially weighted mean and variance that have seen
only the values up to and including ``x``. The weight starts as a plain running average (``1/n``)
and settles at the half-life's rate, so early estimates are not biased towards zero. The model
predicts the next value in the same ``z`` frame and the engine maps it back with the same
statistics: the forecast for ``t+1`` uses nothing the stream has not yet sent.

On the way back, the change the model predicts (forecast minus the last value) is multiplied by a
per-stream gain in [0, 1]: the least-squares slope of the changes that followed on the changes
predicted, over past forecasts whose outcome is known (exponentially weighted, ``gain_halflife``).
A model that reads a stream well keeps a gain near 1; on a stream it cannot read (a random walk, a
signal unlike its training data) the gain falls towards 0 and the forecast towards the last value,
so a model trained on sines does not lose to the naive forecast on real sensor data. After a value
the normaliser had to clip (a spike beyond ``clip`` standard deviations: the model cannot read how
far it went), the forecast is the last value, and that step is left out of the gain's moments.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from forecaster import ewm


@dataclass(frozen=True)
class NormalizerConfig:
    """``ewm``: exponentially weighted mean/variance; ``none``: values pass unchanged."""

    kind: Literal["ewm", "none"] = "ewm"
    halflife: float = 500.0  # in samples
    clip: float = 8.0  # |z| bound, so one spike cannot saturate the hidden state for long
    gain_halflife: float | None = 100.0  # samples; None: forecasts are not shrunk (gain 1)

    @property
    def alpha(self) -> float:
        return ewm.alpha(self.halflife)


class Normalizer:
    """Running statistics for ``capacity`` stream slots.

    >>> norm = Normalizer(NormalizerConfig(halflife=100.0), capacity=2)
    >>> slots = np.array([0, 1])
    >>> norm.update(slots, np.array([5000.0, -3.0])).tolist()
    [0.0, 0.0]
    >>> z = norm.update(slots, np.array([5002.0, -1.0]))
    >>> z.round(4).tolist()
    [1.0, 1.0]
    >>> norm.denormalize(slots, z).round(6).tolist()
    [5002.0, -1.0]
    """

    def __init__(self, config: NormalizerConfig | None = None, capacity: int = 0) -> None:
        self.config = config or NormalizerConfig()
        self.count = np.zeros(capacity, dtype=np.int64)
        self.mean = np.zeros(capacity, dtype=np.float64)
        self.var = np.zeros(capacity, dtype=np.float64)
        # Gain of the predicted change: last value, last predicted change, weighted moments.
        self.last = np.full(capacity, np.nan)
        self.change = np.full(capacity, np.nan)
        self.sxx = np.zeros(capacity, dtype=np.float64)
        self.sxy = np.zeros(capacity, dtype=np.float64)
        self.clipped = np.zeros(capacity, dtype=np.float64)  # 1: the last value's z was clipped

    @property
    def capacity(self) -> int:
        return len(self.count)

    def grow(self, capacity: int) -> None:
        """Make room for at least ``capacity`` slots; new slots start empty."""
        extra = capacity - self.capacity
        if extra > 0:
            self.count = np.concatenate([self.count, np.zeros(extra, dtype=np.int64)])
            self.mean = np.concatenate([self.mean, np.zeros(extra)])
            self.var = np.concatenate([self.var, np.zeros(extra)])
            self.last = np.concatenate([self.last, np.full(extra, np.nan)])
            self.change = np.concatenate([self.change, np.full(extra, np.nan)])
            self.sxx = np.concatenate([self.sxx, np.zeros(extra)])
            self.sxy = np.concatenate([self.sxy, np.zeros(extra)])
            self.clipped = np.concatenate([self.clipped, np.zeros(extra)])

    def reset(self, slots: np.ndarray) -> None:
        self.count[slots] = 0
        self.mean[slots] = 0.0
        self.var[slots] = 0.0
        self.last[slots] = np.nan
        self.change[slots] = np.nan
        self.sxx[slots] = 0.0
        self.sxy[slots] = 0.0
        self.clipped[slots] = 0.0

    def scale(self, slots: np.ndarray) -> np.ndarray:
        """The values' spread in ``slots`` (see ``spread``)."""
        return spread(self.mean[slots], self.var[slots])

    def frame_scale(self, slots: np.ndarray) -> np.ndarray:
        """What one unit of ``z`` is worth in stream units now (1 when values pass unchanged)."""
        if self.config.kind == "none":
            return np.ones(len(slots))
        return self.scale(slots)

    def update(self, slots: np.ndarray, x: np.ndarray) -> np.ndarray:
        """Fold ``x`` (one value per distinct slot) into the statistics, return its ``z``."""
        count = self.count[slots] + 1
        self._update_gain(slots, np.asarray(x, dtype=np.float64))
        if self.config.kind == "none":
            self.count[slots] = count
            return np.asarray(x, dtype=np.float64).copy()
        weight = np.maximum(1.0 / count, self.config.alpha)
        mean, var = ewm.mean_var(self.mean[slots], self.var[slots], x, weight)
        self.count[slots] = count
        self.mean[slots] = mean
        self.var[slots] = var
        z = (x - mean) / spread(mean, var)  # scale(slots) from the moments in hand
        self.clipped[slots] = np.abs(z) >= self.config.clip
        return _clip(z, self.config.clip)

    def normalize(self, slots: np.ndarray, x: np.ndarray) -> np.ndarray:
        """``z`` of ``x`` under the current statistics (no update)."""
        if self.config.kind == "none":
            return np.asarray(x, dtype=np.float64).copy()
        return _clip((x - self.mean[slots]) / self.scale(slots), self.config.clip)

    def denormalize(
        self, slots: np.ndarray, z: np.ndarray, scale: np.ndarray | None = None
    ) -> np.ndarray:
        """``z`` in stream units; ``scale``: ``frame_scale(slots)`` when the caller has it."""
        if self.config.kind == "none":
            return np.asarray(z, dtype=np.float64).copy()
        return self.mean[slots] + (self.scale(slots) if scale is None else scale) * z

    def _update_gain(self, slots: np.ndarray, x: np.ndarray) -> None:
        """Fold the outcome of the last forecast (the change that followed) into the moments."""
        halflife = self.config.gain_halflife
        if halflife is None:
            return
        known = np.isfinite(self.change[slots])
        if known.any():
            alpha = ewm.alpha(halflife)
            at = slots[known]
            predicted = self.change[at]
            actual = x[known] - self.last[at]
            self.sxx[at] += alpha * (predicted * predicted - self.sxx[at])
            self.sxy[at] += alpha * (predicted * actual - self.sxy[at])
        self.last[slots] = x

    def gain(self, slots: np.ndarray) -> np.ndarray:
        """Least-squares slope of actual on predicted changes, in [0, 1]; 1 before any outcome.

        >>> norm = Normalizer(NormalizerConfig(halflife=10.0, gain_halflife=10.0), capacity=1)
        >>> slot = np.array([0])
        >>> for x in [0.0, 1.0, 0.0, 1.0, 0.0, 1.0]:  # the change is the opposite of the forecast's
        ...     _ = norm.update(slot, np.array([x]))
        ...     _ = norm.forecast(slot, norm.normalize(slot, np.array([2.0 * x])))
        >>> norm.gain(slot).tolist()
        [0.0]
        """
        if self.config.gain_halflife is None:
            return np.ones(len(slots))
        sxx, sxy = self.sxx[slots], self.sxy[slots]
        ratio = np.divide(sxy, sxx, out=np.ones(len(slots)), where=sxx > 0)
        np.maximum(ratio, 0.0, out=ratio)
        return np.minimum(ratio, 1.0, out=ratio)

    def forecast(
        self, slots: np.ndarray, z: np.ndarray, scale: np.ndarray | None = None
    ) -> np.ndarray:
        """Map the model's ``z`` back to stream units with the predicted change shrunk by the
        gain; call once per step, after ``update`` (it records the change for the next one).

        After a clipped value the forecast is that value, whatever the model says:

        >>> norm = Normalizer(NormalizerConfig(halflife=10.0, clip=3.0), capacity=1)
        >>> slot = np.array([0])
        >>> for x in [1.0, 2.0] * 20 + [1000.0]:
        ...     _ = norm.update(slot, np.array([x]))
        >>> norm.forecast(slot, np.array([0.0])).tolist()  # z = 0 would be "back to the mean"
        [1000.0]
        """
        raw = self.denormalize(slots, z, scale)
        if self.config.gain_halflife is None:
            return raw
        last = self.last[slots]
        change = raw - last
        clipped = self.clipped[slots] > 0
        self.change[slots] = np.where(clipped, np.nan, change)
        return last + np.where(clipped, 0.0, self.gain(slots)) * change

    def state_arrays(self) -> dict[str, np.ndarray]:
        return {
            "count": self.count,
            "mean": self.mean,
            "var": self.var,
            "last": self.last,
            "change": self.change,
            "sxx": self.sxx,
            "sxy": self.sxy,
            "clipped": self.clipped,
        }

    def load_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        self.count = np.asarray(arrays["count"], dtype=np.int64).copy()
        self.mean = np.asarray(arrays["mean"], dtype=np.float64).copy()
        self.var = np.asarray(arrays["var"], dtype=np.float64).copy()
        for key in ("last", "change", "sxx", "sxy", "clipped"):  # absent in older checkpoints
            if key in arrays:
                setattr(self, key, np.asarray(arrays[key], dtype=np.float64).copy())


def spread(mean: np.ndarray, var: np.ndarray) -> np.ndarray:
    """Standard deviation kept above zero relative to the level (a flat stream gives z=0)."""
    return np.sqrt(var) + 1e-9 * (1.0 + np.abs(mean))


def _clip(z: np.ndarray, bound: float) -> np.ndarray:
    """``np.clip(z, -bound, bound)`` in place (np.clip's own overhead is a tick's hot spot)."""
    np.maximum(z, -bound, out=z)
    return np.minimum(z, bound, out=z)


def normalize_series(values: np.ndarray, config: NormalizerConfig) -> tuple[np.ndarray, np.ndarray]:
    """Normalise ``values (B, T)`` online; return ``z (B, T)`` and the next-value targets.

    ``target[:, t]`` is ``values[:, t + 1]`` in the frame of the statistics at ``t``, which is
    exactly what the engine maps a prediction back with (the last column is NaN: no next value).
    After a single value the scale is ~0, so the first target is clipped: training masks warm-up.

    >>> z, target = normalize_series(np.array([[1.0, 3.0, 5.0]]), NormalizerConfig())
    >>> z.round(3).tolist(), target[:, :2].round(3).tolist()
    ([[0.0, 1.0, 1.225]], [[8.0, 3.0]])
    """
    values = np.atleast_2d(np.asarray(values, dtype=np.float64))  # (B, T)
    n_streams, length = values.shape
    norm = Normalizer(config, capacity=n_streams)
    slots = np.arange(n_streams)
    z = np.empty_like(values)
    target = np.full_like(values, np.nan)
    for t in range(length):
        z[:, t] = norm.update(slots, values[:, t])
        if t + 1 < length:
            target[:, t] = norm.normalize(slots, values[:, t + 1])
    return z, target
