"""Home Assistant MQTT discovery: each stream's forecast, error and anomaly score as HA sensors.

Beside the publishing stage: when a stream first gets its own metric label (so at most
``metrics.stream_label_cap`` streams, like the per-stream series), the daemon publishes three
retained configs, ``<discovery_prefix>/sensor/<node_id>/<object_id>_<sensor>/config``. Each
sensor reads the stream's forecast messages (the output topic; ``value_template`` picks the field)
and is available while the daemon's status topic says ``online`` (``offline``, the last will, and
``stopped`` both make it unavailable). The configs are published again after every reconnect, so
a broker that lost its retained messages gets them back.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections import deque
from collections.abc import Callable, Iterable

import orjson

from forecaster import __version__
from forecaster.config import Config
from forecaster.metrics import Metrics
from forecaster.parse import TopicTemplate

log = logging.getLogger(__name__)

# (object suffix, sensor name, field of the forecast message, display precision)
SENSORS = (
    ("forecast", "Forecast", "prediction", 3),
    ("error", "Forecast error", "error", 3),
    ("anomaly", "Anomaly score", "anomaly", 4),
)
AVAILABILITY_TEMPLATE = "{{ 'online' if value == 'online' else 'offline' }}"


def object_id(stream: str) -> str:
    """The stream as a discovery object id (HA allows ``[A-Za-z0-9_-]``); a short hash of the
    original keeps ``a.b`` and ``a_b`` apart.

    >>> object_id("boiler-1.temp")
    'boiler-1_temp_3644428c'
    """
    digest = hashlib.sha1(stream.encode()).hexdigest()[:8]
    return f"{re.sub(r'[^A-Za-z0-9_-]', '_', stream)}_{digest}"


def discovery_configs(config: Config, stream: str) -> list[tuple[str, dict[str, object]]]:
    """The (topic, config) pairs announcing ``stream``'s three sensors."""
    ha = config.home_assistant
    node = ha.node_id
    oid = object_id(stream)
    state_topic = TopicTemplate.compile(config.mqtt.output_topic).topic_for(stream)
    device = {
        "identifiers": [f"forecaster_{node}_{oid}"],
        "name": stream,
        "manufacturer": "forecaster",
        "model": "streaming one-step forecaster",
        "sw_version": __version__,
    }
    availability = [
        {
            "topic": config.mqtt.status_topic,
            "value_template": AVAILABILITY_TEMPLATE,
            "payload_available": "online",
            "payload_not_available": "offline",
        }
    ]
    configs = []
    for suffix, name, field, precision in SENSORS:
        configs.append(
            (
                f"{ha.discovery_prefix}/sensor/{node}/{oid}_{suffix}/config",
                {
                    "name": name,
                    "unique_id": f"forecaster_{node}_{oid}_{suffix}",
                    "state_topic": state_topic,
                    # a null field renders "None": HA shows the sensor as unknown
                    "value_template": f"{{{{ value_json.{field} }}}}",
                    "state_class": "measurement",
                    "suggested_display_precision": precision,
                    "availability": availability,
                    "availability_mode": "latest",
                    "device": device,
                    "origin": {"name": "forecaster", "sw_version": __version__},
                    "qos": config.mqtt.qos_out,
                },
            )
        )
    return configs


class Discovery:
    """Announces streams once each (and all again after a reconnect); a publish the link refuses
    is kept and retried in order from ``flush``."""

    def __init__(self, config: Config, publish: Callable[[str, bytes], bool]) -> None:
        self.config = config
        self.publish = publish  # retained, QoS 1; False: not taken now
        self.announced: list[str] = []
        self._waiting: deque[tuple[str, bytes]] = deque()
        self._labels = 0  # metric labels looked at so far
        self._connection = 0  # the link's connection count when last seen connected

    def after_tick(self, metrics: Metrics) -> None:
        """Announce the streams given a metric label since the last tick (engine thread; one
        integer comparison when there are none)."""
        if metrics.labels_given != self._labels:
            start, self._labels = self._labels, metrics.labels_given
            self.announce(metrics.labelled(start))

    def housekeeping(self, connects: int, connected: bool) -> None:
        """Retry what the link refused; after a reconnect, publish every config again."""
        if connected and connects != self._connection:
            first, self._connection = self._connection == 0, connects
            if not first:  # a new connection: the broker may have lost the retained configs
                self.again()
        self.flush()

    def announce(self, streams: Iterable[str]) -> None:
        for stream in streams:
            self.announced.append(stream)
            self._queue(stream)
        self.flush()

    def again(self) -> None:
        """Every stream once more (a new connection: the broker may have lost them)."""
        self._waiting.clear()
        for stream in self.announced:
            self._queue(stream)
        self.flush()

    def flush(self) -> None:
        while self._waiting:
            topic, payload = self._waiting[0]
            if not self.publish(topic, payload):
                return
            self._waiting.popleft()

    def _queue(self, stream: str) -> None:
        for topic, body in discovery_configs(self.config, stream):
            self._waiting.append((topic, orjson.dumps(body)))
