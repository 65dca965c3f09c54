"""Pure signal generators shared by training, evaluation and the MQTT simulator.

The time base is the seed's: 20 samples per half period (a step of pi/20 radians) at
``freq_scale=1``; ``freq_scale=2`` means 10 samples per half period.
"""

from __future__ import annotations

import numpy as np

SEED_STEP = np.pi / 20  # radians per sample in the seed tutorial


def sine_wave(
    n: int,
    *,
    amplitude: float = 1.0,
    offset: float = 0.0,
    freq_scale: float = 1.0,
    phase: float = 0.0,
    noise: float = 0.0,
    seed: int | None = 0,
    start: int = 0,
) -> np.ndarray:
    """``n`` samples of ``offset + amplitude * sin(phase + t * freq_scale * pi/20) + N(0, noise²)``.

    >>> sine_wave(3, amplitude=2.0, offset=10.0).round(4).tolist()
    [10.0, 10.3129, 10.618]
    """
    t = np.arange(start, start + n, dtype=np.float64)
    values = offset + amplitude * np.sin(phase + t * freq_scale * SEED_STEP)
    if noise > 0:
        values = values + noise * np.random.default_rng(seed).standard_normal(n)
    return values


def random_sines(
    n_streams: int,
    length: int,
    rng: np.random.Generator,
    *,
    freq_range: tuple[float, float] = (0.25, 3.0),
    max_noise: float = 0.3,
    clean_share: float = 0.4,
    switch_share: float = 0.2,
) -> np.ndarray:
    """``(n_streams, length)`` sine-like streams with random frequency, phase, amplitude, offset,
    noise (relative to amplitude; ``clean_share`` of streams have none) and, for ``switch_share``
    of them, one regime change (new frequency and amplitude) at a random time."""
    t = np.arange(length, dtype=np.float64)

    def draw_freq(size: int) -> np.ndarray:
        low, high = np.log(freq_range[0]), np.log(freq_range[1])
        return np.exp(rng.uniform(low, high, size))

    freq = draw_freq(n_streams)[:, None]
    amplitude = np.exp(rng.uniform(np.log(1e-2), np.log(1e3), n_streams))[:, None]
    offset = amplitude * rng.uniform(-5.0, 5.0, (n_streams, 1))
    phase = rng.uniform(0, 2 * np.pi, (n_streams, 1))
    angle = phase + t * freq * SEED_STEP  # (n_streams, length)
    scale = np.broadcast_to(amplitude, (n_streams, length)).copy()
    switch = rng.random(n_streams) < switch_share
    for i in np.flatnonzero(switch):
        at = rng.integers(length // 4, length)
        new_freq = draw_freq(1)[0]
        angle[i, at:] = angle[i, at - 1] + (t[at:] - t[at - 1]) * new_freq * SEED_STEP
        scale[i, at:] *= np.exp(rng.uniform(np.log(0.3), np.log(3.0)))
    rel_noise = np.exp(rng.uniform(np.log(0.005), np.log(max_noise), (n_streams, 1)))
    rel_noise[rng.random(n_streams) < clean_share] = 0.0
    noise = rel_noise * amplitude * rng.standard_normal((n_streams, length))
    return offset + scale * np.sin(angle) + noise
