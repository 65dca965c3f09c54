"""Storage faults as a state: a full disk under the state folder pauses intake, holds the samples
unacknowledged, says so on /readyz and in metrics, and resumes by itself when space returns.

The fault is real where it can be: a small tmpfs the test mounts (as root) and fills with a file
until ``ENOSPC``. Elsewhere the journal's SQLite connection is wrapped so that its writes fail as
SQLite's do on a full disk (``database or disk is full``): an injected error at the write call.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import sqlite3
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import pytest
import yaml

from forecaster.cli import main
from forecaster.config import Config
from forecaster.daemon import Daemon
from forecaster.engine import Sample, as_batch
from forecaster.errors import StateLossError
from forecaster.journal import Journal
from forecaster.persist import load_checkpoint
from tests.conftest import Broker, Collector, Relay
from tests.helpers import RunningDaemon, daemon_config, metric_value, wait_until
from tests.test_persist import flip_bit
from tests.test_recovery import (
    DaemonProcess,
    Publisher,
    check_final_state,
    check_forecasts,
    offline_reference,
    recovery_config,
    series,
    wait_online,
)


class DiskFault(Protocol):
    state_dir: Path

    def attach(self, daemon: Daemon) -> None: ...
    def fill(self) -> None: ...
    def free(self) -> None: ...


class TmpfsDisk:
    """A real filesystem fault: a small tmpfs under the state folder, filled to ENOSPC."""

    def __init__(self, mountpoint: Path, size: str = "24m") -> None:
        self.mountpoint = mountpoint
        mountpoint.mkdir()
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mountpoint)],
            check=True,
            capture_output=True,
        )
        self.state_dir = mountpoint / "state"
        self.filler = mountpoint / "filler"

    def attach(self, daemon: Daemon) -> None:
        """Nothing to do: the daemon writes to the tmpfs itself."""

    def fill(self) -> None:
        block = b"\0" * 65536
        with open(self.filler, "wb", buffering=0) as out:
            with contextlib.suppress(OSError):  # ENOSPC: the disk is full
                while True:
                    out.write(block)
            with contextlib.suppress(OSError):
                while True:  # the last few bytes too
                    out.write(b"\0" * 512)

    def free(self) -> None:
        self.filler.unlink()

    def close(self) -> None:
        subprocess.run(["umount", "-l", str(self.mountpoint)], check=False, capture_output=True)


class FailingConnection:
    """The journal's SQLite connection whose writes fail as on a full disk while ``full``."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db
        self.full = False

    def execute(self, sql: str, *args: Any) -> sqlite3.Cursor:
        if self.full and sql.lstrip().split()[0].upper() in ("INSERT", "DELETE", "BEGIN"):
            raise sqlite3.OperationalError("database or disk is full")
        return self.db.execute(sql, *args)

    def close(self) -> None:
        self.db.close()


