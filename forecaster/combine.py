"""Several readers of one stream, one forecast: the RNN, an online AR path and the last value,
weighed per stream by how well each has predicted it. Vectorised over stream slots.

A frozen RNN trained on sines reads sine-like streams well and most real series poorly; a linear
autoregression fitted online reads trends, mean reversion and seasonal patterns of any stream, and
the last value is the forecast that is hard to beat on a random walk. Following LSTNet's linear
"highway" beside the network and the forecast combinations that won M4, every stream keeps all
three and mixes them by a least-squares stack: the change that followed each forecast, regressed
(exponentially weighted, ridge towards the last value) on the changes the RNN and the AR path
predicted; the weights are clipped to [0, 1] and the last value takes the rest.

The AR path predicts the next *change* in units of the stream's typical change (an EWM of squared
changes) from an intercept, the level's z (mean reversion), the last ``lags`` changes, the values
``seasons`` samples back, smoothed levels and the stream's time-of-day profile (the last four
relative to the last value). It solves exponentially weighted normal equations (a recursive least
squares without the per-sample k x k update), and its prior (zero weights) is the last value, so a
stream it cannot read costs little. Strictly causal: every forecast is scored against the value it
predicted before that value updates anything.

>>> combiner = Combiner(CombinerConfig(), capacity=1)
>>> slot = np.array([0])
>>> wave = np.sin(np.pi * np.arange(400) / 20)  # the seed's sine, 20 samples per half period
>>> for x in wave[:399]:
...     combined, weights = combiner.step(slot, np.array([x]), np.array([x]), np.array([0.0]))
>>> bool(abs(combined[0] - wave[399]) < 0.01)  # the RNN said "last value"; the AR path read it
True
>>> dict(zip(COMPONENTS, weights[0].round(1).tolist()))
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
    lags: int = 6  # past changes the AR path reads
    # Seasonal lags: the value ``P`` steps back (relative to the last) is a feature for each
    # ``P``: a year of months (12), a day of hours (24) or of half hours (48); shorter cycles
    # (a year of quarters: 4) are within ``lags``.
    seasons: tuple[int, ...] = (12, 24, 48)
    # Smoothed levels: an EWM of the values per half-life (in samples), each relative to the last
    # value a feature (how far the stream sits from its recent level: mean reversion).
    smooths: tuple[float, ...] = (3.0, 30.0)
    # Time of day: an EWM of the values per ``day_bins`` bins of the day (from the samples'
    # timestamps); the next sample's bin, relative to the last value, is a feature. 0: off.
    day_bins: int = 288  # 5-minute bins
    day_rate: float = 0.3  # weight of a new value in its bin's EWM
    forgetting: float = 0.999  # the AR path's memory: ~ 1 / (1 - forgetting) samples
    prior: float = 0.1  # AR path's prior: worth 1 / prior samples of zero weights (ridge)
    refit_every: int = 8  # samples between solves of a stream's AR normal equations
    learn_every: int = 1  # past refit_young, one sample in this many feeds the AR path
    refit_young: int = 64  # ... except in a stream's first samples: a solve after each
    change_halflife: float = 100.0  # samples; the typical change that scales the AR path
    weight_halflife: float = 200.0  # samples; the stack's moments
    prior_count: float = 5.0  # the stack's moments start as this many zero samples (naive)
    ridge: float = 0.01  # added to the stack's moments' diagonal: shrinks towards the last value
    clip: float = 6.0  # bound on predicted and actual changes, in typical changes
    # The guard: the mix's own record against the last value, out of sample (the running mean,
    # then the stack's EWM, of its squared error minus the last value's, in typical changes²).
    # At an excess of ``guard`` the forecast is the last value; below it the mix is faded in.
    # A record starts at ``guard_prior`` worth ``prior_count`` samples: a young stream earns its mix.
    guard: float = 0.1
    guard_prior: float = 0.3

    @property
    def features(self) -> int:
        # intercept, level z, lags, seasonal lags, smoothed levels, time of day
        return 2 + self.lags + len(self.seasons) + len(self.smooths) + (self.day_bins > 0)

    @property
    def memory(self) -> int:
        """Past changes kept per stream: the lags, and enough to reach every seasonal lag."""
        return max(self.lags, *(p - 1 for p in self.seasons), 1)

    @staticmethod
    def alpha(halflife: float) -> float:
        return 1.0 - math.pow(0.5, 1.0 / halflife)


class Combiner:
    """Per-slot state of the AR path and of the stack; see the module docstring."""

    def __init__(self, config: CombinerConfig | None = None, capacity: int = 0) -> None:
        self.config = config or CombinerConfig()
        if not self.config.enabled:  # the RNN alone: no per-stream state at all
            capacity = 0
        k = self.config.features
        self.count = np.zeros(capacity, dtype=np.int64)  # values seen
        self.last = np.full(capacity, np.nan)  # the last value
        self.change_var = np.zeros(capacity)  # EWM of squared changes
        # recent changes, newest first (float32: they become features in units of the typical
        # change, where float32's 7 digits are plenty)
        self.lags = np.zeros((capacity, self.config.memory), dtype=np.float32)
        self.level = np.zeros(capacity)  # the level's z when the last forecast was made
        self.smooth = np.zeros((capacity, len(self.config.smooths)))  # EWMs of the values
        self._smooth_rates = np.array([self.config.alpha(h) for h in self.config.smooths])
        self.day = np.full((capacity, self.config.day_bins), np.nan, dtype=np.float32)
        self.last_ts = np.full(capacity, np.nan)
        self.day_next = np.zeros(capacity)  # the next sample's bin's EWM when last forecast
        self.scale = np.zeros(capacity)  # the typical change the last forecast was made in
        self.coef = np.zeros((capacity, k))  # AR path weights
        # The AR path's exponentially weighted normal equations: the mean of phi phi^T (only
        # its upper triangle: it is symmetric) and of phi times the change that followed.
        upper = np.triu_indices(k)
        self._rows, self._cols = upper  # the feature pair of each kept entry
        self._pack_index = np.arange(len(upper[0]))
        ends = np.cumsum(np.arange(k, 0, -1)).tolist()
        self._row_spans = list(zip([0, *ends[:-1]], ends, strict=True))  # entries of row i
        full = np.zeros((k, k), dtype=np.int64)
        full[upper] = np.arange(len(upper[0]))
        self._unpack = np.maximum(full, full.T).ravel()  # kept entry of each full index
        # float32: the largest per-stream array, of means of O(1) features
        self.gram = np.zeros((capacity, len(upper[0])), dtype=np.float32)
        memory = self.config.memory
        # (memory, seasons): column s sums the last P_s - 1 changes
        self._season_sums = np.array(
            [[j < p - 1 for p in self.config.seasons] for j in range(memory)], dtype=np.float32
        ).reshape(memory, len(self.config.seasons))
        self.cross = np.zeros((capacity, k))
        self.pred = np.full((capacity, len(COMPONENTS)), np.nan)  # forecasts of the next value
        self.sxx = np.zeros((capacity, 3))  # EW moments of the predicted changes (rnn, ar)
        self.sxy = np.zeros((capacity, 2))  # ... and of each with the change that followed
        self.mixed = np.full(capacity, np.nan)  # the mix's forecast of the next value (unguarded)
        self.record = np.full(capacity, np.nan)  # the guard's record (NaN: none kept yet)

    @property
    def capacity(self) -> int:
        return len(self.count)

    def state_arrays(self) -> dict[str, np.ndarray]:
        """Per-slot arrays for checkpoints and eviction (none when combination is off)."""
        if not self.config.enabled:
            return {}
        return {
            "count": self.count,
            "last": self.last,
            "change_var": self.change_var,
            "lags": self.lags,
            "level": self.level,
            "smooth": self.smooth,
            "day": self.day,
            "last_ts": self.last_ts,
            "day_next": self.day_next,
            "scale": self.scale,
            "coef": self.coef,
            "gram": self.gram,
            "cross": self.cross,
            "pred": self.pred,
            "sxx": self.sxx,
            "sxy": self.sxy,
            "mixed": self.mixed,
            "record": self.record,
        }

    def grow(self, capacity: int) -> None:
        """Make room for at least ``capacity`` slots; new slots start empty."""
        extra = capacity - self.capacity
        if extra <= 0 or not self.config.enabled:
            return
        fresh = Combiner(self.config, 1).state_arrays()  # one empty slot, copied into the new
        for key, column in self.state_arrays().items():  # one array at a time: at most one old
            grown = np.empty((capacity, *column.shape[1:]), dtype=column.dtype)  # and one new
            grown[: len(column)] = column
            grown[len(column) :] = fresh[key]
            setattr(self, key, grown)

    def reset(self, slots: np.ndarray) -> None:
        fresh = Combiner(self.config, 1)
        for key, column in self.state_arrays().items():
            column[slots] = getattr(fresh, key)[0]

    def weights(self, slots: np.ndarray) -> np.ndarray:
        """``(B, components)``: each component's share of the forecast (summing to 1).

        The least-squares weights of the RNN and the AR path within the simplex (each >= 0,
        together <= 1; the last value takes the rest): the unconstrained solution where it lies
        inside, else the best point on the simplex's three edges. (Clipping the unconstrained
        weights instead keeps the other weight's value from a fit it no longer belongs to: on
        the macro-economic set that cost 5 % in ``geo_rel_mse``.)"""
        a11, a12, a22 = (self.sxx[slots] + [self.config.ridge, 0.0, self.config.ridge]).T
        b1, b2 = self.sxy[slots].T
        det = a11 * a22 - a12 * a12  # > 0: the moments are a Gram matrix, plus the ridge
        inner_rnn = (a22 * b1 - a12 * b2) / det
        inner_ar = (a11 * b2 - a12 * b1) / det
        inside = (inner_rnn >= 0.0) & (inner_ar >= 0.0) & (inner_rnn + inner_ar <= 1.0)
        # Outside, the best of the three edges (the loss is convex: inside, the inner point is
        # the best of all): the AR path alone, the RNN alone, the two sharing all of it.
        ar_alone = _clip(b2 / a22, 0.0, 1.0)
        rnn_alone = _clip(b1 / a11, 0.0, 1.0)
        share = _clip((a22 - a12 + b1 - b2) / (a11 - 2.0 * a12 + a22), 0.0, 1.0)  # the RNN's
        loss_ar = ar_alone * (ar_alone * a22 - 2.0 * b2)
        loss_rnn = rnn_alone * (rnn_alone * a11 - 2.0 * b1)
        rest = 1.0 - share
        loss_both = share * (share * a11 + 2.0 * rest * a12 - 2.0 * b1) + rest * (
            rest * a22 - 2.0 * b2
        )
        rnn = np.where(loss_rnn < loss_ar, rnn_alone, 0.0)
        ar = np.where(loss_rnn < loss_ar, 0.0, ar_alone)
        both = loss_both < np.minimum(loss_ar, loss_rnn)
        rnn = np.where(inside, inner_rnn, np.where(both, share, rnn))
        ar = np.where(inside, inner_ar, np.where(both, rest, ar))
        return np.stack([1.0 - rnn - ar, rnn, ar], axis=1)

    def step(
        self,
        slots: np.ndarray,
        x: np.ndarray,
        rnn: np.ndarray,
        level: np.ndarray,
        ts: np.ndarray | None = None,
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
        if scored.any():
            self._guard(
                slots[scored],
                x[scored] - self.mixed[slots[scored]],
                change[scored],
                var[scored],
                count[scored],
            )
        lags = self.lags[slots]
        recent = np.empty_like(lags)  # float32, as stored
        recent[:, 0] = change
        recent[:, 1:] = lags[:, :-1]
        lags = np.where(seen[:, None], recent, lags)  # as stored: _learn reads the same features
        self.lags[slots] = lags
        self.last[slots] = x
        if config.smooths:
            rates = self._smooth_rates
            # a plain average of the values so far, then the half-life's EWM
            w = np.maximum(1.0 / count[:, None], rates[None, :])
            smooth = self.smooth[slots]
            self.smooth[slots] = smooth + w * (x[:, None] - smooth)
        scale = np.sqrt(var) + 1e-9 * (1.0 + np.abs(x))
        self.scale[slots] = scale
        self.level[slots] = level
        if config.day_bins:
            self._day(slots, x, ts)
        features = self._features(lags, level, scale, self._anchors(slots), x)  # (k, B)
        ar_change = np.einsum("bk,kb->b", self.coef[slots], features)
        _clip(ar_change, -config.clip, config.clip)
        pred = np.stack([x, rnn, x + scale * ar_change], axis=1)  # (B, components)
        self.pred[slots] = pred
        weights = self.weights(slots)
        self.mixed[slots] = np.einsum("bc,bc->b", weights, pred)
        # The guard: fade the mix towards the last value as its record says it does worse.
        record = self._record(slots, self.count[slots])
        trust = _clip(1.0 - np.maximum(record, 0.0) / config.guard, 0.0, 1.0)
        weights *= trust[:, None]
        weights[:, NAIVE] += 1.0 - trust
        return np.einsum("bc,bc->b", weights, pred), weights

    def _guard(
        self,
        slots: np.ndarray,
        missed: np.ndarray,
        change: np.ndarray,
        var: np.ndarray,
        count: np.ndarray,
    ) -> None:
        """One step of the guard's record: the mix's squared miss less the last value's, in
        typical changes² (this change included: one surprise weighs at most ``clip``²), at the
        stack's pace."""
        config = self.config
        excess = (missed * missed - change * change) / np.maximum(var, 1e-300)
        _clip(excess, -(config.clip**2), config.clip**2)
        excess = np.where(np.isnan(excess), 0.0, excess)  # none mixed (an older checkpoint)
        weight = np.maximum(
            1.0 / (count + config.prior_count), config.alpha(config.weight_halflife)
        )
        record = self._record(slots, count)
        self.record[slots] = record + weight * (excess - record)

    def _record(self, slots: np.ndarray, count: np.ndarray) -> np.ndarray:
        """The guard's record; where none is kept yet, the prior's share of ``count`` samples (a
        stream restored from a checkpoint older than the guard starts with a clean record)."""
        config = self.config
        record = self.record[slots]
        prior = config.guard_prior * config.prior_count / (count + config.prior_count)
        return np.where(np.isnan(record), prior, record)

    def _anchors(self, slots: np.ndarray) -> np.ndarray:
        """``(B, a)``: the levels a stream may revert to: smoothed levels, time of day."""
        if not self.config.day_bins:
            return self.smooth[slots]
        return np.column_stack([self.smooth[slots], self.day_next[slots]])

    def _day(self, slots: np.ndarray, x: np.ndarray, ts: np.ndarray | None) -> None:
        """Fold ``x`` into its time-of-day bin; note the next sample's bin's level (the next
        sample expected one inter-arrival time on; the last value where nothing is known or the
        stream is too fast for a profile). Two entries of a stream's day are read and one
        written, by flat index (not its row)."""
        config = self.config
        bins = config.day_bins
        stamp = np.full(len(slots), np.nan) if ts is None else np.asarray(ts, dtype=np.float64)
        before = self.last_ts[slots]
        step = stamp - before  # NaN where either is unknown
        self.last_ts[slots] = np.where(np.isfinite(stamp), stamp, before)
        # Only a stream that sends at most about once per bin has a profile: each bin then holds
        # the same time on earlier days. A faster stream's bin would only average its last few
        # values (and which bin a value lands in would depend on its arrival time).
        slow = np.isfinite(step) & (step >= 43_200.0 / bins)
        flat = self.day.reshape(-1)  # (capacity * bins,) a view
        at = slots[slow] * bins + _bin(stamp[slow], bins)
        old = flat[at].astype(np.float64)
        flat[at] = np.where(np.isnan(old), x[slow], old + config.day_rate * (x[slow] - old))
        nxt = np.full(len(slots), np.nan)
        nxt[slow] = flat[slots[slow] * bins + _bin(stamp[slow] + step[slow], bins)]
        self.day_next[slots] = np.where(np.isnan(nxt), x, nxt)

    def _features(
        self,
        lags: np.ndarray,
        level: np.ndarray,
        scale: np.ndarray,
        smooth: np.ndarray,
        last: np.ndarray,
    ) -> np.ndarray:
        """``(k, B)`` (feature-major: the pair products below gather whole rows): intercept,
        level z, the lags, the seasonal lags and the smoothed levels, in typical changes."""
        config = self.config
        n_lags, n_seasons = config.lags, len(config.seasons)
        inverse = 1.0 / scale
        out = np.empty((config.features, len(level)))
        out[0] = 1.0
        out[1] = level
        out[2 : 2 + n_lags] = lags[:, :n_lags].T
        # x[t+1-P] - x[t]: minus the sum of the last P - 1 changes (one product, not a cumsum)
        out[2 + n_lags : 2 + n_lags + n_seasons] = -(lags @ self._season_sums).T
        out[2 + n_lags + n_seasons :] = (smooth - last[:, None]).T
        out[2:] *= inverse
        _clip(out[1:], -config.clip, config.clip)
        return out

    def _learn(self, slots: np.ndarray, change: np.ndarray, scale: np.ndarray) -> None:
        """The change that followed the last forecasts, in the frame they were made in: one
        step of the stack's moments and of the AR path's normal equations."""
        config = self.config
        k = config.features
        target = _clip(change / scale, -config.clip, config.clip)  # (B,)
        predicted = (self.pred[slots][:, 1:] - self.last[slots][:, None]) / scale[:, None]
        u = _clip(predicted, -config.clip, config.clip)  # (B, 2): rnn, ar
        # A running average (after ``prior_count`` zeros) until the half-life's weight takes
        # over: a short series decides fast, a long one keeps a steady mix.
        weight = np.maximum(
            1.0 / (self.count[slots] + config.prior_count), config.alpha(config.weight_halflife)
        )[:, None]
        moments = np.stack([u[:, 0] * u[:, 0], u[:, 0] * u[:, 1], u[:, 1] * u[:, 1]], axis=1)
        sxx, sxy = self.sxx[slots], self.sxy[slots]
        self.sxx[slots] = sxx + weight * (moments - sxx)
        self.sxy[slots] = sxy + weight * (u * target[:, None] - sxy)
        phi = self._features(
            self.lags[slots], self.level[slots], scale, self._anchors(slots), self.last[slots]
        )  # (k, B)
        # Past a stream's first ``refit_young`` samples, one sample in ``learn_every`` feeds
        # the AR path's equations (their memory in samples unchanged): most of the AR path's cost.
        count = self.count[slots]
        every, young = config.learn_every, config.refit_young
        fed = (count <= young) | (count % every == 0)
        if not fed.any():
            return
        slots, phi, target, count = slots[fed], phi[:, fed], target[fed], count[fed]
        updates = np.minimum(count, young) + np.maximum(count - young, 0) // every
        rate = np.maximum(1.0 / updates, (1.0 - config.forgetting) * every)  # updates >= 1
        # In float32 (as stored): the products feature-major (whole rows), the update slot-major.
        pairs = np.empty((len(self._pack_index), len(slots)), dtype=np.float32)
        phi32 = phi.astype(np.float32)
        if len(slots) < 256:  # few streams: one gather beats a call per row
            np.multiply(phi32[self._rows], phi32[self._cols], out=pairs)
        else:
            for i, (start, end) in enumerate(self._row_spans):  # phi_i phi_j for j >= i
                np.multiply(phi32[i], phi32[i:], out=pairs[start:end])
        # The update slot-major and contiguous: the products are read transposed once (three
        # in-place passes over the transposed view cost ~3x as much at 10,000 streams).
        old = np.take(self.gram, slots, axis=0)  # (B, k (k + 1) / 2)
        gram = np.subtract(pairs.T, old, out=np.empty_like(old))
        gram *= rate.astype(np.float32)[:, None]
        gram += old
        self.gram[slots] = gram
        cross = self.cross[slots]
        cross += rate[:, None] * (phi.T * target[:, None] - cross)
        self.cross[slots] = cross
        # Solve them now and then (after every update while a stream is young): a solve costs
        # what ~k updates do. The prior (zero weights: the last value) is worth 1 / prior samples.
        due = (
            (count <= young // 4)
            | ((count <= young) & (count % 4 == 0))
            | (count % config.refit_every == 0)
        )
        if due.any():
            a = np.take(gram[due].astype(np.float64), self._unpack, axis=1)  # (B, k * k)
            a[:, :: k + 1] += (rate[due] / config.prior)[:, None]  # the prior on the diagonal
            a = a.reshape(-1, k, k)
            self.coef[slots[due]] = np.linalg.solve(a, cross[due][:, :, None])[:, :, 0]


def _bin(stamp: np.ndarray, bins: int) -> np.ndarray:
    """Time-of-day bin of Unix times (UTC days).

    >>> _bin(np.array([0.0, 43_200.0, 86_399.0]), 24).tolist()
    [0, 12, 23]
    """
    return np.minimum((stamp % 86_400.0 * (bins / 86_400.0)).astype(np.int64), bins - 1)


def _clip(x: np.ndarray, low: float, high: float) -> np.ndarray:
    """``np.clip(x, low, high)`` in place (``np.clip``'s own overhead shows on small ticks)."""
    np.maximum(x, low, out=x)
    return np.minimum(x, high, out=x)
