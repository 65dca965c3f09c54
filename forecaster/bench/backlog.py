"""Catch-up after an outage: QoS 1 samples queued in the broker while the daemon is down, then
the time until it has forecast all of them and is live again.

What a user meets after a restart, an upgrade or a lost machine: the broker holds the daemon's
persistent session and every sample sent meanwhile (Mosquitto here, with no queue limit), and the
daemon must work the backlog off, in order, before its forecasts are current again.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

from forecaster.bench.load import Collector, close_bench, start_target
from forecaster.runtime import tune_process


def bench_backlog(streams: int = 1000, seconds: float = 60.0, hz: float = 1.0) -> dict[str, float]:
    """``streams`` streams sending ``hz`` samples/s each, the daemon down for ``seconds``: the
    backlog (``streams * seconds * hz`` QoS 1 messages) is queued, then the daemon starts.
    Reports the time until it is online, until it has forecast the whole backlog (caught up:
    live again), and the rate it worked the backlog off at."""
    import tempfile

    from forecaster.demo import start_broker

    tune_process(1)
    folder = Path(tempfile.mkdtemp(prefix="forecaster-backlog-"))
    # No per-client queue limit (Mosquitto's default keeps 1,000 and drops the rest).
    broker, port, _ = start_broker(folder, "mosquitto", "max_queued_messages 0\n")
    collector = Collector(port)
    backlog = int(streams * seconds * hz)
    try:
        # A first start leaves the daemon's persistent session (its subscription) in the broker.
        daemon = start_target("forecaster", port, folder, collector, qos=1)
        daemon.send_signal(signal.SIGTERM)  # type: ignore[attr-defined]
        daemon.wait(30)  # type: ignore[attr-defined]
        code = (
            "from forecaster.bench.load import publish_load; "
            f"print(publish_load({port}, {streams}, {backlog}, 0, qos=1))"
        )
        queued_at = time.monotonic()
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"the backlog's publisher failed: {done.stderr[-2000:]}")
        queue_s = time.monotonic() - queued_at
        collector.reset()
        started = time.monotonic()
        daemon = start_target("forecaster", port, folder, collector, qos=1)
        online_s = time.monotonic() - started
        deadline, seen, quiet_since = started + 1800, -1, time.monotonic()
        while len(collector.times) < backlog and time.monotonic() < deadline:
            if len(collector.times) != seen:
                seen, quiet_since = len(collector.times), time.monotonic()
            elif time.monotonic() - quiet_since > 30.0:
                break  # nothing for 30 s: the rest is lost (reported as received < backlog)
            time.sleep(0.05)
        caught_up_s = (
            time.monotonic() - started if len(collector.times) >= backlog else float("nan")
        )
        received = len(collector.times)
        first = collector.times[0] - started if collector.times else float("nan")
        daemon.send_signal(signal.SIGTERM)  # type: ignore[attr-defined]
        daemon.wait(60)  # type: ignore[attr-defined]
    finally:
        close_bench(collector, broker, folder)
    return {
        "streams": streams,
        "down_s": seconds,
        "backlog": backlog,
        "received": received,
        "queue_s": queue_s,  # publishing the backlog (QoS 1, every message acknowledged)
        "online_s": online_s,  # from the daemon's start to its "online"
        "first_forecast_s": first,
        "caught_up_s": caught_up_s,  # from the start to the backlog's last forecast
        "catch_up_per_s": backlog / (caught_up_s - first) if caught_up_s == caught_up_s else 0.0,
    }


def print_backlog(result: dict[str, float], as_json: bool) -> None:
    import json

    if as_json:
        print(json.dumps(result))
        return
    r = result
    print(
        f"{r['streams']} streams down {r['down_s']:.0f} s: {r['backlog']} QoS 1 samples queued"
        f" (in {r['queue_s']:.1f} s); after the start: online {r['online_s']:.1f} s, first forecast"
        f" {r['first_forecast_s']:.1f} s, caught up {r['caught_up_s']:.1f} s"
        f" ({r['catch_up_per_s']:.0f} samples/s; {r['received']} of {r['backlog']} forecast)"
    )