class InjectedDisk:
    """Where no filesystem can be mounted: writes to the journal fail at the call."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.connection: FailingConnection | None = None

    def attach(self, daemon: Daemon) -> None:
        assert daemon.journal is not None
        self.connection = FailingConnection(daemon.journal.db)
        daemon.journal.db = self.connection  # type: ignore[assignment]

    def fill(self) -> None:
        assert self.connection is not None
        self.connection.full = True

    def free(self) -> None:
        assert self.connection is not None
        self.connection.full = False

    def close(self) -> None: ...


def can_mount_tmpfs(tmp_path: Path) -> str | None:
    """None when this process can mount a tmpfs, else why not."""
    if os.geteuid() != 0:
        return "not root: cannot mount a tmpfs"
    probe = tmp_path / "probe"
    probe.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(probe)], capture_output=True
    )
    if done.returncode != 0:
        return f"mount -t tmpfs failed: {done.stderr.decode().strip()}"
    subprocess.run(["umount", str(probe)], check=False)
    return None


@pytest.fixture(params=["tmpfs", "injected"])
def disk(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[DiskFault]:
    if request.param == "tmpfs":
        why = can_mount_tmpfs(tmp_path)
        if why is not None:
            pytest.skip(f"real disk-full fault not possible here ({why}); the injected one runs")
        fault: TmpfsDisk | InjectedDisk = TmpfsDisk(tmp_path / "disk")
    else:
        fault = InjectedDisk(tmp_path / "state")
    yield fault
    fault.close()


def readyz(running: RunningDaemon) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"{running.metrics_url}/readyz", timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def disk_full_while_publishing(
    broker: Broker,
    prefix: str,
    disk: DiskFault,
    caplog: pytest.LogCaptureFixture,
    rounds: int,
    rate: float,
    full_for: float,
) -> None:
    """20 QoS 1 streams publish; the disk is full for ``full_for`` seconds of their samples."""
    values = series(20, rounds, seed=5)
    ref = offline_reference(values)
    config = daemon_config(
        broker,
        prefix,
        disk.state_dir,
        mqtt={
            "qos_out": 1,
            "input_topics": [f"{prefix}/in/{{stream}}"],
            "output_topic": f"{prefix}/out/{{stream}}",
        },
        state={"checkpoint_interval": 1, "retry_interval": 0.2, "fault_log_interval": 3600},
    )
    caplog.set_level(logging.INFO, logger="forecaster")
    with Collector(broker, f"{prefix}/out/+") as out, RunningDaemon(config) as running:
        daemon = running.daemon
        disk.attach(daemon)
        publisher = Publisher(broker, prefix, values, rate).start()
        try:
            wait_until(lambda: len(out.messages) >= 200, "forecasts before the fault", 20)
            disk.fill()
            wait_until(
                lambda: (
                    readyz(running)[0] == 503 and "storage fault: journal" in readyz(running)[1]
                ),
                "/readyz 503 naming the journal on a full disk",
                20,
            )
            wait_until(lambda: daemon.intake.held is not None, "a tick held for the journal", 10)
            sent = len(publisher.infos)
            # The fault lasts while ``full_for`` seconds of samples reach the broker.
            wait_until(
                lambda: len(publisher.infos) >= sent + full_for * rate,
                "samples published during the fault",
                full_for * 3 + 20,
            )
            assert readyz(running)[0] == 503
            during = running.scrape()
            assert publisher.thread.is_alive(), "the fault must end while samples arrive"
            disk.free()
            wait_until(lambda: readyz(running)[0] == 200, "/readyz 200 after space returns", 20)
            publisher.wait_accepted(timeout=rounds * 20 / rate + 60)
            want = {(s, k) for s in values for k in range(1, rounds + 1)}
            wait_until(
                lambda: {(f["stream"], f["seq"]) for f in out.json()} >= want,
                "a forecast for every accepted sample",
                60,
            )
            after = running.scrape()
        finally:
            running.stop(check=False)
            publisher.close()
    assert metric_value(during, "forecaster_storage_fault", part="journal") == 1
    assert metric_value(during, "forecaster_storage_held_samples") > 0
    assert metric_value(after, "forecaster_storage_fault", part="journal") == 0
    assert metric_value(after, "forecaster_storage_fault", part="checkpoint") == 0
    assert metric_value(after, "forecaster_storage_errors_total", part="journal") > 0
    assert metric_value(after, "forecaster_samples_rejected_total", reason="duplicate") == 0
    forecasts = out.json()
    for stream in values:  # each sample once, in order: nothing held was dropped or overtaken
        seqs = [f["seq"] for f in forecasts if f["stream"] == stream]
        assert seqs == list(range(1, rounds + 1)), stream
    got: dict[tuple[str, int], list[float]] = {}
    for f in forecasts:
        got.setdefault((f["stream"], f["seq"]), []).append(f["prediction"])
    check_forecasts(got, values, ref)  # equal to an uninterrupted run
    faults = [r for r in caplog.records if "storage fault: the journal" in r.getMessage()]
    assert len(faults) == 1, [r.getMessage() for r in faults]  # one line, not one per tick
    assert all(r.exc_info is None for r in caplog.records if r.levelno >= logging.ERROR)
    assert any("storage recovered: the journal" in r.getMessage() for r in caplog.records)


def test_disk_full_holds_samples_and_resumes_in_order(
    broker: Broker, prefix: str, disk: DiskFault, caplog: pytest.LogCaptureFixture
) -> None:
    disk_full_while_publishing(broker, prefix, disk, caplog, rounds=150, rate=300, full_for=2)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_disk_full_10s_with_20_qos1_streams_loses_nothing(
    broker: Broker, prefix: str, disk: DiskFault, caplog: pytest.LogCaptureFixture
) -> None:
    disk_full_while_publishing(broker, prefix, disk, caplog, rounds=600, rate=400, full_for=10)


# -- integrity: a damaged checkpoint, a journal that lost positions ------------------------------
def publish_rounds(
    client: Any, prefix: str, values: dict[str, list[float]], first: int, stop: int
) -> None:
    """Rounds ``first``..``stop - 1`` of every stream, QoS 1, ``seq`` = round + 1."""
    for k in range(first, stop):
        for stream, vs in values.items():
            body = json.dumps({"value": vs[k], "seq": k + 1})
            client.publish(f"{prefix}/in/{stream}", body, qos=1)


def integrity_config(broker: Broker, prefix: str, state_dir: Path, **state: object) -> Config:
    return daemon_config(
        broker,
        prefix,
        state_dir,
        mqtt={
            "qos_out": 1,
            "input_topics": [f"{prefix}/in/{{stream}}"],
            "output_topic": f"{prefix}/out/{{stream}}",
        },
        state={"checkpoint_interval": 3600, **state},
    )


def serve_rounds(
    config: Config, broker: Broker, prefix: str, publisher: Any, values: dict, rounds: range
) -> list[dict]:
    """Start a daemon, publish ``rounds``, wait for their forecasts, stop (a final checkpoint);
    every forecast received while it ran (replayed ones too)."""
    want = len(values) * len(rounds)
    with Collector(broker, f"{prefix}/out/+") as out:
        with RunningDaemon(config):
            publish_rounds(publisher, prefix, values, rounds.start, rounds.stop)
            last = {(s, rounds.stop) for s in values}
            wait_until(
                lambda: (
                    last <= {(f["stream"], f["seq"]) for f in out.json()}
                    and len(out.messages) >= want
                ),
                "the rounds' forecasts",
                30,
            )
        return out.json()


def test_flipped_bit_in_checkpoint_falls_back_and_replays_exactly(
    broker: Broker, prefix: str, tmp_path: Path, publisher: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """The newest checkpoint's hidden state has one sign bit flipped: the start detects it, sets
    it aside, restores the previous checkpoint and replays the journal from there; every
    forecast and the final state equal an uninterrupted run's."""
    values = series(3, 30, seed=6)
    ref = offline_reference(values)
    state = tmp_path / "state"
    config = integrity_config(broker, prefix, state, keep_checkpoints=2)
    got: dict[tuple[str, int], list[float]] = {}

    def record(forecasts: list[dict]) -> None:
        for f in forecasts:
            got.setdefault((f["stream"], f["seq"]), []).append(f["prediction"])

    record(serve_rounds(config, broker, prefix, publisher, values, range(0, 10)))
    record(serve_rounds(config, broker, prefix, publisher, values, range(10, 20)))
    newest = state / "checkpoint.safetensors"
    assert load_checkpoint(newest).manifest["info"]["journal_position"] == 60
    assert (
        load_checkpoint(state / "checkpoint.1.safetensors").manifest["info"]["journal_position"]
        == 30
    )
    flip_bit(newest, "streams.state")
    caplog.set_level(logging.INFO, logger="forecaster")
    with Collector(broker, f"{prefix}/out/+") as out:
        with RunningDaemon(config) as running:
            metrics = running.scrape()
            publish_rounds(publisher, prefix, values, 20, 30)
            last = {(s, 30) for s in values}
            wait_until(
                lambda: last <= {(f["stream"], f["seq"]) for f in out.json()}, "round 30", 30
            )
        record(out.json())
    assert metric_value(metrics, "forecaster_checkpoint_fallbacks_total") == 1
    assert "DAMAGED CHECKPOINT" in caplog.text and "streams.state" in caplog.text
    # rounds 11-20 replayed from the journal; the broker had confirmed their forecasts
    assert "replayed 30 journaled samples after position 30 (0 forecasts published" in caplog.text
    assert (state / "checkpoint.safetensors.damaged").exists()
    check_forecasts(got, values, ref)  # replayed and later forecasts equal an uninterrupted run
    check_final_state(state, ref, 30)


