"""Error hierarchy: every error the daemon raises on purpose carries data, not just text."""

from __future__ import annotations


class ForecasterError(Exception):
    """Base of every error forecaster raises on purpose."""


class ConfigError(ForecasterError):
    """A configuration file or override is invalid; the message names the key path."""


class PayloadError(ForecasterError):
    """A message could not become a sample; `.reason` is a bounded label for metrics."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class CheckpointError(ForecasterError):
    """A checkpoint is missing, corrupt or does not fit the model; names the file and field."""

    def __init__(self, path: object, field: str, detail: str) -> None:
        super().__init__(f"checkpoint {path}: field {field!r}: {detail}")
        self.path = path
        self.field = field
        self.detail = detail


class StateLossError(ForecasterError):
    """Journaled samples a restart needs are gone (journal truncated, older than the checkpoint,
    WAL lost); ``.gaps``: the missing positions as inclusive ranges (``(first, None)``: an unknown
    number from ``first`` on). Start is refused unless the loss is accepted."""

    def __init__(self, message: str, gaps: list[tuple[int, int | None]]) -> None:
        super().__init__(message)
        self.gaps = gaps
