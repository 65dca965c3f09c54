"""Typed configuration mirroring the YAML: one class per section, unknown keys rejected.

Errors name the dotted key path, the bad value and the YAML line, e.g.
``mqtt.port = 'abc' (line 4): Input should be a valid integer``. Any key can be overridden from the
environment: ``FORECASTER_MQTT__PORT=1884`` sets ``mqtt.port`` (nested keys joined by ``__``,
values parsed as YAML scalars), for containers and systemd units.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from forecaster.errors import ConfigError

ENV_PREFIX = "FORECASTER_"
PositiveFloat = Annotated[float, Field(gt=0, allow_inf_nan=False)]


def check_template(topic: str) -> str:
    """A topic template names the stream with one whole ``{stream}`` level and no wildcards.

    >>> check_template("sensors/{stream}/value")
    'sensors/{stream}/value'
    >>> check_template("sensors/#")
    Traceback (most recent call last):
    ...
    ValueError: template 'sensors/#' must contain exactly one '{stream}' level and no '+' or '#'
    """
    levels = topic.split("/")
    if levels.count("{stream}") != 1 or any(c in topic for c in "+#") or topic.count("{") != 1:
        raise ValueError(
            f"template {topic!r} must contain exactly one '{{stream}}' level and no '+' or '#'"
        )
    return topic


def template_filter(template: str) -> str:
    """The subscription filter of a template: ``{stream}`` becomes ``+``.

    >>> template_filter("sensors/{stream}/value")
    'sensors/+/value'
    """
    return template.replace("{stream}", "+")


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


class MqttConfig(Section):
    host: str = "localhost"
    port: int = Field(1883, ge=1, le=65535)
    protocol: Literal["5", "3.1.1"] = "5"
    client_id: str = "forecaster"
    username: str | None = None
    password: str | None = None
    keepalive: int = Field(30, ge=5)
    qos_in: Literal[0, 1, 2] = 1
    qos_out: Literal[0, 1, 2] = 0
    input_topics: list[str] = Field(
        default_factory=lambda: ["sensors/{stream}/value"], min_length=1
    )
    output_topic: str = "forecasts/{stream}"
    status_topic: str = "forecaster/status"
    reconnect_min_delay: PositiveFloat = 1.0
    reconnect_max_delay: PositiveFloat = 30.0
    # Persistent session: the broker keeps the subscription and queues QoS>0 samples while the
    # daemon is away (paho's default would start a clean session on every new client).
    clean_start: bool = False
    session_expiry: int = Field(86_400, ge=0)  # seconds the broker keeps the session (MQTT 5)
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

    @field_validator("output_topic")
    @classmethod
    def _check_output(cls, topic: str) -> str:
        return check_template(topic)

    @field_validator("status_topic")
    @classmethod
    def _check_status(cls, topic: str) -> str:
        if not topic or any(c in topic for c in "#+{}"):
            raise ValueError("must be a plain topic (no wildcards, no {stream})")
        return topic

    @model_validator(mode="after")
    def _trees_must_not_overlap(self) -> MqttConfig:
        output = template_filter(self.output_topic)
        for topic in self.input_topics:
            for other, what in ((output, "output_topic"), (self.status_topic, "status_topic")):
                if filters_overlap(template_filter(topic), other):
                    raise ValueError(
                        f"input topic {topic!r} overlaps {what} {other!r}: "
                        "the daemon would consume its own messages"
                    )
        if self.reconnect_max_delay < self.reconnect_min_delay:
            raise ValueError("reconnect_max_delay must be >= reconnect_min_delay")
        return self


class ModelSection(Section):
    checkpoint: Path | None = None  # None: the model shipped inside the package
    device: str = "cpu"  # "cuda", "cuda:1", ...
    threads: int = Field(1, ge=1)  # torch threads; 1 is fastest below ~10k streams per tick


class EngineConfig(Section):
    max_batch: int = Field(4096, ge=1)  # samples drained into one tick at most
    queue_size: int = Field(100_000, ge=1)  # bounded receive queue
    # Full queue: block the MQTT reader so unacknowledged QoS 1 samples stay with the broker
    # (back-pressure), or drop the oldest queued / the arriving sample (counted).
    overload: Literal["backpressure", "drop_oldest", "drop_newest"] = "backpressure"
    max_abs_value: PositiveFloat = 1e15  # larger magnitudes are rejected as out_of_range


class OnlineLearningConfig(Section):
    """Fine-tuning on the live streams, off the forecasting path (off by default)."""

    enabled: bool = False
    window: int = Field(32, ge=2)  # truncated-BPTT window, in samples
    update_every: int = Field(4, ge=1)  # samples (over all streams) between updates
    streams_per_update: int = Field(64, ge=1)  # windows per minibatch at most
    windows_per_stream: int = Field(32, ge=1)  # recent complete windows kept per stream
    optimizer: Literal["adam"] = "adam"
    lr: PositiveFloat = 0.005
    clip: PositiveFloat = 1.0  # gradient-norm clipping
    max_updates_per_s: PositiveFloat = 10.0
    warmup: int = Field(
        20, ge=0
    )  # a stream's first samples are not learned from (normaliser settling)
    rollback_factor: PositiveFloat = 2.0  # roll back when loss > factor x the good weights' loss
    rollback_samples: int = Field(400, ge=1)  # samples watched after an update before it is trusted
    rollback_lr_factor: float = Field(0.5, gt=0, le=1)  # lr multiplier after each rollback (kept)
    seed: int = 0


class StateConfig(Section):
    dir: Path = Path("state")
    checkpoint_interval: PositiveFloat = 60.0  # seconds between periodic checkpoints
    journal: bool = True  # journal every sample (SQLite, WAL) before acknowledging it
    # normal: a commit survives a crash of the daemon; full: fsync per commit, survives power loss
    journal_sync: Literal["full", "normal"] = "normal"


class MetricsConfig(Section):
    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = Field(9108, ge=0, le=65535)
    stream_label_cap: int = Field(100, ge=0)  # streams beyond it share stream="_other"
    error_halflife: PositiveFloat = 100.0  # samples; rolling MAE/RMSE/skill are EWMAs


class LoggingConfig(Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"


class Config(Section):
    mqtt: MqttConfig = MqttConfig()
    model: ModelSection = ModelSection()
    engine: EngineConfig = EngineConfig()
    online_learning: OnlineLearningConfig = OnlineLearningConfig()
    state: StateConfig = StateConfig()
    metrics: MetricsConfig = MetricsConfig()
    logging: LoggingConfig = LoggingConfig()


def _line_map(node: yaml.Node, path: tuple[str | int, ...] = ()) -> dict[tuple, int]:
    """Key path -> 1-based YAML line, so errors can point into the file."""
    lines = {path: node.start_mark.line + 1}
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            lines[(*path, key.value)] = key.start_mark.line + 1
            lines.update(
                {
                    k: v
                    for k, v in _line_map(value, (*path, key.value)).items()
                    if k != (*path, key.value)
                }
            )
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            lines.update(_line_map(item, (*path, index)))
    return lines


def apply_env(data: dict[str, Any], environ: dict[str, str] | os._Environ[str]) -> list[str]:
    """Fold ``FORECASTER_SECTION__KEY=value`` overrides into ``data``; return the keys set."""
    applied = []
    for name, raw in sorted(environ.items()):
        if not name.startswith(ENV_PREFIX) or "__" not in name:
            continue
        keys = name[len(ENV_PREFIX) :].lower().split("__")
        target = data
        for key in keys[:-1]:
            target = target.setdefault(key, {})
            if not isinstance(target, dict):
                raise ConfigError(f"{name}: {'.'.join(keys)} is not inside a section")
        try:
            target[keys[-1]] = yaml.safe_load(raw) if raw else raw
        except yaml.YAMLError as exc:
            raise ConfigError(f"{name}: value {raw!r} is not valid YAML: {exc}") from exc
        applied.append(".".join(keys))
    return applied


def load_config(
    path: Path | str | None = None, environ: dict[str, str] | os._Environ[str] | None = None
) -> Config:
    """Read, override from the environment, and validate; any defect raises ConfigError."""
    data: dict[str, Any] = {}
    lines: dict[tuple, int] = {}
    source = str(path) if path else "<defaults>"
    if path is not None:
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read ({exc.strerror})") from exc
        try:
            node = yaml.compose(text)
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
        data = loaded or {}
        lines = _line_map(node) if node is not None else {}
    env_keys = apply_env(data, os.environ if environ is None else environ)
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            loc = tuple(error["loc"])
            key = ".".join(str(part) for part in loc) or "(top level)"
            where = ""
            if ".".join(str(p) for p in loc) in env_keys:
                where = " (from environment)"
            else:
                for depth in range(len(loc), -1, -1):
                    if loc[:depth] in lines:
                        where = f" (line {lines[loc[:depth]]})"
                        break
            value = error.get("input")
            shown = "" if isinstance(value, dict) else f" = {value!r}"
            problems.append(f"  {key}{shown}{where}: {error['msg']}")
        raise ConfigError(f"{source}: invalid configuration\n" + "\n".join(problems)) from exc
