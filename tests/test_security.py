"""Security over a real Mosquitto: a password file, a TLS listener with certificates made here,
secrets kept out of logs, metrics and errors; checkpoints that cannot run code; stream ids."""

from __future__ import annotations

import json
import logging
import pickle
import shutil
import subprocess
import threading
import time
import urllib.request
import uuid
from pathlib import Path

import paho.mqtt.client as paho
import pytest
import torch
from paho.mqtt.enums import CallbackAPIVersion

from forecaster.config import Config, load_config
from forecaster.daemon import Daemon
from forecaster.engine import Engine
from forecaster.errors import CheckpointError, ConfigError, PayloadError
from forecaster.parse import PayloadParser
from forecaster.persist import load_checkpoint
from forecaster.records import STREAM_ID, Batch, Sample
from tests.conftest import Broker, free_port
from tests.helpers import RunningDaemon, daemon_config

PASSWORD = "Pw-7c1f9e2a-not-in-any-log"
WRONG = "Wrong-3b8d0c44-not-in-any-log"
TESTER_PASSWORD = "tester-pw-5e1d"


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_certificates(folder: Path, name: str = "ca") -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1/localhost and a client certificate, all signed."""
    if shutil.which("openssl") is None:
        pytest.fail("the openssl command is needed to make test certificates")
    folder.mkdir(parents=True, exist_ok=True)
    days = ("-days", "2")
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key",
            "-out", f"{name}.crt", "-subj", f"/CN=forecaster test {name}", *days, cwd=folder)  # fmt: skip
    (folder / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for who, subject in (("server", "/CN=localhost"), ("client", "/CN=forecaster")):
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{who}.key",
                "-out", f"{who}.csr", "-subj", subject, cwd=folder)  # fmt: skip
        openssl("x509", "-req", "-in", f"{who}.csr", "-CA", f"{name}.crt", "-CAkey", f"{name}.key",
                "-CAcreateserial", "-out", f"{who}.crt", "-extfile", "san.ext", *days, cwd=folder)  # fmt: skip
    return {
        "ca": folder / f"{name}.crt",
        "server": folder / "server.crt",
        "server_key": folder / "server.key",
        "client": folder / "client.crt",
        "client_key": folder / "client.key",
    }


class SecureBroker(Broker):
    """Mosquitto with a password file, no anonymous access, a TLS listener that wants a client
    certificate (for the daemon) and a plain listener (for the test's own clients)."""

    def __init__(self, folder: Path) -> None:
        super().__init__(folder)
        self.certs = make_certificates(folder / "certs")
        self.tls_port = free_port()
        passwd = folder / "passwd"
        subprocess.run(
            ["mosquitto_passwd", "-c", "-b", str(passwd), "forecaster", PASSWORD], check=True
        )
        subprocess.run(
            ["mosquitto_passwd", "-b", str(passwd), "tester", TESTER_PASSWORD], check=True
        )
        passwd.chmod(0o600)
        self.conf.write_text(
            "user root\n"  # when run as root, keep root so it can read the test's files
            "per_listener_settings false\n"
            "allow_anonymous false\n"
            f"password_file {passwd}\n"
            "persistence false\n"
            "set_tcp_nodelay true\n"
            f"listener {self.port} 127.0.0.1\n"
            f"listener {self.tls_port} 127.0.0.1\n"
            f"cafile {self.certs['ca']}\n"
            f"certfile {self.certs['server']}\n"
            f"keyfile {self.certs['server_key']}\n"
            "require_certificate true\n"
        )


@pytest.fixture
def secure_broker(tmp_path: Path):
    folder = tmp_path / "broker"
    folder.mkdir()
    broker = SecureBroker(folder).start()
    yield broker
    broker.stop()


def make_tester(broker: SecureBroker) -> paho.Client:
    """The test's own client on the plain listener, with its own credentials."""
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"tester-{uuid.uuid4().hex[:8]}")
    client.username_pw_set("tester", TESTER_PASSWORD)
    client.connect(broker.host, broker.port)
    client.loop_start()
    return client


