"""StreamTable: stream id -> slot, and every stream's serving state in slot-indexed arrays.

The hidden state of all streams lives in one tensor ``(num_layers, capacity, state_width)`` so a
tick can gather the slots it touches, step them in one batched call and scatter them back. The
per-stream scalars (normaliser statistics, interval and anomaly statistics, last value, last
forecast and its interval, sequence number) live in NumPy arrays indexed by the same slot.
"""

from __future__ import annotations

import numpy as np
import torch

from forecaster.model import Forecaster
from forecaster.normalize import Normalizer, NormalizerConfig
from forecaster.scoring import Scorer, ScoringConfig

FLOAT_COLUMNS = ("last_value", "last_prediction", "last_ts", "last_lower", "last_upper")


class StreamTable:
    """Slots for streams, grown by doubling; state that a checkpoint must carry."""

    def __init__(
        self,
        model: Forecaster,
        normalizer: NormalizerConfig,
        device: torch.device | str = "cpu",
        capacity: int = 16,
        scoring: ScoringConfig | None = None,
    ) -> None:
        self.model = model
        self.device = torch.device(device)
        self.slots: dict[str, int] = {}
        self.names: list[str] = []
        self.state = model.init_state(capacity, self.device)  # (num_layers, capacity, width)
        self.normalizer = Normalizer(normalizer, capacity)
        self.scorer = Scorer(scoring, capacity)  # interval and anomaly statistics
        self.seq = np.zeros(capacity, dtype=np.int64)  # last applied sequence number
        self.last_value = np.full(capacity, np.nan)
        self.last_prediction = np.full(capacity, np.nan)
        self.last_ts = np.full(capacity, np.nan)
        self.last_lower = np.full(capacity, np.nan)  # interval published with last_prediction
        self.last_upper = np.full(capacity, np.nan)

    def __len__(self) -> int:
        return len(self.names)

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
                self._grow(max(16, 2 * self.capacity))
            self.slots[stream] = slot
            self.names.append(stream)
        return slot

    def _grow(self, capacity: int) -> None:
        extra = capacity - self.capacity
        fresh = self.model.init_state(extra, self.device)  # (num_layers, extra, width)
        self.state = torch.cat([self.state, fresh], dim=1)  # (num_layers, capacity, width)
        self.normalizer.grow(capacity)
        self.scorer.grow(capacity)
        self.seq = np.concatenate([self.seq, np.zeros(extra, dtype=np.int64)])
        for name in FLOAT_COLUMNS:
            setattr(self, name, np.concatenate([getattr(self, name), np.full(extra, np.nan)]))

    def arrays(self) -> dict[str, np.ndarray]:
        """Every per-slot array (used slots only), for checkpoints and equality checks."""
        n = len(self.names)
        out = {
            "state": self.state[:, :n].detach().cpu().numpy(),  # (num_layers, n, width)
            "seq": self.seq[:n],
        }
        out.update({name: getattr(self, name)[:n] for name in FLOAT_COLUMNS})
        out.update({f"norm_{k}": v[:n] for k, v in self.normalizer.state_arrays().items()})
        out.update({f"score_{k}": v[:n] for k, v in self.scorer.state_arrays().items()})
        return {k: np.array(v, copy=True) for k, v in out.items()}

    def load(self, names: list[str], arrays: dict[str, np.ndarray]) -> None:
        """Replace every stream with the ones in a checkpoint (inverse of ``arrays``)."""
        n = len(names)
        capacity = max(16, n)
        self.slots = {name: i for i, name in enumerate(names)}
        self.names = list(names)
        self.state = self.model.init_state(capacity, self.device)
        self.state[:, :n] = torch.as_tensor(arrays["state"], device=self.device)
        self.normalizer = Normalizer(self.normalizer.config, capacity)
        norm = {k[5:]: v for k, v in arrays.items() if k.startswith("norm_")}
        for key, values in norm.items():
            getattr(self.normalizer, key)[:n] = values
        self.scorer = Scorer(self.scorer.config, capacity)
        self.scorer.load_arrays({k[6:]: v for k, v in arrays.items() if k.startswith("score_")}, n)
        self.seq = np.zeros(capacity, dtype=np.int64)
        self.seq[:n] = arrays["seq"]
        for name in FLOAT_COLUMNS:
            column = np.full(capacity, np.nan)
            if name in arrays:
                column[:n] = arrays[name]
            setattr(self, name, column)
