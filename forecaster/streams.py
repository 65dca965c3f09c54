"""StreamTable: stream id -> slot, and every stream's serving state in slot-indexed arrays.

The hidden state of all streams lives in one tensor ``(num_layers, capacity, state_width)`` so a
tick can gather the slots it touches, step them in one batched call and scatter them back. The
per-stream scalars (normaliser statistics, interval and anomaly statistics, last value, last
forecast and its interval, sequence number) live in NumPy arrays indexed by the same slot.
"""

from __future__ import annotations

import numpy as np
import torch

from forecaster.combine import Combiner, CombinerConfig
from forecaster.model import Forecaster
from forecaster.normalize import Normalizer, NormalizerConfig
from forecaster.scoring import Scorer, ScoringConfig

# NaN until known; last_lower/last_upper: the interval published with last_prediction.
# challenger_prediction: the shadow challenger's last forecast (``model.challenger``).
FLOAT_COLUMNS = (
    "last_value",
    "last_prediction",
    "last_ts",
    "last_lower",
    "last_upper",
    "interval",
    "challenger_prediction",
)
# last_used: the engine's tick counter (least recently used); intervals: how many inter-arrival
# times ``interval`` (their EWM) has seen; cold: forecasts still to flag warm=False after a gap
# or a new model; epoch: the model deployment whose weights built the hidden state; roles: the
# engine's promotions when the stream was last resident (its two states swap with every one);
# shadow_epoch: the challenger load (``Engine.challenger_epoch``) its challenger state is from.
INT_COLUMNS = ("seq", "last_used", "intervals", "cold", "epoch", "roles", "shadow_epoch")


