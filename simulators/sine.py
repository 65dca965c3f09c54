"""Sine-signal simulator: N streams at R samples/s each, published to MQTT.

Each stream's amplitude, frequency, phase, offset and noise are drawn from ``--seed``; values depend
only on the seed and the sample index (never on wall time), so a run is reproducible and the same
sequence can be replayed offline through the engine. Optional regime change, spikes and gaps.

    python -m simulators.sine --streams 5 --rate 10 --port 1883
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from simulators.signals import SEED_STEP

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SineSpec:
    streams: int = 5
    seed: int = 0
    amplitude: tuple[float, float] = (0.5, 20.0)  # log-uniform range
    offset: tuple[float, float] = (-50.0, 50.0)
    freq_scale: tuple[float, float] = (0.5, 2.0)  # x the seed's 20 samples per half period
    noise: float = 0.02  # sigma, relative to each stream's amplitude
    switch_at: int | None = None  # sample index of a regime change
    switch_freq: float = 1.7  # frequency multiplier after the switch
    switch_amp: float = 2.0  # amplitude multiplier after the switch
    spike_prob: float = 0.0  # chance per sample of a spike of +-spike_size amplitudes
    spike_size: float = 5.0
    gap_prob: float = 0.0  # chance per sample that a gap of gap_len samples starts
    gap_len: int = 20


class SineStreams:
    """Deterministic values: ``rounds()`` yields ``(index, values, present)`` per sample index."""

    def __init__(self, spec: SineSpec) -> None:
        self.spec = spec
        rng = np.random.default_rng(spec.seed)
        n = spec.streams
        self.amplitude = np.exp(rng.uniform(*np.log(spec.amplitude), n))
        self.offset = rng.uniform(*spec.offset, n)
        self.freq = np.exp(rng.uniform(*np.log(spec.freq_scale), n))
        self.phase = rng.uniform(0, 2 * np.pi, n)
        self.noise_rng = np.random.default_rng([spec.seed, 1])
        self.event_rng = np.random.default_rng([spec.seed, 2])
        self.names = [f"sine-{i:03d}" for i in range(n)]

    def values(self, index: int) -> np.ndarray:
        """Clean value of every stream at ``index`` (no noise, spikes or gaps)."""
        spec = self.spec
        freq, amplitude, angle0 = self.freq, self.amplitude, self.phase
        if spec.switch_at is not None and index >= spec.switch_at:
            angle0 = self.phase + spec.switch_at * self.freq * SEED_STEP
            freq = self.freq * spec.switch_freq
            amplitude = self.amplitude * spec.switch_amp
            return self.offset + amplitude * np.sin(
                angle0 + (index - spec.switch_at) * freq * SEED_STEP
            )
        return self.offset + amplitude * np.sin(angle0 + index * freq * SEED_STEP)

    def rounds(self, count: int | None = None) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        spec = self.spec
        n = spec.streams
        gap_left = np.zeros(n, dtype=np.int64)
        index = 0
        while count is None or index < count:
            values = self.values(index)
            values = values + spec.noise * self.amplitude * self.noise_rng.standard_normal(n)
            if spec.spike_prob > 0:
                spikes = self.event_rng.random(n) < spec.spike_prob
                signs = self.event_rng.choice([-1.0, 1.0], n)
                values = values + spikes * signs * spec.spike_size * self.amplitude
            if spec.gap_prob > 0:
                start = (gap_left == 0) & (self.event_rng.random(n) < spec.gap_prob)
                gap_left[start] = spec.gap_len
            present = gap_left == 0
            gap_left = np.maximum(gap_left - 1, 0)
            yield index, values, present
            index += 1


def publish_sine(
    client: object,
    streams: SineStreams,
    *,
    rate: float,
    count: int | None,
    topic: str = "sensors/{stream}/value",
    qos: int = 0,
    with_seq: bool = False,
    stop: object = None,
) -> int:
    """Publish rounds at ``rate`` rounds/s (0: as fast as possible); returns messages sent."""
    sent = 0
    started = time.monotonic()
    for index, values, present in streams.rounds(count):
        if stop is not None and stop.is_set():  # type: ignore[attr-defined]
            break
        if rate > 0:
            delay = started + index / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        now = time.time()
        for name, value, ok in zip(streams.names, values, present, strict=True):
            if not ok:
                continue
            body: dict[str, object] = {"value": float(value), "ts": now}
            if with_seq:
                body["seq"] = index + 1
            client.publish(topic.replace("{stream}", name), json.dumps(body), qos=qos)  # type: ignore[attr-defined]
            sent += 1
    return sent


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="localhost")
    parser.add_argument("--port", type=int, default=1883)
    parser.add_argument("--topic", default="sensors/{stream}/value")
    parser.add_argument(
        "--qos",
        type=int,
        choices=[0, 1, 2],
        default=1,
        help="1 (default): the broker keeps what the daemon has not taken yet, so a restart"
        " loses nothing; 0 drops what is sent while the daemon is down",
    )
    parser.add_argument("--streams", type=int, default=5)
    parser.add_argument("--rate", type=float, default=10.0, help="samples/s per stream (0: max)")
    parser.add_argument("--count", type=int, help="samples per stream, then exit")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--noise", type=float, default=0.02, help="sigma relative to amplitude")
    parser.add_argument("--switch-at", type=int, help="sample index of a regime change")
    parser.add_argument("--switch-freq", type=float, default=1.7)
    parser.add_argument("--switch-amp", type=float, default=2.0)
    parser.add_argument("--spike-prob", type=float, default=0.0)
    parser.add_argument("--gap-prob", type=float, default=0.0)
    parser.add_argument("--gap-len", type=int, default=20)
    parser.add_argument("--with-seq", action="store_true", help="put a per-stream seq in payloads")


def spec_from_args(args: argparse.Namespace) -> SineSpec:
    return SineSpec(
        streams=args.streams,
        seed=args.seed,
        noise=args.noise,
        switch_at=args.switch_at,
        switch_freq=args.switch_freq,
        switch_amp=args.switch_amp,
        spike_prob=args.spike_prob,
        gap_prob=args.gap_prob,
        gap_len=args.gap_len,
    )


def run(args: argparse.Namespace) -> int:
    from simulators.client import connected_client

    client = connected_client(args.host, args.port, "forecaster-sim-sine")
    streams = SineStreams(spec_from_args(args))
    log.info(
        "publishing %d streams at %g samples/s each to %s", args.streams, args.rate, args.topic
    )
    try:
        sent = publish_sine(
            client,
            streams,
            rate=args.rate,
            count=args.count,
            topic=args.topic,
            qos=args.qos,
            with_seq=args.with_seq,
        )
    except KeyboardInterrupt:
        sent = -1
    finally:
        client.loop_stop()
        client.disconnect()
    if sent >= 0:
        log.info("sent %d messages", sent)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m simulators.sine", description=__doc__)
    add_arguments(parser)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
