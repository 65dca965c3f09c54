"""Reload on SIGHUP: which config changes a running daemon can take, and which need a restart.

An operator tuning a threshold or a learning rate should not have to throw away every stream's
hidden state to do it. A reload re-reads the config file and compares it with the running one,
key by key. It is all or nothing: when every changed key is one the daemon can apply between two
ticks (thresholds, intervals, anomaly settings, learning rates, logging, intake limits), all are
applied and a checkpoint follows, so a replay after a crash never crosses a reload (the journal's
ticks are replayed under the settings they were served with); when any key needs a restart
(topics, the broker, the model, the state folder...), nothing changes, and the log names those
keys. ``forecaster reload -c FILE`` sends the signal to the daemon whose pid file is in the
config's state folder.
"""

from __future__ import annotations

import logging
import os
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from forecaster.config import Config, load_config, scoring_config
from forecaster.errors import ConfigError, ForecasterError

if TYPE_CHECKING:
    from forecaster.daemon import Daemon

log = logging.getLogger("forecaster.daemon")

# Keys (or whole sections, ending in ".") a running daemon applies between two ticks.
LIVE_KEYS = (
    "logging.",
    "anomaly.",
    "intervals.",
    "engine.new_streams.",
    "model.promote.",
    "model.challenger",
    "engine.max_batch",
    "engine.max_rounds",
    "state.checkpoint_interval",
    "state.retry_interval",
    "online_learning.lr",
    "online_learning.clip",
    "online_learning.max_updates_per_s",
)
PID_FILE = "forecaster.pid"  # in the state folder while a daemon runs


@dataclass(frozen=True)
class ReloadPlan:
    """The keys that changed, split into those applied live and those that need a restart."""

    live: list[str]
    restart: list[str]

    @property
    def applicable(self) -> bool:
        return bool(self.live) and not self.restart


def changed_keys(old: Config, new: Config) -> list[str]:
    """Dotted paths of every leaf that differs (secrets compared, never shown).

    >>> changed_keys(Config(), Config.model_validate({"anomaly": {"threshold": 0.99}}))
    ['anomaly.threshold']
    """
    return sorted(_diff(_plain(old), _plain(new), ""))


def plan_reload(old: Config, new: Config) -> ReloadPlan:
    """Which of the changed keys apply live (``LIVE_KEYS``) and which need a restart.

    >>> plan_reload(Config(), Config.model_validate({"mqtt": {"port": 1884}, "logging": {"level": "DEBUG"}}))
    ReloadPlan(live=['logging.level'], restart=['mqtt.port'])
    """
    keys = changed_keys(old, new)
    live = [key for key in keys if _is_live(key)]
    return ReloadPlan(live, [key for key in keys if key not in live])


def reload_daemon(daemon: Daemon, path: Path | None) -> str:
    """Re-read ``path`` and apply it to ``daemon`` between two ticks, all or nothing; the
    outcome (``applied``, ``refused``, ``invalid``, ``unchanged``) is logged and counted."""
    outcome = _reload(daemon, path)
    daemon.metrics.config_reloads.labels(outcome).inc()
    return outcome


