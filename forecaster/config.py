"""Typed configuration mirroring the YAML: one class per section, unknown keys rejected.

Errors name the dotted key path, the bad value and the YAML line, e.g.
``mqtt.port = 'abc' (line 4): Input should be a valid integer``. Any key can be overridden from the
environment: ``FORECASTER_MQTT__PORT=1884`` sets ``mqtt.port`` (nested keys joined by ``__``,
values parsed as YAML scalars), for containers and systemd units.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml
from pydantic import (
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from forecaster.combine import CombinerConfig
from forecaster.config_mqtt import (  # noqa: F401 (re-exported: one place to import from)
    ENV_PREFIX,
    SECRET_KEYS,
    MqttConfig,
    PayloadConfig,
    PositiveFloat,
    Section,
    TlsConfig,
    check_plain_topic,
    check_template,
    filters_overlap,
    template_filter,
)
from forecaster.errors import ConfigError
from forecaster.limits import auto_max_streams

if TYPE_CHECKING:  # scoring loads torch; check-config and parse must not
    from forecaster.scoring import ScoringConfig


class PromoteConfig(Section):
    """When the shadow challenger takes over by itself (``forecaster.lifecycle``)."""

    auto: bool = True  # false: only ``forecaster promote`` swaps the models
    # At least this many values forecast by both since the challenger started (or the last
    # swap), the evidence being each one's squared errors (in each stream's scale), weighted
    # with a half-life of as many values; ...
    samples: int = Field(2000, ge=1)
    # ... and the challenger's at most (1 - margin) x the served model's
    margin: float = Field(0.1, ge=0.0, lt=1.0)


class ModelSection(Section):
    checkpoint: Path | None = None  # None: the model shipped inside the package
    challenger: Path | None = None  # a second model, run in the shadow and scored, never published
    promote: PromoteConfig = PromoteConfig()
    device: str = "cpu"  # "cuda", "cuda:1", ...
    threads: int = Field(1, ge=1)  # torch threads; 1 is fastest below ~10k streams per tick


class GapConfig(Section):
    """Re-warm a stream after a gap in its ``ts`` (see ``engine.GapPolicy``); off by default."""

    enabled: bool = False
    factor: PositiveFloat = 10.0  # a gap: inter-arrival time > factor x the usual interval
    halflife: PositiveFloat = 20.0  # intervals; the usual interval is their EWM
    min_intervals: int = Field(5, ge=1)  # intervals seen before gaps are looked for
    rewarm_samples: int = Field(20, ge=0)  # forecasts flagged warm: false after a reset


_COMBINE = CombinerConfig()  # the defaults live in one place: forecaster.combine


class CombineConfig(Section):
    """Mix the RNN with an online AR path and the last value per stream (``forecaster.combine``)."""

    enabled: bool = _COMBINE.enabled
    lags: int = Field(_COMBINE.lags, ge=1, le=64)  # past changes the AR path reads
    forgetting: float = Field(_COMBINE.forgetting, gt=0.9, le=1.0)  # AR path's RLS memory
    weight_halflife: PositiveFloat = _COMBINE.weight_halflife  # samples; how fast weights move
    day_bins: int = Field(_COMBINE.day_bins, ge=0, le=1440)  # time-of-day bins (0: none)
    learn_every: int = Field(_COMBINE.learn_every, ge=1, le=64)  # AR path fed 1 sample in N
    guard: float = Field(_COMBINE.guard, ge=0)  # the mix's excess error at which it falls back


class NewStreamsConfig(Section):
    """New stream ids admitted per source (``forecaster.limits``): a burst, then a steady rate."""

    per_s: float = Field(1000.0, ge=0)  # new ids a second per source after the burst (0: no limit)
    burst: int = Field(10_000, ge=1)  # new ids a source may bring at once
    source_levels: int = Field(1, ge=1)  # a source: the first N levels of the message's topic


class EngineConfig(Section):
    max_batch: int = Field(4096, ge=1)  # samples drained into one tick at most
    # Samples of one stream in one tick at most: each is a round of its own (stepped in turn), so
    # a fast stream gains nothing from a long tick and its forecasts would wait for all of it.
    max_rounds: int = Field(64, ge=1)
    queue_size: int = Field(100_000, ge=1)  # bounded receive queue
    # Full queue: block the MQTT reader so unacknowledged QoS 1 samples stay with the broker
    # (back-pressure), or drop the oldest queued / the arriving sample (counted).
    overload: Literal["backpressure", "drop_oldest", "drop_newest"] = "backpressure"
    max_abs_value: PositiveFloat = 1e15  # larger magnitudes are rejected as out_of_range
    # Streams kept in memory at most (0: no bound); past it the least recently used one is parked
    # in the state folder (evicted.sqlite) and restored exactly when it sends again. "auto": sized
    # to the machine (forecaster.limits: 1/16 of its memory at ~4 KB a stream).
    max_streams: int = Field("auto", ge=0, validate_default=True)  # type: ignore[assignment]
    # A parked stream silent this long is forgotten (starts afresh if it sends again); and past
    # max_parked parked streams (0: no bound) the longest parked go first. Checked after each
    # checkpoint; evicted.sqlite takes ~3.8 KB per parked stream.
    park_expiry: PositiveFloat = 7 * 86400.0
    max_parked: int = Field(1_000_000, ge=0)
    new_streams: NewStreamsConfig = NewStreamsConfig()
    gaps: GapConfig = GapConfig()

    @field_validator("max_streams", mode="before")
    @classmethod
    def _size_to_machine(cls, value: object) -> object:
        return auto_max_streams() if value == "auto" else value

    horizon: int = Field(1, ge=1, le=1000)  # forecasts published per sample: t+1 ... t+horizon
    combine: CombineConfig = CombineConfig()


class OnlineLearningConfig(Section):
    """Fine-tuning on the live streams, off the forecasting path (off by default)."""

    enabled: bool = False
    window: int = Field(32, ge=2)  # truncated-BPTT window, in samples
    update_every: int = Field(16, ge=1)  # samples (over all streams) between updates
    streams_per_update: int = Field(64, ge=1)  # windows per minibatch at most
    windows_per_stream: int = Field(32, ge=1)  # recent complete windows kept per stream
    optimizer: Literal["adam"] = "adam"
    lr: PositiveFloat = 0.005
    clip: PositiveFloat = 1.0  # gradient-norm clipping
    max_updates_per_s: PositiveFloat = 5.0
    warmup: int = Field(
        20, ge=0
    )  # a stream's first samples are not learned from (normaliser settling)
    rollback_factor: PositiveFloat = 2.0  # roll back when loss > factor x the good weights' loss
    rollback_samples: int = Field(400, ge=1)  # samples watched after an update before it is trusted
    rollback_lr_factor: float = Field(0.5, gt=0, le=1)  # lr multiplier after each rollback (kept)
    # Recompute each training window's start state with the weights being trained, running the
    # ``refresh_windows`` windows before it from their stored state (learner.py;
    # docs/online-learning.md: the drift recovery and the accuracy with and without it).
    refresh_states: bool = True
    refresh_windows: int = Field(4, ge=1)  # burn-in windows re-run before each chosen window
    seed: int = 0


class IntervalsConfig(Section):
    """Calibrated bounds around every forecast (online conformal quantile tracking)."""

    coverage: float = Field(0.9, gt=0, lt=1)  # target share of values inside [lower, upper]
    step: PositiveFloat = 0.05  # log-step of the tracker: larger adapts faster, jitters more
    warmup: int = Field(10, ge=1)  # samples per stream before its residuals are tracked


class AnomalyConfig(Section):
    """Per-sample anomaly score in [0, 1]: the error against the stream's recent errors, and the
    value against its recent values (the larger of the two)."""

    halflife: PositiveFloat = 10000.0  # samples; the "recent error distribution"
    smoothing: float = Field(0.4, gt=0, le=1)  # weight of the newest error in the short average
    level_smoothing: float = Field(0.2, gt=0, le=1)  # weight of the newest value in its average
    warmup: int = Field(100, ge=0)  # tracked errors before the score leaves 0.5
    threshold: float = Field(0.9995, gt=0, lt=1)  # counted in forecaster_stream_anomalies_total


class StateConfig(Section):
    dir: Path = Path("state")
    checkpoint_interval: PositiveFloat = 60.0  # seconds between periodic checkpoints
    journal: bool = True  # journal every sample (SQLite, WAL) before acknowledging it
    # normal: a commit survives a crash of the daemon; full: fsync per commit, survives power loss
    journal_sync: Literal["full", "normal"] = "normal"
    # A journal or checkpoint write that failed (disk full, I/O error) is tried again this often;
    # meanwhile intake is paused (journal) and /readyz answers 503.
    retry_interval: PositiveFloat = 1.0
    fault_log_interval: PositiveFloat = 30.0  # seconds between log lines about one ongoing fault
    # unconfirmed: a replay publishes again only forecasts the broker had not confirmed before
    # the crash; all: every replayed forecast (the behaviour before)
    replay_publish: Literal["unconfirmed", "all"] = "unconfirmed"
    keep_checkpoints: int = Field(3, ge=1)  # the newest and older ones to fall back on if damaged
    # Start even though journal positions are missing (truncated, older than the checkpoint, WAL
    # lost): the loss is logged and counted instead of refusing to start.
    accept_state_loss: bool = False


class MetricsConfig(Section):
    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = Field(9108, ge=0, le=65535)
    stream_label_cap: int = Field(100, ge=0)  # streams beyond it share stream="_other"
    error_halflife: PositiveFloat = 100.0  # samples; rolling MAE/RMSE/skill are EWMAs
    coverage_halflife: PositiveFloat = 1000.0  # samples; rolling interval coverage and width
    # The HTTP port answers from a fixed pool of worker threads (no thread per connection);
    # a connection silent for ``http_timeout`` seconds is closed (open for 3x that in all: cut),
    # one beyond the pool's queue is refused (counted): clients cannot grow the daemon's threads.
    http_workers: int = Field(4, ge=1, le=64)
    http_timeout: PositiveFloat = 10.0


class LiveConfig(Section):
    """The live page (``/live/`` on the metrics port): recent values, forecasts, rolling error."""

    enabled: bool = False
    max_streams: int = Field(1000, ge=1, le=100_000)  # streams with a history kept (the first)
    history: int = Field(300, ge=2, le=10_000)  # recent samples kept per stream (a ring)


class HomeAssistantConfig(Section):
    """Home Assistant MQTT discovery: each stream's forecast, error and anomaly score as sensors."""

    enabled: bool = False
    discovery_prefix: str = "homeassistant"
    node_id: str = Field("forecaster", pattern=r"^[A-Za-z0-9_-]+$")  # one per daemon on a broker

    @field_validator("discovery_prefix")
    @classmethod
    def _check_prefix(cls, topic: str) -> str:
        return check_plain_topic(topic)


