from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from forecaster.config import Config, load_config
from forecaster.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def test_default_yaml_documents_exactly_the_defaults() -> None:
    assert load_config(ROOT / "configs" / "default.yaml", environ={}) == Config()


def test_errors_name_key_value_and_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("mqtt:\n  host: b\n  port: abc\nengine:\n  max_bach: 5\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    text = str(info.value)
    assert "mqtt.port = 'abc' (line 3)" in text
    assert "engine.max_bach = 5 (line 5)" in text and "Extra inputs" in text


def test_environment_overrides_nested_keys(tmp_path: Path) -> None:
    env = {
        "FORECASTER_MQTT__HOST": "broker.lan",
        "FORECASTER_MQTT__PORT": "8883",
        "FORECASTER_METRICS__PORT": "9999",
        "FORECASTER_STATE__DIR": "/var/lib/forecaster",
    }
    config = load_config(None, environ=env)
    assert (config.mqtt.host, config.mqtt.port) == ("broker.lan", 8883)
    assert config.metrics.port == 9999
    assert str(config.state.dir) == "/var/lib/forecaster"
    with pytest.raises(ConfigError, match=r"mqtt.port = 'x' \(from environment\)"):
        load_config(None, environ={"FORECASTER_MQTT__PORT": "x"})


@pytest.mark.parametrize(
    ("mqtt", "message"),
    [
        ({"input_topics": ["data/{stream}"], "output_topic": "data/{stream}"}, "overlaps"),
        ({"input_topics": ["a/{stream}/v"], "output_topic": "a/{stream}/v"}, "overlaps"),
        ({"input_topics": ["a/{stream}"], "status_topic": "a/status"}, "overlaps"),
        ({"input_topics": ["a/#"]}, "exactly one"),
        ({"input_topics": ["a/x{stream}"]}, "exactly one"),
        ({"output_topic": "f/+"}, "exactly one"),
        ({"qos_in": 3}, "qos_in"),
        ({"reconnect_min_delay": "nan"}, "reconnect_min_delay"),
    ],
)
def test_bad_mqtt_sections(mqtt: dict, message: str) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=message):
        Config.model_validate({"mqtt": mqtt})


def test_check_config_command(tmp_path: Path) -> None:
    good = subprocess.run(
        [
            sys.executable,
            "-m",
            "forecaster.cli",
            "check-config",
            str(ROOT / "configs" / "default.yaml"),
        ],
        capture_output=True,
        text=True,
    )
    assert good.returncode == 0, good.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("mqtt:\n  prot: 1883\nmetrics:\n  port: many\n")
    result = subprocess.run(
        [sys.executable, "-m", "forecaster.cli", "check-config", str(bad)],
        capture_output=True,
        text=True,
    )
    assert result.returncode != 0
    assert "mqtt.prot" in result.stderr and "metrics.port" in result.stderr
