"""``forecaster demo`` as a new user runs it: under a pipe (``make demo 2>&1 | tee log``), stopped
by Ctrl-C, SIGTERM or SIGHUP, twice at once, and on a taken metrics port. Whatever stops it, no
broker outlives it and its temporary folder is gone."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import mosquitto_path
from tests.helpers import wait_until

DEMO = [sys.executable, "-m", "forecaster.cli", "demo"]


def processes_mentioning(text: str) -> list[int]:
    """PIDs whose command line contains ``text`` (the demo's broker names its config file)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if text in cmdline:
            found.append(int(entry.name))
    return found


def group_members(pgid: int) -> list[tuple[int, list[bytes]]]:
    """Live processes of process group ``pgid`` (zombies not counted): (pid, argv)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if fields[0] != "Z" and int(fields[2]) == pgid:
            found.append((int(entry.name), argv))
    return found


def demo_folders(tmp: Path) -> list[Path]:
    return list(tmp.glob("forecaster-demo-*"))


@contextlib.contextmanager
def piped(command: str, tmp: Path, wait: float = 90) -> Iterator[tuple[subprocess.Popen, Path]]:
    """``COMMAND 2>&1 | tee log`` in a session of its own (as a terminal's job), the demo's
    temporary folder under ``tmp``; yields once the live view shows all four streams, and kills
    whatever is left of the job (and of the broker it started) afterwards."""
    mosquitto_path()  # the broker users get when Mosquitto is installed (skips otherwise)
    log = tmp / "log"
    env = {**os.environ, "TMPDIR": str(tmp)}
    job = subprocess.Popen(
        ["sh", "-c", f"{command} 2>&1 | tee {log}"],
        stdout=subprocess.DEVNULL,
        env=env,
        start_new_session=True,
    )
    try:
        try:
            wait_until(
                lambda: log.exists() and "sine-003" in log.read_text(), "the live view", wait
            )
        except AssertionError as exc:  # say what the demo said instead
            said = log.read_text()[-3000:] if log.exists() else "(no output at all)"
            raise AssertionError(f"{exc}; the demo's output ends with:\n{said}") from None
        assert demo_folders(tmp) and processes_mentioning(str(tmp))
        yield job, log
    finally:
        if group_members(job.pid):
            os.killpg(job.pid, signal.SIGKILL)
        job.wait(10)
        for pid in processes_mentioning(str(tmp)):  # only what this test started
            os.kill(pid, signal.SIGKILL)


@pytest.fixture
def piped_demo(tmp_path: Path) -> Iterator[tuple[subprocess.Popen, Path]]:
    """``forecaster demo 2>&1 | tee log``, running."""
    with piped(" ".join(DEMO), tmp_path) as running:
        yield running


def demo_pid(job: subprocess.Popen) -> int:
    """The demo's own PID in the job (the Python process, not ``sh`` or ``tee``)."""
    pids = [pid for pid, argv in group_members(job.pid) if argv[0] == sys.executable.encode()]
    assert pids, "no demo process in the job"
    return pids[0]


@pytest.mark.parametrize(
    ("sig", "to_group"),
    [
        (signal.SIGINT, True),  # Ctrl-C: the demo and tee both get it; tee's end of the pipe dies
        (signal.SIGHUP, True),  # the terminal closed
        (signal.SIGTERM, False),  # timeout 12 forecaster demo; kill
    ],
    ids=["ctrl-c", "sighup", "sigterm"],
)
def test_demo_under_a_pipe_leaves_no_broker_and_no_folder(
    piped_demo: tuple[subprocess.Popen, Path], tmp_path: Path, sig: int, to_group: bool
) -> None:
    job, _ = piped_demo
    if to_group:
        os.killpg(job.pid, sig)
    else:
        os.kill(demo_pid(job), sig)
    wait_until(lambda: not group_members(job.pid), "the demo and tee to exit", 60)
    wait_until(lambda: not processes_mentioning(str(tmp_path)), "the broker to exit", 30)
    assert demo_folders(tmp_path) == []


def test_a_second_demo_runs_beside_the_first(
    piped_demo: tuple[subprocess.Popen, Path], tmp_path: Path
) -> None:
    _, log = piped_demo
    second = subprocess.run(
        [*DEMO, "--duration", "4", "--streams", "1"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "TMPDIR": str(tmp_path)},
    )
    assert second.returncode == 0, second.stdout + second.stderr
    assert "done: " in second.stdout and "Traceback" not in second.stderr
    header = next(line for line in second.stdout.splitlines() if line.startswith("stream"))
    assert header.index("naive MAE") < header.index("forecast of seq+1")  # not beside "value"
    assert "MAE below naive MAE means the model is winning" in second.stdout
    first_url = log.read_text().split("metrics: ", 1)[1].split()[0]
    second_url = second.stdout.split("metrics: ", 1)[1].split()[0]
    assert first_url != second_url  # the second picked a free metrics port itself
    wait_until(lambda: len(demo_folders(tmp_path)) == 1, "the second demo's folder to go")


def test_demo_on_a_taken_metrics_port_says_so_and_cleans_up(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [*DEMO, "--duration", "5", "--metrics-port", str(port)],
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "TMPDIR": str(tmp_path)},
        )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert f"error: metrics.port: cannot listen on 127.0.0.1:{port}" in result.stderr
    wait_until(lambda: not processes_mentioning(str(tmp_path)), "the broker to exit")
    assert demo_folders(tmp_path) == []


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_make_demo_under_a_pipe_then_ctrl_c_leaves_nothing(tmp_path: Path) -> None:
    """The first hour as a user lives it: ``make demo 2>&1 | tee log`` (make installs first when
    pyproject.toml changed), Ctrl-C to the whole job: make, the demo and tee."""
    root = Path(__file__).resolve().parent.parent
    with piped(f"make -C {root} demo", tmp_path, wait=900) as (job, _):
        os.killpg(job.pid, signal.SIGINT)
        wait_until(lambda: not group_members(job.pid), "make, the demo and tee to exit", 60)
        wait_until(lambda: not processes_mentioning(str(tmp_path)), "the broker to exit", 30)
        assert demo_folders(tmp_path) == []


def test_the_demo_broker_moves_on_when_its_port_is_taken_before_it_binds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another process listens on the port chosen first (it took it between the choice and the
    broker's bind): the broker exits, and another free port is tried."""
    from forecaster import demo

    mosquitto_path()
    squatter = socket.create_server(("127.0.0.1", 0))
    taken = squatter.getsockname()[1]
    chosen = iter([taken])
    monkeypatch.setattr(demo, "free_port", lambda: next(chosen, None) or _free_port())
    try:
        proc, port, name = demo.start_broker(tmp_path, "mosquitto")
    finally:
        squatter.close()
    try:
        assert name == "mosquitto" and port != taken and proc.poll() is None
        client = socket.create_connection(("127.0.0.1", port), timeout=5)
        client.sendall(bytes([0x10, 12, 0, 4]) + b"MQTT" + bytes([4, 2, 0, 10, 0, 0]))
        assert client.recv(4)[:1] == b"\x20"  # CONNACK: an MQTT broker of ours answers
        client.close()
    finally:
        proc.kill()
        proc.wait(5)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_the_demo_takes_any_free_metrics_port_when_9108_is_gone_by_binding(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two demos starting at once both saw 9108 free; the second one's bind fails. It runs on
    any free port instead (a port the user asked for stays an error)."""
    from forecaster import demo
    from forecaster.errors import ConfigError

    squatter = socket.create_server(("127.0.0.1", 0))  # holds "9108" (a port of its own here:
    taken = squatter.getsockname()[1]  # another demo test may be using the real one)
    monkeypatch.setattr(demo, "DEFAULT_METRICS_PORT", taken)
    monkeypatch.setattr(demo, "port_is_free", lambda port, host="127.0.0.1": True)  # the look
    overrides = {"FORECASTER_MQTT__PORT": str(_free_port())}
    try:
        overrides["FORECASTER_STATE__DIR"] = str(tmp_path / "a")
        _, daemon = demo.start_daemon(overrides, None)
        try:
            assert daemon.http is not None and daemon.http.port != taken
        finally:
            daemon.shutdown()
        overrides["FORECASTER_STATE__DIR"] = str(tmp_path / "b")
        with pytest.raises(ConfigError, match=r"metrics\.port"):
            demo.start_daemon(overrides, taken)  # asked for: an error
    finally:
        squatter.close()
