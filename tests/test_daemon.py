"""End to end over a real Mosquitto broker: simulator -> daemon -> subscriber."""

from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from forecaster.persist import journal_position, load_checkpoint
from simulators.sine import SineSpec, SineStreams, publish_sine
from tests.conftest import Broker, Collector
from tests.helpers import (
    RunningDaemon,
    daemon_config,
    metric_value,
    mqtt_client,
    offline_predictions,
    wait_until,
)


def by_stream(forecasts: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for f in forecasts:
        out.setdefault(f["stream"], []).append(f)
    return out


def test_simulator_to_daemon_to_subscriber(
    broker: Broker, prefix: str, tmp_path: Path, publisher
) -> None:
    with (
        Collector(broker, f"{prefix}/forecasts/+") as collector,
        RunningDaemon(daemon_config(broker, prefix, tmp_path / "state")) as running,
    ):
        streams = SineStreams(SineSpec(streams=3, seed=4, noise=0.05))
        count = 60
        sent = publish_sine(
            publisher,
            streams,
            rate=0,
            count=count,
            topic=f"{prefix}/sensors/{{stream}}/value",
            qos=1,
        )
        assert sent == 3 * count
        forecasts = collector.wait_for(sent)
        time.sleep(0.3)  # nothing more may arrive
        assert len(collector.json()) == sent
        rounds = [
            values
            for _, values, _ in SineStreams(SineSpec(streams=3, seed=4, noise=0.05)).rounds(count)
        ]
        for i, (_stream, got) in enumerate(sorted(by_stream(forecasts).items())):
            assert [f["seq"] for f in got] == list(range(1, count + 1))
            values = [float(r[i]) for r in rounds]
            assert [f["value"] for f in got] == values
            np.testing.assert_allclose(
                [f["prediction"] for f in got], offline_predictions(values), atol=1e-5
            )
            assert got[0]["error"] is None and got[1]["error"] == pytest.approx(
                values[1] - got[0]["prediction"]
            )
            assert set(got[0]) == {
                "stream",
                "seq",
                "ts",
                "value",
                "prediction",
                "error",
                "lower",
                "upper",
                "anomaly",
                "model_version",
                "warm",
                "weights",
            }
            assert set(got[-1]["weights"]) == {"naive", "rnn", "ar"}
        metrics = running.scrape()
        assert metric_value(metrics, "forecaster_forecasts_published_total") == sent


def test_hundred_interleaved_streams_are_independent(
    broker: Broker, prefix: str, tmp_path: Path, publisher
) -> None:
    with (
        Collector(broker, f"{prefix}/forecasts/+") as collector,
        RunningDaemon(daemon_config(broker, prefix, tmp_path / "state")),
    ):
        rng = np.random.default_rng(3)
        series = {f"s{i}": [float(v) for v in rng.normal(i, 1 + i % 5, 8)] for i in range(100)}
        order = [s for s in series for _ in range(8)]
        rng.shuffle(order)
        cursor = dict.fromkeys(series, 0)
        for stream in order:
            value = series[stream][cursor[stream]]
            cursor[stream] += 1
            publisher.publish(f"{prefix}/sensors/{stream}/value", repr(value), qos=1)
        got = by_stream(collector.wait_for(800))
        assert sum(len(v) for v in got.values()) == 800
        for stream in list(series)[::10]:
            np.testing.assert_allclose(
                [f["prediction"] for f in got[stream]],
                offline_predictions(series[stream]),
                atol=1e-5,
            )


MALFORMED = [
    (b"hello", "not_a_number"),
    (b"NaN", "non_finite"),
    (b"Infinity", "non_finite"),
    (b'{"value": NaN}', "non_finite"),
    (b"1e400", "out_of_range"),
    (b"", "empty"),
    (b"1" * 1_000_000, "too_large"),
    (b'{"value": 1', "invalid_json"),
    (b'{"temperature": 1.0}', "missing_value"),
    (b'{"value": true}', "not_a_number"),
    (b"\xff\xfe", "not_utf8"),
]


def test_malformed_payloads_are_counted_and_touch_nothing(
    broker: Broker, prefix: str, tmp_path: Path, publisher, caplog: pytest.LogCaptureFixture
) -> None:
    with (
        Collector(broker, f"{prefix}/forecasts/+") as collector,
        RunningDaemon(daemon_config(broker, prefix, tmp_path / "state")) as running,
    ):
        topic = f"{prefix}/sensors/victim/value"
        good = [1.0, 2.0, 4.0, 3.0]
        publisher.publish(topic, b"1.0", qos=1)
        publisher.publish(topic, b"2.0", qos=1)
        for payload, _ in MALFORMED:
            publisher.publish(topic, payload, qos=1)
        publisher.publish(f"{prefix}/sensors/a/b/value", b"1.0", qos=1)  # no template matches
        publisher.publish(topic, b'{"value": 4.0}', qos=1)
        publisher.publish(topic, b"3.0", qos=1)
        forecasts = collector.wait_for(4)
        time.sleep(0.3)
        assert [f["value"] for f in collector.json()] == good
        np.testing.assert_allclose(
            [f["prediction"] for f in forecasts], offline_predictions(good), atol=1e-5
        )
        metrics = running.scrape()
        expected: dict[str, int] = {}
        for _, reason in MALFORMED:
            expected[reason] = expected.get(reason, 0) + 1
        for reason, count in expected.items():
            assert (
                metric_value(metrics, "forecaster_samples_rejected_total", reason=reason) == count
            ), reason
        # Unknown topics never reach us through the subscription; a stream id with wildcards can
        # only arrive through a template, and parse refuses it (tests/test_parse.py).
        assert "rejected sample (not_a_number)" in caplog.text


def test_reconnects_and_resubscribes_after_broker_restart(
    broker: Broker, prefix: str, tmp_path: Path
) -> None:
    with RunningDaemon(daemon_config(broker, prefix, tmp_path / "state")) as running:
        broker.restart(down_for=1.0)
        running.wait_ready(timeout=20)
        with (
            Collector(broker, f"{prefix}/forecasts/+") as collector,
            mqtt_client(broker) as pub,
        ):
            for v in (1.0, 2.0, 3.0):
                pub.publish(f"{prefix}/sensors/x/value", str(v), qos=1)
            assert len(collector.wait_for(3)) == 3
            assert metric_value(running.scrape(), "forecaster_reconnects_total") >= 1


def test_starts_while_broker_is_down(tmp_path: Path, prefix: str) -> None:
    folder = tmp_path / "late"
    folder.mkdir()
    late = Broker(folder)
    try:
        with RunningDaemon(
            daemon_config(late, prefix, tmp_path / "state"), wait_ready=False
        ) as running:
            time.sleep(1.5)
            assert not running.daemon.ready()[0]
            late.start()
            running.wait_ready(timeout=20)
            with Collector(late, f"{prefix}/status") as collector:
                assert collector.wait_raw(1)[0][1] == b"online"
    finally:
        late.stop()  # after the daemon stopped, as before


def test_exception_in_message_handling_keeps_serving(
    broker: Broker, prefix: str, tmp_path: Path, publisher
) -> None:
    with (
        Collector(broker, f"{prefix}/forecasts/+") as collector,
        RunningDaemon(daemon_config(broker, prefix, tmp_path / "state")) as running,
    ):

        def explode(raw) -> None:
            if raw.payload == b"99":
                raise RuntimeError("injected")

        running.daemon.link.on_message_hook = explode
        publisher.publish(f"{prefix}/sensors/x/value", b"99", qos=1)
        publisher.publish(f"{prefix}/sensors/x/value", b"1.5", qos=1)
        forecasts = collector.wait_for(1)
        assert [f["value"] for f in forecasts] == [1.5]
        assert (
            metric_value(
                running.scrape(), "forecaster_callback_errors_total", callback="on_message"
            )
            == 1
        )


def test_status_topic_online_then_stopped(broker: Broker, prefix: str, tmp_path: Path) -> None:
    RunningDaemon(daemon_config(broker, prefix, tmp_path / "state")).stop()
    with Collector(broker, f"{prefix}/status") as collector:
        assert collector.wait_raw(1)[0][1:] == (b"stopped", True)


def test_metrics_and_health_endpoints(broker: Broker, prefix: str, tmp_path: Path) -> None:
    import urllib.request

    with RunningDaemon(daemon_config(broker, prefix, tmp_path / "state")) as running:
        with urllib.request.urlopen(f"{running.metrics_url}/healthz") as r:
            assert r.status == 200
        with urllib.request.urlopen(f"{running.metrics_url}/readyz") as r:
            assert r.status == 200 and b"subscribed" in r.read()
        assert metric_value(running.scrape(), "forecaster_broker_connected") == 1
        broker.stop()
        wait_until(lambda: not running.daemon.ready()[0], "the daemon to notice the broker gone")
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(f"{running.metrics_url}/readyz")
        assert info.value.code == 503
        with urllib.request.urlopen(f"{running.metrics_url}/healthz") as r:
            assert r.status == 200  # alive, just not connected
        broker.start()
        running.wait_ready(timeout=20)
        with urllib.request.urlopen(f"{running.metrics_url}/readyz") as r:
            assert r.status == 200


def test_plot_from_the_forecast_topic_and_from_a_recording(
    broker: Broker, prefix: str, tmp_path: Path, publisher
) -> None:
    import subprocess
    import sys
    import threading

    with RunningDaemon(daemon_config(broker, prefix, tmp_path / "state")):
        stop = threading.Event()
        sim = threading.Thread(
            target=publish_sine,
            args=(publisher, SineStreams(SineSpec(streams=2, seed=1))),
            kwargs={
                "rate": 40,
                "count": None,
                "topic": f"{prefix}/sensors/{{stream}}/value",
                "stop": stop,
            },
        )
        sim.start()
        record, png = tmp_path / "rec.jsonl", tmp_path / "live.png"
        cmd = [
            sys.executable,
            "-m",
            "forecaster.cli",
            "plot",
            "--broker",
            f"{broker.host}:{broker.port}",
        ]
        result = subprocess.run(
            [
                *cmd,
                "--topic",
                f"{prefix}/forecasts/+",
                "--duration",
                "3",
                "--record",
                str(record),
                "--out",
                str(png),
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        stop.set()
        sim.join(5)
    assert result.returncode == 0, result.stderr
    assert png.read_bytes()[:4] == b"\x89PNG" and "sine-000, sine-001" in result.stdout
    assert len(record.read_text().splitlines()) > 50
    again = subprocess.run(
        [
            sys.executable,
            "-m",
            "forecaster.cli",
            "plot",
            "--file",
            str(record),
            "--streams",
            "sine-001",
            "--out",
            str(tmp_path / "one.png"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert again.returncode == 0, again.stderr
    missing = subprocess.run(
        [
            sys.executable,
            "-m",
            "forecaster.cli",
            "plot",
            "--file",
            str(record),
            "--streams",
            "nope",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert missing.returncode == 2 and "nope" in missing.stderr


def test_online_learning_in_the_daemon_persists_across_restart(
    broker: Broker, prefix: str, tmp_path: Path, publisher
) -> None:
    from forecaster.persist import load_checkpoint

    learn = {"enabled": True, "update_every": 8, "window": 16, "warmup": 5}
    config = daemon_config(broker, prefix, tmp_path / "state", online_learning=learn)
    with Collector(broker, f"{prefix}/forecasts/+") as collector:
        with RunningDaemon(config) as running:
            streams = SineStreams(SineSpec(streams=2, seed=7, freq_scale=(2.5, 3.0)))
            topic = f"{prefix}/sensors/{{stream}}/value"
            publish_sine(publisher, streams, rate=200, count=300, topic=topic, qos=1)
            forecasts = collector.wait_for(600)
            versions = [f["model_version"] for f in forecasts]
            assert versions == sorted(versions) and versions[-1] > 0  # swapped in, in order
            deadline = time.monotonic() + 5
            while metric_value(running.scrape(), "forecaster_learning_updates_total") < 1:
                assert time.monotonic() < deadline
                time.sleep(0.1)
            assert metric_value(running.scrape(), "forecaster_model_version") > 0
        saved = load_checkpoint(tmp_path / "state" / "checkpoint.safetensors")
        assert saved.optimizer is not None and saved.optimizer["state"]
        assert "learner.inputs" in saved.extra
        assert saved.model_version == running.daemon.learner.version

        with RunningDaemon(config) as again:
            assert again.daemon.learner is not None
            assert again.daemon.learner.version == saved.model_version  # resumes where it stopped
            assert sum(len(w) for w in again.daemon.learner.ready.values()) > 0
            publish_sine(publisher, streams, rate=200, count=50, topic=topic, qos=1)
            more = collector.wait_for(700)
            assert min(f["model_version"] for f in more[600:]) >= saved.model_version


def journal_rows(state_dir: Path) -> list[int]:
    """Sample positions in the daemon's journal (one row per tick, keyed by its last sample's
    position), read over a connection of the test's own."""
    with contextlib.closing(sqlite3.connect(state_dir / "journal.sqlite")) as db:
        ticks = db.execute("SELECT pos, count FROM ticks ORDER BY pos").fetchall()
    return [p for last, count in ticks for p in range(last - count + 1, last + 1)]


def test_checkpoints_are_written_in_the_background_and_trim_only_once_durable(
    broker: Broker, prefix: str, tmp_path: Path, publisher
) -> None:
    state = tmp_path / "state"
    config = daemon_config(broker, prefix, state, state={"checkpoint_interval": 0.2})
    topic = f"{prefix}/sensors/a/value"

    def send(first: int, count: int) -> None:
        for seq in range(first, first + count):
            publisher.publish(topic, json.dumps({"value": seq * 0.1, "seq": seq}), qos=1)

    with (
        Collector(broker, f"{prefix}/forecasts/+") as collector,
        RunningDaemon(config) as running,
    ):
        daemon = running.daemon
        send(1, 20)
        assert len(collector.wait_for(20)) == 20
        wait_until(lambda: checkpoint_position(state) == 20, "first checkpoint with 20 samples")
        wait_until(lambda: journal_rows(state) == [], "journal trimmed after it")

        # Hold the writer: the next checkpoint is copied, then waits for its turn to be written.
        gate = threading.Event()
        daemon.checkpoints.writer.submit(gate.wait)
        try:
            send(21, 20)
            forecasts = collector.wait_for(40)
            assert [f["seq"] for f in forecasts] == list(range(1, 41)), "engine stalled"
            wait_until(
                lambda: daemon.checkpoints.writing is not None, "a checkpoint waiting to be written"
            )
            time.sleep(0.5)  # housekeeping ran many times: none may trim for an unwritten file
            assert checkpoint_position(state) == 20
            assert journal_rows(state) == list(range(21, 41))
        finally:
            gate.set()
        wait_until(lambda: checkpoint_position(state) == 40, "the held checkpoint, written")
        wait_until(lambda: journal_rows(state) == [], "journal trimmed once it was durable")

        def timed(scraped: str, stage: str) -> float:
            return metric_value(
                scraped, "forecaster_checkpoint_duration_seconds_count", stage=stage
            )

        def written(scraped: str) -> float:
            return metric_value(scraped, "forecaster_checkpoints_total", result="ok")

        # Each write is timed once (read in one scrape, between two housekeeping passes).
        wait_until(
            lambda: written(scraped := running.scrape()) == timed(scraped, "write") >= 2,
            "both writes timed",
        )
        scraped = running.scrape()
        assert timed(scraped, "engine_thread") >= timed(scraped, "write")

        # A write that fails is counted and trims nothing.
        (tmp_path / "not-a-folder").write_text("")
        daemon.keeper.state_path = tmp_path / "not-a-folder" / "checkpoint.safetensors"
        send(41, 5)
        assert len(collector.wait_for(45)) == 45
        wait_until(
            lambda: (
                # the label appears with the first failure: absent = none yet
                metric_value(
                    running.scrape(), "forecaster_checkpoints_total", default=0.0, result="error"
                )
                >= 1
            ),
            "a failed checkpoint counted",
        )
        assert journal_rows(state) == list(range(41, 46))
        assert checkpoint_position(state) == 40


def checkpoint_position(state_dir: Path) -> int:
    path = state_dir / "checkpoint.safetensors"
    return journal_position(load_checkpoint(path)) if path.exists() else -1
