"""Several readers of one stream, one forecast: the RNN, an online AR path and the last value,
weighed per stream by how well each has predicted it. Vectorised over stream slots.

A frozen RNN trained on sines reads sine-like streams well and most real series poorly; a linear
autoregression fitted online by recursive least squares (RLS) reads trends, mean reversion and
short seasonal patterns of any stream, and the last value is the forecast that is hard to beat on
a random walk. Following LSTNet's linear "highway" beside the network and the forecast
combinations that won M4, every stream keeps all three and mixes them by a least-squares stack:
the change that followed each forecast, regressed (exponentially weighted, ridge towards the last
value) on the changes the RNN and the AR path predicted; the weights are clipped to [0, 1] and
the last value takes the rest.

The AR path predicts the next *change* in units of the stream's typical change (an EWM of squared
changes), from an intercept, the level's z (mean reversion) and the last ``lags`` changes. Its
prior (zero weights) is the last value, so an unreadable stream costs it little. Strictly causal:
every forecast is scored against the value it predicted before that value updates anything.

>>> combiner = Combiner(CombinerConfig(), capacity=1)
>>> slot = np.array([0])
>>> wave = np.sin(np.pi * np.arange(400) / 20)  # the seed's sine, 20 samples per half period
>>> for x in wave[:399]:
...     combined, weights = combiner.step(slot, np.array([x]), np.array([x]), np.array([0.0]))
>>> bool(abs(combined[0] - wave[399]) < 0.01)  # the RNN said "last value"; the AR path read it
True
>>> dict(zip(COMPONENTS, weights[0].round(2).tolist()))
{'naive': 0.0, 'rnn': 0.0, 'ar': 1.0}
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

COMPONENTS = ("naive", "rnn", "ar")
NAIVE, RNN, AR = range(len(COMPONENTS))


@dataclass(frozen=True)
class CombinerConfig:
    """``enabled=False``: the forecast is the RNN's alone (as before combination existed).

    The defaults are one setting for every stream, chosen on the NAB and macro-economic developer
    sets together (docs/accuracy.md)."""

    enabled: bool = True
    lags: int = 8  # past changes the AR path reads
    forgetting: float = 0.999  # RLS forgetting factor (memory ~ 1 / (1 - forgetting) samples)
    prior: float = 0.1  # RLS prior covariance: P starts at prior * I (larger: learns faster)
    change_halflife: float = 100.0  # samples; the typical change that scales the AR path
    weight_halflife: float = 200.0  # samples; the stack's moments
    prior_count: float = 5.0  # the stack's moments start as this many zero samples (naive)
    ridge: float = 0.01  # added to the stack's moments' diagonal: shrinks towards the last value
    clip: float = 6.0  # bound on predicted and actual changes, in typical changes

    @property
    def features(self) -> int:
        return 2 + self.lags  # intercept, level z, lags

    @staticmethod
    def alpha(halflife: float) -> float:
        return 1.0 - math.pow(0.5, 1.0 / halflife)


class Combiner:
    """Per-slot state of the AR path and of the stack; see the module docstring."""

    def __init__(self, config: CombinerConfig | None = None, capacity: int = 0) -> None:
        self.config = config or CombinerConfig()
        k = self.config.features
        self.count = np.zeros(capacity, dtype=np.int64)  # values seen
        self.last = np.full(capacity, np.nan)  # the last value
        self.change_var = np.zeros(capacity)  # EWM of squared changes
        self.lags = np.zeros((capacity, self.config.lags))  # recent changes, newest first
        self.level = np.zeros(capacity)  # the level's z when the last forecast was made
        self.scale = np.zeros(capacity)  # the typical change the last forecast was made in
        self.coef = np.zeros((capacity, k))  # AR path weights
        self.cov = np.tile((self.config.prior * np.eye(k)).ravel(), (capacity, 1))  # RLS P (k*k)
        self.pred = np.full((capacity, len(COMPONENTS)), np.nan)  # forecasts of the next value
        self.sxx = np.zeros((capacity, 3))  # EW moments of the predicted changes (rnn, ar)
        self.sxy = np.zeros((capacity, 2))  # ... and of each with the change that followed

    @property
    def capacity(self) -> int:
        return len(self.count)

    def state_arrays(self) -> dict[str, np.ndarray]:
        return {
            "count": self.count,
            "last": self.last,
            "change_var": self.change_var,
            "lags": self.lags,
            "level": self.level,
            "scale": self.scale,
            "coef": self.coef,
            "cov": self.cov,
            "pred": self.pred,
            "sxx": self.sxx,
            "sxy": self.sxy,
        }

    def grow(self, capacity: int) -> None:
        """Make room for at least ``capacity`` slots; new slots start empty."""
        extra = capacity - self.capacity
        if extra <= 0:
            return
        fresh = Combiner(self.config, extra)
        for key, column in self.state_arrays().items():
            setattr(self, key, np.concatenate([column, getattr(fresh, key)]))

    def reset(self, slots: np.ndarray) -> None:
        fresh = Combiner(self.config, 1)
        for key, column in self.state_arrays().items():
            column[slots] = getattr(fresh, key)[0]

    def weights(self, slots: np.ndarray) -> np.ndarray:
        """``(B, components)``: each component's share of the forecast (summing to 1)."""
        a11, a12, a22 = (self.sxx[slots] + [self.config.ridge, 0.0, self.config.ridge]).T
        b1, b2 = self.sxy[slots].T
        det = a11 * a22 - a12 * a12  # > 0: the moments are a Gram matrix, plus the ridge
        rnn = np.clip((a22 * b1 - a12 * b2) / det, 0.0, 1.0)
        ar = np.clip((a11 * b2 - a12 * b1) / det, 0.0, 1.0)
        over = np.maximum(rnn + ar, 1.0)  # together at most all of the forecast
        rnn, ar = rnn / over, ar / over
        return np.stack([1.0 - rnn - ar, rnn, ar], axis=1)

    def step(
        self, slots: np.ndarray, x: np.ndarray, rnn: np.ndarray, level: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Fold ``x`` (one value per distinct slot) in; return the combined forecast of the
        next value and the weights it was made with ``(B, components)``.

        ``rnn`` is the RNN's forecast of the next value, ``level`` the value's z under the
        stream's normaliser (mean reversion reads it); both made after seeing ``x``.
        """
        config = self.config
        x = np.asarray(x, dtype=np.float64)
        last = self.last[slots]
        seen = np.isfinite(last)
        change = np.where(seen, x - last, 0.0)
        scale = self.scale[slots]
        scored = seen & (scale > 0)
        if scored.any():
            self._learn(slots[scored], change[scored], scale[scored])
        count = self.count[slots] + 1
        self.count[slots] = count
        # The typical change: a plain average of the changes so far, then an EWM.
        weight = np.maximum(1.0 / np.maximum(count - 1, 1), config.alpha(config.change_halflife))
        var = self.change_var[slots]
        var = np.where(seen, var + weight * (change * change - var), var)
        self.change_var[slots] = var
        lags = self.lags[slots]
        lags = np.where(seen[:, None], np.concatenate([change[:, None], lags[:, :-1]], 1), lags)
        self.lags[slots] = lags
        self.last[slots] = x
        scale = np.sqrt(var) + 1e-9 * (1.0 + np.abs(x))
        self.scale[slots] = scale
        self.level[slots] = level
        features = self._features(lags, level, scale)  # (B, k)
        ar_change = np.einsum("bk,bk->b", self.coef[slots], features)
        np.clip(ar_change, -config.clip, config.clip, out=ar_change)
        pred = np.stack([x, rnn, x + scale * ar_change], axis=1)  # (B, components)
        self.pred[slots] = pred
        weights = self.weights(slots)
        return np.einsum("bc,bc->b", weights, pred), weights

    def _features(self, lags: np.ndarray, level: np.ndarray, scale: np.ndarray) -> np.ndarray:
        """``(B, k)``: intercept, level z, the lags in units of the typical change."""
        clip = self.config.clip
        return np.concatenate(
            [
                np.ones((len(level), 1)),
                np.clip(level, -clip, clip)[:, None],
                np.clip(lags / scale[:, None], -clip, clip),
            ],
            axis=1,
        )

    def _learn(self, slots: np.ndarray, change: np.ndarray, scale: np.ndarray) -> None:
        """The change that followed the last forecasts, in the frame they were made in: one
        step of the stack's moments and one RLS step of the AR path."""
        config = self.config
        k = config.features
        target = np.clip(change / scale, -config.clip, config.clip)  # (B,)
        predicted = (self.pred[slots][:, 1:] - self.last[slots][:, None]) / scale[:, None]
        u = np.clip(predicted, -config.clip, config.clip)  # (B, 2): rnn, ar
        # A running average (after ``prior_count`` zeros) until the half-life's weight takes
        # over: a short series decides fast, a long one keeps a steady mix.
        weight = np.maximum(
            1.0 / (self.count[slots] + config.prior_count), config.alpha(config.weight_halflife)
        )[:, None]
        moments = np.stack([u[:, 0] * u[:, 0], u[:, 0] * u[:, 1], u[:, 1] * u[:, 1]], axis=1)
        sxx, sxy = self.sxx[slots], self.sxy[slots]
        self.sxx[slots] = sxx + weight * (moments - sxx)
        self.sxy[slots] = sxy + weight * (u * target[:, None] - sxy)
        phi = self._features(self.lags[slots], self.level[slots], scale)  # (B, k)
        coef = self.coef[slots]
        cov = np.take(self.cov, slots, axis=0).reshape(-1, k, k)  # (B, k, k), a copy
        innovation = target - np.einsum("bk,bk->b", coef, phi)
        p_phi = np.matmul(cov, phi[:, :, None])[:, :, 0]  # (B, k)
        gain = p_phi / (config.forgetting + np.einsum("bk,bk->b", phi, p_phi))[:, None]
        self.coef[slots] = coef + gain * innovation[:, None]
        # P <- (P - gain p_phi^T) / forgetting. Directions no feature excites grow by
        # 1/forgetting per step: the trace is bounded at the prior's, so a flat stream cannot
        # overflow P (and then learns no faster than at the start). One pass over P.
        trace = cov.reshape(-1, k * k)[:, :: k + 1].sum(axis=1) - np.einsum("bk,bk->b", gain, p_phi)
        factor = np.minimum(1.0, config.prior * k / np.maximum(trace / config.forgetting, 1e-300))
        cov -= np.multiply(gain[:, :, None], p_phi[:, None, :], out=np.empty_like(cov))
        cov *= (factor / config.forgetting)[:, None, None]
        self.cov[slots] = cov.reshape(-1, k * k)
