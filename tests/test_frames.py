"""Frames end to end over a real Mosquitto broker: many samples per message in, and out."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import Broker, Collector
from tests.helpers import RunningDaemon, daemon_config, metric_value, offline_predictions

SERIES = [float(v) for v in np.sin(np.arange(24) * 0.4) * 3 + 1]


def frames_config(broker: Broker, prefix: str, state: Path, output_frames: bool) -> object:
    mqtt = {"frame_topics": [f"{prefix}/devices/{{device}}/state"], "output_frames": output_frames}
    return daemon_config(broker, prefix, state, mqtt=mqtt)


def publish_all(publisher, prefix: str) -> int:
    """The same series three ways: one sample per message (stream ``single``), list frames of 6
    (stream ``listed``) and device frames of two readings (``dev.x``, and ``dev.y`` = 2 x)."""
    for value in SERIES:
        publisher.publish(f"{prefix}/sensors/single/value", repr(value), qos=1)
    for i in range(0, len(SERIES), 6):
        publisher.publish(f"{prefix}/sensors/listed/value", json.dumps(SERIES[i : i + 6]), qos=1)
    for value in SERIES:
        frame = {"x": value, "y": {"value": 2 * value}}
        publisher.publish(f"{prefix}/devices/dev/state", json.dumps(frame), qos=1)
    return len(SERIES) + len(SERIES) // 6 + len(SERIES)


def by_stream(forecasts: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for f in forecasts:
        out.setdefault(f["stream"], []).append(f)
    return out


def check_forecasts(forecasts: list[dict]) -> None:
    got = by_stream(forecasts)
    assert sorted(got) == ["dev.x", "dev.y", "listed", "single"]
    expected = offline_predictions(SERIES)
    for stream in ("single", "listed", "dev.x"):
        assert [f["seq"] for f in got[stream]] == list(range(1, len(SERIES) + 1))
        assert [f["value"] for f in got[stream]] == SERIES
        np.testing.assert_allclose([f["prediction"] for f in got[stream]], expected, atol=1e-5)
    # a frame gives what one-sample messages give (to float rounding: batch sizes differ)
    np.testing.assert_allclose(
        [f["prediction"] for f in got["listed"]],
        [f["prediction"] for f in got["single"]],
        atol=1e-5,
    )
    np.testing.assert_allclose(
        [f["prediction"] for f in got["dev.y"]],
        offline_predictions([2 * v for v in SERIES]),
        atol=1e-5,
    )


def test_frames_in_give_every_forecast_as_single_messages_do(
    broker: Broker, prefix: str, tmp_path: Path, publisher
) -> None:
    with (
        Collector(broker, f"{prefix}/forecasts/+") as collector,
        RunningDaemon(frames_config(broker, prefix, tmp_path / "state", False)) as running,
    ):
        publish_all(publisher, prefix)
        total = 4 * len(SERIES)
        forecasts = collector.wait_for(total)
        time.sleep(0.3)  # nothing more may arrive
        assert len(collector.json()) == total
        check_forecasts(forecasts)
        topics = {topic for topic, _, _ in collector.messages}
        assert f"{prefix}/forecasts/dev.x" in topics and f"{prefix}/forecasts/listed" in topics
        metrics = running.scrape()
        assert metric_value(metrics, "forecaster_forecasts_published_total") == total
        assert running.daemon.journal is not None
        assert len(list(running.daemon.journal.after(0))) == total  # every sample journaled


def test_frames_out_carry_every_forecast_of_their_input_frame(
    broker: Broker, prefix: str, tmp_path: Path, publisher
) -> None:
    with (
        Collector(broker, f"{prefix}/forecasts/+") as collector,
        RunningDaemon(frames_config(broker, prefix, tmp_path / "state", True)) as running,
    ):
        messages = publish_all(publisher, prefix)
        collector.wait_raw(messages)
        time.sleep(0.3)
        raw = list(collector.messages)
        assert len(raw) == messages  # one output message per input message
        bodies = {}
        for topic, payload, _ in raw:
            bodies.setdefault(topic.rsplit("/", 1)[1], []).append(json.loads(payload))
        assert all(isinstance(b, dict) for b in bodies["single"])
        assert [len(b) for b in bodies["listed"]] == [6] * (len(SERIES) // 6)
        assert [[f["stream"] for f in b] for b in bodies["dev"]] == [["dev.x", "dev.y"]] * len(
            SERIES
        )
        flat = [f for b in bodies["single"] for f in [b]]
        flat += [f for frames in (bodies["listed"], bodies["dev"]) for b in frames for f in b]
        check_forecasts(flat)
        metrics = running.scrape()
        assert metric_value(metrics, "forecaster_forecasts_published_total") == 4 * len(SERIES)


@pytest.mark.parametrize("output_frames", [False, True])
def test_bad_elements_are_counted_and_the_good_ones_forecast(
    broker: Broker, prefix: str, tmp_path: Path, publisher, output_frames: bool
) -> None:
    with (
        Collector(broker, f"{prefix}/forecasts/+") as collector,
        RunningDaemon(frames_config(broker, prefix, tmp_path / "state", output_frames)) as running,
    ):
        listed = b'[1.0, "x", NaN, 2.0, {"v": 3}, {"value": 3.0, "seq": 1}, 4.0]'
        publisher.publish(f"{prefix}/sensors/a/value", listed, qos=1)
        device = b'{"t": 1.5, "a b": 2, "h": null, "p": 1e400}'
        publisher.publish(f"{prefix}/devices/d/state", device, qos=1)
        publisher.publish(f"{prefix}/devices/d/state", b"[1]", qos=1)  # whole message refused
        publisher.publish(f"{prefix}/sensors/a/value", b"[]", qos=1)
        publisher.publish(f"{prefix}/sensors/a/value", b"5.0", qos=1)
        wanted = 3 if output_frames else 5
        collector.wait_raw(wanted)
        time.sleep(0.3)
        assert len(collector.messages) == wanted
        forecasts = []
        for body in collector.json():
            forecasts += body if isinstance(body, list) else [body]
        got = by_stream(forecasts)
        assert [f["value"] for f in got["a"]] == [1.0, 2.0, 4.0, 5.0]
        assert [f["seq"] for f in got["a"]] == [1, 2, 3, 4]
        assert [f["value"] for f in got["d.t"]] == [1.5]
        metrics = running.scrape()
        expected = {
            "not_a_number": 2,  # "x" and null
            "missing_value": 1,  # {"v": 3}
            "non_finite": 1,  # NaN
            "duplicate": 1,  # seq 1 after the frame's first sample had seq 1
            "bad_stream": 1,  # key "a b"
            "out_of_range": 1,  # 1e400
            "invalid_json": 1,  # a list on a device topic
            "empty": 1,  # []
        }
        for reason, count in expected.items():
            assert (
                metric_value(metrics, "forecaster_samples_rejected_total", reason=reason) == count
            ), reason


def test_a_frame_is_journaled_whole_before_its_one_ack(
    broker: Broker, prefix: str, tmp_path: Path, publisher
) -> None:
    with (
        Collector(broker, f"{prefix}/forecasts/+") as collector,
        RunningDaemon(frames_config(broker, prefix, tmp_path / "state", True)) as running,
    ):
        daemon = running.daemon
        assert daemon.journal is not None
        events: list[tuple[str, int]] = []
        journaled_messages: list[object] = []
        append, ack = daemon.journal.append, daemon.link.client.ack

        def spy_append(samples: list, messages: object) -> int:
            events.append(("journaled", len(samples)))
            journaled_messages.append(messages)
            return append(samples, messages)

        def spy_ack(mid: int, qos: int) -> None:
            events.append(("acked", qos))
            ack(mid, qos)

        daemon.journal.append = spy_append  # type: ignore[method-assign]
        daemon.link.client.ack = spy_ack  # type: ignore[method-assign]
        frames = [b"[1, 2, 3]", b'[4, "x", 5]', b'{"value": 6}']
        for count, payload in enumerate(frames, start=1):
            publisher.publish(f"{prefix}/sensors/a/value", payload, qos=1)
            collector.wait_raw(count)  # one message per step
        time.sleep(0.3)
        # "x" is refused by the parser; each message: all its samples in one append, then one ack
        assert events == [event for n in (3, 2, 1) for event in (("journaled", n), ("acked", 1))]
        # the output frames they were published in go with them, for a replay to publish alike
        assert journaled_messages == [[(3, "a")], [(2, "a")], None]
