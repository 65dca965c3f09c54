"""Reload on SIGHUP: a live change applies between ticks with no sample lost and no hidden state
touched; a change that needs a restart, or a broken file, changes nothing and says why."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import yaml

from forecaster.config import load_config
from forecaster.reload import plan_reload
from tests.conftest import Broker, Collector
from tests.helpers import (
    RunningDaemon,
    forecaster_cli,
    metric_value,
    offline_predictions,
    wait_until,
    write_config,
)


def reloads(running: RunningDaemon, outcome: str) -> float:
    return metric_value(
        running.scrape(), "forecaster_config_reloads_total", default=0.0, outcome=outcome
    )


def edit(path: Path, section: str, **values: object) -> None:
    data = yaml.safe_load(path.read_text())
    data.setdefault(section, {}).update(values)
    path.write_text(yaml.safe_dump(data))


def test_the_plan_splits_live_keys_from_those_needing_a_restart(tmp_path: Path) -> None:
    base = {"mqtt": {"port": 1883}, "state": {"dir": str(tmp_path)}}
    old = load_config(_yaml(tmp_path / "a.yaml", base))
    new = load_config(
        _yaml(
            tmp_path / "b.yaml",
            {**base, "anomaly": {"threshold": 0.99}, "online_learning": {"lr": 0.001}},
        )
    )
    plan = plan_reload(old, new)
    assert plan.live == ["anomaly.threshold", "online_learning.lr"] and plan.applicable
    moved = load_config(_yaml(tmp_path / "c.yaml", {**base, "mqtt": {"port": 1884}}))
    assert plan_reload(old, moved).restart == ["mqtt.port"]
    assert not plan_reload(old, old).applicable  # nothing changed: nothing to apply


def _yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def test_a_live_reload_applies_between_ticks_and_loses_nothing(
    broker: Broker, prefix: str, tmp_path: Path, publisher
) -> None:
    path = write_config(tmp_path / "c.yaml", broker, prefix, tmp_path / "state")
    values = [float(v) for v in 20 + 5 * np.sin(np.arange(60) / 4)]
    with (
        Collector(broker, f"{prefix}/out/+") as out,
        RunningDaemon(load_config(path)) as running,
    ):
        for v in values[:30]:
            publisher.publish(f"{prefix}/in/s", repr(v), qos=1)
        out.wait_for(30)
        edit(path, "anomaly", threshold=0.9)
        edit(path, "logging", level="DEBUG")
        running.daemon.request_reload(path)
        wait_until(lambda: reloads(running, "applied") == 1, "the reload applied")
        assert running.daemon.config.anomaly.threshold == 0.9
        assert running.daemon.metrics.anomaly_threshold == 0.9
        for v in values[30:]:
            publisher.publish(f"{prefix}/in/s", repr(v), qos=1)
        got = out.wait_for(60)
    # the hidden state went on untouched: every forecast equals an uninterrupted run's
    np.testing.assert_allclose(
        [f["prediction"] for f in got], offline_predictions(values, "s"), atol=1e-5
    )
    assert [f["seq"] for f in got] == list(range(1, 61))


def test_a_reload_that_needs_a_restart_or_is_broken_changes_nothing(
    broker: Broker, prefix: str, tmp_path: Path, caplog
) -> None:
    path = write_config(tmp_path / "c.yaml", broker, prefix, tmp_path / "state")
    with RunningDaemon(load_config(path)) as running:
        before = running.daemon.config
        edit(path, "anomaly", threshold=0.9)
        edit(path, "mqtt", output_topic=f"{prefix}/elsewhere/{{stream}}")
        running.daemon.request_reload(path)
        wait_until(lambda: reloads(running, "refused") == 1, "the reload refused")
        assert running.daemon.config == before  # all or nothing: not even the threshold
        assert "mqtt.output_topic" in caplog.text
        path.write_text(path.read_text().replace("threshold: 0.9", "threshold: high"))
        running.daemon.request_reload(path)
        wait_until(lambda: reloads(running, "invalid") == 1, "the broken file refused")
        assert running.daemon.config == before
        assert "anomaly.threshold" in caplog.text and "line" in caplog.text
        assert running.daemon.ready()[0]


def test_forecaster_reload_signals_the_running_daemon(
    broker: Broker, prefix: str, tmp_path: Path
) -> None:
    path = write_config(tmp_path / "c.yaml", broker, prefix, tmp_path / "state")
    log = tmp_path / "daemon.log"
    with open(log, "w") as sink:
        proc = subprocess.Popen(
            [sys.executable, "-m", "forecaster.cli", "run", "-c", str(path)],
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_until(lambda: "metrics on" in log.read_text(), "the daemon started", 60)
        edit(path, "anomaly", threshold=0.95)
        done = forecaster_cli("reload", "-c", str(path))
        assert done.returncode == 0, done.stderr
        assert "sent SIGHUP" in done.stdout
        wait_until(lambda: "config reloaded" in log.read_text(), "the reload logged", 30)
        assert "anomaly.threshold" in log.read_text()
        assert proc.poll() is None
    finally:
        proc.terminate()
        proc.wait(30)
    gone = forecaster_cli("reload", "-c", str(path))
    assert gone.returncode != 0 and "no running daemon" in gone.stderr
