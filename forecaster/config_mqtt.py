"""The ``mqtt`` section of the config: broker, credentials, TLS, payload fields and topics.

The largest section, with rules of its own (topic templates whose ``{stream}`` is one whole level,
inputs that must not overlap the outputs), so it lives apart from the other sections in
``forecaster.config``, which re-exports everything here.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    field_validator,
    model_validator,
)

from forecaster.errors import ConfigError

ENV_PREFIX = "FORECASTER_"
# Keys whose values are never shown in errors or logs, nor parsed as YAML from the environment.
SECRET_KEYS = frozenset({"password"})
PositiveFloat = Annotated[float, Field(gt=0, allow_inf_nan=False)]


def check_template(topic: str, name: str = "stream") -> str:
    """A topic template names the stream (or device) with one whole level and no wildcards.

    >>> check_template("sensors/{stream}/value")
    'sensors/{stream}/value'
    >>> check_template("sensors/#")
    Traceback (most recent call last):
    ...
    ValueError: template 'sensors/#' must contain exactly one '{stream}' level and no '+' or '#'
    """
    levels = topic.split("/")
    placeholder = "{" + name + "}"
    if levels.count(placeholder) != 1 or any(c in topic for c in "+#") or topic.count("{") != 1:
        raise ValueError(
            f"template {topic!r} must contain exactly one {placeholder!r} level and no '+' or '#'"
        )
    return topic


def check_plain_topic(topic: str) -> str:
    """A topic to publish to as it is: not empty, no wildcards, no ``{stream}``."""
    if not topic or any(c in topic for c in "#+{}"):
        raise ValueError("must be a plain topic (no wildcards, no {stream})")
    return topic


def template_filter(template: str) -> str:
    """The subscription filter of a template: ``{stream}`` (or ``{device}``) becomes ``+``.

    >>> template_filter("sensors/{stream}/value"), template_filter("devices/{device}/state")
    ('sensors/+/value', 'devices/+/state')
    """
    return template.replace("{stream}", "+").replace("{device}", "+")


def filters_overlap(a: str, b: str) -> bool:
    """Whether some topic matches both MQTT filters.

    >>> filters_overlap("sensors/+/value", "forecasts/+")
    False
    >>> filters_overlap("a/+/c", "a/b/#")
    True
    """
    left, right = a.split("/"), b.split("/")
    for x, y in zip(left, right, strict=False):
        if x == "#" or y == "#":
            return True
        if x != y and "+" not in (x, y):
            return False
    if len(left) == len(right):
        return True
    longer = left if len(left) > len(right) else right
    return longer[min(len(left), len(right))] == "#"  # "a/#" also matches "a"


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PayloadConfig(Section):
    """Where to find things in a JSON payload (a bare number needs none of them)."""

    value_field: str = "value"
    ts_field: str = "ts"
    seq_field: str = "seq"
    max_bytes: int = Field(4096, gt=0)


class TlsConfig(Section):
    """TLS to the broker; ``ca_file`` None trusts the system's CAs; a client certificate is optional."""

    enabled: bool = False
    ca_file: Path | None = None
    cert_file: Path | None = None  # client certificate (PEM), with key_file
    key_file: Path | None = None

    @field_validator("ca_file", "cert_file", "key_file")
    @classmethod
    def _readable(cls, path: Path | None) -> Path | None:
        if path is not None and not Path(path).is_file():
            raise ValueError(f"no such file: {path}")
        return path

    @model_validator(mode="after")
    def _cert_needs_key(self) -> TlsConfig:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together")
        return self


