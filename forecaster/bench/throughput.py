"""``forecaster bench throughput``: the daemon against a no-model relay on the same broker and
load (single samples and device frames); ``forecaster bench profile``: where a frame's time goes."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from forecaster.bench.load import (
    Collector,
    close_bench,
    device_frame,
    offer,
    proc_figures,
    start_target,
)
from forecaster.progress import progress_bar
from forecaster.runtime import tune_process


def bench_frames(
    port: int,
    folder: Path,
    collector: Collector,
    size: int = 100,
    count: int = 1500,
    seconds: float = 10.0,
) -> dict[str, object]:
    """Device frames of ``size`` readings (100 devices, so 100 x ``size`` streams) offered as fast
    as the publisher goes for at least ``seconds`` (and ``count`` frames), to the relay (payload
    republished) and to the daemon (output frames)."""
    import shutil
    import signal

    figures: dict[str, dict] = {}
    for kind in ("relay", "forecaster"):
        proc = start_target(kind, port, folder, collector, frames=True)
        try:
            cpu0, _ = proc_figures(proc.pid)  # type: ignore[attr-defined]
            per = size if kind == "forecaster" else 1
            got = offer(collector, port, 100, count, 0, "publish_frames", per, seconds)
            cpu1, rss = proc_figures(proc.pid)  # type: ignore[attr-defined]
        finally:
            proc.send_signal(signal.SIGTERM)  # type: ignore[attr-defined]
            proc.wait(30)  # type: ignore[attr-defined]
            shutil.rmtree(folder / "state", ignore_errors=True)
        figures[kind] = {**got, "cpu_s": cpu1 - cpu0, "rss_mb": rss}
    daemon, relay = figures["forecaster"], figures["relay"]
    relay_samples = relay["per_s"] * size
    return {
        "samples_per_frame": size,
        "streams": 100 * size,
        "frames_offered": daemon["sent"],
        "relay_frames_offered": relay["sent"],
        "samples_per_s": daemon["per_s"],
        "relay_samples_per_s": relay_samples,
        "ratio": daemon["per_s"] / relay_samples,
        "p50_ms_saturated": daemon["p50_ms"],
        "p99_ms_saturated": daemon["p99_ms"],
        "p99_samples": daemon["latency_samples"],
        "cpu_s_per_1000": 1000 * daemon["cpu_s"] / max(1, daemon["received"]),
        "rss_mb": daemon["rss_mb"],
        "received": daemon["received"],
        "relay_received": relay["received"] * size,
    }


def bench_throughput(
    sizes: tuple[int, ...] = (1, 100, 1000, 10_000),
    count: int = 20_000,
    seconds: float = 10.0,
    frame_size: int = 100,
    repeats: int = 3,
) -> dict[str, object]:
    """For each stream count: the relay's and the daemon's sustained rate at saturation (and the
    p99 latency there), then p50/p99 latency at half the relay's peak rate, CPU per 1,000 samples
    and peak RSS; the two run one after the other over the same Mosquitto broker. Each offer
    lasts at least ``seconds`` (at saturation: as fast as the publisher goes, at least ``count``
    messages), so a p99 rests on thousands of samples (``p99_samples`` says how many).

    The relay-then-daemon pair runs ``repeats`` times per stream count, interleaved; each
    figure is the median over the pairs (the ratios: of each pair's own), with its spread
    (``spread``: min and max) and every pair (``pairs``): on a shared 2-core machine one pair's
    ratio moved between 0.69 and 1.09."""
    import shutil
    import signal
    import tempfile

    from forecaster.demo import start_broker

    folder = Path(tempfile.mkdtemp(prefix="forecaster-bench-"))
    broker, port, name = start_broker(folder, "mosquitto")
    collector = Collector(port)
    runs = []
    try:
        for streams in progress_bar(sizes, desc="stream counts", leave=False):
            pairs = []
            for _ in progress_bar(
                range(repeats), desc=f"{streams} streams", leave=False, disable=repeats < 2
            ):
                figures: dict[str, dict] = {}
                for kind in ("relay", "forecaster"):
                    proc = start_target(kind, port, folder, collector)
                    try:
                        cpu0, _ = proc_figures(proc.pid)  # type: ignore[attr-defined]
                        broker0, _ = proc_figures(broker.pid)
                        saturated = offer(
                            collector, port, streams, max(count, 2 * streams), 0, seconds=seconds
                        )
                        cpu1, _ = proc_figures(proc.pid)  # type: ignore[attr-defined]
                        broker1, _ = proc_figures(broker.pid)
                        peak = (
                            figures["relay"]["saturated"]["per_s"]
                            if kind == "forecaster"
                            else saturated["per_s"]
                        )
                        rate = peak / 2
                        fixed = offer(collector, port, streams, int(rate * seconds), rate)
                        _, rss = proc_figures(proc.pid)  # type: ignore[attr-defined]
                    finally:
                        proc.send_signal(signal.SIGTERM)  # type: ignore[attr-defined]
                        proc.wait(30)  # type: ignore[attr-defined]
                        shutil.rmtree(folder / "state", ignore_errors=True)
                    figures[kind] = {
                        "saturated": saturated,
                        "half_peak": fixed,
                        "cpu_s_per_1000": 1000 * (cpu1 - cpu0) / max(1, saturated["received"]),
                        "broker_cpu_s_per_1000": (
                            1000 * (broker1 - broker0) / max(1, saturated["received"])
                        ),
                        "rss_mb": rss,
                    }
                pairs.append(_pair_figures(streams, figures["relay"], figures["forecaster"]))
            keys = [key for key in pairs[0] if key != "streams"]
            run = {key: float(np.median([p[key] for p in pairs])) for key in keys}
            spread = {key: [min(p[key] for p in pairs), max(p[key] for p in pairs)] for key in keys}
            runs.append(
                {
                    "streams": streams,
                    **run,
                    "ratios": [p["ratio"] for p in pairs],
                    "spread": spread,
                    "pairs": pairs,
                }
            )
        frames = (
            bench_frames(port, folder, collector, frame_size, seconds=seconds)
            if frame_size
            else None
        )
    finally:
        close_bench(collector, broker, folder)
    return {
        "broker": name,
        "messages_per_run": count,  # at least: each offer lasts at least ``seconds``
        "seconds_per_offer": seconds,
        "repeats": repeats,
        "runs": runs,
        "frames": frames,
    }


def _pair_figures(streams: int, relay: dict, daemon: dict) -> dict[str, float]:
    """One relay run and the daemon run after it, side by side."""
    return {
        "streams": streams,
        "forecaster_per_s": daemon["saturated"]["per_s"],
        "relay_per_s": relay["saturated"]["per_s"],
        "ratio": daemon["saturated"]["per_s"] / relay["saturated"]["per_s"],
        "offered_per_s": relay["saturated"]["per_s"] / 2,
        "p50_ms": daemon["half_peak"]["p50_ms"],
        "p99_ms": daemon["half_peak"]["p99_ms"],
        "p99_samples": daemon["half_peak"]["latency_samples"],
        "p99_ms_saturated": daemon["saturated"]["p99_ms"],
        "relay_p50_ms": relay["half_peak"]["p50_ms"],
        "relay_p99_ms": relay["half_peak"]["p99_ms"],
        "relay_p99_samples": relay["half_peak"]["latency_samples"],
        # the daemon's tail in units of the relay's, the same pair (same machine state)
        "p99_ratio": daemon["half_peak"]["p99_ms"] / relay["half_peak"]["p99_ms"],
        "cpu_s_per_1000": daemon["cpu_s_per_1000"],
        "relay_cpu_s_per_1000": relay["cpu_s_per_1000"],
        # Mosquitto's CPU for the same messages: in with the load, out with the daemon's forecasts
        "broker_cpu_s_per_1000": daemon["broker_cpu_s_per_1000"],
        "relay_broker_cpu_s_per_1000": relay["broker_cpu_s_per_1000"],
        "rss_mb": daemon["rss_mb"],
        "relay_rss_mb": relay["rss_mb"],
        "sent": daemon["saturated"]["sent"],
        "received": daemon["saturated"]["received"],
        "relay_sent": relay["saturated"]["sent"],
        "relay_received": relay["saturated"]["received"],
    }


def print_throughput(result: dict[str, object], as_json: bool) -> None:
    if as_json:
        print(json.dumps(result))
        return
    repeats = result.get("repeats", 1)
    medians = f", medians of {repeats} relay-then-daemon pairs" if repeats != 1 else ""
    print(
        f"one sample per message over {result['broker']}; forecaster vs the no-model relay{medians}:"
    )
    print(
        f"  {'streams':>7} {'forecaster/s':>12} {'relay/s':>8} {'ratio':>6} {'p50 ms':>7} {'p99 ms':>7}"
        f" {'(n)':>6} {'/relay':>6} {'p99 sat':>8} {'cpu s/1k':>9} {'relay cpu':>9} {'broker':>7}"
        f" {'(relay)':>7} {'RSS MB':>7}"
    )
    for r in result["runs"]:  # type: ignore[attr-defined]
        print(
            f"  {r['streams']:>7} {r['forecaster_per_s']:>12.0f} {r['relay_per_s']:>8.0f} {r['ratio']:>6.2f}"
            f" {r['p50_ms']:>7.2f} {r['p99_ms']:>7.2f} {r['p99_samples']:>6.0f} {r['p99_ratio']:>6.2f}"
            f" {r['p99_ms_saturated']:>8.1f}"
            f" {r['cpu_s_per_1000']:>9.3f} {r['relay_cpu_s_per_1000']:>9.3f}"
            f" {r['broker_cpu_s_per_1000']:>7.3f} {r['relay_broker_cpu_s_per_1000']:>7.3f}"
            f" {r['rss_mb']:>7.0f}"
            + (f"  ratios {', '.join(f'{x:.2f}' for x in r['ratios'])}" if repeats != 1 else "")
        )
    print(
        "  (p50/p99 at half the relay's peak rate, (n) latencies behind the p99, /relay the p99 over"
        " the relay's in the same pair; p99 sat at saturation; CPU s per 1,000 messages at"
        " saturation: the daemon, the relay, Mosquitto beside each)"
    )
    backlog = result.get("backlog")
    if backlog:
        from forecaster.bench.backlog import print_backlog

        print_backlog(backlog, False)  # type: ignore[arg-type]
    frames = result.get("frames")
    if frames:
        print(
            f"frames of {frames['samples_per_frame']} samples ({frames['streams']} streams), output"
            f" frames: forecaster {frames['samples_per_s']:.0f} samples/s, relay"
            f" {frames['relay_samples_per_s']:.0f} (ratio {frames['ratio']:.2f}); p50/p99"
            f" {frames['p50_ms_saturated']:.0f}/{frames['p99_ms_saturated']:.0f} ms saturated,"
            f" {frames['cpu_s_per_1000']:.3f} CPU s per 1k samples, {frames['rss_mb']:.0f} MB RSS"
        )


def profile_frames(frames: int = 1000, size: int = 100, devices: int = 100) -> dict[str, float]:
    """Where the engine thread's time goes on device frames: ``Daemon.step`` under cProfile, fed
    straight from its inbox (no broker; publish and ack are no-ops). Returns microseconds per
    sample spent in each stage (cumulative, profiler overhead included) and in all of ``step``."""
    import cProfile
    import pstats
    import shutil
    import tempfile

    from forecaster.config import Config
    from forecaster.daemon import Daemon
    from forecaster.mqtt import RawMessage

    folder = tempfile.mkdtemp(prefix="forecaster-profile-")
    mqtt = {"frame_topics": ["load/in/{device}"], "output_frames": True, "qos_in": 0}
    config = Config.model_validate(
        {"mqtt": mqtt, "state": {"dir": folder}, "metrics": {"enabled": False}}
    )
    daemon = Daemon(config)
    tune_process(1)
    daemon.keeper.replay_journal(daemon.keeper.build_engine())
    daemon.link.publish = lambda *args, **kwargs: True  # type: ignore[method-assign]
    daemon.link.ack = lambda batch: None  # type: ignore[method-assign]

    def offer(first: int, count: int) -> None:
        for i in range(first, first + count):
            topic, payload = f"load/in/d{i % devices}", device_frame(i // devices, size)
            daemon.inbox.put(RawMessage(topic, payload.encode(), time.time(), 0))

    def drain() -> None:
        while daemon.step(0.0):
            pass

    offer(0, devices)
    drain()  # every stream exists before the profile
    offer(devices, frames)
    profile = cProfile.Profile()
    profile.runcall(drain)
    stages = {
        "Daemon.step (all)": ("daemon.py", "step"),
        "metrics.observe_columns": ("metrics.py", "observe_columns"),
        "engine.tick_batch": ("engine.py", "tick_batch"),
        "orjson.dumps (forecasts)": ("~", "<orjson.dumps>"),
        "journal append (SQLite)": ("journal.py", "append"),
        "engine.admit (journal seq)": ("engine.py", "admit"),
        "parse_message": ("parse.py", "parse_message"),
        "forecast_bodies": ("outbox.py", "forecast_bodies"),
    }
    cumulative = {
        (Path(file).name, name): ct
        for (file, _, name), (_, _, _, ct, _) in pstats.Stats(profile).stats.items()  # type: ignore[attr-defined]
    }
    daemon.journal.close()  # type: ignore[union-attr]
    shutil.rmtree(folder, ignore_errors=True)  # the state it wrote is of no further use
    samples = frames * size
    return {label: 1e6 * cumulative.get(key, 0.0) / samples for label, key in stages.items()}


def print_profile(result: dict[str, float], as_json: bool) -> None:
    if as_json:
        print(json.dumps(result))
        return
    print("engine thread on device frames, microseconds per sample (cumulative, under cProfile):")
    for label, us in result.items():
        print(f"  {label:<28}{us:8.2f}")