class LoggingConfig(Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"


class Config(Section):
    mqtt: MqttConfig = MqttConfig()
    model: ModelSection = ModelSection()
    engine: EngineConfig = EngineConfig()
    online_learning: OnlineLearningConfig = OnlineLearningConfig()
    intervals: IntervalsConfig = IntervalsConfig()
    anomaly: AnomalyConfig = AnomalyConfig()
    state: StateConfig = StateConfig()
    metrics: MetricsConfig = MetricsConfig()
    live: LiveConfig = LiveConfig()
    home_assistant: HomeAssistantConfig = HomeAssistantConfig()
    logging: LoggingConfig = LoggingConfig()

    @model_validator(mode="after")
    def _sections_agree(self) -> Config:
        if self.live.enabled and not self.metrics.enabled:
            raise ValueError("live.enabled needs metrics.enabled: the page is served on its port")
        if self.home_assistant.enabled and self.mqtt.output_frames:
            raise ValueError(
                "home_assistant.enabled needs mqtt.output_frames false: a sensor reads one"
                " stream's forecast per message"
            )
        return self


def scoring_config(config: Config) -> ScoringConfig:
    """The engine's scoring stage settings from the ``intervals`` and ``anomaly`` sections."""
    from forecaster.scoring import ScoringConfig  # here: scoring loads torch

    i, a = config.intervals, config.anomaly
    return ScoringConfig(
        coverage=i.coverage,
        step=i.step,
        warmup=i.warmup,
        anomaly_halflife=a.halflife,
        anomaly_smoothing=a.smoothing,
        level_smoothing=a.level_smoothing,
        anomaly_warmup=a.warmup,
    )


def combiner_config(config: Config) -> CombinerConfig:
    """The engine's combination settings from ``engine.combine``."""
    c = config.engine.combine
    return CombinerConfig(
        enabled=c.enabled,
        lags=c.lags,
        forgetting=c.forgetting,
        weight_halflife=c.weight_halflife,
        day_bins=c.day_bins,
        learn_every=c.learn_every,
        guard=c.guard if c.guard > 0 else math.inf,
    )


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
        if keys[-1] in SECRET_KEYS:  # verbatim: "12345" or "yes" must stay a string
            target[keys[-1]] = raw
            applied.append(".".join(keys))
            continue
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
        secret = False  # pydantic's own text (the chained cause) would show the input verbatim
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
            if any(str(part) in SECRET_KEYS for part in loc):
                shown, secret = " = '**********'", True
            problems.append(f"  {key}{shown}{where}: {error['msg']}")
        error = ConfigError(f"{source}: invalid configuration\n" + "\n".join(problems))
        raise error from (None if secret else exc)
