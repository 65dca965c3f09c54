"""Exponentially weighted means: the one place their arithmetic is written.

The normaliser, the scorer, the gap detector, the metrics' rolling errors and the evaluation's
rolling MSE all forget at a half-life given in samples (or intervals). Written once, the same
half-life gives the same weight everywhere, bit for bit.
"""

from __future__ import annotations

import math
from typing import TypeVar

import numpy as np

Array = TypeVar("Array", float, np.ndarray)


def alpha(halflife: float) -> float:
    """The newest value's weight in an EWM that halves an old value's weight every ``halflife``.

    >>> alpha(1.0)
    0.5
    >>> round((1.0 - alpha(20.0)) ** 20, 12)
    0.5
    """
    return 1.0 - math.pow(0.5, 1.0 / halflife)


def mean_var(mean: Array, var: Array, x: Array, weight: Array) -> tuple[Array, Array]:
    """Fold ``x`` into an EWM mean and variance with ``weight`` (West's incremental update).

    A weight of ``max(1 / count, alpha)`` makes the first values a plain running average.

    >>> mean_var(0.0, 0.0, 2.0, 0.5)
    (1.0, 1.0)
    """
    delta = x - mean
    return mean + weight * delta, (1.0 - weight) * (var + weight * delta * delta)
