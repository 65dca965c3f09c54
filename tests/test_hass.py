"""Home Assistant MQTT discovery through a real Mosquitto: retained configs that HA's MQTT sensor
schema accepts, whose templates read the daemon's real forecast messages."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from jinja2.sandbox import ImmutableSandboxedEnvironment

from forecaster.hass import object_id
from tests.conftest import Broker, Collector
from tests.helpers import RunningDaemon, daemon_config, mqtt_client, wait_until

# Home Assistant's MQTT sensor options (https://www.home-assistant.io/integrations/sensor.mqtt/)
# and the discovery-only ``origin``; HA refuses a config with other keys or wrong types.
SENSOR_KEYS = {
    "availability": list,
    "availability_mode": str,
    "availability_template": str,
    "availability_topic": str,
    "default_entity_id": str,
    "device": dict,
    "device_class": str,
    "enabled_by_default": bool,
    "encoding": str,
    "entity_category": str,
    "entity_picture": str,
    "expire_after": int,
    "force_update": bool,
    "icon": str,
    "json_attributes_template": str,
    "json_attributes_topic": str,
    "last_reset_value_template": str,
    "name": str,
    "object_id": str,
    "options": list,
    "origin": dict,
    "payload_available": str,
    "payload_not_available": str,
    "platform": str,
    "qos": int,
    "state_class": str,
    "state_topic": str,
    "suggested_display_precision": int,
    "unique_id": str,
    "unit_of_measurement": str,
    "value_template": str,
}
DEVICE_KEYS = {
    "configuration_url": str,
    "connections": list,
    "hw_version": str,
    "identifiers": list,
    "manufacturer": str,
    "model": str,
    "model_id": str,
    "name": str,
    "serial_number": str,
    "suggested_area": str,
    "sw_version": str,
    "via_device": str,
}
AVAILABILITY_KEYS = {
    "topic": str,
    "payload_available": str,
    "payload_not_available": str,
    "value_template": str,
}
ORIGIN_KEYS = {"name": str, "sw_version": str, "support_url": str}
STATE_CLASSES = {"measurement", "measurement_angle", "total", "total_increasing"}
TOPIC = re.compile(
    r"^homeassistant/sensor/(?P<node>[A-Za-z0-9_-]+)/(?P<object>[A-Za-z0-9_-]+)/config$"
)
jinja = ImmutableSandboxedEnvironment()


def check_keys(where: str, body: dict, schema: dict[str, type]) -> None:
    for key, value in body.items():
        assert key in schema, f"{where}: {key!r} is not an option HA knows"
        assert isinstance(value, schema[key]), f"{where}.{key}: {value!r} is not {schema[key]}"


def check_sensor_schema(config: dict) -> None:
    """HA's MQTT sensor schema, the parts a discovered sensor needs."""
    check_keys("config", config, SENSOR_KEYS)
    assert config["state_topic"] and "+" not in config["state_topic"]
    assert config["unique_id"]
    assert config.get("state_class", "measurement") in STATE_CLASSES
    assert config.get("qos", 0) in (0, 1, 2)
    device = config["device"]
    check_keys("device", device, DEVICE_KEYS)
    assert device.get("identifiers") or device.get("connections")  # HA requires one of them
    assert "availability_topic" not in config  # the list form instead (not both)
    for entry in config["availability"]:
        check_keys("availability", entry, AVAILABILITY_KEYS)
        assert entry["topic"]
    assert config.get("availability_mode", "latest") in ("all", "any", "latest")
    check_keys("origin", config["origin"], ORIGIN_KEYS)
    assert config["origin"]["name"]
    jinja.from_string(config["value_template"])  # HA compiles it with Jinja2


def render(template: str, payload: bytes) -> str:
    """As HA renders ``value_template``: ``value`` the payload text, ``value_json`` parsed."""
    text = payload.decode()
    return jinja.from_string(template).render(value=text, value_json=json.loads(text))


def configs_of(messages: list[tuple[str, bytes, bool]]) -> dict[str, dict]:
    return {
        topic: json.loads(payload) for topic, payload, _ in messages if topic.endswith("/config")
    }


def ha_config(broker: Broker, prefix: str, tmp_path: Path, cap: int = 3):
    return daemon_config(
        broker,
        prefix,
        tmp_path / "state",
        home_assistant={"enabled": True, "node_id": f"{prefix}-node"},
        metrics={"port": 0, "stream_label_cap": cap},
    )


