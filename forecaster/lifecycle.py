"""Promotion and rollback on a running daemon: the shadow challenger (``model.challenger``) takes
over serving, by hand (``forecaster promote``: SIGUSR1; ``forecaster rollback``: SIGUSR2) or on
evidence (``model.promote``), with the hidden states it warmed on live data.

A swap happens between two ticks. It is journaled (after which sample) before it takes effect, so
a replay after a crash swaps at the same sample and gives the same forecasts; the next checkpoint
records the roles (which file's weights serve, which run in the shadow), so a restart with the
same config goes on serving the promoted model. The replaced model stays in the shadow, its
states kept: a rollback is the reverse swap.
"""

from __future__ import annotations

import logging
import signal
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from forecaster.config import Config, PromoteConfig
    from forecaster.engine import Engine
    from forecaster.keeper import StateKeeper

log = logging.getLogger(__name__)

SIGNALS = {"promote": signal.SIGUSR1, "rollback": signal.SIGUSR2}


def due(engine: Engine, config: PromoteConfig) -> bool:
    """The challenger has beaten the served model by ``margin`` over ``samples`` values."""
    if not config.auto or engine.challenger is None or engine.shadow_n < config.samples:
        return False
    served, challenger = engine.shadow_sq
    return bool(challenger <= (1.0 - config.margin) * served)


def swap(keeper: StateKeeper, action: str, trigger: str) -> bool:
    """Promote the challenger (``action`` "promote") or put the replaced model back
    ("rollback"); ``trigger``: "manual" or "auto". False, logged and counted, when refused."""
    engine = keeper.engine
    metrics = keeper.metrics
    refusal = _refusal(keeper, action)
    if refusal is not None:
        log.error("%s refused: %s", action, refusal)
        metrics.promotions.labels(action, trigger, "refused").inc()
        _hold(engine, trigger)
        return False
    assert engine is not None
    if keeper.journal is not None:
        try:
            keeper.journal.record_promotion(engine.promotions + 1, keeper.applied)
        except Exception as exc:  # the journal cannot be written: the roles stay as they are
            log.error("%s refused: the journal cannot record it (%s)", action, exc)
            metrics.promotions.labels(action, trigger, "refused").inc()
            _hold(engine, trigger)
            return False
    served, challenger = engine.shadow_sq
    samples = engine.shadow_n
    apply(keeper)
    metrics.promotions.labels(action, trigger, "done").inc()
    log.warning(
        "%s (%s): model %s now serves (model version %d), model %s runs in the shadow; over the"
        " last %d values both forecast, squared error (in the streams' scales) %.6g served,"
        " %.6g challenger",
        action,
        trigger,
        keeper.model_source,
        engine.model_version,
        keeper.challenger_source,
        samples,
        served,
        challenger,
    )
    return True


def apply(keeper: StateKeeper) -> None:
    """The swap itself (live, or replayed at its journaled position)."""
    assert keeper.engine is not None
    keeper.engine.promote()
    keeper.model_source, keeper.challenger_source = keeper.challenger_source, keeper.model_source


def _hold(engine: Engine | None, trigger: str) -> None:
    """After a refused automatic swap, gather ``samples`` values of evidence again before the
    next try (else it would be tried, logged and counted between every two ticks)."""
    if trigger == "auto" and engine is not None:
        engine.shadow_n = 0


def _refusal(keeper: StateKeeper, action: str) -> str | None:
    engine = keeper.engine
    if engine is None or engine.challenger is None:
        return "no challenger runs (model.challenger, forecaster run --challenger)"
    if action == "rollback" and engine.promotions % 2 == 0:
        return "the model serving is the configured model.checkpoint: nothing to roll back"
    if keeper.config.online_learning.enabled:
        return "online learning is on (its optimizer follows the served weights): restart instead"
    return None


def send(config: Config, action: str) -> int:
    """Ask the daemon whose pid file is in ``config``'s state folder to ``action``; its pid."""
    from forecaster.reload import signal_daemon

    return signal_daemon(config, SIGNALS[action])