class StreamTable:
    """Slots for streams, grown by half; state that a checkpoint must carry."""

    def __init__(
        self,
        model: Forecaster,
        normalizer: NormalizerConfig,
        device: torch.device | str = "cpu",
        capacity: int = 16,
        scoring: ScoringConfig | None = None,
        combine: CombinerConfig | None = None,
        challenger: Forecaster | None = None,
    ) -> None:
        self.model = model
        self.challenger = challenger
        self.device = torch.device(device)
        self.slots: dict[str, int] = {}
        self.names: list[str] = []
        self.state = model.init_state(capacity, self.device)  # (num_layers, capacity, width)
        self.challenger_state = self._challenger_state(capacity)
        self.challenger_prediction = np.full(capacity, np.nan)
        self.normalizer = Normalizer(normalizer, capacity)
        self.scorer = Scorer(scoring, capacity)  # interval and anomaly statistics
        self.combiner = Combiner(combine, capacity)  # the AR path and the component weights
        self.seq = np.zeros(capacity, dtype=np.int64)  # last applied sequence number
        self.last_used = np.zeros(capacity, dtype=np.int64)
        self.intervals = np.zeros(capacity, dtype=np.int64)
        self.cold = np.zeros(capacity, dtype=np.int64)
        self.epoch = np.zeros(capacity, dtype=np.int64)
        self.roles = np.zeros(capacity, dtype=np.int64)
        self.shadow_epoch = np.zeros(capacity, dtype=np.int64)
        self.scratch = np.zeros(capacity, dtype=np.int64)  # the engine's work space, not state
        self.interval = np.full(capacity, np.nan)
        self.last_value = np.full(capacity, np.nan)
        self.last_prediction = np.full(capacity, np.nan)
        self.last_ts = np.full(capacity, np.nan)
        self.last_lower = np.full(capacity, np.nan)
        self.last_upper = np.full(capacity, np.nan)

    def __len__(self) -> int:
        return len(self.names)

    def _challenger_state(self, capacity: int) -> torch.Tensor | None:
        if self.challenger is None:
            return None
        return self.challenger.init_state(capacity, self.device)

    def states(self) -> dict[str, torch.Tensor]:
        """The hidden-state tensors under their ``arrays()`` keys (the challenger's if any)."""
        out = {"state": self.state}
        if self.challenger_state is not None:
            out["challenger_state"] = self.challenger_state
        return out

    def __contains__(self, stream: object) -> bool:
        return stream in self.slots

    @property
    def capacity(self) -> int:
        return self.state.shape[1]

    def slot(self, stream: str) -> int:
        """The stream's slot, created (zero state, empty statistics) on first sight."""
        slot = self.slots.get(stream)
        if slot is None:
            slot = len(self.names)
            if slot >= self.capacity:
                self._grow(self._next_capacity(slot + 1))
            self.slots[stream] = slot
            self.names.append(stream)
        return slot

    def _next_capacity(self, needed: int) -> int:
        """Grow by half: at 100,000 streams doubling gives 131,072 slots (about 11 MB of state
        and statistics unused); growing by half gives 118,342, for a few more regrowths on the
        way up."""
        return max(16, self.capacity + self.capacity // 2, needed)

    def _grow(self, capacity: int) -> None:
        extra = capacity - self.capacity
        fresh = self.model.init_state(extra, self.device)  # (num_layers, extra, width)
        self.state = torch.cat([self.state, fresh], dim=1)  # (num_layers, capacity, width)
        if self.challenger is not None and self.challenger_state is not None:
            more = self.challenger.init_state(extra, self.device)
            self.challenger_state = torch.cat([self.challenger_state, more], dim=1)
        self.normalizer.grow(capacity)
        self.scorer.grow(capacity)
        self.combiner.grow(capacity)
        for name in (*INT_COLUMNS, "scratch"):
            setattr(self, name, np.concatenate([getattr(self, name), np.zeros(extra, np.int64)]))
        for name in FLOAT_COLUMNS:
            setattr(self, name, np.concatenate([getattr(self, name), np.full(extra, np.nan)]))

    def columns(self) -> dict[str, np.ndarray]:
        """Every per-slot 1-D array under its ``arrays()`` key, by reference (not copies)."""
        out = {name: getattr(self, name) for name in (*INT_COLUMNS, *FLOAT_COLUMNS)}
        out.update({f"norm_{k}": v for k, v in self.normalizer.state_arrays().items()})
        out.update({f"score_{k}": v for k, v in self.scorer.state_arrays().items()})
        out.update({f"mix_{k}": v for k, v in self.combiner.state_arrays().items()})
        return out

    def arrays(self, slots: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """Every per-slot array (used slots, or ``slots``), for checkpoints and eviction.

        ``state`` is ``(num_layers, n, width)``; every other array is ``(n,)``; all are copies.
        """
        if slots is None:  # the used slots are 0..n-1: slices, copied once
            n = len(self.names)
            out = {
                key: state[:, :n].detach().to("cpu", copy=True).numpy()
                for key, state in self.states().items()
            }
            out.update({key: column[:n].copy() for key, column in self.columns().items()})
            return out
        index = torch.as_tensor(slots, dtype=torch.long, device=self.device)
        # index_select and NumPy's fancy indexing both copy.
        out = {
            key: state.index_select(1, index).detach().cpu().numpy()
            for key, state in self.states().items()
        }
        out.update({key: column[slots] for key, column in self.columns().items()})
        return out

    def load(self, names: list[str], arrays: dict[str, np.ndarray]) -> None:
        """Replace every stream with the ones in a checkpoint (inverse of ``arrays``)."""
        n = len(names)
        capacity = max(16, n)
        self.slots = {name: i for i, name in enumerate(names)}
        self.names = list(names)
        self.state = self.model.init_state(capacity, self.device)
        self.state[:, :n] = torch.as_tensor(arrays["state"], device=self.device)
        self.challenger_state = self._challenger_state(capacity)
        kept = arrays.get("challenger_state")  # absent after another challenger: afresh
        shadow = self.challenger_state
        if (
            shadow is not None
            and kept is not None
            and kept.shape == (shadow.shape[0], n, shadow.shape[2])
        ):
            shadow[:, :n] = torch.as_tensor(kept, device=self.device)
        self.normalizer = Normalizer(self.normalizer.config, capacity)
        self.scorer = Scorer(self.scorer.config, capacity)
        self.combiner = Combiner(self.combiner.config, capacity)
        for name in (*INT_COLUMNS, "scratch"):
            setattr(self, name, np.zeros(capacity, dtype=np.int64))
        for name in FLOAT_COLUMNS:
            setattr(self, name, np.full(capacity, np.nan))
        for key, column in self.columns().items():
            if key in arrays:  # older checkpoints lack the newer columns: they start fresh
                column[:n] = arrays[key]

    # -- eviction (engine.max_streams) ----------------------------------------------------------
    def take(self, streams: list[str]) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
        """Remove ``streams`` and return their arrays (``arrays()`` layout, in that order).

        Slots stay dense: the highest used slots move into the holes, so ``arrays()`` and a tick's
        gather still index ``0..len-1``. Also returns the moves ``(src, dst)`` for the learner.
        """
        n = len(self.names)
        gone = np.fromiter((self.slots[s] for s in streams), dtype=np.int64, count=len(streams))
        taken = self.arrays(gone)
        keep = n - len(gone)
        is_gone = np.zeros(n, dtype=bool)
        is_gone[gone] = True
        dst = np.flatnonzero(is_gone[:keep])  # holes below the new end
        src = keep + np.flatnonzero(~is_gone[keep:])  # survivors above it
        if len(src):
            s_index = torch.as_tensor(src, device=self.device)
            d_index = torch.as_tensor(dst, device=self.device)
            for state in self.states().values():
                state.index_copy_(1, d_index, state.index_select(1, s_index))
            for column in self.columns().values():
                column[dst] = column[src]
        for stream in streams:
            del self.slots[stream]
        for s, d in zip(src.tolist(), dst.tolist(), strict=True):
            name = self.names[s]
            self.names[d] = name
            self.slots[name] = d
        del self.names[keep:]
        self._reset(np.arange(keep, n))
        return taken, src, dst

    def put(self, streams: list[str], arrays: dict[str, np.ndarray]) -> None:
        """Add ``streams`` with the state ``take`` returned for them (bit for bit)."""
        start = len(self.names)
        end = start + len(streams)
        if end > self.capacity:
            self._grow(self._next_capacity(end))
        slots = np.arange(start, end)
        index = torch.as_tensor(slots, device=self.device)
        for key, tensor in self.states().items():
            state = arrays.get(key)  # (num_layers, k, width); a challenger's may be missing
            if (
                state is not None
                and state.shape[0] == tensor.shape[0]
                and state.shape[2] == tensor.shape[2]
            ):
                state = torch.as_tensor(state, device=self.device)
                tensor.index_copy_(1, index, state.to(tensor.dtype))
            else:  # parked before this challenger: a fresh state
                tensor.index_fill_(1, index, 0.0)
        for key, column in self.columns().items():
            if key in arrays:
                column[slots] = arrays[key]
        for stream, slot in zip(streams, slots.tolist(), strict=True):
            self.slots[stream] = slot
            self.names.append(stream)

    def _reset(self, slots: np.ndarray) -> None:
        """Fresh (never used) values in ``slots``."""
        index = torch.as_tensor(slots, device=self.device)
        for state in self.states().values():
            state.index_fill_(1, index, 0.0)
        self.normalizer.reset(slots)
        self.scorer.reset(slots)
        self.combiner.reset(slots)
        for name in INT_COLUMNS:
            getattr(self, name)[slots] = 0
        for name in FLOAT_COLUMNS:
            getattr(self, name)[slots] = np.nan
