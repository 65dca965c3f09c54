"""Bounds by default: the machine-sized stream bound and the per-source new-stream allowance,
through the limiter alone and through the daemon over Mosquitto."""

from __future__ import annotations

from pathlib import Path

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from forecaster.config import Config
from forecaster.limits import AUTO_MAX, AUTO_MIN, STREAM_BYTES, NewStreamLimit, auto_max_streams
from tests.conftest import Broker, Collector
from tests.helpers import RunningDaemon, daemon_config, metric_value, wait_until


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_the_default_stream_bound_is_sized_to_the_machine() -> None:
    bound = Config().engine.max_streams
    assert AUTO_MIN <= bound <= AUTO_MAX
    assert bound == auto_max_streams()
    assert auto_max_streams(16 * 2**30) == 2 * auto_max_streams(8 * 2**30)
    assert Config.model_validate({"engine": {"max_streams": 0}}).engine.max_streams == 0


def test_each_source_gets_a_burst_then_a_steady_rate_of_new_ids() -> None:
    clock = Clock()
    limit = NewStreamLimit(rate=2.0, burst=2, levels=1, clock=clock)
    known = {"old"}
    streams = ["a", "old", "b", "a", "c", "x"]
    topics = ["p/a", "p/old", "p/b", "p/a", "p/c", "q/x"]
    # a and b take p's two tokens (a twice in one tick takes one), c finds none; q is its own source
    refused = limit.refused(streams, topics, known.__contains__)
    assert refused.tolist() == [False, False, False, False, True, False]
    known |= {"a", "b", "x"}
    assert limit.refused(["c"], ["p/c"], known.__contains__).tolist() == [True]
    clock.now = 0.5  # one token back at 2 a second
    assert limit.refused(["c", "d"], ["p/c", "p/d"], known.__contains__).tolist() == [False, True]


def test_the_daemon_refuses_new_ids_past_the_allowance_and_counts_them(
    broker: Broker, prefix: str, tmp_path: Path, publisher
) -> None:
    config = daemon_config(
        broker, prefix, tmp_path / "state", engine={"new_streams": {"burst": 3, "per_s": 0.001}}
    )
    with Collector(broker, f"{prefix}/forecasts/+") as collector, RunningDaemon(config) as running:

        def refused() -> float:
            text = running.scrape()
            return metric_value(
                text, "forecaster_samples_rejected_total", reason="new_stream_limit"
            )

        for i in range(6):  # one publisher, QoS 1: they arrive in this order
            publisher.publish(f"{prefix}/sensors/s{i}/value", "1.5", qos=1)
        wait_until(lambda: refused() == 3, "three new ids refused")
        publisher.publish(f"{prefix}/sensors/s0/value", "2.5", qos=1)  # known: served
        publisher.publish(f"{prefix}/sensors/s5/value", "2.5", qos=1)  # still no token
        got = collector.wait_for(4)
        wait_until(lambda: refused() == 4, "the refused id refused again")
    assert sorted((f["stream"], f["seq"]) for f in got) == [
        ("s0", 1),
        ("s0", 2),
        ("s1", 1),
        ("s2", 1),
    ]


def test_a_parked_stream_is_not_new_to_the_allowance(
    broker: Broker, prefix: str, tmp_path: Path, publisher
) -> None:
    engine = {"new_streams": {"burst": 3, "per_s": 0.001}, "max_streams": 2}
    config = daemon_config(broker, prefix, tmp_path / "state", engine=engine)
    with Collector(broker, f"{prefix}/forecasts/+") as collector, RunningDaemon(config) as running:
        for i in range(3):  # the three tokens; s0 is parked to make room for s2
            publisher.publish(f"{prefix}/sensors/s{i}/value", "1.5", qos=1)
        collector.wait_for(3)
        wait_until(lambda: running.daemon.engine.evictions >= 1, "s0 parked")
        publisher.publish(f"{prefix}/sensors/s0/value", "2.5", qos=1)  # seen before: no token
        got = collector.wait_for(4)
        text = running.scrape()
        assert (
            metric_value(text, "forecaster_samples_rejected_total", 0.0, reason="new_stream_limit")
            == 0
        )
    assert ("s0", 2) in [(f["stream"], f["seq"]) for f in got]


def rss_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * 4096


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_two_hundred_thousand_new_ids_with_the_defaults_stay_bounded(
    broker: Broker, prefix: str, tmp_path: Path
) -> None:
    """A publisher inventing 200,000 ids: every sample is served or refused and counted, and
    memory grows by at most ~4 KB per admitted stream (docs/operations.md#stream-bound)."""
    ids = 200_000
    config = daemon_config(broker, prefix, tmp_path / "state")
    assert config.engine.new_streams == Config().engine.new_streams  # the defaults
    publisher = paho.Client(CallbackAPIVersion.VERSION2)
    publisher.max_inflight_messages_set(1000)
    publisher.connect(broker.host, broker.port)
    publisher.loop_start()
    with RunningDaemon(config) as running:
        before = rss_bytes()
        for i in range(ids):  # paho's own queue slows down as it grows: 500 at a time
            info = publisher.publish(f"{prefix}/sensors/id{i}/value", "1.0", qos=1)
            if i % 500 == 499:
                info.wait_for_publish(60)

        def handled() -> tuple[float, float]:
            text = running.scrape()
            refused = metric_value(
                text, "forecaster_samples_rejected_total", reason="new_stream_limit"
            )
            return metric_value(text, "forecaster_streams_active"), refused

        wait_until(lambda: sum(handled()) >= ids, "every sample served or refused", 300)
        active, refused = handled()
        grown = rss_bytes() - before
    publisher.loop_stop()
    publisher.disconnect()
    assert active + refused == ids
    assert active >= Config().engine.new_streams.burst
    assert active <= Config().engine.max_streams
    assert grown <= active * STREAM_BYTES * 1.5 + 64 * 2**20, (grown, active)