def test_discovery_configs_match_the_sensor_schema(
    broker: Broker, prefix: str, tmp_path: Path
) -> None:
    streams = ["kitchen.temp", "kitchen_temp", "boiler-1", "garage.door", "attic"]
    config = ha_config(broker, prefix, tmp_path, cap=3)
    with (
        Collector(broker, "homeassistant/#") as discovery,
        Collector(broker, f"{prefix}/forecasts/#") as forecasts,
        RunningDaemon(config) as running,
        mqtt_client(broker) as publisher,
    ):
        for i in range(6):
            for stream in streams:
                publisher.publish(f"{prefix}/sensors/{stream}/value", str(0.1 * i), qos=1)
        messages = forecasts.wait_raw(6 * len(streams))
        wait_until(lambda: len(configs_of(discovery.messages)) >= 9, "nine discovery configs")
        configs = configs_of(discovery.wait_raw(9))
        labelled = running.daemon.metrics.labelled()
        assert len(labelled) == 3  # bounded by metrics.stream_label_cap: 3 streams x 3 sensors
        assert len(configs) == 9
        assert len({c["unique_id"] for c in configs.values()}) == 9
        by_stream: dict[str, dict[str, dict]] = {}
        for topic, body in configs.items():
            match = TOPIC.match(topic)
            assert match is not None, topic
            assert match["node"] == f"{prefix}-node"
            check_sensor_schema(body)
            assert body["availability"][0]["topic"] == f"{prefix}/status"
            by_stream.setdefault(body["device"]["name"], {})[match["object"]] = body
        assert set(by_stream) == set(labelled)
        for stream, sensors in by_stream.items():
            oid = object_id(stream)
            assert set(sensors) == {f"{oid}_forecast", f"{oid}_error", f"{oid}_anomaly"}
            assert {s["state_topic"] for s in sensors.values()} == {f"{prefix}/forecasts/{stream}"}
            # The templates read the daemon's real forecast messages.
            for topic, payload, _ in messages:
                if topic != f"{prefix}/forecasts/{stream}":
                    continue
                forecast = json.loads(payload)
                got = render(sensors[f"{oid}_forecast"]["value_template"], payload)
                assert float(got) == pytest.approx(forecast["prediction"])
                got = render(sensors[f"{oid}_anomaly"]["value_template"], payload)
                assert float(got) == pytest.approx(forecast["anomaly"])
                got = render(sensors[f"{oid}_error"]["value_template"], payload)
                if forecast["error"] is None:
                    assert got == "None"  # HA shows the sensor as unknown
                else:
                    assert float(got) == pytest.approx(forecast["error"])
        availability = next(iter(configs.values()))["availability"][0]
        for status, expected in (
            ("online", "online"),
            ("offline", "offline"),
            ("stopped", "offline"),
        ):
            assert render_availability(availability, status) == expected
        # retained: a subscriber that comes later (Home Assistant starting) gets them all
        with Collector(broker, "homeassistant/#") as late:
            retained = late.wait_raw(9)
            assert len(retained) == 9 and all(flag for _, _, flag in retained)


def render_availability(entry: dict, status: str) -> str:
    return jinja.from_string(entry["value_template"]).render(value=status)


def test_configs_published_again_after_the_broker_lost_them(
    broker: Broker, prefix: str, tmp_path: Path
) -> None:
    config = ha_config(broker, prefix, tmp_path)
    with RunningDaemon(config) as running, mqtt_client(broker) as publisher:
        publisher.publish(f"{prefix}/sensors/attic/value", "1.5", qos=1)
        with Collector(broker, "homeassistant/#") as first:
            assert len({topic for topic, _, _ in first.wait_raw(3)}) == 3
        broker.restart()  # no persistence: the retained configs are gone
        with Collector(broker, "homeassistant/#") as again:
            running.wait_ready()
            assert len({t for t, _, _ in again.wait_raw(3)}) == 3  # again, on the new connection
        with Collector(broker, "homeassistant/#") as later:
            retained = later.wait_raw(3)
            assert len(retained) == 3 and all(flag for _, _, flag in retained)


def test_discovery_is_off_by_default(broker: Broker, prefix: str, tmp_path: Path) -> None:
    config = daemon_config(broker, prefix, tmp_path / "state")
    with (
        Collector(broker, "homeassistant/#") as discovery,
        Collector(broker, f"{prefix}/forecasts/#") as forecasts,
        RunningDaemon(config),
        mqtt_client(broker) as publisher,
    ):
        publisher.publish(f"{prefix}/sensors/attic/value", "1.5", qos=1)
        assert len(forecasts.wait_raw(1)) == 1
        assert discovery.messages == []


def test_discovery_refuses_output_frames_and_odd_node_ids() -> None:
    from forecaster.config import load_config
    from forecaster.errors import ConfigError

    with pytest.raises(ConfigError, match="output_frames"):
        load_config(
            environ={
                "FORECASTER_HOME_ASSISTANT__ENABLED": "true",
                "FORECASTER_MQTT__OUTPUT_FRAMES": "true",
            }
        )
    with pytest.raises(ConfigError, match=r"home_assistant\.node_id"):
        load_config(environ={"FORECASTER_HOME_ASSISTANT__NODE_ID": "a/b"})