def _reload(daemon: Daemon, path: Path | None) -> str:
    if path is None:
        log.warning("config reload: the daemon runs on the built-in defaults (no -c FILE)")
        return "unchanged"
    old = daemon.config
    try:
        new = load_config(path)
    except ConfigError as exc:
        log.error("config reload refused, nothing changed: %s", exc)
        return "invalid"
    # --accept-state-loss is a start option, not the file's: the running value stands
    state = new.state.model_copy(update={"accept_state_loss": old.state.accept_state_loss})
    new = new.model_copy(update={"state": state})
    plan = plan_reload(old, new)
    if plan.restart:
        log.error(
            "config reload refused, nothing changed: %s need a restart (live keys changed: %s)",
            ", ".join(plan.restart),
            ", ".join(plan.live) or "none",
        )
        return "refused"
    if not plan.live:
        log.info("config reload: %s is unchanged", path)
        return "unchanged"
    engine = daemon.engine
    if "model.challenger" in plan.live and engine is not None and engine.promotions % 2:
        log.error(
            "config reload refused, nothing changed: model.challenger cannot change while the"
            " challenger serves (promoted): roll back, or set model.checkpoint to the promoted"
            " model and restart"
        )
        return "refused"
    if "model.challenger" in plan.live and new.model.challenger is not None:
        from forecaster.persist import load_checkpoint  # torch: loaded by the daemon already

        try:  # before anything changes: a file that cannot serve leaves everything as it was
            load_checkpoint(new.model.challenger)
        except ForecasterError as exc:  # a CheckpointError naming the file and field
            log.error("config reload refused, nothing changed: model.challenger: %s", exc)
            return "invalid"
    _apply(daemon, new)
    log.info("config reloaded from %s: %s", path, ", ".join(plan.live))
    return "applied"


def _apply(daemon: Daemon, new: Config) -> None:
    """Every part reads its settings from ``config`` when it needs them; the few copied at
    construction are set here. A checkpoint follows, so a replay never crosses the reload."""
    from forecaster.intake import new_stream_limit  # the daemon's own parts: loaded by now

    old = daemon.config
    for part in (daemon, daemon.intake, daemon.outbox, daemon.keeper, daemon.checkpoints):
        part.config = new
    engine = daemon.engine
    if engine is not None:
        engine.scoring_config = engine.streams.scorer.config = scoring_config(new)
        engine.shadow_halflife = float(new.model.promote.samples)
        if new.model.challenger != old.model.challenger:
            daemon.keeper.set_challenger(new.model.challenger)
            daemon.metrics.challenger_changed()
    daemon.metrics.anomaly_threshold = new.anomaly.threshold
    if daemon.live is not None:
        daemon.live.anomaly_threshold = new.anomaly.threshold
        daemon.live.coverage_target = new.intervals.coverage
    if new.engine.new_streams != old.engine.new_streams:
        daemon.intake.new_streams = new_stream_limit(new)
    logging.getLogger().setLevel(new.logging.level)
    learner = daemon.learner
    if learner is not None:
        learner.config = new.online_learning
        if new.online_learning.lr != old.online_learning.lr:
            learner.lr = new.online_learning.lr
    if engine is not None:
        daemon.checkpoint()


def write_pid(state_dir: Path) -> Path:
    """Note this process's pid in the state folder (for ``forecaster reload``)."""
    path = state_dir / PID_FILE
    path.write_text(f"{os.getpid()}\n")
    return path


def send_reload(config: Config) -> int:
    """SIGHUP the daemon whose pid file is in ``config``'s state folder; its pid."""
    return signal_daemon(config, signal.SIGHUP)


def signal_daemon(config: Config, signum: int) -> int:
    """Send ``signum`` to the daemon whose pid file is in ``config``'s state folder; its pid."""
    path = config.state.dir / PID_FILE
    try:
        pid = int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError) as exc:
        raise ConfigError(
            f"no running daemon found: {path} is missing or unreadable (is `forecaster run` "
            "running with this config's state.dir?)"
        ) from exc
    try:
        os.kill(pid, signum)
    except ProcessLookupError as exc:
        raise ConfigError(f"no running daemon found: pid {pid} in {path} is not running") from exc
    return pid


def _is_live(key: str) -> bool:
    return any(key.startswith(p) if p.endswith(".") else key == p for p in LIVE_KEYS)


def _plain(config: Config) -> dict[str, Any]:
    data = config.model_dump(mode="python")
    password = config.mqtt.password
    data["mqtt"]["password"] = None if password is None else password.get_secret_value()
    return data


def _diff(old: Any, new: Any, path: str) -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        keys = sorted(set(old) | set(new))
        return [k for key in keys for k in _diff(old.get(key), new.get(key), f"{path}{key}.")]
    return [] if old == new else [path.rstrip(".")]
