"""The one bounded vocabulary of why a sample is refused or a message lost.

Every refusal is counted by one of these labels (``forecaster_samples_rejected_total{reason}``,
``forecaster_messages_dropped_total{reason}``), so the list lives in one torch-free module that
parse, engine and metrics all import: a reason cannot be raised without being declared, nor
declared for a counter that never sees it.

>>> set(ENGINE_REASONS) <= set(REASONS) and not set(DROP_REASONS) & set(REASONS)
True
"""

from __future__ import annotations

# Refused by the engine, in this order: ``Engine.admit`` codes a row's reason as 1 + its index.
ENGINE_REASONS = (
    "not_a_number",
    "non_finite",
    "out_of_range",
    "bad_stream",
    "duplicate",
    "bad_seq",
)

# Every reason a sample is refused before touching any state (parse, the engine, the daemon's
# ``internal_error``): the labels of ``forecaster_samples_rejected_total``.
REASONS = (
    "too_large",
    "empty",
    "not_utf8",
    "invalid_json",
    "missing_value",
    "not_a_number",
    "non_finite",
    "out_of_range",
    "bad_timestamp",
    "bad_seq",
    "unknown_topic",
    "bad_stream",
    "duplicate",
    "new_stream_limit",
    "internal_error",
)

# Messages the daemon lost: the receive queue was full (``queue_full``: the arriving one,
# ``queue_full_oldest``: the oldest queued). Labels of ``forecaster_messages_dropped_total``.
DROP_REASONS = ("queue_full", "queue_full_oldest")