def secure_config(broker: SecureBroker, prefix: str, state: Path, **mqtt: object) -> Config:
    config = daemon_config(broker, prefix, state)
    data = config.model_dump()
    data["mqtt"].update(
        port=broker.tls_port,
        username="forecaster",
        tls={
            "enabled": True,
            "ca_file": broker.certs["ca"],
            "cert_file": broker.certs["client"],
            "key_file": broker.certs["client_key"],
        },
        **mqtt,
    )
    return Config.model_validate(data)


def assert_secret_absent(secret: str, *texts: str) -> None:
    for text in texts:
        assert secret not in text


def test_daemon_connects_over_tls_with_a_password_file(
    secure_broker: SecureBroker, prefix: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    password_file = tmp_path / "mqtt-password"
    password_file.write_text(PASSWORD + "\n")
    config = secure_config(secure_broker, prefix, tmp_path / "state", password_file=password_file)
    client = make_tester(secure_broker)
    got: list[dict] = []
    subscribed = threading.Event()
    client.on_message = lambda c, u, m: got.append(json.loads(m.payload))
    client.on_subscribe = lambda *a: subscribed.set()
    client.subscribe(f"{prefix}/forecasts/+", qos=1)
    assert subscribed.wait(10)
    with RunningDaemon(config) as running:
        for i in range(5):
            client.publish(f"{prefix}/sensors/s1/value", str(float(i)), qos=1).wait_for_publish(5)
        deadline = time.monotonic() + 10
        while len(got) < 5 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert [f["value"] for f in got] == [0.0, 1.0, 2.0, 3.0, 4.0]
        metrics = running.scrape()
        assert running.daemon.http is not None  # metrics bound to localhost unless configured
        assert running.daemon.http.server.server_address[0] == "127.0.0.1"
    client.loop_stop()
    client.disconnect()
    assert "connected to" in caplog.text
    assert_secret_absent(PASSWORD, caplog.text, metrics, repr(config), config.model_dump_json())


def test_wrong_password_keeps_retrying_with_a_clear_log_line(
    secure_broker: SecureBroker,
    prefix: str,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("TEST_MQTT_PASSWORD", WRONG)
    config = secure_config(
        secure_broker, prefix, tmp_path / "state", password_env="TEST_MQTT_PASSWORD"
    )
    with RunningDaemon(config, wait_ready=False) as running:
        deadline = time.monotonic() + 15
        refusals: list[str] = []
        while len(refusals) < 3 and time.monotonic() < deadline:
            time.sleep(0.2)
            refusals = [
                r.getMessage() for r in caplog.records if "refused the connection" in r.getMessage()
            ]
        assert len(refusals) >= 3, caplog.text  # it keeps trying
        assert "as user 'forecaster': check mqtt.username and its password" in refusals[0]
        ok, detail = running.daemon.ready()
        assert not ok and detail == "broker not connected"
        with urllib.request.urlopen(f"{running.metrics_url}/metrics", timeout=5) as response:
            metrics = response.read().decode()
        assert "forecaster_broker_connected 0.0" in metrics
    assert_secret_absent(WRONG, caplog.text, metrics, repr(config), config.model_dump_json())


def test_tls_with_an_unknown_ca_is_refused_and_retried(
    secure_broker: SecureBroker, prefix: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    other = make_certificates(tmp_path / "other-ca", name="otherca")
    config = secure_config(secure_broker, prefix, tmp_path / "state", password=PASSWORD)
    data = config.model_dump()
    data["mqtt"]["password"] = PASSWORD
    data["mqtt"]["tls"]["ca_file"] = other["ca"]
    config = Config.model_validate(data)
    with RunningDaemon(config, wait_ready=False) as running:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and caplog.text.count("cannot connect to") < 2:
            time.sleep(0.2)
        assert caplog.text.count("cannot connect to") >= 2, caplog.text
        assert "certificate verify failed" in caplog.text
        assert not running.daemon.ready()[0]
    assert_secret_absent(PASSWORD, caplog.text, repr(config))


def test_password_never_shows_in_config_errors_or_dumps(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("mqtt:\n  username: u\n  password: 987654321\n")  # a number: refused
    with pytest.raises(ConfigError) as error:
        load_config(path, environ={})
    assert "mqtt.password = '**********' (line 3)" in str(error.value)
    assert "987654321" not in str(error.value) and error.value.__cause__ is None
    path.write_text("mqtt:\n  password: 'abc-secret-1'\n  password_env: X\n  username: u\n")
    with pytest.raises(ConfigError) as error:
        load_config(path, environ={})
    assert "at most one of" in str(error.value) and "abc-secret-1" not in str(error.value)
    # From the environment the value is taken verbatim (not as YAML: 12345 stays a string).
    config = load_config(None, environ={"FORECASTER_MQTT__USERNAME": "u",
                                        "FORECASTER_MQTT__PASSWORD": "12345"})  # fmt: skip
    assert config.mqtt.credentials() == ("u", "12345")
    assert "12345" not in repr(config) and "12345" not in config.model_dump_json()
    missing = Config.model_validate(
        {"mqtt": {"username": "u", "password_file": str(tmp_path / "nope")}}
    )
    with pytest.raises(ConfigError, match=r"mqtt.password_file: cannot read .*nope"):
        missing.mqtt.credentials()
    with pytest.raises(ConfigError, match="a password needs a username"):
        load_config(None, environ={"FORECASTER_MQTT__PASSWORD_ENV": "X"})


class Evil:
    """Unpickling this creates a file: proof that a loader ran code from the file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize("name", ["model.safetensors", "model.pt"])
def test_a_pickle_checkpoint_is_refused_without_running_it(tmp_path: Path, name: str) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / name
    torch.save({"model": Evil(marker)}, path)  # torch's format: a zip holding a pickle
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_checkpoint(path)
    config = Config.model_validate({"model": {"checkpoint": str(path)}, "metrics": {"port": 0},
                                    "state": {"dir": str(tmp_path / "state")}})  # fmt: skip
    with pytest.raises(CheckpointError):
        Daemon(config).start()
    assert not marker.exists()
    path.write_bytes(pickle.dumps(Evil(marker)))  # a bare pickle too
    with pytest.raises(CheckpointError):
        load_checkpoint(path)
    assert not marker.exists()
    pickle.loads(path.read_bytes())  # the file really is hostile: unpickling runs it
    assert marker.exists()


GOOD_IDS = ["a", "boiler-1", "Sensor_7.temp", "0" * 64]
BAD_IDS = ["", "-lead", "_other", ".hidden", "a" * 65, "a b", "é", "a\n", "a\x00", "x{y}", "a+"]


def test_stream_ids_are_checked_by_one_rule_before_topics_and_labels(tiny_model) -> None:
    parser = PayloadParser(["s/{stream}/v"])
    engine = Engine(tiny_model)
    for stream in GOOD_IDS:
        assert STREAM_ID.fullmatch(stream)
        assert parser.parse(f"s/{stream}/v", b"1.0", 0.0).stream == stream
        assert not engine.admit(Batch.of([stream], [1.0])).rejected_reason
    for stream in BAD_IDS:
        with pytest.raises(PayloadError) as error:
            parser.parse(f"s/{stream}/v", b"1.0", 0.0)
        assert error.value.reason == "bad_stream"
        assert engine.admit(Batch.of([stream], [1.0])).rejected_reason == ["bad_stream"]
    result = engine.tick([Sample(s, 1.0) for s in BAD_IDS])
    assert not result.forecasts and {r.reason for r in result.rejected} == {"bad_stream"}
    assert len(engine.streams) == 0
