"""The shadow challenger (``model.challenger``): a second model stepped in the engine's tick on the
same normalised inputs as the served one, with its own hidden states, scored on every value and
never published; and the swap of the two (``promote``).

The two are compared as readers: each one's own forecast of the value (the RNN reader's, before
the mix with the AR path and the last value; with ``engine.combine.enabled: false`` the forecast
the model alone would publish). Scoring the challenger through the served model's mix would favour
the served model, whose RNN the mix's weights were fitted to. After a promotion the mix goes on
with the new RNN as its RNN reader, its weights following it at their usual pace.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from forecaster.combine import RNN

if TYPE_CHECKING:
    from forecaster.engine import Engine
    from forecaster.model import Forecaster
    from forecaster.records import ForecastColumns


def served_forecast(engine: Engine, slots: np.ndarray | slice) -> np.ndarray:
    """The served model's own forecast of each slot's next value (a view where it can be)."""
    table = engine.streams
    if engine.combine_config.enabled:
        return table.combiner.pred[slots, RNN]
    return table.last_prediction[slots]


def weigh(
    engine: Engine,
    out: ForecastColumns,
    rows: slice | np.ndarray,
    slots: np.ndarray,
    values: np.ndarray,
) -> None:
    """Score both models on this round's values (before anything steps) and add the evidence
    for ``promote``: squared errors in each stream's scale (a large stream does not outweigh the
    others), on the values both forecast past the scoring warm-up, exponentially weighted."""
    table = engine.streams
    served = values - served_forecast(engine, slots)
    mine = values - table.challenger_prediction[slots]
    assert out.model_error is not None and out.challenger_error is not None
    out.model_error[rows] = served
    out.challenger_error[rows] = mine
    both = np.isfinite(served) & np.isfinite(mine)
    both &= table.normalizer.count[slots] >= engine.scoring_config.warmup
    if not both.any():
        return
    scale = table.normalizer.frame_scale(slots[both])
    served, mine = served[both] / scale, mine[both] / scale
    engine.shadow_sq *= 0.5 ** (len(served) / engine.shadow_halflife)
    engine.shadow_sq += (float(served @ served), float(mine @ mine))
    engine.shadow_n += len(served)


def step(
    engine: Engine,
    slots: np.ndarray,
    values: np.ndarray,
    index: torch.Tensor,
    z_in: torch.Tensor,
    scale: np.ndarray,
) -> None:
    """Step the challenger's hidden states on the input the served model had and note its
    forecast of the next value, as the served model's own is made (``served_forecast``);
    nothing the published forecast depends on is touched."""
    table = engine.streams
    assert engine.challenger is not None and table.challenger_state is not None
    states = table.challenger_state
    shape = (states.shape[0], len(slots), states.shape[2])
    before = torch.index_select(states, 1, index, out=engine.work_block("shadow_before", shape))
    z_next, state = engine.challenger.step(
        z_in, before, out=engine.work_block("shadow_after", shape)
    )
    states.index_copy_(1, index, state)
    norm = table.normalizer
    raw = norm.denormalize(slots, z_next.double().cpu().numpy(), scale)
    clipped = norm.clipped[slots] > 0
    if engine.combine_config.enabled:  # as the engine hands the RNN's forecast to the mix
        forecast = np.where(clipped, values, raw)
    else:  # the normaliser's gain, as ``Normalizer.forecast`` applies it (without its record)
        last = norm.last[slots]
        forecast = last + np.where(clipped, 0.0, norm.gain(slots)) * (raw - last)
    table.challenger_prediction[slots] = forecast


def promote(engine: Engine) -> None:
    """The challenger serves from the next sample on, with the hidden states it warmed on live
    data (no cold start), its last forecasts becoming the mix's RNN reader's; the model it
    replaces becomes the challenger, its states and forecasts kept, so a second ``promote`` is
    a rollback. The evidence starts again. Between ticks only."""
    table = engine.streams
    if engine.challenger is None or table.challenger is None:
        raise ValueError("no challenger to promote")
    assert table.challenger_state is not None
    engine.model, engine.challenger = engine.challenger, engine.model
    table.model, table.challenger = table.challenger, table.model
    table.state, table.challenger_state = table.challenger_state, table.state
    n = len(table)
    theirs = table.challenger_prediction[:n].copy()
    table.challenger_prediction[:n] = served_forecast(engine, slice(0, n))
    if engine.combine_config.enabled:
        table.combiner.pred[:n, RNN] = theirs
    table.roles[:] = engine.promotions + 1
    engine.model_version += 1
    engine.promotions += 1
    engine.shadow_sq[:] = 0.0
    engine.shadow_n = 0


def attach(engine: Engine, challenger: Forecaster | None) -> None:
    """Another challenger (None: none) from the next tick on: its hidden states and forecasts
    start afresh, parked streams' too when they return (``challenger_epoch``); the evidence
    starts again."""
    table = engine.streams
    engine.challenger = None if challenger is None else challenger.to(engine.device).eval()
    table.challenger = engine.challenger
    table.challenger_state = table._challenger_state(table.capacity)
    table.challenger_prediction[:] = np.nan
    engine.challenger_epoch += 1
    table.shadow_epoch[:] = engine.challenger_epoch
    engine.shadow_sq[:] = 0.0
    engine.shadow_n = 0


def follow_roles(row: dict[str, np.ndarray], promotions: int, epoch: int) -> None:
    """A parked stream's row, as ``promote`` and ``attach`` would have left it had it been
    resident: after an odd number of promotions since it was parked, its two states and
    forecasts swap; a challenger state from another challenger is dropped (fresh)."""
    if (promotions - int(row["roles"][0] if "roles" in row else 0)) % 2:
        served, shadowed = row.pop("state", None), row.pop("challenger_state", None)
        row.update({} if shadowed is None else {"state": shadowed})
        row.update({} if served is None else {"challenger_state": served})
        theirs = row["challenger_prediction"].copy()
        if "mix_pred" in row:
            row["challenger_prediction"] = row["mix_pred"][:, RNN].copy()
            row["mix_pred"] = row["mix_pred"].copy()
            row["mix_pred"][:, RNN] = theirs
        else:
            row["challenger_prediction"] = row["last_prediction"].copy()
    row["roles"] = np.array([promotions])
    if int(row["shadow_epoch"][0] if "shadow_epoch" in row else 0) != epoch:
        row.pop("challenger_state", None)
        row["challenger_prediction"] = np.array([np.nan])
        row["shadow_epoch"] = np.array([epoch])