class MqttConfig(Section):
    host: str = "localhost"
    port: int = Field(1883, ge=1, le=65535)
    protocol: Literal["5", "3.1.1"] = "5"
    client_id: str = "forecaster"
    username: str | None = None
    # At most one password source; SecretStr keeps it out of reprs, dumps and errors.
    password: SecretStr | None = None
    password_file: Path | None = None  # first line of the file (mode 0600, say)
    password_env: str | None = None  # name of an environment variable holding it
    tls: TlsConfig = TlsConfig()
    keepalive: int = Field(30, ge=5)
    qos_in: Literal[0, 1, 2] = 1
    qos_out: Literal[0, 1, 2] = 0
    input_topics: list[str] = Field(
        default_factory=lambda: ["sensors/{stream}/value"], min_length=1
    )
    # Device frames: one JSON object of readings per message, {"temp": 21.5, "hum": 40.1} on
    # devices/d1/state -> streams d1.temp and d1.hum.
    frame_topics: list[str] = Field(default_factory=list)
    output_topic: str = "forecasts/{stream}"
    # Publish a frame's forecasts as one message (a JSON list) on the output topic of the frame's
    # stream (list frame) or device (device frame), instead of one message per forecast.
    output_frames: bool = False
    status_topic: str = "forecaster/status"
    reconnect_min_delay: PositiveFloat = 1.0
    reconnect_max_delay: PositiveFloat = 30.0
    # Persistent session: the broker keeps the subscription and queues QoS>0 samples while the
    # daemon is away (paho's default would start a clean session on every new client).
    clean_start: bool = False
    session_expiry: int = Field(86_400, ge=0)  # seconds the broker keeps the session (MQTT 5)
    # Forecasts on their way to the broker at most (refused while disconnected, or not yet written
    # or acknowledged); at the bound the daemon stops taking input until the broker has them.
    max_outgoing: int = Field(10_000, ge=1)
    payload: PayloadConfig = PayloadConfig()

    @field_validator("protocol", mode="before")
    @classmethod
    def _protocol_as_text(cls, value: Any) -> Any:
        return str(value) if isinstance(value, (int, float)) else value

    @field_validator("input_topics")
    @classmethod
    def _check_inputs(cls, topics: list[str]) -> list[str]:
        for topic in topics:
            check_template(topic)
        return topics

    @field_validator("frame_topics")
    @classmethod
    def _check_frames(cls, topics: list[str]) -> list[str]:
        for topic in topics:
            check_template(topic, "device")
        return topics

    @field_validator("output_topic")
    @classmethod
    def _check_output(cls, topic: str) -> str:
        return check_template(topic)

    @field_validator("status_topic")
    @classmethod
    def _check_status(cls, topic: str) -> str:
        return check_plain_topic(topic)

    @model_validator(mode="after")
    def _trees_must_not_overlap(self) -> MqttConfig:
        output = template_filter(self.output_topic)
        for frames in self.frame_topics:
            for topic in self.input_topics:
                if filters_overlap(template_filter(frames), template_filter(topic)):
                    raise ValueError(
                        f"frame topic {frames!r} overlaps input topic {topic!r}: "
                        "a message must name either a stream or a device"
                    )
        for topic in (*self.input_topics, *self.frame_topics):
            for other, what in ((output, "output_topic"), (self.status_topic, "status_topic")):
                if filters_overlap(template_filter(topic), other):
                    raise ValueError(
                        f"input topic {topic!r} overlaps {what} {other!r}: "
                        "the daemon would consume its own messages"
                    )
        if self.reconnect_max_delay < self.reconnect_min_delay:
            raise ValueError("reconnect_max_delay must be >= reconnect_min_delay")
        sources = [self.password, self.password_file, self.password_env]
        if sum(s is not None for s in sources) > 1:
            raise ValueError("give at most one of password, password_file, password_env")
        if any(s is not None for s in sources) and not self.username:
            raise ValueError("a password needs a username")
        return self

    def credentials(
        self, environ: dict[str, str] | os._Environ[str] | None = None
    ) -> tuple[str | None, str | None]:
        """``(username, password)`` read from the configured source, when it is needed (connect).

        Errors name the key and the file or variable, never the content.
        """
        environ = os.environ if environ is None else environ
        if self.password is not None:
            return self.username, self.password.get_secret_value()
        if self.password_file is not None:
            try:
                lines = Path(self.password_file).read_text().splitlines()
            except (OSError, UnicodeDecodeError) as exc:
                raise ConfigError(
                    f"mqtt.password_file: cannot read {self.password_file} "
                    f"({getattr(exc, 'strerror', None) or type(exc).__name__})"
                ) from None
            if not lines or not lines[0]:
                raise ConfigError(f"mqtt.password_file: {self.password_file} is empty")
            return self.username, lines[0]
        if self.password_env is not None:
            value = environ.get(self.password_env)
            if not value:
                raise ConfigError(
                    f"mqtt.password_env: environment variable {self.password_env} is not set"
                )
            return self.username, value
        return self.username, None
