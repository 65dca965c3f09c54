"""Gaps in a stream's timestamps: after one, the hidden state starts afresh and re-warms."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from forecaster import ewm
from forecaster.config import GapConfig
from forecaster.streams import StreamTable

_GAPS = GapConfig()


@dataclass(frozen=True, slots=True)
class GapPolicy:
    """Re-warm a stream after a gap in its ``ts``.

    A gap is an inter-arrival time above ``factor`` x the stream's usual interval (an EWM of its
    inter-arrival times, half-life ``halflife`` intervals, trusted after ``min_intervals`` of
    them). It resets the stream's hidden state (the normaliser keeps its level and scale), and
    the first ``rewarm_samples`` forecasts from then on say ``warm=False``. Gaps are not folded
    into the usual interval; neither are zero or negative intervals (same or older ``ts``).
    """

    factor: float = _GAPS.factor  # defaults: the ``engine.gaps`` config section's
    halflife: float = _GAPS.halflife
    min_intervals: int = _GAPS.min_intervals
    rewarm_samples: int = _GAPS.rewarm_samples

    @property
    def alpha(self) -> float:
        return ewm.alpha(self.halflife)


def detect_gaps(
    policy: GapPolicy, table: StreamTable, slots: np.ndarray, ts: np.ndarray, before: torch.Tensor
) -> tuple[np.ndarray, int]:
    """Detect gaps, reset those streams' state in ``before``; each forecast's warm, and the
    number of states reset."""
    usual = table.interval[slots]
    with np.errstate(invalid="ignore", over="ignore"):  # NaN/inf only where ts is unknown
        dt = ts - table.last_ts[slots]  # NaN where either is unknown
        gap = (table.intervals[slots] >= policy.min_intervals) & (dt > policy.factor * usual)
        ordinary = (dt > 0) & np.isfinite(dt) & ~gap
        weight = np.maximum(1.0 / (table.intervals[slots] + 1), policy.alpha)
        folded = np.where(np.isnan(usual), dt, usual + weight * (dt - usual))
    table.interval[slots[ordinary]] = folded[ordinary]
    table.intervals[slots[ordinary]] += 1
    if gap.any():
        before[:, torch.from_numpy(gap).to(before.device)] = 0.0  # a fresh state
        table.cold[slots[gap]] = policy.rewarm_samples
    cold = table.cold[slots]
    table.cold[slots] = np.maximum(cold - 1, 0)
    return cold == 0, int(gap.sum())