def journal_lost(state: Path, how: str, values: dict[str, list[float]], rounds: range) -> None:
    """Journal ``rounds`` after the checkpoint (as a SIGKILL would leave them), then lose them:
    the file truncated to 0 bytes, or the WAL file that held them gone."""
    path = state / "journal.sqlite"
    journal = Journal(path)
    for k in rounds:
        journal.append(as_batch([Sample(s, vs[k], None, k + 1) for s, vs in values.items()])[0])
    saved = path.read_bytes()  # the main file: the new rows are in the WAL only
    journal.close()
    if how == "truncated":
        path.write_bytes(b"")
    else:
        path.write_bytes(saved)
    for suffix in ("-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)


@pytest.mark.parametrize("how", ["truncated", "wal_lost"])
def test_lost_journal_refuses_start_naming_positions_unless_accepted(
    broker: Broker,
    prefix: str,
    tmp_path: Path,
    publisher: Any,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
    how: str,
) -> None:
    values = series(2, 20, seed=7)
    state = tmp_path / "state"
    config = integrity_config(broker, prefix, state)
    serve_rounds(config, broker, prefix, publisher, values, range(0, 10))  # checkpoint: 20
    journal_lost(state, how, values, range(10, 13))  # positions 21-26 journaled, then lost
    with pytest.raises(
        StateLossError, match=r"positions 21-26 .*: 6 journaled samples lost"
    ) as err:
        Daemon(config).start()
    assert err.value.gaps == [(21, 26)]
    assert "--accept-state-loss" in str(err.value)
    # The command refuses too, with the message, and an exit status
    path = tmp_path / "forecaster.yaml"
    path.write_text(yaml.safe_dump(json.loads(config.model_dump_json())))
    assert main(["run", "-c", str(path)]) == 2
    assert "lacks positions 21-26" in capsys.readouterr().err
    caplog.set_level(logging.INFO, logger="forecaster")
    accepting = integrity_config(broker, prefix, state, accept_state_loss=True)
    with RunningDaemon(accepting) as running:
        metrics = running.scrape()
    assert metric_value(metrics, "forecaster_state_loss_positions_total") == 6
    assert "STATE LOSS ACCEPTED" in caplog.text and "21-26" in caplog.text
    # Accepted once: the next start goes on without the override, from where it was
    forecasts = serve_rounds(config, broker, prefix, publisher, values, range(13, 15))
    assert sorted({f["seq"] for f in forecasts}) == [14, 15]


# -- bounded recovery ------------------------------------------------------------------------------
@pytest.fixture
def daemons() -> Iterator[list[DaemonProcess]]:
    """Every ``forecaster run`` process a test starts is killed at teardown."""
    started: list[DaemonProcess] = []
    yield started
    for daemon in started:
        if daemon.proc is not None and daemon.proc.poll() is None:
            daemon.proc.kill()
            daemon.proc.wait(10)


def marker(state: Path) -> tuple[int, int]:
    """(last journaled, last confirmed) positions from the journal's end marker."""
    data = (state / "journal.sqlite-end").read_bytes()
    return int.from_bytes(data[:8], "little"), int.from_bytes(data[8:16], "little")


def test_sigkill_replay_publishes_only_unconfirmed_forecasts_then_checkpoints(
    broker: Broker, prefix: str, tmp_path: Path, daemons: list[DaemonProcess], publisher: Any
) -> None:
    """After a SIGKILL the journal is replayed (the state must come back) but forecasts the
    broker had confirmed are not sent again, and a checkpoint follows the replay at once (not
    after checkpoint_interval): a crash loop neither floods subscribers nor replays more and
    more."""
    values = series(2, 11, seed=8)
    ref = offline_reference(values)
    config = recovery_config(tmp_path, broker, prefix, checkpoint_interval=3600)
    state = tmp_path / "state"
    daemon = DaemonProcess(config, tmp_path / "daemon.log")
    daemons.append(daemon)
    with Collector(broker, f"{prefix}/status") as status:
        daemon.start()
        wait_online(status)
    with Collector(broker, f"{prefix}/out/+") as out:
        publish_rounds(publisher, prefix, values, 0, 10)
        wait_until(lambda: len(out.messages) >= 20, "forecasts before the kill", 20)
        wait_until(lambda: marker(state) == (20, 20), "the broker's confirmations recorded", 10)
        before = out.json()
    daemon.kill()
    assert not (state / "checkpoint.safetensors").exists()  # all of it in the journal only
    with Collector(broker, f"{prefix}/out/+") as out, Collector(broker, f"{prefix}/status") as st:
        daemon.start()
        wait_online(st)
        publish_rounds(publisher, prefix, values, 10, 11)
        wait_until(lambda: len(out.messages) >= 2, "the new round's forecasts", 20)
        after = out.json()
        wait_until(
            lambda: (state / "checkpoint.safetensors").exists(), "a checkpoint after replay", 20
        )
    assert daemon.stop() == 0
    assert "replayed 20 journaled samples after position 0 (0 forecasts published" in daemon.text()
    assert sorted((f["stream"], f["seq"]) for f in after) == [("s00", 11), ("s01", 11)]
    got: dict[tuple[str, int], list[float]] = {}
    for f in before + after:
        got.setdefault((f["stream"], f["seq"]), []).append(f["prediction"])
    check_forecasts(got, values, ref)  # the replayed state forecast round 11 exactly


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("replay_publish", ["unconfirmed", "all"])
def test_crash_loop_republishes_little(
    broker: Broker,
    prefix: str,
    tmp_path: Path,
    daemons: list[DaemonProcess],
    replay_publish: str,
) -> None:
    """10 SIGKILLs while 20 QoS 1 streams publish 12,000 samples: every forecast exact, and with
    the default (``unconfirmed``) at most 1.2 forecasts received per sample sent. ``all`` (the
    behaviour before) is run beside it for the figure (pytest -s prints both)."""

    streams, rounds, rate, kills = 20, 600, 400, 10
    values = series(streams, rounds, seed=9)
    ref = offline_reference(values)
    config = recovery_config(
        tmp_path, broker, prefix, checkpoint_interval=60, replay_publish=replay_publish
    )
    out = Collector(broker, f"{prefix}/out/+")
    daemon = DaemonProcess(config, tmp_path / "daemon.log")
    daemons.append(daemon)
    with Collector(broker, f"{prefix}/status") as status:
        daemon.start()
        wait_online(status)
    publisher = Publisher(broker, prefix, values, rate).start()
    rng = random.Random(11)
    duration = streams * rounds / rate
    moments = sorted(rng.uniform(0.05, 0.85) * duration for _ in range(kills))
    for i in range(1, kills):
        moments[i] = max(moments[i], moments[i - 1] + 1.5)
    began = time.monotonic()
    for moment in moments:
        time.sleep(max(0.0, began + moment - time.monotonic()))  # the fault's schedule
        daemon.kill()
        daemon.start()
    assert publisher.thread.is_alive(), "every kill must land while samples are arriving"
    publisher.wait_accepted(timeout=duration + 60)
    want = {(s, k) for s in values for k in range(1, rounds + 1)}
    wait_until(lambda: want <= {(f["stream"], f["seq"]) for f in out.json()}, "every forecast", 120)
    assert daemon.stop() == 0
    forecasts = out.json()
    out.close()
    publisher.close()
    got: dict[tuple[str, int], list[float]] = {}
    for f in forecasts:
        got.setdefault((f["stream"], f["seq"]), []).append(f["prediction"])
    check_forecasts(got, values, ref)
    ratio = len(forecasts) / (streams * rounds)
    print(
        f"replay_publish={replay_publish}: {len(forecasts)} forecasts for {streams * rounds}"
        f" samples, {ratio:.2f} per sample, {kills} SIGKILLs"
    )
    if replay_publish == "unconfirmed":
        assert ratio <= 1.2, ratio


def test_run_takes_accept_state_loss_on_the_command_line() -> None:
    from forecaster.cli import build_parser

    assert build_parser().parse_args(["run", "--accept-state-loss"]).accept_state_loss
    assert not build_parser().parse_args(["run"]).accept_state_loss


class FailingStore:
    """The park store's SQLite connection whose inserts fail as on a full disk while ``full``
    (the journal's WAL may still have room to reuse while evicted.sqlite must grow)."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db
        self.full = False

    def executemany(self, sql: str, rows: Any) -> sqlite3.Cursor:
        if self.full and sql.lstrip().upper().startswith("INSERT"):
            raise sqlite3.OperationalError("database or disk is full")
        return self.db.executemany(sql, rows)

    def execute(self, sql: str, *args: Any) -> sqlite3.Cursor:
        return self.db.execute(sql, *args)

    def commit(self) -> None:
        self.db.commit()

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> sqlite3.Connection:
        return self.db.__enter__()

    def __exit__(self, *exc: object) -> bool | None:
        return self.db.__exit__(*exc)


def test_park_store_full_holds_the_tick_and_resumes_in_order(
    broker: Broker, prefix: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Under ``engine.max_streams`` every tick parks a stream; while the park store refuses
    writes, the tick that needs it waits (journaled, nothing changed) and nothing else is taken;
    afterwards every sample has one forecast, in order, equal to an unbounded run's."""
    values = series(4, 60, seed=10)
    ref = offline_reference(values)
    config = daemon_config(
        broker,
        prefix,
        tmp_path / "state",
        mqtt={
            "qos_out": 1,
            "input_topics": [f"{prefix}/in/{{stream}}"],
            "output_topic": f"{prefix}/out/{{stream}}",
        },
        engine={"max_streams": 2},
        state={"retry_interval": 0.2, "fault_log_interval": 3600},
    )
    caplog.set_level(logging.INFO, logger="forecaster")
    with Collector(broker, f"{prefix}/out/+") as out, RunningDaemon(config) as running:
        daemon = running.daemon
        assert daemon.store is not None
        store = FailingStore(daemon.store.db)
        daemon.store.db = store  # type: ignore[assignment]
        publisher = Publisher(broker, prefix, values, rate=40).start()
        try:
            wait_until(lambda: len(out.messages) >= 20, "forecasts before the fault", 20)
            store.full = True
            wait_until(
                lambda: "storage fault: park_store" in readyz(running)[1],
                "/readyz naming the park store",
                20,
            )
            assert readyz(running)[0] == 503
            sent = len(publisher.infos)
            wait_until(lambda: len(publisher.infos) >= sent + 40, "samples during the fault", 20)
            held = running.scrape()
            store.full = False
            wait_until(lambda: readyz(running)[0] == 200, "/readyz 200 again", 20)
            publisher.wait_accepted(timeout=60)
            want = {(s, k) for s in values for k in range(1, 61)}
            wait_until(
                lambda: {(f["stream"], f["seq"]) for f in out.json()} >= want,
                "a forecast for every sample",
                60,
            )
        finally:
            running.stop(check=False)
            publisher.close()
    assert metric_value(held, "forecaster_storage_fault", part="park_store") == 1
    assert metric_value(held, "forecaster_storage_held_samples") > 0
    forecasts = out.json()
    for stream in values:
        assert [f["seq"] for f in forecasts if f["stream"] == stream] == list(range(1, 61))
    got: dict[tuple[str, int], list[float]] = {}
    for f in forecasts:
        got.setdefault((f["stream"], f["seq"]), []).append(f["prediction"])
    check_forecasts(got, values, ref)
    assert "storage recovered: the park_store" in caplog.text


def test_link_cut_while_samples_are_held_applies_each_once(
    broker: Broker, prefix: str, tmp_path: Path
) -> None:
    """The journal refuses writes, so a tick is held unacknowledged; then the link is cut and
    comes back, and the broker resends what was unacknowledged (the held tick's messages too).
    Once the journal takes writes, the held tick is applied, its resent copies are refused as
    what they are (duplicates of applied samples), and every sample has one forecast, in order."""
    values = series(3, 100, seed=12)
    ref = offline_reference(values)
    relay = Relay(broker)
    config = daemon_config(
        relay,
        prefix,
        tmp_path / "state",
        mqtt={
            "qos_out": 1,
            "input_topics": [f"{prefix}/in/{{stream}}"],
            "output_topic": f"{prefix}/out/{{stream}}",
        },
        state={"retry_interval": 0.2, "fault_log_interval": 3600},
    )
    disk = InjectedDisk(tmp_path / "state")
    with Collector(broker, f"{prefix}/out/+") as out, RunningDaemon(config) as running:
        daemon = running.daemon
        disk.attach(daemon)
        publisher = Publisher(broker, prefix, values, rate=50).start()
        try:
            wait_until(lambda: len(out.messages) >= 30, "forecasts before the fault", 20)
            disk.fill()
            wait_until(lambda: daemon.intake.held is not None, "a tick held for the journal", 10)
            relay.cut(down_for=0.5)
            wait_until(lambda: daemon.link.connects == 2, "the reconnect", 15)
            sent = len(publisher.infos)
            wait_until(lambda: len(publisher.infos) >= sent + 30, "samples after it", 20)
            disk.free()
            publisher.wait_accepted(timeout=60)
            want = {(s, k) for s in values for k in range(1, 101)}
            wait_until(
                lambda: {(f["stream"], f["seq"]) for f in out.json()} >= want,
                "a forecast for every sample",
                60,
            )
            metrics = running.scrape()
        finally:
            running.stop(check=False)
            publisher.close()
            relay.close()
    # the held tick's messages came again on the new connection, and were not applied twice
    assert metric_value(metrics, "forecaster_samples_rejected_total", reason="duplicate") >= 1
    forecasts = out.json()
    for stream in values:
        assert [f["seq"] for f in forecasts if f["stream"] == stream] == list(range(1, 101))
    got: dict[tuple[str, int], list[float]] = {}
    for f in forecasts:
        got.setdefault((f["stream"], f["seq"]), []).append(f["prediction"])
    check_forecasts(got, values, ref)
